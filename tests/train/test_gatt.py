"""Ghost Attention: instruction placement (sampling prompts vs training records), last-turn-only loss masks on SFT
batches, stopping rules, and one run of the trainer with the real sampler on a random tiny model.

Covers llama2_jax.data.gatt_instructions."""

import json
import random

import numpy as np
import pytest
from conftest import random_llama_params
from helpers.sft_masks import MULTI_TURN, check_masks_on_batches, expected_sample

from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import gatt_instructions, sft
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text.tokenizer import Tokenizer, train_tokenizer
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.outputs import write_jsonl
from train import gatt


class StubSampler:
    """Deterministic replies naming the dialog's first user message and the turn; remembers every prompt."""
    def __init__(self, reply=None):
        self.prompts = []
        self.reply = reply

    def __call__(self, dialogs):
        self.prompts.append(dialogs)
        return [self.reply if self.reply is not None else
                f"Reply {sum(m['role'] == 'user' for m in d)} to {d[0]['content'][-12:]!r}." for d in dialogs]


def user_messages(dialog):
    return [m["content"] for m in dialog if m["role"] == "user"]


def test_instruction_in_every_sampling_prompt_but_only_the_first_turn_of_records():
    sampler = StubSampler()
    records, stats = gatt.make_gatt_records(MULTI_TURN, sampler, seed=0)
    assert [len(call) for call in sampler.prompts] == [3, 2, 1]  # turn by turn, every dialog still going
    items = gatt.prepare(MULTI_TURN, random.Random(0), gatt.GattStats())  # the same instructions (same seed)
    for turn, call in enumerate(sampler.prompts, start=1):
        for prompt in call:
            item = next(i for i in items if user_messages(prompt)[0].endswith(i.users[0]))
            assert user_messages(prompt) == [f"{item.instruction.full}\n\n{u}" for u in item.users[:turn]]
            replies = [m["content"] for m in prompt if m["role"] == "assistant"]
            assert replies == [f"Reply {t} to {prompt[0]['content'][-12:]!r}." for t in range(1, turn)]
            assert prompt[0]["role"] == ("system" if item.system else "user")
    assert stats.turns_sampled == 6 and len(records) == 6  # every_turn: dialogs of 2, 3, 1 turns
    for record in records:
        messages, meta = record["messages"], record["gatt"]
        assert record["train_on"] == "last"
        assert messages[0]["role"] == "system" and messages[0]["content"].endswith(meta["instruction"])
        source = next(d for d in MULTI_TURN if user_messages(d)[0] == user_messages(messages)[0])
        assert user_messages(messages) == user_messages(source)[: meta["turns"]]  # later users: no instruction
        assert len(messages) == 1 + 2 * meta["turns"]
    assert len(gatt.make_gatt_records(MULTI_TURN, StubSampler(), seed=0, samples="last_turn")[0]) == 3


def test_terse_form_about_half_the_time():
    rng = random.Random(0)
    instructions = [gatt_instructions.sample_instruction(rng) for _ in range(400)]
    terse = [i for i in instructions if i.terse]
    assert 0.4 < len(terse) / 400 < 0.6
    for i in terse:
        for line in i.text.split("\n"):
            assert line.split(": ")[0] in ("Hobby", "Language", "Figure")
    assert any(i.full.startswith("Always act as") for i in instructions)
    assert any(i.full.count(".") == 2 for i in instructions)  # two constraints combined


def test_max_turns_context_and_empty_replies_stop_dialogs():
    sampler = StubSampler()
    records, _ = gatt.make_gatt_records(MULTI_TURN, sampler, max_turns=2, samples="last_turn")
    assert max(r["gatt"]["turns"] for r in records) == 2 and len(sampler.prompts) == 2
    fits = lambda dialog: len(user_messages(dialog)) < 2  # noqa: E731 - the second turn never fits
    records, stats = gatt.make_gatt_records(MULTI_TURN, StubSampler(), fits=fits)
    assert stats.stopped_context == 2 and len(records) == 3
    records, stats = gatt.make_gatt_records(MULTI_TURN, StubSampler(reply="  "))
    assert stats.stopped_bad_reply == 3 and records == [] and stats.used == 0
    tagged = [[{"role": "user", "content": "[INST] hi"}, {"role": "assistant", "content": "x"}]]
    assert gatt.make_gatt_records(tagged, StubSampler())[1].skipped_special_tags == 1


