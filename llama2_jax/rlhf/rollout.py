"""The first two phases of a PPO iteration (paper section 3.2.3), pure functions of arrays and static `Settings`:
`rollout` (sample one response per prompt) and `make_experience` (rewards, log-probabilities, values, advantages);
and the rollout engine of the RLHF trainers (config.rollout: `rollout_with_slots` / `sample_with_slots` decode
through decode slots, `inference.slot_sampler`; "batch" keeps `decode.sample` inside the trainers' jit).
`train/ppo.py` sets up the models, runs the third phase (`ppo_update`: minibatch steps with `losses.ppo_policy_loss`
and `losses.ppo_value_loss`) and the loop; `llama2_jax/rlhf/formulas.py` holds the formulas (reward combination, whitening,
KL, GAE, clipped objectives).

Shape legend: B prompts per iteration, S the sampler's token buffer (prompt width + max_gen_len); the scored
sequences `ids` are [B, S + 1] (room for the EOS appended to responses cut at max_gen_len) and actions are [B, S].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.inference import decode, slot_sampler
from llama2_jax.model.llama import Llama
from llama2_jax.model.score import ScoreModel
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.training import losses
from llama2_jax.training.checks import ConfigError

ENGINES = ("slots", "batch")  # config.rollout.engine


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static numbers of the compiled phases (hashable; `train.ppo.settings_from` reads them from the config)."""
    max_gen_len: int
    temperature: float
    top_p: float
    eos_id: int
    beta: float
    gamma: float
    lam: float
    clip_ratio: float
    clip_value: float
    whiten_advantages: bool
    safety_threshold: float
    minibatch_size: int
    ppo_epochs: int
    grad_accum_steps: int
    chunk_rows: int  # rows per rollout/forward chunk (lax.map); 0 = the whole batch at once


def map_chunks(fn, inputs, rows: int):
    """fn over chunks of `rows` rows with lax.map (one call when rows is 0 or the batch). Chunk j holds rows j, j + n,
    j + 2n, ... so that every chunk is spread over all devices of a batch-sharded input."""
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if not rows or rows >= batch:
        return fn(inputs)
    n = batch // rows
    split = jax.tree.map(lambda x: x.reshape((rows, n) + x.shape[1:]).swapaxes(0, 1), inputs)
    out = jax.lax.map(fn, split)
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((batch,) + y.shape[2:]), out)


def rollout(policy_params, prompt_tokens, prompt_lens, rng, *, cfg, settings: Settings, mesh) -> dict:
    """Sample one response per prompt: {"tokens" [B, S], "prompt_lens", "lengths", "done"} (decode.sample)."""
    def sample_chunk(chunk):
        return decode.sample(policy_params, cfg, chunk["tokens"], chunk["lens"], chunk["rng"][0],
                               max_gen_len=settings.max_gen_len, temperature=settings.temperature,
                               top_p=settings.top_p, eos_id=settings.eos_id, mesh=mesh)

    rngs = jax.random.split(rng, prompt_tokens.shape[0])
    return map_chunks(sample_chunk, {"tokens": prompt_tokens, "lens": prompt_lens, "rng": rngs}, settings.chunk_rows)


