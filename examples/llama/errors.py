"""Bad input to the trainer: the exception its command lines report in one line.

Data, paths, flags and missing optional packages are the user's to fix, and
raise :class:`UserError` where they are found; every command that runs the
trainer wraps its ``main`` in :func:`reports_user_errors`, which prints the
message and exits with status 1. Every other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class UserError(Exception):
  """Input the user can fix; the message says what is wrong and what to do."""


def reports_user_errors(
  prog: str,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
  """Makes a command's ``main`` report a :class:`UserError` in one line.

  The decorated function raises ``SystemExit("<prog>: error: <message>")``
  instead, which Python prints to stderr, without a traceback, and exits
  with status 1 (the form of argparse's errors, which exit with 2).

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
