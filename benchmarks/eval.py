"""lm-eval throughput: our `llama2_jax` backend against lm-eval's `hf` backend, same model, task and limit.

One random model (ours) is saved in the jax format and converted to HF (`convert --to=hf --tokenizer`) in a temporary
directory; both backends then run the same lm-eval task through `lm_eval.simple_evaluate`. Each side runs once as a
warm-up (ours: compilation of every width bucket the task needs; hf: torch's first calls), then --repeats timed
runs alternate between the two so that both see the same machine load; the fastest run of each is reported as
requests/s, with their ratio and the agreement of the task metric. One line:

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

from llama2_jax import convert  # noqa: E402
from llama2_jax.checkpoint import save_params  # noqa: E402
from llama2_jax.config import LlamaConfig  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from generate import SHAPES, random_params  # noqa: E402  (benchmarks/generate.py: the shared shapes)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
MAIN_METRIC = {"piqa_local": "acc", "piqa_local_gen": "exact_match", "text_perplexity": "word_perplexity"}


def _run(lm, task: str, limit: int, metadata: dict) -> tuple[float, int, float]:
    """(seconds, requests, main metric) of one simple_evaluate call."""
    import lm_eval

    from llama2_jax.evaluate import _task_manager, flat_metrics

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=_task_manager(None, metadata),
                                      bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - start
    requests = sum(len(s["resps"]) for s in results["samples"][task])
    return seconds, requests, flat_metrics(results)[task][MAIN_METRIC[task]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="15m")
    parser.add_argument("--max_seq_len", type=int, default=256, help="model context (rolling window length)")
    parser.add_argument("--task", choices=sorted(MAIN_METRIC), default="piqa_local")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(SHARED / "llama2-tokenizer.model"))
    parser.add_argument("--piqa_path", default=str(SHARED / "piqa-valid-with-labels.jsonl"))
    parser.add_argument("--text_path", default=str(SHARED / "tinyshakespeare.txt"))
    args = parser.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM

    from llama2_jax.lm_eval_backend import LlamaJaxLM

    cfg: LlamaConfig = SHAPES[args.shape].replace(max_seq_len=args.max_seq_len, dtype="float32")
    metadata = {"piqa_path": args.piqa_path, "text_path": args.text_path}
    with tempfile.TemporaryDirectory() as tmp:
        save_params(f"{tmp}/jax", jax.device_get(random_params(cfg)), cfg)
        convert.convert("jax", "hf", f"{tmp}/jax", f"{tmp}/hf", tokenizer=args.tokenizer)
        sides = {"ours": LlamaJaxLM(checkpoint=f"{tmp}/jax", tokenizer=args.tokenizer, dtype="float32",
                                    batch_size=args.batch_size),
                 "hf": HFLM(pretrained=f"{tmp}/hf", dtype="float32", batch_size=args.batch_size, device="cpu")}
        best, metric = {}, {}
        for name, lm in sides.items():  # warm-up
            _run(lm, args.task, args.limit, metadata)
        for _ in range(args.repeats):
            for name, lm in sides.items():
                seconds, requests, metric[name] = _run(lm, args.task, args.limit, metadata)
                best[name] = min(best.get(name, float("inf")), seconds)
    ours, hf = requests / best["ours"], requests / best["hf"]
    print(f"eval task={args.task} limit={args.limit} requests={requests} shape={args.shape} "
          f"seq={args.max_seq_len} batch={args.batch_size} float32 device={jax.devices()[0].platform} "
          f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} load1={os.getloadavg()[0]:.1f} "
          f"| ours {ours:.1f} req/s ({best['ours']:.2f} s), hf {hf:.1f} req/s ({best['hf']:.2f} s), "
          f"ratio {ours / hf:.2f}x | {MAIN_METRIC[args.task]} ours {metric['ours']:.6g} hf {metric['hf']:.6g} "
          f"| {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
