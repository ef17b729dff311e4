"""Plain NumPy float64 references for the beyond-TRL objectives (issue 3), written from the papers.

Independent of JAX and of trlax: explicit loops over rows / tokens. Conventions as ``_numpy_ref``:
a reference whose maths contains ``sg(log π_θ)`` takes the live ``logps`` and a ``frozen`` copy (defaults
to ``logps``); every stop-gradient use reads ``frozen``, so central finite differences in ``logps`` with
``frozen`` fixed give the gradient ``jax.grad`` must produce. Old / reference log-probs and advantages are
constants. Per-token arrays ``[B, T]``, masks ``[B, T]`` bool, advantages ``[B, 1]`` or ``[B, T]``.
"""

from __future__ import annotations

import math

import numpy as np

from _numpy_ref import aggregate, fd_grad, kl_penalty  # noqa: F401  (re-exported for the tests)


def _f(x):
    return np.asarray(x, dtype=np.float64)


def _adv2d(adv, shape):
    a = _f(adv)
    if a.ndim == 1 and len(shape) == 2:
        a = a[:, None]
    return np.broadcast_to(a, shape)


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


# ------------------------------------------------------------------------------------------ surrogates


def dual_clip_ppo(ratio, adv, eps_low, eps_high, c):
    """Dual-clip PPO (arXiv 1912.09729, eq. 5): ``L = max(−A r, −A clip(r))``; for ``A < 0``
    ``L = min(L, −A c)``. Elementwise loops."""
    r = _f(ratio)
    A = _adv2d(adv, r.shape)
    out = np.empty(r.shape)
    for ix in np.ndindex(r.shape):
        ri, ai = float(r[ix]), float(A[ix])
        L = max(-ai * ri, -ai * _clip(ri, 1 - eps_low, 1 + eps_high))
        if c is not None and ai < 0:
            L = min(L, -ai * c)
        out[ix] = L
    return out


def reinforce(logps, adv, weights=None):
    """REINFORCE / GPG (arXiv 2504.02546, eq. 5): ``−w A log π``."""
    lp = _f(logps)
    A = _adv2d(adv, lp.shape)
    w = np.ones(lp.shape) if weights is None else np.broadcast_to(_f(weights), lp.shape)
    return -w * A * lp


def gmpo(logps, old, adv, mask, eps_low, eps_high, clamp=20.0):
    """GMPO (arXiv 2507.20673, eq. 4), per row: sign-aware log-space token clip, geometric mean,
    mean advantage. Returns ``[B, 1]``."""
    lp, o = _f(logps), _f(old)
    mask = np.asarray(mask, bool)
    A = _adv2d(adv, lp.shape)
    B, T = lp.shape
    out = np.zeros((B, 1))
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t]]
        if not idx:
            continue
        s, a_sum = 0.0, 0.0
        for t in idx:
            d = lp[i, t] - o[i, t]
            a = A[i, t]
            sg = int(a > 0) - int(a < 0)
            if sg > 0:
                dt = min(d, _clip(d, -eps_low, eps_high))
            elif sg < 0:
                dt = max(d, _clip(d, -eps_low, eps_high))
            else:
                dt = 0.0
            s += dt
            a_sum += a
        m = s / len(idx)
        if clamp is not None:
            m = _clip(m, -clamp, clamp)
        out[i, 0] = -(a_sum / len(idx)) * math.exp(m)
    return out


def covariance(adv, logps, mask):
    """Cui et al. 2025 (arXiv 2505.22617, eq. 11): ``(A − mean A)(log π − mean log π)`` over valid tokens."""
    lp = _f(logps)
    mask = np.asarray(mask, bool)
    A = _adv2d(adv, lp.shape)
    vals = [(A[ix], lp[ix]) for ix in np.ndindex(lp.shape) if mask[ix]]
    out = np.zeros(lp.shape)
    if not vals:
        return out
    ma = sum(v[0] for v in vals) / len(vals)
    ml = sum(v[1] for v in vals) / len(vals)
    for ix in np.ndindex(lp.shape):
        if mask[ix]:
            out[ix] = (A[ix] - ma) * (lp[ix] - ml)
    return out


