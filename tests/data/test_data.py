"""Data: sources, packing (exact arrays), and the Grain pretraining pipeline (determinism, state, sharding, eval).

Covers llama2_jax.data.sources, llama2_jax.data.packing and llama2_jax.data.pipeline."""

import json

import grain
import numpy as np
import pytest
from helpers.batches import assert_same_batches, take

from llama2_jax.data import packing, pipeline, sources
from llama2_jax.data.packing import pack_documents, pack_examples, unigram_entropy
from llama2_jax.text.tokenizer import train_tokenizer


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------- packing


def test_pack_two_documents_exact():
    batch = pack_documents([[1, 5, 6, 2], [1, 7, 2]], seq_len=8)
    np.testing.assert_array_equal(batch["inputs"], [[1, 5, 6, 2, 1, 7, 2, 0]])
    np.testing.assert_array_equal(batch["targets"], [[5, 6, 2, 0, 7, 2, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0, 1, 1, 0, 0]])
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
                      "loss_mask": np.float32}


def test_pack_long_document_is_split_with_one_token_overlap():
    batch = pack_documents([[1, 10, 11, 12, 13, 14, 2], [1, 20, 2]], seq_len=4)
    np.testing.assert_array_equal(batch["inputs"], [[1, 10, 11, 12], [12, 13, 14, 2], [1, 20, 2, 0]])
    np.testing.assert_array_equal(batch["targets"], [[10, 11, 12, 0], [13, 14, 2, 0], [20, 2, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])


def test_pack_does_not_start_a_one_token_piece():
    batch = pack_documents([[1, 5, 2], [1, 6, 2]], seq_len=4)
    np.testing.assert_array_equal(batch["inputs"], [[1, 5, 2, 0], [1, 6, 2, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 1, 1, 0]])


def test_pack_examples_uses_per_token_weights():
    # weights[i] is the weight of predicting tokens[i]: only the answer (4, 2) is learned.
    batch = pack_examples([([1, 3, 9, 4, 2], [0, 0, 0, 1, 1])], seq_len=6)
    np.testing.assert_array_equal(batch["targets"], [[3, 9, 4, 2, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="3 tokens but 2 loss weights"):
        pack_examples([([1, 2, 3], [1, 1])], seq_len=4)


def _pieces(batch):
    """The document pieces of packed rows, in order."""
    for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            yield inputs[seg == s].tolist()


@pytest.mark.parametrize("seq_len", [2, 3, 8, 64])
def test_pack_loses_no_token_and_counts_every_target_once(seq_len):
    rng = np.random.default_rng(0)
    docs = [[1, *rng.integers(3, 100, rng.integers(0, 40)).tolist(), 2] for _ in range(30)]
    batch = pack_documents(docs, seq_len)
    assert batch["inputs"].shape[1] == seq_len
    pieces = _pieces(batch)
    for doc in docs:  # rebuild every document from its pieces, dropping the one overlapping token
        rebuilt = next(pieces)
        while len(rebuilt) < len(doc):
            piece = next(pieces)
            assert piece[0] == rebuilt[-1]
            rebuilt += piece[1:]
        assert rebuilt == doc
    assert next(pieces, None) is None
    assert batch["loss_mask"].sum() == sum(len(d) - 1 for d in docs)
    real = batch["loss_mask"] > 0
    assert (batch["segment_ids"][real] > 0).all()


def test_unigram_entropy_nats():
    assert unigram_entropy([[0, 1], [2, 3]]) == pytest.approx(np.log(4))
    assert unigram_entropy([[7, 7, 7]]) == 0.0
    with pytest.raises(ValueError):
        unigram_entropy([[]])


# ----------------------------------------------------------------------------------------------------------- sources


def test_default_corpus_is_embedded_english():
    docs = sources.default_corpus()
    assert len(docs) > 50 and all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(map(len, docs)) > 300_000
    assert docs == sources.load_documents("default")
    assert any("statement" in d for d in docs)


def test_text_files_paragraphs_dirs_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n  \nsecond para\n\n\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third\r\n\r\nfourth")
    (tmp_path / "skip.md").write_text("not text")
    expected = ["first para\nline two", "second para", "third", "fourth"]
    assert sources.read_text_files(tmp_path) == expected
    assert sources.read_text_files(str(tmp_path / "**" / "*.txt")) == expected
    whole = sources.read_text_files(tmp_path / "a.txt", one_doc_per_file=True)
    assert whole == ["first para\nline two\n\n  \nsecond para\n\n\n"]
    assert sources.load_documents("text", [tmp_path / "sub" / "b.txt"]) == ["third", "fourth"]


def test_text_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        sources.read_text_files(tmp_path / "missing.txt")
    assert "missing.txt" in _one_line_error(err)
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(ValueError) as err:
        sources.read_text_files(tmp_path / "empty.txt")
    assert "empty.txt: file is empty" in _one_line_error(err)
    with pytest.raises(FileNotFoundError, match="glob pattern matches no files"):
        sources.read_text_files(str(tmp_path / "*.nothing"))


def test_jsonl_reads_the_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert sources.read_jsonl(path) == ["one", "two"]
    path.write_text('{"body": "x"}\n')
    assert sources.load_documents("jsonl", path, field="body") == ["x"]


@pytest.mark.parametrize(
    "bad_line, reason", [("{not json", "not valid JSON"), ('{"title": "x"}', "no 'text' field"), ('{"text": 3}', "int")]
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n' + bad_line + "\n")
    with pytest.raises(ValueError) as err:
        sources.read_jsonl(path)
    message = _one_line_error(err)
    assert f"{path}:3" in message and reason in message


def test_load_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'csv'"):
        sources.load_documents("csv", "x.csv")
    with pytest.raises(ValueError, match="needs a path"):
        sources.load_documents("jsonl")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="file is empty"):
        sources.load_documents("jsonl", tmp_path / "blank.jsonl")


# ---------------------------------------------------------------------------------------------------------- pipeline


class DocIdTokenizer:
    """Stands in for SentencePiece: document "i" becomes BOS, (i % 9 + 1) copies of token 10 + i, EOS.

    Every token then tells which document it came from, so tests can check which documents a batch holds.
    """

    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        i = int(text)
        return [1] * bos + [10 + i] * (i % 9 + 1) + [2] * eos


DOCS = [str(i) for i in range(60)]


def _doc_ids(batches):
    ids = set()
    for batch in batches:
        ids.update(int(t) - 10 for t in np.unique(batch["inputs"]) if t >= 10)
    return ids


def _iterators(seed=0, process_index=0, process_count=1, global_batch=4, seq_len=16, docs=DOCS):
    return pipeline.make_pretrain_iterators(
        docs, DocIdTokenizer(), seq_len, global_batch, seed, 0.1,
        process_index=process_index, process_count=process_count, read_threads=0,
    )


def _differ(batches_a, batches_b):
    return any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches_a, batches_b))


def test_train_batches_shape_and_determinism():
    batches = take(_iterators(seed=0)[0], 5)
    assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == {
        "inputs": ((4, 16), np.int32), "targets": ((4, 16), np.int32), "segment_ids": ((4, 16), np.int32),
        "positions": ((4, 16), np.int32), "loss_mask": ((4, 16), np.float32),
    }
    assert_same_batches(batches, take(_iterators(seed=0)[0], 5))
    assert _differ(batches, take(_iterators(seed=1)[0], 5))


def test_training_covers_all_training_documents():
    train_docs, _ = pipeline.split_documents(DOCS, 0.1)
    train_ids = {int(d) for d in train_docs}
    batches = take(_iterators()[0], 60)  # a little over 2 epochs of the 54 training documents
    assert _doc_ids(batches) == train_ids


def test_state_restore_gives_the_same_next_batches():
    train_iter, _ = _iterators(seq_len=8)
    take(train_iter, 3)
    state = json.loads(json.dumps(train_iter.get_state()))  # the state must survive a JSON checkpoint
    expected = take(train_iter, 6)
    restored, _ = _iterators(seq_len=8)
    restored.set_state(state)
    assert_same_batches(take(restored, 6), expected)


def test_state_restore_with_grains_orbax_checkpoint_handler(tmp_path):
    from etils import epath

    handler = grain.checkpoint.CheckpointHandler()
    train_iter, _ = _iterators(seq_len=8)
    take(train_iter, 2)
    handler.save(epath.Path(tmp_path), item=train_iter)
    expected = take(train_iter, 4)
    restored = handler.restore(epath.Path(tmp_path), item=_iterators(seq_len=8)[0])
    assert_same_batches(take(restored, 4), expected)


def test_state_restore_in_the_middle_of_a_document(tmp_path):
    docs = sources.default_corpus()[:12]  # long documents: most row boundaries fall inside a document
    tokenizer = train_tokenizer(docs, tmp_path / "spm", 512)

    def make():
        return pipeline.make_pretrain_iterators(docs, tokenizer, 32, 2, 7, 0.0, process_index=0, process_count=1)[0]

    train_iter = make()
    take(train_iter, 5)
    state = train_iter.get_state()
    assert state["offset"] > 0
    expected = take(train_iter, 4)
    restored = make()
    restored.set_state(state)
    assert_same_batches(take(restored, 4), expected)


def test_two_processes_get_disjoint_documents():
    one = take(_iterators(global_batch=4)[0], 30)
    p0 = take(_iterators(process_index=0, process_count=2)[0], 30)
    p1 = take(_iterators(process_index=1, process_count=2)[0], 30)
    assert p0[0]["inputs"].shape == p1[0]["inputs"].shape == (2, 16)
    assert not _doc_ids(p0) & _doc_ids(p1)
    assert _doc_ids(p0) | _doc_ids(p1) == _doc_ids(one)


def test_validation_batches_are_fixed_and_held_out():
    train_iter, eval_batches = _iterators()
    val = eval_batches()
    assert_same_batches(val, eval_batches())
    assert_same_batches(val, _iterators(seed=5)[1]())  # the split does not depend on the training seed
    assert len(val) >= 1 and all(b["inputs"].shape == (4, 16) for b in val)
    val_ids = _doc_ids(val)
    assert len(val_ids) == 6  # 10% of 60 documents
    assert not val_ids & _doc_ids(take(train_iter, 60))


def test_validation_rows_are_split_across_processes():
    whole = _iterators(global_batch=4)[1]()
    halves = [_iterators(process_index=p, process_count=2)[1]() for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for b, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([halves[0][b][key], halves[1][b][key]]), batch[key])


def test_finite_epoch_counts_every_target_once():
    train_docs, _ = pipeline.split_documents(DOCS, 0.1)
    dataset = pipeline.make_train_dataset(train_docs, DocIdTokenizer(), 8, 1, seed=3, num_epochs=1, read_threads=0)
    batches = list(dataset)
    expected = sum(len(DocIdTokenizer().encode(d, bos=True, eos=True)) - 1 for d in train_docs)
    assert sum(b["loss_mask"].sum() for b in batches) == expected


def test_no_validation_when_fraction_is_zero():
    _, eval_batches = pipeline.make_pretrain_iterators(
        DOCS, DocIdTokenizer(), 16, 4, 0, 0.0, process_index=0, process_count=1
    )
    assert eval_batches() == []


def test_pipeline_argument_errors():
    with pytest.raises(ValueError) as err:
        _iterators(global_batch=5, process_count=2)
    assert "global batch 5" in _one_line_error(err) and "process count 2" in str(err.value)
    with pytest.raises(ValueError, match="process_index=2"):
        _iterators(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="val_fraction"):
        pipeline.split_documents(DOCS, 1.0)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        packing.RowBuilder(1)


def test_default_corpus_end_to_end(tmp_path):
    docs = sources.load_documents("default")
    tokenizer = train_tokenizer(docs, tmp_path / "spm", 512)
    train_iter, eval_batches = pipeline.make_pretrain_iterators(
        docs, tokenizer, 128, 8, 0, process_index=0, process_count=1
    )
    batch = next(train_iter)
    assert batch["inputs"].shape == (8, 128) and batch["inputs"].max() < 512
    assert batch["loss_mask"].mean() > 0.9  # long documents pack densely
    assert len(eval_batches()) >= 1
    entropy = unigram_entropy(tokenizer.encode(d) for d in docs[:10])
    assert 2.0 < entropy < np.log(512)


def test_a_non_utf8_file_is_named_with_the_byte(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as err:
        sources.load_documents("text", tmp_path / "latin1.txt")
    assert _one_line_error(err) == (f"{tmp_path / 'latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 3); convert it, "
                                    "e.g. iconv -f latin1 -t utf-8")
    with pytest.raises(ValueError, match=r"latin1.jsonl: not UTF-8 text \(byte 0xe9 at offset 13\)"):
        sources.load_documents("jsonl", tmp_path / "latin1.jsonl")


def test_an_empty_corpus_is_called_empty_and_named(tmp_path):
    from configs import tiny
    from train import pretrain

    with pytest.raises(ValueError, match=r"^the corpus is empty: no documents to train on$"):
        pipeline.split_documents([], 0.05)
    config = tiny.get_config()
    config.data.source, config.data.path = "text", str(tmp_path / "corpus.txt")
    with pytest.raises(ValueError) as err:
        pretrain.make_data(config, DocIdTokenizer(), [])
    assert _one_line_error(err) == (f"config.data (source 'text' {tmp_path / 'corpus.txt'}): the corpus is empty: no "
                                    "documents to train on")
