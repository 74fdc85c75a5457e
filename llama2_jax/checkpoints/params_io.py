"""Params-only checkpoints in the "jax" format: Orbax arrays plus the `LlamaConfig` as JSON.

Two layouts are read:

  converted dir (written by `save_params`, e.g. by `python -m llama2_jax.convert --to=jax`)
      PATH/llama_config.json
      PATH/params/                      Orbax PyTree checkpoint, always UNROLLED (layers_0 … layers_{L-1})
  trainer workdir (written by the trainers' Orbax CheckpointManager, item "params")
      PATH/llama_config.json
      PATH/checkpoints/<step>/params/   unrolled or scanned (`layers` with a leading [L] axis); latest step wins
                                        (a step whose files do not read is skipped with a one-line warning)

`load_params` returns the params in the layout its config asks for (`scan_layers`), restored straight into the
given shardings (so a large model never lands on one device) or, without shardings, as numpy arrays in host memory.
Both layouts hold either a Llama (`kind="llama"`: trunk + `output`) or a score-head model (`kind="score"`: trunk +
`score_head`, the reward and value models of `score_model.py`, written by `train.reward` and `train.ppo`).

LoRA dirs hold the adapters apart from the base (lora.py) and record the base they were trained on:
      PATH/lora_config.json             {"lora": LoraConfig fields, "base": the base checkpoint's path}
      PATH/llama_config.json
      PATH/lora/  or  PATH/checkpoints/<step>/lora/    Orbax adapter tree (saved dir / trainer workdir)
`load_params` on a LoRA dir loads the recorded base and returns it merged (W + alpha/r a b), so everything that
loads params (generation, chat, evaluation, init_from) accepts a LoRA dir; `load_adapters` reads the adapters alone.
A LoRA reward-model workdir (kind="score") also holds its trained score head, `checkpoints/<step>/head/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.checkpoints import storage
from llama2_jax.checkpoints.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    HEAD_ITEM,
    LORA_CONFIG_FILE,
    LORA_ITEM,
    PARAMS_ITEM,
    UnreadableCheckpoint,
)
from llama2_jax.model import lora
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import abstract_params, unstack_layers

SCANNED_KEY = "layers"  # the scanned blocks' key; unrolled blocks are layers_{i}
KINDS = ("llama", "score")  # what a checkpoint holds: a Llama, or a score-head model (reward / value)

Params = dict


def _as_path(path) -> epath.Path:
    """epath (local or gs://); local paths made absolute, as Orbax requires."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _flatten(tree) -> dict[str, Any]:
    """{"layers_0/attention/wq": leaf, ...} for a nested dict of arrays (or array metadata)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{sub}": leaf for sub, leaf in _flatten(value).items()})
        else:
            flat[str(key)] = value
    return flat


def _is_scanned(tree) -> bool:
    return SCANNED_KEY in tree


# --------------------------------------------------------------------------------------------------------- save


def _write_item(path: epath.Path, name: str, tree: Params, overwrite: bool) -> None:
    """Orbax-save `tree` as `path/name` (refusing to replace an existing item unless `overwrite`)."""
    item_dir = path / name
    if item_dir.exists() and not overwrite:
        raise FileExistsError(f"{item_dir} already exists; pass overwrite=True or pick another path")
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(item_dir, tree, force=overwrite)


def save_params(path, params: Params, config: LlamaConfig, *, overwrite: bool = False) -> None:
    """Write `path/params/` (Orbax, unrolled layout) and `path/llama_config.json`.

    Args:
      path: destination directory (local or gs://).
      params: the Llama param tree, unrolled or scanned (scanned params are unrolled before saving); jax arrays
        (sharded ones are written by every host in parallel) or numpy arrays.
      config: the model's config; its shapes are checked against `params`.
      overwrite: replace an existing `path/params/`.
    """
    path = _as_path(path)
    params = nn.unbox(params)
    if _is_scanned(params):
        params = unstack_layers(params, config.n_layers)
    shapes = {name: tuple(np.shape(leaf)) for name, leaf in _flatten(params).items()}
    _check_shapes(shapes, _expected_shapes(config, scanned=False), f"params given to save_params({path})",
                  "the params", "the config")
    _write_item(path, PARAMS_ITEM, params, overwrite)
    write_config(path, config)


def write_config(path, config: LlamaConfig) -> None:
    """`path/llama_config.json` (process 0): with it a trainer workdir loads like a converted checkpoint."""
    if jax.process_index() == 0:
        path = _as_path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------- load


def load_config(path) -> LlamaConfig:
    """The `LlamaConfig` stored in a converted dir or a trainer workdir."""
    config_file = _as_path(path) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: {path} is not a jax-format checkpoint or trainer workdir")
    return LlamaConfig.from_dict(json.loads(config_file.read_text()))


def find_params_dir(path, item: str = PARAMS_ITEM) -> epath.Path:
    """The Orbax item (default params) of a converted dir (`path/<item>`) or a trainer workdir (latest
    `path/checkpoints/<step>/<item>`)."""
    return _item_dirs(path, item)[0]


def _item_dirs(path, item: str = PARAMS_ITEM) -> list[epath.Path]:
    """[path/<item>] for a converted dir; every finished step's item of a trainer workdir, newest first."""
    root = _as_path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (root / item).is_dir() and (root / CONFIG_FILE).exists():
        return [root / item]
    if (root / CHECKPOINTS_DIR).is_dir() and (root / CONFIG_FILE).exists():
        steps = _finished_steps(root / CHECKPOINTS_DIR, item)
        if not steps:
            raise FileNotFoundError(f"trainer workdir {path} has no finished checkpoint with a '{item}' item "
                                    f"under {root / CHECKPOINTS_DIR}")
        return [root / CHECKPOINTS_DIR / steps[step] / item for step in sorted(steps, reverse=True)]
    raise ValueError(f"{path} is neither a converted checkpoint ({CONFIG_FILE} + {item}/) nor a trainer workdir "
                     f"({CONFIG_FILE} + {CHECKPOINTS_DIR}/<step>/{item}/)")


class _MissingItemMetadata(logging.Filter):
    """Reading one item of a CheckpointManager step (`checkpoints/<step>/params`) or a `save_params` dir with a
    PyTreeCheckpointer makes Orbax warn that the item has no _CHECKPOINT_METADATA file: that file is written per
    step, not per item, so the warning is expected and only reads as a broken checkpoint."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Metadata file does not exist") and "_CHECKPOINT_METADATA" in message)


@contextlib.contextmanager
def _reading(item_dir: epath.Path):
    """Read an Orbax item: the expected missing-metadata warning is dropped, and a read failure becomes one line."""
    logger, quiet = logging.getLogger("absl"), _MissingItemMetadata()
    logger.addFilter(quiet)
    storage.drop_closed_loop_callbacks()  # before the read: its late callbacks may come while the error propagates
    try:
        yield
    except Exception as error:  # noqa: BLE001 - TensorStore reports a cut or corrupt file as ValueError and others
        raise UnreadableCheckpoint(str(item_dir), error) from None
    finally:
        logger.removeFilter(quiet)


def _finished_steps(checkpoints_dir: epath.Path, item: str = PARAMS_ITEM) -> dict[int, str]:
    """{step: dir name} of finalized steps (Orbax's in-progress dirs carry a non-numeric suffix)."""
    steps = {}
    for child in checkpoints_dir.iterdir():
        if child.name.isdigit() and (child / item).is_dir():
            steps[int(child.name)] = child.name
    return steps


def load_params(path, config: Optional[LlamaConfig] = None, shardings: Any = None, *,
                kind: str = "llama") -> tuple[Params, LlamaConfig]:
    """Restore params from a converted dir or a trainer workdir (latest step).

    Args:
      path: see the module docstring for the two layouts.
      config: the model the params are for (default: the stored `llama_config.json`). Its `scan_layers` picks the
        returned layout (stacked `layers` [L, ...] or `layers_{i}`) and its `param_dtype` the returned dtype; its
        shapes must match the checkpoint.
      shardings: optional pytree of `NamedSharding` in the returned layout (e.g. `tree_shardings(abstract_params(
        config, boxed=True), mesh)`); arrays are then read shard by shard straight onto their devices. Without it the
        params come back as numpy arrays in host memory.
      kind: "llama" (trunk + `output`) or "score" (trunk + `score_head`: a reward or value model).

    Returns:
      (params, config). For a LoRA dir: the recorded base merged with the adapters (see the module docstring).
    """
    if is_lora_dir(path):
        return _load_merged(path, config, shardings, kind)
    item_dirs = _item_dirs(path)
    config = config or load_config(path)
    for i, item_dir in enumerate(item_dirs):
        try:
            params = _load_item(item_dir, config, shardings, kind)
        except UnreadableCheckpoint as error:
            if i + 1 == len(item_dirs):
                raise
            logging.getLogger(__name__).warning("%s; loading the older %s instead", error, item_dirs[i + 1].parent)
            continue
        return params, config
    raise AssertionError("unreachable: _item_dirs returns at least one dir")


def _load_item(item_dir: epath.Path, config: LlamaConfig, shardings: Any, kind: str) -> Params:
    """The params of one Orbax item in the layout and dtype of `config`."""
    stored_scanned = _check_item(item_dir, config, kind)
    stored_shardings = None
    if shardings is not None:
        stored_shardings = _shardings_for_layout(shardings, config.n_layers, stored_scanned)
    params = _restore(item_dir, _abstract(config.replace(scan_layers=stored_scanned), kind),
                      jnp.dtype(config.param_dtype), stored_shardings)
    if stored_scanned and not config.scan_layers:
        params = _unstack(params, config.n_layers, shardings)
    elif config.scan_layers and not stored_scanned:
        params = _stack(params, config.n_layers, shardings)
    return params


def check_params(path, config: LlamaConfig, *, kind: str = "llama") -> bool:
    """Raises a one-line ValueError naming both shapes unless the stored params (read from the Orbax metadata only)
    are those of `config`'s model of this kind. Returns whether they are stored scanned."""
    return _check_item(find_params_dir(path), config, kind)


def _check_item(item_dir: epath.Path, config: LlamaConfig, kind: str) -> bool:
    stored = _stored_shapes(item_dir)
    stored_scanned = any(name.startswith(SCANNED_KEY + "/") for name in stored)
    _check_shapes(stored, _expected_shapes(config, scanned=stored_scanned, kind=kind), f"checkpoint {item_dir}",
                  "the checkpoint", "the config")
    return stored_scanned


def _abstract(config: LlamaConfig, kind: str) -> Params:
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r}, expected one of {', '.join(KINDS)}")
    return abstract_params(config) if kind == "llama" else score_model.abstract_score_params(config)
# --------------------------------------------------------------------------------------------------------- LoRA


def is_lora_dir(path) -> bool:
    return (_as_path(path) / LORA_CONFIG_FILE).exists()


def write_lora_config(path, lora_cfg: "lora.LoraConfig", base_path) -> None:
    """`path/lora_config.json`: the LoRA hyperparameters and the base checkpoint (absolute path when local)."""
    base = os.fspath(base_path)
    base = base if "://" in base else os.path.abspath(base)
    if jax.process_index() == 0:
        path = _as_path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / LORA_CONFIG_FILE).write_text(json.dumps({"lora": lora_cfg.to_dict(), "base": base}, indent=2) + "\n")


def load_lora_config(path) -> tuple["lora.LoraConfig", str]:
    """(LoraConfig, base checkpoint path) recorded in a LoRA dir."""
    config_file = _as_path(path) / LORA_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: {path} is not a LoRA checkpoint or workdir")
    record = json.loads(config_file.read_text())
    if not isinstance(record, dict) or not {"lora", "base"} <= set(record):
        raise ValueError(f"{config_file}: expected an object with keys 'lora' and 'base'")
    return lora.LoraConfig.from_dict(record["lora"]), record["base"]


def save_adapters(path, adapters: Params, config: LlamaConfig, lora_cfg: "lora.LoraConfig", base_path, *,
                  overwrite: bool = False) -> None:
    """Write a LoRA dir: `path/lora/` (Orbax, unrolled layout), `path/lora_config.json` (recording `base_path`) and
    `path/llama_config.json`. The base itself is not copied."""
    path = _as_path(path)
    adapters = lora.to_layout(nn.unbox(adapters), config.n_layers, scanned=False)
    expected = lora.abstract(abstract_params(config.replace(scan_layers=False)), config, lora_cfg)
    _check_shapes({n: tuple(np.shape(a)) for n, a in _flatten(adapters).items()},
                  {n: tuple(a.shape) for n, a in _flatten(expected).items()},
                  f"adapters given to save_adapters({path})", "the adapters", "the LoRA config")
    _write_item(path, LORA_ITEM, adapters, overwrite)
    write_lora_config(path, lora_cfg, base_path)
    write_config(path, config)


def load_adapters(path, config: Optional[LlamaConfig] = None) -> tuple[Params, "lora.LoraConfig", LlamaConfig]:
    """(adapters as host numpy arrays in `config`'s layout, their LoraConfig, config) from a LoRA dir (a saved
    dir or the latest step of a trainer workdir)."""
    lora_cfg, _ = load_lora_config(path)
    config = config or load_config(path)
    item_dir = find_params_dir(path, LORA_ITEM)
    stored = _stored_shapes(item_dir)
    scanned = any(name.startswith(SCANNED_KEY + "/") for name in stored)
    expected = lora.abstract(abstract_params(config.replace(scan_layers=scanned)), config, lora_cfg)
    _check_shapes(stored, {n: tuple(a.shape) for n, a in _flatten(expected).items()}, f"adapters {item_dir}",
                  "the checkpoint", f"{LORA_CONFIG_FILE} and {CONFIG_FILE}")
    adapters = _restore(item_dir, expected, jnp.dtype(lora_cfg.dtype), None)
    return lora.to_layout(adapters, config.n_layers, config.scan_layers), lora_cfg, config


def _load_merged(path, config: Optional[LlamaConfig], shardings: Any, kind: str = "llama"
                 ) -> tuple[Params, LlamaConfig]:
    """The base recorded in a LoRA dir, merged with its adapters (in `shardings` when given). kind="score" (a
    LoRA reward model, train.reward): the base Llama's trunk, merged, with the dir's trained score head."""
    _, base_path = load_lora_config(path)
    config = config or load_config(path)
    if "://" not in base_path and not os.path.exists(base_path):
        raise FileNotFoundError(f"the base checkpoint {base_path} recorded in {_as_path(path) / LORA_CONFIG_FILE} "
                                f"does not exist")
    adapters, lora_cfg, _ = load_adapters(path, config)
    if kind == "score":
        return _load_merged_score(path, base_path, config, adapters, lora_cfg, shardings), config
    base, _ = load_params(base_path, config, shardings)
    if shardings is None:
        return lora.merge(base, adapters, lora_cfg), config
    merge = jax.jit(lambda b, a: lora.merge(b, a, lora_cfg), out_shardings=shardings, donate_argnums=0)
    return merge(base, adapters), config


def _load_merged_score(path, base_path, config: LlamaConfig, adapters: Params, lora_cfg, shardings: Any) -> Params:
    """Trunk of the base Llama + adapters merged, and the score head stored in the LoRA dir's `head` item."""
    llama_shardings = None
    if shardings is not None:  # the base's `output` needs a sharding too: the same mesh, by its logical axes
        mesh = jax.tree.leaves(shardings)[0].mesh
        llama_shardings = sh.tree_shardings(abstract_params(config, boxed=True), mesh)
    base, _ = load_params(base_path, config, llama_shardings)
    trunk = {k: v for k, v in base.items() if k != "output"}
    head_abstract = {score_model.HEAD: score_model.abstract_score_params(config)[score_model.HEAD]}
    head = _restore(find_params_dir(path, HEAD_ITEM), head_abstract, jnp.dtype(config.param_dtype),
                    None if shardings is None else {score_model.HEAD: shardings[score_model.HEAD]})
    if shardings is None:
        return {**lora.merge(trunk, adapters, lora_cfg), **head}
    trunk_shardings = {k: v for k, v in shardings.items() if k != score_model.HEAD}
    merged = jax.jit(lambda b, a: lora.merge(b, a, lora_cfg), out_shardings=trunk_shardings, donate_argnums=0)
    return {**merged(trunk, adapters), **head}


def _stored_shapes(item_dir: epath.Path) -> dict[str, tuple]:
    """{flat name: shape} from the Orbax metadata (nothing is read but the metadata)."""
    with _reading(item_dir), ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(item_dir)
    metadata = getattr(metadata, "item_metadata", metadata)  # StepMetadata (new Orbax) or the tree (old)
    metadata = getattr(metadata, "tree", metadata)
    return {name: tuple(leaf.shape) for name, leaf in _flatten(dict(metadata)).items()}


def _expected_shapes(config: LlamaConfig, scanned: bool, kind: str = "llama") -> dict[str, tuple]:
    return {name: tuple(leaf.shape) for name, leaf in _flatten(_abstract(config.replace(scan_layers=scanned),
                                                                           kind)).items()}


def _check_shapes(actual: dict, expected: dict, where: str, actual_name: str, expected_name: str) -> None:
    """One-line error naming the first missing/unexpected tensor or shape difference."""
    missing, unexpected = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            raise ValueError(f"{where} does not match the config: {name} has shape {tuple(actual[name])} in "
                             f"{actual_name} but {tuple(shape)} in {expected_name}")


def _restore(item_dir: epath.Path, abstract: Params, dtype, shardings: Any) -> Params:
    """Read every array as `dtype`: onto `shardings` when given, else into host numpy arrays."""
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), abstract)
    else:
        restore_args = jax.tree.map(
            lambda leaf, sharding: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=dtype),
            abstract, shardings)
    item = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), abstract)
    with _reading(item_dir), ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))


