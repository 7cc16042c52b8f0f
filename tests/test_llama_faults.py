"""The LLaMA trainer's early stops, on the model of ``test_llama_train``.

A diverging run stops at its first non-finite step in one line, with exit
status 3, keeping its good checkpoints; ``--skip-nonfinite`` drops exactly
the non-finite steps, as if their batches had never come, and stops past its
limit; SIGTERM finishes the step, saves and exits with 143, and ``--resume``
then ends bit for bit where an uninterrupted run ends; the defaults follow
``--steps``.

Non-finite steps come from a huge learning rate, or from batches poisoned on
purpose: the loss is made NaN for a batch whose first label is a multiple of
3, inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from examples.llama import checkpoint as checkpoint_lib
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import faults
from examples.llama import sharding as sharding_lib
from examples.llama import step as step_lib
from examples.llama import train as train_lib
from examples.llama.errors import NONFINITE_STATUS, NonFiniteError, UserError
from tests.test_distributed import ARGS, TRAIN, start
from tests.test_llama_train import MODEL, RUN, small_model, small_run

ROOT = Path(__file__).absolute().parents[1]
PROG = "python -m examples.llama.train"
# test_llama_train's RUN as flags, but for the steps and intervals.
FLAGS = (
  "--batch-size 4 --seq-len 32 --warmup 1 --rank 8 --update-interval 2"
  " --eval-batches 1"
).split()
TIMEOUT = 300  # seconds for one command


def launch(argv: list[str], log: Path) -> subprocess.Popen:
  """``python -m examples.llama.train`` with the model shrunk to MODEL, on the
  CPU; its stdout and stderr go to ``log.out`` and ``log.err``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  model = json.dumps({**MODEL, "vocab_size": small_model().vocab_size})
  with log.with_suffix(".out").open("w") as out:
    with log.with_suffix(".err").open("w") as err:
      return subprocess.Popen(
        [sys.executable, "-c", TRAIN, model, *argv],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=err,
      )


def wait(child: subprocess.Popen, log: Path) -> tuple[int, str]:
  """The child's exit status and the last line of its stderr."""
  try:
    child.wait(TIMEOUT)
  finally:  # also when the test itself is interrupted
    if child.poll() is None:
      child.kill()
      child.wait()
  lines = log.with_suffix(".err").read_text().strip().splitlines()
  return child.returncode, lines[-1] if lines else ""


def records(out_dir: Path) -> list[dict]:
  with (out_dir / "metrics.jsonl").open() as f:
    return [json.loads(line) for line in f]


def steps_of(run_records: list[dict]) -> list[dict]:
  """The training steps' records."""
  return [r for r in run_records if "loss" in r]


def saved_steps(ckpt: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def saved(ckpt: Path, step: int) -> dict[str, np.ndarray]:
  """Every array of checkpoint ``step`` (parameters, optimizer state) by its
  path, and the data position."""
  with ocp.CheckpointManager(ckpt) as manager:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardRestore(),
        optimizer=ocp.args.StandardRestore(),
        data=ocp.args.JsonRestore(),
      ),
    )
  tree = {"model": restored.model, "optimizer": restored.optimizer}
  arrays = {
    jax.tree_util.keystr(path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  return {**arrays, "data": restored.data}


def data_position(ckpt: Path, step: int) -> dict:
  """The data position of checkpoint ``step`` (of any mesh)."""
  with ocp.CheckpointManager(ckpt) as manager:
    args = ocp.args.Composite(data=ocp.args.JsonRestore())
    return manager.restore(step, args=args).data


def all_finite(arrays: dict) -> bool:
  return all(
    np.isfinite(x).all()
    for x in arrays.values()
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.inexact)
  )


def test_a_diverging_run_stops_at_its_first_nonfinite_step(tmp_path):
  # The host reads the metrics at steps 1, 2, 4, ... (every checkpoint): the
  # step that diverges is found at the next read, with the steps after it.
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  argv = [*FLAGS, "--steps", "20", "--lr", "1e36", "--clip", "none"]
  argv += ["--checkpoint-every", "2", "--log-every", "10"]
  argv += ["--checkpoint-dir", str(ckpt), "--out-dir", str(out)]
  status, last = wait(launch(argv, tmp_path / "run"), tmp_path / "run")
  assert status == NONFINITE_STATUS, last

  run = steps_of(records(out))
  bad = next(
    r
    for r in run
    if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))
  )
  assert 2 < bad["step"] < 10, run
  good = list(range(2, bad["step"], 2))
  assert last == (
    f"{PROG}: stopped at step {bad['step']}: its loss is {bad['loss']} and"
    f" its gradient norm {bad['grad_norm']}; the last checkpoint with finite"
    f" values is step {good[-1]} in {ckpt}."
  )
  # Nothing at or after the bad step was saved, nothing before it deleted
  # (three are kept), and what was saved is finite.
  assert saved_steps(ckpt) == good[-checkpoint_lib.MAX_TO_KEEP :]
  for step in saved_steps(ckpt):
    assert all_finite(saved(ckpt, step)), step
  # No evaluation of a non-finite state, and no summary of a run that failed.
  assert all(r["step"] < bad["step"] for r in records(out) if "eval_loss" in r)
  assert not (out / "summary.json").exists()


