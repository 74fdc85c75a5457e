"""Rewards computed by Python functions, several of them with weights, and the Llama 2 reward-model pair through the
same interface.

The reward-function contract (TRL's, huggingface/trl trl/trainer/grpo_trainer.py `_calculate_rewards`, so its reward
functions run here unchanged when they take **kwargs):

    def my_reward(prompts: list[str], completions: list[str], **fields) -> Sequence[float]:
        ...

  * called with keyword arguments, once per batch of B completions; `prompts[i]` is the "prompt" of the record that
    completion i answers (as the record has it: a string or a list of messages; repeated G times in GRPO),
    `completions[i]` the sampled answer (decoded text, without the EOS);
  * `fields`: the prompt record's extra fields (every key of the JSONL record other than "prompt"), each a list of B
    values aligned with the completions (e.g. `answer=["42", ...]`). A function without **kwargs receives only the
    fields it names; a field it needs that the records lack is a one-line ConfigError before training
    (`check_reward_fields`);
  * returns B numbers (list, tuple or array). A call that raises, and a value that is None, NaN, infinite or not a
    number, is a counted failure: the function is called again one completion at a time to find the failing ones,
    each failing completion gets the configured fallback reward, and the batch's failures are logged in one line.
    Training goes on.

Named in the config as "package.module:function" (`load_reward_fn`); several with weights (`load_rewards`): the
reward of a completion is Σ_k w_k r_k (TRL's "sum_then_normalize"). Shipped functions:
  llama2_jax.data.arithmetic:exact_match          the synthetic arithmetic task's verifiable reward
  llama2_jax.rlhf.reward_functions:llama2_rm_pair the paper's two reward models (section 3.2.3), from their scores
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from llama2_jax.rlhf import formulas
from llama2_jax.training.checks import ConfigError

RewardFn = Callable[..., Sequence[Any]]
_log = logging.getLogger(__name__)
CONTRACT = "fn(prompts, completions, **fields) -> floats"


@dataclasses.dataclass(frozen=True)
class Reward:
    """One reward function of a run: its config name ("package.module:function"), the function, its weight in the
    sum and the reward a completion gets when the function fails on it."""
    spec: str
    fn: RewardFn
    weight: float = 1.0
    fallback: float = 0.0

    @property
    def name(self) -> str:
        """Short name for metrics: the function's name."""
        return self.spec.rsplit(":", 1)[-1]


def load_reward_fn(spec: str, field: str = "config.reward.fn") -> RewardFn:
    """The function named by "package.module:function" (the function may be a dotted attribute path). Each problem
    is a one-line ConfigError naming the field: not of that form, module not importable, no such attribute, not
    callable, or no `prompts` / `completions` keyword parameters."""
    where = f"{field}={spec!r}"
    module_name, _, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name.strip() or not attribute.strip():
        raise ConfigError(f"{where}: expected 'package.module:function'")
    try:  # any import-time failure of user code is a config problem, reported in one line
        target = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001
        raise ConfigError(f"{where}: cannot import {module_name} ({_one_line(error)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: {module_name} has no attribute {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {attribute} is a {type(target).__name__}, not a function")
    missing = [name for name in ("prompts", "completions") if not _accepts(target, name)]
    if missing:
        raise ConfigError(f"{where}: {attribute} takes no {' / '.join(missing)} keyword argument; the contract is "
                          f"{CONTRACT}")
    return target


def load_rewards(specs: str | Sequence[str], weights: str | Sequence[float] | None = None, fallback: float = 0.0, *,
                 field: str = "config.reward.fn", weights_field: str = "config.reward.weights",
                 fallback_field: str = "config.reward.fallback") -> list[Reward]:
    """The run's rewards: specs a comma-separated string or a list of "package.module:function"; weights likewise
    (one per function; None or empty = all 1.0); one fallback for all. One-line ConfigErrors name the field."""
    names = _split(specs)
    if not names:
        raise ConfigError(f"{field} is empty: name at least one reward function 'package.module:function'")
    given = _split(weights) if weights is not None else []
    if given and len(given) != len(names):
        raise ConfigError(f"{weights_field} has {len(given)} weights for the {len(names)} functions of {field}")
    values = [_finite(w, weights_field) for w in given] or [1.0] * len(names)
    fallback = _finite(fallback, fallback_field)
    return [Reward(name, load_reward_fn(name, field), weight, fallback) for name, weight in zip(names, values)]


def required_fields(fn: RewardFn) -> tuple[str, ...]:
    """The record fields a reward function cannot do without: its parameters other than prompts and completions
    that have no default."""
    parameters = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in parameters if p.name not in ("prompts", "completions") and p.default is p.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def check_reward_fields(rewards: Sequence[Reward], available: Iterable[str], field: str = "config.reward.fn") -> None:
    """ConfigError when a reward function needs a field that the prompt records (and the trainer) do not provide;
    run once, before training."""
    available = set(available)
    for reward in rewards:
        missing = [name for name in required_fields(reward.fn) if name not in available]
        if missing:
            raise ConfigError(f"{field}: {reward.spec} needs the field(s) {', '.join(missing)}, which the prompt "
                              f"records lack (they have: {', '.join(sorted(available)) or 'none'})")


