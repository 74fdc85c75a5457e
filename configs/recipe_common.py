"""Shared fields of the recipe configs (train.recipe): where the data is, the stage list, and one stage's entry."""

import ml_collections

STAGES = ("pretrain", "sft", "rm_helpful", "rm_safety", "rs", "ppo", "gatt", "cd")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data_dir = "../shared/data"  # {data} in the commands (relative to the current directory)
    config.python = ""  # the interpreter that runs each stage ("" = the one running train.recipe)
    config.paths = ml_collections.ConfigDict()  # {paths.NAME} in the commands; may use {data}
    config.stage_order = ",".join(STAGES)  # stages to run, in order (a prefix runs a shortened recipe)
    return config


def stage(kind: str, output: str, *commands: str) -> ml_collections.ConfigDict:
    """One stage: its evaluation kind (lm | rm | rs | ppo | cd), its product (relative to DIR/<stage>; "a|b" = the
    first that exists) and its commands (`MODULE ARGS...`, run as `python -m MODULE ARGS...`). Placeholders: {dir}
    the stage's workdir, {data}, {paths.NAME}, {workdir} and {<stage>} = an earlier stage's product. `extra` is
    appended to the last command (e.g. --config.num_train_steps=5 for a shortened run)."""
    return ml_collections.ConfigDict({"kind": kind, "output": output, "commands": tuple(commands), "extra": ""})