POISON = 3  # a batch whose first label is a multiple of this has a NaN loss


def poisoned(labels) -> bool:
  return labels[0, 0] % POISON == 0


@pytest.fixture
def poisoned_loss(monkeypatch):
  """The training step's loss, NaN (and so its gradient) on poisoned
  batches."""
  clean = step_lib.cross_entropy

  def cross_entropy(logits, labels):
    return jnp.where(poisoned(labels), jnp.nan, 1.0) * clean(logits, labels)

  monkeypatch.setattr(step_lib, "cross_entropy", cross_entropy)


def run_steps(cfg: config_lib.TrainConfig, batches: np.ndarray):
  """``cfg``'s step on each batch: the metrics of each, the final state, and
  the norm of the first batch's gradient, from ``nnx.grad``."""
  model_config = config_lib.model_config(cfg, small_model().vocab_size)
  model_config = model_config.replace(**MODEL)
  tx = config_lib.make_optimizer(cfg)
  graphdefs, abstract = step_lib.abstract_train_state(model_config, tx, 0)
  mesh = sharding_lib.make_mesh("none")
  shardings = sharding_lib.state_shardings(abstract, mesh, "none")
  state = step_lib.init_train_state(model_config, tx, 0, shardings)
  batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  train_step = step_lib.make_train_step(
    cfg, graphdefs, shardings, batch_sharding, mesh
  )
  tokens = jnp.asarray(batches[0, 0])
  grads = nnx.grad(
    lambda model: step_lib.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
  )(nnx.merge(graphdefs.model, state.model))
  norm = float(optax.tree.norm(grads))
  metrics = []
  for batch in batches:
    state, step_metrics = train_step(state, jnp.asarray(batch))
    metrics.append(jax.device_get(step_metrics))
  state = jax.tree.map(
    lambda x: (
      jax.random.key_data(x)
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x
    ),
    state,
  )
  return metrics, jax.device_get(jax.tree.leaves(state)), norm


@pytest.mark.parametrize("fused", [False, True], ids=["whole", "fused"])
def test_a_skipped_step_leaves_the_state_as_if_its_batch_never_came(
  poisoned_loss, fused
):
  cfg = config_lib.TrainConfig(
    **{**RUN, "steps": 10},
    scan_layers=fused,
    fused_update=fused,
    clip="per-layer" if fused else "global",
  )
  rng = np.random.default_rng(0)
  batches = rng.integers(0, 256, (7, 1, 4, 33), dtype=np.int32)
  skip = np.array([0, 1, 0, 1, 1, 0, 0], bool)
  batches[:, 0, 0, 1] = np.where(skip, POISON, POISON + 1)
  skipping, state, _ = run_steps(
    dataclasses.replace(cfg, skip_nonfinite=2), batches
  )
  plain, plain_state, norm = run_steps(cfg, batches[~skip])

  assert [bool(m["skipped"]) for m in skipping] == list(skip)
  kept = [m for m, skipped in zip(skipping, skip, strict=True) if not skipped]
  for m in skipping:
    assert np.isnan(m["loss"]) == np.isnan(m["grad_norm"]) == m["skipped"]
  # The other steps are those of a run without the poisoned batches, bit for
  # bit: the same losses and gradient norms, the same learning rates (a skip
  # does not advance the schedule), the same state at the end.
  for m, p in zip(kept, plain, strict=True):
    for key in ("loss", "grad_norm", "lr"):
      assert m[key] == p[key], key
  assert len(state) == len(plain_state)
  for a, b in zip(state, plain_state, strict=True):
    np.testing.assert_array_equal(a, b)
  # The gradient norm is the whole gradient's, before clipping.
  np.testing.assert_allclose(plain[0]["grad_norm"], norm, rtol=1e-5)


