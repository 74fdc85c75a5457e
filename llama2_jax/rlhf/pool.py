"""The rejection-sampling pool across iterations (paper section 3.2.3: up to RLHF V3 only the previous iteration's
samples were used, which caused regressions, so later iterations use "top samples from all prior iterations").

`AnswerPool` keeps, per prompt (keyed by its messages, so prompt batches may differ between rounds), the best
complete answer of every iteration that sampled it, with its reward and iteration. The pool's SFT target for a prompt
is the best of those candidates (`best`, `sft_records`): the best answer across all iterations so far. Rewards are
comparable only when one reward model gave them: when the reward models are retrained between rounds, `rescore` the
pool with the current ones before picking (the candidates are kept for that reason, not just the winner).

Truncated answers (cut at max_gen_len: no EOS ended them, `decode.truncated_rows`) are excluded from the pool by
default (`best_answers`): the pool is SFT data, and an SFT target ends with EOS, so a cut answer would teach the policy
to stop mid-sentence; its reward was also read at an EOS the policy never generated. A prompt whose samples were all
cut adds nothing that iteration (counted in `AddStats`) and keeps its earlier candidates. `keep_truncated=True` is
the escape hatch for a policy that rarely ends an answer within the limit (a tiny model a few minutes old): such a
prompt then pools its best cut answer, marked `truncated`, and any complete answer outranks every cut one, whatever
the rewards (in this iteration and across iterations).

File format (`save` / `load`, JSONL, written atomically): one record per prompt
``{"prompt": [messages], "is_safety": bool, "candidates": [{"answer": str, "reward": float, "iteration": int,
"truncated": bool}]}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llama2_jax.data.dialogs import convert_records, require_dict
from llama2_jax.data.prompts import Prompt
from llama2_jax.text import chat_format as chat


def best_answers(rewards, truncated=None, keep_truncated: bool = False, excluded=None) -> np.ndarray:
    """Index of the best answer per prompt among those not truncated; where every answer was truncated, -1, or with
    keep_truncated the best truncated one. `excluded` answers are never chosen (-1 where all are). rewards float
    [N, K], truncated / excluded bool [N, K] (None: none) -> int [N]; ties go to the first."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {rewards.shape}")
    cut = np.zeros(rewards.shape, bool) if truncated is None else np.asarray(truncated, bool)
    if cut.shape != rewards.shape:
        raise ValueError(f"truncated has shape {cut.shape}, rewards {rewards.shape}")
    out = np.zeros(rewards.shape, bool) if excluded is None else np.asarray(excluded, bool)
    if out.shape != rewards.shape:
        raise ValueError(f"excluded has shape {out.shape}, rewards {rewards.shape}")
    rewards = np.where(out, -np.inf, rewards)
    best = np.argmax(np.where(cut, -np.inf, rewards), axis=1)
    fallback = np.argmax(rewards, axis=1) if keep_truncated else np.full(best.shape, -1)
    chosen = np.where((cut | out).all(axis=1), fallback, best)
    return np.where(out.all(axis=1), -1, chosen)


@dataclasses.dataclass
class Candidate:
    answer: str
    reward: float
    iteration: int
    truncated: bool = False  # cut at the length limit (only with keep_truncated)


@dataclasses.dataclass
class PoolEntry:
    prompt: list[dict[str, str]]
    is_safety: bool
    candidates: list[Candidate]

    def best(self) -> Candidate:
        """The highest reward among complete answers (a truncated one only when there is none); a tie goes to the
        earliest iteration."""
        return max(sorted(self.candidates, key=lambda c: c.iteration), key=lambda c: (not c.truncated, c.reward))


@dataclasses.dataclass
class AddStats:
    prompts: int = 0
    added: int = 0  # prompts that got a candidate from this iteration
    all_truncated: int = 0  # prompts whose every answer was cut at the length limit (nothing added, or with
    # keep_truncated the best cut answer)


def prompt_key(messages: Sequence[dict[str, str]]) -> str:
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False)


