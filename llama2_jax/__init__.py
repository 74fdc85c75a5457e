"""llama2-jax: the Llama 2 system (model, pretraining, SFT, reward models, RLHF) in JAX/Flax."""

__version__ = "0.1.0"
