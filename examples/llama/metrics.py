"""What a run records as it trains: the metrics log and the throughput.

``metrics.jsonl`` holds one JSON record per line: every step's loss,
gradient norm, learning rate and energy fractions (and ``skipped`` when
``--skip-nonfinite`` dropped its update), the tokens/s of each logging
interval, and the evaluations; TensorBoard events repeat them when
``tensorboardX`` is installed. The host reads a step's metrics only every
``--log-every`` steps (:func:`record_losses`), so logging never waits for the
device in between. Each line is written out as it is recorded, so the file
can be followed while the run trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

try:
  import tensorboardX
except ImportError:
  tensorboardX = None

# The files a run writes to ``--out-dir`` (besides TensorBoard's).
OUTPUTS = ("metrics.jsonl", "summary.json", "loss.png")


class MetricsLog:
  """``metrics.jsonl`` (and TensorBoard events): one JSON record per line.

  On a resumed run the records up to the restored step are kept and the rest
  dropped, so the file describes one run however often it was resumed.
  Nothing is written until the first record, so a run that fails before its
  first step leaves the directory as it found it.
  """

  def __init__(self, out_dir: Path, start_step: int, enabled: bool):
    """Reads ``out_dir/metrics.jsonl``, keeping the records up to
    ``start_step``.

    Args:
      out_dir: the output directory (created by the first record).
      start_step: the step the run starts from (0, or the restored step).
      enabled: write files (False on all processes but the first).
    """
    self.out_dir, self.start_step, self.enabled = out_dir, start_step, enabled
    self.path = out_dir / "metrics.jsonl"
    self.records: list[dict[str, Any]] = []
    if start_step and self.path.exists():
      with self.path.open() as f:
        self.records = [
          r for r in map(json.loads, f) if r["step"] <= start_step
        ]
    self._file = None
    self._tensorboard = None

  def _open(self) -> None:
    """Replaces the files of an earlier run, or of the steps after
    ``start_step``."""
    earlier = [name for name in OUTPUTS if (self.out_dir / name).exists()]
    if earlier and not self.start_step:
      tqdm.write(
        f"{self.out_dir}: replacing an earlier run's {', '.join(earlier)}"
      )
    self.out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS[1:]:  # they describe a run that reached its end
      (self.out_dir / name).unlink(missing_ok=True)
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
    self._file = self.path.open("a", buffering=1)  # line by line
    if tensorboardX is not None:
      self._tensorboard = tensorboardX.SummaryWriter(str(self.out_dir))

  def write(self, record: dict[str, Any]) -> None:
    """Appends ``record`` (it must have a ``step``)."""
    if self.enabled and self._file is None:
      self._open()
    self.records.append(record)
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for name, value in record.items():
        if name != "step" and value is not None:
          self._tensorboard.add_scalar(name, value, record["step"])

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._file is not None:
      self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


class Throughput:
  """Tokens per second over the training steps, without compilation, evaluation
  and saving.

  :meth:`lap` is called each time the host has waited for the device; the
  first lap (the compilation) is not counted, and :meth:`restart` drops the
  time spent since the last lap (evaluating, saving).
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.steps = 0
    self.seconds = 0.0
    self._clock: float | None = None

  def lap(self, steps: int) -> float | None:
    """Ends a lap of ``steps`` steps; returns its tokens/s (``None`` for the
    first)."""
    now = time.perf_counter()
    rate = None
    if self._clock is not None:
      self.steps += steps
      self.seconds += now - self._clock
      rate = steps * self.tokens_per_step / (now - self._clock)
    self._clock = now
    return rate

  def restart(self) -> None:
    """Starts the next lap now, if timing has started."""
    if self._clock is not None:
      self._clock = time.perf_counter()

  @property
  def tokens_per_sec(self) -> float | None:
    """Average over all counted laps."""
    if not self.seconds:
      return None
    return self.steps * self.tokens_per_step / self.seconds


def record_losses(
  pending: Sequence[tuple[int, dict[str, jax.Array]]],
  metrics: MetricsLog,
  throughput: Throughput,
  bar: tqdm,
) -> list[dict[str, Any]]:
  """Waits for the metrics of the ``pending`` steps and records them.

  Each step's metrics (loss, gradient norm, energy fractions, learning rate)
  go to ``metrics``; the throughput of the lap, and the last loss, to the
  progress bar.

  Returns:
    The steps' records, in order.
  """
  values = jax.device_get([m for _, m in pending])
  rate = throughput.lap(len(pending))
  steps = [step for step, _ in pending]
  records = []
  for step, step_metrics in zip(steps, values, strict=True):
    record: dict[str, Any] = {"step": step}
    for k, v in step_metrics.items():
      if v.dtype == bool:  # a flag (skipped), logged where it is set
        if v:
          record[k] = True
      # The energy fractions are NaN before the first subspace exists: not
      # logged. A NaN loss is.
      elif not (k.startswith("energy_") and np.isnan(v)):
        record[k] = float(v)
    metrics.write(record)
    records.append(record)
  if rate is not None:
    metrics.write({"step": steps[-1], "tokens_per_sec": rate})
    last = values[-1]["loss"]
    bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
  bar.update(len(pending))
  return records