def first_labels(cfg: config_lib.TrainConfig) -> list[int]:
  """The first label of each training batch of ``cfg`` (one device)."""
  batches = data_lib.ProcessBatches(
    cfg.data_dir,
    data_lib.load_tokenizer(cfg.tokenizer),
    seq_len=cfg.seq_len,
    grad_accum=cfg.grad_accum,
    micro_batch_size=cfg.micro_batch_size,
    seed=cfg.seed,
    streams=1,
    rows=list(range(cfg.micro_batch_size)),
  )
  return [int(next(batches)[0, 0, 1]) for _ in range(cfg.steps)]


def test_skip_nonfinite_counts_skips_and_stops_past_its_limit(
  poisoned_loss, tmp_path
):
  cfg = small_run(
    tmp_path,
    steps=24,
    log_every=5,
    checkpoint_dir=str(tmp_path / "ckpt"),
    checkpoint_every=3,
  )
  expected = [
    step
    for step, label in enumerate(first_labels(cfg), 1)
    if label % POISON == 0
  ]
  # In a row, the longest run of poisoned batches.
  in_a_row = longest = 0
  for step in range(1, cfg.steps + 1):
    in_a_row = in_a_row + 1 if step in expected else 0
    longest = max(longest, in_a_row)
  assert 2 <= longest < cfg.steps, expected

  # Up to the longest run of skips: the run goes on to its end.
  result = train_lib.train(
    dataclasses.replace(cfg, skip_nonfinite=longest),
    model_config=small_model(),
    progress=False,
  )
  assert [r["step"] for r in result.records if r.get("skipped")] == expected
  assert result.summary["skipped_steps"] == len(expected)
  assert math.isfinite(result.summary["final_eval_loss"])

  # One fewer: the run stops at the end of the first longest run. Saving
  # every step, it saved the step before, skipped or not (a skipped step
  # keeps the finite state it was given).
  limit = longest - 1
  in_a_row = 0
  for step in range(1, cfg.steps + 1):
    in_a_row = in_a_row + 1 if step in expected else 0
    if in_a_row > limit:
      break
  last_saved = step - 1
  other = tmp_path / "limit"
  with pytest.raises(NonFiniteError) as err:
    train_lib.train(
      dataclasses.replace(
        cfg,
        skip_nonfinite=limit,
        checkpoint_dir=str(other / "ckpt"),
        checkpoint_every=1,
        out_dir=str(other / "out"),
      ),
      model_config=small_model(),
      progress=False,
    )
  assert str(err.value) == (
    f"stopped at step {step}: {longest} non-finite steps in a row, more than"
    f" --skip-nonfinite {limit}; the last checkpoint with finite values is"
    f" step {last_saved} in {other / 'ckpt'}."
  )
  assert (
    saved_steps(other / "ckpt")
    == list(range(1, step))[-checkpoint_lib.MAX_TO_KEEP :]
  )
  for saved_step in saved_steps(other / "ckpt"):
    assert all_finite(saved(other / "ckpt", saved_step))
  assert err.value.status == NONFINITE_STATUS

  # A run that diverged may resume its last good checkpoint skipping.
  run = checkpoint_lib.run_config(cfg, small_model())
  assert not checkpoint_lib.config_differences(
    run,
    checkpoint_lib.run_config(
      dataclasses.replace(cfg, skip_nonfinite=3), small_model()
    ),
  )


