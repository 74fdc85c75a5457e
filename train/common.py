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
import sys
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from llama2_jax import checkpoint as param_checkpoint
from llama2_jax import losses, rlhf, score_model
from llama2_jax import sharding as sh
from llama2_jax.config import LlamaConfig
from llama2_jax.data import prompts as prompt_data
from llama2_jax.data import records
from llama2_jax.data import sft as sft_data
from llama2_jax.model import Llama
from llama2_jax.tokenizer import TOKENIZER_FILENAME, Tokenizer, check_vocab, load_or_train_tokenizer
from train import loop
from train import state as train_state
from train.checkpoints import CONFIG_FILE, write_model_config
from train.config_checks import (ConfigError, check_attention_backend, check_shared_fields,  # noqa: F401 (re-export)
                                 check_workdir_path, config_load_error)

FLAGS = flags.FLAGS
_log = logging.getLogger(__name__)


def define_runtime_flags() -> None:
    """Flags every trainer takes besides --config: the workdir and multi-host start-up."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard and the tokenizer.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
    flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0 .. num_processes-1 (multi-host).")
    flags.mark_flags_as_required(["workdir"])


def run_main(train_and_evaluate: Callable[[Any, str], Any]) -> Callable[[list[str]], None]:
    """An absl `main` that starts the distributed runtime, runs the trainer, and turns ConfigError into one line."""

    def main(argv):
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
        if len(argv) > 1:
            raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            try:
                config = FLAGS.config
                config.keys()  # a config file that failed to load raises OSError on first use
            except OSError as error:
                raise ConfigError(config_load_error(error)) from None
            check_workdir_path(FLAGS.workdir)
            sh.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            train_and_evaluate(config, FLAGS.workdir)
        except (ConfigError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    return main


# ----------------------------------------------------------------------------------------------------------------------
# Model config: the architecture of init_from, the numerics of config.model


def model_config(config) -> LlamaConfig:
    """config.model as a LlamaConfig (every field)."""
    try:
        return LlamaConfig.from_dict(config.model.to_dict())
    except ValueError as error:
        raise ConfigError(f"config.model: {error}") from None


def model_config_from(path: str, numerics: LlamaConfig, field: str) -> LlamaConfig:
    """The architecture stored at `path` (its llama_config.json) with the `LlamaConfig.NUMERICS_FIELDS` of
    `numerics`; errors name `field`."""
    try:
        return param_checkpoint.load_config(path).with_numerics(numerics)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{field}: {error}") from None


def resolve_model_config(config, seq_len: Optional[int] = None, *, required: bool = False) -> LlamaConfig:
    """config.model for a random init (init_from = ""); else init_from's architecture with config.model's numerics,
    max_seq_len (no parameter depends on it) raised to `seq_len` when that is longer, with a warning: RoPE
    positions past the checkpoint's context are then new to the model. `required`: init_from must be given. The
    shared fields are range-checked first (`check_shared_fields`)."""
    check_shared_fields(config)
    numerics = model_config(config)
    check_attention_backend(numerics.attention_impl)
    if not config.init_from:
        if required:
            raise ConfigError("config.init_from is empty: pass the model to start from (for RLHF the policy: an SFT "
                              "or RLHF workdir or checkpoint dir)")
        return numerics
    model_cfg = model_config_from(config.init_from, numerics, "config.init_from")
    if seq_len is not None and seq_len > model_cfg.max_seq_len:
        _log.warning("config.seq_len %d exceeds the init_from model's max_seq_len %d: raising max_seq_len (RoPE "
                     "positions past %d are new to the model)", seq_len, model_cfg.max_seq_len, model_cfg.max_seq_len)
        model_cfg = model_cfg.replace(max_seq_len=seq_len)
    return model_cfg


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


def prepare_workdir(config, workdir: str, model_cfg: LlamaConfig, *, texts: Optional[Iterable[str]] = None,
                    kind: str = "llama") -> Tokenizer:
    """`check_workdir` (with config.init_from, a checkpoint of `kind`), `load_tokenizer`, then
    `write_workdir_files`: nothing in the workdir is rewritten unless the checks pass. Returns the tokenizer."""
    check_workdir(workdir, model_cfg, init_from=config.init_from, kind=kind)
    tokenizer = load_tokenizer(config, model_cfg.vocab_size, workdir=workdir, texts=texts)
    write_workdir_files(workdir, model_cfg, tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and state


def make_tx(config, total_steps: int, *, constant: bool = False):
    """AdamW + the paper's schedule (warmup, cosine to lr_end_fraction), or a constant LR. Returns (tx, schedule)."""
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


def train_llama(config, workdir: str, model_cfg: LlamaConfig, mesh, train_iter, eval_batches: Optional[Callable],
                steps: int, *, eval_at_start: bool = False) -> tuple[train_state.TrainState, list[dict]]:
    """Next-token training (pretraining, SFT): the schedule over `steps`, the state (random or init_from), the masked
    next-token loss, the shared loop; `eval_batches` None = no eval. With `eval_at_start` the initial model is
    evaluated first (logged as step 0) unless the run resumes. Returns (final state, logged records)."""
    tx, schedule = make_tx(config, steps)
    state, shardings = init_llama_state(config, model_cfg, mesh, tx)
    loss_fn = functools.partial(losses.next_token_loss, model=Llama(model_cfg))
    step = train_state.jit_train_step(loss_fn, shardings, mesh, grad_accum_steps=config.grad_accum_steps,
                                      learning_rate_fn=schedule)
    eval_step = train_state.jit_eval_step(loss_fn, shardings.params, mesh) if eval_batches is not None else None
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
        train_iter=train_iter, eval_step=eval_step, eval_batches=eval_batches,
        tokens_per_step=config.batch_size * config.seq_len, flops_per_token=model_cfg.flops_per_token(config.seq_len))
    return state, history + logged


