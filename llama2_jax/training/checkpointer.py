"""Training checkpoints: Orbax CheckpointManager over params, optimizer state and the rest (step, data-iterator
state) — async, the last few kept, exact resume.

Workdir layout (also read by `llama2_jax.checkpoints.params_io.load_params`, so any workdir can be an `init_from`):
    WORKDIR/llama_config.json
    WORKDIR/checkpoints/<step>/params/      float32 params (the model's layout: scanned or unrolled)
    WORKDIR/checkpoints/<step>/opt_state/   optimizer state
    WORKDIR/checkpoints/<step>/extra/       JSON: {"step": int, "data": data-iterator state}
A LoRA run (params = {"lora": adapters[, "score_head": ...]}) writes its trained tree apart from any base:
    WORKDIR/checkpoints/<step>/lora/        the adapters (read by `llama2_jax.checkpoints.params_io.load_adapters`)
    WORKDIR/checkpoints/<step>/head/        the other trained entries (a reward model's score head), if any

Faults: a step that cannot be read (a file cut short by a kill or a full disk) is moved to
WORKDIR/unreadable_checkpoints/<step> with a one-line warning and the next older step is restored. An asynchronous
save that fails is noticed before the next save and at `wait`/`close`; a full disk stops the run with one line
(`CheckpointError`: "no space left on ..., last good checkpoint: step N") instead of Orbax's tracebacks, and so does
any other I/O error of a save (a read-only or failing disk: "saving checkpoint step N in DIR failed (the OS error
naming the file); last good checkpoint: ...").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from llama2_jax.checkpoints import storage
from llama2_jax.model.config import LlamaConfig
from llama2_jax.training.state import TrainState

CONFIG_FILE = "llama_config.json"
_log = logging.getLogger(__name__)
LORA_ITEM, HEAD_ITEM = "lora", "head"  # llama2_jax.model.llama.LORA and llama2_jax.checkpoints.params_io.ADAPTERS_ITEM: "lora"
UNREADABLE_DIR = "unreadable_checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line."""


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class UnreadableCheckpoint(CheckpointError):
    def __init__(self, directory: str, step: int, error: BaseException):
        super().__init__(f"checkpoint {directory}/{step} cannot be read ({storage.first_line(error)})")
        self.step = step


