"""trlax.objectives.preference vs float64 NumPy references written from the papers, hypothesis
properties, edge cases and bad-input errors.

References are plain loops / NumPy in float64 (never the code under test); gradients are checked
against central finite differences of the NumPy reference (with the WPO weights held fixed, since
they are constants by definition). Sweeps over static configs run eagerly; the jitted path is
exercised by a few shared compiled functions at fixed shapes (hypothesis draws values, not shapes).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trlax.objectives import (
    BetaDPOState,
    PREFERENCE_LOSS_TYPES,
    PreferenceLossConfig,
    beta_dpo_loss,
    cal_dpo_loss,
    dpo_loss,
    f_divergence_scores,
    finalize_metrics,
    ld_dpo_logps,
    length_normalized_scores,
    odpo_offset,
    preference_loss,
    preference_sft_loss,
    sequence_logps,
    tdpo_loss,
    tdpo_token_kl,
    wpo_weights,
)

B, T = 4, 6

# ------------------------------------------------------------------------------ NumPy references


def np_logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sig(x):
    return np.exp(np_logsig(x))


def np_seq(lp, m):
    out = np.zeros(lp.shape[0])
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if m[i, t]:
                out[i] += lp[i, t]
    return out


def np_ld(lc, lr, mc, mr, alpha):
    def one(lp, m, shared):
        out = np.zeros(lp.shape[0])
        for i in range(lp.shape[0]):
            k = 0
            for t in range(lp.shape[1]):
                if m[i, t]:
                    k += 1
                    out[i] += lp[i, t] if k <= shared[i] else alpha * lp[i, t]
        return out

    shared = np.minimum(mc.sum(1), mr.sum(1))
    return one(lc, mc, shared), one(lr, mr, shared)


def np_fdiv(x, kind, a=0.5):
    x = np.asarray(x, np.float64)
    if kind == "reverse_kl":
        return x
    if kind == "forward_kl":
        return 1.0 - np.exp(np.minimum(-x, 80.0))  # f'(u) = 1 − 1/u (trlax's overflow guard)
    if kind == "js_divergence":
        return np.log(2.0 * np.exp(x) / (1.0 + np.exp(x))) if np.all(np.abs(x) < 30) else math.log(2) + np_logsig(x)
    if abs(a - 1.0) < 1e-6:
        return x
    return (np.exp(np.minimum((a - 1.0) * x, 80.0)) - 1.0) / (a - 1.0)  # f'(u) = (u^(α−1) − 1)/(α−1)


def np_pair(lt, Sw, Sl, Rw, Rl, *, beta=0.1, eps=0.0, fd="reverse_kl", fa=0.5, tau=0.05, nw=None, nl=None,
            smooth=False, rdpo=0.0, dpop=0.0, off=None, Dw=None, Dl=None, ta=0.5):
    """Per-pair losses from the papers' formulas (see dpo_loss's table)."""
    rw, rl = Sw - Rw, Sl - Rl
    sw, sl = np_fdiv(rw, fd, fa), np_fdiv(rl, fd, fa)
    if rdpo:
        x_len = rdpo * (nw - nl)  # raw lengths |y_w| − |y_l|
    nw = np.ones_like(Sw) if nw is None else np.maximum(nw, 1)
    nl = np.ones_like(Sw) if nl is None else np.maximum(nl, 1)
    x = beta * (sw - sl - dpop * np.maximum(0.0, Rw - Sw)) + (x_len if rdpo else 0.0) - (0.0 if off is None else off)
    if lt == "sigmoid":
        return -(1 - eps) * np_logsig(x) - eps * np_logsig(-x) if smooth else -np_logsig(x)
    if lt == "hinge":
        return np.maximum(0.0, 1.0 - x)
    if lt == "ipo":
        return (sw / nw - sl / nl - 1.0 / (2 * beta)) ** 2
    if lt == "sigmoid_norm":
        return -np_logsig(beta * (sw / nw - sl / nl))
    if lt == "exo_pair":  # KL(p_θ ‖ p_ε) over {w, l}
        qw, ql = np_sig(x), np_sig(-x)
        return qw * (np.log(qw) - np.log(1 - eps)) + ql * (np.log(ql) - np.log(eps))
    if lt == "robust":
        return ((1 - eps) * -np_logsig(x) - eps * -np_logsig(-x)) / (1 - 2 * eps)
    if lt == "discopop":
        m = np_sig(x / tau)
        return (1 - m) * -np_logsig(x) + m * np.exp(-x)
    if lt == "nca_pair":
        return -np_logsig(beta * rw) - 0.5 * np_logsig(-beta * rw) - 0.5 * np_logsig(-beta * rl)
    if lt == "bco_pair":
        return -np_logsig(beta * rw) - np_logsig(-beta * rl)
    if lt == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if lt in ("aot", "aot_unpaired"):
        d = (np.sort(Sw - Sl) - np.sort(Rw - Rl)) if lt == "aot" else (np.sort(rw) - np.sort(rl))
        return -(1 - eps) * np_logsig(beta * d) - eps * np_logsig(-beta * d)
    if lt == "apo_zero":
        return 1 - np_sig(beta * rw) + np_sig(beta * rl)
    if lt == "apo_down":
        return np_sig(beta * rw) + 1 - np_sig(beta * (rw - rl))
    if lt == "cal_dpo":
        return -np_logsig(rw - rl) + 0.5 * ((rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2)
    if lt == "tdpo1":
        return -np_logsig(beta * ((rw - rl) - (Dl - Dw)))
    if lt == "tdpo2":
        return -np_logsig(beta * ((rw - rl) - ta * (Dl - Dw)))
    raise AssertionError(lt)


def np_wpo(lp, lssp, m):
    out = np.ones(lp.shape[0])
    for i in range(lp.shape[0]):
        n = max(m[i].sum(), 1)
        out[i] = math.exp(sum(lp[i, t] - lssp[i, t] for t in range(lp.shape[1]) if m[i, t]) / n)
    return out


def np_preference_loss(cfg, lc, lr, rc, rr, mc, mr, lsc=None, lsr=None, wlc=None, wlr=None, kc=None, kr=None,
                       off=None, kc_fixed=None):
    """The recipe in NumPy; ``wlc`` / ``wlr`` are the log-probs the (constant) WPO weights use,
    ``kc_fixed`` the chosen token KLs TDPO2 treats as constants."""
    if cfg.reference_free:
        rc, rr = np.zeros_like(lc), np.zeros_like(lr)
    if cfg.ld_alpha is None:
        Sw, Sl, Rw, Rl = np_seq(lc, mc), np_seq(lr, mr), np_seq(rc, mc), np_seq(rr, mr)
    else:
        Sw, Sl = np_ld(lc, lr, mc, mr, cfg.ld_alpha)
        Rw, Rl = np_ld(rc, rr, mc, mr, cfg.ld_alpha)
    nw, nl = mc.sum(1).astype(float), mr.sum(1).astype(float)
    Dw = None if kc is None else np_seq(kc, mc)
    Dl = None if kr is None else np_seq(kr, mr)
    Dw_sg = Dw if kc_fixed is None else np_seq(kc_fixed, mc)
    w = 1.0
    if cfg.use_weighting:
        w = np_wpo(lc if wlc is None else wlc, lsc, mc) * np_wpo(lr if wlr is None else wlr, lsr, mr)
    weights = cfg.loss_weights or (1.0,) * len(cfg.loss_types)
    terms = list(zip(cfg.loss_types, weights)) + ([("sft", cfg.rpo_alpha)] if cfg.rpo_alpha is not None else [])
    total = 0.0
    for lt, wt in terms:
        if lt == "sft":
            per = np.full(lc.shape[0], -np_seq(lc, mc).sum() / max(mc.sum(), 1))
        else:
            logit_mod = lt in ("sigmoid", "hinge", "exo_pair", "robust", "discopop")
            per = np_pair(lt, Sw, Sl, Rw, Rl, beta=cfg.beta, eps=cfg.label_smoothing, fd=cfg.f_divergence_type,
                          fa=cfg.f_alpha_divergence_coef, tau=cfg.discopop_tau, nw=nw, nl=nl,
                          smooth=cfg.sigmoid_label_smoothing, rdpo=cfg.rdpo_alpha if logit_mod else 0.0,
                          dpop=cfg.dpop_lambda if logit_mod else 0.0, off=off if logit_mod else None,
                          Dw=Dw_sg if lt == "tdpo2" else Dw, Dl=Dl,
                          ta=cfg.tdpo_alpha)
        total += wt * np.mean(per * w)
    return total


def fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


# ------------------------------------------------------------------------------------- inputs


def _data(seed, b=B, t=T):
    rng = np.random.default_rng(seed)
    lc, lr = rng.normal(-1.0, 0.5, (b, t)), rng.normal(-1.2, 0.5, (b, t))
    rc, rr = lc + rng.normal(0, 0.3, (b, t)), lr + rng.normal(0, 0.3, (b, t))
    lsc, lsr = rng.uniform(-2, -0.5, (b, t)), rng.uniform(-2, -0.5, (b, t))
    kc, kr = rng.uniform(0, 0.3, (b, t)), rng.uniform(0, 0.3, (b, t))
    len_c = rng.integers(1, t + 1, b)
    len_r = rng.integers(1, t + 1, b)
    len_c[0], len_r[0] = t, 2
    mc = np.arange(t)[None] < len_c[:, None]
    mr = np.arange(t)[None] < len_r[:, None]
    mr[-1, 0] = False  # a hole
    off = rng.uniform(0.0, 0.5, b)
    return dict(lc=lc, lr=lr, rc=rc, rr=rr, mc=mc, mr=mr, lsc=lsc, lsr=lsr, kc=kc, kr=kr, off=off)


def _trlax(cfg, d, with_offsets=False):
    def f(lc, lr, rc, rr, kc):
        return preference_loss(lc, lr, rc, rr, d["mc"], d["mr"], cfg, chosen_log_sum_sq_probs=d["lsc"],
                               rejected_log_sum_sq_probs=d["lsr"], chosen_token_kl=kc, rejected_token_kl=d["kr"],
                               offsets=d["off"] if with_offsets else None)

    (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1, 4), has_aux=True)(
        d["lc"], d["lr"], d["rc"], d["rr"], d["kc"])
    return float(loss), [np.asarray(g) for g in grads], finalize_metrics(metrics)


def _check_recipe(cfg, seed, with_offsets=False, rtol=1e-6):
    d = _data(seed)
    loss, (gc, gr, gk), metrics = _trlax(cfg, d, with_offsets)
    off = d["off"] if with_offsets else None
    kw = dict(lsc=d["lsc"], lsr=d["lsr"], kc=d["kc"], kr=d["kr"], off=off)
    ref = np_preference_loss(cfg, d["lc"], d["lr"], d["rc"], d["rr"], d["mc"], d["mr"], **kw)
    np.testing.assert_allclose(loss, ref, rtol=rtol, atol=1e-12, err_msg=str(cfg))
    f_c = lambda x: np_preference_loss(cfg, x, d["lr"], d["rc"], d["rr"], d["mc"], d["mr"], wlc=d["lc"],  # noqa: E731
                                       wlr=d["lr"], **kw)
    f_r = lambda x: np_preference_loss(cfg, d["lc"], x, d["rc"], d["rr"], d["mc"], d["mr"], wlc=d["lc"],  # noqa: E731
                                       wlr=d["lr"], **kw)
    np.testing.assert_allclose(gc, fd_grad(f_c, d["lc"]), rtol=1e-5, atol=1e-8, err_msg=str(cfg))
    np.testing.assert_allclose(gr, fd_grad(f_r, d["lr"]), rtol=1e-5, atol=1e-8, err_msg=str(cfg))
    assert np.all(gc[~d["mc"]] == 0) and np.all(gr[~d["mr"]] == 0)
    if any(t.startswith("tdpo") for t in cfg.loss_types):
        f_k = lambda x: np_preference_loss(cfg, d["lc"], d["lr"], d["rc"], d["rr"], d["mc"], d["mr"],  # noqa: E731
                                           kc_fixed=d["kc"], **{**kw, "kc": x})  # TDPO2: sg(D_w)
        np.testing.assert_allclose(gk, fd_grad(f_k, d["kc"]), rtol=1e-5, atol=1e-8, err_msg=str(cfg))
    # metrics: implicit rewards β·ρ and sequence log-probs
    rf = cfg.reference_free
    if cfg.ld_alpha is None:
        Sw, Sl = np_seq(d["lc"], d["mc"]), np_seq(d["lr"], d["mr"])
        Rw, Rl = (0, 0) if rf else (np_seq(d["rc"], d["mc"]), np_seq(d["rr"], d["mr"]))
    else:
        Sw, Sl = np_ld(d["lc"], d["lr"], d["mc"], d["mr"], cfg.ld_alpha)
        Rw, Rl = (0, 0) if rf else np_ld(d["rc"], d["rr"], d["mc"], d["mr"], cfg.ld_alpha)
    rw, rl = cfg.beta * (Sw - Rw), cfg.beta * (Sl - Rl)
    for k, v in {"rewards/chosen": rw.mean(), "rewards/rejected": rl.mean(), "rewards/margins": (rw - rl).mean(),
                 "rewards/accuracies": (rw > rl).mean(), "logps/chosen": Sw.mean(), "logps/rejected": Sl.mean()}.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------ reference tests

NON_SFT = [t for t in PREFERENCE_LOSS_TYPES if t != "sft"]


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_every_loss_type_matches_numpy(loss_type):
    """Value, gradient (finite differences of the reference) and metrics for every loss type, with
    LD-DPO, WPO, label smoothing and, where allowed, each f-divergence."""
    fds = [("reverse_kl", 0.5)]
    if loss_type in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"):
        fds += [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]
    n = 0
    for (fd, fa), ld, wpo in itertools.product(fds, [None, 0.4], [False, True]):
        if wpo and loss_type.startswith("aot"):
            continue
        cfg = PreferenceLossConfig(loss_type=loss_type, beta=0.4, label_smoothing=0.15, f_divergence_type=fd,
                                   f_alpha_divergence_coef=fa, ld_alpha=ld, use_weighting=wpo, discopop_tau=0.3)
        _check_recipe(cfg, seed=n)
        n += 1


def test_beyond_trl_options_match_numpy():
    """cDPO smoothing, reference-free, RPO, R-DPO, DPOP, ODPO offsets and combinations."""
    cases = [
        (PreferenceLossConfig.cdpo(label_smoothing=0.2), False),
        (PreferenceLossConfig(loss_type=("sigmoid", "ipo"), reference_free=True, beta=0.05), False),
        (PreferenceLossConfig(loss_type="hinge", rpo_alpha=0.5, use_weighting=True, ld_alpha=0.5), False),
        (PreferenceLossConfig(loss_type="sigmoid", rdpo_alpha=0.05), False),
        (PreferenceLossConfig(loss_type=("robust", "discopop"), rdpo_alpha=-0.02, label_smoothing=0.1), False),
        (PreferenceLossConfig(loss_type="sigmoid", dpop_lambda=5.0, beta=0.3), False),
        (PreferenceLossConfig(loss_type=("sigmoid", "bco_pair"), dpop_lambda=2.0), True),
        (PreferenceLossConfig(loss_type="sigmoid", rdpo_alpha=0.01, dpop_lambda=1.0, sigmoid_label_smoothing=True,
                              label_smoothing=0.1), True),
        (PreferenceLossConfig(loss_type=("cal_dpo", "tdpo1", "tdpo2"), beta=0.5, tdpo_alpha=0.7), False),
        (PreferenceLossConfig.mpo(use_weighting=True, ld_alpha=0.2), False),
    ]
    for i, (cfg, offs) in enumerate(cases):
        _check_recipe(cfg, seed=50 + i, with_offsets=offs)
    # TDPO2 alone: no gradient through the chosen KL at all
    _, (_, _, gk), _ = _trlax(PreferenceLossConfig.tdpo(), _data(1))
    assert np.all(gk == 0)


def test_presets_are_valid_and_match_numpy():
    for i, name in enumerate(PreferenceLossConfig.PRESETS):
        cfg = PreferenceLossConfig.preset(name)
        assert cfg == PreferenceLossConfig.preset(name) and hash(cfg) == hash(PreferenceLossConfig.preset(name))
        _check_recipe(cfg, seed=200 + i, rtol=1e-6)
    assert PreferenceLossConfig.mpo().weighted_losses == (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
    assert PreferenceLossConfig.rpo().weighted_losses == (("sigmoid", 1.0), ("sft", 0.005))
    assert PreferenceLossConfig(loss_type="aot_pair").loss_type == "aot_unpaired"
    assert PreferenceLossConfig(loss_type=["sigmoid", "sft"]).loss_type == ("sigmoid", "sft")
    # command-line forms (the train CLI passes comma-separated strings)
    cli = PreferenceLossConfig(loss_type="sigmoid, bco_pair,sft", loss_weights="0.8,0.2, 1")
    assert cli == PreferenceLossConfig.mpo()
    assert PreferenceLossConfig(loss_type="ipo", loss_weights=2).loss_weights == (2.0,)
    with pytest.raises(ValueError, match="loss_weights=.*must be numbers"):
        PreferenceLossConfig(loss_type=("sigmoid", "sft"), loss_weights="1,x")


def test_scores_and_primitives_match_numpy():
    d = _data(3)
    np.testing.assert_allclose(sequence_logps(d["lc"], d["mc"]), np_seq(d["lc"], d["mc"]), rtol=1e-12)
    for a in (0.0, 0.3, 1.0):
        got = ld_dpo_logps(d["lc"], d["lr"], d["mc"], d["mr"], a)
        want = np_ld(d["lc"], d["lr"], d["mc"], d["mr"], a)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
    x = np.linspace(-8, 8, 33)
    for kind, a in [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                    ("alpha_divergence", 0.2), ("alpha_divergence", 1.7), ("alpha_divergence", 1.0)]:
        np.testing.assert_allclose(f_divergence_scores(x, kind, a), np_fdiv(x, kind, a), rtol=1e-12, atol=1e-14)
        g = jax.vmap(jax.grad(lambda v: f_divergence_scores(v, kind, a)))(x)
        fd = (np_fdiv(x + 1e-6, kind, a) - np_fdiv(x - 1e-6, kind, a)) / 2e-6  # elementwise
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # the alpha-divergence overflow guard: (α−1)ρ clamped at 80, zero gradient beyond
    big = np.array([-400.0, 400.0])
    s = f_divergence_scores(big, "alpha_divergence", 0.5)
    np.testing.assert_allclose(s, [(math.exp(80.0) - 1) / -0.5, (math.exp(-200.0) - 1) / -0.5], rtol=1e-12)
    assert np.all(np.isfinite(jax.vmap(jax.grad(lambda v: f_divergence_scores(v, "alpha_divergence", 0.5)))(big)))
    np.testing.assert_allclose(length_normalized_scores(np.array([3.0, 4, 5, 6]), d["mc"]),
                               np.array([3.0, 4, 5, 6]) / np.maximum(d["mc"].sum(1), 1), rtol=1e-12)
    w = wpo_weights(d["lc"], d["lsc"], d["mc"])
    np.testing.assert_allclose(w, np_wpo(d["lc"], d["lsc"], d["mc"]), rtol=1e-12)
    assert np.all(np.asarray(jax.grad(lambda v: wpo_weights(v, d["lsc"], d["mc"]).sum())(d["lc"])) == 0)
    np.testing.assert_allclose(preference_sft_loss(d["lc"], d["mc"]), -d["lc"][d["mc"]].mean(), rtol=1e-12)
    np.testing.assert_allclose(preference_sft_loss(d["lc"], d["mc"], num_tokens=100), -d["lc"][d["mc"]].sum() / 100)
    np.testing.assert_allclose(odpo_offset(np.array([3.0, 1.0]), np.array([1.0, 1.0]), 0.5),
                               [0.5 * math.log(2.0), 0.5 * math.log(1e-8)], rtol=1e-12)
    # TDPO per-position KL(π_ref ‖ π_θ) over the vocabulary
    rng = np.random.default_rng(0)
    z, zr = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    p_ref = np.exp(zr) / np.exp(zr).sum(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(tdpo_token_kl(z, zr), (p_ref * (np.log(p_ref) - np.log(p))).sum(-1), rtol=1e-10)
    g = jax.grad(lambda v: tdpo_token_kl(v, zr).sum())(z)
    np.testing.assert_allclose(g, fd_grad(lambda v: (p_ref * (np.log(p_ref) - (v - np.log(np.exp(v).sum(
        -1, keepdims=True))))).sum(), z), rtol=1e-6, atol=1e-9)


def test_sequence_level_functions_match_numpy():
    rng = np.random.default_rng(1)
    Sw, Sl, Rw, Rl = (rng.normal(-8, 2, 6) for _ in range(4))
    Dw, Dl = rng.uniform(0, 1, 6), rng.uniform(0, 1, 6)
    np.testing.assert_allclose(cal_dpo_loss(Sw - Rw, Sl - Rl, 0.2), np_pair("cal_dpo", Sw, Sl, Rw, Rl, beta=0.2),
                               rtol=1e-12)
    for v in ("tdpo1", "tdpo2"):
        np.testing.assert_allclose(tdpo_loss(Sw - Rw, Sl - Rl, Dw, Dl, 0.3, 0.6, v),
                                   np_pair(v, Sw, Sl, Rw, Rl, beta=0.3, Dw=Dw, Dl=Dl, ta=0.6), rtol=1e-12)
    for lt in NON_SFT:
        kw = dict(beta=0.25, label_smoothing=0.1, discopop_tau=0.2)
        got = dpo_loss(Sw, Sl, Rw, Rl, lt, **kw, chosen_kl=Dw, rejected_kl=Dl)
        want = np_pair(lt, Sw, Sl, Rw, Rl, beta=0.25, eps=0.1, tau=0.2, Dw=Dw, Dl=Dl)
        np.testing.assert_allclose(got, want, rtol=1e-10, err_msg=lt)
        if not lt.startswith("aot"):
            g = jax.grad(lambda s: dpo_loss(s, Sl, Rw, Rl, lt, **kw, chosen_kl=Dw, rejected_kl=Dl).sum())(Sw)
            np.testing.assert_allclose(g, fd_grad(lambda s: np_pair(lt, s, Sl, Rw, Rl, beta=0.25, eps=0.1, tau=0.2,
                                                                    Dw=Dw, Dl=Dl).sum(), Sw), rtol=1e-5, atol=1e-9)
        # reference-free: None reference == zero reference
        np.testing.assert_allclose(dpo_loss(Sw, Sl, None, None, lt, **kw, chosen_kl=Dw, rejected_kl=Dl),
                                   np_pair(lt, Sw, Sl, 0 * Sw, 0 * Sl, beta=0.25, eps=0.1, tau=0.2, Dw=Dw, Dl=Dl),
                                   rtol=1e-10, err_msg=lt)


def test_beta_dpo_matches_numpy_on_kept_pairs():
    rng = np.random.default_rng(2)
    w, l_ = rng.normal(0, 2, 10), rng.normal(0, 2, 10)
    state = BetaDPOState.init(0.1, 0.5)
    # rho=1 keeps every pair: deterministic
    loss, new, m = beta_dpo_loss(w, l_, state, jax.random.PRNGKey(0), beta=0.1, alpha=0.6, rho=1.0, gamma=0.9)
    gaps = 0.1 * (w - l_)
    mean = 0.9 * 0.1 + 0.1 * gaps.mean()
    std = 0.9 * 0.5 + 0.1 * gaps.std()
    beta_b = max(0.1 * (1 + 0.6 * (gaps.mean() - mean)), 1e-3)
    np.testing.assert_allclose(float(loss), np.mean(-np_logsig(beta_b * (w - l_))), rtol=1e-6)
    np.testing.assert_allclose([float(new.mean), float(new.std)], [mean, std], rtol=1e-6)
    np.testing.assert_allclose(float(m["beta"]), beta_b, rtol=1e-6)
    # rho<1: k pairs kept; loss is the reference on the kept set; beta floored; gradient only on kept pairs
    loss, new, m = beta_dpo_loss(w, l_, state, jax.random.PRNGKey(3), beta=0.1, alpha=50.0, rho=0.6)
    kept = np.asarray(m["kept"])
    assert kept.sum() == 6
    sel = gaps[kept].mean()
    beta_b = max(0.1 * (1 + 50.0 * (sel - mean)), 1e-3)
    np.testing.assert_allclose(float(m["beta"]), beta_b, rtol=1e-6)
    np.testing.assert_allclose(float(loss), np.mean(-np_logsig(beta_b * (w - l_)[kept])), rtol=1e-6)
    g = jax.grad(lambda v: beta_dpo_loss(v, l_, state, jax.random.PRNGKey(3), beta=0.1, alpha=50.0, rho=0.6)[0])(w)
    assert np.all(np.asarray(g)[~kept] == 0) and np.all(np.asarray(g)[kept] != 0)
    # filtering favours typical gaps: the outlier is (almost) never kept
    w2 = np.concatenate([np.zeros(9), [200.0]])
    keeps = [np.asarray(beta_dpo_loss(w2, np.zeros(10), BetaDPOState.init(), jax.random.PRNGKey(s), rho=0.5)[2]["kept"])
             for s in range(20)]
    assert sum(k[-1] for k in keeps) == 0


# ------------------------------------------------------------------------ hypothesis properties

_CFGS = {
    "sigmoid": PreferenceLossConfig(loss_type="sigmoid", beta=0.1),
    "mix": PreferenceLossConfig(loss_type=("hinge", "ipo", "robust", "exo_pair", "discopop", "nca_pair", "bco_pair",
                                           "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm", "cal_dpo", "sft"),
                                label_smoothing=0.1, ld_alpha=0.5),
    "aot": PreferenceLossConfig(loss_type=("aot", "aot_unpaired")),
}
_jit = {k: jax.jit(jax.value_and_grad(
    lambda lc, lr, rc, rr, mc, mr, c=c: preference_loss(lc, lr, rc, rr, mc, mr, c), argnums=(0, 1), has_aux=True))
    for k, c in _CFGS.items()}

_vals = hnp.arrays(np.float64, (B, T), elements=st.floats(-20, 0, allow_nan=False))
_masks = hnp.arrays(np.bool_, (B, T))


@given(_vals, _vals, _vals, _vals, _masks, _masks)
def test_swap_negates_margin_and_sigmoid_identity(lc, lr, rc, rr, mc, mr):
    """Swapping chosen and rejected negates the margin; −log σ(x) − (−log σ(−x)) = −x per pair."""
    f = _jit["sigmoid"]
    (l1, m1), _ = f(lc, lr, rc, rr, mc, mr)
    (l2, m2), _ = f(lr, lc, rr, rc, mr, mc)
    m1, m2 = finalize_metrics(m1), finalize_metrics(m2)
    np.testing.assert_allclose(float(m2["rewards/margins"]), -float(m1["rewards/margins"]), rtol=1e-5, atol=1e-5)
    margin = 0.1 * ((np_seq(lc, mc) - np_seq(rc, mc)) - (np_seq(lr, mr) - np_seq(rr, mr)))
    np.testing.assert_allclose(float(l1) - float(l2), -margin.mean(), rtol=1e-9, atol=1e-9)


@given(_vals, _vals, _masks, _masks)
def test_zero_margin_sigmoid_is_log2(lc, lr, mc, mr):
    (loss, _), (gc, gr) = _jit["sigmoid"](lc, lr, lc, lr, mc, mr)  # policy == reference: Δ = 0
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gc), np.where(mc, -0.5 * 0.1 / B, 0.0), rtol=1e-12, atol=1e-15)


@settings(max_examples=15)
@given(st.sampled_from(sorted(_CFGS)), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), _masks, _masks)
def test_finite_for_huge_scores(name, a, b, mc, mr):
    """Per-token log-probs of size 1e4 (sequence scores up to 6e4): finite loss and gradients."""
    lc, lr = np.full((B, T), a), np.full((B, T), b)
    (loss, _), (gc, gr) = _jit[name](lc, lr, -lc, -lr, mc, mr)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))


@pytest.mark.parametrize("fd", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_finite_for_huge_scores_every_loss_and_fdiv(fd):
    s = np.array([-1e4, 1e4, 0.0, -3e4])
    for lt in NON_SFT:
        if fd != "reverse_kl" and lt not in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                             "discopop"):
            continue
        f = lambda x: dpo_loss(x, s[::-1], 0 * s, 0 * s, lt, f_divergence_type=fd, label_smoothing=0.1,  # noqa: E731
                               chosen_kl=0 * s, rejected_kl=0 * s, chosen_lengths=s * 0 + 3,
                               rejected_lengths=s * 0 + 5).sum()
        v, g = jax.value_and_grad(f)(s)
        assert np.isfinite(float(v)) and np.all(np.isfinite(g)), (lt, fd)


@given(_vals, _vals, _vals, _vals, _masks, _masks)
def test_padding_columns_change_nothing(lc, lr, rc, rr, mc, mr):
    """Extra masked columns (holding NaN) change neither loss nor gradient (uses the mix config)."""
    (l1, _), (g1, _) = _jit["mix"](lc, lr, rc, rr, mc, mr)
    pad = lambda x, v: np.concatenate([x, np.full((B, 2), v, x.dtype)], 1)  # noqa: E731
    l2, g2 = jax.value_and_grad(lambda a: preference_loss(a, pad(lr, np.nan), pad(rc, np.nan), pad(rr, np.nan),
                                                          pad(mc, False), pad(mr, False), _CFGS["mix"])[0])(
        pad(lc, np.nan))
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g2)[:, :T], np.asarray(g1), rtol=1e-10, atol=1e-14)
    assert np.all(np.asarray(g2)[:, T:] == 0)


@given(_vals, _vals, _vals, _vals, _masks, _masks, st.permutations(list(range(B))))
def test_batch_permutation_invariance(lc, lr, rc, rr, mc, mr, perm):
    """The loss is a pair mean (AOT sorts the batch): permuting pairs permutes gradients only."""
    p = np.asarray(perm)
    for name in ("mix", "aot"):
        (l1, _), (g1, _) = _jit[name](lc, lr, rc, rr, mc, mr)
        (l2, _), (g2, _) = _jit[name](lc[p], lr[p], rc[p], rr[p], mc[p], mr[p])
        np.testing.assert_allclose(float(l2), float(l1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g1)[p], rtol=1e-8, atol=1e-12)


@given(hnp.arrays(np.float64, (6,), elements=st.floats(-30, 30)))
def test_fdiv_scores_vanish_at_zero_and_increase(x):
    xs = np.sort(x)
    for kind, a in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                    ("alpha_divergence", 2.0)]:
        s = np.asarray(f_divergence_scores(xs, kind, a))
        assert float(f_divergence_scores(np.zeros(1), kind, a)[0]) == 0.0
        assert np.all(np.diff(s) >= -1e-12), kind
    near = f_divergence_scores(x, "alpha_divergence", 1.0 + 1e-8)
    np.testing.assert_allclose(near, x, rtol=1e-12)


@given(hnp.arrays(np.float64, (4,), elements=st.floats(-50, 50)), hnp.arrays(np.float64, (4,), elements=st.floats(
    -50, 50)))
def test_sequence_level_properties(w, l_):
    z = np.zeros(4)
    # IPO is zero exactly at Δ = 1/(2β); sppo_hard at ρ_w = 1/(2β) = −ρ_l
    np.testing.assert_allclose(dpo_loss(z + 2.5, z, None, None, "ipo", beta=0.2), 0.0, atol=1e-24)
    np.testing.assert_allclose(dpo_loss(z + 2.5, z - 2.5, None, None, "sppo_hard", beta=0.2), 0.0, atol=1e-24)
    # TDPO with zero KL is DPO; tdpo1 with α-free equals tdpo2 at α=1 in value
    np.testing.assert_allclose(tdpo_loss(w, l_, z, z, 0.1, 0.5, "tdpo1"), dpo_loss(w, l_, None, None, beta=0.1),
                               rtol=1e-12)
    np.testing.assert_allclose(tdpo_loss(w, l_, z + 1, z + 3, 0.1, 1.0, "tdpo2"),
                               tdpo_loss(w, l_, z + 1, z + 3, 0.1, 1.0, "tdpo1"), rtol=1e-12)
    # losses are non-negative where the paper says so
    for lt in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
               "sigmoid_norm", "cal_dpo"):
        assert np.all(np.asarray(dpo_loss(w, l_, None, None, lt, beta=0.1)) >= 0), lt
    # cDPO at ε=0 is DPO; robust at ε=0 is DPO; ODPO offset 0 is DPO; R-DPO with equal lengths is DPO
    dpo = dpo_loss(w, l_, None, None, beta=0.1)
    np.testing.assert_allclose(dpo_loss(w, l_, None, None, "robust", beta=0.1), dpo, rtol=1e-12)
    np.testing.assert_allclose(dpo_loss(w, l_, None, None, beta=0.1, offsets=z), dpo, rtol=1e-12)
    np.testing.assert_allclose(dpo_loss(w, l_, None, None, beta=0.1, rdpo_alpha=3.0, chosen_lengths=z + 4,
                                        rejected_lengths=z + 4), dpo, rtol=1e-12)
    # DPOP penalty is inactive when the policy is above the reference on the chosen completion
    np.testing.assert_allclose(dpo_loss(np.abs(w), l_, z, z, beta=0.1, dpop_lambda=50.0),
                               dpo_loss(np.abs(w), l_, z, z, beta=0.1), rtol=1e-12)


@settings(max_examples=10)
@given(hnp.arrays(np.float64, (2, 3, 5), elements=st.floats(-30, 30)),
       hnp.arrays(np.float64, (2, 3, 5), elements=st.floats(-30, 30)))
def test_tdpo_token_kl_nonnegative_zero_iff_equal(z, zr):
    kl = np.asarray(tdpo_token_kl(z, zr))
    assert np.all(kl >= -1e-12) and np.all(np.isfinite(kl))
    np.testing.assert_allclose(tdpo_token_kl(z, z), 0.0, atol=1e-12)
    np.testing.assert_allclose(tdpo_token_kl(z + 7.0, z), 0.0, atol=1e-12)  # logits shift-invariant


@settings(max_examples=10)
@given(_vals, _vals, _masks)
def test_ld_alpha_one_is_plain_and_equal_lengths_unaffected(lc, lr, m):
    a = ld_dpo_logps(lc, lr, m, m, 0.3)  # equal lengths: nothing is tail
    np.testing.assert_allclose(np.asarray(a), np.stack([np_seq(lc, m), np_seq(lr, m)]), rtol=1e-12, atol=1e-12)
    full = np.ones((B, T), bool)
    b = ld_dpo_logps(lc, lr, full, m, 1.0)
    np.testing.assert_allclose(np.asarray(b), np.stack([np_seq(lc, full), np_seq(lr, m)]), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ edge cases, dtypes, jit


def test_empty_masks_and_bf16_are_finite():
    d = _data(9)
    z = np.zeros((B, T), bool)
    cfg = PreferenceLossConfig(loss_type=("sigmoid", "ipo", "sft"), use_weighting=True, ld_alpha=0.5)
    (loss, _), g = jax.value_and_grad(lambda a: preference_loss(
        a, d["lr"], d["rc"], d["rr"], z, z, cfg, chosen_log_sum_sq_probs=d["lsc"],
        rejected_log_sum_sq_probs=d["lsr"]), has_aux=True)(d["lc"])
    # empty rows: S = 0, Δ = 0 -> sigmoid log 2, ipo (1/(2β))², sft 0; weights exp(0) = 1
    np.testing.assert_allclose(float(loss), math.log(2) + (1 / 0.2) ** 2, rtol=1e-12)
    assert np.all(np.asarray(g) == 0)
    bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in d.items() if k in ("lc", "lr", "rc", "rr")}
    loss, metrics = preference_loss(bf["lc"], bf["lr"], bf["rc"], bf["rr"], d["mc"], d["mr"], PreferenceLossConfig.ipo())
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    want = np_preference_loss(PreferenceLossConfig.ipo(), *(np.asarray(bf[k], np.float64) for k in
                                                             ("lc", "lr", "rc", "rr")), d["mc"], d["mr"])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_micro_batches_sum_to_full_batch():
    d = _data(11, b=6)
    for cfg in (PreferenceLossConfig.mpo(), PreferenceLossConfig(loss_type=("ipo", "aot_unpaired"), rpo_alpha=0.3)):
        full, _ = preference_loss(d["lc"], d["lr"], d["rc"], d["rr"], d["mc"], d["mr"], cfg)
        parts = 0.0
        for sl in (slice(0, 2), slice(2, 6)):
            parts += float(preference_loss(d["lc"][sl], d["lr"][sl], d["rc"][sl], d["rr"][sl], d["mc"][sl],
                                           d["mr"][sl], cfg, num_pairs=6, num_chosen_tokens=d["mc"].sum())[0])
        if "aot_unpaired" in cfg.loss_types:  # AOT sorts within the micro-batch: only the rest decomposes
            assert abs(parts - float(full)) < 1.0
            continue
        np.testing.assert_allclose(parts, float(full), rtol=1e-12)


def test_jit_matches_eager():
    d = _data(12)
    cfg = PreferenceLossConfig(loss_type=("sigmoid", "aot"), ld_alpha=0.5, label_smoothing=0.1)
    f = lambda *a: preference_loss(*a, cfg)[0]  # noqa: E731
    args = (d["lc"], d["lr"], d["rc"], d["rr"], d["mc"], d["mr"])
    np.testing.assert_allclose(float(jax.jit(f)(*args)), float(f(*args)), rtol=1e-12)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="kto"), r"loss_type='kto'.*allowed values: 'sigmoid'"),
    (dict(loss_type=()), r"loss_type=.*allowed values"),
    (dict(loss_type=("sigmoid", "nope")), r"loss_type='nope'"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), r"loss_weights=.*one weight per loss type"),
    (dict(beta=0.0), r"beta=0.0 is out of range"),
    (dict(beta=float("nan")), r"beta=nan must be finite"),
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing=0.5 is out of range; allowed: \[0.0, 0.5\)"),
    (dict(loss_type="exo_pair", label_smoothing=0.0), r"label_smoothing=0.0 is not allowed with loss_type 'exo_pair'"),
    (dict(label_smoothing=1.0), r"label_smoothing=1.0 is out of range"),
    (dict(f_divergence_type="kl"), r"f_divergence_type='kl'.*allowed values: 'reverse_kl'"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), r"f_divergence_type='js_divergence' is not "
                                                                      r"allowed with loss_type \['bco_pair'\]"),
    (dict(ld_alpha=1.5), r"ld_alpha=1.5 is out of range; allowed: \[0.0, 1.0\]"),
    (dict(loss_type="aot", use_weighting=True), r"use_weighting=True is not allowed with loss_type \['aot'\]"),
    (dict(discopop_tau=0.0), r"discopop_tau=0.0 is out of range"),
    (dict(rpo_alpha=-1.0), r"rpo_alpha=-1.0 is out of range"),
    (dict(dpop_lambda=-1.0), r"dpop_lambda=-1.0 is out of range"),
    (dict(loss_type="ipo", rdpo_alpha=0.1), r"rdpo_alpha / dpop_lambda modify the logit"),
    (dict(use_weighting=1), r"use_weighting=1 must be a bool"),
])
def test_bad_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PreferenceLossConfig(**kw)


def test_bad_inputs_name_the_argument():
    d = _data(0)
    cfg = PreferenceLossConfig()
    args = [d["lc"], d["lr"], d["rc"], d["rr"], d["mc"], d["mr"]]
    with pytest.raises(ValueError, match="`chosen_mask` must have the same shape as `chosen_logps`"):
        preference_loss(d["lc"], d["lr"], d["rc"], d["rr"], d["mc"][:, :3], d["mr"], cfg)
    with pytest.raises(ValueError, match="`rejected_logps` must have batch size 4"):
        preference_loss(d["lc"], d["lr"][:2], d["rc"], d["rr"][:2], d["mc"], d["mr"][:2], cfg)
    with pytest.raises(ValueError, match="`ref_rejected_logps` must have the same shape"):
        preference_loss(d["lc"], d["lr"], d["rc"], d["rr"][:, :2], d["mc"], d["mr"], cfg)
    with pytest.raises(ValueError, match="`chosen_logps` must have rank 2"):
        preference_loss(d["lc"][0], *args[1:], cfg)
    with pytest.raises(TypeError, match="`chosen_logps` must be a floating array"):
        preference_loss(np.ones((B, T), np.int32), *args[1:], cfg)
    with pytest.raises(ValueError, match="`ref_chosen_logps` and `ref_rejected_logps` are required"):
        preference_loss(d["lc"], d["lr"], None, None, d["mc"], d["mr"], cfg)
    with pytest.raises(ValueError, match="`chosen_log_sum_sq_probs` and `rejected_log_sum_sq_probs` are required"):
        preference_loss(*args, PreferenceLossConfig.wpo())
    with pytest.raises(ValueError, match="`chosen_token_kl` and `rejected_token_kl` are required"):
        preference_loss(*args, PreferenceLossConfig.tdpo())
    with pytest.raises(ValueError, match=r"`offsets` must have shape \(4,\)"):
        preference_loss(*args, cfg, offsets=np.zeros(3))
    with pytest.raises(ValueError, match="`offsets` .*ODPO"):
        preference_loss(*args, PreferenceLossConfig.ipo(), offsets=np.zeros(4))
    with pytest.raises(TypeError, match="`config` must be a PreferenceLossConfig"):
        preference_loss(*args, {"loss_type": "sigmoid"})
    with pytest.raises(ValueError, match="loss_type='sft'"):
        dpo_loss(np.zeros(3), np.zeros(3), None, None, "sft")
    with pytest.raises(ValueError, match="`rejected_logps` must have the same shape as `chosen_logps`"):
        dpo_loss(np.zeros(3), np.zeros(2), None, None)
    with pytest.raises(ValueError, match="f_divergence_type='x'"):
        f_divergence_scores(np.zeros(2), "x")
    with pytest.raises(ValueError, match="variant='tdpo3'"):
        tdpo_loss(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), variant="tdpo3")
    with pytest.raises(ValueError, match="ld_alpha=2.0 is out of range"):
        ld_dpo_logps(d["lc"], d["lr"], d["mc"], d["mr"], 2.0)
    with pytest.raises(ValueError, match="rho=0.0 is out of range"):
        beta_dpo_loss(np.zeros(2), np.zeros(2), BetaDPOState.init(), jax.random.PRNGKey(0), rho=0.0)
    with pytest.raises(ValueError, match="`chosen_lengths` and `rejected_lengths` are required"):
        dpo_loss(np.zeros(3), np.zeros(3), None, None, rdpo_alpha=0.1)
