"""trlax vs the float64 NumPy references of ``_numpy_ref`` (written from the papers).

Values and gradients w.r.t. ``logps`` are compared on random float64 inputs with ragged masks (an empty
row, a full row, a row with a hole) and NaN garbage under the padding. NumPy gradients are analytic
where the derivative is simple (rtol 1e-6) and central finite differences on the NumPy reference
otherwise (rtol 1e-5, atol 1e-7). Stop-gradients are checked as exact zeros.

Everything runs eagerly (no ``jit``): dozens of configurations share the per-primitive compile cache.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trlax.objectives as tx
from trlax.objectives import PolicyLossConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _numpy_ref as ref  # noqa: E402

B, T = 6, 7
RTOL, ATOL = 1e-6, 1e-9  # analytic / exact comparisons
FD_RTOL, FD_ATOL = 1e-5, 1e-7  # finite differences


def close(actual, expected, rtol=RTOL, atol=ATOL, err=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=err)


def make_batch(seed: int, nan_pad: bool = True):
    """Random float64 batch: ragged mask (row 0 empty, row 1 full, row 2 with a hole), per-row drift of
    the old policy so ratios land on both sides of the clip range, NaN under the padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T, B)
    lengths[0], lengths[1] = 0, T
    mask = np.arange(T)[None, :] < lengths[:, None]
    mask[2, 1] = False
    logps = -rng.uniform(0.05, 3.0, (B, T))
    drift = rng.uniform(-0.35, 0.35, (B, 1))
    old = logps + drift + rng.normal(0.0, 0.25, (B, T))
    refl = logps + rng.normal(0.0, 0.5, (B, T))
    sampler = old + rng.normal(0.0, 0.4, (B, T))
    sampler[1, 3] = np.nan  # "the sampler could not score this token"
    adv = rng.normal(size=(B, 1))
    adv[4, 0] = 0.0
    adv_tok = rng.normal(size=(B, T))
    ent = rng.uniform(0.0, 3.0, (B, T))
    if nan_pad:
        for a in (logps, old, refl, sampler, adv_tok, ent):
            a[~mask] = np.nan
    return dict(mask=mask, logps=logps, old=old, ref=refl, sampler=sampler, adv=adv, adv_tok=adv_tok, ent=ent,
                w=rng.normal(size=(B, T)), rng=rng)


D = make_batch(0)
MASK = D["mask"]


def jgrad(f, x):
    return np.asarray(jax.grad(f)(jnp.asarray(x)))


# ------------------------------------------------------------------------------------ masked reductions


def test_masked_reductions():
    x, m = D["logps"], MASK
    for axis in (None, -1, 0):
        close(tx.masked_sum(x, m, axis=axis), ref.masked_sum(x, m, axis))
        close(tx.masked_mean(x, m, axis=axis), ref.masked_mean(x, m, axis))
    close(tx.masked_min(x, m), ref.masked_min(x, m))
    close(tx.masked_max(x, m), ref.masked_max(x, m))
    # a [B, 1] row mask selects whole rows; the mean counts every selected element
    rows = np.array([[True], [False], [True], [False], [False], [True]])
    x0 = np.nan_to_num(x)
    for axis in (None, -1, 0):
        close(tx.masked_mean(x0, rows, axis=axis), ref.masked_mean(x0, rows, axis))
        close(tx.masked_sum(x0, rows, axis=axis), ref.masked_sum(x0, rows, axis))
    close(tx.masked_min(x0, rows), ref.masked_min(x0, np.broadcast_to(rows, x0.shape)))
    empty = np.zeros_like(m)
    for fn in (tx.masked_sum, tx.masked_mean, tx.masked_min, tx.masked_max):
        assert float(fn(x, empty)) == 0.0
    close(tx.masked_mean(x, m, axis=-1)[0], 0.0)  # empty row -> 0, not NaN
    # gradient: mask / count, nothing at the (NaN) padding
    cnt = m.sum(-1, keepdims=True)
    g = jgrad(lambda v: jnp.sum(D["w"][:, 0] * tx.masked_mean(v, m, axis=-1)), x)
    close(g, np.where(m, D["w"][:, :1] / np.maximum(cnt, 1), 0.0))
    g = jgrad(lambda v: tx.masked_sum(v, m.astype(np.float32)), x)  # 0/1 float mask
    close(g, m.astype(float))


