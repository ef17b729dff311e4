"""Input validation shared by every objective.

Shape checks run at trace time (they cost nothing under ``jit``) and name the offending argument, so
a user who passes ``mask`` with the wrong shape reads ``mask`` in the error, not an XLA broadcast
message. Config checks raise ``ValueError`` naming the field, the value and what is allowed.

Continuous hyperparameters (β, ε, temperatures, coefficients ...) are Python numbers *or* JAX / NumPy
arrays, traced or not: :func:`check_range` validates numbers and lets arrays through (their values
are unknown under ``jit``), and :func:`register_config` makes a frozen config dataclass a pytree whose
float fields are leaves (so it can be a ``jit`` / ``vmap`` / ``grad`` argument) and whose other fields
are static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Tuple, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Scalar = Union[float, jax.Array]
"""A continuous hyperparameter (β, ε, a temperature, a coefficient ...): a Python number, or a JAX scalar
array, traced or not. Inputs are annotated ``ArrayLike`` (anything ``jnp.asarray`` takes), outputs ``jax.Array``."""

__all__ = ["ArrayLike", "Scalar"]  # (the typing aliases: the rest of this module is internal)


def _chex():
    """chex, imported on the first check rather than with ``trlax.objectives`` (the import stays as light as
    JAX's; after the first call this is a ``sys.modules`` lookup). The shape / rank / dtype assertions below
    are chex's (the ecosystem's convention, as in rlax), re-raised as ``ValueError`` / ``TypeError`` that name
    the argument; ``chex.disable_asserts()`` turns them off as it does in every chex-checked library."""
    import chex

    return chex


def _asarray(x: Any, name: str) -> jnp.ndarray:
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError):  # strings, ragged lists, objects
        what = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"`{name}` must be a numeric array, got {what}") from None


def as_float(x: Any, name: str) -> jnp.ndarray:
    """Return ``x`` as a floating array computed in at least float32.

    bf16 / fp16 inputs are upcast to float32 (all ratio and KL maths runs in float32 or wider);
    float64 stays float64 (under ``jax_enable_x64``). Integer or bool inputs are rejected because a
    log-probability that arrives as an integer is always a bug upstream.
    """
    arr = _asarray(x, name)
    try:
        _chex().assert_type(arr, float)
    except AssertionError:
        raise TypeError(f"`{name}` must be a floating array, got dtype {arr.dtype}") from None
    if jnp.finfo(arr.dtype).bits < 32:
        arr = arr.astype(jnp.float32)
    return arr


def as_mask(mask: Any, name: str = "mask") -> jnp.ndarray:
    """Return a boolean mask from a bool or 0/1 numeric array."""
    arr = _asarray(mask, name)
    if arr.dtype == jnp.bool_:
        return arr
    if not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
        raise TypeError(f"`{name}` must be bool or 0/1 numeric, got dtype {arr.dtype}")
    return arr != 0


def check_rank(x: jax.Array, rank: int, name: str) -> None:
    """``chex.assert_rank`` at trace time; the error names the argument."""
    try:
        _chex().assert_rank(x, rank)
    except AssertionError:
        raise ValueError(f"`{name}` must have rank {rank}, got shape {tuple(x.shape)}") from None


def check_shape(x: jax.Array, shape: Iterable[Optional[int]], name: str) -> None:
    """``chex.assert_shape`` of ``x`` against ``shape`` (``None`` matches any size); the error names the
    argument."""
    shape = tuple(shape)
    try:
        _chex().assert_shape(x, shape)
    except AssertionError:
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"`{name}` must have shape {want}, got {tuple(x.shape)}") from None


def check_same_shape(ref: jax.Array, ref_name: str, **others: Optional[ArrayLike]) -> None:
    """``chex.assert_equal_shape`` of each given ``others`` with ``ref``; the error names the argument."""
    chex = _chex()
    for name, arr in others.items():
        if arr is None:
            continue
        try:
            if hasattr(arr, "shape"):
                chex.assert_equal_shape([ref, arr])
            elif tuple(jnp.shape(arr)) != tuple(ref.shape):  # a list / number: no chex form
                raise AssertionError
        except AssertionError:
            raise ValueError(
                f"`{name}` must have the same shape as `{ref_name}` {tuple(ref.shape)}, "
                f"got {tuple(jnp.shape(arr))}"
            ) from None


def per_row(x: Any, batch: int, name: str, dtype=None) -> jnp.ndarray:
    """Accept a ``[B]`` or ``[B, 1]`` per-sequence array and return it as ``[B, 1]``."""
    arr = as_float(x, name) if dtype is None else jnp.asarray(x, dtype)
    if arr.ndim == 1 and arr.shape[0] == batch:
        return arr[:, None]
    if arr.ndim == 2 and arr.shape == (batch, 1):
        return arr
    raise ValueError(f"`{name}` must have shape ({batch},) or ({batch}, 1), got {tuple(arr.shape)}")


# ----------------------------------------------------------------------------- config field checks


def is_array(value: Any) -> bool:
    """True for a JAX array (a tracer included) or a NumPy array: a hyperparameter whose value is data,
    not a Python / NumPy scalar number."""
    return isinstance(value, (jax.Array, np.ndarray))


def maybe_nonzero(value: Any) -> bool:
    """False only for a number equal to 0 (or None): a term whose coefficient is an array is kept,
    since a traced value cannot be inspected."""
    return is_array(value) or (value is not None and value != 0)


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def check_range(
    field: str,
    value: Any,
    *,
    low: Any = None,
    high: Any = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{field}=None is not allowed; a number is required")
    if is_array(value):  # traced or batched: checked by the caller's own tests, not here
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{field}={value!r} must be a number")
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):  # ints of any size are finite
        raise ValueError(f"{field}={value!r} must be finite")
    low = None if is_array(low) else low  # a bound given by another (traced) hyperparameter
    high = None if is_array(high) else high
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + repr(low)
        hi = "inf)" if high is None else repr(high) + ("]" if high_inclusive else ")")
        raise ValueError(f"{field}={value!r} is out of range; allowed: {lo}, {hi}")


def check_order(low_field: str, low: Any, high_field: str, high: Any, *, strict: bool = False) -> None:
    """``low <= high`` (``<`` if ``strict``) when both are numbers; None or an array skips the check."""
    if low is None or high is None or is_array(low) or is_array(high):
        return
    if low > high or (strict and low == high):
        raise ValueError(f"{low_field}={low} must be {'<' if strict else '<='} {high_field}={high}")


def register_config(cls):
    """Register the frozen dataclass ``cls`` as a pytree: fields annotated with ``Scalar`` or ``float``
    (``Scalar``, ``Optional[Scalar]``, ``Tuple[Scalar, ...]``) are leaves, every other field (loss types, modes, flags,
    integer lengths) is static aux data. Unflattening bypasses ``__init__`` (JAX rebuilds pytrees with
    placeholder leaves), so validation runs only when a config is constructed or ``replace``-d.

    A config of Python numbers stays hashable, so it can still be closed over or passed as a static
    argument of ``jit``; passed as an ordinary argument, its float fields become traced leaves.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    leaves = tuple(f.name for f in dataclasses.fields(cls) if "Scalar" in str(f.type) or "float" in str(f.type))
    static = tuple(n for n in fields if n not in leaves)

    def flatten_with_keys(c):
        return [(jax.tree_util.GetAttrKey(n), getattr(c, n)) for n in leaves], tuple(getattr(c, n) for n in static)

    def flatten(c):
        return [getattr(c, n) for n in leaves], tuple(getattr(c, n) for n in static)

    def unflatten(aux, values):
        obj = object.__new__(cls)
        for n, v in zip(static + leaves, tuple(aux) + tuple(values), strict=True):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    cls.LEAF_FIELDS, cls.STATIC_FIELDS = leaves, static
    return cls


class ConfigMixin:
    """Shared behaviour of the frozen loss configs (``PolicyLossConfig``, ``PreferenceLossConfig``):
    ``replace`` and name-based ``preset`` lookup over the class's ``PRESETS`` classmethods."""

    PRESETS: Tuple[str, ...] = ()

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(cast(Any, self), **changes)  # (subclasses are dataclasses)

    @classmethod
    def preset(cls, name: str, **overrides):
        """The preset classmethod called ``name`` (one of ``PRESETS``) with ``overrides``."""
        check_choice("preset", name, cls.PRESETS)
        return getattr(cls, name)(**overrides)
