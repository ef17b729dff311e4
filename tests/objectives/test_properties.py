"""Hypothesis properties of the GRPO-family objectives.

Shapes are fixed (``B, T = 6, 7``; ``T + 3`` for the padding property; half batches for the
micro-batch property) and jitted ``value_and_grad`` functions are cached per static config, so each
(config, shape) compiles once and hypothesis only feeds new arrays.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import trlax.objectives as tx
from trlax.objectives import PolicyLossConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _numpy_ref as ref  # noqa: E402

B, T = 6, 7
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LEVELS = tx.IMPORTANCE_SAMPLING_LEVELS

# ------------------------------------------------------------------------------------------- helpers

_CACHE: dict = {}


def vg(cfg: PolicyLossConfig):
    """Cached ``jit(value_and_grad)`` of ``policy_loss`` w.r.t. ``logps`` for a static config."""
    if cfg not in _CACHE:
        def f(lp, old, adv, mask, extras):
            return tx.policy_loss(lp, old, adv, mask, cfg, **extras)[0]

        _CACHE[cfg] = jax.jit(jax.value_and_grad(f))
    return _CACHE[cfg]


def run(cfg, d, **extra_over):
    extras = dict(ref_logps=d["ref"] if cfg.beta else None,
                  sampler_logps=d["sampler"] if cfg.sampler_correction else None,
                  entropies=d["ent"] if (cfg.top_entropy_quantile < 1 or cfg.entropy_coef) else None)
    extras.update(extra_over)
    v, g = vg(cfg)(d["logps"], d["old"], d["adv"], d["mask"], extras)
    return float(v), np.asarray(g)


def gen_batch(seed, lengths, spread=0.3, b=B, t=T):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    mask = np.arange(t)[None, :] < lengths[:, None]
    logps = -rng.uniform(0.05, 3.0, (b, t))
    old = logps + rng.uniform(-spread, spread, (b, 1)) + rng.normal(0.0, spread, (b, t))
    return dict(
        mask=mask, logps=logps, old=old,
        ref=logps + rng.normal(0.0, 0.5, (b, t)),
        sampler=old + rng.normal(0.0, 0.3, (b, t)),
        adv=rng.normal(size=(b, 1)),
        ent=rng.uniform(0.0, 3.0, (b, t)),
    )


@st.composite
def batches(draw, b=B, t=T, min_len=0):
    seed = draw(st.integers(0, 2**31 - 1))
    lengths = draw(st.lists(st.integers(min_len, t), min_size=b, max_size=b))
    spread = draw(st.sampled_from([0.05, 0.3, 1.0]))
    return gen_batch(seed, lengths, spread, b, t)


def assert_close(a, b, rtol=1e-9, atol=1e-12, msg=""):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                               err_msg=msg)


# ----------------------------------------------------------------------------------- policy gradient


@given(d=batches(), lt=st.sampled_from(tx.POLICY_LOSS_TYPES), level=st.sampled_from(LEVELS),
       sampler=st.sampled_from([None, "token_truncate", "sequence_mask"]))
def test_zero_advantages_zero_policy_gradient(d, lt, level, sampler):
    if lt == "vespo" and sampler == "sequence_mask":
        sampler = "token_mask"
    cfg = PolicyLossConfig(loss_type=lt, importance_sampling_level=level, epsilon_high=1.5 if lt == "cispo" else 0.28,
                           sampler_correction=sampler, off_policy_mask_threshold=0.1)
    d["adv"] = np.zeros((B, 1))
    v, g = run(cfg, d)
    assert v == 0.0
    assert np.all(g == 0.0)


@given(d=batches(), lt=st.sampled_from(CLIP_TYPES + ("sapo", "cispo")), delta=st.sampled_from([None, 1.5]))
def test_ratio_one_gspo_equals_grpo(d, lt, delta):
    """old == logps: every ratio is 1, and sequence-level (GSPO) equals token-level (GRPO) in value and
    gradient for per-sequence advantages (arXiv 2507.18071, sec. 4)."""
    d["old"] = d["logps"].copy()
    kw = dict(loss_type=lt, delta=None if lt in ("sapo", "cispo") else delta, epsilon_high=1.5 if lt == "cispo" else None)
    v_tok, g_tok = run(PolicyLossConfig(importance_sampling_level="token", **kw), d)
    v_seq, g_seq = run(PolicyLossConfig(importance_sampling_level="sequence", **kw), d)
    assert_close(v_seq, v_tok)
    assert_close(g_seq, g_tok)
    assert np.any(g_tok != 0.0) or not np.any(d["mask"])


@given(d=batches(), lt=st.sampled_from(CLIP_TYPES + ("sapo", "cispo")), eps=st.sampled_from([0.05, 0.2]))
def test_gspo_token_equals_gspo(d, lt, eps):
    """GSPO-token with a per-sequence advantage equals GSPO in value and gradient (eq. 13-14)."""
    kw = dict(loss_type=lt, epsilon=eps, epsilon_high=1.1 if lt == "cispo" else None, beta=0.04,
              use_bias_correction_kl=False)
    v_seq, g_seq = run(PolicyLossConfig(importance_sampling_level="sequence", **kw), d)
    v_st, g_st = run(PolicyLossConfig(importance_sampling_level="sequence_token", **kw), d)
    assert_close(v_st, v_seq)
    assert_close(g_st, g_seq)


PAD_CFGS = [
    PolicyLossConfig(loss_type="grpo", beta=0.04, off_policy_mask_threshold=0.05),
    PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.5, entropy_coef=0.02,
                     sampler_correction="token_truncate"),
    PolicyLossConfig(loss_type="dr_grpo", max_completion_length=12, sampler_correction="sequence_mask",
                     sampler_clip_min=0.5),
    PolicyLossConfig(loss_type="luspo", importance_sampling_level="sequence", beta=0.04, delta=1.5),
    PolicyLossConfig(loss_type="cispo", epsilon_high=1.2, importance_sampling_level="sequence_token"),
    PolicyLossConfig(loss_type="sapo", beta=0.04, kl_estimator="k2", sampler_correction="token_mask",
                     sampler_clip_min=0.5),
    PolicyLossConfig(loss_type="vespo", sampler_correction="token_mask", sampler_clip_min=0.5, sampler_clip_max=2.0),
    PolicyLossConfig(loss_type="bnpo", top_entropy_quantile=0.3),
]


@given(d=batches(), cfg=st.sampled_from(PAD_CFGS), fill=st.sampled_from([np.nan, np.inf, -1e30, 1e30]),
       where=st.lists(st.integers(0, T), min_size=3, max_size=3))
def test_masked_padding_columns_change_nothing(d, cfg, fill, where):
    v0, g0 = run(cfg, d)
    cols = np.insert(np.arange(T), sorted(where), -1)  # -1 marks an inserted padding column
    new = {}
    for k in ("logps", "old", "ref", "sampler", "ent"):
        new[k] = np.where(cols[None, :] < 0, fill, d[k][:, np.maximum(cols, 0)])
    new["mask"] = np.where(cols[None, :] < 0, False, d["mask"][:, np.maximum(cols, 0)])
    new["adv"] = d["adv"]
    v1, g1 = run(cfg, new)
    assert_close(v1, v0, rtol=1e-12)
    assert np.all(g1[:, cols < 0] == 0.0)
    assert_close(g1[:, cols >= 0], g0, rtol=1e-12, atol=1e-15)


PERM_CFGS = PAD_CFGS[:7]


@given(d=batches(), cfg=st.sampled_from(PERM_CFGS), perm=st.permutations(list(range(B))))
def test_batch_permutation(d, cfg, perm):
    perm = np.asarray(perm)
    v0, g0 = run(cfg, d)
    pd = {k: v[perm] for k, v in d.items()}
    v1, g1 = run(cfg, pd)
    assert_close(v1, v0, rtol=1e-12)
    assert_close(g1, g0[perm], rtol=1e-12, atol=1e-15)
    # per-example primitives permute with the batch
    m, pm = d["mask"], pd["mask"]
    for f in (lambda x: tx.token_log_ratio(x["logps"], x["old"], x["mask"]),
              lambda x: tx.sequence_log_ratio(x["logps"], x["old"], x["mask"]),
              lambda x: tx.off_policy_sequence_mask(x["adv"], x["logps"], x["sampler"], x["mask"], 0.05),
              lambda x: tx.sampler_importance_weights(x["old"], x["sampler"], x["mask"], "sequence_mask"),
              lambda x: tx.vespo_weights(tx.token_log_ratio(x["logps"], x["old"], x["mask"]), x["adv"], x["mask"]),
              lambda x: tx.kl_penalty(x["logps"], x["ref"], x["mask"])):
        assert_close(f(pd), np.asarray(f(d))[perm], rtol=1e-12)
    assert m[perm].tolist() == pm.tolist()


@given(seed=st.integers(0, 2**31 - 1), perm=st.permutations(list(range(12))),
       scale=st.sampled_from(tx.SCALE_REWARDS))
def test_advantages_permutation(seed, perm, scale):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=12)
    gid = rng.integers(0, 3, 12)
    perm = np.asarray(perm)
    a = np.asarray(tx.group_relative_advantages(r, group_ids=gid, num_groups=3, scale_rewards=scale))
    ap = np.asarray(tx.group_relative_advantages(r[perm], group_ids=gid[perm], num_groups=3, scale_rewards=scale))
    assert_close(ap, a[perm], rtol=1e-12, atol=1e-12)


SPLIT_CFGS = [
    PolicyLossConfig(loss_type="grpo", beta=0.04, sampler_correction="sequence_truncate"),
    PolicyLossConfig(loss_type="sapo", off_policy_mask_threshold=0.05),
    PolicyLossConfig(loss_type="dr_grpo", importance_sampling_level="sequence"),
    PolicyLossConfig(loss_type="luspo", importance_sampling_level="sequence", beta=0.04),
    PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.5),
    PolicyLossConfig(loss_type="cispo", epsilon_high=1.2, sampler_correction="token_mask", sampler_clip_min=0.5),
    PolicyLossConfig(loss_type="vespo", sampler_correction="token_truncate"),
    PolicyLossConfig(loss_type="dapo", entropy_coef=0.05),
    PolicyLossConfig(loss_type="grpo", entropy_coef=0.05),
]


@given(d=batches(), cfg=st.sampled_from(SPLIT_CFGS), perm=st.permutations(list(range(B))))
def test_micro_batches_sum_to_full_batch(d, cfg, perm):
    """Two micro-batches with the global ``num_items`` / ``num_sequences`` (and a global entropy
    threshold) sum to the full-batch loss, and their gradients concatenate to the full gradient."""
    perm = np.asarray(perm)
    d = {k: v[perm] for k, v in d.items()}
    thr = None
    if cfg.top_entropy_quantile < 1:
        thr = jnp.asarray(ref.entropy_threshold(d["ent"], d["mask"], cfg.top_entropy_quantile))
    v_full, g_full = run(cfg, d, entropy_threshold=thr)
    counts = dict(num_items=jnp.asarray(float(d["mask"].sum())), num_sequences=jnp.asarray(float(B)),
                  entropy_threshold=thr)
    h = B // 2
    parts = [run(cfg, {k: v[s] for k, v in d.items()}, **counts) for s in (slice(0, h), slice(h, B))]
    assert_close(parts[0][0] + parts[1][0], v_full, rtol=1e-10, atol=1e-12)
    assert_close(np.concatenate([parts[0][1], parts[1][1]]), g_full, rtol=1e-10, atol=1e-13)


def test_micro_batch_bnpo_is_per_micro_batch():
    """bnpo is the documented exception: each micro-batch is normalised by its own token count."""
    d = gen_batch(5, [7, 2, 5, 1, 6, 3])
    cfg = PolicyLossConfig(loss_type="bnpo")
    parts = [run(cfg, {k: v[s] for k, v in d.items()}) for s in (slice(0, 3), slice(3, 6))]
    want = sum(ref.policy_loss(d["logps"][s], d["old"][s], d["adv"][s], d["mask"][s], cfg)
               for s in (slice(0, 3), slice(3, 6)))
    assert_close(parts[0][0] + parts[1][0], want, rtol=1e-10)


# ------------------------------------------------------------------------------------- KL / clipping


@given(lp=hnp.arrays(np.float64, (B, T), elements=st.floats(-1e4, 0.0)),
       rl=hnp.arrays(np.float64, (B, T), elements=st.floats(-1e4, 0.0)),
       clamp=st.sampled_from([20.0, 5.0]))
def test_k3_nonnegative_and_finite(lp, rl, clamp):
    for kind in ("k3", "k2", "abs"):
        kl = np.asarray(tx.kl_penalty(lp, rl, None, kind, clamp))
        assert np.all(np.isfinite(kl)) and np.all(kl >= 0.0), kind
    g = np.asarray(jax.grad(lambda v: jnp.sum(tx.kl_penalty(v, rl, None, "k3", clamp)))(lp))
    assert np.all(np.isfinite(g))


@given(r=hnp.arrays(np.float64, (B, T), elements=st.floats(1e-3, 3.0)),
       a=hnp.arrays(np.float64, (B, T), elements=st.floats(-3.0, 3.0).filter(lambda x: abs(x) > 1e-6)),
       eps=st.sampled_from([(0.2, None), (0.2, 0.28), (0.1, 0.5)]))
def test_clip_indicators_match_vanishing_gradient(r, a, eps):
    lo, hi = 1 - eps[0], 1 + (eps[0] if eps[1] is None else eps[1])
    assume(np.all(np.abs(r - lo) > 1e-9) and np.all(np.abs(r - hi) > 1e-9))
    g = np.asarray(jax.grad(lambda v: jnp.sum(tx.ppo_clip_loss(v, a, *eps)))(r))
    low, high, region = (np.asarray(x) for x in tx.clip_indicators(r, a, *eps))
    np.testing.assert_array_equal(region, g == 0.0)
    np.testing.assert_array_equal(region, low | high)
    assert not np.any(low & high)


# ------------------------------------------------------------------------------------------ advantages

rewards_st = hnp.arrays(np.float64, (12,), elements=st.one_of(st.floats(-10.0, 10.0), st.just(np.nan),
                                                               st.sampled_from([0.1, 1.0])))


@given(r=rewards_st, shift=hnp.arrays(np.float64, (3,), elements=st.floats(-100.0, 100.0)),
       scale=st.sampled_from(tx.SCALE_REWARDS))
def test_group_advantages_sum_to_zero_and_shift_invariant(r, shift, scale):
    a = np.asarray(tx.group_relative_advantages(r, 4, scale_rewards=scale))
    assert np.all(np.isfinite(a))
    assert np.all(a[np.isnan(r)] == 0.0)
    for g in range(3):
        assert abs(a[4 * g:4 * g + 4].sum()) < 1e-9 * max(1.0, np.abs(a).max())
    # per-group constants: invariant with group / no scaling; batch scaling only for a global constant
    s = np.repeat(shift, 4) if scale != "batch" else np.full(12, shift[0])
    a2 = np.asarray(tx.group_relative_advantages(r + s, 4, scale_rewards=scale))
    assert_close(a2, a, rtol=1e-6, atol=1e-6)
    # same under arbitrary group ids
    gid = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2])
    ag = np.asarray(tx.group_relative_advantages(r, group_ids=gid, num_groups=3, scale_rewards=scale))
    for g in range(3):
        assert abs(ag[gid == g].sum()) < 1e-9 * max(1.0, np.abs(ag).max())


@given(v=st.floats(-1e3, 1e3), n=st.sampled_from([1, 2, 4]), scale=st.sampled_from(tx.SCALE_REWARDS))
def test_all_equal_group_rewards(v, n, scale):
    a = np.asarray(tx.group_relative_advantages(np.full(8, v), n, scale_rewards=scale))
    assert np.all(a == 0.0)
    R = np.full((8, 2), v)
    for agg in tx.MULTI_REWARD_AGGREGATIONS:
        a = np.asarray(tx.multi_reward_advantages(R, None, 4, aggregation=agg, scale_rewards=scale))
        assert np.all(a == 0.0), agg


# ------------------------------------------------------------------------------------ extreme inputs

EXTREME_CFGS = [
    PolicyLossConfig(loss_type=lt, importance_sampling_level=lv, beta=0.04, epsilon_high=1.5 if lt == "cispo" else None,
                     sampler_correction=("token_mask" if lt == "vespo" else "sequence_truncate"),
                     off_policy_mask_threshold=0.1, entropy_coef=0.01)
    for lt in tx.POLICY_LOSS_TYPES for lv in LEVELS
]


@settings(max_examples=40)
@given(d=batches(), cfg=st.sampled_from(EXTREME_CFGS), big=st.sampled_from([1e4, -1e4, 50.0, -50.0]))
def test_extreme_log_ratios_finite(d, cfg, big):
    rng = np.random.default_rng(0)
    sign = rng.choice([-1.0, 1.0], size=(B, T))
    d["old"] = d["logps"] + big * sign
    d["ref"] = d["logps"] - big * sign
    d["sampler"] = d["old"] + big * sign[::-1]
    v, g = run(cfg, d)
    assert np.isfinite(v)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("cfg", EXTREME_CFGS[::2], ids=lambda c: f"{c.loss_type}-{c.importance_sampling_level}")
def test_empty_mask_zero_loss_and_gradient(cfg):
    d = gen_batch(1, [0] * B)
    for k in ("logps", "old", "ref", "sampler", "ent"):
        d[k][:] = np.nan  # nothing under an empty mask may be read
    v, g = run(cfg, d)
    assert v == 0.0
    assert np.all(g == 0.0)


BF16_CFGS = [
    PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04, sampler_correction="token_truncate"),
    PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    PolicyLossConfig(loss_type="cispo", epsilon_high=1.2, top_entropy_quantile=0.5, entropy_coef=0.01),
    PolicyLossConfig(loss_type="vespo", sampler_correction="token_mask", sampler_clip_min=0.5),
]


@settings(max_examples=15)
@given(d=batches(min_len=1), cfg=st.sampled_from(BF16_CFGS))
def test_bf16_inputs_compute_in_float32(d, cfg):
    keys = ("logps", "old", "ref", "sampler", "adv", "ent")
    d16 = dict(d, **{k: jnp.asarray(d[k], jnp.bfloat16) for k in keys})
    d32 = dict(d, **{k: np.asarray(d16[k].astype(jnp.float32)) for k in keys})
    v16, g16 = vg(cfg)(d16["logps"], d16["old"], d16["adv"], d16["mask"],
                       dict(ref_logps=d16["ref"] if cfg.beta else None,
                            sampler_logps=d16["sampler"] if cfg.sampler_correction else None,
                            entropies=d16["ent"] if cfg.entropy_coef or cfg.top_entropy_quantile < 1 else None))
    assert v16.dtype == jnp.float32  # computed in float32, not bf16
    assert g16.dtype == jnp.bfloat16  # cotangent in the input's dtype
    d32f = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v)
            for k, v in d32.items()}
    v32, g32 = run(cfg, d32f)
    # the bf16 path equals float32 maths on the bf16-rounded inputs
    assert_close(float(v16), v32, rtol=1e-5, atol=1e-6)
    assert_close(np.asarray(g16.astype(jnp.float32)), g32.astype(np.float32), rtol=1e-2, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(g16.astype(jnp.float32))))


# ---------------------------------------------------------------------------------- loss-type registry

# a user's surrogate registered by name runs through the whole pipeline (issue 19): a copy of the built-in
# PPO clip, and a REINFORCE written from the public SurrogateInputs, must equal the built-ins they copy
tx.register_policy_loss("test_ppo_copy", tx.POLICY_LOSS_REGISTRY["dapo"].surrogate, aggregation="dapo",
                        overwrite=True)
tx.register_policy_loss("test_reinforce", lambda x: -x.advantages * x.logps, token_level_only=True, overwrite=True)


@settings(max_examples=10)
@given(d=batches(), sampler=st.sampled_from([None, "token_truncate"]))
def test_registered_loss_types_run_the_whole_pipeline(d, sampler):
    kw = dict(beta=0.04, sampler_correction=sampler, off_policy_mask_threshold=0.1, entropy_coef=0.01)
    for copy, builtin in (("test_ppo_copy", "dapo"), ("test_reinforce", "gpg")):
        v0, g0 = run(PolicyLossConfig(loss_type=builtin, **kw), d)
        v1, g1 = run(PolicyLossConfig(loss_type=copy, **kw), d)
        assert_close(v1, v0, rtol=1e-12)
        assert_close(g1, g0, rtol=1e-12, atol=1e-15)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="'dapo' is already registered"):
        tx.register_policy_loss("dapo", lambda x: x.logps)
    with pytest.raises(ValueError, match="aggregation='nope' is not allowed"):
        tx.register_policy_loss("test_bad", lambda x: x.logps, aggregation="nope")
    with pytest.raises(ValueError, match="loss_type='not_registered' is not allowed; allowed values: .*'test_reinforce'"):
        PolicyLossConfig(loss_type="not_registered")
    with pytest.raises(ValueError, match="importance_sampling_level='sequence' is not allowed with loss_type='test_"):
        PolicyLossConfig(loss_type="test_reinforce", importance_sampling_level="sequence")
    assert set(tx.ALL_POLICY_LOSS_TYPES) <= set(tx.POLICY_LOSS_REGISTRY)
