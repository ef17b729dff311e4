"""Tests for objectives/unpaired.py.

1. float64 NumPy references written from the papers (value; gradient by central differences of the
   reference), rtol 1e-6;
2. parity with TRL 1.16's own code on identical float64 inputs (value and gradient w.r.t. the
   per-token log-probs or the logits, rtol 1e-6): KTOTrainer._compute_loss, CPOTrainer and
   ORPOTrainer.get_batch_loss_metrics (real concatenated_forward on stub logits), RewardTrainer.compute_loss,
   TPOTrainer._compute_loss, A2POTrainer.compute_loss. BCO, XPO and Nash-MD were deleted from TRL
   before 1.16 and Online DPO's loss lives inside its training_step: NumPy references only;
3. hypothesis properties; 4. bad-input errors.
"""

from __future__ import annotations

import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import trlax.objectives as O
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _trl_oracles import bind, fd_grad, log_sigmoid, log_softmax, sigmoid, stub, token_logps  # noqa: E402

B, T = 4, 5
RTOL = 1e-6


def _data(seed, b=B, t=T, empty_row=False):
    r = np.random.default_rng(seed)
    lp = -r.uniform(0.05, 2.0, (b, t))
    m = r.random((b, t)) > 0.3
    m[:, 0] = True
    if empty_row:
        m[-1] = False
    return r, lp, m


def _seq(lp, m, avg=False):
    s = np.where(m, lp, 0.0).sum(-1)
    return s / np.maximum(m.sum(-1), 1) if avg else s


