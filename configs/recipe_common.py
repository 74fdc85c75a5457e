"""Shared fields of the recipe configs (train.recipe): where the data is, the stage list, and one stage's entry."""

import ml_collections

STAGES = ("pretrain", "sft", "rm_helpful", "rm_safety", "rs", "ppo", "gatt", "cd")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data_dir = "../shared/data"  # {data} in the commands (relative to the current directory)
    config.python = ""  # the interpreter that runs each stage ("" = the one running train.recipe)
    config.paths = ml_collections.ConfigDict()  # {paths.NAME} in the commands; may use {data}
    config.stage_order = ",".join(STAGES)  # stages to run, in order (a prefix runs a shortened recipe)
    # After each of eval.stages (those whose product is a language model), lm-eval's PIQA on a local JSONL
    # (llama2_jax.evaluation.harness --tasks=piqa_local); "" piqa_path turns it off; limit 0 = every question; flags are
    # appended to the command (e.g. --mesh=1:-1:1 --dtype=bfloat16).
    config.eval = ml_collections.ConfigDict({"piqa_path": "", "limit": 0, "batch_size": 16, "flags": "",
                                             "stages": "pretrain,sft,rs,ppo,gatt,cd"})
    return config


def stage(kind: str, output: str, *commands: str) -> ml_collections.ConfigDict:
    """One stage: its evaluation kind (lm | rm | rs | ppo | cd | gatt), its product (relative to DIR/<stage>; "a|b" = the
    first that exists) and its commands (`MODULE ARGS...`, run as `python -m MODULE ARGS...`). Placeholders: {dir}
    the stage's workdir, {data}, {paths.NAME}, {workdir} and {<stage>} = an earlier stage's product. `extra` is
    appended to the last command (e.g. --config.num_train_steps=5 for a shortened run)."""
    return ml_collections.ConfigDict({"kind": kind, "output": output, "commands": tuple(commands), "extra": ""})
