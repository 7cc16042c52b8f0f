"""The training state and step: gradients, clipping, the optimizer, rounding.

Two ways to take a step, equal in what they compute:

* **whole model** (the default): the gradients of every parameter, then one
  optimizer update of the whole tree;
* **fused** (``--fused-update``, scanned blocks only): the optimizer is
  applied to each block inside the backward pass, so only one block's
  gradients exist at a time (the JAX form of GaLore's per-layer weight
  update, which is how a 7B model trains on a 24 GB card).

With ``--scan-layers`` both run the same block-by-block backward pass
(:class:`ScannedBackward`): the forward pass scans the blocks keeping each
block's input, and the backward pass is a reverse loop that recomputes block
``l`` under ``jax.vjp``. The whole-model step stores each block's gradient;
the fused step consumes it at once, with the optimizer's ``layers`` group
applied to block ``l``'s slice of the parameters and state
(``update(..., layer=(l, L))``: the same step count and PRNG keys as the
whole-stack update). So fused and unfused steps agree to rounding.

Global-norm clipping needs every gradient before any update, so the fused
step offers ``--clip per-layer`` (each block on its own, the embedding, final
norm and head as one more group) or ``--clip none``; the unfused step offers
all three.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import grassjax
from examples.llama import config as config_lib
from examples.llama import model as model_lib
from examples.llama import sharding as sharding_lib


class TrainState(NamedTuple):
  """The model's and the optimizer's state, as ``nnx.State`` pytrees."""

  model: nnx.State
  optimizer: nnx.State


class GraphDefs(NamedTuple):
  """The static structure that turns a :class:`TrainState` back into objects."""

  model: nnx.GraphDef
  optimizer: nnx.GraphDef


def _build(
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation,
  seed: int,
) -> tuple[model_lib.Llama, nnx.Optimizer]:
  model = model_lib.Llama(model_config, rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def abstract_train_state(
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation,
  seed: int,
) -> tuple[GraphDefs, TrainState]:
  """The graph definitions and the shapes of the state, without allocating
  it."""
  model, optimizer = nnx.eval_shape(lambda: _build(model_config, tx, seed))
  model_def, model_state = nnx.split(model)
  optimizer_def, optimizer_state = nnx.split(optimizer)
  return GraphDefs(model_def, optimizer_def), TrainState(
    model_state, optimizer_state
  )


def init_train_state(
  model_config: model_lib.LlamaConfig,
  tx: optax.GradientTransformation,
  seed: int,
  shardings,
) -> TrainState:
  """A freshly initialized state, each array created directly on its shards."""

  @functools.partial(jax.jit, out_shardings=shardings)
  def init() -> TrainState:
    model, optimizer = _build(model_config, tx, seed)
    return TrainState(nnx.state(model), nnx.state(optimizer))

  return init()


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def energy_by_layer_type(grads, opt_state) -> dict[str, jax.Array]:
  """Mean energy fraction of each kind of projected kernel (q_proj, ...,
  down_proj).

  ``R = ||S^T G||_F / ||G||_F`` (:func:`grassjax.diagnostics.energy_fraction`),
  averaged over the layers: the share of the gradient the subspace keeps, the
  quantity of the GrassWalk paper's energy-fraction figure. ``opt_state`` is
  the state *before* the step, so ``S`` is the subspace the gradient meets
  (on the steps that move it, the one being left). Empty for an optimizer
  without a subspace (AdamW).
  """
  # One SubspaceAdamState per optimizer group (config.make_optimizer's
  # partition for stacked blocks); groups without projections give None.
  is_state = lambda x: isinstance(x, grassjax.SubspaceAdamState)  # noqa: E731
  fractions = [
    grassjax.diagnostics.energy_fraction(grads, state)
    for state in jax.tree.leaves(opt_state, is_leaf=is_state)
    if is_state(state)
  ]
  groups: dict[str, list[jax.Array]] = {}
  for path, fraction in jax.tree_util.tree_flatten_with_path(fractions)[0]:
    name = jax.tree_util.keystr(path)
    kind = next(k for k in model_lib.LOW_RANK_KERNELS if f"'{k}'" in name)
    groups.setdefault(kind, []).append(fraction.reshape(-1))
  return {
    f"energy_{kind}": jnp.concatenate(values).mean()
    for kind, values in sorted(groups.items())
  }


def clip_by_group_norm(grads, max_norm: float, stacked: bool):
  """Scales a group of gradients to norm at most ``max_norm`` (optax's rule).

  With ``stacked`` every leaf has a leading layer axis and each layer is its
  own group (one norm per index of that axis); otherwise the whole tree is one
  group.
  """
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return grads
  first = 1 if stacked else 0
  square = sum(
    jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(first, x.ndim)))
    for x in leaves
  )
  norm = jnp.sqrt(square)
  factor = jnp.where(
    norm < max_norm, 1.0, max_norm / jnp.where(norm > 0, norm, 1.0)
  )

  def scale(x):
    return (
      x * factor.reshape(factor.shape + (1,) * (x.ndim - factor.ndim))
    ).astype(x.dtype)

  return jax.tree.map(scale, grads)


def in_layers(path) -> bool:
  """Whether a parameter path lies in the stacked blocks (``layers``)."""
  first = path[0]
  return (
    getattr(first, "key", getattr(first, "name", None)) == config_lib.LAYERS
  )


def clip_per_layer(grads, max_norm: float = 1.0):
  """``--clip per-layer`` on the whole model's gradients (stacked blocks).

  Each block is its own group, and the embedding, final norm and LM head
  together are one more; the fused update clips the same groups one block at
  a time.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
  layer = [in_layers(path) for path, _ in leaves]
  blocks, rest = _split([x for _, x in leaves], layer)
  return treedef.unflatten(
    _join(
      clip_by_group_norm(blocks, max_norm, stacked=True),
      clip_by_group_norm(rest, max_norm, stacked=False),
      layer,
    )
  )


def _split(leaves: Sequence, flags: Sequence[bool]) -> tuple[list, list]:
  """The leaves whose flag is set, and the others, each in order."""
  pairs = list(zip(leaves, flags, strict=True))
  return [x for x, f in pairs if f], [x for x, f in pairs if not f]


def _join(flagged: Sequence, others: Sequence, flags: Sequence[bool]) -> list:
  """Inverse of :func:`_split`."""
  its = {True: iter(flagged), False: iter(others)}
  return [next(its[bool(f)]) for f in flags]


def stochastic_round(x: jax.Array, bits: jax.Array) -> jax.Array:
  """float32 ``x`` -> bfloat16, rounded up with probability equal to the
  remainder.

  ``bits`` are uniform random ``uint32``: their low 16 bits are added to the
  low 16 bits of ``x`` (the ones bfloat16 drops) before truncation, so
  ``E[round(x)] = x``: updates far below bfloat16's resolution (about
  ``2^-9`` relative) still move the weights on average, where round-to-nearest
  would drop them.
  """
  raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
  raw = (raw + (bits & jnp.uint32(0xFFFF))) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(raw, jnp.float32).astype(jnp.bfloat16)


def hash_bits(seed: jax.Array, shape: tuple[int, ...], offset=0) -> jax.Array:
  """Pseudo-random ``uint32`` of each element of an array of ``shape``.

  Element ``i`` (row-major, plus ``offset``) gets a 32-bit mix (MurmurHash3's
  finalizer) of ``i`` and ``seed``. Elementwise integer arithmetic on iotas,
  so it fuses into its consumer and never exists as an array, where
  ``jax.random.bits`` materializes its counters (several copies of a 32000 x
  4096 embedding). Plenty for stochastic rounding, not a general PRNG.
  """
  # The index is built one axis at a time from ``offset`` onwards, so every
  # full-size intermediate depends on it: in a loop over layers (a traced
  # offset) none is loop-invariant, and none is hoisted out and kept alive
  # (an iota-only index would be: 430 MB for a 7b block's MLP).
  index = jnp.asarray(offset, jnp.uint32)
  for axis, size in enumerate(shape):
    stride = math.prod(shape[axis + 1 :])
    step = jax.lax.iota(jnp.uint32, size) * jnp.uint32(stride)
    index = index[..., None] + step.reshape((1,) * axis + (size,))
  h = index ^ seed
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def apply_updates(
  params, updates, key: jax.Array | None, layer: jax.Array | None = None
):
  """``params + updates`` in float32, rounded to each parameter's dtype.

  float32 parameters get exactly ``optax.apply_updates``. bfloat16 ones are
  rounded by :func:`stochastic_round` with :func:`hash_bits` seeded from
  ``key`` and the parameter's path, or to nearest when ``key`` is None. A
  per-layer update (``layer``, the block's index, with ``params`` holding
  that block's slices) draws the bits of that layer of the whole-model update.
  """

  def one(path, p, u):
    total = p.astype(jnp.float32) + u.astype(jnp.float32)
    if p.dtype != jnp.bfloat16 or key is None:
      return total.astype(p.dtype)
    name = jax.tree_util.keystr(path).encode()
    leaf_key = jax.random.fold_in(key, zlib.crc32(name) & 0x7FFFFFFF)
    seed = jax.random.bits(leaf_key, (), jnp.uint32)
    offset = 0 if layer is None else layer * p.size
    return stochastic_round(total, hash_bits(seed, p.shape, offset))

  return jax.tree_util.tree_map_with_path(one, params, updates)


def _commit(model, optimizer, params, opt_state) -> TrainState:
  """Writes new parameters and optimizer state into the objects (as
  ``nnx.Optimizer.update`` does) and returns the new training state."""
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, nnx.state(opt_state))
  optimizer.step[...] += 1
  return TrainState(nnx.state(model), nnx.state(optimizer))


