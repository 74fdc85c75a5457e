r"""Rejection-sampling fine-tuning (paper section 3.2.3) for a 7B policy.

    python -m train.rejection_sampling --config=configs/rs_7b.py --workdir=DIR --config.init_from=POLICY \
        --config.reward.helpful_path=RM_HELPFUL --config.reward.safety_path=RM_SAFETY --config.prompts.path=FILE

Per iteration: K samples per prompt from the current policy -> reward models -> the best per prompt, pooled with the
best of every earlier iteration -> SFT of the current policy on the pool (see train/rejection_sampling.py).

* The paper ran RS with the 70B only and fine-tuned the smaller models on its samples (distillation: `train.sft`
  on WORKDIR/iter_<i>/pool.jsonl). It gives no K (its figures go to N = 100), no generation length and no SFT
  settings for RS; the choices below are marked as such.
* Architecture and tokenizer come from init_from (its llama_config.json and tokenizer.model); config.model gives the
  numerics only (`LlamaConfig.NUMERICS_FIELDS`), also for the reward models.
* Rows: one jitted sample+score call takes `sampling.batch_size` rows = (prompt, sample) pairs; its KV cache is
  rows x (max_prompt_len + max_gen_len) x 32 layers x 2 x 4096 x 2 bytes = 64 x 2048 x 512 KiB = 64 GiB for 7B,
  split over the data-parallel devices.
"""

from configs import base, sft_7b


def get_config():
    config = base.get_config()  # model: 7B numerics only (the architecture comes from init_from); mesh: data x fsdp
    config.model.scan_layers = True  # one compiled block for all layers (also for the reward models)
    config.model.remat_policy = "none"  # no gradients while sampling (the SFT step uses config.sft.model)
    config.seed = 0  # sampling RNG (folded with the iteration and the batch) and the SFT data order
    config.init_from = ""  # required: the policy to sample from (SFT or previous RLHF checkpoint / workdir)
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model
    # config.reward and config.prompts: see base.py (reward model paths, safety threshold 0.15, the prompt file).

    config.sampling.num_samples = 10  # K per prompt; not given in the paper (its best-of-N figures use 1..100)
    config.sampling.temperature = 1.2  # paper (Fig. 8): best T for 10-100 samples from an RLHF model is 1.2-1.3
    config.sampling.temperature_schedule = ()  # per-iteration T, e.g. (1.3, 1.2); () = sampling.temperature every
    # iteration. The paper re-tunes T each iteration (its best T moves with the model) but publishes no schedule
    config.sampling.top_p = 1.0  # plain temperature sampling (the paper's temperature study names no top-p)
    config.sampling.max_gen_len = 1024  # not stated for RS; the paper's human evaluations allow 1000 new tokens
    config.sampling.keep_truncated = False  # answers cut at max_gen_len stay out of the pool (rlhf.pool); True pools
    # a prompt's best cut answer where none of its K ended (for tiny models that rarely end within the limit)
    config.sampling.batch_size = 64  # (prompt, sample) rows per compiled sample+score call (see the KV-cache note)

    config.iterations = 2  # RS rounds in this run; the pool of best answers carries over between them
    # The pool of an earlier run to start from (its pool.jsonl, same prompts file: entries are keyed by prompt index),
    # so the recipe's RLHF rounds pool across rounds (section 3.2.3); its entries are re-scored by this run's reward
    # models before any selection (the previous round's RMs gave other scores). first_iteration: the number this
    # run's first iteration has in the pool's "iteration" field (the round's index - 1 in train.recipe).
    config.pool_from = ""
    config.first_iteration = 0

    config.sft = sft_7b.get_config()  # the SFT recipe (LR 2e-5 cosine, batch 64 x 4096, 2 epochs) for the pool;
    config.sft.data.val_fraction = 0.02  # the paper gives no RS fine-tuning settings; init_from/data/tokenizer are
    config.sft.eval_at_start = True  # filled in per iteration (the current policy, the pool, the policy's tokenizer)
    return config
