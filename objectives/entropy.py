"""Token selection by entropy, entropy bonus, and truncated-completion masks."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from trlax.objectives._checks import (
    ArrayLike,
    Scalar,
    as_float,
    as_mask,
    check_range,
    check_rank,
    check_same_shape,
)
from trlax.objectives.aggregation import masked_mean


def entropy_threshold(entropies: ArrayLike, mask: ArrayLike, top_quantile: Scalar) -> jax.Array:
    """The ``1 − ρ`` quantile (linear interpolation, as ``torch.quantile``) of the entropies of the
    valid tokens, for a top-``ρ`` high-entropy mask. NaN when no token is valid.

    For a global threshold across devices, gather the valid entropies first (or pass a precomputed
    threshold to :func:`high_entropy_mask`)."""
    check_range("top_quantile", top_quantile, low=0.0, high=1.0)
    ent = as_float(entropies, "entropies")
    mask = as_mask(mask)
    check_same_shape(ent, "entropies", mask=mask)
    vals = jnp.where(mask, ent, jnp.nan).reshape(-1)
    return jnp.nanquantile(vals, 1.0 - top_quantile, method="linear")


def high_entropy_mask(
    entropies: ArrayLike,
    mask: ArrayLike,
    top_quantile: Scalar = 0.2,
    threshold: Optional[ArrayLike] = None,
) -> jax.Array:
    """Keep only the top-``ρ`` highest-entropy tokens ("Beyond the 80/20 rule", Wang et al. 2025,
    arXiv 2506.01939, eq. 3; TRL ``top_entropy_quantile``).

    Returns a ``[B, T]`` bool mask: ``H_t ≥ threshold`` and ``mask_t``. All-False for an empty mask.
    ``threshold`` overrides the local quantile (use a globally gathered one across devices).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import high_entropy_mask
      >>> ent = jnp.array([[0.1, 2.0, 0.3, 1.5, 0.2]])
      >>> print(high_entropy_mask(ent, jnp.ones((1, 5), bool), top_quantile=0.4))  # the top 40% of tokens by entropy
      [[False  True False  True False]]
    """
    ent = as_float(entropies, "entropies")
    mask = as_mask(mask)
    check_same_shape(ent, "entropies", mask=mask)
    if threshold is not None and jnp.ndim(threshold) != 0:
        raise ValueError(f"`threshold` must be a scalar, got shape {tuple(jnp.shape(threshold))}")
    thr = entropy_threshold(ent, mask, top_quantile) if threshold is None else jnp.asarray(threshold)
    keep = jnp.where(mask, ent, 0.0) >= thr  # NaN threshold (empty mask) -> all False
    return keep & mask


def entropy_bonus(entropies: ArrayLike, mask: ArrayLike, num_items: Optional[ArrayLike] = None) -> jax.Array:
    """Mean entropy over the (effective) mask, ``Σ H m / max(Σ m, 1)``; subtract ``coef ×`` this from the
    loss to encourage exploration (Skywork-OR1, arXiv 2505.22312, eq. 5). ``num_items`` replaces the
    local count by a global one (micro-batching)."""
    ent = as_float(entropies, "entropies")
    mask = as_mask(mask)
    check_same_shape(ent, "entropies", mask=mask)
    if num_items is None:
        return masked_mean(ent, mask)
    return jnp.sum(jnp.where(mask, ent, 0.0)) / jnp.maximum(jnp.asarray(num_items, ent.dtype), 1)


def is_truncated(
    completion_ids: ArrayLike,
    mask: ArrayLike,
    eos_token_ids: Sequence[int],
    pad_token_id: Optional[int] = None,
) -> jax.Array:
    """``[B]`` bool: the completion did not end with a stop token (its last real token is neither an
    EOS id nor the pad id, as TRL). Empty completions count as truncated."""
    ids = jnp.asarray(completion_ids)
    mask = as_mask(mask)
    check_same_shape(ids, "completion_ids", mask=mask)
    length = jnp.sum(mask, axis=-1)
    # index of the last valid token (completions are right-padded, but this works for any layout)
    pos = jnp.arange(ids.shape[-1])
    last_idx = jnp.max(jnp.where(mask, pos, -1), axis=-1)
    last = jnp.take_along_axis(ids, jnp.maximum(last_idx, 0)[:, None], axis=-1)[:, 0]
    stops = list(eos_token_ids) + ([] if pad_token_id is None else [pad_token_id])
    ended = jnp.isin(last, jnp.asarray(stops, ids.dtype)) if stops else jnp.zeros_like(last, bool)
    return (length == 0) | ~ended


def mask_truncated_completions(mask: ArrayLike, truncated: ArrayLike) -> jax.Array:
    """Zero whole rows of ``mask`` whose completion was truncated (DAPO overlong filtering,
    arXiv 2503.14476 sec. 3.4; TRL ``mask_truncated_completions``)."""
    mask = as_mask(mask)
    check_rank(mask, 2, "mask")
    if jnp.shape(truncated) not in ((mask.shape[0],), (mask.shape[0], 1)):
        raise ValueError(f"`truncated` must have shape ({mask.shape[0]},), got {tuple(jnp.shape(truncated))}")
    truncated = jnp.asarray(truncated).astype(bool).reshape(mask.shape[0], 1)
    return mask & ~truncated


__all__ = [
    "entropy_bonus",
    "entropy_threshold",
    "high_entropy_mask",
    "is_truncated",
    "mask_truncated_completions",
]
