"""Mesh construction, the rules table, sharded init, and sharded forward/gradient == single device."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama

# Every sharded dimension divisible by 8, so any of the meshes below can split it.
CFG = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=16, n_kv_heads=8, multiple_of=64, max_seq_len=32,
                  dtype="float32")
TOKENS = np.random.default_rng(0).integers(0, 256, size=(8, 16)).astype(np.int32)


def test_eight_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("axes,expected", [
    (dict(data=1, fsdp=-1, tensor=1), (1, 8, 1)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (dict(data=-1, fsdp=1, tensor=4), (2, 1, 4)),
])
def test_make_mesh_fills_the_minus_one_axis(axes, expected):
    mesh = sh.make_mesh(**axes)
    assert tuple(mesh.shape[a] for a in sh.MESH_AXES) == expected


@pytest.mark.parametrize("axes,message", [
    (dict(data=4, fsdp=4, tensor=1), "needs 16 devices but 8"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one axis"),
    (dict(data=3, fsdp=-1, tensor=1), "not divisible by 3"),
    (dict(data=0, fsdp=1, tensor=1), "data=0"),
])
def test_mesh_errors_are_clear(axes, message):
    with pytest.raises(ValueError, match=message):
        sh.make_mesh(**axes)


def test_rules_table_maps_logical_names():
    assert sh.logical_to_spec((sh.EMBED, sh.HEADS, sh.HEAD_DIM)) == PartitionSpec(sh.FSDP, sh.TENSOR, None)
    assert sh.logical_to_spec((sh.BATCH, None)) == PartitionSpec((sh.DATA, sh.FSDP), None)
    with pytest.raises(ValueError, match="no entry"):
        sh.logical_to_spec(("embedding_dim",))


def init_fn(cfg):
    return functools.partial(Llama(cfg).init, tokens=jnp.zeros((1, 8), jnp.int32))


def test_sharded_init_places_each_param_by_its_logical_axes_and_matches_plain_init():
    mesh = sh.make_mesh(data=1, fsdp=4, tensor=2)
    rng = jax.random.PRNGKey(0)
    variables, shardings = sh.sharded_init(init_fn(CFG), mesh, rng)
    wq = variables["params"]["layers_0"]["attention"]["wq"]
    assert wq.sharding.spec == PartitionSpec(sh.FSDP, sh.TENSOR, None)
    assert wq.addressable_shards[0].data.shape == (128 // 4, 16 // 2, 8)  # each device holds 1/8 of wq
    plain = nn.unbox(init_fn(CFG)(rng))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9),
                 variables, plain)


def test_sharded_init_never_builds_the_full_model_on_one_device():
    """The jitted init's output shardings are the partitioned ones: its memory per device is a fraction of the
    model (checked on the compiled executable, nothing allocated)."""
    cfg = CFG.replace(dim=512, n_layers=4, vocab_size=4096)
    mesh = sh.make_mesh(data=1, fsdp=8, tensor=1)
    abstract = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))
    shardings = sh.tree_shardings(abstract, mesh)
    compiled = jax.jit(lambda r: nn.unbox(init_fn(cfg)(r)), out_shardings=shardings).lower(
        jax.random.PRNGKey(0)).compile()
    full_bytes = 4 * cfg.param_count()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this jaxlib gives no memory analysis on CPU")
    assert analysis.output_size_in_bytes < full_bytes / 4


def test_indivisible_sharding_names_the_parameter():
    cfg = CFG.replace(n_heads=4, n_kv_heads=2)  # kv heads 2 cannot split over tensor=8
    mesh = sh.make_mesh(data=1, fsdp=1, tensor=8)
    with pytest.raises(ValueError, match=r"wk.*not divisible"):
        sh.sharded_init(init_fn(cfg), mesh, jax.random.PRNGKey(0))


def loss_fn(params, cfg, tokens):
    logits = Llama(cfg).apply({"params": params}, tokens)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.roll(tokens, -1, axis=1)[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


@functools.lru_cache(maxsize=None)
def single_device_reference(scan: bool):
    cfg = CFG.replace(scan_layers=scan)
    params = nn.unbox(init_fn(cfg)(jax.random.PRNGKey(1)))["params"]
    return jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, cfg, TOKENS)


@pytest.mark.parametrize("mesh_shape,scan", [
    ((8, 1, 1), False), ((2, 2, 2), False), ((1, 4, 2), False), ((1, 1, 8), False), ((2, 2, 2), True),
])
def test_sharded_forward_and_gradient_equal_single_device(mesh_shape, scan):
    cfg = CFG.replace(scan_layers=scan)
    ref_loss, ref_grad = single_device_reference(scan)
    mesh = sh.make_mesh(*mesh_shape)
    variables, shardings = sh.sharded_init(init_fn(cfg), mesh, jax.random.PRNGKey(1))
    tokens = jax.device_put(TOKENS, sh.batch_sharding(mesh))
    step = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1,
                   out_shardings=(sh.replicated(mesh), shardings["params"]))
    with sh.activation_sharding(mesh):  # traced as the trainers' steps are: activations pinned to the rules
        loss, grad = step(variables["params"], cfg, tokens)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7),
                 grad, ref_grad)
    some_grad = jax.tree.leaves(grad)[0]
    assert isinstance(some_grad.sharding, NamedSharding) and some_grad.sharding.mesh.shape == mesh.shape


def test_activation_sharding_pins_activations_to_the_rules_table():
    """Under `activation_sharding` the logits come out batch-split over (data, fsdp) and vocab-split over tensor,
    whatever the parameters' sharding suggests; outside it the model is unconstrained (and runs without a mesh)."""
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    variables, _ = sh.sharded_init(init_fn(CFG), mesh, jax.random.PRNGKey(1))
    tokens = jax.device_put(TOKENS, sh.batch_sharding(mesh))
    forward = lambda p, t: Llama(CFG).apply({"params": p}, t)  # noqa: E731
    with sh.activation_sharding(mesh):
        logits = jax.jit(forward)(variables["params"], tokens)
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec((sh.DATA, sh.FSDP), None, sh.TENSOR)), 3)
    assert sh.constrain(jnp.ones((2, 3)), (sh.BATCH, None)).shape == (2, 3)  # no mesh: the identity
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jax.jit(forward)(variables["params"], TOKENS)),
                               rtol=1e-5, atol=1e-6)


CLUSTER_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
                "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


@pytest.mark.parametrize("environ, expected", [
    ({}, 1),
    ({"SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4"}, 4),  # an srun step of 4 tasks
    ({"SLURM_STEP_NODELIST": "node001", "SLURM_NTASKS": "1"}, 1),
    ({"SLURM_NTASKS": "8"}, 1),  # the batch script itself (no srun step): one process
    ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "2"}, 2),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1,host-2,host-3"}, 4),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, 1),  # a single-host TPU VM
])
def test_launched_process_count_reads_the_launchers_environment(environ, expected):
    assert sh.launched_process_count(environ) == expected


@pytest.mark.parametrize("environ, calls", [
    ({"SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2"}, [{}]),  # no flags: JAX discovers them
    ({}, []),  # a plain single process: nothing to start
])
def test_initialize_distributed_lets_jax_discover_a_cluster_job(monkeypatch, environ, calls):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: seen.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep this process's CPU collectives as they are
    sh.initialize_distributed(None, None, None)
    assert seen == calls
    sh.initialize_distributed("host0:1234", 2, 1)  # explicit flags win over the environment
    assert seen[-1] == {"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1}
