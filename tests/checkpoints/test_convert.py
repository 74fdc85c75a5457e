"""Weight conversion: HF <-> jax <-> Meta, checked against HF transformers (torch) and a Meta-form numpy forward.

The Meta shards and the Meta-form reference forward are written here straight from the spec (section A), not with
convert.py's helpers, so a wrong RoPE permutation or shard rule cannot cancel out.

Covers llama2_jax.cli.convert."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="conversion parity tests need PyTorch")
transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")

from llama2_jax.checkpoints import convert as cv  # noqa: E402
from llama2_jax.checkpoints.params_io import load_params  # noqa: E402
from llama2_jax.cli import convert as convert_cli  # noqa: E402
from llama2_jax.model.config import LlamaConfig, get_config  # noqa: E402
from llama2_jax.model.llama import Llama  # noqa: E402

TOKENS = np.array([[1, 5, 17, 99, 3, 42, 7, 127, 64, 2, 11, 0]], np.int32)


def _our_logits(params, cfg: LlamaConfig) -> np.ndarray:
    return np.asarray(Llama(cfg.replace(dtype="float32")).apply({"params": params}, TOKENS))


def _assert_close(actual, expected):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-4 * scale, np.abs(actual - expected).max() / scale


# ------------------------------------------------------------------------------------------------------------ HF


def _hf_model(n_kv_heads: int):
    torch.manual_seed(n_kv_heads)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=n_kv_heads,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=20000.0,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than HF's init, random norm gains: mapping errors show in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def hf_dir(request, tmp_path_factory):
    """(folder with a saved tiny LlamaForCausalLM, its HF logits on TOKENS, its state dict)."""
    model = _hf_model(request.param)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    return path, logits, {k: v.clone() for k, v in model.state_dict().items()}


def test_hf_to_jax_logits_match_hf(hf_dir, tmp_path):
    src, hf_logits, _ = hf_dir
    cv.convert("hf", "jax", src, tmp_path / "jax")
    params, cfg = load_params(tmp_path / "jax")
    assert cfg.rope_theta == 20000.0 and cfg.hidden_dim == 160 and cfg.param_dtype == "float32"
    _assert_close(_our_logits(params, cfg), hf_logits)


def test_hf_jax_hf_roundtrip_is_bitwise_and_loads(hf_dir, tmp_path):
    src, hf_logits, state = hf_dir
    cv.convert("hf", "jax", src, tmp_path / "jax")
    cv.convert("jax", "hf", tmp_path / "jax", tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    reloaded = model.state_dict()
    assert set(reloaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(reloaded[name], tensor), name
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy(), hf_logits)


def test_hf_sharded_and_bin_inputs_equal_single_file(hf_dir, tmp_path):
    src, _, state = hf_dir
    reference, _ = cv.load_hf(src)
    model = transformers.LlamaForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((src / "config.json").read_text())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        params, _ = cv.load_hf(tmp_path / folder)
        jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_dtype_cast_to_bfloat16(hf_dir, tmp_path):
    src, _, state = hf_dir
    cv.convert("hf", "jax", src, tmp_path / "jax", dtype="bfloat16")
    params, cfg = load_params(tmp_path / "jax")
    assert cfg.param_dtype == "bfloat16" and params["output"].dtype.name == "bfloat16"
    cv.convert("jax", "hf", tmp_path / "jax", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    w = model.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(w, state["model.layers.1.self_attn.k_proj.weight"].to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------- Meta

META_CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=32, max_seq_len=64)
# Spec A: how each Meta tensor is split over model-parallel shards (None = replicated).
_SPLIT_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}


def _meta_weights(cfg: LlamaConfig, seed: int = 0) -> dict:
    """A full Meta-form model: {Meta name: float32 [out, in]} (rows of wq/wk in the interleaved rotary form)."""
    rng = np.random.default_rng(seed)
    d, f, h = cfg.dim, cfg.hidden_dim, cfg.head_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.attention.wq.weight": (cfg.n_heads * h, d),
                       f"layers.{i}.attention.wk.weight": (cfg.n_kv_heads * h, d),
                       f"layers.{i}.attention.wv.weight": (cfg.n_kv_heads * h, d),
                       f"layers.{i}.attention.wo.weight": (d, cfg.n_heads * h),
                       f"layers.{i}.feed_forward.w1.weight": (f, d), f"layers.{i}.feed_forward.w3.weight": (f, d),
                       f"layers.{i}.feed_forward.w2.weight": (d, f),
                       f"layers.{i}.attention_norm.weight": (d,), f"layers.{i}.ffn_norm.weight": (d,)})
    return {name: ((1 + 0.1 * rng.standard_normal(s)) if len(s) == 1 else 0.1 * rng.standard_normal(s))
            .astype(np.float32) for name, s in shapes.items()}


def _split_dim(name: str):
    parts = name.split(".")
    return _SPLIT_DIM.get(parts[-2] if parts[-2] in _SPLIT_DIM else parts[0])


def _write_meta(path, weights: dict, cfg: LlamaConfig, num_shards: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        shard = {"rope.freqs": torch.ones(cfg.head_dim // 2)}  # present in some Meta files; ignored on import
        for name, w in weights.items():
            dim = _split_dim(name)
            piece = w if dim is None else np.split(w, num_shards, axis=dim)[s]
            shard[name] = torch.from_numpy(np.ascontiguousarray(piece))
        torch.save(shard, path / f"consolidated.{s:02d}.pth")
    # vocab_size -1 as in Meta's released params.json (the tokenizer decides); no rope_theta (Meta's default).
    params = {"dim": cfg.dim, "multiple_of": cfg.multiple_of, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "n_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "vocab_size": -1}
    (path / "params.json").write_text(json.dumps(params))


def _expected_params(weights: dict, cfg: LlamaConfig) -> dict:
    """Our params from Meta weights, with the rotary reordering done by explicit row indices (evens, then odds)."""
    h, d = cfg.head_dim, cfg.dim
    order = np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])

    def half_split(w, n):  # [n*H, D] interleaved -> [D, n, H] half-split
        return w.reshape(n, h, d)[:, order, :].transpose(2, 0, 1)

    params = {"tok_embeddings": {"embedding": weights["tok_embeddings.weight"]},
              "norm": {"scale": weights["norm.weight"]}, "output": weights["output.weight"].T}
    for i in range(cfg.n_layers):
        w = lambda name: weights[f"layers.{i}.{name}.weight"]
        params[f"layers_{i}"] = {
            "attention": {"wq": half_split(w("attention.wq"), cfg.n_heads),
                          "wk": half_split(w("attention.wk"), cfg.n_kv_heads),
                          "wv": w("attention.wv").T.reshape(d, cfg.n_kv_heads, h),
                          "wo": w("attention.wo").T.reshape(cfg.n_heads, h, d)},
            "feed_forward": {"w1": w("feed_forward.w1").T, "w3": w("feed_forward.w3").T,
                             "w2": w("feed_forward.w2").T},
            "attention_norm": {"scale": w("attention_norm")}, "ffn_norm": {"scale": w("ffn_norm")}}
    return params


def _meta_reference_logits(weights: dict, cfg: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """Meta's forward (llama/model.py) in float64 numpy: interleaved-pair RoPE as complex phasors, GQA repeat-interleave."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = tokens.shape[0]
    freqs = cfg.rope_theta ** (-np.arange(0, h, 2) / h)
    phasor = np.exp(1j * np.outer(np.arange(t), freqs))[:, None, :]  # [T, 1, H/2]

    def rope(x):  # [T, n, H]: pairs (2i, 2i+1) are complex numbers
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * phasor
        return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * g

    mask = np.triu(np.full((t, t), -np.inf), 1)
    x = w["tok_embeddings.weight"][tokens]
    for i in range(cfg.n_layers):
        lw = lambda name: w[f"layers.{i}.{name}.weight"]
        a = rms(x, lw("attention_norm"))
        q = rope((a @ lw("attention.wq").T).reshape(t, n, h))
        kk = np.repeat(rope((a @ lw("attention.wk").T).reshape(t, k, h)), n // k, axis=1)
        v = np.repeat((a @ lw("attention.wv").T).reshape(t, k, h), n // k, axis=1)
        scores = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(h) + mask
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("nts,snh->tnh", p, v).reshape(t, n * h) @ lw("attention.wo").T
        b = rms(x, lw("ffn_norm"))
        gate = b @ lw("feed_forward.w1").T
        x = x + ((gate / (1 + np.exp(-gate))) * (b @ lw("feed_forward.w3").T)) @ lw("feed_forward.w2").T
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_meta_import_matches_expected_params_and_meta_forward(num_shards, tmp_path):
    weights = _meta_weights(META_CFG)
    _write_meta(tmp_path / "meta", weights, META_CFG, num_shards)
    params, cfg = cv.load_meta(tmp_path / "meta")
    assert cfg.replace(param_dtype="float32") == META_CFG.replace(max_seq_len=cfg.max_seq_len)
    jax.tree.map(np.testing.assert_array_equal, params, _expected_params(weights, META_CFG))
    reference = _meta_reference_logits(weights, META_CFG, TOKENS[0])
    _assert_close(_our_logits(params, cfg)[0], reference)


def test_jax_meta_jax_roundtrip_is_bitwise(tmp_path):
    weights = _meta_weights(META_CFG, seed=1)
    _write_meta(tmp_path / "meta", weights, META_CFG, 2)
    cv.convert("meta", "jax", tmp_path / "meta", tmp_path / "jax")
    cv.convert("jax", "meta", tmp_path / "jax", tmp_path / "meta2", num_shards=2)
    for s in range(2):  # the exported shards equal the synthesised ones
        ours = torch.load(tmp_path / "meta2" / f"consolidated.{s:02d}.pth", weights_only=True)
        theirs = torch.load(tmp_path / "meta" / f"consolidated.{s:02d}.pth", weights_only=True)
        assert set(ours) == set(theirs) - {"rope.freqs"}
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), name
    cv.convert("meta", "jax", tmp_path / "meta2", tmp_path / "jax2")
    first, cfg1 = load_params(tmp_path / "jax")
    second, cfg2 = load_params(tmp_path / "jax2")
    assert cfg1 == cfg2
    jax.tree.map(np.testing.assert_array_equal, first, second)


def test_hf_to_meta_keeps_ffn_width_and_logits(hf_dir, tmp_path):
    src, hf_logits, _ = hf_dir  # intermediate_size 160 is not Meta's rule for dim 64: params.json must encode it
    cv.convert("hf", "meta", src, tmp_path / "meta")
    params, cfg = cv.load_meta(tmp_path / "meta")
    assert cfg.hidden_dim == 160
    _assert_close(_our_logits(params, cfg.replace(max_seq_len=64)), hf_logits)


def test_permutation_helpers_are_inverse():
    w = np.arange(4 * 8 * 3).reshape(32, 3)
    p = cv.permute_meta_to_hf(w, n_heads=4)
    np.testing.assert_array_equal(p[:8, 0], w[[0, 2, 4, 6, 1, 3, 5, 7], 0])
    np.testing.assert_array_equal(cv.permute_hf_to_meta(p, n_heads=4), w)


def test_default_num_shards_by_size():
    assert [cv.default_num_shards(get_config(n)) for n in ("7b", "13b", "34b", "70b", "tiny")] == [1, 2, 4, 8, 1]


# -------------------------------------------------------------------------------------------------------- errors


def test_error_folder_is_neither_format(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not an HF checkpoint: expected config.json"):
        cv.load_hf(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a Meta checkpoint: expected params.json"):
        cv.load_meta(tmp_path / "x")
    with pytest.raises(ValueError, match="neither a converted checkpoint"):
        load_params(tmp_path / "x")


def test_error_missing_meta_shards(tmp_path):
    _write_meta(tmp_path / "m", _meta_weights(META_CFG), META_CFG, 4)
    (tmp_path / "m" / "consolidated.03.pth").unlink()  # a trailing shard: found through the shapes
    with pytest.raises(FileNotFoundError, match=r"missing consolidated\.03\.pth"):
        cv.load_meta(tmp_path / "m")
    (tmp_path / "m" / "consolidated.01.pth").unlink()  # a gap
    with pytest.raises(FileNotFoundError, match=r"missing Meta shard\(s\) consolidated\.01\.pth"):
        cv.load_meta(tmp_path / "m")


def test_error_missing_hf_shard(hf_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir[0])
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        cv.load_hf(tmp_path)


def _edit_config(src, dst, **changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"intermediate_size": 96}, r"model\.layers\.0\.mlp\.gate_proj\.weight .* has shape \(160, 64\), expected "
                                r"\(96, 64\)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "unsupported rope scaling 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "unsupported rope scaling 'yarn'"),
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
])
def test_error_bad_hf_config(hf_dir, tmp_path, changes, message):
    _edit_config(hf_dir[0], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message):
        cv.load_hf(tmp_path / "bad")


