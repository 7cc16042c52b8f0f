"""Memory: optimizer-state bytes of the LLaMA configs, and the peak memory of a step.

    python -m benchmarks.memory                   # state bytes 60m ... 7b, peak on 60m
    python -m benchmarks.memory --peak-model 130m

1. **State bytes** (``jax.eval_shape``: nothing is allocated) of adamw, galore,
   grasswalk, grassjump and subtrack_pp for each named LLaMA config at the
   papers' rank, next to the theoretical minimum: for a projected ``(m, n)``
   kernel, an ``(min(m, n), r)`` basis and two ``(r, max(m, n))`` moments, plus
   one recovery norm with recovery scaling; two full moments for every other
   parameter; the step count and PRNG key. Target: state bytes = minimum.
   The low-rank optimizers' state is also given with ``moment_dtype=bfloat16``
   (both moments of every parameter in bfloat16, the bases in float32).
2. **Peak memory of one training step** (``jit(step).lower(...).compile()
   .memory_analysis()``: arguments + outputs + temporaries - donated aliases)
   of the LLaMA example's full step (forward, backward, clip, update) for each
   optimizer, as a ratio to AdamW's. The state-bytes ratio predicts
   ``(peak_adamw - state_adamw + state_opt) / peak_adamw``; the target is a
   measured ratio no larger (no ``(m, n)`` temporaries beyond the gradient
   and the update).

Results go to ``benchmarks/results/memory-<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from benchmarks.speed import OPTIMIZERS, PAPER_RANKS, make_optimizer
from examples.llama import config as config_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama import train as train_lib

MODELS = ("60m", "130m", "350m", "1b", "7b")
F32 = 4


def abstract_params(config: model_lib.LlamaConfig):
  """The model's parameters as ``ShapeDtypeStruct``s."""
  model = nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def minimum_state_bytes(params, name: str, rank: int) -> int:
  """The fewest bytes the optimizer ``name`` can keep, from the parameter shapes."""
  if name == "adamw":
    return 2 * F32 * sum(math.prod(p.shape) for p in jax.tree.leaves(params)) + 4
  low_rank = jax.tree.leaves(model_lib.low_rank_mask(params))
  total = 4  # the step count
  if name in ("grasswalk", "grassjump"):
    total += 8  # the PRNG key, two uint32
  recovery = name != "galore"
  for p, projected in zip(jax.tree.leaves(params), low_rank, strict=True):
    if projected:
      *batch, a, b = p.shape
      floats = min(a, b) * rank + 2 * rank * max(a, b) + (1 if recovery else 0)
      total += F32 * math.prod(batch) * floats
    else:
      total += F32 * 2 * math.prod(p.shape)
  return total


def state_bytes_table(models) -> list[dict]:
  """State bytes of each optimizer on each config, against the minimum and AdamW."""
  records = []
  for model in models:
    params = abstract_params(model_lib.get_config(model))
    rank = PAPER_RANKS[model]
    adamw = None
    for name in ("adamw", *OPTIMIZERS):
      tx = make_optimizer(name, rank, update_interval=200)
      measured = common_bytes(jax.eval_shape(tx.init, params))
      if name == "adamw":
        adamw = measured
      minimum = minimum_state_bytes(params, name, rank)
      bf16_moments = None
      if name != "adamw":
        tx = make_optimizer(name, rank, update_interval=200, moment_dtype=jnp.bfloat16)
        bf16_moments = common_bytes(jax.eval_shape(tx.init, params))
      records.append(
        {
          "model": model,
          "optimizer": name,
          "rank": rank,
          "state_bytes": measured,
          "minimum_bytes": minimum,
          "state_over_minimum": measured / minimum,
          "ratio_to_adamw": measured / adamw,
          "bf16_moments_bytes": bf16_moments,
        }
      )
      print(
        f"state {model:5s} {name:12s} {measured / 2**30:8.3f} GiB"
        f"  / minimum {measured / minimum:.4f}  / adamw {measured / adamw:.3f}"
      )
  return records


def common_bytes(tree) -> int:
  """Bytes of the arrays of a pytree of ``ShapeDtypeStruct``s."""
  return sum(
    math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )


def peak_step_memory(model: str, batch_size: int, seq_len: int) -> list[dict]:
  """Compiled peak memory of one full training step for each optimizer."""
  records = []
  adamw = None
  for name in ("adamw", *OPTIMIZERS):
    cfg = config_lib.TrainConfig(
      optimizer=name,
      model=model,
      rank=PAPER_RANKS[model],
      update_interval=200,
      batch_size=batch_size,
      seq_len=seq_len,
    )
    model_config = config_lib.model_config(cfg, vocab_size=32000)
    tx = config_lib.make_optimizer(cfg, cfg.steps)
    graphdefs, state = train_lib.abstract_train_state(model_config, tx, cfg.seed)
    mesh = sharding_lib.make_mesh("none")
    shardings = sharding_lib.state_shardings(state, mesh, "none")
    batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
    step = train_lib.make_train_step(graphdefs, shardings, batch_sharding, mesh)
    batch = jax.ShapeDtypeStruct((1, batch_size, seq_len + 1), jnp.int32)
    analysis = step.lower(state, batch).compile().memory_analysis()
    peak = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
    state_bytes = common_bytes(state.optimizer)
    if adamw is None:
      adamw = {"peak": peak, "state": state_bytes}
    predicted = (adamw["peak"] - adamw["state"] + state_bytes) / adamw["peak"]
    records.append(
      {
        "model": model,
        "optimizer": name,
        "batch": [batch_size, seq_len],
        "peak_bytes": peak,
        "temp_bytes": analysis.temp_size_in_bytes,
        "optimizer_state_bytes": state_bytes,
        "peak_ratio_to_adamw": peak / adamw["peak"],
        "predicted_ratio_from_state": predicted,
      }
    )
    print(
      f"peak  {model:5s} {name:12s} {peak / 2**20:9.1f} MiB  / adamw"
      f" {peak / adamw['peak']:.3f}  (state bytes predict {predicted:.3f})"
    )
  return records


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--peak-model", default="60m", choices=tuple(PAPER_RANKS))
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=256)
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]

  states = state_bytes_table(models)
  peaks = peak_step_memory(args.peak_model, args.batch_size, args.seq_len)
  tables = (
    "## Optimizer-state bytes (papers' ranks: 60m 128, 130m/350m 256, 1b 512,"
    " 7b 1024)\n\n"
    + common.markdown_table(
      (
        "model",
        "optimizer",
        "rank",
        "state (GiB)",
        "state / minimum",
        "state / adamw",
        "with bf16 moments (GiB)",
      ),
      [
        (
          r["model"],
          r["optimizer"],
          r["rank"],
          r["state_bytes"] / 2**30,
          r["state_over_minimum"],
          r["ratio_to_adamw"],
          "" if r["bf16_moments_bytes"] is None else r["bf16_moments_bytes"] / 2**30,
        )
        for r in states
      ],
    )
    + f"\n## Peak memory of one training step, LLaMA {args.peak_model}, batch"
    f" {args.batch_size} x {args.seq_len}\n\n"
    + common.markdown_table(
      ("optimizer", "peak (MiB)", "peak / adamw", "predicted by state bytes"),
      [
        (
          r["optimizer"],
          r["peak_bytes"] / 2**20,
          r["peak_ratio_to_adamw"],
          r["predicted_ratio_from_state"],
        )
        for r in peaks
      ],
    )
  )
  path = common.write_results(
    "memory",
    {"peak_model": args.peak_model, "batch": [args.batch_size, args.seq_len]},
    states + peaks,
    tables,
  )
  print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
  main()