def _close(a, b, rtol=RTOL, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _check_value_grad(jax_fn, np_fn, x):
    """Value and gradient of a scalar JAX function vs a float64 NumPy reference."""
    val, g = jax.value_and_grad(jax_fn)(jnp.asarray(x))
    _close(val, np_fn(x))
    _close(g, fd_grad(np_fn, x), rtol=1e-5, atol=1e-8)


# ============================================================================ NumPy references


def np_kto(lp, ref, m, labels, kl_lp, kl_ref, kl_m, beta, wd, wu, loss_type):
    rho = _seq(lp, m) - _seq(ref, m)
    if loss_type == "kto":
        z0 = max(np.mean(_seq(kl_lp, kl_m) - _seq(kl_ref, kl_m)), 0.0)
        v = np.where(labels, wd * sigmoid(beta * (rho - z0)), wu * sigmoid(beta * (z0 - rho)))
        return np.mean(np.where(labels, wd, wu) - v)  # KTO eq. 8: λ_y − v(x, y)
    return np.mean(np.where(labels, wd * (1 - sigmoid(beta * rho)), wu * sigmoid(beta * rho)))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_reference(loss_type, weights):
    r, lp, m = _data(0)
    ref = lp + r.normal(0, 0.3, lp.shape)
    labels = np.array([True, False, True, False])
    kl_lp = lp[::-1] * 0.5
    kl_ref = ref[::-1] * 0.9
    kw = dict(beta=0.7, desirable_weight=weights[0], undesirable_weight=weights[1], loss_type=loss_type)
    _check_value_grad(
        lambda x: O.kto_loss(x, ref, labels, mask=m, kl_logps=kl_lp, ref_kl_logps=kl_ref, kl_mask=m, **kw)[0],
        lambda x: np_kto(x, ref, m, labels, kl_lp, kl_ref, m, 0.7, weights[0], weights[1], loss_type), lp)


def test_kto_sequence_inputs_and_precomputed_kl():
    r, lp, m = _data(1)
    ref = lp * 1.1
    labels = np.array([1, 0, 0, 1])
    a = O.kto_loss(_seq(lp, m), _seq(ref, m), labels, kl=0.25)[0]
    b = O.kto_loss(lp, ref, labels, mask=m, kl=0.25)[0]
    rho = _seq(lp, m) - _seq(ref, m)
    want = np.mean(np.where(labels == 1, 1 - sigmoid(0.1 * (rho - 0.25)), 1 - sigmoid(0.1 * (0.25 - rho))))
    _close(a, want)
    _close(b, want)
    # the KL baseline is clamped at 0 and carries no gradient
    z = O.kto_kl_baseline(_seq(lp, m), _seq(lp, m) + 5.0)
    assert float(z) == 0.0
    g = jax.grad(lambda x: O.kto_kl_baseline(x, _seq(ref, m) - 10.0))(jnp.asarray(_seq(lp, m)))
    assert np.all(np.asarray(g) == 0.0)


def np_running_mean(batches):
    """Chan et al. merge from (mean 0, var 1, count 1e-24), as TRL's RunningMoments."""
    mean, var, count = 0.0, 1.0, 1e-24
    for xs in batches:
        n = xs.size
        bm, bv = xs.mean(), xs.var()
        delta = bm - mean
        tot = count + n
        var = (var * count + delta**2 * count * n / tot + bv * n) / tot
        mean = mean + delta * n / tot
        count = tot
    return mean, var, count


def test_bco_reference_and_state():
    r, lp, m = _data(2)
    ref = lp + r.normal(0, 0.4, lp.shape)
    labels = np.array([True, True, False, False])
    beta = 0.5
    prev = r.normal(0, 1, 6)
    state = O.bco_update_moments(O.bco_init(jnp.float64), prev)
    _close(state.mean, np_running_mean([prev])[0])

    # δ is a statistic of the (detached) rewards: a constant for the gradient
    delta = np_running_mean([prev, beta * (_seq(lp, m) - _seq(ref, m))])[0]

    def np_bco(x):
        rew = beta * (_seq(x, m) - _seq(ref, m))
        z = rew - delta
        return np.mean(np.where(labels, -log_sigmoid(z), -log_sigmoid(-z)))

    _check_value_grad(lambda x: O.bco_loss(x, ref, labels, state, mask=m, beta=beta)[0], np_bco, lp)
    loss, new_state, _ = O.bco_loss(lp, ref, labels, state, mask=m, beta=beta)
    want = np_running_mean([prev, beta * (_seq(lp, m) - _seq(ref, m))])
    _close(new_state.mean, want[0])
    _close(new_state.var, want[1])
    _close(new_state.count, want[2])
    # frozen state (evaluation): δ is the old mean, the state is returned unchanged
    _, same, _ = O.bco_loss(lp, ref, labels, state, mask=m, beta=beta, update_state=False)
    _close(same.mean, state.mean)
    # the first batch from bco_init gives δ ≈ the batch mean
    _, s1, _ = O.bco_loss(lp, ref, labels, O.bco_init(jnp.float64), mask=m, beta=beta)
    _close(s1.mean, np.mean(beta * (_seq(lp, m) - _seq(ref, m))))


def np_log1mexp(x):
    return np.log(-np.expm1(x))


def np_orpo(cw, cl, mw, ml, beta, nll_lp, nll_m):
    sw, sl = _seq(cw, mw, True), _seq(cl, ml, True)
    # ORPO eq. 4 / 6: odds(y) = P / (1 − P), with P the length-normalised likelihood
    log_odds = np.log(np.exp(sw) / (1 - np.exp(sw))) - np.log(np.exp(sl) / (1 - np.exp(sl)))
    nll = -np.where(nll_m, nll_lp, 0).sum() / nll_m.sum()
    return nll - beta * np.mean(log_sigmoid(log_odds))


def test_orpo_reference():
    r, cw, mw = _data(3)
    _, cl, ml = _data(4)
    _check_value_grad(lambda x: O.orpo_loss(x, cl, mw, ml, beta=0.3)[0],
                      lambda x: np_orpo(x, cl, mw, ml, 0.3, x, mw), cw)
    _check_value_grad(lambda x: O.orpo_loss(cw, x, mw, ml, beta=0.3)[0],
                      lambda x: np_orpo(cw, x, mw, ml, 0.3, cw, mw), cl)
    # separate prompt+completion NLL term
    nl, nm = -r.uniform(0.1, 1, (B, 7)), r.random((B, 7)) > 0.2
    _close(O.orpo_loss(cw, cl, mw, ml, beta=0.3, nll_logps=nl, nll_mask=nm)[0], np_orpo(cw, cl, mw, ml, 0.3, nl, nm))


def np_cpo(cw, cl, mw, ml, loss_type, beta, eps, gamma, alpha, cpo_alpha):
    avg = loss_type in ("ipo", "simpo", "alphapo")
    sw, sl = _seq(cw, mw, avg), _seq(cl, ml, avg)
    if alpha != 0:  # AlphaPO eq. 5: r = (1 − p^(−α))/α with p = e^S
        sw, sl = (1 - np.exp(sw) ** (-alpha)) / alpha, (1 - np.exp(sl) ** (-alpha)) / alpha
    x = sw - sl
    if loss_type in ("simpo", "alphapo"):
        losses = -(1 - eps) * log_sigmoid(beta * x - gamma) - eps * log_sigmoid(-(beta * x - gamma))
        cpo_alpha = 0.0 if loss_type == "alphapo" else cpo_alpha
    elif loss_type == "sigmoid":
        losses = -(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x)
    elif loss_type == "hinge":
        losses = np.maximum(0, 1 - beta * x)
    else:
        losses = (x - 1 / (2 * beta)) ** 2
    nll = -np.where(mw, cw, 0).sum() / mw.sum()
    return losses.mean() + cpo_alpha * nll


CPO_CASES = [
    ("sigmoid", 0.1, 0.0, 0.5, 0.0, 1.0),
    ("sigmoid", 0.2, 0.1, 0.5, 0.0, 0.5),
    ("hinge", 0.05, 0.0, 0.5, 0.0, 1.0),
    ("ipo", 0.4, 0.0, 0.5, 0.0, 1.0),
    ("simpo", 2.5, 0.0, 1.375, 0.0, 0.0),
    ("simpo", 2.0, 0.1, 0.5, 0.0, 1.0),
    ("alphapo", 2.5, 0.0, 0.1, 0.25, 1.0),
    ("sigmoid", 0.3, 0.0, 0.5, -0.3, 1.0),
]


@pytest.mark.parametrize("case", CPO_CASES)
def test_cpo_reference(case):
    loss_type, beta, eps, gamma, alpha, cpo_alpha = case
    _, cw, mw = _data(5)
    _, cl, ml = _data(6)
    kw = dict(loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma, alpha=alpha, cpo_alpha=cpo_alpha)
    _check_value_grad(lambda x: O.cpo_loss(x, cl, mw, ml, **kw)[0],
                      lambda x: np_cpo(x, cl, mw, ml, *case), cw)
    _check_value_grad(lambda x: O.cpo_loss(cw, x, mw, ml, **kw)[0],
                      lambda x: np_cpo(cw, x, mw, ml, *case), cl)


def test_simpo_alphapo_presets():
    _, cw, mw = _data(7)
    _, cl, ml = _data(8)
    _close(O.simpo_loss(cw, cl, mw, ml)[0], np_cpo(cw, cl, mw, ml, "simpo", 2.5, 0.0, 1.375, 0.0, 0.0))
    _close(O.alphapo_loss(cw, cl, mw, ml)[0], np_cpo(cw, cl, mw, ml, "alphapo", 2.5, 0.0, 0.1, 0.25, 0.0))


def np_tpo(cw, cl, cg, mw, ml, mg, loss_type, beta, tpo_alpha, gamma, eps):
    avg = loss_type in ("ipo", "tpo-l")
    x = _seq(cw, mw, avg) - _seq(cl, ml, avg)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x)
    elif loss_type == "hinge":
        losses = np.maximum(0, 1 - beta * x)
    elif loss_type == "ipo":
        losses = (x - 1 / (2 * beta)) ** 2
    else:
        y = beta * x - gamma
        losses = -(1 - eps) * log_sigmoid(y) - eps * log_sigmoid(-y)
    return losses.mean() + tpo_alpha * (-np.where(mg, cg, 0).sum() / mg.sum())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "tpo-l"])