AGG_MODES = tx.AGGREGATION_MODES


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate(mode):
    L, m = D["adv_tok"], MASK  # NaN under the padding
    Ls = D["adv"].copy()  # [B, 1] per-sequence loss
    Ls[0, 0] = np.nan  # row 0 is empty: its per-sequence loss must never be read
    for loss in (L, Ls):
        kw_list = [{}, {"num_items": 57, "num_sequences": 11}, {"max_completion_length": 13},
                   {"num_items": 0}]
        for kw in kw_list:
            got = tx.aggregate(loss, m, mode, **kw)
            want = ref.aggregate(loss, m, mode, kw.get("num_items"), kw.get("num_sequences"),
                                 kw.get("max_completion_length"))
            close(got, want, err=f"{mode} {loss.shape} {kw}")
            g = jgrad(lambda v: tx.aggregate(v, m, mode, **kw), loss)
            gn = ref.fd_grad(lambda v: ref.aggregate(v, m, mode, kw.get("num_items"), kw.get("num_sequences"),
                                                     kw.get("max_completion_length")),
                             loss, where=m if loss.shape == m.shape else None)
            close(g, gn, FD_RTOL, FD_ATOL, err=f"grad {mode} {loss.shape} {kw}")
    # bool vs 0/1 float masks agree
    close(tx.aggregate(L, m.astype(np.float64), mode), tx.aggregate(L, m, mode))


# ---------------------------------------------------------------------------------------------- ratios


@pytest.mark.parametrize("with_old", [True, False])
def test_ratios(with_old):
    lp, m, W = D["logps"], MASK, D["w"]
    old = D["old"] if with_old else None
    close(tx.token_log_ratio(lp, old, m), ref.token_log_ratio(lp, old, m))
    close(tx.sequence_log_ratio(lp, old, m), ref.sequence_log_ratio(lp, old, m))
    close(tx.gspo_token_log_ratio(lp, old, m), ref.gspo_token_log_ratio(lp, old, m))
    n = np.maximum(m.sum(-1, keepdims=True), 1)
    # analytic gradients: token 1, sequence 1/|y|, GSPO-token 1 (per token); 0 under the padding
    close(jgrad(lambda v: jnp.sum(W * tx.token_log_ratio(v, old, m)), lp), np.where(m, W, 0.0))
    close(jgrad(lambda v: jnp.sum(W[:, :1] * tx.sequence_log_ratio(v, old, m)), lp), np.where(m, W[:, :1] / n, 0.0))
    close(jgrad(lambda v: jnp.sum(W * tx.gspo_token_log_ratio(v, old, m)), lp), np.where(m, W, 0.0))
    for level, fn in (("token", ref.token_log_ratio), ("sequence", ref.sequence_log_ratio),
                      ("sequence_token", ref.gspo_token_log_ratio)):
        close(tx.importance_log_ratio(lp, old, m, level), fn(lp, old, m))
    if with_old:  # old log-probs are constants
        for f in (tx.token_log_ratio, tx.sequence_log_ratio, tx.gspo_token_log_ratio):
            g = jgrad(lambda o: jnp.sum(f(jnp.asarray(lp), o, m)), old)
            assert np.all(g == 0.0), f.__name__


def test_safe_exp():
    x = np.array([-1e4, -30.0, -3.0, 0.0, 0.5, 19.0, 25.0, 1e4])
    for clamp in (20.0, 2.0, None):
        xx = x if clamp is not None else x[2:-2]
        close(tx.safe_exp(xx, clamp), ref.safe_exp(xx, clamp), rtol=1e-12)
        g = np.asarray(jax.grad(lambda v: jnp.sum(tx.safe_exp(v, clamp)))(xx))
        inside = np.ones(xx.shape, bool) if clamp is None else np.abs(xx) < clamp
        close(g, np.where(inside, np.exp(np.where(inside, xx, 0.0)), 0.0), rtol=1e-12)
        assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------ surrogates


