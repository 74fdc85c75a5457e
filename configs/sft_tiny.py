r"""SFT on CPU in minutes: the tiny model from a `configs/tiny.py` pretraining workdir, fine-tuned on Alpaca.

    python -m train.pretrain --config=configs/tiny.py --workdir=/tmp/pt --config.num_train_steps=60
    python -m train.sft --config=configs/sft_tiny.py --workdir=/tmp/sft --config.init_from=/tmp/pt \
        --config.data.path=../shared/data/alpaca-cleaned-first1000.json

The architecture and the tokenizer come from the init_from workdir (its llama_config.json and tokenizer.model).
One epoch of the 950 training dialogs is ~780 packed rows of 256 tokens, i.e. ~100 steps of 8 x 256 = 2,048 tokens.
"""

from configs import base, sft_7b


def get_config():
    config = base.cpu_overrides(sft_7b.get_config())
    config.seq_len = 256  # above the tiny pretraining's max_seq_len 128: train.sft raises max_seq_len (warned)
    config.batch_size = 8  # 8 x 256 = 2,048 tokens per step
    config.learning_rate = 1e-3  # small models take a larger step
    config.warmup_steps = 5
    config.num_epochs = 1.0  # ~100 steps; the paper's 2 epochs take twice as long
    config.log_every_steps = 10
    config.eval_every_steps = 25
    config.eval_batches = 0  # 50 held-out dialogs: 5 batches
    config.checkpoint_every_steps = 50
    config.data.val_fraction = 0.05
    config.sample_tokens = 48
    return config
