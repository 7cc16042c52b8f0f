"""A LLaMA decoder in Flax NNX.

Pre-norm transformer blocks, as in Touvron et al., "LLaMA: Open and Efficient
Foundation Language Models" (2023): RMSNorm, causal multi-head attention with
rotary position embeddings, a SwiGLU MLP, no biases, and an LM head untied from
the token embedding. Shapes: tokens ``(batch, seq)`` int32 in, logits
``(batch, seq, vocab_size)`` float32 out.

Parameters are stored in ``param_dtype`` (float32 by default; bfloat16 halves
them, see the trainer's ``--param-dtype`` for how updates are rounded onto
them); ``dtype`` sets the compute dtype of the embedding, the blocks and the
residual stream (``bfloat16`` halves activation memory). The parts that decide
the loss stay float32 whatever ``dtype`` is: the attention softmax, the RMSNorm
statistics, the rotary rotation and the LM head, whose logits are float32. With
``scan_layers`` the blocks are stacked, every kernel gaining a leading
``(n_layers,)`` axis, and run by one ``nnx.scan`` (one block to compile instead
of ``n_layers``); grassjax treats the leading axis as a batch of independent
matrices. ``remat`` recomputes each block's activations in the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# The kernels that get the low-rank treatment (attention and MLP projections).
LOW_RANK_KERNELS = (
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The shape of a LLaMA model and how it computes.

  Attributes:
    vocab_size: tokens in the vocabulary ``V``.
    dim: model width ``d``.
    hidden_dim: SwiGLU hidden width ``h``.
    n_heads: attention heads; ``d / n_heads`` must be even (rotary pairs).
    n_layers: transformer blocks.
    max_seq_len: longest sequence the model accepts.
    norm_eps: RMSNorm's epsilon.
    rope_theta: base of the rotary frequencies.
    dtype: compute dtype (stored as a ``jnp.dtype``).
    param_dtype: dtype the parameters are stored in (float32, or bfloat16 to
      halve them); the norm statistics, softmax, rotary rotation and logits
      are float32 whatever it is.
    scan_layers: stack the blocks and run them with ``nnx.scan``.
    remat: recompute block activations in the backward pass.
  """

  vocab_size: int = 32000
  dim: int = 512
  hidden_dim: int = 1376
  n_heads: int = 8
  n_layers: int = 8
  max_seq_len: int = 256
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      try:
        dtype = jnp.dtype(getattr(self, name))
      except TypeError as err:
        raise ValueError(f"LlamaConfig.{name}: {err}") from None
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
          f"LlamaConfig.{name} must be a float dtype, got {dtype}."
        )
      # One canonical form (jnp.float32 and jnp.dtype("float32") hash
      # differently).
      object.__setattr__(self, name, dtype)
    for name in (
      "vocab_size",
      "dim",
      "hidden_dim",
      "n_heads",
      "n_layers",
      "max_seq_len",
    ):
      if not getattr(self, name) >= 1:
        raise ValueError(
          f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}."
        )
    for name in ("norm_eps", "rope_theta"):
      if not getattr(self, name) > 0:
        raise ValueError(
          f"LlamaConfig.{name} must be > 0, got {getattr(self, name)}."
        )
    if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
      raise ValueError(
        f"LlamaConfig: dim {self.dim} must split into {self.n_heads} heads of"
        " an even size (rotary embeddings rotate pairs)."
      )

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def replace(self, **changes: Any) -> LlamaConfig:
    """A copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)


CONFIGS: dict[str, LlamaConfig] = {
  # A CPU-sized model for the default run and the tests; the byte tokenizer's
  # vocabulary.
  "tiny": LlamaConfig(
    vocab_size=259, dim=128, hidden_dim=352, n_heads=4, n_layers=4
  ),
  # The papers' shapes (GaLore's LLaMA configs), T5 tokenizer vocabulary.
  "60m": LlamaConfig(dim=512, hidden_dim=1376, n_heads=8, n_layers=8),
  "130m": LlamaConfig(dim=768, hidden_dim=2048, n_heads=12, n_layers=12),
  "350m": LlamaConfig(dim=1024, hidden_dim=2736, n_heads=16, n_layers=24),
  "1b": LlamaConfig(dim=2048, hidden_dim=5461, n_heads=32, n_layers=24),
  "7b": LlamaConfig(dim=4096, hidden_dim=11008, n_heads=32, n_layers=32),
}


def get_config(name: str) -> LlamaConfig:
  """The named config; a ``ValueError`` lists the names for an unknown one."""
  if name not in CONFIGS:
    raise ValueError(
      f"unknown model {name!r}; choose from {', '.join(CONFIGS)}."
    )
  return CONFIGS[name]


def low_rank_mask(params: Any) -> Any:
  """True for the attention and MLP kernels, False for everything else.

  Args:
    params: the model's parameters (an ``nnx.State``, or any pytree whose
      paths name the modules as :class:`Llama` does).

  Returns:
    A pytree of bools with the structure of ``params``: the mask for
    grassjax's ``mask`` argument, so embeddings, norms and the LM head get
    AdamW, as in the papers.
  """

  def is_low_rank(path, _) -> bool:
    # An nnx.State path ends in ``.value`` (the Variable's array), a pure dict's
    # in the parameter's name:
    # ``['layers'][0]['attention']['q_proj']['kernel']``, or
    # ``['layers']['attention']['q_proj']['kernel']`` with scanned layers.
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if names and names[-1] == "value":
      names = names[:-1]
    return (
      len(names) >= 2
      and names[-1] == "kernel"
      and names[-2] in LOW_RANK_KERNELS
    )

  return jax.tree_util.tree_map_with_path(is_low_rank, params)


def _dense(
  config: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs, dtype: Any = None
) -> nnx.Linear:
  """A bias-free linear layer: ``(d_in, d_out)`` kernel, ``N(0, 0.02^2)``.

  It computes in ``dtype``, ``config.dtype`` unless given.
  """
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=False,
    dtype=config.dtype if dtype is None else dtype,
    param_dtype=config.param_dtype,
    kernel_init=nnx.initializers.normal(0.02),
    rngs=rngs,
  )


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """RMSNorm over the ``dim`` features: scale (ones), float32 statistics."""
  return nnx.RMSNorm(
    config.dim,
    epsilon=config.norm_eps,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    rngs=rngs,
  )


def rotary_angles(
  config: LlamaConfig, seq_len: int
) -> tuple[jax.Array, jax.Array]:
  """The rotary angles' ``cos`` and ``sin``, each ``(seq_len, head_dim / 2)``.

  Position ``p``'s ``i``-th angle is ``p * rope_theta^(-2i / head_dim)``.
  """
  half = config.head_dim // 2
  freqs = config.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``(b, s, heads, head_dim)`` by the angles of its positions.

  Pairs ``(x[..., i], x[..., i + head_dim / 2])`` are rotated (the split-half
  layout of GPT-NeoX and Hugging Face's LLaMA, not Meta's interleaved pairs;
  the two are the same model up to a permutation of the q and k columns).
  The rotation runs in float32 and returns ``x``'s dtype.
  """
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[:, None, :], sin[:, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary position embeddings."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.n_heads, self.head_dim = config.n_heads, config.head_dim
    self.q_proj = _dense(config, config.dim, config.dim, rngs)
    self.k_proj = _dense(config, config.dim, config.dim, rngs)
    self.v_proj = _dense(config, config.dim, config.dim, rngs)
    self.o_proj = _dense(config, config.dim, config.dim, rngs)

  def __call__(
    self, x: jax.Array, rope: tuple[jax.Array, jax.Array]
  ) -> jax.Array:
    """``x`` ``(b, s, d)`` -> ``(b, s, d)``; position ``i`` attends to
    ``j <= i``."""
    b, s, _ = x.shape

    def heads(proj):
      return proj(x).reshape(b, s, self.n_heads, self.head_dim)

    q = apply_rotary(heads(self.q_proj), *rope)
    k = apply_rotary(heads(self.k_proj), *rope)
    out = jax.nn.dot_product_attention(q, k, heads(self.v_proj), is_causal=True)
    return self.o_proj(out.reshape(b, s, -1))


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _dense(config, config.dim, config.hidden_dim, rngs)
    self.up_proj = _dense(config, config.dim, config.hidden_dim, rngs)
    self.down_proj = _dense(config, config.hidden_dim, config.dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attention_norm = _rms_norm(config, rngs)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = _rms_norm(config, rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(
    self, x: jax.Array, rope: tuple[jax.Array, jax.Array]
  ) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), rope)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """The decoder: embedding, ``n_layers`` blocks, final norm, LM head.

  Initialization: embedding and kernels ``N(0, 0.02^2)``, norm scales 1.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(
      config.vocab_size,
      config.dim,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      embedding_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    if config.scan_layers:

      @nnx.split_rngs(splits=config.n_layers)
      @nnx.vmap(in_axes=0, out_axes=0)
      def stacked_blocks(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs)

      self.layers = stacked_blocks(rngs)
    else:
      self.layers = nnx.List(
        [Block(config, rngs=rngs) for _ in range(config.n_layers)]
      )
    self.norm = _rms_norm(config, rngs)
    # float32 logits, computed in float32: the loss is only as precise as they
    # are.
    self.lm_head = _dense(
      config, config.dim, config.vocab_size, rngs, jnp.float32
    )

  def rope(self, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """The rotary angles of a sequence; a ``ValueError`` past
    ``max_seq_len``."""
    if seq_len > self.config.max_seq_len:
      raise ValueError(
        f"sequence of {seq_len} tokens exceeds max_seq_len"
        f" {self.config.max_seq_len}."
      )
    return rotary_angles(self.config, seq_len)

  def logits(self, x: jax.Array) -> jax.Array:
    """The last block's output ``(b, s, d)`` -> float32 logits ``(b, s, V)``."""
    return self.lm_head(self.norm(x)).astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``tokens`` ``(b, s)`` int32 -> logits ``(b, s, vocab_size)`` float32."""
    rope = self.rope(tokens.shape[1])
    x = self.embed(tokens)

    def block_step(block: Block, x: jax.Array) -> jax.Array:
      return block(x, rope)

    if self.config.remat:
      block_step = nnx.remat(block_step)
    if self.config.scan_layers:
      x = nnx.scan(
        lambda x, block: block_step(block, x),
        in_axes=(nnx.Carry, 0),
        out_axes=nnx.Carry,
      )(x, self.layers)
    else:
      for block in self.layers:
        x = block_step(block, x)
    return self.logits(x)


def abstract_params(config: LlamaConfig) -> nnx.State:
  """The parameters of ``config``'s model as ``jax.ShapeDtypeStruct``s.

  Nothing is allocated (``nnx.eval_shape``), so this is cheap at any size.
  """
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def param_count(config: LlamaConfig) -> int:
  """The number of parameters of ``config``'s model, counted from its shapes."""
  return sum(
    math.prod(p.shape) for p in jax.tree.leaves(abstract_params(config))
  )
