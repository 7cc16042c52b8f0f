"""Speed: the optimizer step against optax.contrib.galore and AdamW, the whole
training step against AdamW, and the subspace update against an SVD.

    python -m benchmarks.speed                 # everything (CPU: ~15 minutes)
    python -m benchmarks.speed --quick         # smaller model and shapes

Three measurements, each the median wall time of compiled calls:

1. **Optimizer step on the projected matrices.** ``tx.update`` and
   ``optax.apply_updates`` on the attention and MLP kernels of a LLaMA config
   (default ``60m``, unscanned; every kernel projected at the papers' rank),
   where all of a low-rank optimizer's extra work lives, run in a jitted
   ``fori_loop`` with donated state (:func:`step_times`): the time of a step
   that keeps the basis, of one that updates it, and the amortized time over
   the interval ``T``. ``optax.contrib.galore`` and ``optax.adamw`` run in
   the same process, taking turns. Target: every grassjax optimizer at or
   below the peer's amortized time.
2. **Whole training step.** The LLaMA example's jitted step (forward,
   backward, update) for ``tiny`` and ``60m``, as a ratio to AdamW's, each
   step timed alone in rounds taking turns, amortized over ``T``
   (:func:`train_step_records`). Target: 1.03.
3. **Subspace update.** One ``update`` of each rule of :mod:`grassjax.subspace`
   on a ``(m, n)`` gradient, against GaLore's SVD (``svd()``), at ranks 128 to
   1024.

Results go to ``benchmarks/results/speed-<platform>.{json,md}``
(``speed-quick-`` with ``--quick``, so a quick look never overwrites a full
run), stamped with the device: CPU timings vary about 3x between machines, so
only ratios measured in one run compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import grassjax
from benchmarks import common
from examples.llama import config as config_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama import step as step_lib

OPTIMIZERS = tuple(grassjax.OPTIMIZERS)
SHAPES = ((512, 1376), (2048, 5461), (4096, 11008))
RANKS = (128, 256, 512, 1024)
PAPER_RANKS = {
  "tiny": 32,
  "60m": 128,
  "130m": 256,
  "350m": 256,
  "1b": 512,
  "7b": 1024,
}
# The whole training step's setups: model, batch (sequences, tokens) and timed
# interval. The example's defaults for tiny; for 60m a batch a CPU steps
# through in well under a second and one of 2048 tokens, to show how the
# optimizer's share falls as the batch grows; short intervals, so that every
# round holds an update step. All are amortized over --update-interval.
TRAIN_SETUPS = (
  ("tiny", 16, 128, 25),
  ("60m", 4, 128, 10),
  ("60m", 8, 256, 10),
)


def _moment_flag(moment_dtype) -> str:
  """``--moment-dtype``'s value for a dtype, ``"8bit"``, or None (float32)."""
  if moment_dtype is None:
    return "float32"
  return "8bit" if moment_dtype == "8bit" else jnp.dtype(moment_dtype).name


def make_optimizer(
  name: str, rank: int, update_interval: int, moment_dtype=None, svd_method=None
):
  """The optimizer ``name`` as the LLaMA example builds it, at a constant rate.

  No clipping, no schedule, weight decay 0.01; ``moment_dtype`` (None:
  float32; a dtype, or ``"8bit"``) is that of both moments, ``svd_method``
  (None: exact) the example's ``--svd-method``.
  """
  cfg = config_lib.TrainConfig(
    optimizer=name,
    rank=rank,
    update_interval=update_interval,
    weight_decay=0.01,
    moment_dtype=_moment_flag(moment_dtype),
    svd_method=svd_method,
  )
  return config_lib.base_optimizer(cfg, learning_rate=1e-3)


def with_count(state, count: int):
  """``state`` with every step counter set to ``count``."""

  def set_count(path, x):
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count":
      return jnp.full_like(x, count)
    return x

  return jax.tree_util.tree_map_with_path(set_count, state)


def training_loop(tx: optax.GradientTransformation, steps: int):
  """``steps`` optimizer steps in one jitted loop, as a training loop runs them.

  Each step computes ``tx.update`` and applies it to the parameters, which the
  loop carries with the optimizer state (so the update cannot be optimized
  away). State and parameters are donated, so the loop updates them in place
  as a training step with donated state does. The gradient is fixed: only the
  optimizer is timed.
  """

  def loop(grads, state, params):
    def step(_, carry):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, step, (params, state))

  return jax.jit(loop, donate_argnums=(1, 2))


def time_donated(compiled, grads, state, params) -> float:
  """Seconds of one call of ``compiled`` on fresh copies of the donated
  inputs."""
  state, params = jax.block_until_ready(jax.tree.map(jnp.copy, (state, params)))
  start = time.perf_counter()
  jax.block_until_ready(compiled(grads, state, params))
  return time.perf_counter() - start