def _rounding_key(cfg: config_lib.TrainConfig, optimizer) -> jax.Array | None:
  """This step's stochastic-rounding key (apart from the init's and the
  optimizer's); None to round to nearest."""
  if not cfg.stochastic_rounding:
    return None
  key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
  return jax.random.fold_in(key, optimizer.step[...])


def all_finite(tree) -> jax.Array:
  """Whether every floating-point element of ``tree`` is finite (a boolean
  scalar); integers and PRNG keys are not looked at."""
  leaves = [
    jnp.isfinite(x).all()
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def make_train_step(
  cfg: config_lib.TrainConfig,
  graphdefs: GraphDefs,
  shardings,
  batch_sharding,
  mesh,
):
  """The jitted optimizer step ``(state, batch) -> (state, metrics)``, state
  donated.

  ``batch`` is ``(grad_accum, micro_batch, seq_len + 1)`` int32 tokens; the
  gradients of the micro-batches are summed in a ``lax.scan`` and averaged,
  so the step equals one step on the whole batch (:func:`whole_model_step`),
  or, with ``--fused-update``, :func:`fused_step`. ``metrics`` holds the
  ``loss``, the global norm of the gradient before clipping (``grad_norm``),
  the learning rate the step applied (``lr``) and, for the low-rank
  optimizers, :func:`energy_by_layer_type` of this step's gradient (NaN on
  the first step, which has no subspace yet).

  With ``--skip-nonfinite`` a step whose loss, gradient norm or new state is
  not finite returns the state it was given, unchanged (step counts
  included, so the schedule does not advance), and ``metrics["skipped"]``
  says so: a select on the device, as ``optax.apply_if_finite`` does, which
  keeps the old state alive beside the new one.
  """
  schedule = config_lib.learning_rate_schedule(cfg)

  def train_step(
    state: TrainState, batch: jax.Array
  ) -> tuple[TrainState, jax.Array]:
    # The objects merged from the state share its variables, which the step
    # writes into: what a skipped step keeps is taken first.
    old_leaves = jax.tree.leaves(state)
    model = nnx.merge(graphdefs.model, state.model)
    optimizer = nnx.merge(graphdefs.optimizer, state.optimizer)
    step = fused_step if cfg.fused_update else whole_model_step
    loss, grad_norm, params, opt_state, energy = step(
      cfg, model, optimizer, batch
    )
    first_step = optimizer.step[...] == 0
    metrics = {"loss": loss, "grad_norm": grad_norm}
    metrics.update(
      (k, jnp.where(first_step, jnp.nan, v)) for k, v in energy.items()
    )
    metrics["lr"] = schedule(optimizer.step[...])
    new_state = _commit(model, optimizer, params, opt_state)
    if cfg.skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      finite &= all_finite(new_state)
      leaves, treedef = jax.tree.flatten(new_state)
      new_state = treedef.unflatten(
        [
          jax.lax.select(finite, new, old)
          for new, old in zip(leaves, old_leaves, strict=True)
        ]
      )
      metrics["skipped"] = ~finite
    return new_state, metrics

  return jax.jit(
    train_step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, sharding_lib.replicated(mesh)),
    donate_argnums=0,
  )


