"""Builds the C4-format sample shipped in ``examples/llama/data/``.

    python -m examples.llama.build_sample

The text is the documentation that ships with CPython itself, so it is
available offline and openly licensed (Python Software Foundation License,
version 2): the help topics of the Python reference
(``pydoc_data.topics``), split into sections, and the docstrings of the
standard library's modules, classes, functions and methods. It is real English prose,
but about Python rather than web text like C4, so losses on it are not
comparable with C4's.

Documents go to validation by a hash of their URL (about 6%); the training
documents are shuffled with a fixed seed and split into four shards. The files
are gzip'd with a zero timestamp, so a rebuild with the same Python gives the
same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import random
import re
import sys
import textwrap
import warnings
from pathlib import Path

OUT_DIR = Path(__file__).absolute().parent / "data"
TRAIN_SHARDS = 4
VALIDATION_PERCENT = 6
MIN_CHARS = 200
MAX_CHARS = 4000
TIMESTAMP = "2019-04-25T00:00:00Z"  # C4's records carry one; these are not web crawls.
# Modules whose import has effects (a browser, a window, printed text) or fails.
SKIP_MODULES = {
  "antigravity",
  "this",
  "idlelib",
  "tkinter",
  "turtle",
  "turtledemo",
  "__main__",
  "ensurepip",
  "lib2to3",
  "pydoc_data",
}


def _clean(text: str) -> str:
  """Dedented text with runs of blank lines collapsed and trailing spaces removed."""
  text = textwrap.dedent(text).strip()
  text = re.sub(r"[ \t]+\n", "\n", text)
  return re.sub(r"\n{3,}", "\n\n", text)


def _chunks(text: str) -> list[str]:
  """Paragraph groups of at most ``MAX_CHARS`` characters."""
  out, current = [], ""
  for paragraph in text.split("\n\n"):
    if current and len(current) + len(paragraph) > MAX_CHARS:
      out.append(current)
      current = ""
    current = f"{current}\n\n{paragraph}" if current else paragraph
  return [*out, current] if current else out


def topic_documents() -> list[dict[str, str]]:
  """The Python reference's help topics, in chunks."""
  from pydoc_data.topics import topics

  docs = []
  for name in sorted(topics):
    for i, chunk in enumerate(_chunks(_clean(topics[name]))):
      url = f"https://docs.python.org/3/reference/{name}#{i}"
      docs.append({"text": chunk, "url": url})
  return docs


def docstring_documents() -> list[dict[str, str]]:
  """One document per standard-library module: its docstring and its members'."""
  docs = []
  for module_name in sorted(sys.stdlib_module_names):
    if module_name in SKIP_MODULES or module_name.startswith("_"):
      continue
    try:
      module = importlib.import_module(module_name)
    except Exception:  # platform-specific or optional modules
      continue
    parts = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
      if name.startswith("_") or getattr(member, "__module__", None) != module_name:
        continue
      if inspect.isfunction(member) and member.__doc__:
        parts.append(f"{name}\n\n{inspect.getdoc(member)}")
      elif inspect.isclass(member) and member.__doc__:
        parts.append(f"{name}\n\n{inspect.getdoc(member)}")
        for method_name, method in sorted(vars(member).items()):
          if not method_name.startswith("_") and inspect.isfunction(method):
            if method.__doc__:
              parts.append(f"{name}.{method_name}\n\n{inspect.getdoc(method)}")
    text = _clean("\n\n".join(p for p in parts if p))
    for i, chunk in enumerate(_chunks(text)):
      docs.append({"text": chunk, "url": f"python-stdlib:{module_name}#{i}"})
  return docs


def _is_validation(url: str) -> bool:
  return int(hashlib.sha256(url.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def _write(path: Path, docs: list[dict[str, str]]) -> None:
  lines = "".join(
    json.dumps({"text": d["text"], "timestamp": TIMESTAMP, "url": d["url"]}) + "\n"
    for d in docs
  )
  with (
    open(path, "wb") as raw,
    gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f,
  ):
    f.write(lines.encode("utf-8"))


def build(out_dir: Path = OUT_DIR) -> dict[str, int]:
  """Writes the shards to ``out_dir``; returns document and byte counts."""
  docs = [
    d for d in topic_documents() + docstring_documents() if len(d["text"]) >= MIN_CHARS
  ]
  validation = [d for d in docs if _is_validation(d["url"])]
  train = [d for d in docs if not _is_validation(d["url"])]
  random.Random(0).shuffle(train)
  out_dir.mkdir(parents=True, exist_ok=True)
  for old in out_dir.glob("c4-*.json.gz"):
    old.unlink()
  for i in range(TRAIN_SHARDS):
    _write(out_dir / f"c4-train.{i:05d}-of-01024.json.gz", train[i::TRAIN_SHARDS])
  _write(out_dir / "c4-validation.00000-of-00008.json.gz", validation)
  return {
    "train_documents": len(train),
    "validation_documents": len(validation),
    "train_chars": sum(len(d["text"]) for d in train),
    "validation_chars": sum(len(d["text"]) for d in validation),
    "bytes_on_disk": sum(p.stat().st_size for p in out_dir.glob("c4-*.json.gz")),
  }


def main() -> None:
  with warnings.catch_warnings():  # deprecated modules warn on import and access
    warnings.simplefilter("ignore")
    counts = build()
  print(
    f"Python {sys.version.split()[0]}: "
    + ", ".join(f"{k} {v:,}" for k, v in counts.items())
  )


if __name__ == "__main__":
  main()
