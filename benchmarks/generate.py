"""Decode throughput: our compiled sampler (llama2_jax.inference.decode) against HF transformers `LlamaForCausalLM.generate`.

Both sides decode greedily with a KV cache from the same random weights (ours are copied into the torch model in this
process), generate exactly --new_tokens tokens per row (no EOS), and are timed end to end (prefill included) after
one warm-up call (ours: compilation), alternating so that both see the same machine load; the fastest of --repeats
calls is reported, with the 1-minute load average. One line per batch size:

  python benchmarks/generate.py --shape=15m --batch=1,8           # CPU: llama2.c's stories15M shape
  python benchmarks/generate.py --shape=7b --batch=1,16 --dtype=bfloat16 --prompt_len=128   # one GPU
  python benchmarks/generate.py --shape=15m --no_hf               # ours only
  python benchmarks/generate.py --shape=15m --xla_option=xla_cpu_experimental_ynn_fusion_type=   # + ours with a flag

This file imports only jax/flax/numpy/torch/transformers (no grain, ml_collections or tensorflow).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.inference import decode
from llama2_jax.model.config import LlamaConfig, get_config
from llama2_jax.model.llama import Llama

SHAPES = {
    # karpathy/llama2.c stories15M: dim 288, 6 layers, 6 heads, FFN 768, with Llama 2's 32000-token vocabulary.
    "15m": LlamaConfig(vocab_size=32000, dim=288, n_layers=6, n_heads=6, multiple_of=32),
    "7b": get_config("7b"),
}
NO_EOS = -1  # never generated: every row decodes exactly --new_tokens tokens


def random_params(cfg: LlamaConfig, seed: int = 0) -> dict:
    """Random params (std 0.02) in cfg.param_dtype, created on the default device by one jitted init."""
    init = jax.jit(lambda key: nn.unbox(Llama(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]))
    return init(jax.random.PRNGKey(seed))


def _torch_tensor(x, torch):
    a = np.asarray(jax.device_get(x))
    if a.dtype == jnp.bfloat16:  # numpy has no bfloat16: move the bits
        return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def hf_state_dict(params: dict, cfg: LlamaConfig, torch) -> dict:
    """Our unrolled params -> HF LlamaForCausalLM state dict. Torch Linear weights are [out, in]; our RoPE is HF's
    half-split form, so q/k need no permutation."""
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = lambda x: _torch_tensor(x, torch)
    sd = {"model.embed_tokens.weight": t(params["tok_embeddings"]["embedding"]),
          "model.norm.weight": t(params["norm"]["scale"]), "lm_head.weight": t(params["output"]).T}
    for i in range(cfg.n_layers):
        layer, p = params[f"layers_{i}"], f"model.layers.{i}."
        attn, mlp = layer["attention"], layer["feed_forward"]
        sd[p + "input_layernorm.weight"] = t(layer["attention_norm"]["scale"])
        sd[p + "post_attention_layernorm.weight"] = t(layer["ffn_norm"]["scale"])
        sd[p + "self_attn.q_proj.weight"] = t(attn["wq"]).reshape(d, n * h).T
        sd[p + "self_attn.k_proj.weight"] = t(attn["wk"]).reshape(d, k * h).T
        sd[p + "self_attn.v_proj.weight"] = t(attn["wv"]).reshape(d, k * h).T
        sd[p + "self_attn.o_proj.weight"] = t(attn["wo"]).reshape(n * h, d).T
        sd[p + "mlp.gate_proj.weight"] = t(mlp["w1"]).T
        sd[p + "mlp.up_proj.weight"] = t(mlp["w3"]).T
        sd[p + "mlp.down_proj.weight"] = t(mlp["w2"]).T
    return {name: value.contiguous() for name, value in sd.items()}


def hf_model(params: dict, cfg: LlamaConfig, dtype: str, device: str):
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(hf_state_dict(params, cfg, torch), assign=True, strict=True)
    # inv_freq is a non-persistent buffer (not in the state dict), still on the meta device: rebuild it.
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def parse_xla_options(items: list[str]) -> dict:
    """["name=value", ...] -> compiler options; "true"/"false" become booleans and integers ints."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--xla_option={item!r}: expected NAME=VALUE")
        lowered = value.lower()
        options[name] = lowered == "true" if lowered in ("true", "false") else int(value) if value.isdigit() else value
    return options


