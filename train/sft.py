r"""Supervised fine-tuning (spec D): `python -m train.sft --config=configs/sft_7b.py --workdir=DIR
    --config.init_from=CKPT --config.data.path=FILE [--config.FIELD=VALUE ...]`.

The same state, step and loop as pretraining; only the data (packed dialogs, `llama2_jax.data.sft`) and the loss
mask (assistant tokens only; `next_token_loss` already honours `loss_mask`) differ.

* Model: with `config.init_from` set, the architecture is `CKPT/llama_config.json` (`checkpoint.load_config`);
  `config.model` contributes only the numerics in `MODEL_OVERRIDES`. `max_seq_len` (no parameter depends on it) is
  raised to `config.seq_len` when that is longer, with a warning: RoPE positions past the pretraining context are
  then learned during SFT. Without init_from (random init) `config.model` is used whole.
* Tokenizer: `config.tokenizer.path`, or "" = `CKPT/tokenizer.model`. It is copied into the workdir, which then is
  a complete init_from / checkpoint for generation, GAtt or a further SFT round.
* Steps: `config.num_epochs` > 0 sets num_train_steps = ceil(epochs x packed rows per epoch / batch_size).
* Eval: the loss on assistant tokens of the held-out dialogs; with `config.eval_at_start` also before training.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil

import jax
from absl import app
from ml_collections import config_flags

from llama2_jax import checkpoint as param_checkpoint
from llama2_jax import losses
from llama2_jax.config import LlamaConfig
from llama2_jax.data import records
from llama2_jax.data import sft as sft_data
from llama2_jax.model import Llama
from llama2_jax.tokenizer import TOKENIZER_FILENAME, Tokenizer, check_vocab
from train import common, loop
from train import state as train_state
from train.checkpoints import write_model_config

# Fields of config.model applied on top of an init_from checkpoint's architecture.
MODEL_OVERRIDES = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
_log = logging.getLogger(__name__)


def sft_model_config(config) -> LlamaConfig:
    """The architecture of config.init_from (numerics from config.model), or config.model for a random init."""
    if not config.init_from:
        return common.model_config(config)
    try:
        stored = param_checkpoint.load_config(config.init_from)
        model_cfg = stored.replace(**{name: config.model[name] for name in MODEL_OVERRIDES})
    except (ValueError, FileNotFoundError) as error:
        raise common.ConfigError(f"config.init_from: {error}") from None
    if config.seq_len > model_cfg.max_seq_len:
        logging.warning("config.seq_len %d exceeds the init_from model's max_seq_len %d: raising max_seq_len (RoPE "
                        "positions past %d are new to the model)", config.seq_len, model_cfg.max_seq_len,
                        model_cfg.max_seq_len)
        model_cfg = model_cfg.replace(max_seq_len=config.seq_len)
    return model_cfg


def tokenizer_path(config) -> str:
    if config.tokenizer.path:
        return config.tokenizer.path
    candidate = os.path.join(config.init_from, TOKENIZER_FILENAME) if config.init_from else ""
    if not candidate or not os.path.isfile(candidate):
        where = f"and {candidate} does not exist" if candidate else "and config.init_from is empty"
        raise common.ConfigError(f"config.tokenizer.path is empty {where}; pass --config.tokenizer.path=FILE")
    return candidate


def load_tokenizer(config, vocab_size: int) -> Tokenizer:
    path = tokenizer_path(config)
    try:
        tokenizer = Tokenizer(path)
        check_vocab(tokenizer, vocab_size)
    except (ValueError, FileNotFoundError) as error:
        raise common.ConfigError(f"config.tokenizer.path: {error}") from None
    return tokenizer


def check_sft_config(config) -> None:
    """One-line ConfigErrors for the SFT fields, before anything is loaded or compiled."""
    data = config.data
    if not data.path:
        raise common.ConfigError("config.data.path is empty: pass --config.data.path=FILE (a dialog file: messages, "
                                 "alpaca, sharegpt JSON/JSONL or OASST trees)")
    if not os.path.isfile(data.path) and not records.is_dataset_spec(data.path):  # hf:/tfds: specs read later
        raise common.ConfigError(f"config.data.path: {data.path} does not exist")
    if data.overlong not in sft_data.OVERLONG:
        raise common.ConfigError(f"config.data.overlong is {data.overlong!r}, expected one of "
                                 f"{', '.join(sft_data.OVERLONG)}")
    if not 0.0 <= data.val_fraction < 1.0:
        raise common.ConfigError(f"config.data.val_fraction must be in [0, 1), got {data.val_fraction}")
    if config.num_epochs < 0:
        raise common.ConfigError(f"config.num_epochs must be >= 0 (0 = use num_train_steps), "
                                 f"got {config.num_epochs}")


def make_data(config, tokenizer) -> sft_data.SFTData:
    data = config.data
    try:
        return sft_data.load_sft_data(
            data.path, tokenizer, format=data.format, on_error=data.on_error, seq_len=config.seq_len,
            batch_size=config.batch_size, seed=config.seed, val_fraction=data.val_fraction, overlong=data.overlong,
            max_eval_batches=config.eval_batches or None)
    except ValueError as error:
        raise common.ConfigError(f"config.data: {error}") from None


def num_train_steps(config, data: sft_data.SFTData) -> int:
    if not config.num_epochs:
        return config.num_train_steps
    return data.steps_for_epochs(config.num_epochs, config.batch_size)


def process_local(data: sft_data.SFTData):
    """(train iterator, eval batches function) of this process's rows of every global batch."""
    index, count = jax.process_index(), jax.process_count()

    def local_eval_batches():
        return [next(common.ProcessRows(iter([b]), index, count)) for b in data.eval_batches()]

    return common.ProcessRows(data.train_iter, index, count), local_eval_batches


