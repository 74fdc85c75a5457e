r"""Safety context distillation on CPU in minutes with the tiny models of the other tiny configs (their docstrings
have the commands that make /tmp/sft and /tmp/rm; a PPO or RS policy works as init_from too).

    python -m train.context_distill --config=configs/cd_tiny.py --workdir=/tmp/cd --config.init_from=/tmp/sft \
        --config.reward.safety_path=/tmp/rm \
        --config.prompts.path=../shared/data/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl

The HH harmless prompts are red-teaming (adversarial) prompts without tags: prompts.is_safety = True distils all of
them, with the generic preprompts (they carry no risk_category). 32 prompts x 2 answers = 64 rows = 2 calls of 32
rows, then 20 SFT steps of 8 x 160 tokens on the kept pairs.
"""

from configs import base, cd_7b, sft_tiny


def get_config():
    config = base.cpu_overrides(cd_7b.get_config())
    config.prompts.is_safety = True  # HH harmless: every prompt is adversarial
    config.prompts.max_prompts = 32
    config.prompts.max_prompt_len = 160  # preprompt (up to ~80 tokens with a category template) + prompt
    config.sampling.max_gen_len = 32  # 160 + 32 = 192 <= the SFT tiny model's max_seq_len 256
    config.sampling.batch_size = 32

    config.sft = sft_tiny.get_config()
    config.sft.seq_len = 192
    config.sft.batch_size = 8
    config.sft.num_epochs = 0.0  # use num_train_steps
    config.sft.num_train_steps = 20
    config.sft.learning_rate = 3e-4
    config.sft.warmup_steps = 2
    config.sft.data.val_fraction = 0.0  # a pool of at most 32 dialogs: no held-out split
    config.sft.eval_at_start = False
    config.sft.log_every_steps = 5
    config.sft.checkpoint_every_steps = 20
    config.sft.progress_bar = False
    return config
