r"""Llama 2 Safety reward model (paper section 3.2.2) from a 7B chat checkpoint: the helpfulness recipe
(configs/rm_helpful_7b.py: 1 epoch, LR 1e-5 (5e-6 for 70B), 3 % / min 5 warmup, 512 pairs) with the safety mix.

    python -m train.reward --config=configs/rm_safety_7b.py --workdir=DIR --config.init_from=CKPT \
        --config.data.safety_path=SAFETY.jsonl,ANTHROPIC_HARMLESS.jsonl --config.data.path=HELPFUL.jsonl

* Mix "safety": every safety pair (Meta Safety + Anthropic Harmless) + helpfulness pairs sampled so that
  safety : helpfulness = 90 : 10.
* Margin "small" as for helpfulness (the paper reports the margin helped the Helpfulness RM most; it does not say
  which variant the Safety RM used).
* Not implemented: the "safety auxiliary loss" (the paper gives no formula).
"""

from configs import rm_helpful_7b


def get_config():
    config = rm_helpful_7b.get_config()
    config.data.mix = "safety"
    return config
