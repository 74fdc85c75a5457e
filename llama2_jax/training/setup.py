"""One set-up for every trainer: `run = setup(config, workdir, task=TASK)`, then build the state and call the loop.

`setup` goes through one fixed order, and every check comes before anything is compiled or written:

   1. the shared config fields (`checks.check_shared_fields`), then the trainer's own (`task.check`); init_from is
      not the workdir itself; config.lora
   2. the loop settings (profile_steps, W&B) and the model: config.model, or init_from's architecture with
      config.model's numerics (`model_config.resolve_model_config`)
   3. the mesh and the batch split over it; the checks that need the model or the mesh (`task.check_model`)
   4. the workdir (`run_dir`): no live run holding it, and a run of this trainer, model and LoRA settings if it
      holds one
   5. init_from's params have this model's shapes; the tokenizer (given, init_from's, or the one a resumed run
      trained) has the model's vocabulary
   6. the data read (`task.read`), a tokenizer trained on it when there is none, the batches built
      (`task.make_data`), the in-training lm-eval tasks, the schedule (`task.schedule`)
   7. only then the lock and the workdir's files: run.json, and for a workdir that holds a model llama_config.json,
      tokenizer.model and a LoRA run's lora_config.json
The returned `Run` carries all of it; `Run.run_loop` runs the shared loop with it. A new trainer writes a `Task`
(its fields' checks and its data), its loss and its report: train/dpo.py is the shortest example.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
from jax.sharding import Mesh

from llama2_jax.checkpoints.layout import has_checkpoint
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.lora import LoraConfig
from llama2_jax.text.tokenizer import Tokenizer
from llama2_jax.training import loop, run_dir
from llama2_jax.training import task_evals as task_eval_lib
from llama2_jax.training.checks import ConfigError, check_shared_fields
from llama2_jax.training.lora_run import lora_config
from llama2_jax.training.model_config import resolve_model_config
from llama2_jax.training.tokenizer_setup import find_tokenizer, train_run_tokenizer
from llama2_jax.training.tracking import flatten


def _nothing(*args) -> None:
    del args


@dataclasses.dataclass(frozen=True)
class Task:
    """What a trainer adds to the set-up. Every hook raises one-line ConfigErrors and writes nothing."""
    name: str  # recorded in WORKDIR/run.json: a workdir made by another trainer is refused
    check: Callable[[Any], None] = _nothing  # (config): the trainer's own fields
    check_model: Callable[..., Optional[dict]] = _nothing  # (config, model_cfg, mesh) -> what more a resumed run
    # must match (recorded in run.json, e.g. PPO's value model), or None
    read: Callable[[Any], Any] = _nothing  # (config) -> raw data, read before the tokenizer
    texts: Optional[Callable[[Any], Iterable[str]]] = None  # (raw) -> what a tokenizer is trained on when the config
    # names none (pretraining, reward models); None: a tokenizer must be given (or come with init_from)
    make_data: Callable[..., Any] = _nothing  # (config, tokenizer, raw) -> the run's data (batches, prompts ...)
    schedule: Callable[..., dict] = lambda config, data: {}  # (config, data) -> resolved config fields, e.g.
    # {"num_train_steps": N} from config.num_epochs
    seq_len: bool = True  # config.seq_len is the training length: it raises max_seq_len and splits batch_size
    init_from_required: bool = False
    lora: bool = True  # config.lora can train adapters; else config.lora.rank > 0 is refused
    eval_tasks: bool = True  # config.eval_tasks (lm-eval) can run during training
    init_kinds: tuple[str, ...] = ("llama",)  # checkpoint kinds init_from may hold (the reward model: a Llama, or a
    # reward model to continue training)
    writes_model: bool = True  # the workdir holds the trained model (llama_config.json, tokenizer.model: an
    # init_from); False: its models are in sub-directories (rejection sampling's iterations)


@dataclasses.dataclass
class Run:
    """A checked run: everything a trainer needs to build its state and call the loop."""
    config: Any  # the trainer config with the schedule resolved (num_train_steps ...)
    workdir: str
    task: Task
    model_cfg: LlamaConfig
    mesh: Mesh
    tokenizer: Tokenizer
    data: Any  # what task.make_data returned
    settings: loop.LoopSettings  # num_train_steps resolved
    lora_cfg: Optional[LoraConfig]
    extra_evals: Optional[task_eval_lib.ExtraEvals]  # config.eval_tasks, or None

    def run_loop(self, **kwargs) -> loop.TrainResult:
        """`loop.run_loop` with this run's settings, workdir, mesh and in-training evals."""
        kwargs.setdefault("settings", self.settings)
        return loop.run_loop(workdir=self.workdir, mesh=self.mesh, extra_evals=self.extra_evals, **kwargs)

    def train(self, trainable, loss_fn: Callable, model, schedule, train_iter, eval_batches: Optional[Callable], *,
              tokens_per_step: int, flops_per_token: float, reference: bool = False,
              eval_at_start: bool = False) -> loop.TrainResult:
        """A loss on a `state.Trainable` through the shared loop: its jitted steps (config.grad_accum_steps; LoRA
        dropout keyed from config.seed; `reference`: the loss gets the frozen tree, see `Trainable.jit_steps`), the
        held-out batches evaluated every eval_every_steps (`eval_batches` None = no eval) and, with `eval_at_start`,
        once before the first step (logged as step 0) unless the run resumes."""
        config = self.config
        step, eval_step = trainable.jit_steps(loss_fn, model, self.mesh, schedule=schedule, seed=config.seed,
                                              grad_accum_steps=config.grad_accum_steps, reference=reference)
        eval_step = eval_step if eval_batches is not None else None
        first = []
        if eval_step is not None and eval_at_start and not has_checkpoint(self.workdir):
            first = [{"step": 0, **loop.evaluate(trainable.state.params, eval_step, eval_batches(), self.mesh)}]
            tracker = self.settings.tracker(self.workdir)
            tracker.write(0, {k: v for k, v in first[0].items() if k != "step"})
            tracker.close()
        result = self.run_loop(state=trainable.state, shardings=trainable.shardings, train_step=step,
                               train_iter=train_iter, eval_step=eval_step, eval_batches=eval_batches,
                               tokens_per_step=tokens_per_step, flops_per_token=flops_per_token)
        result.history[:0] = first
        return result