class ScannedBackward:
  """The forward and backward pass of a scanned model, one block at a time.

  Trees of the whole model's structure appear with the blocks' leaves (or the
  other leaves) replaced by scalar placeholders: :meth:`whole` builds them and
  :meth:`part` takes them apart, so each optimizer group sees the paths and
  leaf order of the whole model.
  """

  def __init__(self, model: model_lib.Llama, params, tokens: jax.Array):
    self.params = params
    self.n_layers = model.config.n_layers
    leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.layer_pos = [in_layers(path) for path, _ in leaves]
    self.placeholders = {
      flag: [jnp.zeros((), jnp.float32)] * self.layer_pos.count(flag)
      for flag in (True, False)
    }
    self.layers_treedef = jax.tree.structure(params[config_lib.LAYERS])
    self.defs = {
      name: nnx.graphdef(getattr(model, name))
      for name in ("embed", "layers", "norm", "lm_head")
    }
    self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]
    self.rope = model.rope(self.inputs.shape[1])

  def whole(self, layer_leaves=None, rest_leaves=None):
    """A tree of the model's structure from block leaves and other leaves."""
    return self.treedef.unflatten(
      _join(
        self.placeholders[True] if layer_leaves is None else layer_leaves,
        self.placeholders[False] if rest_leaves is None else rest_leaves,
        self.layer_pos,
      )
    )

  def part(self, tree, layers: bool) -> list:
    """The block leaves (``layers``) or the other leaves of a model-shaped
    tree."""
    return _split(self.treedef.flatten_up_to(tree), self.layer_pos)[
      0 if layers else 1
    ]

  def block(self, layer_leaves, x: jax.Array) -> jax.Array:
    params = self.layers_treedef.unflatten(layer_leaves)
    return nnx.merge(self.defs["layers"], params)(x, self.rope)

  def _embed(self, rest) -> jax.Array:
    return nnx.merge(self.defs["embed"], rest["embed"])(self.inputs)

  def _head_loss(self, rest, x: jax.Array) -> jax.Array:
    x = nnx.merge(self.defs["norm"], rest["norm"])(x)
    logits = nnx.merge(self.defs["lm_head"], rest["lm_head"])(x)
    return cross_entropy(logits.astype(jnp.float32), self.labels)

  def forward(self):
    """The loss and the cotangent of the last block's output.

    Keeps each block's input (``L x`` one activation) for the backward pass.
    """
    rest = self.whole(rest_leaves=self.part(self.params, False))
    x, self._embed_vjp = jax.vjp(self._embed, rest)
    layer_params = self.part(self.params, True)

    def body(i, carry):
      x, inputs = carry
      # Tied to the loop-carried x, the parameter stacks vary per iteration
      # for the compiler: a compiler that computes bfloat16 products in
      # float32 (XLA on CPU) would otherwise convert whole stacks once,
      # outside the loop (loop-invariant code motion), and hold them.
      stacks, x = jax.lax.optimization_barrier((layer_params, x))
      return self.block([_pick(s, i) for s in stacks], x), _put(inputs, x, i)

    inputs = jnp.zeros((self.n_layers, *x.shape), x.dtype)
    x, self.block_inputs = jax.lax.fori_loop(
      0, self.n_layers, body, (x, inputs)
    )
    loss, head_vjp = jax.vjp(self._head_loss, rest, x)
    self._rest_from_head, dx = head_vjp(jnp.ones_like(loss))
    return loss, dx

  def block_backward(self, index, layer_leaves, dx):
    """Block ``index``'s parameter gradients (leaves) and input cotangent."""
    inputs, dx = jax.lax.optimization_barrier((self.block_inputs, dx))
    _, block_vjp = jax.vjp(self.block, layer_leaves, _pick(inputs, index))
    return block_vjp(dx)

  def rest_gradients(self, dx) -> list:
    """Gradients of the embedding, final norm and head, given the first
    block's input cotangent."""
    (from_embed,) = self._embed_vjp(dx)
    return self.part(
      jax.tree.map(jnp.add, self._rest_from_head, from_embed), False
    )


