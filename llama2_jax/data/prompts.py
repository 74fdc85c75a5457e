"""Prompts for rejection sampling and PPO (paper section 3.2.3): read from a prompt file or a preference file, encoded
in Meta's chat format, too-long prompts dropped and counted.

Prompt file (JSONL): one `{"prompt": str | [messages ending with a user message], "is_safety": bool (optional)}`
per line; an optional `"risk_category"` (a key of `safety_preprompts.json`, e.g. "criminal") selects the
category preprompt in context distillation. A preference file in any `llama2_jax.data.preferences` format gives each distinct prompt once, tagged with
its pair's is_safety.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Optional

import numpy as np

from llama2_jax.data import dialogs, preferences
from llama2_jax.text import chat_format as chat

FORMATS = ("auto", "prompts") + tuple(preferences.CONVERTERS)
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompt:
    messages: list[dict[str, str]]  # a dialog ending with a user message
    is_safety: bool = False
    risk_category: str = ""  # context distillation: the category preprompt's key ("" = a generic preprompt)


def prompt_from_record(record: Any, is_safety: Optional[bool] = None) -> Prompt:
    """`{"prompt": str | [messages], "is_safety": bool (optional)}` -> Prompt."""
    record = dialogs.require_dict(record, "prompt")
    messages = record["prompt"]
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list):
        raise ValueError(f"'prompt' is {type(messages).__name__}, expected a string or a list of messages")
    for i, message in enumerate(messages):
        chat.check_message(message, i)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    chat.normalize_dialog(messages, last_role="user")
    flag = record.get("is_safety", False) if is_safety is None else is_safety
    if not isinstance(flag, bool):
        raise ValueError(f"'is_safety' is {type(flag).__name__}, expected true/false")
    category = record.get("risk_category", "")
    if not isinstance(category, str):
        raise ValueError(f"'risk_category' is {type(category).__name__}, expected a string")
    return Prompt(messages, flag, category)


def read_prompts(path: str, format: str = "auto", on_error: str = "raise",
                 is_safety: Optional[bool] = None) -> list[Prompt]:
    """Prompts of a prompt file (`format="prompts"`) or of a preference file (any `preferences` format: each distinct
    prompt once, tagged with its pair's is_safety). "auto": a preference file when the first record has
    chosen/rejected, else a prompt file. `is_safety` True/False overrides the records' tags."""
    if format == "auto":
        first = dialogs.first_record(path)
        is_pairs = isinstance(first, dict) and {"chosen", "rejected"} <= set(first)
        format = preferences.detect_format(path) if is_pairs else "prompts"
    if format == "prompts":
        return dialogs.convert_records(path, format, functools.partial(prompt_from_record, is_safety=is_safety),
                                       on_error)[0]
    pairs, _ = preferences.read_preferences(path, format, on_error=on_error, is_safety=is_safety)
    unique = {json.dumps(p.prompt, sort_keys=True): Prompt(p.prompt, p.is_safety) for p in pairs}
    return list(unique.values())


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_len: int) -> tuple[list[Prompt], list[list[int]]]:
    """Meta's chat encoding of each prompt; prompts longer than max_prompt_len tokens are dropped (and counted)."""
    kept, encoded = [], []
    for prompt in prompts:
        tokens = chat.encode_dialog(tokenizer, prompt.messages)
        if len(tokens) <= max_prompt_len:
            kept.append(prompt)
            encoded.append(tokens)
    if len(kept) < len(prompts):
        _log.warning("dropped %d of %d prompts longer than max_prompt_len=%d tokens", len(prompts) - len(kept),
                     len(prompts), max_prompt_len)
    return kept, encoded


def load_prompts(path: str, tokenizer, *, max_prompt_len: int, format: str = "auto", on_error: str = "raise",
                 is_safety: Optional[bool] = None, max_prompts: int = 0) -> tuple[list[Prompt], list[list[int]]]:
    """`read_prompts` + `encode_prompts`, then the first `max_prompts` (0 = all) of those that fit. Raises a
    one-line ValueError for a missing file, an unknown format, a bad record (file:line) or no prompt that fits."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"{path or '(empty)'} is not a file")
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; known: {', '.join(FORMATS)}")
    kept, encoded = encode_prompts(tokenizer, read_prompts(path, format, on_error, is_safety), max_prompt_len)
    if not kept:
        raise ValueError(f"no prompt of {path} fits in max_prompt_len={max_prompt_len}")
    if max_prompts:
        kept, encoded = kept[:max_prompts], encoded[:max_prompts]
    return kept, encoded


class ShuffledEpochs:
    """Endless shuffled epochs over n items (a new permutation per epoch, from [seed, epoch]); `take(k)` -> the next k
    indices. `get_state` / `set_state` ({"epoch", "position"}) resume exactly: the RL trainers' prompt order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        picked, order = [], self._order()
        while len(picked) < k:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            picked.append(int(order[self.position]))
            self.position += 1
        return picked

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
