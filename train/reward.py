r"""Reward-model training (paper section 3.2.2): `python -m train.reward --config=configs/rm_tiny.py --workdir=DIR
[--config.init_from=PRETRAINED --config.data.path=PAIRS.jsonl]`.

Pairs -> mix -> held-out split -> chat encoding truncated to seq_len (llama2_jax.data.rm) -> the shared train step with
`losses.pairwise_loss` on a `score_model.ScoreModel` -> the shared loop (eval on the held-out split, checkpoints,
metrics.jsonl).

* Model: the architecture comes from `init_from`'s llama_config.json when set (its `output` head is dropped and a
  scalar head added), the numerics (`LlamaConfig.NUMERICS_FIELDS`) from config.model; max_seq_len is raised to
  seq_len when that is longer. Without init_from: a random model from config.model.
* Tokenizer: config.tokenizer.path, else `tokenizer.model` in the init_from dir, else one trained on the pairs' text
  and cached in the workdir. It is copied to WORKDIR/tokenizer.model so the RM workdir is self-contained.
* Steps: with config.num_epochs > 0 (0 = use num_train_steps), num_train_steps = floor(num_epochs * train pairs /
  batch_size) (at least 1), computed at run time from the data; warmup = max(min_warmup_steps,
  round(warmup_fraction * steps)) when warmup_fraction > 0 (the paper: 3 %, minimum 5), else config.warmup_steps.
* LoRA: `--config.lora.rank=R` (> 0, needs init_from) trains adapters and the score head on the frozen trunk.
* Metrics: loss, accuracy (r_c > r_r), margin (mean r_c - r_r), score_chosen/rejected, and per rating level
  n_L / correct_L (as shares of all pairs, since the loop divides every sum by the pair count) from which
  accuracy_L = correct_L / n_L is added to the returned history and written, for the last eval, to
  WORKDIR/rm_eval.json with pair counts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import rm as rm_data
from llama2_jax.model import score as score_model
from llama2_jax.training import losses
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import process_local
from llama2_jax.training.initial_state import init_state, make_tx
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.outputs import write_json
from llama2_jax.training.setup import Task, num_train_steps, setup

EVAL_FILE = "rm_eval.json"


def check_fields(config) -> None:
    """One-line ConfigErrors for the RM-specific fields, before anything is read or compiled."""
    if config.margin_table not in losses.MARGIN_TABLES:
        raise ConfigError(f"config.margin_table={config.margin_table!r}; known: {', '.join(losses.MARGIN_TABLES)}")
    if config.data.mix not in rm_data.MIXES:
        raise ConfigError(f"config.data.mix={config.data.mix!r}; known: {', '.join(rm_data.MIXES)}")
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise ConfigError(f"config.warmup_fraction={config.warmup_fraction} must be in [0, 1)")
    if config.head_init_std < 0:
        raise ConfigError(f"config.head_init_std={config.head_init_std} must be >= 0")
    if not config.data.path and not config.data.safety_path:
        raise ConfigError("config.data.path: no preference file given (also none in config.data.safety_path)")


def load_pairs(config) -> list:
    """Every file of data.path (is_safety from data.is_safety or the records) and data.safety_path (is_safety True),
    then the configured mix (deterministic by config.seed)."""
    data = config.data
    try:
        return rm_data.read_pair_files(data.path, data.safety_path, format=data.format, on_error=data.on_error,
                                       is_safety=data.is_safety, mix=data.mix, seed=config.seed)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.data: {error}") from None


def _pair_texts(pairs):
    for pair in pairs:
        yield "\n".join(m["content"] for m in pair.prompt)
        yield pair.chosen
        yield pair.rejected


def make_data(config, tokenizer, pairs) -> rm_data.PairData:
    """Split, encode (truncation counted), and build the global train iterator and eval batches."""
    try:
        data = rm_data.make_pair_data(tokenizer, pairs, seq_len=config.seq_len, batch_size=config.batch_size,
                                      seed=config.seed, val_fraction=config.data.val_fraction,
                                      max_eval_batches=config.eval_batches or None)
    except ValueError as error:
        raise ConfigError(f"config.data: {error}") from None
    if jax.process_index() == 0:
        print(f"reward-model data: {data.n_train} train / {len(pairs) - data.n_train} held-out pairs; "
              f"{data.truncation.summary()}")
    return data


def schedule_steps(config, n_train: int) -> tuple[int, int]:
    """(num_train_steps, warmup_steps) from num_epochs / warmup_fraction (see the module docstring)."""
    steps = num_train_steps(config, lambda epochs: max(1, int(epochs * n_train // config.batch_size)))
    warmup = config.warmup_steps
    if config.warmup_fraction > 0:
        warmup = max(config.min_warmup_steps, round(config.warmup_fraction * steps))
    return steps, min(warmup, steps)


def schedule(config, data: rm_data.PairData) -> dict:
    steps, warmup = schedule_steps(config, data.n_train)
    return {"num_train_steps": steps, "warmup_steps": warmup}


REWARD = Task("reward", check=check_fields, read=load_pairs, texts=_pair_texts, make_data=make_data,
              schedule=schedule, eval_tasks=False, init_kinds=("llama", "score"))


def with_rating_tables(history: list[dict]) -> list[dict]:
    """Adds accuracy_L (train records) and eval_accuracy_L (eval records) = correct_L / n_L to every record."""
    out = []
    for record in history:
        prefix = "eval_" if "eval_accuracy" in record else ""
        out.append({**record, **losses.per_rating_accuracy(record, prefix)})
    return out


def eval_summary(record: dict, data: rm_data.PairData) -> dict:
    """The last eval as a table: overall and per rating level, with pair counts."""
    levels = {}
    for level in losses.RATING_LEVELS:
        n = round(record.get(f"eval_n_{level}", 0.0) * data.n_eval)
        if n:
            levels[level] = {"pairs": n, "accuracy": record[f"eval_accuracy_{level}"]}
    return {"step": record["step"], "eval_pairs": data.n_eval, "train_pairs": data.n_train,
            "accuracy": record["eval_accuracy"], "loss": record["eval_loss"], "mean_margin": record["eval_margin"],
            "per_rating": levels, "truncation": dataclasses.asdict(data.truncation)}


def report(workdir: str, history: list[dict], data: rm_data.PairData) -> dict:
    evals = [h for h in history if "eval_accuracy" in h]
    if not evals:
        return {}
    summary = eval_summary(evals[-1], data)
    write_json(f"{workdir}/{EVAL_FILE}", summary)
    if jax.process_index() == 0:
        print(f"held-out: accuracy {summary['accuracy']:.4f} on {summary['eval_pairs']} pairs, loss "
              f"{summary['loss']:.4f}, mean margin {summary['mean_margin']:.4f}")
        for level, row in summary["per_rating"].items():
            print(f"  {level:20s} {row['pairs']:6d} pairs  accuracy {row['accuracy']:.4f}")
    return summary


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """Train a reward model; the history has the per-rating accuracies."""
    run = setup(config, workdir, REWARD)
    data, config = run.data, run.config
    tx, schedule_fn = make_tx(config, run.settings.num_train_steps)
    # LoRA: adapters and the score head trained, the init_from trunk frozen; else the trunk and a new head.
    trainable = init_state(run, tx, kind="score", head_init_std=config.head_init_std)
    loss_fn = functools.partial(losses.pairwise_loss, margin_table=config.margin_table)
    model, model_cfg = score_model.ScoreModel(run.model_cfg, config.head_init_std), run.model_cfg
    # FLOPs per (padded) token: the LM's, minus the vocabulary projection the reward model does not have.
    flops = model_cfg.flops_per_token(config.seq_len) - 6.0 * model_cfg.vocab_size * model_cfg.dim
    result = run.train(trainable, loss_fn, model, schedule_fn,
                       *process_local(data.train_iter, lambda: data.eval_batches),
                       tokens_per_step=2 * config.batch_size * config.seq_len, flops_per_token=flops)
    exit_if_interrupted(result)
    result.history = with_rating_tables(result.history)
    result.summary = report(workdir, result.history, data)
    return result


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Trainer config file (configs/rm_*.py).")
