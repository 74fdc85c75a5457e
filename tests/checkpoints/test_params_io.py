"""Params-only checkpoints: converted dirs, trainer workdirs, scanned/unrolled layouts, sharded restore, errors.

Covers llama2_jax.checkpoints.layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers.checkpoints import CFG, init_np

from llama2_jax.checkpoints import params_io as ckpt
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import abstract_params, stack_layers


@pytest.fixture(scope="module")
def params():
    return init_np(CFG)


@pytest.fixture(scope="module")
def converted_dir(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("converted")
    ckpt.save_params(path, params, CFG)
    return path


def _assert_tree_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), actual, expected)


def test_roundtrip_unrolled_and_scanned(params, converted_dir):
    loaded, cfg = ckpt.load_params(converted_dir)
    assert cfg == CFG and isinstance(loaded["output"], np.ndarray)
    _assert_tree_equal(loaded, params)
    stacked, cfg = ckpt.load_params(converted_dir, CFG.replace(scan_layers=True))
    assert cfg.scan_layers
    _assert_tree_equal(stacked, stack_layers(params, CFG.n_layers))


def test_scanned_params_are_saved_unrolled(params, tmp_path):
    scan_cfg = CFG.replace(scan_layers=True)
    ckpt.save_params(tmp_path, stack_layers(params, CFG.n_layers), scan_cfg)
    with ocp.PyTreeCheckpointer() as checkpointer:
        assert "layers_1" in str(checkpointer.metadata(tmp_path / "params"))
    loaded, cfg = ckpt.load_params(tmp_path)  # the stored config asks for the scanned layout
    assert cfg == scan_cfg
    _assert_tree_equal(loaded, stack_layers(params, CFG.n_layers))


def test_bfloat16_restore_casts(converted_dir, params):
    loaded, _ = ckpt.load_params(converted_dir, CFG.replace(param_dtype="bfloat16"))
    assert loaded["layers_0"]["attention"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["output"], np.asarray(params["output"]).astype(jnp.bfloat16))


def _trainer_workdir(path, steps: dict):
    """A workdir as the trainers write it: llama_config.json + checkpoints/<step>/params (scanned)."""
    scan_cfg = CFG.replace(scan_layers=True)
    (path / "llama_config.json").write_text(json.dumps(scan_cfg.to_dict()))
    manager = ocp.CheckpointManager(path / "checkpoints")
    for step, p in steps.items():
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(stack_layers(p, CFG.n_layers))))
    manager.wait_until_finished()
    manager.close()
    (path / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save: ignored


def test_trainer_workdir_latest_step(tmp_path):
    first, latest = init_np(CFG, 1), init_np(CFG, 2)
    _trainer_workdir(tmp_path, {10: first, 20: latest})
    assert ckpt.find_params_dir(tmp_path).parent.name == "20"
    loaded, cfg = ckpt.load_params(tmp_path)
    assert cfg.scan_layers
    _assert_tree_equal(loaded, stack_layers(latest, CFG.n_layers))
    unrolled, cfg = ckpt.load_params(tmp_path, CFG)
    assert not cfg.scan_layers
    _assert_tree_equal(unrolled, latest)


@pytest.mark.parametrize("stored_scanned", [False, True], ids=["stored_unrolled", "stored_scanned"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["to_unrolled", "to_scanned"])
def test_restore_into_shardings(params, tmp_path, stored_scanned, scan_layers):
    if stored_scanned:
        _trainer_workdir(tmp_path, {1: params})
    else:
        ckpt.save_params(tmp_path, params, CFG)
    cfg = CFG.replace(scan_layers=scan_layers)
    mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = sh.tree_shardings(abstract_params(cfg, boxed=True), mesh)
    loaded, _ = ckpt.load_params(tmp_path, cfg, shardings)
    for array, sharding in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
        assert isinstance(array, jax.Array) and array.sharding == sharding
    _assert_tree_equal(loaded, stack_layers(params, CFG.n_layers) if scan_layers else params)
    wq = loaded["layers" if scan_layers else "layers_0"]["attention"]["wq"]
    assert wq.addressable_shards[0].data.shape[-3:] == (16, 2, 16)  # embed over fsdp=4, heads over tensor=2


def test_error_path_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_params(tmp_path / "nope")


def test_error_neither_layout(tmp_path):
    (tmp_path / "llama_config.json").write_text(json.dumps(CFG.to_dict()))
    with pytest.raises(ValueError, match=r"neither a converted checkpoint .* nor a trainer workdir"):
        ckpt.load_params(tmp_path)


def test_error_workdir_without_checkpoints(tmp_path):
    (tmp_path / "llama_config.json").write_text(json.dumps(CFG.to_dict()))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        ckpt.load_params(tmp_path)


def test_error_config_mismatch(converted_dir):
    with pytest.raises(ValueError, match=r"layers_0/attention/wk has shape \(64, 2, 16\) in the checkpoint but "
                                         r"\(64, 4, 8\) in the config"):
        ckpt.load_params(converted_dir, CFG.replace(n_heads=8, n_kv_heads=4))
    with pytest.raises(ValueError, match=r"does not match the config: missing \['layers_2/"):
        ckpt.load_params(converted_dir, CFG.replace(n_layers=3))


def test_error_save_existing_and_mismatched(params, converted_dir, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        ckpt.save_params(converted_dir, params, CFG)
    with pytest.raises(ValueError, match=r"output has shape \(64, 128\) in the params but \(64, 256\)"):
        ckpt.save_params(tmp_path, params, CFG.replace(vocab_size=256))


@pytest.mark.parametrize("stored_scanned,scan_layers", [(False, True), (True, False)])
def test_score_model_workdir_loads_in_either_layout_and_a_llama_is_no_score_model(params, converted_dir, tmp_path,
                                                                                   stored_scanned, scan_layers):
    score = {k: v for k, v in params.items() if k != "output"}
    score["score_head"] = {"kernel": np.arange(CFG.dim, dtype=np.float32)[:, None]}
    stored = stack_layers(score, CFG.n_layers) if stored_scanned else score
    with ocp.StandardCheckpointer() as saver:  # the layout of a train.reward workdir
        saver.save((tmp_path / "checkpoints" / "7" / "params").absolute(), stored)
    (tmp_path / "llama_config.json").write_text(json.dumps(CFG.to_dict()))
    loaded, cfg = ckpt.load_params(tmp_path, CFG.replace(scan_layers=scan_layers), kind="score")
    _assert_tree_equal(loaded, stack_layers(score, CFG.n_layers) if scan_layers else score)
    with pytest.raises(ValueError, match=r"missing \['score_head/kernel'\], unexpected \['output'\]"):
        ckpt.load_params(converted_dir, CFG, kind="score")
