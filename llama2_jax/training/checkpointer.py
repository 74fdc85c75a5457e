"""Training checkpoints: Orbax CheckpointManager over params, optimizer state and the rest (loop step, data-iterator
state) — async, the last few kept, exact resume. The files are those of `llama2_jax.checkpoints.layout` (any
workdir is an init_from: `params_io.load_params` reads its newest `params`).

What is saved is the loop's state: a `TrainState` (items `params`, or `lora` [+ `head`] for a LoRA run, and
`opt_state`), or a `LoopState` of several models saved as ONE step (PPO: the policy as `params`/`opt_state`, the
value model as `value_params`/`value_opt_state`), so a kill leaves either the previous step or the new one, never one
model without the other. A `LoopState` without models (rejection sampling's iterations) saves only `extra`.

Faults: a step that cannot be read (a file cut short by a kill or a full disk) is moved to
WORKDIR/unreadable_checkpoints/<step> with a one-line warning and the next older step is restored. An asynchronous
save that fails is noticed before the next save and at `wait`/`close`; a full disk stops the run with one line
(`CheckpointError`: "no space left on ..., last good checkpoint: step N") instead of Orbax's tracebacks, and so does
any other I/O error of a save (a read-only or failing disk: "saving checkpoint step N in DIR failed (the OS error
naming the file); last good checkpoint: ...").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama2_jax.checkpoints import storage
from llama2_jax.checkpoints.layout import (
    CHECKPOINTS_DIR,
    EXTRA_ITEM,
    HEAD_ITEM,
    LORA_ITEM,
    OPT_STATE_ITEM,
    PARAMS_ITEM,
    UNREADABLE_DIR,
    CheckpointError,
    UnreadableCheckpoint,
    model_items,
)
from llama2_jax.training.state import LoopState, TrainState

_log = logging.getLogger(__name__)
State = TrainState | LoopState


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class TrainCheckpointer:
    """Save/restore the loop's state and the data-iterator state in `workdir/checkpoints`. `models`: the names of
    a `LoopState`'s further models (their items must be known to Orbax up front)."""
    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, models: tuple[str, ...] = ()):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
        warn_about_stray_entries(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        names = (PARAMS_ITEM, LORA_ITEM, HEAD_ITEM, OPT_STATE_ITEM, EXTRA_ITEM) + sum(map(model_items, models), ())
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=names)
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

    def save(self, state: State, data_state: Any, *, force: bool = False) -> bool:
        self._finished()  # the previous asynchronous save must have succeeded before we go on
        step = checkpoint_number(state)
        extra = {"step": _int(state.step), "data": data_state, **_model_steps(state)}
        args = {name: ocp.args.StandardSave(tree) for name, tree in _items(state).items()}
        try:
            saved = self.manager.save(step, force=force, args=ocp.args.Composite(
                **args, **{EXTRA_ITEM: ocp.args.JsonSave(extra)}))
        except Exception as error:  # noqa: BLE001 - a synchronous save fails here
            if not storage.is_io_error(error):
                raise  # a programming error (a bad tree) keeps its traceback
            self._raise_save_error(error, step)
        self._pending = step if saved else None
        return saved

    def restore_step(self, state: State, shardings: State, step: int) -> tuple[State, Any]:
        """Restore `step` into the structure and shardings of `state` (arrays may be abstract). Returns (state, data
        state); raises `UnreadableCheckpoint` when the step's files cannot be read."""
        abstract = _items(_abstract_state(state, shardings))
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **args, **{EXTRA_ITEM: ocp.args.JsonRestore()}))
        except Exception as error:  # noqa: BLE001 - TensorStore reports a cut file as ValueError, others vary
            storage.drop_closed_loop_callbacks()
            raise UnreadableCheckpoint(f"{self.directory}/{step}", error, step) from None
        extra = restored[EXTRA_ITEM]
        return _with_items(state, shardings, restored, extra), extra["data"]

    def restore(self, state: State, shardings: State, step: Optional[int] = None) -> tuple[State, Any]:
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


def _int(value) -> int:
    return int(jax.device_get(value))


def checkpoint_number(state: State) -> int:
    """The step directory a state is saved as: the optimizer steps of its (main) model, or the loop step."""
    if isinstance(state, LoopState) and state.main is not None:
        return _int(state.main.step)
    return _int(state.step)


def _model_steps(state: State) -> dict:
    """For a LoopState: {"model_steps": {"main" and each further model's name: optimizer steps}}."""
    if not isinstance(state, LoopState):
        return {}
    models = {**({"main": state.main} if state.main is not None else {}), **state.others}
    return {"model_steps": {name: _int(model.step) for name, model in models.items()}}


def _param_items(params: Any) -> dict[str, Any]:
    """{item name: tree}: {"params": params}, or for a LoRA run {"lora": adapters[, "head": the other entries]}."""
    if not isinstance(params, dict) or LORA_ITEM not in params:
        return {PARAMS_ITEM: params}
    head = {k: v for k, v in params.items() if k != LORA_ITEM}
    return {LORA_ITEM: params[LORA_ITEM], **({HEAD_ITEM: head} if head else {})}


def _items(state: State) -> dict[str, Any]:
    """{Orbax item: tree} of a state (see the module docstring)."""
    if isinstance(state, TrainState):
        return {**_param_items(state.params), OPT_STATE_ITEM: state.opt_state}
    items = _items(state.main) if state.main is not None else {}
    for name, model in state.others.items():
        params_item, opt_item = model_items(name)
        items.update({params_item: model.params, opt_item: model.opt_state})
    return items


def _abstract_state(state: State, shardings: State) -> State:
    """The state with every params and optimizer leaf as a ShapeDtypeStruct on its sharding."""
    if isinstance(state, TrainState):
        return state.replace(params=_abstract(state.params, shardings.params),
                             opt_state=_abstract(state.opt_state, shardings.opt_state))
    main = None if state.main is None else _abstract_state(state.main, shardings.main)
    return state.replace(main=main, others={name: _abstract_state(model, shardings.others[name])
                                            for name, model in state.others.items()})


def _restored_model(state: TrainState, shardings: TrainState, params: Any, opt_state: Any, step: int) -> TrainState:
    return state.replace(step=jax.device_put(np.asarray(step, np.int32), shardings.step), params=params,
                         opt_state=opt_state)


def _with_items(state: State, shardings: State, restored: Any, extra: dict) -> State:
    """`state` with what was restored in place of its params, optimizer states and step counters."""
    if isinstance(state, TrainState):
        names = _param_items(state.params)
        params = restored[PARAMS_ITEM] if PARAMS_ITEM in names else {
            LORA_ITEM: restored[LORA_ITEM], **(restored[HEAD_ITEM] if HEAD_ITEM in names else {})}
        return _restored_model(state, shardings, params, restored[OPT_STATE_ITEM], extra["step"])
    steps = extra["model_steps"]
    main = None
    if state.main is not None:
        main = _with_items(state.main, shardings.main, restored, {"step": steps["main"]})
    others = {}
    for name, model in state.others.items():
        params_item, opt_item = model_items(name)
        others[name] = _restored_model(model, shardings.others[name], restored[params_item], restored[opt_item],
                                       steps[name])
    step = np.asarray(extra["step"], np.int32)
    if getattr(shardings, "step", None) is not None:
        step = jax.device_put(step, shardings.step)
    return state.replace(step=step, main=main, others=others)