def step_times(
  params: Any,
  optimizers: Mapping[str, optax.GradientTransformation],
  update_interval: int,
  loop_steps: int,
  rounds: int,
) -> dict[str, dict[str, float]]:
  """Per-step times of ``tx.update`` on ``params`` for each optimizer.

  The keep step (the basis is kept) is the time of a donated loop of
  ``loop_steps`` such steps over ``loop_steps``; the optimizers' loops take
  turns for ``rounds`` rounds and each keeps its median, so a slow spell of
  the machine does not fall on one optimizer only. The update step costs the
  keep step plus the difference between one ``tx.update`` call that updates
  the basis and one that keeps it (single calls, whose fixed costs cancel).
  The amortized step over ``T = update_interval`` is ``keep + (update - keep)
  / T``. Returns ``{name: {keep_step_s, update_step_s, amortized_s}}``.
  """
  grads = jax.tree.map(
    lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype),
    params,
  )
  setups = {}
  for name, tx in optimizers.items():
    # makes the bases
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    # steps 2 .. loop_steps + 1 keep the basis
    keep_state = with_count(state, 1)
    one_keep, one_update = (
      common.median_seconds(jax.jit(tx.update), grads, s, params)[0]
      for s in (keep_state, with_count(state, update_interval))
    )
    loop = (
      training_loop(tx, loop_steps).lower(grads, keep_state, params).compile()
    )
    # update's extra cost
    setups[name] = (loop, keep_state, one_update - one_keep)
  loop_seconds = {name: [] for name in optimizers}
  for _ in range(rounds):
    for name, (loop, state, _) in setups.items():
      loop_seconds[name].append(time_donated(loop, grads, state, params))
  times = {}
  for name, (_, _, extra) in setups.items():
    keep = statistics.median(loop_seconds[name]) / loop_steps
    times[name] = {
      "keep_step_s": keep,
      "update_step_s": keep + extra,
      "amortized_s": keep + extra / update_interval,
      "loop_s": loop_seconds[name],
    }
  return times


