"""trlax.testing: property-test an objective with hypothesis.

Imported on demand (``from trlax import testing``; it needs ``hypothesis``, ``pip install
trlax[testing]``, which ``import trlax.objectives`` never loads). Two parts:

**Strategies** for valid batches of each objective family, as dicts of NumPy arrays:
:func:`policy_batches`, :func:`preference_batches`, :func:`unpaired_batches`,
:func:`distillation_batches`, and :func:`masks`. Shapes come from a small fixed tuple of *shape
buckets*, so a jitted loss compiles once per bucket and hypothesis only feeds new values. Options:
``dtype`` (``float32``, ``bfloat16``, ``float64``), ``extreme`` (log-probs down to ``-1e4``, huge
log-ratios, advantages and logits), ``empty_rows`` (all-masked rows) and ``padding_fill`` (write a
value, e.g. NaN, under the masks: a correct loss never reads it).

**Law checkers** a user calls on their own loss. ``loss_fn(batch)`` takes such a dict and returns a
scalar loss, per-example losses ``[B, ...]``, or a tuple whose first element is one of those (the
``(loss, metrics)`` convention of :func:`trlax.objectives.policy_loss`). Each checker raises
``AssertionError`` naming the law and the largest difference:

- :func:`check_padding_invariance`: masked columns appended at the end change no value and get zero
  gradient;
- :func:`check_permutation_equivariance`: permuting the batch permutes per-example outputs and leaves a
  scalar loss unchanged;
- :func:`check_microbatch_additivity`: with the global counts passed in (``loss_fn(batch, num_items=...,
  num_sequences=...)``) the micro-batch losses sum to the full-batch loss and their gradients
  concatenate to its gradient;
- :func:`check_zero_advantages_zero_gradient`: zero advantages give a zero policy gradient;
- :func:`check_finite`: finite value and gradient (pair with ``extreme=True`` batches);
- :func:`check_jit_consistency`: ``jax.jit(loss_fn)`` equals the eager call.

Gradients are taken w.r.t. one array of the batch (``grad_key``, e.g. ``"logps"``); of the sum of the
outputs when the loss is not a scalar. The checkers jit ``loss_fn`` once per function (cached), so
call them with a function defined once (module level), not a fresh lambda per example.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

Batch = Dict[str, Any]

DTYPES = ("float32", "bfloat16", "float64")
_POLICY_SHAPES = ((4, 6),)
_DISTILLATION_SHAPES = ((3, 4, 8),)


# ------------------------------------------------------------------------------------------ strategies


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed values: {', '.join(map(repr, DTYPES))}")
    return jnp.dtype(dtype)


def _floats(draw, shape, low, high):
    """An array of ``shape`` with float64 values in ``[low, high]`` (hypothesis shrinks it element-wise)."""
    return draw(hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_nan=False, allow_infinity=False)))


def _near(draw, logps, spread):
    """Log-probs of another policy (old / reference / sampler): within ``±spread`` of ``logps``, clipped at 0."""
    return np.minimum(logps + _floats(draw, logps.shape, -spread, spread), 0.0)


def _logp_batch(draw, shapes, dtype, extreme):
    """``(dtype, B, T, low, spread)`` of a ``[B, T]`` log-prob batch: a shape bucket, log-probs in ``[low, 0]``."""
    dt = _check_dtype(dtype)
    b, t = draw(st.sampled_from(tuple(shapes)))
    return (dt, b, t) + ((-1e4, 1e4) if extreme else (-10.0, 1.0))


@st.composite
def masks(draw, shape: Tuple[int, int], *, empty_rows: bool = True, contiguous: bool = True) -> np.ndarray:
    """A ``[B, T]`` bool completion mask with ragged rows.

    Args:
      shape: ``(B, T)``.
      empty_rows: allow all-False rows (length 0).
      contiguous: right-padded rows (a prefix of ``True``); otherwise any pattern (holes included).
    """
    b, t = shape
    lo = 0 if empty_rows else 1
    if contiguous:
        lengths = np.asarray(draw(st.lists(st.integers(lo, t), min_size=b, max_size=b)))
        return np.arange(t)[None, :] < lengths[:, None]
    m = draw(hnp.arrays(np.bool_, shape))
    if not empty_rows:
        m[:, 0] |= ~m.any(axis=1)
    return m


def _finish(batch: Batch, mask_of: Dict[str, str], dtype: np.dtype, padding_fill: Optional[float]) -> Batch:
    """Cast the float arrays to ``dtype``; write ``padding_fill`` under the mask of each per-token array."""
    out = {}
    for k, v in batch.items():
        if v.dtype.kind == "f":
            if padding_fill is not None and k in mask_of:
                v = np.where(batch[mask_of[k]], v, padding_fill)
            v = v.astype(dtype)
        out[k] = v
    return out


@st.composite
def policy_batches(
    draw,
    shapes: Sequence[Tuple[int, int]] = _POLICY_SHAPES,
    *,
    dtype: str = "float32",
    extreme: bool = False,
    empty_rows: bool = True,
    token_advantages: bool = False,
    padding_fill: Optional[float] = None,
) -> Batch:
    """A batch for a policy-gradient loss: ``logps``, ``old_logps``, ``ref_logps``, ``sampler_logps``,
    ``entropies`` (``[B, T]``), ``advantages`` (``[B]``, or ``[B, T]`` with ``token_advantages``) and a
    ragged ``mask``.

    Log-probs are in ``[-10, 0]`` and the old / reference / sampler log-probs within ``±1`` of
    ``logps`` (clipped at 0); with ``extreme`` log-probs reach ``-1e4``, the others differ by up to
    ``1e4`` and advantages reach ``±1e4``.
    """
    dt, b, t, lo, spread = _logp_batch(draw, shapes, dtype, extreme)
    adv = 1e4 if extreme else 5.0
    logps = _floats(draw, (b, t), lo, 0.0)
    out = {"logps": logps}
    for k in ("old_logps", "ref_logps", "sampler_logps"):
        out[k] = _near(draw, logps, spread)
    out["entropies"] = _floats(draw, (b, t), 0.0, 5.0)
    out["advantages"] = _floats(draw, (b, t) if token_advantages else (b,), -adv, adv)
    out["mask"] = draw(masks((b, t), empty_rows=empty_rows))
    per_token: Tuple[str, ...] = ("logps", "old_logps", "ref_logps", "sampler_logps", "entropies")
    per_token += ("advantages",) if token_advantages else ()
    return _finish(out, {k: "mask" for k in per_token}, dt, padding_fill)


@st.composite
def preference_batches(
    draw,
    shapes: Sequence[Tuple[int, int]] = _POLICY_SHAPES,
    *,
    dtype: str = "float32",
    extreme: bool = False,
    empty_rows: bool = False,
    padding_fill: Optional[float] = None,
) -> Batch:
    """A batch of preference pairs: per-token ``chosen_logps``, ``rejected_logps``,
    ``ref_chosen_logps``, ``ref_rejected_logps`` (``[B, T]``) and ``chosen_mask`` / ``rejected_mask``.
    Log-probs in ``[-10, 0]`` (``[-1e4, 0]`` with ``extreme``); the reference within ``±1`` (``±1e4``)."""
    dt, b, t, lo, spread = _logp_batch(draw, shapes, dtype, extreme)
    out = {}
    for side in ("chosen", "rejected"):
        lp = _floats(draw, (b, t), lo, 0.0)
        out[f"{side}_logps"] = lp
        out[f"ref_{side}_logps"] = _near(draw, lp, spread)
        out[f"{side}_mask"] = draw(masks((b, t), empty_rows=empty_rows))
    mask_of = {f"{p}{s}_logps": f"{s}_mask" for s in ("chosen", "rejected") for p in ("", "ref_")}
    return _finish(out, mask_of, dt, padding_fill)


@st.composite
def unpaired_batches(
    draw,
    shapes: Sequence[Tuple[int, int]] = _POLICY_SHAPES,
    *,
    dtype: str = "float32",
    extreme: bool = False,
    empty_rows: bool = False,
    padding_fill: Optional[float] = None,
) -> Batch:
    """A batch of unpaired feedback (KTO / BCO): ``logps``, ``ref_logps`` (``[B, T]``), ``mask`` and a
    ``[B]`` bool ``labels`` (True = desirable) with both labels present."""
    dt, b, t, lo, spread = _logp_batch(draw, shapes, dtype, extreme)
    lp = _floats(draw, (b, t), lo, 0.0)
    labels = np.asarray(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    labels[:2] = (True, False)
    out = {"logps": lp, "ref_logps": _near(draw, lp, spread),
           "mask": draw(masks((b, t), empty_rows=empty_rows)), "labels": labels}
    return _finish(out, {"logps": "mask", "ref_logps": "mask"}, dt, padding_fill)


@st.composite
def distillation_batches(
    draw,
    shapes: Sequence[Tuple[int, int, int]] = _DISTILLATION_SHAPES,
    *,
    dtype: str = "float32",
    extreme: bool = False,
    empty_rows: bool = True,
    padding_fill: Optional[float] = None,
) -> Batch:
    """A distillation batch: ``student_logits`` and ``teacher_logits`` (``[B, T, V]``, in ``±10``, or
    ``±1e4`` with ``extreme``) and a ragged ``mask`` ``[B, T]``."""
    dt = _check_dtype(dtype)
    b, t, v = draw(st.sampled_from(tuple(shapes)))
    hi = 1e4 if extreme else 10.0
    out = {"student_logits": _floats(draw, (b, t, v), -hi, hi), "teacher_logits": _floats(draw, (b, t, v), -hi, hi),
           "mask": draw(masks((b, t), empty_rows=empty_rows))}
    if padding_fill is not None:  # [B, T, V] arrays: fill whole masked positions
        out = {k: (np.where(out["mask"][..., None], x, padding_fill) if x.ndim == 3 else x) for k, x in out.items()}
    return _finish(out, {}, dt, None)


# -------------------------------------------------------------------------------------------- helpers


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@functools.lru_cache(maxsize=256)
def _value_and_grad(loss_fn: Callable, grad_key: Optional[str], jit: bool = True):
    """``(batch, kwargs) -> (value, grad of the summed value w.r.t. batch[grad_key] or None)``."""

    def f(batch, kwargs):
        if grad_key is None:
            return _first(loss_fn(batch, **kwargs)), None

        def total(x):
            v = _first(loss_fn({**batch, grad_key: x}, **kwargs))
            return jnp.sum(v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v), v

        (_, v), g = jax.value_and_grad(total, has_aux=True)(batch[grad_key])
        return v, g

    return jax.jit(f) if jit else f


@functools.lru_cache(maxsize=256)
def _jitted(loss_fn: Callable):
    return jax.jit(loss_fn)


@overload
def _np64(x: None) -> None: ...
@overload
def _np64(x: Any) -> np.ndarray: ...
def _np64(x: Any) -> Optional[np.ndarray]:
    """A float64 NumPy copy (bf16 goes through float32: NumPy cannot cast it directly everywhere)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64)


