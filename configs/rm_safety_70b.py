r"""Llama 2 Safety reward model from a 70B chat checkpoint (paper section 3.2.2): the 70B helpfulness recipe
(configs/rm_helpful_70b.py: LR 5e-6) with the safety mix (configs/rm_safety_7b.py).

    python -m train.reward --config=configs/rm_safety_70b.py --workdir=DIR --config.init_from=CKPT_70B \
        --config.data.safety_path=SAFETY.jsonl,ANTHROPIC_HARMLESS.jsonl --config.data.path=HELPFUL.jsonl
"""

from configs import rm_helpful_70b


def get_config():
    config = rm_helpful_70b.get_config()
    config.data.mix = "safety"  # as configs/rm_safety_7b.py
    return config
