"""Tokenizer export for HF (`convert --to=hf --tokenizer`): AutoTokenizer loads it and encodes exactly as
SentencePiece, on Meta's Llama 2 model (when ../shared/data has it) and on a small model trained here."""

import json

import pytest

transformers = pytest.importorskip("transformers", reason="the HF tokenizer export needs transformers")

from conftest import SHARED_DATA  # noqa: E402

from llama2_jax.checkpoints.params_io import save_params  # noqa: E402
from llama2_jax.cli import convert as convert_cli  # noqa: E402
from llama2_jax.data.sources import default_corpus  # noqa: E402
from llama2_jax.model.config import LlamaConfig  # noqa: E402
from llama2_jax.text import hf_tokenizer  # noqa: E402
from llama2_jax.text.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

EDGE_TEXTS = [
    "Hello world 12345", " leading space", "  two  spaces  ", "tabs\tand\nnew\n\nlines\n", "trailing ", "", " ",
    "héllo wörld ☃ 日本語 🙂", "Question: How do I boil an egg?\nAnswer: Put it in water.", "[INST] hi [/INST]",
    "x" * 40, "a1b2c3 3.14159 -7", "it's \"quoted\" (parens) {braces}",
]


def _texts() -> list[str]:
    """Edge cases, the CPython help topics, and PIQA and Shakespeare lines when ../shared/data has them."""
    texts = list(EDGE_TEXTS) + [doc[:2000] for doc in default_corpus()[:40]]
    piqa = SHARED_DATA / "piqa-valid-with-labels.jsonl"
    if piqa.is_file():
        for line in piqa.read_text().splitlines()[:300]:
            record = json.loads(line)
            texts += [record["goal"], " " + record["sol1"], record["goal"] + " " + record["sol2"]]
    shakespeare = SHARED_DATA / "tinyshakespeare.txt"
    if shakespeare.is_file():
        texts.append(shakespeare.read_text()[:20000])
    return texts


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return train_tokenizer(default_corpus(), tmp_path_factory.mktemp("spm") / "small", 512).model_path


def _check_same_encoding(model_path, dst):
    hf = transformers.AutoTokenizer.from_pretrained(dst)
    sp = Tokenizer(model_path)
    for text in _texts():
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf.encode(text) == [sp.bos_id] + ids, text[:80]  # BOS in front, as lm-eval's hf backend sees it
        assert hf.decode(ids) == sp.decode(ids), text[:80]
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, len(hf)) == (sp.bos_id, sp.eos_id, 0, sp.vocab_size)


def test_export_of_meta_tokenizer_encodes_like_sentencepiece(llama_tokenizer_path, tmp_path):
    hf_tokenizer.save_hf_tokenizer(llama_tokenizer_path, tmp_path, model_max_length=4096)
    _check_same_encoding(llama_tokenizer_path, tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == llama_tokenizer_path.read_bytes()


def test_export_of_trained_tokenizer_encodes_like_sentencepiece(small_model, tmp_path):
    hf_tokenizer.save_hf_tokenizer(small_model, tmp_path)
    _check_same_encoding(small_model, tmp_path)


def test_llama_tokenizer_vocab_file_is_the_trap(small_model):
    """Why the export builds its own tokenizer: transformers 5's LlamaTokenizer ignores vocab_file."""
    broken = transformers.LlamaTokenizer(vocab_file=small_model)
    if len(broken) != 3:
        pytest.skip("this transformers version builds LlamaTokenizer(vocab_file=...) correctly")
    assert broken.encode("Hello world", add_special_tokens=False) != Tokenizer(small_model).encode("Hello world")


def test_unsupported_sentencepiece_model_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(default_corpus()[:20]), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    with pytest.raises(ValueError, match="model_type is not BPE"):
        hf_tokenizer.build_hf_tokenizer(tmp_path / "uni.model")


def test_convert_cli_writes_tokenizer_with_the_weights(small_model, tmp_path, capsys):
    import jax
    import numpy as np

    from llama2_jax.model.llama import abstract_params

    cfg = LlamaConfig(vocab_size=512, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64)
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract_params(cfg))
    save_params(tmp_path / "jax", params, cfg)
    assert convert_cli.main(["--from=jax", "--to=hf", f"--src={tmp_path / 'jax'}", f"--dst={tmp_path / 'hf'}",
                         f"--tokenizer={small_model}"]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.encode(" Hello  world", add_special_tokens=False) == Tokenizer(small_model).encode(" Hello  world")
    assert hf.model_max_length == 64
    capsys.readouterr()
    assert convert_cli.main(["--from=jax", "--to=meta", f"--src={tmp_path / 'jax'}", f"--dst={tmp_path / 'meta'}",
                         f"--tokenizer={small_model}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --tokenizer=") and "only --to=hf exports a tokenizer" in err
    assert not (tmp_path / "meta").exists()  # refused before anything was written
