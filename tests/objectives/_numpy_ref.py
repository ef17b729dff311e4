"""Plain NumPy float64 references for the GRPO-family objectives, written from the papers.

Independent of JAX and of trlax's implementation: loops over rows and groups, explicit formulas. Used by
``test_reference.py`` (values and gradients) and ``test_properties.py``.

Stop-gradients. A reference whose math contains ``sg(log π_θ)`` takes the *live* log-probs ``logps`` and
an optional *frozen* copy ``frozen`` (defaults to ``logps``): every stop-gradient use reads ``frozen``.
Central finite differences w.r.t. ``logps`` with ``frozen`` held at the base point then give exactly the
gradient that ``jax.grad`` must produce (:func:`fd_grad`). Old / reference / sampler log-probs and
advantages are plain constants here, so their gradient is zero by construction.

Shapes: per-token arrays ``[B, T]``, masks ``[B, T]`` bool, per-sequence arrays ``[B]`` or ``[B, 1]``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

LOG_1E8 = math.log(1e-8)


def _f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _col(x, B):
    """``[B]`` / ``[B, 1]`` / ``[B, T]`` -> 2-D float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(B, 1) if x.ndim == 1 else x


# ---------------------------------------------------------------------------------- finite differences


def fd_grad(f: Callable[[np.ndarray], float], x: np.ndarray, where: Optional[np.ndarray] = None, h: float = 1e-6):
    """Central finite-difference gradient of the scalar ``f`` at ``x`` (float64); positions outside
    ``where`` are left at 0 (the reference does not read them, so their true gradient is 0)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    idx = np.argwhere(np.ones(x.shape, bool) if where is None else np.asarray(where, bool))
    for ix in map(tuple, idx):
        xp = x.copy()
        xm = x.copy()
        xp[ix] += h
        xm[ix] -= h
        g[ix] = (f(xp) - f(xm)) / (2 * h)
    return g


# ------------------------------------------------------------------------------------ masked reductions


def masked_sum(x, mask, axis=None):
    """``Σ_{mask} x`` (masked entries are never read, even if NaN); ``x`` and ``mask`` broadcast."""
    x = np.asarray(x, np.float64)
    mask = np.asarray(mask, bool)
    return np.sum(np.where(mask, x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean over selected entries of the broadcast mask; 0 where nothing is selected."""
    x = np.asarray(x, np.float64)
    mask = np.broadcast_to(np.asarray(mask, bool), np.broadcast_shapes(x.shape, np.shape(mask)))
    s = masked_sum(x, mask, axis)
    c = np.sum(mask, axis=axis)
    return np.where(c > 0, s / np.maximum(c, 1), 0.0)


def masked_min(x, mask):
    sel = np.asarray(x, np.float64)[np.asarray(mask, bool)]
    return float(sel.min()) if sel.size else 0.0


def masked_max(x, mask):
    sel = np.asarray(x, np.float64)[np.asarray(mask, bool)]
    return float(sel.max()) if sel.size else 0.0


def aggregate(loss, mask, mode, num_items=None, num_sequences=None, max_completion_length=None):
    """Loss normalisations of the GRPO family, per row then over rows.

    grpo/sapo: GRPO (arXiv 2402.03300, eq. 3) ``(1/G) Σ_i (1/|o_i|) Σ_t L_it`` (empty rows contribute 0
    but count in G); bnpo: ``Σ L / Σ|o_i|``; dr_grpo (arXiv 2503.20783, eq. 4): ``Σ L / (G · L_max)``;
    dapo/cispo/vespo/token_mean (arXiv 2503.14476, eq. 8): ``Σ L / N`` with N the (global) token count;
    luspo (arXiv 2602.05261): ``(1/G) Σ_i Σ_t L_it``. ``loss`` ``[B, T]`` or ``[B, 1]`` (broadcast over T).
    """
    mask = np.asarray(mask, bool)
    B, T = mask.shape
    loss = np.asarray(loss, np.float64)
    if loss.shape == (B, 1):
        loss = np.repeat(loss, T, axis=1)
    G = B if num_sequences is None else float(num_sequences)
    row_sums, row_lens = [], []
    for i in range(B):
        row_sums.append(sum(float(loss[i, t]) for t in range(T) if mask[i, t]))
        row_lens.append(int(mask[i].sum()))
    total = sum(row_sums)
    if mode in ("grpo", "sapo"):
        return sum(s / n for s, n in zip(row_sums, row_lens) if n > 0) / G
    if mode == "bnpo":
        return total / max(sum(row_lens), 1)
    if mode == "dr_grpo":
        return total / (G * (T if max_completion_length is None else max_completion_length))
    if mode == "luspo":
        return total / G
    if mode in ("dapo", "cispo", "vespo", "token_mean"):
        n = sum(row_lens) if num_items is None else float(num_items)
        return total / max(n, 1)
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------------- ratios