def test_tpo_reference(loss_type):
    _, cw, mw = _data(9)
    _, cl, ml = _data(10)
    _, cg, mg = _data(11)
    args = (loss_type, 0.3, 0.8, 0.5, 0.05 if loss_type in ("sigmoid", "tpo-l") else 0.0)
    kw = dict(loss_type=loss_type, beta=0.3, tpo_alpha=0.8, tpo_l_gamma=0.5, label_smoothing=args[-1])
    _check_value_grad(lambda x: O.tpo_loss(x, cl, cg, mw, ml, mg, **kw)[0],
                      lambda x: np_tpo(x, cl, cg, mw, ml, mg, *args), cw)
    _check_value_grad(lambda x: O.tpo_loss(cw, cl, x, mw, ml, mg, **kw)[0],
                      lambda x: np_tpo(cw, cl, x, mw, ml, mg, *args), cg)


def np_online_dpo(cw, cl, rw, rl, mw, ml, beta, loss_type):
    x = (_seq(cw, mw) - _seq(cl, ml)) - (_seq(rw, mw) - _seq(rl, ml))
    return np.mean(-log_sigmoid(beta * x) if loss_type == "sigmoid" else (x - 1 / (2 * beta)) ** 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_and_xpo_reference(loss_type):
    r, cw, mw = _data(12)
    _, cl, ml = _data(13)
    rw, rl = cw + r.normal(0, 0.2, cw.shape), cl + r.normal(0, 0.2, cl.shape)
    _, ys, ms = _data(14)
    kw = dict(chosen_mask=mw, rejected_mask=ml, beta=0.2, loss_type=loss_type)
    _check_value_grad(lambda x: O.online_dpo_loss(x, cl, rw, rl, **kw)[0],
                      lambda x: np_online_dpo(x, cl, rw, rl, mw, ml, 0.2, loss_type), cw)
    # XPO: + α · Σ_t log π_θ(ỹ_t) on the reference sample (with gradient)
    alpha = 0.05
    _check_value_grad(lambda x: O.xpo_loss(cw, cl, rw, rl, x, ref_sample_mask=ms, alpha=alpha, **kw)[0],
                      lambda x: np_online_dpo(cw, cl, rw, rl, mw, ml, 0.2, loss_type) + alpha * _seq(x, ms).mean(), ys)
    # reference log-probs carry no gradient
    g = jax.grad(lambda x: O.online_dpo_loss(cw, cl, x, rl, **kw)[0])(jnp.asarray(rw))
    assert np.all(np.asarray(g) == 0.0)


def test_order_by_reward():
    a, b = np.arange(8.0).reshape(4, 2), -np.arange(8.0).reshape(4, 2)
    ra, rb = np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.5, 0.0, 5.0, 3.5])
    ch, rj = O.order_by_reward(ra, rb, a, b)
    want_c = np.where((ra >= rb)[:, None], a, b)  # ties go to the first sample (row 1)
    _close(ch, want_c)
    _close(rj, np.where((ra >= rb)[:, None], b, a))


def test_nash_md_reference():
    r, lp, m = _data(15)
    ref = lp + r.normal(0, 0.3, lp.shape)
    p = r.uniform(0, 1, B)
    beta = 0.3

    # the gradient of the reference: ∇[β Σ (ℓ−ℓ_ref)·ℓ_sg − (P−½)Σℓ] where the first factor is constant
    def np_grad(x):
        return np.where(m, beta * (x - ref) - (p - 0.5)[:, None], 0) / B

    val, g = jax.value_and_grad(lambda x: O.nash_md_loss(x, ref, m, p, beta=beta)[0])(jnp.asarray(lp))
    want = np.mean(beta * np.where(m, (lp - ref) * lp, 0).sum(-1) - (p - 0.5) * _seq(lp, m))
    _close(val, want)
    _close(g, np_grad(lp))
    # mixture policy: log softmax(κ z_ref + (1 − κ) z)
    z, zr = r.normal(size=(2, 3, 7)), r.normal(size=(2, 3, 7))
    _close(O.nash_md_mixture_logits(z, zr, 0.25), log_softmax(0.25 * zr + 0.75 * z))


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01), (False, 0.5)])
def test_reward_model_reference(margin, center):
    r = np.random.default_rng(16)
    rw, rl = r.normal(size=6), r.normal(size=6)
    mg = r.choice([0.0, 1 / 3, 2 / 3, 1.0], 6) if margin else None

    def np_rm(x):
        d = x - rl - (mg if margin else 0.0)
        out = -np.mean(log_sigmoid(d))
        return out + (center * np.mean((x + rl) ** 2) if center is not None else 0.0)

    _check_value_grad(lambda x: O.reward_model_loss(x, rl, margin=mg, center_rewards_coefficient=center)[0], np_rm, rw)
    # [B, 1] head outputs are accepted
    _close(O.reward_model_loss(rw[:, None], rl[:, None], margin=mg, center_rewards_coefficient=center)[0], np_rm(rw))


def test_process_reward_reference():
    r = np.random.default_rng(17)
    z = r.normal(size=(3, 6, 2))
    labels = r.integers(0, 2, (3, 6))
    m = r.random((3, 6)) > 0.5
    m[0, 0] = True
    labels_ignored = np.where(m, labels, -100)

    def np_prm(x):
        lp = log_softmax(x)
        tok = np.take_along_axis(lp, np.where(m, labels, 0)[..., None], -1)[..., 0]
        return -np.where(m, tok, 0).sum() / m.sum()

    _check_value_grad(lambda x: O.process_reward_loss(x, labels_ignored, m)[0], np_prm, z)


def test_astar_po_reference():
    r = np.random.default_rng(18)
    rewards = r.integers(0, 2, (3, 8)).astype(float)
    rewards[1] = 0.0
    vm = np.ones_like(rewards, bool)
    vm[2, 5:] = False
    beta1 = 0.5
    v = O.astar_po_values(rewards, beta1, mask=vm)
    want = [beta1 * np.log(np.mean(np.exp(rewards[i][vm[i]] / beta1))) for i in range(3)]
    _close(v, want)
    _, lp, m = _data(19)
    ref = lp * 0.9
    rw = r.integers(0, 2, B).astype(float)
    vs = r.uniform(0, 1, B)
    beta2 = 0.05
    _check_value_grad(lambda x: O.astar_po_loss(x, ref, rw, vs, mask=m, beta2=beta2)[0],
                      lambda x: np.mean((beta2 * (_seq(x, m) - _seq(ref, m)) - (rw - vs)) ** 2), lp)


