"""Generation on the host: Meta's `llama/generation.py` API (`generate`, `text_completion`, `chat_completion`) over
the compiled decoder (llama2_jax.inference.decode), plus streaming one reply in chunks.

The host pads token lists into buckets of widths (`pad_prompts`) so that prompts share compilations, runs
`decode.sample_jit`, and applies Meta's output rule (`postprocess`): drop the prompt unless `echo`, cut the row to
max_gen_len, then truncate before the first EOS. The command line lives in llama2_jax/cli/generate.py:
  python -m llama2_jax.generate --checkpoint=DIR --tokenizer=PATH --prompt="Once upon a time"
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama2_jax.inference.decode import EOS_ID, META_PAD_ID, decode_steps_jit, init_decode_jit, sample_jit
from llama2_jax.inference.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_max_gen_len, check_sampling
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text import chat_format as chat

LENGTH_BUCKET = 64  # the host pads prompt widths to a multiple of this, so that prompts share compilations


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, max_seq_len: int, bucket: int = LENGTH_BUCKET,
                batch_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to [B', P] (P = longest rounded up to `bucket`, capped at max_seq_len; B' = B rounded
    up to `batch_multiple` by repeating the first prompt). Returns (tokens [B', P] int32, lengths [B'] int32)."""
    if not prompts:
        raise ValueError("no prompts given")
    for index, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= max_seq_len:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens; a prompt needs 1 to max_seq_len "
                             f"({max_seq_len}) tokens")
    longest = max(len(p) for p in prompts)
    prompts = list(prompts) + [prompts[0]] * (-len(prompts) % batch_multiple)
    width = min(max_seq_len, -(-longest // bucket) * bucket)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def check_token_ids(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """ValueError naming the first prompt holding a token id outside [0, vocab_size) (an embedding lookup would
    silently clamp it)."""
    for index, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab_size):
            bad = next(t for t in prompt if not (isinstance(t, (int, np.integer)) and 0 <= t < vocab_size))
            raise ValueError(f"prompt {index} holds token id {bad!r}, outside the model's vocabulary "
                             f"[0, {vocab_size})")


def prng_key(rng) -> jax.Array:
    """A PRNG key from an int seed (or the key itself)."""
    return jax.random.PRNGKey(rng) if isinstance(rng, int) else rng


def postprocess(tokens: np.ndarray, prompt_lens: Sequence[int], max_gen_len: int, eos_id: int, echo: bool,
                logprobs: Optional[np.ndarray] = None) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Meta's output rule per row: drop the prompt unless echo, cut to max_gen_len, truncate before the first EOS."""
    out_tokens, out_logprobs = [], []
    for i, length in enumerate(prompt_lens):
        start = 0 if echo else int(length)
        row = tokens[i, start: int(length) + max_gen_len].tolist()
        probs = None if logprobs is None else logprobs[i, start: int(length) + max_gen_len].tolist()
        if eos_id in row:
            cut = row.index(eos_id)
            row, probs = row[:cut], (None if probs is None else probs[:cut])
        out_tokens.append(row)
        out_logprobs.append(probs)
    return out_tokens, (None if logprobs is None else out_logprobs)


def sample_lists(params: dict, cfg: LlamaConfig, prompt_tokens: Sequence[Sequence[int]], *, max_gen_len: int,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, logprobs: bool = False,
                 eos_id: int = EOS_ID, pad_id: int = META_PAD_ID, rng=1, mesh: Optional[Mesh] = None,
                 bucket: int = LENGTH_BUCKET) -> dict[str, np.ndarray]:
    """`decode.sample` on token lists: checks the sampling arguments (ValueError), pads (widths bucketed, batch
    rounded up to the mesh's data-parallel size), runs the compiled sampler (one compilation per padded shape and
    static options) and returns its outputs as numpy arrays for the given prompts only. rng: a PRNG key or an int
    seed. A prompt that is empty, longer than max_seq_len or holds an id outside the vocabulary is a ValueError
    naming its index."""
    check_max_gen_len(max_gen_len)
    check_sampling(temperature, top_p)
    check_token_ids(prompt_tokens, cfg.vocab_size)
    multiple = 1 if mesh is None else sh.data_parallel_size(mesh)
    tokens, lens = pad_prompts(prompt_tokens, pad_id, cfg.max_seq_len, bucket, multiple)
    out = sample_jit(params, cfg, jnp.asarray(tokens), jnp.asarray(lens), prng_key(rng), max_gen_len=max_gen_len,
                     temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id, logprobs=logprobs,
                     mesh=mesh)
    return {name: value[: len(prompt_tokens)] for name, value in jax.device_get(out).items()}


def generate_with_logprobs(params: dict, cfg: LlamaConfig, prompt_tokens: Sequence[Sequence[int]], *,
                           max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                           eos_id: int = EOS_ID, **kwargs) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Meta's `Llama.generate`: (token lists, log-prob lists or None). Other options: see `sample_lists`."""
    max_gen_len = cfg.max_seq_len - 1 if max_gen_len is None else max_gen_len
    out = sample_lists(params, cfg, prompt_tokens, max_gen_len=max_gen_len, logprobs=logprobs, eos_id=eos_id,
                       **kwargs)
    return postprocess(out["tokens"], out["prompt_lens"], max_gen_len, eos_id, echo, out.get("logprobs"))


def generate(params: dict, cfg: LlamaConfig, prompt_tokens: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Generated token lists, one per prompt (see `generate_with_logprobs` for the options)."""
    kwargs.pop("logprobs", None)
    return generate_with_logprobs(params, cfg, prompt_tokens, **kwargs)[0]


def _results(tokenizer, generations, logprobs, contents) -> list[dict[str, Any]]:
    results = []
    for i, (tokens, content) in enumerate(zip(generations, contents)):
        result: dict[str, Any] = {"generation": content}
        if logprobs is not None:
            result["tokens"] = [tokenizer.decode([t]) for t in tokens]
            result["logprobs"] = logprobs[i]
        results.append(result)
    return results


def text_completion(params: dict, cfg: LlamaConfig, tokenizer, prompts: Sequence[str], *,
                    temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                    max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, rng=1,
                    mesh: Optional[Mesh] = None) -> list[dict[str, Any]]:
    """Meta's `text_completion`: [{"generation": str}] (+ "tokens", "logprobs" when logprobs)."""
    prompt_tokens = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    generations, lps = generate_with_logprobs(
        params, cfg, prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
        logprobs=logprobs, echo=echo, eos_id=tokenizer.eos_id, rng=rng, mesh=mesh)
    return _results(tokenizer, generations, lps, [tokenizer.decode(t) for t in generations])


def chat_completion(params: dict, cfg: LlamaConfig, tokenizer, dialogs: Sequence, *,
                    temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                    max_gen_len: Optional[int] = None, logprobs: bool = False, rng=1,
                    mesh: Optional[Mesh] = None) -> list[dict[str, Any]]:
    """Meta's `chat_completion`: [{"generation": {"role": "assistant", "content": str}}] (+ "tokens", "logprobs").
    Dialogs containing special tags still generate, but their content is `chat.UNSAFE_ERROR`."""
    prompt_tokens = [chat.encode_dialog(tokenizer, dialog) for dialog in dialogs]
    unsafe = [chat.dialog_has_special_tags(dialog) for dialog in dialogs]
    generations, lps = generate_with_logprobs(
        params, cfg, prompt_tokens, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
        logprobs=logprobs, eos_id=tokenizer.eos_id, rng=rng, mesh=mesh)
    contents = [{"role": "assistant", "content": chat.UNSAFE_ERROR if bad else tokenizer.decode(t)}
                for t, bad in zip(generations, unsafe)]
    return _results(tokenizer, generations, lps, contents)


def reply_tokens(tokens, prompt_len: int, pos: int, max_gen_len: int, eos_id: int) -> list[int]:
    """The reply so far: row tokens [prompt_len, min(pos, prompt_len + max_gen_len)), cut before the first EOS."""
    row = [int(t) for t in tokens[prompt_len: min(pos, prompt_len + max_gen_len)]]
    return row[: row.index(eos_id)] if eos_id in row else row


def stream_reply(params: dict, cfg: LlamaConfig, tokenizer, dialog: chat.Dialog, *, rng,
                 max_gen_len: Optional[int] = None, temperature: float = DEFAULT_TEMPERATURE,
                 top_p: float = DEFAULT_TOP_P, chunk: int = 16) -> Iterator[str]:
    """Yield the assistant's reply to `dialog` (ending with a user message) as text pieces, decoding `chunk` tokens
    per compiled call (the KV cache stays on the device between calls). The pieces concatenate to what
    `chat_completion` answers for the same dialog and rng."""
    max_gen_len = cfg.max_seq_len - 1 if max_gen_len is None else max_gen_len
    check_max_gen_len(max_gen_len)
    check_sampling(temperature, top_p)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    prompt = chat.encode_dialog(tokenizer, dialog)
    check_token_ids([prompt], cfg.vocab_size)
    tokens, lens = pad_prompts([prompt], META_PAD_ID, cfg.max_seq_len)
    state = init_decode_jit(params, cfg, jnp.asarray(tokens), jnp.asarray(lens), prng_key(rng),
                            max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, eos_id=tokenizer.eos_id)
    shown = ""
    while True:
        pos, end, done = (int(x) for x in jax.device_get((state.pos, state.end, state.done[0])))
        finished = done or pos >= end
        text = tokenizer.decode(reply_tokens(jax.device_get(state.tokens[0]), len(prompt), pos, max_gen_len,
                                             tokenizer.eos_id))
        if not text.endswith("\ufffd") or finished:  # hold back a character whose bytes are still arriving
            yield text[len(shown):]
            shown = text
        if finished:
            return
        state = decode_steps_jit(params, cfg, state, max_steps=chunk)
