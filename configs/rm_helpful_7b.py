r"""Llama 2 Helpfulness reward model (paper section 3.2.2) from a 7B chat checkpoint.

    python -m train.reward --config=configs/rm_helpful_7b.py --workdir=DIR --config.init_from=CKPT \
        --config.data.path=HELPFUL.jsonl,OPEN_SOURCE.jsonl --config.data.safety_path=SAFETY.jsonl

* Recipe: 1 epoch (longer overfits), max LR 1e-5 (**5e-6 for 70B**: `--config.learning_rate=5e-6`; 1e-5 for 7B-34B),
  cosine to 10 % of the max, warmup 3 % of the steps with a minimum of 5, 512 pairs (1,024 sequences) per step, the
  pretraining optimizer (AdamW 0.9 / 0.95, eps 1e-5, weight decay 0.1, clip 1.0).
* Steps: num_epochs = 1 -> num_train_steps = floor(train pairs / 512), computed at run time from the data after the
  mix and the held-out split (set --config.num_epochs=0 to use num_train_steps as given).
* Mix "helpful" (llama2_jax.data.rm.helpful_mix): every collected helpfulness pair + an equal number sampled uniformly
  from the rest (collected safety pairs and open-source pairs, told apart by the records' "origin" field); pairs with
  no origin count as collected, so files without the field give every helpfulness pair + as many safety pairs. Every
  mix drops pairs labelled chosen-unsafe / other-safe (paper section 3.2.1).
* Margin "small" (1, 2/3, 1/3, 0; paper Table 27): the paper's ablation found it best on average (63.0 vs 62.5
  without); it does not say which variant the final RMs used. Unrated pairs get margin 0.
* Model: with init_from, the architecture comes from CKPT/llama_config.json and of config.model only the numerics
  (`LlamaConfig.NUMERICS_FIELDS`); max_seq_len is raised to seq_len. The tokenizer is CKPT/tokenizer.model or
  tokenizer.path.
* Not implemented: the Safety RM's "safety auxiliary loss" (its formula is not given in the paper).
"""

import ml_collections
from ml_collections import config_dict

from configs import base


def rm_data_config():
    data = ml_collections.ConfigDict()
    data.path = ""  # preference file(s), comma-separated (llama2_jax.data.preferences formats); is_safety per record
    data.safety_path = ""  # file(s) read with is_safety = true (Meta Safety, Anthropic Harmless), comma-separated
    data.format = "auto"  # auto | jsonl | oasst_pairs | hh | hh_prompt, for every file
    data.is_safety = config_dict.placeholder(bool)  # None = the records' field (default false); true/false = force
    data.on_error = "raise"  # malformed records: raise (file:line) | skip (counted and logged)
    data.mix = "helpful"  # none | helpful (collected helpful + as many others) | safety (90 % safety / 10 % helpful)
    data.val_fraction = 0.01  # held out for eval (the paper held out 1,000 pairs per weekly batch)
    return data


def get_config():
    config = base.get_config()
    config.model = base.model_config("7b")  # numerics only when init_from is set (see above)
    config.model.scan_layers = True  # one compiled block for all layers
    config.model.remat_policy = "dots_no_batch"  # keep weight matmuls, recompute attention

    config.init_from = ""  # required in practice: the SFT/chat checkpoint (converted dir or trainer workdir)
    config.batch_size = 512  # pairs per step (paper): 1,024 sequences of up to seq_len tokens
    config.seq_len = 4096  # max tokens per sequence (prompt + response); not stated in the paper
    config.grad_accum_steps = 1  # raise if 1,024 / data-parallel devices sequences do not fit in memory

    config.learning_rate = 1e-5  # paper: 1e-5 (5e-6 for 70B)
    config.lr_end_fraction = 0.1  # cosine to 10 % of the max
    config.warmup_fraction = 0.03  # warmup 3 % of the total steps ...
    config.min_warmup_steps = 5  # ... with a minimum of 5 (replaces warmup_steps while warmup_fraction > 0)
    config.num_epochs = 1.0  # paper: 1 epoch; 0 = use num_train_steps
    config.num_train_steps = 1_000  # only used when num_epochs is 0

    config.margin_table = "small"  # none | small | large (losses.MARGIN_TABLES)
    config.head_init_std = 1e-3  # score head kernel [D, 1] ~ N(0, std), no bias (score_model.py)
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.eval_batches = 0  # 0 = the whole held-out split
    config.checkpoint_every_steps = 200

    config.data = rm_data_config()
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model (else one is trained on the pairs)
    return config
