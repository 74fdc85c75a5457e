"""Serving: an OpenAI-compatible HTTP server (api) over continuous batching on decode slots (engine).

  python -m llama2_jax.serve --checkpoint=DIR --tokenizer=FILE [--host=127.0.0.1 --port=8000 --max_batch=16 ...]

Modules: api (routes, streams), guard (API keys, body size, JSON depth and Unicode), requests (request fields ->
engine requests), responses (OpenAI's response shapes), engine (the batching thread), programs (its device programs),
text (incremental detokenization, stop strings), prefix_cache (the prefix cache's index), quantize (int8 weights),
metrics (Prometheus). Needs the `[serve]` extra (fastapi, uvicorn); the command line is llama2_jax/cli/serve.py; every
flag and request parameter is in docs/serving.md.
"""
