"""Beyond-TRL policy surrogates and KL variants (issue 3, part 1).

1. Float64 NumPy references (``_numpy_ref_beyond``, written from the papers): values and gradients w.r.t.
   ``logps`` of every primitive and of ``policy_loss`` for every new loss type / option. Gradients are
   analytic where simple (rtol 1e-6) or central finite differences of the NumPy reference with the
   stop-gradient copy held fixed (rtol 1e-5, atol 1e-7).
2. verl fixtures: literal expected outputs on fixed inputs, computed with NumPy from verl's *documented
   formulas* (``verl/trainer/ppo/core_algos.py``: ``compute_policy_loss_vanilla``, ``geo_mean``, ``gpg``,
   ``kl_cov``, ``clip_cov``, ``dppo_tv``, ``dppo_kl``, ``kl_penalty`` incl. ``+``, ``AdaptiveKLController``;
   as quoted in ``shared/research/objectives-survey.md`` sec. 1), never by trlax.
3. Hypothesis properties on fixed shapes with cached jitted functions.
4. Regression tests for the survey's sec. 4 pitfalls that apply (4.1, 4.3, 4.6, 4.7, 4.8).
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trlax.objectives as tx
from trlax.objectives import PolicyLossConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _numpy_ref_beyond as ref  # noqa: E402

B, T = 6, 7
RTOL, ATOL = 1e-6, 1e-9
FD_RTOL, FD_ATOL = 1e-5, 1e-7


def close(a, b, rtol=RTOL, atol=ATOL, err=""):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol, err_msg=err)


def make_batch(seed, nan_pad=True, spread=0.35):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T, B)
    lengths[0], lengths[1] = 0, T
    mask = np.arange(T)[None, :] < lengths[:, None]
    mask[2, 1] = False
    logps = -rng.uniform(0.05, 3.0, (B, T))
    old = logps + rng.uniform(-spread, spread, (B, 1)) + rng.normal(0.0, spread, (B, T))
    d = dict(mask=mask, logps=logps, old=old, ref=logps + rng.normal(0.0, 0.5, (B, T)),
             sampler=old + rng.normal(0.0, 0.3, (B, T)), adv=rng.normal(size=(B, 1)),
             adv_tok=rng.normal(size=(B, T)), ent=rng.uniform(0.0, 3.0, (B, T)))
    d["adv"][4, 0] = 0.0
    if nan_pad:
        for k in ("logps", "old", "ref", "sampler", "adv_tok", "ent"):
            d[k][~mask] = np.nan
    return d


D = make_batch(0)
M = D["mask"]


def jgrad(f, x):
    return np.asarray(jax.grad(f)(jnp.asarray(x)))


def fd(f, x, where=M):
    return ref.fd_grad(f, np.nan_to_num(x), where=where)


def z(x):
    """NumPy arrays with the (NaN) padding zeroed, for references that multiply by the mask."""
    return np.where(M, x, 0.0)


LP, OLD = z(D["logps"]), z(D["old"])


def tok_ratio(lp, old=OLD):
    return np.exp(np.clip(np.where(M, lp - old, 0.0), -20, 20))


# ================================================================================ 1. NumPy references


@pytest.mark.parametrize("c", [None, 1.3, 3.0])
def test_dual_clip_reference(c):
    A = D["adv_tok"]
    A0 = z(A)
    f = lambda lp: jnp.sum(jnp.where(M, tx.ppo_clip_loss(jnp.exp(lp - OLD), A0, 0.2, 0.28, clip_ratio_c=c), 0.0))
    close(np.where(M, tx.ppo_clip_loss(tok_ratio(LP), A0, 0.2, 0.28, clip_ratio_c=c), 0), z(ref.dual_clip_ppo(tok_ratio(LP), A0, 0.2, 0.28, c)))
    g = jgrad(f, LP)
    gn = fd(lambda lp: float(np.sum(z(ref.dual_clip_ppo(tok_ratio(lp), A0, 0.2, 0.28, c)))), LP)
    close(g, gn, FD_RTOL, FD_ATOL)
    if c is not None:  # A < 0 and r > c: no gradient at all (the dual clip is the active branch)
        dual = np.asarray(tx.dual_clip_indicator(tok_ratio(LP), A0, 0.2, 0.28, c)) & M
        assert dual.any() or c == 3.0
        assert np.all(g[dual] == 0.0)


def test_reinforce_reference():
    w = np.abs(D["adv_tok"])
    for weights in (None, z(w)):
        got = tx.reinforce_loss(LP, D["adv"], weights)
        close(got, ref.reinforce(LP, D["adv"], weights))
        g = jgrad(lambda lp: jnp.sum(tx.reinforce_loss(lp, D["adv"], weights)), LP)
        close(g, -(1.0 if weights is None else weights) * np.broadcast_to(D["adv"], LP.shape))
        # weights are constants
        if weights is not None:
            assert np.all(jgrad(lambda w_: jnp.sum(tx.reinforce_loss(LP, D["adv"], w_)), weights) == 0.0)


@pytest.mark.parametrize("eps", [(0.4, None), (0.05, 0.1)])
@pytest.mark.parametrize("adv_key", ["adv", "adv_tok"])
def test_gmpo_reference(eps, adv_key):
    A = D[adv_key]
    lo, hi = eps
    hi_ = lo if hi is None else hi
    lr = np.where(M, LP - OLD, 0.0)
    got = tx.gmpo_loss(lr, A, M, lo, hi)
    close(got, ref.gmpo(LP, OLD, A, M, lo, hi_))
    g = jgrad(lambda lp: jnp.sum(tx.gmpo_loss(jnp.where(M, lp - OLD, 0.0), A, M, lo, hi)), LP)
    gn = fd(lambda lp: float(np.sum(ref.gmpo(lp, OLD, A, M, lo, hi_))), LP)
    close(g, gn, FD_RTOL, FD_ATOL)
    assert float(got[0, 0]) == 0.0  # empty row


def test_covariance_and_kl_cov_reference():
    A = D["adv_tok"]
    cov = tx.covariance_scores(A, D["logps"], M)
    close(cov, ref.covariance(z(A), LP, M), atol=1e-12)
    for frac in (1e-4, 0.1, 0.3, 1.0):
        sel = np.asarray(tx.kl_cov_mask(cov, M, frac))
        assert np.array_equal(sel, ref.kl_cov_selection(np.asarray(cov), M, frac)), frac
    sel = ref.kl_cov_selection(np.asarray(cov), M, 0.2)
    lr = np.where(M, LP - OLD, 0.0)
    got = tx.kl_cov_loss(tok_ratio(LP), lr, z(A), sel, 0.7)
    close(np.where(M, got, 0), z(ref.kl_cov_loss(tok_ratio(LP), lr, z(A), sel, 0.7)))
    g = jgrad(lambda lp: jnp.sum(jnp.where(M, tx.kl_cov_loss(jnp.exp(lp - OLD), lp - OLD, z(A), sel, 0.7), 0.0)), LP)
    r = tok_ratio(LP)
    close(g, z(-z(A) * r + np.where(sel, 0.7 * np.sign(LP - OLD), 0.0)))


def test_clip_cov_selection_and_loss():
    A = z(D["adv_tok"]) * 3.0
    cov = np.asarray(tx.covariance_scores(A, LP, M))
    r = tok_ratio(LP)
    region = np.asarray(tx.clip_indicators(r, A, 0.2, 0.28)[2])
    cand = ref.clip_cov_candidates(cov, M, r, A, 0.2, 0.28, 0.05, 5.0)
    assert cand.sum() >= 4
    for frac in (0.02, 0.1, 1.0):
        k = max(int(math.floor(frac * M.sum())), 1)
        for seed in range(3):
            sel = np.asarray(tx.clip_cov_mask(cov, M, region, jax.random.PRNGKey(seed), frac, 0.05, 5.0))
            assert sel.sum() == min(k, cand.sum())
            assert np.all(cand[sel])
    # uniform over the candidates: k = 1, 600 keys
    keys = jax.random.split(jax.random.PRNGKey(7), 600)
    sels = np.asarray(jax.vmap(lambda kk: tx.clip_cov_mask(cov, M, region, kk, 1e-6, 0.05, 5.0))(keys))
    freq = sels.reshape(600, -1).mean(0)[cand.reshape(-1)]
    n = cand.sum()
    assert np.all(np.abs(freq - 1.0 / n) < 4 * math.sqrt((1 / n) * (1 - 1 / n) / 600) + 1e-9), freq
    # the loss with a given selection
    sel = np.asarray(tx.clip_cov_mask(cov, M, region, jax.random.PRNGKey(0), 0.1, 0.05, 5.0))
    close(np.where(M, tx.clip_cov_loss(r, A, sel, 0.2, 0.28), 0), z(ref.clip_cov_loss(r, A, sel, 0.2, 0.28)))
    g = jgrad(lambda lp: jnp.sum(jnp.where(M, tx.clip_cov_loss(jnp.exp(lp - OLD), A, sel, 0.2, 0.28), 0.0)), LP)
    assert np.all(g[sel] == 0.0)
    gn = fd(lambda lp: float(np.sum(z(ref.clip_cov_loss(tok_ratio(lp), A, sel, 0.2, 0.28)))), LP)
    close(g, gn, FD_RTOL, FD_ATOL)


@pytest.mark.parametrize("eps,c", [((0.2, 0.2), (3.0, 3.0)), ((0.1, 0.3), (1.2, 1.5))])
def test_aspo_reference(eps, c):
    A = z(D["adv_tok"])
    old = OLD + np.where(np.arange(T) % 3 == 0, 1.2, 0.0)  # some ratios far below 1 (positive dual clip)
    old[3, 2] = LP[3, 2] - 1.5  # r ≈ 4.5: the negative dual clip (if A < 0)
    A[3, 2] = -1.0
    r = tok_ratio(LP, old)
    got = tx.aspo_loss(r, A, LP, eps[0], eps[1], c[0], c[1])
    close(np.where(M, got, 0), z(ref.aspo(LP, old, A, eps[0], eps[1], c[0], c[1])))
    g = jgrad(lambda lp: jnp.sum(jnp.where(M, tx.aspo_loss(jnp.exp(lp - old), A, lp, eps[0], eps[1], c[0], c[1]), 0.0)), LP)
    gn = fd(lambda lp: float(np.sum(z(ref.aspo(lp, old, A, eps[0], eps[1], c[0], c[1], frozen=LP)))), LP)
    close(g, gn, FD_RTOL, FD_ATOL)
    # flipped weight inside the clip range for A > 0: gradient −A/r
    inside = M & (A > 0) & (r < 1 + eps[1]) & (1 / r <= c[1])
    assert inside.any()
    close(g[inside], (-A / r)[inside])


@pytest.mark.parametrize("seq", [False, True])
def test_topr_reference(seq):
    A = D["adv"]
    r = tok_ratio(LP)
    if seq:
        r = np.exp(np.clip(np.sum(np.where(M, LP - OLD, 0), -1, keepdims=True), -20, 20))
    got = tx.topr_loss(r, A, LP, 0.7, 1.3)
    close(np.where(M, got, 0), z(ref.topr(LP, r, A, 0.7, 1.3)))
    g = jgrad(lambda lp: jnp.sum(jnp.where(M, tx.topr_loss(jnp.asarray(r), A, lp, 0.7, 1.3), 0.0)), LP)
    w = np.where(np.broadcast_to(A, LP.shape) >= 0, 0.7, 1.3 * np.clip(np.broadcast_to(r, LP.shape), 0, 1))
    close(g, z(-w * np.broadcast_to(A, LP.shape)))
    assert np.all(jgrad(lambda r_: jnp.sum(tx.topr_loss(r_, A, LP, 0.7, 1.3)), r) == 0.0)  # ratio weight detached


@pytest.mark.parametrize("div", tx.DPPO_DIVERGENCES)
def test_dppo_reference(div):
    A = z(D["adv_tok"])
    old = OLD * 0.5  # probabilities far apart on some tokens
    for lo, hi in ((0.2, 0.2), (0.05, 0.1)):
        keep = np.asarray(tx.dppo_mask(D["logps"], old, A, M, lo, hi, div))
        keep_ref = ref.dppo_keep(LP, old, A, M, lo, hi, div)
        assert np.array_equal(keep, keep_ref)
        assert 0 < keep.sum() < M.sum()
    r = tok_ratio(LP, old)
    got = tx.dppo_loss(r, A, LP, keep, 20.0)
    close(np.where(M, got, 0), z(ref.dppo_loss(LP, r, A, keep)))
    g = jgrad(lambda lp: jnp.sum(tx.dppo_loss(jnp.exp(lp - old), A, lp, keep, 2.0)), LP)
    close(g, np.where(keep, -np.minimum(r, 2.0) * A, 0.0))


def test_m2po_reference():
    lr = np.where(M, LP - OLD, 0.0)
    for thr in (1e-3, 0.04, 0.2, 10.0):
        keep = np.asarray(tx.m2po_mask(lr, M, thr))
        assert np.array_equal(keep, ref.m2po_keep(lr, M, thr)), thr
        rest = lr[keep] ** 2
        assert rest.size == 0 or rest.mean() < thr
    keep = ref.m2po_keep(lr, M, 0.04)
    got = tx.m2po_loss(tok_ratio(LP), D["adv"], keep)
    close(np.where(M, got, 0), z(ref.m2po_loss(tok_ratio(LP), D["adv"], keep)))
    assert not np.any(np.asarray(tx.m2po_mask(lr, np.zeros_like(M), 0.04)))


def test_kimi_and_force_on_policy():
    lr = np.where(M, LP - OLD, 0.0)
    close(tx.squared_log_ratio_penalty(lr, 0.3), 0.3 * lr**2)
    g = jgrad(lambda lp: jnp.sum(tx.kimi_loss(lp, jnp.where(M, lp - OLD, 0.0), D["adv"], 0.2)), LP)
    close(g, -np.broadcast_to(D["adv"], LP.shape) + np.where(M, 0.2 * lr, 0.0))
    f = tx.force_on_policy_log_ratio(D["logps"], M)
    assert np.all(np.asarray(f) == 0.0)
    close(jgrad(lambda lp: jnp.sum(z(D["adv_tok"]) * tx.force_on_policy_log_ratio(lp, M)), D["logps"]),
          z(D["adv_tok"]))


def test_entropy_dependent_epsilon_vs_torch_nanquantile():
    import torch

    for q in (0.5, 0.8, 1.0):
        eps, high = tx.entropy_dependent_epsilon(D["ent"], M, 0.2, 0.4, q)
        assert np.array_equal(np.asarray(high), ref.row_quantile_high(D["ent"], M, q))
        # oracle: torch.nanquantile per row over the valid tokens (Archer's implementation choice)
        ent_t = torch.tensor(np.where(M, D["ent"], np.nan))
        thr = torch.nanquantile(ent_t, q, dim=-1, keepdim=True).numpy()
        want = M & (np.nan_to_num(D["ent"], nan=-1.0) > np.nan_to_num(thr, nan=np.inf))
        assert np.array_equal(np.asarray(high), want)
        close(eps, np.where(want, 0.4, 0.2))
    assert not np.asarray(high)[0].any()  # empty row: all low-entropy


@pytest.mark.parametrize("kind", tx.KL_ESTIMATORS)
def test_straight_through_kl_reference(kind):
    lp, rf = D["logps"], D["ref"]
    st_ = tx.kl_penalty(lp, rf, M, kind + "+")
    close(st_, tx.kl_penalty(lp, rf, M, kind))  # value of the named estimator
    close(st_, ref.straight_through_kl(LP, z(rf), M, kind))
    g = jgrad(lambda x: jnp.sum(tx.kl_penalty(x, rf, M, kind + "+")), lp)
    close(g, z(LP - z(rf)))  # gradient of k2: d
    gk = jgrad(lambda x: jnp.sum(tx.straight_through_kl(x, rf, M, value_kind=kind, grad_kind="k3")), lp)
    close(gk, z(1.0 - np.exp(-(LP - z(rf)))))


def test_kl_in_reward_and_controllers():
    scores = np.zeros((B, T))
    scores[np.arange(B), np.maximum(M.sum(-1) - 1, 0)] = np.arange(B) - 2.0
    for kind in ("k1", "k3", "k2"):
        rew, kl = tx.kl_in_reward(scores, D["old"], D["ref"], M, 0.05, kind)
        rew_r, kl_r = ref.kl_in_reward(scores, OLD, z(D["ref"]), M, 0.05, kind)
        close(rew, rew_r)
        close(kl, kl_r)
    assert np.all(jgrad(lambda x: jnp.sum(tx.kl_in_reward(scores, x, D["ref"], M, 0.05)[0]), D["old"]) == 0.0)
    for beta, kl, n in ((0.001, 0.3, 256), (0.02, 0.05, 64), (0.1, 0.1, 1000), (0.5, 0.0, 8)):
        close(tx.adaptive_kl_controller(beta, kl, n), ref.adaptive_kl(beta, kl, n), rtol=1e-12)
        assert float(tx.fixed_kl_controller(beta, kl, n)) == beta
    # state passed in and returned: a loop of updates under jit
    step = jax.jit(lambda b, k: tx.adaptive_kl_controller(b, k, 128, target_kl=0.1, horizon=1000))
    b, b_ref = jnp.asarray(0.01), 0.01
    for k in (0.3, 0.2, 0.05, 0.12):
        b, b_ref = step(b, k), ref.adaptive_kl(b_ref, k, 128, 0.1, 1000)
    close(b, b_ref, rtol=1e-12)


# ==================================================================================== recipe references


def ref_recipe(cfg, d, lp, frozen, rng=None):
    """NumPy reference of ``policy_loss`` for the beyond-TRL loss types and options (beta = 0, no sampler
    correction / OPSM / entropy mask: those are covered by ``test_reference``)."""
    mask = d["mask"]
    A = np.where(np.isnan(d["adv"]), 0.0, d["adv"]) if d.get("adv_key") is None else z(d[d["adv_key"]])
    old = z(frozen) if cfg.force_on_policy_ratio else OLD
    lr_live = np.where(mask, lp - old, 0.0)
    lr_frozen = np.where(mask, frozen - old, 0.0)
    clamp = cfg.log_ratio_clamp
    r = np.exp(np.clip(lr_live, -clamp, clamp))
    r0 = np.exp(np.clip(lr_frozen, -clamp, clamp))
    el, eh = cfg.epsilon, cfg.effective_epsilon_high
    if cfg.high_entropy_epsilon is not None:
        hi = ref.row_quantile_high(d["ent"], mask, cfg.entropy_clip_quantile)
        el = np.where(hi, cfg.high_entropy_epsilon, el)
        eh = np.where(hi, cfg.high_entropy_epsilon_high or cfg.high_entropy_epsilon, eh)
    lt = cfg.loss_type
    A2 = np.broadcast_to(A, mask.shape)
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        L = np.empty(mask.shape)
        for ix in np.ndindex(mask.shape):
            e_l = el if np.ndim(el) == 0 else el[ix]
            e_h = eh if np.ndim(eh) == 0 else eh[ix]
            L[ix] = ref.dual_clip_ppo(np.array([r[ix]]), np.array([A2[ix]]), e_l, e_h, cfg.clip_ratio_c)[0]
    elif lt == "gmpo":
        L = ref.gmpo(lp, old, A, mask, el, eh, clamp)
    elif lt == "gpg":
        L = ref.reinforce(np.where(mask, lp, 0), A)
    elif lt == "kl_cov":
        sel = ref.kl_cov_selection(ref.covariance(A, np.where(mask, frozen, 0), mask), mask, cfg.kl_cov_ratio)
        L = ref.kl_cov_loss(r, lr_live, A, sel, cfg.ppo_kl_coef)
    elif lt == "clip_cov":
        sel = rng  # the selection drawn by trlax (its distribution is tested separately)
        L = ref.clip_cov_loss(r, A, sel, el, eh)
    elif lt == "aspo":
        L = np.empty(mask.shape)
        for ix in np.ndindex(mask.shape):
            e_l = el if np.ndim(el) == 0 else el[ix]
            e_h = eh if np.ndim(eh) == 0 else eh[ix]
            L[ix] = ref.aspo(np.array([lp[ix]]), np.array([old[ix]]), np.array([A2[ix]]), e_l, e_h,
                             cfg.aspo_negative_clip_ratio_c, cfg.aspo_positive_clip_ratio_c,
                             frozen=np.array([frozen[ix]]))[0]
    elif lt == "topr":
        rr = r0
        if cfg.topr_sequence_ratio:
            rr = np.exp(np.clip(lr_frozen.sum(-1, keepdims=True), -clamp, clamp))
        L = ref.topr(np.where(mask, lp, 0), rr, A, cfg.topr_positive_weight, cfg.topr_negative_weight)
    elif lt == "dppo":
        keep = ref.dppo_keep(np.where(mask, frozen, 0), old, A, mask, el, eh, cfg.dppo_divergence)
        L = ref.dppo_loss(np.where(mask, lp, 0), r0, A, keep, cfg.dppo_ratio_cap)
    elif lt == "m2po":
        keep = ref.m2po_keep(lr_frozen, mask, cfg.m2po_threshold)
        L = ref.m2po_loss(r, A, keep)
    else:
        raise ValueError(lt)
    if cfg.squared_log_ratio_coef:
        L = np.broadcast_to(L, mask.shape) + cfg.squared_log_ratio_coef * lr_live**2
    return ref.aggregate(L, mask, cfg.aggregation_mode, max_completion_length=cfg.max_completion_length)


RECIPE_CASES = [
    ("dual-clip", PolicyLossConfig.dual_clip_ppo(clip_ratio_c=1.25), {}),
    ("dual-clip-grpo", PolicyLossConfig(loss_type="grpo", clip_ratio_c=1.3, epsilon_high=0.28), {}),
    ("gmpo", PolicyLossConfig.gmpo(), {}),
    ("gmpo-narrow", PolicyLossConfig.gmpo(epsilon=0.05, epsilon_high=0.1), {"adv_key": "adv_tok"}),
    ("gpg", PolicyLossConfig.gpg(), {"adv_key": "adv_tok"}),
    ("kimi15", PolicyLossConfig.kimi15(tau=0.3), {}),
    ("kl-cov", PolicyLossConfig.kl_cov(kl_cov_ratio=0.2, ppo_kl_coef=0.5), {"adv_key": "adv_tok"}),
    ("clip-cov", PolicyLossConfig.clip_cov(clip_cov_ratio=0.2, clip_cov_lb=0.02), {"adv_key": "adv_tok"}),
    ("aspo", PolicyLossConfig.aspo(aspo_positive_clip_ratio_c=1.3, aspo_negative_clip_ratio_c=1.2),
     {"adv_key": "adv_tok"}),
    ("aspo-archer", PolicyLossConfig.aspo(high_entropy_epsilon=0.4), {"adv_key": "adv_tok"}),
    ("archer", PolicyLossConfig.archer(epsilon=0.05, high_entropy_epsilon=0.15), {}),
    ("topr-token", PolicyLossConfig(loss_type="topr", topr_positive_weight=0.5), {}),
    ("topr-seq", PolicyLossConfig.topr(topr_negative_weight=2.0), {}),
    ("dppo-tv", PolicyLossConfig.dppo(epsilon=0.05, epsilon_high=0.08), {"adv_key": "adv_tok"}),
    ("dppo-kl", PolicyLossConfig.dppo(dppo_divergence="binary_kl", epsilon=0.01, epsilon_high=0.02),
     {"adv_key": "adv_tok"}),
    ("prime-rl", PolicyLossConfig.prime_rl(epsilon=0.05, dppo_ratio_cap=1.2), {}),
    ("m2po", PolicyLossConfig.m2po(m2po_threshold=0.05), {}),
    ("force-on-policy", PolicyLossConfig(loss_type="dapo", force_on_policy_ratio=True), {}),
    ("agg-override", PolicyLossConfig.gpg(loss_agg_mode="dr_grpo", max_completion_length=11), {}),
]


@pytest.mark.parametrize("name,cfg,opt", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_reference(name, cfg, opt):
    d = dict(D, **opt)
    adv = D[opt.get("adv_key", "adv")]
    key = jax.random.PRNGKey(3)
    metrics_holder = {}

    def f(lp):
        loss, met = tx.policy_loss(lp, D["old"], adv, M, cfg, entropies=D["ent"], rng=key)
        metrics_holder.update(met)
        return loss

    v = float(f(jnp.asarray(D["logps"])))
    sel = None
    if cfg.loss_type == "clip_cov":  # recover trlax's draw, check it is a valid one, reuse it in the reference
        A = z(adv)
        cov = np.asarray(tx.covariance_scores(A, LP, M))
        region = np.asarray(tx.clip_indicators(tok_ratio(LP), A, cfg.epsilon, cfg.effective_epsilon_high)[2])
        sel = np.asarray(tx.clip_cov_mask(cov, M, region, key, cfg.clip_cov_ratio, cfg.clip_cov_lb, cfg.clip_cov_ub))
        cand = ref.clip_cov_candidates(cov, M, tok_ratio(LP), A, cfg.epsilon, cfg.effective_epsilon_high,
                                       cfg.clip_cov_lb, cfg.clip_cov_ub)
        assert sel.sum() == min(max(int(cfg.clip_cov_ratio * M.sum()), 1), cand.sum()) and np.all(cand[sel])
        assert sel.sum() >= 1
    want = ref_recipe(cfg, d, LP, LP, rng=sel)
    close(v, want, err=name)
    g = np.asarray(jax.grad(f)(jnp.asarray(D["logps"])))
    gn = fd(lambda lp: ref_recipe(cfg, d, lp, LP, rng=sel), LP)
    close(g, gn, FD_RTOL, FD_ATOL, err=name)
    assert np.all(g[~M] == 0.0)
    for k, m in metrics_holder.items():
        assert np.all(np.isfinite(np.asarray(tx.finalize_metrics({k: m})[k]))), k


def test_gmpo_sampler_weights_enter_as_geometric_mean():
    """verl's geo_mean multiplies the per-sequence loss by exp(mean_t log(w_t + 1e-10)) of the token IS
    weights; trlax does the same for ``loss_type="gmpo"`` with a token-level sampler correction."""
    cfg = PolicyLossConfig.gmpo(sampler_correction="token_truncate", sampler_clip_max=1.5)
    f = lambda lp: tx.policy_loss(lp, D["old"], D["adv"], M, cfg, sampler_logps=D["sampler"])[0]
    v, g = jax.value_and_grad(f)(jnp.asarray(D["logps"]))
    samp = np.where(M & ~np.isnan(D["sampler"]), D["sampler"], OLD)
    w = np.minimum(np.exp(np.where(M, OLD - samp, 0.0)), 1.5)

    def want(lp):
        L = ref.gmpo(lp, OLD, D["adv"], M, 0.4, 0.4)
        gw = np.array([[math.exp(np.log(w[i][M[i]] + 1e-10).mean()) if M[i].any() else 1.0] for i in range(B)])
        return ref.aggregate(L * gw, M, "grpo")

    close(v, want(LP))
    close(g, fd(want, LP), FD_RTOL, FD_ATOL)


# ========================================================================================= verl fixtures
# Inputs shared by the fixtures (B=2, T=4; the last token of row 1 is padding).
V_OLD = np.array([[-1.2, -0.7, -2.3, -0.4], [-0.9, -1.6, -0.25, -3.0]])
V_LP = np.array([[-0.1, -0.75, -2.0, -1.5], [-0.5, -1.6, -0.9, -2.5]])
V_A = np.array([[-1.5, -1.5, -1.5, -1.5], [0.8, 0.8, 0.8, 0.8]])
V_ATOK = np.array([[-1.5, 0.3, 2.0, -0.2], [0.8, -1.0, 0.4, 0.0]])
V_M = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
# Expected values below were computed with NumPy by transcribing the formulas of verl's
# core_algos.py (commit b178a3cd and the later dppo_tv / dppo_kl), e.g. vanilla:
#   r = exp(clamp(lp-old, ±20)); Lc = max(-A r, -A clip(r, 1-lo, 1+hi)); L = where(A<0, min(-A c, Lc), Lc);
#   token-mean.  geo_mean: δ̃ = sign(A)·min(sign(A)δ, sign(A)clamp(δ,-lo,hi)); ratio_i = exp(Σ m δ̃ / Σ m);
#   Ā_i = Σ m A / Σ m; mean_i(-Ā_i ratio_i).  kl_cov: cov over valid tokens, top max(1,int(N·ratio)) get
#   -A r + coef|δ|.  clip_cov: candidates (lb<cov<ub, not clipped by PPO) all picked when #cand ≤ k.
#   dppo_tv: valid = where(A>0, p-q ≤ hi, p-q ≥ -lo), L = -A·min(r,20)·lp·valid.  dppo_kl: binary
#   KL q(lq-lp)+(1-q)log((1-q+1e-8)/(1-p+1e-8)).  low_var_kl: clamp(exp(kl)-kl-1, ±10), kl=clamp(ref-lp, ±20).
VERL = {
    "vanilla_dual_clip": (0.9871422466723232, 0.14285714265306124),  # loss, pg_clipfrac_lower (0.2/0.28, c=3)
    "geo_mean": 0.5830384799234787,  # clip 0.4/0.4
    "gpg": -0.5892857142857143,
    "kl_cov_seq_adv": (0.906584518580002, [2]),  # ratio 0.2, coef 1.0 -> selected flat index
    "kl_cov_tok_adv": (0.1979226773342317, [5, 4]),  # ratio 0.3, coef 0.5
    "clip_cov_tok_adv": (0.12477581788789181, [1, 5]),  # 0.2/0.28, ratio 0.5, lb 0.05, ub 5
    "dppo_tv": -0.4739616557941196,  # 0.2/0.2
    "dppo_kl": -0.5592087813736207,  # 0.05/0.05
    "dppo_tv_tok": 0.621071900845026,
    "dppo_kl_tok": 0.5358247752655247,
    "adaptive_kl": ((0.001, 0.3, 256, 0.00100512), (0.001, 0.05, 256, 0.00099488), (0.001, 0.11, 256, 0.00100256)),
}
V_REF = np.array([[-0.5, -12.0, -2.0, -1.0], [-20.0, -1.6, -0.2, -0.3]])
VERL_K3 = np.array([[0.07032004603563946, 10.0, 0.0, 0.1487212707001282],
                    [10.0, 0.0, 0.3137527074704767, 5.825013499434122]])


def _vloss(cfg, adv=V_A, rng=None):
    return tx.policy_loss(V_LP, V_OLD, adv, V_M, cfg, rng=rng)


def test_verl_fixture_vanilla_dual_clip():
    loss, met = _vloss(PolicyLossConfig(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, clip_ratio_c=3.0))
    close(loss, VERL["vanilla_dual_clip"][0], rtol=1e-12)
    close(met["clip_ratio/dual_mean"].value, VERL["vanilla_dual_clip"][1], rtol=1e-7)


def test_verl_fixture_geo_mean_gpg():
    # verl divides by Σm + 1e-8 (relative effect ~3e-9 here); trlax by max(Σm, 1)
    close(_vloss(PolicyLossConfig.gmpo())[0], VERL["geo_mean"], rtol=1e-8)
    close(_vloss(PolicyLossConfig.gpg())[0], VERL["gpg"], rtol=1e-12)


def test_verl_fixture_kl_cov_clip_cov():
    for key, adv, kw in (("kl_cov_seq_adv", V_A, dict(kl_cov_ratio=0.2, ppo_kl_coef=1.0)),
                         ("kl_cov_tok_adv", V_ATOK, dict(kl_cov_ratio=0.3, ppo_kl_coef=0.5))):
        loss, _ = _vloss(PolicyLossConfig(loss_type="kl_cov", **kw), adv)
        close(loss, VERL[key][0], rtol=1e-12, err=key)
        cov = tx.covariance_scores(adv, V_LP, V_M)
        sel = np.flatnonzero(np.asarray(tx.kl_cov_mask(cov, V_M, kw["kl_cov_ratio"])))
        assert sorted(sel) == sorted(VERL[key][1])
    cfg = PolicyLossConfig(loss_type="clip_cov", epsilon=0.2, epsilon_high=0.28, clip_cov_ratio=0.5, clip_cov_lb=0.05,
                           clip_cov_ub=5.0)
    for seed in range(3):  # every candidate is picked, so any key gives verl's value
        close(_vloss(cfg, V_ATOK, jax.random.PRNGKey(seed))[0], VERL["clip_cov_tok_adv"][0], rtol=1e-12)


def test_verl_fixture_dppo():
    for key, adv in (("dppo_tv", V_A), ("dppo_tv_tok", V_ATOK)):
        close(_vloss(PolicyLossConfig.dppo(epsilon=0.2, epsilon_high=0.2), adv)[0], VERL[key], rtol=1e-12)
    for key, adv in (("dppo_kl", V_A), ("dppo_kl_tok", V_ATOK)):
        cfg = PolicyLossConfig.dppo(dppo_divergence="binary_kl", epsilon=0.05, epsilon_high=0.05)
        close(_vloss(cfg, adv)[0], VERL[key], rtol=1e-12)


def test_verl_fixture_kl_penalty_and_controller():
    close(tx.kl_penalty(V_LP, V_REF, kind="k3", output_clamp=10.0), VERL_K3, rtol=1e-12)
    # k3+: value of low_var_kl, gradient of 0.5 (lp - ref)^2 = lp - ref
    close(tx.kl_penalty(V_LP, V_REF, kind="k3+", output_clamp=10.0), VERL_K3, rtol=1e-12)
    g = jgrad(lambda x: jnp.sum(tx.kl_penalty(x, V_REF, kind="k3+")), V_LP)
    close(g, V_LP - V_REF, rtol=1e-12)
    for beta, kl, n, want in VERL["adaptive_kl"]:
        close(tx.adaptive_kl_controller(beta, kl, n), want, rtol=1e-12)


# =========================================================================== TRL parity (GMPO only)


@pytest.mark.parametrize("eps,beta", [((0.4, None), 0.0), ((0.1, 0.3), 0.04)])
def test_trl_experimental_gmpo_parity(eps, beta):
    """TRL 1.16 ``experimental.gmpo.GMPOTrainer._compute_loss`` (the only objective of this file that TRL
    implements) called on a stand-in ``self``; value and gradient vs ``policy_loss`` (float64, rtol 1e-10).
    trlax: ``gmpo`` + ``beta`` with ``use_bias_correction_kl=False`` (TRL adds the sequence-mean k3)."""
    torch = pytest.importorskip("torch")
    gmpo_mod = pytest.importorskip("trl.experimental.gmpo.gmpo_trainer")
    import _trl_oracles as oracles

    d = make_batch(11, nan_pad=False)
    d["adv"][2, 0] = 0.0
    # Deliberate difference: TRL gives an *empty* completion the value −A_i (exp(0)·A_i, no gradient); trlax
    # (as verl's geo_mean, whose Ā_i is the masked mean) gives 0. Row 0 is empty: its advantage is checked below.
    a0 = float(d["adv"][0, 0])
    d["adv"][0, 0] = 0.0
    lp_t = torch.tensor(d["logps"], dtype=torch.float64, requires_grad=True)
    mask_t = torch.tensor(d["mask"], dtype=torch.float64)
    s_ = oracles.stub(top_entropy_quantile=1.0, epsilon_low=eps[0], epsilon_high=eps[1] or eps[0], beta=beta,
                      current_gradient_accumulation_steps=1)
    s_._get_per_token_logps_and_entropies = lambda *a, **k: (lp_t, torch.zeros_like(lp_t), None)
    inputs = {
        "prompt_ids": torch.zeros((B, 2), dtype=torch.long), "prompt_mask": torch.ones((B, 2), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": mask_t,
        "advantages": torch.tensor(d["adv"][:, 0], dtype=torch.float64),
        "old_per_token_logps": torch.tensor(d["old"], dtype=torch.float64),
        "ref_per_token_logps": torch.tensor(d["ref"], dtype=torch.float64),
    }
    with np.errstate(all="ignore"):
        loss_t = gmpo_mod.GMPOTrainer._compute_loss(s_, None, inputs)
    loss_t.backward()
    cfg = PolicyLossConfig.gmpo(epsilon=eps[0], epsilon_high=eps[1], beta=beta, use_bias_correction_kl=False)
    f = lambda lp: tx.policy_loss(lp, d["old"], d["adv"], d["mask"], cfg, ref_logps=d["ref"] if beta else None)[0]
    v, g = jax.value_and_grad(f)(jnp.asarray(d["logps"]))
    close(v, loss_t.item(), rtol=1e-10, atol=1e-12)
    met = tx.finalize_metrics(tx.policy_loss(d["logps"], d["old"], d["adv"], d["mask"], cfg,
                                             ref_logps=d["ref"] if beta else None)[1])
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean"):
        close(met[k], s_._metrics["train"][k][0], rtol=1e-6, err=k)  # metrics are float32 (sum, count)
    assert s_._metrics["train"]["clip_ratio/low_mean"][0] + s_._metrics["train"]["clip_ratio/high_mean"][0] > 0
    close(g, lp_t.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.any(np.asarray(g) != 0.0)
    d["adv"][0, 0] = a0  # the empty row's advantage changes trlax's loss by nothing
    close(f(jnp.asarray(d["logps"])), v, rtol=1e-14, atol=0)


# ============================================================================= 3. hypothesis properties

_CACHE: dict = {}


def vg(cfg):
    if cfg not in _CACHE:
        def f(lp, old, adv, mask, ent, key):
            return tx.policy_loss(lp, old, adv, mask, cfg, entropies=ent, rng=key)[0]

        _CACHE[cfg] = jax.jit(jax.value_and_grad(f))
    return _CACHE[cfg]


def run(cfg, d, key=0):
    v, g = vg(cfg)(d["logps"], d["old"], d["adv"], d["mask"], d["ent"], jax.random.PRNGKey(key))
    return float(v), np.asarray(g)


@st.composite
def batches(draw, t=T, min_len=0):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    lengths = np.asarray(draw(st.lists(st.integers(min_len, t), min_size=B, max_size=B)))
    spread = draw(st.sampled_from([0.05, 0.3, 1.0]))
    mask = np.arange(t)[None, :] < lengths[:, None]
    logps = -rng.uniform(0.05, 3.0, (B, t))
    old = logps + rng.uniform(-spread, spread, (B, 1)) + rng.normal(0.0, spread, (B, t))
    return dict(mask=mask, logps=logps, old=old, adv=rng.normal(size=(B, 1)), ent=rng.uniform(0.0, 3.0, (B, t)))


PROP_CFGS = [
    PolicyLossConfig.dual_clip_ppo(clip_ratio_c=1.5),
    PolicyLossConfig.gmpo(),
    PolicyLossConfig.gpg(),
    PolicyLossConfig.clip_cov(clip_cov_ratio=0.1, clip_cov_lb=0.01),
    PolicyLossConfig.kl_cov(kl_cov_ratio=0.1),
    PolicyLossConfig.aspo(),
    PolicyLossConfig.archer(),
    PolicyLossConfig.topr(),
    PolicyLossConfig.dppo(),
    PolicyLossConfig.dppo(dppo_divergence="binary_kl", epsilon=0.02, epsilon_high=0.02),
    PolicyLossConfig.m2po(),
    PolicyLossConfig.kimi15(),
]
NO_REG = [c for c in PROP_CFGS if c.loss_type != "kl_cov" and c.squared_log_ratio_coef == 0.0]


@given(d=batches(), cfg=st.sampled_from(NO_REG))
def test_zero_advantages_zero_gradient(d, cfg):
    d["adv"] = np.zeros((B, 1))
    v, g = run(cfg, d)
    assert v == 0.0 and np.all(g == 0.0)


@given(d=batches(), cfg=st.sampled_from([c for c in PROP_CFGS if c.loss_type != "clip_cov"]))
def test_ratio_one_is_reinforce(d, cfg):
    """With old == logps every ratio is 1: GMPO/ASPO/TOPR/DPPO/M2PO/KL-Cov/dual-clip/Kimi all reduce to the
    REINFORCE gradient −A·∇log π under their own aggregation (GMPO: per-sequence token mean)."""
    d["old"] = d["logps"].copy()
    _, g = run(cfg, d)
    mode = cfg.aggregation_mode
    gpg = PolicyLossConfig.gpg(loss_agg_mode=mode)
    _, g_ref = run(gpg, d)
    np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-12)


@given(d=batches(), cfg=st.sampled_from(PROP_CFGS))
def test_padding_columns_change_nothing(d, cfg):
    v, g = run(cfg, d)
    pad = lambda x, fill: np.concatenate([x, np.full((B, 3), fill)], axis=1)
    d2 = dict(d, mask=pad(d["mask"], False), logps=pad(d["logps"], np.nan), old=pad(d["old"], np.nan),
              ent=pad(d["ent"], np.nan))
    v2, g2 = run(cfg, d2)
    np.testing.assert_allclose(v2, v, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g2[:, :T], g, rtol=1e-10, atol=1e-13)
    assert np.all(g2[:, T:] == 0.0)


@given(d=batches(), perm=st.permutations(list(range(B))),
       cfg=st.sampled_from([c for c in PROP_CFGS if c.loss_type != "clip_cov"]))
def test_batch_permutation_equivariance(d, perm, cfg):
    v, g = run(cfg, d)
    p = np.asarray(perm)
    v2, g2 = run(cfg, {k: x[p] for k, x in d.items()})
    np.testing.assert_allclose(v2, v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g2, g[p], rtol=1e-9, atol=1e-12)


@given(d=batches())
def test_dual_clip_large_c_is_ppo_and_active_region_has_no_gradient(d):
    base = PolicyLossConfig(loss_type="dapo", epsilon_high=0.28)
    v0, g0 = run(base, d)
    v1, g1 = run(base.replace(clip_ratio_c=1e6), d)
    np.testing.assert_allclose(v1, v0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)
    _, g2 = run(base.replace(clip_ratio_c=1.1), d)
    r = np.exp(np.where(d["mask"], d["logps"] - d["old"], 0.0))
    dual = d["mask"] & (np.broadcast_to(d["adv"], r.shape) < 0) & (r > 1.1 + 1e-9)
    assert np.all(g2[dual] == 0.0)


@given(d=batches())
def test_entropy_clip_equal_epsilons_is_plain_clip(d):
    base = PolicyLossConfig(loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
    v0, g0 = run(base, d)
    v1, g1 = run(base.replace(high_entropy_epsilon=0.2, high_entropy_epsilon_high=0.28), d)
    np.testing.assert_allclose(v1, v0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)


@given(d=batches())
def test_force_on_policy_ignores_old_logps(d):
    cfg = PolicyLossConfig(loss_type="grpo", force_on_policy_ratio=True)
    v, g = run(cfg, d)
    d2 = dict(d, old=d["old"] + 5.0)
    v2, g2 = run(cfg, d2)
    v3, g3 = run(PolicyLossConfig(loss_type="grpo"), dict(d, old=d["logps"].copy()))
    np.testing.assert_allclose([v, v2], [v3, v3], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g, g3, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g2, g3, rtol=1e-12, atol=1e-15)


@given(d=batches(min_len=1), thr=st.sampled_from([0.01, 0.04, 0.3]))
def test_m2po_mask_is_minimal(d, thr):
    """The kept tokens satisfy the second-moment bound, and keeping one more (the smallest dropped) would not."""
    lr = np.where(d["mask"], d["logps"] - d["old"], 0.0)
    keep = np.asarray(tx.m2po_mask(lr, d["mask"], thr))
    m2 = lr**2
    assert keep.sum() == 0 or m2[keep].mean() < thr
    dropped = d["mask"] & ~keep
    if dropped.any():
        assert m2[dropped].min() >= m2[keep].max() if keep.any() else True
        smallest = m2[dropped].min()
        assert (m2[keep].sum() + smallest) / (keep.sum() + 1) >= thr


@given(x=st.lists(st.floats(-25, 25), min_size=4, max_size=4), kind=st.sampled_from(tx.KL_ESTIMATORS))
def test_straight_through_value_and_gradient(x, kind):
    lp = np.asarray(x)[None, :] - 1.0
    rf = np.full((1, 4), -1.0)
    v = tx.kl_penalty(lp, rf, kind=kind + "+")
    np.testing.assert_allclose(v, tx.kl_penalty(lp, rf, kind=kind), rtol=1e-12, atol=1e-12)
    g = jgrad(lambda a: jnp.sum(tx.kl_penalty(a, rf, kind=kind + "+")), lp)
    d = lp - rf
    # the clamp passes the gradient on the closed interval [-20, 20], as torch.clamp does (verl)
    np.testing.assert_allclose(g, np.where(np.abs(d) <= 20, d, 0.0), rtol=1e-12, atol=1e-12)


def test_straight_through_gradient_at_the_clamp_bound():
    """The case a seeded hypothesis session found (x = [0, 0, 0, 20]: d exactly at the clamp): gradient d, as
    torch.clamp gives it, not jnp.clip's ½d."""
    test_straight_through_value_and_gradient.hypothesis.inner_test([0.0, 0.0, 0.0, 20.0], "k1")
    test_straight_through_value_and_gradient.hypothesis.inner_test([-20.0, 3.0, 0.0, 20.0], "k3")