def projected_matrices(model: str) -> dict[str, jax.Array]:
  """The attention and MLP kernels of ``model`` (unscanned), by path.

  These are the matrices every low-rank optimizer projects, so the extra work
  of the optimizers lives here: what a 1b or 7b model is made of, without
  the embedding and head that plain Adam updates in every optimizer.
  """
  config = model_lib.get_config(model)
  params = nnx.state(model_lib.Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  mask = jax.tree.leaves(model_lib.low_rank_mask(params))
  return {
    jax.tree_util.keystr(path): leaf
    for (path, leaf), projected in zip(leaves, mask, strict=True)
    if projected
  }


def matrix_optimizers(rank: int, update_interval: int) -> dict[str, Any]:
  """AdamW, optax.contrib.galore and grassjax's optimizers on bare matrices.

  Same rank, interval, scale and weight decay for all; every matrix is
  projected (the default mask). ``galore, longer side`` and ``grasswalk,
  longer side`` project as the peer does (moments ``r x min(m, n)``); the
  ``8-bit moments`` rows store both moments in block-wise 8-bit codes.
  """
  shared = dict(rank=rank, update_interval=update_interval, weight_decay=0.01)
  optimizers = {
    "optax.adamw": optax.adamw(1e-3, weight_decay=0.01),
    "optax.contrib.galore": optax.contrib.galore(
      1e-3,
      rank=rank,
      update_proj_gap=update_interval,
      scale=0.25,
      weight_decay=0.01,
    ),
  }
  for name, info in grassjax.OPTIMIZERS.items():
    key = jax.random.key(0) if info.needs_key else None
    optimizers[name] = info.constructor(1e-3, key=key, **shared)
  # On the peer's side, the keep step does the peer's work (plus recovery
  # scaling for GrassWalk): what is left of the gap is the implementation's.
  optimizers["galore, longer side"] = grassjax.galore(
    1e-3, projected_side="longer", **shared
  )
  optimizers["grasswalk, longer side"] = grassjax.grasswalk(
    1e-3, key=jax.random.key(0), projected_side="longer", **shared
  )
  # Block-wise 8-bit moments, dequantized and quantized again in the step.
  optimizers["grassjax.adamw, 8-bit moments"] = grassjax.adamw(
    1e-3, weight_decay=0.01, mu_dtype="8bit"
  )
  for name, info in grassjax.OPTIMIZERS.items():
    key = jax.random.key(0) if info.needs_key else None
    optimizers[f"{name}, 8-bit moments"] = info.constructor(
      1e-3, key=key, mu_dtype="8bit", **shared
    )
  return optimizers


def matrix_step_records(
  model: str, update_interval: int, loop_steps: int, rounds: int
) -> list[dict]:
  """The optimizer step on ``model``'s projected matrices, against the peer."""
  rank = PAPER_RANKS[model]
  times = step_times(
    projected_matrices(model),
    matrix_optimizers(rank, update_interval),
    update_interval,
    loop_steps,
    rounds,
  )
  adamw = times["optax.adamw"]["amortized_s"]
  peer = times["optax.contrib.galore"]["amortized_s"]
  records = []
  for name, t in times.items():
    records.append(
      {
        "table": "matrices",
        "optimizer": name,
        "model": model,
        "rank": rank,
        "update_interval": update_interval,
        **t,
        "amortized_ratio_to_adamw": t["amortized_s"] / adamw,
        "amortized_ratio_to_peer": t["amortized_s"] / peer,
      }
    )
    print(
      f"matrices {name:22s} keep {t['keep_step_s'] * 1e3:8.2f} ms  amortized"
      f" {t['amortized_s'] * 1e3:8.2f} ms  {t['amortized_s'] / peer:6.3f}x peer"
    )
  return records


def train_step_records(
  model: str,
  batch_size: int,
  seq_len: int,
  update_interval: int,
  rounds: int,
  amortize_over: int,
) -> list[dict]:
  """The whole training step (forward, backward, update) per optimizer.

  The example's jitted step on random tokens, each step timed on its own,
  in rounds of ``update_interval`` steps (one of which moves the bases)
  taking turns across optimizers. The median keep step and the median update
  step give the amortized step over ``amortize_over`` steps (a longer
  interval than a CPU can afford to run): ``keep + (update - keep) / T``.
  """
  runs = {}
  for name in config_lib.OPTIMIZERS:
    cfg = config_lib.TrainConfig(
      optimizer=name,
      model=model,
      rank=PAPER_RANKS[model],
      update_interval=update_interval,
      batch_size=batch_size,
      seq_len=seq_len,
    )
    model_config = config_lib.model_config(cfg, vocab_size=256)
    tx = config_lib.make_optimizer(cfg)
    graphdefs, abstract = step_lib.abstract_train_state(model_config, tx, 0)
    mesh = sharding_lib.make_mesh("none")
    shardings = sharding_lib.state_shardings(abstract, mesh, "none")
    batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
    step = step_lib.make_train_step(
      cfg, graphdefs, shardings, batch_sharding, mesh
    )
    state = step_lib.init_train_state(model_config, tx, 0, shardings)
    tokens = jax.random.randint(
      jax.random.key(1), (1, batch_size, seq_len + 1), 0, 256, jnp.int32
    )
    state, _ = jax.block_until_ready(
      step(state, tokens)
    )  # compiles, makes bases
    runs[name] = {
      "step": step,
      "state": state,
      "tokens": tokens,
      "keep": [],
      "update": [],
    }
  for _ in range(rounds):
    for run in runs.values():
      for count in range(1, update_interval + 1):  # steps taken before this one
        start = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], run["tokens"])
        jax.block_until_ready(metrics)
        kind = "update" if count % update_interval == 0 else "keep"
        run[kind].append(time.perf_counter() - start)
  amortized = {
    name: statistics.median(run["keep"])
    + (statistics.median(run["update"]) - statistics.median(run["keep"]))
    / amortize_over
    for name, run in runs.items()
  }
  records = []
  for name, run in runs.items():
    ratio = amortized[name] / amortized["adamw"]
    records.append(
      {
        "table": "train_step",
        "optimizer": name,
        "model": model,
        "rank": PAPER_RANKS[model],
        "update_interval": amortize_over,
        "batch": [batch_size, seq_len],
        "keep_step_s": statistics.median(run["keep"]),
        "update_step_s": statistics.median(run["update"]),
        "amortized_s": amortized[name],
        "amortized_ratio_to_adamw": ratio,
      }
    )
    print(
      f"train step {model:4s} {name:12s} keep"
      f" {records[-1]['keep_step_s'] * 1e3:9.2f} ms  amortized"
      f" {amortized[name] * 1e3:9.2f} ms  {ratio:6.3f}x adamw"
    )
  return records


