r"""GRPO on CPU in minutes: the arithmetic task with its exact-match reward, from a tiny SFT policy.

    python -m train.grpo --config=configs/grpo_tiny.py --workdir=/tmp/grpo --config.init_from=/tmp/sft_arith

The SFT policy must have answered the task's prompts ("What is 3 + 4?" -> "7") in Meta's chat format, e.g. train.sft
on `arithmetic.sft_record`s of the training split (tests/train/test_grpo_trainer.py does it in the test). Per iteration:
16 prompts x G = 8 answers of up to 4 tokens, 4 optimizer steps (2 epochs x 2 minibatches); beta = 0 (no
reference kept).
"""

from configs import base, grpo_7b


def get_config():
    config = base.cpu_overrides(grpo_7b.get_config())
    config.prompts.source = "arithmetic"
    config.arithmetic.update({"num_train": 70, "num_heldout": 30, "max_operand": 9, "operations": "+"})
    config.prompts.max_prompt_len = 32
    config.reward.fn = "llama2_jax.data.arithmetic:exact_match"
    config.grpo.num_generations = 8
    config.grpo.beta = 0.0
    config.sampling.max_gen_len = 4
    config.batch_size = 128  # 16 prompts x 8
    config.minibatch_size = 64
    config.grad_accum_steps = 1
    config.grpo.epochs = 2  # two passes over each batch: the second minibatch steps use importance ratios != 1
    config.learning_rate = 3e-4  # tiny model, few iterations (1e-3 lowered the sampled reward; 1e-4 barely moved it)
    config.iterations = 20
    config.eval_every_iterations = 10
    config.checkpoint_every_iterations = 10
    config.async_checkpoints = False
    return config