@given(beta=st.floats(1e-5, 1.0), kl=st.floats(0.0, 5.0), n=st.integers(1, 4096),
       target=st.sampled_from([0.01, 0.1, 1.0]))
def test_adaptive_kl_controller_moves_toward_target(beta, kl, n, target):
    new = float(tx.adaptive_kl_controller(beta, kl, n, target_kl=target, horizon=10000))
    if kl > target * (1 + 1e-9):
        assert new > beta
    elif kl < target * (1 - 1e-9):
        assert new < beta
    assert abs(new / beta - 1.0) <= 0.2 * n / 10000 * (1 + 1e-9)


@given(d=batches(), beta=st.sampled_from([0.0, 0.01, 0.5]), kind=st.sampled_from(["k1", "k3"]))
def test_kl_in_reward_conserves_score_minus_penalty(d, beta, kind):
    m = d["mask"]
    scores = np.where(m, np.random.default_rng(1).normal(size=m.shape), 0.0)
    ref_lp = d["logps"] + 0.3
    rew, kl = tx.kl_in_reward(scores, d["old"], ref_lp, m, beta, kind)
    pen = np.asarray(tx.kl_penalty(d["old"], ref_lp, m, kind))
    np.testing.assert_allclose(np.sum(rew), np.sum(scores) - beta * np.sum(pen), rtol=1e-10, atol=1e-10)
    assert np.all(np.asarray(rew)[~m] == 0.0)
    if beta == 0.0:
        np.testing.assert_allclose(rew, scores, rtol=0, atol=0)