def token_log_ratio(logps, old_logps, mask, frozen=None):
    """PPO token log-ratio (arXiv 1707.06347, eq. 6): ``log π_θ − log π_old`` at valid tokens, 0 elsewhere;
    ``old_logps=None`` means ``π_old = sg(π_θ)``."""
    logps = _f64(logps)
    frozen = logps if frozen is None else _f64(frozen)
    old = frozen if old_logps is None else _f64(old_logps)
    mask = np.asarray(mask, bool)
    out = np.zeros_like(logps)
    out[mask] = logps[mask] - old[mask]
    return out


def sequence_log_ratio(logps, old_logps, mask, frozen=None):
    """GSPO (arXiv 2507.18071, eq. 7): ``log s_i = (1/|y_i|) Σ_t (log π_θ − log π_old)``; ``[B, 1]``, 0 for
    empty rows."""
    d = token_log_ratio(logps, old_logps, mask, frozen)
    mask = np.asarray(mask, bool)
    out = np.zeros((d.shape[0], 1))
    for i in range(d.shape[0]):
        n = mask[i].sum()
        out[i, 0] = d[i][mask[i]].sum() / n if n else 0.0
    return out


def gspo_token_log_ratio(logps, old_logps, mask, frozen=None):
    """GSPO-token (arXiv 2507.18071, eq. 13): ``log π_θ(y_t) − sg(log π_θ(y_t)) + sg(log s_i)`` at valid
    tokens, 0 elsewhere. Value: ``log s_i``; gradient: per-token ``∇ log π_θ(y_t)``."""
    logps = _f64(logps)
    frozen = logps if frozen is None else _f64(frozen)
    mask = np.asarray(mask, bool)
    seq = sequence_log_ratio(frozen, old_logps, mask, frozen)
    out = np.where(mask, (np.where(mask, logps, 0.0) - np.where(mask, frozen, 0.0)) + seq, 0.0)
    return out


def safe_exp(x, clamp=20.0):
    """``exp(clip(x, −c, c))``."""
    x = _f64(x)
    return np.exp(x if clamp is None else np.clip(x, -clamp, clamp))


# ------------------------------------------------------------------------------------------ surrogates


def ppo_clip_loss(ratio, adv, eps_low=0.2, eps_high=None, delta=None):
    """PPO clip (arXiv 1707.06347, eq. 7) with clip-higher (arXiv 2503.14476, eq. 10) and the
    INTELLECT-2 cap (arXiv 2505.07291, sec. 3.3): ``−min(min(r, δ)·A, clip(r, 1−ε_l, 1+ε_h)·A)``."""
    r, A = np.broadcast_arrays(_f64(ratio), _f64(adv))
    eh = eps_low if eps_high is None else eps_high
    out = np.empty(r.shape)
    for ix in np.ndindex(r.shape):
        ri, ai = float(r[ix]), float(A[ix])
        c = min(max(ri, 1 - eps_low), 1 + eh)
        u = ri if delta is None else min(ri, delta)
        out[ix] = -min(u * ai, c * ai)
    return out


def ppo_clip_grad_ratio(ratio, adv, eps_low=0.2, eps_high=None, delta=None):
    """Analytic ``∂L/∂r`` of :func:`ppo_clip_loss` (away from kinks): ``−A`` where the selected branch is
    the unclipped, uncapped ``r·A``; 0 where the clip or the δ cap is the active branch."""
    r, A = np.broadcast_arrays(_f64(ratio), _f64(adv))
    eh = eps_low if eps_high is None else eps_high
    g = np.zeros(r.shape)
    for ix in np.ndindex(r.shape):
        ri, ai = float(r[ix]), float(A[ix])
        c = min(max(ri, 1 - eps_low), 1 + eh)
        capped = delta is not None and ri > delta
        u = min(ri, delta) if capped else ri
        if u * ai < c * ai:  # unclipped branch selected
            g[ix] = 0.0 if capped else -ai
        elif u * ai > c * ai:  # clipped branch selected
            g[ix] = -ai if (1 - eps_low) < ri < (1 + eh) else 0.0
        else:  # equal: r inside the clip range (and not capped) -> −A
            g[ix] = -ai if (not capped and (1 - eps_low) < ri < (1 + eh)) else 0.0
    return g