def test_gatt_records_train_only_the_last_turn_on_sft_batches(llama_tokenizer_path, tmp_path):
    tokenizer = Tokenizer(llama_tokenizer_path)
    records, _ = gatt.make_gatt_records(MULTI_TURN, StubSampler(), seed=1)
    path = tmp_path / "gatt.jsonl"
    write_jsonl(path, records)
    expected = {}
    for record in records:
        tokens, mask = expected_sample(tokenizer, record["messages"], "last")
        last_bos = max(i for i, t in enumerate(tokens) if t == tokenizer.bos_id)
        assert not any(mask[:last_bos]) and any(mask[last_bos:])  # previous turns, answers included: no loss
        first_turn = tokenizer.decode(tokens[: tokens.index(tokenizer.bos_id, 1)] if last_bos else tokens)
        assert record["gatt"]["instruction"] in first_turn
        if last_bos:
            assert record["gatt"]["instruction"] not in tokenizer.decode(tokens[tokens.index(tokenizer.bos_id, 1):])
        expected[tuple(tokens)] = mask
    check_masks_on_batches(path, tokenizer, expected, batches=6, seq_len=256, batch_size=2)


@pytest.mark.slow
def test_trainer_with_the_real_sampler_on_a_random_tiny_model(tmp_path):
    from configs import gatt_tiny

    texts = [m["content"] for d in MULTI_TURN for m in d] + [gatt_instructions.sample_instruction(
        random.Random(i)).full for i in range(50)] + ["[INST] <<SYS>> [/INST] Figure: Language: Hobby:"]
    tokenizer = train_tokenizer(texts, tmp_path / "tok", vocab_size=384, num_threads=1)
    cfg = LlamaConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=256,
                      dtype="float32")
    checkpoint.save_params(tmp_path / "model", random_llama_params(cfg, std=0.5), cfg)
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": d}) + "\n" for d in MULTI_TURN))
    config = gatt_tiny.get_config()  # the former --checkpoint, --tokenizer, --dialogs, --max_turns=2 ... flags
    config.init_from, config.tokenizer.path, config.data.path = str(tmp_path / "model"), tokenizer.model_path, \
        str(dialogs)
    config.gatt.max_turns, config.sampling.max_gen_len, config.seed, config.sampling.temperature = 2, 8, 3, 1.0
    config.sft.num_train_steps, config.sft.batch_size, config.sft.data.val_fraction = 2, 8, 0.0
    config.sft.checkpoint_every_steps, config.sft.async_checkpoints = 2, False
    result = gatt.train_and_evaluate(config, str(tmp_path / "work"))
    stats, out = result.summary, tmp_path / "work" / "gatt.jsonl"
    samples, read_stats = sft.read_sft_samples(out)
    assert read_stats.records == stats["records"] > 0 and stats["turns_sampled"] > 0
    assert all(train_on == "last" for _, train_on in samples)
    for dialog, _ in samples:
        assert dialog[0]["role"] == "system" and all(m["content"] for m in dialog)
    data = sft.make_sft_data(samples, tokenizer, seq_len=256, batch_size=2, seed=0, val_fraction=0.0)
    assert data.stats.supervised_tokens > 0 and np.isfinite(data.stats.supervised_fraction)
    # one round on the shared loop, then the SFT run on the records: the product is an init_from
    assert [h["step"] for h in result.history] == [1] and result.product == str(tmp_path / "work" / "sft")
    assert checkpoint.load_config(result.product).vocab_size == 384


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path):
    from configs import gatt_tiny

    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": d}) + "\n" for d in MULTI_TURN))
    config = gatt_tiny.get_config()
    config.init_from, config.tokenizer.path = str(tmp_path / "missing"), str(tmp_path / "none.model")
    config.data.path = str(dialogs)
    with pytest.raises(ConfigError) as error:
        gatt.train_and_evaluate(config, str(tmp_path / "out"))
    assert "\n" not in str(error.value) and str(error.value).startswith("config.init_from: ")
    assert "missing" in str(error.value)
    config.data.path = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"^config.data.path: .*nope.jsonl does not exist$"):
        gatt.train_and_evaluate(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
