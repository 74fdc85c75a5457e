"""Rollout throughput: the fixed-batch sampler (`decode.sample`, batches of --slots prompts, each decoded until its
longest answer ends) against the decode-slot engine (`inference.slot_sampler`, --slots slots, a finished answer's slot
takes the next prompt), on the same prompts and the same answer lengths, in one process:

  python benchmarks/rollout.py --shape=15m --prompts=32 --slots=8 --gen_len=16,256    # CPU: stories15M's shape

The answer lengths are forced, so that both sides produce the same tokens' worth of answers: answer i is given
max_gen_len_i tokens (log-uniform in --gen_len, fixed by --seed) and no EOS is ever sampled. The slot engine stops
answer i at max_gen_len_i; a fixed batch runs max_j(max_gen_len_j) steps over its rows, which is what a batch whose
answers end by EOS at those lengths costs (its rows decode in lockstep until the last one ends), and only the
max_gen_len_i tokens of each row are counted. Sampling at --temperature (1 = the trainers' default; 0 = greedy).
Warm-up first (compilations), then --repeats alternating calls per side; the fastest of each is reported in ONE line
with the 1-minute load average and the CPU count.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generate import SHAPES as DECODE_SHAPES  # noqa: E402
from generate import device_name, random_params, time_interleaved  # noqa: E402

from llama2_jax.inference import decode, slot_sampler  # noqa: E402
from llama2_jax.model.config import get_config  # noqa: E402

SHAPES = {**DECODE_SHAPES, "tiny": get_config("tiny")}  # tiny: the CPU trainers' configs (dim 256, 4 layers)

NO_EOS = -1  # never generated: every answer runs to its own max_gen_len


def answer_lengths(n: int, low: int, high: int, seed: int) -> np.ndarray:
    """[n] answer lengths, log-uniform in [low, high] (many short answers, a few long: a batch waits for those)."""
    draws = np.exp(np.random.default_rng(seed).uniform(np.log(low), np.log(high + 1), size=n))
    return np.clip(draws.astype(np.int64), low, high)


def make_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(low, high + 1)) - 1).tolist() for _ in range(n)]


def batch_runner(params, cfg, prompts, gen_lens, slots: int, width: int, temperature: float):
    """Our fixed-batch sampler over consecutive batches of `slots` prompts, each run to its longest answer."""
    batches = []
    for start in range(0, len(prompts), slots):
        rows = prompts[start:start + slots]
        tokens = np.full((slots, width), decode.META_PAD_ID, np.int32)
        lens = np.ones((slots,), np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)], lens[i] = row, len(row)
        batches.append((jnp.asarray(tokens), jnp.asarray(lens), int(max(gen_lens[start:start + slots]))))

    def run():
        for b, (tokens, lens, longest) in enumerate(batches):
            out = jax.block_until_ready(decode.sample_jit(
                params, cfg, tokens, lens, jax.random.PRNGKey(b), max_gen_len=longest, temperature=temperature,
                top_p=1.0, eos_id=NO_EOS))
            assert int(out["lengths"].min()) == longest

    return run


def slot_runner(params, cfg, prompts, gen_lens, slots: int, width: int, temperature: float):
    keys = slot_sampler.sample_keys(jax.random.PRNGKey(0), np.arange(len(prompts)), np.zeros(len(prompts)))

    def run():
        out = slot_sampler.slot_sample(params, cfg, prompts, keys, max_gen_len=[int(n) for n in gen_lens],
                                       n_slots=slots, width=width, temperature=temperature, top_p=1.0, eos_id=NO_EOS)
        assert (out["lengths"] == gen_lens).all()

    return run


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="15m")
    parser.add_argument("--n_layers", type=int, default=None, help="override the shape's depth (smoke tests)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8, help="decode slots = rows of a fixed batch")
    parser.add_argument("--samples", type=int, default=1, help="answers per prompt (GRPO's G, RS's K)")
    parser.add_argument("--prompt_len", default="8,64", help="LOW,HIGH prompt tokens (uniform)")
    parser.add_argument("--gen_len", default="16,256", help="LOW,HIGH answer tokens (log-uniform)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    (p_low, p_high), (g_low, g_high) = span(args.prompt_len), span(args.gen_len)

    cfg = SHAPES[args.shape].replace(dtype="float32", param_dtype="float32", max_seq_len=p_high + g_high)
    cfg = cfg.replace(n_layers=args.n_layers) if args.n_layers else cfg
    params = random_params(cfg)
    prompts = [p for p in make_prompts(args.prompts, p_low, p_high, cfg.vocab_size, args.seed)
               for _ in range(args.samples)]  # GRPO / RS: the samples of a prompt in adjacent rows
    gen_lens = answer_lengths(len(prompts), g_low, g_high, args.seed)
    runners = [batch_runner(params, cfg, prompts, gen_lens, args.slots, p_high, args.temperature),
               slot_runner(params, cfg, prompts, gen_lens, args.slots, p_high, args.temperature)]
    first, best = time_interleaved(runners, args.repeats)
    tokens = int(gen_lens.sum())
    batch_tps, slot_tps = tokens / best[0], tokens / best[1]
    shape = f"dim{cfg.dim}/L{cfg.n_layers}/H{cfg.n_heads}/KV{cfg.n_kv_heads}/V{cfg.vocab_size}"
    print(f"rollout device={device_name()} model={shape} prompts={args.prompts}x{args.samples} slots={args.slots} "
          f"prompt_len={p_low}-{p_high} gen_len={g_low}-{g_high} T={args.temperature:g} tokens={tokens} "
          f"batch={batch_tps:.1f} tok/s slots={slot_tps:.1f} tok/s ratio={slot_tps / batch_tps:.2f}x "
          f"(first calls incl. compile {first[0]:.1f}s / {first[1]:.1f}s) load={os.getloadavg()[0]:.1f} "
          f"cpus={os.cpu_count()}", flush=True)


if __name__ == "__main__":
    main()
