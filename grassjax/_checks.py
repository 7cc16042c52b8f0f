"""Argument checks shared by the transform and the subspace rules.

Each refuses, at construction or at ``init``, what the step would otherwise
get wrong silently or report from deep inside a trace.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(name: str, value: Any) -> int:
  """``value``, a Python or NumPy integer ``>= 1``, as an int, or a ValueError.

  Such arguments fix array shapes, so they cannot be traced.
  """
  if (
    isinstance(value, (int, np.integer))
    and not isinstance(value, bool)
    and value >= 1
  ):
    return int(value)
  hint = ""
  if isinstance(value, jax.Array):
    hint = " (with optax.inject_hyperparams, name it in static_args)"
  raise ValueError(
    f"grassjax: {name} must be an int >= 1, got {value!r}{hint}."
  )


def update_interval(value: Any) -> int | jax.Array:
  """``update_interval`` as an int, or as the integer scalar array it may be.

  ``optax.inject_hyperparams`` makes an array of an int, traced under jit; the
  step predicate takes it as it is.
  """
  if not (
    isinstance(value, jax.Array)
    and value.ndim == 0
    and jnp.issubdtype(value.dtype, jnp.integer)
  ):
    return positive_int("update_interval", value)
  try:
    known = int(value)
  except TypeError:  # traced
    return value
  if known < 1:
    raise ValueError(f"grassjax: update_interval must be >= 1, got {value!r}.")
  return value


def positive(name: str, value: Any) -> None:
  """Refuses a ``value <= 0`` (or NaN) where it is known, not when traced."""
  if isinstance(value, (int, float, np.number)) and not value > 0:
    raise ValueError(f"grassjax: {name} must be > 0, got {value!r}.")


def step_size(value: Any) -> None:
  """Refuses a negative or non-finite step size where its value is known."""
  try:
    known = float(value)
  except TypeError:  # traced, as under optax.inject_hyperparams
    return
  if not (math.isfinite(known) and known >= 0):
    raise ValueError(
      f"grassjax: step_size must be finite and >= 0, got {value!r}."
    )


def as_dtype(name: str, value: jax.typing.DTypeLike | None) -> jnp.dtype | None:
  """``value`` as a dtype (``None`` stays ``None``).

  An array is refused: ``optax.inject_hyperparams`` takes a dtype such as
  ``jnp.bfloat16`` (a callable) for a schedule unless it is static, and would
  hand over ``jnp.bfloat16(count)`` cast to float32.
  """
  if value is None:
    return None
  if not isinstance(value, (jax.Array, np.ndarray)):
    try:
      return jnp.dtype(value)
    except TypeError:
      pass
  raise TypeError(
    f"grassjax: {name} must be a dtype, got {value!r} (with"
    " optax.inject_hyperparams, name it in static_args)."
  )


def leaf_dtype(leaf: Any) -> jnp.dtype:
  """A parameter's dtype, also for Python scalars and ``ShapeDtypeStruct``s."""
  if hasattr(leaf, "dtype"):
    return jnp.dtype(leaf.dtype)
  return jnp.result_type(leaf)


def trainable_dtype(
  name: str, shape: tuple[int, ...], dtype: Any, projected: bool
) -> None:
  """Refuses a dtype the step would silently get wrong.

  Integer (and boolean) updates would be cast back to their dtype, which
  truncates Adam's direction to zero; a complex matrix has no real basis.
  """
  if jnp.issubdtype(dtype, jnp.floating):
    return
  if jnp.issubdtype(dtype, jnp.complexfloating):
    if projected:
      raise ValueError(
        f"grassjax: parameter {name} with shape {shape} and dtype {dtype} is"
        " masked in for low-rank projection, which needs a real dtype; mask"
        " it out (it then gets Adam with |g|^2, as optax.adam)."
      )
    return
  raise ValueError(
    f"grassjax: parameter {name} with shape {shape} has dtype {dtype}; only"
    " floating-point (or, unprojected, complex) parameters can be trained."
  )


def split_key(key: Any) -> tuple[jax.Array, Any]:
  """A key's raw ``uint32`` data and its implementation (``None``: default).

  The state keeps the raw data (plain arrays checkpoint everywhere); the
  implementation rewraps it on every step, so any ``jax.random.key(seed,
  impl=...)`` works.

  Raises:
    TypeError: unless ``key`` is one typed key (``jax.random.key``) or one raw
      key of the default implementation (``jax.random.PRNGKey``).
  """
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if jnp.shape(key) == ():
      return jax.random.key_data(key), jax.random.key_impl(key)
  elif dtype == jnp.uint32:
    try:
      one = jnp.shape(jax.random.wrap_key_data(key)) == ()
    except (TypeError, ValueError):
      one = False
    if one:
      return key, None
  raise TypeError(
    "grassjax: key must be one PRNG key, from jax.random.key(seed) (any impl)"
    f" or jax.random.PRNGKey(seed); got {key!r}."
  )
