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
import json
import os

import jax
import jax.numpy as jnp

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import rm as rm_data
from llama2_jax.model.llama import Llama
from llama2_jax.training import common, loop, losses
from llama2_jax.training import state as train_state

EVAL_FILE = "dpo_eval.json"


def check_fields(config) -> None:
    """One-line ConfigErrors for the DPO fields, before anything is read or compiled."""
    if config.dpo.loss_type not in losses.DPO_LOSSES:
        raise common.ConfigError(f"config.dpo.loss_type={config.dpo.loss_type!r}; known: "
                                 f"{', '.join(losses.DPO_LOSSES)}")
    if not config.dpo.beta > 0:
        raise common.ConfigError(f"config.dpo.beta={config.dpo.beta} must be > 0")
    if not 0.0 <= config.dpo.label_smoothing < 0.5:
        raise common.ConfigError(f"config.dpo.label_smoothing={config.dpo.label_smoothing} must be in [0, 0.5)")
    if config.data.mix not in rm_data.MIXES:
        raise common.ConfigError(f"config.data.mix={config.data.mix!r}; known: {', '.join(rm_data.MIXES)}")
    if not config.data.path and not config.data.safety_path:
        raise common.ConfigError("config.data.path: no preference file given (also none in config.data.safety_path)")
    common.check_num_epochs(config)
    common.lora_config(config)


def make_data(config, tokenizer) -> rm_data.PairData:
    data = config.data
    try:
        pairs = rm_data.read_pair_files(data.path, data.safety_path, format=data.format, on_error=data.on_error,
                                        is_safety=data.is_safety, mix=data.mix, seed=config.seed)
        return rm_data.make_pair_data(tokenizer, pairs, seq_len=config.seq_len, batch_size=config.batch_size,
                                      seed=config.seed, val_fraction=data.val_fraction,
                                      max_eval_batches=config.eval_batches or None)
    except (ValueError, FileNotFoundError) as error:
        raise common.ConfigError(f"config.data: {error}") from None


def report(workdir: str, history: list[dict], data: rm_data.PairData) -> dict | None:
    evals = [h for h in history if "eval_reward_accuracy" in h]
    if not evals:
        return None
    last = evals[-1]
    summary = {"step": last["step"], "eval_pairs": data.n_eval, "train_pairs": data.n_train,
               **{name: last[f"eval_{name}"] for name in ("loss", "reward_accuracy", "reward_margin",
                                                           "rewards_chosen", "rewards_rejected")}}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, EVAL_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"held-out: implicit-reward accuracy {summary['reward_accuracy']:.4f} on {data.n_eval} pairs, "
              f"margin {summary['reward_margin']:.4f}, loss {summary['loss']:.4f}")
    return summary


def train_and_evaluate(config, workdir: str):
    """DPO from config.init_from on config.data's pairs; returns (final state, logged metrics)."""
    common.check_shared_fields(config)  # before the trainer's own fields
    check_fields(config)
    model_cfg = common.resolve_model_config(config, config.seq_len, required=True)
    mesh = common.make_mesh(config)
    common.check_batch(config, mesh, model_cfg, config.seq_len)
    tokenizer = common.prepare_workdir(config, workdir, model_cfg)
    extra_evals = common.task_evals(config, model_cfg, tokenizer, mesh)  # config.eval_tasks (lm-eval), or None
    data = make_data(config, tokenizer)
    if jax.process_index() == 0:
        print(f"DPO data: {data.n_train} train / {data.n_eval} held-out pairs; {data.truncation.summary()}")
    steps = common.num_train_steps(config, lambda epochs: max(1, int(epochs * data.n_train) // config.batch_size))
    resolved = config.copy_and_resolve_references()
    resolved.num_train_steps = steps
    tx, schedule = common.make_tx(resolved, steps)
    loss_fn = functools.partial(losses.dpo_loss, model=Llama(model_cfg), beta=config.dpo.beta,
                                loss_type=config.dpo.loss_type, label_smoothing=config.dpo.label_smoothing)
    lora_cfg = common.lora_config(config)
    if lora_cfg is not None:  # the reference policy is the frozen base itself (adapters off): no second copy
        run = common.init_lora_state(config, model_cfg, mesh, tx, lora_cfg, workdir=workdir)
        state, shardings = run.state, run.shardings
        step, eval_step = run.jit_steps(loss_fn, Llama(model_cfg), resolved, mesh, schedule, pass_frozen=True)
    else:
        state, shardings = common.init_llama_state(config, model_cfg, mesh, tx)
        reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(state.params)
        step = train_state.with_frozen(train_state.jit_train_step(
            loss_fn, shardings, mesh, grad_accum_steps=config.grad_accum_steps, learning_rate_fn=schedule,
            frozen_shardings=shardings.params), reference)
        eval_step = train_state.with_frozen(train_state.jit_eval_step(loss_fn, shardings.params, mesh,
                                                                 frozen_shardings=shardings.params), reference)
    train_iter, eval_batches = common.process_local(data.train_iter, lambda: data.eval_batches)
    # Two sequences per pair, each through the policy (forward + backward) and the reference (forward only).
    flops = model_cfg.flops_per_token(config.seq_len) * 4.0 / 3.0
    state, history = loop.run_loop(
        settings=loop.LoopSettings.from_config(resolved), workdir=workdir, mesh=mesh, state=state,
        shardings=shardings, train_step=step, train_iter=train_iter, eval_step=eval_step, eval_batches=eval_batches,
        extra_evals=extra_evals,
        tokens_per_step=2 * config.batch_size * config.seq_len, flops_per_token=flops)
    report(workdir, history, data)
    return state, history


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Trainer config file (configs/dpo_*.py).")
