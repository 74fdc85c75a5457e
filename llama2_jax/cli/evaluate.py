"""`python -m llama2_jax.evaluate`: lm-evaluation-harness with our `llama2_jax` backend, and reward-model accuracy.

  python -m llama2_jax.evaluate --checkpoint=DIR --tokenizer=FILE --tasks=piqa_local,text_perplexity \\
      --metadata piqa_path=../shared/data/piqa-valid-with-labels.jsonl text_path=FILE.txt \\
      [--num_fewshot=N --limit=N --include_path=DIR --batch_size=16 --output_path=DIR --apply_chat_template \\
       --dtype=float32|bfloat16 --mesh=data:fsdp:tensor --max_length=N]
  python -m llama2_jax.evaluate --reward_model=DIR --pairs=FILE [--tokenizer=FILE --histogram=PNG]

The first form is a thin wrapper over lm-eval's own `run` command (every lm-eval flag works and is passed through):
it registers the backend (lm_eval_backend.py), passes --checkpoint/--tokenizer/--dtype/--mesh/--max_length as its
model_args and adds the project's task YAMLs (llama2_jax/evaluation/tasks) to --include_path. lm-eval prints its table
and, with --output_path, writes its results JSON. Offline use: HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1; any lm-eval
task whose data is in the local datasets cache works. In process: llama2_jax.evaluation.harness.evaluate_tasks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from llama2_jax import paths
from llama2_jax.evaluation.harness import DEFAULT_BATCH_SIZE, require_lm_eval
from llama2_jax.evaluation.tasks import TASKS_DIR


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

    importlib.import_module("llama2_jax.evaluation.lm_eval_backend")  # registers the llama2_jax backend

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
            from llama2_jax.evaluation import reward_model as rm_eval

            paths.prepare_output_file(args.histogram, "--histogram")
            rm_eval.run(args.reward_model, args.pairs, args.tokenizer, args.histogram)
            return 0
        require_lm_eval()
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
