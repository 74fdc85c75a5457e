r"""Direct preference optimisation (Rafailov et al. 2023): `python -m train.dpo --config=configs/dpo_tiny.py
--workdir=DIR --config.init_from=SFT_WORKDIR --config.data.path=PAIRS`.

Preference pairs (the reward model's readers and data mixes, `llama2_jax.data.rm`) -> the shared train step with
`losses.dpo_loss` -> the shared loop (held-out eval, checkpoints, metrics.jsonl). The policy starts from init_from;
the reference policy is a frozen copy of the same weights, passed to the step as its `frozen` tree (sharded like
the policy, never updated, never donated). Logged for train and held-out pairs: loss, rewards_chosen,
rewards_rejected (beta * log pi/ref of each response), reward_accuracy, reward_margin. With `--config.lora.rank=R`
only adapters are trained and the reference is the frozen base with the adapters off.
"""

from __future__ import annotations

import functools

import jax

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import rm as rm_data
from llama2_jax.model.llama import Llama
from llama2_jax.training import losses
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import process_local
from llama2_jax.training.initial_state import init_state, make_tx
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.outputs import write_json
from llama2_jax.training.setup import Task, num_train_steps, setup

EVAL_FILE = "dpo_eval.json"


def check_fields(config) -> None:
    """One-line ConfigErrors for the DPO fields, before anything is read or compiled."""
    if config.dpo.loss_type not in losses.DPO_LOSSES:
        raise ConfigError(f"config.dpo.loss_type={config.dpo.loss_type!r}; known: {', '.join(losses.DPO_LOSSES)}")
    if not config.dpo.beta > 0:
        raise ConfigError(f"config.dpo.beta={config.dpo.beta} must be > 0")
    if not 0.0 <= config.dpo.label_smoothing < 0.5:
        raise ConfigError(f"config.dpo.label_smoothing={config.dpo.label_smoothing} must be in [0, 0.5)")
    if config.data.mix not in rm_data.MIXES:
        raise ConfigError(f"config.data.mix={config.data.mix!r}; known: {', '.join(rm_data.MIXES)}")
    if not config.data.path and not config.data.safety_path:
        raise ConfigError("config.data.path: no preference file given (also none in config.data.safety_path)")


def make_data(config, tokenizer, raw=None) -> rm_data.PairData:
    del raw
    data = config.data
    try:
        pairs = rm_data.read_pair_files(data.path, data.safety_path, format=data.format, on_error=data.on_error,
                                        is_safety=data.is_safety, mix=data.mix, seed=config.seed)
        pair_data = rm_data.make_pair_data(tokenizer, pairs, seq_len=config.seq_len, batch_size=config.batch_size,
                                           seed=config.seed, val_fraction=data.val_fraction,
                                           max_eval_batches=config.eval_batches or None)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.data: {error}") from None
    if jax.process_index() == 0:
        print(f"DPO data: {pair_data.n_train} train / {pair_data.n_eval} held-out pairs; "
              f"{pair_data.truncation.summary()}")
    return pair_data


def schedule(config, data: rm_data.PairData) -> dict:
    return {"num_train_steps": num_train_steps(config, lambda epochs: max(1, int(epochs * data.n_train) //
                                                                          config.batch_size))}


DPO = Task("dpo", check=check_fields, make_data=make_data, schedule=schedule, init_from_required=True)


def report(workdir: str, history: list[dict], data: rm_data.PairData) -> dict:
    evals = [h for h in history if "eval_reward_accuracy" in h]
    if not evals:
        return {}
    last = evals[-1]
    summary = {"step": last["step"], "eval_pairs": data.n_eval, "train_pairs": data.n_train,
               **{name: last[f"eval_{name}"] for name in ("loss", "reward_accuracy", "reward_margin",
                                                           "rewards_chosen", "rewards_rejected")}}
    write_json(f"{workdir}/{EVAL_FILE}", summary)
    if jax.process_index() == 0:
        print(f"held-out: implicit-reward accuracy {summary['reward_accuracy']:.4f} on {data.n_eval} pairs, "
              f"margin {summary['reward_margin']:.4f}, loss {summary['loss']:.4f}")
    return summary


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """DPO from config.init_from on config.data's pairs."""
    run = setup(config, workdir, DPO)
    data, config = run.data, run.config
    tx, schedule_fn = make_tx(config, run.settings.num_train_steps)
    # The reference policy: a frozen copy of the initial policy, or for LoRA the frozen base itself (adapters off).
    trainable = init_state(run, tx, reference=True)
    loss_fn = functools.partial(losses.dpo_loss, beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                                label_smoothing=config.dpo.label_smoothing)
    # Two sequences per pair, each through the policy (forward + backward) and the reference (forward only).
    flops = run.model_cfg.flops_per_token(config.seq_len) * 4.0 / 3.0
    result = run.train(trainable, loss_fn, Llama(run.model_cfg), schedule_fn,
                       *process_local(data.train_iter, lambda: data.eval_batches), reference=True,
                       tokens_per_step=2 * config.batch_size * config.seq_len, flops_per_token=flops)
    exit_if_interrupted(result)
    result.summary = report(workdir, result.history, data)
    return result


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Trainer config file (configs/dpo_*.py).")
