"""Pieces every trainer shares: flags, config checks, mesh, optimizer and state set-up, process slicing of batches.

Config checks run before anything is compiled and raise `ConfigError`, a one-line message naming the field; `main`
functions print it and exit with status 1 instead of showing a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging

from llama2_jax import checkpoint as param_checkpoint
from llama2_jax import sharding as sh
from llama2_jax.config import LlamaConfig
from llama2_jax.model import Llama
from train import state as train_state

FLAGS = flags.FLAGS


class ConfigError(ValueError):
    """A bad config field or input, reported as one line before compilation."""


def define_runtime_flags() -> None:
    """Flags every trainer takes besides --config: the workdir and multi-host start-up."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard and the tokenizer.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
    flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0 .. num_processes-1 (multi-host).")
    flags.mark_flags_as_required(["workdir"])


def run_main(train_and_evaluate: Callable[[Any, str], Any]) -> Callable[[list[str]], None]:
    """An absl `main` that starts the distributed runtime, runs the trainer, and turns ConfigError into one line."""

    def main(argv):
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
        if len(argv) > 1:
            raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            sh.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except (ConfigError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    return main


def model_config(config) -> LlamaConfig:
    try:
        return LlamaConfig.from_dict(config.model.to_dict())
    except ValueError as error:
        raise ConfigError(f"config.model: {error}") from None


def make_mesh(config):
    try:
        return sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as error:
        raise ConfigError(f"config.mesh: {error}") from None


def check_batch(config, mesh, model_cfg: Optional[LlamaConfig] = None, seq_len: Optional[int] = None) -> None:
    """The global batch must split evenly over processes, data-parallel devices and micro-batches."""
    batch, accum = config.batch_size, config.grad_accum_steps
    dp = sh.data_parallel_size(mesh)
    if batch <= 0 or accum <= 0:
        raise ConfigError(f"config.batch_size ({batch}) and config.grad_accum_steps ({accum}) must be positive")
    if batch % accum:
        raise ConfigError(f"config.batch_size ({batch}) is not divisible by config.grad_accum_steps ({accum})")
    if (batch // accum) % dp:
        raise ConfigError(f"config.batch_size / grad_accum_steps = {batch // accum} is not divisible by the "
                          f"data-parallel size {dp} (mesh data x fsdp)")
    if batch % jax.process_count():
        raise ConfigError(f"config.batch_size ({batch}) is not divisible by the process count {jax.process_count()}")
    if model_cfg is not None and seq_len is not None and seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"config.seq_len ({seq_len}) exceeds config.model.max_seq_len ({model_cfg.max_seq_len})")


def make_tx(config, total_steps: int, *, constant: bool = False):
    """AdamW + the paper's schedule (warmup, cosine to lr_end_fraction), or a constant LR. Returns (tx, schedule)."""
    if constant:
        schedule = lambda step: jnp.asarray(config.learning_rate, jnp.float32)  # noqa: E731
    else:
        schedule = train_state.warmup_cosine_schedule(config.learning_rate, config.warmup_steps, total_steps,
                                                      config.lr_end_fraction)
    tx = train_state.make_optimizer(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                                    weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    return tx, schedule


def init_llama_state(config, model_cfg: LlamaConfig, mesh, tx):
    """Sharded TrainState: random init from config.seed, or params loaded from config.init_from (a converted
    checkpoint or a trainer workdir) straight into their shardings. Returns (state, shardings)."""
    model = Llama(model_cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    init_fn = functools.partial(lambda rng: model.init(rng, tokens)["params"], jax.random.PRNGKey(config.seed))
    if not config.init_from:
        return train_state.create_train_state(init_fn, tx, mesh)
    shardings = train_state.state_shardings(jax.eval_shape(init_fn), tx, mesh)
    try:
        params, _ = param_checkpoint.load_params(config.init_from, model_cfg, shardings=shardings.params)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.init_from: {error}") from None
    return train_state.state_from_params(params, tx, shardings), shardings


class ProcessRows:
    """Wraps an iterator of *global* batches and yields this process's contiguous block of rows.

    Every process reads the same global stream, so a run on P processes sees exactly the batches of a run on one
    process (the multi-host test relies on it). Reading everything on every host is cheap for tokenized text; for
    web-scale TFDS sources shard the source per host instead.
    """

    def __init__(self, iterator: Iterator[dict], index: int, count: int):
        self.iterator, self.index, self.count = iterator, index, count

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.iterator)
        rows = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * rows:(self.index + 1) * rows] for k, v in batch.items()}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)
