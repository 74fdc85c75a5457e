"""Every trainer kind's real step, lowered on abstract sharded inputs and compiled for any mesh (compile-only TPU
devices from llama2_jax.accel.tpu, or simulated CPU devices): per-device memory and compile time, nothing allocated.

    figure = compile_train_step("lora", cfg, mesh, seq_len=4096, batch_per_device=1)
    figure.total, figure.temp, figure.compile_s        # bytes per device, seconds

What is compiled is each trainer's own step: `llama2_jax.training.state.jit_train_step` (AdamW, clipping, the
shardings of `sharding.LOGICAL_RULES`, the state donated, activations pinned by `activation_sharding`) bound to the
trainer's loss from `llama2_jax.training.losses`:

  task        loss (trainer)                                    trained (float32 + AdamW)   frozen argument
  pretrain    next_token_loss (train.pretrain)                  the model                   -
  sft         next_token_loss with a loss mask (train.sft)      the model                   -
  lora        next_token_loss through lora.adapted_loss         adapters (rank `lora_rank`) the base, cfg.param_dtype
  rm          pairwise_loss on a ScoreModel (train.reward)      trunk + score head          -
  dpo         dpo_loss (train.dpo)                              the policy                  the reference policy
  ppo_policy  ppo_policy_loss (train.ppo, one minibatch step)   the policy                  -
  ppo_value   ppo_value_loss on a ScoreModel (train.ppo)        the value model             -

`batch_per_device` counts sequences per data-parallel shard (data x fsdp shards) for the token tasks and *pairs*
(two sequences each) for rm and dpo; with `grad_accum_steps` = n the global batch is n micro-batches of that size.
Sequences are `seq_len` tokens as the model sees them (dpo and ppo carry one more token, dropped by their losses).
PPO's update alternates the two PPO steps over one experience batch (train.ppo.ppo_update); the reference policy and
the reward models it keeps on the devices for the rollout are not part of these two figures.

A program that does not fit is refused by the TPU compiler (RESOURCE_EXHAUSTED, with the bytes it needed): the
figure then carries that message in `error` and no sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama2_jax.inference import decode
from llama2_jax.model import lora
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, abstract_params
from llama2_jax.model.score import ScoreModel, abstract_score_params
from llama2_jax.training import losses
from llama2_jax.training import state as train_state

TASKS = ("pretrain", "sft", "lora", "rm", "dpo", "ppo_policy", "ppo_value")
GIB = 1024 ** 3


@dataclasses.dataclass
class MemoryFigure:
    """XLA's memory analysis of one compiled program, bytes per device (`memory_analysis()`), or the compiler's
    refusal in `error`."""
    argument: int = 0
    output: int = 0
    temp: int = 0
    alias: int = 0
    compile_s: float = 0.0
    error: Optional[str] = None

    @property
    def total(self) -> int:
        """Peak bytes per device: arguments + outputs + temporaries - what outputs reuse of donated arguments."""
        return self.argument + self.output + self.temp - self.alias

    def describe(self) -> str:
        if self.error:
            return f"does not compile: {self.error} (compile {self.compile_s:.0f}s)"
        gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        return (f"{gib(self.total)} GiB/device (argument {gib(self.argument)} + output {gib(self.output)} + temp "
                f"{gib(self.temp)} - alias {gib(self.alias)}; compile {self.compile_s:.0f}s)")


def compile_memory(jitted, *args) -> MemoryFigure:
    """Lower and compile `jitted` on abstract `args` (ShapeDtypeStructs carrying their shardings)."""
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        message = str(error).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        return MemoryFigure(compile_s=time.perf_counter() - start, error=message)
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return MemoryFigure(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                        int(m.alias_size_in_bytes), seconds)


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves with their shardings (nothing is allocated)."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


def abstract_batch(task: str, rows: int, seq_len: int, mesh: Mesh) -> dict:
    """The batch a trainer of `task` feeds its step: `rows` sequences (pairs for rm/dpo) of `seq_len` tokens seen
    by the model, split over the data axes along the first dimension (as `jit_train_step` shards it)."""
    sharding = sh.batch_sharding(mesh, 1)
    i32, f32 = jnp.int32, jnp.float32
    if task in ("pretrain", "sft", "lora"):
        shapes = {name: ((rows, seq_len), f32 if name == "loss_mask" else i32)
                  for name in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    elif task == "rm":
        shapes = {"tokens": ((rows, 2, seq_len), i32), "lengths": ((rows, 2), i32), "rating": ((rows,), i32),
                  "valid": ((rows,), f32)}
    elif task == "dpo":
        shapes = {"tokens": ((rows, 2, seq_len + 1), i32), "lengths": ((rows, 2), i32),
                  "prompt_lens": ((rows, 2), i32), "valid": ((rows,), f32)}
    elif task in ("ppo_policy", "ppo_value"):
        shapes = {"ids": ((rows, seq_len + 1), i32)}
        shapes.update({name: ((rows, seq_len), f32)
                       for name in ("mask", "logprobs", "values", "advantages", "returns")})
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, (shape, dtype) in shapes.items()}


def _loss_and_params(task: str, cfg: LlamaConfig, lora_rank: int) -> tuple[Callable, Any, Any]:
    """(loss_fn, boxed abstract trained params, boxed abstract frozen tree or None) of a trainer kind."""
    if task in ("pretrain", "sft"):
        return functools.partial(losses.next_token_loss, model=Llama(cfg)), abstract_params(cfg, boxed=True), None
    if task == "lora":
        base = abstract_params(cfg, boxed=True)
        lora_cfg = lora.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank)
        trainable = {"lora": lora.abstract(nn.unbox(base), cfg, lora_cfg, boxed=True)}
        return lora.adapted_loss(losses.next_token_loss, Llama(cfg), lora_cfg), trainable, base
    if task == "rm":
        loss = functools.partial(losses.pairwise_loss, model=ScoreModel(cfg), margin_table="none")
        return loss, abstract_score_params(cfg, boxed=True), None
    if task == "dpo":
        params = abstract_params(cfg, boxed=True)
        loss = functools.partial(losses.dpo_loss, model=Llama(cfg), beta=0.1, loss_type="sigmoid")
        return loss, params, params
    if task == "ppo_policy":
        loss = functools.partial(losses.ppo_policy_loss, model=Llama(cfg), temperature=1.0, clip_ratio=0.2)
        return loss, abstract_params(cfg, boxed=True), None
    if task == "ppo_value":
        loss = functools.partial(losses.ppo_value_loss, model=ScoreModel(cfg), clip_value=0.2)
        return loss, abstract_score_params(cfg, boxed=True), None
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def abstract_train_step(task: str, cfg: LlamaConfig, mesh: Mesh, *, seq_len: int, batch_per_device: int,
                        grad_accum_steps: int = 1, lora_rank: int = 16) -> tuple[Callable, tuple]:
    """(the trainer's jitted step, its abstract arguments) for `task` on `mesh`; see the module docstring."""
    loss_fn, boxed, frozen_boxed = _loss_and_params(task, cfg, lora_rank)
    schedule = train_state.warmup_cosine_schedule(3e-4, 100, 10_000)
    tx = train_state.make_optimizer(schedule, weight_decay=0.0 if task == "lora" else 0.1)
    shardings = train_state.state_shardings(boxed, tx, mesh)
    sh.check_divisible(nn.unbox(boxed), shardings.params)
    state = _abstract(jax.eval_shape(lambda p: train_state.TrainState.create(p, tx), nn.unbox(boxed)), shardings)
    rows = batch_per_device * sh.data_parallel_size(mesh) * grad_accum_steps
    batch = abstract_batch(task, rows, seq_len, mesh)
    frozen_shardings = None if frozen_boxed is None else sh.tree_shardings(frozen_boxed, mesh)
    step = train_state.jit_train_step(loss_fn, shardings, mesh, grad_accum_steps=grad_accum_steps,
                                      learning_rate_fn=schedule, frozen_shardings=frozen_shardings)
    if frozen_boxed is None:
        return step, (state, batch)
    return step, (state, batch, _abstract(nn.unbox(frozen_boxed), frozen_shardings))


def compile_train_step(task: str, cfg: LlamaConfig, mesh: Mesh, *, seq_len: int, batch_per_device: int,
                       grad_accum_steps: int = 1, lora_rank: int = 16) -> MemoryFigure:
    """Compile `task`'s step on `mesh` (see `abstract_train_step`): its memory per device and compile time."""
    step, args = abstract_train_step(task, cfg, mesh, seq_len=seq_len, batch_per_device=batch_per_device,
                                     grad_accum_steps=grad_accum_steps, lora_rank=lora_rank)
    return compile_memory(step, *args)


def compile_decode(cfg: LlamaConfig, mesh: Mesh, *, batch_per_device: int, prompt_len: int,
                   max_gen_len: int) -> MemoryFigure:
    """Compile batched generation (`inference.decode.sample`: prefill, then the KV-cache loop) on `mesh`, params in
    cfg.param_dtype sharded by the rules table, prompts split over the data axes; memory per device."""
    boxed = abstract_params(cfg, boxed=True)
    param_shardings = sh.tree_shardings(boxed, mesh)
    params = _abstract(nn.unbox(boxed), param_shardings)
    rows = batch_per_device * sh.data_parallel_size(mesh)
    tokens = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32, sharding=sh.batch_sharding(mesh))
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sh.batch_sharding(mesh, 1))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sh.replicated(mesh))

    def generate(p, prompt_tokens, prompt_lens, key):
        return decode.sample(p, cfg, prompt_tokens, prompt_lens, key, max_gen_len=max_gen_len, mesh=mesh)

    return compile_memory(jax.jit(generate), params, tokens, lengths, rng)
