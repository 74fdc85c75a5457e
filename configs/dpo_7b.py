r"""DPO (Rafailov et al. 2023) of a 7B SFT policy on preference pairs: beta 0.1, 64 pairs per step, LR 1e-6 after a
150-step linear warmup (Rafailov et al. 2023, Appendix B), one epoch.

    python -m train.dpo --config=configs/dpo_7b.py --workdir=DIR --config.init_from=SFT_CKPT \
        --config.data.path=PAIRS.jsonl [--config.dpo.loss_type=ipo|hinge]

* Data: the reward model's readers and mixes (llama2_jax.data.preferences / rm): Meta-style JSONL, OASST pairs,
  Anthropic HH; `data.mix` = none by default (DPO has no helpful/safety split of its own).
* Model: the architecture and the tokenizer come from init_from (its llama_config.json and tokenizer.model); of
  config.model only the numerics are used. The reference policy is a frozen copy of init_from, held in
  param_dtype beside the policy: 2 x 6.7B parameters plus the policy's optimizer state.
* Optimizer: the paper used RMSprop; this trainer keeps the shared AdamW (betas 0.9 / 0.95) with no weight decay,
  and a constant LR after warmup (lr_end_fraction 1.0), as the paper's schedule.
"""

import ml_collections

from configs import base, rm_helpful_7b


def get_config():
    config = base.get_config()
    config.model = base.model_config("7b")  # numerics only: the architecture comes from init_from
    config.model.scan_layers = True
    config.model.remat_policy = "dots_no_batch"

    config.init_from = ""  # required: the SFT policy (a converted checkpoint or a train.sft workdir)
    config.batch_size = 64  # pairs per step (Rafailov et al. 2023): 128 sequences through policy and reference
    config.seq_len = 1024  # prompt + response tokens per sequence; longer prompts lose their oldest turns
    config.grad_accum_steps = 1

    config.learning_rate = 1e-6  # Rafailov et al. 2023, Appendix B
    config.warmup_steps = 150  # linear warmup from 0 over 150 steps (ibid.)
    config.lr_end_fraction = 1.0  # constant after warmup (ibid.)
    config.weight_decay = 0.0  # RMSprop in the paper: no weight decay
    config.num_epochs = 1.0  # one pass over the pairs; 0 = use num_train_steps
    config.num_train_steps = 1_000  # only used when num_epochs is 0
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.eval_batches = 0  # 0 = every held-out pair
    config.checkpoint_every_steps = 200

    config.dpo = ml_collections.ConfigDict()
    config.dpo.beta = 0.1  # strength of the KL anchor to the reference (Rafailov et al. 2023: 0.1 by default)
    config.dpo.loss_type = "sigmoid"  # sigmoid (DPO) | ipo (Azar et al. 2023) | hinge (SLiC-HF): losses.DPO_LOSSES
    config.dpo.label_smoothing = 0.0  # sigmoid only: assumed share of flipped labels (conservative DPO), < 0.5

    config.data = rm_helpful_7b.rm_data_config()
    config.data.mix = "none"
    config.data.val_fraction = 0.05  # held-out pairs for the eval implicit-reward accuracy
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model
    return config
