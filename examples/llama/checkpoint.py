"""Checkpoints of a training run, with orbax.

A checkpoint holds four items: ``model`` (the parameters), ``optimizer`` (the
whole optimizer state: moments, subspace bases, PRNG key and step counts),
``data`` (the position of the training data iterator, JSON) and ``config``
(the run's configuration, JSON). Restoring all four continues a run exactly
where it stopped: the losses of a resumed run equal those of an
uninterrupted one, bit for bit, when nothing but :data:`RESUMABLE_FIELDS`
changed.

A checkpoint is only resumed by a run with the same configuration; fields
that change the result (model, optimizer, rank, batch, sequence length,
schedule, seed, ...) must match, and a mismatch is reported, field by field,
before anything is written. A damaged checkpoint (a file missing or
unreadable) is passed over for the one before it, with a warning.

In a multi-process run every process saves and restores together: orbax
writes each array's shards from the process that holds them, and the data
position, of which each process knows its own streams', is gathered first
and written once.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from examples.llama.errors import UserError, check_writable_directory

# Flags that may change between a run and its resumption: where things are
# written or read, how often, and how the work is laid out on devices.
# ``mesh`` and ``remat`` change the order of floating-point operations, so a
# run resumed with another value continues correctly but not bit for bit.
RESUMABLE_FIELDS = frozenset(
  {
    "data_dir",
    "eval_every",
    "eval_batches",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "out_dir",
    "mesh",
    "remat",
    "fused_update",  # the same update, one block at a time
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "log_every",
    "dry_run",
    # a finite step is the same with it, bit for bit: a diverged run resumes
    # its last good checkpoint with skipping on
    "skip_nonfinite",
  }
)

# How many checkpoints are kept (the latest ones).
MAX_TO_KEEP = 3


class ConfigMismatchError(UserError):
  """The checkpoint to resume was made with a different configuration."""


def _json_value(value: Any) -> Any:
  """A JSON-friendly form of a config value (dtypes by name)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return jnp.dtype(value).name


def run_config(train_config, model_config) -> dict[str, dict[str, Any]]:
  """The JSON record of a run's configuration stored with its checkpoints.

  Args:
    train_config: the run's ``TrainConfig``.
    model_config: the run's ``LlamaConfig``.

  Returns:
    ``{"train": {...}, "model": {...}}``.
  """
  return {
    "train": {
      k: _json_value(v) for k, v in dataclasses.asdict(train_config).items()
    },
    "model": {
      f.name: _json_value(getattr(model_config, f.name))
      for f in dataclasses.fields(model_config)
    },
  }


def config_differences(
  saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]
) -> list[str]:
  """The fields that differ between two :func:`run_config` records.

  Fields in :data:`RESUMABLE_FIELDS` (and the model's ``remat``) are ignored.

  Returns:
    One line per differing field: ``"rank: checkpoint 32, now 16"``.
  """
  lines = []
  for section, skip in (("train", RESUMABLE_FIELDS), ("model", {"remat"})):
    old, new = saved.get(section, {}), current[section]
    for name in sorted(set(old) | set(new)):
      if name in skip or old.get(name) == new.get(name):
        continue
      label = name if section == "train" else f"model.{name}"
      lines.append(
        f"{label}: checkpoint {old.get(name)!r}, now {new.get(name)!r}"
      )
  return lines


