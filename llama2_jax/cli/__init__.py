"""Command lines: flag parsing and terminal I/O over the library (`python -m llama2_jax.generate`,
`python -m llama2_jax.chat`). Library modules never import this package (their `__main__` blocks delegate here)."""
