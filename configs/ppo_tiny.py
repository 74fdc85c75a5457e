r"""PPO on CPU in minutes with the tiny models of the other tiny configs, on top of the rejection-sampling round of
configs/rs_tiny.py (its docstring has the commands that make /tmp/sft, /tmp/rm and /tmp/rs; /tmp/sft works too).

    python -m train.ppo --config=configs/ppo_tiny.py --workdir=/tmp/ppo --config.init_from=/tmp/rs/iter_1/sft \
        --config.reward.helpful_path=/tmp/rm --config.reward.safety_path=/tmp/rm \
        --config.prompts.path=../shared/data/hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl

The value model starts from the helpful RM (value.init_from = "helpful_rm"). Per iteration: 16 prompts x up to
32 new tokens, 4 minibatches of 4 -> 4 policy and 4 value steps; 30 iterations take ~3-8 minutes on 2 CPU cores.
The KL coefficient is the 7B one; the LR is large because a 4M-parameter model barely moves at 1e-6 (at 1e-5 the
reward stays flat over 20 iterations).
"""

from configs import base, ppo_7b


def get_config():
    config = base.cpu_overrides(ppo_7b.get_config())
    config.prompts.max_prompts = 200  # the first 200 HH prompts of at most max_prompt_len tokens
    config.prompts.max_prompt_len = 96  # + max_gen_len 32 + 1 <= the SFT tiny model's max_seq_len 256
    config.prompts.val_fraction = 0.1
    config.sampling.max_gen_len = 32
    config.batch_size = 16  # prompts per iteration
    config.minibatch_size = 4  # 4 gradient steps per iteration
    config.rollout_chunk_size = 0  # sample and score the 16 rows at once
    config.learning_rate = 1e-4  # tiny model, few iterations
    config.value.learning_rate = 1e-4
    config.iterations = 30
    config.eval_every_iterations = 5
    config.checkpoint_every_iterations = 10
    return config
