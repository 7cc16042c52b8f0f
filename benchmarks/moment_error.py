"""Moment error: 8-bit moments against float32 ones over a long training run.

    python -m benchmarks.moment_error                  # tiny, 1200 steps
    python -m benchmarks.moment_error --optimizers grasswalk --steps 3000

The LLaMA example's model trains on the shipped sample with float32 moments;
a second copy of the same optimizer, with block-wise 8-bit moments
(``mu_dtype="8bit"``), is fed the very same gradients every step, so it
sees the float32 run's trajectory and only its own rounding separates the
two. Same key and gradients give the same bases (random rules, SVDs and
geodesics are functions of them), so the projected moments compare entry by
entry. Every ``--every`` steps: the relative Frobenius error of each moment,
over all parameters, ``||M_8bit - M_f32|| / ||M_f32||``, and that of the
update each would apply, ``||U_8bit - U_f32|| / ||U_f32||``. A rounding
error that compounded would grow with the steps; one that Adam's decay
forgets stays level.

Writes ``benchmarks/results/moment_error-<platform>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import grassjax
from benchmarks import common
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import step as step_lib
from grassjax import quantization


def _relative(a, b) -> jax.Array:
  """``||a - b|| / ||b||`` over every leaf of two trees alike."""
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(jnp.sum(jnp.abs(x - y) ** 2) for x, y in zip(a, b, strict=True))
  den = sum(jnp.sum(jnp.abs(y) ** 2) for y in b)
  return jnp.sqrt(num / den)


def _adam_state(state) -> grassjax.SubspaceAdamState:
  (found,) = [
    x
    for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, grassjax.SubspaceAdamState)
    )
    if isinstance(x, grassjax.SubspaceAdamState)
  ]
  return found


def _optimizer(cfg: config_lib.TrainConfig, moments: str):
  """The example's optimizer of ``cfg`` with ``--moment-dtype moments``;
  AdamW is grassjax's for both (its float32 step is ``optax.adamw``'s), so
  that both states hold their moments alike."""
  cfg = dataclasses.replace(cfg, moment_dtype=moments)
  if cfg.optimizer != "adamw":
    return config_lib.base_optimizer(cfg)
  return grassjax.adamw(
    config_lib.learning_rate_schedule(cfg),
    weight_decay=cfg.weight_decay,
    mu_dtype=None if moments == "float32" else moments,
  )


def run(cfg: config_lib.TrainConfig, every: int) -> list[dict]:
  """The error curve of ``cfg.optimizer``."""
  optimizer = cfg.optimizer
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  model_config = config_lib.model_config(cfg, tokenizer.vocab_size)
  model = model_lib.Llama(model_config, rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  exact, eight = _optimizer(cfg, "float32"), _optimizer(cfg, "8bit")
  eight_store = quantization.storage("mu_dtype", "8bit")

  @jax.jit
  def step(params, exact_state, eight_state, tokens):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      return step_lib.cross_entropy(logits, tokens[:, 1:])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    grads, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    updates, exact_state = exact.update(grads, exact_state, params)
    shadow, eight_state = eight.update(grads, eight_state, params)
    a, b = _adam_state(eight_state), _adam_state(exact_state)
    errors = {"loss": loss, "update": _relative(shadow, updates)}
    for name, second in (("mu", False), ("nu", True)):
      values = quantization.moment_values(
        getattr(a, name), eight_store, second_moment=second
      )
      errors[name] = _relative(values, getattr(b, name))
    return (
      optax.apply_updates(params, updates),
      exact_state,
      eight_state,
      errors,
    )

  batches = data_lib.PackedBatches(
    cfg.data_source(),
    "train",
    tokenizer,
    seq_len=cfg.seq_len,
    batch_size=cfg.batch_size,
    seed=cfg.seed,
  )
  exact_state, eight_state = exact.init(params), eight.init(params)
  records = []
  for t in range(1, cfg.steps + 1):
    tokens = jnp.asarray(next(batches))
    params, exact_state, eight_state, errors = step(
      params, exact_state, eight_state, tokens
    )
    if t % every == 0 or t == 1:
      record = {"optimizer": optimizer, "step": t}
      record.update({k: float(v) for k, v in errors.items()})
      records.append(record)
      print(
        f"{optimizer:12s} step {t:5d} loss {record['loss']:.3f}  error: mu"
        f" {record['mu']:.4f} nu {record['nu']:.4f} update"
        f" {record['update']:.4f}"
      )
  return records


def _cell(value: float) -> str:
  # A relative error is undefined where the float32 quantity is zero: the
  # update at step 1, where the warm-up's learning rate is still 0.
  return f"{value:.4f}" if math.isfinite(value) else "-"


def report(
  records: list[dict], budget: str, rates: dict[str, float], rates_from: str
) -> str:
  """The markdown tables of ``records`` (from :func:`run`)."""
  names = list(dict.fromkeys(r["optimizer"] for r in records))
  steps = sorted({r["step"] for r in records})
  shown = [s for s in steps if s in (steps[0], steps[-1]) or s % 200 == 0]
  rows = []
  for name in names:
    for kind in ("mu", "nu", "update"):
      by_step = {r["step"]: r[kind] for r in records if r["optimizer"] == name}
      rows.append((name, kind, *(_cell(by_step[s]) for s in shown)))
  late = [
    r
    for r in records
    if r["step"] > steps[-1] // 2 and math.isfinite(r["update"])
  ]
  text = (
    f"Budget: {budget}; each optimizer at its tuned rate"
    f" ({', '.join(f'{n} {rates[n]:g}' for n in names)}, {rates_from})."
    " Relative Frobenius error of the 8-bit run's moments and update against"
    " the float32 run's, fed the same gradients; the second moment's codes"
    " are rounded stochastically, the first moment's to nearest. -: undefined"
    " (the float32 update is zero at step 1, where the warm-up's rate is"
    " 0).\n\n"
    + common.markdown_table(
      ("optimizer", "quantity", *(f"step {s}" for s in shown)), rows
    )
    + "\n"
  )
  if late:
    worst = max(late, key=lambda r: r["update"])
    text += (
      f"\nLargest update error in the second half: {worst['update']:.4f}"
      f" ({worst['optimizer']}, step {worst['step']}).\n"
    )
  return text


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--every", type=int, default=50)
  parser.add_argument("--optimizers", default=",".join(config_lib.OPTIMIZERS))
  parser.add_argument(
    "--rates-from",
    type=Path,
    default=common.results_path("quality", "cpu"),
    help="a quality results file whose tuned rate each optimizer runs at",
  )
  args = parser.parse_args(argv)
  rates = json.loads(args.rates_from.read_text())["meta"]["best_lr"]
  cfg = config_lib.TrainConfig(model=args.model, steps=args.steps)
  records = [
    r
    for name in args.optimizers.split(",")
    for r in run(
      dataclasses.replace(cfg.with_optimizer(name), lr=rates[name]),
      args.every,
    )
  ]
  budget = common.run_budget(cfg).rsplit(", lr", 1)[0]
  text = report(records, budget, rates, common.display_path(args.rates_from))
  path = common.write_results(
    "moment_error",
    {"budget": budget, "steps": args.steps, "lr": rates},
    records,
    text,
  )
  print(f"\n{text}wrote {path}")


if __name__ == "__main__":
  main()
