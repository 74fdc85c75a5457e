"""Generation: cached decoding == full forward, greedy parity with HF generate, Meta's top-p, EOS and output rules,
streaming in chunks, and sampling inside jit on a sharded mesh.

Covers llama2_jax.inference.decode."""

import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.generation import CFG, GEN_LEN, NO_EOS, PROMPTS, full_logits, init_params

from llama2_jax.cli import chat as chat_cli
from llama2_jax.cli import generate as generate_cli
from llama2_jax.inference import decode, sampling
from llama2_jax.inference import generate as gen
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import Llama
from llama2_jax.text import chat_format as chat


@pytest.fixture(scope="module")
def params():
    return init_params(CFG)


# ----------------------------------------------------------------------------------------------------------------------
# The KV cache


def prefill_then_steps(apply, params, tokens, cache, prefill_len=5) -> np.ndarray:
    """Logits [B, T, V] from apply(params, tokens, cache, index) -> (logits, cache): one prefill, then 1 token/step."""
    logits, cache = apply(params, tokens[:, :prefill_len], cache, jnp.int32(0))
    steps = [np.asarray(logits)]
    for t in range(prefill_len, tokens.shape[1]):
        logits, cache = apply(params, tokens[:, t:t + 1], cache, jnp.int32(t))
        steps.append(np.asarray(logits))
    return np.concatenate(steps, axis=1)


def sampler_forward(params, cfg, tokens, caches, index):
    """The one cached forward pass (per-layer caches built from the model's blocks) -> (logits, caches)."""
    params = decode.layer_params(params, cfg)
    hidden, caches = decode.decode_forward(params, cfg, tokens, caches, index)
    return decode.project_logits(params, hidden), caches


@pytest.mark.parametrize("n_kv_heads,scan,per_row_index,dtype", [
    pytest.param(4, False, True, "float32", id="mha-unrolled"),
    pytest.param(2, True, False, "float32", id="gqa-scan"),
    pytest.param(2, False, False, "bfloat16", id="gqa-bf16"),
    pytest.param(2, True, True, "float32", id="gqa-scan-model", marks=pytest.mark.slow),
    pytest.param(4, True, True, "float32", id="mha-scan", marks=pytest.mark.slow),
    pytest.param(2, False, True, "float32", id="gqa-unrolled", marks=pytest.mark.slow),
])
def test_cached_decoding_matches_full_forward(n_kv_heads, scan, per_row_index, dtype):
    """Prefill + single-token steps with a KV cache (decode.decode_forward, the only cached path) give the full
    forward pass's logits: with a scalar cache index (batch decoding) and (per_row_index) with one index per row
    (decode slots); in bfloat16 (the GPU dtype: cache and compute) within a few bfloat16 roundings."""
    cfg = CFG.replace(n_kv_heads=n_kv_heads, scan_layers=scan, dtype=dtype)
    params = init_params(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12)))
    expected = full_logits(params, cfg, tokens)
    scale = 1e-5 if dtype == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa (2^-8 ~ 4e-3)
    tolerance = dict(rtol=scale, atol=scale * np.abs(expected).max())
    ours = jax.jit(functools.partial(sampler_forward, cfg=cfg))
    np.testing.assert_allclose(prefill_then_steps(
        lambda p, x, c, i: ours(p, tokens=x, caches=c, index=i), params, tokens, decode.init_layer_caches(cfg, 2, 16)),
        expected, **tolerance)
    if per_row_index:  # the same index in a [B] array: the per-row cache write and attention mask of decode slots
        per_row = lambda p, x, c, i: ours(p, tokens=x, caches=c, index=jnp.full((x.shape[0],), i))
        np.testing.assert_allclose(prefill_then_steps(per_row, params, tokens, decode.init_layer_caches(cfg, 2, 16)),
                                   expected, **tolerance)