class AnswerPool:
    """Best complete answers per prompt across iterations (see the module docstring)."""

    def __init__(self, entries: dict[str, PoolEntry] | None = None):
        self.entries: dict[str, PoolEntry] = dict(entries or {})

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, prompts: Sequence[Prompt], answers: Sequence[Sequence[str]], rewards, iteration: int,
            truncated=None, keep_truncated: bool = False) -> AddStats:
        """Add one iteration's samples: answers [N][K] texts, rewards [N, K], truncated [N, K] (None: none). The best
        complete answer of each prompt (`best_answers`) becomes that iteration's candidate (replacing one the
        iteration added before, so a resumed iteration does not count twice)."""
        rewards = np.asarray(rewards, np.float64)
        if len(answers) != len(prompts) or rewards.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts, {len(answers)} answer lists and {rewards.shape[0]} reward rows")
        cut = np.zeros(rewards.shape, bool) if truncated is None else np.asarray(truncated, bool)
        best = best_answers(rewards, cut, keep_truncated)
        stats = AddStats(prompts=len(prompts), all_truncated=int(cut.all(axis=1).sum()))
        for p, prompt in enumerate(prompts):
            if best[p] < 0:
                continue
            entry = self.entries.setdefault(prompt_key(prompt.messages),
                                            PoolEntry(list(prompt.messages), prompt.is_safety, []))
            entry.candidates = [c for c in entry.candidates if c.iteration != iteration]
            entry.candidates.append(Candidate(answers[p][best[p]], float(rewards[p, best[p]]), int(iteration),
                                              bool(cut[p, best[p]])))
            stats.added += 1
        return stats

    def best(self) -> list[tuple[PoolEntry, Candidate]]:
        """(entry, its best candidate) per prompt, in insertion order."""
        return [(entry, entry.best()) for entry in self.entries.values()]

    def rescore(self, score_fn: Callable[[list[list[dict[str, str]]]], Any]) -> None:
        """Replace every candidate's reward by `score_fn`'s (dialogs = prompt + the answer -> scores [M]), e.g. the
        current reward models' after they were retrained."""
        slots = [(entry, c) for entry in self.entries.values() for c in entry.candidates]
        if not slots:
            return
        scores = np.asarray(score_fn([[*entry.prompt, {"role": "assistant", "content": c.answer}]
                                      for entry, c in slots]), np.float64).reshape(-1)
        if scores.shape != (len(slots),):
            raise ValueError(f"score_fn returned {scores.shape[0]} scores for {len(slots)} answers")
        for (_, candidate), value in zip(slots, scores):
            candidate.reward = float(value)

    def sft_records(self) -> list[dict[str, Any]]:
        """The SFT dataset of the pool: one messages record per prompt with its best answer (only it trained:
        "train_on": "last"), plus its reward, iteration and truncation (ignored by the SFT reader)."""
        return [{"messages": [*entry.prompt, {"role": "assistant", "content": best.answer}], "train_on": "last",
                 "reward": best.reward, "iteration": best.iteration, "truncated": best.truncated,
                 "is_safety": entry.is_safety}
                for entry, best in self.best()]

    def winners_by_iteration(self) -> dict[int, int]:
        """{iteration: how many prompts' best answer comes from it}: how much earlier iterations still contribute."""
        counts: dict[int, int] = {}
        for _, best in self.best():
            counts[best.iteration] = counts.get(best.iteration, 0) + 1
        return dict(sorted(counts.items()))

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for entry in self.entries.values():
                f.write(json.dumps({"prompt": entry.prompt, "is_safety": entry.is_safety,
                                    "candidates": [dataclasses.asdict(c) for c in entry.candidates]},
                                   ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerPool:
        """A saved pool (ValueError "<file>:<line>: ..." for a malformed record)."""
        entries = convert_records(os.fspath(path), "answer pool", _entry_from_record, "raise")[0]
        return cls({prompt_key(entry.prompt): entry for entry in entries})


def _entry_from_record(record: Any) -> PoolEntry:
    record = require_dict(record, "prompt", "is_safety", "candidates")
    prompt = record["prompt"]
    if not isinstance(prompt, list):
        raise ValueError(f"'prompt' is {type(prompt).__name__}, expected a list of messages")
    chat.normalize_dialog(prompt, last_role="user")
    if not isinstance(record["candidates"], list) or not record["candidates"]:
        raise ValueError("'candidates' must be a non-empty list")
    candidates = []
    for c in record["candidates"]:
        c = require_dict(c, "answer", "reward", "iteration")
        candidates.append(Candidate(str(c["answer"]), float(c["reward"]), int(c["iteration"]),
                                    bool(c.get("truncated", False))))
    return PoolEntry(prompt, bool(record["is_safety"]), candidates)
