"""The shared train step: exact gradient accumulation, the loss contract, the schedule and the optimizer recipe."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.training import losses
from llama2_jax.training import state as train_state

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=16,
                  dtype="float32")


def random_batch(rows=8, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(rows, length + 1)).astype(np.int32)
    mask = (rng.random((rows, length)) > 0.3).astype(np.float32)  # uneven weights per row
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}


def init_fn(seed=0):
    return Llama(CFG).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]


def test_next_token_loss_matches_a_hand_computed_value():
    logits = jnp.asarray([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    targets = jnp.asarray([[0, 2]])
    expected = [-np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1))), np.log(3.0)]
    np.testing.assert_allclose(losses.token_cross_entropy(logits, targets)[0], expected, rtol=1e-6)


def test_margin_ranking_loss_by_hand():
    margin = losses.margin_for(jnp.asarray([0, 1, 2, 3, -1]), "small")
    np.testing.assert_allclose(margin, [1.0, 2 / 3, 1 / 3, 0.0, 0.0], rtol=1e-6)
    loss = losses.ranking_loss(jnp.asarray(0.5), jnp.asarray(-0.25), jnp.asarray(2.0))  # "large", better
    np.testing.assert_allclose(loss, np.log1p(np.exp(-(0.75 - 2.0))), rtol=1e-6)
    with pytest.raises(ValueError, match="huge"):
        losses.margin_for(jnp.asarray([0]), "huge")


def make_state(tx=None):
    tx = tx or train_state.make_optimizer(1e-3)
    return train_state.TrainState.create(nn.unbox(init_fn()), tx)


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(accum):
    """Uneven loss masks per row: a naive mean of micro-batch means would differ; the weight-sum contract does not."""
    loss_fn = functools.partial(losses.next_token_loss, model=Llama(CFG))
    batch = random_batch()
    state = make_state()
    one, m1 = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn))(state, batch)
    many, m2 = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn, grad_accum_steps=accum))(
        state, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one.params, many.params)


def test_loss_is_the_masked_token_mean():
    loss_fn = functools.partial(losses.next_token_loss, model=Llama(CFG))
    batch = random_batch()
    state = make_state()
    _, metrics = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn))(state, batch)
    logits = jax.jit(Llama(CFG).apply)({"params": state.params}, batch["inputs"])
    nll = np.asarray(losses.token_cross_entropy(logits, batch["targets"]))
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    assert int(metrics["weight"]) == int(batch["loss_mask"].sum())


def test_training_reduces_the_loss_on_a_fixed_batch():
    loss_fn = functools.partial(losses.next_token_loss, model=Llama(CFG))
    step = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn))
    state, batch = make_state(train_state.make_optimizer(1e-2)), random_batch()
    first = None
    for _ in range(30):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < 0.5 * first
    assert int(state.step) == 30


def test_schedule_warmup_then_cosine_to_ten_percent():
    schedule = train_state.warmup_cosine_schedule(3e-4, warmup_steps=2000, total_steps=10000, end_fraction=0.1)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(1000), 1.5e-4, rtol=1e-5)
    np.testing.assert_allclose(schedule(2000), 3e-4, rtol=1e-5)
    midpoint = 3e-5 + (3e-4 - 3e-5) * 0.5  # cosine halfway between peak and 10 % of peak
    np.testing.assert_allclose(schedule(6000), midpoint, rtol=1e-4)
    np.testing.assert_allclose(schedule(10000), 3e-5, rtol=1e-5)


def test_optimizer_is_the_papers_adamw():
    """One step by hand: clip to global norm 1, Adam with b1 0.9, b2 0.95, eps 1e-5, decoupled decay 0.1 on
    matrices only."""
    params = {"w": jnp.asarray([[1.0, -2.0]]), "scale": jnp.asarray([0.5, 0.5])}
    grads = {"w": jnp.asarray([[3.0, 0.0]]), "scale": jnp.asarray([0.0, 4.0])}  # global norm 5 -> clipped to 1
    tx = train_state.make_optimizer(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped = jax.tree.map(lambda g: g / 5.0, grads)
    for name, decay in (("w", 0.1), ("scale", 0.0)):
        g = np.asarray(clipped[name])
        m_hat, v_hat = g, g * g  # bias-corrected first step: m = g, v = g^2
        expected = -0.1 * (m_hat / (np.sqrt(v_hat) + 1e-5) + decay * np.asarray(params[name]))
        np.testing.assert_allclose(updates[name], expected, rtol=1e-5, atol=1e-7)


def test_sharded_state_and_donated_step_on_a_mesh():
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    tx = train_state.make_optimizer(1e-3)
    state, shardings = train_state.create_train_state(init_fn, tx, mesh)
    mu = state.opt_state[1][0].mu["layers_0"]["attention"]["wq"]
    assert mu.sharding.spec == state.params["layers_0"]["attention"]["wq"].sharding.spec  # Adam moments sharded
    loss_fn = functools.partial(losses.next_token_loss, model=Llama(CFG))
    step = train_state.jit_train_step(loss_fn, shardings, mesh)
    reference, ref_metrics = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn))(make_state(tx),
                                                                                               random_batch())
    new_state, metrics = step(state, jax.device_put(random_batch(), sh.batch_sharding(mesh)))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.params,
                 reference.params)