def _pick(x: jax.Array, index) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)


def _put(stack: jax.Array, x: jax.Array, index) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stack, x, index, 0)


def _partition(opt_state) -> optax.PartitionState | None:
  """The state of :func:`config.make_optimizer`'s partition (alone or after
  clipping); None for another optimizer's state."""
  is_partition = lambda x: isinstance(x, optax.PartitionState)  # noqa: E731
  found = [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=is_partition)
    if is_partition(x)
  ]
  return found[0] if len(found) == 1 else None


class LayerStates:
  """The ``layers`` group's optimizer state seen one block at a time.

  Its leaves split into stacks (one slice per block: moments, bases) and
  shared leaves (step counts, keys), told apart by initializing the group for
  one block: a leaf whose shape differs from the whole-stack init's is stacked.
  ``partition`` is the state of :func:`config.make_optimizer`'s partition.
  """

  def __init__(self, cfg, passes: ScannedBackward, params, partition):
    self.tx = _group_tx(cfg, config_lib.LAYERS)
    one_block = passes.whole([x[0] for x in passes.part(params, True)])
    self.stacked = [
      a.shape != b.shape
      for a, b in zip(
        jax.tree.leaves(jax.eval_shape(self.tx.init, params)),
        jax.tree.leaves(jax.eval_shape(self.tx.init, one_block)),
        strict=True,
      )
    ]
    leaves, self.treedef = jax.tree.flatten(
      partition.inner_states[config_lib.LAYERS]
    )
    self.stacks, self.shared = _split(leaves, self.stacked)

  def at(self, index, stacks: Sequence, shared: Sequence):
    """Block ``index``'s state, from the stacks and the shared leaves."""
    return self.treedef.unflatten(
      _join([_pick(x, index) for x in stacks], shared, self.stacked)
    )

  def parts(self, state) -> tuple[list, list]:
    """A block's state, as (slices of the stacks, shared leaves)."""
    return _split(jax.tree.leaves(state), self.stacked)

  def whole(self, stacks: Sequence, shared: Sequence):
    return self.treedef.unflatten(_join(stacks, shared, self.stacked))


