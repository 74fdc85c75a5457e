"""Evaluation: lm-evaluation-harness with our `llama2_jax` backend, and reward-model pair accuracy.

  python -m llama2_jax.evaluate --checkpoint=DIR --tokenizer=FILE --tasks=piqa_local,text_perplexity \\
      --metadata piqa_path=../shared/data/piqa-valid-with-labels.jsonl text_path=FILE.txt \\
      [--num_fewshot=N --limit=N --include_path=DIR --batch_size=16 --output_path=DIR --apply_chat_template \\
       --dtype=float32|bfloat16 --mesh=data:fsdp:tensor --max_length=N]
  python -m llama2_jax.evaluate --reward_model=DIR --pairs=FILE [--tokenizer=FILE --histogram=PNG]

The first form is a thin wrapper over lm-eval's own `run` command (every lm-eval flag works and is passed through):
it registers the backend (lm_eval_backend.py), passes --checkpoint/--tokenizer/--dtype/--mesh/--max_length as its
model_args and adds the project's task YAMLs (llama2_jax/eval_tasks) to --include_path. lm-eval prints its table
and, with --output_path, writes its results JSON. Offline use: HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1; any lm-eval task whose
data is in the local datasets cache works. `evaluate_tasks` is the in-process entry point for training loops.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from llama2_jax import paths

DEFAULT_BATCH_SIZE = 16


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install -e .[eval]") from None


def _task_manager(include_path, metadata: Optional[dict]):
    from lm_eval.tasks import TaskManager

    from llama2_jax.eval_tasks import TASKS_DIR

    paths = [str(TASKS_DIR)] + ([] if include_path is None else
                                [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    return TaskManager(include_path=[str(p) for p in paths], metadata=metadata or {})


def flat_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results["results"] -> {task: {metric: float}}, the ",none" filter suffix dropped
    ("acc,none" -> "acc"; other filters keep their name, e.g. "exact_match,strict-match")."""
    out = {}
    for task, entries in results["results"].items():
        out[task] = {key.removesuffix(",none"): float(value) for key, value in entries.items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return out


def evaluate_tasks(params, cfg, tokenizer, tasks: Sequence[str], *, limit: Optional[int | float],
                   num_fewshot: Optional[int], mesh=None, include_path=None, batch_size: int = DEFAULT_BATCH_SIZE,
                   metadata: Optional[dict] = None, dtype: Optional[str] = None,
                   task_manager=None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on params in memory (no checkpoint is written): {task: {metric: value}}.

    Args:
      params, cfg: the Llama params (host, device or sharded arrays) and their LlamaConfig.
      tokenizer: a `llama2_jax.tokenizer.Tokenizer`.
      tasks: lm-eval task names (ours from llama2_jax/eval_tasks, lm-eval's, or from include_path).
      limit: documents per task (None = all; a float < 1 = a fraction), num_fewshot: lm-eval's.
      mesh: shard params and batches on it (sharding.LOGICAL_RULES); include_path: extra task dirs.
      metadata: task arguments, e.g. {"piqa_path": FILE}; dtype: compute dtype (default: float32 on CPU).
      task_manager: an lm-eval TaskManager built once by the caller (then include_path and metadata are unused);
        indexing lm-eval's own task YAMLs takes many seconds, so a training loop builds it once.
    """
    _require_lm_eval()
    import lm_eval

    from llama2_jax.lm_eval_backend import LlamaJaxLM

    lm = LlamaJaxLM.from_params(params, cfg, tokenizer, dtype=dtype, batch_size=batch_size, mesh=mesh)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager or _task_manager(include_path, metadata),
                                      log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
    return flat_metrics(results)


# ------------------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama2_jax.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is lm-eval's `run` flag (lm-eval run --help), e.g. --tasks, --num_fewshot, --limit, "
               "--include_path, --batch_size, --output_path, --apply_chat_template, --metadata, --log_samples.")
    parser.add_argument("--checkpoint", help="converted checkpoint dir or trainer workdir (language model)")
    parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default for --reward_model: "
                                            "DIR/tokenizer.model)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: float32 on CPU, else bfloat16)")
    parser.add_argument("--mesh", default=None, help="data:fsdp:tensor, e.g. 1:-1:1 (default: no mesh)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="scoring window in tokens (default: the checkpoint's max_seq_len), as lm-eval's hf "
                             "max_length; a continuation longer than it is an error")
    parser.add_argument("--reward_model", help="reward-model trainer workdir: evaluate it on --pairs")
    parser.add_argument("--pairs", help="preference pairs file (any format of data.preferences)")
    parser.add_argument("--histogram", default="rm_score_histogram.png", help="PNG of chosen vs rejected scores")
    return parser


def _check_paths(args) -> None:
    if args.reward_model:
        if not args.pairs:
            raise ValueError("--reward_model needs --pairs=FILE")
        args.tokenizer = args.tokenizer or os.path.join(args.reward_model, "tokenizer.model")
        checks = (("--reward_model", args.reward_model), ("--pairs", args.pairs), ("--tokenizer", args.tokenizer))
    else:
        if not args.checkpoint or not args.tokenizer:
            raise ValueError("pass --checkpoint=DIR and --tokenizer=FILE (or --reward_model=DIR --pairs=FILE)")
        checks = (("--checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer))
    for flag, path in checks:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag}={path} does not exist")


def _lm_eval_args(args, rest: list[str]):
    """lm-eval `run` arguments: ours as the backend's model_args, our task dir first on the include path."""
    from lm_eval._cli import HarnessCLI

    import llama2_jax.lm_eval_backend  # noqa: F401  (registers the llama2_jax backend)
    from llama2_jax.eval_tasks import TASKS_DIR

    model_args = f"checkpoint={args.checkpoint},tokenizer={args.tokenizer}"
    model_args += "".join(f",{name}={value}" for name, value in
                          (("dtype", args.dtype), ("mesh", args.mesh), ("max_length", args.max_length)) if value)
    if not any(a == "--batch_size" or a.startswith("--batch_size=") for a in rest):
        rest = rest + ["--batch_size", str(DEFAULT_BATCH_SIZE)]
    cli = HarnessCLI()
    lm_args = cli._parser.parse_args(["run", "--model", "llama2_jax", "--model_args", model_args] + rest)
    lm_args.include_path = [str(TASKS_DIR)] + ([lm_args.include_path] if lm_args.include_path else [])
    return cli, lm_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        _check_paths(args)
        if args.reward_model:
            if rest:
                raise ValueError(f"unknown arguments for --reward_model: {' '.join(rest)}")
            from llama2_jax import rm_eval

            paths.prepare_output_file(args.histogram, "--histogram")
            rm_eval.run(args.reward_model, args.pairs, args.tokenizer, args.histogram)
            return 0
        _require_lm_eval()
        cli, lm_args = _lm_eval_args(args, list(rest))
        if lm_args.output_path:  # checked before any model is loaded or task run
            paths.prepare_results_path(lm_args.output_path, "--output_path")
        cli.execute(lm_args)  # bad model_args, task names or task data files raise one of these
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
