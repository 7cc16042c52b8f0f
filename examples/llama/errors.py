"""Bad input to the trainer: the exception its command line reports in one line.

Data, paths, flags and missing optional packages are the user's to fix, and
raise :class:`UserError` where they are found; ``main`` prints its message and
exits non-zero. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
  """Input the user can fix; the message says what is wrong and what to do."""


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
