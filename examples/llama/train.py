"""Pre-train a LLaMA model with grassjax (or AdamW), on one device or a mesh.

    python -m examples.llama.train  # tiny model, shipped sample
    python -m examples.llama.train --optimizer adamw  # the same with AdamW
    python -m examples.llama.train --help  # every flag
    python -m examples.llama.train --model 7b --scan-layers --dry-run  # memory

The training state is the model and an ``nnx.Optimizer``, split into pure
pytrees; one jitted function, with the state donated, makes one optimizer
step (``step.py``: the ``--grad-accum`` micro-batches, clipping, the update,
or the fused per-layer update). The host only waits for the device every
``--log-every`` steps, to read the losses (``metrics.py``). ``--dry-run``
compiles that step from abstract shapes and prints its memory instead of
training (``memory.py``).

Written to ``--out-dir``: ``metrics.jsonl`` (the loss and learning rate of
every step, the energy fraction of each kind of projected kernel, tokens/s,
evaluations), ``summary.json``, ``loss.png`` (``report.py``) and, when
``tensorboardX`` is installed, TensorBoard events.

A run stops early (``faults.py``) at a non-finite step, or past
``--skip-nonfinite`` skipped ones in a row, without saving it: one line names
the step and the last checkpoint with finite values, exit status 3
(``errors.NONFINITE_STATUS``). On SIGTERM or SIGINT it finishes the step,
saves a checkpoint, writes its outputs, says so in one line and exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT); ``--resume``
continues it bit for bit.

A multi-process run (``--distributed``) is the same program in every
process: each reads the training rows of its own devices
(``data.ProcessBatches``) and the whole validation set (small, and the same
everywhere), all save and restore the checkpoints together (and stop
together), and only process 0 writes the outputs above and prints.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from examples.llama import checkpoint as checkpoint_lib
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import faults, report
from examples.llama import memory as memory_lib
from examples.llama import metrics as metrics_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama import targets as targets_lib
from examples.llama.errors import (
  NonFiniteError,
  Preempted,
  UserError,
  check_writable_directory,
  reports_user_errors,
)
from examples.llama.step import (
  GraphDefs,
  TrainState,
  abstract_train_state,
  all_finite,
  cross_entropy,
  init_train_state,
  make_train_step,
)


class RunResult(NamedTuple):
  """What :func:`train` returns: the summary and every metrics record."""

  summary: dict[str, Any]
  records: list[dict[str, Any]]


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


def evaluate(
  eval_step, state: TrainState, batches: Sequence[jax.Array]
) -> float:
  """Mean validation loss over ``batches`` (all of one size)."""
  losses = [eval_step(state, batch) for batch in batches]
  return float(np.mean(jax.device_get(losses)))


def train(
  cfg: config_lib.TrainConfig,
  *,
  model_config: model_lib.LlamaConfig | None = None,
  progress: bool = True,
  stop: faults.StopSignals | None = None,
) -> RunResult:
  """Trains, evaluates and writes the outputs of one run.

  Args:
    cfg: the run's configuration.
    model_config: the model; default: ``cfg.model`` with the tokenizer's
      vocabulary and ``cfg``'s sequence length, dtype and layer options.
    progress: show a progress bar.
    stop: the signals that stop the run after a step (the command's).

  Returns:
    The summary (also written to ``summary.json``) and the metrics records.

  Raises:
    UserError: bad input, found before the first step: a path that cannot be
      written, unusable data, a vocabulary smaller than the tokenizer's, a
      rank the model's kernels cannot take, a batch that does not split over
      the devices, ``--mesh none`` in a multi-process run, data streams that
      do not split over the processes or outnumber the shards, checkpoints
      without ``cfg.resume``, a checkpoint of another configuration
      (``checkpoint.ConfigMismatchError``) or none readable.
    NonFiniteError: a step was not finite (or too many in a row were
      skipped); nothing of it or after it was saved.
    Preempted: ``stop`` caught a signal; the run saved a checkpoint and
      wrote its outputs (the summary has no final evaluation).
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
  model_config = config_lib.checked_model_config(
    cfg, tokenizer.vocab_size, model_config
  )
  mesh = sharding_lib.make_mesh(cfg.mesh)
  if cfg.micro_batch_size % mesh.size:
    raise UserError(
      f"the micro-batch of {cfg.micro_batch_size} sequences (--batch-size"
      f" {cfg.batch_size} / --grad-accum {cfg.grad_accum}) does not split over"
      f" {mesh.size} devices."
    )
  # One data stream per process unless given; the checkpoints' configuration
  # and the summary record the number, which fixes the data order.
  cfg = cfg.resolved(jax.process_count())
  train_batch = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  batch_shape = (cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len + 1)
  source = cfg.data_source()
  batches = data_lib.ProcessBatches(
    source,
    tokenizer,
    seq_len=cfg.seq_len,
    grad_accum=cfg.grad_accum,
    micro_batch_size=cfg.micro_batch_size,
    seed=cfg.seed,
    streams=cfg.data_streams,
    rows=sharding_lib.process_rows(train_batch, batch_shape, axis=1),
  )
  eval_data = data_lib.eval_batches(
    source,
    tokenizer,
    seq_len=cfg.seq_len,
    batch_size=cfg.micro_batch_size,
    max_batches=cfg.eval_batches,
  )
  if not eval_data:
    raise UserError(
      f"the validation data of {source} holds no batch of"
      f" {cfg.micro_batch_size} x {cfg.seq_len + 1} tokens."
    )

  tx = config_lib.make_optimizer(cfg)
  checkpoints = None
  if cfg.checkpoint_dir is not None:
    checkpoints = checkpoint_lib.Checkpointer(
      cfg.checkpoint_dir,
      checkpoint_lib.run_config(cfg, model_config),
      resume=cfg.resume,
    )

  graphdefs, abstract_state = abstract_train_state(model_config, tx, cfg.seed)
  shardings = sharding_lib.state_shardings(abstract_state, mesh, cfg.mesh)
  state_is_finite = jax.jit(
    all_finite,
    in_shardings=(shardings,),
    out_shardings=sharding_lib.replicated(mesh),
  )
  restored = None
  if checkpoints is not None:
    restored = checkpoints.restore_latest(abstract_state, shardings)
  start = 0
  finite_checkpoint = None  # the latest one known to hold finite values
  if restored is not None:
    start, state, data_state = restored
    batches.restore(data_state)
    announce(f"resumed from {cfg.checkpoint_dir} at step {start}")
    if state_is_finite(state):
      finite_checkpoint = start
  else:
    if cfg.resume:
      announce(f"no checkpoint in {cfg.checkpoint_dir} yet: starting at step 0")
    state = init_train_state(model_config, tx, cfg.seed, shardings)

  eval_batch = sharding_lib.batch_sharding(mesh, batch_axis=0, ndim=2)
  train_step = make_train_step(cfg, graphdefs, shardings, train_batch, mesh)
  eval_step = make_eval_step(graphdefs, shardings, eval_batch, mesh)
  eval_data = [sharding_lib.put(batch, eval_batch) for batch in eval_data]

  metrics = metrics_lib.MetricsLog(out_dir, start, enabled=main_process)
  nonfinite = faults.NonFiniteSteps(cfg.skip_nonfinite, metrics.records)
  throughput = metrics_lib.Throughput(cfg.batch_size * cfg.seq_len)
  bar = tqdm(
    total=cfg.steps,
    initial=start,
    desc=cfg.optimizer,
    unit="step",
    disable=not (progress and main_process),
    dynamic_ncols=True,
  )

  def diverged(reason: str) -> NonFiniteError:
    """Closes the run (the checkpoints saved so far are kept) and says where
    it stands."""
    bar.close()
    if checkpoints is not None:
      checkpoints.close()
    metrics.close()
    if finite_checkpoint is not None:
      where = (
        f"the last checkpoint with finite values is step {finite_checkpoint}"
        f" in {cfg.checkpoint_dir}"
      )
    elif checkpoints is None:
      where = "no checkpoint was saved (no --checkpoint-dir)"
    else:
      where = "no checkpoint with finite values was saved"
    return NonFiniteError(f"stopped at {reason}; {where}.")

  pending: list[tuple[int, dict[str, jax.Array]]] = []
  final_eval = None
  stopped_by = None  # the signal, and the step after which it stopped the run
  for step in range(start + 1, cfg.steps + 1):
    tokens = jax.make_array_from_process_local_data(
      train_batch, next(batches), batch_shape
    )
    state, step_metrics = train_step(state, tokens)
    pending.append((step, step_metrics))

    last = step == cfg.steps
    evaluate_now = step % cfg.eval_every == 0 or last
    save_now = checkpoints is not None and (
      step % cfg.checkpoint_every == 0 or last
    )
    read_now = (
      step % cfg.log_every == 0 or step == start + 1 or evaluate_now or save_now
    )
    signum = None if stop is None or last else stop.agreed(read_now)
    # Every step since the last read is checked before anything is evaluated
    # or saved.
    if read_now or signum is not None:
      records = metrics_lib.record_losses(pending, metrics, throughput, bar)
      pending = []
      skipped, reason = nonfinite.check(records)
      for skip, in_a_row in skipped:
        announce(
          f"step {skip}: not finite, skipped ({in_a_row} in a row of at most"
          f" --skip-nonfinite {cfg.skip_nonfinite})"
        )
      if reason is not None:
        raise diverged(reason)
    if evaluate_now:
      eval_loss = evaluate(eval_step, state, eval_data)
      record = {
        "step": step,
        "eval_loss": eval_loss,
        "eval_ppl": math.exp(eval_loss),
      }
      metrics.write(record)
      announce(
        f"step {step}: eval loss {eval_loss:.4f}, perplexity"
        f" {record['eval_ppl']:.2f}"
      )
      if last:
        final_eval = record
    if checkpoints is not None and (save_now or signum is not None):
      # The losses were finite; an update can still have overflowed.
      if not state_is_finite(state):
        raise diverged(f"step {step}: the state it wrote is not finite")
      checkpoints.save(step, state, batches.state())
      finite_checkpoint = step
    if signum is not None:
      stopped_by = signum, step
      break
    if evaluate_now or save_now:
      throughput.restart()
  bar.close()

  # resumed from the final checkpoint: nothing left to train
  if final_eval is None and stopped_by is None:
    eval_loss = evaluate(eval_step, state, eval_data)
    final_eval = {"eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)}
  if checkpoints is not None:
    checkpoints.close()
  metrics.close()

  summary = report.summarize(
    cfg,
    model_config,
    tx,
    devices=mesh.size,
    records=metrics.records,
    final_eval=final_eval,
    tokens_per_sec=throughput.tokens_per_sec,
    wall_seconds=time.perf_counter() - started,
    preempted_at=None if stopped_by is None else stopped_by[1],
  )
  if main_process:
    report.write_report(out_dir, summary, metrics.records)
  if stopped_by is not None:
    signum, step = stopped_by
    saved = (
      f"saved checkpoint step {step} in {cfg.checkpoint_dir} (--resume"
      " continues the run)"
      if checkpoints is not None
      else "no checkpoint saved (no --checkpoint-dir)"
    )
    raise Preempted(
      f"stopped by {signal.Signals(signum).name} after step {step} of"
      f" {cfg.steps}: {saved}; outputs written to {cfg.out_dir}.",
      signum,
    )
  return RunResult(summary, metrics.records)


@reports_user_errors("python -m examples.llama.train")
def main(argv: Sequence[str] | None = None) -> None:
  """Runs ``python -m examples.llama.train``."""
  cfg = config_lib.parse_args(argv)
  if cfg.target != "cpu":
    targets_lib.compile_only()
  if cfg.distributed:
    sharding_lib.start_distributed(cfg)
  if cfg.dry_run:
    memory_lib.dry_run(cfg)
    return
  with faults.StopSignals() as stop:
    result = train(cfg, stop=stop)
  if jax.process_index() == 0:
    print(report.format_summary(result.summary))
    print(f"  outputs             {cfg.out_dir}/")


if __name__ == "__main__":
  main()