def check_engine(config, process_count: int | None = None) -> None:
    """One-line ConfigErrors for config.rollout (engine, slots), before anything is compiled."""
    engine, slots = config.rollout.engine, config.rollout.slots
    if engine not in ENGINES:
        raise ConfigError(f"config.rollout.engine={engine!r}; known: {', '.join(ENGINES)}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
        raise ConfigError(f"config.rollout.slots={slots!r} must be an integer >= 0 (0 = the rows of one sampling "
                          "call)")
    processes = jax.process_count() if process_count is None else process_count
    if engine == "slots" and processes > 1:
        raise ConfigError(f"config.rollout.engine='slots' runs its host loop in one process and this job has "
                          f"{processes}: use config.rollout.engine='batch'")


def uses_slots(config) -> bool:
    return config.rollout.engine == "slots"


def slot_count(config, rows: int) -> int:
    """The decode slots of a slot rollout: config.rollout.slots, or `rows` (the rows of one sampling call)."""
    return config.rollout.slots or rows


def sample_with_slots(params, cfg, prompt_tokens, prompt_lens, keys, *, n_slots: int, max_gen_len: int,
                      temperature: float, top_p: float, eos_id: int, mesh=None) -> dict[str, np.ndarray]:
    """`decode.sample`'s outputs (tokens [B, S], prompt_lens, lengths, done, truncated; host arrays) for right-padded
    prompts [B, P] decoded through `n_slots` decode slots (`inference.slot_sampler`); answer b draws with keys[b]."""
    rows = slot_sampler.padded_rows(prompt_tokens, prompt_lens)
    return slot_sampler.slot_sample(params, cfg, rows, keys, max_gen_len=max_gen_len, n_slots=n_slots,
                                    width=prompt_tokens.shape[1], temperature=temperature, top_p=top_p,
                                    eos_id=eos_id, mesh=mesh)


def rollout_with_slots(policy_params, prompt_tokens, prompt_lens, rng, *, cfg, settings: Settings, n_slots: int,
                       mesh) -> dict:
    """`rollout` through decode slots (a host loop over compiled slot programs): row b draws with the key
    `slot_sampler.sample_keys(rng, b, 0)`."""
    rows = prompt_tokens.shape[0]
    keys = slot_sampler.sample_keys(rng, np.arange(rows), np.zeros(rows))
    return sample_with_slots(policy_params, cfg, prompt_tokens, prompt_lens, keys, n_slots=n_slots,
                             max_gen_len=settings.max_gen_len, temperature=settings.temperature,
                             top_p=settings.top_p, eos_id=settings.eos_id, mesh=mesh)


def action_mask(tokens, prompt_lens, lengths, eos_id: int):
    """[B, S] mask of actions: position j is the token at j + 1, an action when it is a kept response token or the
    EOS the policy generated right after them (a response cut at max_gen_len has no EOS action)."""
    size = tokens.shape[1]
    end = prompt_lens + lengths
    at_end = jnp.take_along_axis(tokens, jnp.clip(end, 0, size - 1)[:, None], axis=1)[:, 0]
    stop = end + ((end < size) & (at_end == eos_id)).astype(end.dtype)
    target = jnp.arange(1, size + 1)[None, :]
    return ((target >= prompt_lens[:, None]) & (target < stop[:, None])).astype(jnp.float32)


def make_experience(policy_params, ref_params, value_params, reward_params, rolled: dict, is_safety, *, cfg, value_cfg,
                    score_fns, settings: Settings):
    """Scores, rewards, log-probs, values, GAE for one rollout. Returns (experience [B, ...], metrics)."""
    ids, score_lens = rlhf.scoring_sequences(rolled["tokens"], rolled["prompt_lens"], rolled["lengths"],
                                             settings.eos_id)
    scores = rlhf.score_sequences(score_fns, reward_params, ids, score_lens, is_safety, settings.safety_threshold)
    mask = action_mask(rolled["tokens"], rolled["prompt_lens"], rolled["lengths"], settings.eos_id)
    logprobs_of = functools.partial(losses.sequence_logprobs, model=Llama(cfg), temperature=settings.temperature)

    def forward(chunk):
        logprobs, ent = logprobs_of(policy_params, chunk)
        ref_logprobs, _ = logprobs_of(ref_params, chunk)
        return logprobs, ref_logprobs, ent, ScoreModel(value_cfg).apply({"params": value_params}, chunk)[:, :-1]

    logprobs, ref_logprobs, ent, values = map_chunks(forward, ids, settings.chunk_rows)
    values = values * mask
    score = rlhf.whiten(rlhf.logit(scores["combined"]))
    kl = rlhf.kl_per_token(logprobs, ref_logprobs, mask)
    rewards = rlhf.token_rewards(score, kl, mask, settings.beta)
    advantages, returns = rlhf.gae(rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = rlhf.whiten(advantages, mask)
    experience = {"ids": ids, "mask": mask, "logprobs": logprobs * mask, "values": values, "advantages": advantages,
                  "returns": returns}
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {f"reward_{name}": jnp.mean(value) for name, value in scores.items()}
    metrics.update(kl=jnp.mean(jnp.sum(kl, axis=1)), kl_penalty=-settings.beta * jnp.mean(jnp.sum(kl, axis=1)),
                   score_logit=jnp.mean(rlhf.logit(scores["combined"])), entropy=jnp.sum(ent * mask) / tokens,
                   response_length=jnp.mean(jnp.sum(mask, axis=1)), generated_tokens=jnp.sum(rolled["lengths"]),
                   value_mean=jnp.sum(values) / tokens, return_mean=jnp.sum(returns) / tokens)
    if "truncated" in rolled:  # answers cut at max_gen_len: scored at the appended EOS like complete ones (TRL)
        metrics["truncated_fraction"] = jnp.mean(rolled["truncated"].astype(jnp.float32))
    return experience, metrics