def test_trdpo_updates():
    ref = {"a": np.ones((2, 3)), "b": [np.zeros(4)]}
    pol = {"a": np.full((2, 3), 3.0), "b": [np.full(4, -2.0)]}
    soft = O.trdpo_soft_update(ref, pol, 0.6)
    _close(soft["a"], 0.4 * 1 + 0.6 * 3)
    _close(soft["b"][0], 0.6 * -2.0)
    hard = O.trdpo_hard_update(ref, pol)
    _close(hard["a"], 3.0)
    step_fn = jax.jit(lambda r_, p_, s: O.trdpo_ref_update(r_, p_, s, alpha=0.6, sync_steps=4))
    _close(step_fn(ref, pol, 8)["a"], 0.4 + 1.8)
    _close(step_fn(ref, pol, 7)["a"], 1.0)


# ================================================================================ TRL parity

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(x, grad=False):
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


@pytest.mark.trl
@pytest.mark.parametrize("loss_type,wd,wu,beta", [("kto", 1.0, 1.0, 0.1), ("kto", 1.5, 0.6, 0.8),
                                                  ("apo_zero_unpaired", 1.0, 1.0, 0.5),
                                                  ("apo_zero_unpaired", 0.7, 1.2, 0.2)])
def test_kto_trl_parity(loss_type, wd, wu, beta):
    from trl.trainer.kto_trainer import KTOTrainer

    r, lp, m = _data(20, b=6, t=5)
    ref = lp + r.normal(0, 0.5, lp.shape)
    labels = np.array([True, False, True, True, False, False])
    kl_lp, kl_ref = np.roll(lp, 1, 0) + 0.3, np.roll(ref, 1, 0)
    kl_m = np.roll(m, 1, 0)
    calc_kl = loss_type == "kto"
    s = stub(beta=beta, loss_type=loss_type, desirable_weight=wd, undesirable_weight=wu, calculate_KL=calc_kl,
             precompute_ref_logps=True)
    lp_t = _t(lp, True)
    m_t = _t(m)
    kl_sum = (_t(kl_lp) * _t(kl_m)).sum(-1)
    s._compute_kl_logps = lambda model, batch: kl_sum if calc_kl else None
    model = lambda **kw: types.SimpleNamespace(log_probs=lp_t * m_t, entropy=torch.zeros_like(lp_t),
                                               mean_logits=torch.zeros_like(lp_t))
    cm = torch.cat([torch.zeros(6, 1), m_t], 1)
    batch = {"label": torch.tensor(labels), "input_ids": torch.zeros((6, T + 1), dtype=torch.long),
             "attention_mask": torch.ones((6, T + 1), dtype=torch.long), "completion_mask": cm,
             "ref_logps": _t(_seq(ref, m)), "ref_KL_logps": _t(_seq(kl_ref, kl_m))}
    loss_t = KTOTrainer._compute_loss(s, model, batch, False)
    loss_t.backward()
    fn = lambda x: O.kto_loss(x, ref, labels, mask=m, kl_logps=kl_lp, ref_kl_logps=kl_ref, kl_mask=kl_m, beta=beta,
                              desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type)
    (val, met), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(lp))
    _close(val, loss_t.item())
    _close(g, lp_t.grad.numpy())
    _close(met["kl"], s._metrics["train"]["kl"][-1])
    _close(met["rewards/chosen"].value, s._metrics["train"]["rewards/chosen"][-1])


def _pair_batch(seed, b=3, prompt=2, length=8, vocab=11):
    r = np.random.default_rng(seed)
    ids = r.integers(1, vocab, (2 * b, length))
    attn = np.ones((2 * b, length), int)
    labels = ids.copy()
    labels[:, :prompt] = -100
    for i in range(2 * b):
        n = r.integers(prompt + 2, length + 1)
        attn[i, n:] = 0
        labels[i, n:] = -100
        ids[i, n:] = 0
    logits = r.normal(0, 1.5, (2 * b, length, vocab))
    batch = {"chosen_input_ids": ids[:b], "chosen_attention_mask": attn[:b], "chosen_labels": labels[:b],
             "rejected_input_ids": ids[b:], "rejected_attention_mask": attn[b:], "rejected_labels": labels[b:]}
    return logits, ids, attn, labels, batch


def _torch_batch(batch):
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _shifted(logits, ids, labels):
    """Our side: per-token log-probs of the next token and the completion mask (labels != -100)."""
    lab = labels[:, 1:]
    lp = token_logps(logits[:, :-1], jnp.asarray(np.where(lab == -100, 0, lab)))
    return lp, lab != -100


CPO_TRL_CASES = [("sigmoid", 0.1, 0.0, 0.5, 0.0, 1.0), ("sigmoid", 0.5, 0.2, 0.5, 0.0, 0.3),
                 ("hinge", 0.1, 0.0, 0.5, 0.0, 1.0), ("ipo", 0.5, 0.0, 0.5, 0.0, 1.0),
                 ("simpo", 2.5, 0.0, 1.375, 0.0, 0.0), ("simpo", 2.0, 0.1, 0.5, 0.0, 1.0),
                 ("simpo", 2.5, 0.0, 0.1, 0.25, 0.0)]


@pytest.mark.trl
@pytest.mark.parametrize("case", CPO_TRL_CASES)
def test_cpo_trl_parity(case):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    loss_type, beta, eps, gamma, alpha, cpo_alpha = case
    logits, ids, attn, labels, batch = _pair_batch(21)
    lt = _t(logits, True)
    s = stub(is_encoder_decoder=False, pad_token_id=0, beta=beta, loss_type=loss_type, label_smoothing=eps,
             simpo_gamma=gamma, alpha=alpha, cpo_alpha=cpo_alpha,
             concatenated_inputs=CPOTrainer.concatenated_inputs, get_batch_logps=CPOTrainer.get_batch_logps)
    bind(s, CPOTrainer, "concatenated_forward", "cpo_loss")
    model = lambda *a, **k: types.SimpleNamespace(logits=lt)
    loss_t, metrics_t = CPOTrainer.get_batch_loss_metrics(s, model, _torch_batch(batch))
    loss_t.backward()
    b = ids.shape[0] // 2

    def fn(z):
        lp, m = _shifted(z, ids, labels)
        return O.cpo_loss(lp[:b], lp[b:], m[:b], m[b:], loss_type=loss_type, beta=beta, label_smoothing=eps,
                          simpo_gamma=gamma, alpha=alpha, cpo_alpha=cpo_alpha)

    (val, met), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits))
    _close(val, loss_t.item())
    _close(g, lt.grad.numpy())
    _close(met["rewards/chosen"].value, metrics_t["rewards/chosen"])
    _close(met["rewards/accuracies"].value, metrics_t["rewards/accuracies"])


