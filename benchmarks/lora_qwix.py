"""Google's qwix LoRA against our explicit adapters (llama2_jax/model/lora.py) on the same small Llama, on CPU.

  python benchmarks/lora_qwix.py            # dim 256, 4 layers, batch 4 x 128 tokens, rank 8

Prints which kernels each approach adapts (unrolled and with scan_layers=True), then one line: forward+backward
time (gradient of the summed logits w.r.t. the adapters) of ours next to the full-model gradient as the reference,
timed in the same run, and what happens when qwix's adapted model is run. qwix
intercepts `jax.lax.dot_general`; our `model.project` calls `jnp.matmul`, whose own inner jit hides the call from
qwix except when it traces (first call per shape), and under an outer jax.jit qwix then leaks a tracer.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama2_jax.model import lora  # noqa: E402
from llama2_jax.model.config import LlamaConfig  # noqa: E402
from llama2_jax.model.llama import Llama  # noqa: E402

CFG = LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, max_seq_len=128,
                  dtype="float32")
RANK, ALPHA = 8, 16.0


def qwix_lora_params(cfg: LlamaConfig, tokens):
    """(qwix-wrapped model, its variables, names of the kernels it created LoRA params for)."""
    import qwix

    model = qwix.apply_lora_to_model(Llama(cfg), qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA))
    # eager init: under jax.jit qwix creates its params inside jnp.matmul's own inner jit trace and leaks a tracer
    # (UnexpectedTracerError; qwix 0.1.8, jax 0.10)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(variables["params"]))
    adapted = sorted({"/".join(k)[: -len("_lora_a")] for k in flat if k[-1].endswith("_lora_a")})
    return model, flax.linen.unbox(variables), adapted


def time_fn(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 128)), jnp.int32)
    # qwix sees our kernels only while jnp.matmul's inner jit traces (a cache miss): the first call per shape
    qmodel, qvars, adapted = qwix_lora_params(CFG, tokens)
    _, _, adapted_again = qwix_lora_params(CFG, tokens)
    _, _, adapted_scan = qwix_lora_params(CFG.replace(scan_layers=True), tokens)
    for how, kernels in (("unrolled, first init", adapted), ("unrolled, same init again", adapted_again),
                         ("scan_layers=True", adapted_scan)):
        print(f"{how}: qwix adapted {len(kernels)} kernels {kernels[:4]}; ours adapts {len(lora.ALL_TARGETS)} per "
              f"layer x {CFG.n_layers} ({', '.join(lora.ALL_TARGETS)})", flush=True)
    # qwix's params from that init are tracers leaked from jnp.matmul's inner trace: using them fails
    qwix_text = "qwix: no usable adapter"
    try:
        params = jax.tree.map(lambda x: x + 0.0, qvars["params"])  # any use of the leaked tracers raises
        qwix_ms = time_fn(jax.jit(jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, tokens)))), params)
        qwix_text = f"qwix {qwix_ms:.1f} ms"
    except Exception as e:  # noqa: BLE001 -- reported, not hidden
        qwix_text = f"qwix fails ({type(e).__name__}: {str(e).splitlines()[0][:80]}...)"

    base = jax.jit(lambda rng: flax.linen.unbox(Llama(CFG).init(rng, tokens)["params"]))(jax.random.PRNGKey(0))
    lora_cfg = lora.LoraConfig(rank=RANK, alpha=ALPHA)
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init(jax.random.PRNGKey(1), base, CFG, lora_cfg))
    ours_ms = time_fn(jax.jit(jax.grad(
        lambda a: jnp.sum(lora.apply(Llama(CFG), base, {"lora": a}, lora_cfg, tokens)))), adapters)
    base_ms = time_fn(jax.jit(jax.grad(lambda p: jnp.sum(Llama(CFG).apply({"params": p}, tokens)))), base)
    print(f"forward+backward, dim {CFG.dim} x {CFG.n_layers} layers, 4x128 tokens, rank {RANK}, all 7 kernels: "
          f"ours {ours_ms:.1f} ms (grad w.r.t. adapters); full fine-tune gradient (reference, no adapters) "
          f"{base_ms:.1f} ms; {qwix_text}", flush=True)


if __name__ == "__main__":
    main()
