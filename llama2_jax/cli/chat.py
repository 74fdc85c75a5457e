"""`python -m llama2_jax.chat`: interactive multi-turn chat with a Llama 2 chat model, streaming each reply.

  python -m llama2_jax.chat --checkpoint=DIR --tokenizer=PATH [--system="You are a pirate."]
      [--temperature=0.6 --top_p=0.9 --max_gen_len=N --seed=1 --chunk=16 --dtype=float32]

The dialog history is kept and re-encoded every turn in Meta's format (chat.encode_dialog); when it no longer fits in
max_seq_len the oldest (user, assistant) pairs are dropped (the system message stays). Replies are decoded `chunk`
tokens per compiled call (generate.stream_reply) and printed as they come. Commands: /reset clears the history, /exit
(or Ctrl-D) quits. A message containing Meta's special tags is answered with chat.UNSAFE_ERROR and not added to the
history.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, Optional, Sequence, TextIO

import jax

from llama2_jax.cli.common import add_sampling_flags, check_sampling_flags, check_utf8, fail, load_model_or_exit
from llama2_jax.inference.generate import stream_reply
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text import chat_format as chat

MIN_REPLY_TOKENS = 64  # history is trimmed to leave min(this, max_gen_len) tokens for the reply
DEFAULT_CHUNK = 16


def fit_history(tokenizer, dialog: list[dict], max_prompt_len: int) -> list[dict]:
    """Drop the oldest (user, assistant) pairs (never the system message or the last user message) until the
    encoded dialog has at most max_prompt_len tokens. Raises ValueError when even the last message does not fit."""
    system = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    while len(chat.encode_dialog(tokenizer, system + turns)) > max_prompt_len:
        if len(turns) < 3:
            raise ValueError(f"the message does not fit in {max_prompt_len} prompt tokens; send a shorter one")
        turns = turns[2:]
    return system + turns


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_repl(params: dict, cfg: LlamaConfig, tokenizer, *, system: Optional[str] = None, seed: int = 1,
             max_gen_len: Optional[int] = None, temperature: float = DEFAULT_TEMPERATURE,
             top_p: float = DEFAULT_TOP_P, chunk: int = DEFAULT_CHUNK,
             read: Optional[Callable[[str], str]] = None, out: Optional[TextIO] = None) -> list[dict]:
    """The chat loop: read a line (default `input`), answer it with a streamed reply (default to stdout). Returns the
    final dialog (for tests)."""
    read, out = read or input, out or sys.stdout
    base = [{"role": "system", "content": system}] if system else []
    dialog = list(base)
    rng = jax.random.PRNGKey(seed)
    print("Chat: /reset clears the history, /exit (or Ctrl-D) quits.", file=out)
    for turn in itertools.count():
        try:
            line = read("user> ")
        except EOFError:
            break
        except UnicodeDecodeError:  # a strict UTF-8 stdin
            line = "\udcff"
        if not is_utf8(line):  # a non-UTF-8 terminal or pipe (Python keeps the bytes as lone surrogates)
            print("error: the message is not valid UTF-8 text; send it again", file=out)
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            dialog = list(base)
            continue
        if not line.strip():
            continue
        asked = dialog + [{"role": "user", "content": line}]
        if chat.dialog_has_special_tags(asked):
            print(f"assistant> {chat.UNSAFE_ERROR}", file=out)
            continue
        try:
            asked = fit_history(tokenizer, asked, cfg.max_seq_len - min(max_gen_len or MIN_REPLY_TOKENS,
                                                                        MIN_REPLY_TOKENS))
        except ValueError as error:
            print(f"error: {error}", file=out)
            continue
        print("assistant> ", end="", file=out, flush=True)
        pieces = []
        for piece in stream_reply(params, cfg, tokenizer, asked, rng=jax.random.fold_in(rng, turn),
                                  max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, chunk=chunk):
            print(piece, end="", file=out, flush=True)
            pieces.append(piece)
        print(file=out)
        dialog = asked + [{"role": "assistant", "content": "".join(pieces)}]
    return dialog


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags, checked (`error: ...` and exit 1 on a bad value)."""
    parser = argparse.ArgumentParser(prog="python -m llama2_jax.chat", description=__doc__.split("\n")[0])
    add_sampling_flags(parser)
    parser.add_argument("--system", default=None, help="system message (Meta uses none by default)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens decoded per compiled call (>= 1)")
    args = parser.parse_args(argv)
    check_sampling_flags(args)
    if args.chunk < 1:
        fail(f"--chunk must be >= 1, got {args.chunk}")
    if args.system is not None:
        check_utf8(args.system, "--system")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    params, cfg, tokenizer = load_model_or_exit(args)
    run_repl(params, cfg, tokenizer, system=args.system, seed=args.seed, max_gen_len=args.max_gen_len,
             temperature=args.temperature, top_p=args.top_p, chunk=args.chunk)


if __name__ == "__main__":
    main()