def test_kv_cache_shardings_follow_logical_rules():
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = decode.kv_cache_shardings(mesh, CFG.n_layers)
    assert len(shardings) == CFG.n_layers
    # k [B, K, H, S], v [B, K, S, H]: batch over the data axes, KV heads over tensor
    assert shardings[0]["k"].spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)
    assert shardings[0]["v"].spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)


# ----------------------------------------------------------------------------------------------------------------------
# Greedy parity with HF transformers


def test_greedy_matches_hf_generate():
    hf_reference = pytest.importorskip("helpers.hf_reference", reason="torch/transformers not installed")
    torch = hf_reference.torch
    model = hf_reference.hf_model(CFG, seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharpen the logits so that float32 reduction order cannot flip an argmax
    params = jax.tree.map(jnp.asarray, hf_reference.params_from_hf(model, CFG))
    rng = np.random.default_rng(5)
    prompts = [[1] + rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (2, 9, 5, 3)]
    max_gen_len = GEN_LEN
    ours = gen.generate(params, CFG, prompts, max_gen_len=max_gen_len, temperature=0.0, eos_id=2)
    for prompt, row in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_gen_len, do_sample=False,
                                 eos_token_id=2, pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs
        assert row == theirs


# ----------------------------------------------------------------------------------------------------------------------
# Token choice


def meta_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Meta's sample_top_p (llama/generation.py) as a distribution over the vocabulary (float64, numpy)."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    kept = np.where(np.cumsum(sorted_probs) - sorted_probs > p, 0.0, sorted_probs)
    out = np.zeros_like(probs)
    out[order] = kept / kept.sum()
    return out


def draw(logits, temperature, top_p, n=20000, seed=0) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    one = lambda key: sampling.choose_next(key, jnp.asarray(logits)[None], temperature, top_p)[0]
    return np.asarray(jax.jit(jax.vmap(one))(keys))


LOGITS = np.array([2.0, 0.5, 1.5, -1.0, 1.0, 0.0, 2.2, -3.0], np.float32)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.8), (0.7, 0.9), (1.3, 0.5)])
def test_top_p_distribution_matches_meta(temperature, top_p):
    probs = np.exp(LOGITS.astype(np.float64) / temperature)
    expected = meta_top_p(probs / probs.sum(), top_p)
    samples = draw(LOGITS, temperature, top_p)
    empirical = np.bincount(samples, minlength=len(LOGITS)) / len(samples)
    assert np.abs(empirical - expected).max() < 0.01
    assert np.all(empirical[expected == 0] == 0), "a token outside the nucleus was drawn"
    assert (expected == 0).any() and (expected > 0).sum() >= 2  # the cases are not degenerate


def test_top_token_always_kept():
    assert np.all(draw(LOGITS, 1.0, 1e-6, n=2000) == np.argmax(LOGITS))
    assert np.all(draw(LOGITS, 1.0, 0.0, n=2000) == np.argmax(LOGITS))


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(3), (5, 1000))
    chosen = sampling.choose_next(jax.random.PRNGKey(0), logits, 0.0, 0.9)
    np.testing.assert_array_equal(chosen, np.argmax(logits, axis=-1))


# ----------------------------------------------------------------------------------------------------------------------
# The decode loop and Meta's output rules


# Most tests share one shape (batch 4, width 64, GEN_LEN new tokens) and so one compilation.


def run_sample(params, prompts, max_gen_len=GEN_LEN, eos_id=NO_EOS, logprobs=False, temperature=0.0, rng=0):
    return gen.sample_lists(params, CFG, prompts, max_gen_len=max_gen_len, eos_id=eos_id, logprobs=logprobs,
                            temperature=temperature, top_p=0.9, rng=rng)