class Checkpointer:
  """Saves and restores a run's checkpoints in one directory.

  Opening it checks the directory against the run: a directory that already
  holds checkpoints is only used with ``resume=True``, and then only if the
  checkpoint resumed was made with the same configuration. Both checks
  happen before anything is written; the directory is created by the first
  save.
  """

  def __init__(
    self, directory: str, config: dict[str, dict[str, Any]], *, resume: bool
  ):
    """Opens ``directory`` for the run described by ``config``.

    Args:
      directory: the checkpoint directory.
      config: the run's :func:`run_config`.
      resume: whether the run continues from the latest checkpoint.

    Raises:
      UserError: ``directory`` cannot be a writable directory, or it holds
        checkpoints and ``resume`` is False.
    """
    check_writable_directory(directory, "--checkpoint-dir")
    self.directory = Path(directory).resolve()
    self.config = json.loads(json.dumps(config))
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=MAX_TO_KEEP, create=False
      ),
    )
    # Steps found damaged on restoring, deleted by the first save: orbax saves
    # no step at or below its latest one, and keeps the latest ones.
    self._damaged: list[int] = []
    latest = self.manager.latest_step()
    if latest is not None and not resume:
      self.manager.close()
      raise UserError(
        f"{directory} already holds checkpoints (latest: step {latest}). Pass"
        " --resume to continue that run, or choose another --checkpoint-dir."
      )

  def restore_latest(
    self, abstract_state, shardings
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """The latest readable checkpoint: its step, training state and data
    position.

    A checkpoint that cannot be read is passed over for the one before it,
    with a warning.

    Args:
      abstract_state: the state's pytree of ``jax.ShapeDtypeStruct``.
      shardings: where each array goes (the run's mesh may differ from the
        one that saved it).

    Returns:
      ``(step, state, data_state)``, the state of the same type as
      ``abstract_state``; ``None`` when the directory holds no checkpoint.

    Raises:
      ConfigMismatchError: the checkpoint was made with another configuration.
      UserError: no checkpoint can be read; the message names the latest.
      Both close the checkpointer.
    """
    try:
      return self._restore_latest(abstract_state, shardings)
    except UserError:
      self.close()
      raise

  def _restore_latest(
    self, abstract_state, shardings
  ) -> tuple[int, Any, dict[str, Any]] | None:
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state,
      shardings,
    )
    damaged: dict[int, Exception] = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self._read(step, config=ocp.args.JsonRestore()).config
      except Exception as err:  # orbax and tensorstore raise many types
        damaged[step] = err
        continue
      differences = config_differences(saved, self.config)
      if differences:
        raise ConfigMismatchError(
          f"cannot resume from {self.directory} (step {step}): it was made"
          " with a different configuration:\n  "
          + "\n  ".join(differences)
          + "\nResume with the same settings, or choose another"
          " --checkpoint-dir."
        )
      try:
        restored = self._read(
          step,
          model=ocp.args.StandardRestore(target.model),
          optimizer=ocp.args.StandardRestore(target.optimizer),
          data=ocp.args.JsonRestore(),
        )
      except Exception as err:  # the configuration matched: the files are bad
        damaged[step] = err
        continue
      for bad, err in damaged.items():
        warnings.warn(
          f"checkpoint step {bad} in {self.directory} is damaged"
          f" ({_first_line(err)}); resuming from step {step}. Step {bad} is"
          " deleted at the first save.",
          stacklevel=2,
        )
      self._damaged = list(damaged)
      state = type(abstract_state)(
        model=restored.model, optimizer=restored.optimizer
      )
      return step, state, restored.data
    if not damaged:
      return None
    latest, err = next(iter(damaged.items()))
    raise UserError(
      f"cannot resume from {self.directory}: checkpoint step {latest} is"
      f" damaged ({_first_line(err)}), and no earlier one is readable."
    ) from err

  def _read(self, step: int, **items):
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def save(self, step: int, state, data_state: dict[str, Any]) -> None:
    """Starts saving ``state`` (a ``TrainState``) and the data position at
    ``step``.

    Every process calls it, with its own part of the data position (a dict
    whose keys no other process's has); the checkpoint holds their union.
    The arrays are copied off the devices before this returns, so the state
    can be donated to the next step; the files are written in the background.
    """
    for damaged in self._damaged:
      self.manager.delete(damaged)
    self._damaged = []
    self.manager.save(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardSave(state.model),
        optimizer=ocp.args.StandardSave(state.optimizer),
        data=ocp.args.JsonSave(union_over_processes(data_state)),
        config=ocp.args.JsonSave(self.config),
      ),
    )

  def close(self) -> None:
    """Waits for the last save to be written."""
    self.manager.wait_until_finished()
    self.manager.close()


def union_over_processes(part: dict[str, Any]) -> dict[str, Any]:
  """The union of every process's ``part`` (JSON-friendly dicts); every process
  calls it."""
  if jax.process_count() == 1:
    return part
  encoded = np.frombuffer(json.dumps(part).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: encoded.size] = encoded
  union: dict[str, Any] = {}
  rows = multihost_utils.process_allgather(padded)
  for size, row in zip(sizes[:, 0], rows, strict=True):
    union.update(json.loads(row[:size].tobytes()))
  return union


def _first_line(err: Exception, limit: int = 160) -> str:
  """``"Type: message"``, its first line cut to ``limit`` characters, for
  one-line reports."""
  lines = str(err).strip().splitlines()
  first = lines[0] if lines else ""
  if len(first) > limit:
    first = first[:limit] + "..."
  return f"{type(err).__name__}: {first}" if first else type(err).__name__
