"""llama2-jax: the Llama 2 system (model, pretraining, SFT, reward models, RLHF) in JAX/Flax.

The names most programs need, imported on first use (so `import llama2_jax` stays cheap):

  LlamaConfig, get_config       llama2_jax.model.config
  Llama, make_mesh              llama2_jax.model.llama, llama2_jax.model.sharding
  load_params, save_params      llama2_jax.checkpoints.params_io
  Tokenizer, encode_dialog      llama2_jax.text.tokenizer, llama2_jax.text.chat_format
  text_completion, chat_completion   llama2_jax.inference.generate

The subpackages: model, text, data, inference, serve, checkpoints, evaluation, rlhf, training, cli.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "LlamaConfig": "llama2_jax.model.config",
    "get_config": "llama2_jax.model.config",
    "Llama": "llama2_jax.model.llama",
    "make_mesh": "llama2_jax.model.sharding",
    "load_params": "llama2_jax.checkpoints.params_io",
    "save_params": "llama2_jax.checkpoints.params_io",
    "Tokenizer": "llama2_jax.text.tokenizer",
    "encode_dialog": "llama2_jax.text.chat_format",
    "text_completion": "llama2_jax.inference.generate",
    "chat_completion": "llama2_jax.inference.generate",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llama2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
