"""The one definition of what a checkpoint dir and a trainer workdir hold on disk: file names, Orbax items, errors.

A converted checkpoint dir (`params_io.save_params`, `python -m llama2_jax.convert --to=jax`):
    PATH/llama_config.json              the model (`LlamaConfig` as JSON)
    PATH/params/                        Orbax params, unrolled
    PATH/tokenizer.model                when a tokenizer was copied there
    PATH/lora_config.json + PATH/lora/  a LoRA dir: the adapters and the base checkpoint they were trained on
A trainer workdir (every `python -m train.<trainer>`) is a checkpoint dir too, so any workdir is an init_from:
    WORKDIR/run.json                    which trainer made it and what a resumed run must match (training.run_dir)
    WORKDIR/llama_config.json, tokenizer.model, lora_config.json    as above
    WORKDIR/checkpoints/<step>/         one Orbax step: `params` (or `lora` [+ `head`] for a LoRA run),
                                        `opt_state`, `extra` (JSON: the loop step and the data-iterator state), and
                                        `<model>_params`, `<model>_opt_state` for each further model (PPO's value)
    WORKDIR/unreadable_checkpoints/<step>   steps whose files did not read, set aside on resume
    WORKDIR/metrics.jsonl, tensorboard/, wandb/, wandb_run_id, profile/    what the tracker and profiler write
    WORKDIR/.lock                       the live run writing the workdir

`CheckpointError` is every checkpoint failure told in one line (a ValueError, so command lines that report bad
input report it too); `UnreadableCheckpoint` is the one for files that do not read.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from llama2_jax.checkpoints.storage import first_line

CONFIG_FILE = "llama_config.json"
TOKENIZER_FILE = "tokenizer.model"
LORA_CONFIG_FILE = "lora_config.json"
RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"
PROFILE_DIR = "profile"
LOCK_FILE = ".lock"

# Orbax items of one step (and of a converted dir: `params` or `lora`)
PARAMS_ITEM = "params"
LORA_ITEM = "lora"  # the adapters (the key of llama2_jax.model.llama.LORA in a LoRA run's trained tree)
HEAD_ITEM = "head"  # a LoRA reward model's trained score head
OPT_STATE_ITEM = "opt_state"
EXTRA_ITEM = "extra"


def model_items(name: str) -> tuple[str, str]:
    """(params item, optimizer-state item) of a further model of a step, e.g. PPO's value model."""
    return f"{name}_{PARAMS_ITEM}", f"{name}_{OPT_STATE_ITEM}"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message is one line."""


class UnreadableCheckpoint(CheckpointError):
    """The files of a checkpoint (one Orbax item or one step) do not read: cut short by a kill or a full disk, or
    corrupted. `step` is the step number when a trainer step is meant."""

    def __init__(self, where: str, error: BaseException, step: Optional[int] = None):
        super().__init__(f"checkpoint {where} cannot be read ({first_line(error)})")
        self.step = step


def checkpoint_steps(workdir: str) -> list[int]:
    """The step directories of WORKDIR/checkpoints (finished or not), sorted."""
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def has_checkpoint(workdir: str) -> bool:
    return bool(checkpoint_steps(workdir))


def read_run_record(workdir: str) -> Optional[dict]:
    """WORKDIR/run.json, or None for a workdir without one (new, or made before run records existed)."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} does not read ({first_line(error)}); restore it or use a new --workdir") \
            from None
    if not isinstance(record, dict) or not isinstance(record.get("trainer"), str):
        raise CheckpointError(f"{path}: expected an object with a 'trainer' name; restore it or use a new --workdir")
    return record
