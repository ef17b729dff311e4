"""Per-token policy-gradient surrogates (losses to *minimise*, no reduction).

Inputs broadcast: ``ratio`` is ``[B, T]`` (token level) or ``[B, 1]`` (sequence level),
``advantages`` is ``[B, 1]`` or ``[B, T]``. Advantages are constants: every function wraps them in
``stop_gradient``. Reduce the result with :func:`trlax.objectives.aggregate`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from trlax.objectives._checks import as_float, as_mask, check_rank, check_same_shape

_sg = jax.lax.stop_gradient


def _check_broadcast(ref: jnp.ndarray, ref_name: str, **others: jnp.ndarray) -> None:
    """Per-token / per-sequence operands must have the rank of ``ref`` and broadcast against it
    (``[B, 1]`` against ``[B, T]``); a ``[B]`` advantage against a ``[B, T]`` ratio would broadcast
    along the wrong axis, so it is rejected with the argument's name."""
    for name, arr in others.items():
        ok = arr.ndim == ref.ndim
        if ok:
            try:
                jnp.broadcast_shapes(ref.shape, arr.shape)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"`{name}` with shape {tuple(arr.shape)} does not broadcast against `{ref_name}` "
                             f"{tuple(ref.shape)}; expected [B, 1] or [B, T]")


def ppo_clip_loss(
    ratio: jnp.ndarray,
    advantages: jnp.ndarray,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
) -> jnp.ndarray:
    """Clipped surrogate ``−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)``.

    PPO (Schulman et al. 2017, arXiv 1707.06347, eq. 7) with DAPO's decoupled "clip-higher" bounds
    (Yu et al. 2025, arXiv 2503.14476, eq. 10) and INTELLECT-2's two-sided clip (arXiv 2505.07291,
    sec. 3.3): with ``delta`` the *unclipped* branch is capped, ``r ← min(r, δ)``, so a negative
    advantage cannot push an already large ratio further.

    Args:
      ratio: ``[B, T]`` or ``[B, 1]`` importance ratio ``π_θ/π_old`` (differentiable).
      advantages: ``[B, 1]`` or ``[B, T]`` (stop-gradient applied).
      epsilon_low: lower clip ε_low (ratio floor ``1 − ε_low``).
      epsilon_high: upper clip ε_high (``None`` -> ``epsilon_low``).
      delta: optional two-sided cap on the unclipped ratio (> 1).
    """
    ratio = as_float(ratio, "ratio")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(ratio, "ratio", advantages=adv)
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_h)
    unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
    return -jnp.minimum(unclipped * adv, clipped * adv)


def clip_indicators(
    ratio: jnp.ndarray,
    advantages: jnp.ndarray,
    epsilon_low: float,
    epsilon_high: Optional[float] = None,
):
    """Where the PPO clip is active: ``(low, high, region)`` booleans (as TRL's ``clip_ratio`` metrics):
    low = ``r < 1−ε_low ∧ A < 0``, high = ``r > 1+ε_high ∧ A > 0``, region = either."""
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    ratio = _sg(jnp.asarray(ratio))
    adv = jnp.asarray(advantages)
    _check_broadcast(ratio, "ratio", advantages=adv)
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + eps_h) & (adv > 0)
    return low, high, low | high


def cispo_loss(
    ratio: jnp.ndarray,
    advantages: jnp.ndarray,
    logps: jnp.ndarray,
    epsilon_high: float,
    epsilon_low: Optional[float] = None,
) -> jnp.ndarray:
    """CISPO: ``−sg(clip(r, ·, ε_high)) · A · log π_θ`` (MiniMax-M1, arXiv 2506.13585, eq. 4).

    The clipped IS weight is a stop-gradient constant, so *every* token keeps a REINFORCE gradient
    ``sg(r̂)·A·∇ log π`` (clipped tokens included). Following TRL / ScaleRL, ``epsilon_high`` is an
    **absolute** cap on the ratio (e.g. 5.0), not ``1 + ε``; ``epsilon_low`` is an optional absolute
    floor (the paper uses none).
    """
    ratio = as_float(ratio, "ratio")
    logps = as_float(logps, "logps")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", ratio=ratio, advantages=adv)
    w = jnp.minimum(ratio, epsilon_high)
    if epsilon_low is not None:
        w = jnp.maximum(w, epsilon_low)
    return -_sg(w) * adv * logps