@given(d=batches(min_len=1), seed=st.integers(0, 2**31 - 1), frac=st.sampled_from([0.01, 0.1, 0.5]))
def test_clip_cov_selection_size_and_support(d, seed, frac):
    A = np.broadcast_to(d["adv"], d["mask"].shape) * 4.0
    cov = np.asarray(tx.covariance_scores(A, d["logps"], d["mask"]))
    r = np.exp(np.where(d["mask"], d["logps"] - d["old"], 0.0))
    region = np.asarray(tx.clip_indicators(r, A, 0.2, 0.2)[2])
    sel = np.asarray(tx.clip_cov_mask(cov, d["mask"], region, jax.random.PRNGKey(seed), frac, 0.01, 5.0))
    cand = ref.clip_cov_candidates(cov, d["mask"], r, A, 0.2, 0.2, 0.01, 5.0)
    assert sel.sum() == min(max(int(frac * d["mask"].sum()), 1), cand.sum())
    assert not np.any(sel & ~cand)


@given(d=batches())
def test_dppo_wide_trust_region_keeps_every_token(d):
    """Probability differences are at most 1: with δ ≥ 1 the binary-TV mask keeps every valid token and DPPO
    is the truncated-IS REINFORCE ``−sg(min(r, cap))·A·log π`` everywhere."""
    cfg = PolicyLossConfig.dppo(epsilon=1.0, epsilon_high=1.0)
    keep = np.asarray(tx.dppo_mask(d["logps"], d["old"], d["adv"], d["mask"], 1.0, 1.0))
    assert np.array_equal(keep, d["mask"])
    _, g = run(cfg, d)
    r = np.exp(np.clip(np.where(d["mask"], d["logps"] - d["old"], 0.0), -20, 20))
    want = np.where(d["mask"], -np.minimum(r, 20.0) * d["adv"] / max(d["mask"].sum(), 1), 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)


