"""Shared fields of the recipe configs (train.recipe): where the data is, the stage list, and one stage's entry."""

import ml_collections

STAGES = ("pretrain", "sft", "rm_helpful", "rm_safety", "rs", "ppo", "gatt", "cd")
OPTIONAL_STAGES = ("grpo",)  # declared in config.stages, run only where config.stage_order names them


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
    # RLHF rounds (paper section 3.2, Figure 1; train.recipe's plan): 0 = the one-round recipe of stage_order. N > 0:
    # after the stages before "rs", N rounds of rlhf.stages (pairs -> rm_helpful, rm_safety -> rs [-> ppo] [-> gatt]
    # -> eval), then its cd. ppo_from_round: PPO after RS from this round on (0 = the last only: RLHF-V5 was RS then
    # PPO); gatt_after_round: GAtt once after this round (clipped to N; 0 = none; the paper: after RLHF-V3, section
    # 3.3); rm_init: the round's reward models are trained on every label so far starting from the SFT model ("sft",
    # section 3.2.2: "we initialize our reward models from pretrained chat model checkpoints", one epoch over all the
    # data) or continue from the previous round's ("continue": cheaper, one pass over the old labels per round).
    config.rlhf = ml_collections.ConfigDict({"rounds": 0, "ppo_from_round": 0, "gatt_after_round": 3,
                                             "rm_init": "sft", "stages": ml_collections.ConfigDict()})
    return config


def stage(kind: str, output: str, *commands: str, provides: str = "") -> ml_collections.ConfigDict:
    """One stage: its evaluation kind (lm | rm | rs | ppo | grpo | cd | gatt | pairs | round_eval), its product
    (relative to DIR/<stage>; "a|b" = the first that exists) and its commands (`MODULE ARGS...`, run as `python -m
    MODULE ARGS...`). Placeholders: {dir} the stage's workdir, {data}, {paths.NAME}, {workdir}, {<stage>} = an
    earlier stage's product and {policy} = the latest policy stage's product. `extra` is appended to the last command
    (e.g. --config.num_train_steps=5 for a shortened run); `provides`: comma-separated placeholders the stage's
    product also fills once it is done (GRPO provides {ppo})."""
    return ml_collections.ConfigDict({"kind": kind, "output": output, "commands": tuple(commands), "extra": "",
                                      "provides": provides})


def add_round_stages(rlhf, stages, rewards: str, round_rewards: str, round_flags: str) -> None:
    """The round templates that follow the one-pass stages: PPO, GAtt and CD from the latest policy (<policy>) and
    the round's reward models, and the round's held-out evaluation (train.rlhf_round --mode=eval)."""
    rlhf.ppo = stage("ppo", "best|.", stages.ppo.commands[0].replace("{rs}", "<policy>").replace(rewards, round_rewards))
    rlhf.gatt = stage("gatt", "sft", stages.gatt.commands[0].replace("{ppo}", "<policy>"))
    rlhf.eval = stage("round_eval", ".",
                      f"train.rlhf_round --mode=eval --policy=<policy> --sft_policy={{sft}} {round_flags}")
    rlhf.cd = stage("cd", "sft", stages.cd.commands[0].replace("{gatt}", "<policy>").replace("{rm_safety}",
                                                                                             "<rm_safety>"))