def save_workdir_files(workdir: str, model_cfg: LlamaConfig, tokenizer: Tokenizer) -> None:
    write_model_config(workdir, model_cfg)
    target = os.path.join(workdir, TOKENIZER_FILENAME)
    if jax.process_index() == 0 and os.path.abspath(tokenizer.model_path) != os.path.abspath(target):
        shutil.copyfile(tokenizer.model_path, target)


def has_checkpoint(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def train_and_evaluate(config, workdir: str):
    """Fine-tune on the dialogs of config.data.path; returns (final state, logged metrics)."""
    check_sft_config(config)
    model_cfg = sft_model_config(config)
    mesh = common.make_mesh(config)
    common.check_batch(config, mesh, model_cfg, config.seq_len)
    tokenizer = load_tokenizer(config, model_cfg.vocab_size)
    data = make_data(config, tokenizer)
    steps = num_train_steps(config, data)
    if jax.process_index() == 0:
        print(f"SFT data: {data.stats.summary()}\ntraining for {steps} steps")
    save_workdir_files(workdir, model_cfg, tokenizer)

    tx, schedule = common.make_tx(config, steps)
    state, shardings = common.init_llama_state(config, model_cfg, mesh, tx)
    model = Llama(model_cfg)
    loss_fn = functools.partial(losses.next_token_loss, model=model)
    step = train_state.jit_train_step(loss_fn, shardings, mesh, grad_accum_steps=config.grad_accum_steps,
                                      learning_rate_fn=schedule)
    eval_step = train_state.jit_eval_step(loss_fn, shardings.params, mesh) if data.stats.eval_samples else None
    train_iter, eval_batches = process_local(data)

    history = []
    if eval_step is not None and config.eval_at_start and not has_checkpoint(workdir):
        history.append(initial_eval(workdir, state, eval_step, eval_batches, mesh))
    settings = dataclasses.replace(loop.LoopSettings.from_config(config), num_train_steps=steps)
    state, logged = loop.run_loop(
        settings=settings, workdir=workdir, mesh=mesh, state=state, shardings=shardings, train_step=step,
        train_iter=train_iter, eval_step=eval_step, eval_batches=eval_batches,
        tokens_per_step=config.batch_size * config.seq_len, flops_per_token=model_cfg.flops_per_token(config.seq_len))
    history += logged
    report(config, model_cfg, state, tokenizer, data.stats, history)
    return state, history


def initial_eval(workdir, state, eval_step, eval_batches, mesh) -> dict:
    """The eval metrics of the initial model, logged as step 0 (also in metrics.jsonl)."""
    metrics = loop.evaluate(state.params, eval_step, eval_batches(), mesh)
    writer = loop.MetricsWriter(workdir)
    writer.write(0, metrics)
    writer.close()
    return {"step": 0, **metrics}


def report(config, model_cfg, state, tokenizer, stats, history) -> None:
    if jax.process_index() != 0:
        return
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if evals:
        trail = ", ".join(f"step {s}: {loss:.4f}" for s, loss in evals)
        print(f"eval loss on assistant tokens (supervised fraction {stats.supervised_fraction:.1%}): {trail}")
    prompts = [p for p in config.sample_prompts if p]
    if prompts and config.sample_tokens > 0 and jax.process_count() == 1:
        from llama2_jax import generate  # sampling is optional: imported only when asked for

        dialogs = [[{"role": "user", "content": p}] for p in prompts]
        results = generate.chat_completion(jax.device_get(state.params), model_cfg, tokenizer, dialogs,
                                           temperature=0.0, max_gen_len=config.sample_tokens)
        for prompt, result in zip(prompts, results):
            print(f"--- [INST] {prompt} [/INST]\n{result['generation']['content']}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "SFT config file (configs/sft_*.py).", lock_config=True)
    common.define_runtime_flags()
    logging.getLogger("absl").setLevel(logging.WARNING)
    app.run(common.run_main(train_and_evaluate))
