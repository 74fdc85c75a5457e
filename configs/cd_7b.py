r"""Safety context distillation (paper section 4.2.4) for a 7B policy.

    python -m train.context_distill --config=configs/cd_7b.py --workdir=DIR --config.init_from=POLICY \
        --config.reward.safety_path=RM_SAFETY --config.prompts.path=ADVERSARIAL_PROMPTS.jsonl

Adversarial prompts only (is_safety), each answered with and without a safety preprompt (the risk-category
preprompt with its answer template where the prompt names a category, else a generic one); the preprompted answer
is kept, without the preprompt, only when the safety RM scores it above the answer without (targeted context
distillation); then SFT on the kept pairs. The paper gives no sampling or fine-tuning settings for this step: the
choices below are marked as such.
"""

import ml_collections

from configs import base, sft_7b


def get_config():
    config = base.get_config()  # model: numerics only (the architecture comes from init_from)
    config.model.scan_layers = True
    config.model.remat_policy = "none"  # no gradients while sampling (the SFT step uses config.sft.model)
    config.seed = 0  # sampling RNG and the SFT data order
    config.init_from = ""  # required: the policy (an RLHF checkpoint; the paper distils the RLHF models)
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model
    config.reward.helpful_path = ""  # unused: only the safety RM decides what is kept
    config.reward.safety_path = ""  # required: the safety RM workdir (train.reward)
    config.prompts.is_safety = None  # the records' tags: only is_safety prompts are distilled (True = all)

    config.distill = ml_collections.ConfigDict()
    config.distill.preprompts_path = ""  # "" = llama2_jax/data/safety_preprompts.json; else a file of that layout
    config.distill.use_categories = True  # paper: category templates raise safety-RM scores more than a generic one

    config.sampling.temperature = 1.0  # not stated in the paper for context distillation
    config.sampling.top_p = 1.0
    config.sampling.max_gen_len = 1024  # not stated; the paper's human evaluations allow 1000 new tokens
    config.sampling.batch_size = 64  # rows per compiled sample+score call (two per prompt: with and without)

    config.sft = sft_7b.get_config()  # the SFT recipe on the kept pairs (the paper gives no distillation settings)
    config.sft.data.val_fraction = 0.02
    return config
