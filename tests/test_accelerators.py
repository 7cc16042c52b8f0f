"""Every optimizer compiles for a TPU and for a GPU, ahead of time, here.

The programs are compiled by the accelerators' own compilers with no device
attached (``examples/llama/targets.py``): libtpu for a v5e slice and the CUDA
plugin's deviceless compiler for an H100. A test skips, naming the package,
only where that compiler is not installed. Shapes are small: libtpu's compile
time grows steeply with the size of an SVD.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import grassjax
from benchmarks import cost
from examples.llama import config as config_lib
from examples.llama import memory as memory_lib
from examples.llama import sharding as sharding_lib
from examples.llama import targets as targets_lib
from examples.llama.errors import UserError
from grassjax import subspace

RANK = 4
KEY = jax.random.key(0)
TARGETS = {"tpu": "tpu-v5e:4", "gpu": "gpu-h100-80gb:4"}
# The module each compiler comes from, and the package that installs it.
PACKAGES = {
  "tpu": ("libtpu", "jax[tpu]"),
  "gpu": ("jax_plugins.xla_cuda12", "jax-cuda12-plugin"),
}


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request) -> targets_lib.Target:
  """Four v5e chips or four H100s; skips where their compiler is absent."""
  module, package = PACKAGES[request.param]
  if not _installed(module):
    pytest.skip(f"{package} is not installed: no {request.param} compiler")
  return targets_lib.parse_target(TARGETS[request.param])


@pytest.fixture(scope="module")
def devices(target) -> tuple[jax.Device, ...]:
  return tuple(target.devices())


def _params():
  """A wide and a tall matrix, a stack of 3 and a bias (abstract)."""
  return {
    "wide": jax.ShapeDtypeStruct((12, 20), jnp.float32),
    "tall": jax.ShapeDtypeStruct((20, 12), jnp.float32),
    "stack": jax.ShapeDtypeStruct((3, 8, 16), jnp.float32),
    "bias": jax.ShapeDtypeStruct((12,), jnp.float32),
  }


def _compile_update(
  txs: dict[str, optax.GradientTransformation],
  devices,
  layout: str = "one",
) -> None:
  """Compiles init and the update of every ``tx`` in one program each.

  ``layout``: ``"one"`` (the first device) or ``"fsdp"`` (every array of
  two or more dimensions sharded on its largest axis the four devices
  divide, as the example's ``--mesh fsdp``).
  """
  if layout == "one":
    mesh = Mesh(np.array(devices[:1]), ("fsdp",))
  else:
    mesh = Mesh(np.array(devices), ("fsdp",))

  def sharded(tree):
    if layout == "one":
      return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
    return sharding_lib.state_shardings(tree, mesh, "fsdp")

  params = _params()
  states = {name: jax.eval_shape(tx.init, params) for name, tx in txs.items()}

  def update(grads, states, params):
    return {
      name: tx.update(grads, states[name], params) for name, tx in txs.items()
    }

  param_shardings = sharded(params)
  state_shardings = sharded(states)
  init = jax.jit(
    lambda p: {name: tx.init(p) for name, tx in txs.items()},
    in_shardings=(param_shardings,),
    out_shardings=state_shardings,
  )
  init.lower(params).compile()
  step = jax.jit(
    update,
    in_shardings=(param_shardings, state_shardings, param_shardings),
    donate_argnums=1,
  )
  compiled = step.lower(params, states, params).compile()
  assert compiled.memory_analysis().temp_size_in_bytes >= 0


def _presets(**options) -> dict[str, optax.GradientTransformation]:
  return {
    name: info.constructor(
      1e-2, rank=RANK, key=KEY if info.needs_key else None, **options
    )
    for name, info in grassjax.OPTIMIZERS.items()
  }


def test_every_preset_compiles(devices):
  _compile_update(_presets(update_interval=2), devices)


RULES = {
  "svd": (subspace.svd, False),
  "fixed": (subspace.fixed, False),
  "tracking": (subspace.tracking, False),
  "random_walk": (subspace.random_walk, True),
  "random_jump": (subspace.random_jump, True),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_compiles_with_ao_and_rs_on_and_off(devices, rule):
  make_rule, needs_key = RULES[rule]
  txs = {
    f"ao={ao},rs={rs}": grassjax.low_rank_adamw(
      1e-2,
      make_rule(),
      rank=RANK,
      key=KEY if needs_key else None,
      adaptive_optimizer=ao,
      recovery_scaling=rs,
    )
    for ao in (False, True)
    for rs in (False, True)
  }
  _compile_update(txs, devices)


def test_options_compile(devices):
  """The longer side, bfloat16 moments and bases, 8-bit moments, the
  randomized SVD and injected hyperparameters."""
  txs = {
    "longer": grassjax.grasswalk(
      1e-2, rank=RANK, key=KEY, projected_side="longer"
    ),
    "bfloat16": grassjax.subtrack_pp(
      1e-2, rank=RANK, mu_dtype=jnp.bfloat16, basis_dtype=jnp.bfloat16
    ),
    "8-bit": grassjax.grassjump(1e-2, rank=RANK, key=KEY, mu_dtype="8bit"),
    "8-bit adamw": grassjax.adamw(1e-2, mu_dtype="8bit"),
    "randomized": grassjax.galore(
      1e-2, rank=RANK, key=KEY, svd_method="randomized"
    ),
    "injected": optax.inject_hyperparams(
      grassjax.grassjump, static_args=("rank",)
    )(learning_rate=1e-2, rank=RANK, key=KEY),
  }
  _compile_update(txs, devices)


def test_presets_compile_sharded_over_four_devices(devices):
  _compile_update(_presets(update_interval=2), devices, layout="fsdp")


def test_8bit_moments_compile_sharded_over_four_devices(devices):
  txs = {
    "grassjump": grassjax.grassjump(1e-2, rank=RANK, key=KEY, mu_dtype="8bit"),
    "adamw": grassjax.adamw(1e-2, mu_dtype="8bit"),
  }
  _compile_update(txs, devices, layout="fsdp")


TINY = dict(
  model="tiny",
  rank=8,
  batch_size=4,
  seq_len=32,
  vocab_size=256,
  scan_layers=True,
  warmup=0,
  steps=10,
)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_tiny_training_step_compiles(target, fused):
  flags = dict(fused_update=True, clip="per-layer") if fused else {}
  cfg = config_lib.TrainConfig(**TINY, **flags)
  memory = memory_lib.step_memory(
    cfg, config_lib.model_config(cfg, cfg.vocab_size), target=target
  )
  assert 0 < memory["optimizer_state"] < memory["peak"]


def test_targets_parse_counts_and_slices():
  assert targets_lib.parse_target("tpu-v5e").topology == "2x2"
  assert targets_lib.parse_target("tpu-v5e").count == 1
  assert targets_lib.parse_target("tpu-v5e:16").topology == "4x4"
  assert targets_lib.parse_target("tpu-v5p:8").topology == "2x2x2"
  assert targets_lib.parse_target("tpu-v4:2x2x1").count == 4
  assert targets_lib.parse_target("gpu-l4:8").topology == "1x1x8"
  assert targets_lib.parse_target("gpu-h100-80gb:16").topology == "1x2x8"


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("gpu-h1000", "unknown --target 'gpu-h1000'"),
    ("tpu-v5e:6", "power of two"),
    ("tpu-v5e:2x2x2", "2 dimensions"),
    ("gpu-l4:0", "positive integer"),
    ("gpu-l4:12", "hosts of 8"),
  ],
)
def test_bad_targets_are_refused_with_what_to_do(text, message):
  with pytest.raises(UserError, match=message):
    targets_lib.parse_target(text)


def test_target_needs_dry_run():
  with pytest.raises(ValueError, match="needs --dry-run"):
    config_lib.TrainConfig(target="gpu-l4")
  with pytest.raises(ValueError, match="unknown --target"):
    config_lib.TrainConfig(target="gpu-l5", dry_run=True)


def test_every_gpu_description_names_its_source_and_fills_the_config():
  specs = targets_lib.device_specs()
  assert {"gpu-h100-80gb", "gpu-l4", "tpu-v5e", "tpu-v5p"} <= set(specs)
  for spec in specs.values():
    assert spec.source and spec.bandwidth > 0 and spec.memory_bytes > 0
    if spec.platform == "gpu":
      text = targets_lib.gpu_target_config(spec)
      assert f"device_memory_size: {spec.memory_bytes}" in text
      assert "cuda_compute_capability { major:" in text
      assert spec.peak_flops("tf32") > 0


def test_a_gpu_fit_counts_the_runtime_and_the_preallocation():
  l4 = targets_lib.device_specs()["gpu-l4"]  # 24 GiB
  gib = targets_lib.GiB
  roomy = targets_lib.gpu_fit(10 * gib, l4)
  assert roomy.fits and roomy.fits_default
  tight = targets_lib.gpu_fit(22 * gib, l4)  # over 75%, under 24 - 1
  assert tight.fits and not tight.fits_default
  assert tight.mem_fraction == pytest.approx(0.92)
  assert not targets_lib.gpu_fit(int(23.5 * gib), l4).fits


def test_the_tpu_compilers_refusal_is_read_as_a_result():
  err = RuntimeError(
    "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 25.0G of"
    " 15.75G hbm. ... the total memory required for HLO temporaries (24.96G)"
    " exceeds available HBM (15.75G)"
  )
  refused = targets_lib.refusal(err)
  assert refused.needed_bytes == int(24.96 * 2**30)
  assert refused.available_bytes == int(15.75 * 2**30)
  assert targets_lib.refusal(RuntimeError("INTERNAL: something else")) is None


def test_the_bytes_of_adamw_are_its_minimum(target):
  """AdamW's step reads the weight, gradient and two moments and writes three:
  28 bytes per float32 parameter, as benchmarks/cost.py counts them from
  each compiler's optimized HLO, and as the TPU compiler's own count has."""
  # A multiple of the TPU's (8, 128) tiles, which pad other shapes.
  params = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32)}
  tx = optax.adamw(1e-3, weight_decay=0.01)
  compiled, state = cost.compile_step(tx, params, 1, target)
  n = 64 * 256
  assert cost.hlo_bytes(compiled.as_text()) / n == pytest.approx(28, abs=0.1)
  if target.platform == "tpu":
    bytes_accessed = compiled.cost_analysis()["bytes accessed"]
    assert bytes_accessed / n == pytest.approx(28, abs=0.1)
  assert cost.minimum_bytes(params, state) / n == pytest.approx(28, abs=0.01)
