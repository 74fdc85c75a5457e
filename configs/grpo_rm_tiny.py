r"""GRPO with the Llama 2 reward-model pair on CPU in minutes: the tiny models of the other tiny configs, on the OASST
prompts (the GRPO stage of configs/recipe_tiny.py, in place of PPO or after it).

    python -m train.grpo --config=configs/grpo_rm_tiny.py --workdir=/tmp/grpo_rm --config.init_from=/tmp/rs/iter_1/sft \
        --config.reward.helpful_path=/tmp/rm --config.reward.safety_path=/tmp/rm \
        --config.prompts.path=../shared/data/oasst-en-100-pairs.jsonl

The reward of a completion is the paper's piecewise combination Rc of the two reward models (section 3.2.3), whitened
logit as in PPO (config.reward.rm_weight 1, no reward function); its group-normalised advantage needs no value model.
Prompt records: {"prompt": str | [messages], "is_safety": bool (optional)} (a preference file's records have them).
Per iteration: 8 prompts x G = 4 answers of up to 32 tokens, 2 optimizer steps; beta = 0.04 (DeepSeekMath, the
reference kept); held-out Rc (eval_reward_combined_mean, greedy answers) every 2 iterations.
"""

from configs import base, grpo_7b


def get_config():
    config = base.cpu_overrides(grpo_7b.get_config())
    config.prompts.source = "file"
    config.prompts.max_prompts = 200
    config.prompts.max_prompt_len = 94  # + max_gen_len 32 + 1 <= the tiny model's max_seq_len 128 (SFT: 256)
    config.prompts.val_fraction = 0.1
    config.reward.fn = ""  # the reward models only: --config.reward.helpful_path / safety_path
    config.grpo.num_generations = 4
    config.sampling.max_gen_len = 32
    config.batch_size = 32  # 8 prompts x 4
    config.minibatch_size = 16
    config.grad_accum_steps = 1
    config.learning_rate = 1e-4  # as configs/ppo_tiny.py: a 4M-parameter model barely moves at 1e-6
    config.iterations = 8
    config.eval_every_iterations = 2
    config.checkpoint_every_iterations = 4
    config.async_checkpoints = False
    return config