def kl_cov_selection(cov, mask, ratio):
    """The ``max(⌊ratio·N⌋, 1)`` valid tokens with the largest covariance (ties: lower flat index)."""
    mask = np.asarray(mask, bool)
    items = [(-float(cov[ix]), k, ix) for k, ix in enumerate(np.ndindex(mask.shape)) if mask[ix]]
    sel = np.zeros(mask.shape, bool)
    if not items:
        return sel
    k = max(int(math.floor(ratio * len(items))), 1)
    for _, _, ix in sorted(items)[:k]:
        sel[ix] = True
    return sel


def clip_cov_candidates(cov, mask, ratio, adv, eps_low, eps_high, lb, ub):
    """Clip-Cov candidates: valid, not clipped by PPO (``−A·clip(r) > −A·r``), ``lb < cov < ub``."""
    r = _f(ratio)
    A = _adv2d(adv, r.shape)
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    for ix in np.ndindex(mask.shape):
        clipped = -A[ix] * _clip(r[ix], 1 - eps_low, 1 + eps_high) > -A[ix] * r[ix]
        out[ix] = mask[ix] and not clipped and lb < cov[ix] < ub
    return out


def clip_cov_loss(ratio, adv, selected, eps_low, eps_high):
    return np.where(selected, 0.0, dual_clip_ppo(ratio, adv, eps_low, eps_high, None))


def kl_cov_loss(ratio, log_ratio, adv, selected, coef):
    r = _f(ratio)
    A = _adv2d(adv, r.shape)
    return -A * r + np.where(selected, coef * np.abs(_f(log_ratio)), 0.0)


def aspo(logps, old, adv, eps_low, eps_high, c_neg, c_pos, frozen=None, clamp=20.0):
    """ASPO (arXiv 2510.06062), elementwise. Negative side ``−A·max(r, 1−ε)`` or ``−A c_neg log π``
    when ``max(r,1−ε) > c_neg``. Positive side ``−A·(r_c/sg r_c)/sg r_c`` with ``r_c = min(r, 1+ε)``,
    or ``−A c_pos log π`` when ``1/r_c > c_pos``."""
    lp, o = _f(logps), _f(old)
    fr = lp if frozen is None else _f(frozen)
    A = _adv2d(adv, lp.shape)
    out = np.empty(lp.shape)
    for ix in np.ndindex(lp.shape):
        a = A[ix]
        r = math.exp(_clip(lp[ix] - o[ix], -clamp, clamp))
        r0 = math.exp(_clip(fr[ix] - o[ix], -clamp, clamp))
        if a < 0:
            rc0 = max(r0, 1 - eps_low)
            out[ix] = -a * c_neg * lp[ix] if rc0 > c_neg else -a * max(r, 1 - eps_low)
        else:
            rc0 = min(r0, 1 + eps_high)
            if 1.0 / rc0 > c_pos:
                out[ix] = -a * c_pos * lp[ix]
            else:
                out[ix] = -a * (min(r, 1 + eps_high) / rc0) / rc0
    return out


def topr(logps, ratio_frozen, adv, wp=1.0, wn=1.0):
    """TOPR (arXiv 2503.14286, eq. 9): ``A ≥ 0``: ``−w₊ A log π``; ``A < 0``: ``−w₋ clip(r,0,1) A log π``."""
    lp = _f(logps)
    A = _adv2d(adv, lp.shape)
    r = np.broadcast_to(_f(ratio_frozen), lp.shape)
    out = np.empty(lp.shape)
    for ix in np.ndindex(lp.shape):
        if A[ix] >= 0:
            out[ix] = -wp * A[ix] * lp[ix]
        else:
            out[ix] = -wn * _clip(r[ix], 0.0, 1.0) * A[ix] * lp[ix]
    return out


