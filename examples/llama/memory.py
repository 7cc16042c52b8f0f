"""The memory of a training step, from the compiler, without running it
(``--dry-run``).

The step is compiled from abstract shapes and read with XLA's
``memory_analysis()``: nothing is allocated and no data is read, so a 7b
step is measured in seconds on a laptop CPU. ``benchmarks/memory.py`` uses
:func:`step_memory` for its tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib
from examples.llama.step import abstract_train_state, make_train_step
from grassjax.diagnostics import state_bytes


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
) -> dict[str, int]:
  """The memory of one compiled training step, in bytes, per device.

  The step is compiled from abstract shapes (``jit(...).lower(...).compile()``,
  with :func:`compiler_options`) and read with ``memory_analysis()``: nothing
  is allocated and no data is read. ``peak`` is arguments + outputs +
  temporaries - donated aliases (the compiler's buffer assignment; a GPU assigns
  buffers differently, so a real step's peak is close, not equal). ``gradients``
  is the gradient tree's size (one block's and the rest with
  ``--fused-update``); like the activations and the optimizer's work, it lies
  inside ``temporaries``. ``tx`` replaces ``cfg``'s optimizer (for another
  library's, in the whole-model step).
  """
  if tx is None:
    tx = config_lib.make_optimizer(cfg)
  graphdefs, state = abstract_train_state(model_config, tx, cfg.seed)
  mesh = sharding_lib.make_mesh(cfg.mesh)
  shardings = sharding_lib.state_shardings(state, mesh, cfg.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh, batch_axis=1, ndim=3)
  step = make_train_step(cfg, graphdefs, shardings, batch_sharding, mesh)
  batch = jax.ShapeDtypeStruct(
    (cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len + 1), jnp.int32
  )
  analysis = (
    step.lower(state, batch).compile(compiler_options(jax.default_backend()))
  ).memory_analysis()
  params = model_lib.abstract_params(model_config)
  gradients = state_bytes(params)
  if cfg.fused_update:
    layers = state_bytes(params[config_lib.LAYERS])
    gradients += layers // model_config.n_layers - layers
  return {
    "parameters": state_bytes(params),
    "optimizer_state": state_bytes(state.optimizer),
    "gradients": gradients,
    "temporaries": analysis.temp_size_in_bytes,
    "peak": analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes,
  }


def format_memory(memory: dict[str, int], devices: int) -> str:
  """The lines ``--dry-run`` prints."""
  gib = {k: v / 2**30 for k, v in memory.items()}
  where = "per device, " if devices > 1 else ""
  fits = [
    f"{size} GiB" for size in (24, 40, 80) if memory["peak"] <= size * 2**30
  ]
  return "\n".join(
    [
      f"compiled training step ({where}compile-only: nothing allocated;"
      f" {'memory-optimized' if jax.default_backend() == 'cpu' else 'default'}"
      " schedule)",
      f"  parameters          {gib['parameters']:8.2f} GiB",
      f"  optimizer state     {gib['optimizer_state']:8.2f} GiB",
      f"  gradients           {gib['gradients']:8.2f} GiB"
      "  (within temporaries)",
      f"  temporaries         {gib['temporaries']:8.2f} GiB",
      f"  peak                {gib['peak']:8.2f} GiB",
      "  fits                "
      f"{', '.join(fits) if fits else 'none of 24, 40, 80 GiB'}",
    ]
  )


def dry_run(cfg: config_lib.TrainConfig) -> dict[str, int]:
  """``--dry-run``: the step's memory for ``cfg``, printed; returns the
  figures."""
  tokenizer_vocab_size = data_lib.load_tokenizer(cfg.tokenizer).vocab_size
  model_config = config_lib.checked_model_config(cfg, tokenizer_vocab_size)
  memory = step_memory(cfg, model_config)
  if jax.process_index() == 0:
    n_params = model_lib.param_count(model_config)
    print(
      f"{cfg.model} ({n_params:,} parameters), {cfg.optimizer}, batch"
      f" {cfg.batch_size} x {cfg.seq_len}, on {jax.devices()[0].platform}"
    )
    print(format_memory(memory, sharding_lib.make_mesh(cfg.mesh).size))
  return memory
