"""Meta's Llama 2 chat format, token for token, plus per-token loss masks for fine-tuning.

A *dialog* is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.

Prompt construction (Meta's ``llama/generation.py`` ``chat_completion``):

* an optional leading system message is merged into the first user message as
  ``B_SYS + system + E_SYS + user`` (exactly Meta's string concatenation; the later ``strip()`` only trims the
  outer ends of the merged string);
* after merging, messages alternate user / assistant starting with user;
* each completed (user, assistant) pair is encoded *separately* as
  ``f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "`` with BOS and EOS (the trailing space becomes the lone
  "▁" piece 29871 before EOS);
* a final user message (the prompt for generation) is encoded as ``f"{B_INST} {user.strip()} {E_INST}"`` with BOS
  and without EOS.

Tokenizers: any object with ``encode(text, bos=False, eos=False) -> list[int]``, ``bos_id`` and ``eos_id`` (Meta
semantics, e.g. ``llama2_jax.text.tokenizer.Tokenizer``).
"""

from __future__ import annotations

import logging
import re
from typing import Literal, Mapping, Sequence

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all", "last")

Message = Mapping[str, str]
Dialog = Sequence[Message]

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def check_message(message: object, index: int) -> None:
    """Raise ValueError unless `message` is a dict with a known string role and a string content."""
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}, expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({role}) has content of type {type(content).__name__}, expected str")


def merge_system_message(dialog: Dialog) -> list[dict[str, str]]:
    """Meta's system merge: a leading system message is folded into the next message (role taken from that message).

    Returns a new list of plain dicts; the input is not modified. Validates every message's shape.
    """
    if not dialog:
        raise ValueError("dialog is empty")
    for i, message in enumerate(dialog):
        check_message(message, i)
    messages = [{"role": m["role"], "content": m["content"]} for m in dialog]
    if messages[0]["role"] != "system":
        return messages
    if len(messages) < 2:
        raise ValueError("dialog has a system message but no message after it; expected a user message at index 1")
    merged = {"role": messages[1]["role"], "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}
    return [merged] + messages[2:]


def check_role_order(messages: Dialog, last_role: Literal["user", "assistant"], offset: int = 0) -> None:
    """Raise ValueError unless roles alternate user/assistant from index 0 and the last message has `last_role`.

    `messages` is a dialog *after* the system merge; `offset` (1 when a system message was merged) is added to the
    index in the error message so that it points into the dialog as the caller wrote it.
    """
    if not messages:
        raise ValueError("dialog has no user message")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"message {i + offset} has role {message['role']!r}, expected {expected!r} "
                f"(after an optional leading system message, roles must alternate user/assistant)"
            )
    if messages[-1]["role"] != last_role:
        raise ValueError(f"message {len(messages) - 1 + offset} is the last one and has role "
                         f"{messages[-1]['role']!r}, expected {last_role!r}")


def normalize_dialog(dialog: Dialog, last_role: Literal["user", "assistant"]) -> list[dict[str, str]]:
    """Validate a dialog and return it with the system message merged (see `merge_system_message`).

    Raises ValueError naming the offending message index (as in `dialog`) on bad shapes or role order.
    """
    messages = merge_system_message(dialog)
    check_role_order(messages, last_role, offset=len(dialog) - len(messages))
    return messages


def dialog_has_special_tags(dialog: Dialog) -> bool:
    """True when any message (system included) contains one of SPECIAL_TAGS (chat_completion answers UNSAFE_ERROR)."""
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt strings and token encoding


def turn_prompt_string(user_content: str) -> str:
    """The user half of a turn: ``"[INST] {user} [/INST]"`` (the final-turn string, and the prefix of a pair)."""
    return f"{B_INST} {user_content.strip()} {E_INST}"


def turn_pair_string(user_content: str, answer_content: str) -> str:
    """A completed turn: ``"[INST] {user} [/INST] {answer} "``, note the trailing space."""
    return f"{turn_prompt_string(user_content)} {answer_content.strip()} "


def encode_dialog(tokenizer, dialog: Dialog) -> list[int]:
    """Tokens of a dialog ending with a user message, exactly as Meta's ``chat_completion`` builds its prompt.

    Raises ValueError on bad message shapes or role order. The special-tag check is separate
    (`dialog_has_special_tags`): Meta still generates for such dialogs and only replaces the answer.
    """
    messages = normalize_dialog(dialog, last_role="user")
    tokens: list[int] = []
    for user, answer in zip(messages[:-1:2], messages[1::2]):
        tokens += tokenizer.encode(turn_pair_string(user["content"], answer["content"]), bos=True, eos=True)
    tokens += tokenizer.encode(turn_prompt_string(messages[-1]["content"]), bos=True, eos=False)
    return tokens


