"""Rollout correction stages beyond TRL: NumPy float64 references, verl-formula fixtures, hypothesis
properties, pitfall regressions and bad input.

verl is not installed. The "verl fixtures" below are small fixed inputs whose expected values are worked
out by hand from the formulas documented in verl (commit b178a3cd, 2026-01-29):
``verl/trainer/ppo/rollout_corr_helper.py`` (``compute_rollout_rejection_mask``,
``compute_rollout_correction_weights``, ``compute_offpolicy_metrics``, ``compute_is_metrics``) and
``docs/algo/rollout_corr_math.md`` — never by trlax.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import trlax.objectives as tx
from trlax.objectives import RolloutCorrectionConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _numpy_ref_beyond2 as ref  # noqa: E402

B, T = 6, 7
LENGTHS = [7, 5, 3, 1, 0, 6]
RTOL, ATOL = 1e-10, 1e-12


def close(a, b, rtol=RTOL, atol=ATOL, err=""):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                               err_msg=err)


def make(seed, spread=0.05, nan_pad=True, lengths=LENGTHS, t=T):
    rng = np.random.default_rng(seed)
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    old = -rng.uniform(0.05, 3.0, mask.shape)
    samp = old + rng.normal(0.0, spread, mask.shape) + rng.uniform(-spread, spread, (mask.shape[0], 1))
    if nan_pad:
        old = np.where(mask, old, np.nan)
        samp = np.where(mask, samp, np.nan)
    return old, samp, mask


# ------------------------------------------------------------------------------- NumPy references

RS_CASES = [
    ("token_k1", 1.05, 0.9), ("token_k1", 1.1, None), ("token_k2", 0.002, None), ("token_k3", 0.001, None),
    ("seq_sum_k1", 1.2, 0.7), ("seq_sum_k2", 0.01, None), ("seq_sum_k3", 0.005, None),
    ("seq_mean_k1", 1.02, 0.97), ("seq_mean_k2", 0.001, None), ("seq_mean_k3", 0.001, None),
    ("seq_max_k2", 0.003, None), ("seq_max_k3", 0.002, None),
]


@pytest.mark.parametrize("option,upper,lower", RS_CASES)
def test_rejection_mask_matches_reference(option, upper, lower):
    for seed in range(3):
        old, samp, mask = make(seed, spread=0.06)
        got = np.asarray(tx.divergence_rejection_mask(old, samp, mask, option, upper, lower))
        want = ref.rejection_mask(old, samp, mask, option, upper, lower)
        np.testing.assert_array_equal(got, want, err_msg=f"{option} seed {seed}")
    # thresholds above were picked so that the test is not vacuous: some kept, some rejected
    kept = [np.asarray(tx.divergence_rejection_mask(*make(s, 0.06), option, upper, lower)).sum() for s in range(3)]
    total = sum(np.asarray(make(s)[2]).sum() for s in range(3))
    assert 0 < sum(kept) < total, (option, kept, total)


def test_geometric_and_veto_match_reference():
    old, samp, mask = make(4, spread=0.02)
    np.testing.assert_array_equal(tx.geometric_sequence_mask(old, samp, mask, 0.99, 1.01),
                                  ref.rejection_mask(old, samp, mask, "seq_mean_k1", 1.01, 0.99))
    samp2 = samp.copy()
    samp2[1, 2] = old[1, 2] + 10.0  # ρ = e^-10 < 1e-4: vetoes row 1
    samp2[3, 0] = old[3, 0] + 5.0  # ρ = e^-5 ≈ 6.7e-3 > 1e-4: kept
    got = np.asarray(tx.token_veto_mask(old, samp2, mask, 1e-4))
    np.testing.assert_array_equal(got, ref.veto_mask(old, samp2, mask, 1e-4))
    assert not got[1].any() and got[3, 0] and got[0].all()


@pytest.mark.parametrize("level", tx.ROLLOUT_IS_LEVELS)
@pytest.mark.parametrize("bounds", [(2.0, None), (1.05, 0.95), (None, 0.5)])
def test_rollout_is_weights_match_reference(level, bounds):
    old, samp, mask = make(1, spread=0.08)
    got = tx.rollout_is_weights(old, samp, mask, level, *bounds)
    close(got, ref.is_weights(old, samp, mask, level, *bounds))
    g = jax.grad(lambda o, s: jnp.sum(tx.rollout_is_weights(o, s, mask, level, *bounds)), argnums=(0, 1))(
        jnp.nan_to_num(old), jnp.nan_to_num(samp))
    assert all(np.all(np.asarray(x) == 0) for x in g)  # stop-gradient constants


@pytest.mark.parametrize("level", tx.ROLLOUT_IS_LEVELS)
def test_self_normalized_weights_match_reference(level):
    old, samp, mask = make(2, spread=0.2)
    w = np.asarray(tx.rollout_is_weights(old, samp, mask, level, 3.0))
    got = np.asarray(tx.self_normalized_weights(w, mask, level))
    close(got, ref.self_normalize(w, mask, level))
    if level == "token":
        close(got[mask].mean(), 1.0)
    else:
        close(np.mean([got[i][mask[i]].mean() for i in range(B) if mask[i].any()]), 1.0)
    # an explicit (e.g. all-reduced) mean is used as is
    close(tx.self_normalized_weights(w, mask, level, weights_mean=2.0), np.where(mask, w, 0) / 2.0)


@pytest.mark.parametrize("with_weights", [False, True])
def test_mismatch_metrics_match_reference(with_weights):
    old, samp, mask = make(3, spread=0.1)
    samp = samp.copy()
    samp[0, 3] = np.nan  # unscorable token at a valid position: left out of every metric
    w = np.asarray(tx.rollout_is_weights(old, samp, mask, "token", 1.1)) if with_weights else None
    got = tx.finalize_metrics(tx.rollout_mismatch_metrics(old, samp, mask, weights=w))
    want = ref.mismatch_metrics(old, samp, mask, weights=w)
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], rtol=1e-9, err=k)


def test_mismatch_metrics_merge_across_micro_batches():
    old, samp, mask = make(5, spread=0.1)
    full = tx.rollout_mismatch_metrics(old, samp, mask)
    parts = [tx.rollout_mismatch_metrics(old[s], samp[s], mask[s]) for s in (slice(0, 2), slice(2, B))]
    merged = tx.finalize_metrics(tx.merge_metrics(parts))
    for k, v in tx.finalize_metrics(full).items():
        if k != "ess":  # ess is a per-batch ratio (merge is_weight / is_weight_sq instead)
            close(merged[k], v, rtol=1e-9, err=k)


CONFIGS = {
    "decoupled_token_is": RolloutCorrectionConfig.decoupled_token_is(1.05),
    "decoupled_seq_is_rs": RolloutCorrectionConfig.decoupled_seq_is_rs(2.0, 0.8, 1.25),
    "decoupled_geo_rs_token_tis": RolloutCorrectionConfig.decoupled_geo_rs_token_tis(1.05, 0.98, 1.02),
    "decoupled_k3_rs_seq_tis_snis": RolloutCorrectionConfig(is_level="sequence", is_batch_normalize=True,
                                                           rs=("seq_mean_k3",), rs_thresholds=((None, 0.002),)),
    "bypass_ppo_clip_k3_rs": RolloutCorrectionConfig.bypass_ppo_clip_k3_rs(0.002),
    "bypass_pg_geo_rs_seq_tis": RolloutCorrectionConfig.bypass_pg_geo_rs_seq_tis(1.5, 0.97, 1.03),
    "token_rs_seq_is": RolloutCorrectionConfig(is_level="sequence", is_threshold=1.5, rs=("token_k3",),
                                               rs_thresholds=((None, 0.001),)),
    "veto_geometric": RolloutCorrectionConfig(is_level="geometric", veto_threshold=0.9, rs=("seq_max_k2",),
                                              rs_thresholds=((None, 0.01),)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rollout_correction_composes_reference_stages(name):
    cfg = CONFIGS[name]
    old, samp, mask = make(6, spread=0.06)
    logps = old + np.where(mask, 0.03, 0.0)  # current policy (bypass mode reads it, stop-gradient)
    anchor_src = old if cfg.mode == "decoupled" else logps
    anchor, w, keep, metrics = tx.rollout_correction(cfg, samp, mask, old_logps=old, logps=logps)
    want_keep = mask.copy()
    for opt, (lo, hi) in zip(cfg.rs, cfg.rs_thresholds):
        want_keep &= ref.rejection_mask(anchor_src, samp, mask, opt, hi, lo)
    if cfg.veto_threshold is not None:
        want_keep &= ref.veto_mask(anchor_src, samp, mask, cfg.veto_threshold)
    np.testing.assert_array_equal(keep, want_keep)
    if cfg.rs or cfg.veto_threshold is not None:
        assert 0 < want_keep.sum() < mask.sum(), "case must reject something and keep something"
    if cfg.is_level is None:
        want_w = want_keep.astype(float)
    else:
        want_w = np.where(want_keep, ref.is_weights(anchor_src, samp, mask, cfg.is_level, cfg.is_threshold), 0.0)
        if cfg.is_batch_normalize:
            want_w = ref.self_normalize(want_w, want_keep, cfg.is_level)
    close(w, want_w)
    close(np.where(mask, anchor, 0), np.where(mask, old if cfg.mode == "decoupled" else samp, 0))
    fin = tx.finalize_metrics(metrics)
    close(fin["rs_masked_fraction"], (mask & ~want_keep).sum() / mask.sum())
    close(fin["kl"], ref.mismatch_metrics(anchor_src, samp, mask)["kl"], rtol=1e-9)


def test_rollout_correction_bypass_is_stop_gradient_in_logps():
    cfg = RolloutCorrectionConfig.bypass_pg_geo_rs_token_tis(1.5, 0.9, 1.1)
    old, samp, mask = make(7)
    samp, lp0 = np.nan_to_num(samp), np.nan_to_num(old)
    g = jax.grad(lambda lp: jnp.sum(tx.rollout_correction(cfg, samp, mask, logps=lp)[1]))(jnp.asarray(lp0))
    assert np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------- verl documented-formula fixtures


def test_verl_fixture_k3_rs_and_geo_rs():
    # One row, 3 tokens, log ρ = (0.1, -0.2, 0.05). verl: k3 = exp(x) - 1 - x, seq_mean_k3 = mean.
    lr = np.array([[0.1, -0.2, 0.05]])
    old, samp, mask = lr, np.zeros((1, 3)), np.ones((1, 3), bool)
    k3 = [math.exp(0.1) - 1.1, math.exp(-0.2) - 0.8, math.exp(0.05) - 1.05]
    mean_k3 = sum(k3) / 3  # = (0.0051709 + 0.0187308 + 0.0012711) / 3 = 0.0083909
    assert abs(mean_k3 - 0.0083909) < 1e-6
    assert not np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_mean_k3", 0.0083)).any()
    assert np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_mean_k3", 0.0085)).all()
    # K3-RS preset threshold 0.01 keeps it; seq_sum_k3 = 0.0251727 is rejected at 0.025
    assert np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_mean_k3", 0.01)).all()
    assert not np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_sum_k3", 0.025)).any()
    # seq_max_k3 = exp(-0.2) + 0.2 - 1 = 0.018730...
    assert not np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_max_k3", 0.0187)).any()
    assert np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_max_k3", 0.0188)).all()
    # Geo-RS (seq_mean_k1): geometric mean ratio exp(-0.05/3) = 0.98347; rejected by verl's default
    # 0.999_1.001, kept by 0.98_1.02
    assert not np.asarray(tx.geometric_sequence_mask(old, samp, mask)).any()
    assert np.asarray(tx.geometric_sequence_mask(old, samp, mask, 0.98, 1.02)).all()
    # seq_sum_k2 = ½(0.01 + 0.04 + 0.0025) = 0.02625
    assert not np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_sum_k2", 0.0262)).any()
    assert np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_sum_k2", 0.0263)).all()


def test_verl_fixture_token_and_sequence_tis_and_batch_normalize():
    # verl compute_rollout_correction_weights: token w = min(exp(clamp(log ρ, ±20)), C) · mask;
    # sequence w = min(exp(clamp(Σ log ρ, ±20)), C) broadcast. C = 2.
    lr = np.array([[0.5, -0.3, 1.0], [0.2, 0.1, 0.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    old, samp = lr, np.zeros_like(lr)
    want_tok = np.array([[math.exp(0.5), math.exp(-0.3), 2.0], [math.exp(0.2), math.exp(0.1), 0.0]])
    close(tx.rollout_is_weights(old, samp, mask, "token", 2.0), want_tok, rtol=1e-12)
    want_seq = np.array([[min(math.exp(1.2), 2.0)] * 3, [math.exp(0.3), math.exp(0.3), 0.0]])
    close(tx.rollout_is_weights(old, samp, mask, "sequence", 2.0), want_seq, rtol=1e-12)
    # batch normalize, token level: divide by the mean over the 5 valid tokens
    mean_tok = (math.exp(0.5) + math.exp(-0.3) + 2.0 + math.exp(0.2) + math.exp(0.1)) / 5
    close(tx.self_normalized_weights(want_tok, mask, "token"), want_tok / mean_tok, rtol=1e-12)
    # sequence level: mean of per-sequence weights (2.0, e^0.3)
    close(tx.self_normalized_weights(want_seq, mask, "sequence"), want_seq / ((2.0 + math.exp(0.3)) / 2), rtol=1e-12)


def test_verl_fixture_offpolicy_metrics():
    # verl compute_offpolicy_metrics on 1 row: old = (-1, -2), rollout = (-1.1, -1.9)
    old = np.array([[-1.0, -2.0]])
    samp = np.array([[-1.1, -1.9]])
    mask = np.ones((1, 2), bool)
    m = tx.finalize_metrics(tx.rollout_mismatch_metrics(old, samp, mask))
    # kl = mean(rollout - old) = mean(-0.1, 0.1) = 0
    close(m["kl"], 0.0, atol=1e-12)
    # k3_kl = mean(exp(x) - x - 1) over x = (0.1, -0.1)
    close(m["k3_kl"], ((math.exp(0.1) - 1.1) + (math.exp(-0.1) - 0.9)) / 2, rtol=1e-12)
    close(m["training_ppl"], math.exp(1.5), rtol=1e-12)
    close(m["rollout_ppl"], math.exp(1.5), rtol=1e-12)
    close(m["ppl_ratio"], 1.0, rtol=1e-12)
    close(m["chi2_token"], (math.exp(0.2) + math.exp(-0.2)) / 2 - 1, rtol=1e-12)
    close(m["chi2_seq"], 0.0, atol=1e-12)  # Σ log ρ = 0
    # ESS of the raw token ratios: (mean w)^2 / mean(w^2)
    w = np.array([math.exp(0.1), math.exp(-0.1)])
    close(m["ess"], w.mean() ** 2 / (w ** 2).mean(), rtol=1e-12)


# ------------------------------------------------------------------------------- pitfall regressions


def test_pitfall_asymmetric_k1_bounds_not_inverted():
    """objectives-survey 4.8: verl compared −log ρ with [log lower, log upper] (PR #6377)."""
    lower, upper = 0.9, 2.0
    mask = np.ones((1, 2), bool)
    for log_rho, should_keep in [(math.log(1.5), True), (math.log(0.6), False)]:
        old = np.array([[log_rho, 0.0]])
        samp = np.zeros((1, 2))
        got = bool(np.asarray(tx.divergence_rejection_mask(old, samp, mask, "token_k1", upper, lower))[0, 0])
        assert got == should_keep
        assert ref.verl_k1_buggy_keep(log_rho, lower, upper) != should_keep  # the bug flips both cases
    # the same at sequence-mean (Geo-RS) level
    old = np.array([[math.log(1.5), math.log(1.5)]])
    assert np.asarray(tx.geometric_sequence_mask(old, np.zeros((1, 2)), mask, lower, upper)).all()


def test_pitfall_length_trap_geometric_vs_product():
    """objectives-survey 4.2: the product ratio of a long sequence explodes at a tiny per-token drift;
    the geometric mean does not depend on the length."""
    t = 400
    mask = np.ones((2, t), bool)
    mask[1, 10:] = False  # a short sequence with the same per-token drift
    old = np.full((2, t), -1.0 + 0.002)
    samp = np.full((2, t), -1.0)
    geo = np.asarray(tx.geometric_sequence_mask(old, samp, mask, 0.99, 1.01))
    prod = np.asarray(tx.divergence_rejection_mask(old, samp, mask, "seq_sum_k1", 1.5, 0.5))
    assert geo[0].all() and geo[1, :10].all()
    assert not prod[0].any() and prod[1, :10].all()  # product e^0.8 = 2.2 > 1.5 rejects the long one only


def test_pitfall_nan_under_mask_and_overflow():
    """4.3 / 4.6: NaN in masked slots and huge log-ratios give finite weights, masks and metrics."""
    old, samp, mask = make(8, spread=0.05)  # NaN in every masked slot
    samp = samp.copy()
    samp[0, 0] = old[0, 0] - 5e4  # log ρ = 5e4: clamped at 20 before exp
    for level in tx.ROLLOUT_IS_LEVELS:
        w = np.asarray(tx.rollout_is_weights(old, samp, mask, level, None))
        assert np.all(np.isfinite(w)) and np.all(w[~mask] == 0)
    m = tx.finalize_metrics(tx.rollout_mismatch_metrics(old, samp, mask))
    assert all(np.isfinite(np.asarray(v)) for v in m.values())
    for opt, up, lo in RS_CASES:
        k = np.asarray(tx.divergence_rejection_mask(old, samp, mask, opt, up, lo))
        assert not k[~mask].any()
    anchor, w, keep, met = tx.rollout_correction(CONFIGS["decoupled_k3_rs_seq_tis_snis"], samp, mask, old_logps=old)
    assert np.all(np.isfinite(np.asarray(w)))


def test_pitfall_empty_mask_and_bf16():
    old, samp, _ = make(9)
    empty = np.zeros((B, T), bool)
    assert not np.asarray(tx.divergence_rejection_mask(old, samp, empty, "seq_mean_k3", 0.01)).any()
    assert np.all(np.asarray(tx.rollout_is_weights(old, samp, empty, "geometric")) == 0)
    m = tx.finalize_metrics(tx.rollout_mismatch_metrics(old, samp, empty))
    assert all(float(v) == 0.0 for v in m.values())
    _, w, keep, _ = tx.rollout_correction(CONFIGS["decoupled_token_is"], samp, empty, old_logps=old)
    assert not np.asarray(keep).any() and np.all(np.asarray(w) == 0)
    # bf16 inputs: computed in float32, agree with the float64 reference to bf16-input precision
    old2, samp2, mask2 = make(10, spread=0.05, nan_pad=False)
    o16, s16 = jnp.asarray(old2, jnp.bfloat16), jnp.asarray(samp2, jnp.bfloat16)
    w = tx.rollout_is_weights(o16, s16, mask2, "sequence", 5.0)
    assert w.dtype == jnp.float32
    close(w, ref.is_weights(np.asarray(o16, np.float64), np.asarray(s16, np.float64), mask2, "sequence", 5.0),
          rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- properties

_logp = hnp.arrays(np.float64, (B, T), elements=st.floats(-6.0, -0.01, allow_subnormal=False))
_drift = hnp.arrays(np.float64, (B, T), elements=st.floats(-0.3, 0.3, allow_subnormal=False))
_lens = st.lists(st.integers(0, T), min_size=B, max_size=B)


def _mask(lens):
    return np.arange(T)[None, :] < np.asarray(lens)[:, None]


@given(_logp, _drift, _lens, st.sampled_from(RS_CASES), st.floats(0.3, 0.95, allow_subnormal=False))
def test_prop_rejection_monotone_subset_and_row_constant(old, drift, lens, case, shrink):
    option, upper, lower = case
    mask = _mask(lens)
    samp = old + drift
    keep = np.asarray(tx.divergence_rejection_mask(old, samp, mask, option, upper, lower))
    assert not (keep & ~mask).any()
    if not option.startswith("token"):
        for i in range(B):  # a sequence is kept or rejected as a whole
            assert keep[i][mask[i]].all() or not keep[i].any()
    # tightening the bounds only removes tokens
    if option.endswith("k1"):
        lo = 1.0 / upper if lower is None else lower
        tight = np.asarray(tx.divergence_rejection_mask(old, samp, mask, option, 1 + (upper - 1) * shrink,
                                                         1 - (1 - lo) * shrink))
    else:
        tight = np.asarray(tx.divergence_rejection_mask(old, samp, mask, option, upper * shrink))
    assert not (tight & ~keep).any()


@given(_logp, _drift, _lens, st.sampled_from([c for c in RS_CASES if c[0].endswith("k1")]))
def test_prop_k1_swap_policies_reciprocal_bounds(old, drift, lens, case):
    """ρ -> 1/ρ with [lo, hi] -> [1/hi, 1/lo] must give the same decision (fails for the inverted bug
    whenever lo != 1/hi)."""
    option, upper, lower = case
    lo = 1.0 / upper if lower is None else lower
    mask = _mask(lens)
    samp = old + drift
    a = np.asarray(tx.divergence_rejection_mask(old, samp, mask, option, upper, lo))
    b = np.asarray(tx.divergence_rejection_mask(samp, old, mask, option, 1.0 / lo, 1.0 / upper))
    np.testing.assert_array_equal(a, b)


@given(_logp, _lens, st.sampled_from(tx.ROLLOUT_IS_LEVELS))
def test_prop_identical_policies(old, lens, level):
    mask = _mask(lens)
    for opt, up, lo in RS_CASES:
        np.testing.assert_array_equal(tx.divergence_rejection_mask(old, old, mask, opt, up, lo), mask)
    close(tx.rollout_is_weights(old, old, mask, level), mask.astype(float))
    m = tx.finalize_metrics(tx.rollout_mismatch_metrics(old, old, mask))
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff"):
        close(m[k], 0.0, atol=1e-12, err=k)
    close(m["ess"], 1.0 if mask.any() else 0.0)


@given(_logp, _drift, _lens, st.permutations(range(B)), st.sampled_from(sorted(CONFIGS)))
def test_prop_padding_and_permutation(old, drift, lens, perm, name):
    cfg = CONFIGS[name]
    mask = _mask(lens)
    samp = old + drift
    base = tx.rollout_correction(cfg, samp, mask, old_logps=old, logps=old + 0.01)
    # extra masked columns holding NaN change nothing
    pad = lambda x, v: np.concatenate([x, np.full((B, 3), v)], axis=1)  # noqa: E731
    padded = tx.rollout_correction(cfg, pad(samp, np.nan), pad(mask, False), old_logps=pad(old, np.nan),
                                   logps=pad(old + 0.01, np.nan))
    close(np.asarray(padded[1])[:, :T], base[1], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(padded[2])[:, :T], base[2])
    p = np.asarray(perm)
    permuted = tx.rollout_correction(cfg, samp[p], mask[p], old_logps=old[p], logps=(old + 0.01)[p])
    close(permuted[1], np.asarray(base[1])[p], rtol=1e-12)
    np.testing.assert_array_equal(permuted[2], np.asarray(base[2])[p])


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_name_the_argument():
    old, samp, mask = make(0)
    with pytest.raises(ValueError, match="option='seq_max_k1'.*allowed"):
        tx.divergence_rejection_mask(old, samp, mask, "seq_max_k1", 1.1)
    with pytest.raises(ValueError, match="lower=0.5 is not allowed for option 'token_k3'"):
        tx.divergence_rejection_mask(old, samp, mask, "token_k3", 0.1, 0.5)
    with pytest.raises(ValueError, match="lower=3.0 is out of range"):
        tx.divergence_rejection_mask(old, samp, mask, "token_k1", 2.0, 3.0)
    with pytest.raises(ValueError, match="upper=-1.0 is out of range"):
        tx.divergence_rejection_mask(old, samp, mask, "seq_mean_k2", -1.0)
    with pytest.raises(ValueError, match="`sampler_logps` must have the same shape"):
        tx.divergence_rejection_mask(old, samp[:, :3], mask, "token_k2", 0.1)
    with pytest.raises(ValueError, match="level='seq'.*allowed"):
        tx.rollout_is_weights(old, samp, mask, "seq")
    with pytest.raises(ValueError, match="threshold=0.0 is out of range"):
        tx.token_veto_mask(old, samp, mask, 0.0)
    with pytest.raises(ValueError, match="`weights` must have shape"):
        tx.self_normalized_weights(np.ones((B, 2)), mask)
    with pytest.raises(TypeError, match="`old_logps` must be a floating array"):
        tx.rollout_mismatch_metrics(np.zeros((B, T), np.int32), samp, mask)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="hybrid"), "mode='hybrid'.*allowed values: 'decoupled', 'bypass'"),
    (dict(loss_type="ppo"), "loss_type='ppo'.*allowed"),
    (dict(is_level="seq"), "is_level='seq'.*allowed"),
    (dict(is_threshold=0.0), "is_threshold=0.0 is out of range"),
    (dict(mode="bypass", is_level="token"), "double count"),
    (dict(rs=("token_k4",), rs_thresholds=((None, 1.0),)), "rs='token_k4'.*allowed"),
    (dict(rs=("seq_mean_k3",), rs_thresholds=()), "one \\(lower, upper\\) pair per rs option"),
    (dict(rs=("seq_mean_k3",), rs_thresholds=((0.1, 1.0),)), "rs_thresholds for 'seq_mean_k3'.*upper bound only"),
    (dict(rs="seq_mean_k3", rs_thresholds=((None, 1.0),)), "rs='seq_mean_k3' must be a tuple"),
    (dict(veto_threshold=-1.0), "veto_threshold=-1.0 is out of range"),
    (dict(is_batch_normalize=1), "is_batch_normalize=1 must be a bool"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutCorrectionConfig(**kwargs)


def test_rollout_correction_missing_inputs():
    old, samp, mask = make(0)
    with pytest.raises(ValueError, match="requires `old_logps`"):
        tx.rollout_correction(RolloutCorrectionConfig.decoupled_token_is(), samp, mask)
    with pytest.raises(ValueError, match="requires `logps`"):
        tx.rollout_correction(RolloutCorrectionConfig.bypass_pg_is(), samp, mask, old_logps=old)
    with pytest.raises(TypeError, match="`config` must be a RolloutCorrectionConfig"):
        tx.rollout_correction("decoupled", samp, mask, old_logps=old)
    # presets are hashable (static under jit) and jit-compatible
    cfg = RolloutCorrectionConfig.decoupled_geo_rs_seq_tis()
    f = jax.jit(lambda s, m, o: tx.rollout_correction(cfg, s, m, old_logps=o)[1])
    close(f(samp, mask, old), tx.rollout_correction(cfg, samp, mask, old_logps=old)[1], rtol=1e-12)
