"""Per-token policy-gradient surrogates (losses to *minimise*, no reduction).

Equation numbers are cited where they were checked; otherwise the paper's objective is named.

Inputs broadcast: ``ratio`` is ``[B, T]`` (token level) or ``[B, 1]`` (sequence level),
``advantages`` is ``[B, 1]`` or ``[B, T]``. Advantages are constants: every function wraps them in
``stop_gradient``. Reduce the result with :func:`trlax.objectives.aggregate`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from trlax.objectives._checks import ArrayLike, Scalar, as_float, as_mask, check_choice, check_rank, check_same_shape

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
    ratio: ArrayLike,
    advantages: ArrayLike,
    epsilon_low: Scalar = 0.2,
    epsilon_high: Optional[Scalar] = None,
    delta: Optional[Scalar] = None,
    clip_ratio_c: Optional[Scalar] = None,
) -> jax.Array:
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
      clip_ratio_c: optional dual-clip bound ``c > 1`` (Ye et al. 2019, "Mastering Complex Control in
        MOBA Games", arXiv 1912.09729, dual-clip objective; verl ``clip_ratio_c``, default there 3.0): for ``A < 0``
        the loss is ``min(L, −A·c)``, so a token whose ratio already exceeds ``c`` gets no gradient.

    ``epsilon_low`` / ``epsilon_high`` may also be ``[B, T]`` arrays (per-token clip ranges, e.g.
    :func:`entropy_dependent_epsilon`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import ppo_clip_loss
      >>> ratio = jnp.array([0.5, 1.0, 1.5, 1.5])
      >>> adv = jnp.array([1.0, 1.0, 1.0, -1.0])
      >>> print(ppo_clip_loss(ratio, adv, epsilon_low=0.2))  # -min(r A, clip(r, 0.8, 1.2) A)
      [-0.5 -1.  -1.2  1.5]
    """
    ratio = as_float(ratio, "ratio")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(ratio, "ratio", advantages=adv)
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_h)
    unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
    loss = -jnp.minimum(unclipped * adv, clipped * adv)
    if clip_ratio_c is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * clip_ratio_c), loss)
    return loss


