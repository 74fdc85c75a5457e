"""Llama 2 7B pretraining recipe (paper Table 1): peak LR 3e-4, 4M-token batches of 4096-token sequences, 2T tokens."""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_config("7b")
    config.model.scan_layers = True  # one compiled block for all layers: fast compiles
    config.model.remat_policy = "dots_no_batch"  # keep weight matmuls, recompute attention: fits 4096-token rows
    return config
