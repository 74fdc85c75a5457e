r"""The whole recipe on CPU (train.recipe): every stage with the tiny configs, on the embedded corpus and the small
real data of ../shared/data.

    python -m train.recipe --config=configs/recipe_tiny.py --workdir=/tmp/recipe

Stages and their shortened lengths (each stage's own tiny config, cut down so that the whole recipe fits in
half an hour on 2 CPU cores):
  pretrain    configs/tiny.py on the embedded pydoc corpus: 150 steps of 16 x 128 tokens
  sft         configs/sft_tiny.py on Alpaca (first 1,000): 40 steps of 8 x 256 tokens
  rm_helpful  configs/rm_tiny.py on the OASST pairs: 30 steps of 16 pairs, from the SFT model
  rm_safety   configs/rm_tiny.py on HH harmless (is_safety): 30 steps of 16 pairs, from the SFT model
  rs          configs/rs_tiny.py: 1 iteration, 16 OASST prompts x 8 samples, 10 SFT steps on the pool
  ppo         configs/ppo_tiny.py on HH harmless prompts: at most 8 iterations of 16 prompts, held-out reward every 2,
              early stop after 2 evaluations without improvement; its product is the best held-out policy
  gatt        configs/gatt_tiny.py: 16 FastChat dialogs (2 turns sampled), then 10 SFT steps on its records
  cd          configs/cd_tiny.py on 16 HH harmless prompts, 10 SFT steps on the kept pairs
After every stage but the reward models: lm-eval's PIQA (local JSONL, first 200 questions, zero-shot).

Optional stage (declared in config.stages, run only where config.stage_order names it, with the one RLHF pass:
--config.rlhf.rounds=0, since the rounds plan their own RLHF stages):
  grpo        configs/grpo_rm_tiny.py on the OASST prompts with the two reward models: 8 iterations of 8 prompts x 4
              answers, held-out Rc every 2; from the latest policy ({policy}); GAtt then starts from its product.
              In place of PPO: --config.stage_order=pretrain,sft,rm_helpful,rm_safety,rs,grpo,gatt,cd
              after PPO:       --config.stage_order=pretrain,sft,rm_helpful,rm_safety,rs,ppo,grpo,gatt,cd
              (each with --config.rlhf.rounds=0)

With the shipped config.rlhf.rounds = 2, rs, ppo, gatt and cd come from config.rlhf.stages (below) instead
(train.recipe's plan; tested at reduced size in tests/train/test_recipe_rounds.py, timed at these sizes in
docs/recipe.md); --config.rlhf.rounds=0 runs the one RLHF pass above:
  gold_rm     configs/rm_tiny.py on both preference files, 40 steps: the annotator (the synthetic setup)
  round_K     pairs: 16 fresh OASST prompts x 2 answers (T 0.6 / 1.0, 32 tokens) labelled by gold_rm; rm_helpful,
              rm_safety: 20 steps of 8 pairs on every label so far, from the SFT model; rs: as above from the latest
              policy, its pool carried over; eval: 16 held-out prompts (proxy / gold reward, win rate over SFT)
  round_2     also ppo (ppo_from_round 0 = the last), then cd; no gatt (gatt_after_round 0, see below)
PIQA then runs after pretrain, sft and cd (the round stages are not named in eval.stages).
"""

import ml_collections

from configs import recipe_common

DIAGNOSTICS = "--config.progress_bar=False"


