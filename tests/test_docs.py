"""The documentation builds with no warning, its examples run, and its API
pages cover every public name of grassjax.

Builds ``docs/`` as CI and the README do (``sphinx -W``), once for the module,
into a temporary directory.
"""

import html as htmllib
import importlib
import inspect
import pathlib
import re
import subprocess
import sys
import zlib

import pytest

import grassjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = (
  "alias",
  "transform",
  "subspace",
  "layout",
  "moments",
  "recovery",
  "quantization",
  "diagnostics",
)


def _sphinx(builder: str, out: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "-q", "-b", builder, "docs", out],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("html")
  build = _sphinx("html", out)
  assert build.returncode == 0, build.stdout + build.stderr
  return out


def _documented(html: pathlib.Path) -> set[str]:
  """The Python objects of the build's ``objects.inv`` (version 2: four
  header lines, then zlib-compressed lines ``name domain:role ...``)."""
  data = (html / "objects.inv").read_bytes()
  body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
  return {
    line.split()[0]
    for line in body.splitlines()
    if line.split()[1].startswith("py:")
  }


def _public_names() -> set[str]:
  """Every top-level export and every public function and class of
  grassjax's modules, by the name users write: ``grassjax.X`` for a
  top-level export, ``grassjax.module.X`` otherwise."""
  exported = {
    id(getattr(grassjax, name)): f"grassjax.{name}"
    for name in grassjax.__all__
    if not inspect.ismodule(getattr(grassjax, name))
  }
  names = set(exported.values())
  for module_name in MODULES:
    module = importlib.import_module(f"grassjax.{module_name}")
    for name, value in vars(module).items():
      if name.startswith("_"):
        continue
      defined_here = getattr(value, "__module__", None) == module.__name__
      if (inspect.isfunction(value) or inspect.isclass(value)) and defined_here:
        names.add(exported.get(id(value), f"{module.__name__}.{name}"))
  return names


def test_the_html_build_has_no_warning_and_covers_every_public_name(html):
  missing = _public_names() - _documented(html)
  assert not missing, f"public names without an API entry: {sorted(missing)}"


def test_the_pages_of_the_repository_are_in_the_site(html):
  for page in (
    "index.html",
    "README.html",
    "examples/llama/README.html",
    "notebooks/quickstart.html",
    "guides/coming_from_optax_galore.html",
    "api/optimizers.html",
    "benchmarks/results/memory-gpu-h100-80gb.html",
  ):
    assert (html / page).is_file(), page
  # The notebooks are shown with their stored outputs, plots included.
  assert "<img" in (html / "notebooks/geometry.html").read_text()


def test_type_aliases_are_written_by_name_not_expanded(html):
  markup = (html / "api/optimizers.html").read_text()
  text = htmllib.unescape(re.sub(r"<[^>]+>", "", markup))
  for alias in ("optax.ScalarOrSchedule", "grassjax.layout.MaskOrFn"):
    assert alias in text, alias
  # optax.ScalarOrSchedule's expansion, from annotations kept as objects.
  assert "Callable[[Array" not in text


def test_the_doctests_pass(tmp_path):
  build = _sphinx("doctest", tmp_path)
  assert build.returncode == 0, build.stdout + build.stderr
  report = (tmp_path / "output.txt").read_text()
  assert "0 failures in tests" in report, report
