"""The shared training state, optimizer, and ONE pure train step that every trainer uses with its own loss.

    state, metrics = train_step(state, batch, frozen=None, loss_fn=…, grad_accum_steps=…)

`loss_fn(params, batch) -> (loss_sum, aux)` follows the contract in `llama2_jax/training/losses.py` (sums plus a
"weight"). A trainer with a frozen model (DPO's reference policy, a LoRA base, a distillation teacher) passes it as
`frozen`: the step then calls `loss_fn(params, batch, frozen)`, differentiates `params` only, and never updates or
donates `frozen` (it is sharded like params). Trainers bind `loss_fn` with `functools.partial` and jit the step once
with shardings and donation (`jit_train_step`; `Trainable.jit_steps` does it for a LoRA or a full run). Parameters and
optimizer state are float32 (master weights); the model computes in `LlamaConfig.dtype` (bfloat16 by default).
`LoopState` is the loop's state when one step trains several models or none (an RL iteration).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llama2_jax.model import lora
from llama2_jax.model import sharding as sh

LossFn = Callable[..., tuple[jax.Array, dict]]  # (params, batch) or (params, batch, frozen) -> (loss_sum, aux)


def _bind_frozen(loss_fn: LossFn, frozen: Any, rng: Optional[jax.Array] = None) -> Callable[[Any, dict], tuple]:
    """loss_fn(params, batch) as is, or with the frozen tree bound (gradients cannot reach it: it is a closure
    constant of the differentiated function, and stop_gradient makes that explicit) and, given `rng`, a dropout key
    passed as `rng=` (LoRA's adapter dropout)."""
    if frozen is None and rng is None:
        return loss_fn
    extra = {} if rng is None else {"rng": rng}
    if frozen is None:
        return lambda params, batch: loss_fn(params, batch, **extra)
    frozen = jax.lax.stop_gradient(frozen)
    return lambda params, batch: loss_fn(params, batch, frozen, **extra)


class TrainState(flax.struct.PyTreeNode):
    """step (int32 scalar), params (float32 pytree), opt_state; `tx` is static (not a pytree leaf)."""
    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


class LoopState(flax.struct.PyTreeNode):
    """What the loop steps when one step trains several models or none (an RL iteration): `step` counts loop steps;
    `main` is the model the workdir holds (checkpointed as its `params`: an init_from), `others` are further models
    trained in the same step (PPO's value model), each checkpointed under its name. Rejection sampling, context
    distillation and GAtt have none: each iteration's model is its fine-tuning run's own workdir."""
    step: Any
    main: Optional[TrainState] = None
    others: dict = flax.struct.field(default_factory=dict)


def warmup_cosine_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                           end_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `end_fraction * peak_lr` at `total_steps`
    (the paper's recipe: decay to 10 % of peak). A constant schedule when warmup_steps = 0 and end_fraction = 1."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=end_fraction * peak_lr)


def _decay_mask(params) -> Any:
    """Weight decay on matrices only: no decay on RMSNorm gains (1-D) — the usual practice; the paper is silent."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(learning_rate: float | optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-5,
                   weight_decay: float = 0.1, grad_clip: float = 1.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (Llama 2: betas 0.9/0.95, eps 1e-5, weight decay 0.1, clip 1.0)."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask),
    )


def state_shardings(abstract_boxed_params: Any, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings for a TrainState: params by their logical axes; Adam moments like their params (the boxes
    propagate through `tx.init`); counters replicated."""
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx), abstract_boxed_params)
    return sh.tree_shardings(abstract_state, mesh)


def create_train_state(init_params_fn: Callable[[], Any], tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[TrainState, TrainState]:
    """Sharded TrainState straight from an init function returning *boxed* params (`model.init(...)["params"]`):
    every parameter and optimizer moment is created on its own shard. Returns (state, shardings)."""
    abstract = jax.eval_shape(init_params_fn)
    shardings = state_shardings(abstract, tx, mesh)
    sh.check_divisible(nn.unbox(abstract), shardings.params)

    def init():
        return TrainState.create(nn.unbox(init_params_fn()), tx)

    return jax.jit(init, out_shardings=shardings)(), shardings


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """A fresh TrainState (new optimizer) around given params (e.g. loaded with `init_from`), sharded."""
    return jax.jit(lambda p: TrainState.create(p, tx), out_shardings=shardings)(params)


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over a pytree (the norm that clipping uses), in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _split_microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...]; row i of micro-batch j is global row i * n + j, so that with the batch split
    contiguously over devices every micro-batch is still spread over all of them (no resharding)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def accumulate_gradients(params, batch: dict, loss_fn: LossFn, grad_accum_steps: int, *,
                         bind: Optional[Callable[[Optional[jax.Array]], LossFn]] = None, rng=None):
    """Sum of loss, aux and gradients over `grad_accum_steps` micro-batches (a lax.scan: one compiled body). With
    `rng`, micro-batch i's loss is `bind(fold_in(rng, i))` (its own dropout key) instead of `loss_fn`."""
    def value_and_grad(micro_batch, index=0):
        fn = loss_fn if rng is None else bind(jax.random.fold_in(rng, index))
        (loss_sum, aux), grads = jax.value_and_grad(fn, has_aux=True)(params, micro_batch)
        return loss_sum, aux, grads

    if grad_accum_steps == 1:
        return value_and_grad(batch)

    micro_batches = _split_microbatches(batch, grad_accum_steps)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(value_and_grad, first))

    def body(carry, xs):
        out = value_and_grad(*xs)
        return jax.tree.map(jnp.add, carry, out), None

    totals, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(grad_accum_steps)))
    return totals


