"""Masked reductions and loss aggregation (the normalisations of the GRPO family).

Every reduction is *select-then-compute*: masked positions are replaced with zeros by ``jnp.where``
before anything is summed, so a NaN or inf sitting under padding can reach neither the value nor the
gradient (``mask * x`` would turn ``0 * nan`` into ``nan``).

Normalisation modes of :func:`aggregate` (``L`` the per-token loss, ``m`` the mask, ``B`` rows):

======================  ====================================================================
mode                    loss
======================  ====================================================================
``grpo`` / ``sapo``     ``(1/B) Σ_i Σ_t m L / max(Σ_t m, 1)``  (per-sequence mean, then mean over
                        *all* rows, fully-masked rows included, as TRL). Shao et al. 2024, eq. 3.
``bnpo``                ``Σ m L / max(Σ m, 1)`` over the local micro-batch.
``dr_grpo``             ``Σ m L / (B · max_completion_length)``. Liu et al. 2025 (Dr. GRPO), eq. 4.
``dapo`` / ``cispo`` /  ``Σ m L / max(num_items, 1)`` with ``num_items`` the *global* token count of
``vespo`` /             the optimiser batch (all micro-batches, all devices); defaults to the local
``token_mean``          count. Yu et al. 2025 (DAPO), eq. 8.
``luspo``               ``(1/B) Σ_i Σ_t m L`` (per-sequence sum). LUSPO, arXiv 2602.05261.
======================  ====================================================================

Micro-batching: pass ``num_items`` (global token count) and ``num_sequences`` (global row count) and
each micro-batch returns its share of the global loss, so summing the micro-batch losses (and the
device losses) gives exactly the loss of the whole batch, in every mode except ``bnpo`` (which is
defined per micro-batch, as in TRL).

Metrics are returned as ``(sum, count)`` pairs (:class:`Mean`) and ``min`` / ``max`` scalars so they
merge correctly across micro-batches and devices (:func:`merge_metrics`, :func:`finalize_metrics`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from trlax.objectives._checks import ArrayLike, as_float, as_mask, check_choice, check_rank, check_same_shape

AGGREGATION_MODES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "token_mean", "luspo")


def _broadcast_mask(x: jnp.ndarray, mask: Any) -> jnp.ndarray:
    """``mask`` as bool, broadcast to the common shape of ``x`` and ``mask`` (a ``[B, 1]`` row mask
    selects whole rows); a mask that does not broadcast is an error naming ``mask``."""
    mask = as_mask(mask)
    try:
        shape = jnp.broadcast_shapes(jnp.shape(x), mask.shape)
    except ValueError:
        raise ValueError(f"`mask` with shape {tuple(mask.shape)} does not broadcast against the values "
                         f"{tuple(jnp.shape(x))}") from None
    return jnp.broadcast_to(mask, shape)


def masked_sum(x: ArrayLike, mask: ArrayLike, axis: Optional[int] = None) -> jax.Array:
    """``Σ x`` over positions where ``mask`` is true; masked NaN/inf never leak (select, then sum).
    ``x`` and ``mask`` broadcast against each other (e.g. ``[B, T]`` values, ``[B, 1]`` row mask).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import masked_sum
      >>> x = jnp.array([[1.0, 2.0, jnp.nan], [3.0, 5.0, 7.0]])
      >>> mask = jnp.array([[1, 1, 0], [0, 0, 0]], bool)
      >>> print(masked_sum(x, mask, axis=-1))  # NaN under the mask gives no NaN; an empty row sums to 0
      [3. 0.]
    """
    x = jnp.asarray(x)
    mask = _broadcast_mask(x, mask)
    return jnp.sum(jnp.where(mask, x, jnp.zeros((), x.dtype)), axis=axis)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis: Optional[int] = None) -> jax.Array:
    """Mean over masked positions (the count is taken over the broadcast mask); 0 (not NaN) where
    nothing is selected.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import masked_mean
      >>> x = jnp.array([[1.0, 2.0, 100.0], [3.0, 5.0, 7.0]])
      >>> mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
      >>> print(masked_mean(x, mask, axis=-1))  # the masked 100.0 never leaks
      [1.5 5. ]
    """
    x = jnp.asarray(x)
    mask = _broadcast_mask(x, mask)
    count = jnp.sum(mask, axis=axis).astype(x.dtype)
    return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1)


def masked_min(x: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Min over masked positions; 0 where nothing is selected."""
    x = jnp.asarray(x)
    mask = _broadcast_mask(x, mask)
    out = jnp.min(jnp.where(mask, x, jnp.inf))
    return jnp.where(jnp.any(mask), out, jnp.zeros((), x.dtype))