def _ratio():
    return np.exp(np.where(MASK, D["logps"] - D["old"], 0.0))


@pytest.mark.parametrize("eps_high,delta", [(None, None), (0.28, None), (0.28, 1.3), (None, 1.1)])
@pytest.mark.parametrize("adv_key", ["adv", "adv_tok_clean"])
def test_ppo_clip_loss(eps_high, delta, adv_key):
    r = _ratio()
    adv = D["adv"] if adv_key == "adv" else np.nan_to_num(D["adv_tok"])
    W = D["w"]
    got = tx.ppo_clip_loss(r, adv, 0.2, eps_high, delta)
    close(got, ref.ppo_clip_loss(r, adv, 0.2, eps_high, delta))
    close(tx.luspo_loss(r, adv, 0.2, eps_high, delta), ref.luspo_loss(r, adv, 0.2, eps_high, delta))
    g = jgrad(lambda v: jnp.sum(W * tx.ppo_clip_loss(v, adv, 0.2, eps_high, delta)), r)
    close(g, W * ref.ppo_clip_grad_ratio(r, adv, 0.2, eps_high, delta))
    # the analytic gradient agrees with finite differences of the reference (sanity of the reference)
    close(ref.fd_grad(lambda v: np.sum(W * ref.ppo_clip_loss(v, adv, 0.2, eps_high, delta)), r),
          W * ref.ppo_clip_grad_ratio(r, adv, 0.2, eps_high, delta), FD_RTOL, FD_ATOL)
    ga = jgrad(lambda a: jnp.sum(tx.ppo_clip_loss(jnp.asarray(r), a, 0.2, eps_high, delta)), adv)
    assert np.all(ga == 0.0)
    # indicators
    for a, b in zip(tx.clip_indicators(r, adv, 0.2, eps_high), ref.clip_indicators(r, adv, 0.2, eps_high)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_ppo_clip_sequence_level_broadcast():
    s = np.exp(ref.sequence_log_ratio(D["logps"], D["old"], MASK))  # [B, 1]
    adv = D["adv"]
    close(tx.ppo_clip_loss(s, adv, 0.1, 0.15), ref.ppo_clip_loss(s, adv, 0.1, 0.15))
    assert np.any(ref.clip_indicators(s, adv, 0.1, 0.15)[2])  # the clip is exercised


@pytest.mark.parametrize("eps_low", [None, 0.9])
def test_cispo_loss(eps_low):
    r, adv, W = _ratio(), D["adv"], D["w"]
    lp = np.where(MASK, D["logps"], 0.0)
    got = tx.cispo_loss(r, adv, lp, 1.2, eps_low)
    close(got, ref.cispo_loss(r, adv, lp, 1.2, eps_low))
    assert np.any(r > 1.2)
    w = np.minimum(r, 1.2) if eps_low is None else np.maximum(np.minimum(r, 1.2), eps_low)
    close(jgrad(lambda v: jnp.sum(W * tx.cispo_loss(r, adv, v, 1.2, eps_low)), lp), -W * w * adv)
    # the IS weight is a constant: no gradient through the ratio
    assert np.all(jgrad(lambda v: jnp.sum(tx.cispo_loss(v, adv, lp, 1.2, eps_low)), r) == 0.0)


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_loss(taus):
    r, W = _ratio(), D["w"]
    for adv in (D["adv"], np.nan_to_num(D["adv_tok"])):
        close(tx.sapo_loss(r, adv, *taus), ref.sapo_loss(r, adv, *taus))
        close(jgrad(lambda v: jnp.sum(W * tx.sapo_loss(v, adv, *taus)), r), W * ref.sapo_grad_ratio(r, adv, *taus))
    # gradient at r = 1 equals PPO's −A (the 4/τ normalisation)
    ones = np.ones((B, 1))
    close(jgrad(lambda v: jnp.sum(tx.sapo_loss(v, D["adv"], *taus)), ones), -D["adv"])


@pytest.mark.parametrize("with_sampler", [False, True])
def test_vespo(with_sampler):
    m, W = MASK, D["w"]
    lr = ref.token_log_ratio(D["logps"], D["old"], m)
    lr[3, 0] = 30.0  # beyond the ±20 token clamp
    adv = D["adv"]
    lis = None
    if with_sampler:
        rho = ref.sampler_importance_weights(D["old"], D["sampler"], m, "token_mask", 0.5, 2.0)
        with np.errstate(divide="ignore"):
            lis = np.log(rho)  # -inf where masked out
        assert np.isneginf(lis).any()
    for params in ((2.0, 3.0, 3.0, 2.0), (1.0, 0.0, 0.5, 5.0)):
        got = tx.vespo_weights(lr, adv, m, sampler_log_is=lis, k_pos=params[0], lambda_pos=params[1],
                               k_neg=params[2], lambda_neg=params[3])
        want = ref.vespo_weights(lr, adv, m, lis, *params)
        close(got, want, rtol=1e-9)
    # φ(1) = 1
    close(tx.vespo_weights(np.zeros((B, T)), adv, m), np.ones((B, 1)), rtol=1e-12)
    # huge log-ratios: finite weights, 0 where φ underflows
    big = np.where(m, 1e4, 0.0)
    phi = np.asarray(tx.vespo_weights(big, adv, m))
    assert np.all(np.isfinite(phi))
    close(phi, ref.vespo_weights(big, adv, m))
    # constants: no gradient through the weights
    g = jgrad(lambda v: jnp.sum(tx.vespo_weights(v, adv, m)), lr)
    assert np.all(g == 0.0)
    phi = ref.vespo_weights(lr, adv, m)
    lp = np.where(m, D["logps"], 0.0)
    close(tx.vespo_loss(phi, adv, lp), ref.vespo_loss(phi, adv, lp))
    close(jgrad(lambda v: jnp.sum(W * tx.vespo_loss(phi, adv, v)), lp), -W * phi * adv)


# ---------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("kind", tx.KL_ESTIMATORS)
@pytest.mark.parametrize("clamp", [20.0, 0.4, None])
def test_kl_penalty(kind, clamp):
    lp, rl, m, W = D["logps"], D["ref"], MASK, D["w"]
    close(tx.kl_penalty(lp, rl, m, kind, clamp), ref.kl_penalty(lp, rl, m, kind, clamp))
    g = jgrad(lambda v: jnp.sum(W * tx.kl_penalty(v, rl, m, kind, clamp)), lp)
    close(g, W * ref.kl_grad(lp, rl, m, kind, clamp))
    assert np.all(jgrad(lambda v: jnp.sum(tx.kl_penalty(jnp.asarray(lp), v, m, kind, clamp)), rl) == 0.0)
    # no mask: every entry (clean inputs)
    lp0, rl0 = np.nan_to_num(lp), np.nan_to_num(rl)
    close(tx.kl_penalty(lp0, rl0, None, kind, clamp), ref.kl_penalty(lp0, rl0, None, kind, clamp))
    if kind == "k3":
        assert np.all(np.asarray(tx.kl_penalty(lp, rl, m, kind, clamp)) >= 0.0)


def test_bias_corrected_kl():
    kl = ref.kl_penalty(D["logps"], D["ref"], MASK)
    r = _ratio()
    close(tx.bias_corrected_kl(kl, r), ref.bias_corrected_kl(kl, r))
    s = np.exp(ref.sequence_log_ratio(D["logps"], D["old"], MASK))
    close(tx.bias_corrected_kl(kl, s), ref.bias_corrected_kl(kl, s))


# --------------------------------------------------------------------------------- sampler correction


@pytest.mark.parametrize("mode", tx.SAMPLER_CORRECTION_MODES)
@pytest.mark.parametrize("bounds", [(None, 3.0), (0.5, 2.0), (0.8, None), (0.9, 1.1)])
def test_sampler_importance_weights(mode, bounds):
    old, samp, m = D["old"], D["sampler"], MASK
    close(tx.sampler_log_ratio(old, samp, m), ref.sampler_log_ratio(old, samp, m))
    got = tx.sampler_importance_weights(old, samp, m, mode, *bounds)
    want = ref.sampler_importance_weights(old, samp, m, mode, *bounds)
    assert got.shape == want.shape == ((B, T) if mode.startswith("token") else (B, 1))
    close(got, want)
    for arg in (0, 1):
        def f(v, arg=arg):
            a = [jnp.asarray(old), jnp.asarray(samp)]
            a[arg] = v
            return jnp.sum(tx.sampler_importance_weights(a[0], a[1], m, mode, *bounds))
        assert np.all(jgrad(f, (old, samp)[arg]) == 0.0)


def test_sampler_weights_extreme_log_ratio():
    old = np.where(MASK, 0.0, np.nan)
    samp = np.where(MASK, -1e4, np.nan)
    for mode in tx.SAMPLER_CORRECTION_MODES:
        got = np.asarray(tx.sampler_importance_weights(old, samp, MASK, mode, 0.5, 2.0))
        close(got, ref.sampler_importance_weights(old, samp, MASK, mode, 0.5, 2.0))
        assert np.all(np.isfinite(got))


@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3])
def test_off_policy_sequence_mask(adv_shape, threshold):
    lp, samp, m = D["logps"], D["sampler"], MASK
    adv = {"B": D["adv"][:, 0], "B1": D["adv"], "BT": np.repeat(D["adv"], T, 1)}[adv_shape]
    got = tx.off_policy_sequence_mask(adv, lp, samp, m, threshold)
    want = ref.off_policy_sequence_mask(adv, lp, samp, m, threshold)
    close(got, want)
    assert np.all(jgrad(lambda v: jnp.sum(tx.off_policy_sequence_mask(adv, v, samp, m, threshold)), lp) == 0.0)


