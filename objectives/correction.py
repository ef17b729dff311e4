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

Rollout correction as composable stages (verl's ``algorithm.rollout_correction``, written from its
documented formulas; Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy RL
training", Liu et al. 2025 "When speed kills stability"; decoupled PPO, Hilton et al. arXiv 2110.00641).
Every stage takes ``log ρ_t = log π_anchor − log π_sampler`` and returns either a keep mask (``[B, T]``
bool, already AND-ed with ``mask``: AND the stages together) or weights (``[B, T]``, 0 under the mask):

- :func:`divergence_rejection_mask` — k1 / k2 / k3 rejection at token / sequence-sum / sequence-mean /
  sequence-max level (verl ``rollout_rs`` options ``token_k*``, ``seq_sum_k*``, ``seq_mean_k*``,
  ``seq_max_k*``). k1 bounds are *ratio* bounds on ``ρ`` (token), ``Π ρ`` (sum) or the geometric mean
  ``(Π ρ)^(1/|y|)`` (mean), compared in log space the right way round (verl's Jan-2026 code compares
  ``−log ρ`` with ``[log lower, log upper]``, inverting asymmetric bounds; objectives-survey 4.8).
- :func:`geometric_sequence_mask` — Geo-RS (``seq_mean_k1``); :func:`token_veto_mask` — drop a sequence
  if any token ratio is below a floor (verl PR #3694 veto).
- :func:`rollout_is_weights` — Token-TIS / Seq-TIS / geometric TIS (upper truncation, optional lower),
  :func:`self_normalized_weights` — self-normalised IS (batch mean 1).
- :func:`rollout_mismatch_metrics` — KL, k3-KL, perplexities and their ratio, χ² (token, sequence), ESS.
- :class:`RolloutCorrectionConfig` + :func:`rollout_correction` — decoupled (π_old anchor) and bypass
  (π_sampler anchor) modes composing the stages above, with verl's named presets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from trlax.objectives._checks import (
    ArrayLike,
    Scalar,
    as_float,
    as_mask,
    check_choice,
    check_order,
    check_range,
    check_rank,
    check_same_shape,
)
from trlax.objectives.aggregation import Mean

SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_sg = jax.lax.stop_gradient


def sampler_log_ratio(old_logps: ArrayLike, sampler_logps: ArrayLike, mask: ArrayLike) -> jax.Array:
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
    old_logps: ArrayLike,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    mode: str = "sequence_mask",
    clip_min: Optional[Scalar] = None,
    clip_max: Optional[Scalar] = 3.0,
    log_clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """Importance weights ``ρ`` correcting for the sampler–trainer mismatch (TRL's vLLM IS correction).

    ``token_*``: ``ρ_t = exp(log ρ_t)`` ``[B, T]``. ``sequence_*``: ``ρ_i = exp(Σ_t log ρ_t)`` ``[B, 1]``
    (the product of token ratios, *not* length-normalised — TRL issue #5814). ``*_truncate`` clamps
    ``ρ`` to ``[clip_min, clip_max]`` (truncated IS, Ionides 2008; arXiv 1606.02647); ``*_mask``
    sets ``ρ = 0`` outside ``[clip_min, clip_max]`` (masked IS / IcePop). ``None`` leaves a side open.

    The log-ratio is clamped to ``±log_clamp`` before ``exp`` (TRL does not clamp; the result only
    differs when TRL's would overflow to ``inf``). Returns a stop-gradient array.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import sampler_importance_weights
      >>> old = jnp.array([[-1.0, -1.0], [-1.0, -1.0]])
      >>> sampler = jnp.array([[-1.0, -1.0], [-3.0, -1.0]])  # row 1's first token: trainer/sampler ratio e^2
      >>> mask = jnp.ones((2, 2), bool)
      >>> print(sampler_importance_weights(old, sampler, mask, "token_truncate", clip_max=3.0))
      [[1. 1.]
       [3. 1.]]
    """
    check_choice("mode", mode, SAMPLER_CORRECTION_MODES)
    if clip_min is None and clip_max is None:
        raise ValueError("clip_min and clip_max are both None; at least one bound is required")
    check_order("clip_min", clip_min, "clip_max", clip_max)
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
    advantages: ArrayLike,
    logps: ArrayLike,
    behaviour_logps: ArrayLike,
    mask: ArrayLike,
    threshold: Scalar,
) -> jax.Array:
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