def dppo_keep(logps, behav, adv, mask, d_low, d_high, divergence):
    """DPPO (arXiv 2602.04879): binary-TV / binary-KL trust-region keep mask, elementwise."""
    lp, lb = _f(logps), _f(behav)
    A = _adv2d(adv, lp.shape)
    mask = np.asarray(mask, bool)
    out = np.zeros(lp.shape, bool)
    for ix in np.ndindex(lp.shape):
        if not mask[ix]:
            continue
        lpi, lbi = min(lp[ix], 0.0), min(lb[ix], 0.0)  # log-probs clamped to <= 0
        p, mu = math.exp(lpi), math.exp(lbi)
        if divergence == "binary_tv":
            ok = (p - mu <= d_high) if A[ix] > 0 else (p - mu >= -d_low)
        else:
            D = mu * (lbi - lpi) + (1 - mu) * math.log((1 - mu + 1e-8) / (1 - p + 1e-8))
            ok = (D <= d_high or p <= mu) if A[ix] > 0 else (D <= d_low or p >= mu)
        out[ix] = ok
    return out


def dppo_loss(logps, ratio_frozen, adv, keep, cap=20.0):
    lp = _f(logps)
    A = _adv2d(adv, lp.shape)
    w = np.minimum(_f(ratio_frozen), cap)
    return np.where(keep, -w * A * lp, 0.0)


def m2po_keep(log_ratio, mask, threshold):
    """M2PO (arXiv 2510.01161): drop the largest ``(log r)²`` one at a time until the mean of the rest is
    below the threshold."""
    mask = np.asarray(mask, bool)
    items = sorted([(-(float(log_ratio[ix]) ** 2), k, ix) for k, ix in enumerate(np.ndindex(mask.shape)) if mask[ix]])
    keep = mask.copy()
    rest = [-v for v, _, _ in items]
    j = 0
    while j < len(items) and sum(rest[j:]) / (len(items) - j) >= threshold:
        keep[items[j][2]] = False
        j += 1
    return keep


def m2po_loss(ratio, adv, keep):
    r = _f(ratio)
    A = _adv2d(adv, r.shape)
    return np.where(keep, -A * r, 0.0)


def row_quantile_high(ent, mask, q):
    """Tokens strictly above the row's ``q`` quantile (linear interpolation, as ``torch.nanquantile``)."""
    ent = _f(ent)
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    for i in range(ent.shape[0]):
        vals = np.sort(ent[i][mask[i]])
        if vals.size == 0:
            continue
        pos = q * (vals.size - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, vals.size - 1)
        thr = vals[lo] + (pos - lo) * (vals[hi] - vals[lo])
        out[i] = mask[i] & (ent[i] > thr)
    return out


# ---------------------------------------------------------------------------------------------------- KL


def straight_through_kl(logps, ref, mask, value_kind, frozen=None, clamp=20.0):
    """``sg(f(d)) + ½d² − sg(½d²)``: ``frozen`` supplies the stop-gradient copy of ``logps``."""
    lp = _f(logps)
    fr = lp if frozen is None else _f(frozen)
    d = np.clip(np.where(mask, lp - _f(ref), 0.0), -clamp, clamp)
    d0 = np.clip(np.where(mask, fr - _f(ref), 0.0), -clamp, clamp)
    val = kl_penalty(np.where(mask, fr, 0.0), np.where(mask, ref, 0.0), mask, value_kind, clamp)
    return np.where(mask, val + 0.5 * d * d - 0.5 * d0 * d0, 0.0)


def kl_in_reward(scores, logps, ref, mask, beta, kind="k1"):
    """``r_t = s_t − β KL_t`` on valid tokens; returns ``(rewards, mean over rows of row-mean KL)``."""
    mask = np.asarray(mask, bool)
    kl = kl_penalty(logps, ref, mask, kind)
    rew = np.where(mask, np.where(mask, _f(scores), 0.0) - beta * kl, 0.0)
    rows = []
    for i in range(mask.shape[0]):
        n = mask[i].sum()
        rows.append(kl[i][mask[i]].sum() / n if n else 0.0)
    return rew, float(np.mean(rows))


def adaptive_kl(beta, kl, n_steps, target=0.1, horizon=10000.0):
    """Ziegler et al. 2019 (arXiv 1909.08593, eq. 2)."""
    e = _clip(kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + e * n_steps / horizon)
