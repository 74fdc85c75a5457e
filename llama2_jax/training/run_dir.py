"""A run's workdir belongs to one run: the checks made before anything is written in it, the lock, and the files
written once every check has passed (names in `llama2_jax.checkpoints.layout`).

WORKDIR/run.json records which trainer made the workdir and what a resumed run must match: the model's
architecture, LoRA or full fine-tuning (and the LoRA settings), and what the trainer adds (PPO: its value model). A
trainer given a workdir of another trainer or of another model, or an init_from that is the workdir itself, gets a
one-line ConfigError before anything is written. Workdirs made before run.json existed are checked by their
llama_config.json and checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax

from llama2_jax.checkpoints import params_io
from llama2_jax.checkpoints.layout import (
    CONFIG_FILE,
    RUN_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    has_checkpoint,
    read_run_record,
)
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.lora import LoraConfig
from llama2_jax.text.tokenizer import Tokenizer
from llama2_jax.training import workdir_lock
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.outputs import write_json


def run_record(trainer: str, model_cfg: LlamaConfig, lora_cfg: Optional[LoraConfig], more: Optional[dict] = None,
               config: Optional[dict] = None) -> dict:
    """What WORKDIR/run.json holds: the trainer, the model, the LoRA settings (None: full fine-tuning), the
    trainer's further models (`more`), and the flattened config for reference (not compared on resume)."""
    record = {"trainer": trainer, "model": model_cfg.to_dict(), "lora": lora_cfg.to_dict() if lora_cfg else None,
              "more": more or {}, "config": config or {}}
    return json.loads(json.dumps(record, default=str))  # as it reads back (tuples as lists): compared on resume


def same_path(a: str, b: str) -> bool:
    if not a or not b or "://" in a or "://" in b:
        return a == b and bool(a)
    return os.path.realpath(a) == os.path.realpath(b)


def check_init_from(init_from: str, workdir: str, field: str = "config.init_from") -> None:
    """init_from may not be the workdir itself: a run resumes from its own checkpoints without it, and a new run
    needs a new workdir."""
    if same_path(init_from, workdir):
        raise ConfigError(f"{field} is the workdir itself ({workdir}): to resume that run pass only --workdir; to "
                          "train from it, pass a new --workdir")


def _fields(differences, side: int) -> str:
    return ", ".join(f"{name}={values[side]}" for name, *values in differences)


def _model_differences(stored: LlamaConfig, model_cfg: LlamaConfig, workdir: str) -> list:
    differences = stored.architecture_differences(model_cfg)
    if has_checkpoint(workdir) and stored.scan_layers != model_cfg.scan_layers:
        differences.append(("scan_layers", stored.scan_layers, model_cfg.scan_layers))
    return differences


def check_workdir(workdir: str, record: dict) -> None:
    """A workdir that already holds a run must hold a run of this trainer, model, LoRA settings and further models
    (`record`, see `run_record`). One-line ConfigErrors naming both sides."""
    try:
        stored = read_run_record(workdir)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    where, model_cfg = os.path.join(workdir, RUN_FILE), LlamaConfig.from_dict(record["model"])
    if stored is not None and stored["trainer"] != record["trainer"]:
        raise ConfigError(f"{where}: the workdir holds a {stored['trainer']} run, not a {record['trainer']} run; "
                          "use a new --workdir (to train from that run, pass it as config.init_from)")
    config_file = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(config_file) or stored is not None:
        try:
            held = LlamaConfig.from_dict(stored["model"]) if stored else params_io.load_config(workdir)
        except ValueError as error:
            raise ConfigError(f"{config_file}: {error}") from None
        differences = _model_differences(held, model_cfg, workdir)
        if differences:
            raise ConfigError(f"{where if stored else config_file}: the workdir holds a run of another model "
                              f"({_fields(differences, 0)}) than this run's ({_fields(differences, 1)}); resume with "
                              "that model or use a new --workdir")
    _check_lora(workdir, stored, record["lora"])
    if stored is not None and stored.get("more", {}) != record["more"]:
        names = sorted(set(stored.get("more", {})) | set(record["more"]))
        raise ConfigError(f"{where}: the workdir holds a run of other {', '.join(names)} settings than this run's; "
                          "resume with them or use a new --workdir")


def _check_lora(workdir: str, stored: Optional[dict], lora: Optional[dict]) -> None:
    if stored is not None:
        held = stored.get("lora")
    elif has_checkpoint(workdir):  # a workdir without run.json: its lora_config.json tells LoRA from full
        held = "lora" if params_io.is_lora_dir(workdir) else None
    else:
        return
    if (held is None) != (lora is None):
        kind = "a full fine-tuning run" if held is None else "a LoRA run"
        hint = "without config.lora" if held is None else "with its config.lora settings"
        raise ConfigError(f"{workdir} holds {kind}: resume {hint} or use a new --workdir")
    if isinstance(held, dict) and held != lora:
        raise ConfigError(f"{os.path.join(workdir, RUN_FILE)}: the workdir holds a LoRA run with config.lora "
                          f"{held}, not {lora}; resume with those settings or use a new --workdir")


def check_init_params(path: str, model_cfg: LlamaConfig, *, kind: str = "llama", field: str = "config.init_from",
                      kinds: tuple[str, ...] = ()):
    """The params at `path` have this model's shapes, as a model of `kind` or of any of `kinds` (read from the Orbax
    metadata only); the error names the first kind's mismatch."""
    first = None
    for each in kinds or (kind,):
        try:
            params_io.check_params(path, model_cfg, kind=each)
            return
        except (ValueError, FileNotFoundError) as error:
            first = first or error
    raise ConfigError(f"{field}: {first}")


def check_unlocked(workdir: str) -> None:
    """No other live run holds the workdir (read only: `lock_workdir` takes the lock once the checks pass)."""
    try:
        workdir_lock.check_free(workdir)
    except workdir_lock.WorkdirLocked as error:
        raise ConfigError(str(error)) from None


def lock_workdir(workdir: str) -> None:
    """One run per workdir (`training.workdir_lock`): a ConfigError naming the live run that holds it."""
    try:
        workdir_lock.acquire(workdir)
    except workdir_lock.WorkdirLocked as error:
        raise ConfigError(str(error)) from None


def write_workdir(workdir: str, record: dict, *, tokenizer: Optional[Tokenizer] = None, writes_model: bool = True,
                  lora_base: str = "") -> None:
    """run.json and, for a workdir that holds a model (an init_from), llama_config.json, the tokenizer and a LoRA
    run's lora_config.json (recording its base). Process 0 writes."""
    if jax.process_index() != 0:
        return
    write_json(os.path.join(workdir, RUN_FILE), record)
    if not writes_model:
        return
    params_io.write_config(workdir, LlamaConfig.from_dict(record["model"]))
    if record["lora"] is not None:
        params_io.write_lora_config(workdir, LoraConfig.from_dict(record["lora"]), lora_base)
    target = os.path.join(workdir, TOKENIZER_FILE)
    if tokenizer is not None and not same_path(tokenizer.model_path, target):
        shutil.copyfile(tokenizer.model_path, target)
