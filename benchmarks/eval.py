"""lm-eval throughput: our `llama2_jax` backend against lm-eval's `hf` backend, same model, task and limit.

One random model (ours) is saved in the jax format and converted to HF (`convert --to=hf --tokenizer`) in a temporary
directory. lm-eval builds the task's requests once (its Instances for the first --limit documents); each backend
then answers all of them in one call (`loglikelihood`, `loglikelihood_rolling` or `generate_until`), so lm-eval's
task indexing and metrics are not timed. Each side runs once as a warm-up (ours: compilation of every width bucket;
hf: torch's first calls), then --repeats timed runs alternate between the two so that both see the same machine
load; the fastest run of each is reported as requests/s, with their ratio and how far the answers agree. One line:

  python benchmarks/eval.py --shape=15m --task=piqa_local --limit=100        # CPU, llama2.c's stories15M shape
  python benchmarks/eval.py --shape=15m --task=text_perplexity --limit=20

Needs lm-eval, torch and transformers, the Llama 2 tokenizer and (for the PIQA tasks) the PIQA JSONL (defaults: the
files in ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

from llama2_jax.checkpoints import convert  # noqa: E402
from llama2_jax.checkpoints.params_io import save_params  # noqa: E402
from llama2_jax.model.config import LlamaConfig  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from generate import SHAPES, random_params  # noqa: E402  (benchmarks/generate.py: the shared shapes)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("piqa_local", "piqa_local_gen", "text_perplexity")


def task_requests(task: str, limit: int, metadata: dict):
    """(request type, lm-eval Instances) of the first `limit` documents of `task`, built once by lm-eval."""
    from llama2_jax.evaluation.harness import make_task_manager

    task_obj = make_task_manager(None, metadata).load_task_or_group([task])[task]
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    instances = task_obj.instances
    return instances[0].request_type, instances


def _run(lm, request_type: str, instances) -> tuple[float, list]:
    """(seconds, responses) of one call of the backend on all the requests."""
    start = time.perf_counter()
    responses = getattr(lm, request_type)(instances, disable_tqdm=True)
    return time.perf_counter() - start, responses


def _agreement(request_type: str, ours: list, hf: list) -> str:
    if request_type == "generate_until":
        return f"same generations {sum(a == b for a, b in zip(ours, hf))}/{len(ours)}"
    values = [(r[0] if isinstance(r, tuple) else r) for r in ours], [(r[0] if isinstance(r, tuple) else r) for r in hf]
    return f"max |loglikelihood diff| {max(abs(a - b) for a, b in zip(*values)):.2e}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="15m")
    parser.add_argument("--max_seq_len", type=int, default=256, help="model context (rolling window length)")
    parser.add_argument("--task", choices=TASKS, default="piqa_local")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(SHARED / "llama2-tokenizer.model"))
    parser.add_argument("--piqa_path", default=str(SHARED / "piqa-valid-with-labels.jsonl"))
    parser.add_argument("--text_path", default=str(SHARED / "tinyshakespeare.txt"))
    args = parser.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from llama2_jax.evaluation.lm_eval_backend import LlamaJaxLM

    cfg: LlamaConfig = SHAPES[args.shape].replace(max_seq_len=args.max_seq_len, dtype="float32")
    metadata = {"piqa_path": args.piqa_path, "text_path": args.text_path}
    with tempfile.TemporaryDirectory() as tmp:
        save_params(f"{tmp}/jax", jax.device_get(random_params(cfg)), cfg)
        convert.convert("jax", "hf", f"{tmp}/jax", f"{tmp}/hf", tokenizer=args.tokenizer)
        sides = {"ours": LlamaJaxLM(checkpoint=f"{tmp}/jax", tokenizer=args.tokenizer, dtype="float32",
                                    batch_size=args.batch_size),
                 "hf": HFLM(pretrained=f"{tmp}/hf", dtype="float32", batch_size=args.batch_size, device="cpu")}
        request_type, instances = task_requests(args.task, args.limit, metadata)
        best, responses = {}, {}
        for name, lm in sides.items():  # warm-up
            _run(lm, request_type, instances)
        for _ in range(args.repeats):
            for name, lm in sides.items():
                seconds, responses[name] = _run(lm, request_type, instances)
                best[name] = min(best.get(name, float("inf")), seconds)
    requests = len(instances)
    ours, hf = requests / best["ours"], requests / best["hf"]
    print(f"eval task={args.task} {request_type} limit={args.limit} requests={requests} shape={args.shape} "
          f"seq={args.max_seq_len} batch={args.batch_size} float32 device={jax.devices()[0].platform} "
          f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} load1={os.getloadavg()[0]:.1f} "
          f"| ours {ours:.1f} req/s ({best['ours']:.2f} s), hf {hf:.1f} req/s ({best['hf']:.2f} s), "
          f"ratio {ours / hf:.2f}x | {_agreement(request_type, responses['ours'], responses['hf'])} "
          f"| {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