def get_config():
    config = recipe_common.base_config()
    config.paths.pretrain_data = ""  # unused: the embedded corpus (data.source "default")
    config.paths.sft_data = "{data}/alpaca-cleaned-first1000.json"
    config.paths.helpful_pairs = "{data}/oasst-en-100-pairs.jsonl"
    config.paths.safety_pairs = "{data}/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl"
    config.paths.rlhf_prompts = "{data}/oasst-en-100-pairs.jsonl"
    config.paths.safety_prompts = "{data}/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl"
    config.paths.dialogs = "{data}/fastchat-dummy-conversation.json"
    config.eval.piqa_path = "{data}/piqa-valid-with-labels.jsonl"
    config.eval.limit = 200  # the first 200 of PIQA's 1,838 validation questions (a tiny model is at chance anyway)
    # The tiny tokenizer (trained on the pydoc corpus) spends up to 303 tokens on one of these questions with its
    # longer answer (440 over all 1,838), past the tiny model's 128-token context: score in a 512-token window.
    config.eval.flags = "--max_length=512"

    short = f"{DIAGNOSTICS} --config.num_epochs=0"
    stages = ml_collections.ConfigDict()
    stages.pretrain = recipe_common.stage(
        "lm", ".", "train.pretrain --config=configs/tiny.py --workdir={dir} --config.num_train_steps=150 "
        f"--config.eval_every_steps=50 --config.checkpoint_every_steps=50 {DIAGNOSTICS}")
    stages.sft = recipe_common.stage(
        "lm", ".", "train.sft --config=configs/sft_tiny.py --workdir={dir} --config.init_from={pretrain} "
        "--config.data.path={paths.sft_data} --config.num_train_steps=40 --config.eval_every_steps=20 "
        f"--config.checkpoint_every_steps=20 {short}")
    rm = (f"--config.init_from={{sft}} --config.num_train_steps=30 --config.eval_every_steps=15 "
          f"--config.checkpoint_every_steps=15 {short}")
    stages.rm_helpful = recipe_common.stage(
        "rm", ".", f"train.reward --config=configs/rm_tiny.py --workdir={{dir}} {rm} "
        "--config.data.path={paths.helpful_pairs}")
    stages.rm_safety = recipe_common.stage(
        "rm", ".", f"train.reward --config=configs/rm_tiny.py --workdir={{dir}} {rm} "
        "--config.data.path={paths.safety_pairs} --config.data.is_safety=True")
    rewards = "--config.reward.helpful_path={rm_helpful} --config.reward.safety_path={rm_safety}"
    stages.rs = recipe_common.stage(
        "rs", "iter_0/sft", "train.rejection_sampling --config=configs/rs_tiny.py --workdir={dir} "
        f"--config.init_from={{sft}} {rewards} --config.prompts.path={{paths.rlhf_prompts}} --config.iterations=1 "
        "--config.prompts.max_prompts=16 --config.sft.num_train_steps=10 --config.sft.checkpoint_every_steps=10")
    stages.ppo = recipe_common.stage(
        "ppo", "best|.", "train.ppo --config=configs/ppo_tiny.py --workdir={dir} --config.init_from={rs} "
        f"{rewards} --config.prompts.path={{paths.safety_prompts}} --config.iterations=8 "
        "--config.eval_every_iterations=2 --config.early_stop_patience=2 --config.checkpoint_every_iterations=4")
    stages.grpo = recipe_common.stage(  # optional: not in stage_order (see the docstring)
        "grpo", ".", "train.grpo --config=configs/grpo_rm_tiny.py --workdir={dir} --config.init_from={policy} "
        f"{rewards} --config.prompts.path={{paths.rlhf_prompts}}", provides="ppo")
    stages.gatt = recipe_common.stage(
        "gatt", "sft", "train.gatt --config=configs/gatt_tiny.py --workdir={dir} --config.init_from={ppo} "
        "--config.data.path={paths.dialogs}")
    stages.cd = recipe_common.stage(
        "cd", "sft", "train.context_distill --config=configs/cd_tiny.py --workdir={dir} --config.init_from={gatt} "
        "--config.reward.safety_path={rm_safety} --config.prompts.path={paths.safety_prompts} "
        "--config.prompts.max_prompts=16 --config.sft.num_train_steps=10 --config.sft.checkpoint_every_steps=10")
    config.stages = stages

    # Two RLHF rounds: the annotator is a gold RM trained (its own stage) on both shipped preference files, the
    # synthetic setup of Gao et al. 2023; each round labels 16 pairs of a fresh OASST prompt batch, retrains both
    # RMs from the SFT model on every label so far, and runs one rejection-sampling iteration (pool carried over);
    # round 2 (the last) adds PPO, then context distillation.
    config.rlhf.rounds = 2  # the two rounds below (--config.rlhf.rounds=0: the one RLHF pass above)
    # No GAtt in the tiny rounds: after two rounds of RS and PPO every one of the 16 replies the tiny policy sampled for
    # GAtt was empty or held a special tag, so GAtt had no record to train on and stopped the recipe (docs/recipe.md,
    # Measured); --config.rlhf.gatt_after_round=1 or 2 puts it back.
    config.rlhf.gatt_after_round = 0
    rlhf = config.rlhf.stages
    rlhf.gold_rm = recipe_common.stage(
        "rm", ".", "train.reward --config=configs/rm_tiny.py --workdir={dir} --config.init_from={sft} "
        "--config.data.path={paths.helpful_pairs} --config.data.safety_path={paths.safety_pairs} --config.seed=1 "
        f"--config.num_train_steps=40 --config.eval_every_steps=20 --config.checkpoint_every_steps=20 {short}")
    round_flags = ("--round=<round> --out_dir={dir} --prompts={paths.rlhf_prompts} --gold_helpful={gold_rm} "
                   "--rm_helpful=<rm_helpful> --rm_safety=<rm_safety> --eval_prompts=16 --max_gen_len=32")
    rlhf.pairs = recipe_common.stage(
        "pairs", ".", f"train.rlhf_round --mode=pairs --policy=<policy> {round_flags} --num_prompts=16 "
        "<previous_pairs>")
    round_rm = ("--config.num_train_steps=20 --config.eval_every_steps=10 --config.checkpoint_every_steps=10 "
                f"--config.batch_size=8 {short} --config.data.path=<labels>")  # round 1: 16 labels, 10 % held out
    rlhf.rm_helpful = recipe_common.stage(
        "rm", ".", f"train.reward --config=configs/rm_tiny.py --workdir={{dir}} --config.init_from=<rm_init_helpful> "
        f"{round_rm}")
    rlhf.rm_safety = recipe_common.stage(
        "rm", ".", f"train.reward --config=configs/rm_tiny.py --workdir={{dir}} --config.init_from=<rm_init_safety> "
        f"{round_rm} --config.data.is_safety=True")
    round_rewards = "--config.reward.helpful_path=<rm_helpful> --config.reward.safety_path=<rm_safety>"
    rlhf.rs = recipe_common.stage(
        "rs", "iter_0/sft", "train.rejection_sampling --config=configs/rs_tiny.py --workdir={dir} "
        f"--config.init_from=<policy> {round_rewards} --config.prompts.path={{paths.rlhf_prompts}} "
        "--config.iterations=1 --config.prompts.max_prompts=16 --config.sft.num_train_steps=10 "
        "--config.sft.checkpoint_every_steps=10 --config.first_iteration=<iteration> <pool_from>")
    recipe_common.add_round_stages(rlhf, stages, rewards, round_rewards, round_flags)
    return config
