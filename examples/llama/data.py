"""C4 data: tokenizers, shard reading, and packed, resumable batches.

The training data is the ``en`` variant of C4 (Raffel et al., "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2020) in
the layout of ``allenai/c4``: gzip'd JSON-lines shards
``c4-train.XXXXX-of-01024.json.gz`` and
``c4-validation.XXXXX-of-00008.json.gz``, one object with a ``"text"`` field per
line. ``--data-dir`` is either such a directory (the shipped sample in
``examples/llama/data/``, or real C4) or ``hf``, which streams a
:class:`HubDataset` (``allenai/c4`` by default, ``--dataset`` for another, on
the hub or local) with Hugging Face ``datasets``.

Documents are tokenized, each followed by EOS, concatenated, and cut into
windows of ``seq_len + 1`` tokens (inputs and next-token labels from one
window); a document may span two windows. Training shards are read in an order
shuffled per epoch from ``(seed, epoch)``; documents within a shard keep their
order (C4's shards are already shuffled), which makes the position of the
iterator three integers and the leftover tokens: :meth:`PackedBatches.state`,
saved with each checkpoint, so a resumed run continues on the next unseen batch.

The training batches come from ``--data-streams`` such iterators
(:class:`ProcessBatches`): stream ``g`` reads every ``streams``-th shard of
each epoch's order and fills the ``g``-th equal share of the rows of every
micro-batch. A process reads and tokenizes only the streams whose rows its
devices hold, and the batches depend on the number of streams alone, not on
how many processes or devices share them.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from examples.llama.errors import UserError


@dataclasses.dataclass(frozen=True)
class HubDataset:
  """A text dataset streamed with Hugging Face ``datasets``
  (``datasets.load_dataset(path, name, split=..., streaming=True)``).

  Attributes:
    path: a dataset on the hub, such as ``allenai/c4``, or a local directory
      of data files (JSON lines, CSV, Parquet, text, gzip'd or not) that
      ``datasets`` reads with its own builders, its splits named by the files
      (``*train*``, ``*validation*``), as in the shipped sample.
    name: the dataset's configuration (C4's ``en``); None: its default.
    text_column: the column holding each document's text.
  """

  path: str = "allenai/c4"
  name: str | None = "en"
  text_column: str = "text"

  @classmethod
  def parse(cls, spec: str, text_column: str = "text") -> HubDataset:
    """``PATH[:NAME]`` (``--dataset``): a local directory as it is, anything
    else split at its last colon into the hub's name and configuration."""
    if Path(spec).is_dir() or ":" not in spec:
      return cls(spec, None, text_column)
    path, _, name = spec.rpartition(":")
    return cls(path, name, text_column)

  def __str__(self) -> str:
    return self.path if self.name is None else f"{self.path}:{self.name}"


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without special tokens."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 PAD, 257 BOS, 258 EOS.

  Needs nothing to download, so the example runs offline; the model sees about
  four times more tokens per word than with the T5 tokenizer.
  """

  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if i < 256).decode(
      "utf-8", errors="replace"
    )


class HubTokenizer:
  """A Hugging Face tokenizer (``transformers.AutoTokenizer``) seen as a
  :class:`Tokenizer`: a name on the hub (``t5-base``) or a directory one was
  saved to (``examples/llama/tokenizer``, which loads offline)."""

  def __init__(self, name: str):
    try:
      from transformers import AutoTokenizer
    except ImportError as err:
      raise UserError(
        f"tokenizer {name!r} needs the transformers package (pip install -e"
        ' ".[hub]"); use --tokenizer byte to train offline.'
      ) from err
    try:
      self._tokenizer = AutoTokenizer.from_pretrained(name)
    # network, unknown name, missing sentencepiece, ...
    except Exception as err:
      raise UserError(
        f"could not load tokenizer {name!r} ({type(err).__name__}: {err}); use"
        " --tokenizer byte or examples/llama/tokenizer to train offline."
      ) from err
    # len() counts added tokens too (T5's 100 sentinels), so every id fits.
    self.vocab_size = max(self._tokenizer.vocab_size, len(self._tokenizer))
    self.eos_id = self._tokenizer.eos_token_id

  def encode(self, text: str) -> list[int]:
    return self._tokenizer(text, add_special_tokens=False)["input_ids"]

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids])


def load_tokenizer(name: str) -> Tokenizer:
  """``"byte"``: :class:`ByteTokenizer`; anything else: a Hugging Face
  tokenizer, by name or directory (:class:`HubTokenizer`).

  The papers used ``t5-base``; ``examples/llama/tokenizer`` holds subwords
  trained on the shipped sample (``python -m examples.llama.build_tokenizer``).

  Raises:
    UserError: the tokenizer cannot be loaded (no transformers, no network,
      unknown name), with the cause.
  """
  return ByteTokenizer() if name == "byte" else HubTokenizer(name)


# ----------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
  """The sorted ``c4-<split>.*-of-*.json.gz`` shards of ``data_dir``.

  Raises:
    UserError: the directory does not exist or has no such shard.
  """
  directory = Path(data_dir)
  if not directory.is_dir():
    raise UserError(
      f"data directory {directory} does not exist; --data-dir takes a directory"
      " of C4 shards (c4-train.00000-of-01024.json.gz, ...) or 'hf'."
    )
  pattern = f"c4-{split}.*-of-*.json.gz"
  paths = sorted(directory.glob(pattern))
  if not paths:
    raise UserError(f"no {pattern} shards in {directory}.")
  return paths


class ShardProblems:
  """Unreadable lines met while reading shards, for warnings and errors."""

  def __init__(self):
    self.lines: dict[Path, list[int]] = {}
    self.broken: dict[Path, str] = {}

  def describe(self) -> str:
    parts = [
      f"{path}: {len(lines)} malformed line(s), first at line {lines[0]}"
      for path, lines in self.lines.items()
    ]
    parts += [f"{path}: {why}" for path, why in self.broken.items()]
    return "; ".join(parts)


def read_shard(
  path: Path, problems: ShardProblems, skip: int = 0
) -> Iterator[tuple[int, str]]:
  """``(line number, "text")`` of each JSON line of a gzip'd shard after line
  ``skip``.

  Lines count from 1 and include the bad ones, so a line number is a stable
  position to resume after. A line that is not a JSON object with a string
  ``"text"`` is skipped, warned about when the first one of the file is met,
  and counted at the end of the file; a file that stops being readable (bad
  gzip data, truncation) ends there, with a warning. Both are recorded in
  ``problems``.
  """
  bad: list[int] = []
  line_number = 0
  try:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
      for line_number, line in enumerate(lines, start=1):
        if line_number <= skip:
          continue
        try:
          text = json.loads(line)["text"]
          if not isinstance(text, str):
            raise TypeError("text is not a string")
        except (ValueError, KeyError, TypeError) as err:
          bad.append(line_number)
          if len(bad) == 1:
            # the same list, filled as the file is read
            problems.lines[path] = bad
            warnings.warn(
              f"{path}: line {line_number} is not a JSON object with a string"
              f' "text" ({type(err).__name__}); skipping it and any other such'
              " line of this file.",
              stacklevel=2,
            )
          continue
        yield line_number, text
  except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
    why = f"unreadable after line {line_number} ({type(err).__name__}: {err})"
    problems.broken[path] = why
    warnings.warn(
      f"{path}: {why}; the rest of the file is skipped.", stacklevel=2
    )
  if len(bad) > 1:
    warnings.warn(
      f"{path}: skipped {len(bad)} malformed line(s) (first at line {bad[0]}).",
      stacklevel=2,
    )


def _shard_order(
  num_shards: int, seed: int, epoch: int, shuffle: bool
) -> list[int]:
  if not shuffle:
    return list(range(num_shards))
  return [
    int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)
  ]


def local_documents(
  paths: list[Path],
  seed: int,
  shuffle: bool,
  start: dict[str, int],
  repeat: bool,
  stream: int = 0,
  streams: int = 1,
) -> Iterator[tuple[dict[str, int], str]]:
  """``(position after the document, text)`` over stream ``stream``'s shards,
  from ``start``.

  Stream ``stream`` of ``streams`` reads every ``streams``-th shard of each
  epoch's order, starting at the ``stream``-th. A position is ``{"epoch",
  "shard", "line"}``: the epoch, the index of the shard in the stream's order
  of that epoch, and how many of its lines were consumed, bad ones included.

  Raises:
    UserError: fewer shards than streams, or a whole pass over the stream's
      shards found no usable document.
  """
  if streams > len(paths):
    raise UserError(
      f"{len(paths)} shard(s) in {paths[0].parent} cannot feed {streams} data"
      f" streams (each reads its own shards): use --data-streams {len(paths)}"
      " or fewer."
    )
  epoch, shard, line = start["epoch"], start["shard"], start["line"]
  problems = ShardProblems()
  while True:
    order = _shard_order(len(paths), seed, epoch, shuffle)[stream::streams]
    found = False
    while shard < len(order):
      path = paths[order[shard]]
      for line_number, text in read_shard(path, problems, skip=line):
        found = True
        yield {"epoch": epoch, "shard": shard, "line": line_number}, text
      # Lines after the last good one (bad or unreadable) also count as read.
      shard, line = shard + 1, 0
    if not found and start["line"] == 0 and start["shard"] == 0:
      raise UserError(
        f"no usable document in {len(order)} shard(s): {problems.describe()}"
        if problems.lines or problems.broken
        else f"the shards {', '.join(str(paths[i]) for i in order)} hold no"
        " documents."
      )
    if not repeat:
      return
    epoch, shard, line, start = epoch + 1, 0, 0, {"shard": 0, "line": 0}


def open_hub_stream(source: HubDataset, split: str) -> Any:
  """The ``split`` of ``source`` as a streaming ``datasets`` dataset.

  Raises:
    UserError: ``datasets`` is not installed, or the stream cannot be opened
      (network, hub, no such dataset or split), with the cause.
  """
  try:
    import datasets
  except ImportError as err:
    raise UserError(
      "--data-dir hf streams its dataset with the datasets package: pip"
      ' install -e ".[hub]" (or point --data-dir at downloaded shards).'
    ) from err
  try:
    return datasets.load_dataset(
      source.path, source.name, split=split, streaming=True
    )
  except Exception as err:  # network, hub, authentication, no such split, ...
    raise UserError(
      f"could not stream the {split} split of {source} ({type(err).__name__}:"
      f" {err}); point --data-dir at downloaded shards to train offline."
    ) from err


# Documents the stream's shuffle buffer holds: it draws each document from
# this many, after shuffling the order of the dataset's files.
SHUFFLE_BUFFER = 10_000


def hub_documents(
  source: HubDataset,
  split: str,
  seed: int,
  shuffle: bool,
  start: dict[str, int],
  repeat: bool,
  stream: int = 0,
  streams: int = 1,
) -> Iterator[tuple[dict[str, int], str]]:
  """``source`` streamed with ``datasets``; the position counts documents.

  Stream ``stream`` of ``streams`` reads its share of the dataset's files
  (``datasets.distributed.split_dataset_by_node``: whole files where their
  number divides by ``streams``, every ``streams``-th document otherwise).
  Each epoch is shuffled from ``seed + epoch`` (the files' order and a buffer
  of :data:`SHUFFLE_BUFFER` documents), so a position ``line`` resumes by
  skipping that many documents of the same order.

  Raises:
    UserError: a record has no ``source.text_column``, or a whole epoch has no
      document.
  """
  epoch, line = start["epoch"], start["line"]
  while True:
    dataset = open_hub_stream(source, split)
    if streams > 1:
      from datasets.distributed import split_dataset_by_node

      dataset = split_dataset_by_node(dataset, rank=stream, world_size=streams)
    if shuffle:
      dataset = dataset.shuffle(seed=seed + epoch, buffer_size=SHUFFLE_BUFFER)
    found = False
    for record in dataset.skip(line):
      if source.text_column not in record:
        raise UserError(
          f"the {split} split of {source} has no column"
          f" {source.text_column!r} (it has {', '.join(record)}): use"
          " --text-column."
        )
      found, line = True, line + 1
      yield (
        {"epoch": epoch, "shard": 0, "line": line},
        record[source.text_column],
      )
    if not found and line == 0:
      raise UserError(f"the {split} split of {source} holds no documents.")
    if not repeat:
      return
    epoch, line = epoch + 1, 0


# Where the documents come from: a directory of C4-format shards, or a
# dataset streamed with ``datasets``.
Source = str | Path | HubDataset


def documents(
  source: Source,
  split: str,
  seed: int,
  shuffle: bool,
  start: dict[str, int],
  repeat: bool,
  stream: int = 0,
  streams: int = 1,
) -> Iterator[tuple[dict[str, int], str]]:
  """Stream ``stream``'s documents of ``source``."""
  if isinstance(source, HubDataset):
    return hub_documents(
      source, split, seed, shuffle, start, repeat, stream, streams
    )
  paths = shard_paths(source, split)
  return local_documents(paths, seed, shuffle, start, repeat, stream, streams)