# ---------------------------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("q", [0.2, 0.5, 1.0, 0.01])
def test_entropy_masks(q):
    ent, m = D["ent"], MASK
    close(tx.entropy_threshold(ent, m, q), ref.entropy_threshold(ent, m, q), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(tx.high_entropy_mask(ent, m, q)), ref.high_entropy_mask(ent, m, q))
    np.testing.assert_array_equal(np.asarray(tx.high_entropy_mask(ent, m, q, threshold=1.5)),
                                  ref.high_entropy_mask(ent, m, q, threshold=1.5))
    empty = np.zeros_like(m)
    assert math.isnan(float(tx.entropy_threshold(ent, empty, q)))
    assert not np.any(np.asarray(tx.high_entropy_mask(ent, empty, q)))


def test_entropy_bonus():
    ent, m = D["ent"], MASK
    close(tx.entropy_bonus(ent, m), ref.entropy_bonus(ent, m))
    close(tx.entropy_bonus(ent, m, num_items=100), ref.entropy_bonus(ent, m, 100))
    assert float(tx.entropy_bonus(ent, np.zeros_like(m))) == 0.0
    n = m.sum()
    close(jgrad(lambda v: tx.entropy_bonus(v, m), ent), np.where(m, 1.0 / n, 0.0))


def test_truncation():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 6, (B, T))
    m = MASK
    for eos, pad in (([2], None), ([2, 4], 0), ([], 5), ([], None)):
        got = np.asarray(tx.is_truncated(ids, m, eos, pad))
        np.testing.assert_array_equal(got, ref.is_truncated(ids, m, eos, pad))
        assert got[0]  # empty completion counts as truncated
        np.testing.assert_array_equal(np.asarray(tx.mask_truncated_completions(m, got)),
                                      ref.mask_truncated_completions(m, got))


