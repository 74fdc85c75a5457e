"""SFT: loss masks on packed batches (real tokenizer), packed == one-at-a-time loss, overlong handling, iterator state,
the trainer's config rules, and a tiny end-to-end fine-tune whose eval loss on assistant tokens falls.

Covers llama2_jax.data.sft, llama2_jax.training.sft_run and llama2_jax.training.tokenizer_setup."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import alpaca_subset, random_llama_params, shared_file
from helpers.batches import assert_same_batches, take
from helpers.messages import assistant, user
from helpers.sft_masks import MULTI_TURN, check_masks_on_batches, expected_sample
from helpers.trainers import save_tiny_checkpoint

from configs import sft_7b, sft_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import sft
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text.tokenizer import Tokenizer, train_tokenizer
from llama2_jax.training import losses, setup
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.model_config import resolve_model_config
from llama2_jax.training.tokenizer_setup import load_tokenizer, tokenizer_path
from train import sft as sft_trainer

LONE_SPACE = 29871  # Llama 2's "▁" piece, before EOS at the end of every answer


class CharTokenizer:
    """One id per character (Meta semantics for bos/eos): fast, and every prompt is a token prefix of its turn."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [3 + ord(c) % 200 for c in text] + [2] * eos


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_loss_mask_is_exactly_the_assistant_tokens_single_turn(llama_tokenizer_path, tmp_path):
    tokenizer = Tokenizer(llama_tokenizer_path)
    records = json.loads(shared_file("alpaca-cleaned-first1000.json").read_text())[:12]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    expected = {}
    for r in records:
        u = r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")
        tokens, mask = expected_sample(tokenizer, [user(u), assistant(r["output"])])
        answer = [t for t, m in zip(tokens, mask) if m]
        assert answer[-2:] == [LONE_SPACE, tokenizer.eos_id]
        assert tokenizer.decode(answer[:-2]) == r["output"].strip()
        expected[tuple(tokens)] = mask
    check_masks_on_batches(path, tokenizer, expected)


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_loss_mask_is_exactly_the_assistant_tokens_multi_turn(llama_tokenizer_path, tmp_path, train_on):
    tokenizer = Tokenizer(llama_tokenizer_path)
    records = [{"messages": d, "train_on": train_on} for d in MULTI_TURN]
    path = write_jsonl(tmp_path / "dialogs.jsonl", records)
    expected = {tuple(t): m for t, m in (expected_sample(tokenizer, d, train_on) for d in MULTI_TURN)}
    data = check_masks_on_batches(path, tokenizer, expected, seq_len=256, batch_size=2)
    assert data.stats.supervised_tokens == sum(sum(m) for m in expected.values())


def test_bad_train_on_flag_names_the_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN[0], "train_on": "first"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'train_on' is 'first'"):
        sft.read_sft_samples(path)


# ---------------------------------------------------------------------------------------------- packing and the loss

TINY = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                   dtype="float32")


random_params = random_llama_params  # tests/conftest.py


def test_packed_row_gives_the_same_per_sample_loss_as_each_sample_alone():
    model = Llama(TINY)
    params = random_params(TINY)
    rng = np.random.default_rng(0)
    examples = [(rng.integers(3, TINY.vocab_size, n).astype(np.int32), (rng.random(n) > 0.4).astype(np.float32))
                for n in (10, 17, 25)]
    packed = sft.make_eval_batches(examples, seq_len=64, batch_size=1)
    assert len(packed) == 1 and packed[0]["segment_ids"][0].max() == 3  # all three in one row
    loss = jax.jit(lambda batch: losses.next_token_loss(params, batch, model=model))
    for s, example in enumerate(examples, start=1):
        in_row = dict(packed[0], loss_mask=packed[0]["loss_mask"] * (packed[0]["segment_ids"] == s))
        alone = sft.make_eval_batches([example], seq_len=64, batch_size=1)[0]
        (packed_sum, packed_aux), (alone_sum, alone_aux) = loss(in_row), loss(alone)
        assert float(packed_aux["weight"]) == float(alone_aux["weight"]) == example[1][1:].sum()
        np.testing.assert_allclose(float(packed_sum), float(alone_sum), rtol=1e-5)


def test_samples_are_never_split_across_rows():
    examples = [(np.arange(n, dtype=np.int32) + 3, np.ones(n, np.float32)) for n in (5, 5, 7, 8)]
    rows = list(sft.iter_whole_sample_rows(examples, seq_len=12))
    assert [r["segment_ids"].tolist() for r in rows] == [[1] * 5 + [2] * 5 + [0] * 2, [1] * 7 + [0] * 5,
                                                         [1] * 8 + [0] * 4]


# ------------------------------------------------------------------------------------------------------- overlong