def train_step(state: TrainState, batch: dict, frozen: Any = None, *, loss_fn: LossFn, grad_accum_steps: int = 1,
               learning_rate_fn: Optional[optax.Schedule] = None,
               rng_seed: Optional[int] = None) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch. Pure: (state, batch[, frozen]) -> (new state, metrics).

    The gradient is d(sum of losses)/d(params) divided by the global weight (tokens or pairs), i.e. exactly the
    gradient of the mean loss over the whole global batch, however it is split into micro-batches or devices.
    With `rng_seed` the loss also gets `rng=` a key folded from the seed, the step and the micro-batch (dropout).
    """
    rng = None if rng_seed is None else jax.random.fold_in(jax.random.PRNGKey(rng_seed), state.step)
    loss_sum, aux, grads = accumulate_gradients(state.params, batch, _bind_frozen(loss_fn, frozen), grad_accum_steps,
                                                bind=lambda key: _bind_frozen(loss_fn, frozen, key), rng=rng)
    weight = jnp.maximum(aux["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {name: value / weight for name, value in aux.items() if name != "weight"}
    metrics["loss"] = loss_sum / weight
    metrics["weight"] = aux["weight"]
    metrics["grad_norm"] = global_norm(grads)
    if learning_rate_fn is not None:
        metrics["learning_rate"] = learning_rate_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch: dict, frozen: Any = None, *, loss_fn: LossFn) -> dict:
    """Sums (not means) for one eval batch, so the caller can combine batches exactly: {"loss_sum", "weight", …}."""
    loss_sum, aux = _bind_frozen(loss_fn, frozen)(params, batch)
    return {**aux, "loss_sum": loss_sum}


def jit_train_step(loss_fn: LossFn, shardings: TrainState, mesh: Mesh, *, grad_accum_steps: int = 1,
                   learning_rate_fn: Optional[optax.Schedule] = None, frozen_shardings: Any = None,
                   rng_seed: Optional[int] = None):
    """`train_step` bound to a loss and jitted once: state sharded and donated, every batch entry split over the
    data axes along its first dimension (any rank), activations pinned by `sh.activation_sharding`, metrics
    replicated. With `frozen_shardings` the jitted step takes `(state, batch, frozen)`; frozen is not donated."""
    step = functools.partial(train_step, loss_fn=loss_fn, grad_accum_steps=grad_accum_steps,
                             learning_rate_fn=learning_rate_fn, rng_seed=rng_seed)
    in_shardings = (shardings, sh.batch_sharding(mesh, 1))
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(sh.with_activation_sharding(step, mesh), in_shardings=in_shardings,
                   out_shardings=(shardings, sh.replicated(mesh)), donate_argnums=0)


def with_frozen(jitted: Callable, frozen: Any) -> Callable:
    """A jitted `(state_or_params, batch, frozen)` step with its frozen tree bound: the loop's signature."""
    return lambda first, batch: jitted(first, batch, frozen)


def jit_eval_step(loss_fn: LossFn, params_shardings: Any, mesh: Mesh, *, frozen_shardings: Any = None):
    """`eval_step` jitted: (params, batch[, frozen]) -> replicated sums."""
    step = functools.partial(eval_step, loss_fn=loss_fn)
    in_shardings = (params_shardings, sh.batch_sharding(mesh, 1))
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(sh.with_activation_sharding(step, mesh), in_shardings=in_shardings,
                   out_shardings=sh.replicated(mesh))


@dataclasses.dataclass
class Trainable:
    """A model ready to train (`training.initial_state.init_state`): its sharded TrainState, and the frozen tree every
    step reads, sharded (a LoRA run's base, or a full fine-tuning's reference policy for DPO), or None."""
    state: TrainState
    shardings: TrainState
    frozen: Any = None
    frozen_shardings: Any = None
    lora_cfg: Optional[lora.LoraConfig] = None  # adapters on the frozen base; None = the params are the model

    def jit_steps(self, loss_fn: Callable, model, mesh: Mesh, *, grad_accum_steps: int = 1,
                  schedule: Optional[optax.Schedule] = None, seed: int = 0, reference: bool = False):
        """(train step, eval step) in the loop's signature for a losses.py loss `loss_fn(params, batch[, frozen], *,
        model)`. A LoRA run's loss sees the adapted model (adapter dropout keyed from seed + 1); with `reference` the
        loss also gets the frozen tree (losses.dpo_loss). The eval step has no dropout."""
        if self.lora_cfg is not None:
            loss = lora.adapted_loss(loss_fn, model, self.lora_cfg, pass_frozen=reference)
            rng_seed = seed + 1 if self.lora_cfg.dropout > 0 else None
        else:
            loss, rng_seed = functools.partial(loss_fn, model=model), None
        step = jit_train_step(loss, self.shardings, mesh, grad_accum_steps=grad_accum_steps, learning_rate_fn=schedule,
                              frozen_shardings=self.frozen_shardings, rng_seed=rng_seed)
        eval_step = jit_eval_step(loss, self.shardings.params, mesh, frozen_shardings=self.frozen_shardings)
        if self.frozen is None:
            return step, eval_step
        return with_frozen(step, self.frozen), with_frozen(eval_step, self.frozen)
