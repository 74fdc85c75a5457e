"""Pairs to annotate in one round of preference collection (paper section 3.2.1: "for each prompt, we sample two
responses from two different model variants, and varying the temperature hyper-parameter").

* A `Sampler` is any callable ``(prompts, temperature, seed) -> [Sample]`` (one answer per prompt, in order):
  `policy_sampler` makes one from a policy checkpoint's params; tests pass plain functions.
* A `Variant` is a sampler at a temperature. `sample_pairs(prompts, (variant_a, variant_b), ...)` draws one answer
  per prompt from each and builds the `ComparisonPair` batch for an annotator. Which variant appears as answer "a" is
  drawn per pair (seeded), so a human annotator's position bias does not follow the model or the temperature; the
  pair's `meta` records which is which.
* Pairs are left out (and counted in `PairStats`) when the two answers are identical (no preference to state) and,
  unless `keep_truncated`, when an answer was cut at the length limit (`Sample.truncated`): an annotator would judge
  a fragment, and the reward model would then learn it as a complete answer (its training encoding ends every answer
  with EOS).

With one policy the two variants are the same model at two temperatures (`same_model`); the default temperatures
(0.6, Meta's chat default, and 1.0, the untempered distribution) are this project's choice: the paper gives none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from llama2_jax.data.prompts import Prompt
from llama2_jax.inference import generate
from llama2_jax.rlhf.annotators import ComparisonPair, make_pair_id
from llama2_jax.text import chat_format as chat

PAIR_TEMPERATURES = (0.6, 1.0)


@dataclasses.dataclass
class Sample:
    """One sampled answer."""
    text: str
    truncated: bool = False  # cut at the length limit: no EOS ended it (`decode.truncated_rows`)


Sampler = Callable[[Sequence[Prompt], float, int], list[Sample]]  # (prompts, temperature, seed) -> one per prompt


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model variant to draw answers from: a sampler at a temperature."""
    name: str
    sampler: Sampler
    temperature: float


def same_model(sampler: Sampler, temperatures: Sequence[float] = PAIR_TEMPERATURES, name: str = "policy"
               ) -> tuple[Variant, Variant]:
    """Two variants of one model that differ in temperature only."""
    if len(temperatures) != 2:
        raise ValueError(f"expected two temperatures, got {tuple(temperatures)}")
    return tuple(Variant(f"{name}@T={t:g}", sampler, float(t)) for t in temperatures)


@dataclasses.dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    identical: int = 0  # both answers the same text: dropped
    truncated: int = 0  # an answer cut at the length limit: dropped unless keep_truncated

    def summary(self) -> str:
        return (f"{self.pairs} pairs from {self.prompts} prompts (dropped: {self.identical} with identical answers, "
                f"{self.truncated} with an answer cut at the length limit)")


def sample_pairs(prompts: Sequence[Prompt], variants: Sequence[Variant], *, tag: str, seed: int,
                 keep_truncated: bool = False) -> tuple[list[ComparisonPair], PairStats]:
    """Two answers per prompt, one from each variant, as a batch of pairs for an annotator.

    tag: prefixes every pair_id (e.g. "round_2"); seed: the samplers get seed and seed + 1, and the a/b order is drawn
    from it. Returns (pairs in prompt order, stats)."""
    if len(variants) != 2:
        raise ValueError(f"sample_pairs needs two variants, got {len(variants)}")
    samples = []
    for i, variant in enumerate(variants):
        out = list(variant.sampler(list(prompts), variant.temperature, seed + i))
        if len(out) != len(prompts):
            raise ValueError(f"sampler of variant {variant.name!r} returned {len(out)} answers for {len(prompts)} "
                             "prompts")
        samples.append(out)
    swap = np.random.default_rng(seed).random(len(prompts)) < 0.5
    stats, pairs = PairStats(prompts=len(prompts)), []
    for p, prompt in enumerate(prompts):
        order = (1, 0) if swap[p] else (0, 1)
        first, second = (samples[v][p] for v in order)
        if first.text == second.text:
            stats.identical += 1
            continue
        if (first.truncated or second.truncated) and not keep_truncated:
            stats.truncated += 1
            continue
        meta = {"tag": tag, "prompt_index": p}
        for side, v, sample in (("a", order[0], first), ("b", order[1], second)):
            meta.update({f"variant_{side}": variants[v].name, f"temperature_{side}": variants[v].temperature,
                         f"truncated_{side}": sample.truncated})
        pair_id = make_pair_id(prompt.messages, first.text, second.text, tag)
        pairs.append(ComparisonPair(pair_id, prompt.messages, first.text, second.text, prompt.is_safety, meta))
    stats.pairs = len(pairs)
    return pairs, stats


def policy_sampler(params, cfg, tokenizer, *, max_gen_len: int, top_p: float = 0.9, batch_size: int = 8,
                   mesh=None) -> Sampler:
    """A `Sampler` over a policy's params: Meta's chat encoding of each prompt, `generate.sample_lists` in batches of
    `batch_size` rows (the last one filled by repeating its first prompt, so every batch shares one compilation),
    answers decoded, `truncated` from the sampler's output."""
    def sample(prompts: Sequence[Prompt], temperature: float, seed: int) -> list[Sample]:
        encoded = [chat.encode_dialog(tokenizer, prompt.messages) for prompt in prompts]
        answers: list[Sample] = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            rows = chunk + [chunk[0]] * (batch_size - len(chunk))
            out = generate.sample_lists(params, cfg, rows, max_gen_len=max_gen_len, temperature=temperature,
                                        top_p=top_p, eos_id=tokenizer.eos_id,
                                        rng=jax.random.fold_in(jax.random.PRNGKey(seed), start), mesh=mesh)
            answers += [_answer(tokenizer, out, row) for row in range(len(chunk))]
        return answers

    return sample


def _answer(tokenizer, out: dict, row: int) -> Sample:
    start = int(out["prompt_lens"][row])
    tokens = out["tokens"][row, start:start + int(out["lengths"][row])].tolist()
    return Sample(tokenizer.decode(tokens), bool(out["truncated"][row]))