def _run(loss_fn, batch, grad_key=None, **kwargs):
    v, g = _value_and_grad(loss_fn, grad_key)(batch, kwargs)
    return _np64(v), _np64(g)


def _assert_close(law: str, got, want, rtol: float, atol: float, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{law} violated: {what} has shape {got.shape}, expected {want.shape}")
    if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        diff = np.nanmax(np.abs(got - want)) if got.size else 0.0
        raise AssertionError(f"{law} violated: {what} differs (max |diff| = {diff:.3g}, rtol={rtol}, atol={atol})"
                             f"\n  got:      {got}\n  expected: {want}")


def _mask_keys(batch: Batch, mask_keys: Optional[Sequence[str]]) -> Tuple[str, ...]:
    keys = tuple(k for k in batch if "mask" in k) if mask_keys is None else tuple(mask_keys)
    if not keys:
        raise ValueError("the batch has no mask: name its mask arrays with `mask_keys`")
    for k in keys:
        if k not in batch or np.ndim(batch[k]) != 2:
            raise ValueError(f"mask_keys: `{k}` must be a [B, T] array of the batch")
    return keys


def _batch_size(batch: Batch, mask_keys) -> int:
    return int(np.shape(batch[_mask_keys(batch, mask_keys)[0]])[0])


# --------------------------------------------------------------------------------------------- laws


def check_padding_invariance(
    loss_fn: Callable,
    batch: Batch,
    *,
    pad: int = 3,
    fill: float = -5.0,
    grad_key: Optional[str] = None,
    mask_keys: Optional[Sequence[str]] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Appending ``pad`` masked time steps changes nothing: same value, and (with ``grad_key``) the same
    gradient on the real positions and exactly zero on the padding.

    Every array whose leading ``[B, T]`` equals a mask's shape is padded along axis 1: the masks with
    False, the others with ``fill`` (a finite stand-in for whatever a data pipeline leaves there; pass
    ``fill=np.nan`` to also require that masked NaN never reaches the value). Masks are the keys
    containing ``"mask"`` unless ``mask_keys`` names them.
    """
    keys = _mask_keys(batch, mask_keys)
    shapes = {tuple(np.shape(batch[k])) for k in keys}
    padded = {}
    for k, x in batch.items():
        x = np.asarray(x)
        if x.ndim >= 2 and tuple(x.shape[:2]) in shapes:
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
            x = np.pad(x, widths, constant_values=False if k in keys else np.asarray(fill).astype(x.dtype))
        padded[k] = x
    v0, g0 = _run(loss_fn, batch, grad_key)
    v1, g1 = _run(loss_fn, padded, grad_key)
    law = f"padding invariance ({pad} masked columns filled with {fill})"
    _assert_close(law, v1, v0, rtol, atol, "the loss")
    if grad_key is not None:
        t = np.shape(batch[grad_key])[1]
        _assert_close(law, g1[:, :t], g0, rtol, atol, f"the gradient w.r.t. `{grad_key}`")
        _assert_close(law, g1[:, t:], np.zeros_like(g1[:, t:]), 0.0, 0.0,
                      f"the gradient w.r.t. `{grad_key}` on the padding")


def check_permutation_equivariance(
    loss_fn: Callable,
    batch: Batch,
    perm: Optional[Sequence[int]] = None,
    *,
    grad_key: Optional[str] = None,
    mask_keys: Optional[Sequence[str]] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Permuting the rows of the batch permutes per-example outputs ``[B, ...]`` (and the gradient) and
    leaves a scalar loss unchanged. ``perm`` defaults to the reversed order; pass
    ``st.permutations(range(B))`` draws to test others. Arrays whose first dimension is ``B`` are
    permuted; anything else (scalars, counts) is passed as is."""
    b = _batch_size(batch, mask_keys)
    order = np.arange(b)[::-1] if perm is None else np.asarray(perm)
    if sorted(order.tolist()) != list(range(b)):
        raise ValueError(f"perm={order.tolist()} must be a permutation of range({b})")
    permuted = {k: (np.asarray(x)[order] if np.ndim(x) >= 1 and np.shape(x)[0] == b else x) for k, x in batch.items()}
    v0, g0 = _run(loss_fn, batch, grad_key)
    v1, g1 = _run(loss_fn, permuted, grad_key)
    law = f"batch-permutation equivariance (perm={order.tolist()})"
    _assert_close(law, v1, v0 if v0.ndim == 0 else v0[order], rtol, atol, "the loss")
    if grad_key is not None:
        _assert_close(law, g1, g0[order], rtol, atol, f"the gradient w.r.t. `{grad_key}`")


def check_microbatch_additivity(
    loss_fn: Callable,
    batch: Batch,
    num_microbatches: int = 2,
    *,
    grad_key: Optional[str] = None,
    mask_keys: Optional[Sequence[str]] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Splitting the rows into ``num_microbatches`` equal micro-batches and calling
    ``loss_fn(micro_batch, num_items=N, num_sequences=B)`` with the *global* counts (``N``: the true
    tokens of the first mask, ``B``: the rows; only the ones ``loss_fn`` accepts) gives losses that sum
    to the full-batch loss (called the same way) and gradients that concatenate to its gradient: the
    law gradient accumulation relies on."""
    b = _batch_size(batch, mask_keys)
    if num_microbatches < 1 or b % num_microbatches:
        raise ValueError(f"num_microbatches={num_microbatches} must divide the batch size {b}")
    mask = np.asarray(batch[_mask_keys(batch, mask_keys)[0]])
    totals = {"num_items": jnp.asarray(float(mask.sum())), "num_sequences": jnp.asarray(float(b))}
    params = inspect.signature(loss_fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        totals = {k: v for k, v in totals.items() if k in params}
    if not totals:
        raise ValueError("check_microbatch_additivity: loss_fn must accept `num_items` and / or `num_sequences`")
    v_full, g_full = _run(loss_fn, batch, grad_key, **totals)
    step = b // num_microbatches
    parts = []
    for i in range(num_microbatches):
        rows = slice(i * step, (i + 1) * step)
        mb = {k: (np.asarray(x)[rows] if np.ndim(x) >= 1 and np.shape(x)[0] == b else x) for k, x in batch.items()}
        parts.append(_run(loss_fn, mb, grad_key, **totals))
    law = f"micro-batch additivity ({num_microbatches} micro-batches, global counts)"
    if v_full.ndim != 0:
        raise ValueError("check_microbatch_additivity needs a scalar loss")
    _assert_close(law, sum(p[0] for p in parts), v_full, rtol, atol, "the sum of the micro-batch losses")
    if grad_key is not None:
        _assert_close(law, np.concatenate([p[1] for p in parts]), g_full, rtol, atol,
                      f"the concatenated gradients w.r.t. `{grad_key}`")


def check_zero_advantages_zero_gradient(
    loss_fn: Callable,
    batch: Batch,
    *,
    advantages_key: str = "advantages",
    grad_key: str = "logps",
    atol: float = 0.0,
) -> None:
    """With every advantage set to 0 the policy gradient w.r.t. ``batch[grad_key]`` is zero (within
    ``atol``; trlax's own losses give exactly 0). Losses with a KL or entropy term are checked with those
    terms switched off."""
    if advantages_key not in batch:
        raise ValueError(f"the batch has no `{advantages_key}` (advantages_key)")
    zero = {**batch, advantages_key: np.zeros_like(np.asarray(batch[advantages_key]))}
    _, g = _run(loss_fn, zero, grad_key)
    _assert_close("zero advantages give zero policy gradient", g, np.zeros_like(g), 0.0, atol,
                  f"the gradient w.r.t. `{grad_key}`")


def check_finite(loss_fn: Callable, batch: Batch, *, grad_key: Optional[str] = None) -> None:
    """The loss (every output of a tuple, metrics included) and the gradient w.r.t. ``batch[grad_key]``
    are finite."""
    leaves = jax.tree_util.tree_leaves(_jitted(loss_fn)(batch))
    bad = [i for i, x in enumerate(leaves) if not np.all(np.isfinite(_np64(x)))]
    if bad:
        raise AssertionError(f"finiteness violated: output leaves {bad} of the loss are not finite")
    if grad_key is not None:
        _, g = _run(loss_fn, batch, grad_key)
        if not np.all(np.isfinite(g)):
            raise AssertionError(f"finiteness violated: the gradient w.r.t. `{grad_key}` has "
                                 f"{int(np.sum(~np.isfinite(g)))} non-finite entries")


def check_jit_consistency(loss_fn: Callable, batch: Batch, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``jax.jit(loss_fn)(batch)`` equals ``loss_fn(batch)`` (every output of a tuple, metrics included)."""
    eager = jax.tree_util.tree_leaves(loss_fn(batch))
    jitted = jax.tree_util.tree_leaves(_jitted(loss_fn)(batch))
    if len(eager) != len(jitted):
        raise AssertionError(f"jit consistency violated: {len(jitted)} outputs under jit, {len(eager)} without")
    for i, (a, b) in enumerate(zip(jitted, eager, strict=True)):
        _assert_close("jit consistency", _np64(a), _np64(b), rtol, atol, f"output leaf {i}")


__all__ = [
    "DTYPES",
    "check_finite",
    "check_jit_consistency",
    "check_microbatch_additivity",
    "check_padding_invariance",
    "check_permutation_equivariance",
    "check_zero_advantages_zero_gradient",
    "distillation_batches",
    "masks",
    "policy_batches",
    "preference_batches",
    "unpaired_batches",
]
