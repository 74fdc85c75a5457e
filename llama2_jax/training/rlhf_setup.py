"""RLHF set-up shared by rejection sampling, PPO and context distillation: the prompt set and the reward models.

The RL trainers take their reward models as an argument (`train(config, workdir, rewards)`): `RewardCheckpoints()`
reads config.reward's checkpoints (what `python -m train.<trainer>` runs), a `Rewards` of stand-in functions serves
tests and experiments.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class Rewards:
    """Reward models as the RL trainers score with them: {name: fn(params, tokens [B, S], lengths [B]) -> sigmoid
    scores [B]} and {name: params}, names from `rlhf.REWARD_NAMES`. Already loaded (a stand-in, e.g. in tests): its
    `check` has nothing to check and `load` returns it."""
    fns: dict[str, rlhf.ScoreFn]
    params: dict[str, Any]

    def check(self, config, model_cfg: LlamaConfig) -> None:
        del config, model_cfg

    def load(self, config, mesh, model_cfg: LlamaConfig) -> "Rewards":
        del config, mesh, model_cfg
        return self


class RewardCheckpoints:
    """The reward models of config.reward.helpful_path / safety_path (train.reward workdirs): `check` before the
    run writes anything, `load` onto the mesh once it is set up."""

    @staticmethod
    def paths(config) -> dict[str, str]:
        paths = {name: config.reward[f"{name}_path"] for name in rlhf.REWARD_NAMES if config.reward[f"{name}_path"]}
        if not paths:
            raise ConfigError("config.reward.helpful_path and config.reward.safety_path are both empty")
        return paths

    def configs(self, config, vocab_size: int) -> dict[str, LlamaConfig]:
        """{name: the reward model's LlamaConfig} (numerics from config.model); same vocabulary as the policy."""
        numerics, configs = model_config(config), {}
        for name, path in self.paths(config).items():
            field = f"config.reward.{name}_path"
            configs[name] = model_config_from(path, numerics, field)
            if configs[name].vocab_size != vocab_size:
                raise ConfigError(f"{field}: vocabulary {configs[name].vocab_size} differs from the policy's "
                                  f"{vocab_size} (the reward models must share the policy's tokenizer)")
        return configs

    def check(self, config, model_cfg: LlamaConfig) -> None:
        self.configs(config, model_cfg.vocab_size)

    def load(self, config, mesh, model_cfg: LlamaConfig) -> Rewards:
        """Each model's params sharded on the mesh (one path given twice is loaded once)."""
        fns, params, loaded = {}, {}, {}
        for name, cfg in self.configs(config, model_cfg.vocab_size).items():
            path = config.reward[f"{name}_path"]
            if path not in loaded:
                shardings = sh.tree_shardings(score_model.abstract_score_params(cfg, boxed=True), mesh)
                loaded[path] = load_score_params(path, cfg, shardings, f"config.reward.{name}_path")
            params[name] = loaded[path]
            fns[name] = functools.partial(sigmoid_reward, cfg=cfg)
        return Rewards(fns, params)
