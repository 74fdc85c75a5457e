"""Serving: an OpenAI-compatible HTTP server (api) over continuous batching on decode slots (engine).

  python -m llama2_jax.serve --checkpoint=DIR --tokenizer=FILE [--host=127.0.0.1 --port=8000 --max_batch=16]

Needs the `[serve]` extra (fastapi, uvicorn); the command line is llama2_jax/cli/serve.py.
"""
