"""Llama 2 70B pretraining recipe (paper Table 1): peak LR 1.5e-4, 4M-token batches, 2T tokens, GQA with 8 KV heads."""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_config("70b")
    config.learning_rate = 1.5e-4
    config.model.scan_layers = True  # one compiled block for 80 layers
    config.model.remat_policy = "dots_no_batch"
    return config