def _energy_shapes(passes: ScannedBackward, states: LayerStates, layer_params):
  """``{name: zeros((n_layers,))}`` for the energy fractions of each block."""
  shapes = jax.eval_shape(
    lambda: energy_by_layer_type(
      passes.whole([_pick(x, 0) for x in layer_params]),
      states.at(0, states.stacks, states.shared),
    )
  )
  return {k: jnp.zeros((passes.n_layers,), v.dtype) for k, v in shapes.items()}


def _scanned_gradients(cfg, model, params, tokens, opt_state=None):
  """``(loss, grads, energy)`` of a scanned model by :class:`ScannedBackward`.

  With ``opt_state`` (of :func:`config.make_optimizer`'s partition; another
  optimizer has no energy), :func:`energy_by_layer_type` of each block's
  gradient is measured as the backward loop makes it (so before any update,
  which may then write over the gradients and the bases in place), averaged over
  the blocks; otherwise ``energy`` is empty.
  """
  passes = ScannedBackward(model, params, tokens)
  loss, dx = passes.forward()
  layer_params = passes.part(params, True)
  partition = None if opt_state is None else _partition(opt_state)
  states = (
    None if partition is None else LayerStates(cfg, passes, params, partition)
  )

  def backward(i, carry):
    dx, grads, energy = carry
    index = passes.n_layers - 1 - i
    layer_grads, dx = passes.block_backward(
      index, [_pick(x, index) for x in layer_params], dx
    )
    if states is not None:
      state = states.at(index, states.stacks, states.shared)
      layer_energy = energy_by_layer_type(passes.whole(layer_grads), state)
      energy = {k: _put(energy[k], v, index) for k, v in layer_energy.items()}
    grads = [
      _put(*pair, index) for pair in zip(grads, layer_grads, strict=True)
    ]
    return dx, grads, energy

  zeros = [jnp.zeros_like(x) for x in layer_params]
  energy = (
    {} if states is None else _energy_shapes(passes, states, layer_params)
  )
  dx, layer_grads, energy = jax.lax.fori_loop(
    0, passes.n_layers, backward, (dx, zeros, energy)
  )
  grads = passes.whole(layer_grads, passes.rest_gradients(dx))
  return loss, grads, {k: v.mean() for k, v in energy.items()}