@given(d=batches(min_len=1), eps=st.sampled_from([0.05, 0.4]))
def test_gmpo_sequence_ratio_bounded_on_the_favoured_side(d, eps):
    """GMPO's clipped geometric ratio never exceeds e^ε_high for A > 0 and never falls below e^−ε_low for
    A < 0 (the side where PPO's min would bind)."""
    lr = np.where(d["mask"], d["logps"] - d["old"], 0.0)
    L = np.asarray(tx.gmpo_loss(lr, d["adv"], d["mask"], eps))[:, 0]
    A = d["adv"][:, 0]
    nz = (A != 0) & d["mask"].any(-1)
    rho = -L[nz] / A[nz]
    pos, neg = A[nz] > 0, A[nz] < 0
    assert np.all(rho[pos] <= math.exp(eps) * (1 + 1e-12))
    assert np.all(rho[neg] >= math.exp(-eps) * (1 - 1e-12))


@settings(max_examples=30)
@given(d=batches(), cfg=st.sampled_from(PROP_CFGS), big=st.sampled_from([1e4, -1e4, 60.0, -60.0]))
def test_extreme_log_ratios_finite(d, cfg, big):
    """Pitfall 4.3: clamp before exp. GMPO with A < 0 and a huge log-ratio is where verl's unclamped
    geo_mean overflows to inf."""
    sign = np.random.default_rng(0).choice([-1.0, 1.0], size=(B, T))
    d["old"] = d["logps"] + big * sign
    v, g = run(cfg, d)
    assert np.isfinite(v) and np.all(np.isfinite(g))


