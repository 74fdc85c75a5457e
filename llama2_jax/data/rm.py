"""Reward-model data (paper section 3.2.2): preference pairs -> truncated token pairs -> Grain batches; held-out
split; data mixes.

Batch format (every array has the pair axis P first, so splitting the batch over processes, data-parallel devices or
micro-batches never separates a chosen row from its rejected row):

  tokens   int32   [P, 2, T]  [:, 0] = prompt + chosen response, [:, 1] = prompt + rejected; right-padded with 0
  lengths  int32   [P, 2]     real tokens per sequence (the score is read at token lengths - 1: the answer's EOS)
  prompt_lens int32 [P, 2]  tokens before the response (the same for both sequences; DPO scores only the rest)
  rating   int32   [P]        index into RATINGS (0 significantly better .. 3 negligibly better), -1 = no rating
  valid    float32 [P]        1 for a real pair, 0 for the padding pairs that fill the last eval batch

Sequences are Meta's chat encoding of prompt + response (`preferences.encode_pair`): BOS [INST] ... [/INST] answer
"▁" EOS, earlier turns included.

Truncation to `max_len` tokens (`truncate_pair`; never silent: counted in `TruncationStats` and logged):
  * the prompt loses tokens on the **left** (oldest turns first), keeping its first token (BOS);
  * a response loses tokens on the **right** (then it has no EOS and is scored at its last kept token), and only when
    it is so long that the prompt would keep fewer than min(len(prompt), max_len // 2) tokens.
  Both sequences of a pair keep the same prompt tokens (the budget comes from the longer response), so the pair still
  compares two answers to one context.

Mixes (paper section 3.2.2), deterministic by seed, over pairs flagged with `is_safety` and tagged with an `origin`
("collected": this project's own annotation, the paper's Meta data; "open_source": public sets; None: not stated):
  * "helpful": the paper's "all Meta Helpfulness data, combined with an equal part of the remaining data uniformly
    sampled from Meta Safety and from the open-source datasets": every collected helpfulness pair (is_safety False)
    + as many drawn uniformly without replacement from all the other pairs (collected safety pairs and open-source
    pairs of either kind); all of them when there are fewer.
    Deviation where the data does not say: a helpfulness pair with no origin counts as collected, because a file
    without the field cannot be told apart from Meta's own data, and treating it as open-source would leave the
    helpfulness RM nothing of its own when no file carries the field. With no origin anywhere (every shipped file:
    HH and OASST carry none) the mix is every helpfulness pair + as many safety pairs; tag public files with
    `origin="open_source"` (`read_preferences` / `read_pair_files`) to get the paper's mix. The count of such pairs
    is logged.
  * "safety": all safety pairs (Meta Safety and Anthropic Harmless alike) + helpfulness pairs of any origin sampled
    so that safety : helpfulness = 90 : 10.
  * "none": the pairs as read.
  Every mix first drops the pairs labelled "chosen unsafe, other safe" (`exclude_chosen_unsafe`): the paper leaves
  them out of its safety data altogether (section 3.2.1: "we do not include any examples where the chosen response
  was unsafe and the other response safe"), so no model trains on them, whichever RM (or DPO) reads the data.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import grain
import numpy as np

from llama2_jax.data.pipeline import split_documents
from llama2_jax.data.preferences import RATINGS, PreferencePair, read_preferences
from llama2_jax.text import chat_format as chat

Batch = dict[str, np.ndarray]
PAD_ID = 0
NO_RATING = -1
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- encoding


class EncodedPair(NamedTuple):
    chosen: np.ndarray  # int32 [n_c], at most max_len
    rejected: np.ndarray  # int32 [n_r]
    rating: int  # RATINGS index or -1
    prompt_len: int = 0  # leading tokens of both sequences that are the (possibly truncated) prompt


@dataclasses.dataclass
class TruncationStats:
    """How many pairs lost prompt tokens (left) or response tokens (right) to max_len."""
    pairs: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0

    def summary(self) -> str:
        return (f"{self.pairs} pairs; truncated to max_len: prompt (left) in {self.prompt_truncated}, "
                f"response (right) in {self.response_truncated}")


def rating_index(rating: str | None) -> int:
    return NO_RATING if rating is None else RATINGS.index(rating)


def split_prompt_response(tokenizer, dialog: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Chat tokens of a dialog ending with an assistant answer, split where the last answer starts (its tokens, "▁"
    and EOS are the response; everything before, earlier turns included, is the prompt)."""
    tokens, mask = chat.encode_dialog_for_training(tokenizer, list(dialog), train_on="last")
    start = mask.index(1.0)
    return tokens[:start], tokens[start:]