def test_sigterm_saves_and_resume_ends_as_an_uninterrupted_run(tmp_path):
  steps = 80
  argv = [*FLAGS, "--steps", str(steps), "--lr", "1e-2", "--log-every", "5"]
  argv += ["--eval-every", "20", "--checkpoint-every", "1000"]

  def run(name: str) -> list[str]:
    ckpt, out = tmp_path / name / "ckpt", tmp_path / name / "out"
    return [*argv, "--checkpoint-dir", str(ckpt), "--out-dir", str(out)]

  straight = launch(run("straight"), tmp_path / "straight")
  stopped = launch(run("stopped"), tmp_path / "stopped")
  # After the first evaluation (step 20), at whatever step the run is then.
  metrics = tmp_path / "stopped" / "out" / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  while not (metrics.exists() and '"eval_loss"' in metrics.read_text()):
    assert stopped.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  stopped.send_signal(signal.SIGTERM)
  status, last = wait(stopped, tmp_path / "stopped")
  assert status == 128 + signal.SIGTERM, last
  ckpt, out = tmp_path / "stopped" / "ckpt", tmp_path / "stopped" / "out"
  match = re.fullmatch(
    f"{re.escape(PROG)}: stopped by SIGTERM after step (\\d+) of {steps}:"
    f" saved checkpoint step (\\d+) in {re.escape(str(ckpt))} \\(--resume"
    f" continues the run\\); outputs written to {re.escape(str(out))}\\.",
    last,
  )
  assert match and match[1] == match[2], last
  stop = int(match[1])
  assert 20 <= stop < steps
  # The step, its checkpoint and the outputs of a run that ended there.
  assert saved_steps(ckpt) == [stop]
  assert [r["step"] for r in steps_of(records(out))] == list(range(1, stop + 1))
  summary = json.loads((out / "summary.json").read_text())
  assert summary["preempted_at"] == stop
  assert summary["final_eval_loss"] is None
  assert (out / "loss.png").exists()

  status, last = wait(
    launch([*run("stopped"), "--resume"], tmp_path / "resumed"),
    tmp_path / "resumed",
  )
  assert status == 0, last
  assert wait(straight, tmp_path / "straight")[0] == 0

  def curve(out_dir: Path) -> list[tuple]:
    return [
      (r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss"))
      for r in records(out_dir)
      if "loss" in r or "eval_loss" in r
    ]

  assert curve(out) == curve(tmp_path / "straight" / "out")
  assert len(curve(out)) == steps + steps // 20
  ours = saved(ckpt, steps)
  theirs = saved(tmp_path / "straight" / "ckpt", steps)
  assert ours.pop("data") == theirs.pop("data")
  assert ours.keys() == theirs.keys()
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_processes_stop_and_save_together_when_one_is_signalled(tmp_path):
  # Two processes of one CPU device each (test_distributed's); only process 1
  # gets SIGTERM.
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  log_every = int(ARGS[ARGS.index("--log-every") + 1])
  argv = [*ARGS, "--steps", "200", "--mesh", "dp", "--out-dir", str(out)]
  argv += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000"]
  launch = start(tmp_path, argv, processes=2)
  try:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.read_text()):
      assert all(c.poll() is None for c in launch.children)
      assert time.monotonic() < deadline
      time.sleep(0.01)
    launch.children[1].send_signal(signal.SIGTERM)
    for child in launch.children:
      child.wait(TIMEOUT)
  finally:
    for child in launch.children:
      if child.poll() is None:
        child.kill()
        child.wait()
  assert [c.returncode for c in launch.children] == [143, 143]
  lines = [
    re.search(
      r"^.*: stopped by SIGTERM after step (\d+) .*$", log.read_text(), re.M
    )
    for log in launch.logs
  ]
  assert lines[0] and lines[1] and lines[0][0] == lines[1][0]
  stop = int(lines[0][1])
  # At a step where both read the metrics, the one checkpoint that both wrote:
  # each process's data stream is in it.
  assert stop % log_every == 0
  assert saved_steps(ckpt) == [stop]
  assert sorted(data_position(ckpt, stop)) == ["0", "1"]
  assert [r["step"] for r in steps_of(records(out))] == list(range(1, stop + 1))


