"""The training configuration: every command-line flag, and the optimizer it
names.

:class:`TrainConfig` holds all settings with their defaults; the argparse
parser is built from its fields, so a flag, its default and its help live in
one place. The defaults train the ``tiny`` model on the shipped C4-format
sample with GrassWalk in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import grassjax
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import targets as targets_lib
from examples.llama.errors import UserError

DEFAULT_DATA_DIR = str(Path(__file__).absolute().parent / "data")
OPTIMIZERS = ("adamw", *grassjax.OPTIMIZERS)
STEP_SIZE_OPTIMIZERS = tuple(
  name
  for name, info in grassjax.OPTIMIZERS.items()
  if "step_size" in info.defaults
)
MESHES = ("none", "dp", "fsdp")
DTYPES = ("float32", "bfloat16")
MOMENT_DTYPES = (*DTYPES, "8bit")
CLIPS = ("global", "per-layer", "none")
SVD_METHODS = ("exact", "randomized")
PROJECTED_SIDES = ("shorter", "longer")
# The flags that place a process in a multi-process run: all or none.
PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")


def _flag(default, help: str, choices: Sequence[str] | None = None):
  """A dataclass field that also carries its command-line help and choices."""
  return dataclasses.field(
    default=default, metadata={"help": help, "choices": choices}
  )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run; one field per command-line flag."""

  optimizer: str = _flag("grasswalk", "optimizer", OPTIMIZERS)
  model: str = _flag("tiny", "model size", tuple(model_lib.CONFIGS))
  steps: int = _flag(600, "optimizer steps")
  batch_size: int = _flag(16, "sequences per optimizer step (global batch)")
  grad_accum: int = _flag(
    1, "micro-batches per step; the batch is split into this many, run in turn"
  )
  lr: float = _flag(3e-3, "peak learning rate")
  warmup: int | None = _flag(
    None,
    "linear warmup steps, then cosine decay to 10%% of --lr; None: min(60,"
    " --steps // 10)",
  )
  rank: int = _flag(32, "rank of the projected gradients (low-rank optimizers)")
  update_interval: int = _flag(50, "steps between subspace updates")
  scale: float = _flag(0.25, "scale of the low-rank update (GaLore's alpha)")
  step_size: float | None = _flag(
    None,
    "subspace step: GrassWalk's angle in radians, SubTrack++'s eta;"
    " None: the optimizer's default",
  )
  weight_decay: float = _flag(0.0, "decoupled weight decay")
  adaptive_optimizer: bool | None = _flag(
    None,
    "rotate Adam's moments onto each new basis; None: the optimizer's default",
  )
  recovery_scaling: bool | None = _flag(
    None,
    "add the rescaled out-of-subspace gradient; None: the optimizer's default",
  )
  svd_method: str | None = _flag(
    None,
    "exact or randomized SVD for GaLore's bases and the first basis of"
    " GrassWalk and SubTrack++ (randomized never gathers a sharded gradient);"
    " None: exact",
    SVD_METHODS,
  )
  projected_side: str = _flag(
    "shorter",
    "which side of each kernel the low-rank optimizers project: shorter (the"
    " papers': moments r x max) or longer (as optax.contrib.galore: moments"
    " r x min)",
    PROJECTED_SIDES,
  )
  moment_dtype: str = _flag(
    "float32",
    "how Adam's moments are stored: float32, bfloat16 (halves them) or 8bit"
    " (block-wise 8-bit codes, about a quarter)",
    MOMENT_DTYPES,
  )
  basis_dtype: str = _flag(
    "float32", "dtype of the stored bases of the low-rank optimizers", DTYPES
  )
  clip: str = _flag(
    "global",
    "gradient clipping to norm 1: global (all gradients), per-layer (each"
    " scanned block on its own, and the embedding, final norm and head as one"
    " group) or none",
    CLIPS,
  )
  seed: int = _flag(
    0, "seed of the model init, the data order and the subspaces"
  )
  data_dir: str = _flag(
    DEFAULT_DATA_DIR,
    "directory of C4-format shards, or 'hf' to stream --dataset with Hugging"
    " Face datasets",
  )
  dataset: str = _flag(
    "allenai/c4:en",
    "with --data-dir hf: a text dataset on the Hugging Face hub, NAME[:CONFIG]"
    " (allenai/c4:en, HuggingFaceFW/fineweb:sample-10BT), or a local directory"
    " of data files (json, csv, parquet, text) named by split (*train*,"
    " *validation*)",
  )
  text_column: str = _flag(
    "text", "with --data-dir hf: the column of --dataset holding the text"
  )
  tokenizer: str = _flag(
    "byte",
    "'byte'; a Hugging Face tokenizer such as t5-base; or a directory one was"
    " saved to, such as examples/llama/tokenizer (subwords trained on the"
    " sample)",
  )
  seq_len: int = _flag(128, "tokens per training sequence")
  eval_every: int | None = _flag(
    None,
    "steps between evaluations (and one at the end); None: min(100, --steps"
    " // 6), at least 1",
  )
  eval_batches: int = _flag(8, "validation batches per evaluation")
  checkpoint_dir: str | None = _flag(
    None, "save checkpoints here; None: no checkpoints"
  )
  checkpoint_every: int | None = _flag(
    None,
    "steps between checkpoints (and one at the end); None: min(200, --steps"
    " // 3), at least 1",
  )
  resume: bool = _flag(
    False, "continue from the latest checkpoint in --checkpoint-dir"
  )
  out_dir: str = _flag("runs/llama", "where metrics, plots and the summary go")
  mesh: str = _flag(
    "none", "none: one device; dp: data parallel; fsdp: sharded state", MESHES
  )
  dtype: str = _flag("float32", "compute dtype", DTYPES)
  param_dtype: str = _flag(
    "float32",
    "dtype the parameters are stored in; the optimizer computes in float32 and"
    " rounds its update onto bfloat16 weights stochastically",
    DTYPES,
  )
  stochastic_rounding: bool = _flag(
    True,
    "round updates onto bfloat16 weights stochastically (unbiased);"
    " --no-stochastic-rounding rounds to nearest",
  )
  scan_layers: bool = _flag(False, "stack the layers and run them with a scan")
  remat: bool = _flag(False, "recompute activations in the backward pass")
  fused_update: bool = _flag(
    False,
    "update each scanned block inside the backward pass, so only one block's"
    " gradients exist at a time (needs --scan-layers, --grad-accum 1 and"
    " --clip per-layer or none)",
  )
  vocab_size: int | None = _flag(
    None, "vocabulary size of the model; None: the tokenizer's"
  )
  dry_run: bool = _flag(
    False,
    "compile the training step from abstract shapes, print its memory and exit"
    " (allocates nothing, reads no data)",
  )
  target: str = _flag(
    "cpu",
    "with --dry-run: the device to compile for, ahead of time on this machine:"
    " cpu (this machine), a GPU (gpu-h100-80gb, gpu-h200, gpu-a100-40gb,"
    " gpu-a100-80gb, gpu-l4, gpu-rtx4090; the CUDA plugin's deviceless"
    " compiler) or a TPU chip (tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e; libtpu),"
    " with :COUNT devices or a TPU slice shape (tpu-v5e:4x4)",
  )
  distributed: bool = _flag(
    False,
    "join a multi-process run (jax.distributed) first: from"
    " --coordinator-address,"
    " --num-processes and --process-id, or what the cluster (SLURM, Open MPI,"
    " Cloud TPU, ...) provides when they are not given",
  )
  coordinator_address: str | None = _flag(
    None,
    "HOST:PORT where process 0 serves the coordinator (with --distributed)",
  )
  num_processes: int | None = _flag(
    None, "processes in the run (with --distributed and --coordinator-address)"
  )
  process_id: int | None = _flag(
    None, "this process's index, 0 to --num-processes - 1 (with --distributed)"
  )
  data_streams: int | None = _flag(
    None,
    "independent packed streams of training data, each reading its own shards"
    " and filling its own equal share of the rows of every micro-batch; each"
    " process reads only its streams. The data order depends on this number"
    " alone, not on the devices or processes. None: one per process",
  )
  log_every: int = _flag(10, "steps between progress-bar and loss updates")
  skip_nonfinite: int = _flag(
    0,
    "skip a step whose loss, gradient norm or new state is not finite (its"
    " update is dropped) up to this many times in a row, and stop at the next;"
    " 0: stop at the first. Costs the step up to one more copy of the state",
  )

  def __post_init__(self):
    positive = (
      "steps batch_size grad_accum lr rank update_interval seq_len eval_every"
      " eval_batches checkpoint_every log_every"
    )
    for name in positive.split():
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"--{_flag_name(name)} must be > 0, got {value}.")
    if self.skip_nonfinite < 0:
      raise ValueError(
        f"--skip-nonfinite must be >= 0, got {self.skip_nonfinite}."
      )
    if self.warmup is not None and not 0 <= self.warmup < self.steps:
      raise ValueError(
        f"--warmup must be in [0, --steps); got {self.warmup} with --steps"
        f" {self.steps}."
      )
    if self.batch_size % self.grad_accum:
      raise ValueError(
        f"--batch-size {self.batch_size} is not divisible by --grad-accum"
        f" {self.grad_accum}."
      )
    if self.optimizer == "adamw" and (
      self.adaptive_optimizer is not None or self.recovery_scaling is not None
    ):
      raise ValueError(
        "--adaptive-optimizer and --recovery-scaling apply to the low-rank"
        " optimizers, not adamw."
      )
    for name, default in (
      ("basis_dtype", "float32"),
      ("projected_side", "shorter"),
    ):
      if self.optimizer == "adamw" and getattr(self, name) != default:
        raise ValueError(
          f"--{_flag_name(name)} applies to the low-rank optimizers, not adamw."
        )
    if self.clip == "per-layer" and not self.scan_layers:
      raise ValueError(
        "--clip per-layer needs --scan-layers (the blocks stacked)."
      )
    if self.fused_update:
      if not self.scan_layers:
        raise ValueError("--fused-update needs --scan-layers.")
      if self.grad_accum != 1:
        raise ValueError(
          "--fused-update applies each block's gradient at once, so it cannot"
          f" accumulate micro-batches (--grad-accum {self.grad_accum})."
        )
      if self.clip == "global":
        raise ValueError(
          "--fused-update cannot clip by the global norm (it never holds every"
          " gradient): use --clip per-layer or --clip none."
        )
    if self.vocab_size is not None and self.vocab_size < 1:
      raise ValueError(f"--vocab-size must be > 0, got {self.vocab_size}.")
    if self.svd_method is not None:
      if self.svd_method not in SVD_METHODS:
        raise ValueError(
          f"unknown --svd-method {self.svd_method!r}; choose from"
          f" {', '.join(SVD_METHODS)}."
        )
      takes = grassjax.OPTIMIZERS.get(self.optimizer)
      if takes is None or "svd_method" not in takes.defaults:
        raise ValueError(
          f"--svd-method applies to galore, grasswalk and subtrack_pp, not"
          f" {self.optimizer}."
        )
    if (
      self.step_size is not None and self.optimizer not in STEP_SIZE_OPTIMIZERS
    ):
      raise ValueError(
        "--step-size applies to grasswalk and subtrack_pp, not"
        f" {self.optimizer}."
      )
    if self.target != "cpu":
      if not self.dry_run:
        raise ValueError(
          f"--target {self.target} compiles for another device: it needs"
          " --dry-run."
        )
      try:
        targets_lib.parse_target(self.target)
      except UserError as err:
        raise ValueError(str(err)) from None
    if self.resume and self.checkpoint_dir is None:
      raise ValueError("--resume needs --checkpoint-dir.")
    self._check_processes()
    if self.data_streams is not None:
      if self.data_streams < 1:
        raise ValueError(
          f"--data-streams must be > 0, got {self.data_streams}."
        )
      if self.micro_batch_size % self.data_streams:
        raise ValueError(
          f"--data-streams {self.data_streams} does not divide the micro-batch"
          f" of {self.micro_batch_size} sequences (--batch-size"
          f" {self.batch_size} / --grad-accum {self.grad_accum}): each stream"
          " fills an equal share of its rows."
        )
    for name, choices in (
      ("optimizer", OPTIMIZERS),
      ("model", tuple(model_lib.CONFIGS)),
      ("mesh", MESHES),
      ("dtype", DTYPES),
      ("param_dtype", DTYPES),
      ("moment_dtype", MOMENT_DTYPES),
      ("basis_dtype", DTYPES),
      ("clip", CLIPS),
      ("projected_side", PROJECTED_SIDES),
    ):
      if getattr(self, name) not in choices:
        raise ValueError(
          f"unknown --{name} {getattr(self, name)!r}; choose from"
          f" {', '.join(choices)}."
        )

  def _check_processes(self) -> None:
    """Checks the flags that place this process in a multi-process run."""
    given = [
      f"--{_flag_name(name)}"
      for name in PROCESS_FLAGS
      if getattr(self, name) is not None
    ]
    if not given:
      return
    if not self.distributed:
      raise ValueError(
        f"{', '.join(given)} without --distributed: add --distributed to join a"
        " multi-process run."
      )
    if len(given) != len(PROCESS_FLAGS):
      raise ValueError(
        "--coordinator-address, --num-processes and --process-id go together"
        f" (got only {', '.join(given)}); give none of them to take all three"
        " from the cluster."
      )
    host, _, port = self.coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(
        f"--coordinator-address {self.coordinator_address!r} is not HOST:PORT"
        " (a port from 1 to 65535)."
      )
    if self.num_processes < 1:
      raise ValueError(
        f"--num-processes must be > 0, got {self.num_processes}."
      )
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(
        f"--process-id must be in [0, {self.num_processes}) for --num-processes"
        f" {self.num_processes}, got {self.process_id}."
      )

  def with_optimizer(self, optimizer: str) -> TrainConfig:
    """This configuration for ``optimizer``, without the settings it does not
    take.

    ``step_size`` and ``svd_method`` are dropped for optimizers without them;
    ``adaptive_optimizer``, ``recovery_scaling``, ``basis_dtype`` and
    ``projected_side`` for AdamW. So one shared
    configuration can run every optimizer.
    """
    keeps_step = optimizer in STEP_SIZE_OPTIMIZERS
    low_rank = optimizer != "adamw"
    info = grassjax.OPTIMIZERS.get(optimizer)
    keeps_svd = info is not None and "svd_method" in info.defaults
    return dataclasses.replace(
      self,
      optimizer=optimizer,
      step_size=self.step_size if keeps_step else None,
      svd_method=self.svd_method if keeps_svd else None,
      adaptive_optimizer=self.adaptive_optimizer if low_rank else None,
      recovery_scaling=self.recovery_scaling if low_rank else None,
      basis_dtype=self.basis_dtype if low_rank else "float32",
      projected_side=self.projected_side if low_rank else "shorter",
    )

  def sized(self) -> TrainConfig:
    """This configuration with the warmup and the evaluation and checkpoint
    intervals left None set from ``steps``.

    Those of the default 600-step run, shrunk in proportion for a shorter
    one, so that any ``--steps`` warms up, evaluates and checkpoints within
    the run.
    """
    defaults = {
      "warmup": min(60, self.steps // 10),
      "eval_every": min(100, max(1, self.steps // 6)),
      "checkpoint_every": min(200, max(1, self.steps // 3)),
    }
    return dataclasses.replace(
      self,
      **{k: v for k, v in defaults.items() if getattr(self, k) is None},
    )

  def resolved(self, process_count: int) -> TrainConfig:
    """This configuration as a run of ``process_count`` processes records it:
    :meth:`sized`, and ``data_streams`` defaults to one stream per process."""
    return dataclasses.replace(
      self.sized(), data_streams=self.data_streams or process_count
    )

  def data_source(self) -> data_lib.Source:
    """Where the documents come from: ``data_dir``, or ``dataset`` streamed
    with ``datasets`` where ``data_dir`` is ``hf``."""
    if self.data_dir != "hf":
      return self.data_dir
    return data_lib.HubDataset.parse(self.dataset, self.text_column)

  @property
  def micro_batch_size(self) -> int:
    """Sequences per micro-batch (one forward and backward pass)."""
    return self.batch_size // self.grad_accum


def _flag_name(field_name: str) -> str:
  return field_name.replace("_", "-")


def _base_type(annotation) -> type:
  """``float`` for ``float | None``; the type itself otherwise."""
  if isinstance(annotation, types.UnionType):
    (base,) = (a for a in typing.get_args(annotation) if a is not type(None))
    return base
  return annotation


def build_parser(
  prog: str, description: str, exclude: Sequence[str] = ()
) -> argparse.ArgumentParser:
  """An argparse parser with one flag per :class:`TrainConfig` field.

  Args:
    prog: the program's name in the usage line.
    description: the parser's description.
    exclude: field names to leave out (they keep their defaults).

  Returns:
    The parser; :func:`config_from_args` turns its result into a config.
  """
  parser = argparse.ArgumentParser(
    prog=prog,
    description=description,
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  hints = typing.get_type_hints(TrainConfig)
  for field in dataclasses.fields(TrainConfig):
    if field.name in exclude:
      continue
    kind = _base_type(hints[field.name])
    flag = f"--{_flag_name(field.name)}"
    if kind is bool:
      parser.add_argument(
        flag,
        action=argparse.BooleanOptionalAction,
        default=field.default,
        help=field.metadata["help"],
      )
    else:
      parser.add_argument(
        flag,
        type=kind,
        default=field.default,
        choices=field.metadata["choices"],
        help=field.metadata["help"],
      )
  return parser


def config_from_args(
  parser: argparse.ArgumentParser, args: argparse.Namespace
) -> TrainConfig:
  """The :class:`TrainConfig` of parsed flags; a bad value exits with a usage
  error."""
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  try:
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
  except ValueError as err:
    parser.error(str(err))


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
  """Parses the command line of ``examples.llama.train``."""
  parser = build_parser(
    "python -m examples.llama.train", "Pre-train a LLaMA model with grassjax."
  )
  return config_from_args(parser, parser.parse_args(argv))


def model_config(cfg: TrainConfig, vocab_size: int) -> model_lib.LlamaConfig:
  """The model of ``cfg.model`` with the tokenizer's vocabulary and the run's
  settings."""
  return model_lib.get_config(cfg.model).replace(
    vocab_size=vocab_size,
    max_seq_len=cfg.seq_len,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    scan_layers=cfg.scan_layers,
    remat=cfg.remat,
  )


def checked_model_config(
  cfg: TrainConfig,
  tokenizer_vocab_size: int,
  model: model_lib.LlamaConfig | None = None,
) -> model_lib.LlamaConfig:
  """The run's model, checked against the tokenizer and ``--rank``.

  Args:
    cfg: the run's configuration.
    tokenizer_vocab_size: the tokenizer's vocabulary.
    model: the model; default: :func:`model_config` with ``--vocab-size``, or
      the tokenizer's vocabulary.

  Raises:
    UserError: from :func:`check_vocab_size` or :func:`check_rank`.
  """
  if model is None:
    model = model_config(cfg, cfg.vocab_size or tokenizer_vocab_size)
  check_vocab_size(cfg, model, tokenizer_vocab_size)
  check_rank(cfg, model)
  return model


def check_vocab_size(
  cfg: TrainConfig, model: model_lib.LlamaConfig, tokenizer_vocab_size: int
) -> None:
  """Checks the model's vocabulary (``--vocab-size``) against the tokenizer's.

  Raises:
    UserError: the model has fewer tokens than the tokenizer. Nothing else
      would notice: the embedding of a larger token id is NaN, and so is the
      loss.
  """
  if model.vocab_size < tokenizer_vocab_size:
    raise UserError(
      f"--vocab-size {model.vocab_size} is smaller than the"
      f" {tokenizer_vocab_size} tokens of --tokenizer {cfg.tokenizer}: use"
      f" --vocab-size {tokenizer_vocab_size} or more."
    )


def check_rank(cfg: TrainConfig, model: model_lib.LlamaConfig) -> None:
  """Checks ``--rank`` against the projected kernels of ``model``.

  Raises:
    UserError: a low-rank optimizer's rank exceeds the smaller side of a
      projected kernel (the optimizer would refuse it inside the model's
      initialization).
  """
  if cfg.optimizer == "adamw":
    return
  params = model_lib.abstract_params(model)
  smallest = min(
    min(x.shape[-2:])
    for x, projected in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(model_lib.low_rank_mask(params)),
      strict=True,
    )
    if projected
  )
  if cfg.rank > smallest:
    raise UserError(
      f"--rank {cfg.rank} exceeds {smallest}, the smaller side of the smallest"
      f" projected kernel of --model {cfg.model}: use --rank {smallest} or"
      " less."
    )


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``cfg.lr``, then cosine decay to
  ``0.1 * cfg.lr``."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=cfg.sized().warmup,
    decay_steps=cfg.steps,
    end_value=0.1 * cfg.lr,
  )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """The optimizer of ``cfg.optimizer``, after global-norm clipping if
  ``cfg.clip``.

  The low-rank optimizers project the attention and MLP kernels
  (:func:`model.low_rank_mask`); the embeddings, norms and LM head get plain
  Adam inside the same transformation. With ``--scan-layers`` the optimizer
  runs as an ``optax.partition`` of two groups, the stacked blocks
  (``layers``) and the rest, each with its own copy of the same optimizer:
  the per-layer update of ``--fused-update`` applies the ``layers`` group one
  block at a time, and the unfused step uses the same partition so that both
  compute the same thing. Per-layer clipping is the training step's (see
  ``step.clip_per_layer``).

  Args:
    cfg: the run's configuration.

  Returns:
    An ``optax.GradientTransformation``.
  """
  tx = base_optimizer(cfg)
  if cfg.scan_layers:
    tx = optax.partition({LAYERS: tx, REST: tx}, param_groups)
  if cfg.clip == "global":
    tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  return tx


LAYERS, REST = "layers", "rest"


def param_groups(params: Any) -> Any:
  """``"layers"`` for the stacked blocks' parameters, ``"rest"`` for the
  others."""

  def group(path, _) -> str:
    first = path[0]
    return (
      LAYERS
      if getattr(first, "key", getattr(first, "name", None)) == LAYERS
      else REST
    )

  return jax.tree_util.tree_map_with_path(group, params)


def base_optimizer(
  cfg: TrainConfig, learning_rate: optax.ScalarOrSchedule | None = None
) -> optax.GradientTransformation:
  """The optimizer of ``cfg.optimizer`` with the run's settings.

  The low-rank optimizers come from :data:`grassjax.OPTIMIZERS`, projecting
  :func:`model.low_rank_mask`'s kernels; settings left ``None`` in ``cfg``
  keep the optimizer's default. AdamW is ``optax.adamw``, or with moments
  stored in less than float32 :func:`grassjax.adamw` (the same step).
  ``learning_rate`` replaces the run's schedule
  (:func:`learning_rate_schedule`) when given.
  """
  lr = learning_rate_schedule(cfg) if learning_rate is None else learning_rate
  # "float32", "bfloat16" or "8bit": what mu_dtype itself takes.
  moments = cfg.moment_dtype
  if cfg.optimizer == "adamw":
    if moments == "float32":
      return optax.adamw(lr, weight_decay=cfg.weight_decay)
    return grassjax.adamw(lr, weight_decay=cfg.weight_decay, mu_dtype=moments)
  info = grassjax.OPTIMIZERS[cfg.optimizer]
  options = {
    "rank": cfg.rank,
    "update_interval": cfg.update_interval,
    "scale": cfg.scale,
    "weight_decay": cfg.weight_decay,
    "projection_mask": model_lib.low_rank_mask,
    "projected_side": cfg.projected_side,
    "mu_dtype": moments,
    "basis_dtype": jnp.dtype(cfg.basis_dtype),
  }
  for name in (
    "step_size",
    "svd_method",
    "adaptive_optimizer",
    "recovery_scaling",
  ):
    if getattr(cfg, name) is not None:
      options[name] = getattr(cfg, name)
  key = None
  if info.needs_key or cfg.svd_method == "randomized":
    # apart from the init's
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  return info.constructor(lr, key=key, **options)
