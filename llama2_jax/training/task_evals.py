"""lm-eval tasks during training (`config.eval_tasks`): pretraining, SFT and DPO run them in process from the loop.

    config.eval_tasks = "text_perplexity,piqa_local"      # comma-separated lm-eval task names ("" = none)
    config.eval_tasks_every_steps = 1000                  # cadence (and always at the last step)
    config.eval_tasks_limit = 0                           # documents per task (0 = all)
    config.eval_tasks_num_fewshot = 0
    config.eval_tasks_metadata = "text_path=val.txt,piqa_path=piqa.jsonl"  # the tasks' data files (k=v pairs)

`make_task_evals` checks these fields (ConfigError, before anything compiles), builds lm-eval's TaskManager once and
returns `extra_evals(params, step) -> {"eval/<task>/<metric>": value}` for `loop.run_loop`. The params are scored where
they are (sharded on the training mesh; `llama2_jax.evaluation.harness.evaluate_tasks`); nothing is written to disk.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable, Optional

import jax

from llama2_jax.evaluation.harness import evaluate_tasks
from llama2_jax.evaluation.tasks import TASKS_DIR
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text.tokenizer import Tokenizer

ExtraEvals = Callable[[object, int], dict[str, float]]


class TaskEvalsError(ValueError):
    """Raised for a bad eval_tasks* field; training.setup turns it into its ConfigError."""


@dataclasses.dataclass(frozen=True)
class TaskEvalSettings:
    tasks: tuple[str, ...]
    limit: Optional[int]  # None = every document
    num_fewshot: Optional[int]  # None = each task's default
    metadata: dict[str, str]


def parse_metadata(text: str) -> dict[str, str]:
    """"k=v,k=v" -> {k: v}; "" -> {}."""
    metadata = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise TaskEvalsError(f"config.eval_tasks_metadata: {item!r} is not KEY=VALUE "
                                 "(expected e.g. 'text_path=FILE,piqa_path=FILE')")
        metadata[key.strip()] = value.strip()
    return metadata


def settings_from_config(config) -> Optional[TaskEvalSettings]:
    """The eval_tasks* fields, checked; None when config.eval_tasks is empty (or absent)."""
    tasks = tuple(filter(None, (name.strip() for name in (config.get("eval_tasks", "") or "").split(","))))
    if not tasks:
        return None
    if importlib.util.find_spec("lm_eval") is None:
        raise TaskEvalsError(f"config.eval_tasks is {config.eval_tasks!r} but lm-eval is not installed: "
                             "pip install -e .[eval]")
    if jax.process_count() > 1:
        raise TaskEvalsError("config.eval_tasks runs in one process only (lm-eval reads every score on the host); "
                             "evaluate the checkpoints with python -m llama2_jax.evaluate instead")
    every, limit, fewshot = (config.get(name, 0) for name in
                             ("eval_tasks_every_steps", "eval_tasks_limit", "eval_tasks_num_fewshot"))
    for name, value, low in (("eval_tasks_every_steps", every, 1), ("eval_tasks_limit", limit, 0),
                             ("eval_tasks_num_fewshot", fewshot, 0)):
        if not isinstance(value, int) or value < low:
            raise TaskEvalsError(f"config.{name} is {value!r}, expected an integer >= {low}")
    metadata = parse_metadata(config.get("eval_tasks_metadata", "") or "")
    for key, value in metadata.items():
        if key.endswith("_path") and not os.path.exists(os.path.expanduser(value)):
            raise TaskEvalsError(f"config.eval_tasks_metadata: {key}={value} not found")
    return TaskEvalSettings(tasks, limit or None, fewshot or None, metadata)


def task_manager(tasks: tuple[str, ...], metadata: dict[str, str]):
    """lm-eval's TaskManager for `tasks`: the project's task YAMLs alone when they cover every task (instant),
    else with lm-eval's own tasks too (indexing those takes many seconds). Unknown names: TaskEvalsError."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False, metadata=metadata)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=[str(TASKS_DIR)], metadata=metadata)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise TaskEvalsError(f"config.eval_tasks: unknown lm-eval task(s) {', '.join(unknown)} "
                             "(see lm-eval ls tasks, or llama2_jax/evaluation/tasks)")
    return manager


def flat_keys(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: value}} -> {"eval/<task>/<metric>": value}, the Tracker's scalar names."""
    return {f"eval/{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}


def make_task_evals(config, model_cfg: LlamaConfig, tokenizer: Tokenizer, mesh) -> Optional[ExtraEvals]:
    """`extra_evals(params, step)` for `loop.run_loop`, or None when config.eval_tasks is empty. Checks the fields
    and the task names now (TaskEvalsError), so a typo fails before the first step compiles."""
    settings = settings_from_config(config)
    if settings is None:
        return None
    manager = task_manager(settings.tasks, settings.metadata)
    dtype = "bfloat16" if str(model_cfg.dtype) == "bfloat16" else "float32"  # the training compute dtype

    def extra_evals(params, step: int) -> dict[str, float]:
        del step  # the loop logs the rows at its step
        results = evaluate_tasks(params, model_cfg, tokenizer, settings.tasks, limit=settings.limit,
                                 num_fewshot=settings.num_fewshot, mesh=mesh, dtype=dtype, task_manager=manager)
        return flat_keys(results)

    return extra_evals
