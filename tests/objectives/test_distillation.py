"""Tests for objectives/distillation.py.

float64 NumPy references from the papers (value, and gradient by central differences of the
reference where the objective has no stop-gradient, analytic otherwise), parity with TRL 1.16
(``GKDTrainer.generalized_jsd_loss``, ``IWOPDTrainer._compute_iw_opd_loss`` on a stand-in ``self``,
``experimental.sdpo.loss_utils`` top-k / full-logit / sampled-token divergences and IS clip; value
and gradient w.r.t. the student logits, rtol 1e-6), hypothesis properties, bad-input errors.
"""

from __future__ import annotations

import os
import sys
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import trlax.objectives as O
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trl_oracles import fd_grad, log_softmax, stub, token_logps  # noqa: E402

B, T, V = 2, 4, 6
RTOL = 1e-6


def _close(a, b, rtol=RTOL, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _logits(seed, b=B, t=T, v=V):
    r = np.random.default_rng(seed)
    s, te = r.normal(0, 1.5, (b, t, v)), r.normal(0, 1.5, (b, t, v))
    m = r.random((b, t)) > 0.25
    m[:, 0] = True
    return r, s, te, m


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_gjsd(s, t, beta, tau=1.0):
    """Generalised JSD from GKD eq. 1 (probability space)."""
    ps, pt = np.exp(log_softmax(s / tau)), np.exp(log_softmax(t / tau))
    if beta == 0:
        return np_kl(pt, ps)
    if beta == 1:
        return np_kl(ps, pt)
    mix = (1 - beta) * ps + beta * pt
    return beta * np_kl(pt, mix) + (1 - beta) * np_kl(ps, mix)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gkd_reference(beta, level):
    _, s, t, m = _logits(0)
    tau = 1.7

    def np_loss(x):
        j = np.where(m, np_gjsd(x, t, beta, tau), 0).sum()
        return j / (m.sum() if level == "token" else B)

    val, g = jax.value_and_grad(lambda x: O.gkd_loss(x, t, m, beta=beta, temperature=tau, level=level)[0])(
        jnp.asarray(s))
    _close(val, np_loss(s))
    _close(g, fd_grad(np_loss, s), rtol=1e-5, atol=1e-8)
    # teacher is a constant
    gt = jax.grad(lambda x: O.gkd_loss(s, x, m, beta=beta)[0])(jnp.asarray(t))
    assert np.all(np.asarray(gt) == 0.0)


def test_forward_reverse_kl():
    _, s, t, _ = _logits(1)
    _close(O.forward_kl(s, t), np_gjsd(s, t, 0.0))
    _close(O.reverse_kl(s, t, temperature=0.5), np_gjsd(s, t, 1.0, 0.5))


@pytest.mark.trl
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("num_items", [None, 11])
def test_gkd_trl_parity(beta, temperature, num_items):
    torch = pytest.importorskip("torch")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    _, s, t, m = _logits(2)
    st_ = torch.tensor(s, requires_grad=True)
    labels = torch.tensor(np.where(m, 1, -100))
    loss_t = GKDTrainer.generalized_jsd_loss(st_, torch.tensor(t), labels=labels, beta=beta, temperature=temperature,
                                             num_items_in_batch=None if num_items is None else torch.tensor(num_items))
    loss_t.backward()
    val, g = jax.value_and_grad(lambda x: O.gkd_loss(x, t, m, beta=beta, temperature=temperature,
                                                     num_items=num_items)[0])(jnp.asarray(s))
    _close(val, loss_t.item())
    _close(g, st_.grad.numpy())


def test_gkd_empty_mask_and_micro_batches():
    _, s, t, m = _logits(3, b=4)
    z = np.zeros_like(m)
    val, g = jax.value_and_grad(lambda x: O.gkd_loss(x, t, z)[0])(jnp.asarray(s))
    assert float(val) == 0.0 and np.all(np.asarray(g) == 0)
    full = O.gkd_loss(s, t, m)[0]
    n = int(m.sum())
    _close(O.gkd_loss(s[:2], t[:2], m[:2], num_items=n)[0] + O.gkd_loss(s[2:], t[2:], m[2:], num_items=n)[0], full)
    fs = O.gkd_loss(s, t, m, level="sequence")[0]
    _close(O.gkd_loss(s[:2], t[:2], m[:2], level="sequence", num_sequences=4)[0]
           + O.gkd_loss(s[2:], t[2:], m[2:], level="sequence", num_sequences=4)[0], fs)


# ------------------------------------------------------------------------------- on-policy distillation


def test_on_policy_distillation_reference():
    r = np.random.default_rng(4)
    lp, tl = -r.uniform(0.1, 3, (B, T)), -r.uniform(0.1, 3, (B, T))
    beh = lp + r.normal(0, 0.1, lp.shape)
    m = r.random((B, T)) > 0.3
    m[:, 0] = True
    adv = np.where(m, -0.5 * (beh - tl), 0)
    _close(O.on_policy_distillation_advantages(beh, tl, m, kl_coef=0.5), adv)
    val, g = jax.value_and_grad(lambda x: O.on_policy_distillation_loss(x, tl, m, sampler_logps=beh, kl_coef=0.5)[0])(
        jnp.asarray(lp))
    ratio = np.exp(lp - beh)
    _close(val, -np.where(m, ratio * adv, 0).sum() / m.sum())
    _close(g, np.where(m, -ratio * adv, 0) / m.sum())
    # on-policy: gradient is −A_t / N with A from the student's own log-probs (reverse-KL policy gradient)
    g = jax.grad(lambda x: O.on_policy_distillation_loss(x, tl, m)[0])(jnp.asarray(lp))
    _close(g, np.where(m, (lp - tl), 0) / m.sum())


def np_iw_opd(lp, tl, roll, m, gamma, eps, n):
    a = np.where(m, tl - roll, 0)
    w = np.zeros_like(a)
    for b in range(a.shape[0]):
        tot = max(np.abs(a[b]).sum(), eps)
        for t in range(a.shape[1]):
            w[b, t] = 1 + gamma * (1 - np.abs(a[b, :t]).sum() / tot)  # eq. 7: prefix excludes t
    return -np.where(m, lp * w * a, 0).sum() / n, w


def test_iw_opd_reference():
    r = np.random.default_rng(5)
    lp, tl, roll = (-r.uniform(0.1, 3, (B, T)) for _ in range(3))
    m = r.random((B, T)) > 0.3
    m[:, 0] = True
    val, g = jax.value_and_grad(lambda x: O.iw_opd_loss(x, tl, m, rollout_logps=roll, gamma=0.5)[0])(jnp.asarray(lp))
    want, w = np_iw_opd(lp, tl, roll, m, 0.5, 1e-8, m.sum())
    _close(val, want)
    _close(g, -np.where(m, w * (tl - roll), 0) / m.sum())
    # with a mask the prefix only counts valid tokens
    _close(np.where(m, O.iw_opd_weights(np.where(m, tl - roll, 0), m, gamma=0.5), 0), np.where(m, w, 0))


@pytest.mark.trl
@pytest.mark.parametrize("rollout", [False, True])
@pytest.mark.parametrize("num_items", [None, 9])
def test_iw_opd_trl_parity(rollout, num_items):
    torch = pytest.importorskip("torch")
    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    r, s, t, m = _logits(6)
    tokens = r.integers(0, V, (B, T))
    tau = 1.3
    teacher_lp = np.asarray(token_logps(jnp.asarray(t), jnp.asarray(tokens)))
    roll = -r.uniform(0.1, 3, (B, T)) if rollout else None
    st_ = torch.tensor(s, requires_grad=True)
    obj = stub(temperature=tau, iw_opd_gamma=0.5, iw_opd_epsilon=1e-8)
    loss_t = IWOPDTrainer._compute_iw_opd_loss(
        obj, st_, torch.tensor(tokens), torch.tensor(np.where(m, 1, -100)), torch.tensor(teacher_lp),
        rollout_logprobs=None if roll is None else torch.tensor(roll),
        num_items_in_batch=None if num_items is None else torch.tensor(num_items))
    loss_t.backward()

    def fn(x):
        lp = token_logps(x / tau, jnp.asarray(tokens))
        return O.iw_opd_loss(lp, teacher_lp, m, rollout_logps=roll, gamma=0.5, num_items=num_items)

    (val, met), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(s))
    _close(val, loss_t.item())
    _close(g, st_.grad.numpy())
    _close(met["mean_weight"].value, obj._metrics["train"]["iw_opd/mean_weight"][-1])


