"""Range checks of the config fields every trainer shares (configs/base.py), run first on the set-up path
(`training.setup`), before anything is read, written or compiled.

Each bad value is a one-line `ConfigError` naming the field; fields a config does not have are skipped (the trainer
parents add their own fields and check them themselves; RLHF's sampling fields and iterations are checked by
train.rejection_sampling and train.ppo).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from llama2_jax.paths import writable_dir_problem


class ConfigError(ValueError):
    """A bad config field or input, reported as one line before compilation."""


Check = tuple[str, Callable[[Any], bool], str]  # (dotted field, accepts(value), what it must be)

_POSITIVE_INT = (lambda v: _is_int(v) and v > 0, ">= 1 (an integer)")
_NON_NEGATIVE_INT = (lambda v: _is_int(v) and v >= 0, ">= 0 (an integer)")
_FRACTION = (lambda v: _is_number(v) and 0.0 <= v < 1.0, "in [0, 1)")
_CLOSED_FRACTION = (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "in [0, 1]")
_NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0.0, ">= 0")
_POSITIVE = (lambda v: _is_number(v) and v > 0.0, "> 0")

SHARED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": _POSITIVE_INT,
    "seq_len": _POSITIVE_INT,
    "grad_accum_steps": _POSITIVE_INT,
    "learning_rate": (_POSITIVE[0], "> 0 (a zero peak learning rate trains nothing, a negative one ascends the loss)"),
    "warmup_steps": _NON_NEGATIVE_INT,
    "lr_end_fraction": _CLOSED_FRACTION,
    "adam_b1": _FRACTION,
    "adam_b2": _FRACTION,
    "adam_eps": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "grad_clip": (_NON_NEGATIVE[0], ">= 0 (0 disables clipping)"),
    "num_train_steps": _POSITIVE_INT,
    "log_every_steps": _POSITIVE_INT,
    "eval_every_steps": _POSITIVE_INT,
    "eval_batches": (_NON_NEGATIVE_INT[0], ">= 0 (an integer; 0 = the whole held-out split)"),
    "num_epochs": (_NON_NEGATIVE[0], ">= 0 (0 = use num_train_steps)"),
    "checkpoint_every_steps": _POSITIVE_INT,
    "keep_checkpoints": _POSITIVE_INT,
    "sample_tokens": _NON_NEGATIVE_INT,
    "data.val_fraction": _FRACTION,
    "data.shuffle_window": _POSITIVE_INT,
    "tokenizer.train_vocab_size": _POSITIVE_INT,
    "reward.safety_threshold": _CLOSED_FRACTION,
    "prompts.max_prompts": (_NON_NEGATIVE_INT[0], ">= 0 (an integer; 0 = all)"),
    "prompts.max_prompt_len": _POSITIVE_INT,
    "prompts.val_fraction": _FRACTION,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _lookup(config, dotted: str):
    """(found, value) of a dotted field of a ConfigDict (or nested dicts)."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "get") or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_shared_fields(config) -> None:
    """ConfigError for the first shared field out of range (see SHARED_FIELDS). num_train_steps is checked only when
    num_epochs is 0 (it is the run's length then)."""
    epochs_given = _lookup(config, "num_epochs")[1] or 0
    for field, (accepts, expected) in SHARED_FIELDS.items():
        found, value = _lookup(config, field)
        if not found or (field == "num_train_steps" and _is_number(epochs_given) and epochs_given > 0):
            continue
        if not accepts(value):
            raise ConfigError(f"config.{field} must be {expected}, got {value!r}")


def check_attention_backend(attention_impl: str, interpret: bool = False) -> None:
    """ConfigError when config.model.attention_impl needs an accelerator the default JAX backend is not: "cudnn"
    (fused flash attention) runs on NVIDIA GPUs only, "splash" (a Pallas TPU kernel) on TPUs only unless
    config.model.attention_interpret runs it in interpret mode."""
    backend = jax.default_backend()
    if attention_impl == "cudnn" and backend != "gpu":
        raise ConfigError(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU, but the JAX backend is "
                          f"{backend!r}; use --config.model.attention_impl=xla")
    if attention_impl == "splash" and backend != "tpu" and not interpret:
        raise ConfigError(f"config.model.attention_impl='splash' needs a TPU, but the JAX backend is {backend!r}; use "
                          "--config.model.attention_impl=xla (or --config.model.attention_interpret=True to run the "
                          "kernel in Pallas interpret mode, slowly)")


def check_workdir_path(workdir: str) -> None:
    """ConfigError unless --workdir is (or can be created as) a directory this process can write in; creates it.
    Local paths only (gs:// and other remote paths are left to the checkpointer)."""
    if not workdir:
        raise ConfigError("--workdir is empty")
    if "://" in workdir:
        return
    problem = writable_dir_problem(workdir)
    if problem and problem[0] == "file":
        raise ConfigError(f"--workdir: {workdir} is a file, not a directory")
    if problem:
        raise ConfigError(f"--workdir: {workdir} is not writable ({problem[1]})")


def config_load_error(error: OSError) -> str:
    """One line for ml_collections' multi-line "Failed loading config file" error (a missing or broken
    --config file): its last line, which names the file and the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"--config: {lines[-1] if lines else error}"
