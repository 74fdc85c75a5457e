"""Reward-model readers: real files, HH transcript splitting, ratings, errors, chat encoding of pairs."""

import collections
import json
import logging

import pytest
from conftest import shared_file
from helpers.messages import assistant as a
from helpers.messages import user as u

from llama2_jax.data.preferences import PreferencePair, detect_format, encode_pair, read_preferences
from llama2_jax.text import chat_format as chat

HH_RAW = "hh-rlhf-harmless-base-test.jsonl"
HH_DERIVED = "hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl"
OASST_PAIRS = "oasst-en-100-pairs.jsonl"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def assert_prompt(prompt):
    roles = [m["role"] for m in prompt]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]


# ----------------------------------------------------------------------------------------------------------------------
# Real files


def read_clean_file(name: str, expected_format: str, expected_pairs: int):
    """The pairs of a shipped file, checking its format, that nothing was skipped or dropped, and every prompt."""
    path = shared_file(name)
    assert detect_format(path) == expected_format
    pairs, stats = read_preferences(path)
    assert len(pairs) == expected_pairs and stats.skipped == stats.dropped == 0
    for pair in pairs:
        assert_prompt(pair.prompt)
        assert pair.rating is None
    return pairs


def test_hh_derived_file():
    pairs = read_clean_file(HH_DERIVED, "hh_prompt", 2307)
    for pair in pairs:
        assert pair.is_safety is False
        assert pair.chosen == pair.chosen.strip() and pair.chosen != pair.rejected
    assert pairs[0].prompt[0] == u("what are some pranks with a pen i can do?")
    assert pairs[0].chosen.startswith("No, sorry!")


def test_hh_raw_file_matches_derived(caplog):
    with caplog.at_level(logging.WARNING, logger="llama2_jax.data.dialogs"):
        pairs, stats = read_preferences(shared_file(HH_RAW), is_safety=True)
    assert stats.format == "hh" and stats.records == 2312 and stats.skipped == 0
    assert len(pairs) == 2312 - stats.dropped == 2307
    assert stats.drop_reasons == {"chosen and rejected differ before the last Assistant turn": 5}
    assert "dropped 5 record(s) of 2312" in caplog.text
    assert all(p.is_safety for p in pairs)
    derived, _ = read_preferences(shared_file(HH_DERIVED), is_safety=True)
    assert pairs == derived


def test_oasst_pairs_file():
    pairs = read_clean_file(OASST_PAIRS, "oasst_pairs", 417)
    assert collections.Counter(len(p.prompt) for p in pairs) == {1: 219, 3: 195, 5: 3}


def test_real_pairs_encode(llama_tokenizer_path):
    from llama2_jax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(llama_tokenizer_path)
    pairs, _ = read_preferences(shared_file(OASST_PAIRS))
    for pair in pairs[:50]:
        chosen, rejected = encode_pair(tokenizer, pair)
        prompt = chat.encode_dialog(tokenizer, pair.prompt)
        for tokens, response in ((chosen, pair.chosen), (rejected, pair.rejected)):
            assert tokens[: len(prompt)] == prompt  # the generation prompt is a token prefix of prompt + response
            assert tokens[-2:] == [29871, tokenizer.eos_id]
            assert tokenizer.decode(tokens[len(prompt):-1]).strip() == response.strip()


# ----------------------------------------------------------------------------------------------------------------------
# Hand-written files


def test_hh_transcripts_by_hand(tmp_path):
    prompt = "\n\nHuman: Can you help me?\n\nAssistant: Sure, with what?\n\nHuman: My pen leaks.\n\nAssistant:"
    raw = {"chosen": prompt + " Try a new cartridge.", "rejected": prompt + " Throw it away."}
    derived = {"prompt": prompt, "chosen": " Try a new cartridge.", "rejected": " Throw it away."}
    expected = PreferencePair([u("Can you help me?"), a("Sure, with what?"), u("My pen leaks.")],
                              "Try a new cartridge.", "Throw it away.")
    raw_path, derived_path = write_jsonl(tmp_path / "raw.jsonl", [raw]), write_jsonl(tmp_path / "d.jsonl", [derived])
    assert (detect_format(raw_path), detect_format(derived_path)) == ("hh", "hh_prompt")
    assert read_preferences(raw_path)[0] == [expected]
    assert read_preferences(derived_path)[0] == [expected]