# ----------------------------------------------------------------------------------- self-distillation


def np_topk_div(s, t, k, alpha, add_tail):
    ls, lt = log_softmax(s), log_softmax(t)
    idx = np.argsort(-s, axis=-1)[..., :k]
    a, b = np.take_along_axis(ls, idx, -1), np.take_along_axis(lt, idx, -1)
    if add_tail:
        a = np.concatenate([a, np.log(1 - np.exp(a).sum(-1, keepdims=True))], -1)
        b = np.concatenate([b, np.log(1 - np.exp(b).sum(-1, keepdims=True))], -1)
    else:
        a = a - np.log(np.exp(a).sum(-1, keepdims=True))
        b = b - np.log(np.exp(b).sum(-1, keepdims=True))
    ps, pt = np.exp(a), np.exp(b)
    if alpha == 0:
        return np_kl(pt, ps)
    if alpha == 1:
        return np_kl(ps, pt)
    mix = (1 - alpha) * ps + alpha * pt
    return alpha * np_kl(pt, mix) + (1 - alpha) * np_kl(ps, mix)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [False, True])
def test_topk_divergence_reference(alpha, add_tail):
    _, s, t, _ = _logits(7)
    _close(O.topk_distillation_divergence(s, t, topk=3, alpha=alpha, add_tail=add_tail),
           np_topk_div(s, t, 3, alpha, add_tail))
    f = lambda x: np_topk_div(x, t, 3, alpha, add_tail).sum()
    g = jax.grad(lambda x: jnp.sum(O.topk_distillation_divergence(x, t, topk=3, alpha=alpha, add_tail=add_tail)))(
        jnp.asarray(s))
    _close(g, fd_grad(f, s), rtol=1e-5, atol=1e-8)
    # k = V without a tail is the full-vocabulary divergence
    _close(O.topk_distillation_divergence(s, t, topk=V, alpha=alpha), np_gjsd(s, t, alpha))


