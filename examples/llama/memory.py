"""The memory of a training step, from the compiler, without running it
(``--dry-run``).

The step is compiled from abstract shapes and read with XLA's
``memory_analysis()``: nothing is allocated and no data is read, so a 7b
step is measured in seconds on a laptop CPU. With ``--target`` it is compiled
by a GPU's or TPU's own compiler, ahead of time, for that device's topology
(``targets.py``), and the figures are that compiler's.
``benchmarks/memory.py`` uses :func:`step_memory` for its tables.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama import targets as targets_lib
from examples.llama.errors import UserError
from examples.llama.step import abstract_train_state, make_train_step


def compiler_options(backend: str) -> dict[str, str]:
  """Options for compiling a step to be measured, not run.

  On CPU, XLA's default scheduler orders independent work early for
  parallelism (for a 7b model it converts the 32000 x 4096 head to float32
  before the forward pass and holds it through every block); its
  memory-optimized scheduler is the better model of an accelerator
  compiler's memory-aware scheduling. Other backends: their defaults.
  """
  if backend != "cpu":
    return {}
  return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def step_memory(
  cfg: config_lib.TrainConfig,
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation | None = None,
  target: targets_lib.Target | None = None,
) -> dict[str, int]:
  """The memory of one compiled training step, in bytes, per device.

  The step is compiled from abstract shapes (``jit(...).lower(...).compile()``,
  with :func:`compiler_options`) for ``target``'s devices (default: this
  machine's) and read with ``memory_analysis()``: nothing is allocated and no
  data is read. ``peak`` is arguments + outputs + temporaries - donated
  aliases (the compiler's buffer assignment; a real step's peak is close,
  not equal). ``gradients`` is the gradient tree's size (one block's and the
  rest with ``--fused-update``); like the activations and the optimizer's
  work, it lies inside ``temporaries``. ``tx`` replaces ``cfg``'s optimizer
  (for another library's, in the whole-model step).

  Raises:
    targets.CompileRefused: the TPU compiler refused the step for want of HBM.
    UserError: the batch does not split over the target's devices, or the
      target's compiler is not installed.
  """
  if tx is None:
    tx = config_lib.make_optimizer(cfg)
  if target is None:
    target = targets_lib.parse_target(cfg.target)
  graphdefs, state = abstract_train_state(model_config, tx, cfg.seed)
  devices = None if target.spec is None else target.devices()
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  if cfg.micro_batch_size % mesh.size:
    raise UserError(
      f"the micro-batch of {cfg.micro_batch_size} sequences does not split"
      f" over the {mesh.size} devices of --target {target.name}."
    )
  shardings = sharding_lib.state_shardings(state, mesh, cfg.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  step = make_train_step(cfg, graphdefs, shardings, batch_sharding, mesh)
  batch = jax.ShapeDtypeStruct(
    (cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len + 1), jnp.int32
  )
  platform = target.platform if target.spec else jax.default_backend()
  try:
    compiled = step.lower(state, batch).compile(compiler_options(platform))
  except Exception as err:  # the TPU compiler's refusal is a result
    refused = targets_lib.refusal(err)
    if refused is None:
      raise
    raise refused from None
  analysis = compiled.memory_analysis()
  params = model_lib.abstract_params(model_config)
  param_shardings = sharding_lib.state_shardings(params, mesh, cfg.mesh)
  parameters = device_bytes(params, param_shardings)
  gradients = parameters
  if cfg.fused_update:
    layers = params[config_lib.LAYERS]
    layer_bytes = device_bytes(layers, param_shardings[config_lib.LAYERS])
    gradients += layer_bytes // model_config.n_layers - layer_bytes
  return {
    "parameters": parameters,
    "optimizer_state": device_bytes(state.optimizer, shardings.optimizer),
    "gradients": gradients,
    "temporaries": analysis.temp_size_in_bytes,
    "peak": analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes,
  }


def device_bytes(abstract, shardings) -> int:
  """Bytes of one device's shards of a pytree of abstract arrays."""
  return sum(
    math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for x, sharding in zip(
      jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True
    )
  )


def format_memory(
  memory: dict[str, int], target: targets_lib.Target, devices: int
) -> str:
  """The lines ``--dry-run`` prints."""
  gib = {k: v / 2**30 for k, v in memory.items()}
  where = "per device, " if devices > 1 else ""
  if target.spec is None:
    compiler = f"{jax.default_backend()} compiler"
    if jax.default_backend() == "cpu":
      compiler += ", memory-optimized schedule"
  else:
    compiler = f"{target.platform.upper()} compiler, ahead of time"
  return "\n".join(
    [
      f"compiled training step ({where}compile-only: nothing allocated;"
      f" {compiler})",
      f"  parameters          {gib['parameters']:8.2f} GiB",
      f"  optimizer state     {gib['optimizer_state']:8.2f} GiB",
      f"  gradients           {gib['gradients']:8.2f} GiB"
      "  (within temporaries)",
      f"  temporaries         {gib['temporaries']:8.2f} GiB",
      f"  peak                {gib['peak']:8.2f} GiB",
      f"  {targets_lib.fit_line(target, memory['peak'])}",
    ]
  )


def dry_run(cfg: config_lib.TrainConfig) -> dict[str, int] | None:
  """``--dry-run``: the step's memory for ``cfg`` on ``cfg.target``, printed;
  returns the figures, or None where the TPU compiler refused the step."""
  tokenizer_vocab_size = data_lib.load_tokenizer(cfg.tokenizer).vocab_size
  model_config = config_lib.checked_model_config(cfg, tokenizer_vocab_size)
  target = targets_lib.parse_target(cfg.target)
  devices = 1 if cfg.mesh == "none" else (target.count or jax.device_count())
  main_process = jax.process_index() == 0
  if main_process:
    n_params = model_lib.param_count(model_config)
    print(
      f"{cfg.model} ({n_params:,} parameters), {cfg.optimizer}, batch"
      f" {cfg.batch_size} x {cfg.seq_len}, --mesh {cfg.mesh}, on"
      f" {target.describe()}"
    )
  try:
    memory = step_memory(cfg, model_config, target=target)
  except targets_lib.CompileRefused as refused:
    if main_process:
      print(
        "  does not fit: the TPU compiler refused the step, which needs"
        f" {refused.needed_bytes / 2**30:.2f} GiB of the"
        f" {refused.available_bytes / 2**30:.2f} GiB of HBM a chip has"
      )
    return None
  if main_process:
    print(format_memory(memory, target, devices))
  return memory
