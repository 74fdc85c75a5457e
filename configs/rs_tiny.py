r"""Rejection sampling on CPU in minutes with the tiny models of the other tiny configs.

    python -m train.pretrain --config=configs/tiny.py --workdir=/tmp/pt --config.num_train_steps=60
    python -m train.sft --config=configs/sft_tiny.py --workdir=/tmp/sft --config.init_from=/tmp/pt \
        --config.data.path=../shared/data/alpaca-cleaned-first1000.json
    python -m train.reward --config=configs/rm_tiny.py --workdir=/tmp/rm --config.init_from=/tmp/pt \
        --config.data.path=../shared/data/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl
    python -m train.rejection_sampling --config=configs/rs_tiny.py --workdir=/tmp/rs --config.init_from=/tmp/sft \
        --config.reward.helpful_path=/tmp/rm --config.reward.safety_path=/tmp/rm \
        --config.prompts.path=../shared/data/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl

One RM serves as both helpful and safety RM (the piecewise rule then always returns its score). The HH *harmless*
prompts are safety prompts; the file carries no tags, so they are read with is_safety = false unless
--config.prompts.is_safety=True. 32 prompts x 8 samples = 256 rows = 4 sample+score calls of 64 rows per iteration,
then 20 SFT steps of 8 x 160 tokens on the pool.
"""

from configs import base, rs_7b, sft_tiny


def get_config():
    config = base.cpu_overrides(rs_7b.get_config())
    config.prompts.max_prompts = 32  # the first 32 HH prompts of at most max_prompt_len tokens
    config.prompts.max_prompt_len = 96  # + max_gen_len 32 = 128 <= the SFT tiny model's max_seq_len 256
    config.sampling.num_samples = 8  # K
    config.sampling.max_gen_len = 32
    config.sampling.keep_truncated = True  # a minutes-old tiny policy seldom ends an answer within 32 tokens: pool a
    # prompt's best cut answer where none of its K ended, rather than stop on an empty pool (rs_7b: False)
    config.sampling.batch_size = 64  # 8 prompts x 8 samples per call

    config.sft = sft_tiny.get_config()
    config.sft.seq_len = 160  # pool dialogs: <= 96 prompt + 32 answer tokens, a few more once re-tokenized
    config.sft.batch_size = 8  # 8 x 160 = 1,280 tokens per step
    config.sft.num_epochs = 0.0  # use num_train_steps
    config.sft.num_train_steps = 20  # ~5 passes over a pool of 32 short dialogs
    config.sft.learning_rate = 3e-4
    config.sft.warmup_steps = 2
    config.sft.data.val_fraction = 0.0  # a 32-dialog pool: no held-out split
    config.sft.eval_at_start = False
    config.sft.log_every_steps = 5
    config.sft.checkpoint_every_steps = 20
    config.sft.progress_bar = False
    return config