@pytest.mark.trl
@pytest.mark.parametrize("mode,alpha,add_tail,is_clip", [
    ("topk_logits", 0.5, False, None), ("topk_logits", 0.5, True, 2.0), ("topk_logits", 1.0, False, 1.5),
    ("topk_logits", 0.0, True, None), ("full_logit", 0.5, False, 2.0), ("full_logit", 1.0, False, None),
    ("sampled_token", 1.0, False, None), ("sampled_token", 1.0, False, 2.0), ("peaked", 0.5, True, None)])
def test_self_distillation_trl_parity(mode, alpha, add_tail, is_clip):
    torch = pytest.importorskip("torch")
    from trl.experimental.sdpo import loss_utils as lu

    r, s, t, m = _logits(8)
    if mode == "peaked":  # student top-k mass within 1e-7 of 1: the tail bucket's clamp decides the value
        mode = "topk_logits"
        s[..., 0] += 40.0
    tokens = r.integers(0, V, (B, T))
    lp = np.asarray(token_logps(jnp.asarray(s), jnp.asarray(tokens)))
    old = lp + r.normal(0, 0.5, lp.shape)
    st_ = torch.tensor(s, requires_grad=True)
    tt = torch.tensor(t)
    if mode == "topk_logits":
        per = lu.compute_topk_self_distillation_loss(st_, tt, distillation_topk=3, distillation_alpha=alpha,
                                                     distillation_add_tail=add_tail)
    elif mode == "full_logit":
        per = lu.compute_full_logit_self_distillation_loss(st_, tt, distillation_alpha=alpha)
    else:
        per = lu.compute_sampled_token_self_distillation_loss(st_, tt, torch.tensor(tokens), distillation_alpha=alpha)
    if is_clip is not None:
        per = lu.apply_importance_sampling_clipping(per, torch.tensor(lp), torch.tensor(old), is_clip)
    mt = torch.tensor(m, dtype=torch.float64)
    loss_t = (per * mt).sum() / mt.sum()
    loss_t.backward()
    fn = lambda x: O.self_distillation_loss(x, t, m, mode=mode, alpha=alpha, topk=3, add_tail=add_tail,
                                            tokens=tokens, logps=lp, old_logps=old, is_clip=is_clip,
                                            aggregation="token_mean")[0]
    val, g = jax.value_and_grad(fn)(jnp.asarray(s))
    _close(val, loss_t.item())
    _close(g, st_.grad.numpy())


# ---------------------------------------------------------------------------------------------- MiniLLM


