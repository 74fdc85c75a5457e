"""Meta's chat format (llama/generation.py): prompt tokens, role checks, special tags, SFT loss masks, HH transcripts."""

import logging
import re

import pytest
from conftest import shared_file
from helpers.messages import assistant as a
from helpers.messages import system as s
from helpers.messages import user as u

from llama2_jax.text import chat_format as chat
from llama2_jax.text.tokenizer import Tokenizer

BOS, EOS, SPACE_PIECE = 1, 2, 29871
INST_TOKENS = [518, 25580, 29962]  # "[INST]"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shared_file("llama2-tokenizer.model"))


def meta_chat_prompt_tokens(tokenizer, dialog):
    """Literal copy of the prompt construction in Meta's `llama/generation.py` `chat_completion` (one dialog)."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
        [msg["role"] == "assistant" for msg in dialog[1::2]]
    )
    dialog_tokens = sum(
        [
            tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    assert dialog[-1]["role"] == "user", f"Last message must be from user, got {dialog[-1]['role']}"
    dialog_tokens += tokenizer.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return dialog_tokens


PROMPT_DIALOGS = [
    [u("hi")],
    [u("  What is the capital of France?  \n")],
    [s("Always answer in French."), u("What is the capital of France?")],
    [s("  padded system \n"), u("  padded user  ")],
    [u("hi"), a("Hello! How can I help?"), u("Tell me a joke.")],
    [s("You are terse."), u("2+2?"), a(" 4 "), u("And 3+3?")],
    [u("Café crème, s'il vous plaît"), a("Voilà: un café crème ☕"), u("Merci !")],
    [u("你好，请介绍一下中文分词。"), a("中文分词是把句子切成词语。"), u("举个例子 🙂")],
    [u("emoji only 😀🎉"), a("🚀"), u("ok"), a("\n\nfine\n"), u("\tbye\t")],
    [s(""), u("empty system")],
    [u("q1"), a("a1"), u("q2"), a("a2"), u("q3"), a("a3"), u("q4")],
    [u("1234 digits 5678"), a("  "), u("empty answer before this")],
    [s("multi\nline\nsystem"), u("line one\nline two"), a("answer\n\nwith blank line"), u("last\n")],
]


@pytest.mark.parametrize("dialog", PROMPT_DIALOGS, ids=range(len(PROMPT_DIALOGS)))
def test_encode_dialog_matches_meta(tok, dialog):
    assert chat.encode_dialog(tok, dialog) == meta_chat_prompt_tokens(tok, dialog)


def test_encode_dialog_hand_checked_tokens(tok):
    hi = [BOS, *INST_TOKENS, 7251, 518, 29914, 25580, 29962]  # <s> "[INST]" "▁hi" "▁[" "/" "INST" "]"
    assert chat.encode_dialog(tok, [u("hi")]) == hi
    pair = [BOS, *INST_TOKENS, 7251, 518, 29914, 25580, 29962, 15043, SPACE_PIECE, EOS]  # ... "▁Hello" "▁" </s>
    assert chat.encode_dialog(tok, [u("hi"), a("Hello"), u("hi")]) == pair + hi
    assert chat.encode_dialog(tok, [u(" hi\n"), a("\tHello  "), u("hi ")]) == pair + hi


def test_constants_and_system_strip_only_outer_ends(tok):
    assert chat.B_SYS == "<<SYS>>\n" and chat.E_SYS == "\n<</SYS>>\n\n"
    assert chat.SPECIAL_TAGS == ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
    tokens = chat.encode_dialog(tok, [s("  sys  "), u("  hi  ")])
    assert tokens[0] == BOS
    assert tok.decode(tokens[1:]) == "[INST] <<SYS>>\n  sys  \n<</SYS>>\n\n  hi [/INST]"


@pytest.mark.parametrize(
    "dialog, where",
    [
        ([a("hi")], "message 0 has role 'assistant', expected 'user'"),
        ([s("sys"), a("hi")], "message 1 has role 'assistant', expected 'user'"),
        ([u("q"), u("q")], "message 1 has role 'user', expected 'assistant'"),
        ([s("sys"), u("q"), s("again"), u("q")], "message 2 has role 'system', expected 'assistant'"),
        ([u("q"), a("a")], "message 1 is the last one and has role 'assistant', expected 'user'"),
        ([s("sys")], "system message but no message after it"),
        ([], "dialog is empty"),
        ([{"role": "bot", "content": "x"}], "message 0 has role 'bot'"),
        ([{"role": "user"}], "message 0 (user) has content of type NoneType"),
        (["hello"], "message 0 is a str"),
    ],
)
def test_role_order_errors(tok, dialog, where):
    with pytest.raises(ValueError, match=re.escape(where)) as info:
        chat.encode_dialog(tok, dialog)
    assert "\n" not in str(info.value)


def test_training_requires_final_assistant(tok):
    with pytest.raises(ValueError, match="message 0 is the last one and has role 'user', expected 'assistant'"):
        chat.encode_dialog_for_training(tok, [u("q")])
    with pytest.raises(ValueError, match="train_on"):
        chat.encode_dialog_for_training(tok, [u("q"), a("a")], train_on="first")


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_special_tags(tag, index):
    dialog = [s("be nice"), u("hello"), a("hi")]
    dialog[index] = {**dialog[index], "content": f"text {tag} text"}
    assert chat.dialog_has_special_tags(dialog)


def test_no_special_tags():
    assert not chat.dialog_has_special_tags([s("<SYS> [INST"), u("INST] [ /INST] <</ SYS>>"), a("<<SYS>")])
    assert chat.UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."


# ----------------------------------------------------------------------------------------------------------------------
# Training encoding and loss masks

TRAIN_DIALOGS = [
    [u("hi"), a("Hello")],
    [s("Answer briefly."), u("  What is 2+2? "), a("  4  ")],
    [u("Café?"), a("Oui, un café ☕."), u("中文呢？"), a("咖啡 🙂")],
    [s("sys"), u("q1"), a("a1 with 123 digits"), u("q2"), a("\nline\n\nbreaks\n"), u("q3"), a("a3")],
    [u("empty answer"), a("")],
]


def runs(mask, value):
    """Index ranges of maximal runs where mask == value."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [None]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append(range(start, i))
            start = None
    return out