# ------------------------------------------------------------------------------------------- advantages


def _rewards(seed):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=16)
    r[0:4] = 0.1  # zero-variance group with a non-dyadic value
    r[5] = np.nan  # unscorable
    r[8:12] = [np.nan, np.nan, np.nan, 0.7]  # singleton group
    return r


@pytest.mark.parametrize("scale", tx.SCALE_REWARDS)
def test_group_relative_advantages(scale):
    r = _rewards(2)
    got = np.asarray(tx.group_relative_advantages(r, 4, scale_rewards=scale))
    close(got, ref.group_relative_advantages(r, 4, scale_rewards=scale))
    assert np.all(got[0:4] == 0.0) and got[5] == 0.0 and np.all(got[8:12] == 0.0)
    assert np.all(got[[4, 6, 7, 12, 13, 14, 15]] != 0.0)
    # arbitrary group ids (interleaved, unequal sizes)
    gid = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3, 3, 1, 0, 2])
    got = tx.group_relative_advantages(r, group_ids=gid, num_groups=4, scale_rewards=scale)
    close(got, ref.group_relative_advantages(r, group_ids=gid, scale_rewards=scale))
    got = tx.group_relative_advantages(r, group_ids=gid, scale_rewards=scale, eps=0.5)
    close(got, ref.group_relative_advantages(r, group_ids=gid, scale_rewards=scale, eps=0.5))


