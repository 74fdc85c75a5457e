"""A tiny PPO run: stand-in reward functions that prefer a visible property (response tokens from a fixed set) and the
config of a short run on the 8 simulated devices."""

import json

import jax
import jax.numpy as jnp

from configs import ppo_tiny
from helpers.rlhf_models import CFG, save_policy

TARGET = (jnp.arange(CFG.vocab_size) % 8) == 3  # the "visible property": 1 in 8 token ids


def prefers_target_tokens(params, tokens, lengths):
    """Stand-in reward model: sigmoid of the share of target tokens in prompt + response (params unused)."""
    real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    share = jnp.sum(TARGET[tokens] & real, axis=1) / lengths
    return jax.nn.sigmoid(8.0 * share - 2.0)


def constant_safety(params, tokens, lengths):
    return jnp.full(tokens.shape[:1], 0.9)  # >= 0.15 and no prompt tagged: the combined score is the helpful one


def write_prompts(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"why the cat {i}", "is_safety": False}) + "\n")
    return path


def tiny_config(tmp_path, tokenizer):
    config = ppo_tiny.get_config()
    config.init_from = str(save_policy(tmp_path / "policy", tokenizer))
    config.prompts.path = str(write_prompts(tmp_path / "prompts.jsonl", 20))
    config.prompts.max_prompt_len, config.prompts.val_fraction = 24, 0.2
    config.sampling.max_gen_len = 16
    config.mesh.data, config.mesh.fsdp = -1, 1  # the 8 simulated devices, data parallel
    config.batch_size, config.minibatch_size, config.rollout_chunk_size = 32, 8, 16
    config.learning_rate, config.value.learning_rate, config.value.init_from = 1e-2, 3e-3, "policy"
    config.beta = 0.1  # a 2-layer random model drifts fast at this LR: a firmer leash than the 7B's 0.01
    config.iterations, config.eval_every_iterations, config.checkpoint_every_iterations = 12, 6, 6
    config.async_checkpoints = False
    return config
