"""Compile targets: the devices a step is compiled for with ``--target``.

A target is a device kind and a count (``gpu-h100-80gb``, ``gpu-l4:8``,
``tpu-v5e``, ``tpu-v5e:16``, ``tpu-v5p:2x2x1``) or the local ``cpu``. Its
devices come from the accelerator's own compiler, ahead of time, with no
device attached:

* **TPU**: libtpu's topology description (``jax[tpu]``):
  ``get_topology_desc(topology_name="v5e:4x4", platform="tpu")``. The TPU
  compiler checks a program against the chip's HBM and refuses one that does
  not fit (:class:`CompileRefused`).
* **GPU**: the CUDA plugin's deviceless compiler (``jax-cuda12-plugin``), given
  a ``GpuTargetConfig`` that describes the device. The compiler does not check
  the device's memory; :func:`gpu_fit` judges a fit, counting what the
  runtime itself takes.

Each device's description is data: ``devices/<name>.json``, written from the
vendor's published specification, which its ``source`` names. The same file
gives the published memory bandwidth and peak flops for rooflines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from examples.llama.errors import UserError

DEVICES_DIR = Path(__file__).absolute().parent / "devices"
GiB = 2**30

# Software the deviceless GPU compiler is told the device has. These pick
# library paths (cuDNN fusions, CUDA graph support), not memory: the versions
# jax-cuda12-plugin is built against.
CUDA_RUNTIME = (12, 8, 0)
CUDNN = (9, 8, 0)

# What a JAX process on a GPU takes outside XLA's buffers: the CUDA context
# with the cuBLAS and cuDNN handles and workspaces. An estimate: it depends
# on the driver, the libraries and the GPU; JAX's own guidance leaves it
# room by preallocating 75% of the memory, not all of it.
CUDA_RUNTIME_RESERVE = 1 * GiB
# JAX's default preallocation: XLA_PYTHON_CLIENT_MEM_FRACTION of the memory.
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """One device kind, as its ``devices/<name>.json`` describes it."""

  name: str
  platform: str  # "gpu" or "tpu"
  device: str
  source: str
  memory_gib: float
  bandwidth_gb_s: float
  peak_tflops: dict[str, float]
  compute_capability: tuple[int, int] | None = None
  gpu_device_info: dict[str, Any] | None = None
  chip: str | None = None  # the TPU's topology prefix, e.g. "v5e"
  topology_dims: int | None = None  # 2 (v5e, v6e) or 3 (v4, v5p)

  @property
  def memory_bytes(self) -> int:
    return int(self.memory_gib * GiB)

  @property
  def bandwidth(self) -> float:
    """Published memory bandwidth, bytes per second."""
    return self.bandwidth_gb_s * 1e9

  def peak_flops(self, dtype: str = "bfloat16") -> float:
    """Published peak (dense) flops per second for ``dtype``."""
    return self.peak_tflops[dtype] * 1e12


def device_specs() -> dict[str, DeviceSpec]:
  """Every device kind in ``devices/``, by name."""
  specs = {}
  for path in sorted(DEVICES_DIR.glob("*.json")):
    data = json.loads(path.read_text())
    if "compute_capability" in data:
      data["compute_capability"] = tuple(data["compute_capability"])
    specs[data["name"]] = DeviceSpec(**data)
  return specs


def gpu_target_config(spec: DeviceSpec) -> str:
  """The ``GpuTargetConfig`` text proto of a GPU, for the deviceless
  compiler."""
  info = dict(spec.gpu_device_info)
  info["device_memory_size"] = spec.memory_bytes
  info["memory_bandwidth"] = int(spec.bandwidth)
  major, minor = spec.compute_capability
  lines = ["gpu_device_info {"]
  lines += [f"  {key}: {value}" for key, value in info.items()]
  lines += [
    f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
    "}",
    'platform_name: "CUDA"',
    f"dnn_version_info {{ major: {CUDNN[0]} minor: {CUDNN[1]}"
    f" patch: {CUDNN[2]} }}",
    f"runtime_version {{ major: {CUDA_RUNTIME[0]} minor: {CUDA_RUNTIME[1]}"
    f" patch: {CUDA_RUNTIME[2]} }}",
    f'device_description_str: "{spec.device}"',
  ]
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Target:
  """A ``--target``: a device kind and how many, or the local CPU.

  ``topology`` is the TPU slice (``"4x4"``) or the GPU hosts
  (``"1x1x8"``: slices x hosts x devices per host); ``count`` is the number
  of devices the step runs on (None for the CPU: this machine's devices).
  """

  name: str
  spec: DeviceSpec | None  # None: the local CPU
  count: int | None
  topology: str | None

  @property
  def platform(self) -> str:
    return "cpu" if self.spec is None else self.spec.platform

  def describe(self) -> str:
    if self.spec is None:
      return f"{jax.devices()[0].platform} (this machine)"
    where = f"{self.count} x " if self.count > 1 else "1 x "
    memory = f"{self.spec.memory_gib:g} GiB"
    return f"{where}{self.spec.device} ({memory} each)"

  def devices(self) -> list[jax.Device]:
    """The target's devices, from its compiler (no device needed).

    Raises:
      UserError: the compiler's package is not installed.
    """
    if self.spec is None:
      return list(jax.devices())
    compile_only()
    from jax.experimental import topologies

    if self.platform == "tpu":
      _require("libtpu", "jax[tpu]")
      topology = topologies.get_topology_desc(
        topology_name=f"{self.spec.chip}:{self.topology}", platform="tpu"
      )
    else:
      _require("jax_plugins.xla_cuda12", "jax-cuda12-plugin")
      topology = topologies.get_topology_desc(
        platform="cuda",
        target_config=gpu_target_config(self.spec),
        topology=self.topology,
      )
    return list(topology.devices[: self.count])


def compile_only() -> None:
  """Keeps JAX's own backend on the CPU, for compiling for another device.

  Call before JAX first uses a device: the CUDA plugin, where installed,
  would otherwise try to start on a GPU this machine may not have, fail,
  and leave no deviceless compiler behind; libtpu would look for a TPU, and
  refuse to load in a second process at once.
  """
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  jax.config.update("jax_platforms", "cpu")


def _require(module: str, package: str) -> None:
  import importlib.util

  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    raise UserError(
      f"compiling for this target needs {package}: pip install"
      f' "{package}=={jax.__version__}" (the installed jax\'s version).'
    )


def _tpu_topology(spec: DeviceSpec, count: int) -> str:
  """The smallest slice shape of ``count`` chips; one chip is taken from a
  2x2 (libtpu describes no smaller host)."""
  if count == 1:
    return "2x2" if spec.topology_dims == 2 else "2x2x1"
  if count & (count - 1):
    raise UserError(
      f"--target {spec.name}:{count}: a TPU slice has a power of two chips."
    )
  dims = [1] * spec.topology_dims
  for i in range(int(math.log2(count))):  # double the axes in turn
    dims[i % len(dims)] *= 2
  return "x".join(str(d) for d in sorted(dims))


def _gpu_topology(count: int) -> str:
  """One host up to 8 GPUs, hosts of 8 beyond."""
  if count <= 8:
    return f"1x1x{count}"
  if count % 8:
    raise UserError(f"{count} GPUs: more than 8 come in hosts of 8.")
  return f"1x{count // 8}x8"


def parse_target(text: str) -> Target:
  """The :class:`Target` of ``--target``.

  ``NAME`` (one device), ``NAME:COUNT``, or for a TPU ``NAME:SHAPE``
  (``tpu-v5e:4x4``, ``tpu-v5p:2x2x2``); ``cpu`` is this machine.

  Raises:
    UserError: an unknown device or a count it cannot have.
  """
  if text == "cpu":
    return Target("cpu", None, None, None)
  name, _, size = text.partition(":")
  specs = device_specs()
  if name not in specs:
    raise UserError(
      f"unknown --target {text!r}; choose cpu or one of {', '.join(specs)},"
      " optionally with :COUNT (or a TPU slice shape, e.g. tpu-v5e:4x4)."
    )
  spec = specs[name]
  if spec.platform == "tpu" and re.fullmatch(r"\d+(x\d+)+", size):
    dims = [int(d) for d in size.split("x")]
    if len(dims) != spec.topology_dims:
      raise UserError(
        f"--target {text}: a {spec.chip} slice has {spec.topology_dims}"
        " dimensions."
      )
    return Target(text, spec, math.prod(dims), size)
  if size and not (size.isdigit() and int(size) >= 1):
    raise UserError(
      f"--target {text}: the count after ':' is a positive integer."
    )
  count = int(size or 1)
  topology = (
    _tpu_topology(spec, count)
    if spec.platform == "tpu"
    else _gpu_topology(count)
  )
  return Target(text, spec, count, topology)


class CompileRefused(Exception):
  """The TPU compiler refused the program: it needs more HBM than the chip
  has."""

  def __init__(self, needed_bytes: int, available_bytes: int, message: str):
    super().__init__(message)
    self.needed_bytes = needed_bytes
    self.available_bytes = available_bytes


_SIZE = r"([\d.]+)([KMGT]?)"
_REFUSAL = re.compile(
  rf"total memory required.*?\({_SIZE}\).*?exceeds available HBM"
  rf" \({_SIZE}\)",
  re.S,
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refusal(err: Exception) -> CompileRefused | None:
  """The TPU compiler's out-of-memory refusal in ``err``, or None."""
  match = _REFUSAL.search(str(err))
  if "RESOURCE_EXHAUSTED" not in str(err) or match is None:
    return None
  needed = float(match[1]) * _UNITS[match[2]]
  available = float(match[3]) * _UNITS[match[4]]
  return CompileRefused(int(needed), int(available), str(err))


@dataclasses.dataclass(frozen=True)
class GpuFit:
  """Whether a step of ``peak`` bytes fits a GPU, and with which setting."""

  fits_default: bool  # with JAX's default preallocation (75%)
  fits: bool  # with the largest fraction the runtime reserve allows
  mem_fraction: float | None  # the XLA_PYTHON_CLIENT_MEM_FRACTION it needs
  spare_bytes: int  # memory left after the step and the runtime reserve


def gpu_fit(peak: int, spec: DeviceSpec) -> GpuFit:
  """Judges a GPU fit: XLA's buffers (``peak``) live in the pool JAX
  preallocates, ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.75) of the
  memory; the CUDA context and libraries (:data:`CUDA_RUNTIME_RESERVE`) need
  room outside it."""
  memory = spec.memory_bytes
  fraction = math.ceil(peak / memory * 100) / 100
  fits = fraction * memory + CUDA_RUNTIME_RESERVE <= memory
  return GpuFit(
    fits_default=peak <= DEFAULT_MEM_FRACTION * memory,
    fits=fits,
    mem_fraction=fraction if fits else None,
    spare_bytes=memory - CUDA_RUNTIME_RESERVE - peak,
  )


def fit_line(target: Target, peak: int) -> str:
  """One line: does a step of ``peak`` bytes per device fit ``target``?"""
  spec = target.spec
  if spec is None:
    fits = [f"{s} GiB" for s in (24, 40, 80) if peak <= s * GiB]
    return f"fits {', '.join(fits) if fits else 'none of 24, 40, 80 GiB'}"
  if spec.platform == "tpu":
    return (
      f"fits: {peak / GiB:.2f} of {spec.memory_gib:g} GiB HBM per chip (the"
      " TPU compiler checks this)"
    )
  fit = gpu_fit(peak, spec)
  if not fit.fits:
    return (
      f"does not fit: {peak / GiB:.2f} GiB per device, and {spec.memory_gib:g}"
      f" GiB less about {CUDA_RUNTIME_RESERVE / GiB:g} GiB for the CUDA"
      " runtime leaves"
      f" {(spec.memory_bytes - CUDA_RUNTIME_RESERVE) / GiB:.2f} GiB"
    )
  setting = (
    "with JAX's default preallocation (75%)"
    if fit.fits_default
    else f"with XLA_PYTHON_CLIENT_MEM_FRACTION={fit.mem_fraction:.2f} (JAX's"
    " default of 0.75 is too little)"
  )
  return (
    f"fits {setting}; {fit.spare_bytes / GiB:.2f} GiB to spare after about"
    f" {CUDA_RUNTIME_RESERVE / GiB:g} GiB for the CUDA runtime"
  )


def target_names() -> Sequence[str]:
  """``cpu`` and every device kind."""
  return ("cpu", *device_specs())