# ------------------------------------------------------------------------------------- layout (scanned/unrolled)


def _shardings_for_layout(shardings: Params, n_layers: int, scanned: bool) -> Params:
    """Shardings given for the target layout -> the same shardings for the stored layout (adds or drops the
    replicated leading [L] axis of the stacked blocks)."""
    shardings = dict(shardings)
    if scanned and SCANNED_KEY not in shardings:
        per_layer = shardings.pop("layers_0")
        for i in range(1, n_layers):
            shardings.pop(f"layers_{i}")
        shardings[SCANNED_KEY] = jax.tree.map(
            lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), per_layer)
    elif not scanned and SCANNED_KEY in shardings:
        per_layer = jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])),
                                 shardings.pop(SCANNED_KEY))
        shardings.update({f"layers_{i}": per_layer for i in range(n_layers)})
    return shardings


def _stack(params: Params, n_layers: int, shardings: Any) -> Params:
    """layers_{i} -> `layers` [L, ...], one parameter kind at a time so at most one kind is held twice."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(n_layers)]
    treedef = jax.tree.structure(layers[0])
    columns = list(zip(*(jax.tree.leaves(layer) for layer in layers)))  # one tuple of L arrays per kind
    del layers
    out_shardings = None if shardings is None else jax.tree.leaves(shardings[SCANNED_KEY])
    stacked = []
    for j in range(len(columns)):
        pieces, columns[j] = columns[j], None
        if out_shardings is None:
            stacked.append(np.stack(pieces))
        else:
            stacked.append(jax.jit(lambda *xs: jnp.stack(xs), out_shardings=out_shardings[j])(*pieces))
        del pieces
    params[SCANNED_KEY] = jax.tree.unflatten(treedef, stacked)
    return params


def _unstack(params: Params, n_layers: int, shardings: Any) -> Params:
    """`layers` [L, ...] -> layers_{i}, one parameter kind at a time."""
    params = dict(params)
    stacked = params.pop(SCANNED_KEY)
    treedef = jax.tree.structure(stacked)
    kinds = jax.tree.leaves(stacked)
    del stacked
    out_shardings = None if shardings is None else jax.tree.leaves(shardings["layers_0"])
    columns = []
    for j in range(len(kinds)):
        full, kinds[j] = kinds[j], None
        if out_shardings is None:
            columns.append([np.asarray(full[i]) for i in range(n_layers)])
        else:
            split = jax.jit(lambda x: tuple(x[i] for i in range(n_layers)),
                            out_shardings=(out_shardings[j],) * n_layers)
            columns.append(list(split(full)))
        del full
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.unflatten(treedef, [column[i] for column in columns])
    return params
