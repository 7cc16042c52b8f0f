"""What stops a run before its last step: non-finite steps and stop signals.

Both are found where the host already reads from the device (the metrics,
every ``--log-every`` steps and before each evaluation and save), so they
cost the training loop no wait of its own:

* :class:`NonFiniteSteps` reads every step's loss and gradient norm from its
  metrics record; with ``--skip-nonfinite N`` the step itself drops a
  non-finite update on the device, and this counts the skips in a row.
* :class:`StopSignals` catches SIGTERM and SIGINT while the run trains; the
  run stops after a step that every process agrees on.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def _skips_in_a_row(records: Sequence[dict[str, Any]]) -> int:
  """How many of the last step records were skipped, in a row."""
  count = 0
  for record in reversed(records):
    if "loss" not in record:  # tokens/s, evaluations
      continue
    if not record.get("skipped"):
      break
    count += 1
  return count


class NonFiniteSteps:
  """Finds the step at which a run must stop for non-finite values.

  Without skipping (``limit`` 0), that is the first step whose loss or
  gradient norm is NaN or infinite. With ``limit`` N, such a step (or one
  whose new state is not finite) was skipped on the device, and the run
  stops at the (N + 1)-th skip in a row: a skip leaves the state as it was,
  so a run that takes a finite step again has recovered. The count goes on
  from the records a resumed run keeps.
  """

  def __init__(self, limit: int, records: Sequence[dict[str, Any]]):
    """Counts from ``records``, the metrics of the steps already taken."""
    self.limit = limit
    self.in_a_row = _skips_in_a_row(records)

  def check(
    self, records: Sequence[dict[str, Any]]
  ) -> tuple[list[tuple[int, int]], str | None]:
    """Reads the records of the next steps, in order.

    Returns:
      The steps skipped, each with the skips in a row up to it, and why the
      run stops (``"step 3: ..."``), or None.
    """
    skipped = []
    for record in records:
      step, loss, norm = record["step"], record["loss"], record["grad_norm"]
      if record.get("skipped"):
        self.in_a_row += 1
        if self.in_a_row > self.limit:
          return skipped, (
            f"step {step}: {self.in_a_row} non-finite steps in a row, more"
            f" than --skip-nonfinite {self.limit}"
          )
        skipped.append((step, self.in_a_row))
      elif not (math.isfinite(loss) and math.isfinite(norm)):
        return skipped, (
          f"step {step}: its loss is {loss} and its gradient norm {norm}"
        )
      else:
        self.in_a_row = 0
    return skipped, None


def _restore(signum: int, handler) -> None:
  # None: a handler that Python did not install, which it cannot put back.
  signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class StopSignals:
  """SIGTERM and SIGINT, caught while a run trains: the run finishes its step,
  saves and stops (``train.train`` raises ``errors.Preempted``).

  A context manager, entered by the command's ``main`` only. The first signal
  is recorded and its previous handler put back, so a second one acts at once
  as it would have (SIGINT raises ``KeyboardInterrupt``); leaving restores
  both handlers. A signal the process was started ignoring (``nohup``, a
  shell's background job ignores SIGINT) stays ignored.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    for signum in self.SIGNALS:
      if signal.getsignal(signum) is not signal.SIG_IGN:
        self._previous[signum] = signal.signal(signum, self._catch)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      _restore(signum, handler)
    self._previous = {}

  def _catch(self, signum: int, frame: FrameType | None) -> None:
    self.received = signum
    _restore(signum, self._previous[signum])

  def agreed(self, read_now: bool) -> int | None:
    """The signal the run stops for after this step, or None.

    One process stops after the step during which it was signalled. Several
    agree at the steps where they read the metrics (``read_now``, the same
    steps in every process): they gather what each received, so all stop
    and save after the same step, at most ``--log-every`` steps after the
    first was signalled.
    """
    if jax.process_count() == 1:
      return self.received
    if not read_now:
      return None
    received = multihost_utils.process_allgather(np.int32(self.received or 0))
    return int(received.max()) or None