@pytest.mark.trl
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_trl_parity(beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, ids, attn, labels, batch = _pair_batch(22)
    lt = _t(logits, True)
    s = stub(is_encoder_decoder=False, padding_value=0, beta=beta,
             concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps)
    bind(s, ORPOTrainer, "concatenated_forward", "odds_ratio_loss")
    model = lambda *a, **k: types.SimpleNamespace(logits=lt)
    loss_t, metrics_t = ORPOTrainer.get_batch_loss_metrics(s, model, _torch_batch(batch))
    loss_t.backward()
    b = ids.shape[0] // 2

    def fn(z):
        lp, m = _shifted(z, ids, labels)
        # TRL's NLL covers prompt + response (every attended position of the chosen sequence)
        nll_lp = token_logps(z[:b, :-1], jnp.asarray(ids[:b, 1:]))
        return O.orpo_loss(lp[:b], lp[b:], m[:b], m[b:], beta=beta, nll_logps=nll_lp, nll_mask=attn[:b, 1:] == 1)

    (val, met), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits))
    # TRL's odds_ratio_loss casts the sequence log-probs to float32 (`.float()`), so the odds-ratio
    # term is only float32-accurate on TRL's side: rtol 1e-5 here (the NLL part stays float64).
    _close(val, loss_t.item(), rtol=1e-5)
    _close(g, lt.grad.numpy(), rtol=1e-5, atol=1e-9)
    _close(met["log_odds_ratio"], metrics_t["log_odds_ratio"], rtol=1e-5)
    _close(met["log_odds_chosen"], metrics_t["log_odds_chosen"], rtol=1e-5)
    _close(met["nll_loss"], metrics_t["nll_loss"])


@pytest.mark.trl
@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_reward_trl_parity(margin, center):
    from trl.trainer.reward_trainer import RewardTrainer

    r = np.random.default_rng(23)
    rew = r.normal(size=(8, 1))
    mg = r.choice([0.0, 1 / 3, 2 / 3, 1.0], 4)
    rt = _t(rew, True)
    s = stub(args=types.SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.zeros((8, 3), dtype=torch.long), "attention_mask": torch.ones((8, 3), dtype=torch.long)}
    if margin:
        inputs["margin"] = _t(mg)
    loss_t = RewardTrainer.compute_loss(s, lambda **k: types.SimpleNamespace(logits=rt), inputs)
    loss_t.backward()
    fn = lambda x: O.reward_model_loss(x[:4], x[4:], margin=mg if margin else None,
                                       center_rewards_coefficient=center)
    (val, met), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(rew))
    _close(val, loss_t.item())
    _close(g, rt.grad.numpy())
    _close(met["accuracy"].value, s._metrics["train"]["accuracy"][-1])
    _close(met["margin"].value, s._metrics["train"]["margin"][-1])
    for k in ("min", "max"):
        _close(met[f"reward/{k}"], s._metrics["train"][f"{k}_reward"][-1])
    _close(met["reward/mean"].value, s._metrics["train"]["mean_reward"][-1])


@pytest.mark.trl
@pytest.mark.parametrize("loss_type,tpo_alpha,eps", [("sigmoid", 1.0, 0.0), ("sigmoid", 0.5, 0.1), ("hinge", 1.0, 0.0),
                                                     ("ipo", 1.0, 0.0), ("tpo-l", 1.0, 0.0), ("sigmoid", 0.0, 0.0)])
def test_tpo_trl_parity(loss_type, tpo_alpha, eps):
    from trl.experimental.tpo.tpo_trainer import TPOTrainer

    r = np.random.default_rng(24)
    nb = 3 if tpo_alpha != 0 else 2
    b, length, vocab = 3, 7, 9
    ids = r.integers(0, vocab, (nb * b, length))
    cm = np.zeros((nb * b, length), int)
    for i in range(nb * b):
        cm[i, 2:r.integers(4, length + 1)] = 1
    logits = r.normal(0, 1.5, (nb * b, length, vocab))
    lt = _t(logits, True)
    beta = 0.2
    s = stub(tpo_alpha=tpo_alpha, loss_type=loss_type, beta=beta, label_smoothing=eps, tpo_l_gamma=0.5)
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones_like(torch.tensor(ids)),
              "completion_mask": torch.tensor(cm)}
    loss_t = TPOTrainer._compute_loss(s, lambda **k: types.SimpleNamespace(logits=lt), inputs, False)
    loss_t.backward()

    def fn(z):
        lp = token_logps(z[:, :-1], jnp.asarray(ids[:, 1:]))
        m = cm[:, 1:] == 1
        gold = (lp[2 * b:], m[2 * b:]) if nb == 3 else (None, None)
        return O.tpo_loss(lp[:b], lp[b:2 * b], gold[0], m[:b], m[b:2 * b], gold[1], loss_type=loss_type, beta=beta,
                          tpo_alpha=tpo_alpha, tpo_l_gamma=0.5, label_smoothing=eps)[0]

    val, g = jax.value_and_grad(fn)(jnp.asarray(logits))
    _close(val, loss_t.item())
    _close(g, lt.grad.numpy())


