r"""Ghost Attention (paper section 3.3) for a 7B policy: sample multi-turn dialogs that keep one instruction, then
fine-tune on them.

    python -m train.gatt --config=configs/gatt_7b.py --workdir=DIR --config.init_from=POLICY \
        --config.data.path=DIALOGS

The paper applies GAtt after RLHF (on the RLHF model's samples) with synthetic constraints (hobbies, languages,
public figures) and gives no sampling or fine-tuning settings for it: the choices below are marked as such. The
fields keep the meaning of the former command-line flags (train/gatt.py's docstring maps them).
"""

import ml_collections

from configs import base, sft_7b
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P


def get_config():
    config = base.get_config()  # model: numerics only (the architecture comes from init_from)
    config.model.param_dtype = "bfloat16"  # the weights are read in the compute dtype for sampling (--dtype)
    config.model.remat_policy = "none"  # no gradients while sampling (the SFT step uses config.sft.model)
    config.seed = 1  # instruction choice and sampling (Meta fixes the seed at 1)
    config.init_from = ""  # required: the policy that samples the replies (paper: after RLHF)
    config.tokenizer.path = ""  # "" = INIT_FROM/tokenizer.model
    config.data.path = ""  # required: multi-turn dialogs (any format of llama2_jax.data.dialogs.read_dialogs)
    config.data.format = "auto"

    config.gatt = ml_collections.ConfigDict()
    config.gatt.max_turns = 0  # sample at most this many turns per dialog (0 = all of its user turns)
    config.gatt.max_dialogs = 0  # use the first N dialogs (0 = all)
    config.gatt.samples = "every_turn"  # every_turn: one record per sampled turn | last_turn: one per dialog
    config.gatt.max_constraints = 2  # instructions combined per dialog: 1, 2 or 3
    config.gatt.terse_probability = 0.5  # share of records whose system message is the terse form
    config.gatt.min_reply_tokens = 16  # stop a dialog when less context than this is left for the reply

    config.sampling.temperature = DEFAULT_TEMPERATURE  # Meta's chat_completion defaults (not stated for GAtt)
    config.sampling.top_p = DEFAULT_TOP_P
    config.sampling.max_gen_len = 256  # new tokens per reply (not stated)
    config.sampling.batch_size = 16  # dialogs per sampling call

    config.sft = sft_7b.get_config()  # the SFT recipe on the records (init_from, data, tokenizer filled in)
    config.sft.data.val_fraction = 0.02
    return config