class TrainCheckpointer:
    """Save/restore a TrainState and the data-iterator state in `workdir/checkpoints`."""
    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        warn_about_stray_entries(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", LORA_ITEM, HEAD_ITEM, "opt_state", "extra"))
        self._pending: Optional[int] = None  # the step of an asynchronous save not yet known to have finished
        storage.drop_closed_loop_callbacks()  # a save failing on a full disk: one line, not one traceback per write

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _finished(self) -> None:
        """Wait for the pending save; a failure becomes one CheckpointError line."""
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - Orbax re-raises the background thread's error as it came
            self._raise_save_error(error, pending)

    def _raise_save_error(self, error: BaseException, step: Optional[int]):
        self.manager.reload()
        good = [s for s in self.all_steps() if s != step]
        last = f"last good checkpoint: step {max(good)}" if good else "no good checkpoint yet"
        if storage.is_disk_full(error):
            raise CheckpointError(f"no space left on the device of {self.directory} while saving step {step}; "
                                  f"{last}") from None
        raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed "
                              f"({storage.first_line(error)}); {last}") from None

    def save(self, state: TrainState, data_state: Any, *, force: bool = False) -> bool:
        self._finished()  # the previous asynchronous save must have succeeded before we go on
        step = int(jax.device_get(state.step))
        extra = {"step": step, "data": data_state}
        items = {name: ocp.args.StandardSave(tree) for name, tree in _param_items(state.params).items()}
        try:
            saved = self.manager.save(step, force=force, args=ocp.args.Composite(
                **items, opt_state=ocp.args.StandardSave(state.opt_state), extra=ocp.args.JsonSave(extra)))
        except Exception as error:  # noqa: BLE001 - a synchronous save fails here
            if not storage.is_io_error(error):
                raise  # a programming error (a bad tree) keeps its traceback
            self._raise_save_error(error, step)
        self._pending = step if saved else None
        return saved

    def restore_step(self, state: TrainState, shardings: TrainState, step: int) -> tuple[TrainState, Any]:
        """Restore `step` into the structure and shardings of `state` (arrays may be abstract). Returns (state, data
        state); raises `UnreadableCheckpoint` when the step's files cannot be read."""
        abstract_items = _param_items(_abstract(state.params, shardings.params))
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **items, opt_state=ocp.args.StandardRestore(_abstract(state.opt_state, shardings.opt_state)),
                extra=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001 - TensorStore reports a cut file as ValueError, others vary
            storage.drop_closed_loop_callbacks()
            raise UnreadableCheckpoint(self.directory, step, error) from None
        extra = restored["extra"]
        params = restored["params"] if "params" in items else {
            LORA_ITEM: restored[LORA_ITEM], **(restored[HEAD_ITEM] if HEAD_ITEM in items else {})}
        new_state = state.replace(step=jax.device_put(jax.numpy.asarray(extra["step"], jax.numpy.int32),
                                                      shardings.step),
                                  params=params, opt_state=restored["opt_state"])
        return new_state, extra["data"]

    def restore(self, state: TrainState, shardings: TrainState, step: Optional[int] = None) -> tuple[TrainState, Any]:
        """Restore `step`, or the newest readable step. Steps newer than the one restored that failed to read are set
        aside with a warning (an older step of the same structure read fine, so their files are damaged); when no
        step reads, nothing is moved and the newest step's error is raised. Returns (state, data state)."""
        if step is not None:
            return self.restore_step(state, shardings, step)
        failed = []
        for candidate in reversed(self.all_steps()):
            try:
                restored = self.restore_step(state, shardings, candidate)
            except UnreadableCheckpoint as error:
                failed.append(error)
                continue
            for error in failed:
                self.set_aside(error.step, str(error))
            return restored
        if failed:
            raise failed[0]
        raise CheckpointError(f"no checkpoint in {self.directory}")

    def set_aside(self, step: int, reason: str) -> None:
        """Move checkpoints/<step> to unreadable_checkpoints/<step> (kept for inspection, out of resume's way)."""
        target = os.path.join(self.workdir, UNREADABLE_DIR, str(step))
        logging.warning("%s: moved to %s; resuming from an older step", reason, target)
        if jax.process_index() == 0:
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()

    def wait(self) -> None:
        self._finished()

    def close(self) -> None:
        try:
            self._finished()
        finally:
            self.manager.close()


def warn_about_stray_entries(directory: str) -> list[str]:
    """Warn (one line) about entries of WORKDIR/checkpoints that are not step directories (e.g. a copied `backup/`):
    resume ignores them. Orbax's in-progress `<step>.orbax-checkpoint-tmp-*` dirs are not reported. Returns them."""
    if not os.path.isdir(directory):
        return []
    stray = sorted(name for name in os.listdir(directory)
                   if not name.isdigit() and not re.match(r"^\d+\.orbax-checkpoint-tmp", name))
    if stray:
        _log.warning("%s: ignoring %s (not step directories)", directory, ", ".join(map(repr, stray)))
    return stray
def _param_items(params: Any) -> dict[str, Any]:
    """{item name: tree}: {"params": params}, or for a LoRA run {"lora": adapters[, "head": the other entries]}."""
    if not isinstance(params, dict) or LORA_ITEM not in params:
        return {"params": params}
    head = {k: v for k, v in params.items() if k != LORA_ITEM}
    return {LORA_ITEM: params[LORA_ITEM], **({HEAD_ITEM: head} if head else {})}


def write_model_config(workdir: str, config: LlamaConfig) -> None:
    """WORKDIR/llama_config.json, so the workdir can be loaded like a converted checkpoint."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
