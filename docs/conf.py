"""Sphinx configuration of grassjax's documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (and ``-b doctest``
for the docstrings' and guides' examples).

The README, the example's README, the notebooks and the benchmark results
are pages of the site as they are in the repository: each build copies them
into ``docs/`` at their paths relative to the repository's root (the copies
are not committed), so the relative links between them hold both on GitHub
and here.
"""

import functools
import importlib
import os
import shutil
import sys
from pathlib import Path

# JAX on the CPU, whatever compilers are installed (as in conftest.py): the
# doctests and autodoc imports need no accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.abspath(".."))

import grassjax

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
REPOSITORY_PAGES = (
  "README.md",
  "examples/llama/README.md",
  "benchmarks/results/*.md",
  "benchmarks/results/*.png",
  "notebooks/*.ipynb",
)


def _copy_repository_pages() -> None:
  """Copies each of ``REPOSITORY_PAGES`` to the same path under ``docs/``,
  and removes copies whose source is gone."""
  wanted = {
    DOCS / path.relative_to(ROOT): path
    for pattern in REPOSITORY_PAGES
    for path in ROOT.glob(pattern)
  }
  for top in ("examples", "benchmarks", "notebooks"):
    for stale in (DOCS / top).rglob("*"):
      if stale.is_file() and stale not in wanted:
        stale.unlink()
  for copy, source in wanted.items():
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
      copy.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(source, copy)


_copy_repository_pages()

project = "grassjax"
author = "grassjax authors"
copyright = "2026, grassjax authors"
release = version = grassjax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.doctest",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  "myst_nb",
]

root_doc = "index"
include_patterns = [
  "index.md",
  "api/*.rst",
  "guides/*.md",
  "guides/*.rst",
  "README.md",
  "examples/llama/README.md",
  "benchmarks/results/*.md",
  "notebooks/*.ipynb",
]
exclude_patterns = ["_build"]

# The notebooks are committed executed (the tests run them); the site shows
# their stored outputs rather than running them again.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# A NamedTuple's "Attributes:" become fields of its description (their
# types are in the prose), and its field accessors are not listed again.
napoleon_use_ivar = True
napoleon_attr_annotations = False
# The type aliases of the public API, written by their names rather than
# expanded into their unions (jax.typing.ArrayLike alone is a union of nine
# types). Not DTypeLike: autodoc writes an alias inside a union by its repr,
# and DTypeLike's own union is short.
TYPE_ALIASES = {
  name: name
  for name in (
    "optax.ScalarOrSchedule",
    "optax.Schedule",
    "optax.Params",
    "optax.Updates",
    "jax.typing.ArrayLike",
  )
} | {
  name: f"grassjax.{module}.{name}"
  for module, names in (
    ("layout", ("MaskOrFn", "DimensionNumbersOrFn", "ProjectedSide")),
    ("subspace", ("SvdMethod", "InitFn", "UpdateFn")),
  )
  for name in names
}
# Where annotations are strings (postponed evaluation), autodoc maps them.
autodoc_type_aliases = TYPE_ALIASES

add_module_names = False

html_theme = "sphinx_book_theme"
html_title = "grassjax"
html_theme_options = {"show_toc_level": 2}


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """Skips a NamedTuple's field accessors ("Alias for field number 0"): the
  class's own docstring describes its fields."""
  if what == "class" and (obj.__doc__ or "").startswith("Alias for field"):
    return True
  return None


@functools.cache
def _alias_expansions(mode: str) -> dict[str, str]:
  """Each alias of ``TYPE_ALIASES`` as autodoc writes it expanded, mapped to
  its name; the longest first, as an alias's expansion may hold a shorter
  one's."""
  from sphinx.util.typing import stringify_annotation

  expansions = {}
  for alias in TYPE_ALIASES.values():
    module, _, attribute = alias.rpartition(".")
    value = getattr(importlib.import_module(module), attribute)
    expansions[stringify_annotation(value, mode)] = alias
  return dict(sorted(expansions.items(), key=lambda e: -len(e[0])))


def _name_evaluated_aliases(app, what, name, obj, options, signature, retann):
  """Writes each alias by its name in the types autodoc recorded for ``obj``.

  ``grassjax.alias`` keeps its annotations objects (optax's suite reads
  ``learning_rate``'s), which ``autodoc_type_aliases`` cannot map: autodoc
  records them expanded, and this replaces each alias's expansion.
  """
  short = app.config.autodoc_typehints_format == "short"
  expansions = _alias_expansions("smart" if short else "fully-qualified")
  recorded = app.env.current_document.autodoc_annotations.get(name, {})
  for expansion, alias in expansions.items():
    for parameter, text in recorded.items():
      recorded[parameter] = text.replace(expansion, alias)


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  # After autodoc records the types (priority 500).
  app.connect(
    "autodoc-process-signature", _name_evaluated_aliases, priority=600
  )
