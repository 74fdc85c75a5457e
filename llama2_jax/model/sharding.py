"""The device mesh, the one table of logical-axis rules, and pytree shardings.

Mesh axes: `data` (pure data parallelism: params replicated), `fsdp` (data parallelism with params, gradients and
optimizer state sharded: ZeRO-3), `tensor` (Megatron-style tensor parallelism inside attention heads and the MLP).
Parameters carry *logical* axis names where they are declared (model.py); `LOGICAL_RULES` maps each logical name to
mesh axes. Nothing else in the code base names mesh axes for parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axis names.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical axis names, used where parameters and activations are declared.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"

# THE rules table: logical axis -> mesh axes (None = replicated along that dimension).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, (DATA, FSDP)),  # activations and batches are split over every data-parallel axis
    (LENGTH, None),
    (EMBED, FSDP),  # params: the model dim is split over fsdp (ZeRO-3 style)
    (HEADS, TENSOR),
    (KV_HEADS, TENSOR),
    (HEAD_DIM, None),
    (MLP, TENSOR),
    (VOCAB, TENSOR),
    (LAYERS, None),  # the stacked-layer axis of scanned params
)
_RULE_NAMES = {name for name, _ in LOGICAL_RULES}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One axis may be -1: the rest of the devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    for name, size in zip(MESH_AXES, shape):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size}: sizes must be positive, or -1 for the rest of the devices")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {len(devices)} are available")
    try:
        from jax.experimental import mesh_utils  # topology-aware device order on TPU/GPU

        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


# The mesh that model activations are constrained to while a step is traced (see `activation_sharding`).
_ACTIVATION_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh]):
    """Trace the model under this context to pin its activations to `LOGICAL_RULES` (see `constrain`).

    Without it GSPMD propagates the *parameters'* sharding (model dim over fsdp) into the activations and replicates
    the batch, so every device holds the whole global batch's activations (benchmarks/memory.py measured 131 GiB
    instead of 42 GiB per device for 7B on fsdp=8). The shared jitted steps (llama2_jax/training/state.py) trace under it."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def with_activation_sharding(fn, mesh: Optional[Mesh]):
    """fn wrapped so that it traces under `activation_sharding(mesh)` (for functions handed to `jax.jit`)."""
    def traced(*args, **kwargs):
        with activation_sharding(mesh):
            return fn(*args, **kwargs)

    return traced


def activation_mesh() -> Optional[Mesh]:
    """The mesh of the enclosing `activation_sharding` context (None outside one): what a kernel that must be
    mapped over the devices by hand (`shard_map`, e.g. attention.splash_attention) is mapped over."""
    return _ACTIVATION_MESH.get()


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """`with_sharding_constraint(x, logical axes)` on the `activation_sharding` mesh; the identity outside it, so
    the model runs unchanged on one device, in tests and inside callers that shard by hand (generation)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes)))


def logical_to_spec(logical_axes: Sequence[Optional[str]]) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (unknown names are an error, never silently replicated)."""
    rules = dict(LOGICAL_RULES)
    spec = []
    for name in logical_axes:
        if name is not None and name not in _RULE_NAMES:
            raise ValueError(f"logical axis {name!r} has no entry in sharding.LOGICAL_RULES")
        spec.append(None if name is None else rules[name])
    return PartitionSpec(*spec)


def _boxed_to_sharding(leaf, mesh: Mesh):
    if isinstance(leaf, nn.LogicallyPartitioned):
        return NamedSharding(mesh, logical_to_spec(leaf.names))
    return NamedSharding(mesh, PartitionSpec())  # scalars, counters, RNG keys: replicated


def tree_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes (e.g. `jax.eval_shape(init)`
    or an optimizer state built from boxed params); unboxed leaves are replicated. The result has the unboxed tree's
    structure."""
    return jax.tree.map(
        lambda leaf: _boxed_to_sharding(leaf, mesh),
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raise one clear error if a dimension is not divisible by the mesh axes it is sharded over."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(paths_and_leaves, flat_shardings):
        shape = getattr(leaf, "shape", ())
        for dim, axes in zip(shape, sharding.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % size:
                name = jax.tree_util.keystr(path)
                raise ValueError(
                    f"parameter {name} of shape {tuple(shape)}: dimension {dim} is not divisible by mesh axes "
                    f"{axes} of total size {size}; change the mesh or the model size")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec((BATCH,) + (None,) * (ndim - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def launched_process_count(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many processes a cluster launcher that `jax.distributed.initialize()` can read by itself started for this
    job, from its environment; 1 when none did. Detected: a SLURM `srun` step (SLURM_STEP_NODELIST, SLURM_NTASKS),
    Open MPI's `mpirun` (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE) and a TPU slice whose hosts are listed in
    TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES (GKE sets them). A Cloud TPU VM started by hand sets none of these:
    pass the flags there."""
    env = os.environ if environ is None else environ
    if "SLURM_STEP_NODELIST" in env:
        return int(env.get("SLURM_NTASKS", "1"))
    if "OMPI_MCA_orte_hnp_uri" in env:
        return int(env.get("OMPI_COMM_WORLD_SIZE", "1"))
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return max(1, len([h for h in hosts.split(",") if h.strip()]))


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int]) -> None:
    """Multi-host start-up on JAX's own runtime. On CPU, collectives go through gloo.

    Call before any other JAX call. With a coordinator address the three flags are used; without one,
    `jax.distributed.initialize()` discovers them itself when `launched_process_count()` > 1 (SLURM srun, Open MPI,
    a GKE TPU slice), and otherwise this is a no-op (single process).
    """
    if coordinator_address is None:
        if launched_process_count() > 1:
            _use_gloo_on_cpu()
            jax.distributed.initialize()
        return
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator_address needs --num_processes and --process_id as well")
    _use_gloo_on_cpu()
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def _use_gloo_on_cpu() -> None:
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def sharded_init(init_fn, mesh: Mesh, *args) -> tuple[Any, Any]:
    """Run `init_fn(*args)` (returning a pytree with logical-axis boxes, e.g. `model.init`) directly into its
    shardings: shapes come from `jax.eval_shape` and the jitted init writes each shard on its own device, so the
    full model never exists on one device. Returns (unboxed pytree, its NamedShardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh)
    check_divisible(nn.unbox(abstract), shardings)
    values = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return values, shardings