def ours_runner(params, cfg, prompts: np.ndarray, new_tokens: int, xla_options: Optional[dict] = None):
    """A function running our sampler once (greedy, exactly new_tokens per row) and blocking on the result;
    `xla_options` are added to the library's own decode compiler options."""
    args = (params, cfg, jnp.asarray(prompts), jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32),
            jax.random.PRNGKey(0))
    kwargs = dict(max_gen_len=new_tokens, temperature=0.0, top_p=1.0, eos_id=NO_EOS)
    sample = decode.sample_jit
    if xla_options:
        sample = jax.jit(decode.sample, static_argnames=decode.SAMPLE_STATIC,
                         compiler_options={**decode.DECODE_COMPILER_OPTIONS, **xla_options})

    def run():
        out = jax.block_until_ready(sample(*args, **kwargs))
        assert int(out["lengths"].min()) == new_tokens

    return run


def hf_runner(model, prompts: np.ndarray, new_tokens: int, device: str):
    """A function running HF generate once (greedy, KV cache, exactly new_tokens per row)."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, use_cache=True, pad_token_id=0)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return run


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_interleaved(runners: list, repeats: int) -> tuple[list[float], list[float]]:
    """(first-call seconds, fastest of `repeats` calls) per runner; the runners alternate so that they see the same
    machine load."""
    first = [seconds(run) for run in runners]
    best = [float("inf")] * len(runners)
    for _ in range(repeats):
        for i, run in enumerate(runners):
            best[i] = min(best[i], seconds(run))
    return first, best


def device_name() -> str:
    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else f"cpu ({platform.processor() or 'x86'})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="15m")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute, both sides")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per side, alternating ours/HF; the fastest is reported")
    parser.add_argument("--no_hf", action="store_true", help="time ours only")
    parser.add_argument("--n_layers", type=int, default=None, help="override the shape's depth (smoke tests)")
    parser.add_argument("--xla_option", action="append", default=[], metavar="NAME=VALUE",
                        help="also time ours compiled with this extra XLA option (repeatable), in the same run, "
                             "e.g. xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,WHILE,CONDITIONAL")
    args = parser.parse_args(argv)
    xla_options = parse_xla_options(args.xla_option)

    cfg = SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.dtype,
                                     max_seq_len=args.prompt_len + args.new_tokens)
    cfg = cfg.replace(n_layers=args.n_layers) if args.n_layers else cfg
    params = random_params(cfg)
    torch_device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    model = None if args.no_hf else hf_model(params, cfg, args.dtype, torch_device)
    shape = f"dim{cfg.dim}/L{cfg.n_layers}/H{cfg.n_heads}/KV{cfg.n_kv_heads}/V{cfg.vocab_size}/{args.dtype}"
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = np.random.default_rng(batch).integers(3, cfg.vocab_size, size=(batch, args.prompt_len))
        prompts[:, 0] = 1
        runners = {"ours": ours_runner(params, cfg, prompts, args.new_tokens)}
        if xla_options:
            runners["ours_opts"] = ours_runner(params, cfg, prompts, args.new_tokens, xla_options)
        if model is not None:
            runners["hf"] = hf_runner(model, prompts, args.new_tokens, torch_device)
        first, best = time_interleaved(list(runners.values()), args.repeats)
        tps = {name: batch * args.new_tokens / seconds for name, seconds in zip(runners, best)}
        line = (f"device={device_name()} model={shape} batch={batch} prompt={args.prompt_len} "
                f"new={args.new_tokens} ours={tps['ours']:.1f} tok/s")
        if xla_options:
            line += f" ours_opts={tps['ours_opts']:.1f} tok/s"
        if model is not None:
            line += f" hf={tps['hf']:.1f} tok/s ratio={tps['ours'] / tps['hf']:.2f}x"
            if xla_options:
                line += f" ratio_opts={tps['ours_opts'] / tps['hf']:.2f}x"
        if xla_options:
            line += " opts=" + ",".join(args.xla_option)
        load = f" load={os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        print(line + f" (ours first call incl. compile {first[0]:.1f}s{load})", flush=True)


if __name__ == "__main__":
    main()
