"""Pre-train a LLaMA model with grassjax (or AdamW), on one device or a mesh.

    python -m examples.llama.train                      # tiny model, shipped sample
    python -m examples.llama.train --optimizer adamw    # the same with AdamW
    python -m examples.llama.train --help               # every flag
    python -m examples.llama.train --model 7b --scan-layers --dry-run  # memory

The training state is the model and an ``nnx.Optimizer``, split into pure
pytrees; one jitted function, with the state donated, makes one optimizer
step (``step.py``: the ``--grad-accum`` micro-batches, clipping, the update,
or the fused per-layer update). The host only waits for the device every
``--log-every`` steps, to read the losses. ``--dry-run`` compiles that step
from abstract shapes and prints its memory instead of training.

Written to ``--out-dir``: ``metrics.jsonl`` (the loss and learning rate of
every step, the energy fraction of each kind of projected kernel, tokens/s,
evaluations), ``summary.json``, ``loss.png`` and, when
``tensorboardX`` is installed, TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from examples.llama import checkpoint as checkpoint_lib
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama.errors import UserError, check_writable_directory
from examples.llama.step import (
  GraphDefs,
  TrainState,
  cross_entropy,
  make_train_step,
)

try:
  import tensorboardX
except ImportError:
  tensorboardX = None


class RunResult(NamedTuple):
  """What :func:`train` returns: the summary and every metrics record."""

  summary: dict[str, Any]
  records: list[dict[str, Any]]


def _build(
  model_config: model_lib.LlamaConfig, tx: optax.GradientTransformation, seed: int
) -> tuple[model_lib.Llama, nnx.Optimizer]:
  model = model_lib.Llama(model_config, rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(
  model_config: model_lib.LlamaConfig, tx: optax.GradientTransformation, seed: int
) -> tuple[GraphDefs, TrainState]:
  """The graph definitions and the shapes of the state, without allocating it."""
  model, optimizer = nnx.eval_shape(lambda: _build(model_config, tx, seed))
  model_def, model_state = nnx.split(model)
  optimizer_def, optimizer_state = nnx.split(optimizer)
  return GraphDefs(model_def, optimizer_def), TrainState(model_state, optimizer_state)


def init_train_state(
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation,
  seed: int,
  shardings,
) -> TrainState:
  """A freshly initialized state, each array created directly on its shards."""

  @functools.partial(jax.jit, out_shardings=shardings)
  def init() -> TrainState:
    model, optimizer = _build(model_config, tx, seed)
    return TrainState(nnx.state(model), nnx.state(optimizer))

  return init()


def make_eval_step(graphdefs: GraphDefs, shardings, batch_sharding, mesh):
  """The jitted ``(state, tokens) -> mean loss`` of one validation batch."""

  def eval_step(state: TrainState, tokens: jax.Array) -> jax.Array:
    model = nnx.merge(graphdefs.model, state.model)
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])

  return jax.jit(
    eval_step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=sharding_lib.replicated(mesh),
  )


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or ``ShapeDtypeStruct``) of a pytree."""
  return sum(
    math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
    if hasattr(x, "dtype")
  )


# The files a run writes to ``--out-dir`` (besides TensorBoard's).
OUTPUTS = ("metrics.jsonl", "summary.json", "loss.png")


class MetricsLog:
  """``metrics.jsonl`` (and TensorBoard events): one JSON record per line.

  On a resumed run the records up to the restored step are kept and the rest
  dropped, so the file describes one run however often it was resumed.
  Nothing is written until the first record, so a run that fails before its
  first step leaves the directory as it found it.
  """

  def __init__(self, out_dir: Path, start_step: int, enabled: bool):
    """Reads ``out_dir/metrics.jsonl``, keeping the records up to ``start_step``.

    Args:
      out_dir: the output directory (created by the first record).
      start_step: the step the run starts from (0, or the restored step).
      enabled: write files (False on all processes but the first).
    """
    self.out_dir, self.start_step, self.enabled = out_dir, start_step, enabled
    self.path = out_dir / "metrics.jsonl"
    self.records: list[dict[str, Any]] = []
    if start_step and self.path.exists():
      with self.path.open() as f:
        self.records = [r for r in map(json.loads, f) if r["step"] <= start_step]
    self._file = None
    self._tensorboard = None

  def _open(self) -> None:
    """Replaces the files of an earlier run, or of the steps after ``start_step``."""
    earlier = [name for name in OUTPUTS if (self.out_dir / name).exists()]
    if earlier and not self.start_step:
      tqdm.write(f"{self.out_dir}: replacing an earlier run's {', '.join(earlier)}")
    self.out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS[1:]:  # they describe a run that reached its end
      (self.out_dir / name).unlink(missing_ok=True)
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
    self._file = self.path.open("a")
    if tensorboardX is not None:
      self._tensorboard = tensorboardX.SummaryWriter(str(self.out_dir))

  def write(self, record: dict[str, Any]) -> None:
    """Appends ``record`` (it must have a ``step``)."""
    if self.enabled and self._file is None:
      self._open()
    self.records.append(record)
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for name, value in record.items():
        if name != "step" and value is not None:
          self._tensorboard.add_scalar(name, value, record["step"])

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._file is not None:
      self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


