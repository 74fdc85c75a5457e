"""lm-evaluation-harness in process: `evaluate_tasks` runs lm-eval tasks with our `llama2_jax` backend
(lm_eval_backend.py) on params in memory, the entry point for training loops; `flat_metrics` flattens lm-eval's
results. The command line over lm-eval's own `run` is llama2_jax/cli/evaluate.py (`python -m llama2_jax.evaluate`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

from llama2_jax.evaluation.tasks import TASKS_DIR

DEFAULT_BATCH_SIZE = 16


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("lm-eval is not installed: pip install -e .[eval]")


def make_task_manager(include_path, metadata: Optional[dict]):
    from lm_eval.tasks import TaskManager

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
      tokenizer: a `llama2_jax.text.tokenizer.Tokenizer`.
      tasks: lm-eval task names (ours from llama2_jax/eval_tasks, lm-eval's, or from include_path).
      limit: documents per task (None = all; a float < 1 = a fraction), num_fewshot: lm-eval's.
      mesh: shard params and batches on it (sharding.LOGICAL_RULES); include_path: extra task dirs.
      metadata: task arguments, e.g. {"piqa_path": FILE}; dtype: compute dtype (default: float32 on CPU).
      task_manager: an lm-eval TaskManager built once by the caller (then include_path and metadata are unused);
        indexing lm-eval's own task YAMLs takes many seconds, so a training loop builds it once.
    """
    require_lm_eval()
    import lm_eval

    from llama2_jax.evaluation.lm_eval_backend import LlamaJaxLM

    lm = LlamaJaxLM.from_params(params, cfg, tokenizer, dtype=dtype, batch_size=batch_size, mesh=mesh)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager or make_task_manager(include_path, metadata),
                                      log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
    return flat_metrics(results)