def masked_max(x: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Max over masked positions; 0 where nothing is selected."""
    x = jnp.asarray(x)
    mask = _broadcast_mask(x, mask)
    out = jnp.max(jnp.where(mask, x, -jnp.inf))
    return jnp.where(jnp.any(mask), out, jnp.zeros((), x.dtype))


def aggregate(
    per_token_loss: ArrayLike,
    mask: ArrayLike,
    mode: str = "dapo",
    *,
    num_items: Optional[Any] = None,
    num_sequences: Optional[Any] = None,
    max_completion_length: Optional[int] = None,
) -> jax.Array:
    """Reduce a ``[B, T]`` per-token loss to a scalar with the normalisation of ``mode``.

    Args:
      per_token_loss: ``[B, T]`` loss per token, or ``[B, 1]`` per-sequence loss (counted once per
        valid token of its row, i.e. broadcast over ``T``).
      mask: ``[B, T]`` bool / 0-1 mask of real completion tokens.
      mode: one of ``AGGREGATION_MODES`` (table in the module docstring).
      num_items: global number of completion tokens in the optimiser batch, for ``dapo`` / ``cispo``
        / ``vespo`` / ``token_mean`` (defaults to this micro-batch's count). Clamped to >= 1.
      num_sequences: global number of rows, for ``grpo`` / ``sapo`` / ``dr_grpo`` / ``luspo``
        (defaults to ``B``).
      max_completion_length: the Dr. GRPO constant (defaults to ``T``).

    Returns:
      A scalar in the dtype of ``per_token_loss`` (at least float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import aggregate
      >>> loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
      >>> mask = jnp.array([[1, 1, 1], [1, 0, 0]], bool)
      >>> print(round(float(aggregate(loss, mask, "grpo")), 4))  # mean over rows of per-row token means: (2 + 4) / 2
      3.0
      >>> print(round(float(aggregate(loss, mask, "dapo")), 4))  # token mean over the batch: 10 / 4
      2.5
      >>> print(round(float(aggregate(loss, mask, "dr_grpo", max_completion_length=3)), 4))  # 10 / (2 * 3)
      1.6667
    """
    check_choice("mode", mode, AGGREGATION_MODES)
    mask = as_mask(mask)
    check_rank(mask, 2, "mask")
    loss = as_float(per_token_loss, "per_token_loss")
    B, T = mask.shape
    dtype = loss.dtype
    row_len = jnp.sum(mask, axis=-1).astype(dtype)
    if loss.shape == (B, 1) and T != 1:
        # a per-sequence loss (GSPO-style): Σ_t m·L_i = L_i·|y_i| without a [B, T] pass
        row_sum = jnp.where(row_len > 0, loss[:, 0] * row_len, jnp.zeros((), dtype))
    else:
        check_same_shape(mask, "mask", per_token_loss=loss)
        row_sum = masked_sum(loss, mask, axis=-1)  # [B]
    n_seq = jnp.asarray(B if num_sequences is None else num_sequences, dtype)
    if mode in ("grpo", "sapo"):
        return jnp.sum(row_sum / jnp.maximum(row_len, 1)) / n_seq
    if mode == "bnpo":
        return jnp.sum(row_sum) / jnp.maximum(jnp.sum(row_len), 1)
    if mode == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        return jnp.sum(row_sum) / (n_seq * length)
    if mode == "luspo":
        return jnp.sum(row_sum) / n_seq
    # dapo / cispo / vespo / token_mean: global token mean
    n_items = jnp.sum(row_len) if num_items is None else jnp.asarray(num_items, dtype)
    return jnp.sum(row_sum) / jnp.maximum(n_items, 1)


# ----------------------------------------------------------------------------------------- metrics


class Mean(NamedTuple):
    """A mean kept as ``(sum, count)`` so it merges exactly across micro-batches and devices."""

    total: jnp.ndarray
    count: jnp.ndarray  # type: ignore[assignment]  # (a field named like tuple.count)

    @property
    def value(self) -> jnp.ndarray:
        return self.total / jnp.maximum(self.count, 1)


def mean_metric(x: ArrayLike, mask: Optional[ArrayLike] = None) -> Mean:
    """``Mean`` of ``x`` over ``mask`` (all elements when ``mask`` is None)."""
    x = jnp.asarray(x)
    if mask is None:
        return Mean(jnp.sum(x).astype(jnp.float32), jnp.asarray(x.size, jnp.float32))
    mask = jnp.broadcast_to(as_mask(mask), x.shape)
    return Mean(masked_sum(x, mask).astype(jnp.float32), jnp.sum(mask).astype(jnp.float32))


def merge_metrics(metrics: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Merge metric dicts from several micro-batches / devices.

    ``Mean`` values add their sums and counts; keys ending in ``min`` / ``max`` take the min / max;
    any other scalar is averaged.
    """
    out: Dict[str, Any] = {}
    for key in metrics[0]:
        vals = [m[key] for m in metrics]
        if isinstance(vals[0], Mean):
            out[key] = Mean(sum(v.total for v in vals), sum(v.count for v in vals))
        elif key.endswith("min"):
            out[key] = jnp.min(jnp.stack([jnp.asarray(v) for v in vals]))
        elif key.endswith("max"):
            out[key] = jnp.max(jnp.stack([jnp.asarray(v) for v in vals]))
        else:
            out[key] = jnp.mean(jnp.stack([jnp.asarray(v) for v in vals]))
    return out


def finalize_metrics(metrics: Mapping[str, Any]) -> Dict[str, jax.Array]:
    """Turn ``Mean`` pairs into values; everything else passes through."""
    return {k: (v.value if isinstance(v, Mean) else jnp.asarray(v)) for k, v in metrics.items()}


def is_mean(x: Any) -> bool:
    return isinstance(x, Mean)


__all__ = [
    "AGGREGATION_MODES",
    "Mean",
    "aggregate",
    "finalize_metrics",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "mean_metric",
    "merge_metrics",
]
