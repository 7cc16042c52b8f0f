"""Speed: optimizer step time against optax.adamw, and subspace-update cost against SVD.

    python -m benchmarks.speed                 # everything (CPU: ~7 minutes)
    python -m benchmarks.speed --quick         # smaller model and shapes

Two measurements, each the median wall time of a compiled call:

1. **Optimizer step.** ``tx.update`` and ``optax.apply_updates`` on the
   parameters of a LLaMA config (default ``60m``; the attention and MLP
   kernels projected at the papers' rank, everything else AdamW), run in a
   jitted ``fori_loop`` with donated state, as a training loop runs them (see
   :func:`step_times`): the time of a step that keeps the basis, of one that
   updates it, and the amortized time over the update interval ``T``. Ratios
   are to ``optax.adamw`` on the same parameters. The target is an amortized
   ratio within 1.10.
2. **Subspace update.** One ``update`` of each rule of :mod:`grassjax.subspace`
   on a ``(m, n)`` gradient, against GaLore's SVD (``svd()``), at ranks 128 to
   1024. The target is random_walk and random_jump at least 10x cheaper than the
   SVD on the largest shape.

Results go to ``benchmarks/results/speed-<platform>.{json,md}`` (``speed-quick-``
with ``--quick``, so a quick look never overwrites a full run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import grassjax
from benchmarks import common
from examples.llama import config as config_lib
from examples.llama import model as model_lib

OPTIMIZERS = tuple(grassjax.OPTIMIZERS)
SHAPES = ((512, 1376), (2048, 5461), (4096, 11008))
RANKS = (128, 256, 512, 1024)
PAPER_RANKS = {"tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def make_optimizer(
  name: str, rank: int, update_interval: int, moment_dtype=None, svd_method=None
):
  """The optimizer ``name`` as the LLaMA example builds it, at a constant rate.

  No clipping, no schedule, weight decay 0.01; ``moment_dtype`` (None:
  float32) is that of both moments, ``svd_method`` (None: exact) the
  example's ``--svd-method``.
  """
  cfg = config_lib.TrainConfig(
    optimizer=name,
    rank=rank,
    update_interval=update_interval,
    weight_decay=0.01,
    moment_dtype="float32" if moment_dtype is None else jnp.dtype(moment_dtype).name,
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
  """Seconds of one call of ``compiled`` on fresh copies of the donated inputs."""
  state, params = jax.block_until_ready(jax.tree.map(jnp.copy, (state, params)))
  start = time.perf_counter()
  jax.block_until_ready(compiled(grads, state, params))
  return time.perf_counter() - start


def step_times(
  model: str, update_interval: int, loop_steps: int, rounds: int
) -> list[dict]:
  """Per-step optimizer times on ``model``'s parameters, for each optimizer.

  The keep step (the basis is kept) is the time of a donated loop of
  ``loop_steps`` such steps over ``loop_steps``; the optimizers' loops take
  turns for ``rounds`` rounds and each keeps its median, so a slow spell of
  the machine does not fall on one optimizer only. The update step costs the
  keep step plus the difference between one ``tx.update`` call that updates
  the basis and one that keeps it (single calls, whose fixed costs cancel).
  The amortized step over ``T = update_interval`` is ``keep + (update - keep)
  / T``.
  """
  config = model_lib.get_config(model)
  params = nnx.state(model_lib.Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
  grads = jax.tree.map(
    lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params
  )
  rank = PAPER_RANKS[model]
  names = ("adamw", *OPTIMIZERS)
  setups = {}
  for name in names:
    tx = make_optimizer(name, rank, update_interval)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)  # makes the bases
    keep_state = with_count(state, 1)  # steps 2 .. loop_steps + 1 keep the basis
    one_keep, one_update = (
      common.median_seconds(jax.jit(tx.update), grads, s, params)[0]
      for s in (keep_state, with_count(state, update_interval))
    )
    loop = training_loop(tx, loop_steps).lower(grads, keep_state, params).compile()
    setups[name] = (loop, keep_state, one_update - one_keep)  # update's extra cost
  loop_seconds = {name: [] for name in names}
  for _ in range(rounds):
    for name, (loop, state, _) in setups.items():
      loop_seconds[name].append(time_donated(loop, grads, state, params))

  records = []
  for name in names:
    extra = setups[name][2]
    keep = statistics.median(loop_seconds[name]) / loop_steps
    move = keep + extra
    amortized = keep + extra / update_interval
    if name == "adamw":
      adamw_seconds = amortized
    records.append(
      {
        "optimizer": name,
        "model": model,
        "rank": rank,
        "update_interval": update_interval,
        "keep_step_s": keep,
        "update_step_s": move,
        "amortized_s": amortized,
        "amortized_ratio_to_adamw": amortized / adamw_seconds,
        "keep_ratio_to_adamw": keep / adamw_seconds,
        "loop_steps": loop_steps,
        "loop_s": loop_seconds[name],
      }
    )
    print(
      f"step  {name:12s} keep {keep * 1e3:9.2f} ms  update {move * 1e3:9.2f} ms"
      f"  amortized {amortized / adamw_seconds:6.3f}x adamw"
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
      for name, rule in rules.items():  # svd first: the others are compared to it
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="60m", choices=tuple(PAPER_RANKS))
  parser.add_argument("--update-interval", type=int, default=200)
  parser.add_argument(
    "--loop-steps", type=int, default=20, help="steps per timed training loop"
  )
  parser.add_argument(
    "--rounds", type=int, default=5, help="timed loops per optimizer, taking turns"
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

  steps = step_times(model, args.update_interval, args.loop_steps, args.rounds)
  rules = rule_update_times(shapes, RANKS, args.repeats)

  step_rows = [
    (
      r["optimizer"],
      r["keep_step_s"] * 1e3,
      r["update_step_s"] * 1e3,
      r["amortized_s"] * 1e3,
      r["amortized_ratio_to_adamw"],
    )
    for r in steps
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
    f"## Optimizer step, LLaMA {model} parameters (rank {PAPER_RANKS[model]},"
    f" T = {args.update_interval})\n\n"
    + common.markdown_table(
      (
        "optimizer",
        "keep step (ms)",
        "update step (ms)",
        "amortized (ms)",
        "amortized / adamw",
      ),
      step_rows,
    )
    + "\n## One subspace update\n\n"
    + common.markdown_table(
      ("shape", "rank", "rule", "time (ms)", "SVD time / rule time"), rule_rows
    )
  )
  path = common.write_results(
    "speed-quick" if args.quick else "speed",
    {"model": model, "update_interval": args.update_interval, "quick": args.quick},
    steps + rules,
    tables,
  )
  print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
  main()