@pytest.mark.parametrize("cfg", PROP_CFGS, ids=lambda c: c.loss_type)
def test_empty_mask_zero_loss_and_gradient(cfg):
    d = dict(mask=np.zeros((B, T), bool), logps=np.full((B, T), np.nan), old=np.full((B, T), np.nan),
             adv=np.ones((B, 1)), ent=np.full((B, T), np.nan))
    v, g = run(cfg, d)
    assert v == 0.0 and np.all(g == 0.0)


@settings(max_examples=10)
@given(d=batches(min_len=1), cfg=st.sampled_from([PROP_CFGS[1], PROP_CFGS[5], PROP_CFGS[8], PROP_CFGS[11]]))
def test_bf16_inputs_compute_in_float32(d, cfg):
    d16 = {k: (jnp.asarray(x, jnp.bfloat16) if k in ("logps", "old", "adv", "ent") else x) for k, x in d.items()}
    v16, g16 = vg(cfg)(d16["logps"], d16["old"], d16["adv"], d16["mask"], d16["ent"], jax.random.PRNGKey(0))
    assert v16.dtype == jnp.float32 and g16.dtype == jnp.bfloat16
    d32 = {k: (np.asarray(x.astype(jnp.float32)) if hasattr(x, "dtype") and x.dtype == jnp.bfloat16 else x)
           for k, x in d16.items()}
    v32, _ = vg(cfg)(d32["logps"], d32["old"], d32["adv"], d32["mask"], d32["ent"], jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(v16), float(v32), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g16.astype(jnp.float32))))


