"""The embedded default: a ~5M-parameter Llama trained on CPU in minutes on the corpus that ships with CPython.

    python -m train.pretrain --config=configs/tiny.py --workdir=/tmp/tiny

No download: the data is CPython's bundled documentation (pydoc_data) and the tokenizer is trained on it
(vocabulary 4096) and cached in the workdir.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_config("tiny")
    base.cpu_overrides(config)  # float32 (use bfloat16 on GPU/TPU), unrolled, data parallel
    config.model.max_seq_len = 128
    config.seq_len = 128
    config.batch_size = 16  # 16 x 128 = 2048 tokens per step
    config.learning_rate = 2e-3  # small models take a larger step
    config.warmup_steps = 30
    config.num_train_steps = 500  # ~1M tokens, about 4 passes over the corpus
    config.log_every_steps = 20
    config.eval_every_steps = 200
    config.eval_batches = 8
    config.checkpoint_every_steps = 200
    config.data.val_fraction = 0.05
    config.tokenizer.train_vocab_size = config.model.vocab_size
    return config
