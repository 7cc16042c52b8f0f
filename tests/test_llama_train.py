"""The LLaMA example's trainer, on a model shrunk far below ``tiny``.

Every optimizer learns, a resumed run repeats an uninterrupted one bit for
bit (from a damaged checkpoint's predecessor too), bad input fails in one
line before anything is written, and data-parallel and fully-sharded runs
over 4 host devices equal the one-device run.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P
from jax.tree_util import keystr

from benchmarks import quality, walk_angle, weight_dtype
from examples.llama import checkpoint as checkpoint_lib
from examples.llama import compare as compare_lib
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama import step as step_lib
from examples.llama import train as train_lib
from examples.llama.errors import UserError

ROOT = Path(__file__).absolute().parents[1]

# A model and a run small enough to compile in seconds. The same settings are
# used by the 4-device subprocess below.
MODEL = dict(dim=32, hidden_dim=64, n_heads=2, n_layers=1, max_seq_len=32)
RUN = dict(
  steps=6,
  batch_size=4,
  seq_len=32,
  lr=1e-2,
  warmup=1,
  rank=8,
  update_interval=2,
  eval_every=3,
  eval_batches=1,
  log_every=2,
)


def small_model() -> model_lib.LlamaConfig:
  vocab = data_lib.load_tokenizer("byte").vocab_size
  return model_lib.get_config("tiny").replace(vocab_size=vocab, **MODEL)


def small_run(tmp_path: Path, **overrides) -> config_lib.TrainConfig:
  return config_lib.TrainConfig(
    **{**RUN, "out_dir": str(tmp_path / "out"), **overrides}
  )


def losses(result: train_lib.RunResult) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in result.records if "loss" in r}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, train_lib.RunResult]:
  """A GrassWalk run with checkpoints at steps 3 and 6: its directory and
  result."""
  run_dir = tmp_path_factory.mktemp("finished")
  cfg = small_run(
    run_dir, checkpoint_dir=str(run_dir / "ckpt"), checkpoint_every=3
  )
  return run_dir, train_lib.train(
    cfg, model_config=small_model(), progress=False
  )


def copy_of(finished, tmp_path: Path, **overrides) -> config_lib.TrainConfig:
  """The finished run's configuration, on a copy of its outputs and
  checkpoints."""
  shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
  return small_run(
    tmp_path,
    checkpoint_dir=str(tmp_path / "ckpt"),
    checkpoint_every=3,
    **overrides,
  )


def no_training_step(*args, **kwargs):
  pytest.fail("the training step was built")


def test_every_optimizer_learns_and_compare_writes_its_report(tmp_path):
  cfg = small_run(tmp_path, steps=8, out_dir=str(tmp_path / "cmp"))
  results = compare_lib.compare(
    cfg, config_lib.OPTIMIZERS, model_config=small_model(), progress=False
  )
  for name, result in results.items():
    curve = list(losses(result).values())
    assert len(curve) == 8, name
    assert sum(curve[-2:]) / 2 < curve[0] - 0.3, (name, curve)
    summary = result.summary
    assert summary["final_eval_loss"] < curve[0], name
    ratio = summary["state_bytes_ratio_to_adamw"]
    assert (
      ratio < 0.9 if name != "adamw" else ratio == pytest.approx(1, abs=1e-3)
    )
    run_dir = tmp_path / "cmp" / name
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert (run_dir / "loss.png").stat().st_size > 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(
      result.records
    )
  table = (tmp_path / "cmp" / "compare.md").read_text()
  for name in config_lib.OPTIMIZERS:
    assert f"| {name} |" in table
  assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_resume_repeats_the_uninterrupted_run_and_refuses_other_configs(
  finished, tmp_path
):
  straight = finished[1]
  cfg = copy_of(finished, tmp_path)
  ckpt = tmp_path / "ckpt"
  # A run stopped after step 3 leaves the step-3 checkpoint as the latest.
  shutil.rmtree(ckpt / "6")
  resumed = train_lib.train(
    dataclasses.replace(cfg, resume=True),
    model_config=small_model(),
    progress=False,
  )
  assert losses(resumed) == losses(straight)
  assert (
    resumed.summary["final_eval_loss"] == straight.summary["final_eval_loss"]
  )

  # Without --resume, a directory holding checkpoints is not reused.
  with pytest.raises(UserError, match="--resume"):
    train_lib.train(cfg, model_config=small_model(), progress=False)

  # Another configuration is refused, naming the fields, and nothing is touched.
  metrics = (tmp_path / "out" / "metrics.jsonl").read_text()
  steps = sorted(p.name for p in ckpt.iterdir())
  other = dataclasses.replace(
    cfg, resume=True, rank=4, optimizer="grassjump", lr=0.1
  )
  with pytest.raises(checkpoint_lib.ConfigMismatchError) as err:
    train_lib.train(other, model_config=small_model(), progress=False)
  for text in ("rank: checkpoint 8, now 4", "optimizer:", "lr:"):
    assert text in str(err.value)
  assert "seed" not in str(err.value)
  with pytest.raises(
    checkpoint_lib.ConfigMismatchError,
    match=r"model\.dim: checkpoint 32, now 48",
  ):
    train_lib.train(
      dataclasses.replace(cfg, resume=True),
      model_config=small_model().replace(dim=48),
      progress=False,
    )
  assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics
  assert sorted(p.name for p in ckpt.iterdir()) == steps


def test_a_streamed_subword_run_resumes_bit_for_bit(tmp_path):
  # --data-dir hf through datasets' own local builder on the shipped shards,
  # with the subword tokenizer trained on them: no network.
  cfg = small_run(
    tmp_path,
    data_dir="hf",
    dataset=config_lib.DEFAULT_DATA_DIR,
    tokenizer=str(ROOT / "examples" / "llama" / "tokenizer"),
    checkpoint_dir=str(tmp_path / "ckpt"),
    checkpoint_every=3,
  )
  model = small_model().replace(vocab_size=4096)
  straight = train_lib.train(cfg, model_config=model, progress=False)
  assert straight.summary["final_eval_loss"] < 8.3  # ln 4096 = 8.32
  shutil.rmtree(tmp_path / "ckpt" / "6")
  resumed = train_lib.train(
    dataclasses.replace(cfg, resume=True), model_config=model, progress=False
  )
  assert losses(resumed) == losses(straight)
  assert (
    resumed.summary["final_eval_loss"] == straight.summary["final_eval_loss"]
  )


def test_resume_from_the_final_checkpoint_evaluates_into_any_out_dir(
  finished, tmp_path
):
  straight = finished[1]
  cfg = copy_of(finished, tmp_path, resume=True)
  same = train_lib.train(cfg, model_config=small_model(), progress=False)
  assert (
    same.summary["final_train_loss"] == straight.summary["final_train_loss"]
  )
  assert same.records == straight.records

  fresh = tmp_path / "fresh"
  new = train_lib.train(
    dataclasses.replace(cfg, out_dir=str(fresh)),
    model_config=small_model(),
    progress=False,
  )
  for summary in (same.summary, new.summary):
    assert summary["final_eval_loss"] == straight.summary["final_eval_loss"]
  # No step was trained: the new directory has a summary and no loss of its own.
  assert new.summary["final_train_loss"] is None and not new.records
  assert json.loads((fresh / "summary.json").read_text()) == new.summary
  assert sorted(p.name for p in fresh.iterdir()) == ["summary.json"]


# Reading a damaged checkpoint fails with tensorstore reads still in flight;
# their callbacks may later meet orbax's closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
  finished, tmp_path
):
  straight = finished[1]
  cfg = copy_of(finished, tmp_path, resume=True)
  ckpt = tmp_path / "ckpt"
  pristine = tmp_path / "pristine"
  shutil.copytree(ckpt, pristine)
  (ckpt / "6" / "model" / "manifest.ocdbt").unlink()

  # With no readable checkpoint before it, the damaged step is named.
  shutil.rmtree(ckpt / "3")
  with pytest.raises(
    UserError, match=r"checkpoint step 6 is damaged \("
  ) as err:
    train_lib.train(cfg, model_config=small_model(), progress=False)
  assert "\n" not in str(err.value)
  shutil.copytree(pristine / "3", ckpt / "3")

  with pytest.warns(UserWarning, match="checkpoint step 6 in .* is damaged"):
    resumed = train_lib.train(cfg, model_config=small_model(), progress=False)
  assert losses(resumed) == losses(straight)
  assert (
    resumed.summary["final_eval_loss"] == straight.summary["final_eval_loss"]
  )
  # Step 6 was saved again, whole: resuming from it warns of nothing.
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    again = train_lib.train(
      dataclasses.replace(cfg, out_dir=str(tmp_path / "again")),
      model_config=small_model(),
      progress=False,
    )
  assert again.summary["final_eval_loss"] == straight.summary["final_eval_loss"]


def test_a_run_that_fails_before_its_first_step_leaves_earlier_outputs(
  finished, tmp_path, monkeypatch, capsys
):
  cfg = small_run(tmp_path, steps=2, eval_every=2)
  shutil.copytree(finished[0] / "out", tmp_path / "out")
  earlier = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

  def failing_step(*args, **kwargs):
    def step(state, tokens):
      raise RuntimeError("device lost")

    return step

  with monkeypatch.context() as patch:
    patch.setattr(train_lib, "make_train_step", failing_step)
    with pytest.raises(RuntimeError, match="device lost"):
      train_lib.train(cfg, model_config=small_model(), progress=False)
  assert {
    p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()
  } == earlier

  # A run that starts replaces them, and says so.
  result = train_lib.train(cfg, model_config=small_model(), progress=False)
  assert "replacing an earlier run's metrics.jsonl, summary.json, loss.png" in (
    capsys.readouterr().out
  )
  lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == result.records


@pytest.mark.parametrize(
  "flag, where",
  [
    ("checkpoint_dir", "file"),
    ("checkpoint_dir", "file/ckpt"),
    ("out_dir", "file"),
    ("out_dir", "file/out"),
  ],
)
def test_unusable_output_paths_fail_before_the_first_step(
  tmp_path, monkeypatch, flag, where
):
  (tmp_path / "file").write_text("not a directory")
  cfg = small_run(tmp_path, **{flag: str(tmp_path / where)})
  monkeypatch.setattr(train_lib, "make_train_step", no_training_step)
  with pytest.raises(UserError, match=f"{tmp_path / 'file'} is a file"):
    train_lib.train(cfg, model_config=small_model(), progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
  assert (tmp_path / "file").read_text() == "not a directory"


def test_main_reports_user_errors_in_one_line_and_bugs_with_a_traceback(
  tmp_path, monkeypatch, capsys
):
  bad_shards = tmp_path / "bad"
  bad_shards.mkdir()
  for split in ("train", "validation"):
    with gzip.open(
      bad_shards / f"c4-{split}.00000-of-00001.json.gz", "wt"
    ) as f:
      f.write('{"url": "no text"}\n')
  (tmp_path / "file").write_text("")
  monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
  monkeypatch.setitem(sys.modules, "datasets", None)
  monkeypatch.setattr(train_lib, "make_train_step", no_training_step)
  small = [
    "--steps",
    "2",
    "--warmup",
    "0",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
  ]
  out = ["--out-dir", str(tmp_path / "out")]
  for argv, message in (
    (["--rank", "1000", *out], "--rank 1000 exceeds 128"),
    (["--rank", "1000", "--dry-run"], "--rank 1000 exceeds 128"),
    (["--data-dir", str(bad_shards), *out], "no usable document"),
    (["--data-dir", str(tmp_path / "missing"), *out], "does not exist"),
    (["--data-dir", "hf", *out], "datasets package"),
    (["--tokenizer", "t5-base", *out], "--tokenizer byte"),
    (["--out-dir", str(tmp_path / "file")], "is a file"),
    (["--checkpoint-dir", str(tmp_path / "file"), *out], "is a file"),
    (
      ["--vocab-size", "100", *out],
      "--vocab-size 100 is smaller than the 259 tokens",
    ),
    (
      ["--vocab-size", "100", "--dry-run"],
      "--tokenizer byte: use --vocab-size 259",
    ),
  ):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with pytest.raises(SystemExit) as exit:
        train_lib.main([*small, *argv])
    error = str(exit.value.code)
    assert error.startswith("python -m examples.llama.train: error: "), argv
    assert message in error and "\n" not in error, (argv, error)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "file"]

  def bug(cfg, stop):
    raise ValueError("a bug")

  monkeypatch.setattr(train_lib, "train", bug)
  with pytest.raises(ValueError, match="a bug"):
    train_lib.main(small)


def test_mesh_none_in_a_multi_process_run_is_a_user_error(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(
    UserError, match="a multi-process run needs --mesh dp or fsdp"
  ):
    sharding_lib.make_mesh("none")
  monkeypatch.setattr(train_lib, "make_train_step", no_training_step)
  with pytest.raises(SystemExit) as exit:
    train_lib.main(["--mesh", "none", "--out-dir", str(tmp_path / "out")])
  assert str(exit.value.code).startswith(
    "python -m examples.llama.train: error: --mesh none trains on one device"
  )


def test_every_entry_point_that_trains_reports_user_errors_in_one_line(
  tmp_path,
):
  missing = [
    "--data-dir",
    str(tmp_path / "missing"),
    "--out-dir",
    str(tmp_path),
  ]
  error = f"error: data directory {tmp_path / 'missing'} does not exist"
  for prog, main in (
    ("python -m examples.llama.compare", compare_lib.main),
    ("python -m benchmarks.quality", quality.main),
    ("python -m benchmarks.walk_angle", walk_angle.main),
    ("python -m benchmarks.weight_dtype", weight_dtype.main),
  ):
    with pytest.raises(SystemExit) as exit:
      main(missing)
    message = str(exit.value.code)
    assert message.startswith(f"{prog}: {error}") and "\n" not in message, (
      message
    )

  # From the command line: that line on stderr, exit status 1, no traceback.
  result = subprocess.run(
    [sys.executable, "-m", "examples.llama.compare", *missing],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"python -m examples.llama.compare: {error}"), last


def test_bad_input_fails_clearly_before_writing(tmp_path, capsys):
  cfg = small_run(tmp_path, data_dir=str(tmp_path / "missing"))
  with pytest.raises(UserError):
    train_lib.train(cfg, model_config=small_model(), progress=False)
  with pytest.raises(
    SystemExit, match=r"error: data directory .* does not exist"
  ):
    train_lib.main(["--data-dir", cfg.data_dir, "--out-dir", cfg.out_dir])
  assert not (tmp_path / "out").exists()

  for argv, message in (
    (["--optimizer", "adam"], "subtrack_pp"),
    (["--model", "3b"], "60m"),
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
    (["--warmup", "10", "--steps", "10"], "--warmup"),
    (["--resume"], "--checkpoint-dir"),
    (["--optimizer", "adamw", "--basis-dtype", "bfloat16"], "low-rank"),
  ):
    with pytest.raises(SystemExit):
      config_lib.parse_args(argv)
    assert message in capsys.readouterr().err
  with pytest.raises(SystemExit):
    compare_lib.parse_args(["--optimizers", "adamw,sgd"])
  assert "sgd" in capsys.readouterr().err
  with pytest.raises(ValueError, match="optimizer"):
    config_lib.TrainConfig(optimizer="sgd")


def test_moment_dtype_sets_the_dtype_of_every_moment(tmp_path):
  def moments(cfg):
    tx = config_lib.make_optimizer(cfg)
    _, state = step_lib.abstract_train_state(small_model(), tx, 0)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [x for path, x in leaves if re.search(r"\['[mn]u'\]", keystr(path))]

  full = moments(small_run(tmp_path, optimizer="grassjump"))
  half = moments(
    small_run(tmp_path, optimizer="grassjump", moment_dtype="bfloat16")
  )
  assert full and [x.shape for x in full] == [x.shape for x in half]
  assert {x.dtype for x in full} == {jnp.dtype("float32")}
  assert {x.dtype for x in half} == {jnp.dtype("bfloat16")}
  # AdamW keeps the run's moment storage (grassjax.adamw; 8-bit too).
  adamw = config_lib.TrainConfig(moment_dtype="8bit").with_optimizer("adamw")
  assert adamw.moment_dtype == "8bit"
  eight = moments(small_run(tmp_path, optimizer="adamw", moment_dtype="8bit"))
  assert {x.dtype for x in eight} == {jnp.dtype("uint8"), jnp.dtype("float32")}


def test_fsdp_shards_each_state_array_on_its_own_largest_axis():
  assert sharding_lib.fsdp_spec((64, 128), 4, "fsdp") == P(None, "fsdp")
  assert sharding_lib.fsdp_spec((2, 96, 40), 4, "fsdp") == P(None, "fsdp", None)
  assert sharding_lib.fsdp_spec((250, 30), 4, "fsdp") == P()  # nothing divides
  # vectors are replicated
  assert sharding_lib.fsdp_spec((64,), 4, "fsdp") == P()


SHARDED_RUNS = textwrap.dedent(
  """
  import json, sys
  import jax
  from jax.sharding import PartitionSpec as P
  from examples.llama import (
    config as config_lib,
    sharding as sharding_lib,
    step as step_lib,
  )
  from examples.llama import train as train_lib
  from examples.llama import model as model_lib

  assert jax.device_count() == 4, jax.devices()
  out_dir, run, model = (
    sys.argv[1],
    json.loads(sys.argv[2]),
    json.loads(sys.argv[3]),
  )
  model_config = model_lib.get_config("tiny").replace(**model)
  out = {}
  for mesh in ("none", "dp", "fsdp"):
    cfg = config_lib.TrainConfig(**run, mesh=mesh, out_dir=f"{out_dir}/{mesh}")
    result = train_lib.train(cfg, model_config=model_config, progress=False)
    out[mesh] = [r["loss"] for r in result.records if "loss" in r]
    out[mesh].append(result.summary["final_eval_loss"])

  # Under fsdp the moments (r, n) and the basis (m, r) of a projected kernel
  # are split on their own largest axis.
  tx = config_lib.make_optimizer(cfg)
  _, state = step_lib.abstract_train_state(model_config, tx, 0)
  shardings = sharding_lib.state_shardings(
    state, sharding_lib.make_mesh("fsdp"), "fsdp"
  )
  specs = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(shardings)):
    specs[jax.tree_util.keystr(path)] = (x.shape, tuple(s.spec))
  out["specs"] = specs
  print(json.dumps(out))
  """
)


def test_dp_and_fsdp_over_four_devices_match_one_device(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      SHARDED_RUNS,
      str(tmp_path),
      json.dumps({**RUN, "batch_size": 8, "grad_accum": 2}),
      json.dumps({**MODEL, "vocab_size": small_model().vocab_size}),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  for mesh in ("dp", "fsdp"):
    assert out[mesh] == pytest.approx(out["none"], abs=1e-4), mesh
  assert out["none"][-1] < out["none"][0] - 0.3
  sharded = [
    (shape, spec)
    for name, (shape, spec) in out["specs"].items()
    if "mu" in name and len(shape) == 2 and shape[0] == RUN["rank"]
  ]
  assert sharded, out["specs"]
  for shape, spec in sharded:  # (r, n) moments: n is the largest divisible axis
    assert spec == [None, "fsdp"], (shape, spec)
  bases = [
    (shape, spec)
    for name, (shape, spec) in out["specs"].items()
    if "basis" in name and len(shape) == 2
  ]
  assert bases
  for shape, spec in bases:  # (m, r) bases: m = 32 > r = 8
    assert spec == ["fsdp", None], (shape, spec)
