r"""Block-wise 8-bit storage of Adam's moments.

A moment of shape ``(..., n)`` is stored as a :class:`QuantizedArray`:
``uint8`` codes of the same shape and one ``float32`` scale per block of
``block_size`` consecutive entries along its last axis, ``(..., ceil(n /
block_size))``; 1.016 bytes an entry at the default block of 256, against 4
for float32.

First moment ``M``: a code is the bit pattern of an 8-bit float,
``float8_e4m3fn`` (a sign, 4 exponent and 3 mantissa bits, largest finite
value 448). A floating-point code is a dynamic (non-linear) quantization:
its spacing grows with magnitude, so an entry keeps a relative precision of
``2^-4`` (half a mantissa step) from its block's largest magnitude ``a`` down
to ``2^-15`` of it, and subnormal codes resolve entries down to ``2^-18`` of
it. Adam divides each entry of ``M`` by the root of the same entry of ``V``,
so it is the relative error of every entry, small or large, that a code must
bound; a linear code would lose the small ones.

.. math::
  c = \mathrm{e4m3}\!\left(448\, M / a\right), \qquad \hat M = a\, c / 448

Second moment ``V``, never negative: no sign bit, so an unsigned float code
with 4 exponent and 4 mantissa bits, relative to the block's largest entry
``b``: code 255 is ``b``, each binade below it holds 16 codes, and code 0 is
zero.

.. math::
  c = \mathrm{clip}\left(\mathrm{e4m4}(V / b),\ 1,\ 255\right)
  \ \text{where}\ V > 0, \qquad \hat V = b\, \mathrm{e4m4}^{-1}(c)

An entry keeps a relative precision of ``2^-5`` from ``b`` down to
``2^-16`` of it (its root, which Adam divides by, half that). A positive
entry is never stored as zero: below the smallest code it rounds up to it,
:math:`1.125 \cdot 2^{-16} b`, which can only shorten its step. (A ``V``
rounded to zero would turn Adam's :math:`M / (\sqrt V + \epsilon)` into
:math:`M / \epsilon`.) The code is computed from the bits of the float32
ratio, by integer rounding of its mantissa.

Adam's second moment moves by ``1 - b2`` of itself a step (0.1% at
``b2 = 0.999``), far less than a code's step (3%): rounded to nearest, an
entry would stay where it is until its gradient's square changed it by half
a step at once, so a decaying ``V`` would stick (too large) and only spikes
would register, an error that grows over training. The optimizers therefore
round ``V``'s codes stochastically (:class:`StochasticRounding`): up with
the probability of the ratio's distance from the code below, so each code
is unbiased and ``V`` moves by its mean. The first moment, which ``b1 = 0.9``
moves by 10% a step, is rounded to nearest.

References:
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR
  2022), for block-wise scaling and dynamic codes; Li et al., "Memory
  Efficient Optimizers with 4-bit States" (NeurIPS 2023), for the zero point
  of the second moment.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from grassjax import _checks

_CODE = jnp.float8_e4m3fn  # of the first moment
_LARGEST = 448.0  # its largest finite value
# The second moment's code: a float32 ratio in (0, 1] keeps its exponent and
# 4 mantissa bits, bits 19 and up (rounded to nearest by adding half of bit
# 19, or stochastically by adding 19 random bits); 1.0 (exponent 127,
# mantissa 0) becomes code 255.
_KEPT = 19
_OFFSET = (127 << 4) - 255


def _mix(x: jax.Array) -> jax.Array:
  """A bijective hash of ``uint32`` words (lowbias32, by C. Wellons): each
  output bit depends on every input bit."""
  x = x.astype(jnp.uint32)
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


class StochasticRounding(NamedTuple):
  """Stochastic rounding of a second moment's codes (see the module's
  docstring).

  Entry ``p`` of a moment (its flat position in the whole moment, all its
  stacked matrices included) draws 32 random bits ``hash(seed, p)``, so a
  slice of a stacked moment rounds as the whole stack would, given the
  offset of its first entry.

  Attributes:
    seed: ``uint32`` scalar, one per parameter and step (:meth:`seeded`).
    offset: ``uint32`` scalar, the flat position of the rounded array's
      first entry in its whole moment.
  """

  seed: jax.Array
  offset: jax.typing.ArrayLike = 0

  @classmethod
  def seeded(cls, *words: jax.typing.ArrayLike) -> StochasticRounding:
    """The rounding whose seed hashes ``words`` (integers or ``uint32``
    arrays, such as a PRNG key's data, a parameter's index and the step)."""
    seed = jnp.uint32(0)
    for word in words:
      for part in jnp.ravel(jnp.asarray(word).astype(jnp.uint32)):
        seed = _mix(seed ^ part)
    return cls(seed)

  def bits(self, shape: tuple[int, ...]) -> jax.Array:
    """``uint32`` random bits for each entry of an array of ``shape``."""
    size = math.prod(shape)
    positions = jnp.asarray(self.offset, jnp.uint32) + jnp.arange(
      size, dtype=jnp.uint32
    )
    return _mix(_mix(positions ^ self.seed)).reshape(shape)


class QuantizedArray(NamedTuple):
  """An array of shape ``(..., n)`` stored in :class:`Blockwise8Bit` codes.

  In an optimizer's state the two fields are trees shaped as the
  parameters, each parameter's entry one array (see
  :class:`grassjax.SubspaceAdamState`).

  Attributes:
    codes: ``uint8``, the array's shape: bit patterns of ``float8_e4m3fn``
      (a first moment) or the unsigned code (a second).
    scales: ``float32``, ``(..., ceil(n / block_size))``: each block's largest
      magnitude.
  """

  codes: jax.Array
  scales: jax.Array


@dataclasses.dataclass(frozen=True)
class Blockwise8Bit:
  """Block-wise 8-bit storage of a moment (see the module's docstring).

  ``mu_dtype="8bit"`` (and ``nu_dtype``) names this with the default block;
  pass an instance for another block size. Smaller blocks follow the
  magnitudes more closely at 4 bytes more per block.

  Attributes:
    block_size: entries per scale, along a moment's last axis; ``>= 1``.
  """

  block_size: int = 256

  def __post_init__(self):
    size = self.block_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ValueError(
        f"grassjax: Blockwise8Bit's block_size must be an int >= 1, got"
        f" {size!r}."
      )

  def num_blocks(self, n: int) -> int:
    return -(-n // self.block_size)

  def zeros(self, shape: tuple[int, ...]) -> QuantizedArray:
    """The codes of a zero array of ``shape`` (``ndim >= 1``)."""
    return QuantizedArray(
      jnp.zeros(shape, jnp.uint8),
      jnp.zeros((*shape[:-1], self.num_blocks(shape[-1])), jnp.float32),
    )

  def _blocks(self, x: jax.Array) -> jax.Array:
    """``(..., n)`` as ``(..., blocks, block_size)``, the last zero-padded."""
    n = x.shape[-1]
    padding = self.num_blocks(n) * self.block_size - n
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)])
    return x.reshape(*x.shape[:-1], -1, self.block_size)

  def quantize(
    self,
    x: jax.Array,
    *,
    second_moment: bool = False,
    rounding: StochasticRounding | None = None,
  ) -> QuantizedArray:
    """Codes of ``x`` ``(..., n)``: a first moment, or with
    ``second_moment`` a second moment (never negative), whose codes are
    rounded to nearest, or stochastically with ``rounding``."""
    x = x.astype(jnp.float32)
    blocks = self._blocks(x)
    scales = jnp.max(jnp.abs(blocks), axis=-1)
    # An all-zero block has scale 0 and zero codes.
    inverse = jnp.where(scales > 0, 1 / scales, 0.0)[..., None]
    if second_moment:
      noise = None if rounding is None else self._blocks(rounding.bits(x.shape))
      codes = _encode_unsigned(blocks * inverse, noise)
    else:
      scaled = jnp.clip(blocks * (_LARGEST * inverse), -_LARGEST, _LARGEST)
      codes = jax.lax.bitcast_convert_type(scaled.astype(_CODE), jnp.uint8)
    codes = codes.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    return QuantizedArray(codes, scales)

  def dequantize(
    self, q: QuantizedArray, *, second_moment: bool = False
  ) -> jax.Array:
    """The ``float32`` array that ``q``'s codes stand for."""
    n = q.codes.shape[-1]
    scales = jnp.repeat(q.scales, self.block_size, axis=-1)[..., :n]
    if second_moment:
      return _decode_unsigned(q.codes) * scales
    values = jax.lax.bitcast_convert_type(q.codes, _CODE).astype(jnp.float32)
    return values * (scales / _LARGEST)


def _encode_unsigned(
  ratio: jax.Array, noise: jax.Array | None = None
) -> jax.Array:
  """The second moment's ``uint8`` codes of ratios in ``[0, 1]``: rounded to
  nearest, or stochastically given ``noise``, ``uint32`` random bits."""
  bits = jax.lax.bitcast_convert_type(ratio, jnp.int32)
  if noise is None:
    increment = jnp.int32(1 << (_KEPT - 1))
  else:
    # Uniform on [0, 2^KEPT): the dropped bits carry into the kept ones with
    # the probability of their value.
    increment = (noise >> (32 - _KEPT)).astype(jnp.int32)
  rounded = (bits + increment) >> _KEPT
  codes = jnp.clip(rounded - _OFFSET, 1, 255)
  return jnp.where(ratio > 0, codes, 0).astype(jnp.uint8)


def _decode_unsigned(codes: jax.Array) -> jax.Array:
  """Inverse of :func:`_encode_unsigned`, to rounding."""
  bits = (codes.astype(jnp.int32) + _OFFSET) << _KEPT
  ratio = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return jnp.where(codes > 0, ratio, 0.0)


MomentStorage = jnp.dtype | Blockwise8Bit
"""How a moment is stored: a floating dtype, or :class:`Blockwise8Bit`."""


def storage(name: str, value: Any) -> MomentStorage | None:
  """``mu_dtype``'s or ``nu_dtype``'s value as a storage (``None`` stays).

  ``"8bit"`` is :class:`Blockwise8Bit` with its default block.
  """
  if value is None or isinstance(value, Blockwise8Bit):
    return value
  if isinstance(value, str) and value == "8bit":
    return Blockwise8Bit()
  dtype = _checks.as_dtype(name, value)
  assert dtype is not None
  if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
    # An unscaled 8-bit cast would round Adam's moments (1e-4 and smaller)
    # to zero; an integer one, to integers.
    raise ValueError(
      f"grassjax: {name} must be a floating dtype of 16 bits or more, or"
      f" '8bit' for block-wise 8-bit codes; got {dtype}."
    )
  return dtype


def zeros(
  shape: tuple[int, ...], store: MomentStorage, *, complex_mean: bool = False
) -> jax.Array | QuantizedArray:
  """A zero moment of ``shape`` stored as ``store``; ``complex_mean`` for
  the first moment of a complex parameter (complex, at least complex64).

  Scalars and complex moments are not quantized: under
  :class:`Blockwise8Bit` they are ``float32`` (``complex64``).
  """
  if isinstance(store, Blockwise8Bit):
    if shape and not complex_mean:
      return store.zeros(shape)
    return jnp.zeros(shape, jnp.complex64 if complex_mean else jnp.float32)
  if complex_mean:
    return jnp.zeros(shape, jnp.promote_types(store, jnp.complex64))
  return jnp.zeros(shape, store)


def load(
  stored: jax.Array | QuantizedArray,
  store: MomentStorage,
  *,
  second_moment: bool = False,
) -> jax.Array:
  """A stored moment's values, in ``float32`` at least."""
  if isinstance(stored, QuantizedArray):
    assert isinstance(store, Blockwise8Bit)  # codes are made by one
    return store.dequantize(stored, second_moment=second_moment)
  return stored.astype(jnp.promote_types(stored.dtype, jnp.float32))


def save(
  value: jax.Array,
  like: jax.Array | QuantizedArray,
  store: MomentStorage,
  *,
  second_moment: bool = False,
  rounding: StochasticRounding | None = None,
) -> jax.Array | QuantizedArray:
  """``value`` stored as the moment ``like`` is (its codes, or its dtype);
  ``rounding`` applies to a second moment's codes."""
  if isinstance(like, QuantizedArray):
    assert isinstance(store, Blockwise8Bit)
    return store.quantize(value, second_moment=second_moment, rounding=rounding)
  return value.astype(like.dtype)


def split_moment(treedef: Any, moment: Any) -> list:
  """A state's moment (a tree of arrays, or a :class:`QuantizedArray` of a
  codes tree and a scales tree) as one entry per parameter of ``treedef``:
  an array, or a quantized parameter's :class:`QuantizedArray`."""
  if not isinstance(moment, QuantizedArray):
    return treedef.flatten_up_to(moment)
  return [
    codes
    if isinstance(scales, optax.MaskedNode)
    else QuantizedArray(codes, scales)
    for codes, scales in zip(
      treedef.flatten_up_to(moment.codes),
      treedef.flatten_up_to(moment.scales),
      strict=True,
    )
  ]


def join_moment(treedef: Any, entries: list, store: MomentStorage) -> Any:
  """Inverse of :func:`split_moment`.

  Under :class:`Blockwise8Bit` one :class:`QuantizedArray` of two trees, the
  codes' and the scales' (a masked scale for an entry that is not
  quantized), so that every parameter's entry in each tree is one array, as
  optax's and flax's tree code expects (``flax.nnx.Optimizer`` would turn a
  per-parameter tuple into a ``State``).
  """
  if not isinstance(store, Blockwise8Bit):
    return treedef.unflatten(entries)
  quantized = [isinstance(x, QuantizedArray) for x in entries]
  return QuantizedArray(
    treedef.unflatten(
      [x.codes if q else x for x, q in zip(entries, quantized, strict=True)]
    ),
    treedef.unflatten(
      [
        x.scales if q else optax.MaskedNode()
        for x, q in zip(entries, quantized, strict=True)
      ]
    ),
  )


def moment_values(
  moment: Any, store: MomentStorage, *, second_moment: bool = False
) -> Any:
  """A state's moment as a tree of its values (``float32`` at least), shaped
  as the parameters; ``store`` is the moment's ``mu_dtype`` / ``nu_dtype``
  storage (see :func:`storage`)."""
  codes = moment.codes if isinstance(moment, QuantizedArray) else moment
  treedef = jax.tree.structure(codes)
  return jax.tree.unflatten(
    treedef,
    [
      load(entry, store, second_moment=second_moment)
      for entry in split_moment(treedef, moment)
    ],
  )