class Throughput:
  """Tokens per second over the training steps, without compilation, evaluation and saving.

  :meth:`lap` is called each time the host has waited for the device; the
  first lap (the compilation) is not counted, and :meth:`restart` drops the
  time spent since the last lap (evaluating, saving).
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.steps = 0
    self.seconds = 0.0
    self._clock: float | None = None

  def lap(self, steps: int) -> float | None:
    """Ends a lap of ``steps`` steps; returns its tokens/s (``None`` for the first)."""
    now = time.perf_counter()
    rate = None
    if self._clock is not None:
      self.steps += steps
      self.seconds += now - self._clock
      rate = steps * self.tokens_per_step / (now - self._clock)
    self._clock = now
    return rate

  def restart(self) -> None:
    """Starts the next lap now, if timing has started."""
    if self._clock is not None:
      self._clock = time.perf_counter()

  @property
  def tokens_per_sec(self) -> float | None:
    """Average over all counted laps."""
    if not self.seconds:
      return None
    return self.steps * self.tokens_per_step / self.seconds


def record_losses(
  pending: Sequence[tuple[int, jax.Array]],
  schedule: optax.Schedule,
  metrics: MetricsLog,
  throughput: Throughput,
  bar: tqdm,
) -> None:
  """Waits for the metrics of the ``pending`` steps and records them.

  Each step's metrics (loss, energy fractions) and learning rate go to
  ``metrics``; the throughput of the lap, and the last loss, to the progress
  bar.
  """
  values = jax.device_get([m for _, m in pending])
  rate = throughput.lap(len(pending))
  steps = [step for step, _ in pending]
  lrs = np.asarray(schedule(np.array(steps) - 1))
  for step, step_metrics, lr in zip(steps, values, lrs, strict=True):
    # The energy fractions are NaN before the first subspace exists: not logged.
    # A NaN loss is.
    record = {"step": step}
    record.update(
      (k, float(v))
      for k, v in step_metrics.items()
      if not (k.startswith("energy_") and np.isnan(v))
    )
    metrics.write({**record, "lr": float(lr)})
  if rate is not None:
    metrics.write({"step": steps[-1], "tokens_per_sec": rate})
    last = values[-1]["loss"]
    bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
  bar.update(len(pending))


def evaluate(eval_step, state: TrainState, batches: Sequence[jax.Array]) -> float:
  """Mean validation loss over ``batches`` (all of one size)."""
  losses = [eval_step(state, batch) for batch in batches]
  return float(np.mean(jax.device_get(losses)))


def plot_losses(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
  """Writes the training and validation loss curves of ``records`` to ``path``."""
  # A bare Figure needs no backend and leaves pyplot's state (and a notebook's
  # inline display) alone.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  plot_run(ax, records, label="", color="C0")
  ax.set(xlabel="step", ylabel="loss", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_run(ax, records: Sequence[dict[str, Any]], label: str, color: str) -> None:
  """Adds one run's training loss (smoothed) and validation loss to ``ax``."""
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  prefix = f"{label} " if label else ""
  if train:
    steps, losses = map(np.asarray, zip(*train, strict=True))
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
    ax.plot(steps[window - 1 :], smooth, color=color, label=f"{prefix}train")
  if evals:
    steps, losses = zip(*evals, strict=True)
    ax.plot(steps, losses, "o--", color=color, markersize=4, label=f"{prefix}eval")


