"""Device meshes and shardings for the three layouts of ``--mesh``.

* ``none``: one device.
* ``dp``: data parallel; the batch is split over all devices, the
  parameters and optimizer state are replicated.
* ``fsdp``: fully sharded; the batch is split over all devices and every
  matrix (or stack of matrices) of the training state is sharded on its
  largest dimension that the device count divides. Vectors and scalars (norm
  scales, PRNG keys, step counts, recovery norms) are replicated: splitting
  them saves nothing.

In a multi-process run (``--distributed``, :func:`start_distributed`) the
mesh spans every process's devices; each process holds the rows of the batch
that its own devices hold (:func:`process_rows`), and only reads those.

The rule for ``fsdp`` looks at each state array's own shape, not at the
parameter it belongs to: GrassWalk's moments of a projected ``(m, n)`` kernel
are ``(r, n)`` and its basis is ``(m, r)``, and each is split on whichever of
its own axes is largest. A quantized moment's codes and scales are split
along one axis that divides both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from examples.llama import config as config_lib
from examples.llama.errors import UserError


def make_mesh(kind: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of ``--mesh``: a one-device mesh for ``none``, all devices
  otherwise.

  Args:
    kind: ``"none"``, ``"dp"`` or ``"fsdp"``.
    devices: the devices to span; default ``jax.devices()``. A compile-only
      step (``--dry-run --target``) passes an accelerator's topology.

  Returns:
    A one-axis mesh, its axis named ``"data"`` (none, dp) or ``"fsdp"``.

  Raises:
    UserError: ``none`` in a multi-process run.
  """
  if devices is None:
    if kind == "none" and jax.process_count() > 1:
      raise UserError(
        "--mesh none trains on one device, and this run has"
        f" {jax.process_count()}"
        " processes: a multi-process run needs --mesh dp or fsdp."
      )
    devices = jax.devices()
  if kind == "none":
    return Mesh(np.array(devices[:1]), ("data",))
  return Mesh(np.array(devices), ("fsdp" if kind == "fsdp" else "data",))


_CPU_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def start_distributed(cfg: config_lib.TrainConfig) -> None:
  """Joins the processes of a multi-process run; call before JAX uses a device.

  ``--coordinator-address``, ``--num-processes`` and ``--process-id`` say
  where the coordinator is, how many processes there are and which one this
  is; when they are not given, they are taken from the cluster: JAX detects
  SLURM, Open MPI, Cloud TPU and Kubernetes jobs, and reads
  ``JAX_COORDINATOR_ADDRESS``. On CPU the processes' collectives run over TCP
  with gloo, so processes on one machine or several form one mesh: recent jax
  versions default to it, the 0.4 versions this project accepts to no
  cross-process collectives at all, hence the explicit setting.

  With XLA:CPU's concurrency-optimized scheduler (its default), processes
  that update the low-rank optimizers' bases under ``--mesh fsdp``
  (collectives inside conditionals) can run those collectives in different
  orders, and gloo aborts on the mismatched messages; with that scheduler
  off, as here unless ``XLA_FLAGS`` names it, no run tried did.

  Raises:
    UserError: nothing given and no cluster to take it from.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if _CPU_SCHEDULER_FLAG not in xla_flags:
    os.environ["XLA_FLAGS"] = (
      f"{xla_flags} --{_CPU_SCHEDULER_FLAG}=false".strip()
    )
  try:
    jax.distributed.initialize(
      cfg.coordinator_address, cfg.num_processes, cfg.process_id
    )
  except ValueError as err:  # what the cluster detection could not find
    raise UserError(
      f"--distributed found no cluster to join ({err}): pass"
      " --coordinator-address HOST:PORT, --num-processes and --process-id."
    ) from err


def batch_sharding(mesh: Mesh, batch_axis: int, ndim: int) -> NamedSharding:
  """Splits axis ``batch_axis`` of an ``ndim``-dimensional batch over the
  mesh."""
  spec = [None] * ndim
  spec[batch_axis] = mesh.axis_names[0]
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device of the mesh."""
  return NamedSharding(mesh, P())


def fsdp_spec(
  shape: tuple[int, ...],
  num_devices: int,
  axis_name: str,
  also: tuple[int, ...] | None = None,
) -> P:
  """Shards the largest dimension that ``num_devices`` divides; vectors
  replicate.

  With ``also`` (a second shape of the same rank) only dimensions it too
  can split along are candidates, so that two arrays read together are
  split alike.
  """
  if len(shape) < 2:
    return P()
  divisible = [
    d
    for d, size in enumerate(shape)
    if size % num_devices == 0 and (also is None or also[d] % num_devices == 0)
  ]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda d: shape[d])
  return P(*(axis_name if d == axis else None for d in range(len(shape))))


def _key_name(entry) -> object:
  return getattr(entry, "key", getattr(entry, "name", None))


def _quantized_pair(path: tuple, leaves: dict) -> tuple | None:
  """``(codes, scales)``, the abstract arrays of the quantized moment that
  the leaf at ``path`` is one half of; None for any other leaf."""
  for i, entry in enumerate(path):
    other = {"codes": "scales", "scales": "codes"}.get(_key_name(entry))
    if other is None:
      continue
    swapped = (*path[:i], type(entry)(other), *path[i + 1 :])
    if swapped in leaves:
      pair = (leaves[path], leaves[swapped])
      return pair if other == "scales" else pair[::-1]
  return None


def state_shardings(abstract_state, mesh: Mesh, kind: str):
  """A sharding for every array of the training state.

  A quantized moment's codes and scales (the two trees of a
  ``grassjax.quantization.QuantizedArray``, one scale per block of the
  codes' last axis) are split along the same axis, one that divides both, so
  that every block and its scale sit on one device and the step dequantizes
  without moving either.

  Args:
    abstract_state: the state's pytree of ``jax.ShapeDtypeStruct``.
    mesh: from :func:`make_mesh`.
    kind: ``--mesh``.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``abstract_state``.
  """
  if kind != "fsdp":
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  axis_name = mesh.axis_names[0]
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  leaves = dict(flat)

  def sharding(path, x):
    pair = _quantized_pair(path, leaves)
    if pair is None:
      return NamedSharding(mesh, fsdp_spec(x.shape, mesh.size, axis_name))
    codes, scales = pair
    spec = fsdp_spec(codes.shape, mesh.size, axis_name, also=scales.shape)
    return NamedSharding(mesh, spec)

  return treedef.unflatten([sharding(path, x) for path, x in flat])


def put(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host batch as a global array; each process keeps only its devices'
  parts."""
  return jax.make_array_from_callback(
    batch.shape, sharding, lambda index: batch[index]
  )


def process_rows(
  sharding: NamedSharding, shape: tuple[int, ...], axis: int
) -> list[int]:
  """The indices along ``axis`` of a ``shape`` array that this process's devices
  hold."""
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[axis].indices(shape[axis])))
  return sorted(rows)
