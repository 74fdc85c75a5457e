r"""A reward model on CPU: the tiny model from a `configs/tiny.py` pretraining workdir, trained on HH pairs.

    python -m train.pretrain --config=configs/tiny.py --workdir=/tmp/pt_rm --config.num_train_steps=100
    python -m train.reward --config=configs/rm_tiny.py --workdir=/tmp/rm --config.init_from=/tmp/pt_rm \
        --config.data.path=../shared/data/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl

The architecture and the tokenizer come from the init_from workdir. Without init_from, a random tiny model and a
tokenizer trained on the pairs. The 2,307 HH pairs have no ratings: every pair is "unrated" (margin 0).
10 % held out -> 2,076 training pairs; 16 pairs x 2 x 256 tokens per step; 2 epochs = 259 steps (~50 min on two
busy CPU cores). From a 100-step tiny pretraining: held-out accuracy 60.2 % (139 / 231 pairs), mostly a learned
preference for shorter, refusal-like answers (score vs answer length: Spearman -0.70).
"""

from configs import base, rm_helpful_7b


def get_config():
    config = rm_helpful_7b.get_config()
    config.model = base.model_config("tiny")  # vocab 4096, dim 256, 4 layers (architecture replaced by init_from's)
    config.model.max_seq_len = 256
    base.cpu_overrides(config)
    config.batch_size = 16  # pairs per step: 16 x 2 x 256 = 8,192 tokens
    config.seq_len = 256  # HH prompts are cut on the left, long answers on the right (counted and printed)
    config.learning_rate = 3e-4  # tried on HH (held-out accuracy): 1e-4 -> 55.0 %, 3e-4 -> 60.2 %, 1e-3 -> ~52 %
    config.num_epochs = 2.0
    config.log_every_steps = 10
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 100
    config.data.mix = "none"  # one source
    config.data.val_fraction = 0.1
    config.tokenizer.train_vocab_size = config.model.vocab_size
    return config