def clip_indicators(
    ratio: ArrayLike,
    advantages: ArrayLike,
    epsilon_low: Scalar,
    epsilon_high: Optional[Scalar] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Where the PPO clip is active: ``(low, high, region)`` booleans (as TRL's ``clip_ratio`` metrics):
    low = ``r < 1−ε_low ∧ A < 0``, high = ``r > 1+ε_high ∧ A > 0``, region = either.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import clip_indicators
      >>> low, high, region = clip_indicators(jnp.array([0.5, 1.0, 1.5]), jnp.array([-1.0, 1.0, 1.0]), 0.2)
      >>> print(low, high, region)
      [ True False False] [False False  True] [ True False  True]
    """
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    ratio = _sg(jnp.asarray(ratio))
    adv = jnp.asarray(advantages)
    _check_broadcast(ratio, "ratio", advantages=adv)
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + eps_h) & (adv > 0)
    return low, high, low | high


def cispo_loss(
    ratio: ArrayLike,
    advantages: ArrayLike,
    logps: ArrayLike,
    epsilon_high: Scalar,
    epsilon_low: Optional[Scalar] = None,
) -> jax.Array:
    """CISPO: ``−sg(clip(r, ·, ε_high)) · A · log π_θ`` (MiniMax-M1, arXiv 2506.13585, eq. 4).

    The clipped IS weight is a stop-gradient constant, so *every* token keeps a REINFORCE gradient
    ``sg(r̂)·A·∇ log π`` (clipped tokens included). Following TRL / ScaleRL, ``epsilon_high`` is an
    **absolute** cap on the ratio (e.g. 5.0), not ``1 + ε``; ``epsilon_low`` is an optional absolute
    floor (the paper uses none).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import cispo_loss
      >>> ratio = jnp.array([0.5, 1.0, 3.0])
      >>> adv = jnp.array([1.0, 1.0, 1.0])
      >>> logps = jnp.array([-1.0, -1.0, -1.0])
      >>> print(cispo_loss(ratio, adv, logps, epsilon_high=2.0))  # -sg(min(r, eps_high)) A log pi (an absolute cap)
      [0.5 1.  2. ]
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
    ratio: ArrayLike,
    advantages: ArrayLike,
    temperature_pos: Scalar = 1.0,
    temperature_neg: Scalar = 1.05,
) -> jax.Array:
    """SAPO soft gate ``−(4/τ)·σ(τ(r − 1))·A`` with ``τ = τ_pos`` if ``A > 0`` else ``τ_neg``
    (Soft Adaptive Policy Optimization, arXiv 2511.20347, eq. 6).

    The factor ``4/τ`` makes the gradient ``4σ(1−σ)·r·∇log π`` equal PPO's at ``r = 1``; the gate
    decays smoothly instead of a hard clip. ``A = 0`` uses ``τ_neg`` (as TRL).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import sapo_loss
      >>> print(sapo_loss(jnp.array([1.0, 1.0]), jnp.array([1.0, -1.0])))  # ratio 1: the gate is 4 sigmoid(0) / tau
      [-2.      1.9048]
    """
    ratio = as_float(ratio, "ratio")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(ratio, "ratio", advantages=adv)
    tau = jnp.where(adv > 0, temperature_pos, temperature_neg).astype(ratio.dtype)
    return -(4.0 / tau) * jax.nn.sigmoid(tau * (ratio - 1.0)) * adv


_LOG_1E8 = math.log(1e-8)  # (a Python float: a JAX op here would start the XLA backend on import)


def vespo_weights(
    log_ratio: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    sampler_log_is: Optional[ArrayLike] = None,
    k_pos: Scalar = 2.0,
    lambda_pos: Scalar = 3.0,
    k_neg: Scalar = 3.0,
    lambda_neg: Scalar = 2.0,
) -> jax.Array:
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


def vespo_loss(phi: ArrayLike, advantages: ArrayLike, logps: ArrayLike) -> jax.Array:
    """VESPO per-token loss ``−φ_i · A · log π_θ(y_t)`` (``φ`` from :func:`vespo_weights`, constant)."""
    logps = as_float(logps, "logps")
    phi = as_float(phi, "phi")
    adv = as_float(advantages, "advantages")
    _check_broadcast(logps, "logps", phi=phi, advantages=adv)
    return -_sg(phi) * _sg(adv) * logps


def luspo_loss(
    ratio: ArrayLike,
    advantages: ArrayLike,
    epsilon_low: Scalar,
    epsilon_high: Optional[Scalar] = None,
    delta: Optional[Scalar] = None,
) -> jax.Array:
    """LUSPO (Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261, eq. 5): the GSPO clipped
    surrogate on the sequence ratio, aggregated with a per-sequence *sum* (``aggregate(mode="luspo")``)
    so each sequence weighs ``|y_i|`` times its loss, removing GSPO's length bias. The per-token loss
    is :func:`ppo_clip_loss`; this alias exists so the recipe is findable by name."""
    return ppo_clip_loss(ratio, advantages, epsilon_low, epsilon_high, delta)


# ------------------------------------------------------------------------------- beyond TRL (issue 3)


def _row_values(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """``[B, 1]`` or ``[B, T]`` -> ``[B, T]`` with masked entries zeroed (select-then-compute)."""
    x = jnp.broadcast_to(x, mask.shape)
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def dual_clip_indicator(
    ratio: ArrayLike,
    advantages: ArrayLike,
    epsilon_low: Scalar,
    epsilon_high: Optional[Scalar] = None,
    clip_ratio_c: Scalar = 3.0,
) -> jax.Array:
    """Where the dual clip (arXiv 1912.09729) is the active branch: ``A < 0`` and
    ``max(r, clip(r, 1−ε_low, 1+ε_high)) > c`` (verl's ``pg_clipfrac_lower``). Boolean, broadcast shape."""
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    ratio = _sg(jnp.asarray(ratio))
    adv = jnp.asarray(advantages)
    _check_broadcast(ratio, "ratio", advantages=adv)
    worst = jnp.maximum(ratio, jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_h))
    return (adv < 0) & (worst > clip_ratio_c)


def reinforce_loss(
    logps: ArrayLike,
    advantages: ArrayLike,
    weights: Optional[ArrayLike] = None,
) -> jax.Array:
    """Plain REINFORCE / GPG per-token loss ``−sg(w)·A·log π_θ(y_t)`` ``[B, T]``.

    Williams 1992 (REINFORCE); Group Policy Gradient (GPG, Chu et al. 2025, arXiv 2504.02546, the GPG objective):
    no ratio, no clipping, old log-probs are not used. ``weights`` (e.g. truncated IS weights, verl's
    bypass ``reinforce``) are stop-gradient constants; omit them for on-policy data.

    Args:
      logps: ``[B, T]`` current log-probs (differentiable).
      advantages: ``[B, 1]`` or ``[B, T]`` (stop-gradient).
      weights: optional ``[B, 1]`` or ``[B, T]`` importance weights (stop-gradient).
    """
    logps = as_float(logps, "logps")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", advantages=adv)
    loss = -adv * logps
    if weights is not None:
        w = _sg(as_float(weights, "weights"))
        _check_broadcast(logps, "logps", weights=w)
        loss = loss * w
    return loss


def gmpo_loss(
    log_ratio: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    epsilon_low: Scalar = 0.4,
    epsilon_high: Optional[Scalar] = None,
    log_ratio_clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """GMPO (Geometric-Mean Policy Optimization, Zhao et al. 2025, arXiv 2507.20673, the GMPO objective) per-sequence
    loss ``[B, 1]``: ``−Ā_i · exp((1/|y_i|) Σ_t δ̃_t)``.

    Token clipping is in *log* space and sign-aware: with ``σ = sign(A)``,
    ``δ̃_t = σ·min(σ·δ_t, σ·clip(δ_t, −ε_low, ε_high))`` (the geometric mean of the PPO-style
    clipped token ratios, ``|ρ_t A|`` clipped to ``(e^{−ε_low}, e^{ε_high})``); ``Ā_i`` is the
    mean advantage over the valid tokens (outcome advantages). Empty rows give 0. The paper uses
    ``ε = 0.4`` (ratio range ``(e^{−0.4}, e^{0.4})``). Reduce with ``aggregate(mode="grpo")``
    (a plain mean over sequences, as the paper and verl's ``geo_mean``).

    The mean log-ratio is clamped to ``±log_ratio_clamp`` before ``exp`` (verl does not clamp; the
    values differ only where verl's would overflow).

    Args:
      log_ratio: ``[B, T]`` token log-ratios ``log π_θ − sg(log π_old)`` (differentiable).
      advantages: ``[B, 1]`` or ``[B, T]`` (stop-gradient).
      mask: ``[B, T]``.
      epsilon_low, epsilon_high: log-space clip (``None`` -> ``epsilon_low``).
    """
    log_ratio = as_float(log_ratio, "log_ratio")
    check_rank(log_ratio, 2, "log_ratio")
    mask = as_mask(mask)
    check_same_shape(log_ratio, "log_ratio", mask=mask)
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(log_ratio, "log_ratio", advantages=adv)
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    zero = jnp.zeros((), log_ratio.dtype)
    d = jnp.where(mask, log_ratio, zero)
    a_tok = _row_values(adv, mask)
    sgn = jnp.sign(a_tok)
    d_clip = sgn * jnp.minimum(sgn * d, sgn * jnp.clip(d, -epsilon_low, eps_h))
    length = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(d.dtype)
    seq = jnp.sum(jnp.where(mask, d_clip, zero), axis=-1, keepdims=True) / length
    if log_ratio_clamp is not None:
        seq = jnp.clip(seq, -log_ratio_clamp, log_ratio_clamp)
    adv_seq = jnp.sum(a_tok, axis=-1, keepdims=True) / length
    return -adv_seq * jnp.exp(seq)


def gmpo_clip_indicators(
    log_ratio: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    epsilon_low: Scalar = 0.4,
    epsilon_high: Optional[Scalar] = None,
) -> Tuple[jax.Array, jax.Array]:
    """Where GMPO's log-space clip (arXiv 2507.20673) is active, ``(high, low)`` ``[B, T]`` booleans:
    high = ``δ > ε_high ∧ A > 0``, low = ``δ < −ε_low ∧ A < 0`` (TRL ``GMPOTrainer``'s
    ``clip_ratio/high_mean`` / ``low_mean``; verl's ``pg_clipfrac`` also counts out-of-range tokens
    whose clip is inactive). Masked positions are False."""
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    mask = as_mask(mask)
    d = _sg(jnp.where(mask, jnp.asarray(log_ratio), 0.0))
    a = _row_values(jnp.asarray(advantages), mask)
    return mask & (d > eps_h) & (a > 0), mask & (d < -epsilon_low) & (a < 0)


def covariance_scores(advantages: ArrayLike, logps: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Per-token centred cross term ``cov_t = (A_t − Ā)(log π_t − mean log π)`` ``[B, T]`` (means over
    the valid tokens of the batch), the covariance proxy of Cui et al. 2025 ("The Entropy Mechanism of
    RL for Reasoning LMs", arXiv 2505.22617, the token-level covariance). Stop-gradient; 0 at masked positions."""
    logps = _sg(as_float(logps, "logps"))
    check_rank(logps, 2, "logps")
    mask = as_mask(mask)
    check_same_shape(logps, "logps", mask=mask)
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", advantages=adv)
    zero = jnp.zeros((), logps.dtype)
    a = _row_values(adv, mask).astype(logps.dtype)
    lp = jnp.where(mask, logps, zero)
    n = jnp.maximum(jnp.sum(mask), 1).astype(logps.dtype)
    cov = (a - jnp.sum(a) / n) * (lp - jnp.sum(lp) / n)
    return jnp.where(mask, cov, zero)


def _num_selected(mask: jax.Array, fraction: Scalar, dtype) -> jax.Array:
    """``max(⌊fraction · N_valid⌋, 1)`` (in ``dtype``; verl's ``max(int(ratio * N), 1)``)."""
    n = jnp.sum(mask).astype(dtype)
    return jnp.maximum(jnp.floor(n * fraction), 1.0)


def _ranks(score: jnp.ndarray) -> jnp.ndarray:
    """Rank of every element of ``score`` in ascending order (stable: ties by flat index)."""
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32)).reshape(score.shape)


def clip_cov_mask(
    cov: ArrayLike,
    mask: ArrayLike,
    ppo_clipped: ArrayLike,
    key: jax.Array,
    clip_cov_ratio: Scalar = 2e-4,
    clip_cov_lb: Scalar = 1.0,
    clip_cov_ub: Scalar = 5.0,
) -> jax.Array:
    """Clip-Cov token selection (arXiv 2505.22617, Clip-Cov): among valid tokens not already
    clipped by PPO with ``lb < cov_t < ub``, pick ``min(max(⌊r·N⌋, 1), #candidates)`` uniformly at
    random (``N`` = valid tokens of the batch); their gradient is then detached. Returns ``[B, T]`` bool.

    The random subset is drawn with ``key`` (a ``jax.random`` key): uniform draws per token, the
    candidates with the smallest draws are kept — every subset of that size is equally likely.
    The selection runs over *this call's* batch (a micro-batch selects from its own tokens, as verl).
    """
    cov = _sg(jnp.asarray(cov))
    mask = as_mask(mask)
    check_same_shape(cov, "cov", mask=mask, ppo_clipped=ppo_clipped)
    cand = mask & ~jnp.asarray(ppo_clipped, bool) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    u = jax.random.uniform(key, cov.shape, dtype=jnp.float32)
    rank = _ranks(jnp.where(cand, u, 2.0))
    k = _num_selected(mask, clip_cov_ratio, jnp.float32 if cov.dtype != jnp.float64 else cov.dtype)
    return cand & (rank.astype(k.dtype) < k)


def kl_cov_mask(cov: ArrayLike, mask: ArrayLike, kl_cov_ratio: Scalar = 2e-4) -> jax.Array:
    """KL-Cov token selection (arXiv 2505.22617, KL-Cov): the ``max(⌊r·N⌋, 1)`` valid tokens with
    the largest ``cov_t`` (ties: lower flat index first). Deterministic. ``[B, T]`` bool."""
    cov = _sg(jnp.asarray(cov))
    mask = as_mask(mask)
    check_same_shape(cov, "cov", mask=mask)
    rank = _ranks(jnp.where(mask, -cov, jnp.inf))
    k = _num_selected(mask, kl_cov_ratio, cov.dtype if jnp.issubdtype(cov.dtype, jnp.floating) else jnp.float32)
    return mask & (rank.astype(k.dtype) < k)


def clip_cov_loss(
    ratio: ArrayLike,
    advantages: ArrayLike,
    selected: ArrayLike,
    epsilon_low: Scalar = 0.2,
    epsilon_high: Optional[Scalar] = None,
) -> jax.Array:
    """Clip-Cov per-token loss (arXiv 2505.22617, Clip-Cov objective): the PPO clipped surrogate, set to 0 (value
    and gradient) at the tokens of :func:`clip_cov_mask`. ``[B, T]``."""
    loss = ppo_clip_loss(ratio, advantages, epsilon_low, epsilon_high)
    sel = jnp.asarray(selected, bool)
    return jnp.where(sel, jnp.zeros((), loss.dtype), loss)


def kl_cov_loss(
    ratio: ArrayLike,
    log_ratio: ArrayLike,
    advantages: ArrayLike,
    selected: ArrayLike,
    kl_coef: Scalar = 1.0,
) -> jax.Array:
    """KL-Cov per-token loss (arXiv 2505.22617, KL-Cov objective): unclipped ``−A·r``, plus
    ``kl_coef·|log π_θ − log π_old|`` at the tokens of :func:`kl_cov_mask` (gradient
    ``kl_coef·sign(δ)``, 0 at ``δ = 0``). ``[B, T]``."""
    ratio = as_float(ratio, "ratio")
    log_ratio = as_float(log_ratio, "log_ratio")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(ratio, "ratio", advantages=adv, log_ratio=log_ratio)
    sel = jnp.asarray(selected, bool)
    d = jnp.where(sel, log_ratio, 0.0)
    # |δ| with the subgradient sign(δ) (0 at δ = 0, as torch's abs), not JAX's 1 at 0
    pen = jnp.where(sel, kl_coef * _sg(jnp.sign(d)) * d, 0.0)
    return -adv * ratio + pen


def aspo_loss(
    ratio: ArrayLike,
    advantages: ArrayLike,
    logps: ArrayLike,
    epsilon_low: Scalar = 0.2,
    epsilon_high: Optional[Scalar] = None,
    negative_clip_ratio_c: Scalar = 3.0,
    positive_clip_ratio_c: Scalar = 3.0,
) -> jax.Array:
    """ASPO (Asymmetric Importance Sampling Policy Optimization, arXiv 2510.06062, the ASPO objective) ``[B, T]``.

    ``A < 0``: ``r_c = max(r, 1−ε_low)``; loss ``−A·r_c``, but where ``r_c > c_neg`` the soft dual clip
    ``−A·c_neg·log π_θ`` (gradient ``−A·c_neg·∇log π``, not zero as in hard dual clip).
    ``A ≥ 0``: ``r_c = min(r, 1+ε_high)`` with the *flipped* IS weight: loss
    ``−A·(r_c/sg(r_c))/sg(r_c)`` (value ``−A/r_c``, gradient ``−(A/r)·∇log π`` inside the clip, i.e.
    weight ``π_old/π_θ``); where ``1/r_c > c_pos`` it becomes ``−A·c_pos·log π_θ``.
    Clipped branches carry no gradient. ``epsilon_*`` may be ``[B, T]`` arrays (entropy-dependent clip).
    """
    ratio = as_float(ratio, "ratio")
    logps = as_float(logps, "logps")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", ratio=ratio, advantages=adv)
    eps_h = epsilon_low if epsilon_high is None else epsilon_high
    neg_rc = jnp.maximum(ratio, 1.0 - epsilon_low)
    neg_dual = neg_rc > negative_clip_ratio_c
    neg_loss = jnp.where(neg_dual, -adv * negative_clip_ratio_c * logps, -adv * neg_rc)
    pos_rc = jnp.minimum(ratio, 1.0 + eps_h)
    pos_rc_c = _sg(pos_rc)
    pos_dual = 1.0 / pos_rc_c > positive_clip_ratio_c
    safe = jnp.where(pos_dual, jnp.ones((), pos_rc.dtype), pos_rc)
    safe_c = _sg(safe)
    pos_loss = jnp.where(pos_dual, -adv * positive_clip_ratio_c * logps, -adv * (safe / safe_c) / safe_c)
    return jnp.where(adv < 0, neg_loss, pos_loss)


def topr_loss(
    ratio: ArrayLike,
    advantages: ArrayLike,
    logps: ArrayLike,
    positive_weight: Scalar = 1.0,
    negative_weight: Scalar = 1.0,
) -> jax.Array:
    """TOPR (Tapered Off-Policy REINFORCE, Le Roux et al. 2025, arXiv 2503.14286, the TOPR gradient) ``[B, T]``:
    ``A ≥ 0``: ``−w₊·A·log π_θ`` (SFT-like, no IS); ``A < 0``: ``−w₋·sg(clip(r, 0, 1))·A·log π_θ``.

    ``ratio`` may be the paper's trajectory ratio ``π(τ)/μ(τ)`` (``[B, 1]``; product of token ratios)
    or ROLL's per-token ratio (``[B, T]``). ``w₊, w₋`` are ROLL's ``topr_positive/negative_weight``.
    """
    ratio = as_float(ratio, "ratio")
    logps = as_float(logps, "logps")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", ratio=ratio, advantages=adv)
    trunc = _sg(jnp.clip(ratio, 0.0, 1.0))
    return jnp.where(adv >= 0, -positive_weight * adv * logps, -negative_weight * trunc * adv * logps)


DPPO_DIVERGENCES = ("binary_tv", "binary_kl")


def dppo_mask(
    logps: ArrayLike,
    behaviour_logps: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    delta_low: Scalar = 0.2,
    delta_high: Scalar = 0.2,
    divergence: str = "binary_tv",
) -> jax.Array:
    """DPPO trust-region mask (Divergence PPO, arXiv 2602.04879, binary-TV / binary-KL) ``[B, T]`` bool, stop-gradient.

    With ``π = exp(log π_θ)``, ``μ = exp(log μ)`` the behaviour (old / sampler) probability of the token:

    - ``binary_tv``: drop if ``A > 0 ∧ π − μ > δ_high`` or ``A ≤ 0 ∧ μ − π > δ_low``;
    - ``binary_kl``: ``D = μ log(μ/π) + (1−μ) log((1−μ+1e-8)/(1−π+1e-8))`` (Bernoulli KL of the token
      event, verl's ``dppo_kl``); drop if ``A > 0 ∧ π > μ ∧ D > δ_high`` or
      ``A ≤ 0 ∧ π < μ ∧ D > δ_low``.

    Log-probs are clamped to ``≤ 0`` first (so ``π, μ ≤ 1``). Masked positions are False.
    """
    check_choice("divergence", divergence, DPPO_DIVERGENCES)
    logps = _sg(as_float(logps, "logps"))
    check_rank(logps, 2, "logps")
    beh = _sg(as_float(behaviour_logps, "behaviour_logps"))
    mask = as_mask(mask)
    check_same_shape(logps, "logps", behaviour_logps=beh, mask=mask)
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", advantages=adv)
    zero = jnp.zeros((), logps.dtype)
    # positive log-prob artifacts (bf16 / sampler numerics, survey 4.4) are clamped to 0: probabilities <= 1
    lp = jnp.minimum(jnp.where(mask, logps, zero), 0.0)
    lb = jnp.minimum(jnp.where(mask, beh, zero), 0.0)
    p, mu = jnp.exp(lp), jnp.exp(lb)
    pos = jnp.broadcast_to(adv > 0, mask.shape)
    if divergence == "binary_tv":
        ok = jnp.where(pos, p - mu <= delta_high, p - mu >= -delta_low)
    else:
        d = mu * (lb - lp) + (1.0 - mu) * (jnp.log(1.0 - mu + 1e-8) - jnp.log(1.0 - p + 1e-8))
        ok = jnp.where(pos, (d <= delta_high) | (p <= mu), (d <= delta_low) | (p >= mu))
    return mask & ok


def dppo_loss(
    ratio: ArrayLike,
    advantages: ArrayLike,
    logps: ArrayLike,
    keep: ArrayLike,
    ratio_cap: Optional[Scalar] = 20.0,
) -> jax.Array:
    """DPPO per-token loss (arXiv 2602.04879; sec. 5.4 for the cap) ``[B, T]``:
    ``−sg(min(r, cap))·A·log π_θ`` at tokens kept by :func:`dppo_mask`, 0 elsewhere. Its gradient
    equals that of ``−r·A`` (prime-rl / SkyRL form) wherever ``r < cap``."""
    ratio = as_float(ratio, "ratio")
    logps = as_float(logps, "logps")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(logps, "logps", ratio=ratio, advantages=adv)
    w = ratio if ratio_cap is None else jnp.minimum(ratio, ratio_cap)
    loss = -_sg(w) * adv * logps
    return jnp.where(jnp.asarray(keep, bool), loss, jnp.zeros((), loss.dtype))


def m2po_mask(log_ratio: ArrayLike, mask: ArrayLike, threshold: Scalar = 0.04) -> jax.Array:
    """M2PO second-moment trust mask (Zheng et al. 2025, "Prosperity before Collapse", arXiv 2510.01161,
    second-moment mask; AReaL ``m2_threshold``) ``[B, T]`` bool keep-mask, stop-gradient.

    ``m2_t = (log π_a − log π_b)²`` over the valid tokens; the tokens with the largest ``m2`` are
    masked, largest first, until the mean of the remaining ``m2`` is below ``threshold`` (ties: lower
    flat index masked first). An empty mask keeps nothing.
    """
    lr = _sg(as_float(log_ratio, "log_ratio"))
    check_rank(lr, 2, "log_ratio")
    mask = as_mask(mask)
    check_same_shape(lr, "log_ratio", mask=mask)
    zero = jnp.zeros((), lr.dtype)
    m2 = jnp.where(mask, jnp.square(jnp.where(mask, lr, zero)), zero)
    n = jnp.sum(mask)
    rank = _ranks(jnp.where(mask, -m2, jnp.inf))  # rank 0 = largest m2
    flat = m2.reshape(-1)
    order = jnp.argsort(jnp.where(mask, -m2, jnp.inf).reshape(-1), stable=True)
    sorted_m2 = flat[order]
    total = jnp.sum(flat)
    removed = jnp.concatenate([jnp.zeros((1,), lr.dtype), jnp.cumsum(sorted_m2)])  # removed[j]: j largest gone
    j = jnp.arange(flat.size + 1)
    remaining = (n - j).astype(lr.dtype)
    mean_rest = (total - removed) / jnp.maximum(remaining, 1)
    ok = (mean_rest < threshold) | (j >= n)
    n_drop = jnp.argmax(ok)  # first j where the rest satisfies the bound
    return mask & (rank >= n_drop)


def m2po_loss(ratio: ArrayLike, advantages: ArrayLike, keep: ArrayLike) -> jax.Array:
    """M2PO per-token loss (arXiv 2510.01161, the M2PO objective): unclipped ``−M_t·r·A`` with ``M`` from
    :func:`m2po_mask` (the second-moment mask replaces PPO clipping). Reduce with a token mean."""
    ratio = as_float(ratio, "ratio")
    adv = _sg(as_float(advantages, "advantages"))
    _check_broadcast(ratio, "ratio", advantages=adv)
    loss = -adv * ratio
    return jnp.where(jnp.asarray(keep, bool), loss, jnp.zeros((), loss.dtype))


def squared_log_ratio_penalty(log_ratio: ArrayLike, coef: Scalar) -> jax.Array:
    """Kimi's squared log-ratio regulariser ``coef·(log π_θ − log π_old)²`` ``[B, T]``.

    Kimi k1.5 (arXiv 2501.12599, eq. 3) uses ``τ/2·(log π_θ/π_old)²`` next to ``−A·log π_θ``
    (ROLL ``kimi15_tau``, so ``coef = τ/2``); Kimi K2.5 (arXiv 2602.02276) / prime-rl use
    ``kl_tau·(log π_θ − log π_inf)²`` next to ``−A·r``. Gradient ``2·coef·δ·∇log π``.
    """
    lr = as_float(log_ratio, "log_ratio")
    return coef * lr * lr


def kimi_loss(logps: ArrayLike, log_ratio: ArrayLike, advantages: ArrayLike, tau: Scalar = 0.1) -> jax.Array:
    """Kimi k1.5 per-token loss (arXiv 2501.12599, eq. 3): ``−A·log π_θ + τ/2·(log π_θ − log π_old)²``."""
    return reinforce_loss(logps, advantages) + squared_log_ratio_penalty(log_ratio, 0.5 * tau)


def force_on_policy_log_ratio(logps: ArrayLike, mask: Optional[ArrayLike] = None) -> jax.Array:
    """``log π_θ − sg(log π_θ)``: value 0 (ratio 1), gradient ``∇log π_θ`` — the ratio of an exactly
    on-policy step whatever the old log-probs (NeMo-RL ``force_on_policy_ratio``; PPO at ``r = 1``,
    arXiv 1707.06347). ``[B, T]``, 0 at masked positions."""
    logps = as_float(logps, "logps")
    if mask is not None:
        mask = as_mask(mask)
        check_same_shape(logps, "logps", mask=mask)
        logps = jnp.where(mask, logps, jnp.zeros((), logps.dtype))
    return logps - _sg(logps)


def entropy_dependent_epsilon(
    entropies: ArrayLike,
    mask: ArrayLike,
    low_entropy_epsilon: Scalar = 0.2,
    high_entropy_epsilon: Scalar = 0.4,
    quantile: Scalar = 0.8,
) -> Tuple[jax.Array, jax.Array]:
    """Per-token clip range by entropy (Archer, "Stabilizing Knowledge, Promoting Reasoning",
    arXiv 2507.15778, dual-token constraints): tokens whose entropy is above the row's ``quantile`` (linear
    interpolation over the row's valid tokens, as ``torch.nanquantile``) are high-entropy "forking"
    tokens and get the wider ``high_entropy_epsilon``; the others ``low_entropy_epsilon``.

    Returns ``(epsilon [B, T], high_entropy [B, T] bool)``. Stop-gradient. Empty rows: all low.
    """
    ent = _sg(as_float(entropies, "entropies"))
    check_rank(ent, 2, "entropies")
    mask = as_mask(mask)
    check_same_shape(ent, "entropies", mask=mask)
    n = jnp.sum(mask, axis=-1, keepdims=True)
    srt = jnp.sort(jnp.where(mask, ent, jnp.inf), axis=-1)
    pos = quantile * jnp.maximum(n - 1, 0).astype(ent.dtype)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0)).astype(jnp.int32)
    v_lo = jnp.take_along_axis(srt, lo, axis=-1)
    v_hi = jnp.take_along_axis(srt, hi, axis=-1)
    v_lo = jnp.where(n > 0, v_lo, 0.0)
    v_hi = jnp.where(n > 0, v_hi, 0.0)
    thr = v_lo + (pos - lo.astype(ent.dtype)) * (v_hi - v_lo)
    high = mask & (jnp.where(mask, ent, -jnp.inf) > thr)
    eps = jnp.where(high, high_entropy_epsilon, low_entropy_epsilon).astype(ent.dtype)
    return eps, high


__all__ = [
    "DPPO_DIVERGENCES",
    "aspo_loss",
    "cispo_loss",
    "clip_cov_loss",
    "clip_cov_mask",
    "clip_indicators",
    "covariance_scores",
    "dppo_loss",
    "dppo_mask",
    "dual_clip_indicator",
    "entropy_dependent_epsilon",
    "force_on_policy_log_ratio",
    "gmpo_clip_indicators",
    "gmpo_loss",
    "kimi_loss",
    "kl_cov_loss",
    "kl_cov_mask",
    "luspo_loss",
    "m2po_loss",
    "m2po_mask",
    "ppo_clip_loss",
    "reinforce_loss",
    "sapo_loss",
    "squared_log_ratio_penalty",
    "topr_loss",
    "vespo_loss",
    "vespo_weights",
]
