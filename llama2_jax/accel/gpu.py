"""Named NVIDIA GPU systems and their compile-only devices: XLA's deviceless GPU compilation, no GPU attached.

`compile_only_devices(gpu_system("h100-8"))` returns the 8 devices of one 8-GPU H100 node as the CUDA PJRT plugin
describes them from a `GpuTargetConfigProto` (the device's figures, below) instead of a driver:
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology="1x1x8")`. The plugin
(`jax-cuda12-pjrt` + `jax-cuda12-plugin` at the jax version, about 180 MB of wheels: `pip install -e .[gpu-aot]`)
needs no CUDA libraries for this: XLA's GPU compiler runs on the CPU and `memory_analysis()` gives the per-GPU
figure. What it cannot do without a GPU: autotune (it takes default tilings) or build cuDNN graphs
(`attention_impl="cudnn"` needs a GPU to compile), and the figure is the program's, not the runtime's (JAX
preallocates 75 % of the GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).

Installed, the plugin logs "Could not find cuda drivers" lines to stderr at every JAX start-up on a machine without
GPUs, whatever JAX_PLATFORMS says, so CI keeps it out of the test environment (these paths are then skipped).

The target configs are written here from NVIDIA's published data-sheet figures (SM count, clocks, memory, cache and
shared-memory sizes, compute capability): only the fields XLA's deviceless compiler reads for code generation and
memory planning.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax


def _target_config(name: str, capability: tuple[int, int], sms: int, fp32_per_sm: int, smem_per_sm: int,
                   smem_optin: int, l2_bytes: int, clock_ghz: float, bandwidth: float, memory_bytes: int) -> str:
    major, minor = capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {smem_optin}
  shared_memory_per_core: {smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2_bytes}
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{name}"
"""


@dataclasses.dataclass(frozen=True)
class GpuModel:
    name: str  # jax's Device.device_kind
    memory_bytes: int  # device memory as the driver reports it
    target_config: str  # GpuTargetConfigProto text


# H100 SXM 80GB: sm_90, 132 SMs x 128 FP32 lanes, 228 KiB shared memory per SM (227 KiB per block), 50 MiB L2,
# 1.98 GHz, 3.35 TB/s, 81,559 MiB. A100 SXM 80GB: sm_80, 108 SMs x 64, 164 KiB (163 KiB), 40 MiB L2, 1.41 GHz,
# 2.04 TB/s, 81,920 MiB.
MODELS = {
    "h100": GpuModel("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, _target_config(
        "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 228 * 1024, 227 * 1024, 50 * 2 ** 20, 1.98, 3.35e12,
        81559 * 2 ** 20)),
    "a100": GpuModel("NVIDIA A100-SXM4-80GB", 81920 * 2 ** 20, _target_config(
        "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 164 * 1024, 163 * 1024, 40 * 2 ** 20, 1.41, 2.039e12,
        81920 * 2 ** 20)),
}
GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class GpuSystem:
    name: str  # "h100-64"
    model: GpuModel
    chips: int  # GPUs in all

    @property
    def hbm_gib(self) -> float:
        return self.model.memory_bytes / 2 ** 30

    @property
    def topology(self) -> str:
        """The plugin's "<partitions>x<hosts per partition>x<devices per host>": 8-GPU nodes (or one smaller)."""
        per_node = min(self.chips, GPUS_PER_NODE)
        return f"1x{self.chips // per_node}x{per_node}"


SYSTEMS = {f"{key}-{n}": GpuSystem(f"{key}-{n}", model, n) for key, model in MODELS.items()
           for n in (1, 8, 16, 32, 64, 128, 256)}


def gpu_system(name: str) -> GpuSystem:
    """The system called `name` ("h100-8"); ValueError listing the known names otherwise."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown GPU system {name!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]


def cuda_plugin_problem() -> str | None:
    """Why the CUDA compiler cannot be loaded here (one line), or None when it can."""
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        return "the CUDA PJRT plugin is not installed (pip install -e '.[gpu-aot]' installs it, matching jax)"
    return None


def compile_only_devices(system: GpuSystem) -> list[jax.Device]:
    """The system's GPUs for AOT compilation (no GPU needed; they cannot run anything). RuntimeError (one line)
    when the plugin is missing."""
    problem = cuda_plugin_problem()
    if problem:
        raise RuntimeError(f"cannot compile for {system.name}: {problem}")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=system.model.target_config,
                                        topology=system.topology)
    return list(desc.devices)
