"""The one training loop: batches -> step -> metrics / progress bar / TensorBoard -> eval -> checkpoint.

Every step-based trainer (pretrain, SFT, reward, rejection sampling's SFT rounds) builds its state, its jitted step and its data, then calls
`run_loop`. The loop resumes from the workdir's latest checkpoint, saves every `checkpoint_every_steps` and on
SIGTERM (then exits cleanly), and logs through one `Tracker`: `WORKDIR/metrics.jsonl` (one JSON object per logged step
and per eval), TensorBoard, and Weights & Biases when `config.wandb.project` is set. `config.profile_steps` traces a
window of steps with `jax.profiler` (`Profiler`).

Faults: the metrics files are written in the calling thread, so a write that fails (a full disk) fails at once: the
run stops with one `WriterError` line naming the file and the last good checkpoint, never a writer thread that dies
and leaves the loop blocked behind its queue.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import socket
import time
import uuid
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from llama2_jax.checkpoints import storage
from llama2_jax.model import sharding as sh
from llama2_jax.training import perf
from llama2_jax.training.checkpointer import CheckpointError, TrainCheckpointer
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.state import TrainState

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class LoopSettings:
    """The loop's knobs, named as in Flax's examples (they come straight from the config file)."""
    num_train_steps: int
    log_every_steps: int = 10
    eval_every_steps: int = 100
    eval_tasks_every_steps: int = 1000  # cadence of run_loop's extra_evals (lm-eval tasks, llama2_jax.training.task_evals)
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress_bar: bool = True
    profile_steps: str = ""  # "START:STOP" (see Profiler)
    wandb: Optional["WandbSettings"] = None  # W&B when wandb.project is set (see Tracker)
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


def process_rows_to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays split over the data axes of the mesh (each process
    gives its own rows; `llama2_jax.training.common.host_to_global` is for an array that every process holds whole)."""
    return {name: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, value.ndim), value)
            for name, value in batch.items()}


class WriterError(RuntimeError):
    """A metrics file (metrics.jsonl, the TensorBoard events, the W&B run) cannot be written; the message is one line
    naming the file and the last good checkpoint of the workdir (read when the message is shown, so a save that was
    still being written when the writer failed is counted once it completed)."""

    def __init__(self, problem: str, workdir: str):
        super().__init__(problem)
        self.problem, self.workdir = problem, workdir

    def __str__(self) -> str:
        return f"{self.problem}; {last_good_checkpoint(self.workdir)}"


def last_good_checkpoint(workdir: str) -> str:
    """"last good checkpoint: step N (DIR)" from WORKDIR/checkpoints/<step> (Orbax renames a save's temporary
    directory to its step only once it is complete), or "no checkpoint saved yet"."""
    directory = os.path.join(workdir, "checkpoints")
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
    return f"last good checkpoint: step {max(steps)} ({directory})" if steps else "no checkpoint saved yet"


