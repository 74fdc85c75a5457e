"""The first two phases of a PPO iteration (paper section 3.2.3), pure functions of arrays and static `Settings`:
`rollout` (sample one response per prompt) and `make_experience` (rewards, log-probabilities, values, advantages).
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

from llama2_jax.inference import decode
from llama2_jax.model.llama import Llama
from llama2_jax.model.score import ScoreModel
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.training import losses


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
