"""Importance ratios between the current policy and the policy that produced the samples.

All functions take per-token log-probs ``[B, T]`` of the sampled tokens and return *log* ratios;
exponentiate with :func:`safe_exp` (which clamps first). The "old" log-probs are data: they are
wrapped in ``jax.lax.stop_gradient`` here, so ``jax.grad`` w.r.t. ``logps`` is the paper's gradient.

Masked positions are zeroed *before* any arithmetic (select-then-compute), so NaN log-probs under
padding never reach values or gradients.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from trlax.objectives._checks import ArrayLike, Scalar, as_float, as_mask, check_rank, check_same_shape

DEFAULT_LOG_RATIO_CLAMP = 20.0


def _prep(logps, old_logps, mask):
    """Checked float arrays: ``(logps, sg(old_logps) or sg(logps), mask)``, *not* yet masked."""
    logps = as_float(logps, "logps")
    check_rank(logps, 2, "logps")
    mask = as_mask(mask)
    check_same_shape(logps, "logps", mask=mask)
    if old_logps is None:
        old = jax.lax.stop_gradient(logps)
    else:
        old = as_float(old_logps, "old_logps")
        check_same_shape(logps, "logps", old_logps=old)
        old = jax.lax.stop_gradient(old)
    return logps, old, mask


def _masked_diff(logps, old, mask):
    """``where(mask, logps − old, 0)``: one select on the difference (a subtraction's backward pass
    only forwards the cotangent, which the select zeroes under the mask, so NaN / inf under padding
    reach neither the value nor the gradient; one select instead of two also saves a [B, T] pass)."""
    d = logps - old
    return jnp.where(mask, d, jnp.zeros((), d.dtype))


def safe_exp(log_x: ArrayLike, clamp: Optional[Scalar] = DEFAULT_LOG_RATIO_CLAMP) -> jax.Array:
    """``exp(clip(log_x, -clamp, clamp))``: the clamp comes *before* ``exp`` so neither the value nor
    the backward pass can overflow (``0 * inf`` in a backward pass is NaN). ``clamp=None`` disables it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import safe_exp
      >>> print(safe_exp(jnp.array([0.0, 1.0, 1000.0]), clamp=2.0))  # the exponent is clamped to [-2, 2]
      [1.     2.7183 7.3891]
    """
    if clamp is None:
        return jnp.exp(log_x)
    return jnp.exp(jnp.clip(log_x, -clamp, clamp))


def token_log_ratio(
    logps: ArrayLike,
    old_logps: Optional[ArrayLike],
    mask: ArrayLike,
) -> jax.Array:
    """Per-token log importance ratio ``log π_θ(y_t) − sg(log π_old(y_t))`` (PPO, Schulman et al. 2017,
    arXiv 1707.06347, eq. 6; GRPO, arXiv 2402.03300, eq. 3).

    Args:
      logps: ``[B, T]`` current log-probs (differentiable).
      old_logps: ``[B, T]`` log-probs of the sampling ("old") policy, or ``None`` for on-policy
        training, in which case ``sg(logps)`` is used (ratio 1, gradient ``∇ log π``, as TRL).
      mask: ``[B, T]`` completion mask.

    Returns:
      ``[B, T]`` log-ratio, exactly 0 at masked positions.
    """
    return _masked_diff(*_prep(logps, old_logps, mask))


def sequence_log_ratio(
    logps: ArrayLike,
    old_logps: Optional[ArrayLike],
    mask: ArrayLike,
) -> jax.Array:
    """GSPO sequence-level log ratio: the length-normalised (geometric-mean) ratio
    ``log s_i = (1/|y_i|) Σ_t (log π_θ − sg(log π_old))`` (Zheng et al. 2025, arXiv 2507.18071, eq. 7).

    Returns:
      ``[B, 1]``; 0 for rows with an empty mask.
    """
    logps, old, mask = _prep(logps, old_logps, mask)
    d = _masked_diff(logps, old, mask)
    # same expression as aggregate()'s row lengths, so XLA computes the count once
    length = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True).astype(d.dtype), 1)
    return jnp.sum(d, axis=-1, keepdims=True) / length


def gspo_token_log_ratio(
    logps: ArrayLike,
    old_logps: Optional[ArrayLike],
    mask: ArrayLike,
) -> jax.Array:
    """GSPO-token log ratio ``log s_{i,t} = log π_θ(y_t) − sg(log π_θ(y_t)) + sg(log s_i)``
    (arXiv 2507.18071, eq. 13).

    Its value equals the sequence ratio ``log s_i`` at every token, but its gradient is the per-token
    ``∇ log π_θ(y_t)``, so per-token advantages can be used. With a per-sequence advantage it equals
    GSPO. Returns ``[B, T]`` (0 at masked positions).
    """
    lp, _, mask = _prep(logps, old_logps, mask)
    seq = sequence_log_ratio(logps, old_logps, mask)
    out = _masked_diff(lp, jax.lax.stop_gradient(lp), mask) + jax.lax.stop_gradient(seq)
    return jnp.where(mask, out, jnp.zeros((), out.dtype))


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")


def importance_log_ratio(
    logps: ArrayLike,
    old_logps: Optional[ArrayLike],
    mask: ArrayLike,
    level: str = "token",
) -> jax.Array:
    """Dispatch on ``level``: ``token`` -> ``[B, T]``, ``sequence`` (GSPO) -> ``[B, 1]``,
    ``sequence_token`` (GSPO-token) -> ``[B, T]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import importance_log_ratio
      >>> logps = jnp.array([[-1.0, -2.0, -0.5]])
      >>> old = jnp.array([[-1.5, -2.0, -0.5]])
      >>> mask = jnp.array([[1, 1, 0]], bool)
      >>> print(importance_log_ratio(logps, old, mask, "token"))
      [[0.5 0.  0. ]]
      >>> print(importance_log_ratio(logps, old, mask, "sequence"))  # GSPO: the masked token mean, [B, 1]
      [[0.25]]
    """
    if level == "token":
        return token_log_ratio(logps, old_logps, mask)
    if level == "sequence":
        return sequence_log_ratio(logps, old_logps, mask)
    if level == "sequence_token":
        return gspo_token_log_ratio(logps, old_logps, mask)
    raise ValueError(f"level={level!r} is not allowed; allowed values: "
                     f"{', '.join(map(repr, IMPORTANCE_SAMPLING_LEVELS))}")


__all__ = [
    "DEFAULT_LOG_RATIO_CLAMP",
    "IMPORTANCE_SAMPLING_LEVELS",
    "gspo_token_log_ratio",
    "importance_log_ratio",
    "safe_exp",
    "sequence_log_ratio",
    "token_log_ratio",
]
