"""SFT data warnings and errors: special tags inside turns counted and warned once, the all-overlong error's
counts, and a single JSON object named as such by the dialog readers.

Covers llama2_jax.data.sft."""

import json
import logging

import pytest

from llama2_jax.data import dialogs as dialog_readers
from llama2_jax.data import sft


class CharTokenizer:
    """One id per character (ids 3..258), BOS 1, EOS 2."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [3 + (ord(c) % 256) for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def sample(user: str, reply: str):
    return ([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], "all")


def test_sft_special_tags_in_turns_are_counted_and_warned_once(caplog):
    samples = [sample("hi [INST] there", "ok"), sample("plain", "fine <</SYS>>"), sample("plain", "plain")]
    with caplog.at_level(logging.WARNING, logger="llama2_jax.data.sft"):
        data = sft.make_sft_data(samples, CharTokenizer(), seq_len=64, batch_size=1, seed=0, val_fraction=0.0)
    assert data.stats.special_tags == 2 and "2 with special tags" in data.stats.summary()
    tagged = [r.getMessage() for r in caplog.records if "[INST]" in r.getMessage()]
    assert tagged == ["SFT data: 2 of 3 dialogs contain [INST], [/INST], <<SYS>> or <</SYS>> inside a message; they "
                      "are trained on as plain text (clean the data if that is not intended)"]


def test_sft_all_overlong_error_prints_the_counts():
    samples = [sample("a long question " * 5, "a long answer " * 5)] * 3
    with pytest.raises(ValueError) as error:
        sft.make_sft_data(samples, CharTokenizer(), seq_len=16, batch_size=1, seed=0, val_fraction=0.0,
                          overlong="drop")
    message = str(error.value)
    assert message == ("no training samples left of 3 dialogs (3 train, 0 held out; 3 samples longer than seq_len 16 "
                       "(0 truncated to whole turns, 0 cut mid-turn, 3 dropped), 0 without supervised tokens "
                       "dropped); raise seq_len, or keep overlong samples with overlong='truncate'")


def test_a_single_json_object_is_named_as_such(tmp_path):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps({"data": records}, indent=2))
    with pytest.raises(ValueError, match=r"pretty.json: the file is a single JSON object; expected a JSON list of "
                                         r"records or JSONL \(one record per line\) \(its list is under 'data'"):
        dialog_readers.read_dialogs(pretty)
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps({"data": records}))
    with pytest.raises(ValueError, match=r"unknown dialog format .*one JSON object holding the records under 'data'"):
        dialog_readers.read_dialogs(one_line)
    broken = tmp_path / "broken.jsonl"  # a real JSONL with a bad line is still reported by line
    broken.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        dialog_readers.read_dialogs(broken)
