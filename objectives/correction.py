"""Sampler–trainer mismatch corrections and off-policy masks.

The sampler (vLLM, or trlax's own jit sampler in bf16) and the trainer compute slightly different
log-probs for the same tokens. These functions turn the sampler's log-probs into importance weights
or masks. All outputs are stop-gradient constants (they change the sampling measure, not the
objective).

- :func:`sampler_importance_weights` — truncated / masked importance sampling (TIS / MIS-IcePop) at
  token or sequence level, TRL's ``vllm_importance_sampling_mode`` (Yao et al. 2025, "Your efficient
  RL framework secretly brings you off-policy RL training"; IcePop, arXiv 2510.18855).
- :func:`off_policy_sequence_mask` — DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556,
  eq. 9).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from trlax.objectives._checks import as_float, as_mask, check_choice, check_rank, check_same_shape

SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_sg = jax.lax.stop_gradient


def sampler_log_ratio(old_logps: jnp.ndarray, sampler_logps: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """``log ρ_t = log π_old(y_t) − log π_sampler(y_t)`` ``[B, T]``, 0 under the mask and wherever the
    sampler log-prob is NaN ("the sampler could not score this token": no correction), as TRL."""
    old = _sg(as_float(old_logps, "old_logps"))
    samp = _sg(as_float(sampler_logps, "sampler_logps"))
    mask = as_mask(mask)
    check_rank(old, 2, "old_logps")
    check_same_shape(old, "old_logps", sampler_logps=samp, mask=mask)
    ok = mask & ~jnp.isnan(samp) & ~jnp.isnan(old)
    zero = jnp.zeros((), jnp.result_type(old.dtype, samp.dtype))
    return jnp.where(ok, jnp.where(ok, old, zero) - jnp.where(ok, samp, zero), zero)


def sampler_importance_weights(
    old_logps: jnp.ndarray,
    sampler_logps: jnp.ndarray,
    mask: jnp.ndarray,
    mode: str = "sequence_mask",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
    log_clamp: Optional[float] = 20.0,
) -> jnp.ndarray:
    """Importance weights ``ρ`` correcting for the sampler–trainer mismatch (TRL's vLLM IS correction).

    ``token_*``: ``ρ_t = exp(log ρ_t)`` ``[B, T]``. ``sequence_*``: ``ρ_i = exp(Σ_t log ρ_t)`` ``[B, 1]``
    (the product of token ratios, *not* length-normalised — TRL issue #5814). ``*_truncate`` clamps
    ``ρ`` to ``[clip_min, clip_max]`` (truncated IS, Ionides 2008; arXiv 1606.02647); ``*_mask``
    sets ``ρ = 0`` outside ``[clip_min, clip_max]`` (masked IS / IcePop). ``None`` leaves a side open.

    The log-ratio is clamped to ``±log_clamp`` before ``exp`` (TRL does not clamp; the result only
    differs when TRL's would overflow to ``inf``). Returns a stop-gradient array.
    """
    check_choice("mode", mode, SAMPLER_CORRECTION_MODES)
    if clip_min is None and clip_max is None:
        raise ValueError("clip_min and clip_max are both None; at least one bound is required")
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"clip_min={clip_min} must be <= clip_max={clip_max}")
    d = sampler_log_ratio(old_logps, sampler_logps, mask)
    if mode.startswith("sequence"):
        d = jnp.sum(d, axis=-1, keepdims=True)
    if log_clamp is not None:
        d = jnp.clip(d, -log_clamp, log_clamp)
    rho = jnp.exp(d)
    lo = -jnp.inf if clip_min is None else clip_min
    hi = jnp.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        rho = jnp.clip(rho, lo, hi)
    else:
        rho = jnp.where((rho < lo) | (rho > hi), jnp.zeros((), rho.dtype), rho)
    return _sg(rho)


def off_policy_sequence_mask(
    advantages: jnp.ndarray,
    logps: jnp.ndarray,
    behaviour_logps: jnp.ndarray,
    mask: jnp.ndarray,
    threshold: float,
) -> jnp.ndarray:
    """DeepSeek-V3.2 off-policy sequence mask (OPSM, arXiv 2512.02556, eq. 9).

    Drop a sequence when its advantage is negative *and* the policy has drifted from the behaviour
    policy: ``M_i = 1[A_i ≥ 0  or  (1/|y_i|) Σ_t (log π_behav − sg(log π_θ)) ≤ δ]``. NaN behaviour
    log-probs count as zero drift (as TRL 1.16).

    Args:
      advantages: ``[B]``, ``[B, 1]`` (or ``[B, T]``: the first column is used).
      logps: ``[B, T]`` current log-probs (stop-gradient here).
      behaviour_logps: ``[B, T]`` sampler log-probs, or old log-probs when there is no sampler.
      mask: ``[B, T]``.
      threshold: δ.

    Returns:
      ``[B, 1]`` float mask (1 keep, 0 drop), stop-gradient.
    """
    logps = _sg(as_float(logps, "logps"))
    beh = _sg(as_float(behaviour_logps, "behaviour_logps"))
    mask = as_mask(mask)
    check_rank(logps, 2, "logps")
    check_same_shape(logps, "logps", behaviour_logps=beh, mask=mask)
    B, T = logps.shape
    if jnp.shape(advantages) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"`advantages` must have shape ({B},), ({B}, 1) or ({B}, {T}), "
                         f"got {tuple(jnp.shape(advantages))}")
    ok = mask & ~jnp.isnan(beh) & ~jnp.isnan(logps)
    zero = jnp.zeros((), logps.dtype)
    kl = jnp.where(ok, jnp.where(ok, beh, zero) - jnp.where(ok, logps, zero), zero)
    avg = jnp.sum(kl, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    adv = jnp.asarray(advantages)
    adv = adv[:, None] if adv.ndim == 1 else adv[:, :1]
    return ((adv >= 0) | (avg <= threshold)).astype(logps.dtype)


__all__ = [
    "SAMPLER_CORRECTION_MODES",
    "off_policy_sequence_mask",
    "sampler_importance_weights",
    "sampler_log_ratio",
]
