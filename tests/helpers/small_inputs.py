"""Small inputs for the one-line-error tests: a SentencePiece tokenizer trained on a few sentences and a tiny
Llama with random weights made without compiling its init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text.tokenizer import Tokenizer, train_tokenizer

TEXTS = ["hello there, how are you today?", "I am fine, thank you very much.", "Once upon a time, in a land far "
         "away, there lived a king.", "[INST] <<SYS>> [/INST] The quick brown fox jumps over the lazy dog."] * 3
VOCAB = 300
BIG_VOCAB = 4096


def small_tokenizer(tmp_path) -> Tokenizer:
    if not (tmp_path / "tok.model").exists():
        train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=VOCAB, num_threads=1)
    return Tokenizer(tmp_path / "tok.model")


def tiny_model(vocab_size: int, max_seq_len: int = 32):
    cfg = LlamaConfig(vocab_size=vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, multiple_of=16,
                      max_seq_len=max_seq_len, dtype="float32", scan_layers=False)
    shapes = nn.unbox(jax.eval_shape(Llama(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(0)  # random weights without compiling the init (these tests never run the model)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.02, s.shape).astype(np.float32), shapes["params"]), cfg
