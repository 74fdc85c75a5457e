"""LoRA through the trainers (llama2_jax.training.initial_state.init_state -> lora_run, train.sft, train.reward,
train.dpo): only the adapters (and a reward model's head) are trained and in the optimizer, the base stays bitwise
unchanged, the workdir records its base and loads merged.

Covers llama2_jax.training.lora_run and llama2_jax.training.initial_state."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import alpaca_subset, random_llama_params

from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.model import lora
from llama2_jax.model import score as score_model
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.training import losses, run_dir
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import host_to_global
from llama2_jax.training.initial_state import init_state, make_tx
from llama2_jax.training.loop import LoopSettings
from llama2_jax.training.lora_run import lora_config
from llama2_jax.training.model_config import resolve_model_config
from llama2_jax.training.setup import Run, Task, make_mesh

BASE = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                   dtype="float32")


random_params = random_llama_params  # tests/conftest.py


def lora_config_for(tmp_path, **model):
    from configs import sft_tiny

    checkpoint.save_params(tmp_path / "base", random_params(BASE), BASE, overwrite=True)
    config = sft_tiny.get_config()
    config.init_from = str(tmp_path / "base")
    config.model.update(model)
    config.lora.rank, config.lora.targets = 4, "wq,wv,wo,w2"
    config.batch_size, config.seq_len, config.learning_rate, config.warmup_steps = 8, 16, 1e-2, 0
    return config


def lora_run_for(config, workdir, kind="llama"):
    """(run, trainable, schedule): the run `training.setup` would return (its workdir files written, no tokenizer
    or data: these tests feed batches themselves) and its LoRA state from `init_state`."""
    model_cfg = resolve_model_config(config, config.seq_len)
    run = Run(config, str(workdir), Task("test"), model_cfg, make_mesh(config), None, None,
              LoopSettings.from_config(config), lora_config(config), None)
    run_dir.write_workdir(str(workdir), run_dir.run_record("test", model_cfg, run.lora_cfg), lora_base=config.init_from)
    tx, schedule = make_tx(config, learning_rate=config.learning_rate)
    return run, init_state(run, tx, kind=kind), schedule


def padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def token_batch(seed=0, rows=8, length=16):
    """A next-token batch (losses.next_token_loss): one document per row."""
    tokens = np.random.default_rng(seed).integers(0, BASE.vocab_size, (rows, length + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": np.ones((rows, length), np.int32), "loss_mask": np.ones((rows, length), np.float32)}


@pytest.mark.parametrize("model", [{}, {"scan_layers": True, "remat_policy": "minimal", "param_dtype": "bfloat16"}])
def test_gradients_reach_only_the_adapters_the_base_stays_bitwise(tmp_path, model):
    config = lora_config_for(tmp_path, **model)
    setup, run, schedule = lora_run_for(config, tmp_path / "w")
    model_cfg, mesh = setup.model_cfg, setup.mesh  # fsdp over the 8 simulated devices
    before = jax.device_get(run.frozen)
    step, eval_step = run.jit_steps(losses.next_token_loss, Llama(model_cfg), mesh, schedule=schedule,
                                    seed=config.seed)
    state = run.state
    for seed in range(3):
        state, metrics = step(state, {k: host_to_global(v, mesh) for k, v in token_batch(seed).items()})
    assert np.isfinite(float(metrics["loss"]))
    assert set(state.params) == {"lora"}  # only adapters are trained...
    adapters = jax.tree.leaves(state.params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sorted(np.shape(x) for x in moments) == sorted(2 * [np.shape(x) for x in adapters])  # ...and optimized
    after = jax.device_get(run.frozen)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
    assert jax.tree.leaves(after)[0].dtype == jnp.dtype(model_cfg.param_dtype)  # the base keeps its own dtype
    block = "layers" if model_cfg.scan_layers else "layers_0"
    wq = state.params["lora"][block]["attention"]["wq"]
    assert np.abs(jax.device_get(wq["b"])).max() > 0  # b started at zero: the adapters moved
    kernel = padded(run.frozen_shardings[block]["attention"]["wq"].spec, run.frozen[block]["attention"]["wq"].ndim)
    n_in = wq["a"].ndim - 1  # a follows its kernel's (leading and) input axes; the rank axis is replicated
    assert padded(wq["a"].sharding.spec, wq["a"].ndim) == kernel[:n_in] + (None,)
    assert padded(wq["b"].sharding.spec, wq["b"].ndim)[n_in - 1:] == (None,) + kernel[n_in:]
    assert any(axis is not None for axis in kernel)  # the check is not vacuous: the kernel is sharded
    assert (tmp_path / "w" / "lora_config.json").is_file()
    assert checkpoint.load_lora_config(tmp_path / "w")[1] == str(tmp_path / "base")


def test_lora_fields_are_one_line_config_errors(tmp_path):
    config = lora_config_for(tmp_path)
    config.lora.targets = "wq,wz"
    with pytest.raises(ConfigError, match=r"^config.lora: LoraConfig.targets must be distinct names"):
        lora_config(config)
    config = lora_config_for(tmp_path)
    config.init_from = ""
    with pytest.raises(ConfigError, match=r"^config.lora.rank > 0 needs config.init_from"):
        lora_config(config)
    config.lora.rank = 0
    assert lora_config(config) is None


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path):
    """Fresh adapters (b = 0) leave the policy equal to its reference: the DPO loss is exactly log 2."""
    config = lora_config_for(tmp_path)
    setup, run, schedule = lora_run_for(config, tmp_path / "w")
    model_cfg, mesh = setup.model_cfg, setup.mesh
    import functools

    loss_fn = functools.partial(losses.dpo_loss, beta=0.1)
    _, eval_step = run.jit_steps(loss_fn, Llama(model_cfg), mesh, schedule=schedule, reference=True)
    tokens = np.random.default_rng(0).integers(0, BASE.vocab_size, (8, 2, 16)).astype(np.int32)
    batch = {"tokens": tokens, "lengths": np.full((8, 2), 16, np.int32), "prompt_lens": np.full((8, 2), 5, np.int32)}
    out = jax.device_get(eval_step(run.state.params, {k: host_to_global(v, make_mesh(config))
                                                      for k, v in batch.items()}))
    assert out["loss_sum"] / out["weight"] == pytest.approx(math.log(2), abs=1e-6)


def test_reward_model_lora_trains_adapters_and_the_head_on_the_frozen_trunk(tmp_path):
    config = lora_config_for(tmp_path)
    setup, run, _ = lora_run_for(config, tmp_path / "w", kind="score")
    model_cfg = setup.model_cfg
    assert set(run.state.params) == {"lora", score_model.HEAD} and "output" not in run.frozen
    assert run.state.params[score_model.HEAD]["kernel"].dtype == jnp.float32
    assert set(run.frozen) == set(score_model.abstract_score_params(model_cfg))  # its head is replaced by the state's

    # The workdir as the loop leaves it (adapters moved off b = 0) loads merged with its head, as PPO / RS load RMs.
    from llama2_jax.checkpoints.params_io import write_config
    from llama2_jax.training.checkpointer import TrainCheckpointer

    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), run.state.params)
    state = run.state.replace(params=jax.device_put(moved, run.shardings.params))
    write_config(str(tmp_path / "w"), model_cfg)
    checkpointer = TrainCheckpointer(str(tmp_path / "w"), async_save=False)
    checkpointer.save(state, {})
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints" / "0").iterdir() if p.is_dir()) == [
        "extra", "head", "lora", "opt_state"]  # the adapters and the head apart; no base copy
    checkpointer = TrainCheckpointer(str(tmp_path / "w"))
    resumed, _ = checkpointer.restore(run.state, run.shardings)  # what run_loop does on resume
    checkpointer.close()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(jax.device_get(a), b), resumed.params, moved)
    score_shardings = {**run.frozen_shardings, score_model.HEAD: run.shardings.params[score_model.HEAD]}
    merged, _ = checkpoint.load_params(tmp_path / "w", model_cfg, score_shardings, kind="score")
    tokens, lengths = jnp.asarray(token_batch(rows=2)["inputs"]), jnp.asarray([16, 9], jnp.int32)
    model = score_model.ScoreModel(model_cfg)
    frozen = jax.device_get(run.frozen)
    expected = lora.apply(model, frozen, jax.device_get(moved), run.lora_cfg, tokens, lengths)
    np.testing.assert_allclose(model.apply({"params": jax.device_get(merged)}, tokens, lengths), expected, atol=1e-5)
    head_only = {**frozen, score_model.HEAD: jax.device_get(moved[score_model.HEAD])}
    assert not np.allclose(expected, model.apply({"params": head_only}, tokens, lengths), atol=1e-5)  # adapters count


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_lora_sft_on_alpaca_lowers_held_out_loss_and_its_workdir_loads_merged(tmp_path):
    from configs import sft_tiny
    from llama2_jax.inference import generate
    from llama2_jax.text.tokenizer import Tokenizer
    from train import sft

    data_path, tokenizer = alpaca_subset(tmp_path)
    cfg = BASE.replace(vocab_size=512, max_seq_len=128)
    checkpoint.save_params(tmp_path / "base", random_params(cfg), cfg)
    (tmp_path / "base" / "tokenizer.model").write_bytes(open(tokenizer.model_path, "rb").read())

    config = sft_tiny.get_config()
    config.init_from, config.data.path = str(tmp_path / "base"), str(data_path)
    config.seq_len, config.batch_size, config.num_epochs, config.num_train_steps = 128, 8, 0.0, 30
    config.learning_rate, config.warmup_steps, config.eval_every_steps = 3e-2, 3, 30
    config.data.val_fraction, config.progress_bar, config.sample_prompts = 0.1, False, ()
    config.async_checkpoints, config.eval_at_start = False, True
    config.lora.rank, config.lora.alpha = 8, 16.0
    work = tmp_path / "work"
    result = sft.train_and_evaluate(config, str(work))
    state, history = result.state, result.history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert int(state.step) == 30 and len(evals) == 2 and evals[-1] < evals[0] - 0.1, evals
    assert set(state.params) == {"lora"}
    assert (work / "lora_config.json").is_file() and (work / "checkpoints" / "30" / "lora").is_dir()
    assert not (work / "checkpoints" / "30" / "params").exists()  # the base is not copied

    merged, model_cfg = checkpoint.load_params(work)  # the workdir loads merged, as everything that loads params
    base, _ = checkpoint.load_params(tmp_path / "base", model_cfg)
    lora_cfg = lora_config(config)
    expected = lora.merge(base, jax.device_get(state.params["lora"]), lora_cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), merged, expected)
    tokens = jnp.asarray(token_batch(rows=2)["inputs"])
    adapted = lora.apply(Llama(model_cfg), base, {"lora": state.params["lora"]}, lora_cfg, tokens)
    np.testing.assert_allclose(Llama(model_cfg).apply({"params": merged}, tokens), adapted, atol=1e-4)
    prompt = ["Give three tips for staying healthy."]
    from_workdir = generate.text_completion(merged, model_cfg, Tokenizer(str(work / "tokenizer.model")), prompt,
                                            temperature=0.0, max_gen_len=8)
    from_merge = generate.text_completion(expected, model_cfg, Tokenizer(str(work / "tokenizer.model")), prompt,
                                          temperature=0.0, max_gen_len=8)
    assert from_workdir == from_merge


def test_dropout_keys_differ_per_step_and_per_micro_batch_and_eval_gets_none():
    """train_step(rng_seed=s) passes rng = fold_in(fold_in(PRNGKey(s), step), micro-batch) to the loss."""
    import optax

    from llama2_jax.training import state as train_state

    def loss_fn(params, batch, frozen, rng=None):
        noise = jax.random.uniform(rng, (4,))
        return jnp.sum(params["w"] * noise) * jnp.sum(batch["x"]) + jnp.sum(frozen), {"weight": jnp.float32(1.0)}

    state = train_state.TrainState.create({"w": jnp.ones(4)}, optax.sgd(0.0))
    batch = {"x": jnp.ones((4, 1))}
    step = jax.jit(lambda s, b: train_state.train_step(s, b, jnp.zeros(()), loss_fn=loss_fn, grad_accum_steps=2,
                                                       rng_seed=7))
    losses_by_step = []
    for index in range(2):
        state, metrics = step(state, batch)
        key = jax.random.fold_in(jax.random.PRNGKey(7), index)
        # each micro-batch: 2 rows of x = 1, weight 1; the step divides the summed loss by the summed weight (2)
        expected = sum(2.0 * jnp.sum(jax.random.uniform(jax.random.fold_in(key, i), (4,))) for i in range(2)) / 2
        assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)
        losses_by_step.append(float(metrics["loss"]))
    assert losses_by_step[0] != losses_by_step[1]
    seen = []

    def eval_loss(params, batch, frozen, rng=None):
        seen.append(rng)
        return jnp.float32(0.0), {"weight": jnp.float32(1.0)}

    train_state.eval_step(state.params, batch, jnp.zeros(()), loss_fn=eval_loss)
    assert seen == [None]  # eval is deterministic: no dropout key


@pytest.mark.slow
def test_lora_dpo_through_the_trainer_learns_the_preference_with_the_base_as_reference(tmp_path):
    from configs import dpo_tiny
    from llama2_jax.text.tokenizer import train_tokenizer
    from train import dpo

    words = "the a cat dog safe help answer question please thanks why how what no yes sorry can you I".split()
    rng = np.random.default_rng(0)
    tokenizer = train_tokenizer([" ".join(rng.choice(words, size=12)) + f" {i}." for i in range(400)],
                                tmp_path / "spm", 384)
    cfg = BASE.replace(vocab_size=384)
    checkpoint.save_params(tmp_path / "sft", random_params(cfg), cfg)
    (tmp_path / "sft" / "tokenizer.model").write_bytes(open(tokenizer.model_path, "rb").read())
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(80):  # a learnable rule: the chosen answer is polite
            f.write(json.dumps({"prompt": f"question {i} why the cat", "chosen": "yes please thanks",
                                "rejected": "no " + "dog " * int(rng.integers(1, 4))}) + "\n")

    config = dpo_tiny.get_config()
    config.init_from, config.data.path = str(tmp_path / "sft"), str(tmp_path / "pairs.jsonl")
    config.batch_size, config.seq_len, config.num_epochs, config.num_train_steps = 8, 32, 0.0, 8
    config.eval_every_steps, config.learning_rate, config.warmup_steps = 8, 1e-2, 1
    config.async_checkpoints, config.progress_bar = False, False
    config.lora.rank = 4
    result = dpo.train_and_evaluate(config, str(tmp_path / "dpo"))
    state, history = result.state, result.history
    assert set(state.params) == {"lora"}
    last = [h for h in history if "eval_reward_accuracy" in h][-1]
    assert last["eval_reward_accuracy"] == 1.0 and last["eval_loss"] < math.log(2)
    assert (tmp_path / "dpo" / "lora_config.json").is_file()