@pytest.mark.trl
def test_a2po_trl_parity():
    from trl.experimental.a2po.a2po_trainer import A2POTrainer

    r = np.random.default_rng(25)
    b, length, vocab, keep = 4, 8, 9, 5
    ids = r.integers(0, vocab, (b, length))
    attn = np.ones((b, length), int)
    for i in range(b):
        attn[i, length - keep + r.integers(2, keep + 1):] = 0
    logits = r.normal(0, 1.5, (b, length, vocab))
    lt = _t(logits, True)
    ref, rew, vstar = -r.uniform(1, 5, b), r.integers(0, 2, b).astype(float), r.uniform(0, 1, b)
    s = stub(args=types.SimpleNamespace(beta2=0.05), model_kwarg_keys=set())
    bind(s, A2POTrainer, "_get_sequence_logps")
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn), "logits_to_keep": keep,
              "ref_logps": _t(ref), "rewards": _t(rew), "v_star": _t(vstar)}
    loss_t = A2POTrainer.compute_loss(s, lambda **k: types.SimpleNamespace(logits=lt), inputs)
    loss_t.backward()

    def fn(z):
        lp = token_logps(z[:, :-1][:, -keep:], jnp.asarray(ids[:, -keep:]))
        return O.astar_po_loss(lp, ref, rew, vstar, mask=attn[:, -keep:], beta2=0.05)[0]

    val, g = jax.value_and_grad(fn)(jnp.asarray(logits))
    _close(val, loss_t.item())
    _close(g, lt.grad.numpy())


# ================================================================================ properties

_seeds = st.integers(0, 2**31 - 1)


@given(_seeds, st.sampled_from(["kto", "apo_zero_unpaired"]))
def test_kto_padding_and_permutation(seed, loss_type):
    r, lp, m = _data(seed)
    ref = lp + r.normal(0, 0.5, lp.shape)
    labels = r.random(B) > 0.5
    kw = dict(kl=0.1, beta=0.5, loss_type=loss_type)
    base = O.kto_loss(lp, ref, labels, mask=m, **kw)[0]
    # extra masked columns (holding garbage, even NaN) change nothing
    pad = lambda x, v: np.concatenate([x, np.full((B, 3), v)], 1)
    padded = O.kto_loss(pad(lp, np.nan), pad(ref, -np.inf), labels, mask=pad(m, False), **kw)[0]
    _close(padded, base)
    perm = r.permutation(B)
    _close(O.kto_loss(lp[perm], ref[perm], labels[perm], mask=m[perm], **kw)[0], base)
    assert 0.0 <= float(base) <= 1.0


@given(_seeds, st.sampled_from(["sigmoid", "hinge", "ipo", "simpo", "alphapo"]))
def test_cpo_padding_permutation(seed, loss_type):
    r, cw, mw = _data(seed)
    _, cl, ml = _data(seed + 1)
    kw = dict(loss_type=loss_type, beta=0.5, alpha=0.2 if loss_type == "alphapo" else 0.0)
    base = O.cpo_loss(cw, cl, mw, ml, **kw)[0]
    pad = lambda x, v: np.concatenate([x, np.full((B, 2), v)], 1)
    _close(O.cpo_loss(pad(cw, np.nan), pad(cl, np.inf), pad(mw, False), pad(ml, False), **kw)[0], base)
    perm = r.permutation(B)
    _close(O.cpo_loss(cw[perm], cl[perm], mw[perm], ml[perm], **kw)[0], base)


@given(_seeds, st.floats(-50, 50))
def test_reward_model_shift_invariance(seed, c):
    r = np.random.default_rng(seed)
    rw, rl = r.normal(size=5), r.normal(size=5)
    _close(O.reward_model_loss(rw + c, rl + c)[0], O.reward_model_loss(rw, rl)[0], rtol=1e-9, atol=1e-9)
    # swapping chosen and rejected: the two BT losses are log σ(d) + log σ(−d) apart
    d = rw - rl
    swap = O.reward_model_loss(rl, rw)[0] - O.reward_model_loss(rw, rl)[0]
    _close(swap, np.mean(d), rtol=1e-9, atol=1e-9)


@given(_seeds, st.floats(0.0, 1.0))
def test_trdpo_soft_update_interpolates(seed, alpha):
    r = np.random.default_rng(seed)
    ref, pol = r.normal(size=(3, 2)), r.normal(size=(3, 2))
    out = np.asarray(O.trdpo_soft_update(ref, pol, alpha))
    _close(out, (1 - alpha) * ref + alpha * pol, rtol=1e-12)
    lo, hi = np.minimum(ref, pol), np.maximum(ref, pol)
    assert np.all(out >= lo - 1e-12) and np.all(out <= hi + 1e-12)


@given(_seeds)
def test_online_dpo_antisymmetry(seed):
    # swapping chosen and rejected flips the margin: sigmoid losses satisfy L(x) − L(−x) = −βx
    r, cw, mw = _data(seed)
    _, cl, ml = _data(seed + 7)
    rw, rl = cw * 0.8, cl * 1.1
    x = (_seq(cw, mw) - _seq(cl, ml)) - (_seq(rw, mw) - _seq(rl, ml))
    a = O.online_dpo_loss(cw, cl, rw, rl, chosen_mask=mw, rejected_mask=ml, beta=0.3)[0]
    b = O.online_dpo_loss(cl, cw, rl, rw, chosen_mask=ml, rejected_mask=mw, beta=0.3)[0]
    _close(a - b, np.mean(-0.3 * x), rtol=1e-9, atol=1e-12)


def test_extreme_and_empty_inputs_are_finite():
    _, lp, m = _data(30, empty_row=True)
    big = lp * 1e4
    labels = np.array([True, False, True, False])
    outs = [
        O.kto_loss(big, -big, labels, mask=m, kl=1e6)[0],
        O.bco_loss(big, -big, labels, O.bco_init(), mask=m)[0],
        O.orpo_loss(big, big, m, m)[0],
        O.orpo_loss(np.zeros_like(lp), big, m, m)[0],  # probability-1 chosen: log1mexp capped
        O.cpo_loss(big, -big * 0, m, m, loss_type="alphapo", alpha=0.5)[0],
        O.tpo_loss(big, lp, lp, m, m, m, loss_type="ipo")[0],
        O.reward_model_loss(np.array([1e4, -1e4]), np.array([-1e4, 1e4]), center_rewards_coefficient=0.1)[0],
        O.nash_md_loss(big, lp, m, np.ones(B))[0],
    ]
    for o in outs:
        assert np.isfinite(float(o))
    # all-masked batch: finite, zero gradient
    z = np.zeros_like(m)
    g = jax.grad(lambda x: O.cpo_loss(x, lp, z, z)[0])(jnp.asarray(lp))
    assert np.all(np.asarray(g) == 0.0)
    g = jax.grad(lambda x: O.kto_loss(x, lp, labels, mask=z, kl=0.0)[0])(jnp.asarray(lp))
    assert np.all(np.asarray(g) == 0.0)


