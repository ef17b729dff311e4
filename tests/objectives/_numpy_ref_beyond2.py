"""Plain NumPy float64 references for the rollout corrections and advantage estimators beyond TRL.

Written from the papers / verl's documented formulas with explicit Python loops over rows, groups and
time steps; independent of JAX and of trlax's implementation. Used by ``test_beyond_correction.py``
and ``test_beyond_advantages.py``.

Conventions: per-token arrays ``[B, T]``, masks ``[B, T]`` bool; masked entries are never read (they may
hold NaN); NaN sampler / old log-probs at a valid position mean "no correction" (``log ρ = 0``), NaN
rewards mean "unscorable" (left out of group statistics, advantage 0).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def _f(x):
    return np.asarray(x, dtype=np.float64)


def _groups(gid):
    out = defaultdict(list)
    for i, g in enumerate(np.asarray(gid).tolist()):
        out[g].append(i)
    return out


def _clamp(x, c):
    return x if c is None else min(max(x, -c), c)


# =============================================================================== rollout correction


def log_ratio(old, samp, mask):
    old, samp, mask = _f(old), _f(samp), np.asarray(mask, bool)
    B, T = mask.shape
    d = np.zeros((B, T))
    for i in range(B):
        for t in range(T):
            if mask[i, t] and not (math.isnan(old[i, t]) or math.isnan(samp[i, t])):
                d[i, t] = old[i, t] - samp[i, t]
    return d


def rejection_mask(old, samp, mask, option, upper, lower=None, clamp=20.0):
    """verl ``rollout_rs`` semantics with k1 compared as a *ratio* interval (the fixed behaviour)."""
    mask = np.asarray(mask, bool)
    d = log_ratio(old, samp, mask)
    B, T = mask.shape
    level, kind = option.rsplit("_", 1)
    if kind == "k1" and lower is None:
        lower = 1.0 / upper
    keep = np.zeros((B, T), bool)
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        stats = []
        for t in toks:
            x = _clamp(d[i, t], clamp)
            stats.append({"k1": x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1.0 - x}[kind])

        def ok(s):
            if kind == "k1":
                return math.log(lower) <= s <= math.log(upper)
            return s <= upper

        if level == "token":
            for t, s in zip(toks, stats):
                keep[i, t] = ok(s)
            continue
        if not toks:
            continue
        if level == "seq_sum":
            s = sum(stats)
        elif level == "seq_mean":
            s = sum(stats) / len(stats)
        else:
            s = max(stats)
        for t in toks:
            keep[i, t] = ok(s)
    return keep


def verl_k1_buggy_keep(log_rho, lower, upper):
    """verl (commit b178a3cd) ``token_k1``: ``k1 = −log ρ`` compared with ``[log lower, log upper]``."""
    k1 = -log_rho
    return (k1 >= math.log(lower)) and (k1 <= math.log(upper))


def veto_mask(old, samp, mask, threshold, clamp=20.0):
    mask = np.asarray(mask, bool)
    d = log_ratio(old, samp, mask)
    keep = np.zeros_like(mask)
    for i in range(mask.shape[0]):
        bad = any(math.exp(_clamp(d[i, t], clamp)) < threshold for t in range(mask.shape[1]) if mask[i, t])
        keep[i] = mask[i] & (not bad)
    return keep


def is_weights(old, samp, mask, level="token", upper=2.0, lower=None, clamp=20.0):
    mask = np.asarray(mask, bool)
    d = log_ratio(old, samp, mask)
    B, T = mask.shape
    w = np.zeros((B, T))
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        if level == "sequence":
            lw_row = sum(d[i, t] for t in toks)
        elif level == "geometric":
            lw_row = sum(d[i, t] for t in toks) / max(len(toks), 1)
        for t in toks:
            lw = d[i, t] if level == "token" else lw_row
            x = math.exp(_clamp(lw, clamp))
            if upper is not None:
                x = min(x, upper)
            if lower is not None:
                x = max(x, lower)
            w[i, t] = x
    return w


def self_normalize(w, mask, level="token", eps=1e-8):
    w, mask = _f(w), np.asarray(mask, bool)
    if level == "token":
        vals = [w[i, t] for i in range(w.shape[0]) for t in range(w.shape[1]) if mask[i, t]]
    else:
        vals = [np.mean([w[i, t] for t in range(w.shape[1]) if mask[i, t]])
                for i in range(w.shape[0]) if mask[i].any()]
    mean = float(np.mean(vals)) if vals else 0.0
    out = np.where(mask, w, 0.0)
    return out / mean if mean > eps else out


def mismatch_metrics(old, samp, mask, weights=None, clamp=20.0):
    old, samp, mask = _f(old), _f(samp), np.asarray(mask, bool)
    ok = mask & ~np.isnan(old) & ~np.isnan(samp)
    B, T = mask.shape
    toks = [(i, t) for i in range(B) for t in range(T) if ok[i, t]]
    rows = [i for i in range(B) if ok[i].any()]
    d = {(i, t): old[i, t] - samp[i, t] for (i, t) in toks}
    dc = {k: _clamp(v, clamp) for k, v in d.items()}
    tmean = lambda f: float(np.mean([f(k) for k in toks])) if toks else 0.0  # noqa: E731
    rmean = lambda f: float(np.mean([f(i) for i in rows])) if rows else 0.0  # noqa: E731
    mo = {i: np.mean([old[i, t] for t in range(T) if ok[i, t]]) for i in rows}
    ms = {i: np.mean([samp[i, t] for t in range(T) if ok[i, t]]) for i in rows}
    mdc = {i: np.mean([dc[(i, t)] for t in range(T) if ok[i, t]]) for i in rows}
    seq = {i: _clamp(sum(d[(i, t)] for t in range(T) if ok[i, t]), clamp) for i in rows}
    if weights is None:
        w = {k: math.exp(dc[k]) for k in toks}
    else:
        W = np.broadcast_to(_f(weights), mask.shape)
        w = {k: W[k] for k in toks}
    mw = tmean(lambda k: w[k])
    mw2 = tmean(lambda k: w[k] ** 2)
    return {
        "kl": tmean(lambda k: -dc[k]),
        "k3_kl": tmean(lambda k: math.exp(dc[k]) - 1.0 - dc[k]),
        "training_ppl": rmean(lambda i: math.exp(min(-mo[i], 80.0))),
        "training_log_ppl": rmean(lambda i: -mo[i]),
        "rollout_ppl": rmean(lambda i: math.exp(min(-ms[i], 80.0))),
        "rollout_log_ppl": rmean(lambda i: -ms[i]),
        "log_ppl_diff": rmean(lambda i: -mdc[i]),
        "ppl_ratio": rmean(lambda i: math.exp(-mdc[i])),
        "chi2_token": tmean(lambda k: math.exp(2 * dc[k])) - 1.0 if toks else 0.0,
        "chi2_seq": rmean(lambda i: math.exp(2 * seq[i])) - 1.0 if rows else 0.0,
        "is_weight": mw,
        "is_weight_sq": mw2,
        "ess": mw * mw / mw2 if mw2 > 0 else 0.0,
    }


# ====================================================================================== advantages


def _valid_group(r, idx):
    return [i for i in idx if not math.isnan(r[i])]


def _std_unbiased(x):
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.sum((x - x.mean()) ** 2) / (len(x) - 1)))


def rloo(r, gid, singleton="zero"):
    r = _f(r)
    out = np.zeros_like(r)
    for idx in _groups(gid).values():
        v = _valid_group(r, idx)
        if len(v) == 1 and singleton == "raw":
            out[v[0]] = r[v[0]]
        if len(v) < 2 or len(set(r[v].tolist())) == 1:
            continue
        for i in v:
            out[i] = r[i] - sum(r[j] for j in v if j != i) / (len(v) - 1)
    return out


def maxrl(r, gid, eps=1e-6):
    r = _f(r)
    out = np.zeros_like(r)
    for idx in _groups(gid).values():
        v = _valid_group(r, idx)
        if len(v) < 2 or len(set(r[v].tolist())) == 1:
            continue
        mu = float(np.mean(r[v]))
        for i in v:
            out[i] = (r[i] - mu) / (mu + eps)
    return out


def opo(r, lengths, gid, singleton="zero"):
    r, L = _f(r), _f(lengths)
    out = np.zeros_like(r)
    for idx in _groups(gid).values():
        v = _valid_group(r, idx)
        if len(v) == 1 and singleton == "raw":
            out[v[0]] = r[v[0]]
        if len(v) < 2 or len(set(r[v].tolist())) == 1:
            continue
        den = sum(L[i] for i in v)
        b = sum(L[i] * r[i] for i in v) / den if den > 0 else float(np.mean(r[v]))
        for i in v:
            out[i] = r[i] - b
    return out


def passk(r, gid, scale_by_std=True, eps=1e-6):
    r = _f(r)
    out = np.zeros_like(r)
    for idx in _groups(gid).values():
        v = _valid_group(r, idx)
        if len(v) < 2:
            continue
        order = sorted(v, key=lambda i: (-r[i], i))
        best, second = order[0], order[1]
        a = r[best] - r[second]
        if scale_by_std:
            a = a / (_std_unbiased(r[v]) + eps)
        out[best] = a
    return out


def dynamic_keep(s, gid):
    s = _f(s)
    keep = np.zeros(len(s), bool)
    for idx in _groups(gid).values():
        v = _valid_group(s, idx)
        k = len(v) >= 2 and len(set(s[v].tolist())) > 1
        for i in idx:
            keep[i] = k
    return keep


def whiten(x, mask, shift_mean=True, eps=1e-8):
    x, mask = _f(x), np.broadcast_to(np.asarray(mask, bool), np.shape(x))
    vals = x[mask]
    out = np.zeros_like(x)
    if vals.size == 0:
        return out
    mean = vals.mean()
    if np.all(vals == vals[0]):
        dev = np.zeros_like(x)
    else:
        dev = x - mean
    var = float(np.sum(dev[mask] ** 2) / (vals.size - 1)) if vals.size > 1 else 0.0
    res = dev / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    out[mask] = res[mask]
    return out


def returns_to_go(rew, mask, gamma=1.0):
    rew, mask = _f(rew), np.asarray(mask, bool)
    B, T = mask.shape
    G = np.zeros((B, T))
    for i in range(B):
        g = 0.0
        for t in reversed(range(T)):
            if mask[i, t]:
                g = rew[i, t] + gamma * g
                G[i, t] = g
    return G


def gae(rew, values, mask, gamma, lam, bootstrap=None):
    rew, values, mask = _f(rew), _f(values), np.asarray(mask, bool)
    B, T = mask.shape
    A = np.zeros((B, T))
    R = np.zeros((B, T))
    for i in range(B):
        nv = 0.0 if bootstrap is None else float(np.ravel(bootstrap)[i])
        last = 0.0
        for t in reversed(range(T)):
            if not mask[i, t]:
                continue
            delta = rew[i, t] + gamma * nv - values[i, t]
            last = delta + gamma * lam * last
            A[i, t] = last
            R[i, t] = last + values[i, t]
            nv = values[i, t]
    return A, R


def value_loss(v, old, ret, mask, clip):
    """Returns (per-token loss, clipped indicator) and the analytic d(Σ loss)/dv."""
    v, old, ret, mask = _f(v), _f(old), _f(ret), np.asarray(mask, bool)
    L = np.zeros_like(v)
    C = np.zeros(v.shape, bool)
    G = np.zeros_like(v)
    for i, t in zip(*np.nonzero(mask)):
        l1 = (v[i, t] - ret[i, t]) ** 2
        if clip is None:
            L[i, t], G[i, t] = 0.5 * l1, v[i, t] - ret[i, t]
            continue
        diff = v[i, t] - old[i, t]
        inside = -clip < diff < clip
        vc = old[i, t] + min(max(diff, -clip), clip)
        l2 = (vc - ret[i, t]) ** 2
        L[i, t] = 0.5 * max(l1, l2)
        C[i, t] = l2 > l1
        if l2 > l1:
            G[i, t] = (vc - ret[i, t]) if inside else 0.0
        else:
            G[i, t] = v[i, t] - ret[i, t]
    return L, C, G


def remax(rew, base, mask):
    G = returns_to_go(rew, mask, 1.0)
    mask = np.asarray(mask, bool)
    A = np.where(mask, G - _f(base).reshape(-1, 1), 0.0)
    return A, G


def sum_pi_sq(logits):
    z = _f(logits)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.sum(p * p, axis=-1)


def otb(rew, old_lp, spsq, mask, gid, is_w=None, zero_tail=False, eps=1e-8):
    rew, old_lp, spsq, mask = _f(rew), _f(old_lp), _f(spsq), np.asarray(mask, bool)
    B, T = mask.shape
    G = returns_to_go(rew, mask, 1.0)
    W = np.zeros((B, T))
    for i in range(B):
        acc = 0.0
        for t in range(T):
            if mask[i, t]:
                w = 1.0 - 2.0 * math.exp(old_lp[i, t]) + spsq[i, t]
                if is_w is not None:
                    w *= _f(is_w)[i, t] ** 2
                acc += w
            W[i, t] = acc
    base = np.zeros((B, T))
    for idx in _groups(gid).values():
        if len(idx) == 1:
            continue
        for t in range(T):
            num = sum(G[i, t] * W[i, t] for i in idx if mask[i, t])
            den = sum(W[i, t] for i in idx if mask[i, t]) + eps
            for i in idx:
                base[i, t] = num / den
        if zero_tail:
            lens = {i: int(mask[i].sum()) for i in idx}
            srt = sorted(lens.values())
            longest = [i for i in idx if lens[i] == srt[-1]]
            if len(longest) == 1 and srt[-1] > srt[-2]:
                base[longest[0], srt[-2]:] = 0.0
    A = np.where(mask, G - base, 0.0)
    return A, G


def entropy_shaping(adv, H, mask, alpha, kappa):
    H, mask = _f(H), np.asarray(mask, bool)
    a = _f(adv)
    a = np.broadcast_to(a.reshape(a.shape[0], -1), H.shape)
    out = np.zeros_like(H)
    for i, t in zip(*np.nonzero(mask)):
        out[i, t] = a[i, t] + min(alpha * H[i, t], abs(a[i, t]) / kappa)
    return out


def prompt_mean_loss(L, mask, gid):
    """(1/P) Σ_prompts (Σ_tokens-of-prompt L / #tokens-of-prompt), P = prompts with tokens."""
    L, mask = _f(L), np.asarray(mask, bool)
    per = []
    for idx in _groups(gid).values():
        n = sum(int(mask[i].sum()) for i in idx)
        if n == 0:
            continue
        per.append(sum(L[i, t] for i in idx for t in range(L.shape[1]) if mask[i, t]) / n)
    return float(np.mean(per)) if per else 0.0
