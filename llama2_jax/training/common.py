"""The one set-up path every trainer uses, and the pieces they share.

    model_cfg = resolve_model_config(config, seq_len)       # architecture of init_from, numerics of config.model
    mesh = make_mesh(config); check_batch(config, mesh, model_cfg, seq_len)
    tokenizer = prepare_workdir(config, workdir, model_cfg)  # check the workdir and init_from, choose the tokenizer,
                                                             # then write llama_config.json + tokenizer.model once
    train_iter, eval_batches = process_local(global_train_iter, global_eval_batches)
    tx, schedule = make_tx(config, steps); state, shardings = init_llama_state(config, model_cfg, mesh, tx)

Config checks run before anything is compiled or written and raise `ConfigError`, a one-line message naming the
field or file; `main` functions print it and exit with status 1 instead of showing a traceback. Next-token training
(pretraining, SFT, rejection sampling's SFT rounds) is `train_llama`, and a whole SFT run `fine_tune` (train.sft and
train.rejection_sampling); the RLHF trainers' prompts and reward models come from `load_prompts` and
`load_reward_models`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.checkpoints import params_io as param_checkpoint
from llama2_jax.data import records
from llama2_jax.data import sft as sft_data
from llama2_jax.model import lora
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import LORA, Llama, abstract_params
from llama2_jax.text.tokenizer import TOKENIZER_FILENAME, Tokenizer, check_vocab, load_or_train_tokenizer
from llama2_jax.training import loop, losses, workdir_lock
from llama2_jax.training import state as train_state
from llama2_jax.training import task_evals as task_eval_lib
from llama2_jax.training.checkpointer import CONFIG_FILE, CheckpointError, write_model_config
from llama2_jax.training.checks import ConfigError, check_shared_fields
from llama2_jax.training.hosts import ProcessRows, host_to_global, process_local, to_host  # noqa: F401 (the trainers' names)
from llama2_jax.training.model_config import model_config, model_config_from, resolve_model_config  # noqa: F401
from llama2_jax.training.rlhf_setup import load_prompts, load_reward_models, load_score_params, sigmoid_reward  # noqa: F401

_log = logging.getLogger(__name__)


def make_mesh(config):
    try:
        return sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ValueError as error:
        raise ConfigError(f"config.mesh: {error}") from None


def check_batch(config, mesh, model_cfg: Optional[LlamaConfig] = None, seq_len: Optional[int] = None) -> None:
    """The global batch must split evenly over processes, data-parallel devices and micro-batches."""
    batch, accum = config.batch_size, config.grad_accum_steps
    dp = sh.data_parallel_size(mesh)
    if batch <= 0 or accum <= 0:
        raise ConfigError(f"config.batch_size ({batch}) and config.grad_accum_steps ({accum}) must be positive")
    if batch % accum:
        raise ConfigError(f"config.batch_size ({batch}) is not divisible by config.grad_accum_steps ({accum})")
    if (batch // accum) % dp:
        raise ConfigError(f"config.batch_size / grad_accum_steps = {batch // accum} is not divisible by the "
                          f"data-parallel size {dp} (mesh data x fsdp)")
    if batch % jax.process_count():
        raise ConfigError(f"config.batch_size ({batch}) is not divisible by the process count {jax.process_count()}")
    if model_cfg is not None and seq_len is not None and seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"config.seq_len ({seq_len}) exceeds config.model.max_seq_len ({model_cfg.max_seq_len})")


def check_num_epochs(config) -> None:
    if config.num_epochs < 0:
        raise ConfigError(f"config.num_epochs must be >= 0 (0 = use num_train_steps), got {config.num_epochs}")


def num_train_steps(config, steps_for_epochs: Callable[[float], int]) -> int:
    """config.num_train_steps, or `steps_for_epochs(config.num_epochs)` when num_epochs > 0 (0.0 = use
    num_train_steps; configs/base.py)."""
    check_num_epochs(config)
    return steps_for_epochs(config.num_epochs) if config.num_epochs > 0 else config.num_train_steps


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and workdir


def tokenizer_path(config) -> str:
    """config.tokenizer.path, else INIT_FROM/tokenizer.model when it exists, else ""."""
    if config.tokenizer.path:
        return config.tokenizer.path
    inherited = os.path.join(config.init_from, TOKENIZER_FILENAME) if config.init_from else ""
    return inherited if inherited and os.path.isfile(inherited) else ""


def load_tokenizer(config, vocab_size: int, *, workdir: str = "", texts: Optional[Iterable[str]] = None) -> Tokenizer:
    """`tokenizer_path(config)`; without one, a tokenizer of config.tokenizer.train_vocab_size pieces trained on
    `texts` by process 0 and cached in the workdir (pretraining, reward models), or a ConfigError when no texts are
    given. The vocabulary must equal the model's."""
    path = tokenizer_path(config)
    if not path and texts is None:
        candidate = os.path.join(config.init_from, TOKENIZER_FILENAME) if config.init_from else ""
        where = f"and {candidate} does not exist" if candidate else "and config.init_from is empty"
        raise ConfigError(f"config.tokenizer.path is empty {where}; pass --config.tokenizer.path=FILE")
    try:
        if path:
            tokenizer = Tokenizer(path)
        else:
            if jax.process_index() == 0:
                load_or_train_tokenizer(workdir, texts, config.tokenizer.train_vocab_size)
            multihost_utils.sync_global_devices("tokenizer trained")
            tokenizer = load_or_train_tokenizer(workdir, texts, config.tokenizer.train_vocab_size)
        check_vocab(tokenizer, vocab_size)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.tokenizer: {error}") from None
    return tokenizer


