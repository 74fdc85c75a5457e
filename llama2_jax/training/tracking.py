"""What a run records: metrics through one `Tracker` (WORKDIR/metrics.jsonl, TensorBoard, and Weights & Biases when
`config.wandb.project` is set), and `jax.profiler` traces of a window of steps (`Profiler`, `config.profile_steps`).
Only process 0 writes. File names are those of `llama2_jax.checkpoints.layout`.

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
import socket
import time
import uuid
from typing import Optional

import jax

from llama2_jax.checkpoints import storage
from llama2_jax.checkpoints.layout import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    PROFILE_DIR,
    TENSORBOARD_DIR,
    WANDB_RUN_ID_FILE,
    checkpoint_steps,
)
from llama2_jax.training.checks import ConfigError


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
    steps = checkpoint_steps(workdir)
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    return f"last good checkpoint: step {steps[-1]} ({directory})" if steps else "no checkpoint saved yet"


class JsonlBackend:
    """WORKDIR/metrics.jsonl: one JSON object per write, appended (a resumed run continues the file)."""
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, METRICS_FILE)
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
    path = os.path.join(workdir, METRICS_FILE)
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

        directory = os.path.join(workdir, TENSORBOARD_DIR)
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
        self.backends = []

    def _fail(self, path: str, error: BaseException, doing: str):
        backends, self.backends = self.backends, []
        for other in backends:  # close what is open; the one failed again on its buffered data: nothing more to say
            try:
                other.close()
            except Exception:  # noqa: BLE001
                pass
        reason = "no space left on the device" if storage.is_disk_full(error) else storage.first_line(error)
        raise WriterError(f"{doing} to {path} failed ({reason})", self.workdir) from None


def wandb_from_config(config) -> tuple["WandbSettings", Optional[dict]]:
    """(W&B settings, the flattened config to store with the run, or None when W&B is off)."""
    settings = WandbSettings.from_config(config)
    flat = flatten(config.to_dict()) if settings.project and hasattr(config, "to_dict") else None
    return settings, flat


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (tuples as lists): a config as one level of JSON-ready fields."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


class Profiler:
    """`config.profile_steps = "START:STOP"`: a `jax.profiler` trace of steps START..STOP (1-based, inclusive) into
    WORKDIR/profile (open with xprof or TensorBoard's profile plugin). Process 0 only; "" disables it."""

    def __init__(self, workdir: str, steps: str = ""):
        self.directory = os.path.join(workdir, PROFILE_DIR)
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