@pytest.mark.parametrize("dialog", TRAIN_DIALOGS, ids=range(len(TRAIN_DIALOGS)))
def test_training_tokens_equal_meta_encoding(tok, dialog):
    tokens, mask = chat.encode_dialog_for_training(tok, dialog)
    assert len(tokens) == len(mask)
    with_next = meta_chat_prompt_tokens(tok, dialog + [u("next")])
    assert with_next == tokens + tok.encode("[INST] next [/INST]", bos=True)


@pytest.mark.parametrize("dialog", TRAIN_DIALOGS, ids=range(len(TRAIN_DIALOGS)))
def test_prompt_tokens_are_a_token_prefix_of_each_pair(tok, dialog):
    messages = chat.merge_system_message(dialog)
    for user, answer in zip(messages[0::2], messages[1::2]):
        prefix = tok.encode(f"[INST] {user['content'].strip()} [/INST]", bos=True)
        full = tok.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ", bos=True, eos=True)
        assert full[: len(prefix)] == prefix
        # ... and the rest is the answer, the lone "▁" piece (merged into "▁▁" when the answer is empty) and EOS.
        rest = full[len(prefix):]
        assert rest[-1] == EOS
        assert tok.decode(rest[:-1]) == (answer["content"].strip() + " " if answer["content"].strip() else " ")


