"""Builds the small C4-format sample shipped in ``examples/llama/data/``.

    python -m examples.llama.build_sample  # rewrites the sample
    python -m examples.llama.build_sample --out-dir /tmp/c4  # somewhere else

The text is the Python documentation that ships with the interpreter itself,
so the sample builds offline, from openly licensed text (Python Software
Foundation License Version 2):

* the help topics of the language reference (``pydoc_data.topics.topics``,
  what ``help("assert")`` shows): one document per topic;
* the docstrings of the standard library's modules, read from their source
  with :mod:`ast` (nothing is imported or run): one document per module, its
  docstring followed by the docstrings of its public functions, classes and
  methods, each under its signature.

Each document is cleaned (tabs expanded, trailing spaces and control
characters removed, runs of blank lines collapsed), long ones are split at
blank lines into parts of a few thousand characters, short ones are dropped,
and exact duplicates are kept once. A document goes to the validation split
when a hash of its title (topic or module name, so all parts of one module
stay together) falls in the first :data:`VALIDATION_PERCENT` percent; the
rest is spread over :data:`TRAIN_SHARDS` training shards.

The shards are in C4's layout (``allenai/c4``, config ``en``): gzip'd JSON
lines with ``text``, ``timestamp`` and ``url``, named
``c4-train.00000-of-01024.json.gz`` and
``c4-validation.00000-of-00008.json.gz``. The output depends only on the
Python installation: the same interpreter writes the same bytes every time
(gzip without a timestamp). ``README.md`` with the counts is written next to
the shards.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gzip
import hashlib
import json
import platform
import sys
import sysconfig
import textwrap
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

DEFAULT_OUT_DIR = Path(__file__).absolute().parent / "data"
TRAIN_SHARDS = 4
VALIDATION_PERCENT = 10
# Documents shorter than this (after cleaning) are dropped; longer than
# MAX_CHARS are split at blank lines into parts of about TARGET_CHARS.
MIN_CHARS = 200
MAX_CHARS = 6000
TARGET_CHARS = 3000
# A signature longer than this is shown as ``name(...)``.
MAX_SIGNATURE = 100
# Folders of the standard library that hold tests, not library code.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
DOCS_URL = f"https://docs.python.org/{PYTHON_VERSION}"


class Document(NamedTuple):
  """One record of the sample, before it is written."""

  title: str  # the topic or module: the key of the train/validation split
  url: str
  text: str


def clean(text: str) -> str:
  """Normalizes whitespace: tabs expanded, no control characters, one blank
  line."""
  text = textwrap.dedent(
    text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
  )
  text = "".join(
    c for c in text if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf")
  )
  out: list[str] = []
  for line in text.split("\n"):
    line = line.rstrip()
    if line or (out and out[-1]):
      out.append(line)
  return "\n".join(out).strip("\n")


def split_long(text: str) -> list[str]:
  """``text`` whole, or cut at blank lines into parts of about
  ``TARGET_CHARS``."""
  if len(text) <= MAX_CHARS:
    return [text]
  parts: list[str] = []
  current: list[str] = []
  size = 0
  for paragraph in text.split("\n\n"):
    if current and size + len(paragraph) > TARGET_CHARS:
      parts.append("\n\n".join(current))
      current, size = [], 0
    current.append(paragraph)
    size += len(paragraph) + 2
  if parts and size < MIN_CHARS:
    parts[-1] += "\n\n" + "\n\n".join(current)
  else:
    parts.append("\n\n".join(current))
  return parts


def topic_documents() -> Iterator[Document]:
  """The help topics of ``pydoc_data``, one document per topic."""
  from pydoc_data.topics import topics

  for label in sorted(topics):
    yield Document(label, f"{DOCS_URL}/search.html?q={label}", topics[label])


def _signature(name: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  args = ast.unparse(node.args)
  return f"{name}({args if len(args) <= MAX_SIGNATURE else '...'})"


def _is_documented(name: str) -> bool:
  """Public names and special methods; not ``_private`` helpers."""
  return not name.startswith("_") or (
    name.startswith("__") and name.endswith("__")
  )


def module_text(tree: ast.Module) -> str:
  """A module's docstring, then those of its public functions, classes,
  methods."""
  sections = []
  docstring = ast.get_docstring(tree)
  if docstring:
    sections.append(docstring)
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      docstring = ast.get_docstring(node)
      if docstring and _is_documented(node.name):
        sections.append(f"{_signature(node.name, node)}\n\n{docstring}")
    elif isinstance(node, ast.ClassDef) and _is_documented(node.name):
      bases = ", ".join(ast.unparse(base) for base in node.bases)
      docstring = ast.get_docstring(node)
      heading = f"class {node.name}({bases})" if bases else f"class {node.name}"
      if docstring:
        sections.append(f"{heading}\n\n{docstring}")
      for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          docstring = ast.get_docstring(child)
          if docstring and _is_documented(child.name):
            signature = _signature(f"{node.name}.{child.name}", child)
            sections.append(f"{signature}\n\n{docstring}")
  return "\n\n".join(sections)


def stdlib_modules() -> Iterator[tuple[str, Path]]:
  """``(module name, source file)`` of the standard library, tests left out."""
  root = Path(sysconfig.get_paths()["stdlib"])
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] not in sys.stdlib_module_names:
      continue  # site-packages, config-3.x-..., ...
    if TEST_DIRS.intersection(parts[:-1]) or parts[-1].startswith("test_"):
      continue
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), path


def module_documents() -> Iterator[Document]:
  """One document per standard-library module that has docstrings."""
  for name, path in stdlib_modules():
    try:
      tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
      continue  # not Python 3 source (test data)
    text = module_text(tree)
    if text:
      yield Document(name, f"python-stdlib:{name}", text)


def documents() -> list[Document]:
  """Every cleaned document of the sample, long ones split, short ones
  dropped."""
  out: list[Document] = []
  seen: set[str] = set()
  for document in (*topic_documents(), *module_documents()):
    parts = split_long(clean(document.text))
    for i, part in enumerate(parts, 1):
      if len(part) < MIN_CHARS or part in seen:
        continue
      seen.add(part)
      url = document.url if len(parts) == 1 else f"{document.url}#part-{i}"
      out.append(Document(document.title, url, part))
  return out


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_validation(document: Document) -> bool:
  """Whether the document's title hashes into the validation split."""
  return _hash(document.title) % 100 < VALIDATION_PERCENT


