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
before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

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
    "log_every",
    "dry_run",
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
    "train": {k: _json_value(v) for k, v in dataclasses.asdict(train_config).items()},
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
      lines.append(f"{label}: checkpoint {old.get(name)!r}, now {new.get(name)!r}")
  return lines


class Checkpointer:
  """Saves and restores a run's checkpoints in one directory.

  Opening it checks the directory against the run: a directory that already
  holds checkpoints is only used with ``resume=True``, and then only if its
  latest checkpoint was made with the same configuration. Both checks happen
  before anything is written; the directory is created by the first save.
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
      ConfigMismatchError: the latest checkpoint's configuration differs.
    """
    check_writable_directory(directory, "--checkpoint-dir")
    self.directory = Path(directory).resolve()
    self.config = json.loads(json.dumps(config))
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=False),
    )
    latest = self.manager.latest_step()
    if latest is not None and not resume:
      self.manager.close()
      raise UserError(
        f"{directory} already holds checkpoints (latest: step {latest}). Pass"
        " --resume to continue that run, or choose another --checkpoint-dir."
      )
    if latest is not None:
      saved = self.manager.restore(
        latest, args=ocp.args.Composite(config=ocp.args.JsonRestore())
      ).config
      differences = config_differences(saved, self.config)
      if differences:
        self.manager.close()
        raise ConfigMismatchError(
          f"cannot resume from {directory} (step {latest}): it was made with a"
          " different configuration:\n  "
          + "\n  ".join(differences)
          + "\nResume with the same settings, or choose another --checkpoint-dir."
        )

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint, ``None`` if there is none."""
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict[str, Any]) -> None:
    """Starts saving ``state`` (a ``TrainState``) and the data position at ``step``.

    The arrays are copied off the devices before this returns, so the state
    can be donated to the next step; the files are written in the background.
    """
    self.manager.save(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardSave(state.model),
        optimizer=ocp.args.StandardSave(state.optimizer),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(self.config),
      ),
    )

  def restore(self, step: int, abstract_state, shardings) -> tuple[Any, dict[str, Any]]:
    """The training state and data position saved at ``step``.

    Args:
      step: a saved step.
      abstract_state: the state's pytree of ``jax.ShapeDtypeStruct``.
      shardings: where each array goes (the run's mesh may differ from the
        one that saved it).

    Returns:
      ``(state, data_state)``, the state of the same type as ``abstract_state``.
    """
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state,
      shardings,
    )
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target.model),
        optimizer=ocp.args.StandardRestore(target.optimizer),
        data=ocp.args.JsonRestore(),
      ),
    )
    state = type(abstract_state)(model=restored.model, optimizer=restored.optimizer)
    return state, restored.data

  def close(self) -> None:
    """Waits for the last save to be written."""
    self.manager.wait_until_finished()
    self.manager.close()