@pytest.mark.parametrize("dialog", TRAIN_DIALOGS, ids=range(len(TRAIN_DIALOGS)))
def test_loss_mask_is_exactly_the_assistant_tokens(tok, dialog):
    tokens, mask = chat.encode_dialog_for_training(tok, dialog)
    answers = [m["content"].strip() for m in dialog if m["role"] == "assistant"]
    users = [m for m in chat.merge_system_message(dialog) if m["role"] == "user"]
    trained, untrained = runs(mask, 1.0), runs(mask, 0.0)
    assert len(trained) == len(untrained) == len(answers)
    assert set(mask) <= {0.0, 1.0}
    for span, answer in zip(trained, answers):
        answer_tokens = [tokens[i] for i in span]
        assert answer_tokens[-1] == EOS
        assert tok.decode(answer_tokens[:-1]).strip() == answer  # the answer and the trailing "▁" piece
        if answer:
            assert answer_tokens[-2] == SPACE_PIECE
    for span, user in zip(untrained, users):
        prompt_tokens = [tokens[i] for i in span]
        assert prompt_tokens[0] == BOS and EOS not in prompt_tokens
        assert tok.decode(prompt_tokens[1:]) == f"[INST] {user['content'].strip()} [/INST]"


@pytest.mark.parametrize("dialog", TRAIN_DIALOGS, ids=range(len(TRAIN_DIALOGS)))
def test_train_on_last_masks_previous_turns(tok, dialog):
    tokens, mask_all = chat.encode_dialog_for_training(tok, dialog, train_on="all")
    tokens_last, mask_last = chat.encode_dialog_for_training(tok, dialog, train_on="last")
    assert tokens_last == tokens
    last_pair_start = max(i for i, t in enumerate(tokens) if t == BOS)
    assert all(m == 0.0 for m in mask_last[:last_pair_start])
    assert mask_last[last_pair_start:] == mask_all[last_pair_start:]
    assert sum(mask_last) > 0
    assert chat.mask_previous_turns(tokens, mask_all, BOS) == mask_last


def test_single_turn_mask_by_hand(tok):
    tokens, mask = chat.encode_dialog_for_training(tok, [u("hi"), a("Hello")])
    assert tokens == [BOS, *INST_TOKENS, 7251, 518, 29914, 25580, 29962, 15043, SPACE_PIECE, EOS]
    assert mask == [0.0] * 9 + [1.0, 1.0, 1.0]


class MergingTokenizer:
    """Toy character tokenizer that merges "] " into one token, so the prompt is not a token prefix of the pair."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("] ", i):
                ids.append(999)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return [self.bos_id] * bos + ids + [self.eos_id] * eos


def test_boundary_fallback_when_prompt_is_not_a_token_prefix(caplog):
    tokenizer = MergingTokenizer()
    with caplog.at_level(logging.WARNING, logger="llama2_jax.chat"):
        tokens, mask = chat.encode_dialog_for_training(tokenizer, [u("q"), a("ok")])
    assert "not a token prefix" in caplog.text
    straddling = tokens.index(999, tokens.index(ord("/")))  # the "] " that ends "[/INST]" and starts the answer
    assert mask[straddling:] == [1.0] * (len(tokens) - straddling)
    assert mask[:straddling] == [0.0] * straddling


# ----------------------------------------------------------------------------------------------------------------------
# HH transcripts


def test_parse_hh_transcript():
    text = ("\n\nHuman: What is a good pen?  \n\nAssistant: A ballpoint.\n\nHuman: Why?\nHuman: still me"
            "\n\nAssistant:  It is cheap. ")
    assert chat.parse_hh_transcript(text) == [
        u("What is a good pen?"), a("A ballpoint."), u("Why?\nHuman: still me"), a("It is cheap."),
    ]


def test_parse_hh_prompt_drops_trailing_assistant_marker_and_merges_repeats():
    assert chat.parse_hh_transcript("\n\nHuman: hi\n\nAssistant:") == [u("hi")]
    text = "\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two\n\nHuman: ok\n\nAssistant:"
    assert chat.parse_hh_transcript(text) == [u("hi"), a("one\n\ntwo"), u("ok")]


@pytest.mark.parametrize("text", ["Human: hi", "intro\n\nHuman: hi", "\n\nAssistant: hi\n\nHuman: x", ""])
def test_parse_hh_transcript_errors(text):
    with pytest.raises(ValueError):
        chat.parse_hh_transcript(text)