def has_checkpoint(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _fields(differences, side: int) -> str:
    return ", ".join(f"{name}={values[side]}" for name, *values in differences)


def check_workdir(workdir: str, model_cfg: LlamaConfig, *, init_from: str = "", kind: str = "llama",
                  field: str = "config.init_from") -> None:
    """Before anything is written: a workdir that already holds a run must hold this architecture (and, with
    checkpoints, this scan_layers layout), and the params at `init_from` must have this model's shapes. One-line
    ConfigErrors naming both sides."""
    stored_file = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(stored_file):
        try:
            stored = param_checkpoint.load_config(workdir)
        except ValueError as error:
            raise ConfigError(f"{stored_file}: {error}") from None
        differences = stored.architecture_differences(model_cfg)
        if has_checkpoint(workdir) and stored.scan_layers != model_cfg.scan_layers:
            differences.append(("scan_layers", stored.scan_layers, model_cfg.scan_layers))
        if differences:
            raise ConfigError(f"{stored_file}: the workdir holds a run of another model ({_fields(differences, 0)}) "
                              f"than this run's ({_fields(differences, 1)}); resume with that model or use a new "
                              "--workdir")
    if init_from:
        try:
            param_checkpoint.check_params(init_from, model_cfg, kind=kind)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"{field}: {error}") from None


def write_workdir_files(workdir: str, model_cfg: LlamaConfig, tokenizer: Optional[Tokenizer] = None) -> None:
    """WORKDIR/llama_config.json and a copy of the tokenizer (process 0): the workdir is then a complete init_from
    and generation checkpoint."""
    write_model_config(workdir, model_cfg)
    if tokenizer is None or jax.process_index() != 0:
        return
    target = os.path.join(workdir, TOKENIZER_FILENAME)
    if os.path.abspath(tokenizer.model_path) != os.path.abspath(target):
        shutil.copyfile(tokenizer.model_path, target)


def lock_workdir(workdir: str) -> None:
    """One run per workdir (llama2_jax.training.workdir_lock): a ConfigError naming the live run that holds it."""
    try:
        workdir_lock.acquire(workdir)
    except workdir_lock.WorkdirLocked as error:
        raise ConfigError(str(error)) from None


