"""The one training loop: batches -> step -> metrics / progress bar / TensorBoard -> eval -> checkpoint.

Every step-based trainer (pretrain, SFT, reward, rejection sampling's SFT rounds) builds its state, its jitted step and its data, then calls
`run_loop`. The loop resumes from the workdir's latest checkpoint, saves every `checkpoint_every_steps` and on
SIGTERM (then exits cleanly), and writes `WORKDIR/metrics.jsonl` (one JSON object per logged step and per eval).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from llama2_jax import perf
from llama2_jax import sharding as sh
from train.checkpoints import TrainCheckpointer
from train.state import TrainState

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class LoopSettings:
    """The loop's knobs, named as in Flax's examples (they come straight from the config file)."""

    num_train_steps: int
    log_every_steps: int = 10
    eval_every_steps: int = 100
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True

    @classmethod
    def from_config(cls, config) -> "LoopSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: config[name] for name in names if name in config})


def process_rows_to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays split over the data axes of the mesh (each process
    gives its own rows; `train.common.host_to_global` is for an array that every process holds whole)."""
    return {name: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, value.ndim), value)
            for name, value in batch.items()}


class MetricsWriter:
    """metrics.jsonl + TensorBoard event files (tensorboardX: no TensorFlow needed), written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.jsonl = None
        self.tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: metrics.jsonl is always written
                logging.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class TerminationFlag:
    """Set by SIGTERM; the loop checks it between steps, saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(params, eval_step: Callable, batches: list[Batch], mesh: Mesh) -> dict[str, float]:
    """Exact mean over all eval batches: sums and weights are added before dividing."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_step(params, process_rows_to_global(batch, mesh)))
        for name, value in out.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    weight = max(totals.pop("weight", 0.0), 1.0)
    loss = totals.pop("loss_sum", 0.0) / weight
    totals.pop("loss", None)
    result = {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}
    result.update({f"eval_{name}": value / weight for name, value in totals.items()})
    return result


@dataclasses.dataclass
class Throughput:
    """Tokens/s and MFU between two log points."""

    tokens_per_step: int
    flops_per_token: float
    last_time: float = dataclasses.field(default_factory=time.perf_counter)
    last_step: int = 0

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, seconds = step - self.last_step, max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        tokens_per_sec = steps * self.tokens_per_step / seconds
        out = {"tokens_per_sec": tokens_per_sec, "steps_per_sec": steps / seconds}
        utilisation = perf.mfu(tokens_per_sec, self.flops_per_token, jax.device_count())
        if utilisation is not None:
            out["mfu"] = utilisation
        return out


def _progress(settings: LoopSettings, start: int):
    if not settings.progress_bar or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=settings.num_train_steps, initial=start, dynamic_ncols=True, desc="train")


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    shown = {"loss": "{:.4f}", "learning_rate": "{:.2e}", "tokens_per_sec": "{:,.0f}", "mfu": "{:.1%}",
             "eval_loss": "{:.4f}"}
    return {name.replace("tokens_per_sec", "tok/s").replace("learning_rate", "lr"): fmt.format(metrics[name])
            for name, fmt in shown.items() if name in metrics}


def run_loop(*, settings: LoopSettings, workdir: str, mesh: Mesh, state: TrainState, shardings: TrainState,
             train_step: Callable, train_iter: Iterator[Batch], eval_step: Optional[Callable] = None,
             eval_batches: Optional[Callable[[], list[Batch]]] = None, tokens_per_step: int = 0,
             flops_per_token: float = 0.0) -> tuple[TrainState, list[dict]]:
    """Train to `settings.num_train_steps`, resuming from the latest checkpoint in `workdir` if there is one.

    `train_iter` yields this process's rows of each global batch and has Grain's `get_state()`/`set_state()`.
    Returns the final state and the list of logged records (also in metrics.jsonl).
    """
    checkpointer = TrainCheckpointer(workdir, max_to_keep=settings.keep_checkpoints,
                                     async_save=settings.async_checkpoints)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state, shardings)
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", checkpointer.latest_step())
    start = int(jax.device_get(state.step))
    writer, history = MetricsWriter(workdir), []
    throughput = Throughput(tokens_per_step, flops_per_token, last_step=start)
    progress = _progress(settings, start)

    def log(step: int, metrics: dict[str, float]):
        writer.write(step, metrics)
        history.append({"step": step, **metrics})
        if progress is not None:
            progress.set_postfix(_postfix(metrics), refresh=False)

    step = start
    with TerminationFlag() as termination:
        while step < settings.num_train_steps and not termination.requested:
            batch = process_rows_to_global(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            if progress is not None:
                progress.update(1)
            if step % settings.log_every_steps == 0 or step == settings.num_train_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                log(step, {**values, **throughput.measure(step)})
            if eval_step is not None and (step % settings.eval_every_steps == 0 or step == settings.num_train_steps):
                log(step, evaluate(state.params, eval_step, eval_batches(), mesh))
                throughput.measure(step)  # do not count eval time as training time
            if step % settings.checkpoint_every_steps == 0 or step == settings.num_train_steps:
                checkpointer.save(state, train_iter.get_state())
        if termination.requested and checkpointer.latest_step() != step:
            checkpointer.save(state, train_iter.get_state(), force=True)
    checkpointer.close()
    writer.close()
    if progress is not None:
        progress.close()
    return state, history