def setup(config, workdir: str, task: Task) -> Run:
    """The checked run of `task` in `workdir` (module docstring: the order of the checks and writes)."""
    check_shared_fields(config)
    task.check(config)
    run_dir.check_init_from(config.init_from, workdir)
    lora_cfg = lora_config(config) if task.lora else _no_lora(config, task)
    settings = loop.LoopSettings.from_config(config)
    model_cfg = resolve_model_config(config, config.seq_len if task.seq_len else None,
                                     required=task.init_from_required)
    mesh = make_mesh(config)
    if task.seq_len:
        check_batch(config, mesh, model_cfg, config.seq_len)
    more = task.check_model(config, model_cfg, mesh)
    record = run_dir.run_record(task.name, model_cfg, lora_cfg, more, _flat_config(config))
    run_dir.check_unlocked(workdir)
    run_dir.check_workdir(workdir, record)
    if config.init_from:
        run_dir.check_init_params(config.init_from, model_cfg, kinds=task.init_kinds)
    tokenizer = find_tokenizer(config, model_cfg.vocab_size, workdir=workdir, trainable=task.texts is not None)
    raw = task.read(config)
    if tokenizer is None:
        tokenizer = train_run_tokenizer(config, model_cfg.vocab_size, task.texts(raw))
    data = task.make_data(config, tokenizer, raw)
    extra_evals = task_evals(config, model_cfg, tokenizer, mesh) if task.eval_tasks else None
    resolved = config.copy_and_resolve_references()
    for field, value in task.schedule(config, data).items():
        resolved[field] = value
    settings = dataclasses.replace(settings, num_train_steps=resolved.num_train_steps)
    run_dir.lock_workdir(workdir)
    run_dir.write_workdir(workdir, record, tokenizer=tokenizer, writes_model=task.writes_model,
                          lora_base=config.init_from)
    return Run(resolved, workdir, task, model_cfg, mesh, tokenizer, data, settings, lora_cfg, extra_evals)


def _no_lora(config, task: Task) -> None:
    if config.get("lora") is not None and config.lora.rank:
        rounds = " (its fine-tuning rounds take config.sft.lora)" if "sft" in config else ""
        raise ConfigError(f"config.lora.rank={config.lora.rank}: train.{task.name} trains no LoRA adapters{rounds}")


def _flat_config(config) -> dict:
    return flatten(config.to_dict()) if hasattr(config, "to_dict") else {}


def make_mesh(config) -> Mesh:
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


def num_train_steps(config, steps_for_epochs: Callable[[float], int]) -> int:
    """config.num_train_steps, or `steps_for_epochs(config.num_epochs)` when num_epochs > 0 (0.0 = use
    num_train_steps; configs/base.py)."""
    return steps_for_epochs(config.num_epochs) if config.num_epochs > 0 else config.num_train_steps


def task_evals(config, model_cfg: LlamaConfig, tokenizer: Tokenizer, mesh) -> Optional[task_eval_lib.ExtraEvals]:
    """config.eval_tasks as run_loop's `extra_evals` (None when empty); its fields and task names are checked now."""
    try:
        return task_eval_lib.make_task_evals(config, model_cfg, tokenizer, mesh)
    except task_eval_lib.TaskEvalsError as error:
        raise ConfigError(str(error)) from None
