"""The LLaMA example's data pipeline: tokenizer, packing, resume, bad shards."""

from __future__ import annotations

import gzip
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from examples.llama import data as data_lib
from examples.llama.errors import UserError

SAMPLE_DIR = Path(data_lib.__file__).parent / "data"
BYTES = data_lib.ByteTokenizer()
EOS = BYTES.eos_id


def write_shard(path: Path, lines: list[str]) -> Path:
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in lines)
  return path


def record(text: str) -> str:
  return json.dumps({"text": text, "timestamp": "t", "url": "u"})


@pytest.fixture
def shards(tmp_path: Path) -> Path:
  """Three training shards of numbered documents and one validation shard."""
  for shard in range(3):
    texts = [f"shard {shard} document {i}. " * (1 + i % 3) for i in range(7)]
    write_shard(
      tmp_path / f"c4-train.{shard:05d}-of-01024.json.gz",
      [record(t) for t in texts],
    )
  write_shard(
    tmp_path / "c4-validation.00000-of-00008.json.gz",
    [record(f"validation {i}. " * 4) for i in range(10)],
  )
  return tmp_path


def batches(data_dir, n, seed=0, seq_len=15, batch_size=2):
  it = data_lib.PackedBatches(
    str(data_dir),
    "train",
    BYTES,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=seed,
  )
  return it, [next(it) for _ in range(n)]


def test_byte_tokenizer_round_trips_utf8():
  text = "Grassmann géodésique ∑"
  ids = BYTES.encode(text)
  assert BYTES.vocab_size == 259 and max(ids) < 256
  assert BYTES.decode([*ids, EOS]) == text
  assert data_lib.load_tokenizer("byte").vocab_size == 259


def test_packing_concatenates_documents_with_eos_and_loses_nothing(shards):
  _, out = batches(shards, 12)
  assert all(b.shape == (2, 16) and b.dtype == np.int32 for b in out)
  stream = np.concatenate([b.reshape(-1) for b in out])
  # The stream is whole documents, each followed by EOS, in reading order.
  pieces = np.split(stream, np.flatnonzero(stream == EOS) + 1)
  docs = [BYTES.decode(p[:-1]) for p in pieces[:-1]]
  assert len(docs) >= 8
  assert all(d.startswith("shard ") and "document" in d for d in docs)
  shard_of_first = docs[0].split()[1]
  assert docs[:7] == [
    f"shard {shard_of_first} document {i}. " * (1 + i % 3) for i in range(7)
  ]


def test_order_is_deterministic_for_a_seed_and_changes_with_it(shards):
  _, a = batches(shards, 20, seed=3)
  _, b = batches(shards, 20, seed=3)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  others = [np.stack(batches(shards, 20, seed=s)[1]) for s in range(4, 9)]
  assert any(not np.array_equal(np.stack(a), o) for o in others)


@pytest.mark.parametrize("stop", [1, 5, 40])  # an epoch is about 30 batches
def test_restored_state_continues_with_the_next_unseen_batch(shards, stop):
  _, straight = batches(shards, stop + 6, seed=1)
  first, _ = batches(shards, 0, seed=1)
  for _ in range(stop):
    next(first)
  state = json.loads(json.dumps(first.state()))
  resumed, _ = batches(shards, 0, seed=1)
  resumed.restore(state)
  np.testing.assert_array_equal(
    np.stack([next(resumed) for _ in range(6)]), np.stack(straight[stop:])
  )
  assert state["position"]["epoch"] == (1 if stop == 40 else 0)

  with pytest.raises(ValueError, match="saved for"):
    batches(shards, 0, seed=2)[0].restore(state)


def test_eval_batches_are_the_validation_split_in_order(shards):
  a = data_lib.eval_batches(
    str(shards), BYTES, seq_len=15, batch_size=2, max_batches=3
  )
  b = data_lib.eval_batches(
    str(shards), BYTES, seq_len=15, batch_size=2, max_batches=3
  )
  assert len(a) == 3
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert BYTES.decode(a[0][0]).startswith("validation 0. ")
  many = data_lib.eval_batches(
    str(shards), BYTES, seq_len=15, batch_size=2, max_batches=1000
  )
  assert 3 < len(many) < 1000  # the split runs out


