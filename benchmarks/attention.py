"""Forward+backward time of the "chunked" attention kernel next to the reference "xla" kernel, timed in the same run.

  python benchmarks/attention.py                        # B 1, T 1024, 8 heads / 2 KV heads, H 64, blocks of 256
  python benchmarks/attention.py --seq=2048 --block=512

Times `jax.grad` of the summed output w.r.t. q, k and v (float32 inputs, packed segment ids as the trainers pass),
the two kernels alternating, and prints one line with both medians, their ratio and XLA's temp bytes of each
compiled gradient (the memory the chunked kernel saves).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llama2_jax.model import attention  # noqa: E402


def gradient_fn(impl: str, block: int):
    """jit(grad) of sum(attention(q, k, v)) w.r.t. (q, k, v)."""
    def loss(q, k, v, seg):
        out = attention.dot_product_attention(q, k, v, impl=impl, q_segment_ids=seg, kv_segment_ids=seg,
                                              block_size=block)
        return jnp.sum(out)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    b, t = args.batch, args.seq
    q = jax.random.normal(keys[0], (b, t, args.heads, args.head_dim))
    k = jax.random.normal(keys[1], (b, t, args.kv_heads, args.head_dim))
    v = jax.random.normal(keys[2], (b, t, args.kv_heads, args.head_dim))
    seg = jnp.broadcast_to(1 + jnp.arange(t) // max(1, t // 3), (b, t)).astype(jnp.int32)  # three documents a row
    fns = {impl: gradient_fn(impl, args.block) for impl in ("xla", "chunked")}
    temp = {impl: fn.lower(q, k, v, seg).compile().memory_analysis().temp_size_in_bytes for impl, fn in fns.items()}
    times = {impl: [] for impl in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(q, k, v, seg))  # compile and warm up
    for _ in range(args.repeats):
        for impl, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, seg))
            times[impl].append((time.perf_counter() - start) * 1e3)
    xla_ms, chunked_ms = (statistics.median(times[i]) for i in ("xla", "chunked"))
    print(f"attention fwd+bwd device={jax.devices()[0].platform} B={b} T={t} N={args.heads} K={args.kv_heads} "
          f"H={args.head_dim} block={args.block}: xla={xla_ms:.1f} ms chunked={chunked_ms:.1f} ms "
          f"ratio={chunked_ms / xla_ms:.2f}x temp xla={temp['xla'] / 2**20:.0f} MiB "
          f"chunked={temp['chunked'] / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
