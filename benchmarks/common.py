"""Helpers shared by the benchmark scripts: timing, stamps and result files."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

# The benchmarks' tables are the example's.
from examples.llama.report import markdown_table as markdown_table

RESULTS_DIR = Path(__file__).absolute().parent / "results"


def stamp() -> dict[str, Any]:
  """Where and when a result was measured."""
  device = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
    "device": f"{device.platform}: {device.device_kind}",
    "device_count": jax.device_count(),
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "machine": platform.machine(),
  }


def median_seconds(
  fn: Callable[..., Any],
  *args: Any,
  repeats: int = 20,
  budget_seconds: float = 30.0,
) -> tuple[float, int]:
  """Median wall time of ``fn(*args)`` with the result ready, compilation
  excluded.

  ``fn`` is compiled ahead of time, so no call is spent warming up (an SVD of a
  4096 x 11008 matrix takes a minute on a CPU).

  Args:
    fn: a jitted function.
    *args: its arguments (reused by every call: ``fn`` must not donate them).
    repeats: timed calls at most.
    budget_seconds: fewer calls (at least one) when ``repeats`` of them would
      take longer than this, judged by the first timed call.

  Returns:
    ``(median seconds, number of timed calls)``.
  """
  fn = fn.lower(*args).compile()
  times: list[float] = []
  while len(times) < repeats:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    if len(times) == 1:
      repeats = max(1, min(repeats, int(budget_seconds / times[0])))
  return statistics.median(times), len(times)


def floats(text: str) -> list[float]:
  """A comma-separated list of numbers, as a command-line argument type."""
  return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
  """A comma-separated list of integers, as a command-line argument type."""
  return [int(x) for x in text.split(",")]


def display_path(path: str | Path) -> str:
  """``path`` relative to the working directory when it lies under it."""
  path = Path(path).absolute()
  try:
    return str(path.relative_to(Path.cwd()))
  except ValueError:
    return str(path)


def run_budget(cfg) -> str:
  """One line naming a trainer configuration's budget and settings."""
  tokens = cfg.steps * cfg.batch_size * cfg.seq_len
  return (
    f"LLaMA {cfg.model}, {cfg.steps} steps x {cfg.batch_size} sequences x"
    f" {cfg.seq_len} tokens = {tokens:,} tokens, data"
    f" {display_path(cfg.data_dir)},"
    f" tokenizer {cfg.tokenizer}, rank {cfg.rank}, T = {cfg.update_interval},"
    f" lr {cfg.lr}, seed {cfg.seed}"
  )


def results_path(name: str, platform: str | None = None) -> Path:
  """``results/<name>-<platform>.json``; the platform defaults to JAX's."""
  return RESULTS_DIR / f"{name}-{platform or jax.devices()[0].platform}.json"


def earlier_records(name: str, platform: str) -> list[dict[str, Any]]:
  """The records of ``results/<name>-<platform>.json`` if it was written
  with this jax version (a compiler of another version may differ); else
  none."""
  path = results_path(name, platform)
  if not path.exists():
    return []
  results = json.loads(path.read_text())
  if results["meta"].get("jax_version") != jax.__version__:
    return []
  return results["records"]


def merged(
  records: list[dict[str, Any]],
  name: str,
  platform: str,
  key: Callable[[dict[str, Any]], Any],
) -> list[dict[str, Any]]:
  """``records`` and, after them, the rows of the results file as it is now
  that ``records`` does not hold: two runs writing one file (say a GPU and
  a TPU one) keep each other's rows."""
  mine = {key(r) for r in records}
  return records + [
    r for r in earlier_records(name, platform) if key(r) not in mine
  ]


def write_results(
  name: str,
  meta: dict[str, Any],
  records: list[dict[str, Any]],
  tables: str,
  platform: str | None = None,
) -> Path:
  """Writes ``results/<name>-<platform>.json`` and ``.md``; returns the JSON
  path.

  The platform (cpu, gpu, tpu; or a compile target such as
  ``gpu-h100-80gb``) is part of the name so that runs on different devices
  sit side by side; the markdown starts with the stamp, so a table is never
  read without knowing where it was measured.
  """
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  info = {**stamp(), **meta}
  name = results_path(name, platform).stem
  path = RESULTS_DIR / f"{name}.json"
  path.write_text(
    json.dumps({"meta": info, "records": records}, indent=2) + "\n"
  )
  header = ", ".join(f"{k}: {v}" for k, v in info.items())
  (RESULTS_DIR / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{tables}")
  return path