def test_prompts_kept_and_buffer_filled_to_meta_total_len(params):
    out = run_sample(params, PROMPTS)
    total = max(map(len, PROMPTS)) + GEN_LEN  # Meta's total_len
    assert out["tokens"].shape == (4, 64 + GEN_LEN)
    for row, prompt in zip(out["tokens"], PROMPTS):
        assert row[: len(prompt)].tolist() == prompt
        assert np.all(row[len(prompt): total] >= 0) and np.all(row[total:] == decode.META_PAD_ID)
    np.testing.assert_array_equal(out["lengths"], [GEN_LEN] * 4)
    assert not out["done"].any()


def test_greedy_rows_do_not_depend_on_the_batch(params):
    batch = gen.generate(params, CFG, PROMPTS, max_gen_len=GEN_LEN, temperature=0.0, eos_id=NO_EOS)
    for prompt, row in zip(PROMPTS, batch):  # the same prompt alone (four copies: the same compiled shape)
        assert gen.generate(params, CFG, [prompt] * 4, max_gen_len=GEN_LEN, temperature=0.0, eos_id=NO_EOS)[0] == row


def test_eos_stops_rows_and_exits_early(params):
    free = run_sample(params, PROMPTS)
    eos = int(free["tokens"][0, len(PROMPTS[0]) + 2])  # row 0's third generated token becomes EOS
    out = run_sample(params, PROMPTS, eos_id=eos)
    rows = gen.generate(params, CFG, PROMPTS, max_gen_len=GEN_LEN, temperature=0.0, eos_id=eos)
    assert out["done"][0] and len(rows[0]) <= 2
    for i, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        generated = free["tokens"][i, len(prompt): len(prompt) + GEN_LEN].tolist()
        expected = generated[: generated.index(eos)] if eos in generated else generated
        assert row == expected and out["lengths"][i] == len(expected)
        assert out["done"][i] == (eos in free["tokens"][i, len(prompt): len(PROMPTS[1]) + GEN_LEN])
    # Early exit: four copies of row 0 are all done after three tokens, so nothing past that is written.
    out = run_sample(params, [PROMPTS[0]] * 4, eos_id=eos)
    assert out["done"].all()
    first_eos = len(PROMPTS[0]) + out["lengths"][0]
    assert np.all(out["tokens"][:, first_eos + 1:] == decode.META_PAD_ID)


def test_eos_inside_the_prompt_does_not_stop(params):
    for eos in range(3, CFG.vocab_size):  # an id in the prompt that the continuation never produces
        prompts = [[1, 9, eos, 9]] + PROMPTS[1:]
        free = run_sample(params, prompts)
        if eos not in free["tokens"][0, 4: 4 + GEN_LEN]:
            break
    out = run_sample(params, prompts, eos_id=eos)
    np.testing.assert_array_equal(out["tokens"][0], free["tokens"][0])
    assert not out["done"][0] and out["lengths"][0] == GEN_LEN


def test_postprocess_follows_meta():
    tokens = np.array([[1, 5, 6, 7, 2, 8, -1], [1, 2, 3, 4, 5, 6, 7]])
    logprobs = np.arange(14, dtype=np.float32).reshape(2, 7)
    toks, lps = gen.postprocess(tokens, [2, 3], max_gen_len=3, eos_id=2, echo=False, logprobs=logprobs)
    assert toks == [[6, 7], [4, 5, 6]] and lps == [[2.0, 3.0], [10.0, 11.0, 12.0]]
    toks, lps = gen.postprocess(tokens, [2, 3], max_gen_len=3, eos_id=2, echo=True, logprobs=logprobs)
    assert toks == [[1, 5, 6, 7], [1]] and lps == [[0.0, 1.0, 2.0, 3.0], [7.0]]  # echo: the prompt's EOS cuts too
    assert gen.postprocess(tokens, [2, 3], 3, 2, False)[1] is None


