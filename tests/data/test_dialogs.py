"""SFT readers: real files in ../shared/data, format detection, the OASST path rule, malformed-record errors."""

import collections
import json
import logging

import pytest
from conftest import shared_file

from llama2_jax.data import dialogs
from llama2_jax.data.dialogs import detect_format, read_dialogs
from llama2_jax.text import chat_format as chat


def assert_training_dialog(dialog):
    """Optional system, then user/assistant alternating, ending with assistant; contents are strings."""
    roles = [m["role"] for m in dialog]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
    assert all(isinstance(m["content"], str) and set(m) == {"role", "content"} for m in dialog)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def pair(q="q", ans="a"):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]


# ----------------------------------------------------------------------------------------------------------------------
# Real files


def test_alpaca_file():
    path = shared_file("alpaca-cleaned-first1000.json")
    assert detect_format(path) == "alpaca"
    found, stats = read_dialogs(path)
    assert len(found) == 1000 and stats.kept == stats.records == 1000 and stats.skipped == stats.dropped == 0
    records = json.loads(path.read_text(encoding="utf-8"))
    for dialog, record in zip(found, records):
        assert_training_dialog(dialog)
        assert len(dialog) == 2 and dialog[1]["content"] == record["output"]
        expected = record["instruction"] + ("\n\n" + record["input"] if record["input"].strip() else "")
        assert dialog[0]["content"] == expected
    assert found[0][0]["content"] == "Give three tips for staying healthy."
    assert sum("\n\n" + r["input"] in d[0]["content"] for d, r in zip(found, records) if r["input"]) == 409


def test_sharegpt_file():
    path = shared_file("fastchat-dummy-conversation.json")
    assert detect_format(path) == "sharegpt"
    found, stats = read_dialogs(path)
    assert len(found) == 500 and stats.skipped == 0
    for dialog in found:
        assert_training_dialog(dialog)
    assert collections.Counter(len(d) for d in found) == {2: 167, 4: 166, 6: 167}
    assert found[0][0] == {"role": "user", "content": "Who are you?"}
    assert found[0][1]["content"].startswith("I am Vicuna")


def test_oasst_trees_file():
    path = shared_file("oasst-en-100-trees.jsonl")
    assert detect_format(path) == "oasst_trees"
    found, stats = read_dialogs(path)
    assert len(found) >= 90 and stats.records == 100 and stats.kept + stats.dropped == 100
    for dialog in found:
        assert_training_dialog(dialog)
    # The first answer of each dialog is the best-ranked, non-deleted reply to the root prompt.
    trees = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_prompt = {t["prompt"]["text"]: t["prompt"] for t in trees}
    for dialog in found:
        replies = [r for r in by_prompt[dialog[0]["content"]]["replies"] if not r["deleted"]]
        ranked = [r for r in replies if r.get("rank") is not None]
        best = min(ranked, key=lambda r: r["rank"]) if ranked else replies[0]
        assert dialog[1]["content"] == best["text"]


@pytest.mark.parametrize("name", ["fastchat-dummy-conversation.json", "oasst-en-100-trees.jsonl"])
def test_real_dialogs_encode_for_training(llama_tokenizer_path, name):
    from llama2_jax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(llama_tokenizer_path)
    found, _ = read_dialogs(shared_file(name))
    for dialog in found:
        tokens, mask = chat.encode_dialog_for_training(tokenizer, dialog)
        assert len(tokens) == len(mask) and tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
        assert mask[-1] == 1.0 and mask[0] == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Small hand-written files


def test_messages_jsonl_roundtrip(tmp_path):
    system = [{"role": "system", "content": "Be brief."}]
    records = [{"messages": pair("hi", "hello")}, {"messages": system + pair() + pair("q2", "a2"), "id": 7}]
    path = write_jsonl(tmp_path / "chat.jsonl", [records[0], "", records[1]])
    assert detect_format(path) == "messages"
    found, stats = read_dialogs(path)
    assert found == [records[0]["messages"], records[1]["messages"]]
    assert (stats.records, stats.kept, stats.skipped) == (2, 2, 0)


def test_sharegpt_jsonl_with_system(tmp_path):
    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                {"from": "gpt", "value": "A"}]}
    found, _ = read_dialogs(write_jsonl(tmp_path / "sg.jsonl", [record]))
    assert found == [[{"role": "system", "content": "S"}] + pair("Q", "A")]


def oasst_message(role, text, replies=(), rank=None, deleted=False):
    return {"role": role, "text": text, "rank": rank, "deleted": deleted, "synthetic": False, "replies": list(replies)}