def np_minillm(s, t, tokens, m, gamma, norm, coef):
    """MiniLLM eq. 5-7 written out with loops; returns the value and the analytic gradient of the
    long-term part (its returns are constants)."""
    ls, lt = log_softmax(s), log_softmax(t)
    b_, t_ = m.shape
    lq = np.take_along_axis(ls, tokens[..., None], -1)[..., 0]
    lpt = np.take_along_axis(lt, tokens[..., None], -1)[..., 0]
    r = np.where(m, lpt - lq, 0)
    fut = np.zeros_like(r)
    for b in range(b_):
        for t in range(t_):
            valid = [u for u in range(t + 1, t_) if m[b, u]]
            ret = 0.0
            for j, u in enumerate(valid):
                ret += gamma ** j * r[b, u]
            fut[b, t] = ret / max(len(valid), 1) if norm else ret
    single = np_kl(np.exp(ls), np.exp(lt))
    n = m.sum()
    value = (np.where(m, -fut * lq, 0).sum() + coef * np.where(m, single, 0).sum()) / n
    onehot = np.eye(s.shape[-1])[tokens]
    g_long = np.where(m[..., None], -fut[..., None] * (onehot - np.exp(ls)), 0) / n
    return value, g_long, single


@pytest.mark.parametrize("gamma,norm,coef", [(1.0, True, 1.0), (0.9, False, 0.5), (0.0, True, 0.0)])
def test_minillm_reference(gamma, norm, coef):
    r, s, t, m = _logits(9, t=5)
    m[0, 2] = False  # interior padding is skipped
    tokens = r.integers(0, V, m.shape)
    val, g = jax.value_and_grad(lambda x: O.minillm_loss(x, t, tokens, m, gamma=gamma, length_normalize=norm,
                                                         single_step_coef=coef)[0])(jnp.asarray(s))
    want, g_long, _ = np_minillm(s, t, tokens, m, gamma, norm, coef)
    _close(val, want)
    g_single = fd_grad(lambda x: coef * np.where(m, np_kl(np.exp(log_softmax(x)), np.exp(log_softmax(t))), 0).sum()
                       / m.sum(), s)
    _close(g, g_long + g_single, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------ properties

_seeds = st.integers(0, 2**31 - 1)


# β = 0 / 1 are the exact forward / reverse KL (as TRL); β so small that 1 − β rounds to 1 would
# compare the mixture form against the reverse-KL branch, so interior values stay representable.
@given(_seeds, st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-6, 1.0 - 1e-6)))
def test_gjsd_symmetry_nonnegativity(seed, beta):
    _, s, t, _ = _logits(seed)
    a = np.asarray(O.generalized_jsd(s, t, beta=beta))
    b = np.asarray(O.generalized_jsd(t, s, beta=1.0 - beta))
    _close(a, b, rtol=1e-9, atol=1e-12)
    assert np.all(a >= -1e-12)
    assert np.all(np.abs(np.asarray(O.generalized_jsd(s, s, beta=beta))) < 1e-12)


@given(_seeds, st.floats(0.25, 4.0))
def test_gkd_temperature_scaling_and_padding(seed, c):
    _, s, t, m = _logits(seed)
    base = O.gkd_loss(s, t, m, temperature=1.0)[0]
    _close(O.gkd_loss(s * c, t * c, m, temperature=c)[0], base, rtol=1e-9)
    pad = lambda x, v: np.concatenate([x, np.full((B, 2) + x.shape[2:], v)], 1)
    _close(O.gkd_loss(pad(s, 0.0), pad(t, 1e6), pad(m, False))[0], base, rtol=1e-9)


@given(_seeds, st.floats(0.0, 3.0))
def test_iw_opd_weights_range(seed, gamma):
    r = np.random.default_rng(seed)
    a = r.normal(size=(3, 7))
    m = r.random((3, 7)) > 0.2
    w = np.asarray(O.iw_opd_weights(a, m, gamma=gamma))
    assert np.all((w[m] >= 1 - 1e-12) & (w[m] <= 1 + gamma + 1e-12))
    assert np.all(w[~m] == 0)
    # weights are non-increasing along each row's valid tokens
    for b in range(3):
        v = w[b][m[b]]
        assert np.all(np.diff(v) <= 1e-12)


def test_extreme_and_bf16_inputs():
    _, s, t, m = _logits(10)
    big_s, big_t = s * 1e4, -t * 1e4
    for beta in (0.0, 0.5, 1.0):
        val, g = jax.value_and_grad(lambda x: O.gkd_loss(x, big_t, m, beta=beta)[0])(jnp.asarray(big_s))
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    # -inf teacher logits (banned tokens) give finite forward / reverse KL where the student has mass
    t_inf = t.copy()
    t_inf[..., 0] = -np.inf
    assert np.all(np.isfinite(np.asarray(O.generalized_jsd(s, t_inf, beta=0.5))))
    assert np.all(np.isfinite(np.asarray(O.forward_kl(s, t_inf))))
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    loss, _ = O.gkd_loss(sb, tb, m)
    assert loss.dtype == jnp.float32
    _close(loss, O.gkd_loss(np.asarray(sb, np.float32), np.asarray(tb, np.float32), m)[0], rtol=1e-6)
    assert np.isfinite(float(O.self_distillation_loss(big_s, big_t, m, topk=3, add_tail=True)[0]))
    tokens = np.zeros(m.shape, int)
    assert np.isfinite(float(O.minillm_loss(big_s, big_t, tokens, m)[0]))