def test_bf16_inputs_compute_in_float32():
    _, lp, m = _data(31)
    lpb = jnp.asarray(lp, jnp.bfloat16)
    loss, _ = O.cpo_loss(lpb, lpb * 1.1, m, m)
    assert loss.dtype == jnp.float32
    loss, _ = O.kto_loss(lpb, lpb, np.ones(B, bool), mask=m, kl=0.0)
    assert loss.dtype == jnp.float32
    ref = O.cpo_loss(np.asarray(lpb, np.float32), np.asarray(lpb * 1.1, np.float32), m, m)[0]
    _close(O.cpo_loss(lpb, lpb * 1.1, m, m)[0], ref, rtol=1e-6)


def test_micro_batches_sum_to_full_batch():
    _, lp, m = _data(32, b=6)
    ref = lp * 0.9
    labels = np.array([1, 0, 1, 1, 0, 0], bool)
    full = O.kto_loss(lp, ref, labels, mask=m, kl=0.2)[0]
    parts = sum(O.kto_loss(lp[i:i + 2], ref[i:i + 2], labels[i:i + 2], mask=m[i:i + 2], kl=0.2, num_sequences=6)[0]
                for i in (0, 2, 4))
    _close(parts, full)


# ================================================================================ bad input


def test_bad_inputs_name_the_argument():
    _, lp, m = _data(33)
    with pytest.raises(ValueError, match=r"loss_type='dpo'.*allowed values: 'kto', 'apo_zero_unpaired'"):
        O.kto_loss(lp, lp, np.ones(B, bool), mask=m, kl=0.0, loss_type="dpo")
    with pytest.raises(ValueError, match="loss_type.*'sigmoid', 'hinge', 'ipo', 'simpo', 'alphapo'"):
        O.cpo_loss(lp, lp, m, m, loss_type="sppo")
    with pytest.raises(ValueError, match="loss_type.*'tpo-l'"):
        O.tpo_loss(lp, lp, lp, m, m, m, loss_type="tpo")
    with pytest.raises(ValueError, match="beta=0.0 is out of range"):
        O.cpo_loss(lp, lp, m, m, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing=0.7 is out of range"):
        O.cpo_loss(lp, lp, m, m, label_smoothing=0.7)
    with pytest.raises(ValueError, match="`rejected_mask` must have the same shape"):
        O.cpo_loss(lp, lp, m, m[:, :3])
    with pytest.raises(ValueError, match="`ref_logps` must have shape"):
        O.kto_loss(_seq(lp, m), _seq(lp, m)[:2], np.ones(B, bool), kl=0.0)
    with pytest.raises(ValueError, match="needs `kl` or both `kl_logps` and `ref_kl_logps`"):
        O.kto_loss(lp, lp, np.ones(B, bool), mask=m)
    with pytest.raises(TypeError, match="`state` must be a BCOState"):
        O.bco_loss(lp, lp, np.ones(B, bool), (0.0, 1.0, 1.0), mask=m)
    with pytest.raises(ValueError, match="`gold_logps` and `gold_mask` are required"):
        O.tpo_loss(lp, lp, None, m, m, None)
    with pytest.raises(ValueError, match="sync_steps=0 is out of range"):
        O.trdpo_ref_update({}, {}, 0, sync_steps=0)
    with pytest.raises(ValueError, match="alpha=1.5 is out of range"):
        O.trdpo_soft_update({}, {}, 1.5)
    with pytest.raises(TypeError, match="`policy_logps` must be a floating array"):
        O.kto_loss(np.ones(B, int), np.ones(B), np.ones(B, bool), kl=0.0)
    with pytest.raises(ValueError, match="`preference_probs` must have shape"):
        O.nash_md_loss(lp, lp, m, np.ones(B + 1))
    with pytest.raises(TypeError, match="`labels` must be an integer array"):
        O.process_reward_loss(np.zeros((2, 3, 2)), np.zeros((2, 3)), np.ones((2, 3), bool))


def test_kto_kl_pairs_and_prm_last_step_only():
    ids = np.arange(12).reshape(4, 3)
    out = O.kto_kl_pairs({"ids": ids, "mask": ids > 4})
    _close(out["ids"], ids[[3, 0, 1, 2]])  # (x_1, y_4), (x_2, y_1), ...
    _close(out["mask"], (ids > 4)[[3, 0, 1, 2]])
    r = np.random.default_rng(40)
    z = r.normal(size=(3, 6, 2))
    labels = r.integers(0, 2, (3, 6))
    m = np.array([[1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    last = np.zeros_like(m)
    last[0, 4] = last[1, 1] = True
    lp = log_softmax(z)
    tok = np.take_along_axis(lp, labels[..., None], -1)[..., 0]
    _close(O.process_reward_loss(z, labels, m, last_step_only=True)[0], -tok[last].sum() / last.sum())


def test_jit_matches_eager():
    r, lp, m = _data(41)
    ref = lp * 0.9
    labels = np.array([True, False, True, False])
    fns = [
        lambda x: O.kto_loss(x, ref, labels, mask=m, kl_logps=x[::-1], ref_kl_logps=ref, kl_mask=m)[0],
        lambda x: O.bco_loss(x, ref, labels, O.bco_init(jnp.float64), mask=m)[0],
        lambda x: O.orpo_loss(x, ref, m, m)[0],
        lambda x: O.cpo_loss(x, ref, m, m, loss_type="alphapo", alpha=0.3)[0],
        lambda x: O.tpo_loss(x, ref, x, m, m, m, loss_type="tpo-l")[0],
        lambda x: O.xpo_loss(x, ref, ref, x, x, chosen_mask=m, rejected_mask=m, ref_sample_mask=m)[0],
        lambda x: O.nash_md_loss(x, ref, m, np.full(B, 0.7))[0],
        lambda x: O.astar_po_loss(x, ref, np.ones(B), np.zeros(B), mask=m)[0],
        lambda x: O.reward_model_loss(x[:, 0], x[:, 1], margin=x[:, 2] * 0, center_rewards_coefficient=0.01)[0],
    ]
    for fn in fns:
        _close(jax.jit(fn)(lp), fn(lp), rtol=1e-12)


# every sequence-level recipe: padding columns (garbage under a False mask) and row permutations
# leave the loss unchanged, and the gradient w.r.t. padded positions is exactly zero
_RECIPES = {
    "kto": lambda a, b, ma, mb, lab: O.kto_loss(a, b, lab, mask=ma, kl_logps=b, ref_kl_logps=a * 0.5, kl_mask=mb)[0],
    "bco": lambda a, b, ma, mb, lab: O.bco_loss(a, b, lab, O.bco_init(jnp.float64), mask=ma, beta=0.3)[0],
    "orpo": lambda a, b, ma, mb, lab: O.orpo_loss(a, b, ma, mb, beta=0.5)[0],
    "cpo_ipo": lambda a, b, ma, mb, lab: O.cpo_loss(a, b, ma, mb, loss_type="ipo")[0],
    "alphapo": lambda a, b, ma, mb, lab: O.alphapo_loss(a, b, ma, mb)[0],
    "tpo": lambda a, b, ma, mb, lab: O.tpo_loss(a, b, b, ma, mb, mb, loss_type="sigmoid", tpo_alpha=0.5)[0],
    "online_dpo": lambda a, b, ma, mb, lab: O.online_dpo_loss(a, b, b, a * 1.2, chosen_mask=ma, rejected_mask=mb)[0],
    "xpo": lambda a, b, ma, mb, lab: O.xpo_loss(a, b, b, a, a, chosen_mask=ma, rejected_mask=mb, ref_sample_mask=ma,
                                              alpha=0.1)[0],
    "nash_md": lambda a, b, ma, mb, lab: O.nash_md_loss(a, b, ma, lab.astype(float) * 0.6 + 0.2)[0],
    "astar_po": lambda a, b, ma, mb, lab: O.astar_po_loss(a, b, lab.astype(float), jnp.zeros(a.shape[0]), mask=ma)[0],
}


@given(_seeds, st.sampled_from(sorted(_RECIPES)))
def test_recipes_padding_permutation_finite(seed, name):
    fn = _RECIPES[name]
    r, a, ma = _data(seed)
    _, b, _ = _data(seed + 1)
    mb = ma.copy()
    lab = r.random(B) > 0.5
    base, g = jax.value_and_grad(lambda x: fn(x, b, ma, mb, lab))(jnp.asarray(a))
    assert np.isfinite(float(base)) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~ma] == 0.0)
    pad = lambda x, v: np.concatenate([x, np.full((B, 2), v)], 1)
    pv, pg = jax.value_and_grad(lambda x: fn(x, pad(b, np.inf), pad(ma, False), pad(mb, False), lab))(
        jnp.asarray(pad(a, np.nan)))
    _close(pv, base, rtol=1e-9)
    assert np.all(np.asarray(pg)[:, -2:] == 0.0)
    perm = r.permutation(B)
    _close(fn(a[perm], b[perm], ma[perm], mb[perm], lab[perm]), base, rtol=1e-9)


@given(_seeds)
def test_process_reward_and_values_properties(seed):
    r = np.random.default_rng(seed)
    z = r.normal(size=(3, 6, 2))
    labels = r.integers(0, 2, (3, 6))
    m = r.random((3, 6)) > 0.4
    base = O.process_reward_loss(z, labels, m)[0]
    assert float(base) >= 0.0
    # unlabelled positions (any label, any logits) change nothing
    z2 = np.where(m[..., None], z, 1e6)
    _close(O.process_reward_loss(z2, np.where(m, labels, -100), m)[0], base, rtol=1e-9)
    # V* lies between the mean and the max reward (soft-max with β₁ > 0), and is shift-equivariant
    rew = r.normal(size=(2, 5))
    v = np.asarray(O.astar_po_values(rew, 0.5))
    assert np.all(v >= rew.mean(-1) - 1e-12) and np.all(v <= rew.max(-1) + 1e-12)
    _close(O.astar_po_values(rew + 3.0, 0.5), v + 3.0, rtol=1e-9)


def test_bco_udm_weights():
    p = np.array([0.0, 0.2, 0.5, 0.9, 0.999])
    want = np.clip(p / (1 - p + 1e-8), 0.5, 10.0)
    _close(O.bco_udm_weights(p), want)
    # weighted undesirable rows: L = mean(w_i · −log σ(−(r − δ))) on those rows
    _, lp, m = _data(42)
    ref = lp * 0.8
    labels = np.array([True, False, False, True])
    w = np.where(labels, 1.0, np.asarray(O.bco_udm_weights(np.array([0.1, 0.3, 0.7, 0.2]))))
    loss, st1, _ = O.bco_loss(lp, ref, labels, O.bco_init(jnp.float64), mask=m, weights=w)
    rew = 0.01 * (_seq(lp, m) - _seq(ref, m))
    z = rew - float(st1.mean)
    _close(loss, np.mean(w * np.where(labels, -log_sigmoid(z), -log_sigmoid(-z))))
    with pytest.raises(ValueError, match="max_density_ratio=0.1 is out of range"):
        O.bco_udm_weights(p, max_density_ratio=0.1)


def test_kto_kl_baseline_across_devices():
    # two equal shards under a named axis: pmean of the shard means = the global mean (before the clamp)
    r = np.random.default_rng(43)
    kl, ref = r.normal(size=(2, 3)), r.normal(size=(2, 3))
    z = jax.vmap(lambda a, b: O.kto_kl_baseline(a, b, axis_name="d"), axis_name="d")(kl, ref)
    _close(z, np.full(2, max(np.mean(kl - ref), 0.0)))
    shard0 = float(O.kto_kl_baseline(kl[0], ref[0]))
    _close(shard0, max(np.mean(kl[0] - ref[0]), 0.0))
