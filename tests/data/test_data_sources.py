"""Real TFDS and Hugging Face `datasets` sources: datasets built in a temporary directory, read back for pretraining
(random access and streamed, with exact iterator resume) and as SFT / preference records.

Covers llama2_jax.data.hf_source and llama2_jax.data.records."""

import json

import numpy as np
import pytest

from llama2_jax.data import hf_source, pipeline, preferences, records, sft, sources
from llama2_jax.training.checks import ConfigError

# The [tfds] and [hf] extras (.ci/run installs both); without them these tests are skipped with the reason.
tfds = pytest.importorskip("tensorflow_datasets", reason="needs the [tfds] extra: pip install -e .[tfds]")
pytest.importorskip("array_record", reason="needs the [tfds] extra: pip install -e .[tfds]")
pytest.importorskip("datasets", reason="needs the [hf] extra: pip install -e .[hf]")
pa = pytest.importorskip("pyarrow", reason="needs the [hf] extra: pip install -e .[hf]")
pq = pytest.importorskip("pyarrow.parquet", reason="needs the [hf] extra: pip install -e .[hf]")

DOCS = [f"document {i}: {'word ' * (i % 7)}end" for i in range(40)]
PAIRS = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)]
DIALOGS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"},
                         {"role": "user", "content": "more"}, {"role": "assistant", "content": f"sure {i}"}]}
           for i in range(5)]


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    """Text documents (train) and SFT dialogs / preference pairs in other splits, written as ArrayRecord."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "index": np.int64,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(DOCS[:30]), "validation": self._generate_examples(DOCS[30:])}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc, "index": i}


class TinyChat(tfds.core.GeneratorBasedBuilder):
    """Dialogs as a `Sequence(FeaturesDict)` of messages, and preference pairs."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        message = tfds.features.FeaturesDict({"role": tfds.features.Text(), "content": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "messages": tfds.features.Sequence(message),
            "prompt": tfds.features.Text(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (dialog, pair) in enumerate(zip(DIALOGS, PAIRS)):
            yield i, {**dialog, **pair}


def build(builder_class, data_dir):
    builder = builder_class(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build(TinyCorpus, data_dir)
    build(TinyChat, data_dir)
    return data_dir


def write_parquet(path, rows, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = rows[s::shards]
        pq.write_table(pa.Table.from_pylist(part), path / f"part-{s:02d}.parquet")
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------------------- TFDS


def test_tfds_source_reads_a_real_array_record_dataset(tfds_dir):
    docs = sources.load_documents("tfds", "tiny_corpus", split="train", data_dir=str(tfds_dir))
    assert sorted(docs[i] for i in range(len(docs))) == sorted(DOCS[:30])  # TFDS stores examples shuffled by key
    val = sources.load_documents("tfds", "tiny_corpus", split="validation", data_dir=str(tfds_dir))
    assert sorted(val) == sorted(DOCS[30:])
    with pytest.raises(ValueError, match=r"tfds:tiny_corpus/test: .*split"):
        sources.load_documents("tfds", "tiny_corpus", split="test", data_dir=str(tfds_dir))
    with pytest.raises(ValueError, match=r"tfds:tiny_corpus/train\[0\]: record has no 'title' field"):
        sources.load_documents("tfds", "tiny_corpus", field="title", data_dir=str(tfds_dir))[0]


def test_tfds_records_feed_the_sft_and_preference_readers(tfds_dir, tmp_path):
    spec = f"tfds:{tfds_dir / 'tiny_chat' / '1.0.0'}"
    samples, stats = sft.read_sft_samples(spec)  # Sequence(FeaturesDict) -> a list of messages: "messages" format
    expected, _ = sft.read_sft_samples(write_jsonl(tmp_path / "dialogs.jsonl", DIALOGS))
    assert stats.format == "messages" and sorted(map(str, samples)) == sorted(map(str, expected))
    pairs, pair_stats = preferences.read_preferences(spec, format="jsonl")
    expected_pairs, _ = preferences.read_preferences(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:5]))
    assert pair_stats.kept == 5 and sorted(map(str, pairs)) == sorted(map(str, expected_pairs))


# ---------------------------------------------------------------------------------------------- HF, random access


def test_hf_source_reads_parquet_files_directories_and_jsonl(tmp_path):
    directory = write_parquet(tmp_path / "corpus", [{"text": d, "id": i} for i, d in enumerate(DOCS)], shards=2)
    from_dir = sources.load_documents("hf", str(directory), data_dir=str(tmp_path / "cache"))
    assert sorted(from_dir) == sorted(DOCS)
    one_file = sources.load_documents("hf", str(directory / "part-00.parquet"), data_dir=str(tmp_path / "cache"))
    assert list(one_file) == DOCS[0::2]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in DOCS])
    assert list(sources.load_documents("hf", str(jsonl), field="body", data_dir=str(tmp_path / "cache"))) == DOCS