# ------------------------------------------------------------------------------ rollout correction

ROLLOUT_RS_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)
ROLLOUT_IS_LEVELS = ("token", "sequence", "geometric")
ROLLOUT_CORRECTION_MODES = ("decoupled", "bypass")
ROLLOUT_LOSS_TYPES = ("ppo_clip", "reinforce")
_PPL_LOG_CAP = 80.0


def _rs_bounds(option: str, upper, lower) -> Tuple[Optional[Any], Any]:
    """Validate the bounds of one rejection option; return ``(lower, upper)`` (lower None for k2/k3)."""
    check_choice("option", option, ROLLOUT_RS_OPTIONS)
    check_range("upper", upper, low=0.0, low_inclusive=False)
    if option.endswith("k1"):
        lo = 1.0 / upper if lower is None else lower
        check_range("lower", lo, low=0.0, low_inclusive=False, high=upper)
        return lo, upper
    if lower is not None:
        raise ValueError(f"lower={lower!r} is not allowed for option {option!r}: k2 / k3 statistics are "
                         "non-negative divergences and take an upper bound only (k1 options take ratio bounds)")
    return None, upper


def _clamped_log_ratio(anchor_logps, sampler_logps, mask, log_clamp):
    d = sampler_log_ratio(anchor_logps, sampler_logps, mask)
    return d if log_clamp is None else jnp.clip(d, -log_clamp, log_clamp)