def check_split(
  source: Source, split: str, seed: int = 0, stream: int = 0, streams: int = 1
) -> None:
  """Fails now, not at the first batch, if ``split`` of ``source`` is
  unusable.

  Reads the local shards of stream ``stream``'s first epoch (shuffled by
  ``seed``) up to their first usable document; of a streamed dataset, the
  stream's first document in file order (a shuffled one would first fill the
  shuffle buffer).

  Raises:
    UserError: no such directory, no shard of ``split``, fewer shards than
      streams, no usable document in the stream's shards; the stream cannot
      be opened, holds no document or lacks the text column.
  """
  shuffle = not isinstance(source, HubDataset)
  start = {"epoch": 0, "shard": 0, "line": 0}
  next(documents(source, split, seed, shuffle, start, False, stream, streams))


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------


class PackedBatches:
  """An endless iterator of ``(batch_size, seq_len + 1)`` int32 token windows.

  Deterministic for a seed and a stream (``stream`` of ``streams``, see
  :func:`local_documents`); :meth:`state` and :meth:`restore` save and resume
  its position exactly.
  """

  def __init__(
    self,
    source: Source,
    split: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    stream: int = 0,
    streams: int = 1,
  ):
    """Opens stream ``stream`` of the ``split`` of ``source``.

    Raises:
      UserError: ``split`` of ``source`` is unusable for the stream
        (:func:`check_split`, here, before any training starts).
    """
    check_split(source, split, seed, stream, streams)
    self.source, self.split, self.tokenizer = source, split, tokenizer
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.stream, self.streams = stream, streams
    self._start({"epoch": 0, "shard": 0, "line": 0}, [])

  def _start(self, position: dict[str, int], buffer: list[int]) -> None:
    self._position = dict(position)
    self._buffer = list(buffer)
    self._documents = documents(
      self.source,
      self.split,
      self.seed,
      True,
      position,
      True,
      self.stream,
      self.streams,
    )

  def __iter__(self) -> PackedBatches:
    return self

  def __next__(self) -> np.ndarray:
    needed = self.batch_size * (self.seq_len + 1)
    while len(self._buffer) < needed:
      self._position, text = next(self._documents)
      self._buffer += self.tokenizer.encode(text)
      self._buffer.append(self.tokenizer.eos_id)
    batch, self._buffer = self._buffer[:needed], self._buffer[needed:]
    return np.asarray(batch, np.int32).reshape(
      self.batch_size, self.seq_len + 1
    )

  def _identity(self) -> dict[str, Any]:
    return {
      "split": self.split,
      "seed": self.seed,
      "seq_len": self.seq_len,
      "batch_size": self.batch_size,
      "vocab_size": self.tokenizer.vocab_size,
      "stream": self.stream,
      "streams": self.streams,
    }

  def state(self) -> dict[str, Any]:
    """The position as JSON-friendly data: what identifies the stream, where the
    last document read ends, and the tokens read but not yet batched."""
    return {
      **self._identity(),
      "position": self._position,
      "buffer": self._buffer,
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a :meth:`state` of an iterator with the same settings.

    Raises:
      ValueError: ``state`` comes from an iterator with other settings.
    """
    saved = {k: state.get(k) for k in self._identity()}
    if saved != self._identity():
      raise ValueError(
        f"the data position was saved for {saved}, not for {self._identity()}."
      )
    self._start(state["position"], state["buffer"])


class ProcessBatches:
  """This process's rows of every training batch: those of its data streams.

  The rows of each micro-batch are split into ``streams`` equal groups, and
  group ``g`` of every micro-batch comes from stream ``g`` (a
  :class:`PackedBatches` over its own shards). A process opens only the
  streams whose rows its devices hold; one process holding every row reads
  every stream and sees the same batches as several processes sharing them.
  With one stream the batch is ``batch_size`` consecutive windows of the one
  packed stream.
  """

  def __init__(
    self,
    source: Source,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    grad_accum: int,
    micro_batch_size: int,
    seed: int,
    streams: int,
    rows: Sequence[int],
  ):
    """Opens the streams of ``rows``.

    Args:
      source: as for :class:`PackedBatches`.
      tokenizer: the tokenizer.
      seq_len: tokens per sequence (windows are one longer).
      grad_accum: micro-batches per step.
      micro_batch_size: rows of each micro-batch, a multiple of ``streams``.
      seed: the data order's seed.
      streams: the number of streams (``--data-streams``).
      rows: the sorted rows of each micro-batch that this process holds.

    Raises:
      UserError: ``rows`` are not the rows of whole streams (a stream's rows
        would span processes), or a stream's shards are unusable.
    """
    per_stream = micro_batch_size // streams
    local = sorted({row // per_stream for row in rows})
    whole = [
      row for g in local for row in range(g * per_stream, (g + 1) * per_stream)
    ]
    if list(rows) != whole:
      raise UserError(
        f"--data-streams {streams} does not split over the processes: each"
        f" stream fills {per_stream} row(s) of every micro-batch of"
        f" {micro_batch_size}, and this process holds rows {rows[0]} to"
        f" {rows[-1]}; use a multiple of the number of processes."
      )
    self.grad_accum, self.seq_len = grad_accum, seq_len
    self._streams = {
      g: PackedBatches(
        source,
        "train",
        tokenizer,
        seq_len=seq_len,
        batch_size=grad_accum * per_stream,
        seed=seed,
        stream=g,
        streams=streams,
      )
      for g in local
    }

  def __iter__(self) -> ProcessBatches:
    return self

  def __next__(self) -> np.ndarray:
    """The next ``(grad_accum, len(rows), seq_len + 1)`` block of this process's
    rows."""
    shape = (self.grad_accum, -1, self.seq_len + 1)
    return np.concatenate(
      [next(stream).reshape(shape) for stream in self._streams.values()], axis=1
    )

  def state(self) -> dict[str, Any]:
    """Each of this process's streams' :meth:`PackedBatches.state`, by stream
    number.

    The keys are strings, as JSON has them; the union of every process's
    state is the run's data position.
    """
    return {str(g): stream.state() for g, stream in self._streams.items()}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a data position holding (at least) this process's streams.

    Raises:
      ValueError: ``state`` lacks one of them, or holds it for other settings.
    """
    missing = [g for g in self._streams if str(g) not in state]
    if missing:
      raise ValueError(
        f"the data position holds streams {sorted(state)}, not {missing}."
      )
    for g, stream in self._streams.items():
      stream.restore(state[str(g)])


def eval_batches(
  source: Source,
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  max_batches: int,
) -> list[np.ndarray]:
  """The first ``max_batches`` validation batches, packed in shard order.

  Fewer (possibly none) if the validation split runs out first.

  Raises:
    UserError: no such directory, no validation shard or no usable document.
  """
  needed = batch_size * (seq_len + 1)
  start = {"epoch": 0, "shard": 0, "line": 0}
  buffer: list[int] = []
  batches = []
  for _, text in documents(source, "validation", 0, False, start, repeat=False):
    buffer += tokenizer.encode(text)
    buffer.append(tokenizer.eos_id)
    while len(buffer) >= needed and len(batches) < max_batches:
      batches.append(
        np.asarray(buffer[:needed], np.int32).reshape(batch_size, -1)
      )
      buffer = buffer[needed:]
    if len(batches) == max_batches:
      break
  return batches


def bytes_per_token(
  source: Source, tokenizer: Tokenizer, split: str = "validation"
) -> float:
  """UTF-8 bytes of ``split``'s text per token, as the pipeline packs it
  (each document's tokens, then its end-of-document token).

  A loss of ``L`` nats per token is ``L / (ln 2 * bytes_per_token)`` bits per
  byte, which compares across tokenizers.

  Raises:
    UserError: no such split or no usable document.
  """
  start = {"epoch": 0, "shard": 0, "line": 0}
  size = tokens = 0
  for _, text in documents(source, split, 0, False, start, repeat=False):
    size += len(text.encode("utf-8"))
    tokens += len(tokenizer.encode(text)) + 1
  return size / tokens
