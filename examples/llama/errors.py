"""What the trainer's command lines report in one line: bad input, and runs
that stop early.

Data, paths, flags and missing optional packages are the user's to fix, and
raise :class:`UserError` where they are found; a run that stops before its
last step raises a :class:`RunStopped` (a non-finite step, or a stop
signal). Every command that runs the trainer wraps its ``main`` in
:func:`reports_user_errors`, which prints the message and exits with status 1
for a :class:`UserError`, or the :class:`RunStopped`'s own. Every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class UserError(Exception):
  """Input the user can fix; the message says what is wrong and what to do."""


class RunStopped(Exception):
  """A run that stopped before its last step; ``status`` is the command's exit
  status."""

  status: int


# The exit status of a run stopped by a non-finite step (1 is bad input, 2 a
# bad flag; a stop signal's is 128 + its number, as a shell reports a process
# that the signal ended).
NONFINITE_STATUS = 3


class NonFiniteError(RunStopped):
  """A step's loss, gradient norm or state was not finite (NaN or inf)."""

  status = NONFINITE_STATUS


class Preempted(RunStopped):
  """A stop signal (SIGTERM, SIGINT) ended the run after a step, its
  checkpoint and outputs written."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.status = 128 + signum


def reports_user_errors(
  prog: str,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
  """Makes a command's ``main`` report a :class:`UserError` or a
  :class:`RunStopped` in one line.

  For a :class:`UserError` the decorated function raises
  ``SystemExit("<prog>: error: <message>")`` instead, which Python prints to
  stderr, without a traceback, and exits with status 1 (the form of
  argparse's errors, which exit with 2). A :class:`RunStopped` prints
  ``<prog>: <message>`` to stderr and exits with its ``status``.

  Args:
    prog: the command, as its usage line names it
      (``"python -m examples.llama.train"``).
  """

  def decorate(main: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(main)
    def reporting(*args: P.args, **kwargs: P.kwargs) -> R:
      try:
        return main(*args, **kwargs)
      except UserError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
      except RunStopped as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(err.status) from None

    return reporting

  return decorate


def check_writable_directory(path: str | Path, flag: str) -> None:
  """Checks that ``path`` is, or can be created as, a writable directory.

  Nothing is created: a run checks its paths before its first step and
  writes nothing until it has started.

  Raises:
    UserError: ``path`` or one of its parents is a file, or the deepest
      existing one is not writable.
  """
  path = Path(path).absolute()
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f"{flag} {path}: {existing} is a file, not a directory.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {path}: {existing} is not writable.")