# ========================================================================= 4. pitfall regressions (sec. 4)


@pytest.mark.parametrize("cfg", [PolicyLossConfig.gpg(), PolicyLossConfig.aspo(), PolicyLossConfig.topr(),
                                 PolicyLossConfig.dppo(), PolicyLossConfig.gmpo(), PolicyLossConfig.kimi15(),
                                 PolicyLossConfig.dual_clip_ppo()], ids=lambda c: c.loss_type)
def test_micro_batches_sum_to_full_batch(cfg):
    """4.1: with the global token / row counts, micro-batch losses (and gradients) add up to the full batch."""
    d = make_batch(5, nan_pad=True)
    n_items, n_seq = int(d["mask"].sum()), B
    full = lambda lp: tx.policy_loss(lp, d["old"], d["adv"], d["mask"], cfg, num_items=n_items, num_sequences=n_seq)[0]
    v, g = jax.value_and_grad(full)(jnp.asarray(d["logps"]))
    parts, grads = [], []
    for sl in (slice(0, 2), slice(2, B)):
        fpart = lambda lp, sl=sl: tx.policy_loss(lp, d["old"][sl], d["adv"][sl], d["mask"][sl], cfg,
                                                 num_items=n_items, num_sequences=n_seq)[0]
        vp, gp = jax.value_and_grad(fpart)(jnp.asarray(d["logps"][sl]))
        parts.append(float(vp))
        grads.append(np.asarray(gp))
    close(sum(parts), v, rtol=1e-12, atol=1e-14)
    close(np.concatenate(grads), g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cfg", [PolicyLossConfig.m2po(m2po_threshold=0.01), PolicyLossConfig.dppo(epsilon=0.05)],
                         ids=lambda c: c.loss_type)