def encode_turn_for_training(tokenizer, user_content: str, answer_content: str) -> tuple[list[int], int]:
    """Tokens of one completed pair (BOS ... EOS, as in `encode_dialog`) and the index where the answer starts.

    The answer is not tokenized on its own (SentencePiece's dummy prefix would change the first piece); instead the
    whole pair string and its ``"[INST] ... [/INST]"`` prefix are encoded, and the prefix tokens must be a token
    prefix of the pair tokens. With Llama 2's tokenizer this always holds, since the answer begins after a space and
    pieces never cross a space-to-word boundary. For another tokenizer where it does not hold, the boundary is the end
    of the longest common token prefix: the token that straddles "[/INST]" and the answer counts as answer (it must
    be generated), and a warning is logged.
    """
    full = tokenizer.encode(turn_pair_string(user_content, answer_content), bos=True, eos=True)
    prefix = tokenizer.encode(turn_prompt_string(user_content), bos=True, eos=False)
    if full[: len(prefix)] == prefix:
        return full, len(prefix)
    common = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(full), len(prefix)))
    _log.warning("prompt tokens are not a token prefix of the turn; answer boundary set at token %d", common)
    return full, common


def encode_dialog_for_training(
    tokenizer, dialog: Dialog, train_on: Literal["all", "last"] = "all"
) -> tuple[list[int], list[float]]:
    """Tokens and per-token loss mask of a dialog ending with an assistant message (SFT, rejection sampling, GAtt).

    The tokens equal Meta's encoding of all completed pairs (each pair BOS ... EOS): they are exactly the tokens that
    `encode_dialog(tokenizer, dialog + [next user message])` puts before the final "[INST] ... [/INST]" prompt.

    ``loss_mask[i]`` is 1.0 when token i is an assistant-output token and 0.0 otherwise. Assistant-output tokens are
    the answer's tokens *including* the trailing "▁" piece (29871) and the EOS that ends the answer: the model must
    learn to stop, and at inference it emits "▁" then EOS after its text. BOS, the "[INST] ... [/INST]" tokens and
    the system prompt are never trained. The mask is aligned with the tokens (it marks *targets*); a next-token loss
    uses ``loss_mask[1:]`` with logits from ``tokens[:-1]``.

    train_on:
      "all":  every assistant answer is trained (SFT: the paper, Section 3.1, zeroes the loss on user-prompt tokens).
      "last": only the last answer is trained; every token of previous turns, assistant turns included, has mask 0
              (Ghost Attention, the paper's Section 3.3).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}, expected one of {', '.join(TRAIN_ON)}")
    messages = normalize_dialog(dialog, last_role="assistant")
    tokens: list[int] = []
    loss_mask: list[float] = []
    pairs = list(zip(messages[0::2], messages[1::2]))
    for turn, (user, answer) in enumerate(pairs):
        pair_tokens, start = encode_turn_for_training(tokenizer, user["content"], answer["content"])
        trained = train_on == "all" or turn == len(pairs) - 1
        tokens += pair_tokens
        loss_mask += [0.0] * start + [1.0 if trained else 0.0] * (len(pair_tokens) - start)
    return tokens, loss_mask


def mask_previous_turns(tokens: Sequence[int], loss_mask: Sequence[float], bos_id: int) -> list[float]:
    """Zero the loss mask before the last BOS, i.e. on every token of previous turns (Ghost Attention).

    For a sequence from `encode_dialog_for_training(..., train_on="all")` this equals ``train_on="last"``.
    """
    if len(tokens) != len(loss_mask):
        raise ValueError(f"tokens ({len(tokens)}) and loss_mask ({len(loss_mask)}) differ in length")
    last_bos = max((i for i, t in enumerate(tokens) if t == bos_id), default=0)
    return [0.0] * last_bos + [float(m) for m in loss_mask[last_bos:]]


# ----------------------------------------------------------------------------------------------------------------------
# Anthropic HH transcripts

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an Anthropic HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into user/assistant messages.

    Rules:
      * turns start at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``; "Human:" without the blank line before it is text;
      * contents are stripped;
      * a final ``"\\n\\nAssistant:"`` with empty content (a generation prompt) is dropped, so such a prompt parses
        to a dialog ending with the user message; an empty final answer in a full transcript is dropped the same way
        by this function, so callers that need the answer must check the last role;
      * consecutive turns of the same role (a few HH transcripts have them) are merged into one, joined by a blank
        line, so that roles alternate.

    Raises ValueError when the text does not start with a Human turn (leading text other than whitespace).
    """
    parts = _HH_MARKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"not an HH transcript (expected it to start with '\\n\\nHuman:'): {text[:60]!r}")
    turns = [(_HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])]
    if turns[-1] == ("assistant", ""):
        turns.pop()
    messages: list[dict[str, str]] = []
    for role, content in turns:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    if messages[0]["role"] != "user":
        raise ValueError(f"HH transcript starts with an Assistant turn: {text[:60]!r}")
    return messages