def test_bad_inputs():
    _, s, t, m = _logits(11)
    with pytest.raises(ValueError, match=r"beta=1.5 is out of range; allowed: \[0.0, 1.0\]"):
        O.gkd_loss(s, t, m, beta=1.5)
    with pytest.raises(ValueError, match="level='batch' is not allowed; allowed values: 'token', 'sequence'"):
        O.gkd_loss(s, t, m, level="batch")
    with pytest.raises(ValueError, match="temperature=0.0 is out of range"):
        O.generalized_jsd(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="`teacher_logits` must have the same shape"):
        O.generalized_jsd(s, t[..., :3])
    with pytest.raises(ValueError, match="`student_logits` must have rank 3"):
        O.generalized_jsd(s[0], t[0])
    with pytest.raises(ValueError, match=r"topk=0 is out of range; allowed: integers in \[1, 6\]"):
        O.topk_distillation_divergence(s, t, topk=0)
    with pytest.raises(ValueError, match="mode='logits' is not allowed"):
        O.self_distillation_loss(s, t, m, mode="logits")
    with pytest.raises(ValueError, match="alpha=0.5 is not allowed with mode='sampled_token'; allowed values: 1.0"):
        O.self_distillation_loss(s, t, m, mode="sampled_token", alpha=0.5, tokens=np.zeros(m.shape, int))
    with pytest.raises(ValueError, match="`logps` and `old_logps` are required when is_clip=2.0"):
        O.self_distillation_loss(s, t, m, topk=3, is_clip=2.0)
    with pytest.raises(ValueError, match="`teacher_logps` must have the same shape"):
        O.iw_opd_loss(np.zeros((B, T)), np.zeros((B, T + 1)), m)
    with pytest.raises(ValueError, match="gamma=-1.0 is out of range"):
        O.iw_opd_weights(np.zeros((B, T)), m, gamma=-1.0)


_TOKEN_RECIPES = {
    "gkd": lambda s, t, m, tok, lp: O.gkd_loss(s, t, m, beta=0.3)[0],
    "gkd_seq": lambda s, t, m, tok, lp: O.gkd_loss(s, t, m, beta=1.0, level="sequence")[0],
    "topk": lambda s, t, m, tok, lp: O.self_distillation_loss(s, t, m, topk=3, add_tail=True, aggregation="token_mean")[0],
    "sampled": lambda s, t, m, tok, lp: O.self_distillation_loss(s, t, m, mode="sampled_token", alpha=1.0, tokens=tok,
                                                                 aggregation="token_mean")[0],
    "minillm": lambda s, t, m, tok, lp: O.minillm_loss(s, t, tok, m, gamma=0.9)[0],
    "opd": lambda s, t, m, tok, lp: O.on_policy_distillation_loss(token_logps(s, tok), token_logps(t, tok), m)[0],
    "iw_opd": lambda s, t, m, tok, lp: O.iw_opd_loss(token_logps(s, tok), token_logps(t, tok), m, rollout_logps=lp)[0],
}


@given(_seeds, st.sampled_from(sorted(_TOKEN_RECIPES)))
def test_distillation_padding_permutation_finite(seed, name):
    fn = _TOKEN_RECIPES[name]
    r, s, t, m = _logits(seed)
    tok = r.integers(0, V, (B, T))
    lp = -r.uniform(0.1, 3, (B, T))
    base, g = jax.value_and_grad(lambda x: fn(x, t, m, tok, lp))(jnp.asarray(s))
    assert np.isfinite(float(base)) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~m] == 0.0)
    pad = lambda x, v: np.concatenate([x, np.full((B, 2) + x.shape[2:], v, dtype=x.dtype)], 1)
    pv, pg = jax.value_and_grad(lambda x: fn(x, pad(t, 7.0), pad(m, False), pad(tok, 0), pad(lp, np.nan)))(
        jnp.asarray(pad(s, -3.0)))
    _close(pv, base, rtol=1e-9)
    assert np.all(np.asarray(pg)[:, -2:] == 0.0)
    perm = r.permutation(B)
    _close(fn(s[perm], t[perm], m[perm], tok[perm], lp[perm]), base, rtol=1e-9)