@pytest.fixture
def interruptible():
  """SIGINT with Python's own handler, whatever this process inherited (a
  shell's background job starts with it ignored)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def test_ignored_signals_stay_ignored():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with faults.StopSignals() as stop:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      signal.raise_signal(signal.SIGINT)
      assert stop.received is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("interruptible")
def test_stop_signals_are_caught_once_then_act_as_before():
  before = {s: signal.getsignal(s) for s in faults.StopSignals.SIGNALS}
  with faults.StopSignals() as stop:
    assert stop.agreed(read_now=True) is None
    signal.raise_signal(signal.SIGINT)
    assert stop.received == signal.SIGINT
    assert stop.agreed(read_now=False) == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # Python's own handler again
      signal.raise_signal(signal.SIGINT)
  assert {s: signal.getsignal(s) for s in faults.StopSignals.SIGNALS} == before


@pytest.mark.usefixtures("interruptible")
def test_main_catches_stop_signals_only_while_it_trains(tmp_path, monkeypatch):
  def caught() -> list[bool]:
    handlers = map(signal.getsignal, faults.StopSignals.SIGNALS)
    return [
      isinstance(getattr(handler, "__self__", None), faults.StopSignals)
      for handler in handlers
    ]

  before = {s: signal.getsignal(s) for s in faults.StopSignals.SIGNALS}
  assert caught() == [False, False]  # importing the trainer installs nothing
  during = []

  def train(cfg, stop):
    during.extend(caught())
    raise UserError("stopped on purpose")

  monkeypatch.setattr(train_lib, "train", train)
  with pytest.raises(SystemExit, match="stopped on purpose"):
    train_lib.main(["--out-dir", str(tmp_path / "out")])
  assert during == [True, True]
  assert {s: signal.getsignal(s) for s in faults.StopSignals.SIGNALS} == before


def test_defaults_follow_steps_and_explicit_conflicts_still_fail(
  tmp_path, monkeypatch, capsys
):
  # The default run keeps its settings; any run warms up, evaluates and
  # checkpoints within its steps.
  def sized(**fields) -> tuple[int, int, int]:
    cfg = config_lib.TrainConfig(**fields).sized()
    return cfg.warmup, cfg.eval_every, cfg.checkpoint_every

  assert sized() == (60, 100, 200)
  for steps in (1, 2, 5, 9, 10, 59, 599, 601, 10**5):
    warmup, eval_every, checkpoint_every = sized(steps=steps)
    assert 0 <= warmup < steps and warmup <= 60
    assert 1 <= eval_every <= steps and eval_every <= 100
    assert 1 <= checkpoint_every <= steps and checkpoint_every <= 200
  assert sized(steps=5, warmup=2, eval_every=50) == (2, 50, 1)

  full_size = config_lib.model_config
  monkeypatch.setattr(
    config_lib,
    "model_config",
    lambda cfg, vocab: full_size(cfg, vocab).replace(**MODEL),
  )
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  paths = ["--out-dir", str(out), "--checkpoint-dir", str(ckpt)]
  train_lib.main(
    ["--steps", "5", "--batch-size", "4", "--seq-len", "32", *paths]
  )
  assert "final eval loss" in capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())
  warmup, eval_every, checkpoint_every = sized(steps=5)
  assert summary["config"]["warmup"] == warmup
  evaluated = [r["step"] for r in records(out) if "eval_loss" in r]
  assert evaluated == list(range(eval_every, 6, eval_every))
  checkpointed = list(range(checkpoint_every, 6, checkpoint_every))
  assert saved_steps(ckpt) == checkpointed[-checkpoint_lib.MAX_TO_KEEP :]

  with pytest.raises(SystemExit):
    config_lib.parse_args(["--steps", "5", "--warmup", "60"])
  assert (
    "error: --warmup must be in [0, --steps); got 60 with --steps 5."
    in capsys.readouterr().err
  )