def overlong_samples():
    return [
        ([user("hi"), assistant("ok")], "all"),  # 23 tokens: fits
        ([user("q"), assistant("x" * 60)], "all"),  # 78 tokens: cut mid-turn
        ([user("a"), assistant("b"), user("c"), assistant("d" * 50)], "all"),  # 2nd turn too long: keep turn 1
        ([user("a"), assistant("b"), user("c" * 20), assistant("d")], "last"),  # last turn's answer past 40: dropped
        ([user("p" * 60), assistant("z")], "all"),  # the prompt alone fills seq_len: dropped
    ]


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped_and_counted(overlong):
    stats = sft.SFTStats()
    examples = sft.encode_samples(CharTokenizer(), overlong_samples(), seq_len=40, overlong=overlong, stats=stats)
    assert stats.overlong == 4
    if overlong == "truncate":
        assert (stats.truncated_to_turns, stats.truncated_mid_turn, stats.dropped_overlong) == (1, 1, 2)
        assert [len(t) for t, _ in examples] == [23, 40, 21]
        tokens, weights = examples[2]
        assert tokens[-1] == CharTokenizer.eos_id and weights[1:].sum() == 4  # turn 1 whole: " b " and EOS
    else:
        assert (stats.truncated_to_turns, stats.truncated_mid_turn, stats.dropped_overlong) == (0, 0, 4)
        assert [len(t) for t, _ in examples] == [23]
    assert all(len(t) <= 40 for t, _ in examples)


def test_overlong_counts_reach_the_stats_and_the_log(caplog):
    data = sft.make_sft_data(overlong_samples() * 4, CharTokenizer(), seq_len=40, batch_size=2, seed=0,
                             val_fraction=0.25)
    stats = data.stats
    assert stats.overlong == 16 and stats.dropped_overlong == 8
    assert stats.train_samples + stats.eval_samples == 12
    assert "16 of 20 samples longer than seq_len 40" in caplog.text
    assert 0 < stats.supervised_fraction < 1 and 0 < stats.fill <= 1
    assert "dropped" in stats.summary() and "supervised tokens" in stats.summary()


# ------------------------------------------------------------------------------------------------ iterator state


def char_samples(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return [([user("q" * int(rng.integers(1, 20))), assistant(f"answer {i} " + "a" * int(rng.integers(1, 30)))],
             "all") for i in range(n)]


def test_iterator_state_restores_identical_batches_across_epochs():
    make = lambda seed=3: sft.make_sft_data(char_samples(), CharTokenizer(), seq_len=64, batch_size=2, seed=seed)
    data = make()
    rows_per_epoch = data.stats.train_rows
    take(data.train_iter, 3)
    state = json.loads(json.dumps(data.train_iter.get_state()))  # JSON-serialisable, as checkpoints store it
    expected = take(data.train_iter, rows_per_epoch)  # crosses at least one epoch boundary
    fresh = make()
    fresh.train_iter.set_state(state)
    assert_same_batches(take(fresh.train_iter, rows_per_epoch), expected)
    assert_same_batches(take(make().train_iter, 4), take(make().train_iter, 4))  # deterministic
    other = take(make(seed=4).train_iter, 4)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(other, take(make().train_iter, 4)))


def test_eval_batches_are_fixed_and_padded_to_the_batch():
    data = sft.make_sft_data(char_samples(), CharTokenizer(), seq_len=64, batch_size=4, seed=0, val_fraction=0.3)
    first, second = data.eval_batches(), data.eval_batches()
    assert_same_batches(first, second)
    assert all(b["inputs"].shape == (4, 64) for b in first)
    assert sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in first) == data.stats.eval_rows


def test_steps_for_epochs():
    data = sft.make_sft_data(char_samples(), CharTokenizer(), seq_len=64, batch_size=4, seed=0)
    assert data.steps_for_epochs(2, 4) == math.ceil(2 * data.stats.train_rows / 4)


# --------------------------------------------------------------------------------------------------- trainer config


def test_sft_configs_load_with_the_paper_recipe():
    config = sft_7b.get_config()
    assert (config.learning_rate, config.weight_decay, config.batch_size, config.seq_len, config.num_epochs) == (
        2e-5, 0.1, 64, 4096, 2.0)
    assert sft_tiny.get_config().model.dtype == "float32"


@pytest.mark.parametrize("field,value,message", [
    ("data.path", "", "config.data.path is empty"),
    ("data.path", "/nonexistent.json", "config.data.path: /nonexistent.json does not exist"),
    ("data.overlong", "wrap", "config.data.overlong is 'wrap'"),
    ("num_epochs", -1.0, "config.num_epochs must be >= 0"),
])
def test_bad_sft_config_fields_are_one_line_errors(tmp_path, field, value, message):
    config = sft_tiny.get_config()
    config.data.path = str(write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN[0]}]))
    parent, _, name = field.rpartition(".")
    (config[parent] if parent else config)[name] = value
    with pytest.raises(ConfigError, match=message) as error:
        sft_trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert "\n" not in str(error.value)


