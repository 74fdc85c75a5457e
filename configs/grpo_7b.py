r"""GRPO (Shao et al. 2024, DeepSeekMath, section 4.1) for a 7B policy with a verifiable reward.

    python -m train.grpo --config=configs/grpo_7b.py --workdir=DIR --config.init_from=SFT_POLICY \
        --config.prompts.path=PROMPTS.jsonl --config.reward.fn=package.module:function

DeepSeekMath section 4.1 / 5.2.1 (GRPO on DeepSeekMath-Instruct 7B): policy LR 1e-6, KL coefficient β = 0.04, 64
samples per question, max length 1024, training batch 1024 (completions: 16 questions x 64), a single policy update
per exploration stage (μ = 1). Values the paper does not give are TRL's GRPOConfig defaults (huggingface/trl,
trl/trainer/grpo_config.py): ε = 0.2 (both sides), temperature 1.0, scale_rewards "group", AdamW β2 0.999; the loss
aggregation is "token" (DAPO / TRL "dapo", see llama2_jax/training/losses.py for why not DeepSeekMath's 1/|o_i|).
RLOO: `--config.grpo.variant=rloo` (Ahmadian et al. 2024: β goes into the reward, k = G samples).
Rewards: `config.reward.fn` (comma-separated "package.module:function", contract in
llama2_jax/rlhf/reward_functions.py) with `config.reward.weights`, and/or the Llama 2 reward-model pair
(`config.reward.helpful_path` / `safety_path`, weight `config.reward.rm_weight`).
"""

import ml_collections

from configs import base


def get_config():
    config = base.get_config()  # model numerics for 7B; the architecture comes from init_from
    config.model.scan_layers = True
    config.model.remat_policy = "dots_no_batch"
    config.seed = 0
    config.init_from = ""  # required: the SFT policy; with beta > 0 the frozen reference is a copy of it
    config.tokenizer.path = ""

    config.grpo = ml_collections.ConfigDict()
    config.grpo.variant = "grpo"  # grpo | rloo
    config.grpo.num_generations = 64  # DeepSeekMath 4.1: 64 outputs per question (TRL default 8); G = 1 is refused
    config.grpo.scale_rewards = "group"  # group | batch | none (Dr. GRPO); llama2_jax/rlhf/group.py says why group
    config.grpo.aggregation = "token"  # token | sequence (DeepSeekMath Eq. 3) | constant (Dr. GRPO)
    config.grpo.beta = 0.04  # DeepSeekMath 4.1 (TRL's default is 0.0); 0 keeps no reference model in memory
    config.grpo.clip_low = 0.2  # ε (TRL epsilon; DeepSeekMath does not state it)
    config.grpo.clip_high = ml_collections.config_dict.placeholder(float)  # None = clip_low; DAPO uses 0.28
    config.grpo.epochs = 1  # μ: passes over each batch of rollouts (DeepSeekMath: one update; TRL num_iterations 1)
    config.grpo.normalize_advantages = False  # RLOO only: whiten the advantages over the batch (TRL's option)

    config.prompts.source = "file"  # file (config.prompts.path, JSONL records) | arithmetic (config.arithmetic)
    config.prompts.max_prompt_len = 512
    config.prompts.val_fraction = 0.02  # held-out prompts for eval_reward_mean (greedy answers)
    config.arithmetic = ml_collections.ConfigDict(  # the shipped synthetic task (llama2_jax/data/arithmetic.py)
        {"num_train": 2000, "num_heldout": 200, "min_operand": 0, "max_operand": 99, "operations": "+-", "seed": 0})

    config.reward.fn = ""  # "package.module:function[,...]": e.g. llama2_jax.data.arithmetic:exact_match
    config.reward.weights = ""  # one per function, comma-separated ("" = all 1.0)
    config.reward.fallback = 0.0  # the reward of a completion its function fails on (counted, logged)
    config.reward.rm_weight = 1.0  # weight of the reward models' whitened logit when helpful/safety_path are set

    config.sampling.max_gen_len = 1024  # DeepSeekMath 4.1: max length 1024
    config.sampling.temperature = 1.0  # TRL default
    config.sampling.top_p = 1.0  # must stay 1: the loss models softmax(logits / T)

    config.batch_size = 1024  # DeepSeekMath 4.1: training batch 1024 completions (16 prompts x 64)
    config.minibatch_size = 1024  # one optimizer step per batch (DeepSeekMath: a single update)
    config.grad_accum_steps = 16  # 64-row micro-batches of 1.5k tokens

    config.learning_rate = 1e-6  # DeepSeekMath 4.1
    config.adam_b1 = 0.9  # TRL / transformers defaults
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.weight_decay = 0.0
    config.grad_clip = 1.0  # TRL max_grad_norm

    config.iterations = 500
    config.eval_every_iterations = 10
    config.checkpoint_every_iterations = 20
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    return config
