"""The three compiled phases of a PPO iteration (pure functions of arrays and static `Settings`): `rollout`,
`make_experience` and `ppo_update`, and the losses they use. `train/ppo.py` sets up the models and runs the loop;
`llama2_jax/rlhf.py` holds the formulas (reward combination, whitening, KL, GAE, clipped objectives).

Shape legend: B prompts per iteration, S the sampler's token buffer (prompt width + max_gen_len); the scored
sequences `ids` are [B, S + 1] (room for the EOS appended to responses cut at max_gen_len) and actions are [B, S].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llama2_jax import decode, rlhf
from llama2_jax import sharding as sh
from llama2_jax import value_model as vm
from llama2_jax.losses import token_logprobs
from llama2_jax.model import Llama
from train import rejection_sampling as rs
from train import state as train_state


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static numbers of the compiled phases (hashable; from the config by `settings_from`)."""

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


def settings_from(config, eos_id: int) -> Settings:
    same_name = ("beta", "gamma", "lam", "clip_ratio", "clip_value", "whiten_advantages", "minibatch_size",
                 "ppo_epochs", "grad_accum_steps")
    s = config.sampling
    return Settings(max_gen_len=s.max_gen_len, temperature=s.temperature, top_p=s.top_p, eos_id=eos_id,
                    safety_threshold=config.reward.safety_threshold, chunk_rows=config.rollout_chunk_size,
                    **{name: config[name] for name in same_name})


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


def policy_logprobs(params, cfg, ids, temperature: float):
    """ids [B, S + 1] -> (log π(ids[:, j + 1] | ids[:, :j + 1]) [B, S], entropy [B, S]) of softmax(logits / T)."""
    logits = Llama(cfg).apply({"params": params}, ids[:, :-1]) / temperature
    return token_logprobs(logits, ids[:, 1:]), rlhf.entropy(logits)


def make_experience(policy_params, ref_params, value_params, reward_params, rolled: dict, is_safety, *, cfg, value_cfg,
                    score_fns, settings: Settings):
    """Scores, rewards, log-probs, values, GAE for one rollout. Returns (experience [B, ...], metrics)."""
    ids, score_lens = rs.scoring_sequences(rolled["tokens"], rolled["prompt_lens"], rolled["lengths"], settings.eos_id)
    scores = rs.score_sequences(score_fns, reward_params, ids, score_lens, is_safety, settings.safety_threshold)
    mask = action_mask(rolled["tokens"], rolled["prompt_lens"], rolled["lengths"], settings.eos_id)

    def forward(chunk):
        logprobs, ent = policy_logprobs(policy_params, cfg, chunk, settings.temperature)
        ref_logprobs, _ = policy_logprobs(ref_params, cfg, chunk, settings.temperature)
        return logprobs, ref_logprobs, ent, vm.token_values(value_params, value_cfg, chunk)[:, :-1]

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
    return experience, metrics


def policy_loss(params, batch: dict, *, cfg, settings: Settings):
    """Clipped surrogate summed over the minibatch's action tokens (loss contract of llama2_jax.losses)."""
    logprobs, ent = policy_logprobs(params, cfg, batch["ids"], settings.temperature)
    mask = batch["mask"]
    loss, clipped = rlhf.policy_objective(logprobs, batch["logprobs"], batch["advantages"], settings.clip_ratio)
    total = lambda x: jnp.sum(x * mask)  # noqa: E731
    return total(loss), {"weight": jnp.sum(mask), "clipfrac": total(clipped), "entropy": total(ent),
                         "approx_kl": total(rlhf.approx_kl(logprobs, batch["logprobs"]))}


def value_loss(params, batch: dict, *, cfg, settings: Settings):
    """TRL's clipped value loss summed over the minibatch's action tokens."""
    values = vm.token_values(params, cfg, batch["ids"])[:, :-1]
    mask = batch["mask"]
    loss, clipped = rlhf.value_objective(values, batch["values"], batch["returns"], settings.clip_value)
    return jnp.sum(loss * mask), {"weight": jnp.sum(mask), "clipfrac": jnp.sum(clipped * mask)}


def ppo_update(policy_state, value_state, experience: dict, rng, *, cfg, value_cfg, settings: Settings, mesh):
    """ppo_epochs passes of shuffled minibatches, one policy step and one value step per minibatch (a lax.scan).
    Returns (policy state, value state, metrics averaged over the steps)."""
    batch = experience["mask"].shape[0]
    per_epoch = batch // settings.minibatch_size
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, e), batch)
                             for e in range(settings.ppo_epochs)]).reshape(-1, settings.minibatch_size)
    p_loss = functools.partial(policy_loss, cfg=cfg, settings=settings)
    v_loss = functools.partial(value_loss, cfg=value_cfg, settings=settings)

    def step(states, rows):
        minibatch = {k: jax.lax.with_sharding_constraint(v[rows], sh.batch_sharding(mesh, v.ndim))
                     for k, v in experience.items()}
        policy, p_metrics = train_state.train_step(states[0], minibatch, loss_fn=p_loss,
                                                   grad_accum_steps=settings.grad_accum_steps)
        value, v_metrics = train_state.train_step(states[1], minibatch, loss_fn=v_loss,
                                                  grad_accum_steps=settings.grad_accum_steps)
        metrics = {**{f"policy_{k}": v for k, v in p_metrics.items() if k != "weight"},
                   **{f"value_{k}": v for k, v in v_metrics.items() if k != "weight"}}
        return (policy, value), metrics

    (policy_state, value_state), metrics = jax.lax.scan(step, (policy_state, value_state), order)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["minibatch_steps"] = jnp.asarray(per_epoch * settings.ppo_epochs, jnp.float32)
    return policy_state, value_state, metrics
