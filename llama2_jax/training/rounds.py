"""Rounds of "generate data with the policy, fine-tune the policy on it": rejection sampling (paper section 3.2.3),
Ghost Attention (3.3) and safety context distillation (4.2.4).

Each round is one step of the shared loop (`run_rounds`) on a `LoopState` without models: the loop checkpoints the
round count after each round (WORKDIR/checkpoints/<round>/extra), logs the round's figures through the tracker and
stops cleanly on SIGTERM, so a rerun skips finished rounds. A round fine-tunes with the SFT trainer's run
(`fine_tune_round`: `sft_run.fine_tune` in its own sub-workdir, resumed from its own checkpoints); a SIGTERM during
that run stops the rounds without counting the round as done.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from llama2_jax.checkpoints import params_io
from llama2_jax.inference import generate
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import abstract_params
from llama2_jax.training.checks import ConfigError, check_shared_fields
from llama2_jax.training.hosts import host_to_global, to_host
from llama2_jax.training.loop import Interrupted, TrainResult
from llama2_jax.training.setup import Run, check_batch
from llama2_jax.training.sft_run import fine_tune
from llama2_jax.training.state import LoopState

Round = Callable[[int], dict]  # round index (0-based) -> its figures (floats), logged at loop step index + 1


def check_fine_tuning(config, mesh) -> None:
    """The fine-tuning config (config.sft): its shared fields and its batch over the mesh, checked before any round
    samples anything. The errors name config.sft's fields."""
    try:
        check_shared_fields(config.sft)
        check_batch(config.sft, mesh)
    except ConfigError as error:
        raise ConfigError(str(error).replace("config.", "config.sft.")) from None


def check_round_config(config, mesh) -> None:
    """`check_fine_tuning`, and the sampling batch over the data-parallel devices."""
    check_fine_tuning(config, mesh)
    rows, dp = config.sampling.batch_size, sh.data_parallel_size(mesh)
    if rows < 1 or rows % dp:
        raise ConfigError(f"config.sampling.batch_size ({rows}) must be a positive multiple of the data-parallel "
                          f"size {dp}")


def check_generation_length(config, model_cfg) -> None:
    if config.prompts.max_prompt_len + config.sampling.max_gen_len > model_cfg.max_seq_len:
        raise ConfigError(f"config.prompts.max_prompt_len + config.sampling.max_gen_len exceeds the policy's "
                          f"max_seq_len {model_cfg.max_seq_len}")


def run_rounds(run: Run, rounds: int, one_round: Round) -> TrainResult:
    """`rounds` rounds on the shared loop; a rerun goes on after the last finished one."""
    settings = dataclasses.replace(run.settings, num_train_steps=rounds, log_every_steps=1, checkpoint_every_steps=1,
                                   progress_bar=False)

    def step(state: LoopState, batch):
        del batch
        index = int(jax.device_get(state.step))
        return state.replace(step=index + 1), one_round(index)

    return run.run_loop(settings=settings, state=LoopState(0), shardings=LoopState(None), train_step=step,
                        train_iter=None)


def fine_tune_round(config, *, init_from: str, data_path: str, tokenizer_path: str, workdir: str,
                    seed: int) -> TrainResult:
    """SFT of `init_from` on `data_path` with config.sft (init_from, data, tokenizer, mesh and seed filled in) in
    `workdir`; raises `Interrupted` when a SIGTERM stopped it."""
    sft = config.sft.copy_and_resolve_references()
    sft.init_from, sft.data.path, sft.tokenizer.path = init_from, data_path, tokenizer_path
    sft.mesh, sft.seed = config.mesh, seed
    result = fine_tune(sft, workdir)
    if result.interrupted:
        raise Interrupted
    return result


def load_policy(path: str, model_cfg, mesh):
    """The policy's params from `path` onto the mesh (sharded by their logical axes)."""
    shardings = sh.tree_shardings(abstract_params(model_cfg, boxed=True), mesh)
    return params_io.load_params(path, model_cfg, shardings=shardings)[0]


def sample_rows(sampler: Callable, rows: list, prompt_arrays: Callable[[list], dict], rows_per_call: int, mesh,
                rng) -> list[dict]:
    """`sampler(**global arrays, rng=...)` over `rows` in calls of `rows_per_call` (the last call padded with copies
    of its first row); `prompt_arrays(rows) -> {name: host array [rows_per_call, ...]}`. Returns one dict of host
    arrays per row."""
    out = []
    for start in range(0, len(rows), rows_per_call):
        chunk = rows[start:start + rows_per_call]
        arrays = prompt_arrays(chunk + [chunk[0]] * (rows_per_call - len(chunk)))
        result = to_host(sampler(**{k: host_to_global(v, mesh) for k, v in arrays.items()},
                                 rng=jax.random.fold_in(rng, start)))
        out += [{name: value[i] for name, value in result.items()} for i in range(len(chunk))]
    return out


def pad(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [N, width] prompts (-1) and their lengths."""
    return generate.pad_prompts(prompts, generate.META_PAD_ID, width, bucket=width)


def sft_dir(workdir: str, *parts: str) -> str:
    return os.path.join(workdir, *parts, "sft")
