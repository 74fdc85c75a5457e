"""Tokenizer: Meta's Llama 2 model (when ../shared/data has it) and training a small one with Llama 2's settings."""

import pytest
from sentencepiece import sentencepiece_model_pb2

from llama2_jax.data.sources import default_corpus
from llama2_jax.text.tokenizer import (
    LLAMA2_TRAINER_SPEC,
    Tokenizer,
    check_vocab,
    load_or_train_tokenizer,
    train_tokenizer,
)

SMALL_VOCAB = 512


def _model_proto(path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(path, "rb").read())
    return proto


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(default_corpus(), tmp_path_factory.mktemp("spm") / "small", SMALL_VOCAB)


def test_llama2_tokenizer_ids(llama_tokenizer_path):
    tok = Tokenizer(llama_tokenizer_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)
    ids = tok.encode("Hello world 12345")
    assert ids == [15043, 3186, 29871, 29896, 29906, 29941, 29946, 29945]
    assert tok.decode(ids) == "Hello world 12345"
    assert tok.encode("Hi", bos=True, eos=True) == [1] + tok.encode("Hi") + [2]


def test_trainer_spec_matches_meta_model(llama_tokenizer_path):
    """Every setting we train with is the one recorded in Meta's tokenizer.model."""
    proto = _model_proto(llama_tokenizer_path)
    for key, value in LLAMA2_TRAINER_SPEC.items():
        if key == "normalization_rule_name":
            assert proto.normalizer_spec.name == value
        elif key in ("add_dummy_prefix", "remove_extra_whitespaces"):
            assert getattr(proto.normalizer_spec, key) == value, key
        elif key == "model_type":
            assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        else:
            assert getattr(proto.trainer_spec, key) == pytest.approx(value), key


def test_trained_tokenizer_special_ids(small_tokenizer):
    tok = small_tokenizer
    assert (tok.vocab_size, tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (SMALL_VOCAB, 0, 1, 2, -1)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tok.sp.piece_to_id("<0x0A>") == 13 and tok.sp.piece_to_id("<0xFF>") == 258


def test_trained_tokenizer_splits_digits(small_tokenizer):
    pieces = small_tokenizer.sp.encode("12345", out_type=str)
    assert pieces == ["▁", "1", "2", "3", "4", "5"]


def test_trained_tokenizer_byte_fallback(small_tokenizer):
    text = "emoji 🦙 and 漢字"
    pieces = small_tokenizer.sp.encode(text, out_type=str)
    assert "<0xF0>" in pieces  # the llama emoji is not a piece: it falls back to its UTF-8 bytes
    assert small_tokenizer.sp.unk_id() not in small_tokenizer.encode(text)
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_trained_tokenizer_identity_normalization(small_tokenizer):
    proto = _model_proto(small_tokenizer.model_path)
    assert proto.normalizer_spec.name == "identity"
    assert proto.trainer_spec.split_digits and proto.trainer_spec.byte_fallback
    for text in ["ｆｕｌｌ width", "two  spaces\tand\nnewline ", "ﬁ ligature"]:  # NFKC would change each of these
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_load_or_train_caches(tmp_path):
    first = load_or_train_tokenizer(tmp_path, default_corpus(), SMALL_VOCAB)
    model_file = tmp_path / "tokenizer.model"
    stamp = model_file.stat().st_mtime_ns

    def corpus_must_not_be_read():
        raise AssertionError("the cached tokenizer should have been reused")
        yield  # pragma: no cover

    again = load_or_train_tokenizer(tmp_path, corpus_must_not_be_read(), SMALL_VOCAB)
    assert model_file.stat().st_mtime_ns == stamp
    assert again.encode("print(1)") == first.encode("print(1)")
    with pytest.raises(ValueError, match="has 512 pieces but vocab_size=1000"):
        load_or_train_tokenizer(tmp_path, default_corpus(), 1000)


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as err:
        train_tokenizer(default_corpus(), tmp_path / "tiny", 100)
    assert "vocab_size=100" in str(err.value) and "\n" not in str(err.value).strip()


def test_check_vocab(small_tokenizer):
    check_vocab(small_tokenizer, SMALL_VOCAB)
    with pytest.raises(ValueError) as err:
        check_vocab(small_tokenizer, 32000)
    message = str(err.value)
    assert "512" in message and "32000" in message and "\n" not in message