def rule_update_times(
  shapes: tuple[tuple[int, int], ...], ranks: tuple[int, ...], repeats: int
) -> list[dict]:
  """Median time of one basis update per rule, shape and rank."""
  rules = {
    "svd (GaLore)": grassjax.subspace.svd(),
    "tracking (SubTrack++)": grassjax.subspace.tracking(),
    "random_walk (GrassWalk)": grassjax.subspace.random_walk(),
    "random_jump (GrassJump)": grassjax.subspace.random_jump(),
  }
  records = []
  for m, n in shapes:
    grad = jax.random.normal(jax.random.key(0), (m, n), jnp.float32)
    for rank in (r for r in ranks if r <= m):
      basis = grassjax.subspace.orthonormalize(
        jax.random.normal(jax.random.key(1), (m, rank), jnp.float32)
      )
      key = jax.random.key(2)
      svd_seconds = None
      # svd first: the others are compared to it
      for name, rule in rules.items():
        seconds, calls = common.median_seconds(
          jax.jit(rule.update), basis, grad, key, repeats=repeats
        )
        if svd_seconds is None:
          svd_seconds = seconds
        records.append(
          {
            "rule": name,
            "shape": [m, n],
            "rank": rank,
            "seconds": seconds,
            "svd_over_rule": svd_seconds / seconds,
            "timed_calls": calls,
          }
        )
        print(
          f"rule  {m}x{n} r={rank:4d} {name:24s} {seconds * 1e3:10.2f} ms"
          f"  SVD / this = {svd_seconds / seconds:8.1f}"
        )
  return records


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.2f}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="60m", choices=tuple(PAPER_RANKS))
  parser.add_argument("--update-interval", type=int, default=100)
  parser.add_argument(
    "--loop-steps", type=int, default=20, help="steps per timed optimizer loop"
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=5,
    help="timed loops per optimizer, taking turns",
  )
  parser.add_argument(
    "--train-models",
    default="tiny,60m",
    help="models whose whole training step is timed",
  )
  parser.add_argument(
    "--repeats", type=int, default=10, help="timed calls per subspace update"
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny model, the smallest shape only"
  )
  args = parser.parse_args(argv)
  model = "tiny" if args.quick else args.model
  shapes = SHAPES[:1] if args.quick else SHAPES
  train_models = ["tiny"] if args.quick else args.train_models.split(",")

  matrices = matrix_step_records(
    model, args.update_interval, args.loop_steps, args.rounds
  )
  train_steps = [
    record
    for name, batch_size, seq_len, interval in TRAIN_SETUPS
    if name in train_models
    for record in train_step_records(
      name,
      batch_size,
      seq_len,
      interval,
      rounds=3,
      amortize_over=args.update_interval,
    )
  ]
  rules = rule_update_times(shapes, RANKS, args.repeats)

  matrix_rows = [
    (
      r["optimizer"],
      _ms(r["keep_step_s"]),
      _ms(r["update_step_s"]),
      _ms(r["amortized_s"]),
      f"{r['amortized_ratio_to_peer']:.3f}",
      f"{r['amortized_ratio_to_adamw']:.3f}",
    )
    for r in matrices
  ]
  train_rows = [
    (
      r["model"],
      f"{r['batch'][0]} x {r['batch'][1]}",
      r["update_interval"],
      r["optimizer"],
      _ms(r["keep_step_s"]),
      _ms(r["update_step_s"]),
      _ms(r["amortized_s"]),
      f"{r['amortized_ratio_to_adamw']:.3f}",
    )
    for r in train_steps
  ]
  rule_rows = [
    (
      f"{r['shape'][0]}x{r['shape'][1]}",
      r["rank"],
      r["rule"],
      r["seconds"] * 1e3,
      r["svd_over_rule"],
    )
    for r in rules
  ]
  tables = (
    f"## Optimizer step on the projected matrices of LLaMA {model}"
    f" (rank {PAPER_RANKS[model]}, T = {args.update_interval})\n\n"
    + common.markdown_table(
      (
        "optimizer",
        "keep step (ms)",
        "update step (ms)",
        "amortized (ms)",
        "amortized / optax.contrib.galore",
        "amortized / optax.adamw",
      ),
      matrix_rows,
    )
    + "\n## Whole training step (forward, backward, update), byte"
    " vocabulary\n\n"
    + common.markdown_table(
      (
        "model",
        "batch",
        "T",
        "optimizer",
        "keep step (ms)",
        "update step (ms)",
        "amortized (ms)",
        "/ adamw",
      ),
      train_rows,
    )
    + "\n## One subspace update\n\n"
    + common.markdown_table(
      ("shape", "rank", "rule", "time (ms)", "SVD time / rule time"), rule_rows
    )
  )
  path = common.write_results(
    "speed-quick" if args.quick else "speed",
    {
      "command": "python -m benchmarks.speed"
      + (" --quick" if args.quick else ""),
      "model": model,
      "update_interval": args.update_interval,
      "quick": args.quick,
    },
    matrices + train_steps + rules,
    tables,
  )
  print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
  main()
