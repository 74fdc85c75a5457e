"""Llama 2 34B pretraining recipe (paper Table 1): peak LR 1.5e-4, 4M-token batches, 2T tokens, GQA with 8 KV heads.

34B was never released; its dimensions are Code Llama 34B's (Code Llama was initialised from Llama 2).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_config("34b")
    config.learning_rate = 1.5e-4
    config.model.scan_layers = True  # one compiled block for 48 layers
    config.model.remat_policy = "dots_no_batch"
    return config