def train(
  cfg: config_lib.TrainConfig,
  *,
  model_config: model_lib.LlamaConfig | None = None,
  progress: bool = True,
) -> RunResult:
  """Trains, evaluates and writes the outputs of one run.

  Args:
    cfg: the run's configuration.
    model_config: the model; default: ``cfg.model`` with the tokenizer's
      vocabulary and ``cfg``'s sequence length, dtype and layer options.
    progress: show a progress bar.

  Returns:
    The summary (also written to ``summary.json``) and the metrics records.

  Raises:
    UserError: bad input, found before the first step: a path that cannot be
      written, unusable data, a rank the model's kernels cannot take, a batch
      that does not split over the devices, checkpoints without
      ``cfg.resume``, a checkpoint of another configuration
      (``checkpoint.ConfigMismatchError``) or none readable.
  """
  started = time.perf_counter()
  main_process = jax.process_index() == 0

  def announce(message: str) -> None:
    if main_process:
      tqdm.write(message)

  out_dir = Path(cfg.out_dir)
  if main_process:
    check_writable_directory(out_dir, "--out-dir")
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  if model_config is None:
    model_config = config_lib.model_config(cfg, cfg.vocab_size or tokenizer.vocab_size)
  config_lib.check_rank(cfg, model_config)
  mesh = sharding_lib.make_mesh(cfg.mesh)
  if cfg.micro_batch_size % mesh.size:
    raise UserError(
      f"the micro-batch of {cfg.micro_batch_size} sequences (--batch-size"
      f" {cfg.batch_size} / --grad-accum {cfg.grad_accum}) does not split over"
      f" {mesh.size} devices."
    )
  batches = data_lib.PackedBatches(
    cfg.data_dir,
    "train",
    tokenizer,
    seq_len=cfg.seq_len,
    batch_size=cfg.batch_size,
    seed=cfg.seed,
  )
  eval_data = data_lib.eval_batches(
    cfg.data_dir,
    tokenizer,
    seq_len=cfg.seq_len,
    batch_size=cfg.micro_batch_size,
    max_batches=cfg.eval_batches,
  )
  if not eval_data:
    raise UserError(
      f"the validation data in {cfg.data_dir} holds no batch of"
      f" {cfg.micro_batch_size} x {cfg.seq_len + 1} tokens."
    )

  tx = config_lib.make_optimizer(cfg, cfg.steps)
  checkpoints = None
  if cfg.checkpoint_dir is not None:
    checkpoints = checkpoint_lib.Checkpointer(
      cfg.checkpoint_dir,
      checkpoint_lib.run_config(cfg, model_config),
      resume=cfg.resume,
    )

  graphdefs, abstract_state = abstract_train_state(model_config, tx, cfg.seed)
  shardings = sharding_lib.state_shardings(abstract_state, mesh, cfg.mesh)
  restored = None
  if checkpoints is not None:
    restored = checkpoints.restore_latest(abstract_state, shardings)
  start = 0
  if restored is not None:
    start, state, data_state = restored
    batches.restore(data_state)
    announce(f"resumed from {cfg.checkpoint_dir} at step {start}")
  else:
    if cfg.resume:
      announce(f"no checkpoint in {cfg.checkpoint_dir} yet: starting at step 0")
    state = init_train_state(model_config, tx, cfg.seed, shardings)

  train_batch = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  eval_batch = sharding_lib.batch_sharding(mesh, batch_axis=0, ndim=2)
  train_step = make_train_step(cfg, graphdefs, shardings, train_batch, mesh)
  eval_step = make_eval_step(graphdefs, shardings, eval_batch, mesh)
  eval_data = [sharding_lib.put(batch, eval_batch) for batch in eval_data]
  schedule = config_lib.learning_rate_schedule(cfg)

  metrics = MetricsLog(out_dir, start, enabled=main_process)
  throughput = Throughput(cfg.batch_size * cfg.seq_len)
  bar = tqdm(
    total=cfg.steps,
    initial=start,
    desc=cfg.optimizer,
    unit="step",
    disable=not (progress and main_process),
    dynamic_ncols=True,
  )
  pending: list[tuple[int, jax.Array]] = []
  final_eval = None
  for step in range(start + 1, cfg.steps + 1):
    tokens = next(batches).reshape(cfg.grad_accum, cfg.micro_batch_size, -1)
    state, step_metrics = train_step(state, sharding_lib.put(tokens, train_batch))
    pending.append((step, step_metrics))

    last = step == cfg.steps
    evaluate_now = step % cfg.eval_every == 0 or last
    save_now = checkpoints is not None and (step % cfg.checkpoint_every == 0 or last)
    if step % cfg.log_every == 0 or step == start + 1 or evaluate_now or save_now:
      record_losses(pending, schedule, metrics, throughput, bar)
      pending = []
    if evaluate_now:
      eval_loss = evaluate(eval_step, state, eval_data)
      record = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)}
      metrics.write(record)
      announce(
        f"step {step}: eval loss {eval_loss:.4f}, perplexity {record['eval_ppl']:.2f}"
      )
      if last:
        final_eval = record
    if save_now:
      checkpoints.save(step, state, batches.state())
    if evaluate_now or save_now:
      throughput.restart()
  bar.close()

  if final_eval is None:  # resumed from the final checkpoint: nothing left to train
    eval_loss = evaluate(eval_step, state, eval_data)
    final_eval = {"eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)}
  if checkpoints is not None:
    checkpoints.close()
  metrics.close()

  # Resumed from the final checkpoint into a new --out-dir, the run has no
  # training loss of its own.
  last_train = next((r for r in reversed(metrics.records) if "loss" in r), {})
  params = nnx.state(nnx.merge(graphdefs.model, abstract_state.model), nnx.Param)
  optimizer_bytes = tree_bytes(jax.eval_shape(tx.init, params))
  adamw_bytes = tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  summary = {
    "optimizer": cfg.optimizer,
    "model": cfg.model,
    "steps": cfg.steps,
    "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
    "devices": mesh.size,
    "param_count": model_lib.param_count(model_config),
    "final_train_loss": last_train.get("loss"),
    "final_energy_fraction": {
      k: v for k, v in last_train.items() if k.startswith("energy_")
    },
    "final_eval_loss": final_eval["eval_loss"],
    "final_eval_ppl": final_eval["eval_ppl"],
    "tokens_per_sec": throughput.tokens_per_sec,
    "optimizer_state_bytes": optimizer_bytes,
    "adamw_state_bytes": adamw_bytes,
    "state_bytes_ratio_to_adamw": optimizer_bytes / adamw_bytes,
    "wall_seconds": time.perf_counter() - started,
    "config": dataclasses.asdict(cfg),
  }
  if main_process:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if metrics.records:
      plot_losses(
        metrics.records, out_dir / "loss.png", f"{cfg.model} / {cfg.optimizer}"
      )
  return RunResult(summary, metrics.records)


def format_summary(summary: dict[str, Any]) -> str:
  """A few readable lines of a run's summary."""
  rate = summary["tokens_per_sec"]
  return "\n".join(
    [
      f"{summary['model']} ({summary['param_count']:,} parameters),"
      f" {summary['optimizer']}, {summary['steps']} steps",
      f"  final eval loss     {summary['final_eval_loss']:.4f}"
      f"  (perplexity {summary['final_eval_ppl']:.2f})",
      f"  throughput          {'n/a' if rate is None else f'{rate:,.0f}'} tokens/s",
      f"  optimizer state     {summary['optimizer_state_bytes'] / 2**20:,.2f} MiB"
      f"  (AdamW: {summary['adamw_state_bytes'] / 2**20:,.2f} MiB,"
      f" ratio {summary['state_bytes_ratio_to_adamw']:.3f})",
      f"  wall time           {summary['wall_seconds']:.0f} s",
    ]
    + [
      f"  energy fraction     {kind.removeprefix('energy_'):9s} {value:.3f}"
      for kind, value in summary["final_energy_fraction"].items()
    ]
  )


def compiler_options(backend: str) -> dict[str, str]:
  """Options for compiling a step to be measured, not run.

  On CPU, XLA's default scheduler orders independent work early for
  parallelism (for a 7b model it converts the 32000 x 4096 head to float32
  before the forward pass and holds it through every block); its
  memory-optimized scheduler is the better model of an accelerator
  compiler's memory-aware scheduling. Other backends: their defaults.
  """
  if backend != "cpu":
    return {}
  return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def step_memory(
  cfg: config_lib.TrainConfig,
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation | None = None,
) -> dict[str, int]:
  """The memory of one compiled training step, in bytes, per device.

  The step is compiled from abstract shapes (``jit(...).lower(...).compile()``,
  with :func:`compiler_options`) and read with ``memory_analysis()``: nothing
  is allocated and no data is read. ``peak`` is arguments + outputs + temporaries - donated aliases (the
  compiler's buffer assignment; a GPU assigns buffers differently, so a
  real step's peak is close, not equal). ``gradients`` is the gradient tree's
  size (one block's and the rest with ``--fused-update``); like the
  activations and the optimizer's work, it lies inside ``temporaries``.
  ``tx`` replaces ``cfg``'s optimizer (for another library's, in the
  whole-model step).
  """
  if tx is None:
    tx = config_lib.make_optimizer(cfg, cfg.steps)
  graphdefs, state = abstract_train_state(model_config, tx, cfg.seed)
  mesh = sharding_lib.make_mesh(cfg.mesh)
  shardings = sharding_lib.state_shardings(state, mesh, cfg.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  step = make_train_step(cfg, graphdefs, shardings, batch_sharding, mesh)
  batch = jax.ShapeDtypeStruct(
    (cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len + 1), jnp.int32
  )
  analysis = (
    step.lower(state, batch).compile(compiler_options(jax.default_backend()))
  ).memory_analysis()
  params = nnx.state(nnx.merge(graphdefs.model, state.model), nnx.Param)
  gradients = tree_bytes(params)
  if cfg.fused_update:
    layers = tree_bytes(params[config_lib.LAYERS])
    gradients += layers // model_config.n_layers - layers
  return {
    "parameters": tree_bytes(params),
    "optimizer_state": tree_bytes(state.optimizer),
    "gradients": gradients,
    "temporaries": analysis.temp_size_in_bytes,
    "peak": analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes,
  }


def format_memory(memory: dict[str, int], devices: int) -> str:
  """The lines ``--dry-run`` prints."""
  gib = {k: v / 2**30 for k, v in memory.items()}
  where = "per device, " if devices > 1 else ""
  fits = [f"{size} GiB" for size in (24, 40, 80) if memory["peak"] <= size * 2**30]
  return "\n".join(
    [
      f"compiled training step ({where}compile-only: nothing allocated;"
      f" {'memory-optimized schedule' if jax.default_backend() == 'cpu' else 'default schedule'})",
      f"  parameters          {gib['parameters']:8.2f} GiB",
      f"  optimizer state     {gib['optimizer_state']:8.2f} GiB",
      f"  gradients           {gib['gradients']:8.2f} GiB  (within temporaries)",
      f"  temporaries         {gib['temporaries']:8.2f} GiB",
      f"  peak                {gib['peak']:8.2f} GiB",
      f"  fits                {', '.join(fits) if fits else 'none of 24, 40, 80 GiB'}",
    ]
  )


def dry_run(cfg: config_lib.TrainConfig) -> dict[str, int]:
  """``--dry-run``: the step's memory for ``cfg``, printed; returns the figures."""
  vocab_size = cfg.vocab_size or data_lib.load_tokenizer(cfg.tokenizer).vocab_size
  model_config = config_lib.model_config(cfg, vocab_size)
  config_lib.check_rank(cfg, model_config)
  memory = step_memory(cfg, model_config)
  if jax.process_index() == 0:
    n_params = model_lib.param_count(model_config)
    print(
      f"{cfg.model} ({n_params:,} parameters), {cfg.optimizer}, batch"
      f" {cfg.batch_size} x {cfg.seq_len}, on {jax.devices()[0].platform}"
    )
    print(format_memory(memory, sharding_lib.make_mesh(cfg.mesh).size))
  return memory


def main(argv: Sequence[str] | None = None) -> None:
  """Runs ``python -m examples.llama.train``."""
  cfg = config_lib.parse_args(argv)
  if cfg.distributed:
    jax.distributed.initialize()
  try:
    if cfg.dry_run:
      dry_run(cfg)
      return
    result = train(cfg)
  except UserError as err:  # bad input: say what is wrong, without a traceback
    raise SystemExit(f"python -m examples.llama.train: error: {err}") from None
  if jax.process_index() == 0:
    print(format_summary(result.summary))
    print(f"  outputs             {cfg.out_dir}/")


if __name__ == "__main__":
  main()