# ----------------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning on a dialog file (train.sft; train.rejection_sampling fine-tunes on its pool with it)


@dataclasses.dataclass
class FineTuned:
    state: train_state.TrainState
    history: list[dict]
    model_cfg: LlamaConfig
    tokenizer: Tokenizer
    stats: sft_data.SFTStats


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


def fine_tune(config, workdir: str) -> FineTuned:
    """SFT of config.init_from (or a random config.model) on the dialogs of config.data.path: packed rows, loss on
    assistant tokens, config.num_epochs (> 0) or config.num_train_steps steps."""
    check_shared_fields(config)
    check_sft_fields(config)
    model_cfg = resolve_model_config(config, config.seq_len)
    mesh = make_mesh(config)
    check_batch(config, mesh, model_cfg, config.seq_len)
    tokenizer = prepare_workdir(config, workdir, model_cfg)
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
                                 eval_at_start=config.eval_at_start)
    return FineTuned(state, history, model_cfg, tokenizer, dialogs.stats)


# ----------------------------------------------------------------------------------------------------------------------
# Batches across processes


class ProcessRows:
    """Wraps an iterator of *global* batches and yields this process's contiguous block of rows.

    Every process reads the same global stream, so a run on P processes sees exactly the batches of a run on one
    process (the multi-host test relies on it). Reading everything on every host is cheap for tokenized text; for
    web-scale TFDS sources shard the source per host instead.
    """

    def __init__(self, iterator: Iterator[dict], index: int, count: int):
        self.iterator, self.index, self.count = iterator, index, count

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.rows(next(self.iterator))

    def rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * rows:(self.index + 1) * rows] for k, v in batch.items()}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


def process_local(train_iter, eval_batches: Optional[Callable[[], list]] = None):
    """(this process's rows of every global train batch, a function returning this process's rows of every global
    eval batch, or None without eval batches)."""
    local = ProcessRows(train_iter, jax.process_index(), jax.process_count())
    if eval_batches is None:
        return local, None
    return local, lambda: [local.rows(batch) for batch in eval_batches()]


def host_to_global(array, mesh) -> jax.Array:
    """The same host array on every process -> a global array split over the mesh's data axes (for this process's
    rows of a global batch use `loop.process_rows_to_global`)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sh.batch_sharding(mesh, array.ndim), lambda index: array[index])


def to_host(tree):
    """Global arrays -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------------------------------------------------
# RLHF: prompts and reward models (rejection sampling, PPO)


def load_prompts(config, tokenizer) -> tuple[list[prompt_data.Prompt], list[list[int]]]:
    """The prompts of config.prompts (see `llama2_jax.data.prompts.load_prompts`) and their chat encodings."""
    p = config.prompts
    try:
        return prompt_data.load_prompts(p.path, tokenizer, max_prompt_len=p.max_prompt_len, format=p.format,
                                        on_error=p.on_error, is_safety=p.is_safety, max_prompts=p.max_prompts)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.prompts: {error}") from None


def sigmoid_reward(params, tokens, lengths, *, cfg: LlamaConfig):
    """A reward model's score in [0, 1] (`rlhf.ScoreFn` once cfg is bound)."""
    return jax.nn.sigmoid(score_model.score_tokens(params, cfg, tokens, lengths))


def load_score_params(path: str, cfg: LlamaConfig, shardings, field: str):
    """The params of a score-model checkpoint or workdir (train.reward, PPO's value model) onto `shardings`."""
    try:
        return param_checkpoint.load_params(path, cfg, shardings=shardings, kind="score")[0]
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{field}: {error}") from None


def load_reward_models(config, mesh, vocab_size: int) -> tuple[dict[str, rlhf.ScoreFn], dict[str, Any]]:
    """({name: sigmoid score fn}, {name: params sharded on the mesh}) for config.reward.helpful_path / safety_path
    (either may be empty, not both; one path given twice is loaded once). Numerics from config.model."""
    paths = {name: config.reward[f"{name}_path"] for name in rlhf.REWARD_NAMES if config.reward[f"{name}_path"]}
    if not paths:
        raise ConfigError("config.reward.helpful_path and config.reward.safety_path are both empty")
    numerics, fns, params, loaded = model_config(config), {}, {}, {}
    for name, path in paths.items():
        field = f"config.reward.{name}_path"
        cfg = model_config_from(path, numerics, field)
        if cfg.vocab_size != vocab_size:
            raise ConfigError(f"{field}: vocabulary {cfg.vocab_size} differs from the policy's {vocab_size} (the "
                              "reward models must share the policy's tokenizer)")
        if path not in loaded:
            shardings = sh.tree_shardings(score_model.abstract_score_params(cfg, boxed=True), mesh)
            loaded[path] = load_score_params(path, cfg, shardings, field)
        params[name] = loaded[path]
        fns[name] = functools.partial(sigmoid_reward, cfg=cfg)
    return fns, params
