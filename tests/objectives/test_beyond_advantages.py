"""Advantage estimators beyond TRL: NumPy float64 references, verl-formula fixtures, hypothesis
properties, pitfall regressions and bad input.

verl is not installed. The "verl fixtures" are small fixed inputs whose expected values are worked out by
hand from the formulas of verl's ``verl/trainer/ppo/core_algos.py`` (commit b178a3cd, 2026-01-29:
``compute_gae_advantage_return``, ``compute_rloo_outcome_advantage``, ``compute_opo_outcome_advantage``,
``compute_grpo_passk_outcome_advantage``, ``compute_reinforce_plus_plus_outcome_advantage``,
``compute_reinforce_plus_plus_baseline_outcome_advantage``, ``compute_remax_outcome_advantage``,
``compute_optimal_token_baseline_advantage``, ``compute_value_loss``) and ``verl/utils/torch_functional.py``
(``masked_whiten``) — never by trlax.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import trlax.objectives as tx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _numpy_ref_beyond2 as ref  # noqa: E402

RTOL, ATOL = 1e-10, 1e-12
# arbitrary (non-contiguous) groups: 0 has 3 rows, 1 has 3, 2 is a singleton, 3 has 2, 4 is empty
GID = np.array([0, 1, 0, 2, 1, 0, 3, 1, 3])
NG = 5
N = GID.size
B, T = N, 6
LENGTHS = np.array([6, 4, 2, 5, 0, 6, 3, 1, 6])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]


def close(a, b, rtol=RTOL, atol=ATOL, err=""):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                               err_msg=err)


def rewards(seed, binary=False):
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 2, N).astype(float) if binary else rng.normal(0.5, 1.0, N)
    r[7] = np.nan  # unscorable
    if not binary:
        r[6] = r[8] = 0.3  # zero-variance group 3
    return r


def token_data(seed, holes=True):
    rng = np.random.default_rng(seed)
    mask = MASK.copy()
    if holes:
        mask[0, 2] = mask[5, 1] = False  # interleaved observation tokens
    rew = np.where(mask, rng.normal(0.0, 0.3, (B, T)), np.nan)
    vals = np.where(mask, rng.normal(0.0, 1.0, (B, T)), np.nan)
    return rew, vals, mask


# ------------------------------------------------------------------------------- NumPy references


@pytest.mark.parametrize("layout", ["group_ids", "num_generations"])
@pytest.mark.parametrize("singleton", tx.SINGLETON_POLICIES)
def test_group_estimators_match_reference(layout, singleton):
    for seed in range(3):
        r = rewards(seed)
        if layout == "group_ids":
            kw, gid = dict(group_ids=GID, num_groups=NG), GID
        else:
            r = r[:8]
            kw, gid = dict(num_generations=4), np.arange(8) // 4
        lengths = (LENGTHS[: r.size] + 1).astype(float)
        close(tx.rloo_advantages(r, singleton=singleton, **kw), ref.rloo(r, gid, singleton))
        close(tx.opo_advantages(r, lengths, singleton=singleton, **kw), ref.opo(r, lengths, gid, singleton))
        rb = rewards(seed, binary=True)[: r.size]
        close(tx.maxrl_advantages(rb, **kw), ref.maxrl(rb, gid))
        for scale in (True, False):
            close(tx.grpo_passk_advantages(r, scale_by_std=scale, **kw), ref.passk(r, gid, scale))
        np.testing.assert_array_equal(tx.dynamic_sampling_mask(r, **kw), ref.dynamic_keep(r, gid))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
    rew, _, mask = token_data(0)
    close(tx.masked_whiten(rew, mask, shift_mean), ref.whiten(rew, mask, shift_mean))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("whiten", [True, False])
def test_reinforce_plus_plus_matches_reference(gamma, whiten):
    rew, _, mask = token_data(1)
    adv, ret = tx.reinforce_plus_plus_advantages(rew, mask, gamma, whiten)
    G = ref.returns_to_go(rew, mask, gamma)
    close(ret, G)
    close(adv, ref.whiten(G, mask) if whiten else G)


@pytest.mark.parametrize("singleton", tx.SINGLETON_POLICIES)
def test_reinforce_plus_plus_baseline_matches_reference(singleton):
    r = rewards(2)
    got = tx.reinforce_plus_plus_baseline_advantages(r, MASK, group_ids=GID, num_groups=NG, singleton=singleton)
    # RF++-baseline = (r - group mean) on the tokens, whitened over the tokens of scorable rows
    base = np.zeros(N)
    for g in set(GID.tolist()):
        idx = [i for i in np.nonzero(GID == g)[0] if not np.isnan(r[i])]
        if len(idx) == 1 and singleton == "raw":
            base[idx[0]] = r[idx[0]]
        if len(idx) >= 2 and len(set(r[idx].tolist())) > 1:
            base[idx] = r[idx] - r[idx].mean()
    tok = MASK & ~np.isnan(r)[:, None]
    close(got, ref.whiten(np.broadcast_to(base[:, None], (B, T)), tok))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_matches_reference(gamma, lam, bootstrap):
    rew, vals, mask = token_data(3)
    bv = np.linspace(-1, 1, B) if bootstrap else None
    adv, ret = tx.gae_advantages(rew, vals, mask, gamma, lam, bootstrap_values=bv)
    A, R = ref.gae(rew, vals, mask, gamma, lam, bv)
    close(adv, A)
    close(ret, R)
    close(tx.gae_advantages(rew, vals, mask, gamma, lam, bootstrap_values=bv, whiten=True)[0], ref.whiten(A, mask))
    g = jax.grad(lambda v: jnp.sum(tx.gae_advantages(rew, v, mask, gamma, lam)[0]))(jnp.nan_to_num(vals))
    assert np.all(np.asarray(g) == 0)  # advantages are data


@pytest.mark.parametrize("clip", [0.2, 0.05, None])
def test_clipped_value_loss_value_and_gradient(clip):
    rng = np.random.default_rng(4)
    mask = MASK
    old = rng.normal(0, 1, (B, T))
    v = old + rng.normal(0, 0.3, (B, T))
    ret = rng.normal(0, 1, (B, T))
    v, old, ret = (np.where(mask, x, np.nan) for x in (v, old, ret))  # NaN in every masked slot
    loss, clipped = tx.clipped_value_loss(v, old, ret, mask, clip)
    L, C, Gr = ref.value_loss(v, old, ret, mask, clip)
    close(loss, L)
    np.testing.assert_array_equal(clipped, C)
    if clip is not None:
        assert 0 < C.sum() < mask.sum()
    g = jax.grad(lambda x: jnp.sum(tx.clipped_value_loss(x, old, ret, mask, clip)[0]))(jnp.asarray(v))
    close(g, Gr, rtol=1e-9)
    # the analytic reference gradient agrees with finite differences of the reference loss
    x0 = np.nan_to_num(v)
    f = lambda x: ref.value_loss(x, old, ret, mask, clip)[0].sum()  # noqa: E731
    fd = np.zeros_like(x0)
    for i, t in zip(*np.nonzero(mask)):
        e = np.zeros_like(x0)
        e[i, t] = 1e-6
        fd[i, t] = (f(x0 + e) - f(x0 - e)) / 2e-6
    close(Gr, fd, rtol=1e-5, atol=1e-7)
    gj = jax.grad(lambda o, r: jnp.sum(tx.clipped_value_loss(v, o, r, mask, clip)[0]), argnums=(0, 1))(
        jnp.nan_to_num(old), jnp.nan_to_num(ret))
    assert all(np.all(np.asarray(x) == 0) for x in gj)  # old values and returns are stop-gradient


def test_remax_and_otb_match_reference():
    rew, _, mask = token_data(5, holes=False)
    base = np.linspace(-0.5, 0.5, B)
    adv, ret = tx.remax_advantages(rew, base, mask)
    A, G = ref.remax(rew, base, mask)
    close(adv, A)
    close(ret, np.where(mask, G, 0))
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (B, T, 11))
    sp = np.asarray(tx.sum_pi_squared(logits))
    close(sp, ref.sum_pi_sq(logits))
    z = logits - logits.max(-1, keepdims=True)
    lp = np.take_along_axis(z - np.log(np.exp(z).sum(-1, keepdims=True)), rng.integers(0, 11, (B, T, 1)), -1)[..., 0]
    isw = rng.uniform(0.5, 1.5, (B, T))
    for iw in (None, isw):
        for tail in (False, True):
            a, g = tx.optimal_token_baseline_advantages(rew, lp, sp, mask, group_ids=GID, num_groups=NG,
                                                        is_weights=iw, handle_zero_tail=tail)
            A, G = ref.otb(rew, lp, sp, mask, GID, iw, tail)
            close(a, A, err=f"is={iw is not None} tail={tail}")
            close(g, G)


def test_otb_zero_tail_changes_only_the_lone_longest():
    rew, _, mask = token_data(6, holes=False)
    lp = np.full((B, T), -1.0)
    sp = np.full((B, T), 0.3)
    a0 = np.asarray(tx.optimal_token_baseline_advantages(rew, lp, sp, mask, group_ids=GID, num_groups=NG)[0])
    a1 = np.asarray(tx.optimal_token_baseline_advantages(rew, lp, sp, mask, group_ids=GID, num_groups=NG,
                                                         handle_zero_tail=True)[0])
    diff = np.argwhere(~np.isclose(a0, a1))
    # group 1 = rows 1 (len 4), 4 (len 0), 7 (len 1): row 1 is the lone longest, alone from t=1 on;
    # group 0 = rows 0, 2, 5 has two of length 6, group 3 = rows 6, 8 -> row 8 alone from t=3 on
    assert {tuple(x) for x in diff} <= {(1, 1), (1, 2), (1, 3), (8, 3), (8, 4), (8, 5)}
    assert len(diff) > 0


@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
def test_entropy_shaping_matches_reference(adv_shape):
    rng = np.random.default_rng(7)
    a = rng.normal(0, 1, {"B": (B,), "B1": (B, 1), "BT": (B, T)}[adv_shape])
    H = np.where(MASK, rng.uniform(0, 3, (B, T)), np.nan)
    got = tx.entropy_advantage_shaping(a, H, MASK, 0.4, 2.0)
    close(got, ref.entropy_shaping(a, H, MASK, 0.4, 2.0))
    g = jax.grad(lambda h: jnp.sum(tx.entropy_advantage_shaping(a, h, MASK)))(jnp.nan_to_num(H))
    assert np.all(np.asarray(g) == 0)  # sg(H): the shaping term is a constant


def test_prompt_mean_weights_match_reference_and_split():
    rng = np.random.default_rng(8)
    L = rng.normal(0, 1, (B, T))
    w = np.asarray(tx.prompt_mean_weights(MASK, group_ids=GID, num_groups=NG))
    close(np.sum(w * np.where(MASK, L, 0)), ref.prompt_mean_loss(L, MASK, GID), rtol=1e-6)  # float32 weights
    # micro-batches with the global token counts / prompt count sum to the full-batch loss
    counts = tx.group_token_counts(MASK, group_ids=GID, num_groups=NG)
    P = int(np.sum(np.asarray(counts) > 0))
    tot = 0.0
    for s in (slice(0, 4), slice(4, N)):
        ws = np.asarray(tx.prompt_mean_weights(MASK[s], group_ids=GID[s], num_groups=NG, token_counts=counts,
                                               num_prompts=P))
        tot += np.sum(ws * np.where(MASK[s], L[s], 0))
    close(tot, ref.prompt_mean_loss(L, MASK, GID), rtol=1e-6)  # float32 weights


# ------------------------------------------------------------------- verl documented-formula fixtures


def test_verl_fixture_gae():
    # compute_gae_advantage_return, γ = 0.99, λ = 0.95, one row r = (0, 0, 1), V = (0.5, 0.4, 0.3):
    # δ2 = 1 − 0.3 = 0.7;  A2 = 0.7
    # δ1 = 0.99·0.3 − 0.4 = −0.103;  A1 = −0.103 + 0.9405·0.7 = 0.55535
    # δ0 = 0.99·0.4 − 0.5 = −0.104;  A0 = −0.104 + 0.9405·0.55535 = 0.418306675
    r = np.array([[0.0, 0.0, 1.0]])
    v = np.array([[0.5, 0.4, 0.3]])
    m = np.ones((1, 3), bool)
    adv, ret = tx.gae_advantages(r, v, m, 0.99, 0.95)
    close(adv, [[0.418306675, 0.55535, 0.7]])
    close(ret, [[0.918306675, 0.95535, 1.0]])
    # an observation token at t=1 (mask 0) is skipped: nextvalues/lastgaelam carry through it
    # A2 = 0.7; A0 = (0.99·0.3 − 0.5) + 0.9405·0.7 = −0.203 + 0.65835 = 0.45535
    m2 = np.array([[True, False, True]])
    close(tx.gae_advantages(r, v, m2, 0.99, 0.95)[0], [[0.45535, 0.0, 0.7]])


def test_verl_fixture_group_estimators():
    # RLOO (loop form): scores (1, 0, 0.5): A = s·n/(n−1) − mean·n/(n−1), n = 3, mean = 0.5
    close(tx.rloo_advantages(np.array([1.0, 0.0, 0.5]), 3), [0.75, -0.75, 0.0])
    # singleton: verl loop rloo leaves A = s
    close(tx.rloo_advantages(np.array([0.7]), 1, singleton="raw"), [0.7])
    # OPO: scores (1, 0), lengths (2, 6): b = (2·1 + 6·0)/8 = 0.25
    close(tx.opo_advantages(np.array([1.0, 0.0]), np.array([2, 6]), 2), [0.75, -0.25])
    # GRPO pass@k: scores (0.2, 0.9, 0.5): only the argmax gets (0.9 − 0.5)/(std + 1e-6),
    # torch.std (unbiased) = sqrt(((−1/3)² + (11/30)² + (−1/30)²)/2) = sqrt(0.12333...) = 0.351188...
    std = math.sqrt(((1 / 3) ** 2 + (11 / 30) ** 2 + (1 / 30) ** 2) / 2)
    close(tx.grpo_passk_advantages(np.array([0.2, 0.9, 0.5]), 3), [0.0, 0.4 / (std + 1e-6), 0.0])
    close(tx.grpo_passk_advantages(np.array([0.2, 0.9, 0.5]), 3, scale_by_std=False), [0.0, 0.4, 0.0])


def test_verl_fixture_reinforce_plus_plus_and_whiten():
    # reinforce_plus_plus, γ = 0.5: rows r = (0, 0, 1) and (0, 1, pad):
    # returns (0.25, 0.5, 1) and (0.5, 1); masked_whiten over the 5 valid tokens:
    # mean = 3.25/5 = 0.65, unbiased var = (0.16 + 0.0225 + 0.1225 + 0.0225 + 0.1225)/4 = 0.1125
    r = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    m = np.array([[1, 1, 1], [1, 1, 0]], bool)
    adv, ret = tx.reinforce_plus_plus_advantages(r, m, 0.5)
    close(ret, [[0.25, 0.5, 1.0], [0.5, 1.0, 0.0]])
    s = math.sqrt(0.1125 + 1e-8)
    close(adv, [[-0.4 / s, -0.15 / s, 0.35 / s], [-0.15 / s, 0.35 / s, 0.0]])
    # reinforce_plus_plus_baseline: groups {(1, 0)}, {(0.5, 0.5, 1)} (one token each) ->
    # s − mean = (0.5, −0.5), (−1/6, −1/6, 1/3); then whiten over 5 tokens (mean 0)
    rr = np.array([1.0, 0.0, 0.5, 0.5, 1.0])
    x = np.array([0.5, -0.5, -1 / 6, -1 / 6, 1 / 3])
    var = np.sum(x ** 2) / 4
    close(tx.reinforce_plus_plus_baseline_advantages(rr, np.ones((5, 1), bool), group_ids=np.array([0, 0, 1, 1, 1]),
                                                     num_groups=2)[:, 0], x / math.sqrt(var + 1e-8))


def test_verl_fixture_remax_otb_value_loss():
    # ReMax: r = (0, 0, 2), greedy baseline 1.5: returns (2, 2, 2), A = 0.5 everywhere
    adv, ret = tx.remax_advantages(np.array([[0.0, 0.0, 2.0]]), np.array([1.5]), np.ones((1, 3), bool))
    close(adv, [[0.5, 0.5, 0.5]])
    close(ret, [[2.0, 2.0, 2.0]])
    # OTB: two rows, π = 0.5, Σπ² = 0.5 -> w = 1 − 1 + 0.5 = 0.5, W = (0.5, 1.0);
    # G = (1, 1) and (0, 0): B_t = W_t / (2 W_t + 1e-8)
    lp = np.full((2, 2), math.log(0.5))
    sp = np.full((2, 2), 0.5)
    r = np.array([[0.0, 1.0], [0.0, 0.0]])
    a, _ = tx.optimal_token_baseline_advantages(r, lp, sp, np.ones((2, 2), bool), 2)
    b = np.array([0.5 / (1.0 + 1e-8), 1.0 / (2.0 + 1e-8)])
    close(a, [1.0 - b, -b])
    # compute_value_loss (token values, cliprange 0.2): vpred 1.0, old 0, R 2 -> clipped 0.2:
    # ½·max((1−2)², (0.2−2)²) = ½·3.24 = 1.62, clipped; vpred 0.1 (inside): ½·(1.9)² = 1.805
    loss, clipped = tx.clipped_value_loss(np.array([[1.0, 0.1]]), np.zeros((1, 2)), np.full((1, 2), 2.0),
                                          np.ones((1, 2), bool), 0.2)
    close(loss, [[1.62, 1.805]])
    np.testing.assert_array_equal(clipped, [[True, False]])


# ------------------------------------------------------------------------------- pitfall regressions


def test_pitfall_singleton_groups():
    """objectives-survey 4.5: singleton groups give 0 (documented), or the raw score on request."""
    r = np.array([0.3, 1.0, 2.0, 2.5])
    gid = np.array([0, 1, 1, 2])
    for f in (tx.rloo_advantages, tx.maxrl_advantages, tx.grpo_passk_advantages):
        out = np.asarray(f(r, group_ids=gid, num_groups=3))
        assert out[0] == 0.0 and out[3] == 0.0 and np.all(np.isfinite(out))
    out = np.asarray(tx.opo_advantages(r, np.array([3, 1, 2, 4]), group_ids=gid, num_groups=3))
    assert out[0] == 0.0 and out[3] == 0.0
    close(tx.rloo_advantages(r, group_ids=gid, num_groups=3, singleton="raw")[np.array([0, 3])], [0.3, 2.5])
    close(tx.opo_advantages(r, np.ones(4), group_ids=gid, num_groups=3, singleton="raw")[np.array([0, 3])], [0.3, 2.5])
    rb = np.asarray(tx.reinforce_plus_plus_baseline_advantages(r, np.ones((4, 2), bool), group_ids=gid, num_groups=3))
    assert np.all(np.isfinite(rb))


def test_pitfall_fp32_leave_one_out_residue():
    """4.5: identical non-dyadic rewards in float32 give exactly 0 (no (x − mean) residue)."""
    r = np.array([0.9] * 3 + [0.1] * 7, np.float32)
    gid = np.array([0] * 3 + [1] * 7)
    # a float32 segment mean of these identical values is not the value itself (3·0.9/3 and 7·0.1/7 are
    # off by one ulp), so any unguarded (r − mean) form leaves a residue and this test can fail
    seg_mean = jax.ops.segment_sum(jnp.asarray(r), jnp.asarray(gid), num_segments=2) / jnp.array([3.0, 7.0], jnp.float32)
    assert np.all(np.asarray(seg_mean) != np.array([0.9, 0.1], np.float32))
    for out in (tx.rloo_advantages(r, group_ids=gid, num_groups=2),
                tx.maxrl_advantages(r, group_ids=gid, num_groups=2),
                tx.opo_advantages(r, np.array([3, 5, 7, 1, 2, 3, 4, 5, 6, 7]), group_ids=gid, num_groups=2),
                tx.grpo_passk_advantages(r, group_ids=gid, num_groups=2)):
        assert np.asarray(out).dtype == np.float32
        assert np.all(np.asarray(out) == 0.0)
    rb = tx.reinforce_plus_plus_baseline_advantages(r, np.ones((10, 3), bool), group_ids=gid, num_groups=2)
    assert np.all(np.asarray(rb) == 0.0)
    w = tx.masked_whiten(np.full((1, 7), 0.1, np.float32), np.ones((1, 7), bool))
    assert np.all(np.asarray(w) == 0.0)  # constant input: no residue / sqrt(1e-8) blow-up
    assert not np.asarray(tx.dynamic_sampling_mask(r, group_ids=gid, num_groups=2)).any()


def test_pitfall_nan_under_masks():
    """4.6: NaN / inf in masked slots never reach values or gradients."""
    rew, vals, mask = token_data(9)  # NaN in every masked slot
    rew = np.where(mask, rew, np.inf)
    for out in (*tx.gae_advantages(rew, vals, mask, 0.99, 0.95, whiten=True),
                *tx.reinforce_plus_plus_advantages(rew, mask, 0.9),
                *tx.remax_advantages(rew, np.zeros(B), mask),
                tx.entropy_advantage_shaping(np.ones(B), vals, mask),
                tx.masked_whiten(rew, mask)):
        out = np.asarray(out)
        assert np.all(np.isfinite(out)) and np.all(out[~mask] == 0)
    g = jax.grad(lambda v: jnp.sum(tx.clipped_value_loss(v, vals, rew, mask, 0.2)[0]))(jnp.asarray(vals))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~mask] == 0)


def test_pitfall_rejected_rows_leave_the_baseline():
    """4.6 (verl PRs #6362, #6375): rows rejected by rollout correction must leave group baselines:
    marking them NaN gives the advantages of the kept subset."""
    r = np.array([1.0, 0.0, 0.5, 0.2, 0.9, 0.4])
    gid = np.array([0, 0, 0, 1, 1, 1])
    keep = np.array([True, False, True, True, True, False])
    got = np.asarray(tx.rloo_advantages(np.where(keep, r, np.nan), group_ids=gid, num_groups=2))
    sub = np.asarray(tx.rloo_advantages(r[keep], group_ids=gid[keep], num_groups=2))
    close(got[keep], sub)
    assert np.all(got[~keep] == 0)


def test_pitfall_empty_masks_and_bf16():
    empty = np.zeros((B, T), bool)
    rew, vals, _ = token_data(10)
    for out in (*tx.gae_advantages(rew, vals, empty, whiten=True), *tx.reinforce_plus_plus_advantages(rew, empty),
                tx.masked_whiten(rew, empty), tx.prompt_mean_weights(empty, group_ids=GID, num_groups=NG),
                tx.clipped_value_loss(vals, vals, rew, empty)[0],
                *tx.optimal_token_baseline_advantages(rew, vals, vals, empty, group_ids=GID, num_groups=NG)):
        assert np.all(np.asarray(out) == 0)
    # bf16 inputs are computed in float32 and agree with the float64 reference
    r16 = jnp.asarray(np.nan_to_num(rew), jnp.bfloat16)
    v16 = jnp.asarray(np.nan_to_num(vals), jnp.bfloat16)
    adv, _ = tx.gae_advantages(r16, v16, MASK, 0.99, 0.95)
    assert adv.dtype == jnp.float32
    A, _ = ref.gae(np.asarray(r16, np.float64), np.asarray(v16, np.float64), MASK, 0.99, 0.95)
    close(adv, A, rtol=1e-5, atol=1e-5)
    a16 = tx.rloo_advantages(jnp.asarray([0.1, 0.7, 0.3], jnp.bfloat16), 3)
    assert a16.dtype == jnp.float32


# --------------------------------------------------------------------------------------- properties

_r = hnp.arrays(np.float64, (N,), elements=st.floats(-3.0, 3.0, allow_subnormal=False))
_rb = hnp.arrays(np.float64, (N,), elements=st.sampled_from([0.0, 1.0]))
_tok = hnp.arrays(np.float64, (B, T), elements=st.floats(-2.0, 2.0, allow_subnormal=False))
_lens = st.lists(st.integers(0, T), min_size=B, max_size=B)


def _mask(lens):
    return np.arange(T)[None, :] < np.asarray(lens)[:, None]


@given(_r, st.permutations(range(N)), hnp.arrays(np.float64, (NG,), elements=st.floats(-5, 5, allow_subnormal=False)))
def test_prop_rloo_equivariant_shift_invariant_zero_sum(r, perm, shift):
    kw = dict(group_ids=GID, num_groups=NG)
    a = np.asarray(tx.rloo_advantages(r, **kw))
    p = np.asarray(perm)
    close(tx.rloo_advantages(r[p], group_ids=GID[p], num_groups=NG), a[p])
    close(tx.rloo_advantages(r + shift[GID], **kw), a, rtol=1e-8, atol=1e-9)
    for g in range(NG):
        close(a[GID == g].sum(), 0.0, atol=1e-9)
    # RLOO = n/(n−1) · Dr. GRPO (mean-centred, no std)
    n = np.bincount(GID, minlength=NG)[GID]
    dr = np.asarray(tx.group_relative_advantages(r, **kw, scale_rewards="none"))
    close(a, np.where(n > 1, n / np.maximum(n - 1, 1) * dr, 0.0), rtol=1e-9, atol=1e-12)


@given(_r, hnp.arrays(np.float64, (N,), elements=st.floats(1.0, 20.0, allow_subnormal=False)))
def test_prop_opo_equal_lengths_is_dr_grpo(r, lengths):
    kw = dict(group_ids=GID, num_groups=NG)
    close(tx.opo_advantages(r, np.full(N, 7.0), **kw), tx.group_relative_advantages(r, **kw, scale_rewards="none"),
          rtol=1e-9, atol=1e-12)
    a = np.asarray(tx.opo_advantages(r, lengths, **kw))
    for g in range(NG):  # the length-weighted sum of advantages is 0 in every group
        close(np.sum(lengths[GID == g] * a[GID == g]), 0.0, atol=1e-8)


@given(_rb, st.floats(0.1, 10.0, allow_subnormal=False))
def test_prop_maxrl_binary(r, c):
    kw = dict(group_ids=GID, num_groups=NG)
    a = np.asarray(tx.maxrl_advantages(r, **kw, eps=0.0))
    close(tx.maxrl_advantages(r * c, **kw, eps=0.0), a, rtol=1e-9)  # scale invariant
    for g in range(NG):
        x = r[GID == g]
        if x.size > 1 and 0 < x.mean() < 1:
            p = x.mean()  # successes get (1 − p)/p, failures −1
            close(a[GID == g], np.where(x == 1, (1 - p) / p, -1.0), rtol=1e-9)


@given(_r)
def test_prop_passk_credits_only_the_best(r):
    a = np.asarray(tx.grpo_passk_advantages(r, group_ids=GID, num_groups=NG))
    assert np.all(a >= 0)
    for g in range(NG):
        nz = np.nonzero(a[GID == g])[0]
        assert nz.size <= 1
        if nz.size:
            assert r[GID == g][nz[0]] == r[GID == g].max()


@given(_tok, _lens)
def test_prop_whiten_standardises(x, lens):
    mask = _mask(lens)
    assume(mask.sum() >= 3 and np.ptp(x[mask]) > 1e-3)
    w = np.asarray(tx.masked_whiten(x, mask, eps=0.0))
    close(w[mask].mean(), 0.0, atol=1e-9)
    close(w[mask].std(ddof=1), 1.0, rtol=1e-9)


_GAE: dict = {}


def gae_jit(gamma, lam):
    """Cached jitted GAE per static (γ, λ): eager calls would re-trace the scan on every example."""
    if (gamma, lam) not in _GAE:
        _GAE[gamma, lam] = jax.jit(lambda r, v, m: tx.gae_advantages(r, v, m, gamma, lam))
    return _GAE[gamma, lam]


@given(_tok, _tok, _lens, st.sampled_from([0.9, 1.0]))
def test_prop_gae_limits_and_padding(rew, vals, lens, gamma):
    mask = _mask(lens)
    A1, R1 = gae_jit(gamma, 1.0)(rew, vals, mask)
    G = ref.returns_to_go(rew, mask, gamma)
    close(A1, np.where(mask, G - vals, 0), rtol=1e-9, atol=1e-9)  # λ = 1: Monte-Carlo return − V
    close(R1, np.where(mask, G, 0), rtol=1e-9, atol=1e-9)
    A0, _ = gae_jit(gamma, 0.0)(rew, vals, mask)  # λ = 0: one-step TD error
    nxt = np.concatenate([vals[:, 1:], np.zeros((B, 1))], axis=1)
    nxt = np.where(np.concatenate([mask[:, 1:], np.zeros((B, 1), bool)], axis=1), nxt, 0.0)
    close(A0, np.where(mask, rew + gamma * nxt - vals, 0), rtol=1e-9, atol=1e-9)
    pad = lambda x, v: np.concatenate([x, np.full((B, 2), v)], axis=1)  # noqa: E731
    Ap, Rp = gae_jit(gamma, 0.9)(pad(rew, np.nan), pad(vals, np.inf), pad(mask, False))
    Ab, Rb = gae_jit(gamma, 0.9)(rew, vals, mask)
    close(np.asarray(Ap)[:, :T], Ab, rtol=1e-12)
    assert np.all(np.asarray(Ap)[:, T:] == 0)


@given(_tok, _tok, _lens, st.floats(0.1, 3.0, allow_subnormal=False))
def test_prop_entropy_shaping_bounds(a, H, lens, kappa):
    mask = _mask(lens)
    H = np.abs(H)
    out = np.asarray(tx.entropy_advantage_shaping(a, H, mask, 0.4, kappa))
    a_m = np.where(mask, a, 0)
    assert np.all(out[mask] >= a_m[mask])  # a non-negative bonus
    assert np.all(out[mask] - a_m[mask] <= np.abs(a_m[mask]) / kappa + 1e-12)
    if kappa > 1:  # never flips a negative advantage
        assert np.all(out[mask & (a < 0)] < 0)
    assert np.all(out[mask & (a == 0)] == 0)


@given(_tok, _tok, _tok, _lens, st.floats(0.01, 1.0, allow_subnormal=False))
def test_prop_value_loss_dominates_unclipped(v, old, ret, lens, clip):
    mask = _mask(lens)
    c, _ = tx.clipped_value_loss(v, old, ret, mask, clip)
    u, _ = tx.clipped_value_loss(v, old, ret, mask, None)
    assert np.all(np.asarray(c) >= np.asarray(u))
    big, _ = tx.clipped_value_loss(v, old, ret, mask, 100.0)
    close(big, u)


@given(_tok, _lens, st.integers(1, N - 1))
def test_prop_prompt_weights_split(L, lens, cut):
    mask = _mask(lens)
    full = float(np.sum(np.asarray(tx.prompt_mean_weights(mask, group_ids=GID, num_groups=NG)) * np.where(mask, L, 0)))
    close(full, ref.prompt_mean_loss(L, mask, GID), rtol=1e-6, atol=1e-7)
    counts = tx.group_token_counts(mask, group_ids=GID, num_groups=NG)
    P = int(np.sum(np.asarray(counts) > 0))
    parts = 0.0
    for s in (slice(0, cut), slice(cut, N)):
        w = tx.prompt_mean_weights(mask[s], group_ids=GID[s], num_groups=NG, token_counts=counts, num_prompts=P)
        parts += float(np.sum(np.asarray(w) * np.where(mask[s], L[s], 0)))
    close(parts, full, rtol=1e-5, atol=1e-6)


_JIT: dict = {}


def cached(name, fn):
    if name not in _JIT:
        _JIT[name] = jax.jit(fn)
    return _JIT[name]


_dyadic = st.integers(-12, 12).map(lambda k: k / 4.0)  # shifts of dyadic rewards are exact in float64


@given(_tok, hnp.arrays(np.float64, (N,), elements=_dyadic), _lens, hnp.arrays(np.float64, (NG,), elements=_dyadic))
def test_prop_reinforce_remax_dynamic(rew, r, lens, shift):
    mask = _mask(lens)
    # REINFORCE++ with γ = 1: returns are the masked reverse cumulative sums; advantages are whitened returns
    adv, ret = cached("rfpp", lambda x, m: tx.reinforce_plus_plus_advantages(x, m, 1.0))(rew, mask)
    close(ret, np.where(mask, np.cumsum(np.where(mask, rew, 0)[:, ::-1], axis=1)[:, ::-1], 0), rtol=1e-9, atol=1e-9)
    close(adv, ref.whiten(np.asarray(ret), mask), rtol=1e-8, atol=1e-8)
    # ReMax: advantage + baseline = return on valid tokens
    a, g = cached("remax", tx.remax_advantages)(rew, r, mask)
    close(np.where(mask, np.asarray(a) + r[:, None], 0), g, rtol=1e-9, atol=1e-9)
    # REINFORCE++-baseline and the dynamic-sampling filter are invariant to a per-group reward shift
    kw = dict(group_ids=GID, num_groups=NG)
    f = cached("rfppb", lambda x, m: tx.reinforce_plus_plus_baseline_advantages(x, m, **kw))
    close(f(r + shift[GID], mask), f(r, mask), rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(tx.dynamic_sampling_mask(r + shift[GID], **kw), tx.dynamic_sampling_mask(r, **kw))


@given(_tok, _lens, st.permutations(range(N)))
def test_prop_otb(rew, lens, perm):
    mask = _mask(lens)
    lp = -np.abs(rew) - 0.1
    sp = np.full((B, T), 0.4)
    kw = dict(group_ids=GID, num_groups=NG)
    f = cached("otb", lambda x, l, s, m, g, w: tx.optimal_token_baseline_advantages(
        x, l, s, m, group_ids=g, num_groups=NG, is_weights=w))
    a, G = f(rew, lp, sp, mask, GID, np.ones((B, T)))
    a0, _ = tx.optimal_token_baseline_advantages(rew, lp, sp, mask, **kw)
    close(a, a0, rtol=1e-9, atol=1e-12)  # unit IS weights change nothing
    close(np.asarray(a)[3], np.asarray(G)[3])  # row 3 is a singleton group: baseline 0
    p = np.asarray(perm)
    ap, _ = f(rew[p], lp[p], sp[p], mask[p], GID[p], np.ones((B, T)))
    close(ap, np.asarray(a)[p], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_name_the_argument():
    r = rewards(0)
    with pytest.raises(ValueError, match="singleton='skip'.*allowed values: 'zero', 'raw'"):
        tx.rloo_advantages(r, group_ids=GID, num_groups=NG, singleton="skip")
    with pytest.raises(ValueError, match="`lengths` must have shape"):
        tx.opo_advantages(r, np.ones(3), group_ids=GID, num_groups=NG)
    with pytest.raises(ValueError, match="`group_ids` must be an integer array"):
        tx.grpo_passk_advantages(r, group_ids=GID.astype(float))
    with pytest.raises(ValueError, match="num_generations=4 must be >= 1 and divide"):
        tx.maxrl_advantages(r, 4)
    rew, vals, mask = token_data(0)
    with pytest.raises(ValueError, match="gamma=1.5 is out of range"):
        tx.gae_advantages(rew, vals, mask, 1.5)
    with pytest.raises(ValueError, match="`bootstrap_values` must have shape"):
        tx.gae_advantages(rew, vals, mask, bootstrap_values=np.ones(3))
    with pytest.raises(ValueError, match="`values` must have the same shape"):
        tx.gae_advantages(rew, vals[:, :2], mask)
    with pytest.raises(ValueError, match="clip_range=-0.1 is out of range"):
        tx.clipped_value_loss(vals, vals, rew, mask, -0.1)
    with pytest.raises(ValueError, match="`returns` must have the same shape"):
        tx.clipped_value_loss(vals, vals, rew[:2], mask)
    with pytest.raises(ValueError, match="`baseline_rewards` must have shape"):
        tx.remax_advantages(rew, np.ones(2), mask)
    with pytest.raises(ValueError, match="`advantages` must have shape"):
        tx.entropy_advantage_shaping(np.ones(3), vals, mask)
    with pytest.raises(ValueError, match="kappa=0.0 is out of range"):
        tx.entropy_advantage_shaping(np.ones(B), vals, mask, kappa=0.0)
    with pytest.raises(ValueError, match="`token_counts` must have shape"):
        tx.prompt_mean_weights(mask, group_ids=GID, num_groups=NG, token_counts=np.ones(2))
    with pytest.raises(ValueError, match="`mask` must have 9 rows"):
        tx.reinforce_plus_plus_baseline_advantages(r, mask[:3], group_ids=GID, num_groups=NG)
    with pytest.raises(ValueError, match="`sum_pi_sq` must have the same shape"):
        tx.optimal_token_baseline_advantages(rew, vals, vals[:, :2], mask, group_ids=GID, num_groups=NG)
    with pytest.raises(TypeError, match="`rewards` must be a floating array"):
        tx.rloo_advantages(np.ones(N, np.int32), group_ids=GID, num_groups=NG)


def test_jit_matches_eager():
    rew, vals, mask = token_data(11)
    f = jax.jit(lambda r, v, m: tx.gae_advantages(r, v, m, 0.99, 0.95)[0])
    close(f(rew, vals, mask), tx.gae_advantages(rew, vals, mask, 0.99, 0.95)[0], rtol=1e-12)
    g = jax.jit(lambda r: tx.rloo_advantages(r, group_ids=GID, num_groups=NG))
    close(g(rewards(1)), tx.rloo_advantages(rewards(1), group_ids=GID, num_groups=NG), rtol=1e-12)
