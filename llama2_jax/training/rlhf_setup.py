"""RLHF set-up shared by rejection sampling and PPO: the prompt set and the reward models of a config."""

from __future__ import annotations

import functools
from typing import Any

import jax

from llama2_jax.checkpoints import params_io as param_checkpoint
from llama2_jax.data import prompts as prompt_data
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.model_config import model_config, model_config_from


def load_prompts(config, tokenizer) -> tuple[list[prompt_data.Prompt], list[list[int]]]:
    """The prompts of config.prompts (see `llama2_jax.data.prompts.load_prompts`) and their chat encodings."""
    p = config.prompts
    try:
        return prompt_data.load_prompts(p.path, tokenizer, max_prompt_len=p.max_prompt_len, format=p.format,
                                        on_error=p.on_error, is_safety=p.is_safety, max_prompts=p.max_prompts)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.prompts: {error}") from None


def sigmoid_reward(params, tokens, lengths, *, cfg: LlamaConfig):
    """A reward model's score in [0, 1] (`rlhf.ScoreFn` once cfg is bound)."""
    return jax.nn.sigmoid(score_model.score_tokens(params, cfg, tokens, lengths))


def load_score_params(path: str, cfg: LlamaConfig, shardings, field: str):
    """The params of a score-model checkpoint or workdir (train.reward, PPO's value model) onto `shardings`."""
    try:
        return param_checkpoint.load_params(path, cfg, shardings=shardings, kind="score")[0]
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{field}: {error}") from None


def load_reward_models(config, mesh, vocab_size: int) -> tuple[dict[str, rlhf.ScoreFn], dict[str, Any]]:
    """({name: sigmoid score fn}, {name: params sharded on the mesh}) for config.reward.helpful_path / safety_path
    (either may be empty, not both; one path given twice is loaded once). Numerics from config.model."""
    paths = {name: config.reward[f"{name}_path"] for name in rlhf.REWARD_NAMES if config.reward[f"{name}_path"]}
    if not paths:
        raise ConfigError("config.reward.helpful_path and config.reward.safety_path are both empty")
    numerics, fns, params, loaded = model_config(config), {}, {}, {}
    for name, path in paths.items():
        field = f"config.reward.{name}_path"
        cfg = model_config_from(path, numerics, field)
        if cfg.vocab_size != vocab_size:
            raise ConfigError(f"{field}: vocabulary {cfg.vocab_size} differs from the policy's {vocab_size} (the "
                              "reward models must share the policy's tokenizer)")
        if path not in loaded:
            shardings = sh.tree_shardings(score_model.abstract_score_params(cfg, boxed=True), mesh)
            loaded[path] = load_score_params(path, cfg, shardings, field)
        params[name] = loaded[path]
        fns[name] = functools.partial(sigmoid_reward, cfg=cfg)
    return fns, params
