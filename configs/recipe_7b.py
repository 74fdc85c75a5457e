r"""The whole recipe at 7B (train.recipe) with the paper's settings of every stage, as the stage configs state them:

    python -m train.recipe --config=configs/recipe_7b.py --workdir=DIR --config.data_dir=DATA \
        --config.paths.pretrain_data=... --config.paths.sft_data=... (see the fields below)

  pretrain    configs/7b.py: 2T tokens, 4M-token batches, peak LR 3e-4, cosine to 10 %, warmup 2,000 (Table 1)
  sft         configs/sft_7b.py: LR 2e-5 cosine, batch 64 x 4096 packed, 2 epochs, loss on answers only
  rm_helpful  configs/rm_helpful_7b.py: 1 epoch, LR 1e-5, 512 pairs, margin loss, helpful mix
  rm_safety   configs/rm_safety_7b.py: as helpful with the 90/10 safety mix
  rs          configs/rs_7b.py: K = 10 at T = 1.2, the pool of the best answer across iterations (the paper ran RS
              with the 70B and distilled into the smaller models: point rs at a 70B policy for that)
  ppo         configs/ppo_7b.py: β 0.01, constant LR 1e-6, 512 prompts, minibatch 64, clip 0.2, early stop on
              held-out reward; product: the best held-out policy
  gatt        configs/gatt_7b.py: multi-turn dialogs sampled, then SFT on its records (GAtt after RLHF, section 3.3)
  cd          configs/cd_7b.py: safety preprompts with risk-category templates, targeted keep by the safety RM
  grpo        optional (only where config.stage_order names it, in place of ppo or after it): configs/grpo_7b.py
              (DeepSeekMath 4.1: G = 64, β 0.04, LR 1e-6) with the two reward models on the RLHF prompts
--config.eval.piqa_path=FILE adds lm-eval's PIQA (zero-shot) after every stage but the reward models.
At 70B use configs/ppo_70b.py (β 0.005) and configs/rm_*_70b.py (LR 5e-6) in the rm and ppo commands. Each stage is
one process on this host; for a pod, run the same commands through launch/ (one per stage) instead.
"""

import ml_collections

from configs import recipe_common


