"""Training checkpoints: Orbax CheckpointManager over params, optimizer state and the rest (step, data-iterator
state) — async, the last few kept, exact resume.

Workdir layout (also read by `llama2_jax.checkpoint.load_params`, so any workdir can be an `init_from`):
    WORKDIR/llama_config.json
    WORKDIR/checkpoints/<step>/params/      float32 params (the model's layout: scanned or unrolled)
    WORKDIR/checkpoints/<step>/opt_state/   optimizer state
    WORKDIR/checkpoints/<step>/extra/       JSON: {"step": int, "data": data-iterator state}
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from llama2_jax.config import LlamaConfig
from train.state import TrainState

CONFIG_FILE = "llama_config.json"
_log = logging.getLogger(__name__)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class TrainCheckpointer:
    """Save/restore a TrainState and the data-iterator state in `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        warn_about_stray_entries(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "extra"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: Any, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        extra = {"step": step, "data": data_state}
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            extra=ocp.args.JsonSave(extra)))

    def restore(self, state: TrainState, shardings: TrainState, step: Optional[int] = None) -> tuple[TrainState, Any]:
        """Restore into the structure and shardings of `state` (arrays may be abstract). Returns (state, data
        state)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(state.params, shardings.params)),
            opt_state=ocp.args.StandardRestore(_abstract(state.opt_state, shardings.opt_state)),
            extra=ocp.args.JsonRestore()))
        extra = restored["extra"]
        new_state = state.replace(step=jax.device_put(jax.numpy.asarray(extra["step"], jax.numpy.int32),
                                                      shardings.step),
                                  params=restored["params"], opt_state=restored["opt_state"])
        return new_state, extra["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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


def write_model_config(workdir: str, config: LlamaConfig) -> None:
    """WORKDIR/llama_config.json, so the workdir can be loaded like a converted checkpoint."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
