"""The one training loop: batches -> step -> metrics / progress bar / tracker -> evals -> checkpoint.

Every trainer builds its state, its step and its data, then calls `run_loop`. A step is one optimizer step of a
`TrainState` (pretraining, SFT, reward models, DPO), or one iteration of an RL method on a `LoopState` (a PPO
iteration: rollout, scoring and updates of the policy and the value model; a rejection-sampling iteration: sample,
score, fine-tune). The loop resumes from the workdir's latest checkpoint, saves every `checkpoint_every_steps`, at
the end and on SIGTERM (then returns), and logs through one `tracking.Tracker`: WORKDIR/metrics.jsonl (one JSON object
per logged step and per eval), TensorBoard, and Weights & Biases when `config.wandb.project` is set.
`config.profile_steps` traces a window of steps (`tracking.Profiler`). Every trainer returns the loop's `TrainResult`.

SIGTERM: the loop saves the state and returns at once (a step due an evaluation skips it: the checkpoint comes first,
a scheduler's grace period is short); the result is `interrupted`, and a trainer program calls
`exit_if_interrupted(result)` before its final evaluation, report and samples: it raises `Terminated`, which the
trainer command lines print as one line ("stopped by SIGTERM after step N, saved in DIR/N: ...") with exit status
`STOPPED_EXIT_STATUS` (75, EX_TEMPFAIL: not finished, run again to resume).
A metrics writer that fails (`tracking.WriterError`) stops the run after a pending save completes.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from llama2_jax.checkpoints.layout import CheckpointError
from llama2_jax.model import sharding as sh
from llama2_jax.training import perf
from llama2_jax.training.checkpointer import TrainCheckpointer, checkpoint_number
from llama2_jax.training.state import LoopState
from llama2_jax.training.tracking import (
    Profiler,
    Tracker,
    WandbSettings,
    WriterError,
    drop_metrics_after,
    parse_profile_steps,
    wandb_from_config,
)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class LoopSettings:
    """The loop's knobs, named as in Flax's examples (they come straight from the config file)."""
    num_train_steps: int
    log_every_steps: int = 10
    eval_every_steps: int = 100
    eval_tasks_every_steps: int = 1000  # cadence of run_loop's extra_evals (lm-eval tasks, training.task_evals)
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True
    profile_steps: str = ""  # "START:STOP" (see tracking.Profiler)
    wandb: Optional[WandbSettings] = None  # W&B when wandb.project is set (see tracking.Tracker)
    config: Optional[dict] = None  # the flattened trainer config, stored with the W&B run

    @classmethod
    def from_config(cls, config) -> "LoopSettings":
        """The loop fields of a trainer config; profile_steps and wandb are checked here (ConfigError), before any
        step is compiled."""
        names = {f.name for f in dataclasses.fields(cls)} - {"wandb", "config"}
        settings = cls(**{name: config[name] for name in names if name in config})
        parse_profile_steps(settings.profile_steps)
        wandb, flat = wandb_from_config(config)
        return dataclasses.replace(settings, wandb=wandb, config=flat)

    def tracker(self, workdir: str) -> Tracker:
        return Tracker(workdir, self.wandb, self.config)


@dataclasses.dataclass
class TrainResult:
    """What every trainer's `train_and_evaluate` returns."""
    state: Any  # the final TrainState, or LoopState of an RL loop
    history: list[dict]  # every logged row, as in metrics.jsonl: {"step": N, metric: value, ...}
    summary: dict = dataclasses.field(default_factory=dict)  # the trainer's figures: held-out eval, kept share ...
    product: str = ""  # the directory of the trained model (an init_from): the workdir, or a fine-tuning run's
    interrupted: bool = False  # stopped by SIGTERM after saving: a rerun resumes
    stopped: str = ""  # when interrupted: "stopped by SIGTERM after step N, saved in DIR/N: ..." (one line)


STOPPED_EXIT_STATUS = 75  # sysexits.h EX_TEMPFAIL: saved, not finished; the same command resumes


class Terminated(Exception):
    """Raised by `exit_if_interrupted` once the checkpoint SIGTERM asked for is saved, so that a program exits right
    away instead of running its final evaluation, report or samples after the loop (a scheduler's grace period is
    short). The trainer command lines print it as one line and exit with `STOPPED_EXIT_STATUS`."""


