r"""Llama 2 Helpfulness reward model from a 70B chat checkpoint (paper section 3.2.2): the 7B recipe
(configs/rm_helpful_7b.py) with the 70B learning rate.

    python -m train.reward --config=configs/rm_helpful_70b.py --workdir=DIR --config.init_from=CKPT_70B \
        --config.data.path=HELPFUL.jsonl --config.data.safety_path=SAFETY.jsonl
"""

from configs import rm_helpful_7b


def get_config():
    config = rm_helpful_7b.get_config()
    config.learning_rate = 5e-6  # paper: max LR 5e-6 for 70B (1e-5 for the other sizes)
    return config
