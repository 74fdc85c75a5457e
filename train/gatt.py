r"""Ghost Attention (paper section 3.3): fine-tuning on dialogs where one instruction holds for every turn.

    python -m train.gatt --config=configs/gatt_7b.py --workdir=DIR --config.init_from=POLICY \
        --config.data.path=DIALOGS [--config.gatt.max_turns=N --config.seed=S ...]

One round on the shared loop (`training.rounds`): the policy samples an SFT dataset, then the SFT trainer's run
fine-tunes the policy on it (config.sft) into WORKDIR/sft. For each source dialog of config.data.path (only its user
messages are kept; its assistant replies are replaced by samples):
  1. an instruction is sampled (`llama2_jax.data.gatt_instructions`: hobby / language / public figure, 1 to
     config.gatt.max_constraints of them);
  2. it is concatenated to *every* user message, before it: f"{instruction}\n\n{user}" (full form);
  3. the policy samples the replies turn by turn (`generate.chat_completion`; all dialogs at turn k in calls of
     config.sampling.batch_size), each turn seeing the augmented history and its own earlier replies;
  4. the training dialog keeps the instruction only in the first turn: it becomes the system message (Meta's format
     merges it into the first user turn inside <<SYS>>), terse ("Figure: Napoleon") config.gatt.terse_probability of
     the time; later user messages are the original ones;
  5. the record carries `"train_on": "last"`: the SFT run zeroes the loss on every token of previous turns, assistant
     turns included, and trains the last reply only.
With `config.gatt.samples="every_turn"` (default) a dialog of n sampled turns gives n records (the dialog cut after
turn 1..n, each training its last turn), so every turn depth is trained; "last_turn" gives one record per dialog.

A dialog stops early (counted) when its next prompt would leave fewer than config.gatt.min_reply_tokens of the model's
context, or when the model replies with nothing or with special tags. Source dialogs containing Meta's special tags
are skipped (counted). Outputs: WORKDIR/gatt.jsonl, one `{"messages": [...], "train_on": "last", "gatt":
{"instruction", "terse", "turns"}}` per line (a rerun reuses it), WORKDIR/gatt_stats.json, WORKDIR/sft/ (the
fine-tuned policy: an init_from). The former command-line flags are config fields: --checkpoint = init_from,
--tokenizer = tokenizer.path, --dialogs / --format = data.path / data.format, --max_gen_len / --temperature / --top_p /
--batch_size = sampling.*, --dtype = model.dtype, --seed = seed, the others gatt.*; --out is WORKDIR/gatt.jsonl.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Callable, Optional, Sequence

import jax

from llama2_jax.checkpoints import params_io
from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import gatt_instructions
from llama2_jax.data.dialogs import read_dialogs
from llama2_jax.data.gatt_instructions import Instruction
from llama2_jax.inference import generate
from llama2_jax.text import chat_format as chat
from llama2_jax.training import rounds
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.outputs import read_json, write_json, write_jsonl
from llama2_jax.training.setup import Run, Task, setup

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


# ---------------------------------------------------------------------------------------------------------- trainer


def check_fields(config) -> None:
    """One-line ConfigErrors for the GAtt fields, before anything is read or compiled."""
    g, s = config.gatt, config.sampling
    if not config.data.path:
        raise ConfigError("config.data.path is empty: pass --config.data.path=FILE (multi-turn dialogs)")
    if not os.path.isfile(config.data.path):
        raise ConfigError(f"config.data.path: {config.data.path} does not exist")
    if g.max_constraints not in (1, 2, 3):
        raise ConfigError(f"config.gatt.max_constraints must be 1, 2 or 3 (instructions combined per dialog), got "
                          f"{g.max_constraints!r}")
    if g.samples not in SAMPLES:
        raise ConfigError(f"config.gatt.samples is {g.samples!r}, expected one of {', '.join(SAMPLES)}")
    if not 0.0 <= g.terse_probability <= 1.0:
        raise ConfigError(f"config.gatt.terse_probability must be in [0, 1], got {g.terse_probability!r}")
    for name in ("max_turns", "max_dialogs", "min_reply_tokens"):
        if g[name] < 0:
            raise ConfigError(f"config.gatt.{name} must be >= 0, got {g[name]!r}")
    if s.batch_size < 1 or s.max_gen_len < 1:
        raise ConfigError(f"config.sampling.batch_size ({s.batch_size}) and config.sampling.max_gen_len "
                          f"({s.max_gen_len}) must be >= 1")
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        raise ConfigError(f"config.sampling: temperature {s.temperature} must be >= 0 and top_p {s.top_p} in (0, 1]")


def read_source_dialogs(config) -> list:
    """The first config.gatt.max_dialogs (0 = all) dialogs of config.data.path."""
    try:
        dialogs, _ = read_dialogs(config.data.path, format=config.data.format)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.data: {error}") from None
    return dialogs[: config.gatt.max_dialogs or None]


def check_model(config, model_cfg, mesh) -> None:
    del model_cfg
    rounds.check_fine_tuning(config, mesh)


GATT = Task("gatt", check=check_fields, check_model=check_model, read=read_source_dialogs,
            make_data=lambda config, tokenizer, raw: raw, seq_len=False, init_from_required=True, lora=False,
            eval_tasks=False, writes_model=False)


def make_records(run: Run) -> tuple[list[dict], dict]:
    """Steps 1-5 with the policy as sampler: (records, stats)."""
    config, g = run.config, run.config.gatt
    params, cfg = params_io.load_params(config.init_from, run.model_cfg)
    sampler = ModelSampler(jax.device_put(params), cfg, run.tokenizer, temperature=config.sampling.temperature,
                           top_p=config.sampling.top_p, max_gen_len=config.sampling.max_gen_len,
                           batch_size=config.sampling.batch_size, seed=config.seed,
                           min_reply_tokens=g.min_reply_tokens)
    records, stats = make_gatt_records(run.data, sampler, seed=config.seed, max_turns=g.max_turns, samples=g.samples,
                                       max_constraints=g.max_constraints, terse_probability=g.terse_probability,
                                       fits=sampler.fits)
    return records, dataclasses.asdict(stats)


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """Sample the GAtt records with config.init_from and fine-tune it on them; the summary has the records' counts
    (`GattStats`), the product is WORKDIR/sft."""
    run = setup(config, workdir, GATT)
    records_path, stats_path = os.path.join(workdir, "gatt.jsonl"), os.path.join(workdir, "gatt_stats.json")

    def one_round(index: int) -> dict:
        del index
        stats = read_json(stats_path)  # written after the records: a rerun reuses them
        if stats is None:
            records, stats = make_records(run)
            write_jsonl(records_path, records)
            write_json(stats_path, stats)
        print(f"GAtt: {stats}\n{stats['records']} records in {records_path}", flush=True)
        if not stats["records"]:
            raise ConfigError(f"no GAtt record from the {stats['dialogs']} dialogs of config.data.path: nothing to "
                              "fine-tune on")
        rounds.fine_tune_round(config, init_from=config.init_from, data_path=records_path,
                               tokenizer_path=run.tokenizer.model_path, workdir=rounds.sft_dir(workdir),
                               seed=config.seed)
        return stats

    result = exit_if_interrupted(rounds.run_rounds(run, 1, one_round))
    result.summary = read_json(stats_path, {})
    result.product = rounds.sft_dir(workdir)
    return result


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "GAtt config file (configs/gatt_*.py).")