def test_model_comes_from_the_checkpoint_and_the_tokenizer_from_its_dir(tmp_path):
    save_tiny_checkpoint(tmp_path / "init", TINY.replace(dtype="bfloat16"))
    config = sft_tiny.get_config()
    config.init_from = str(tmp_path / "init")
    config.seq_len = 128
    model_cfg = resolve_model_config(config, config.seq_len)
    assert (model_cfg.dim, model_cfg.n_layers, model_cfg.vocab_size) == (TINY.dim, TINY.n_layers, TINY.vocab_size)
    assert model_cfg.dtype == "float32"  # numerics from config.model
    assert model_cfg.max_seq_len == 128  # raised to seq_len
    with pytest.raises(ConfigError, match="config.tokenizer.path is empty and .*tokenizer.model does not"):
        load_tokenizer(config, model_cfg.vocab_size)
    (tmp_path / "init" / "tokenizer.model").write_bytes(b"")
    assert tokenizer_path(config) == str(tmp_path / "init" / "tokenizer.model")


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_workdir_of_another_model_fails_before_anything_in_it_is_rewritten(tmp_path):
    """Resuming a workdir with another architecture (here: an init_from of another size) is one line naming both
    sides, raised before llama_config.json or tokenizer.model are touched."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "llama_config.json").write_text(json.dumps(TINY.to_dict()))
    (work / "tokenizer.model").write_bytes(b"the earlier run's tokenizer")
    before = snapshot(work)
    save_tiny_checkpoint(tmp_path / "init", TINY.replace(dim=64, n_layers=3), tokenizer_file=None)
    (tmp_path / "init" / "tokenizer.model").write_bytes(b"another tokenizer")
    config = sft_tiny.get_config()
    config.init_from = str(tmp_path / "init")
    config.data.path = str(write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN[0]}]))
    config.seq_len = 64
    with pytest.raises(ConfigError, match=r"llama_config.json: the workdir holds a run of another model "
                                                 r"\(dim=32, n_layers=2, hidden_dim=96\) than this run's \(dim=64, n_layers=3, "
                                                 r"hidden_dim=176\)"):
        sft_trainer.train_and_evaluate(config, str(work))
    assert snapshot(work) == before


def test_an_init_from_whose_params_are_another_model_fails_before_the_workdir_is_written(tmp_path):
    save_tiny_checkpoint(tmp_path / "init", TINY)
    (tmp_path / "init" / "llama_config.json").write_text(json.dumps(TINY.replace(dim=64).to_dict()))
    config = sft_tiny.get_config()
    config.init_from = str(tmp_path / "init")
    config.tokenizer.path = str(tmp_path / "none.model")
    config.data.path = str(write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN[0]}]))
    with pytest.raises(ConfigError, match=r"^config.init_from: checkpoint .* layers_0/attention/wk has "
                                          r"shape \(32, 2, 8\) in the checkpoint but \(64, 2, 16\) in the config"):
        sft_trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_setup_copies_a_given_tokenizer_and_writes_the_model_config(tmp_path):
    words = "the a cat dog safe help answer question please thanks why how what no yes sorry can you I".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=12)) + f" {i}." for i in range(400)]
    tokenizer = train_tokenizer(texts, tmp_path / "tok", vocab_size=384, num_threads=1)
    config = sft_tiny.get_config()
    config.model.update(TINY.replace(vocab_size=384).to_dict())
    config.tokenizer.path = tokenizer.model_path
    config.seq_len = TINY.max_seq_len
    model_cfg = resolve_model_config(config)
    plain = setup.Task("sft", seq_len=False)  # setup alone: the trainer's data and steps left out
    setup.setup(config, str(tmp_path / "work"), plain)
    assert (tmp_path / "work" / "tokenizer.model").read_bytes() == open(tokenizer.model_path, "rb").read()
    assert checkpoint.load_config(tmp_path / "work") == model_cfg
    config.model.dtype = "bfloat16"
    setup.setup(config, str(tmp_path / "work"), plain)  # numerics may change


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_sft_end_to_end_eval_loss_on_assistant_tokens_falls(tmp_path):
    data_path, tokenizer = alpaca_subset(tmp_path)
    cfg = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=128,
                      dtype="float32")
    save_tiny_checkpoint(tmp_path / "init", cfg, tokenizer.model_path)

    config = sft_tiny.get_config()
    config.init_from, config.data.path = str(tmp_path / "init"), str(data_path)
    config.seq_len, config.batch_size, config.num_epochs, config.num_train_steps = 128, 8, 0.0, 30
    config.learning_rate, config.warmup_steps, config.eval_every_steps = 3e-3, 3, 30
    config.data.val_fraction, config.progress_bar, config.sample_prompts = 0.1, False, ()
    result = sft_trainer.train_and_evaluate(config, str(tmp_path / "work"))
    state, history = result.state, result.history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert int(state.step) == 30 and len(evals) == 2
    assert evals[-1] < evals[0] - 0.5, evals
    assert (tmp_path / "work" / "tokenizer.model").is_file()  # the workdir is a complete init_from
    assert checkpoint.load_config(tmp_path / "work") == cfg.replace(scan_layers=False, remat_policy="none")