@pytest.mark.parametrize("aggregation", tx.MULTI_REWARD_AGGREGATIONS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_multi_reward_advantages(aggregation, scale):
    rng = np.random.default_rng(3)
    R = rng.normal(size=(12, 3))
    R[0:3, 1] = 0.3  # zero-variance column within a group
    R[4, 0] = np.nan
    R[7, :] = np.nan  # unscorable row
    w = [1.0, 0.5, 2.0]
    for weights in (None, w):
        got = tx.multi_reward_advantages(R, weights, 3, aggregation=aggregation, scale_rewards=scale)
        want = ref.multi_reward_advantages(R, weights, 3, aggregation=aggregation, scale_rewards=scale)
        close(got, want)
        assert float(np.asarray(got)[7]) == 0.0
    gid = np.array([0, 1, 0, 1, 2, 2, 0, 1, 2, 3, 3, 3])
    close(tx.multi_reward_advantages(R, w, group_ids=gid, num_groups=4, aggregation=aggregation, scale_rewards=scale),
          ref.multi_reward_advantages(R, w, group_ids=gid, aggregation=aggregation, scale_rewards=scale))


def test_soft_overlong_punishment():
    lengths = np.array([0, 5, 10, 11, 12, 15, 19, 20, 21, 40])
    for max_len, cache in ((20, 8), (20, 20), (20, 1)):
        close(tx.soft_overlong_punishment(lengths, max_len, cache), ref.soft_overlong_punishment(lengths, max_len, cache),
              rtol=1e-6)


def test_group_top_k_and_gfpo():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 4, 12).astype(float)  # many ties
    rewards = rng.normal(size=12)
    gid = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 0])
    for k in (1, 2, 3, 5):
        np.testing.assert_array_equal(np.asarray(tx.group_top_k_mask(scores, k, 4)), ref.group_top_k_mask(scores, k, 4))
        np.testing.assert_array_equal(np.asarray(tx.group_top_k_mask(scores, k, group_ids=gid)),
                                      ref.group_top_k_mask(scores, k, group_ids=gid))
        for scale in tx.SCALE_REWARDS:
            adv, keep = tx.gfpo_advantages(rewards, scores, k, 4, scale_rewards=scale)
            radv, rkeep = ref.gfpo_advantages(rewards, scores, k, 4, scale_rewards=scale)
            np.testing.assert_array_equal(np.asarray(keep), rkeep)
            close(adv, radv)
            adv, keep = tx.gfpo_advantages(rewards, scores, k, group_ids=gid, num_groups=3, scale_rewards=scale)
            radv, rkeep = ref.gfpo_advantages(rewards, scores, k, group_ids=gid, scale_rewards=scale)
            np.testing.assert_array_equal(np.asarray(keep), rkeep)
            close(adv, radv)