def test_rejected_tokens_keep_the_denominator(cfg):
    """4.1 (AReaL): masking tokens out (M2PO / DPPO) must not shrink the token-mean denominator — that would
    inflate the per-token gradient of the kept tokens by N_all / N_kept."""
    f = lambda lp: tx.policy_loss(lp, D["old"], D["adv"], M, cfg)[0]
    g = np.asarray(jax.grad(f)(jnp.asarray(D["logps"])))
    r = tok_ratio(LP)
    A = np.broadcast_to(D["adv"], M.shape)
    kept = M & (g != 0.0)
    dropped = M & (A != 0) & (g == 0.0)
    assert kept.any() and dropped.any()
    w = r if cfg.loss_type == "m2po" else np.minimum(r, cfg.dppo_ratio_cap)
    close(g[kept], (-A * w / M.sum())[kept])


def test_masked_nan_never_leaks_into_new_primitives():
    """4.6: NaN under the padding (log-probs, advantages, entropies) reaches neither values nor gradients."""
    d = D
    A = d["adv_tok"]  # NaN under the padding
    outs = [
        tx.gmpo_loss(d["logps"] - d["old"], A, M),
        tx.covariance_scores(A, d["logps"], M),
        tx.kl_cov_mask(tx.covariance_scores(A, d["logps"], M), M, 0.2),
        tx.dppo_mask(d["logps"], d["old"], A, M, 0.1, 0.1, "binary_kl"),
        tx.m2po_mask(d["logps"] - d["old"], M, 0.04),
        tx.entropy_dependent_epsilon(d["ent"], M)[0],
        tx.kl_penalty(d["logps"], d["ref"], M, "k3+"),
        tx.kl_in_reward(np.zeros((B, T)), d["logps"], d["ref"], M, 0.1)[0],
    ]
    for o in outs:
        assert np.all(np.isfinite(np.asarray(o, np.float64)))
    g = jgrad(lambda x: jnp.sum(tx.kl_penalty(x, d["ref"], M, "k3+")), d["logps"])
    assert np.all(np.isfinite(g)) and np.all(g[~M] == 0.0)


