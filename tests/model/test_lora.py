"""LoRA (llama2_jax/model/lora.py): zero-B identity, gradients reach only the adapters, unmerged == merged == HF + PEFT,
sharding under scan, adapter checkpoints apart from their base, and `convert --merge_lora` / `--to=peft`.

Covers llama2_jax.checkpoints.peft."""

import functools
import json
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from llama2_jax.checkpoints import convert
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.checkpoints import peft as convert_peft
from llama2_jax.cli import convert as convert_cli
from llama2_jax.model import lora
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, abstract_params, stack_layers
from llama2_jax.training import losses

CFG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64,
                  dtype="float32", param_dtype="float32")
LORA_CFG = lora.LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 16)).astype(np.int32)


def _base(cfg=CFG, seed=0):
    """Random base params (numpy, in cfg.param_dtype): weights N(0, 0.05^2), norm gains 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(abstract_params(cfg))
    values = {path: (1 + 0.1 * rng.standard_normal(leaf.shape) if path[-1] == "scale"
                     else 0.05 * rng.standard_normal(leaf.shape)).astype(jnp.dtype(cfg.param_dtype))
              for path, leaf in flat.items()}
    return flax.traverse_util.unflatten_dict(values)


@functools.partial(jax.jit, static_argnums=0)
def _plain(cfg, params, tokens=TOKENS):
    return Llama(cfg).apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _adapted(cfg, base, trainable, lora_cfg=LORA_CFG, tokens=TOKENS, rng=None):
    return lora.apply(lora.adapted_model(Llama(cfg), lora_cfg), base, trainable, lora_cfg, tokens, rng=rng)


def _batch(tokens=TOKENS):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return {"inputs": inputs, "targets": targets, "positions": np.broadcast_to(np.arange(inputs.shape[1]),
                                                                               inputs.shape).astype(np.int32),
            "segment_ids": np.ones_like(inputs), "loss_mask": np.ones(inputs.shape, np.float32)}


def _assert_close(actual, expected, rel=1e-4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.abs(actual - expected).max()
    assert err <= rel * np.abs(expected).max(), (err, np.abs(expected).max())


@pytest.fixture(scope="module")
def trained():
    """Base, adapters after 3 AdamW steps on the next-token loss (grad w.r.t. the adapters only), and evidence."""
    base = _base()
    base_copy = jax.tree.map(np.copy, base)
    trainable = {"lora": lora.init(jax.random.PRNGKey(1), base, CFG, LORA_CFG)}
    loss_fn = lora.adapted_loss(losses.next_token_loss, Llama(CFG), LORA_CFG)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen, batch):
        grads = jax.grad(lambda t: loss_fn(t, batch, frozen)[0])(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, grads

    first_grads = None
    for _ in range(3):
        trainable, opt_state, grads = step(trainable, opt_state, base, _batch())
        first_grads = grads if first_grads is None else first_grads
    return {"base": base, "base_copy": base_copy, "adapters": jax.tree.map(np.asarray, trainable["lora"]),
            "opt_state": opt_state, "first_grads": first_grads}


# ------------------------------------------------------------------------------------------------ the forward


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "minimal")])
def test_zero_b_logits_equal_base_exactly(scan, remat):
    cfg = CFG.replace(scan_layers=scan, remat_policy=remat, param_dtype="bfloat16")  # base in its own dtype
    base = _base(cfg)
    adapters = lora.init(jax.random.PRNGKey(1), base, cfg, LORA_CFG)
    assert all(np.all(np.asarray(pair["b"]) == 0) for *_, pair in lora._walk_adapters(adapters))
    assert np.any(np.asarray(jax.tree.leaves(adapters)[0]) != 0)  # a is random
    plain = _plain(cfg, base)
    adapted = _adapted(cfg, base, {"lora": adapters})
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))


def test_adapter_shapes_and_count():
    base = _base()
    adapters = lora.init(jax.random.PRNGKey(1), base, CFG, LORA_CFG)
    d, f, r, kh = CFG.dim, CFG.hidden_dim, LORA_CFG.rank, CFG.n_kv_heads * CFG.head_dim
    block = adapters["layers_0"]
    assert block["attention"]["wq"]["a"].shape == (d, r)
    assert block["attention"]["wq"]["b"].shape == (r, CFG.n_heads, CFG.head_dim)
    assert block["attention"]["wo"]["a"].shape == (CFG.n_heads, CFG.head_dim, r)
    assert block["feed_forward"]["w2"]["a"].shape == (f, r)
    per_layer = r * ((d + d) * 2 + (d + kh) * 2 + (d + f) * 3)  # wq, wo; wk, wv; w1, w3, w2
    assert lora.count(adapters) == CFG.n_layers * per_layer
    line = lora.describe({"lora": adapters}, base)
    assert f"{CFG.n_layers * per_layer:,}" in line and f"{CFG.param_count() + CFG.n_layers * per_layer:,}" in line
    only_q = lora.init(jax.random.PRNGKey(1), base, CFG, lora.LoraConfig(rank=2, targets="wq,w2"))
    assert lora.targets_present(only_q) == ("wq", "w2")


def test_dropout_only_with_an_rng():
    base = _base()
    lc = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    adapters = lora.init(jax.random.PRNGKey(1), base, CFG, lc)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero b so that the adapter path matters
    run = lambda rng: np.asarray(_adapted(CFG, base, {"lora": adapters}, lc, rng=rng))  # noqa: E731
    deterministic = run(None)
    no_dropout = lora.LoraConfig(rank=4, alpha=8.0)
    np.testing.assert_array_equal(deterministic, _adapted(CFG, base, {"lora": adapters}, no_dropout))
    dropped = run(jax.random.PRNGKey(3))
    assert np.abs(dropped - deterministic).max() > 1e-3
    np.testing.assert_array_equal(dropped, run(jax.random.PRNGKey(3)))


# ---------------------------------------------------------------------------------------- gradients / optimizer


def test_gradients_reach_only_adapters(trained):
    grads = trained["first_grads"]
    assert set(grads) == {"lora"}
    assert jax.tree.structure(grads["lora"]) == jax.tree.structure(trained["adapters"])
    b_grads = [np.abs(np.asarray(pair["b"])).max() for *_, pair in lora._walk_adapters(grads["lora"])]
    assert min(b_grads) > 0  # with b = 0 only b gets a gradient at the first step (a's is b-weighted: zero)
    # the base is bitwise unchanged after the steps
    for now, before in zip(jax.tree.leaves(trained["base"]), jax.tree.leaves(trained["base_copy"])):
        np.testing.assert_array_equal(now, before)
    # the optimizer state holds the adapters' shapes only (Adam's mu and nu), nothing of the base
    state_shapes = sorted(np.shape(x) for x in jax.tree.leaves(trained["opt_state"]) if np.ndim(x) > 0)
    adapter_shapes = sorted(np.shape(x) for x in jax.tree.leaves(trained["adapters"]))
    assert state_shapes == sorted(adapter_shapes * 2)
    assert any(np.abs(np.asarray(pair["b"])).max() > 0 for *_, pair in lora._walk_adapters(trained["adapters"]))


def test_reward_model_head_trains_with_adapters():
    """Top-level entries next to "lora" replace the base's (a reward model's score head is trained)."""
    base = _base()
    head = {"output": base["output"] * 0 + 0.01}
    frozen = {k: v for k, v in base.items()}
    trainable = {"lora": lora.init(jax.random.PRNGKey(1), base, CFG, LORA_CFG), **head}
    out = _adapted(CFG, frozen, trainable)
    expected = _plain(CFG, {**base, **head})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    with pytest.raises(ValueError, match="replace nothing"):
        lora.variables(frozen, {**trainable, "score_head": {}}, LORA_CFG)


# --------------------------------------------------------------------------------------------------- parity


def test_unmerged_equals_merged(trained):
    base, adapters = trained["base"], trained["adapters"]
    unmerged = _adapted(CFG, base, {"lora": adapters})
    merged = _plain(CFG, lora.merge(base, adapters, LORA_CFG))
    assert np.abs(np.asarray(unmerged) - _plain(CFG, base)).max() > 1e-3  # trained
    _assert_close(unmerged, merged)
    scan = CFG.replace(scan_layers=True, remat_policy="dots")
    stacked = lora.to_layout(adapters, CFG.n_layers, scanned=True)
    assert stacked["layers"]["attention"]["wq"]["a"].shape == (CFG.n_layers, CFG.dim, LORA_CFG.rank)
    scanned = _adapted(scan, stack_layers(base, CFG.n_layers), {"lora": stacked})
    _assert_close(scanned, merged)
    merged_scanned = lora.merge(stack_layers(base, CFG.n_layers), stacked, LORA_CFG)
    _assert_close(_plain(scan, merged_scanned), merged)


def test_matches_hf_peft(trained, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    hf_reference = pytest.importorskip("helpers.hf_reference")
    hf = hf_reference.hf_model(CFG)
    base = hf_reference.params_from_hf(hf, CFG)  # HF's weights in our layout, mapped independently of convert.py
    adapters = trained["adapters"]
    convert_peft.save_peft(tmp_path / "adapter", adapters, CFG, LORA_CFG)
    plain = hf_reference.hf_logits(hf, TOKENS)  # before PEFT wraps the model's modules in place
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    ours = _adapted(CFG, base, {"lora": adapters})
    assert np.abs(theirs - plain).max() > 1e-3  # the adapter loaded
    _assert_close(ours, theirs)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 7


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.slow  # ~30 s on a loaded 2-core CPU: three compilations on the 8-device mesh
def test_adapters_shard_like_their_kernels_under_scan():
    cfg = CFG.replace(scan_layers=True, remat_policy="minimal")
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    base = _base(cfg)
    boxed = lora.abstract(base, cfg, LORA_CFG, boxed=True)
    shardings = sh.tree_shardings(boxed, mesh)
    wq, wo = shardings["layers"]["attention"]["wq"], shardings["layers"]["attention"]["wo"]
    assert wq["a"].spec == PartitionSpec(None, sh.FSDP, None)  # [L, D, r]: the rank is replicated
    assert wq["b"].spec == PartitionSpec(None, None, sh.TENSOR, None)  # [L, r, N, H]
    assert wo["a"].spec == PartitionSpec(None, sh.TENSOR, None, None)  # [L, N, H, r]
    assert wo["b"].spec == PartitionSpec(None, None, sh.FSDP)  # [L, r, D]
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.PRNGKey(1), base, cfg, LORA_CFG))
    expected = _adapted(cfg, base, {"lora": adapters})
    base_shardings = sh.tree_shardings(abstract_params(cfg, boxed=True), mesh)
    sharded_base = jax.device_put(base, base_shardings)
    sharded_adapters = jax.device_put(adapters, shardings)
    fn = jax.jit(sh.with_activation_sharding(
        lambda b, a, t: lora.apply(Llama(cfg), b, {"lora": a}, LORA_CFG, t), mesh))
    tokens = np.concatenate([TOKENS, TOKENS[::-1]])  # 4 rows: one per data-parallel shard
    out = fn(sharded_base, sharded_adapters, jax.device_put(tokens, sh.batch_sharding(mesh)))
    expected = np.concatenate([expected, expected[::-1]])
    _assert_close(out, expected, rel=1e-5)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(lora.apply(Llama(cfg), sharded_base, {"lora": a}, LORA_CFG,
                                                          TOKENS) ** 2)))(sharded_adapters)
    assert grads["layers"]["attention"]["wq"]["a"].sharding.spec == wq["a"].spec


# ---------------------------------------------------------------------------------------- checkpoints, convert


@pytest.fixture
def lora_dir(trained, tmp_path):
    checkpoint.save_params(tmp_path / "base", trained["base"], CFG)
    checkpoint.save_adapters(tmp_path / "run", trained["adapters"], CFG, LORA_CFG, tmp_path / "base")
    return tmp_path / "run"


def test_adapter_checkpoint_apart_from_base(trained, lora_dir, tmp_path):
    assert not (lora_dir / "params").exists() and (lora_dir / "lora").is_dir()
    lora_cfg, base_path = checkpoint.load_lora_config(lora_dir)
    assert lora_cfg == LORA_CFG and base_path == str(tmp_path / "base")
    adapters, _, _ = checkpoint.load_adapters(lora_dir)
    for got, want in zip(jax.tree.leaves(adapters), jax.tree.leaves(trained["adapters"])):
        np.testing.assert_array_equal(got, want)
    merged, cfg = checkpoint.load_params(lora_dir)  # what generation, chat, eval and init_from call
    want = lora.merge(trained["base"], trained["adapters"], LORA_CFG)
    for got, expected in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)
    mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = sh.tree_shardings(abstract_params(cfg, boxed=True), mesh)
    on_mesh, _ = checkpoint.load_params(lora_dir, cfg, shardings)  # merged on the devices, shard by shard
    assert on_mesh["layers_1"]["attention"]["wq"].sharding.spec == PartitionSpec(sh.FSDP, sh.TENSOR, None)
    for got, expected in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(want)):
        _assert_close(got, expected, rel=1e-6)
    scanned, _ = checkpoint.load_params(lora_dir, cfg.replace(scan_layers=True))
    _assert_close(_plain(cfg.replace(scan_layers=True), scanned),
                  _adapted(CFG, trained["base"], {"lora": trained["adapters"]}))


def test_missing_base_is_a_clear_error(lora_dir, tmp_path):
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="recorded in .*lora_config.json does not exist"):
        checkpoint.load_params(lora_dir)


def test_convert_merge_lora_and_peft(trained, lora_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    assert convert_cli.main(["--from=jax", "--to=hf", f"--src={lora_dir}", f"--dst={tmp_path / 'x'}"]) == 1
    assert "is a LoRA dir: pass --merge_lora" in capsys.readouterr().err
    assert convert_cli.main(["--from=jax", "--to=hf", "--merge_lora", f"--src={tmp_path / 'base'}",
                         f"--dst={tmp_path / 'y'}"]) == 1
    assert "--merge_lora needs" in capsys.readouterr().err
    assert convert_cli.main(["--from=jax", "--to=hf", "--merge_lora", f"--src={lora_dir}",
                         f"--dst={tmp_path / 'hf'}"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    _assert_close(_adapted(CFG, trained["base"], {"lora": trained["adapters"]}), theirs)
    assert convert_cli.main(["--from=jax", "--to=peft", f"--src={lora_dir}", f"--dst={tmp_path / 'peft'}"]) == 0
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert convert_cli.main(["--from=jax", "--to=peft", f"--src={tmp_path / 'base'}", f"--dst={tmp_path / 'z'}"]) == 1
    assert "--to=peft needs" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("rank", 0, "LoraConfig.rank"), ("alpha", 0.0, "LoraConfig.alpha"), ("dropout", 1.0, "LoraConfig.dropout"),
    ("targets", ("wq", "wx"), "LoraConfig.targets"), ("targets", (), "LoraConfig.targets")])
def test_bad_lora_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**{field: value})


def test_lora_memory_benchmark_step_keeps_only_adapter_state():
    """benchmarks/memory.py --lora_rank: the compiled step's outputs (the new TrainState) are the adapters' state
    only, its arguments hold the bfloat16 base."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    import memory  # noqa: E402  (the XLA device flag is set by conftest)

    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy="minimal")
    result = memory.compile_lora_step(cfg, 1, 32, 1, rank=4)
    n_adapter = lora.count(lora.abstract(abstract_params(cfg), cfg, lora.LoraConfig(rank=4)))
    assert result.argument >= 2 * cfg.param_count()  # the frozen base in bfloat16 is an argument
    assert result.output <= 12 * n_adapter + 4096  # adapters, Adam mu and nu (float32), step and metrics
    assert result.output < 2 * cfg.param_count()  # a state holding the base would be larger than the base alone