def _keep_prompt(prompt: list[int], keep: int, bos_id: int | None) -> list[int]:
    if keep >= len(prompt):
        return list(prompt)
    if bos_id is not None and prompt and prompt[0] == bos_id and keep > 1:
        return [bos_id] + list(prompt[len(prompt) - keep + 1:])
    return list(prompt[len(prompt) - keep:])


def _prompt_budget(prompt_len: int, longest: int, max_len: int) -> int:
    """Prompt tokens kept when prompt + the longest response exceed max_len (see the module docstring)."""
    return max(max_len - longest, min(prompt_len, max_len // 2))


def kept_prompt_len(prompt_len: int, longest: int, max_len: int) -> int:
    """How many prompt tokens `truncate_pair` keeps."""
    if prompt_len + longest <= max_len:
        return prompt_len
    return min(prompt_len, _prompt_budget(prompt_len, longest, max_len))


def truncate_pair(prompt: list[int], responses: Sequence[list[int]], max_len: int,
                  bos_id: int | None = None) -> tuple[list[list[int]], bool, bool]:
    """prompt + each response, cut to at most max_len tokens by the rules in the module docstring.

    Returns (sequences, prompt_truncated, response_truncated)."""
    if max_len < 4:
        raise ValueError(f"max_len must be at least 4, got {max_len}")
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_len:
        return [list(prompt) + list(r) for r in responses], False, False
    head = _keep_prompt(prompt, _prompt_budget(len(prompt), longest, max_len), bos_id)
    room = max_len - len(head)
    sequences = [head + list(r[:room]) for r in responses]
    return sequences, len(head) < len(prompt), longest > room


def _common_prompt(prompt_c, chosen, prompt_r, rejected):
    """Re-split two sequences whose prompt tokens differ at their longest common prompt prefix."""
    n = next((i for i, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
    return prompt_c[:n], prompt_c[n:] + chosen, prompt_r[n:] + rejected


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> tuple[list[EncodedPair], TruncationStats]:
    """Tokenize and truncate every pair; truncations are counted and logged."""
    encoded, stats = [], TruncationStats()
    for pair in pairs:
        prompt, chosen = split_prompt_response(tokenizer, pair.prompt + [{"role": "assistant", "content": pair.chosen}])
        prompt_r, rejected = split_prompt_response(
            tokenizer, pair.prompt + [{"role": "assistant", "content": pair.rejected}])
        if prompt_r != prompt:  # only where the answer boundary moved (chat.encode_turn_for_training's fallback)
            prompt, chosen, rejected = _common_prompt(prompt, chosen, prompt_r, rejected)
        (c, r), prompt_cut, response_cut = truncate_pair(prompt, [chosen, rejected], max_len, tokenizer.bos_id)
        n_prompt = kept_prompt_len(len(prompt), max(len(chosen), len(rejected)), max_len)
        encoded.append(EncodedPair(np.asarray(c, np.int32), np.asarray(r, np.int32), rating_index(pair.rating),
                                   n_prompt))
        stats.pairs += 1
        stats.prompt_truncated += prompt_cut
        stats.response_truncated += response_cut
    if stats.prompt_truncated or stats.response_truncated:
        _log.warning("reward-model data: %s", stats.summary())
    return encoded, stats


# --------------------------------------------------------------------------------------------------------- batches


def pair_row(pair: EncodedPair, max_len: int) -> Batch:
    """One pair in the batch format (without the leading P axis)."""
    tokens = np.full((2, max_len), PAD_ID, np.int32)
    lengths = np.zeros((2,), np.int32)
    for i, seq in enumerate((pair.chosen, pair.rejected)):
        if len(seq) > max_len:
            raise ValueError(f"a sequence of {len(seq)} tokens exceeds max_len={max_len}; encode with this max_len")
        tokens[i, :len(seq)] = seq
        lengths[i] = len(seq)
    prompt_lens = np.full((2,), pair.prompt_len, np.int32)
    return {"tokens": tokens, "lengths": lengths, "prompt_lens": prompt_lens, "rating": np.int32(pair.rating),
            "valid": np.float32(1.0)}


def empty_row(max_len: int) -> Batch:
    """A padding pair (valid 0): one pad token per sequence, no rating."""
    return {"tokens": np.zeros((2, max_len), np.int32), "lengths": np.ones((2,), np.int32),
            "prompt_lens": np.ones((2,), np.int32), "rating": np.int32(NO_RATING), "valid": np.float32(0.0)}


def stack_rows(rows: Sequence[Batch]) -> Batch:
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def make_train_iterator(train_pairs: Sequence[EncodedPair], batch_size: int, max_len: int, seed: int,
                        num_epochs: int | None = None) -> grain.DatasetIterator:
    """Global training batches of `batch_size` pairs, reshuffled every epoch (seed), forever by default.

    A Grain iterator: `get_state()` / `set_state()` save and restore the exact position. The last incomplete batch of
    the stream is dropped (only matters with a finite `num_epochs`)."""
    if len(train_pairs) < batch_size:
        raise ValueError(f"{len(train_pairs)} training pairs are fewer than one batch of {batch_size}")
    ds = grain.MapDataset.source(list(train_pairs)).shuffle(seed=seed % 2**32).repeat(num_epochs)
    ds = ds.map(functools.partial(pair_row, max_len=max_len))
    return iter(ds.to_iter_dataset().batch(batch_size, drop_remainder=True))


def make_eval_batches(val_pairs: Sequence[EncodedPair], batch_size: int, max_len: int,
                      max_batches: int | None = None) -> list[Batch]:
    """Fixed held-out batches (same on every call); the last one is filled with padding pairs (valid 0)."""
    rows = [pair_row(p, max_len) for p in val_pairs[: None if max_batches is None else max_batches * batch_size]]
    rows += [empty_row(max_len)] * (-len(rows) % batch_size)
    return [stack_rows(rows[b:b + batch_size]) for b in range(0, len(rows), batch_size)]


def split_pairs(pairs: Sequence, val_fraction: float) -> tuple[list, list]:
    """(train, held-out): the held-out pairs are spread evenly over the input and do not depend on the seed
    (`pipeline.split_documents`); at least one pair when val_fraction > 0."""
    train, val = split_documents(pairs, val_fraction)
    return list(train), list(val)


# ------------------------------------------------------------------------------------------------------------ mixes


def _sample(pairs: Sequence[PreferencePair], n: int, rng: np.random.Generator, what: str) -> list[PreferencePair]:
    if n > len(pairs):
        _log.warning("data mix wants %d %s pairs but only %d exist: taking all of them", n, what, len(pairs))
        n = len(pairs)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=n, replace=False))]


def exclude_chosen_unsafe(pairs: Sequence[PreferencePair], what: str = "data") -> list[PreferencePair]:
    """The pairs less those labelled "chosen unsafe, other safe" (the bin the paper's safety collection leaves out,
    section 3.2.1: only chosen-safe/other-unsafe, both safe and both unsafe are kept); the count is logged."""
    kept = [p for p in pairs if not p.chosen_unsafe_other_safe]
    if len(kept) < len(pairs):
        _log.info("%s: excluded %d pairs whose chosen answer is unsafe and the other safe", what,
                  len(pairs) - len(kept))
    return kept


def is_collected_helpfulness(pair: PreferencePair) -> bool:
    """The core of the helpfulness mix: a helpfulness pair of the project's own collection (origin "collected"), or
    of no stated origin (see the module docstring for why)."""
    return not pair.is_safety and pair.origin != "open_source"


def helpful_mix(pairs: Sequence[PreferencePair], seed: int) -> list[PreferencePair]:
    """Helpfulness RM mix (section 3.2.2): every collected helpfulness pair + as many sampled uniformly from the
    remaining pairs (collected safety and open-source), chosen-unsafe pairs excluded first. See the module docstring."""
    pairs = exclude_chosen_unsafe(pairs, "helpful mix")
    helpful = [p for p in pairs if is_collected_helpfulness(p)]
    rest = [p for p in pairs if not is_collected_helpfulness(p)]
    unstated = sum(p.origin is None for p in helpful)
    if unstated:
        _log.info("helpful mix: %d of %d helpfulness pairs state no origin and count as collected data (the paper's "
                  "Meta Helpfulness); tag open-source files with origin='open_source'", unstated, len(helpful))
    return helpful + _sample(rest, len(helpful), np.random.default_rng(seed), "safety or open-source")


def safety_mix(pairs: Sequence[PreferencePair], seed: int, safety_share: float = 0.9) -> list[PreferencePair]:
    """Safety RM mix: every safety pair + helpfulness pairs sampled so that safety makes `safety_share` (90 %).
    Pairs labelled "chosen unsafe, other safe" are excluded first (`exclude_chosen_unsafe`)."""
    if not 0.0 < safety_share <= 1.0:
        raise ValueError(f"safety_share must be in (0, 1], got {safety_share}")
    pairs = exclude_chosen_unsafe(pairs, "safety mix")
    safety = [p for p in pairs if p.is_safety]
    helpful = [p for p in pairs if not p.is_safety]
    n_helpful = round(len(safety) * (1.0 - safety_share) / safety_share)
    return safety + _sample(helpful, n_helpful, np.random.default_rng(seed), "helpfulness")


MIXES: dict[str, Callable[[Sequence[PreferencePair], int], list[PreferencePair]]] = {
    "none": lambda pairs, seed: exclude_chosen_unsafe(pairs),
    "helpful": helpful_mix,
    "safety": safety_mix,
}


def apply_mix(name: str, pairs: Sequence[PreferencePair], seed: int) -> list[PreferencePair]:
    if name not in MIXES:
        raise ValueError(f"unknown data mix {name!r}; known: {', '.join(MIXES)}")
    return MIXES[name](pairs, seed)


# ------------------------------------------------------------------------------------------------ files -> batches


def _paths(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def read_pair_files(paths: str, safety_paths: str = "", *, format: str = "auto", on_error: str = "raise",
                    is_safety: bool | None = None, mix: str = "none", seed: int = 0,
                    origin: str | None = None) -> list[PreferencePair]:
    """Every comma-separated file of `paths` (is_safety as given, None = the records' field) and `safety_paths`
    (is_safety True), then the data mix (deterministic by seed). `origin` tags every pair read (None = the records'
    field). Errors are ValueError("<file>:<line>: ...")."""
    pairs: list[PreferencePair] = []
    for path, safety in [(p, is_safety) for p in _paths(paths)] + [(p, True) for p in _paths(safety_paths)]:
        pairs += read_preferences(path, format, on_error=on_error, is_safety=safety, origin=origin)[0]
    return apply_mix(mix, pairs, seed)


@dataclasses.dataclass
class PairData:
    """Global pair batches for a preference trainer (reward model, DPO)."""
    train_iter: grain.DatasetIterator
    eval_batches: list[Batch]
    n_train: int
    n_eval: int  # held-out pairs in eval_batches (max_eval_batches may cap them)
    truncation: TruncationStats


def make_pair_data(tokenizer, pairs: Sequence[PreferencePair], *, seq_len: int, batch_size: int, seed: int,
                   val_fraction: float, max_eval_batches: int | None = None) -> PairData:
    """Held-out split, encoding (truncations counted), the shuffled train iterator and fixed eval batches."""
    train_pairs, val_pairs = split_pairs(pairs, val_fraction)
    train_enc, train_stats = encode_pairs(tokenizer, train_pairs, seq_len)
    val_enc, val_stats = encode_pairs(tokenizer, val_pairs, seq_len)
    if len(train_enc) < batch_size:
        raise ValueError(f"batch_size ({batch_size} pairs) exceeds the {len(train_enc)} training pairs")
    stats = TruncationStats(*(a + b for a, b in zip(dataclasses.astuple(train_stats), dataclasses.astuple(val_stats))))
    eval_batches = make_eval_batches(val_enc, batch_size, seq_len, max_eval_batches)
    return PairData(make_train_iterator(train_enc, batch_size, seq_len, seed), eval_batches, len(train_enc),
                    int(sum(b["valid"].sum() for b in eval_batches)), stats)
