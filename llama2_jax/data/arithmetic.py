"""A synthetic arithmetic task with a verifiable reward, the shipped example of a Python reward function for GRPO and
RLOO: prompts "What is 17 + 25?" with the answer "42", generated from a seed, and `exact_match`, which parses the first
integer of a completion.

Problems are drawn without replacement from all (a, op, b) with a, b in [min_operand, max_operand] and op in
`operations`: the first num_heldout draws are the held-out split, the next num_train the training split, so the two
never share a problem and both are fixed by the seed (and the sizes). Records are prompt-file records (data/prompts.py)
with the extra field "answer", which `exact_match` receives:

    {"prompt": "What is 17 + 25?", "answer": "42"}
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama2_jax.training.checks import ConfigError

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Sizes and seed of the task (the config section of the same fields)."""
    num_train: int = 2000
    num_heldout: int = 200
    min_operand: int = 0
    max_operand: int = 99
    operations: str = "+-"
    seed: int = 0

    @property
    def num_operands(self) -> int:
        return self.max_operand - self.min_operand + 1

    @property
    def num_problems(self) -> int:
        """How many distinct problems there are."""
        return len(self.operations) * self.num_operands ** 2

    def check(self, prefix: str = "config.arithmetic") -> None:
        """One-line ConfigError naming the field for a value out of range."""
        for name in ("num_train", "num_heldout", "min_operand", "max_operand", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{prefix}.{name} must be an integer, got {value!r}")
        if self.num_train < 1 or self.num_heldout < 0 or self.seed < 0:
            raise ConfigError(f"{prefix}: num_train must be >= 1, num_heldout and seed >= 0, got {self.num_train}, "
                              f"{self.num_heldout}, {self.seed}")
        if self.max_operand < self.min_operand:
            raise ConfigError(f"{prefix}.max_operand={self.max_operand} is below min_operand={self.min_operand}")
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if not self.operations or unknown or len(set(self.operations)) != len(self.operations):
            raise ConfigError(f"{prefix}.operations={self.operations!r} must be distinct characters of "
                              f"{''.join(OPERATIONS)!r}")
        wanted = self.num_train + self.num_heldout
        if wanted > self.num_problems:
            raise ConfigError(f"{prefix}: num_train + num_heldout = {wanted} exceeds the {self.num_problems} distinct "
                              "problems; widen max_operand or add operations")


def problem_record(a: int, op: str, b: int) -> dict[str, str]:
    """{"prompt": "What is a op b?", "answer": str(a op b)}."""
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(OPERATIONS[op](a, b))}


def make_problems(task: ArithmeticTask) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train records, held-out records) of the task (see the module docstring); deterministic in the task's fields."""
    task.check()
    draws = np.random.default_rng(task.seed).choice(task.num_problems, task.num_heldout + task.num_train,
                                                    replace=False)
    n = task.num_operands
    records = [problem_record(task.min_operand + int(index % (n * n)) // n, task.operations[int(index) // (n * n)],
                              task.min_operand + int(index % n)) for index in draws]
    return records[task.num_heldout:], records[:task.num_heldout]


def first_integer(text: str) -> int | None:
    """The first integer written in text ("-12" counts as negative; digits only, no thousands separators)."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def exact_match(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[Any], **fields
                ) -> list[float]:
    """Reward function (llama2_jax.rlhf.reward_functions contract): 1.0 where the first integer of the completion
    equals the record's answer, else 0.0 (also when the completion has no integer)."""
    del prompts, fields
    return [float(first_integer(completion) == int(expected)) for completion, expected in zip(completions, answer)]


def sft_record(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The record as a supervised dialog ("messages" format of data/dialogs.py): the prompt, answered with the
    answer alone."""
    return {"messages": [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["answer"]}]}


def write_jsonl(path, records: Sequence[dict]) -> None:
    """One JSON record per line."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