def whole_model_step(cfg, model, optimizer, batch):
  """The gradients of the whole model, then one optimizer update.

  Returns ``(loss, grad_norm, params, opt_state, energy)``, ``grad_norm``
  the gradient's global norm before clipping.
  """
  model_def, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(params)

  opt_state = nnx.as_pure(optimizer.opt_state)
  if cfg.scan_layers and batch.shape[0] == 1:
    loss, grads, energy = _scanned_gradients(
      cfg, model, params, batch[0], opt_state
    )
  else:
    if cfg.scan_layers:

      def value_and_grad(params, tokens):
        return _scanned_gradients(cfg, model, params, tokens)[:2]

    else:

      def loss_fn(params, tokens):
        logits = nnx.merge(model_def, params, rest)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])

      value_and_grad = jax.value_and_grad(loss_fn)

    if batch.shape[0] == 1:  # no accumulator: one gradient buffer, not two
      loss, grads = value_and_grad(params, batch[0])
    else:

      def accumulate(totals, tokens):
        return jax.tree.map(
          jnp.add, totals, value_and_grad(params, tokens)
        ), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      totals, _ = jax.lax.scan(accumulate, zeros, batch)
      loss, grads = jax.tree.map(lambda x: x / batch.shape[0], totals)
    # The energy is measured before the update (which may write over the
    # gradients); the barrier keeps XLA from holding a copy of them for it
    # (where the compiler keeps barriers until scheduling: not on CPU, which
    # is why scanned models measure it inside the backward loop instead).
    energy = energy_by_layer_type(grads, opt_state)
    grads, energy = jax.lax.optimization_barrier((grads, energy))
  grad_norm = jnp.sqrt(_squared_norm(jax.tree.leaves(grads)))
  if cfg.clip == "per-layer":
    grads = clip_per_layer(grads)
  updates, opt_state = optimizer.tx.update(grads, opt_state, params)
  params = apply_updates(params, updates, _rounding_key(cfg, optimizer))
  return loss, grad_norm, params, opt_state, energy


def _group_tx(cfg, group: str) -> optax.GradientTransformation:
  """One group of :func:`config.make_optimizer`'s partition, on its own."""
  base = config_lib.base_optimizer(cfg)
  return optax.masked(
    base,
    lambda p: jax.tree.map(lambda g: g == group, config_lib.param_groups(p)),
  )