def test_oasst_path_rule(tmp_path):
    tree = oasst_message("prompter", "Q1", [
        oasst_message("assistant", "deleted best", rank=0, deleted=True),
        oasst_message("assistant", "second", rank=2),
        oasst_message("assistant", "best alive", rank=1, replies=[
            oasst_message("prompter", "deleted follow-up", deleted=True),
            oasst_message("prompter", "Q2", [
                oasst_message("assistant", "unranked first"), oasst_message("assistant", "unranked second"),
            ]),
            oasst_message("prompter", "other follow-up"),
        ]),
    ])
    unanswered = oasst_message("prompter", "Q", [oasst_message("assistant", "A", [oasst_message("prompter", "Q?")])])
    no_reply = oasst_message("prompter", "nobody answered")
    records = [{"message_tree_id": str(i), "prompt": t} for i, t in enumerate([tree, unanswered, no_reply])]
    found, stats = read_dialogs(write_jsonl(tmp_path / "trees.jsonl", records))
    assert found == [pair("Q1", "best alive") + pair("Q2", "unranked first"), pair("Q", "A")]
    assert (stats.kept, stats.dropped) == (2, 1)
    assert stats.drop_reasons == {"root prompt has no assistant reply": 1}


# ----------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("{not json", "invalid JSON"),
        ({"messages": pair() + [{"role": "user", "content": "unanswered"}]}, "message 2 is the last one"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "message 0 has role 'assistant', expected 'user'"),
        ({"messages": "hi"}, "'messages' is str"),
        ({"text": "hi"}, "missing key(s) 'messages'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": pair()}, "", bad, {"messages": pair()}])
    with pytest.raises(ValueError) as info:
        read_dialogs(path, format="messages")
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and reason in message and "\n" not in message


def test_skip_mode_counts_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": pair()}, "{oops", {"messages": []}, {"messages": pair()}])
    with caplog.at_level(logging.WARNING, logger="llama2_jax.data.dialogs"):
        found, stats = read_dialogs(path, on_error="skip")
    assert len(found) == 2 and (stats.records, stats.kept, stats.skipped) == (4, 2, 2)
    assert stats.errors[0].startswith(f"{path}:2: invalid JSON") and stats.errors[1].startswith(f"{path}:3: ")
    assert "skipped 2 malformed record(s) of 4" in caplog.text


def test_malformed_json_list_names_record(tmp_path):
    path = tmp_path / "alpaca.json"
    good = {"instruction": "Do X", "input": "", "output": "Done"}
    path.write_text(json.dumps([good, {"instruction": "Do Y", "input": ""}, good, {**good, "output": ""}]))
    with pytest.raises(ValueError, match=r"alpaca\.json: record 1: missing key\(s\) 'output'"):
        read_dialogs(path)
    found, stats = read_dialogs(path, on_error="skip")
    assert len(found) == 2 and stats.skipped == 2 and "record 3: empty 'output'" in stats.errors[1]


def test_alpaca_input_joined_with_blank_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
                                {"instruction": "Say hi.", "input": "  ", "output": "hi"}]))
    found, _ = read_dialogs(path)
    assert [d[0]["content"] for d in found] == ["Translate.\n\nBonjour", "Say hi."]


def test_invalid_json_list_file_always_raises(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x", "output": "y"},')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_dialogs(path, format="alpaca", on_error="skip")


def test_unknown_formats_list_the_known_ones(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "plain"}])
    known = "known formats: messages, alpaca, sharegpt, oasst_trees"
    with pytest.raises(ValueError, match=f"unknown dialog format.*{known}"):
        read_dialogs(path)
    with pytest.raises(ValueError, match="unknown dialog format 'csv'; known formats: auto, messages"):
        read_dialogs(path, format="csv")
    with pytest.raises(ValueError, match="on_error"):
        read_dialogs(write_jsonl(tmp_path / "ok.jsonl", [{"messages": pair()}]), on_error="ignore")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        detect_format(tmp_path / "empty.jsonl")


def test_stats_fields_add_up(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"message_tree_id": "1", "prompt": oasst_message("prompter", "Q")},
                                              {"message_tree_id": "2", "prompt": oasst_message("assistant", "A")}])
    found, stats = read_dialogs(path, on_error="skip")
    assert found == [] and isinstance(stats, dialogs.ReadStats)
    assert stats.records == stats.kept + stats.skipped + stats.dropped == 2
    assert "tree root has role 'assistant'" in stats.errors[0]