def test_jsonl_format(tmp_path):
    records = [
        {"prompt": "Plain string prompt", "chosen": "good", "rejected": "bad", "rating": "Slightly Better"},
        {"prompt": [{"role": "system", "content": "S"}, u("q"), a("x"), u("q2")], "chosen": "c", "rejected": "r",
         "rating": None, "is_safety": True},
        {"prompt": "same", "chosen": "tie", "rejected": "tie"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    assert detect_format(path) == "jsonl"
    pairs, stats = read_preferences(path)
    assert pairs == [
        PreferencePair([u("Plain string prompt")], "good", "bad", "slightly_better", False),
        PreferencePair(records[1]["prompt"], "c", "r", None, True),
    ]
    assert stats.dropped == 1 and stats.drop_reasons == {"chosen == rejected": 1}
    overridden, _ = read_preferences(path, is_safety=False)
    assert [p.is_safety for p in overridden] == [False, False]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r", "rating": "much better"}, "rating 'much better'"),
        ({"prompt": [u("q"), a("x")], "chosen": "c", "rejected": "r"}, "message 1 is the last one"),
        ({"prompt": "p", "chosen": "c"}, "missing key(s) 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' is int"),
        ({"prompt": 5, "chosen": "c", "rejected": "r"}, "'prompt' is int"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "is_safety": "yes"}, "'is_safety' is str"),
        ("[broken", "invalid JSON"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, bad, reason):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, bad, good])
    with pytest.raises(ValueError) as info:
        read_preferences(path, format="jsonl")
    assert str(info.value).startswith(f"{path}:2: ") and reason in str(info.value)
    pairs, stats = read_preferences(path, format="jsonl", on_error="skip")
    assert len(pairs) == 2 and stats.skipped == 1 and stats.errors[0].startswith(f"{path}:2: ")


def test_hh_errors(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        {"chosen": "\n\nHuman: no assistant turn", "rejected": "\n\nHuman: no assistant turn"},
        {"chosen": "\n\nHuman: q\n\nAssistant: x\n\nAssistant: y",
         "rejected": "\n\nHuman: q\n\nAssistant: x\n\nAssistant: z"},
    ])
    with pytest.raises(ValueError, match=r"hh\.jsonl:2: HH transcript has no '\\n\\nAssistant:' turn"):
        read_preferences(path, format="hh")
    pairs, stats = read_preferences(path, format="hh", on_error="skip")
    assert len(pairs) == 1 and stats.skipped == 2
    assert "hh.jsonl:3: HH prompt does not end with a Human turn" in stats.errors[1]


def test_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="unknown preference format.*known formats: jsonl, oasst_pairs, hh, hh_prompt"):
        read_preferences(path)
    with pytest.raises(ValueError, match="unknown preference format 'dpo'"):
        read_preferences(path, format="dpo")


def test_pair_validation():
    with pytest.raises(ValueError, match="rating"):
        PreferencePair([u("q")], "c", "r", rating="best")
    with pytest.raises(ValueError, match="expected 'user'"):
        PreferencePair([u("q"), a("a")], "c", "r")


def test_encode_pair_equals_training_encoding(llama_tokenizer_path):
    from llama2_jax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(llama_tokenizer_path)
    pair = PreferencePair([{"role": "system", "content": "S"}, u("q1"), a("a1"), u("Café 中文?")], " yes ", "no")
    chosen, rejected = encode_pair(tokenizer, pair)
    assert chosen == chat.encode_dialog_for_training(tokenizer, pair.prompt + [a(" yes ")])[0]
    assert rejected == chat.encode_dialog_for_training(tokenizer, pair.prompt + [a("no")])[0]
    assert chosen.count(tokenizer.bos_id) == 2 and chosen[-1] == tokenizer.eos_id