def test_k3_output_clamp_zeroes_gradient_only_when_asked():
    """4.7: clamping the k3 *output* (verl / OpenRLHF ±10) silently zeroes the KL gradient on outliers;
    trlax leaves it off by default."""
    lp, rf = np.array([[-1.0, -1.0]]), np.array([[-14.0, -1.2]])  # d = 13: k3 ≈ 12 > 10
    g_default = jgrad(lambda x: jnp.sum(tx.kl_penalty(x, rf, kind="k3")), lp)
    g_clamped = jgrad(lambda x: jnp.sum(tx.kl_penalty(x, rf, kind="k3", output_clamp=10.0)), lp)
    assert g_default[0, 0] > 0.99 and g_clamped[0, 0] == 0.0
    close(g_default[0, 1], g_clamped[0, 1])


def test_straight_through_gives_the_on_policy_kl_gradient():
    """4.7: for y ~ π_θ, E[∇k1] = 0 and E[∇k3] ≠ ∇KL(π_θ‖π_ref), while E[∇k3+] (gradient of k2) equals
    ∇KL exactly. Checked by exact expectation over a 5-token vocabulary."""
    z_ = jnp.asarray([0.3, -1.0, 0.8, 0.0, -0.4])
    ref_lp = jax.nn.log_softmax(jnp.asarray([0.1, 0.2, -0.5, 0.9, 0.0]))

    def expected(kind):
        def f(zz):
            lp = jax.nn.log_softmax(zz)
            w = jax.lax.stop_gradient(jnp.exp(lp))  # sampling distribution: a constant
            return jnp.sum(w * tx.kl_penalty(lp[None], ref_lp[None], kind=kind)[0])
        return np.asarray(jax.grad(f)(z_))

    true = np.asarray(jax.grad(lambda zz: jnp.sum(jnp.exp(jax.nn.log_softmax(zz)) *
                                                  (jax.nn.log_softmax(zz) - ref_lp)))(z_))
    close(expected("k3+"), true, rtol=1e-10, atol=1e-12)
    close(expected("k1+"), true, rtol=1e-10, atol=1e-12)
    close(expected("k1"), np.zeros(5), atol=1e-12)
    assert np.max(np.abs(expected("k3") - true)) > 1e-3


def test_knob_semantics():
    """4.8: dual clip is off unless asked (TRL behaviour unchanged), verl's c = 3 in the preset; GMPO's ε is
    a *log-space* bound (the token ratio e^0.4 ≈ 1.49 is still inside, 1.45 ≠ 1 + 0.4 = 1.4 is not clipped);
    verl forces a plain mean over sequences for geo_mean (aggregation "grpo" here)."""
    assert PolicyLossConfig().clip_ratio_c is None
    assert PolicyLossConfig.dual_clip_ppo().clip_ratio_c == 3.0
    assert PolicyLossConfig.gmpo().aggregation_mode == "grpo"
    lr = np.array([[math.log(1.45), 0.0]])
    m = np.array([[True, True]])
    g = jgrad(lambda x: jnp.sum(tx.gmpo_loss(x, np.ones((1, 1)), m, 0.4)), lr)
    assert g[0, 0] != 0.0  # inside (e^-0.4, e^0.4): still has a gradient
    g = jgrad(lambda x: jnp.sum(tx.gmpo_loss(x, np.ones((1, 1)), m, 0.3)), lr)
    assert g[0, 0] == 0.0  # log 1.45 = 0.37 > 0.3: clipped


# ============================================================================================ 5. config


BAD = [
    (dict(loss_type="gmpo", importance_sampling_level="sequence"), ["importance_sampling_level='sequence'", "'token'"]),
    (dict(clip_ratio_c=1.0), ["clip_ratio_c=1.0", "allowed"]),
    (dict(loss_type="cispo", epsilon_high=5.0, clip_ratio_c=3.0), ["clip_ratio_c=3.0", "'grpo'"]),
    (dict(clip_cov_ratio=0.0), ["clip_cov_ratio=0.0", "allowed"]),
    (dict(clip_cov_lb=5.0, clip_cov_ub=1.0), ["clip_cov_lb=5.0", "clip_cov_ub=1.0"]),
    (dict(kl_cov_ratio=2.0), ["kl_cov_ratio=2.0", "allowed"]),
    (dict(ppo_kl_coef=-1.0), ["ppo_kl_coef=-1.0", "allowed"]),
    (dict(aspo_positive_clip_ratio_c=0.5), ["aspo_positive_clip_ratio_c=0.5", "allowed"]),
    (dict(topr_negative_weight=-1.0), ["topr_negative_weight=-1.0", "allowed"]),
    (dict(topr_sequence_ratio=1), ["topr_sequence_ratio=1", "True, False"]),
    (dict(dppo_divergence="tv"), ["dppo_divergence='tv'", "'binary_tv'", "'binary_kl'"]),
    (dict(m2po_threshold=0.0), ["m2po_threshold=0.0", "allowed"]),
    (dict(squared_log_ratio_coef=-0.1), ["squared_log_ratio_coef=-0.1", "allowed"]),
    (dict(high_entropy_epsilon_high=0.4), ["high_entropy_epsilon_high", "high_entropy_epsilon"]),
    (dict(loss_type="gpg", high_entropy_epsilon=0.4), ["high_entropy_epsilon", "'gpg'", "'aspo'"]),
    (dict(entropy_clip_quantile=1.5), ["entropy_clip_quantile=1.5", "allowed"]),
    (dict(loss_agg_mode="seq-mean"), ["loss_agg_mode='seq-mean'", "'token_mean'"]),
    (dict(kl_estimator="k4+"), ["kl_estimator='k4+'", "'k3+'"]),
    (dict(force_on_policy_ratio="yes"), ["force_on_policy_ratio='yes'", "True, False"]),
]


@pytest.mark.parametrize("kw,needles", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_config_names_the_field(kw, needles):
    with pytest.raises(ValueError) as e:
        PolicyLossConfig(**kw)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_missing_inputs_and_bad_arguments():
    with pytest.raises(ValueError, match="rng"):
        tx.policy_loss(LP, OLD, D["adv"], M, PolicyLossConfig.clip_cov())
    with pytest.raises(ValueError, match="entropies"):
        tx.policy_loss(LP, OLD, D["adv"], M, PolicyLossConfig.archer())
    with pytest.raises(ValueError, match="divergence='x'"):
        tx.dppo_mask(LP, OLD, D["adv"], M, divergence="x")
    with pytest.raises(ValueError, match="value_kind='k9'"):
        tx.straight_through_kl(LP, OLD, value_kind="k9")
    with pytest.raises(ValueError, match="advantages"):
        tx.gmpo_loss(LP - OLD, np.ones(B), M)  # [B] would broadcast along T
    with pytest.raises(ValueError, match="mask"):
        tx.m2po_mask(LP - OLD, M[:, :3])


def test_presets_and_hashable():
    for name in PolicyLossConfig.PRESETS:
        cfg = PolicyLossConfig.preset(name)
        hash(cfg)
    assert PolicyLossConfig.kimi15(tau=0.2).squared_log_ratio_coef == pytest.approx(0.1)
    assert PolicyLossConfig.prime_rl().squared_log_ratio_coef == 1e-3
    for name in ("gmpo", "gpg", "clip_cov", "kl_cov", "aspo", "topr", "dppo", "m2po"):
        assert name in tx.BEYOND_TRL_LOSS_TYPES
    assert tuple(tx.POLICY_LOSS_TYPES) == ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
