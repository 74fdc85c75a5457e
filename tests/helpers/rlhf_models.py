"""A tiny policy and reward model for the RLHF trainer tests: a SentencePiece tokenizer with the model's vocabulary,
cached random Llama params, and both saved in the layouts the trainers read (init_from and the reward models)."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.model import score as score_model
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text.tokenizer import train_tokenizer

CFG = LlamaConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                  dtype="float32")
WORDS = "the a cat dog safe help answer question please thanks why how what no yes sorry can you I".split()


def make_tokenizer(directory):
    """A SentencePiece tokenizer with CFG's vocabulary, trained on random sentences of WORDS (~1 s)."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) + f" {i}." for i in range(400)] + ["[INST] <<SYS>> [/INST]"]
    return train_tokenizer(texts, directory / "spm", CFG.vocab_size, num_threads=1)


@functools.lru_cache(maxsize=None)
def llama_params(cfg, seed):
    """Random Llama params (cached: initialising even a tiny model compiles for seconds on a loaded CPU)."""
    init = jax.jit(lambda rng: nn.unbox(Llama(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))
    return init(jax.random.PRNGKey(seed))


def save_policy(path, tokenizer, seed=0):
    checkpoint.save_params(path, llama_params(CFG, seed), CFG)
    (path / "tokenizer.model").write_bytes(open(tokenizer.model_path, "rb").read())
    return path


def save_reward_model(path, seed=1, head_init_std=0.5):
    """A random reward model in the layout train.reward writes (llama_config.json + params/)."""
    params = score_model.init_score_params_from_llama(llama_params(CFG, seed), jax.random.PRNGKey(seed), head_init_std)
    with ocp.StandardCheckpointer() as saver:
        saver.save((path / "params").absolute(), jax.device_get(params))
    (path / "llama_config.json").write_text(json.dumps(CFG.to_dict()))
    return path
