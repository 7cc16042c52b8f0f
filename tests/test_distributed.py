"""Multi-process training: two processes on one machine, one CPU device each.

The processes join with JAX's own runtime (``--distributed`` and the process
flags) and gloo's CPU collectives into one 2-device mesh. Their losses equal
those of one process over 2 forced host devices with the same data streams;
a checkpoint they save resumes in two processes bit for bit; each process
reads only its own rows; bad process flags fail in one line.

The trainer runs as ``examples.llama.train``'s ``main`` with the model of
``test_llama_train.small_model``, in child processes with a deadline: a hung
collective fails the test, and every child is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama.errors import UserError
from tests.test_llama_train import MODEL, small_model

ROOT = Path(__file__).absolute().parents[1]
SAMPLE_DIR = Path(data_lib.__file__).parent / "data"

# ``python -m examples.llama.train`` with the model shrunk to MODEL.
TRAIN = textwrap.dedent(
  """
  import json, sys
  from examples.llama import config as config_lib, train as train_lib

  full_size = config_lib.model_config
  config_lib.model_config = lambda cfg, vocab: full_size(cfg, vocab).replace(
    **json.loads(sys.argv[1])
  )
  train_lib.main(sys.argv[2:])
  """
)
ARGS = (
  "--steps 20 --batch-size 8 --grad-accum 2 --seq-len 32 --lr 1e-2 --warmup 2"
  " --rank 8 --update-interval 5 --eval-every 10 --eval-batches 1 --log-every 5"
).split()
TIMEOUT = 300  # seconds for a whole launch


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Launch(NamedTuple):
  """The children of one run and the files their output goes to."""

  children: list[subprocess.Popen]
  logs: list[Path]


def start(log_dir: Path, argv: list[str], processes: int) -> Launch:
  """Starts a run: ``processes`` processes of one CPU device, or one of 2
  devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  xla_flags = [
    f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
  ]
  if processes == 1:
    xla_flags.append("--xla_force_host_platform_device_count=2")
  env["XLA_FLAGS"] = " ".join(xla_flags)
  model = json.dumps({**MODEL, "vocab_size": small_model().vocab_size})
  command = [sys.executable, "-c", TRAIN, model, *argv]
  if processes > 1:
    command += [
      "--distributed",
      "--coordinator-address",
      f"localhost:{free_port()}",
    ]
    command += ["--num-processes", str(processes)]
  log_dir.mkdir(parents=True, exist_ok=True)
  children, logs = [], []
  for i in range(processes):
    logs.append(log_dir / f"process{i}.log")
    with logs[-1].open("w") as log:
      ids = ["--process-id", str(i)] if processes > 1 else []
      children.append(
        subprocess.Popen(
          command + ids, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
      )
  return Launch(children, logs)


def finish(*launches: Launch) -> list[list[str]]:
  """Waits for every child; kills them all at the first failure or past TIMEOUT.

  Returns:
    Each launch's output, one string per process.
  """
  deadline = time.monotonic() + TIMEOUT
  children = [child for launch in launches for child in launch.children]
  try:
    while time.monotonic() < deadline:
      codes = [child.poll() for child in children]
      if None not in codes or any(codes):
        break
      time.sleep(0.2)
  finally:  # also when the test itself is interrupted
    killed = [child for child in children if child.poll() is None]
    for child in killed:
      child.kill()
      child.wait()
  outputs = [[log.read_text() for log in launch.logs] for launch in launches]
  failures = [
    f"{'killed' if child in killed else f'exit {child.returncode}'}:"
    f" {child.args[4:]}\n{text[-2000:]}"
    for launch, output in zip(launches, outputs, strict=True)
    for child, text in zip(launch.children, output, strict=True)
    if child.returncode
  ]
  assert not failures, "\n".join(failures)
  return outputs


def records(out_dir: Path) -> list[dict]:
  with (out_dir / "metrics.jsonl").open() as f:
    return [json.loads(line) for line in f]


def losses(out_dir: Path) -> list[float]:
  """Every step's training loss and every evaluation's, in the order written."""
  return [
    r.get("loss", r.get("eval_loss"))
    for r in records(out_dir)
    if "loss" in r or "eval_loss" in r
  ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
  """Both meshes in two processes and in one: each run's directory and output.

  The two-process fsdp run saves checkpoints at steps 10 and 20.
  """
  root = tmp_path_factory.mktemp("runs")
  launches = {}
  for mesh in ("dp", "fsdp"):
    for processes in (2, 1):
      name = f"{mesh}-{processes}"
      argv = [*ARGS, "--mesh", mesh, "--out-dir", str(root / name / "out")]
      if processes == 1:
        argv += ["--data-streams", "2"]  # the default is one per process
      elif mesh == "fsdp":
        argv += ["--checkpoint-dir", str(root / name / "ckpt")]
        argv += ["--checkpoint-every", "10"]
      launches[name] = start(root / name, argv, processes)
  outputs = finish(*launches.values())
  return {
    name: (root / name, output)
    for name, output in zip(launches, outputs, strict=True)
  }


@pytest.mark.parametrize("mesh", ["dp", "fsdp"])
def test_two_processes_train_as_one_process_over_two_devices(runs, mesh):
  two, output = runs[f"{mesh}-2"]
  one, _ = runs[f"{mesh}-1"]
  assert losses(two / "out") == pytest.approx(losses(one / "out"), rel=1e-5)
  assert losses(two / "out")[-1] < losses(two / "out")[0] - 0.3
  # Process 0 alone writes the outputs, each record once, and prints.
  steps = [r["step"] for r in records(two / "out") if "loss" in r]
  assert steps == list(range(1, 21))
  summary = json.loads((two / "out" / "summary.json").read_text())
  assert summary["devices"] == 2 and summary["config"]["data_streams"] == 2
  assert "final eval loss" in output[0]
  assert "final eval loss" not in output[1]


def test_a_two_process_checkpoint_resumes_in_two_processes_bit_for_bit(
  runs, tmp_path
):
  straight, _ = runs["fsdp-2"]
  shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / "ckpt" / "20")  # as if stopped after step 10
  argv = [*ARGS, "--mesh", "fsdp", "--out-dir", str(tmp_path / "out")]
  argv += [
    "--checkpoint-dir",
    str(tmp_path / "ckpt"),
    "--checkpoint-every",
    "10",
  ]
  [output] = finish(
    start(tmp_path / "resumed", [*argv, "--resume"], processes=2)
  )
  assert f"resumed from {tmp_path / 'ckpt'} at step 10" in output[0]
  assert losses(tmp_path / "out") == losses(straight / "out")


def process_batches(
  rows, streams=2, micro_batch_size=4
) -> data_lib.ProcessBatches:
  return data_lib.ProcessBatches(
    str(SAMPLE_DIR),
    data_lib.ByteTokenizer(),
    seq_len=15,
    grad_accum=2,
    micro_batch_size=micro_batch_size,
    seed=0,
    streams=streams,
    rows=rows,
  )


def test_each_process_reads_only_the_rows_of_its_streams():
  whole = process_batches(range(4))
  halves = [process_batches([0, 1]), process_batches([2, 3])]
  assert [list(h.state()) for h in halves] == [["0"], ["1"]]
  for _ in range(3):
    batch = next(whole)
    assert batch.shape == (2, 4, 16)
    np.testing.assert_array_equal(
      batch, np.concatenate([next(h) for h in halves], axis=1)
    )
  # Each process's position, merged, resumes the whole batch and each half.
  merged = {**halves[0].state(), **halves[1].state()}
  resumed = process_batches(range(4))
  resumed.restore(json.loads(json.dumps(merged)))
  expected = next(whole)
  np.testing.assert_array_equal(next(resumed), expected)
  half = process_batches([2, 3])
  half.restore(merged)
  np.testing.assert_array_equal(next(half), expected[:, 2:])

  with pytest.raises(UserError, match="--data-streams 1 does not split over"):
    process_batches([2, 3], streams=1)
  with pytest.raises(UserError, match="cannot feed 8 data streams"):
    process_batches(range(8), streams=8, micro_batch_size=8)


def test_bad_process_flags_fail_in_one_line(capsys):
  address = ["--coordinator-address", "localhost:1234"]
  ids = ["--num-processes", "2", "--process-id", "0"]
  for argv, message in (
    ([*address, *ids], "without --distributed: add --distributed"),
    (["--distributed", *address, "--num-processes", "2"], "go together"),
    (
      ["--distributed", "--coordinator-address", "localhost", *ids],
      "HOST:PORT",
    ),
    (
      ["--distributed", *address, "--num-processes", "2", "--process-id", "2"],
      "[0, 2)",
    ),
    (
      ["--distributed", *address, "--num-processes", "0", "--process-id", "0"],
      "> 0",
    ),
    (["--data-streams", "3"], "does not divide the micro-batch of 16"),
  ):
    with pytest.raises(SystemExit):
      config_lib.parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m examples.llama.train: error: "), argv
    assert message in error, (argv, error)


def test_distributed_without_process_flags_or_a_cluster_fails_in_one_line(
  tmp_path,
):
  # No scheduler's variables: nothing for jax.distributed to detect.
  env = {
    "PATH": os.environ["PATH"],
    "HOME": str(tmp_path),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT),
  }
  argv = ["--distributed", "--out-dir", str(tmp_path / "out")]
  result = subprocess.run(
    [sys.executable, "-m", "examples.llama.train", *argv],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    "python -m examples.llama.train: error: --distributed found no cluster to"
    " join"
  ), result.stderr[-3000:]
  assert "--coordinator-address HOST:PORT" in last
  assert not (tmp_path / "out").exists()