def test_missing_directory_and_missing_shards_fail_early(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    batches(tmp_path / "nope", 0)
  with pytest.raises(UserError, match=r"c4-train\.\*"):
    batches(tmp_path, 0)


def test_resume_past_malformed_lines_reads_each_document_once(tmp_path):
  # Every shard has bad lines among its first documents, so most positions
  # saved in the first epoch lie past one.
  for shard in range(2):
    texts = [
      record(f"shard {shard} document {i}. " * (1 + i % 3)) for i in range(8)
    ]
    texts[1:1] = ["{not json", json.dumps({"no_text": 1})]
    texts.insert(5, "[1, 2]")
    write_shard(tmp_path / f"c4-train.{shard:05d}-of-01024.json.gz", texts)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, straight = batches(tmp_path, 30, seed=1)
    for stop in range(1, 24):
      first, _ = batches(tmp_path, 0, seed=1)
      for _ in range(stop):
        next(first)
      resumed, _ = batches(tmp_path, 0, seed=1)
      resumed.restore(json.loads(json.dumps(first.state())))
      np.testing.assert_array_equal(
        np.stack([next(resumed) for _ in range(6)]),
        np.stack(straight[stop : stop + 6]),
        err_msg=f"resumed after batch {stop}",
      )


def test_malformed_line_is_warned_about_when_met(tmp_path):
  path = write_shard(
    tmp_path / "c4-train.00000-of-01024.json.gz",
    [record("first"), json.dumps({"no_text": 1}), *[record("more")] * 50],
  )
  problems = data_lib.ShardProblems()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lines = data_lib.read_shard(path, problems)
    assert [next(lines), next(lines)] == [(1, "first"), (3, "more")]
  assert [str(w.message) for w in caught] == [
    f'{path}: line 2 is not a JSON object with a string "text" (KeyError);'
    " skipping it and any other such line of this file."
  ]
  assert problems.lines == {path: [2]}


@pytest.mark.parametrize(
  "lines", [["oops", "{}"], []], ids=["malformed lines", "no lines"]
)
def test_unusable_shards_fail_when_the_iterator_is_made(tmp_path, lines):
  write_shard(tmp_path / "c4-train.00000-of-01024.json.gz", lines)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(UserError, match="00000-of-01024"):
      data_lib.PackedBatches(
        str(tmp_path), "train", BYTES, seq_len=15, batch_size=2, seed=0
      )


def test_corrupt_lines_are_skipped_with_a_count_and_bad_gzip_is_reported(
  tmp_path,
):
  good = [record("good text here. " * 3) for _ in range(5)]
  write_shard(
    tmp_path / "c4-train.00000-of-01024.json.gz",
    [good[0], "{not json", good[1], json.dumps({"no_text": 1}), *good[2:]],
  )
  (tmp_path / "c4-train.00001-of-01024.json.gz").write_bytes(b"not gzip at all")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, out = batches(tmp_path, 12)  # more than one pass over the data
  messages = " ".join(str(w.message) for w in caught)
  assert "line 2 is not a JSON object" in messages
  assert "skipped 2 malformed line(s) (first at line 2)" in messages
  assert (
    "c4-train.00001-of-01024.json.gz" in messages and "unreadable" in messages
  )
  text = BYTES.decode(np.concatenate([b.reshape(-1) for b in out]))
  assert "good text here." in text


def test_shards_with_nothing_usable_fail_naming_file_and_line(tmp_path):
  write_shard(tmp_path / "c4-train.00000-of-01024.json.gz", ["oops", "{}"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(UserError, match=r"00000-of-01024.*first at line 1"):
      batches(tmp_path, 1)


def test_shipped_sample_is_small_c4_format_text():
  paths = sorted(SAMPLE_DIR.glob("c4-*.json.gz"))
  assert {p.name.split(".")[0] for p in paths} == {"c4-train", "c4-validation"}
  assert sum(p.stat().st_size for p in paths) < 5 * 2**20
  with gzip.open(paths[0], "rt") as f:
    first = json.loads(f.readline())
  assert set(first) == {"text", "timestamp", "url"} and len(first["text"]) > 100
  _, out = batches(SAMPLE_DIR, 2, seq_len=128, batch_size=4)
  assert out[0].shape == (4, 129)
  assert data_lib.eval_batches(
    str(SAMPLE_DIR), BYTES, seq_len=128, batch_size=16, max_batches=8
  )


def test_missing_hub_packages_are_explained_before_any_batch(monkeypatch):
  monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(UserError, match="--tokenizer byte"):
    data_lib.load_tokenizer("t5-base")
  with pytest.raises(UserError, match="datasets package"):
    data_lib.PackedBatches(
      data_lib.HubDataset(), "train", BYTES, seq_len=15, batch_size=2, seed=0
    )


# ----------------------------------------------------------------------------
# --data-dir hf: the sample streamed through datasets' own local builder
# ----------------------------------------------------------------------------

HUB_SAMPLE = data_lib.HubDataset(str(SAMPLE_DIR), None)
START = {"epoch": 0, "shard": 0, "line": 0}


def texts(source, split="train", shuffle=False, stream=0, streams=1, epoch=0):
  start = {**START, "epoch": epoch}
  return [
    text
    for _, text in data_lib.documents(
      source, split, 0, shuffle, start, False, stream, streams
    )
  ]


def test_dataset_flag_names_a_hub_dataset_or_a_local_directory():
  parse = data_lib.HubDataset.parse
  assert parse("allenai/c4:en") == data_lib.HubDataset("allenai/c4", "en")
  assert parse("wikitext") == data_lib.HubDataset("wikitext", None)
  assert parse(str(SAMPLE_DIR), "body") == data_lib.HubDataset(
    str(SAMPLE_DIR), None, "body"
  )


def test_hub_streams_split_the_documents_and_shuffle_each_epoch():
  local = texts(str(SAMPLE_DIR))
  assert sorted(texts(HUB_SAMPLE)) == sorted(local)
  first, second = (
    texts(HUB_SAMPLE, shuffle=True, stream=g, streams=2) for g in (0, 1)
  )
  assert sorted(first + second) == sorted(local)
  assert not set(first) & set(second)
  # Each epoch is another partition (datasets deals the shuffled files out).
  later = [
    texts(HUB_SAMPLE, shuffle=True, stream=g, streams=2, epoch=1)
    for g in (0, 1)
  ]
  assert sorted(later[0] + later[1]) == sorted(local)
  assert not set(later[0]) & set(later[1])
  assert later[0] != first
  assert first != [t for t in texts(HUB_SAMPLE) if t in set(first)]


def test_hub_batches_resume_on_the_next_unseen_batch():
  def open_batches():
    return data_lib.PackedBatches(
      HUB_SAMPLE, "train", BYTES, seq_len=127, batch_size=4, seed=3
    )

  batches = open_batches()
  for _ in range(5):
    next(batches)
  state = json.loads(json.dumps(batches.state()))
  expected = [next(batches) for _ in range(3)]
  resumed = open_batches()
  resumed.restore(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)


def test_hub_dataset_without_the_text_column_is_refused_before_any_batch():
  source = data_lib.HubDataset(str(SAMPLE_DIR), None, "content")
  with pytest.raises(UserError, match=r"no column 'content'.*--text-column"):
    data_lib.PackedBatches(
      source, "train", BYTES, seq_len=15, batch_size=2, seed=0
    )


def test_the_shipped_subword_tokenizer_loads_offline_and_round_trips():
  tokenizer = data_lib.load_tokenizer(str(SAMPLE_DIR.parent / "tokenizer"))
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (4096, 1)
  (text, *_) = texts(str(SAMPLE_DIR), "validation")
  ids = tokenizer.encode(text)
  assert len(ids) < len(text.encode("utf-8")) / 2
  assert tokenizer.decode(ids) == text


def test_bytes_per_token_counts_utf8_bytes_and_one_eos_per_document(tmp_path):
  write_shard(
    tmp_path / "c4-validation.00000-of-00008.json.gz",
    [record("ab"), record("é")],  # 2 + 2 bytes; 2 + 1 and 2 + 1 tokens
  )
  assert data_lib.bytes_per_token(str(tmp_path), BYTES) == pytest.approx(4 / 6)
  subwords = data_lib.load_tokenizer(str(SAMPLE_DIR.parent / "tokenizer"))
  assert 2.5 < data_lib.bytes_per_token(str(SAMPLE_DIR), subwords) < 3.5
