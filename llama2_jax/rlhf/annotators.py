"""Annotators: who says which of two answers is better (paper section 3.2.1), behind one interface.

The paper's protocol: an annotator sees a prompt and two answers, picks one, rates how much better it is on four
levels (`RATINGS`: significantly better, better, slightly better, negligibly better / unsure) and, for safety
prompts, labels each answer safe or unsafe. Here:

* `ComparisonPair`: a prompt (messages ending with a user turn), answers "a" and "b", `is_safety`, a stable
  `pair_id` (`make_pair_id`: a tag + a hash of the content) and free-form `meta` (round, temperatures, ...).
* `Label`: the verdict on one pair: `preferred` ("a" | "b"), `rating` (a RATINGS name), `safe_a` / `safe_b`
  (True/False, or None when not labelled: only safety pairs are labelled).
* `Annotator`: anything with ``label(pairs) -> list[Label]`` (one label per pair, in order). Two implementations:
  `GoldRMAnnotator` (below: reward models stand in for people, the "gold" reward model of Gao et al. 2023,
  "Scaling Laws for Reward Model Overoptimization") and `llama2_jax.rlhf.label_files.FileAnnotator` (people label
  an exported JSONL elsewhere).
* `preference_pair(pair, label)` turns a verdict into the `PreferencePair` the reward models train on (origin
  "collected": the paper's Meta data; `llama2_jax.data.rm` mixes and filters it).

Gold-RM ratings. The paper's reward models are Bradley-Terry models: their loss (Eq. 2) asks for a logit gap of at
least m(rating) between chosen and rejected, with the margins of Table 27 ("large": 3, 2, 1, 0 logits). The gold
annotator works on the sigmoid scores (the scale of every threshold in the paper and of `reward_scores.score`) and
rates a pair by its gap |s_a - s_b| against `RATING_GAP_THRESHOLDS` = tanh(m / 4) for m = 3, 2, 1:

    gap >= 0.635 significantly better | >= 0.462 better | >= 0.245 slightly better | else negligibly better / unsure

Why tanh(m / 4): two sigmoid scores whose logits differ by d are at most tanh(d / 4) apart (the gap is largest when
the two logits sit symmetrically around 0, where the sigmoid is steepest), so a sigmoid gap >= tanh(m / 4) guarantees
the gold model's own logit gap is >= m. A pair the gold annotator rates L therefore already shows the margin that the
large table (and a fortiori the small one) asks the proxy reward model to learn for L: the margin loss never asks a
proxy for more separation than its teacher has. The thresholds are a constructor argument.

The preference itself: on a safety prompt (`is_safety`) the safety model decides when there is one, otherwise the
helpfulness model (the paper annotates the two separately, section 3.2.1); equal scores prefer "a" at the lowest
level. Safety labels (safety prompts only, and only with a safety model): an answer is safe when its safety score is
>= 0.15, the paper's unsafe threshold of section 3.2.3 (`formulas.SAFETY_THRESHOLD`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from llama2_jax.checkpoints.params_io import load_params
from llama2_jax.data.preferences import RATINGS, PreferencePair, normalize_rating
from llama2_jax.inference import reward_scores
from llama2_jax.rlhf.formulas import SAFETY_THRESHOLD
from llama2_jax.text import chat_format as chat
from llama2_jax.training.losses import MARGIN_TABLES

PREFERRED = ("a", "b")
# Sigmoid-score gap at which each of the first three RATINGS starts (see the module docstring): 0.635, 0.462, 0.245.
RATING_GAP_THRESHOLDS = tuple(math.tanh(m / 4.0) for m in MARGIN_TABLES["large"][:3])
# (dialogs, each a prompt + the assistant answer to score) -> sigmoid scores in [0, 1], float [N]
ScoreAnswers = Callable[[Sequence[list[dict[str, str]]]], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------------
# Pairs and labels


def make_pair_id(prompt: Sequence[dict[str, str]], answer_a: str, answer_b: str, tag: str = "") -> str:
    """A stable id: `tag` + "-" + the first 16 hex digits of SHA-256 over the prompt and both answers (the same pair
    always gets the same id; a changed answer gets another one)."""
    content = json.dumps([list(prompt), answer_a, answer_b], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
    return f"{tag}-{digest}" if tag else digest


@dataclasses.dataclass
class ComparisonPair:
    """A prompt and two answers to compare."""
    pair_id: str
    prompt: list[dict[str, str]]  # a dialog ending with a user message
    answer_a: str
    answer_b: str
    is_safety: bool = False
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-serialisable provenance

    def __post_init__(self):
        if not isinstance(self.pair_id, str) or not self.pair_id:
            raise ValueError(f"'pair_id' is {self.pair_id!r}, expected a non-empty string")
        chat.normalize_dialog(self.prompt, last_role="user")
        for name in ("answer_a", "answer_b"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"'{name}' is {type(getattr(self, name)).__name__}, expected a string")
        if not isinstance(self.is_safety, bool):
            raise ValueError(f"'is_safety' is {type(self.is_safety).__name__}, expected true/false")

    def answer(self, which: str) -> str:
        return self.answer_a if which == "a" else self.answer_b

    def dialogs(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """prompt + answer a and prompt + answer b, as the reward models score them."""
        return ([*self.prompt, {"role": "assistant", "content": self.answer_a}],
                [*self.prompt, {"role": "assistant", "content": self.answer_b}])


@dataclasses.dataclass
class Label:
    """The verdict on one pair."""
    pair_id: str
    preferred: str  # "a" | "b"
    rating: str  # one of RATINGS
    safe_a: bool | None = None  # per-answer safety label; None = not labelled
    safe_b: bool | None = None

    def __post_init__(self):
        if self.preferred not in PREFERRED:
            raise ValueError(f"'preferred' is {self.preferred!r}, expected \"a\" or \"b\"")
        self.rating = normalize_rating(self.rating)
        if self.rating is None:
            raise ValueError(f"'rating' is missing, expected one of {', '.join(RATINGS)}")
        for name in ("safe_a", "safe_b"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"'{name}' is {type(getattr(self, name)).__name__}, expected true/false/null")


class Annotator(Protocol):
    """Labels batches of pairs: one `Label` per pair, in the order given."""

    def label(self, pairs: Sequence[ComparisonPair]) -> list[Label]:
        ...


def preference_pair(pair: ComparisonPair, label: Label) -> PreferencePair:
    """The reward-model training pair of a verdict: chosen = the preferred answer, the rating, safety labels per
    answer, origin "collected". Pairs labelled chosen-unsafe/other-safe are kept here (they are data) and left out by
    every mix (`llama2_jax.data.rm.exclude_chosen_unsafe`), as the paper's collection leaves them out."""
    if label.pair_id != pair.pair_id:
        raise ValueError(f"label for pair {label.pair_id!r} given for pair {pair.pair_id!r}")
    other = "b" if label.preferred == "a" else "a"
    safe = {"a": label.safe_a, "b": label.safe_b}
    return PreferencePair(pair.prompt, pair.answer(label.preferred), pair.answer(other), label.rating,
                          pair.is_safety, safe[label.preferred], safe[other], "collected")


