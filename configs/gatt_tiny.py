r"""Ghost Attention on CPU in minutes with the tiny models of the other tiny configs (their docstrings have the
commands that make /tmp/sft; an RLHF policy such as /tmp/ppo works too).

    python -m train.gatt --config=configs/gatt_tiny.py --workdir=/tmp/gatt --config.init_from=/tmp/sft \
        --config.data.path=../shared/data/fastchat-dummy-conversation.json

16 dialogs of at most 2 sampled turns of 32 tokens, then 10 SFT steps of 8 x 256 tokens on the records.
"""

from configs import base, gatt_7b, sft_tiny


def get_config():
    config = base.cpu_overrides(gatt_7b.get_config())
    config.model.param_dtype = "float32"
    config.gatt.max_dialogs = 16
    config.gatt.max_turns = 2
    config.sampling.max_gen_len = 32

    config.sft = sft_tiny.get_config()
    config.sft.num_epochs = 0.0  # use num_train_steps
    config.sft.num_train_steps = 10
    config.sft.data.val_fraction = 0.1
    config.sft.eval_at_start = False
    config.sft.eval_every_steps = 10
    config.sft.checkpoint_every_steps = 10
    config.sft.progress_bar = False
    return config