def test_adaptive_entropy_coef():
    for coef in (0.0, 0.003, 0.5, 0.998, 1.0):
        for h in (0.1, 0.2, 0.3):
            close(tx.adaptive_entropy_coef(coef, h), ref.adaptive_entropy_coef(coef, h), rtol=1e-12)
            close(tx.adaptive_entropy_coef(coef, h, target=0.15, delta=0.01, coef_min=0.002, coef_max=0.5),
                  ref.adaptive_entropy_coef(coef, h, 0.15, 0.01, 0.002, 0.5), rtol=1e-12)


# ------------------------------------------------------------------------------------------ the recipe


def _pipeline_cases():
    cases = []
    eps_hi = {"cispo": 1.2}
    for lt in tx.POLICY_LOSS_TYPES:
        for level in tx.IMPORTANCE_SAMPLING_LEVELS:
            eps = 0.1 if level != "token" else 0.2
            cases.append((f"{lt}-{level}", dict(loss_type=lt, importance_sampling_level=level, epsilon=eps,
                                                 epsilon_high=eps_hi.get(lt, 0.28 if lt == "dapo" else None)), {}))
    for kind in tx.KL_ESTIMATORS:
        for bc in (False, True):
            cases.append((f"kl-{kind}-{bc}", dict(loss_type="grpo", beta=0.05, kl_estimator=kind,
                                                 use_bias_correction_kl=bc), {}))
    for level in ("sequence", "sequence_token"):
        cases.append((f"kl-bc-{level}", dict(loss_type="grpo", importance_sampling_level=level, beta=0.05,
                                              epsilon=0.1), {}))
    cases += [
        ("delta", dict(loss_type="grpo", delta=1.15), {}),
        ("opsm", dict(loss_type="grpo", off_policy_mask_threshold=0.05), {}),
        ("opsm-sampler", dict(loss_type="dapo", off_policy_mask_threshold=0.05,
                              sampler_correction="token_truncate"), {}),
        ("entropy-mask", dict(loss_type="dapo", top_entropy_quantile=0.4), {}),
        ("entropy-mask-bonus", dict(loss_type="grpo", top_entropy_quantile=0.4, entropy_coef=0.1), {}),
        ("entropy-bonus", dict(loss_type="bnpo", entropy_coef=0.1), {}),
        ("truncated", dict(loss_type="dapo", mask_truncated_completions=True), {"truncated": True}),
        ("on-policy", dict(loss_type="grpo", beta=0.05), {"old": None}),
        ("on-policy-seq", dict(loss_type="luspo", importance_sampling_level="sequence"), {"old": None}),
        ("adv-per-token", dict(loss_type="dapo"), {"adv_tok": True}),
        ("adv-per-token-gspo-token", dict(loss_type="grpo", importance_sampling_level="sequence_token"),
         {"adv_tok": True}),
        ("dr-grpo-L", dict(loss_type="dr_grpo", max_completion_length=10), {}),
        ("global-counts-dapo", dict(loss_type="dapo"), {"num_items": 60}),
        ("global-counts-grpo", dict(loss_type="grpo"), {"num_sequences": 15}),
        ("global-counts-entropy-bonus", dict(loss_type="dapo", entropy_coef=0.1, top_entropy_quantile=0.5),
         {"num_items": 60}),
        ("log-clamp", dict(loss_type="grpo", log_ratio_clamp=0.3, beta=0.05), {}),
        ("everything", dict(loss_type="dapo", epsilon_high=0.28, delta=1.4, beta=0.05, off_policy_mask_threshold=0.0,
                            top_entropy_quantile=0.6, sampler_correction="sequence_mask", sampler_clip_min=0.3,
                            sampler_clip_max=3.0, entropy_coef=0.05), {}),
    ]
    for mode in tx.SAMPLER_CORRECTION_MODES:
        cases.append((f"sampler-{mode}", dict(loss_type="grpo", sampler_correction=mode, sampler_clip_min=0.5,
                                              sampler_clip_max=2.0), {}))
        cases.append((f"sampler-{mode}-max", dict(loss_type="cispo", epsilon_high=1.2, sampler_correction=mode), {}))
    for mode in ("token_truncate", "token_mask"):
        cases.append((f"vespo-{mode}", dict(loss_type="vespo", sampler_correction=mode, sampler_clip_min=0.5,
                                            sampler_clip_max=2.0), {}))
    return cases


