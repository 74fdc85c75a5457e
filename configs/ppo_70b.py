r"""PPO for a 70B policy (paper section 3.2.3): the 7B recipe (configs/ppo_7b.py) with the 34B/70B KL coefficient.

    python -m train.ppo --config=configs/ppo_70b.py --workdir=DIR --config.init_from=RS_POLICY_70B \
        --config.reward.helpful_path=RM_HELPFUL --config.reward.safety_path=RM_SAFETY --config.prompts.path=FILE

Paper: β = 0.005 for 34B and 70B (0.01 for 7B and 13B); everything else as for 7B (constant LR 1e-6, 512 prompts,
minibatch 64, clip 0.2, 200-400 iterations early-stopped on held-out prompts). The paper reports ~330 s per
iteration at 70B with FSDP. A 34B run takes this file too (same β).
"""

from configs import ppo_7b


def get_config():
    config = ppo_7b.get_config()
    config.beta = 0.005  # paper: KL penalty 0.005 for 34B and 70B
    config.mesh.fsdp = -1  # the policy, π0, the value model and the RMs are sharded over every device (FSDP)
    config.rollout.engine = "batch"  # a multi-host job: the slot engine's host loop runs in one process only
    return config