def fused_step(cfg, model, optimizer, batch):
  """One step with the optimizer applied to each block inside the backward pass.

  The reverse loop over the blocks takes block ``l``'s gradient, clips it
  (``--clip per-layer``) and updates block ``l``'s slice of the parameters and
  of the ``layers`` group's optimizer state in place; the embedding, final
  norm and head (the ``rest`` group) are updated after the loop. Returns
  ``(loss, grad_norm, params, opt_state, energy)``, equal to
  :func:`whole_model_step`'s with the same clipping; the norm is summed up
  block by block.
  """
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  opt_state = nnx.as_pure(optimizer.opt_state)
  key = _rounding_key(cfg, optimizer)
  passes = ScannedBackward(model, params, batch[0])
  whole, n_layers = passes.whole, passes.n_layers
  loss, dx = passes.forward()

  # fused: the partition alone
  states = LayerStates(cfg, passes, params, opt_state)
  layer_params = passes.part(params, True)

  def layer_step(index, dx, layer_params, state_stacks):
    """Block ``index``'s backward pass and update: its new slices, the new
    shared state (the same for every block), its energy fractions and the
    squared norm of its gradient."""
    p = [_pick(x, index) for x in layer_params]
    grads, dx = passes.block_backward(index, p, dx)
    square = _squared_norm(grads)
    if cfg.clip == "per-layer":
      grads = clip_by_group_norm(grads, 1.0, stacked=False)
    # Every block starts from the step's shared state (one step count).
    state = states.at(index, state_stacks, states.shared)
    grads = whole(grads)
    energy = energy_by_layer_type(grads, state)
    updates, state = states.tx.update(
      grads, state, whole(p), layer=(index, n_layers)
    )
    p = passes.part(apply_updates(whole(p), updates, key, layer=index), True)
    return dx, p, *states.parts(state), energy, square

  def backward(i, carry):
    dx, layer_params, state_stacks, _, energy, square = carry
    index = n_layers - 1 - i
    dx, p, state_slices, shared, layer_energy, layer_square = layer_step(
      index, dx, layer_params, state_stacks
    )
    return (
      dx,
      [_put(*pair, index) for pair in zip(layer_params, p, strict=True)],
      [
        _put(*pair, index)
        for pair in zip(state_stacks, state_slices, strict=True)
      ],
      shared,
      {k: _put(energy[k], v, index) for k, v in layer_energy.items()},
      square + layer_square,
    )

  energy = _energy_shapes(passes, states, layer_params)
  dx, layer_params, state_stacks, shared, energy, square = jax.lax.fori_loop(
    0,
    n_layers,
    backward,
    (
      dx,
      layer_params,
      states.stacks,
      states.shared,
      energy,
      jnp.zeros((), jnp.float32),
    ),
  )

  # The embedding, final norm and head: one more group, updated last.
  grads = passes.rest_gradients(dx)
  grad_norm = jnp.sqrt(square + _squared_norm(grads))
  if cfg.clip == "per-layer":
    grads = clip_by_group_norm(grads, 1.0, stacked=False)
  rest_params = whole(rest_leaves=passes.part(params, False))
  updates, rest_state = _group_tx(cfg, config_lib.REST).update(
    whole(rest_leaves=grads),
    opt_state.inner_states[config_lib.REST],
    rest_params,
  )
  rest = passes.part(apply_updates(rest_params, updates, key), False)
  opt_state = optax.PartitionState(
    {
      config_lib.LAYERS: states.whole(state_stacks, shared),
      config_lib.REST: rest_state,
    }
  )
  energy = {k: v.mean() for k, v in energy.items()}
  return loss, grad_norm, whole(layer_params, rest), opt_state, energy


def _squared_norm(leaves) -> jax.Array:
  """The squared norm of a list of gradients, in float32."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
