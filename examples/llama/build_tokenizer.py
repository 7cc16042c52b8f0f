"""Trains the subword tokenizer shipped in ``examples/llama/tokenizer/``.

    python -m examples.llama.build_tokenizer  # rewrites the shipped one
    python -m examples.llama.build_tokenizer --data-dir /data/c4 --out-dir tok

The model is a unigram language model over subword pieces, the kind T5's
SentencePiece tokenizer is (Kudo, "Subword Regularization", 2018), trained
with Hugging Face ``tokenizers`` on the training shards of ``--data-dir``
(the shipped sample by default). Its pieces are made of byte-level symbols
(each UTF-8 byte one symbol, as GPT-2's tokenizer has them), so every text
encodes with no unknown token and decodes back exactly, newlines and code's
indentation included, where T5's normalizer folds whitespace. Ids 0, 1 and 2
are ``<pad>``, ``</s>`` (end of document) and ``<unk>``, as in T5.

It is saved with ``transformers``' ``save_pretrained``, so ``--tokenizer
examples/llama/tokenizer`` loads it offline through the same
``AutoTokenizer`` code as a tokenizer on the hub. The trainer runs on several
threads, so a rebuild may differ from the shipped file in a few pieces.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from examples.llama import config as config_lib
from examples.llama import data as data_lib

DEFAULT_OUT_DIR = Path(__file__).absolute().parent / "tokenizer"
# The sample holds about 2 MB of training text; a larger vocabulary would
# keep pieces that it sees only a handful of times.
DEFAULT_VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def training_texts(data_dir: str | Path) -> Iterator[str]:
  """The documents of the training shards of ``data_dir``, in file order."""
  start = {"epoch": 0, "shard": 0, "line": 0}
  for _, text in data_lib.documents(
    data_dir, "train", 0, False, start, repeat=False
  ):
    yield text


def train_tokenizer(texts: Iterator[str], vocab_size: int):
  """A ``tokenizers.Tokenizer``: unigram pieces over byte-level symbols."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.Unigram())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
    add_prefix_space=False, use_regex=True
  )
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.UnigramTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    unk_token="<unk>",
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return tokenizer


def save(tokenizer, out_dir: Path) -> None:
  """Writes ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``."""
  from transformers import PreTrainedTokenizerFast

  PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    pad_token="<pad>",
    eos_token="</s>",
    unk_token="<unk>",
  ).save_pretrained(out_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=config_lib.DEFAULT_DATA_DIR)
  parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
  parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
  args = parser.parse_args(argv)
  tokenizer = train_tokenizer(training_texts(args.data_dir), args.vocab_size)
  save(tokenizer, args.out_dir)
  loaded = data_lib.load_tokenizer(str(args.out_dir))
  ratio = data_lib.bytes_per_token(args.data_dir, loaded)
  print(
    f"wrote {args.out_dir}: {loaded.vocab_size} tokens; {ratio:.2f} bytes a"
    " token on the validation split (its end-of-document tokens counted)"
  )


if __name__ == "__main__":
  main()