CASES = _pipeline_cases()


@pytest.mark.parametrize("name,cfg_kw,extra", CASES, ids=[c[0] for c in CASES])
def test_policy_loss_pipeline(name, cfg_kw, extra):
    cfg = PolicyLossConfig(**cfg_kw)
    d = D
    mask = d["mask"]
    old = extra.get("old", d["old"])
    adv = np.nan_to_num(d["adv_tok"]) if extra.get("adv_tok") else d["adv"]
    truncated = np.array([False, True, False, True, False, False]) if extra.get("truncated") else None
    kw = dict(ref_logps=d["ref"] if cfg.beta else None,
              sampler_logps=d["sampler"] if cfg.sampler_correction else None,
              entropies=d["ent"] if (cfg.top_entropy_quantile < 1 or cfg.entropy_coef) else None,
              num_items=extra.get("num_items"), num_sequences=extra.get("num_sequences"), truncated=truncated)

    def tx_loss(lp):
        return tx.policy_loss(lp, old, adv, mask, cfg, **kw)[0]

    val, g = jax.value_and_grad(tx_loss)(jnp.asarray(d["logps"]))
    base = d["logps"]

    def ref_loss(lp):
        return ref.policy_loss(lp, old, adv, mask, cfg, frozen=base, **kw)

    want = ref_loss(base)
    close(val, want, err=name)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.all(g[~mask] == 0.0), name
    gn = ref.fd_grad(ref_loss, base, where=mask)
    close(g, gn, FD_RTOL, FD_ATOL, err=f"grad {name}")
    assert np.any(gn != 0.0), name  # the case exercises a real gradient


STOP_GRAD_CFGS = [
    dict(loss_type="grpo", beta=0.05, sampler_correction="token_truncate", off_policy_mask_threshold=0.05),
    dict(loss_type="cispo", epsilon_high=1.2, beta=0.05, use_bias_correction_kl=True,
         sampler_correction="sequence_mask", sampler_clip_min=0.5),
    dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.05, sampler_correction="sequence_truncate"),
    dict(loss_type="vespo", sampler_correction="token_mask", sampler_clip_min=0.5, beta=0.05),
    dict(loss_type="luspo", importance_sampling_level="sequence_token", beta=0.05, top_entropy_quantile=0.5,
         sampler_correction="token_mask", sampler_clip_min=0.5),
]


@pytest.mark.parametrize("cfg_kw", STOP_GRAD_CFGS, ids=[c["loss_type"] for c in STOP_GRAD_CFGS])
def test_policy_loss_stop_gradients(cfg_kw):
    """old / ref / sampler log-probs, advantages (and entropies without a bonus) get exactly zero gradient."""
    cfg = PolicyLossConfig(**cfg_kw)
    d = D
    args = dict(old=d["old"], adv=d["adv"], ref=d["ref"], sampler=d["sampler"], ent=d["ent"])

    def f(old, adv, refl, samp, ent):
        return tx.policy_loss(jnp.asarray(d["logps"]), old, adv, d["mask"], cfg, ref_logps=refl, sampler_logps=samp,
                              entropies=ent)[0]

    grads = jax.grad(f, argnums=(0, 1, 2, 3, 4))(*(jnp.asarray(v) for v in args.values()))
    for name, g in zip(args, grads):
        assert np.all(np.asarray(g) == 0.0), name
    # and the policy gradient itself is non-trivial
    g = jax.grad(lambda lp: tx.policy_loss(lp, d["old"], d["adv"], d["mask"], cfg, ref_logps=d["ref"],
                                           sampler_logps=d["sampler"], entropies=d["ent"])[0])(jnp.asarray(d["logps"]))
    assert np.any(np.asarray(g) != 0.0)