def divergence_rejection_mask(
    old_logps: ArrayLike,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    option: str = "seq_mean_k3",
    upper: Scalar = 0.01,
    lower: Optional[Scalar] = None,
    log_clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """Rejection sampling on the rollout–trainer divergence (verl ``rollout_rs``; Liu et al. 2025, "When
    speed kills stability", Part 3: geometric / K3 rejection; k-estimators: Schulman 2020, "Approximating
    KL divergence").

    With ``log ρ_t = log π_old − log π_sampler`` (clamped to ``±log_clamp`` per token first), the token
    statistics are ``k1 = log ρ`` (as a *ratio* test), ``k2 = ½(log ρ)²``, ``k3 = ρ − 1 − log ρ``; the
    option picks the level: ``token_*`` (each token), ``seq_sum_*`` (``Σ_t``), ``seq_mean_*``
    (``(1/|y|) Σ_t``), ``seq_max_*`` (``max_t``; the "veto via max" of verl PR #4544).

    - k1: keep if ``lower ≤ ρ_stat ≤ upper`` where ``ρ_stat`` is ``ρ_t``, ``Π_t ρ_t`` or the geometric
      mean ``(Π_t ρ_t)^(1/|y|)``; ``lower`` defaults to ``1/upper``. Compared as
      ``log lower ≤ log ρ_stat ≤ log upper`` — verl (Jan 2026) compares ``−log ρ`` with that interval,
      which inverts asymmetric bounds; trlax does not.
    - k2 / k3: keep if ``stat ≤ upper`` (``lower`` must be None).

    Args:
      old_logps, sampler_logps, mask: ``[B, T]``; NaN sampler log-probs count as ``log ρ = 0``.
      option: one of ``ROLLOUT_RS_OPTIONS``.

    Returns:
      ``[B, T]`` bool keep mask, already AND-ed with ``mask`` (a rejected sequence is all False), a
      stop-gradient constant. Empty rows stay all False; fully finite for any finite input.
    """
    lo, hi = _rs_bounds(option, upper, lower)
    m = as_mask(mask)
    d = _clamped_log_ratio(old_logps, sampler_logps, m, log_clamp)
    level, kind = option.rsplit("_", 1)
    zero = jnp.zeros((), d.dtype)
    if kind == "k1":
        stat = d
    elif kind == "k2":
        stat = 0.5 * d * d
    else:
        stat = jnp.expm1(d) - d
    stat = jnp.where(m, stat, zero)
    if level == "seq_sum":
        stat = jnp.sum(stat, axis=-1, keepdims=True)
    elif level == "seq_mean":
        stat = jnp.sum(stat, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1)
    elif level == "seq_max":
        stat = jnp.max(jnp.where(m, stat, -jnp.inf), axis=-1, keepdims=True)
        stat = jnp.where(jnp.any(m, axis=-1, keepdims=True), stat, zero)
    if kind == "k1":
        assert lo is not None  # (_rs_bounds gives k1 options a lower bound)
        keep = (stat >= jnp.log(lo)) & (stat <= jnp.log(hi))
    else:
        keep = stat <= hi
    return _sg(jnp.broadcast_to(keep, m.shape) & m)


def geometric_sequence_mask(
    old_logps: ArrayLike,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    lower: Optional[Scalar] = 0.999,
    upper: Scalar = 1.001,
    log_clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """Geo-RS: keep a sequence iff its geometric-mean ratio ``exp((1/|y|) Σ_t log ρ_t)`` lies in
    ``[lower, upper]`` (verl ``seq_mean_k1``, defaults of ``decoupled_geo_rs``: ±0.1 %). Length
    invariant, unlike the product ratio (the "length trap", objectives-survey 4.2). ``[B, T]`` bool."""
    return divergence_rejection_mask(old_logps, sampler_logps, mask, "seq_mean_k1", upper, lower, log_clamp)


def token_veto_mask(
    old_logps: ArrayLike,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    threshold: Scalar = 1e-4,
    log_clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """Per-token veto (verl PR #3694 ``rollout_token_veto_threshold``): drop a whole sequence if any of its
    tokens has ``ρ_t = π_old/π_sampler < threshold`` (a token the trainer considers near-impossible).

    Returns ``[B, T]`` bool keep mask AND-ed with ``mask`` (stop-gradient)."""
    check_range("threshold", threshold, low=0.0, low_inclusive=False)
    m = as_mask(mask)
    d = _clamped_log_ratio(old_logps, sampler_logps, m, log_clamp)
    bad = jnp.any(m & (d < jnp.log(threshold)), axis=-1, keepdims=True)
    return _sg(~bad & m)


def rollout_is_weights(
    old_logps: ArrayLike,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    level: str = "token",
    upper: Optional[Scalar] = 2.0,
    lower: Optional[Scalar] = None,
    log_clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """Truncated importance weights for the rollout–trainer mismatch (verl ``rollout_is``; Token-TIS /
    Seq-TIS of Yao et al. 2025; truncated IS, Ionides 2008; geometric level as in SkyRL / NeMo).

    ``token``: ``w_t = ρ_t``; ``sequence``: ``w_i = Π_t ρ_t`` (product, not length-normalised);
    ``geometric``: ``w_i = (Π_t ρ_t)^(1/|y_i|)``. The log weight is clamped to ``±log_clamp`` before
    ``exp`` (per token for ``token``, after the sum / mean otherwise, as verl), then truncated to
    ``[lower, upper]`` (verl truncates from above only: ``lower=None``).

    Unlike :func:`sampler_importance_weights` (TRL semantics, ``[B, 1]`` for sequences, no zeroing),
    the result is always ``[B, T]`` with 0 under the mask. Stop-gradient.
    """
    check_choice("level", level, ROLLOUT_IS_LEVELS)
    check_range("upper", upper, low=0.0, low_inclusive=False, allow_none=True)
    check_range("lower", lower, low=0.0, high=upper, allow_none=True)
    m = as_mask(mask)
    d = sampler_log_ratio(old_logps, sampler_logps, m)
    if level != "token":
        d = jnp.sum(d, axis=-1, keepdims=True)
        if level == "geometric":
            d = d / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1)
    if log_clamp is not None:
        d = jnp.clip(d, -log_clamp, log_clamp)
    w = jnp.exp(d)
    if upper is not None:
        w = jnp.minimum(w, upper)
    if lower is not None:
        w = jnp.maximum(w, lower)
    w = jnp.broadcast_to(w, m.shape)
    return _sg(jnp.where(m, w, jnp.zeros((), w.dtype)))


def self_normalized_weights(
    weights: ArrayLike,
    mask: ArrayLike,
    level: str = "token",
    weights_mean: Optional[ArrayLike] = None,
    eps: Scalar = 1e-8,
) -> jax.Array:
    """Self-normalised importance sampling (Kong 1992; Owen 2013, ch. 9 eq. 9.9; verl
    ``rollout_is_batch_normalize``): divide the weights by their batch mean so they average to 1.

    ``token``: the mean is over all valid tokens; ``sequence`` / ``geometric``: over the per-sequence
    weights (one per row with at least one valid token). Normalises only when the mean exceeds
    ``eps`` (otherwise the weights are returned unchanged, as verl). With data parallelism pass the
    all-reduced mean as ``weights_mean`` (a scalar) so every device uses the same normaliser.

    Args:
      weights: ``[B, T]`` (or ``[B, 1]`` per-sequence) weights, e.g. from :func:`rollout_is_weights`.
      mask: ``[B, T]``.

    Returns:
      ``[B, T]`` normalised weights, 0 under the mask, stop-gradient.
    """
    check_choice("level", level, ROLLOUT_IS_LEVELS)
    m = as_mask(mask)
    check_rank(m, 2, "mask")
    w = _sg(as_float(weights, "weights"))
    if w.shape not in (m.shape, (m.shape[0], 1)):
        raise ValueError(f"`weights` must have shape {tuple(m.shape)} or ({m.shape[0]}, 1), got {tuple(w.shape)}")
    w = jnp.where(m, jnp.broadcast_to(w, m.shape), jnp.zeros((), w.dtype))
    if weights_mean is None:
        if level == "token":
            mean = jnp.sum(w) / jnp.maximum(jnp.sum(m), 1)
        else:
            cnt = jnp.sum(m, axis=-1)
            row_w = jnp.sum(w, axis=-1) / jnp.maximum(cnt, 1)
            mean = jnp.sum(jnp.where(cnt > 0, row_w, 0.0)) / jnp.maximum(jnp.sum(cnt > 0), 1)
    else:
        mean = jnp.asarray(weights_mean, w.dtype)
    safe = jnp.where(mean > eps, mean, jnp.ones((), w.dtype))
    return _sg(w / safe)


def rollout_mismatch_metrics(
    old_logps: ArrayLike,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    weights: Optional[ArrayLike] = None,
    log_clamp: Optional[Scalar] = 20.0,
) -> Dict[str, Any]:
    """Off-policy diagnostics of the sampler–trainer mismatch (verl ``compute_offpolicy_metrics`` and
    the ESS of ``compute_is_metrics``; definitions in Liu et al. 2025, "When speed kills stability").

    With ``log ρ_t = ℓ^old_t − ℓ^samp_t`` over valid tokens (mask and both log-probs non-NaN):

    - ``kl = E_t[ℓ^samp − ℓ^old]`` (k1 of KL(π_samp‖π_old)), ``k3_kl = E_t[ρ − 1 − log ρ]``;
    - ``training_ppl = E_i[exp(−mean_t ℓ^old)]``, ``rollout_ppl`` likewise, ``*_log_ppl`` their logs'
      means, ``log_ppl_diff = E_i[mean_t ℓ^samp − mean_t ℓ^old]``, ``ppl_ratio = E_i[exp(log_ppl_diff_i)]``;
    - ``chi2_token = E_t[ρ_t²] − 1``, ``chi2_seq = E_i[(Π_t ρ_t)²] − 1`` (log-ratios clamped first);
    - ``is_weight``, ``is_weight_sq``: means of ``w`` and ``w²`` (``w = weights`` if given, else
      ``ρ_t``), and ``ess = E[w]² / E[w²] ∈ (0, 1]`` (relative effective sample size, Kong 1992; verl's
      ``1 / mean((w / mean w)²)``).

    Sequence means run over rows with at least one valid token (verl also averages empty rows). Every
    statistic of ``log ρ`` uses the clamped value (``±log_clamp``, verl clamps only for χ²), so
    ``kl``, ``k3_kl``, ``log_ppl_diff``, ``ppl_ratio`` and ``chi2_*`` stay finite for any finite input;
    perplexity exponents are capped at 80 (``e^80`` is finite in float32).
    Returns a dict of :class:`Mean` pairs (mergeable across micro-batches; ``chi2_*`` are means of
    ``ρ² − 1``) plus the scalar ``ess`` of this batch (0 when there is no valid token).
    """
    old = _sg(as_float(old_logps, "old_logps"))
    samp = _sg(as_float(sampler_logps, "sampler_logps"))
    m = as_mask(mask)
    check_rank(old, 2, "old_logps")
    check_same_shape(old, "old_logps", sampler_logps=samp, mask=m)
    dt = jnp.result_type(old.dtype, samp.dtype)
    ok = m & ~jnp.isnan(samp) & ~jnp.isnan(old)
    zero = jnp.zeros((), dt)
    lo = jnp.where(ok, old, zero)
    ls = jnp.where(ok, samp, zero)
    d = jnp.where(ok, lo - ls, zero)
    dc = d if log_clamp is None else jnp.clip(d, -log_clamp, log_clamp)
    n_tok = jnp.sum(ok).astype(dt)
    cnt = jnp.sum(ok, axis=-1).astype(dt)
    rows = cnt > 0
    n_rows = jnp.sum(rows).astype(dt)

    def tok_mean(x):
        return Mean(jnp.sum(jnp.where(ok, x, zero)), n_tok)

    def row_mean(x):
        return Mean(jnp.sum(jnp.where(rows, x, zero)), n_rows)

    mean_old = jnp.sum(lo, axis=-1) / jnp.maximum(cnt, 1)
    mean_samp = jnp.sum(ls, axis=-1) / jnp.maximum(cnt, 1)
    diff = -jnp.sum(dc, axis=-1) / jnp.maximum(cnt, 1)  # mean_t ℓ^samp − mean_t ℓ^old, clamped terms
    ppl = lambda lp: jnp.exp(jnp.minimum(-lp, _PPL_LOG_CAP))  # noqa: E731
    seq = jnp.sum(d, axis=-1)
    seq = seq if log_clamp is None else jnp.clip(seq, -log_clamp, log_clamp)
    if weights is None:
        w = jnp.exp(dc)
    else:
        w = _sg(as_float(weights, "weights"))
        if w.shape not in (m.shape, (m.shape[0], 1)):
            raise ValueError(f"`weights` must have shape {tuple(m.shape)} or ({m.shape[0]}, 1), "
                             f"got {tuple(w.shape)}")
        w = jnp.broadcast_to(w, m.shape).astype(dt)
    w = jnp.where(ok, w, zero)
    w_mean = tok_mean(w)
    w_sq = tok_mean(w * w)
    ess = jnp.where(w_sq.total > 0, w_mean.total ** 2 / jnp.maximum(n_tok * w_sq.total, 1e-30), zero)
    return {
        "kl": tok_mean(-dc),
        "k3_kl": tok_mean(jnp.expm1(dc) - dc),
        "training_ppl": row_mean(ppl(mean_old)),
        "training_log_ppl": row_mean(-mean_old),
        "rollout_ppl": row_mean(ppl(mean_samp)),
        "rollout_log_ppl": row_mean(-mean_samp),
        "log_ppl_diff": row_mean(diff),
        "ppl_ratio": row_mean(jnp.exp(diff)),
        "chi2_token": tok_mean(jnp.expm1(2.0 * dc)),
        "chi2_seq": row_mean(jnp.expm1(2.0 * seq)),
        "is_weight": w_mean,
        "is_weight_sq": w_sq,
        "ess": ess,
    }


@dataclasses.dataclass(frozen=True)
class RolloutCorrectionConfig:
    """Static configuration of :func:`rollout_correction` (hashable; verl's ``RolloutCorrectionConfig``
    written as composable trlax stages).

    Attributes:
      mode: ``decoupled`` (three policies, Hilton et al. arXiv 2110.00641: the PPO ratio is taken
        against π_old and the IS / RS stages use ``ρ = π_old/π_sampler``) or ``bypass`` (two policies:
        π_old := π_sampler; the stages use ``ρ = sg(π_θ)/π_sampler``).
      loss_type: bypass only: ``ppo_clip`` (the PPO ratio already corrects; no IS weights allowed, they
        would double count) or ``reinforce`` (``−w·A·log π_θ`` with explicit IS weights).
      is_level: ``None`` (no IS weights) or one of ``ROLLOUT_IS_LEVELS``.
      is_threshold: upper truncation C of the IS weights (verl ``rollout_is_threshold``, 2.0).
      is_threshold_lower: optional lower truncation.
      is_batch_normalize: self-normalise the weights (:func:`self_normalized_weights`).
      rs: rejection options (``ROLLOUT_RS_OPTIONS``), AND-combined.
      rs_thresholds: one ``(lower, upper)`` pair per option: ratio bounds for k1 (``lower`` None ->
        ``1/upper``), ``(None, upper)`` for k2 / k3.
      veto_threshold: :func:`token_veto_mask` floor, or None.
      log_clamp: clamp of log-ratios before ``exp`` (20, as verl).
    """

    mode: str = "decoupled"
    loss_type: str = "ppo_clip"
    is_level: Optional[str] = None
    is_threshold: float = 2.0
    is_threshold_lower: Optional[float] = None
    is_batch_normalize: bool = False
    rs: Tuple[str, ...] = ()
    rs_thresholds: Tuple[Tuple[Optional[float], float], ...] = ()
    veto_threshold: Optional[float] = None
    log_clamp: float = 20.0

    def __post_init__(self):
        check_choice("mode", self.mode, ROLLOUT_CORRECTION_MODES)
        check_choice("loss_type", self.loss_type, ROLLOUT_LOSS_TYPES)
        if self.is_level is not None:
            check_choice("is_level", self.is_level, ROLLOUT_IS_LEVELS)
        check_range("is_threshold", self.is_threshold, low=0.0, low_inclusive=False)
        check_range("is_threshold_lower", self.is_threshold_lower, low=0.0, high=self.is_threshold,
                    allow_none=True)
        if not isinstance(self.is_batch_normalize, bool):
            raise ValueError(f"is_batch_normalize={self.is_batch_normalize!r} must be a bool")
        if self.mode == "bypass" and self.loss_type == "ppo_clip" and self.is_level is not None:
            raise ValueError(f"is_level={self.is_level!r} is not allowed with mode='bypass', loss_type='ppo_clip': "
                             "the PPO ratio π_θ/π_sampler already corrects; IS weights would double count "
                             "(use loss_type='reinforce' or is_level=None)")
        if isinstance(self.rs, str) or not isinstance(self.rs, tuple):
            raise ValueError(f"rs={self.rs!r} must be a tuple of options from {ROLLOUT_RS_OPTIONS}")
        if not isinstance(self.rs_thresholds, tuple) or len(self.rs_thresholds) != len(self.rs):
            raise ValueError(f"rs_thresholds={self.rs_thresholds!r} must be a tuple with one (lower, upper) "
                             f"pair per rs option ({len(self.rs)})")
        for opt, pair in zip(self.rs, self.rs_thresholds, strict=True):
            check_choice("rs", opt, ROLLOUT_RS_OPTIONS)
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"rs_thresholds entry {pair!r} for {opt!r} must be a (lower, upper) pair")
            try:
                _rs_bounds(opt, pair[1], pair[0])
            except ValueError as e:
                raise ValueError(f"rs_thresholds for {opt!r}: {e}") from None
        check_range("veto_threshold", self.veto_threshold, low=0.0, low_inclusive=False, allow_none=True)
        check_range("log_clamp", self.log_clamp, low=0.0, low_inclusive=False)

    # ---- presets (verl RolloutCorrectionConfig, default thresholds as verl) ----
    @classmethod
    def disabled(cls) -> "RolloutCorrectionConfig":
        """No correction (metrics only)."""
        return cls()

    @classmethod
    def decoupled_token_is(cls, threshold: float = 2.0) -> "RolloutCorrectionConfig":
        """Token-TIS: ``w_t = min(ρ_t, C)``."""
        return cls(is_level="token", is_threshold=threshold)

    @classmethod
    def decoupled_seq_is(cls, threshold: float = 2.0) -> "RolloutCorrectionConfig":
        """Seq-TIS: ``w_i = min(Π_t ρ_t, C)``."""
        return cls(is_level="sequence", is_threshold=threshold)

    @classmethod
    def decoupled_seq_is_rs(cls, is_threshold: float = 2.0, rs_lower: float = 0.5,
                            rs_upper: float = 2.0) -> "RolloutCorrectionConfig":
        """Seq-MIS: Seq-TIS + reject sequences whose product ratio leaves ``[0.5, 2]`` (``seq_sum_k1``)."""
        return cls(is_level="sequence", is_threshold=is_threshold, rs=("seq_sum_k1",),
                   rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def decoupled_geo_rs(cls, rs_lower: float = 0.999, rs_upper: float = 1.001) -> "RolloutCorrectionConfig":
        """Geo-RS: reject when the geometric-mean ratio leaves ``[0.999, 1.001]``."""
        return cls(rs=("seq_mean_k1",), rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def decoupled_geo_rs_token_tis(cls, is_threshold: float = 2.0, rs_lower: float = 0.999,
                                   rs_upper: float = 1.001) -> "RolloutCorrectionConfig":
        """Geo-RS + Token-TIS."""
        return cls(is_level="token", is_threshold=is_threshold, rs=("seq_mean_k1",),
                   rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def decoupled_geo_rs_seq_tis(cls, is_threshold: float = 2.0, rs_lower: float = 0.999,
                                 rs_upper: float = 1.001) -> "RolloutCorrectionConfig":
        """Geo-RS + Seq-TIS."""
        return cls(is_level="sequence", is_threshold=is_threshold, rs=("seq_mean_k1",),
                   rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def decoupled_k3_rs(cls, rs_threshold: float = 0.01) -> "RolloutCorrectionConfig":
        """K3-RS: reject when ``mean_t(ρ − 1 − log ρ) > 0.01``."""
        return cls(rs=("seq_mean_k3",), rs_thresholds=((None, rs_threshold),))

    @classmethod
    def decoupled_k3_rs_token_tis(cls, is_threshold: float = 2.0, rs_threshold: float = 0.01):
        """K3-RS + Token-TIS."""
        return cls(is_level="token", is_threshold=is_threshold, rs=("seq_mean_k3",),
                   rs_thresholds=((None, rs_threshold),))

    @classmethod
    def decoupled_k3_rs_seq_tis(cls, is_threshold: float = 2.0, rs_threshold: float = 0.01):
        """K3-RS + Seq-TIS."""
        return cls(is_level="sequence", is_threshold=is_threshold, rs=("seq_mean_k3",),
                   rs_thresholds=((None, rs_threshold),))

    @classmethod
    def bypass_ppo_clip(cls) -> "RolloutCorrectionConfig":
        """Bypass, PPO-clip against π_sampler (no π_old recompute)."""
        return cls(mode="bypass", loss_type="ppo_clip")

    @classmethod
    def bypass_ppo_clip_geo_rs(cls, rs_lower: float = 0.999, rs_upper: float = 1.001):
        """Bypass PPO-clip + Geo-RS."""
        return cls(mode="bypass", loss_type="ppo_clip", rs=("seq_mean_k1",), rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def bypass_ppo_clip_k3_rs(cls, rs_threshold: float = 0.01):
        """Bypass PPO-clip + K3-RS."""
        return cls(mode="bypass", loss_type="ppo_clip", rs=("seq_mean_k3",), rs_thresholds=((None, rs_threshold),))

    @classmethod
    def bypass_pg_is(cls, threshold: float = 2.0):
        """Bypass REINFORCE + Seq-TIS."""
        return cls(mode="bypass", loss_type="reinforce", is_level="sequence", is_threshold=threshold)

    @classmethod
    def bypass_pg_geo_rs(cls, rs_lower: float = 0.999, rs_upper: float = 1.001):
        """Bypass REINFORCE + Geo-RS."""
        return cls(mode="bypass", loss_type="reinforce", rs=("seq_mean_k1",), rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def bypass_pg_geo_rs_token_tis(cls, is_threshold: float = 2.0, rs_lower: float = 0.999, rs_upper: float = 1.001):
        """Bypass REINFORCE + Geo-RS + Token-TIS."""
        return cls(mode="bypass", loss_type="reinforce", is_level="token", is_threshold=is_threshold,
                   rs=("seq_mean_k1",), rs_thresholds=((rs_lower, rs_upper),))

    @classmethod
    def bypass_pg_geo_rs_seq_tis(cls, is_threshold: float = 2.0, rs_lower: float = 0.999, rs_upper: float = 1.001):
        """Bypass REINFORCE + Geo-RS + Seq-TIS."""
        return cls(mode="bypass", loss_type="reinforce", is_level="sequence", is_threshold=is_threshold,
                   rs=("seq_mean_k1",), rs_thresholds=((rs_lower, rs_upper),))


def rollout_correction(
    config: RolloutCorrectionConfig,
    sampler_logps: ArrayLike,
    mask: ArrayLike,
    *,
    old_logps: Optional[ArrayLike] = None,
    logps: Optional[ArrayLike] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array, Dict[str, Any]]:
    """Compose the rollout-correction stages of ``config`` (verl ``compute_rollout_correction_and_
    rejection_mask`` + ``apply_bypass_mode``; decoupled PPO, Hilton et al. arXiv 2110.00641, eq. 4).

    - ``decoupled``: needs ``old_logps``; ``ρ_t = π_old/π_sampler``; the PPO anchor stays π_old.
    - ``bypass``: needs ``logps`` (current policy; only its stop-gradient value is read);
      ``ρ_t = sg(π_θ)/π_sampler``; the anchor is π_sampler (``old_logps := sampler_logps``).

    Rejection stages (``rs`` options, then the veto) are AND-ed into the mask, so rejected tokens also
    leave the loss denominator. IS weights are computed from the full mask (a sequence weight is the
    product over all its valid tokens, as verl), then set to 0 on rejected tokens; with
    ``is_batch_normalize`` they are self-normalised over the *kept* tokens (verl normalises over all
    valid tokens, rejected ones included, so its kept weights do not average to 1).

    Returns:
      ``(anchor_logps [B, T], weights [B, T], mask [B, T] bool, metrics)``: use ``anchor_logps`` as the
      "old" log-probs of the surrogate, multiply the per-token loss by ``weights`` (all ones on kept
      tokens when ``is_level`` is None), and aggregate over ``mask``. ``metrics`` is
      :func:`rollout_mismatch_metrics` plus ``rs_masked_fraction`` and ``rs_seq_masked_fraction``
      (:class:`Mean` pairs). Everything is stop-gradient.
    """
    if not isinstance(config, RolloutCorrectionConfig):
        raise TypeError(f"`config` must be a RolloutCorrectionConfig, got {type(config).__name__}")
    m = as_mask(mask)
    samp = _sg(as_float(sampler_logps, "sampler_logps"))
    check_rank(samp, 2, "sampler_logps")
    check_same_shape(samp, "sampler_logps", mask=m)
    if config.mode == "decoupled":
        if old_logps is None:
            raise ValueError("mode='decoupled' requires `old_logps` (the trainer's recomputed log-probs)")
        anchor_src = _sg(as_float(old_logps, "old_logps"))
        check_same_shape(samp, "sampler_logps", old_logps=anchor_src)
        anchor = anchor_src
    else:
        if logps is None:
            raise ValueError("mode='bypass' requires `logps` (current policy log-probs; read stop-gradient)")
        anchor_src = _sg(as_float(logps, "logps"))
        check_same_shape(samp, "sampler_logps", logps=anchor_src)
        anchor = samp
    keep = m
    for opt, (lo, hi) in zip(config.rs, config.rs_thresholds, strict=True):
        keep = keep & divergence_rejection_mask(anchor_src, samp, m, opt, hi, lo, config.log_clamp)
    if config.veto_threshold is not None:
        keep = keep & token_veto_mask(anchor_src, samp, m, config.veto_threshold, config.log_clamp)
    if config.is_level is None:
        weights = jnp.where(keep, jnp.ones((), samp.dtype), jnp.zeros((), samp.dtype))
    else:
        weights = rollout_is_weights(anchor_src, samp, m, config.is_level, config.is_threshold,
                                     config.is_threshold_lower, config.log_clamp)
        weights = jnp.where(keep, weights, jnp.zeros((), weights.dtype))
        if config.is_batch_normalize:
            weights = self_normalized_weights(weights, keep, config.is_level)
    metrics = rollout_mismatch_metrics(anchor_src, samp, m, log_clamp=config.log_clamp)
    dt = samp.dtype
    n_tok = jnp.sum(m).astype(dt)
    rows = jnp.any(m, axis=-1)
    metrics["rs_masked_fraction"] = Mean(jnp.sum(m & ~keep).astype(dt), n_tok)
    metrics["rs_seq_masked_fraction"] = Mean(jnp.sum(jnp.any(m & ~keep, axis=-1)).astype(dt),
                                             jnp.sum(rows).astype(dt))
    return anchor, _sg(weights), keep, metrics

__all__ = [
    "ROLLOUT_CORRECTION_MODES",
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_RS_OPTIONS",
    "RolloutCorrectionConfig",
    "SAMPLER_CORRECTION_MODES",
    "divergence_rejection_mask",
    "geometric_sequence_mask",
    "rollout_correction",
    "rollout_is_weights",
    "rollout_mismatch_metrics",
    "self_normalized_weights",
    "token_veto_mask",
    "off_policy_sequence_mask",
    "sampler_importance_weights",
    "sampler_log_ratio",
]