def test_logprobs_match_full_forward(params):
    out = run_sample(params, PROMPTS, logprobs=True, temperature=1.0)
    total = max(map(len, PROMPTS)) + GEN_LEN
    tokens = out["tokens"][:, :total]
    log_probs = jax.nn.log_softmax(full_logits(params, CFG, tokens), axis=-1)
    expected = np.take_along_axis(np.asarray(log_probs[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(out["logprobs"][:, 1:total], expected, rtol=1e-4, atol=1e-4)
    assert np.all(out["logprobs"][:, 0] == 0) and np.all(out["logprobs"][:, total:] == 0)
    toks, lps = gen.generate_with_logprobs(params, CFG, PROMPTS, max_gen_len=GEN_LEN, logprobs=True, echo=True,
                                           temperature=1.0, rng=0, eos_id=NO_EOS)
    assert [len(t) for t in toks] == [len(lp) for lp in lps] == [len(p) + GEN_LEN for p in PROMPTS]
    np.testing.assert_array_equal(toks[1], tokens[1, : len(PROMPTS[1]) + GEN_LEN])
    np.testing.assert_allclose(lps[1], out["logprobs"][1, : len(PROMPTS[1]) + GEN_LEN])


def test_chunked_decoding_matches_one_call(params):
    """Streaming (decode_steps in chunks of 3, state carried) draws exactly the tokens of one sample() call."""
    one = run_sample(params, PROMPTS, temperature=1.0, rng=7)
    tokens, lens = gen.pad_prompts(PROMPTS, decode.META_PAD_ID, CFG.max_seq_len)
    state = decode.init_decode_jit(params, CFG, jnp.asarray(tokens), jnp.asarray(lens), jax.random.PRNGKey(7),
                                   max_gen_len=GEN_LEN, temperature=1.0, top_p=0.9, eos_id=NO_EOS)
    while int(state.pos) < int(state.end):
        before = int(state.pos)
        state = decode.decode_steps_jit(params, CFG, state, max_steps=3)
        assert int(state.pos) - before <= 3
    np.testing.assert_array_equal(state.tokens, one["tokens"])


def test_cache_prefix_segments_match_one_loop(params, monkeypatch):
    """Decoding in loops over growing cache prefixes (12, 20, 40, 74 slots here; this shape otherwise runs one loop
    over all 74) draws the same tokens with the same log-probabilities."""
    one = run_sample(params, PROMPTS, logprobs=True, temperature=1.0, rng=3)
    monkeypatch.setattr(decode, "SEGMENT_ROUND", 4)
    assert decode.cache_segments(74) == [12, 20, 40, 74]
    segmented = jax.jit(lambda p, t, n, r: decode.sample(p, CFG, t, n, r, max_gen_len=GEN_LEN, temperature=1.0,
                                                         top_p=0.9, eos_id=NO_EOS, logprobs=True))
    tokens, lens = gen.pad_prompts(PROMPTS, decode.META_PAD_ID, CFG.max_seq_len)
    out = segmented(params, jnp.asarray(tokens), jnp.asarray(lens), jax.random.PRNGKey(3))
    np.testing.assert_array_equal(out["tokens"], one["tokens"])
    np.testing.assert_allclose(out["logprobs"], one["logprobs"], rtol=1e-5, atol=1e-5)


def while_bodies(hlo_text: str) -> list[str]:
    """The text of every computation used as a while-loop body in an optimized HLO module."""
    bodies = []
    for name in set(re.findall(r"body=(%[\w.\-]+)", hlo_text)):
        start = hlo_text.index("\n" + name + " ")
        bodies.append(hlo_text[start:hlo_text.index("\n}", start)])
    return bodies


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's copy insertion")
def test_decode_loop_updates_the_kv_cache_in_place(params):
    """No copy of a cache-sized buffer inside the compiled decode loops. Each such copy costs a full pass over a
    layer's cache per step; they came back whenever attention read the cache after the step's write or the jit
    lacked DECODE_COMPILER_OPTIONS (benchmarks/RESULTS.md, session 3)."""
    tokens, lens = gen.pad_prompts(PROMPTS, decode.META_PAD_ID, CFG.max_seq_len)
    hlo = decode.sample_jit.lower(params, CFG, jnp.asarray(tokens), jnp.asarray(lens), jax.random.PRNGKey(0),
                                  max_gen_len=GEN_LEN, temperature=0.0, top_p=0.9, eos_id=NO_EOS).compile().as_text()
    size = min(CFG.max_seq_len, tokens.shape[1] + GEN_LEN)  # the buffer length S (decode.init_decode)
    smallest_cache = len(PROMPTS) * CFG.n_kv_heads * CFG.head_dim * min(decode.cache_segments(size))
    bodies = [body for body in while_bodies(hlo) if "dynamic-update-slice" in body]
    assert bodies, "no decode loop found in the compiled sample"
    for body in bodies:
        copied = [math.prod(int(d) for d in dims.split(","))
                  for dims in re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(", body)]
        assert all(size < smallest_cache for size in copied), copied


def test_sampling_differs_by_seed_and_repeats_by_seed(params):
    a, b, c = (run_sample(params, PROMPTS, temperature=1.0, rng=r)["tokens"] for r in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------------------------------------
# Sharded


def mesh_and_shardings():
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    boxed = Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return mesh, sh.tree_shardings(boxed, mesh)


def test_sample_inside_jit_on_a_sharded_mesh(params):
    mesh, shardings = mesh_and_shardings()
    tokens, lens = gen.pad_prompts(PROMPTS, decode.META_PAD_ID, CFG.max_seq_len)

    @jax.jit
    def step(p, tokens, lens, rng):  # e.g. inside a PPO step
        return decode.sample(p, CFG, tokens, lens, rng, max_gen_len=GEN_LEN, temperature=1.0, top_p=0.9,
                             eos_id=NO_EOS, mesh=mesh)

    batch = jax.device_put(jnp.asarray(tokens), sh.batch_sharding(mesh))
    out = step(jax.device_put(params, shardings), batch, jnp.asarray(lens), jax.random.PRNGKey(2))
    ref = run_sample(params, PROMPTS, temperature=1.0, rng=2)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    assert out["tokens"].sharding.is_equivalent_to(sh.batch_sharding(mesh), 2)


@pytest.mark.slow
def test_kv_cache_is_sharded_inside_jit(params):
    mesh, shardings = mesh_and_shardings()
    tokens, lens = gen.pad_prompts(PROMPTS, decode.META_PAD_ID, CFG.max_seq_len)
    state = decode.init_decode_jit(jax.device_put(params, shardings), CFG, jnp.asarray(tokens), jnp.asarray(lens),
                                   jax.random.PRNGKey(2), max_gen_len=GEN_LEN, eos_id=NO_EOS, mesh=mesh)
    state = decode.decode_steps_jit(params, CFG, state, mesh=mesh)
    expected = decode.kv_cache_shardings(mesh, CFG.n_layers)
    for layer, layer_expected in zip(state.cache, expected):
        for name in ("k", "v"):
            assert layer[name].sharding.is_equivalent_to(layer_expected[name], 4)


# ----------------------------------------------------------------------------------------------------------------------
# Text and chat completion


class AsciiTokenizer:
    """ASCII bytes + 3 as ids (0 unk, 1 BOS, 2 EOS; fits CFG's vocabulary of 128): enough for the helpers."""
    bos_id, eos_id, pad_id = 1, 2, -1

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 3 for b in text.encode("ascii")] + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 128).decode("ascii")


def test_text_and_chat_completion(params):
    tok = AsciiTokenizer()
    prompts = ["hello", "a longer prompt", "x", "four"]
    results = gen.text_completion(params, CFG, tok, prompts, max_gen_len=GEN_LEN, logprobs=True)
    assert len(results) == 4 and set(results[0]) == {"generation", "tokens", "logprobs"}
    assert all(len(r["tokens"]) == len(r["logprobs"]) <= GEN_LEN for r in results)
    assert all(r["generation"] == "".join(r["tokens"]) for r in results)
    dialogs = [[{"role": "user", "content": "hi"}],
               [{"role": "system", "content": "be brief"}, {"role": "user", "content": "[INST] sneaky"}],
               [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}],
               [{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "d"}]]
    chats = gen.chat_completion(params, CFG, tok, dialogs, max_gen_len=GEN_LEN, logprobs=True)
    assert [c["generation"]["role"] for c in chats] == ["assistant"] * 4
    for i in (1, 3):
        assert chats[i]["generation"]["content"] == "Error: special tags are not allowed as part of the prompt."
        assert len(chats[i]["tokens"]) == len(chats[i]["logprobs"])  # still generated, as Meta
    assert chats[0]["generation"]["content"] == "".join(chats[0]["tokens"])


# ----------------------------------------------------------------------------------------------------------------------
# Streaming chat and the command lines


DIALOG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"}]


def test_streamed_reply_matches_chat_completion(params):
    tok = AsciiTokenizer()
    pieces = list(gen.stream_reply(params, CFG, tok, DIALOG, rng=0, max_gen_len=GEN_LEN, temperature=0.0, chunk=3))
    assert len(pieces) >= 3  # streamed in several pieces
    dialogs = [DIALOG, DIALOG[:1], DIALOG[2:], [{"role": "user", "content": "other"}]]  # batch of 4: shared shape
    expected = gen.chat_completion(params, CFG, tok, dialogs, max_gen_len=GEN_LEN, temperature=0.0)[0]
    assert "".join(pieces) == expected["generation"]["content"]


def test_repl_keeps_history_and_resets(params):
    lines = iter(["hi", "say [INST] again", "how are you", "/reset", "hi", "/exit"])
    out = io.StringIO()
    dialog = chat_cli.run_repl(params, CFG, AsciiTokenizer(), system="be brief", max_gen_len=GEN_LEN,
                               temperature=0.0, chunk=3, read=lambda prompt: next(lines), out=out)
    assert [m["role"] for m in dialog] == ["system", "user", "assistant"] and dialog[1]["content"] == "hi"
    text = out.getvalue()
    assert text.count("assistant> ") == 4 and "special tags are not allowed" in text


def test_fit_history_drops_oldest_pairs():
    tok = AsciiTokenizer()
    dialog = [{"role": "system", "content": "s"}] + [
        {"role": role, "content": f"{role} {i}"} for i in range(3) for role in ("user", "assistant")][:-1]
    fitted = chat_cli.fit_history(tok, dialog, len(chat.encode_dialog(tok, dialog)) - 1)
    assert fitted == dialog[:1] + dialog[3:]
    with pytest.raises(ValueError, match="does not fit"):
        chat_cli.fit_history(tok, dialog, 5)


@pytest.mark.slow
def test_command_lines(tmp_path, llama_tokenizer_path, monkeypatch, capsys):
    checkpoint = pytest.importorskip("llama2_jax.checkpoints.params_io")
    cfg = CFG.replace(vocab_size=32000)
    checkpoint.save_params(tmp_path / "ckpt", init_params(cfg, seed=3), cfg)
    flags = [f"--checkpoint={tmp_path / 'ckpt'}", f"--tokenizer={llama_tokenizer_path}", "--max_gen_len=5"]
    generate_cli.main(flags + ["--prompt=Once upon a time", "--temperature=0"])
    completion = capsys.readouterr().out
    generate_cli.main(flags + ["--prompt=Once upon a time", "--temperature=0", "--echo"])
    echoed = capsys.readouterr().out
    assert echoed.startswith("Once upon a time") and not completion.startswith("Once upon a time")
    assert completion.strip() and completion.strip() in echoed  # the same greedy completion, prompt in front
    lines = iter(["Hello there", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    chat_cli.main(flags + ["--system=be brief", "--top_p=0.5"])
    assert "assistant> " in capsys.readouterr().out
