r"""DPO on CPU: a tiny SFT policy (configs/sft_tiny.py) on the Anthropic HH harmless pairs.

    python -m train.pretrain --config=configs/tiny.py --workdir=/tmp/pt
    python -m train.sft --config=configs/sft_tiny.py --workdir=/tmp/sft --config.init_from=/tmp/pt \
        --config.data.path=../shared/data/alpaca-cleaned-first1000.json
    python -m train.dpo --config=configs/dpo_tiny.py --workdir=/tmp/dpo --config.init_from=/tmp/sft \
        --config.data.path=../shared/data/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl

The architecture and the tokenizer come from the init_from workdir.
"""

from configs import base, dpo_7b


def get_config():
    config = dpo_7b.get_config()
    config.model = base.model_config("tiny")  # replaced by init_from's architecture
    base.cpu_overrides(config)
    config.batch_size = 16  # pairs per step: 16 x 2 x 256 tokens through policy and reference
    config.seq_len = 256
    config.learning_rate = 1e-4  # a small model takes a larger step
    config.warmup_steps = 10
    config.num_epochs = 1.0
    config.log_every_steps = 10
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 100
    config.data.val_fraction = 0.1
    return config