def timestamp() -> str:
  """The build date of this Python interpreter, in C4's timestamp format."""
  try:
    built = datetime.datetime.strptime(
      " ".join(platform.python_build()[1].split()), "%b %d %Y %H:%M:%S"
    )
  except ValueError:
    return "1970-01-01T00:00:00Z"
  return built.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_shard(path: Path, shard: Sequence[Document], stamp: str) -> None:
  """Writes one gzip'd JSON-lines shard, byte for byte reproducibly."""
  lines = "".join(
    json.dumps(
      {"text": d.text, "timestamp": stamp, "url": d.url},
      ensure_ascii=False,
      separators=(",", ":"),
    )
    + "\n"
    for d in shard
  )
  with path.open("wb") as f, gzip.GzipFile("", "wb", 9, f, mtime=0) as z:
    z.write(lines.encode("utf-8"))


def build(out_dir: Path) -> dict[str, dict[str, int]]:
  """Writes the sample's shards and README to ``out_dir``.

  Args:
    out_dir: the directory (created); earlier ``c4-*.json.gz`` files in it are
      removed first.

  Returns:
    Per split: ``shards``, ``documents``, ``titles`` (topics and modules),
    ``text_bytes`` (UTF-8) and ``file_bytes`` (compressed).
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  for old in out_dir.glob("c4-*.json.gz"):
    old.unlink()
  docs = sorted(documents(), key=lambda d: _hash(d.url))  # a fixed, mixed order
  stamp = timestamp()
  splits = {
    "train": ([d for d in docs if not is_validation(d)], TRAIN_SHARDS, 1024),
    "validation": ([d for d in docs if is_validation(d)], 1, 8),
  }
  stats = {}
  for split, (split_docs, num_shards, of) in splits.items():
    file_bytes = 0
    for index in range(num_shards):
      path = out_dir / f"c4-{split}.{index:05d}-of-{of:05d}.json.gz"
      write_shard(path, split_docs[index::num_shards], stamp)
      file_bytes += path.stat().st_size
    stats[split] = {
      "shards": num_shards,
      "documents": len(split_docs),
      "titles": len({d.title for d in split_docs}),
      "text_bytes": sum(len(d.text.encode()) for d in split_docs),
      "file_bytes": file_bytes,
    }
  (out_dir / "README.md").write_text(readme(stats, stamp))
  return stats


def readme(stats: dict[str, dict[str, int]], stamp: str) -> str:
  """The sample's README: source, license, how it was built, counts."""
  rows = "\n".join(
    f"| {split} | {s['shards']} | {s['documents']:,} | {s['titles']:,}"
    f" | {s['text_bytes']:,} | {s['file_bytes']:,} |"
    for split, s in stats.items()
  )
  return f"""\
# A small C4-format sample

The data that `python -m examples.llama.train` uses by default: a few MB of
English text in the layout of C4 (`allenai/c4`, config `en`): gzip'd JSON lines,
one document per line with `text`, `timestamp` and `url`, in shards named
`c4-train.XXXXX-of-01024.json.gz` and `c4-validation.XXXXX-of-00008.json.gz`.
Point `--data-dir` at a directory of real C4 shards, or use `--data-dir hf`, to
train on C4 itself.

## What the text is

This is **not** web text and not a subset of C4. It is the documentation that
ships with the Python interpreter, so the sample could be built offline from
openly licensed text:

- the help topics of the Python language reference (`pydoc_data.topics`, what
  `help("assert")` prints), one document per topic, with a
  `{DOCS_URL}/search.html?q=<topic>` URL;
- the docstrings of the Python {PYTHON_VERSION} standard library, read from the
  modules' source (nothing imported or run), one document per module: the \
module's
  docstring followed by those of its public functions, classes and methods, each
  under its signature; the URL is `python-stdlib:<module>`.

So it is English prose about Python, with code examples, signatures and doctests
mixed in: far narrower and more technical than C4, and much smaller. A model
trained on it learns that text, and its losses are not comparable to C4 \
losses. It
is meant for trying the trainer and the optimizers quickly, not for measuring \
them.

Documents are cleaned (tabs expanded, trailing spaces and control characters
removed, runs of blank lines collapsed); those over {MAX_CHARS:,} characters are
split at blank lines into parts of about {TARGET_CHARS:,} (URL `...#part-N`); \
parts
under {MIN_CHARS} characters and exact duplicates are dropped. A document is in
the validation split when the SHA-256 of its topic or module name falls in the \
first
{VALIDATION_PERCENT}% (all parts of a module stay in one split). `timestamp` is
the build date of the interpreter that made the sample ({stamp}), not a crawl \
date.

## Counts

Built with Python {platform.python_version()} \
({platform.python_implementation()}).

| split | shards | documents | topics and modules | text bytes (UTF-8) \
| file bytes (gzip) |
|---|---|---|---|---|---|
{rows}

## License

The Python documentation and the Python standard library are copyright the \
Python
Software Foundation and distributed under the
Python Software Foundation License Version 2
(https://docs.python.org/3/license.html); this sample is derived from them under
that license.

## Rebuilding

From the repository root:

```bash
python -m examples.llama.build_sample
```

rewrites these files. The same Python installation writes the same bytes every
time; another Python version has other docstrings, and so other files.
"""


def main(argv: Sequence[str] | None = None) -> None:
  """Runs ``python -m examples.llama.build_sample``."""
  parser = argparse.ArgumentParser(
    prog="python -m examples.llama.build_sample",
    description="Build the C4-format sample of Python documentation text.",
  )
  parser.add_argument(
    "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the files go"
  )
  args = parser.parse_args(argv)
  stats = build(args.out_dir)
  for split, s in stats.items():
    print(
      f"{split}: {s['documents']:,} documents in {s['shards']} shard(s),"
      f" {s['text_bytes']:,} bytes of text, {s['file_bytes']:,} bytes on disk"
    )
  print(f"written to {args.out_dir}/")


if __name__ == "__main__":
  main()