def sapo_loss(
    ratio: jnp.ndarray,
    advantages: jnp.ndarray,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
) -> jnp.ndarray:
    """SAPO soft gate ``−(4/τ)·σ(τ(r − 1))·A`` with ``τ = τ_pos`` if ``A > 0`` else ``τ_neg``
    (Soft Adaptive Policy Optimization, arXiv 2511.20347, eq. 6).

    The factor ``4/τ`` makes the gradient ``4σ(1−σ)·r·∇log π`` equal PPO's at ``r = 1``; the gate
    decays smoothly instead of a hard clip. ``A = 0`` uses ``τ_neg`` (as TRL).
    """
    ratio = as_float(ratio, "ratio")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(ratio, "ratio", advantages=adv)
    tau = jnp.where(adv > 0, temperature_pos, temperature_neg).astype(ratio.dtype)
    return -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv


_LOG_1E8 = float(jnp.log(1e-8))


def vespo_weights(
    log_ratio: jnp.ndarray,
    advantages: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    sampler_log_is: Optional[jnp.ndarray] = None,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> jnp.ndarray:
    """VESPO gamma weights ``φ(w) = e^λ · w^k · e^{−λw}`` on the sequence ratio (arXiv 2602.10693, eq. 9).

    ``log w_i = Σ_t m·clip(log r_t, −20, 20)`` (a *sum*, the true sequence ratio) plus, when a token
    level sampler correction is active, ``Σ_t clip(log ρ_t, log 1e-8, 20)``; then ``log w`` is clipped
    to ``[log 1e-8, 20]``. ``(k, λ) = (k_pos, λ_pos)`` if ``A_i ≥ 0`` else ``(k_neg, λ_neg)``, ``λ ≥ 1e-4``.
    ``φ(1) = 1``. Non-finite weights become 0. The result is a stop-gradient constant ``[B, 1]``.

    Args:
      log_ratio: ``[B, T]`` per-token log ratio (already 0 under the mask).
      advantages: ``[B]``, ``[B, 1]`` (or ``[B, T]``; the first column is used for the sign).
      mask: ``[B, T]``.
      sampler_log_is: optional ``[B, T]`` log of the sampler importance weights ``log ρ_t``.
    """
    log_ratio = _sg(as_float(log_ratio, "log_ratio"))
    check_rank(log_ratio, 2, "log_ratio")
    mask = as_mask(mask)
    check_same_shape(log_ratio, "log_ratio", mask=mask, sampler_log_is=sampler_log_is)
    B, T = log_ratio.shape
    if jnp.shape(advantages) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"`advantages` must have shape ({B},), ({B}, 1) or ({B}, {T}), "
                         f"got {tuple(jnp.shape(advantages))}")
    seq = jnp.sum(jnp.where(mask, jnp.clip(log_ratio, -20.0, 20.0), 0.0), axis=-1, keepdims=True)
    if sampler_log_is is not None:
        lis = _sg(as_float(sampler_log_is, "sampler_log_is"))
        seq = seq + jnp.sum(jnp.clip(lis, _LOG_1E8, 20.0), axis=-1, keepdims=True)
    log_w = jnp.clip(seq, _LOG_1E8, 20.0)
    adv = jnp.asarray(advantages)
    adv = adv[:, :1] if adv.ndim == 2 else adv[:, None]
    nonneg = adv >= 0
    k = jnp.where(nonneg, k_pos, k_neg).astype(log_w.dtype)
    lam = jnp.maximum(jnp.where(nonneg, lambda_pos, lambda_neg), 1e-4).astype(log_w.dtype)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return _sg(jnp.where(jnp.isfinite(phi), phi, 0.0))


def vespo_loss(phi: jnp.ndarray, advantages: jnp.ndarray, logps: jnp.ndarray) -> jnp.ndarray:
    """VESPO per-token loss ``−φ_i · A · log π_θ(y_t)`` (``φ`` from :func:`vespo_weights`, constant)."""
    logps = as_float(logps, "logps")
    phi = as_float(phi, "phi")
    adv = as_float(advantages, "advantages")
    _check_broadcast(logps, "logps", phi=phi, advantages=adv)
    return -_sg(phi) * _sg(adv) * logps


def luspo_loss(
    ratio: jnp.ndarray,
    advantages: jnp.ndarray,
    epsilon_low: float,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
) -> jnp.ndarray:
    """LUSPO (Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261, eq. 5): the GSPO clipped
    surrogate on the sequence ratio, aggregated with a per-sequence *sum* (``aggregate(mode="luspo")``)
    so each sequence weighs ``|y_i|`` times its loss, removing GSPO's length bias. The per-token loss
    is :func:`ppo_clip_loss`; this alias exists so the recipe is findable by name."""
    return ppo_clip_loss(ratio, advantages, epsilon_low, epsilon_high, delta)


__all__ = [
    "cispo_loss",
    "clip_indicators",
    "luspo_loss",
    "ppo_clip_loss",
    "sapo_loss",
    "vespo_loss",
    "vespo_weights",
]
