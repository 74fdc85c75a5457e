"""Next-token training (pretraining, SFT) and a whole SFT run on a dialog file (train.sft; rejection sampling,
context distillation and GAtt fine-tune on what they generate with it).

    result = fine_tune(config, workdir)      # setup(config, workdir, SFT), then train_sft: train.sft in one call
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax

from llama2_jax.checkpoints import params_io
from llama2_jax.data import records
from llama2_jax.data import sft as sft_data
from llama2_jax.model.llama import Llama
from llama2_jax.training import losses
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import process_local
from llama2_jax.training.initial_state import init_state, make_tx
from llama2_jax.training.loop import TrainResult
from llama2_jax.training.setup import Run, Task, num_train_steps, setup


def train_next_token(run: Run, train_iter, eval_batches: Optional[Callable], *,
                     eval_at_start: bool = False) -> TrainResult:
    """The masked next-token loss (`losses.next_token_loss`: SFT's loss_mask keeps assistant tokens) on the run's
    state (`init_state`: random, init_from, or LoRA adapters on it), the schedule over the run's steps, the shared
    loop (`Run.train`)."""
    config = run.config
    tx, schedule = make_tx(config, run.settings.num_train_steps)
    return run.train(init_state(run, tx), losses.next_token_loss, Llama(run.model_cfg), schedule, train_iter,
                     eval_batches, tokens_per_step=config.batch_size * config.seq_len,
                     flops_per_token=run.model_cfg.flops_per_token(config.seq_len), eval_at_start=eval_at_start)


# ----------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning on a dialog file


def check_sft_fields(config) -> None:
    """One-line ConfigErrors for the SFT data fields, before anything is loaded or compiled."""
    data = config.data
    if not data.path:
        raise ConfigError("config.data.path is empty: pass --config.data.path=FILE (a dialog file: messages, "
                          "alpaca, sharegpt JSON/JSONL or OASST trees)")
    if not os.path.isfile(data.path) and not records.is_dataset_spec(data.path):  # hf:/tfds: specs are read later
        raise ConfigError(f"config.data.path: {data.path} does not exist")
    if data.overlong not in sft_data.OVERLONG:
        raise ConfigError(f"config.data.overlong is {data.overlong!r}, expected one of {', '.join(sft_data.OVERLONG)}")
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction must be in [0, 1), got {data.val_fraction}")


def load_dialogs(config, tokenizer, raw=None) -> sft_data.SFTData:
    """The packed dialogs of config.data.path (loss on assistant tokens; `llama2_jax.data.sft`)."""
    del raw
    data = config.data
    try:
        return sft_data.load_sft_data(
            data.path, tokenizer, format=data.format, on_error=data.on_error, seq_len=config.seq_len,
            batch_size=config.batch_size, seed=config.seed, val_fraction=data.val_fraction, overlong=data.overlong,
            max_eval_batches=config.eval_batches or None)
    except (ValueError, ImportError) as error:  # ImportError: an hf:/tfds: spec without its extra installed
        raise ConfigError(f"config.data: {error}") from None


def sft_schedule(config, dialogs: sft_data.SFTData) -> dict:
    """config.num_epochs (> 0) passes over the packed rows, or config.num_train_steps."""
    return {"num_train_steps": num_train_steps(config, lambda epochs: dialogs.steps_for_epochs(epochs,
                                                                                               config.batch_size))}


SFT = Task("sft", check=check_sft_fields, make_data=load_dialogs, schedule=sft_schedule)


def fine_tune(config, workdir: str) -> TrainResult:
    """SFT of config.init_from (or a random config.model) on the dialogs of config.data.path: `train_sft` of the
    checked run."""
    return train_sft(setup(config, workdir, SFT))


def train_sft(run: Run) -> TrainResult:
    """Packed dialogs, loss on assistant tokens, config.num_epochs (> 0) or config.num_train_steps steps. The
    result's summary holds the data's statistics ("data": `sft_data.SFTStats`)."""
    dialogs = run.data
    if jax.process_index() == 0:
        print(f"SFT data: {dialogs.stats.summary()}\ntraining for {run.settings.num_train_steps} steps")
    train_iter, eval_batches = process_local(dialogs.train_iter,
                                             dialogs.eval_batches if dialogs.stats.eval_samples else None)
    result = train_next_token(run, train_iter, eval_batches, eval_at_start=run.config.eval_at_start)
    result.summary["data"] = dialogs.stats
    return result


def trained_params(result: TrainResult, model_cfg):
    """The fine-tuned params as host arrays; for a LoRA run the workdir's base merged with its adapters."""
    if params_io.is_lora_dir(result.product):
        return params_io.load_params(result.product, model_cfg)[0]
    return jax.device_get(result.state.params)
