"""grassjax's annotations hold: mypy, configured in pyproject.toml, passes on
the package (which ships py.typed, so users' checkers read them)."""

import pathlib

from mypy import api

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mypy_passes_on_grassjax():
  stdout, stderr, status = api.run(
    ["--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "grassjax")]
  )
  assert status == 0, stdout + stderr


def test_the_package_is_marked_typed():
  assert (ROOT / "grassjax" / "py.typed").is_file()