def preference_pairs(pairs: Sequence[ComparisonPair], labels: Sequence[Label]) -> list[PreferencePair]:
    """`preference_pair` of each pair with its label (matched by pair_id; every pair needs one). Pairs whose two
    answers are identical carry no preference and are left out."""
    by_id = {label.pair_id: label for label in labels}
    missing = [pair.pair_id for pair in pairs if pair.pair_id not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} of {len(pairs)} pairs have no label (first: {missing[0]!r})")
    return [preference_pair(pair, by_id[pair.pair_id]) for pair in pairs if pair.answer_a != pair.answer_b]


# ----------------------------------------------------------------------------------------------------------------------
# Gold reward models


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Three strictly decreasing gaps in (0, 1]: where significantly better, better and slightly better start."""
    values = tuple(float(t) for t in thresholds)
    if len(values) != len(RATINGS) - 1 or not all(0.0 < t <= 1.0 for t in values) or \
            any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"rating thresholds {tuple(thresholds)}: expected {len(RATINGS) - 1} strictly decreasing "
                         "sigmoid-score gaps in (0, 1]")
    return values


def rating_for_gap(gap, thresholds: Sequence[float] = RATING_GAP_THRESHOLDS) -> list[str]:
    """The RATINGS level of each sigmoid-score gap |s_a - s_b| (a gap equal to a threshold reaches that level).
    gap: float [N] (its sign is ignored) -> N level names."""
    thresholds = check_thresholds(thresholds)
    gap = np.abs(np.asarray(gap, np.float64)).reshape(-1)
    below = sum((gap < t).astype(int) for t in thresholds)  # 0: >= every threshold, 3: below all of them
    return [RATINGS[i] for i in below]


def labels_from_scores(pairs: Sequence[ComparisonPair], helpful: tuple | None = None,
                       safety: tuple | None = None, *, thresholds: Sequence[float] = RATING_GAP_THRESHOLDS,
                       safety_threshold: float = SAFETY_THRESHOLD) -> list[Label]:
    """The gold annotator's verdicts from score arrays (rules in the module docstring).

    helpful / safety: (scores of answers a [N], scores of answers b [N]) sigmoid scores, or None; at least one."""
    if helpful is None and safety is None:
        raise ValueError("labels_from_scores needs helpfulness or safety scores")
    n = len(pairs)
    arrays = {}
    for name, given in (("helpful", helpful), ("safety", safety)):
        if given is not None:
            a, b = (np.asarray(x, np.float64).reshape(-1) for x in given)
            if a.shape != (n,) or b.shape != (n,):
                raise ValueError(f"{name} scores have shapes {a.shape} and {b.shape}, expected ({n},) for {n} pairs")
            arrays[name] = (a, b)
    use_safety = np.array([(p.is_safety and "safety" in arrays) or "helpful" not in arrays for p in pairs], bool)
    zeros = (np.zeros(n), np.zeros(n))
    score_a = np.where(use_safety, arrays.get("safety", zeros)[0], arrays.get("helpful", zeros)[0])
    score_b = np.where(use_safety, arrays.get("safety", zeros)[1], arrays.get("helpful", zeros)[1])
    ratings = rating_for_gap(score_a - score_b, thresholds)
    labels = []
    for i, pair in enumerate(pairs):
        safe_a = safe_b = None
        if pair.is_safety and "safety" in arrays:
            safe_a = bool(arrays["safety"][0][i] >= safety_threshold)
            safe_b = bool(arrays["safety"][1][i] >= safety_threshold)
        labels.append(Label(pair.pair_id, "a" if score_a[i] >= score_b[i] else "b", ratings[i], safe_a, safe_b))
    return labels


class GoldRMAnnotator:
    """Reward models as annotators: `helpful` and/or `safety` score functions (dialogs -> sigmoid scores [N])."""

    def __init__(self, helpful: ScoreAnswers | None = None, safety: ScoreAnswers | None = None, *,
                 thresholds: Sequence[float] = RATING_GAP_THRESHOLDS, safety_threshold: float = SAFETY_THRESHOLD):
        if helpful is None and safety is None:
            raise ValueError("a gold-RM annotator needs a helpfulness or a safety reward model")
        self.score_fns = {name: fn for name, fn in (("helpful", helpful), ("safety", safety)) if fn is not None}
        self.thresholds = check_thresholds(thresholds)
        if not 0.0 <= safety_threshold <= 1.0:
            raise ValueError(f"safety_threshold {safety_threshold} is not a sigmoid score in [0, 1]")
        self.safety_threshold = float(safety_threshold)

    @classmethod
    def from_checkpoints(cls, tokenizer, helpful_dir=None, safety_dir=None, *, batch_size: int = 8,
                         max_len: int | None = None, mesh=None, **kwargs) -> GoldRMAnnotator:
        """Gold reward models from `train.reward` workdirs (or any score-model checkpoint), scored with
        `reward_scores.score` (chat format, truncated like the RM training data). tokenizer: a `Tokenizer`."""
        fns = {}
        for name, path in (("helpful", helpful_dir), ("safety", safety_dir)):
            if path:
                params, cfg = load_params(path, kind="score")
                fns[name] = _checkpoint_scorer(params, cfg, tokenizer, batch_size, max_len, mesh)
        return cls(fns.get("helpful"), fns.get("safety"), **kwargs)

    def scores(self, dialogs: Sequence[list[dict[str, str]]]) -> dict[str, np.ndarray]:
        """{"helpful", "safety" (those given)}: sigmoid scores [N] of dialogs ending with the answer to score (e.g.
        the gold reward of a policy's answers)."""
        out = {}
        for name, fn in self.score_fns.items():
            values = np.asarray(fn(list(dialogs)), np.float64).reshape(-1)
            if values.shape != (len(dialogs),):
                raise ValueError(f"the {name} score function returned {values.shape[0]} scores for {len(dialogs)} "
                                 "dialogs")
            if np.any((values < 0.0) | (values > 1.0)) or not np.all(np.isfinite(values)):
                raise ValueError(f"the {name} score function returned values outside [0, 1]: expected sigmoid scores")
            out[name] = values
        return out

    def label(self, pairs: Sequence[ComparisonPair]) -> list[Label]:
        pairs = list(pairs)
        if not pairs:
            return []
        dialogs = [d for pair in pairs for d in pair.dialogs()]  # a0, b0, a1, b1, ...
        scores = {name: (s[0::2], s[1::2]) for name, s in self.scores(dialogs).items()}
        return labels_from_scores(pairs, scores.get("helpful"), scores.get("safety"), thresholds=self.thresholds,
                                  safety_threshold=self.safety_threshold)


def _checkpoint_scorer(params, cfg, tokenizer, batch_size: int, max_len: int | None, mesh) -> ScoreAnswers:
    def score(dialogs):
        return reward_scores.score(params, cfg, dialogs, tokenizer, batch_size=batch_size, max_len=max_len, mesh=mesh)
    return score