def prepare_workdir(config, workdir: str, model_cfg: LlamaConfig, *, texts: Optional[Iterable[str]] = None,
                    kind: str = "llama") -> Tokenizer:
    """`check_workdir` (with config.init_from, a checkpoint of `kind`), `load_tokenizer`, then
    `write_workdir_files`: nothing in the workdir is rewritten unless the checks pass and this run holds the workdir's
    lock (`lock_workdir`). Returns the tokenizer."""
    check_workdir(workdir, model_cfg, init_from=config.init_from, kind=kind)
    lock_workdir(workdir)
    tokenizer = load_tokenizer(config, model_cfg.vocab_size, workdir=workdir, texts=texts)
    write_workdir_files(workdir, model_cfg, tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and state


def make_tx(config, total_steps: int, *, constant: bool = False):
    """AdamW + the paper's schedule (warmup, cosine to lr_end_fraction), or a constant LR. Returns (tx, schedule).
    A warmup longer than the run is cut to the run, with a warning naming both (a short run of a shipped config)."""
    if not constant and config.warmup_steps > total_steps:
        _log.warning("config.warmup_steps (%d) is longer than the run's %d steps (config.num_train_steps, or the "
                     "steps of config.num_epochs): the learning rate warms up over all %d steps, reaching its peak at "
                     "the last one, and does not decay", config.warmup_steps, total_steps, total_steps)
    if constant:
        schedule = lambda step: jnp.asarray(config.learning_rate, jnp.float32)  # noqa: E731
    else:
        schedule = train_state.warmup_cosine_schedule(config.learning_rate, config.warmup_steps, total_steps,
                                                      config.lr_end_fraction)
    tx = train_state.make_optimizer(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                                    weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    return tx, schedule


def init_llama_state(config, model_cfg: LlamaConfig, mesh, tx):
    """Sharded TrainState: random init from config.seed, or params loaded from config.init_from (a converted
    checkpoint or a trainer workdir) straight into their shardings. Returns (state, shardings)."""
    model = Llama(model_cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    init_fn = functools.partial(lambda rng: model.init(rng, tokens)["params"], jax.random.PRNGKey(config.seed))
    if not config.init_from:
        return train_state.create_train_state(init_fn, tx, mesh)
    shardings = train_state.state_shardings(jax.eval_shape(init_fn), tx, mesh)
    try:
        params, _ = param_checkpoint.load_params(config.init_from, model_cfg, shardings=shardings.params)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.init_from: {error}") from None
    return train_state.state_from_params(params, tx, shardings), shardings


def task_evals(config, model_cfg: LlamaConfig, tokenizer: Tokenizer, mesh) -> Optional[task_eval_lib.ExtraEvals]:
    """config.eval_tasks as run_loop's `extra_evals` (None when empty); its fields and task names are checked now."""
    try:
        return task_eval_lib.make_task_evals(config, model_cfg, tokenizer, mesh)
    except task_eval_lib.TaskEvalsError as error:
        raise ConfigError(str(error)) from None


def train_llama(config, workdir: str, model_cfg: LlamaConfig, mesh, train_iter, eval_batches: Optional[Callable],
                steps: int, *, eval_at_start: bool = False,
                extra_evals: Optional[Callable] = None) -> tuple[train_state.TrainState, list[dict]]:
    """Next-token training (pretraining, SFT): the schedule over `steps`, the state (random or init_from; with
    config.lora.rank > 0 adapters on the frozen init_from), the masked next-token loss, the shared loop;
    `eval_batches` None = no eval. With `eval_at_start` the initial model is evaluated first (logged as step 0)
    unless the run resumes. `extra_evals`: see `task_evals`. Returns (final state, logged records)."""
    tx, schedule = make_tx(config, steps)
    lora_cfg = lora_config(config)
    if lora_cfg is not None:  # adapters on the frozen init_from base
        run = init_lora_state(config, model_cfg, mesh, tx, lora_cfg, workdir=workdir)
        state, shardings = run.state, run.shardings
        step, eval_step = run.jit_steps(losses.next_token_loss, Llama(model_cfg), config, mesh, schedule)
    else:
        state, shardings = init_llama_state(config, model_cfg, mesh, tx)
        loss_fn = functools.partial(losses.next_token_loss, model=Llama(model_cfg))
        step = train_state.jit_train_step(loss_fn, shardings, mesh, grad_accum_steps=config.grad_accum_steps,
                                          learning_rate_fn=schedule)
        eval_step = train_state.jit_eval_step(loss_fn, shardings.params, mesh)
    eval_step = eval_step if eval_batches is not None else None
    history = []
    if eval_step is not None and eval_at_start and not has_checkpoint(workdir):
        metrics = loop.evaluate(state.params, eval_step, eval_batches(), mesh)
        writer = loop.Tracker.from_config(config, workdir)
        writer.write(0, metrics)
        writer.close()
        history.append({"step": 0, **metrics})
    settings = dataclasses.replace(loop.LoopSettings.from_config(config), num_train_steps=steps)
    state, logged = loop.run_loop(
        settings=settings, workdir=workdir, mesh=mesh, state=state, shardings=shardings, train_step=step,
        train_iter=train_iter, eval_step=eval_step, eval_batches=eval_batches, extra_evals=extra_evals,
        tokens_per_step=config.batch_size * config.seq_len, flops_per_token=model_cfg.flops_per_token(config.seq_len))
    return state, history + logged


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021) runs of train.sft, train.reward and train.dpo: adapters trained on a frozen base


def lora_config(config) -> Optional[lora.LoraConfig]:
    """config.lora as a LoraConfig, or None when config.lora.rank = 0 (off). One-line ConfigErrors."""
    fields = config.get("lora")
    if fields is None or fields.rank == 0:
        return None
    try:
        lora_cfg = lora.LoraConfig(rank=fields.rank, alpha=fields.alpha, dropout=fields.dropout,
                                   targets=fields.targets, dtype=fields.dtype)
    except ValueError as error:
        raise ConfigError(f"config.lora: {error}") from None
    if not config.init_from:
        raise ConfigError("config.lora.rank > 0 needs config.init_from: the base the adapters are trained on")
    return lora_cfg


@dataclasses.dataclass
class LoraRun:
    """state: over {"lora": adapters[, "score_head"]} only (trained, in the optimizer); frozen: the base (init_from
    in config.model.param_dtype, sharded by its logical axes), every step's frozen tree."""

    state: train_state.TrainState
    shardings: train_state.TrainState
    frozen: Any
    frozen_shardings: Any
    lora_cfg: lora.LoraConfig

    def jit_steps(self, loss_fn: Callable, model, config, mesh, schedule, *, pass_frozen: bool = False):
        """(train step, eval step) in the loop's signature (`pass_frozen`: lora.adapted_loss); eval has no dropout."""
        loss = lora.adapted_loss(loss_fn, model, self.lora_cfg, pass_frozen=pass_frozen)
        step = train_state.jit_train_step(loss, self.shardings, mesh, grad_accum_steps=config.grad_accum_steps,
                                          learning_rate_fn=schedule, frozen_shardings=self.frozen_shardings,
                                          rng_seed=config.seed + 1 if self.lora_cfg.dropout > 0 else None)
        eval_step = train_state.jit_eval_step(loss, self.shardings.params, mesh, frozen_shardings=self.frozen_shardings)
        return train_state.with_frozen(step, self.frozen), train_state.with_frozen(eval_step, self.frozen)


def init_lora_state(config, model_cfg: LlamaConfig, mesh, tx, lora_cfg: lora.LoraConfig, *, workdir: str,
                    kind: str = "llama", head_init_std: float = score_model.DEFAULT_HEAD_INIT_STD) -> LoraRun:
    """The base from config.init_from onto its shardings (frozen), then `lora_run` (kind="score": a reward model's
    trunk and head), WORKDIR/lora_config.json recording the base; prints the trainable / total parameter counts."""
    if has_checkpoint(workdir) and not param_checkpoint.is_lora_dir(workdir):
        raise ConfigError(f"{workdir} holds a full fine-tuning run: resume without config.lora or use a new --workdir")
    frozen_shardings = sh.tree_shardings(abstract_params(model_cfg, boxed=True), mesh)
    try:
        frozen, _ = param_checkpoint.load_params(config.init_from, model_cfg, shardings=frozen_shardings)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.init_from: {error}") from None
    run = lora_run(frozen, frozen_shardings, model_cfg, mesh, tx, lora_cfg, seed=config.seed, kind=kind,
                   head_init_std=head_init_std)
    param_checkpoint.write_lora_config(workdir, lora_cfg, config.init_from)
    if jax.process_index() == 0:
        print(lora.describe(run.state.params, {k: v for k, v in run.frozen.items() if k not in run.state.params}))
    return run


def lora_run(frozen, frozen_shardings, model_cfg: LlamaConfig, mesh, tx, lora_cfg: lora.LoraConfig, *, seed: int,
             kind: str = "llama", head_init_std: float = score_model.DEFAULT_HEAD_INIT_STD) -> LoraRun:
    """Fresh adapters for the sharded Llama params `frozen` in a sharded TrainState; kind="score": no `output`, and a
    fresh float32 score head trained too (frozen keeps its initial copy, replaced in every forward)."""
    rng = jax.random.PRNGKey(seed)
    trainable = {LORA: lora.init(rng, frozen, model_cfg, lora_cfg)}
    boxed = {LORA: lora.abstract(frozen, model_cfg, lora_cfg, boxed=True)}
    if kind == "score":
        frozen = {k: v for k, v in frozen.items() if k != "output"}
        frozen_shardings = {k: v for k, v in frozen_shardings.items() if k != "output"}
        head = score_model.init_score_params_from_llama(frozen, jax.random.fold_in(rng, 1), head_init_std)
        trainable[score_model.HEAD] = jax.tree.map(lambda x: np.asarray(x, np.float32), head[score_model.HEAD])
        boxed[score_model.HEAD] = score_model.abstract_score_params(model_cfg, boxed=True)[score_model.HEAD]
        frozen_shardings[score_model.HEAD] = jax.tree.map(lambda _: sh.replicated(mesh), head[score_model.HEAD])
        frozen[score_model.HEAD] = jax.device_put(head[score_model.HEAD], frozen_shardings[score_model.HEAD])
    shardings = train_state.state_shardings(boxed, tx, mesh)
    state = train_state.state_from_params(trainable, tx, shardings)
    return LoraRun(state, shardings, frozen, frozen_shardings, lora_cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning on a dialog file (train.sft; train.rejection_sampling fine-tunes on its pool with it)


@dataclasses.dataclass
class FineTuned:
    state: train_state.TrainState
    history: list[dict]
    model_cfg: LlamaConfig
    tokenizer: Tokenizer
    stats: sft_data.SFTStats
    workdir: str

    def host_params(self):
        """The fine-tuned params as host arrays; for a LoRA run the workdir's base merged with its adapters."""
        if param_checkpoint.is_lora_dir(self.workdir):
            return param_checkpoint.load_params(self.workdir, self.model_cfg)[0]
        return jax.device_get(self.state.params)


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
    check_num_epochs(config)
    lora_config(config)


def fine_tune(config, workdir: str) -> FineTuned:
    """SFT of config.init_from (or a random config.model) on the dialogs of config.data.path: packed rows, loss on
    assistant tokens, config.num_epochs (> 0) or config.num_train_steps steps."""
    check_shared_fields(config)
    check_sft_fields(config)
    loop.LoopSettings.from_config(config)  # profile_steps and wandb checked before anything is read or compiled
    model_cfg = resolve_model_config(config, config.seq_len)
    mesh = make_mesh(config)
    check_batch(config, mesh, model_cfg, config.seq_len)
    tokenizer = prepare_workdir(config, workdir, model_cfg)
    extra_evals = task_evals(config, model_cfg, tokenizer, mesh)
    data = config.data
    try:
        dialogs = sft_data.load_sft_data(
            data.path, tokenizer, format=data.format, on_error=data.on_error, seq_len=config.seq_len,
            batch_size=config.batch_size, seed=config.seed, val_fraction=data.val_fraction, overlong=data.overlong,
            max_eval_batches=config.eval_batches or None)
    except (ValueError, ImportError) as error:  # ImportError: an hf:/tfds: spec without its extra installed
        raise ConfigError(f"config.data: {error}") from None
    steps = num_train_steps(config, lambda epochs: dialogs.steps_for_epochs(epochs, config.batch_size))
    if jax.process_index() == 0:
        print(f"SFT data: {dialogs.stats.summary()}\ntraining for {steps} steps")
    train_iter, eval_batches = process_local(dialogs.train_iter,
                                             dialogs.eval_batches if dialogs.stats.eval_samples else None)
    state, history = train_llama(config, workdir, model_cfg, mesh, train_iter, eval_batches, steps,
                                 eval_at_start=config.eval_at_start, extra_evals=extra_evals)
    return FineTuned(state, history, model_cfg, tokenizer, dialogs.stats, workdir)