def exit_if_interrupted(result: TrainResult) -> TrainResult:
    """`result`, or `Terminated` (its one-line `stopped` message) when SIGTERM stopped the run. Called by a trainer
    program right after its loop; a run nested in another's step (a round's fine-tuning) returns instead, so that
    the outer loop stops too (`Interrupted`)."""
    if result.interrupted:
        raise Terminated(result.stopped)
    return result


class Interrupted(Exception):
    """Raised by a step whose work a SIGTERM cut short (a nested fine-tuning run saved its own checkpoint and
    returned): the loop stops without saving this step, so a rerun redoes it and the nested run resumes."""


def process_rows_to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays split over the data axes of the mesh (each process
    gives its own rows; `training.hosts.host_to_global` is for an array that every process holds whole)."""
    return {name: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, value.ndim), value)
            for name, value in batch.items()}


_ACTIVE_FLAGS: list["TerminationFlag"] = []  # the loops running now, outermost first (a round's fine-tuning nests)


class TerminationFlag:
    """Set by SIGTERM; the loop checks it between steps, saves a checkpoint and returns. A loop started inside a step
    of another (rejection sampling's fine-tuning) starts stopped when the outer one was asked to stop, and a SIGTERM
    stops every running loop."""
    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = any(flag.requested for flag in _ACTIVE_FLAGS)
        _ACTIVE_FLAGS.append(self)
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        for flag in _ACTIVE_FLAGS:
            flag.requested = True

    def __exit__(self, *exc):
        _ACTIVE_FLAGS.remove(self)
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
    """Tokens/s and MFU between two log points (none without `tokens_per_step`)."""
    tokens_per_step: int
    flops_per_token: float
    last_time: float = dataclasses.field(default_factory=time.perf_counter)
    last_step: int = 0

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, seconds = step - self.last_step, max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        if not self.tokens_per_step:  # a step of no fixed token count (an RL iteration logs its own rates)
            return {}
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


def _extra_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """'eval/piqa_local/acc' -> 'piqa_local/acc': the extra evals' last values on the bar."""
    return {name.removeprefix("eval/"): f"{value:.4g}" for name, value in metrics.items()}


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def _params(state) -> Any:
    """The params the evals read: the TrainState's, or a LoopState's main model's."""
    return state.main.params if isinstance(state, LoopState) else state.params


class _Rows:
    """What the loop logs: each row to the tracker and the history, the progress bar, tokens/s between rows."""

    def __init__(self, settings: LoopSettings, workdir: str, start: int, tokens_per_step: int, flops_per_token: float):
        drop_metrics_after(workdir, start)  # the rows a killed run logged past its last checkpoint are redone
        self.tracker, self.history = settings.tracker(workdir), []
        self.throughput = Throughput(tokens_per_step, flops_per_token, last_step=start)
        self.progress = _progress(settings, start)
        self.extra: dict[str, float] = {}  # the last extra_evals values, kept on the progress bar

    def train(self, step: int, metrics) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.write(step, {**values, **self.throughput.measure(step)})

    def evals(self, step: int, metrics: dict[str, float], *, extra: bool = False) -> None:
        if extra:
            self.extra = metrics
        self.write(step, metrics)
        self.throughput.measure(step)  # do not count eval time as training time

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.write(step, metrics)
        self.history.append({"step": step, **metrics})
        if self.progress is not None:
            self.progress.set_postfix({**_postfix(metrics), **_extra_postfix(self.extra)}, refresh=False)

    def close(self) -> None:
        self.tracker.close()
        if self.progress is not None:
            self.progress.close()


def _stopped_line(checkpointer: TrainCheckpointer, step: int, state) -> str:
    """What a run stopped by SIGTERM after loop step `step` with `state` left to resume from."""
    saved = checkpointer.latest_step()
    if saved is None:
        where = f"no checkpoint saved yet in {checkpointer.directory}"
    elif saved == checkpoint_number(state):  # the loop step, or an RL loop's optimizer steps of its policy
        where = f"saved in {checkpointer.directory}/{saved}"
    else:  # the step SIGTERM cut short (a round whose fine-tuning saved its own progress) is redone
        where = f"last checkpoint {checkpointer.directory}/{saved}"
    return f"stopped by SIGTERM after step {step}, {where}: run the same command to resume"


def _close_quietly(checkpointer: TrainCheckpointer) -> None:
    """Wait for a pending save and close; its own failure is not reported over the error that stops the run."""
    try:
        checkpointer.close()
    except CheckpointError:
        pass


def _resume(checkpointer: TrainCheckpointer, state, shardings, train_iter):
    """The newest readable checkpoint's state (and data position), or `state` when there is none."""
    if checkpointer.all_steps():
        state, data_state = checkpointer.restore(state, shardings)
        if train_iter is not None:
            train_iter.set_state(data_state)
        logging.info("resumed from step %d", int(jax.device_get(state.step)))
    return state


def run_loop(*, settings: LoopSettings, workdir: str, mesh: Mesh, state, shardings, train_step: Callable,
             train_iter: Optional[Iterator[Batch]], eval_step: Optional[Callable] = None,
             eval_batches: Optional[Callable[[], list[Batch]]] = None, tokens_per_step: int = 0,
             flops_per_token: float = 0.0, extra_evals: Optional[Callable[..., dict[str, float]]] = None,
             stop_early: Callable[[], bool] = lambda: False) -> TrainResult:
    """Train to `settings.num_train_steps`, resuming from the latest checkpoint in `workdir` if there is one.

    `train_step(state, batch) -> (state, metrics)`; `train_iter` yields this process's rows of each global batch and
    has Grain's `get_state()`/`set_state()`, or is None for steps that read no batch (their `batch` is None).
    `extra_evals(params, step) -> {name: value}` (lm-eval tasks, `training.task_evals`) runs every
    `settings.eval_tasks_every_steps` steps and at the last one; its values are one logged row each time, and the
    progress bar keeps showing the latest ones. `tokens_per_step` > 0 adds tokens/s and MFU to the logged rows.
    `stop_early()` is asked after every step (PPO's early stopping); a step may raise `Interrupted`.
    After SIGTERM the state is saved and the result is `interrupted` (see `exit_if_interrupted`); a run that cannot
    write its metrics raises `tracking.WriterError` once a pending save is complete.
    """
    checkpointer = TrainCheckpointer(workdir, max_to_keep=settings.keep_checkpoints,
                                     async_save=settings.async_checkpoints,
                                     models=tuple(state.others) if isinstance(state, LoopState) else ())
    state = _resume(checkpointer, state, shardings, train_iter)
    step = start = int(jax.device_get(state.step))
    rows = _Rows(settings, workdir, start, tokens_per_step, flops_per_token)
    profiler = Profiler(workdir, settings.profile_steps)
    last, interrupted = settings.num_train_steps, False

    def data_state():
        return train_iter.get_state() if train_iter is not None else None

    try:
        with TerminationFlag() as termination:
            while step < last and not termination.requested:
                batch = process_rows_to_global(next(train_iter), mesh) if train_iter is not None else None
                profiler.before_step(step + 1)
                try:
                    state, metrics = train_step(state, batch)
                except Interrupted:
                    interrupted = True
                    break
                step += 1
                profiler.after_step(step, metrics)
                if rows.progress is not None:
                    rows.progress.update(1)
                if _due(step, settings.log_every_steps, last):
                    rows.train(step, metrics)
                if termination.requested:  # SIGTERM during the step: save now, no evaluation first
                    break
                if eval_step is not None and _due(step, settings.eval_every_steps, last):
                    rows.evals(step, evaluate(_params(state), eval_step, eval_batches(), mesh))
                if extra_evals is not None and _due(step, settings.eval_tasks_every_steps, last):
                    rows.evals(step, extra_evals(_params(state), step), extra=True)
                stop = stop_early()
                if _due(step, settings.checkpoint_every_steps, last) or stop:
                    checkpointer.save(state, data_state(), force=stop)
                if stop:
                    break
            if termination.requested and not interrupted and checkpointer.latest_step() != checkpoint_number(state):
                checkpointer.save(state, data_state(), force=True)
    except WriterError:
        _close_quietly(checkpointer)  # a pending save completes first: the checkpoint the error names is on disk
        rows.close()  # the tracker closed its writers when it failed
        raise
    interrupted = interrupted or termination.requested
    stopped = _stopped_line(checkpointer, step, state) if interrupted else ""
    profiler.stop()
    checkpointer.close()
    rows.close()
    return TrainResult(state, rows.history, product=workdir, interrupted=interrupted, stopped=stopped)
