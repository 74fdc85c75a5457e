"""Named TPU slices and their compile-only devices.

`compile_only_devices(tpu_slice("v5p-64"))` returns the 32 devices of a v5p-64 slice as libtpu describes them
(`jax.experimental.topologies.get_topology_desc`); a `jax.jit(...).lower(...).compile()` on a mesh of them runs the
real TPU compiler on this machine, no TPU attached. libtpu comes with `pip install -e .[tpu-aot]` (jax's own `tpu`
extra, which pins libtpu to the jax release); jax finds it as the importable `libtpu` package (or TPU_LIBRARY_PATH),
and loads it only here, or when a JAX backend is initialised without JAX_PLATFORMS=cpu (then it prints warnings about
TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES on a machine without TPUs, falls back to the CPU, and changes nothing
else; the tests set JAX_PLATFORMS=cpu).

Slice names follow Cloud TPU: v4 and v5p count TensorCores (two per chip, driven as one "megacore" device: v5p-8 is
4 chips), v5e and v6e count chips (one core each). Topologies, chip configs and host bounds are those Cloud TPU
uses (MaxText's accelerator_to_spec_map lists the same; v5e/v6e slices of up to 8 chips are one host); HBM per chip
as published on the Cloud TPU system architecture pages: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB. What
`Generation.hbm_gib` records, and what fits is judged against, is the compiler's own "available HBM", which libtpu
0.0.42 prints when it refuses a program too large for the chip: v4 30.75, v5e 15.75, v5p 95.74, v6e 31.25 ("G").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional

import jax


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # "v5p"
    topology_prefix: str  # libtpu's name in topology strings ("v5" for v5p)
    chip_config: str  # "megacore" (two TensorCores as one device) or "default" (one core)
    cores_per_chip: int  # how the slice name counts: v5p-8 = 8 cores = 4 chips
    hbm_gib: float  # HBM per chip the TPU compiler lets a program use (its "available HBM")
    device_kind: str  # jax's Device.device_kind
    peak_bf16_flops: float  # per chip, FLOP/s
    ici_bytes_per_s: float  # inter-chip interconnect bandwidth per chip (all links)


# Peak bfloat16 FLOP/s and ICI bandwidth per chip from the Cloud TPU system architecture pages (v4: 275 TFLOP/s,
# 2,400 Gbit/s; v5e: 197, 1,600; v5p: 459, 4,800; v6e: 918, 3,584).
GENERATIONS = {
    "v4": Generation("v4", "v4", "megacore", 2, 30.75, "TPU v4", 275e12, 2400e9 / 8),
    "v5e": Generation("v5e", "v5e", "default", 1, 15.75, "TPU v5 lite", 197e12, 1600e9 / 8),
    "v5p": Generation("v5p", "v5", "megacore", 2, 95.74, "TPU v5", 459e12, 4800e9 / 8),
    "v6e": Generation("v6e", "v6e", "default", 1, 31.25, "TPU v6 lite", 918e12, 3584e9 / 8),
}
# Chip topologies by slice size (the number in the name). 3-D tori for v4/v5p, 2-D for v5e/v6e.
_TOPOLOGIES_3D = {8: (2, 2, 1), 16: (2, 2, 2), 32: (2, 2, 4), 64: (2, 4, 4), 128: (4, 4, 4), 256: (4, 4, 8),
                  512: (4, 8, 8), 1024: (8, 8, 8), 2048: (8, 8, 16), 4096: (8, 16, 16)}
_TOPOLOGIES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # "v5p-64"
    generation: Generation
    topology: tuple[int, ...]  # chips along each torus axis

    @property
    def chips(self) -> int:
        count = 1
        for size in self.topology:
            count *= size
        return count

    @property
    def hbm_gib(self) -> float:
        """HBM per chip a program may use (= per JAX device: a megacore chip is one device)."""
        return self.generation.hbm_gib

    @property
    def topology_name(self) -> str:
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.topology))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis: v5e/v6e slices of up to 8 chips are one host (the 1-, 4- and 8-chip VM
        types), larger ones hosts of 4 chips (2x2), as every v4/v5p host."""
        if len(self.topology) == 2 and self.chips <= 8:
            return self.topology + (1,)
        return (2, 2, 1)


def _all_slices() -> dict[str, TpuSlice]:
    slices = {}
    for gen in GENERATIONS.values():
        table = _TOPOLOGIES_3D if gen.cores_per_chip == 2 else _TOPOLOGIES_2D
        for size, topology in table.items():
            slices[f"{gen.name}-{size}"] = TpuSlice(f"{gen.name}-{size}", gen, topology)
    return slices


SLICES: dict[str, TpuSlice] = _all_slices()


def tpu_slice(name: str) -> TpuSlice:
    """The slice called `name` ("v5p-64"); ValueError listing the known names otherwise."""
    if name not in SLICES:
        raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)}")
    return SLICES[name]


def parse_target(target: str) -> TpuSlice:
    """A `--target` value "tpu:NAME" -> its slice; ValueError naming the known targets otherwise."""
    platform, _, name = target.partition(":")
    if platform != "tpu" or not name:
        raise ValueError(f"unknown target {target!r}: expected tpu:NAME with NAME one of {', '.join(SLICES)}")
    return tpu_slice(name)


def libtpu_problem() -> Optional[str]:
    """Why the TPU compiler cannot be loaded here (one line), or None when it can."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return None
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed (pip install -e '.[tpu-aot]' installs the TPU compiler matching jax)"
    return None


def compile_only_devices(tpu: TpuSlice) -> list[jax.Device]:
    """The slice's devices for AOT compilation (no TPU needed; they cannot run anything). RuntimeError (one line)
    when libtpu is missing."""
    problem = libtpu_problem()
    if problem:
        raise RuntimeError(f"cannot compile for {tpu.name}: {problem}")
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile on its first load so that one process drives the chips; compiling drives
    # none, and two compiling processes (pytest workers, a benchmark beside the tests) must not lock each other out.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology_name,
                                        chip_config_name=tpu.generation.chip_config,
                                        chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=1)
    devices = list(desc.devices)
    if len(devices) != tpu.chips:
        raise RuntimeError(f"libtpu describes {tpu.name} ({tpu.topology_name}) with {len(devices)} devices, "
                           f"expected {tpu.chips}")
    return devices