def test_hf_source_errors_are_one_line_and_name_the_input(tmp_path):
    directory = write_parquet(tmp_path / "corpus", [{"text": d} for d in DOCS])
    with pytest.raises(ValueError, match=r"hf:.*corpus/train: no 'body' column \(has text\)"):
        sources.load_documents("hf", str(directory), field="body", data_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"hf:.*corpus \(split 'test'\)") as error:
        sources.load_documents("hf", str(directory), split="test", data_dir=str(tmp_path / "cache"))
    assert "\n" not in str(error.value)
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"hf:.*x.xlsx: unknown file type '.xlsx'"):
        sources.load_documents("hf", str(tmp_path / "x.xlsx"))


def test_hf_records_feed_the_sft_and_preference_readers(tmp_path):
    write_parquet(tmp_path / "sft", DIALOGS)
    samples, stats = sft.read_sft_samples(f"hf:{tmp_path / 'sft'}")
    expected, _ = sft.read_sft_samples(write_jsonl(tmp_path / "dialogs.jsonl", DIALOGS))
    assert stats.format == "messages" and samples == expected  # same order: a stream in stored order
    write_parquet(tmp_path / "pairs", PAIRS)
    pairs, _ = preferences.read_preferences(f"hf:{tmp_path / 'pairs' / 'part-00.parquet'}@train")
    assert pairs == preferences.read_preferences(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))[0]
    bad = [dict(DIALOGS[0]), {"messages": [{"role": "user", "content": "no answer"}]}]
    write_parquet(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match=r"^hf:.*bad@train: record 1: "):
        sft.read_sft_samples(f"hf:{tmp_path / 'bad'}")


def test_dataset_specs():
    assert records.parse_spec("hf:data/x.parquet") == ("hf", "data/x.parquet", "train")
    assert records.parse_spec("tfds:c4/en:3.1.0@validation[:10%]") == ("tfds", "c4/en:3.1.0", "validation[:10%]")
    for bad in ("hf:", "hf:x@", "csv:x"):
        with pytest.raises(ValueError, match="expected hf:PATH_OR_NAME"):
            records.parse_spec(bad)


# ---------------------------------------------------------------------------------------------------- HF, streamed


def streams(tmp_path, window=4, val_fraction=0.2, seed=3):
    directory = write_parquet(tmp_path / "stream", [{"text": d} for d in DOCS], shards=3)
    return hf_source.streaming_documents(str(directory), val_fraction=val_fraction, window=window, seed=seed,
                                         cache_dir=str(tmp_path / "cache"))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_streamed_documents_hold_out_every_kth_and_shuffle_within_windows(tmp_path):
    train, val = streams(tmp_path)
    stored = [d for s in range(3) for d in DOCS[s::3]]  # the stream's order: shard by shard
    held_out = [d for i, d in enumerate(stored) if i % 5 == 4]
    assert list(val) == held_out  # read in stored order, once
    epoch = take(iter(train), 32)
    assert sorted(epoch) == sorted(set(stored) - set(held_out))
    assert epoch != [d for d in stored if d not in held_out]  # shuffled ...
    kept = [d for d in stored if d not in held_out]
    assert [sorted(epoch[i:i + 4]) for i in range(0, 32, 4)] == [sorted(kept[i:i + 4]) for i in range(0, 32, 4)]
    second = take(iter(train), 64)[32:]  # ... and repeated, with a new order in the next epoch
    assert sorted(second) == sorted(epoch) and second != epoch


@pytest.mark.parametrize("stop", [0, 1, 5, 8, 31, 32, 45])  # window starts, window middles, epoch boundary
def test_streamed_documents_resume_exactly(tmp_path, stop):
    train, _ = streams(tmp_path)
    reference = take(iter(train), 60)
    first = iter(train)
    take(first, stop)
    state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
    resumed = iter(train)
    resumed.set_state(state)
    assert take(resumed, 60 - stop) == reference[stop:]


def test_streamed_pretrain_batches_resume_exactly(tmp_path):
    class Chars:
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=False, eos=False):
            return [1] * bos + [3 + ord(c) % 50 for c in text] + [2] * eos

    train, val = streams(tmp_path)
    make = lambda: pipeline.make_stream_pretrain_iterators(  # noqa: E731
        train, val, Chars(), seq_len=16, global_batch=4, process_index=0, process_count=1, max_eval_batches=2)
    reference_iter, eval_batches = make()
    reference = take(reference_iter, 12)
    assert reference[0]["inputs"].shape == (4, 16) and len(eval_batches()) == 2
    first, _ = make()
    take(first, 7)
    state = json.loads(json.dumps(first.get_state()))
    resumed, _ = make()
    resumed.set_state(state)
    for a, b in zip(take(resumed, 5), reference[7:]):
        assert all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ pretraining end to end


