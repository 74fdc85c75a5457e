r"""PPO on top of rejection sampling (paper section 3.2.3) for a 7B policy.

    python -m train.ppo --config=configs/ppo_7b.py --workdir=DIR --config.init_from=RS_POLICY \
        --config.reward.helpful_path=RM_HELPFUL --config.reward.safety_path=RM_SAFETY --config.prompts.path=FILE

Paper: R = R̃c - β·KL(πθ ‖ π0), Rc piecewise (safety score if the prompt is safety-tagged or Rs < 0.15, else the
helpful score), R̃c = whiten(logit(Rc)); AdamW β (0.9, 0.95), eps 1e-5, weight decay 0.1, clip 1.0, constant LR 1e-6;
512 prompts per iteration, minibatches of 64 with one gradient step each, PPO clip 0.2, 200-400 iterations
early-stopped on held-out prompts; β = 0.01 for 7B and 13B, **0.005 for 34B and 70B** (`--config.beta=0.005`).
The paper is silent on the critic, GAE, the KL form, whitening statistics, generation length and temperature:
the InstructGPT / TRL-style choices below (and in llama2_jax/rlhf/formulas.py) fill those gaps.

Memory: four 7B models live on the mesh: the policy (float32 params + Adam moments: 16 bytes/param = 108 GB), π0
(float32 copy, 27 GB), the value model (another 108 GB with its optimizer) and the reward models (27 GB each, one
copy when helpful_path == safety_path), all sharded over data x fsdp.
"""

import ml_collections

from configs import base


def get_config():
    config = base.get_config()  # model: 7B numerics only (the architecture comes from init_from); mesh: data x fsdp
    config.model.scan_layers = True  # one compiled block for all layers
    config.model.remat_policy = "dots_no_batch"  # the update backpropagates through 64 x (prompt + response) tokens
    config.seed = 0  # prompt order, sampling, minibatch shuffles, the fresh value head (value.init_from = "policy")
    config.init_from = ""  # required: the policy to start from (the latest RS checkpoint, or SFT); π0 = a copy
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model
    # config.reward: helpful_path, safety_path (either may be "", not both), safety_threshold 0.15 (base.py)

    config.value = ml_collections.ConfigDict()
    # The paper does not describe its critic. InstructGPT initialises the value function from the reward model:
    # "helpful_rm" (default) / "safety_rm" = that RM's workdir (reward.*_path), "policy" = the policy's trunk + a fresh
    # head (TRL's value head), anything else = the path of a reward-model workdir.
    config.value.init_from = "helpful_rm"
    config.value.learning_rate = 5e-6  # not in the paper; a critic LR above the actor's is common (DeepSpeed-Chat)
    config.value.head_init_std = 1e-3  # only for value.init_from = "policy" (a fresh head)

    # config.prompts: JSONL {"prompt", "is_safety"} or a preference file (its prompts); see base.py
    config.prompts.val_fraction = 0.02  # held-out prompts for eval_reward_* (the paper early-stops on held-out prompts)

    config.sampling.max_gen_len = 512  # not stated for PPO; caps the cost of an iteration (~4x RS's per token)
    config.sampling.temperature = 1.0  # not stated; InstructGPT / TRL sample the policy itself (T = 1, no top-p)
    config.sampling.top_p = 1.0  # keep 1: log-probabilities are those of softmax(logits / T), top-p is not modelled

    config.batch_size = 512  # paper: prompts (one response each) per PPO iteration
    config.minibatch_size = 64  # paper: minibatch 64, one gradient step per minibatch -> 8 steps per iteration
    config.ppo_epochs = 1  # passes over the batch per iteration (paper: one step per minibatch; TRL default 4)
    config.grad_accum_steps = 1  # micro-batches per minibatch step: raise if 64 rows of 1,537 tokens do not fit
    config.rollout_chunk_size = 64  # rows sampled and scored at once (lax.map over 512 / 64 = 8 chunks); 0 = all

    config.learning_rate = 1e-6  # paper: constant 1e-6
    config.adam_b1 = 0.9  # paper
    config.adam_b2 = 0.95  # paper
    config.adam_eps = 1e-5  # paper
    config.weight_decay = 0.1  # paper
    config.grad_clip = 1.0  # paper (global norm)

    config.beta = 0.01  # paper: KL penalty 0.01 for 7B and 13B, 0.005 for 34B and 70B
    config.clip_ratio = 0.2  # paper: PPO clip
    config.clip_value = 0.2  # not stated; TRL's cliprange_value
    config.gamma = 1.0  # GAE discount; not stated, TRL default
    config.lam = 0.95  # GAE lambda; not stated, TRL default
    config.whiten_advantages = True  # TRL: advantages whitened over the batch's response tokens

    config.iterations = 200  # paper: 200-400 iterations (early-stopped on held-out prompts)
    config.eval_every_iterations = 10  # eval_reward_* on one batch of held-out prompts
    config.early_stop_patience = 5  # stop after 5 held-out evaluations without a better eval_reward_combined (the
    # paper early-stops on held-out prompts without giving its rule); 0 = never. The best policy is in WORKDIR/best
    config.checkpoint_every_iterations = 20  # policy + value checkpoints (and at the end)
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    return config
