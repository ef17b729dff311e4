"""Continuous hyperparameters are data (issue 19): Python numbers or JAX scalars, traced or not.

For the preference losses, the policy loss, the KL estimators, KTO, GKD, CPO / SimPO / AlphaPO, TPO,
ULD, self-distillation and BEMA: ``vmap`` over four values of the main coefficient equals four separate
calls with Python numbers; ``jax.grad`` w.r.t. it equals a central finite difference (float64); a jitted
step with a β schedule compiles once; the configs are pytrees (float fields are leaves, the rest static)
and stay hashable for static use. Also the preference-loss registry (a user's loss through the whole
``preference_loss`` pipeline, with a traced β), and the float64 references under ``jit``
(``chex.variants(with_jit=True)``) for one function of each family. The reference modules run the same
functions eagerly (their dozens of configurations share the per-primitive compile cache; jitting each
would compile each), so here the jitted variant only: an eager variant of these nine checks built 168
more executables (every eager primitive is one) for paths those modules already cover.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trlax.objectives as tx
from trlax.objectives import (
    ALL_KL_ESTIMATORS,
    KL_ESTIMATORS,
    PolicyLossConfig,
    PreferenceLossConfig,
    alphapo_loss,
    bema,
    cpo_loss,
    dpo_loss,
    gkd_loss,
    kl_in_reward,
    kl_penalty,
    kto_loss,
    policy_loss,
    preference_loss,
    self_distillation_loss,
    tpo_loss,
    uld_loss,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _numpy_ref as ref  # noqa: E402

B, T = 4, 5
BETAS = (0.01, 0.1, 0.5, 2.0)
_rng = np.random.default_rng(19)


def _arr(x, dtype=jnp.float64):
    return jnp.asarray(x, dtype)


LOGPS = _arr(-np.abs(_rng.normal(size=(B, T))) - 0.1)
OLD = LOGPS + _arr(0.2 * _rng.normal(size=(B, T)))
REF = LOGPS + _arr(0.5 * _rng.normal(size=(B, T)))
ADV = _arr(_rng.normal(size=(B,)))
ENT = _arr(np.abs(_rng.normal(size=(B, T))))
MASK = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]], bool)
REJ = _arr(-np.abs(_rng.normal(size=(B, T))) - 0.1)
REF_REJ = REJ + _arr(0.5 * _rng.normal(size=(B, T)))
SEQ = [_arr(_rng.normal(size=(B,)) - 3.0) for _ in range(4)]  # chosen, rejected, ref chosen, ref rejected
DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero", "discopop", "sigmoid_norm", "cal_dpo")


def _dpo_all(beta):
    return jnp.stack([dpo_loss(*SEQ, lt, beta=beta, label_smoothing=0.1) for lt in DPO_TYPES])


def _policy(config):
    return policy_loss(LOGPS, OLD, ADV, MASK, config, ref_logps=REF, entropies=ENT)[0]


def _pref(config):
    return preference_loss(LOGPS, REJ, REF, REF_REJ, MASK, MASK, config)[0]


def _kl_all(clamp):
    # every estimator with a clamp that binds on some tokens (|log π − log π_ref| reaches ~1.2 here)
    return jnp.stack([jnp.sum(kl_penalty(LOGPS, REF, MASK, k, clamp=clamp)) for k in ALL_KL_ESTIMATORS])


LABELS = jnp.asarray([True, False, True, False])
STUDENT = _arr(_rng.normal(size=(B, T, 3)))
TEACHER = _arr(2.0 * _rng.normal(size=(B, T, 3)))
GKD_BETAS = (0.0, 0.3, 0.7, 1.0)  # the endpoints are KL(T‖S) and KL(S‖T), not the degenerate mixture


def _kto(beta):
    return kto_loss(LOGPS, REF, LABELS, mask=MASK, kl=0.05, beta=beta)[0]


def _gkd(beta):
    return gkd_loss(STUDENT, TEACHER, MASK, beta=beta)[0]


POLICY = PolicyLossConfig.grpo(beta=0.04, epsilon=0.2, entropy_coef=0.01)
PREF = PreferenceLossConfig.mpo()
JIT = {"dpo": jax.jit(_dpo_all), "policy": jax.jit(_policy), "pref": jax.jit(_pref), "kl": jax.jit(_kl_all),
       "kto": jax.jit(_kto), "gkd": jax.jit(_gkd)}


# ------------------------------------------------------------------------------------- pytree configs


def test_configs_are_pytrees_with_static_discrete_fields():
    assert set(PolicyLossConfig.STATIC_FIELDS) == {
        "loss_type", "importance_sampling_level", "kl_estimator", "use_bias_correction_kl", "sampler_correction",
        "max_completion_length", "mask_truncated_completions", "loss_agg_mode", "topr_sequence_ratio",
        "dppo_divergence", "force_on_policy_ratio"}
    assert set(PreferenceLossConfig.STATIC_FIELDS) == {
        "loss_type", "sigmoid_label_smoothing", "f_divergence_type", "use_weighting", "reference_free"}
    for cfg in (POLICY, PREF):
        leaves, treedef = jax.tree_util.tree_flatten(cfg)
        assert all(isinstance(x, float) for x in leaves)
        assert jax.tree_util.tree_unflatten(treedef, leaves) == cfg
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(POLICY)[0]]
    assert paths == [f".{n}" for n in PolicyLossConfig.LEAF_FIELDS if getattr(POLICY, n) is not None]
    # a None field has no leaf: setting it is a different (static) structure, as it changes the program
    assert jax.tree_util.tree_structure(POLICY) != jax.tree_util.tree_structure(POLICY.replace(delta=4.0))


def test_configs_of_numbers_stay_hashable_for_static_use():
    assert hash(POLICY) == hash(PolicyLossConfig.grpo(beta=0.04, epsilon=0.2, entropy_coef=0.01))
    traces = []  # one entry per trace: a cache hit does not trace (jit's C++ cache size is 0 when another
    # test of the session left a config, e.g. debug_nans, that bypasses the fast path)

    def g(c, x):
        traces.append(c)
        return policy_loss(x, OLD, ADV, MASK, c, ref_logps=REF, entropies=ENT)[0]

    f = jax.jit(g, static_argnums=0)
    a = f(POLICY, LOGPS)
    b = f(PolicyLossConfig.grpo(beta=0.04, epsilon=0.2, entropy_coef=0.01), LOGPS)  # equal config: cache hit
    assert len(traces) == 1
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, JIT["policy"](POLICY), rtol=1e-12)  # static == traced


def test_numbers_are_validated_arrays_pass_through():
    with pytest.raises(ValueError, match="beta=-0.1 is out of range"):
        PolicyLossConfig(beta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*SEQ, beta=0.0)
    with pytest.raises(ValueError, match="sampler_clip_min=3.0 must be <= sampler_clip_max=2.0"):
        PolicyLossConfig(sampler_clip_min=3.0, sampler_clip_max=2.0)
    PolicyLossConfig(beta=jnp.asarray(0.1), sampler_clip_min=jnp.asarray(3.0), sampler_clip_max=2.0)
    PreferenceLossConfig(beta=jnp.asarray(0.1), label_smoothing=jnp.asarray(0.2))
    # a hyperparameter that sets a shape must stay a number, and says so
    from trlax.objectives import BetaDPOState, beta_dpo_loss
    with pytest.raises(TypeError, match="rho must be a Python number"):
        beta_dpo_loss(SEQ[0], SEQ[1], BetaDPOState.init(), jax.random.PRNGKey(0), rho=jnp.asarray(0.5))


# --------------------------------------------------------------------- vmap over four values == four calls


def _number_path(fn, value):
    """``fn(value)`` with ``value`` a Python number baked into the program (today's static path)."""
    return jax.jit(lambda: fn(value))()


def test_vmap_over_beta_equals_separate_calls_dpo():
    batched = jax.vmap(JIT["dpo"])(jnp.asarray(BETAS))
    for i, b in enumerate(BETAS):
        np.testing.assert_allclose(batched[i], JIT["dpo"](b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(batched[1], _number_path(_dpo_all, BETAS[1]), rtol=1e-12, atol=1e-12)
    assert len(np.unique(np.round(np.asarray(batched[:, 0, 0]), 9))) == len(BETAS)


def test_vmap_over_configs_equals_separate_calls_policy_and_preference():
    for name, cfg in (("policy", POLICY), ("pref", PREF)):
        configs = [cfg.replace(beta=b) for b in BETAS]
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.asarray(xs), *configs)  # one config, [4] leaves
        batched = jax.vmap(JIT[name])(stacked)
        separate = [JIT[name](c) for c in configs]
        np.testing.assert_allclose(batched, separate, rtol=1e-12, atol=1e-12)
        fn = _policy if name == "policy" else _pref
        np.testing.assert_allclose(batched[1], _number_path(fn, configs[1]), rtol=1e-12, atol=1e-12)
        # the values differ by β (so the check is not vacuous)
        assert len(np.unique(np.round(np.asarray(batched), 9))) == len(BETAS)


def test_vmap_over_clamp_equals_separate_calls_kl_estimators():
    clamps = (0.1, 0.3, 0.6, 20.0)
    batched = jax.vmap(JIT["kl"])(jnp.asarray(clamps))
    for i, c in enumerate(clamps):
        np.testing.assert_allclose(batched[i], JIT["kl"](c), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(batched[1], _number_path(_kl_all, clamps[1]), rtol=1e-12, atol=1e-12)
    assert not np.allclose(batched[0], batched[-1])


def test_vmap_over_beta_kl_in_reward():
    scores = _arr(_rng.normal(size=(B, T)))
    f = jax.jit(lambda b: kl_in_reward(scores, LOGPS, REF, MASK, b)[0])
    batched = jax.vmap(f)(jnp.asarray(BETAS))
    for i, b in enumerate(BETAS):
        np.testing.assert_allclose(batched[i], f(b), rtol=1e-12)
    np.testing.assert_allclose(batched[1], _number_path(lambda b: kl_in_reward(scores, LOGPS, REF, MASK, b)[0],
                                                        BETAS[1]), rtol=1e-12)


def test_vmap_over_beta_equals_separate_calls_kto_and_gkd():
    for name, betas in (("kto", BETAS), ("gkd", GKD_BETAS)):
        batched = jax.vmap(JIT[name])(jnp.asarray(betas))
        for i, b in enumerate(betas):
            np.testing.assert_allclose(batched[i], JIT[name](b), rtol=1e-12, atol=1e-12, err_msg=name)
        assert len(np.unique(np.round(np.asarray(batched), 9))) == len(betas), name
    # GKD's endpoints take their own branch for numbers: the traced selects agree with it
    for i in (0, 1, 3):
        np.testing.assert_allclose(batched[i], _number_path(_gkd, GKD_BETAS[i]), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- grad w.r.t. β == finite difference


def _central_difference(f, x, h=1e-5):
    return (f(x + h) - f(x - h)) / (2 * h)


def test_grad_wrt_beta_equals_finite_difference():
    beta = 0.3
    for name, fn in (("dpo", lambda b: jnp.sum(JIT["dpo"](b))),
                     ("policy", lambda b: JIT["policy"](POLICY.replace(beta=b))),
                     ("pref", lambda b: JIT["pref"](PREF.replace(beta=b))),
                     ("kto", JIT["kto"]), ("gkd", JIT["gkd"])):
        g = jax.grad(fn)(jnp.asarray(beta, jnp.float64))
        fd = _central_difference(lambda b, fn=fn: fn(jnp.asarray(b, jnp.float64)), beta)
        assert abs(float(g)) > 1e-6, name
        np.testing.assert_allclose(g, fd, rtol=1e-5, err_msg=name)


def test_grad_wrt_config_fields():
    """``jax.grad`` w.r.t. a whole config gives a config of gradients (one per float field)."""
    g = jax.grad(JIT["policy"])(POLICY)
    assert isinstance(g, PolicyLossConfig)
    for field in ("beta", "entropy_coef"):
        fd = _central_difference(lambda v, field=field: JIT["policy"](POLICY.replace(**{field: jnp.asarray(v)})),
                                 getattr(POLICY, field))
        np.testing.assert_allclose(getattr(g, field), fd, rtol=1e-5, err_msg=field)
    # the entropy bonus enters linearly: d loss / d entropy_coef = − the masked mean entropy
    np.testing.assert_allclose(g.entropy_coef, -float(jnp.sum(ENT * MASK) / jnp.sum(MASK)), rtol=1e-12)


def test_grad_wrt_kl_clamp_equals_finite_difference():
    clamp = 0.3
    jac = np.asarray(jax.jacrev(JIT["kl"])(jnp.asarray(clamp, jnp.float64)))
    fd = np.asarray(_central_difference(lambda c: JIT["kl"](jnp.asarray(c, jnp.float64)), clamp))
    plain = [ALL_KL_ESTIMATORS.index(k) for k in KL_ESTIMATORS]
    assert np.all(np.abs(jac[plain]) > 1e-6)
    np.testing.assert_allclose(jac[plain], fd[plain], rtol=1e-5)
    # the straight-through kinds stop the gradient of their value (sg(f(d)) + ½d² − sg(½d²)), so their
    # derivative is k2's, not the finite difference of their value
    st = [ALL_KL_ESTIMATORS.index(k + "+") for k in KL_ESTIMATORS]
    np.testing.assert_allclose(jac[st], jac[ALL_KL_ESTIMATORS.index("k2")], rtol=1e-12)


# --------------------------------------------------------------------- a β schedule compiles once


def test_beta_schedule_compiles_once():
    """A jitted SGD step whose β follows a schedule of the step counter, and one whose config is an
    argument rebuilt with a new β every step: each compiles one program for all steps."""

    def loss(params, config):
        return policy_loss(params, OLD, ADV, MASK, config, ref_logps=REF, entropies=ENT)[0]

    traces = {"scheduled": 0, "config": 0}  # a retrace (a new program) per cache miss

    @jax.jit
    def scheduled_step(params, step):
        traces["scheduled"] += 1
        beta = 0.01 + 0.09 * step / 4.0  # linear warm-up of β inside the step
        return params - 0.1 * jax.grad(loss)(params, POLICY.replace(beta=beta))

    @jax.jit
    def config_step(params, config):
        traces["config"] += 1
        return params - 0.1 * jax.grad(loss)(params, config)

    p1 = p2 = LOGPS
    for step in range(5):
        p1 = scheduled_step(p1, step)
        p2 = config_step(p2, POLICY.replace(beta=0.01 + 0.09 * step / 4.0))  # a Python float each step
    assert traces == {"scheduled": 1, "config": 1}
    np.testing.assert_allclose(p1, p2, rtol=1e-12)
    assert not np.allclose(p1, LOGPS)


# --------------------------------------------------------------- traced "off" values and optional inputs


def test_traced_zero_coefficients_match_the_number_path():
    """A traced β / entropy_coef / top_entropy_quantile cannot be compared with its off value: its step
    runs when its input is given (and then 0 / 1 changes nothing) and is skipped when it is not."""
    cfg = PolicyLossConfig.dapo(beta=0.0, entropy_coef=0.0, top_entropy_quantile=1.0)
    plain = _number_path(lambda c: policy_loss(LOGPS, OLD, ADV, MASK, c, truncated=jnp.zeros(B, bool))[0], cfg)
    with_inputs = jax.jit(lambda c: policy_loss(LOGPS, OLD, ADV, MASK, c, ref_logps=REF, entropies=ENT,
                                                truncated=jnp.zeros(B, bool))[0])(cfg)
    without = jax.jit(lambda c: policy_loss(LOGPS, OLD, ADV, MASK, c, truncated=jnp.zeros(B, bool))[0])(cfg)
    np.testing.assert_allclose(with_inputs, plain, rtol=1e-12)
    np.testing.assert_allclose(without, plain, rtol=1e-12)


@pytest.mark.parametrize("field,value", [("epsilon", 0.3), ("epsilon_high", 0.28), ("delta", 1.5),
                                         ("sapo_temperature_neg", 2.0), ("log_ratio_clamp", 0.15)])
def test_traced_policy_fields_trace(field, value):
    """Every kind of continuous field traces (an abstract evaluation: no compile)."""
    lt = "sapo" if field.startswith("sapo") else "grpo"
    cfg = POLICY.replace(loss_type=lt, **{field: value})
    out = jax.eval_shape(lambda v: _policy(dataclasses.replace(cfg, **{field: v})), jnp.asarray(value))
    assert out.shape == ()


# ------------------------------------------------- unpaired / supervised / distillation leftovers


def _cpo(alpha):  # SimPO margin on the AlphaPO transform, plus a CPO NLL term of weight α/2
    return cpo_loss(LOGPS, REJ, MASK, MASK, loss_type="simpo", beta=2.0, simpo_gamma=0.5, alpha=alpha,
                    cpo_alpha=0.5 * alpha)[0]


def _alphapo(alpha):
    return alphapo_loss(LOGPS, REJ, MASK, MASK, alpha=alpha)[0]


def _tpo(tpo_alpha):
    return tpo_loss(LOGPS, REJ, OLD, MASK, MASK, MASK, loss_type="tpo-l", beta=0.5, tpo_alpha=tpo_alpha,
                    tpo_l_gamma=0.25 + tpo_alpha, label_smoothing=0.1)[0]


def _uld(weight):
    return uld_loss(STUDENT, TEACHER, MASK, MASK, logps=LOGPS, crossentropy_weight=weight,
                    student_temperature=1.0 + weight)[0]


def _self_distill(alpha):
    return self_distillation_loss(STUDENT, TEACHER, MASK, mode="topk_logits", topk=2, alpha=alpha)[0]


_PARAMS = {"w": _arr(_rng.normal(size=(3,))), "b": _arr(1.5)}


def _bema(power):
    """The BEMA weights after four steps of a drifting parameter, η = bias_power = power, κ = power / 2."""
    t = bema(update_freq=1, ema_power=0.5 * power, bias_power=power, lag=2.0, multiplier=1.0 + power)
    state = t.init(_PARAMS)
    out = _PARAMS
    for k in range(1, 5):
        out, state = t.update(jax.tree_util.tree_map(lambda p, k=k: p + 0.3 * k * (1.0 + p), _PARAMS), state)
    return jnp.stack([jnp.sum(out["w"]), out["b"]])


LEFTOVERS = {  # name -> (function, four values, the 0 / off value among them where it takes a branch)
    "cpo": (_cpo, (0.0, 0.1, 0.25, 1.0)),
    "alphapo": (_alphapo, (0.0, 0.1, 0.25, 1.0)),
    "tpo": (_tpo, (0.0, 0.5, 1.0, 2.0)),
    "uld": (_uld, (0.0, 0.1, 0.5, 2.0)),
    "self_distill": (_self_distill, (0.0, 0.3, 0.7, 1.0)),
    "bema": (_bema, (0.0, 0.2, 0.5, 1.0)),
}
JIT_LEFTOVERS = {name: jax.jit(fn) for name, (fn, _) in LEFTOVERS.items()}


@pytest.mark.parametrize("name", sorted(LEFTOVERS))
def test_vmap_over_coefficient_equals_separate_calls_leftovers(name):
    """The AlphaPO α (its α = 0 branch is a select when traced), CPO / TPO / ULD NLL weights (a weight
    of 0 drops the term for a number, multiplies it by 0 when traced), self-distillation's α, BEMA's powers."""
    fn, values = LEFTOVERS[name]
    f = JIT_LEFTOVERS[name]
    batched = jax.vmap(f)(jnp.asarray(values))
    for i, v in enumerate(values):  # (a float64 scalar argument: the finite differences below reuse the program)
        np.testing.assert_allclose(batched[i], f(_arr(v)), rtol=1e-12, atol=1e-12, err_msg=f"{name} {v}")
    # the number path (Python branches) at the first value (the off value where there is one): the
    # selects agree with it
    np.testing.assert_allclose(batched[0], _number_path(fn, values[0]), rtol=1e-12, atol=1e-12, err_msg=name)
    assert len(np.unique(np.round(np.asarray(batched).reshape(len(values), -1)[:, 0], 9))) == len(values), name


@pytest.mark.parametrize("name,at", [("cpo", 0.25), ("alphapo", 0.25), ("tpo", 0.5), ("uld", 0.3),
                                     ("self_distill", 0.4), ("bema", 0.5)])
def test_grad_wrt_coefficient_equals_finite_difference_leftovers(name, at):
    f = JIT_LEFTOVERS[name]
    fn = (lambda v: jnp.sum(f(v))) if name == "bema" else f
    g = jax.grad(fn)(jnp.asarray(at, jnp.float64))
    fd = _central_difference(lambda v: fn(jnp.asarray(v, jnp.float64)), at)
    assert abs(float(g)) > 1e-6, name
    np.testing.assert_allclose(g, fd, rtol=1e-5, err_msg=name)


def test_leftover_numbers_are_still_validated():
    with pytest.raises(ValueError, match="cpo_alpha=-1.0 is out of range"):
        cpo_loss(LOGPS, REJ, MASK, MASK, cpo_alpha=-1.0)
    with pytest.raises(ValueError, match="tpo_alpha=-0.5 is out of range"):
        tpo_loss(LOGPS, REJ, OLD, MASK, MASK, MASK, tpo_alpha=-0.5)
    with pytest.raises(ValueError, match=r"`gold_logps` and `gold_mask` are required when tpo_alpha=.*"
                                         r" \(or an array\)"):
        tpo_loss(LOGPS, REJ, None, MASK, MASK, None, tpo_alpha=jnp.asarray(0.0))
    with pytest.raises(ValueError, match="lag=0 and multiplier=0"):
        bema(lag=0.0, multiplier=0.0)
    bema(lag=0.0, multiplier=jnp.asarray(0.0))  # an array passes (its value is data)
    with pytest.raises(ValueError, match="alpha=0.5 is not allowed with mode='sampled_token'"):
        self_distillation_loss(STUDENT, TEACHER, MASK, mode="sampled_token", alpha=0.5,
                               tokens=jnp.zeros((B, T), jnp.int32))
    with pytest.raises(ValueError, match="crossentropy_weight=0.5 needs `logps`"):
        uld_loss(STUDENT, TEACHER, MASK, MASK, crossentropy_weight=0.5)


# ----------------------------------------------------------------------------- preference-loss registry


def _squared_margin(x):
    """A user's loss: (β·(ρ_w − ρ_l) − 1)² — IPO's form on sums, written from PreferenceInputs."""
    rho_w, rho_l = x.logratios()
    return (x.config.beta * (rho_w - rho_l) - 1.0) ** 2


def _my_sigmoid(x):
    """A copy of the built-in ``sigmoid`` written from PreferenceInputs (with the logit modifiers)."""
    return -jax.nn.log_sigmoid(x.logit())


tx.register_preference_loss("test_squared_margin", _squared_margin, overwrite=True)
tx.register_preference_loss("test_sigmoid", _my_sigmoid, logit_modifiers=True, f_divergence=True, overwrite=True)
LSSP = _arr(-np.abs(_rng.normal(size=(B, T))))  # per-token log Σ π² for WPO


def _pref_full(config, chosen):
    loss, metrics = preference_loss(chosen, REJ, REF, REF_REJ, MASK, MASK, config, chosen_log_sum_sq_probs=LSSP,
                                    rejected_log_sum_sq_probs=LSSP, offsets=0.1 * SEQ[0])
    return loss, metrics


def test_registered_preference_loss_runs_the_whole_pipeline():
    """A registered copy of ``sigmoid`` equals the built-in through LD-DPO, WPO, RPO, R-DPO / DPOP, ODPO offsets
    and f-divergence (value, gradient, metrics), alone and in a weighted mixture; a new loss equals its
    formula on the sequence sums and takes a traced β (vmap over four β == four calls)."""
    kw = dict(beta=0.3, ld_alpha=0.5, use_weighting=True, rpo_alpha=0.2, rdpo_alpha=0.01, dpop_lambda=2.0,
              f_divergence_type="js_divergence")
    vg = jax.jit(jax.value_and_grad(lambda c, lp: _pref_full(c, lp)[0], argnums=1))
    for copy, builtin in (("test_sigmoid", "sigmoid"), (("test_sigmoid", "sft"), ("sigmoid", "sft"))):
        w = None if isinstance(copy, str) else (0.7, 0.3)
        c0 = PreferenceLossConfig(loss_type=builtin, loss_weights=w, **kw)
        c1 = PreferenceLossConfig(loss_type=copy, loss_weights=w, **kw)
        (v0, g0), (v1, g1) = vg(c0, LOGPS), vg(c1, LOGPS)
        np.testing.assert_allclose(v1, v0, rtol=1e-12)
        np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)
        assert abs(float(v0)) > 1e-3 and np.abs(g0).max() > 1e-3
        chex.assert_trees_all_close(_pref_full(c1, LOGPS)[1], _pref_full(c0, LOGPS)[1], rtol=1e-12)

    # a new loss: the recipe's pair mean of the formula on masked sums, β traced through the config
    f = jax.jit(lambda c: preference_loss(LOGPS, REJ, REF, REF_REJ, MASK, MASK, c)[0])
    cfg = PreferenceLossConfig(loss_type="test_squared_margin")
    batched = jax.vmap(f)(jax.tree_util.tree_map(lambda *xs: jnp.asarray(xs),
                                                 *[cfg.replace(beta=b) for b in BETAS]))
    s = [np.sum(np.where(np.asarray(MASK), np.asarray(x), 0.0), axis=1) for x in (LOGPS, REJ, REF, REF_REJ)]
    for i, b in enumerate(BETAS):
        expect = np.mean((b * ((s[0] - s[2]) - (s[1] - s[3])) - 1.0) ** 2)
        np.testing.assert_allclose(batched[i], expect, rtol=1e-12)


def test_preference_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        tx.register_preference_loss("sigmoid", _squared_margin)
    with pytest.raises(ValueError, match="'aot_pair' is an alias"):
        tx.register_preference_loss("aot_pair", _squared_margin)
    with pytest.raises(TypeError, match="`loss` must be callable"):
        tx.register_preference_loss("test_bad", 3.0)
    with pytest.raises(ValueError, match="loss_type='not_registered' is not allowed; allowed values: .*'test_sigmoid'"):
        PreferenceLossConfig(loss_type="not_registered")
    # a registered loss declares what it combines with: the config refuses the rest
    with pytest.raises(ValueError, match="f_divergence_type='js_divergence' is not allowed with loss_type "
                                         r"\['test_squared_margin'\]"):
        PreferenceLossConfig(loss_type="test_squared_margin", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="rdpo_alpha / dpop_lambda modify the logit of loss types .*'test_sigmoid'"):
        PreferenceLossConfig(loss_type="test_squared_margin", rdpo_alpha=0.1)
    with pytest.raises(ValueError, match=r"must return per-pair losses of shape \(4,\), got \(\)"):
        tx.register_preference_loss("test_scalar", lambda x: jnp.sum(x.chosen_logps), overwrite=True)
        preference_loss(LOGPS, REJ, REF, REF_REJ, MASK, MASK, PreferenceLossConfig(loss_type="test_scalar"))
    assert set(tx.PREFERENCE_LOSS_TYPES) <= set(tx.PREFERENCE_LOSS_REGISTRY)


# ------------------------------------------- the references, jitted and not (one function per family)

NAN_PAD = jnp.where(MASK, LOGPS, jnp.nan)  # garbage under the padding must not reach values or gradients
_N = {k: np.asarray(v, np.float64) for k, v in dict(lp=LOGPS, old=OLD, ref=REF, rej=REJ, ref_rej=REF_REJ, ent=ENT,
                                                      adv=ADV).items()}
_N["mask"] = np.asarray(MASK, bool)


def _np_logsig(x):
    return -np.logaddexp(0.0, -x)


def _np_seq(lp, m, mean=False):
    s = np.where(m, lp, 0.0).sum(-1)
    return s / np.maximum(m.sum(-1), 1) if mean else s


class TestReferencesJittedAndNot(chex.TestCase):
    """Each test runs its function under ``jax.jit`` (``chex.variants``; one compile per family) against
    the float64 reference; the eager path is the reference modules' (test_reference, ...)."""

    @chex.variants(with_jit=True)
    def test_aggregation(self):
        f = self.variant(lambda x: jnp.stack([tx.aggregate(x, MASK, m) for m in ("grpo", "bnpo", "dr_grpo", "dapo")]))
        want = [ref.aggregate(np.where(_N["mask"], _N["lp"], 0.0), _N["mask"], m)
                for m in ("grpo", "bnpo", "dr_grpo", "dapo")]
        np.testing.assert_allclose(f(NAN_PAD), want, rtol=1e-12)

    @chex.variants(with_jit=True)
    def test_policy_loss_value_and_grad(self):
        f = self.variant(jax.value_and_grad(lambda lp: policy_loss(lp, OLD, ADV, MASK, POLICY, ref_logps=REF,
                                                                   entropies=ENT)[0]))
        value, grad = f(NAN_PAD)
        np_loss = lambda x: ref.policy_loss(x, _N["old"], _N["adv"], _N["mask"], POLICY, ref_logps=_N["ref"],  # noqa: E731
                                            entropies=_N["ent"])
        np.testing.assert_allclose(value, np_loss(_N["lp"]), rtol=1e-10)
        np.testing.assert_allclose(grad, ref.fd_grad(np_loss, _N["lp"], where=_N["mask"]), rtol=1e-5, atol=1e-8)
        assert np.all(np.asarray(grad)[~_N["mask"]] == 0.0)

    @chex.variants(with_jit=True)
    def test_kl_estimators(self):
        f = self.variant(lambda lp: jnp.stack([kl_penalty(lp, REF, MASK, k) for k in KL_ESTIMATORS]))
        got = np.asarray(f(NAN_PAD))
        for i, k in enumerate(KL_ESTIMATORS):
            want = np.where(_N["mask"], ref.kl_penalty(_N["lp"], _N["ref"], _N["mask"], k), 0.0)
            np.testing.assert_allclose(np.where(_N["mask"], got[i], 0.0), want, rtol=1e-12, atol=1e-15, err_msg=k)

    @chex.variants(with_jit=True)
    def test_sampler_correction(self):
        modes = tx.SAMPLER_CORRECTION_MODES
        f = self.variant(lambda old, samp: [tx.sampler_importance_weights(old, samp, MASK, m, clip_min=0.8,
                                                                          clip_max=1.5) for m in modes])
        for m, got in zip(modes, f(OLD, REF), strict=True):
            want = ref.sampler_importance_weights(_N["old"], _N["ref"], _N["mask"], m, clip_min=0.8, clip_max=1.5)
            sel = _N["mask"] if np.shape(want) == _N["mask"].shape else _N["mask"].any(-1, keepdims=True)
            np.testing.assert_allclose(np.where(sel, got, 0.0), np.where(sel, want, 0.0), rtol=1e-12, err_msg=m)

    @chex.variants(with_jit=True)
    def test_group_relative_advantages(self):
        rewards = jnp.asarray([1.0, 0.0, 0.5, jnp.nan, 2.0, 2.0, 1.0, 0.0])  # a NaN (unscorable) reward
        f = self.variant(lambda r: jnp.stack([tx.group_relative_advantages(r, 4, scale_rewards=s)
                                              for s in tx.SCALE_REWARDS]))
        got = f(rewards)
        for i, s in enumerate(tx.SCALE_REWARDS):
            np.testing.assert_allclose(got[i], ref.group_relative_advantages(np.asarray(rewards), 4, scale_rewards=s),
                                       rtol=1e-12, atol=1e-15, err_msg=s)

    @chex.variants(with_jit=True)
    def test_preference_loss_dpo(self):
        cfg = PreferenceLossConfig.dpo(beta=0.3)
        f = self.variant(lambda lp: preference_loss(lp, REJ, REF, REF_REJ, MASK, MASK, cfg)[0])
        m = _N["mask"]
        margin = (_np_seq(_N["lp"], m) - _np_seq(_N["ref"], m)) - (_np_seq(_N["rej"], m) - _np_seq(_N["ref_rej"], m))
        np.testing.assert_allclose(f(NAN_PAD), np.mean(-_np_logsig(0.3 * margin)), rtol=1e-12)

    @chex.variants(with_jit=True)
    def test_unpaired_simpo(self):
        f = self.variant(lambda lp: cpo_loss(lp, REJ, MASK, MASK, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                                             cpo_alpha=0.0)[0])
        m = _N["mask"]
        x = _np_seq(_N["lp"], m, mean=True) - _np_seq(_N["rej"], m, mean=True)
        np.testing.assert_allclose(f(NAN_PAD), np.mean(-_np_logsig(2.0 * x - 0.5)), rtol=1e-12)

    @chex.variants(with_jit=True)
    def test_supervised_sft(self):
        f = self.variant(lambda lp: tx.sft_loss(lp, MASK)[0])
        np.testing.assert_allclose(f(NAN_PAD), -np.where(_N["mask"], _N["lp"], 0.0).sum() / _N["mask"].sum(),
                                   rtol=1e-12)

    @chex.variants(with_jit=True)
    def test_distillation_gkd(self):
        f = self.variant(lambda s: gkd_loss(s, TEACHER, MASK, beta=0.3)[0])
        ls = np.asarray(jax.nn.log_softmax(STUDENT), np.float64)
        lt = np.asarray(jax.nn.log_softmax(TEACHER), np.float64)
        lm = np.logaddexp(ls + np.log(0.7), lt + np.log(0.3))  # M = 0.3·T + 0.7·S
        kl = lambda lp, lq: np.sum(np.exp(lp) * (lp - lq), -1)  # noqa: E731
        jsd = 0.3 * kl(lt, lm) + 0.7 * kl(ls, lm)
        m = _N["mask"]
        np.testing.assert_allclose(f(STUDENT), np.where(m, jsd, 0.0).sum() / m.sum(), rtol=1e-10)