def crash_and_resume_losses(config, workdir, monkeypatch, crash_at=6):
    """Train with a crash after `crash_at - 1` steps (after the step-4 checkpoint), then resume; returns the losses."""
    from helpers.trainers import train_losses

    from llama2_jax.training import loop
    from train import pretrain

    real_to_global, calls = loop.process_rows_to_global, []

    def crashing(batch, mesh):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return real_to_global(batch, mesh)

    monkeypatch.setattr(loop, "process_rows_to_global", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.train_and_evaluate(config, str(workdir))
    monkeypatch.setattr(loop, "process_rows_to_global", real_to_global)
    pretrain.train_and_evaluate(config, str(workdir))
    return train_losses(workdir)


def check_exact_resume(config, tmp_path, monkeypatch):
    from helpers.trainers import train_losses

    from train import pretrain

    result = pretrain.train_and_evaluate(config, str(tmp_path / "straight"))

    state, history = result.state, result.history
    assert int(state.step) == 8 and any("eval_loss" in h for h in history)
    straight = train_losses(tmp_path / "straight")
    resumed = crash_and_resume_losses(config, tmp_path / "resumed", monkeypatch)
    assert [straight[s] for s in range(5, 9)] == [resumed[s] for s in range(5, 9)]  # exact float equality


@pytest.mark.slow
def test_pretraining_from_a_real_tfds_dataset_resumes_exactly(tfds_dir, tmp_path, monkeypatch):
    from helpers.trainers import small_config

    corpus = sources.default_corpus()  # enough text for a 512-piece tokenizer

    class PydocTopics(TinyCorpus):
        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(corpus)}

    build(PydocTopics, tfds_dir)
    config = small_config(**{"data.source": "tfds", "data.path": "pydoc_topics", "data.data_dir": str(tfds_dir),
                             "async_checkpoints": False})
    check_exact_resume(config, tmp_path, monkeypatch)


@pytest.mark.slow
def test_pretraining_from_a_streamed_parquet_dataset_resumes_exactly(tmp_path, monkeypatch):
    from helpers.trainers import small_config

    directory = write_parquet(tmp_path / "corpus", [{"body": d} for d in sources.default_corpus()], shards=3)
    config = small_config(**{"data.source": "hf", "data.path": str(directory), "data.field": "body",
                             "data.streaming": True, "data.shuffle_window": 16, "data.val_fraction": 0.1,
                             "data.data_dir": str(tmp_path / "cache"), "async_checkpoints": False})
    check_exact_resume(config, tmp_path, monkeypatch)


def test_streaming_needs_the_hf_source(tmp_path):
    from helpers.trainers import small_config

    from train import pretrain

    config = small_config(**{"data.source": "jsonl", "data.path": "x.jsonl", "data.streaming": True})
    with pytest.raises(ConfigError, match=r"^config.data: streaming=True needs source='hf'"):
        pretrain.train_and_evaluate(config, str(tmp_path))


def test_one_pass_reads_the_training_documents_once_in_stored_order(tmp_path):
    train, _ = streams(tmp_path)
    stored = [d for s in range(3) for d in DOCS[s::3]]
    assert list(train.one_pass()) == [d for i, d in enumerate(stored) if i % 5 != 4]


# -------------------------------------------------------------------------------------------------- SFT end to end


@pytest.mark.slow
def test_sft_from_a_parquet_dataset_trains_exactly_like_the_same_json_file(tmp_path):
    from conftest import shared_file
    from helpers.trainers import save_tiny_checkpoint

    from configs import sft_tiny
    from llama2_jax.model.config import LlamaConfig
    from llama2_jax.text.tokenizer import train_tokenizer
    from train import sft as sft_trainer

    records_ = json.loads(shared_file("alpaca-cleaned-first1000.json").read_text())[:160]
    json_path = tmp_path / "alpaca.json"
    json_path.write_text(json.dumps(records_))
    write_parquet(tmp_path / "alpaca", records_)
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in records_] + ["[INST] <<SYS>> [/INST]"]
    tokenizer = train_tokenizer(texts, tmp_path / "tok", vocab_size=512, num_threads=1)
    cfg = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=128,
                      dtype="float32")
    save_tiny_checkpoint(tmp_path / "init", cfg, tokenizer.model_path)

    def run(data_path, workdir):
        config = sft_tiny.get_config()
        config.init_from, config.data.path = str(tmp_path / "init"), data_path
        config.seq_len, config.batch_size, config.num_epochs, config.num_train_steps = 128, 8, 0.0, 6
        config.eval_every_steps, config.checkpoint_every_steps, config.log_every_steps = 6, 6, 1
        config.data.val_fraction, config.progress_bar, config.sample_prompts = 0.1, False, ()
        result = sft_trainer.train_and_evaluate(config, str(tmp_path / workdir))
        state, history = result.state, result.history
        assert int(state.step) == 6
        return [(h["step"], h.get("loss"), h.get("eval_loss")) for h in history]

    from_parquet = run(f"hf:{tmp_path / 'alpaca'}", "parquet")
    assert from_parquet == run(str(json_path), "json")  # same dialogs, same order: identical losses
    assert any(loss is not None for _, loss, _ in from_parquet) and from_parquet[-1][2] is not None
