"""Training checkpoints: Orbax CheckpointManager over params, optimizer state and the rest (step, data-iterator
state) — async, the last few kept, exact resume.

Workdir layout (also read by `llama2_jax.checkpoint.load_params`, so any workdir can be an `init_from`):
    WORKDIR/llama_config.json
    WORKDIR/checkpoints/<step>/params/      float32 params (the model's layout: scanned or unrolled)
    WORKDIR/checkpoints/<step>/opt_state/   optimizer state
    WORKDIR/checkpoints/<step>/extra/       JSON: {"step": int, "data": data-iterator state}
A LoRA run (params = {"lora": adapters[, "score_head": ...]}) writes its trained tree apart from any base:
    WORKDIR/checkpoints/<step>/lora/        the adapters (read by `llama2_jax.checkpoint.load_adapters`)
    WORKDIR/checkpoints/<step>/head/        the other trained entries (a reward model's score head), if any
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
LORA_ITEM, HEAD_ITEM = "lora", "head"  # llama2_jax.model.LORA and llama2_jax.checkpoint.ADAPTERS_ITEM: "lora"


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
                                             item_names=("params", LORA_ITEM, HEAD_ITEM, "opt_state", "extra"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: Any, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        extra = {"step": step, "data": data_state}
        items = {name: ocp.args.StandardSave(tree) for name, tree in _param_items(state.params).items()}
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            **items, opt_state=ocp.args.StandardSave(state.opt_state), extra=ocp.args.JsonSave(extra)))

    def restore(self, state: TrainState, shardings: TrainState, step: Optional[int] = None) -> tuple[TrainState, Any]:
        """Restore into the structure and shardings of `state` (arrays may be abstract). Returns (state, data
        state)."""
        step = self.latest_step() if step is None else step
        abstract_items = _param_items(_abstract(state.params, shardings.params))
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **items, opt_state=ocp.args.StandardRestore(_abstract(state.opt_state, shardings.opt_state)),
            extra=ocp.args.JsonRestore()))
        extra = restored["extra"]
        params = restored["params"] if "params" in items else {
            LORA_ITEM: restored[LORA_ITEM], **(restored[HEAD_ITEM] if HEAD_ITEM in items else {})}
        new_state = state.replace(step=jax.device_put(jax.numpy.asarray(extra["step"], jax.numpy.int32),
                                                      shardings.step),
                                  params=params, opt_state=restored["opt_state"])
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