class JsonlBackend:
    """WORKDIR/metrics.jsonl: one JSON object per write, appended (a resumed run continues the file)."""
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.file = open(self.path, "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def drop_metrics_after(workdir: str, step: int) -> None:
    """Remove the rows of WORKDIR/metrics.jsonl with a step above `step` (process 0): a resumed run logs those steps
    again, so the file keeps one row per step (and eval). Rewritten atomically; a line cut short by a kill is
    dropped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class TensorBoardBackend:
    """A WORKDIR/tensorboard event file (tensorboardX's protos and record framing: no TensorFlow needed), one event
    per write, written and flushed in the calling thread. Not tensorboardX's SummaryWriter: its writer thread dies on a
    write error (a full disk) and `add_scalar` then blocks for ever on the thread's full queue."""
    def __init__(self, workdir: str):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import RecordWriter

        directory = os.path.join(workdir, "tensorboard")
        os.makedirs(directory, exist_ok=True)
        # TensorBoard reads every events.out.tfevents.* file; the suffix keeps two writers of one second apart
        self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                                            f"{uuid.uuid4().hex[:8]}")
        self.writer = RecordWriter(self.path)
        self.header = Event(wall_time=time.time(), file_version="brain.Event:2")  # written with the first scalars

    def write(self, step: int, metrics: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar  # a Summary of one value (tag cleaned as SummaryWriter does)

        if self.header is not None:
            self.writer.write(self.header.SerializeToString())
            self.header = None
        values = [value for name, number in metrics.items() for value in scalar(name, number).value]
        self.writer.write(Event(wall_time=time.time(), step=step, summary=Summary(value=values)).SerializeToString())
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WANDB_RUN_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline", "disabled")


class WandbBackend:
    """A Weights & Biases run whose files live in WORKDIR/wandb. Its id is kept in WORKDIR/wandb_run_id, so a resumed
    training run continues the same W&B run (`resume="allow"`). Offline mode needs no login and no network."""

    def __init__(self, workdir: str, settings: "WandbSettings", config: Optional[dict] = None):
        import wandb  # optional (the [wandb] extra); WandbSettings.from_config checked that it is installed
        id_file = os.path.join(workdir, WANDB_RUN_ID_FILE)
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids are short alphanumeric strings
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        self.path = os.path.join(workdir, "wandb")
        self.run = wandb.init(project=settings.project, entity=settings.entity or None, name=settings.name or None,
                              mode=settings.mode, id=run_id, resume="allow", dir=workdir, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """`config.wandb`: project "" means no W&B."""
    project: str = ""
    entity: str = ""
    mode: str = "online"
    name: str = ""

    @classmethod
    def from_config(cls, config) -> "WandbSettings":
        wandb = config.get("wandb")
        if wandb is None:
            return cls()
        settings = cls(**{f.name: wandb[f.name] for f in dataclasses.fields(cls) if f.name in wandb})
        if settings.mode not in WANDB_MODES:
            raise ConfigError(f"config.wandb.mode is {settings.mode!r}, expected one of "
                                     f"{', '.join(WANDB_MODES)}")
        if settings.project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"config.wandb.project is {settings.project!r} but wandb is not installed: "
                                     "pip install -e .[wandb]")
        return settings


class Tracker:
    """The one metrics interface of every trainer: each `write(step, metrics)` goes to metrics.jsonl, TensorBoard and,
    when configured, W&B, with the same scalar names and values. Only process 0 writes.

    `Tracker(workdir)` writes JSONL and TensorBoard; `Tracker.from_config(config, workdir)` adds W&B when
    `config.wandb.project` is set (the flattened config is stored with the W&B run).
    """

    def __init__(self, workdir: str, wandb: Optional[WandbSettings] = None, config: Optional[dict] = None):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.backends: list = []
        if not self.enabled:
            return
        try:
            os.makedirs(workdir, exist_ok=True)
            self.backends.append(JsonlBackend(workdir))
            try:
                self.backends.append(TensorBoardBackend(workdir))
            except ImportError:  # optional: metrics.jsonl is always written
                logging.warning("tensorboardX is not installed: no TensorBoard event files")
            if wandb is not None and wandb.project:
                self.backends.append(WandbBackend(workdir, wandb, config))
        except OSError as error:  # e.g. the TensorBoard file's first event on a full disk
            self._fail(error.filename or workdir, error, "opening the metrics files")

    @classmethod
    def from_config(cls, config, workdir: str) -> "Tracker":
        return cls(workdir, *wandb_from_config(config))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Every backend writes `metrics` as scalars of `step`; a backend that fails raises WriterError (after the
        others were closed)."""
        values = {name: float(value) for name, value in metrics.items()}
        for backend in self.backends:
            try:
                backend.write(step, values)
            except Exception as error:  # noqa: BLE001 - whatever a writer raises stops the run the same way
                self._fail(backend.path, error, f"writing the metrics of step {step}")

    def close(self) -> None:
        for backend in list(self.backends):
            try:
                backend.close()
            except Exception as error:  # noqa: BLE001 - a final flush failing
                self._fail(backend.path, error, "closing")

    def _fail(self, path: str, error: BaseException, doing: str):
        backends, self.backends = self.backends, []
        for other in backends:  # close what is open; the one failed again on its buffered data: nothing more to say
            try:
                other.close()
            except Exception:  # noqa: BLE001
                pass
        reason = "no space left on the device" if storage.is_disk_full(error) else storage.first_line(error)
        raise WriterError(f"{doing} to {path} failed ({reason})", self.workdir) from None


MetricsWriter = Tracker  # the former name (JSONL + TensorBoard only)


def wandb_from_config(config) -> tuple["WandbSettings", Optional[dict]]:
    """(W&B settings, the flattened config to store with the run, or None when W&B is off)."""
    settings = WandbSettings.from_config(config)
    flat = _flatten(config.to_dict()) if settings.project and hasattr(config, "to_dict") else None
    return settings, flat


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


class Profiler:
    """`config.profile_steps = "START:STOP"`: a `jax.profiler` trace of steps START..STOP (1-based, inclusive) into
    WORKDIR/profile (open with xprof or TensorBoard's profile plugin). Process 0 only; "" disables it."""

    def __init__(self, workdir: str, steps: str = ""):
        self.directory = os.path.join(workdir, "profile")
        self.window = parse_profile_steps(steps)
        self.active = False

    @classmethod
    def from_config(cls, config, workdir: str) -> "Profiler":
        return cls(workdir, config.get("profile_steps", "") or "")

    def before_step(self, step: int) -> None:
        """Call before running step `step` (1-based)."""
        if self.window and not self.active and self.window[0] <= step <= self.window[1] \
                and jax.process_index() == 0:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, outputs=None) -> None:
        """Call after step `step` with its outputs (waited for, so the trace holds the device work)."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def parse_profile_steps(text: str) -> Optional[tuple[int, int]]:
    """"START:STOP" -> (START, STOP) with 1 <= START <= STOP; "" -> None. ConfigError naming the field otherwise."""
    if not text:
        return None
    start, colon, stop = text.partition(":")
    try:
        window = (int(start), int(stop))
    except ValueError:
        window = None
    if not colon or window is None or not 1 <= window[0] <= window[1]:
        raise ConfigError(f"config.profile_steps is {text!r}, expected START:STOP with 1 <= START <= STOP")
    return window


class Terminated(Exception):
    """Raised by `run_loop` once the checkpoint SIGTERM asked for is saved, so that a program exits right away instead
    of running its final evaluation, report or samples after the loop (a scheduler's grace period is short). The
    trainer command lines print it as one line and exit with status 0."""


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


def _close_quietly(checkpointer: TrainCheckpointer) -> None:
    """Wait for a pending save and close; its own failure is not reported over the error that stops the run."""
    try:
        checkpointer.close()
    except CheckpointError:
        pass


def _extra_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """'eval/piqa_local/acc' -> 'piqa_local/acc': the extra evals' last values on the bar."""
    return {name.removeprefix("eval/"): f"{value:.4g}" for name, value in metrics.items()}


def run_loop(*, settings: LoopSettings, workdir: str, mesh: Mesh, state: TrainState, shardings: TrainState,
             train_step: Callable, train_iter: Iterator[Batch], eval_step: Optional[Callable] = None,
             eval_batches: Optional[Callable[[], list[Batch]]] = None, tokens_per_step: int = 0,
             flops_per_token: float = 0.0,
             extra_evals: Optional[Callable[..., dict[str, float]]] = None) -> tuple[TrainState, list[dict]]:
    """Train to `settings.num_train_steps`, resuming from the latest checkpoint in `workdir` if there is one.

    `train_iter` yields this process's rows of each global batch and has Grain's `get_state()`/`set_state()`.
    `extra_evals(params, step) -> {name: value}` (e.g. lm-eval tasks, `common.task_evals`) runs every
    `settings.eval_tasks_every_steps` steps and at the last one; its values are one logged row each time, and the
    progress bar keeps showing the latest ones.
    Returns the final state and the list of logged records (also in metrics.jsonl). After SIGTERM: saves the state
    and raises `Terminated` (a run that cannot write its metrics raises `WriterError`).
    """
    checkpointer = TrainCheckpointer(workdir, max_to_keep=settings.keep_checkpoints,
                                     async_save=settings.async_checkpoints)
    if checkpointer.all_steps():
        state, data_state = checkpointer.restore(state, shardings)
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", int(jax.device_get(state.step)))
    start = int(jax.device_get(state.step))
    drop_metrics_after(workdir, start)  # the rows a killed run logged past its last checkpoint are redone
    writer, history = Tracker(workdir, settings.wandb, settings.config), []
    profiler = Profiler(workdir, settings.profile_steps)
    throughput = Throughput(tokens_per_step, flops_per_token, last_step=start)
    progress = _progress(settings, start)
    latest_extra: dict[str, float] = {}  # the last extra_evals values, kept on the progress bar

    def log(step: int, metrics: dict[str, float]):
        writer.write(step, metrics)
        history.append({"step": step, **metrics})
        if progress is not None:
            progress.set_postfix({**_postfix(metrics), **_extra_postfix(latest_extra)}, refresh=False)

    def due(every: int) -> bool:
        return step % every == 0 or step == settings.num_train_steps

    step = start
    try:
        with TerminationFlag() as termination:
            while step < settings.num_train_steps and not termination.requested:
                batch = process_rows_to_global(next(train_iter), mesh)
                profiler.before_step(step + 1)
                state, metrics = train_step(state, batch)
                step += 1
                profiler.after_step(step, metrics)
                if progress is not None:
                    progress.update(1)
                if due(settings.log_every_steps):
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    log(step, {**values, **throughput.measure(step)})
                if termination.requested:  # SIGTERM during the step: save now, no evaluation first
                    break
                if eval_step is not None and due(settings.eval_every_steps):
                    log(step, evaluate(state.params, eval_step, eval_batches(), mesh))
                    throughput.measure(step)  # do not count eval time as training time
                if extra_evals is not None and due(settings.eval_tasks_every_steps):
                    latest_extra = extra_evals(state.params, step)
                    log(step, latest_extra)
                    throughput.measure(step)
                if due(settings.checkpoint_every_steps):
                    checkpointer.save(state, train_iter.get_state())
            terminated = termination.requested
            if terminated and checkpointer.latest_step() != step:
                checkpointer.save(state, train_iter.get_state(), force=True)
    except WriterError:
        _close_quietly(checkpointer)  # a pending save completes first: the checkpoint the error names is on disk
        if progress is not None:
            progress.close()
        raise
    profiler.stop()
    checkpointer.close()
    writer.close()
    if progress is not None:
        progress.close()
    if terminated:
        raise Terminated(f"stopped by SIGTERM after step {step}, saved in {checkpointer.directory}/{step}: run the "
                         "same command to resume")
    return state, history
