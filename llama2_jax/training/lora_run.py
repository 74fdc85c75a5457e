"""LoRA (Hu et al. 2021) runs of train.sft, train.reward, train.dpo and pretraining from init_from: adapters (and a
reward model's score head) trained on a frozen base. `training.initial_state.init_state` chooses this or full
training from config.lora.rank; the workdir's lora_config.json (recording the base) is written by `training.setup`.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from llama2_jax.checkpoints import params_io
from llama2_jax.model import lora
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import LORA, abstract_params
from llama2_jax.training import state as train_state
from llama2_jax.training.checks import ConfigError


def lora_config(config) -> Optional[lora.LoraConfig]:
    """config.lora as a LoraConfig, or None when config.lora.rank = 0 (off). One-line ConfigErrors."""
    fields = config.get("lora")
    if fields is None or fields.rank == 0:
        return None
    try:
        lora_cfg = lora.LoraConfig(rank=fields.rank, alpha=fields.alpha, dropout=fields.dropout,
                                   targets=fields.targets, dtype=fields.dtype)
    except ValueError as error:
        raise ConfigError(f"config.lora: {error}") from None
    if not config.init_from:
        raise ConfigError("config.lora.rank > 0 needs config.init_from: the base the adapters are trained on")
    return lora_cfg


def init_lora_state(config, model_cfg: LlamaConfig, mesh, tx, lora_cfg: lora.LoraConfig, *, kind: str = "llama",
                    head_init_std: float = score_model.DEFAULT_HEAD_INIT_STD) -> train_state.Trainable:
    """The base from config.init_from onto its shardings (frozen), then `lora_run` (kind="score": a reward model's
    trunk and head); prints the trainable / total parameter counts."""
    frozen_shardings = sh.tree_shardings(abstract_params(model_cfg, boxed=True), mesh)
    try:
        frozen, _ = params_io.load_params(config.init_from, model_cfg, shardings=frozen_shardings)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.init_from: {error}") from None
    run = lora_run(frozen, frozen_shardings, model_cfg, mesh, tx, lora_cfg, seed=config.seed, kind=kind,
                   head_init_std=head_init_std)
    if jax.process_index() == 0:
        print(lora.describe(run.state.params, {k: v for k, v in run.frozen.items() if k not in run.state.params}))
    return run


def lora_run(frozen, frozen_shardings, model_cfg: LlamaConfig, mesh, tx, lora_cfg: lora.LoraConfig, *, seed: int,
             kind: str = "llama",
             head_init_std: float = score_model.DEFAULT_HEAD_INIT_STD) -> train_state.Trainable:
    """Fresh adapters for the sharded Llama params `frozen` in a sharded TrainState over {"lora": adapters} (the
    trained tree); kind="score": no `output`, and a fresh float32 score head trained too (frozen keeps its initial
    copy, replaced in every forward)."""
    rng = jax.random.PRNGKey(seed)
    trainable = {LORA: lora.init(rng, frozen, model_cfg, lora_cfg)}
    boxed = {LORA: lora.abstract(frozen, model_cfg, lora_cfg, boxed=True)}
    if kind == "score":
        frozen = {k: v for k, v in frozen.items() if k != "output"}
        frozen_shardings = {k: v for k, v in frozen_shardings.items() if k != "output"}
        head = score_model.init_score_params_from_llama(frozen, jax.random.fold_in(rng, 1), head_init_std)
        trainable[score_model.HEAD] = jax.tree.map(lambda x: np.asarray(x, np.float32), head[score_model.HEAD])
        boxed[score_model.HEAD] = score_model.abstract_score_params(model_cfg, boxed=True)[score_model.HEAD]
        frozen_shardings[score_model.HEAD] = jax.tree.map(lambda _: sh.replicated(mesh), head[score_model.HEAD])
        frozen[score_model.HEAD] = jax.device_put(head[score_model.HEAD], frozen_shardings[score_model.HEAD])
    shardings = train_state.state_shardings(boxed, tx, mesh)
    state = train_state.state_from_params(trainable, tx, shardings)
    return train_state.Trainable(state, shardings, frozen, frozen_shardings, lora_cfg)