def clip_indicators(ratio, adv, eps_low, eps_high=None):
    """Active-clip indicators: low ``r < 1−ε_l ∧ A < 0``, high ``r > 1+ε_h ∧ A > 0``, region = either."""
    r, A = np.broadcast_arrays(_f64(ratio), _f64(adv))
    eh = eps_low if eps_high is None else eps_high
    low = (r < 1 - eps_low) & (A < 0)
    high = (r > 1 + eh) & (A > 0)
    return low, high, low | high


def cispo_loss(ratio_frozen, adv, logps, eps_high, eps_low=None):
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): ``−sg(min(r, ε_h) [∨ ε_l]) · A · log π_θ`` with an
    absolute cap ``ε_h``. ``ratio_frozen`` is the (constant) ratio value."""
    w = np.minimum(_f64(ratio_frozen), eps_high)
    if eps_low is not None:
        w = np.maximum(w, eps_low)
    return -w * _f64(adv) * _f64(logps)


def sapo_loss(ratio, adv, tau_pos=1.0, tau_neg=1.05):
    """SAPO (arXiv 2511.20347, eq. 6): ``−(4/τ) σ(τ(r−1)) A``, ``τ = τ_pos`` if ``A > 0`` else ``τ_neg``."""
    r, A = np.broadcast_arrays(_f64(ratio), _f64(adv))
    tau = np.where(A > 0, tau_pos, tau_neg)
    return -(4.0 / tau) / (1.0 + np.exp(-tau * (r - 1.0))) * A


def sapo_grad_ratio(ratio, adv, tau_pos=1.0, tau_neg=1.05):
    """``∂/∂r`` of the SAPO loss: ``−4 σ(1−σ) A``."""
    r, A = np.broadcast_arrays(_f64(ratio), _f64(adv))
    tau = np.where(A > 0, tau_pos, tau_neg)
    s = 1.0 / (1.0 + np.exp(-tau * (r - 1.0)))
    return -4.0 * s * (1 - s) * A


def vespo_weights(log_ratio, adv, mask, sampler_log_is=None, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    """VESPO gamma weight (arXiv 2602.10693, eq. 9) ``φ(w) = e^λ w^k e^{−λ w}`` of the sequence ratio
    ``w_i = Π_t r_t`` (per-token log-ratio clipped to ±20, optional sampler ``Σ_t clip(log ρ_t, log 1e-8,
    20)``, then ``log w`` clipped to ``[log 1e-8, 20]``); ``(k, λ)`` by the sign of ``A_i`` (``A ≥ 0`` ->
    pos), ``λ ≥ 1e-4``; non-finite -> 0. Returns ``[B, 1]``."""
    lr = _f64(log_ratio)
    mask = np.asarray(mask, bool)
    B = lr.shape[0]
    A = _col(adv, B)[:, 0]
    out = np.zeros((B, 1))
    for i in range(B):
        s = sum(min(max(float(lr[i, t]), -20.0), 20.0) for t in range(lr.shape[1]) if mask[i, t])
        if sampler_log_is is not None:
            s += sum(min(max(float(v), LOG_1E8), 20.0) for v in np.asarray(sampler_log_is, np.float64)[i])
        lw = min(max(s, LOG_1E8), 20.0)
        k, lam = (k_pos, lam_pos) if A[i] >= 0 else (k_neg, lam_neg)
        lam = max(lam, 1e-4)
        with np.errstate(over="ignore", invalid="ignore"):
            phi = math.exp(lam) * math.exp(k * lw) * math.exp(-lam * math.exp(lw))
        out[i, 0] = phi if math.isfinite(phi) else 0.0
    return out


def vespo_loss(phi, adv, logps):
    """VESPO per-token loss ``−φ_i A log π_θ`` (φ constant)."""
    return -_f64(phi) * _f64(adv) * _f64(logps)


def luspo_loss(ratio, adv, eps_low, eps_high=None, delta=None):
    """LUSPO (arXiv 2602.05261, eq. 5): the GSPO clipped surrogate; its length weighting is the
    ``luspo`` aggregation (per-sequence sum)."""
    return ppo_clip_loss(ratio, adv, eps_low, eps_high, delta)


# ---------------------------------------------------------------------------------------------------- KL


def kl_penalty(logps, ref_logps, mask=None, kind="k3", clamp=20.0):
    """Schulman's KL estimators (2020) with ``d = log π − log π_ref`` (clamped to ±clamp):
    k1 ``d``; k2 / mse ``d²/2``; abs ``|d|``; k3 ``e^{−d} + d − 1`` (GRPO, arXiv 2402.03300, eq. 4).
    Masked positions are 0."""
    logps, ref = _f64(logps), _f64(ref_logps)
    m = np.ones(logps.shape, bool) if mask is None else np.asarray(mask, bool)
    d = np.where(m, np.where(m, logps, 0.0) - np.where(m, ref, 0.0), 0.0)
    if clamp is not None:
        d = np.clip(d, -clamp, clamp)
    if kind == "k1":
        out = d
    elif kind in ("k2", "mse"):
        out = 0.5 * d**2
    elif kind == "abs":
        out = np.abs(d)
    elif kind == "k3":
        out = np.exp(-d) + d - 1.0
    else:
        raise ValueError(kind)
    return np.where(m, out, 0.0)


def kl_grad(logps, ref_logps, mask=None, kind="k3", clamp=20.0):
    """Analytic ``∂KL/∂log π`` (elementwise): k1 ``1``, k2 ``d``, abs ``sign d``, k3 ``1 − e^{−d}``; 0
    outside the clamp and at masked positions."""
    logps, ref = _f64(logps), _f64(ref_logps)
    m = np.ones(logps.shape, bool) if mask is None else np.asarray(mask, bool)
    d = np.where(m, logps - np.where(m, ref, 0.0), 0.0)
    inside = np.ones(d.shape, bool) if clamp is None else (np.abs(d) < clamp)
    g = {"k1": np.ones_like(d), "k2": d, "mse": d, "abs": np.sign(d), "k3": 1.0 - np.exp(-d)}[kind]
    return np.where(m & inside, g, 0.0)


def bias_corrected_kl(kl, ratio):
    """DeepSeek-V3.2 (arXiv 2512.02556, eq. 7): ``k3 · π_θ/π_old``."""
    return _f64(kl) * _f64(ratio)


# --------------------------------------------------------------------------------- sampler correction


def sampler_log_ratio(old_logps, sampler_logps, mask):
    """``log ρ_t = log π_old − log π_sampler`` at valid tokens where both are not NaN; 0 elsewhere."""
    old, samp = _f64(old_logps), _f64(sampler_logps)
    mask = np.asarray(mask, bool)
    out = np.zeros(old.shape)
    for ix in np.ndindex(old.shape):
        if mask[ix] and not np.isnan(samp[ix]) and not np.isnan(old[ix]):
            out[ix] = old[ix] - samp[ix]
    return out


def sampler_importance_weights(old_logps, sampler_logps, mask, mode, clip_min=None, clip_max=3.0, log_clamp=20.0):
    """Truncated / masked IS for the sampler–trainer mismatch (Yao et al. 2025; IcePop arXiv 2510.18855):
    token ``ρ_t = e^{log ρ_t}`` ``[B, T]``; sequence ``ρ_i = Π_t ρ_t`` ``[B, 1]``; ``truncate`` clamps to
    ``[clip_min, clip_max]``, ``mask`` zeroes ρ outside it (log clamped to ±log_clamp first)."""
    d = sampler_log_ratio(old_logps, sampler_logps, mask)
    if mode.startswith("sequence"):
        d = d.sum(axis=1, keepdims=True)
    if log_clamp is not None:
        d = np.clip(d, -log_clamp, log_clamp)
    rho = np.exp(d)
    lo = -np.inf if clip_min is None else clip_min
    hi = np.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return np.minimum(np.maximum(rho, lo), hi)
    return np.where((rho >= lo) & (rho <= hi), rho, 0.0)


def off_policy_sequence_mask(adv, logps_frozen, behaviour_logps, mask, threshold):
    """DeepSeek-V3.2 OPSM (arXiv 2512.02556, eq. 9): keep row i iff ``A_i ≥ 0`` or
    ``(1/|y_i|) Σ_t (log π_behav − log π_θ) ≤ δ`` (NaN terms count 0). ``[B, 1]`` float."""
    lp, beh = _f64(logps_frozen), _f64(behaviour_logps)
    mask = np.asarray(mask, bool)
    B = lp.shape[0]
    A = _col(adv, B)[:, 0]
    out = np.zeros((B, 1))
    for i in range(B):
        terms = [beh[i, t] - lp[i, t] for t in range(lp.shape[1])
                 if mask[i, t] and not np.isnan(beh[i, t]) and not np.isnan(lp[i, t])]
        avg = sum(terms) / max(int(mask[i].sum()), 1)
        out[i, 0] = 1.0 if (A[i] >= 0 or avg <= threshold) else 0.0
    return out


# ---------------------------------------------------------------------------------------------- entropy


def entropy_threshold(entropies, mask, top_quantile):
    """``1 − ρ`` quantile (linear interpolation) of the valid entropies (arXiv 2506.01939, eq. 3); NaN if
    none is valid."""
    vals = np.sort(_f64(entropies)[np.asarray(mask, bool)])
    if vals.size == 0:
        return float("nan")
    q = 1.0 - top_quantile
    pos = q * (vals.size - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, vals.size - 1)
    return float(vals[lo] + (pos - lo) * (vals[hi] - vals[lo]))


def high_entropy_mask(entropies, mask, top_quantile=0.2, threshold=None):
    """Keep valid tokens with ``H_t ≥ threshold``; all False for an empty mask."""
    ent = _f64(entropies)
    mask = np.asarray(mask, bool)
    thr = entropy_threshold(ent, mask, top_quantile) if threshold is None else float(threshold)
    if math.isnan(thr):
        return np.zeros(mask.shape, bool)
    return mask & (np.where(mask, ent, -np.inf) >= thr)


def entropy_bonus(entropies, mask, num_items=None):
    """Skywork-OR1 (arXiv 2505.22312, eq. 5) mean entropy ``Σ H m / max(N, 1)`` with N the local (or
    given global) token count."""
    mask = np.asarray(mask, bool)
    s = masked_sum(entropies, mask)
    n = mask.sum() if num_items is None else num_items
    return float(s / max(n, 1))


def is_truncated(ids, mask, eos_ids, pad_id=None):
    """``[B]`` bool: the last valid token is not a stop id (EOS or pad); empty rows count as truncated."""
    ids = np.asarray(ids)
    mask = np.asarray(mask, bool)
    stops = set(int(e) for e in eos_ids) | (set() if pad_id is None else {int(pad_id)})
    out = np.zeros(ids.shape[0], bool)
    for i in range(ids.shape[0]):
        pos = np.nonzero(mask[i])[0]
        out[i] = True if pos.size == 0 else int(ids[i, pos[-1]]) not in stops
    return out


def mask_truncated_completions(mask, truncated):
    """DAPO overlong filtering (arXiv 2503.14476, sec. 3.4): zero the rows flagged truncated."""
    mask = np.array(mask, bool)
    mask[np.asarray(truncated, bool).reshape(-1)] = False
    return mask


# ------------------------------------------------------------------------------------------- advantages


def _group_lists(n, num_generations=None, group_ids=None):
    gid = np.arange(n) // num_generations if group_ids is None else np.asarray(group_ids)
    return {g: np.nonzero(gid == g)[0] for g in np.unique(gid)}


def _std1(x):
    """Unbiased (Bessel) sample std; NaN for fewer than 2 values."""
    x = list(x)
    if len(x) < 2:
        return float("nan")
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def group_relative_advantages(rewards, num_generations=None, group_ids=None, scale_rewards="group", eps=1e-4):
    """GRPO (arXiv 2402.03300, sec. 4.1.2): ``A_i = (r_i − mean_g)/(std_g + eps)`` over the valid (non-NaN)
    rewards of each group; ``batch``: std over all valid rewards (Lite PPO, arXiv 2508.08221); ``none``:
    no division (Dr. GRPO, arXiv 2503.20783, eq. 5). NaN rewards, singleton and zero-variance groups -> 0."""
    r = _f64(rewards)
    out = np.zeros(r.shape)
    valid_all = [float(v) for v in r if not np.isnan(v)]
    bstd = _std1(valid_all)
    for _, rows in _group_lists(r.shape[0], num_generations, group_ids).items():
        vals = [float(r[i]) for i in rows if not np.isnan(r[i])]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        if scale_rewards == "group":
            scale = _std1(vals) + eps
        elif scale_rewards == "batch":
            scale = (1.0 if math.isnan(bstd) else bstd) + eps
        else:
            scale = 1.0
        for i in rows:
            if not np.isnan(r[i]):
                out[i] = (r[i] - mean) / scale
    return out


def multi_reward_advantages(R, weights=None, num_generations=None, group_ids=None,
                            aggregation="sum_then_normalize", scale_rewards="group", eps=1e-4):
    """Several reward functions ``[N, K]``. sum_then_normalize: ``r = Σ_k w_k R_k`` (NaN skipped, all-NaN
    rows unscorable) then :func:`group_relative_advantages`. normalize_then_sum (GDPO, arXiv 2601.05242,
    eq. 4): per-reward group normalisation, weighted sum, then batch normalisation over scorable rows."""
    R = _f64(R)
    n, k = R.shape
    w = np.ones(k) if weights is None else _f64(weights)
    unscorable = np.all(np.isnan(R), axis=1)
    if aggregation == "sum_then_normalize":
        r = np.array([np.nan if unscorable[i] else sum(w[j] * R[i, j] for j in range(k) if not np.isnan(R[i, j]))
                      for i in range(n)])
        return group_relative_advantages(r, num_generations, group_ids, scale_rewards, eps)
    groups = _group_lists(n, num_generations, group_ids)
    Rn = np.full((n, k), np.nan)
    for j in range(k):
        for _, rows in groups.items():
            vals = [float(R[i, j]) for i in rows if not np.isnan(R[i, j])]
            const = len(vals) < 2 or max(vals) == min(vals)
            for i in rows:
                if np.isnan(R[i, j]):
                    continue
                Rn[i, j] = 0.0 if const else (R[i, j] - sum(vals) / len(vals)) / (_std1(vals) + eps)
    r = np.array([sum(w[j] * Rn[i, j] for j in range(k) if not np.isnan(Rn[i, j])) for i in range(n)])
    sc = [float(r[i]) for i in range(n) if not unscorable[i]]
    out = np.zeros(n)
    if len(sc) < 2:
        return out
    mean, std = sum(sc) / len(sc), _std1(sc)
    for i in range(n):
        if not unscorable[i]:
            out[i] = (r[i] - mean) / (std + eps)
    return out


def soft_overlong_punishment(lengths, max_len, cache):
    """DAPO (arXiv 2503.14476, eq. 13): 0 if ``|y| ≤ L_max − L_cache``; ``((L_max − L_cache) − |y|)/L_cache``
    if ``≤ L_max``; −1 beyond."""
    out = []
    for L in np.asarray(lengths).reshape(-1):
        L = float(L)
        if L <= max_len - cache:
            out.append(0.0)
        elif L <= max_len:
            out.append(((max_len - cache) - L) / cache)
        else:
            out.append(-1.0)
    return np.array(out)


def group_top_k_mask(scores, k, num_generations=None, group_ids=None):
    """The k highest scores of every group (ties: lower index first)."""
    s = _f64(scores)
    keep = np.zeros(s.shape[0], bool)
    for _, rows in _group_lists(s.shape[0], num_generations, group_ids).items():
        order = sorted(rows, key=lambda i: (-s[i], i))
        keep[order[:k]] = True
    return keep


def gfpo_advantages(rewards, scores, k, num_generations=None, group_ids=None, scale_rewards="group", eps=1e-4):
    """GFPO (arXiv 2508.09726, eq. 2): group-relative advantages over the top-k retained completions only;
    dropped completions get 0. Returns ``(adv, keep)``."""
    keep = group_top_k_mask(scores, k, num_generations, group_ids)
    r = np.where(keep, _f64(rewards), np.nan)
    return group_relative_advantages(r, num_generations, group_ids, scale_rewards, eps), keep


def adaptive_entropy_coef(coef, window_entropy, target=0.2, delta=0.005, coef_min=0.0, coef_max=1.0):
    """Skywork-OR1 (arXiv 2505.22312, sec. 3.2.3): ``c + Δ`` (capped) if ``H ≤ target`` else ``c − Δ``
    (floored)."""
    if window_entropy <= target:
        return min(coef + delta, coef_max)
    return max(coef - delta, coef_min)


# ------------------------------------------------------------------------------------------ the recipe


def policy_loss(logps, old_logps, adv, mask, cfg, *, ref_logps=None, sampler_logps=None, entropies=None,
                num_items=None, num_sequences=None, truncated=None, frozen=None):
    """The GRPO-family loss, in the order documented in ``objectives/policy.py``:

    1. log-ratio at ``importance_sampling_level`` (token ``log π − log π_old``; sequence: GSPO mean,
       ``[B, 1]``; sequence_token: GSPO-token), clamped to ±``log_ratio_clamp``, exponentiated;
    2. surrogate (PPO clip / CISPO / SAPO / VESPO);
    3. × OPSM; 4. × high-entropy mask; 5. × sampler ρ (not VESPO, whose φ contains ρ);
    6. + β·KL (× ratio with bias correction), not masked by 3–5; 7. aggregation of ``loss_type``;
    8. − entropy_coef × mean entropy over the effective mask (× ``Σ mask / num_items`` when the global
       token count ``num_items`` is given, so micro-batch losses add up).

    ``cfg`` is a ``PolicyLossConfig`` (only its fields are read). ``frozen``: stop-gradient copy of
    ``logps`` (see the module docstring). Returns the scalar loss (float).
    """
    logps = _f64(logps)
    frozen = logps if frozen is None else _f64(frozen)
    mask = np.asarray(mask, bool)
    B, T = mask.shape
    if cfg.mask_truncated_completions and truncated is not None:
        mask = mask_truncated_completions(mask, truncated)
    A = _col(adv, B)
    old = frozen if old_logps is None else _f64(old_logps)
    clamp = cfg.log_ratio_clamp
    level = cfg.importance_sampling_level

    def ratio_of(live):
        if level == "token":
            lr = token_log_ratio(live, old, mask)
        elif level == "sequence":
            lr = sequence_log_ratio(live, old, mask)
        else:
            lr = gspo_token_log_ratio(live, old, mask, frozen)
        return safe_exp(lr, clamp)

    ratio = ratio_of(logps)
    ratio_c = ratio_of(frozen)  # constant value (for CISPO's stop-gradient weight)

    rho = None
    if cfg.sampler_correction is not None:
        rho = sampler_importance_weights(old, sampler_logps, mask, cfg.sampler_correction,
                                         cfg.sampler_clip_min, cfg.sampler_clip_max)

    lt = cfg.loss_type
    eps_l = cfg.epsilon
    eps_h = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    lp_safe = np.where(mask, logps, 0.0)
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        L = ppo_clip_loss(ratio, A, eps_l, eps_h, cfg.delta)
    elif lt == "cispo":
        L = cispo_loss(ratio_c, A, lp_safe, eps_h)
    elif lt == "sapo":
        L = sapo_loss(ratio, A, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    elif lt == "vespo":
        lis = None
        if rho is not None:
            with np.errstate(divide="ignore"):
                lis = np.log(rho)
        phi = vespo_weights(token_log_ratio(frozen, old, mask), A, mask, lis, cfg.vespo_k_pos,
                            cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg)
        L = vespo_loss(phi, A, lp_safe)
    else:
        raise ValueError(lt)
    L = np.broadcast_to(L, (B, T)).copy() if L.shape != (B, 1) else L

    if cfg.off_policy_mask_threshold is not None:
        beh = old if sampler_logps is None else _f64(sampler_logps)
        L = L * off_policy_sequence_mask(A, frozen, beh, mask, cfg.off_policy_mask_threshold)

    eff_mask = mask
    if cfg.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(entropies, mask, cfg.top_entropy_quantile)
        L = np.where(keep, np.broadcast_to(L, (B, T)), 0.0)
        eff_mask = keep

    if rho is not None and lt != "vespo":
        L = L * rho

    if cfg.beta != 0.0:
        kl = kl_penalty(lp_safe, ref_logps, mask, cfg.kl_estimator, clamp=clamp)
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
        L = L + cfg.beta * kl

    loss = aggregate(L, mask, lt, num_items, num_sequences, cfg.max_completion_length)
    if cfg.entropy_coef != 0.0:
        bonus = entropy_bonus(entropies, eff_mask)
        if num_items is not None:  # this micro-batch's share of the global token count
            bonus *= mask.sum() / max(float(num_items), 1.0)
        loss -= cfg.entropy_coef * bonus
    return float(loss)

