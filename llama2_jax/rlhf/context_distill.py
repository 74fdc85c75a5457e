"""Targeted safety context distillation (Touvron et al. 2023, section 4.2.4): the pieces that are not a program.

For each adversarial prompt the policy answers twice: once with a safety preprompt in front of the prompt (the
"distilled" answer) and once without (the "original" answer). The training record pairs the distilled answer with the
prompt *without* the preprompt, and it is kept only when the safety reward model scores the distilled answer above
the original one (targeted context distillation: it limits vague answers and false refusals, paper Figure 16b).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def with_preprompt(messages: Sequence[dict], preprompt: str) -> list[dict]:
    """The dialog with `preprompt` in front: prepended to the first system message (blank line between), or as a new
    system message when there is none. The input is not changed."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{preprompt}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": preprompt}] + messages


def targeted_keep(distilled_scores, original_scores) -> np.ndarray:
    """[N] bool: the distilled answer's safety score is strictly above the original answer's (a tie keeps nothing:
    the preprompt did not help)."""
    distilled, original = np.asarray(distilled_scores, np.float64), np.asarray(original_scores, np.float64)
    if distilled.shape != original.shape:
        raise ValueError(f"score shapes differ: {distilled.shape} vs {original.shape}")
    return distilled > original


def distill_records(prompts: Sequence[Sequence[dict]], answers: Sequence[str], keep: np.ndarray) -> list[dict]:
    """SFT records (messages format, loss on the last answer only) of the kept prompts: the prompt without the
    preprompt + the distilled answer."""
    return [{"messages": [dict(m) for m in prompt] + [{"role": "assistant", "content": answer}], "train_on": "last"}
            for prompt, answer, kept in zip(prompts, answers, keep) if kept]


def distill_metrics(distilled_scores, original_scores, keep: np.ndarray) -> dict[str, float]:
    """kept_fraction; safety-RM means of original and distilled answers; the mean gain (distilled - original) over
    all prompts and over the kept ones (0 when none is kept)."""
    distilled, original = np.asarray(distilled_scores, np.float64), np.asarray(original_scores, np.float64)
    gain, keep = distilled - original, np.asarray(keep, bool)
    return {"prompts": int(gain.size), "kept": int(keep.sum()), "kept_fraction": float(keep.mean()),
            "safety_original_mean": float(original.mean()), "safety_distilled_mean": float(distilled.mean()),
            "safety_gain_all_mean": float(gain.mean()),
            "safety_gain_kept_mean": float(gain[keep].mean()) if keep.any() else 0.0}