def get_config():
    config = recipe_common.base_config()
    config.data_dir = ""  # {data}: where the files below live
    config.paths.pretrain_data = ""  # pretraining corpus (data.source "tfds"/"hf"/"text"/"jsonl": see configs/7b.py)
    config.paths.pretrain_source = "tfds"
    config.paths.sft_data = ""  # SFT dialogs (any llama2_jax.data.dialogs format)
    config.paths.helpful_pairs = ""  # helpfulness preference pairs
    config.paths.safety_pairs = ""  # safety preference pairs (is_safety), with chosen_safe / rejected_safe labels
    config.paths.rlhf_prompts = ""  # RS / PPO prompts, tagged is_safety
    config.paths.safety_prompts = ""  # adversarial prompts (risk_category optional) for context distillation
    config.paths.dialogs = ""  # multi-turn dialogs for GAtt
    config.eval.piqa_path = ""  # PIQA validation JSONL {goal, sol1, sol2, label}: all 1,838 questions, zero-shot

    stages = ml_collections.ConfigDict()
    stages.pretrain = recipe_common.stage(
        "lm", ".", "train.pretrain --config=configs/7b.py --workdir={dir} --config.data.source={paths.pretrain_source} "
        "--config.data.path={paths.pretrain_data}")
    stages.sft = recipe_common.stage(
        "lm", ".", "train.sft --config=configs/sft_7b.py --workdir={dir} --config.init_from={pretrain} "
        "--config.data.path={paths.sft_data}")
    for kind in ("helpful", "safety"):  # the same pairs; each RM config picks its own data mix
        stages[f"rm_{kind}"] = recipe_common.stage(
            "rm", ".", f"train.reward --config=configs/rm_{kind}_7b.py --workdir={{dir}} --config.init_from={{sft}} "
            "--config.data.path={paths.helpful_pairs} --config.data.safety_path={paths.safety_pairs}")
    rewards = "--config.reward.helpful_path={rm_helpful} --config.reward.safety_path={rm_safety}"
    stages.rs = recipe_common.stage(
        "rs", "iter_1/sft", "train.rejection_sampling --config=configs/rs_7b.py --workdir={dir} "
        f"--config.init_from={{sft}} {rewards} --config.prompts.path={{paths.rlhf_prompts}}")
    stages.ppo = recipe_common.stage(
        "ppo", "best|.", "train.ppo --config=configs/ppo_7b.py --workdir={dir} --config.init_from={rs} "
        f"{rewards} --config.prompts.path={{paths.rlhf_prompts}}")
    stages.grpo = recipe_common.stage(  # optional (config.stage_order): GRPO with the reward models, see recipe_tiny
        "grpo", ".", "train.grpo --config=configs/grpo_7b.py --workdir={dir} --config.init_from={policy} "
        f"{rewards} --config.prompts.path={{paths.rlhf_prompts}}", provides="ppo")
    gatt = "train.gatt --config=configs/gatt_7b.py --workdir={dir} --config.init_from={ppo} --config.data.path="
    stages.gatt = recipe_common.stage("gatt", "sft", gatt + "{paths.dialogs}")
    stages.cd = recipe_common.stage(
        "cd", "sft", "train.context_distill --config=configs/cd_7b.py --workdir={dir} --config.init_from={gatt} "
        "--config.reward.safety_path={rm_safety} --config.prompts.path={paths.safety_prompts}")
    config.stages = stages

    # The paper's loop (section 3.2, Figure 1): RLHF-V1..V5, each on a fresh batch of preference data collected on the
    # latest model; V1-V4 rejection sampling only, V5 rejection sampling then PPO (ppo_from_round 0 = the last);
    # GAtt after RLHF-V3 (section 3.3); the reward models retrained from the chat (SFT) checkpoint on all the data so
    # far each round (section 3.2.2: one epoch, "initialize our reward models from pretrained chat model
    # checkpoints"). Annotator: people, through the file annotator (llama2_jax.rlhf.label_files): round K's pairs
    # stage exports DIR/round_K/pairs/labels/pending.jsonl and stops with "labels pending"; label them (the paper's
    # four rating levels, per-answer safety on safety prompts), put the labels file there and re-run the recipe.
    # Batch size: the paper collected 1,418,091 Meta comparisons (Table 6) in 14 weekly batches (section 3.2.1,
    # Table 26): about 100,000 per batch, several batches per RLHF version; num_prompts is that, per round, to be
    # set to the labelling capacity. Pair temperatures: two of llama2_jax.rlhf.pairs.PAIR_TEMPERATURES (the paper
    # says only "varying the temperature hyper-parameter", section 3.2.1).
    config.rlhf.rounds = 5
    config.rlhf.ppo_from_round = 0
    config.rlhf.gatt_after_round = 3
    config.rlhf.rm_init = "sft"
    rlhf = config.rlhf.stages
    round_flags = ("--round=<round> --out_dir={dir} --prompts={paths.rlhf_prompts} --labels_dir={dir}/labels "
                   "--rm_helpful=<rm_helpful> --rm_safety=<rm_safety> --eval_prompts=1000 --max_prompt_len=2048 "
                   "--max_gen_len=2048 --keep_truncated=False --batch_size=64")
    rlhf.pairs = recipe_common.stage(
        "pairs", ".", f"train.rlhf_round --mode=pairs --policy=<policy> {round_flags} --num_prompts=100000 "
        "<previous_pairs>")
    for kind in ("helpful", "safety"):  # every label so far + the open-source pairs, each RM config's mix
        rlhf[f"rm_{kind}"] = recipe_common.stage(
            "rm", ".", f"train.reward --config=configs/rm_{kind}_7b.py --workdir={{dir}} "
            f"--config.init_from=<rm_init_{kind}> --config.data.path=<labels>,{{paths.helpful_pairs}} "
            "--config.data.safety_path={paths.safety_pairs}")
    round_rewards = "--config.reward.helpful_path=<rm_helpful> --config.reward.safety_path=<rm_safety>"
    rlhf.rs = recipe_common.stage(
        "rs", "iter_0/sft", "train.rejection_sampling --config=configs/rs_7b.py --workdir={dir} "
        f"--config.init_from=<policy> {round_rewards} --config.prompts.path={{paths.rlhf_prompts}} "
        "--config.iterations=1 --config.first_iteration=<iteration> <pool_from>")
    recipe_common.add_round_stages(rlhf, stages, rewards, round_rewards, round_flags)
    return config
