r"""Ghost Attention (paper section 3.3): an SFT dataset of dialogs where one instruction holds for every turn.

    python -m train.gatt --checkpoint=DIR --tokenizer=PATH --dialogs=FILE --out=FILE [--max_turns=N --seed=S ...]
    python -m train.sft --config=configs/sft_7b.py --config.init_from=DIR --config.data.path=FILE ...

For each source dialog (only its user messages are kept; its assistant replies are replaced by samples):
  1. an instruction is sampled (`llama2_jax.data.gatt_instructions`: hobby / language / public figure, 1-2 of them);
  2. it is concatenated to *every* user message, before it: f"{instruction}\n\n{user}" (full form);
  3. the current model samples the replies turn by turn (`generate.chat_completion`; all dialogs at turn k in one
     batched call), each turn seeing the augmented history and its own earlier replies;
  4. the training dialog keeps the instruction only in the first turn: it becomes the system message (Meta's format
     merges it into the first user turn inside <<SYS>>), terse ("Figure: Napoleon") half of the time; later user
     messages are the original ones;
  5. the record carries `"train_on": "last"`: `train.sft` zeroes the loss on every token of previous turns, assistant
     turns included, and trains the last reply only.
With `--samples=every_turn` (default) a dialog of n sampled turns gives n records (the dialog cut after turn 1..n,
each training its last turn), so every turn depth is trained; `--samples=last_turn` gives one record per dialog.

A dialog stops early (counted) when its next prompt would leave fewer than `--min_reply_tokens` of the model's
context, or when the model replies with nothing or with special tags. Source dialogs containing Meta's special tags
are skipped (counted).
Output: JSONL, one `{"messages": [...], "train_on": "last", "gatt": {"instruction", "terse", "turns"}}` per line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from typing import Callable, Optional, Sequence

from llama2_jax.cli.common import add_sampling_flags, check_sampling_flags, load_model
from llama2_jax.data import gatt_instructions
from llama2_jax.data.dialogs import read_dialogs
from llama2_jax.data.gatt_instructions import Instruction
from llama2_jax.inference import generate
from llama2_jax.paths import prepare_output_file
from llama2_jax.text import chat_format as chat
from llama2_jax.text.tokenizer import check_vocab
from llama2_jax.training import common

SAMPLES = ("every_turn", "last_turn")
Sampler = Callable[[list[list[dict]]], list[str]]  # dialogs ending with a user message -> reply contents


@dataclasses.dataclass
class GattStats:
    dialogs: int = 0  # source dialogs given
    skipped_special_tags: int = 0  # source dialogs containing [INST] / <<SYS>> tags
    used: int = 0  # dialogs with at least one sampled turn
    turns_sampled: int = 0
    stopped_context: int = 0  # dialogs cut because the next prompt did not fit the context
    stopped_bad_reply: int = 0  # dialogs cut at an empty sampled reply or one containing special tags
    records: int = 0
    terse: int = 0  # records whose instruction is in the terse form


@dataclasses.dataclass
class GattDialog:
    users: list[str]  # the source's user messages (at most max_turns)
    instruction: Instruction
    system: Optional[str] = None  # the source's system message, if any
    replies: list[str] = dataclasses.field(default_factory=list)
    done: bool = False


def augment(user: str, instruction: str) -> str:
    """A user message with the instruction concatenated (step 2)."""
    return f"{instruction}\n\n{user}"


def prepare(dialogs: Sequence[Sequence[dict]], rng: random.Random, stats: GattStats, *, max_turns: int = 0,
            max_constraints: int = 2, terse_probability: float = 0.5) -> list[GattDialog]:
    """Source dialogs -> GattDialogs with a sampled instruction each; special-tag dialogs are skipped."""
    items = []
    for dialog in dialogs:
        stats.dialogs += 1
        if chat.dialog_has_special_tags(dialog):
            stats.skipped_special_tags += 1
            continue
        system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
        users = [m["content"] for m in dialog if m["role"] == "user"]
        instruction = gatt_instructions.sample_instruction(rng, max_constraints, terse_probability)
        items.append(GattDialog(users=users[: max_turns or None], instruction=instruction, system=system))
    return items


def sampling_prompt(item: GattDialog) -> list[dict]:
    """The dialog the model continues at the next turn: the instruction in every user message, earlier replies."""
    messages = [{"role": "system", "content": item.system}] if item.system is not None else []
    for turn, user in enumerate(item.users[: len(item.replies) + 1]):
        messages.append({"role": "user", "content": augment(user, item.instruction.full)})
        if turn < len(item.replies):
            messages.append({"role": "assistant", "content": item.replies[turn]})
    return messages


def sample_replies(items: list[GattDialog], sampler: Sampler, stats: GattStats,
                   fits: Callable[[list[dict]], bool] = lambda dialog: True) -> None:
    """Fill `item.replies` turn by turn (step 3); one sampler call per turn for every dialog still going."""
    for turn in range(max((len(item.users) for item in items), default=0)):
        ready, prompts = [], []
        for item in items:
            if item.done or turn >= len(item.users):
                continue
            prompt = sampling_prompt(item)
            if fits(prompt):
                ready.append(item)
                prompts.append(prompt)
            else:
                item.done = True
                stats.stopped_context += 1
        if not ready:
            break
        for item, reply in zip(ready, sampler(prompts), strict=True):
            if reply.strip() and not any(tag in reply for tag in chat.SPECIAL_TAGS):
                item.replies.append(reply)
                stats.turns_sampled += 1
            else:
                item.done = True
                stats.stopped_bad_reply += 1


def training_dialog(item: GattDialog, turns: int) -> list[dict]:
    """Turns 1..`turns` with the instruction only in the first turn, as the system message (step 4)."""
    text = item.instruction.text
    system = text if item.system is None else f"{item.system}\n\n{text}"
    messages = [{"role": "system", "content": system}]
    for user, reply in zip(item.users[:turns], item.replies[:turns]):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def build_records(items: list[GattDialog], samples: str, stats: GattStats) -> list[dict]:
    """SFT records (step 5): `"train_on": "last"`; one per sampled turn (every_turn) or per dialog (last_turn)."""
    if samples not in SAMPLES:
        raise ValueError(f"samples={samples!r}, expected one of {', '.join(SAMPLES)}")
    records = []
    for item in items:
        n = len(item.replies)
        stats.used += n > 0
        for turns in (range(1, n + 1) if samples == "every_turn" else [n] if n else []):
            meta = {"instruction": item.instruction.text, "terse": item.instruction.terse, "turns": turns}
            records.append({"messages": training_dialog(item, turns), "train_on": "last", "gatt": meta})
            stats.terse += item.instruction.terse
    stats.records = len(records)
    return records


def make_gatt_records(dialogs: Sequence[Sequence[dict]], sampler: Sampler, *, seed: int = 0, max_turns: int = 0,
                      samples: str = "every_turn", max_constraints: int = 2, terse_probability: float = 0.5,
                      fits: Callable[[list[dict]], bool] = lambda dialog: True) -> tuple[list[dict], GattStats]:
    """Steps 1-5 for `dialogs` (from `dialogs.read_dialogs`) with any sampler. Returns (records, stats)."""
    stats = GattStats()
    items = prepare(dialogs, random.Random(seed), stats, max_turns=max_turns, max_constraints=max_constraints,
                    terse_probability=terse_probability)
    sample_replies(items, sampler, stats, fits)
    return build_records(items, samples, stats), stats


# ---------------------------------------------------------------------------------------------------- model sampler


class ModelSampler:
    """Replies from a Llama with `generate.chat_completion`, in batches of `batch_size`; a new seed per call."""
    def __init__(self, params, cfg, tokenizer, *, temperature: float, top_p: float, max_gen_len: int,
                 batch_size: int = 16, seed: int = 1, min_reply_tokens: int = 16):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.temperature, self.top_p, self.max_gen_len = temperature, top_p, max_gen_len
        self.batch_size, self.seed, self.min_reply_tokens = batch_size, seed, min_reply_tokens
        self.calls = 0

    def fits(self, dialog: list[dict]) -> bool:
        return len(chat.encode_dialog(self.tokenizer, dialog)) + self.min_reply_tokens <= self.cfg.max_seq_len

    def __call__(self, dialogs: list[list[dict]]) -> list[str]:
        replies = []
        for start in range(0, len(dialogs), self.batch_size):
            results = generate.chat_completion(
                self.params, self.cfg, self.tokenizer, dialogs[start: start + self.batch_size],
                temperature=self.temperature, top_p=self.top_p, max_gen_len=self.max_gen_len,
                rng=self.seed * 1_000_003 + self.calls)
            self.calls += 1
            replies += [result["generation"]["content"] for result in results]
        return replies


# -------------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.gatt", description=__doc__.split("\n")[0])
    add_sampling_flags(parser)  # --checkpoint --tokenizer --max_gen_len --temperature --top_p --seed --dtype
    parser.set_defaults(max_gen_len=256)
    parser.add_argument("--dialogs", required=True, help="multi-turn dialogs (any format of read_dialogs)")
    parser.add_argument("--format", default="auto", help="dialog file format (default: detected)")
    parser.add_argument("--out", required=True, help="output JSONL for train.sft (--config.data.path)")
    parser.add_argument("--max_turns", type=int, default=0, help="sample at most this many turns (0 = all)")
    parser.add_argument("--max_dialogs", type=int, default=0, help="use the first N dialogs (0 = all)")
    parser.add_argument("--samples", choices=SAMPLES, default="every_turn", help="records per dialog")
    parser.add_argument("--max_constraints", type=int, default=2, help="instructions combined per dialog (1-3)")
    parser.add_argument("--terse_probability", type=float, default=0.5, help="share of terse training instructions")
    parser.add_argument("--batch_size", type=int, default=16, help="dialogs per sampling call")
    parser.add_argument("--min_reply_tokens", type=int, default=16, help="stop a dialog when less context is left")
    args = parser.parse_args(argv)
    check_sampling_flags(args)  # one-line errors, exit 1; fills in the default --dtype
    return args


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def load_inputs(args: argparse.Namespace):
    """(dialogs, params, LlamaConfig, tokenizer) for the CLI; bad input raises a one-line ConfigError naming the flag."""
    try:  # before any sampling: a bad --out would lose every sample
        prepare_output_file(args.out, "--out")
    except (OSError, ValueError) as error:
        raise common.ConfigError(str(error)) from None
    try:
        dialogs, _ = read_dialogs(args.dialogs, format=args.format)
    except (ValueError, FileNotFoundError) as error:
        raise common.ConfigError(f"--dialogs: {error}") from None
    try:
        params, cfg, tokenizer = load_model(args.checkpoint, args.tokenizer, args.dtype)
        check_vocab(tokenizer, cfg.vocab_size)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise common.ConfigError(f"--checkpoint / --tokenizer: {error}") from None
    return dialogs[: args.max_dialogs or None], params, cfg, tokenizer


def main(argv: Optional[Sequence[str]] = None) -> GattStats:
    args = parse_args(argv)
    try:
        dialogs, params, cfg, tokenizer = load_inputs(args)
    except common.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    sampler = ModelSampler(params, cfg, tokenizer, temperature=args.temperature, top_p=args.top_p,
                           max_gen_len=args.max_gen_len, batch_size=args.batch_size, seed=args.seed,
                           min_reply_tokens=args.min_reply_tokens)
    records, stats = make_gatt_records(dialogs, sampler, seed=args.seed, max_turns=args.max_turns,
                                       samples=args.samples, max_constraints=args.max_constraints,
                                       terse_probability=args.terse_probability, fits=sampler.fits)
    write_jsonl(args.out, records)
    print(f"GAtt: {stats}\nwrote {len(records)} records to {args.out}")
    return stats


if __name__ == "__main__":
    main()
