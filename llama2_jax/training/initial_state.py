"""The optimizer and the initial state of every trainer.

    tx, schedule = make_tx(run.config, run.settings.num_train_steps)      # AdamW + the paper's schedule
    trainable = init_state(run, tx)                                        # LoRA or full: chosen here, once
    train_step, eval_step = trainable.jit_steps(loss_fn, model, run.mesh, ...)

`init_state` makes the one choice between a LoRA run (config.lora.rank > 0: adapters on the frozen init_from,
`training.lora_run`) and full training (random params from config.seed, or init_from's params loaded straight into
their shardings), for a Llama (kind="llama") or a score model (kind="score": the reward model, init_from's trunk
and a new head).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import optax

from llama2_jax.checkpoints import params_io
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import Llama, abstract_params
from llama2_jax.training import state as train_state
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.lora_run import init_lora_state
from llama2_jax.training.setup import Run

_log = logging.getLogger(__name__)


def make_tx(config, total_steps: int = 0, *, learning_rate: float = 0.0) -> tuple[optax.GradientTransformation,
                                                                                  optax.Schedule]:
    """The one optimizer factory: AdamW with config's betas, eps, weight decay and clipping, and its schedule: the
    paper's warmup + cosine decay to config.lr_end_fraction over `total_steps`, or a constant `learning_rate` when
    one is given (PPO's policy and value model). Returns (tx, schedule). A warmup longer than the run is cut to the
    run, with a warning naming both (how a shipped config is smoke-tested: a short run of it)."""
    if not learning_rate and config.warmup_steps > total_steps:
        _log.warning("config.warmup_steps (%d) is longer than the run's %d steps (config.num_train_steps, or the "
                     "steps of config.num_epochs): the learning rate warms up over all %d steps, reaching its peak at "
                     "the last one, and does not decay", config.warmup_steps, total_steps, total_steps)
    if learning_rate:
        schedule = optax.constant_schedule(learning_rate)
    else:
        schedule = train_state.warmup_cosine_schedule(config.learning_rate, config.warmup_steps, total_steps,
                                                      config.lr_end_fraction)
    tx = train_state.make_optimizer(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                                    weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    return tx, schedule


def init_state(run: Run, tx, *, kind: str = "llama", head_init_std: float = score_model.DEFAULT_HEAD_INIT_STD,
               reference: bool = False) -> train_state.Trainable:
    """The run's model ready to train: a LoRA run on the frozen init_from (its frozen tree the base), or full
    training (random or init_from). `reference`: a full run also keeps a frozen copy of its initial params (DPO's
    reference policy; a LoRA run's reference is its base with the adapters off)."""
    config, model_cfg, mesh = run.config, run.model_cfg, run.mesh
    if run.lora_cfg is not None:
        return init_lora_state(config, model_cfg, mesh, tx, run.lora_cfg, kind=kind, head_init_std=head_init_std)
    state, shardings = _full_state(config, model_cfg, mesh, tx, kind, head_init_std)
    if not reference:
        return train_state.Trainable(state, shardings)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(state.params)
    return train_state.Trainable(state, shardings, copy, shardings.params)


def _full_state(config, model_cfg, mesh, tx, kind: str, head_init_std: float):
    """(sharded TrainState, its shardings): random from config.seed, or init_from's params onto their shardings."""
    rng = jax.random.PRNGKey(config.seed)
    tokens, lengths = jnp.zeros((1, 8), jnp.int32), jnp.ones((1,), jnp.int32)
    if kind == "score":
        model = score_model.ScoreModel(model_cfg, head_init_std)
        init_fn = functools.partial(lambda r: model.init(r, tokens, lengths)["params"], rng)
    else:
        init_fn = functools.partial(lambda r: Llama(model_cfg).init(r, tokens)["params"], rng)
    if not config.init_from:
        return train_state.create_train_state(init_fn, tx, mesh)
    shardings = train_state.state_shardings(jax.eval_shape(init_fn), tx, mesh)
    if kind == "score" and _is_score_checkpoint(config.init_from, model_cfg):
        # continuing a reward model (the recipe's RLHF rounds with rlhf.rm_init="continue"): its trunk and its head
        params, _ = params_io.load_params(config.init_from, model_cfg, shardings=shardings.params, kind="score")
        return train_state.state_from_params(params, tx, shardings), shardings
    llama_shardings = shardings.params if kind == "llama" else sh.tree_shardings(
        abstract_params(model_cfg, boxed=True), mesh)
    try:
        params, _ = params_io.load_params(config.init_from, model_cfg, shardings=llama_shardings)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.init_from: {error}") from None
    if kind == "score":  # the reward model: init_from's trunk and a new head (paper section 3.2.2)
        params = score_model.init_score_params_from_llama(params, jax.random.fold_in(rng, 1), head_init_std)
    return train_state.state_from_params(params, tx, shardings), shardings


def _is_score_checkpoint(path: str, model_cfg) -> bool:
    """Whether init_from holds a score model (a reward model to continue training) rather than a Llama."""
    try:
        params_io.check_params(path, model_cfg, kind="score")
    except (ValueError, FileNotFoundError):
        return False
    return True