def test_error_meta_shape_mismatch(tmp_path):
    _write_meta(tmp_path / "m", _meta_weights(META_CFG), META_CFG, 1)
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    (tmp_path / "m" / "params.json").write_text(json.dumps(dict(params, multiple_of=256)))
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w1\.weight\) has shape \(192, 64\), expected "
                                         r"\(256, 64\)"):
        cv.load_meta(tmp_path / "m")


def test_error_unsplittable_and_existing_dst(tmp_path):
    _write_meta(tmp_path / "m", _meta_weights(META_CFG), META_CFG, 1)
    params, cfg = cv.load_meta(tmp_path / "m")
    with pytest.raises(ValueError, match="cannot split into 3 Meta shards: n_heads=8, n_kv_heads=4"):
        cv.save_meta(tmp_path / "out", params, cfg, num_shards=3)
    with pytest.raises(FileExistsError, match="not empty"):
        cv.convert("meta", "jax", tmp_path / "m", tmp_path / "m")


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["--help"])
    assert exit_info.value.code == 0 and "--num_shards" in capsys.readouterr().out
    _write_meta(tmp_path / "m", _meta_weights(META_CFG), META_CFG, 2)
    assert convert_cli.main(["--from=meta", "--to=hf", f"--src={tmp_path / 'm'}", f"--dst={tmp_path / 'hf'}"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert convert_cli.main(["--from=hf", "--to=jax", f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'j'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