@dataclasses.dataclass
class RewardResult:
    """total [B] float32 (Σ_k w_k r_k), per_reward {name: [B] float32, after the fallback}, failures {name: count}."""
    total: np.ndarray
    per_reward: dict[str, np.ndarray]
    failures: dict[str, int]


def compute_rewards(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str],
                    fields: dict[str, Sequence[Any]] | None = None) -> RewardResult:
    """Every reward function on one batch (see the contract above), failures replaced by the fallback and counted."""
    size = len(completions)
    if len(prompts) != size:
        raise ValueError(f"{len(prompts)} prompts for {size} completions")
    fields = dict(fields or {})
    for key, values in fields.items():
        if len(values) != size:
            raise ValueError(f"field {key!r} has {len(values)} values for {size} completions")
    total = np.zeros(size, np.float32)
    per_reward, failures = {}, {}
    for reward in rewards:
        name = _unique(reward.name, per_reward)
        values, failed = call_reward(reward, list(prompts), list(completions), fields)
        per_reward[name], failures[name] = values, failed
        total += np.float32(reward.weight) * values
    return RewardResult(total, per_reward, failures)


def call_reward(reward: Reward, prompts: list[str], completions: list[str], fields: dict[str, Sequence[Any]]
                ) -> tuple[np.ndarray, int]:
    """(rewards [B] float32 with the fallback where the function failed, number of failures)."""
    kwargs = {key: list(values) for key, values in fields.items() if _accepts(reward.fn, key)}
    size = len(completions)
    values, batch_error = _checked_call(reward.fn, prompts, completions, kwargs, size)
    reasons = [""] * size
    if values is None:  # the batch call failed as a whole: find the failing completions one at a time
        values = np.full(size, np.nan)
        for i in range(size):
            one, reasons[i] = _checked_call(reward.fn, prompts[i:i + 1], completions[i:i + 1],
                                            {key: v[i:i + 1] for key, v in kwargs.items()}, 1)
            if one is not None:
                values[i] = one[0]
    failed = ~np.isfinite(values)
    if failed.any():
        first = int(np.argmax(failed))
        _log.warning("reward %s failed on %d of %d completions (first: #%d, %s); they get the fallback %g",
                     reward.spec, int(failed.sum()), size, first, reasons[first] or "None/NaN/inf/not a number",
                     reward.fallback)
    elif batch_error:
        _log.warning("reward %s: the call on the batch failed (%s), the calls on one completion at a time did not",
                     reward.spec, batch_error)
    return np.where(failed, reward.fallback, values).astype(np.float32), int(failed.sum())


def _checked_call(fn: RewardFn, prompts, completions, kwargs, size: int) -> tuple[np.ndarray | None, str]:
    """(float64 [size] with NaN for an invalid value, "") or (None, why) when the call raised or returned the wrong
    number of values."""
    try:
        out = fn(prompts=prompts, completions=completions, **kwargs)
        out = list(out) if isinstance(out, (list, tuple)) else np.asarray(out).reshape(-1).tolist()
    except Exception as error:  # noqa: BLE001 - user code: any exception is a counted failure, never a crash of the run
        return None, _one_line(error)
    if len(out) != size:
        return None, f"returned {len(out)} values for {size} completions"
    return np.array([_as_float(v) for v in out], np.float64), ""


def _one_line(error: BaseException) -> str:
    """'Type: first line of the message'."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _as_float(value) -> float:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _accepts(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes keywords
        return True
    if name in parameters:
        return parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _split(value) -> list:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value or [])


def _finite(value, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{field}: {value!r} is not a finite number")
    return number


def _unique(name: str, taken: dict) -> str:
    index, candidate = 2, name
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    return candidate


# ----------------------------------------------------------------------------------------------------------------------
# The Llama 2 reward models (paper section 3.2.3) as a reward function of their scores. The trainer scores the
# completions with the helpfulness and safety reward models (llama2_jax.inference.reward_scores: sigmoid scores in
# [0, 1]) and passes them as the fields `helpful_score` and `safety_score`; `is_safety` is the prompt record's tag.


def rm_pair_reward(helpful_score, safety_score, is_safety, threshold: float = formulas.SAFETY_THRESHOLD,
                   whiten: bool = True) -> np.ndarray:
    """R̃c = whiten(logit(Rc)), Rc the piecewise combination (`formulas.combine_rewards`): the reward PPO uses.
    Scores and is_safety [B] -> [B] float32; whitening over the batch (False: the logit only)."""
    combined = formulas.combine_rewards(np.asarray(helpful_score, np.float32), np.asarray(safety_score, np.float32),
                                        np.asarray(is_safety, bool), threshold)
    score = formulas.logit(combined)
    return np.asarray(formulas.whiten(score) if whiten else score, np.float32)


def llama2_rm_pair(prompts, completions, *, helpful_score, safety_score, is_safety=None,
                   safety_threshold: float = formulas.SAFETY_THRESHOLD, **fields) -> list[float]:
    """Reward-function form of `rm_pair_reward` (is_safety absent = no prompt tagged safety)."""
    del prompts, fields
    flags = [False] * len(completions) if is_safety is None else [bool(flag) for flag in is_safety]
    return rm_pair_reward(helpful_score, safety_score, flags, safety_threshold).tolist()
