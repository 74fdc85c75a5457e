"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> pathlib.Path:
    """Path to a file in ../shared/data, or skip the test (with the reason) where it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def llama_tokenizer_path() -> pathlib.Path:
    return shared_file("llama2-tokenizer.model")


def random_llama_params(cfg, seed: int = 0, std: float = 0.05):
    """Random Llama params made with numpy from the abstract shapes (norm gains 1): no compiled init, which is slow
    on CPU."""
    import jax
    import numpy as np

    from llama2_jax.model.llama import abstract_params

    rng = np.random.default_rng(seed)

    def make(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(leaf.shape, leaf.dtype)
        return (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, abstract_params(cfg))


def alpaca_subset(tmp_path, n: int = 240, vocab_size: int = 512):
    """The first `n` Alpaca records of ../shared/data as a file in tmp_path, and a SentencePiece tokenizer trained on
    them (with the chat tags): (data path, Tokenizer). Skips where ../shared/data is absent."""
    import json

    from llama2_jax.text.tokenizer import train_tokenizer

    records = json.loads(shared_file("alpaca-cleaned-first1000.json").read_text())[:n]
    data_path = tmp_path / "alpaca.json"
    data_path.write_text(json.dumps(records))
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in records] + ["[INST] <<SYS>> [/INST]"]
    return data_path, train_tokenizer(texts, tmp_path / "tok", vocab_size=vocab_size, num_threads=1)
