r"""Llama 2 SFT recipe (paper section 3.1) for a 7B model: cosine schedule from LR 2e-5, weight decay 0.1,
64 packed sequences of 4096 tokens per step (64 x 4096 = 262,144 tokens per step), 2 epochs, loss on answers only.

    python -m train.sft --config=configs/sft_7b.py --workdir=DIR --config.init_from=CKPT --config.data.path=FILE

* Architecture: with `init_from` set, the model's architecture comes from `CKPT/llama_config.json`; of `config.model`
  only the numerics are used (dtype, param_dtype, scan_layers, remat_policy, attention_impl and its block sizes and
  interpret mode: `LlamaConfig.NUMERICS_FIELDS`). `config.model` is used whole only for a random init (init_from = "",
  tests).
* Steps: with `num_epochs` > 0, num_train_steps = ceil(num_epochs x packed rows per epoch / batch_size), computed at
  run time from the dataset (rows are packed in file order once to count them; a shuffled epoch differs by a few
  rows). `num_epochs = 0` uses `num_train_steps` as given.
* Tokenizer: `tokenizer.path`, or "" = `CKPT/tokenizer.model` (pretraining workdirs cache theirs there).
"""

import ml_collections

from configs import base


def sft_data_config() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.path = ""  # required: a dialog file (messages / alpaca / sharegpt JSON or JSONL, OASST trees JSONL)
    data.format = "auto"  # auto | messages | alpaca | sharegpt | oasst_trees (llama2_jax.data.dialogs)
    data.on_error = "raise"  # malformed records: raise (file:line in the error) | skip (counted and logged)
    data.overlong = "truncate"  # samples > seq_len: truncate (whole turns first) | drop; both counted and logged
    data.val_fraction = 0.02  # dialogs held out for the eval loss on assistant tokens
    return data


def get_config():
    config = base.get_config()
    config.model = base.model_config("7b")  # numerics only when init_from is set (see above)
    config.model.scan_layers = True  # one compiled block for all layers: fast compiles
    config.model.remat_policy = "dots_no_batch"  # keep weight matmuls, recompute attention: fits 4096-token rows

    config.init_from = ""  # required in practice: the pretrained model (converted dir or a trainer workdir)
    config.batch_size = 64  # packed sequences per step (paper): 64 x 4096 = 262,144 tokens
    config.seq_len = 4096  # paper: sequences filled to 4096 tokens
    config.grad_accum_steps = 1  # raise if 64 / data-parallel devices rows of 4096 tokens do not fit in memory

    config.learning_rate = 2e-5  # paper: "initial learning rate of 2e-5"
    config.warmup_steps = 0  # paper: no warmup stated ("initial" LR); cosine from the first step
    config.lr_end_fraction = 0.1  # not stated for SFT; the pretraining rule (cosine to 10 % of the peak)
    config.weight_decay = 0.1  # paper
    # AdamW betas 0.9 / 0.95, eps 1e-5 and clipping 1.0 are the pretraining values (not restated for SFT).

    config.num_epochs = 2.0  # paper: 2 epochs; 0 = use num_train_steps as given
    config.num_train_steps = 1_000  # only used when num_epochs is 0
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.eval_batches = 0  # 0 = the whole held-out split
    config.checkpoint_every_steps = 200

    config.data = sft_data_config()
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model
    config.eval_at_start = True  # eval the initial model before the first step (the "before" number)
    config.sample_prompts = ("Give three tips for staying healthy.",)  # greedy chat replies printed at the end
    config.sample_tokens = 64  # max new tokens per sample reply
    return config
