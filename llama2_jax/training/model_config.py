"""The model a trainer runs: config.model for a random init, or the architecture stored at init_from (or a reward
model's path) with config.model's numerics (`LlamaConfig.NUMERICS_FIELDS`). Errors are one-line ConfigErrors naming
the field."""

from __future__ import annotations

import logging
from typing import Optional

from llama2_jax.checkpoints import params_io as param_checkpoint
from llama2_jax.model.config import LlamaConfig
from llama2_jax.training.checks import ConfigError, check_attention_backend, check_shared_fields

_log = logging.getLogger(__name__)


def model_config(config) -> LlamaConfig:
    """config.model as a LlamaConfig (every field)."""
    try:
        return LlamaConfig.from_dict(config.model.to_dict())
    except ValueError as error:
        raise ConfigError(f"config.model: {error}") from None


def model_config_from(path: str, numerics: LlamaConfig, field: str) -> LlamaConfig:
    """The architecture stored at `path` (its llama_config.json) with the `LlamaConfig.NUMERICS_FIELDS` of
    `numerics`; errors name `field`."""
    try:
        return param_checkpoint.load_config(path).with_numerics(numerics)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{field}: {error}") from None


def resolve_model_config(config, seq_len: Optional[int] = None, *, required: bool = False) -> LlamaConfig:
    """config.model for a random init (init_from = ""); else init_from's architecture with config.model's numerics,
    max_seq_len (no parameter depends on it) raised to `seq_len` when that is longer, with a warning: RoPE
    positions past the checkpoint's context are then new to the model. `required`: init_from must be given. The
    shared fields are range-checked first (`check_shared_fields`)."""
    check_shared_fields(config)
    numerics = model_config(config)
    check_attention_backend(numerics.attention_impl, numerics.attention_interpret)
    if not config.init_from:
        if required:
            raise ConfigError("config.init_from is empty: pass the model to start from (for RLHF the policy: an SFT "
                              "or RLHF workdir or checkpoint dir)")
        return numerics
    model_cfg = model_config_from(config.init_from, numerics, "config.init_from")
    if seq_len is not None and seq_len > model_cfg.max_seq_len:
        _log.warning("config.seq_len %d exceeds the init_from model's max_seq_len %d: raising max_seq_len (RoPE "
                     "positions past %d are new to the model)", seq_len, model_cfg.max_seq_len, model_cfg.max_seq_len)
        model_cfg = model_cfg.replace(max_seq_len=seq_len)
    return model_cfg
