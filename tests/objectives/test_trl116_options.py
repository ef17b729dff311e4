"""Tests for the TRL 1.16 objective options (issue 15): SFT label smoothing, GKD ``mean`` / ``sum``
reductions and LM-head logit options, IW-OPD's sparse top-1 divergence, ULD cross-tokenizer distillation.

float64 NumPy references written from the formulas (value; gradient by central differences of the
reference, with the stop-gradient weights frozen), parity with TRL 1.16 / transformers' own code
(``LabelSmoother``, ``GKDTrainer.generalized_jsd_loss``, ``distillation_trainer._chunked_divergence_loss``,
``IWOPDTrainer._compute_local_sparse_top_1_divergence_loss`` on a stand-in ``self``, GOLD's ``ULDLoss``),
hypothesis properties on fixed shapes, bad-input errors.
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
from _trl_oracles import bind, fd_grad, log_softmax, stub, token_logps  # noqa: E402

B, T, V = 2, 4, 6


def _close(a, b, rtol=1e-6, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _data(seed, b=B, t=T, v=V, vt=None):
    r = np.random.default_rng(seed)
    s, te = r.normal(0, 1.5, (b, t, v)), r.normal(0, 1.5, (b, t, v if vt is None else vt))
    m = r.random((b, t)) > 0.25
    m[:, 0] = True
    tok = r.integers(0, v, (b, t))
    return r, s, te, m, tok


def _labels(tok, m):
    return np.where(m, tok, -100)


def np_token_logps(z, tok):
    return np.take_along_axis(log_softmax(z), tok[..., None], -1)[..., 0]


def _vg(loss, static=()):
    """``jit(value_and_grad(loss))`` w.r.t. the first argument, with the named keyword arguments static;
    cached per loss, so every test of a module compiles each (loss, shapes, static values) once."""
    key = (loss, tuple(static))
    if key not in _JIT:
        _JIT[key] = jax.jit(jax.value_and_grad(loss), static_argnames=tuple(static))
    return _JIT[key]


_JIT = {}


# ------------------------------------------------------------------------------------- SFT label smoothing


def np_smoothed_sft(z, tok, m, eps, loss_type, n=None, w=None):
    """(1−ε)·(−log p_t) + ε·mean_v(−log p_v), DFT-weighted by the frozen p_t (``w``), / N."""
    lsm = log_softmax(z)
    lp = np.take_along_axis(lsm, tok[..., None], -1)[..., 0]
    per = (1 - eps) * -lp + eps * -lsm.mean(-1)
    if loss_type == "dft":
        per = (np.exp(lp) if w is None else w) * per
    n = m.sum() if n is None else n
    return np.where(m, per, 0).sum() / max(n, 1)


def _sft_loss(z, tok, m, n=None, *, loss_type, eps):
    return O.sft_loss(token_logps(z, tok), m, loss_type=loss_type, label_smoothing=eps, logits=z, num_items=n)[0]


def _sft(z, tok, m, n=None, *, loss_type, eps):
    return _vg(_sft_loss, ("loss_type", "eps"))(jnp.asarray(z), tok, m, n, loss_type=loss_type, eps=eps)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("eps,num_items", [(0.1, None), (0.3, 9)])
def test_label_smoothing_reference(loss_type, eps, num_items):
    _, z, _, m, tok = _data(0)
    val, g = _sft(z, tok, m, num_items, loss_type=loss_type, eps=eps)
    _close(val, np_smoothed_sft(z, tok, m, eps, loss_type, num_items))
    w = np.exp(np.take_along_axis(log_softmax(z), tok[..., None], -1)[..., 0])  # sg(p_t) frozen
    _close(g, fd_grad(lambda x: np_smoothed_sft(x, tok, m, eps, loss_type, num_items, w), z), rtol=1e-5, atol=1e-9)


@pytest.mark.trl
@pytest.mark.parametrize("num_items", [None, 7])
def test_label_smoothing_transformers_parity(num_items):
    torch = pytest.importorskip("torch")
    from transformers.trainer_pt_utils import LabelSmoother

    _, z, _, m, tok = _data(1)
    zt = torch.tensor(z, requires_grad=True)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    loss_t = LabelSmoother(epsilon=0.3)({"logits": zt}, torch.tensor(_labels(tok, m)), **kw)
    loss_t.backward()
    val, g = _sft(z, tok, m, num_items, loss_type="nll", eps=0.3)
    # (LabelSmoother sums the uniform term in float32: rtol 1e-5)
    _close(val, loss_t.item(), rtol=1e-5, atol=1e-8)
    _close(g, zt.grad.numpy(), rtol=1e-5, atol=1e-8)


_MEAN_LSM = jax.jit(O.mean_log_softmax)


@given(seed=st.integers(0, 2**16), eps=st.sampled_from([0.0, 0.3]), loss_type=st.sampled_from(["nll", "dft"]))
def test_label_smoothing_properties(seed, eps, loss_type):
    _, z, _, m, tok = _data(seed, b=4)
    val, g = _sft(z, tok, m, loss_type=loss_type, eps=eps)
    # ε = 0 is the plain loss: (1 − ε)·L + ε·U is affine in ε
    if eps != 0.0:
        v0, u = _sft(z, tok, m, loss_type=loss_type, eps=0.0)[0], np.where(m, -_MEAN_LSM(z), 0)
        w = np.exp(np_token_logps(z, tok)) if loss_type == "dft" else 1.0
        _close(val, (1 - eps) * v0 + eps * (w * u).sum() / m.sum())
    # masked positions get no gradient, whatever their logits
    assert np.all(np.asarray(g)[~m] == 0)
    z2 = np.where(m[..., None], z, 1e4)
    _close(_sft(z2, tok, m, loss_type=loss_type, eps=eps)[0], val)
    # micro-batches with the global count add up to the full-batch loss
    n = int(m.sum())
    _close(sum(_sft(z[i:i + 2], tok[i:i + 2], m[i:i + 2], n, loss_type=loss_type, eps=eps)[0] for i in (0, 2)), val)


def test_label_smoothing_errors():
    _, z, _, m, tok = _data(2)
    lp = np_token_logps(z, tok)
    with pytest.raises(ValueError, match="label_smoothing=0.1 needs the full `logits`"):
        O.sft_loss(lp, m, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing=1.5 is out of range"):
        O.sft_loss(lp, m, label_smoothing=1.5, logits=z)
    with pytest.raises(ValueError, match="`logits` must have shape"):
        O.sft_loss(lp, m, label_smoothing=0.1, logits=z[:, :2])


# --------------------------------------------------------------------------- GKD reductions and head options


def np_gjsd(s, t, beta, tau=1.0):
    ps, pt = np.exp(log_softmax(s / tau)), np.exp(log_softmax(t / tau))
    kl = lambda p, q: (p * (np.log(p) - np.log(q))).sum(-1)  # noqa: E731
    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    mix = (1 - beta) * ps + beta * pt
    return beta * kl(pt, mix) + (1 - beta) * kl(ps, mix)


def _gkd_loss(x, t, m, n=None, *, beta, level="token", heads=()):
    return O.gkd_loss(x, t, m, beta=beta, temperature=1.5, level=level, num_items=n, **dict(heads))[0]


def np_head(z, bias=None, scale=1.0, cap=None):
    z = (z + (0 if bias is None else bias)) * scale
    return z if cap is None else cap * np.tanh(z / cap)


@pytest.mark.trl
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("level", ["mean", "sum"])
def test_gkd_mean_sum_reference_and_trl(beta, level):
    torch = pytest.importorskip("torch")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    _, s, t, m, _ = _data(3)

    def np_loss(x):
        tot = np.where(m, np_gjsd(x, t, beta, 1.5), 0).sum()
        return tot / (m.sum() * V) if level == "mean" else tot

    val, g = _vg(_gkd_loss, ("beta", "level"))(jnp.asarray(s), t, m, beta=beta, level=level)
    _close(val, np_loss(s))
    _close(g, fd_grad(np_loss, s), rtol=1e-5, atol=1e-8)
    st_ = torch.tensor(s, requires_grad=True)
    loss_t = GKDTrainer.generalized_jsd_loss(st_, torch.tensor(t), labels=torch.tensor(np.where(m, 1, -100)),
                                             beta=beta, temperature=1.5, reduction=level)
    loss_t.backward()
    _close(val, loss_t.item())
    _close(g, st_.grad.numpy())


HEADS = dict(student_lm_head_bias=np.linspace(-1, 1, V), teacher_lm_head_bias=np.linspace(0.5, -0.5, V),
             student_logit_scale=0.7, teacher_logit_scale=1.3, student_final_logit_softcapping=2.0,
             teacher_final_logit_softcapping=3.0)
_SCALARS = tuple((k, v) for k, v in HEADS.items() if np.ndim(v) == 0)  # static (Python numbers)


def _heads_loss(x, t, m, bs, bt, n=None, *, beta, proj=False):
    if proj:  # x, t are hidden states; bs, bt are (LM-head bias, LM-head weight) pairs
        (bs, ws), (bt, wt) = bs, bt
        x, t = x @ ws.T, t @ wt.T
    return O.gkd_loss(x, t, m, beta=beta, temperature=1.2, num_items=n, student_lm_head_bias=bs,
                      teacher_lm_head_bias=bt, **dict(_SCALARS))[0]


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gkd_head_options_reference(beta):
    _, s, t, m, _ = _data(4)
    h = HEADS

    def np_loss(x):
        xs = np_head(x, h["student_lm_head_bias"], h["student_logit_scale"], h["student_final_logit_softcapping"])
        xt = np_head(t, h["teacher_lm_head_bias"], h["teacher_logit_scale"], h["teacher_final_logit_softcapping"])
        return np.where(m, np_gjsd(xs, xt, beta, 1.2), 0).sum() / m.sum()

    val, g = _vg(_heads_loss, ("beta",))(jnp.asarray(s), t, m, h["student_lm_head_bias"], h["teacher_lm_head_bias"],
                                         beta=beta)
    _close(val, np_loss(s))
    _close(g, fd_grad(np_loss, s), rtol=1e-5, atol=1e-8)
    # the transform alone; defaults are the identity
    _close(jax.jit(O.transform_logits, static_argnames=("scale", "softcap"))(
        s, bias=h["student_lm_head_bias"], scale=0.7, softcap=2.0), np_head(s, h["student_lm_head_bias"], 0.7, 2.0))


@pytest.mark.trl
@pytest.mark.parametrize("beta,num_items", [(0.0, None), (0.5, 9), (1.0, None)])
def test_gkd_head_options_trl_parity(beta, num_items):
    """TRL ``DistillationTrainer``'s chunked loss takes hidden states and LM heads; trlax gets the logits
    ``h·Wᵀ`` and the same options (TRL computes in float32: rtol 2e-5)."""
    torch = pytest.importorskip("torch")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    r, _, _, m, _ = _data(5)
    hs, ht = r.normal(0, 1, (B, T, 5)), r.normal(0, 1, (B, T, 3))
    ws, wt = r.normal(0, 1, (V, 5)), r.normal(0, 1, (V, 3))
    h = HEADS
    hs_t = torch.tensor(hs, dtype=torch.float32, requires_grad=True)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    loss_t, _, _ = _chunked_divergence_loss(
        hs_t, f32(ht), f32(ws), f32(wt), torch.tensor(m.astype(np.int64)), beta,
        num_items_in_batch=num_items, student_lm_head_bias=f32(h["student_lm_head_bias"]),
        teacher_lm_head_bias=f32(h["teacher_lm_head_bias"]), student_logit_scale=h["student_logit_scale"],
        teacher_logit_scale=h["teacher_logit_scale"],
        student_final_logit_softcapping=h["student_final_logit_softcapping"],
        teacher_final_logit_softcapping=h["teacher_final_logit_softcapping"], temperature=1.2)
    loss_t.backward()
    val, g = _vg(_heads_loss, ("beta", "proj"))(jnp.asarray(hs), ht, m, (h["student_lm_head_bias"], ws),
                                                (h["teacher_lm_head_bias"], wt), num_items, beta=beta, proj=True)
    _close(val, loss_t.item(), rtol=2e-5, atol=1e-7)
    _close(g, hs_t.grad.numpy(), rtol=2e-4, atol=1e-6)


def test_gkd_options_errors():
    _, s, t, m, _ = _data(6)
    with pytest.raises(ValueError, match="level='batch' is not allowed"):
        O.gkd_loss(s, t, m, level="batch")
    with pytest.raises(TypeError, match="unknown logit option"):
        O.gkd_loss(s, t, m, student_bias=np.zeros(V))
    with pytest.raises(ValueError, match="teacher_logit_scale=0"):
        O.gkd_loss(s, t, m, teacher_logit_scale=0)
    with pytest.raises(ValueError, match="student_final_logit_softcapping=-1"):
        O.gkd_loss(s, t, m, student_final_logit_softcapping=-1)
    with pytest.raises(ValueError, match="`teacher_lm_head_bias` must have shape"):
        O.gkd_loss(s, t, m, teacher_lm_head_bias=np.zeros(V + 1))


# ------------------------------------------------------------------------------- IW-OPD sparse top-1


def np_top1(s, t, tok, beta, tau, add_tail, mode):
    ls, lt = log_softmax(s / tau), log_softmax(t / tau)
    out = np.zeros(s.shape[:2])
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            rev = tok[b, i] if mode == "sampled" else int(np.argmax(s[b, i]))
            top = int(np.argmax(t[b, i]))
            sup = [rev] if beta == 1 else ([top] if rev == top else [top, rev])
            a, c = ls[b, i, sup], lt[b, i, sup]
            if add_tail:
                a, c = np.append(a, np.log1p(-np.exp(a).sum())), np.append(c, np.log1p(-np.exp(c).sum()))
            else:
                a, c = a - np.log(np.exp(a).sum()), c - np.log(np.exp(c).sum())
            ps, pt = np.exp(a), np.exp(c)
            kl = lambda p, q, lp, lq: (p * (lp - lq)).sum()  # noqa: E731
            if beta == 0:
                out[b, i] = kl(pt, ps, c, a)
            elif beta == 1:
                out[b, i] = kl(ps, pt, a, c)
            else:
                mix = (1 - beta) * ps + beta * pt
                out[b, i] = beta * kl(pt, mix, c, np.log(mix)) + (1 - beta) * kl(ps, mix, a, np.log(mix))
    return out


def _top1_data(seed):
    r, s, t, m, tok = _data(seed)
    tok[0, :2] = np.argmax(t[0, :2], -1)  # two positions where the sampled token is the teacher's top-1
    return s, t, m, tok


def _top1_loss(x, t, tok, m, n=None, *, beta=0.5, add_tail=True, mode="sampled"):
    return O.sparse_top1_distillation_loss(x, t, tok, m, beta=beta, temperature=1.3, add_tail=add_tail,
                                           reverse_token=mode, num_items=n)[0]


_TOP1_STATIC = ("beta", "add_tail", "mode")


@pytest.mark.parametrize("beta,add_tail,mode", [(0.0, True, "sampled"), (0.5, True, "sampled"), (1.0, True, "sampled"),
                                                (0.5, False, "sampled"), (0.5, True, "argmax"), (1.0, False, "argmax")])
def test_sparse_top1_reference(beta, add_tail, mode):
    s, t, m, tok = _top1_data(7)

    def np_loss(x):
        return np.where(m, np_top1(x, t, tok, beta, 1.3, add_tail, mode), 0).sum() / m.sum()

    val, g = _vg(_top1_loss, _TOP1_STATIC)(jnp.asarray(s), t, tok, m, beta=beta, add_tail=add_tail, mode=mode)
    _close(val, np_loss(s))
    _close(g, fd_grad(np_loss, s), rtol=1e-5, atol=1e-8)


@pytest.mark.trl
@pytest.mark.parametrize("beta,add_tail,mode,num_items", [(0.5, True, "sampled", None), (1.0, False, "argmax", 11),
                                                         (0.5, True, "argmax", 11)])
def test_sparse_top1_trl_parity(beta, add_tail, mode, num_items):
    torch = pytest.importorskip("torch")
    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    s, t, m, tok = _top1_data(8)
    obj = bind(stub(beta=beta, temperature=1.3, loss_add_tail=add_tail, reverse_kl_top_1_mode=mode,
                    _reduce_divergence_loss=IWOPDTrainer._reduce_divergence_loss), IWOPDTrainer,
               "_get_reverse_kl_top_1_tokens", "_compute_sparse_top_1_divergence_loss")
    st_ = torch.tensor(s, requires_grad=True)
    loss_t = IWOPDTrainer._compute_local_sparse_top_1_divergence_loss(
        obj, st_, torch.tensor(t), torch.tensor(tok), torch.tensor(_labels(tok, m)),
        num_items_in_batch=None if num_items is None else torch.tensor(num_items))
    loss_t.backward()
    val, g = _vg(_top1_loss, _TOP1_STATIC)(jnp.asarray(s), t, tok, m, num_items, beta=beta, add_tail=add_tail,
                                           mode=mode)
    _close(val, loss_t.item())
    _close(g, st_.grad.numpy())


@given(seed=st.integers(0, 2**16), beta=st.sampled_from([0.0, 0.5, 1.0]), scale=st.sampled_from([1.0, 30.0]))
def test_sparse_top1_properties(seed, beta, scale):
    s, t, m, tok = _top1_data(seed)
    s, t = s * scale, t * scale
    val, g = _vg(_top1_loss, _TOP1_STATIC)(jnp.asarray(s), t, tok, m, beta=beta)
    assert np.isfinite(float(val)) and float(val) >= -1e-12 and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~m] == 0)
    # the teacher's own logits give zero divergence
    _close(_vg(_top1_loss, _TOP1_STATIC)(jnp.asarray(t), t, tok, m, beta=beta)[0], 0.0, atol=1e-12)


def test_sparse_top1_errors():
    s, t, m, tok = _top1_data(9)
    with pytest.raises(ValueError, match="reverse_token='max' is not allowed"):
        O.sparse_top1_divergence(s, t, tok, reverse_token="max")
    with pytest.raises(ValueError, match="`tokens` must be integers"):
        O.sparse_top1_divergence(s, t, tok[:, :2])


# ------------------------------------------------------------------------------------------------- ULD


def np_uld(s, t, ms, mt, ts=1.0, tt=1.0):
    rows = []
    for b in range(s.shape[0]):
        n = min(ms[b].sum(), mt[b].sum())
        if n == 0:
            rows.append(0.0)
            continue
        ps = np.sort(np.exp(log_softmax(s[b, :n] / ts)), -1)[:, ::-1]
        pt = np.sort(np.exp(log_softmax(t[b, :n] / tt)), -1)[:, ::-1]
        v = max(ps.shape[-1], pt.shape[-1])
        ps = np.pad(ps, [(0, 0), (0, v - ps.shape[-1])])
        pt = np.pad(pt, [(0, 0), (0, v - pt.shape[-1])])
        rows.append(np.abs(ps - pt).sum() / n)
    return np.mean(rows)


def _uld_data(seed, vt=9, tt=5):
    r = np.random.default_rng(seed)
    s, t = r.normal(0, 1.5, (3, T, V)), r.normal(0, 1.5, (3, tt, vt))
    ms = np.arange(T)[None] < np.array([[4], [2], [0]])
    mt = np.arange(tt)[None] < np.array([[3], [5], [2]])
    return s, t, ms, mt


def _uld_loss(x, t, ms, mt, *, temps=(1.0, 1.0), weight=1.0):
    return O.uld_loss(x, t, ms, mt, student_temperature=temps[0], teacher_temperature=temps[1],
                      distillation_weight=weight)[0]


@pytest.mark.parametrize("vt,tt", [(9, 5), (4, 3)])
def test_uld_reference(vt, tt):
    s, t, ms, mt = _uld_data(10, vt, tt)
    val, g = _vg(_uld_loss, ("temps", "weight"))(jnp.asarray(s), t, ms, mt, temps=(0.8, 1.5), weight=1.0)
    np_loss = lambda x: np_uld(x, t, ms, mt, 0.8, 1.5)  # noqa: E731
    _close(val, np_loss(s))
    _close(g, fd_grad(np_loss, s), rtol=1e-5, atol=1e-8)
    # with the cross-entropy term
    lp = np_token_logps(s, np.zeros((3, T), int))
    got = O.uld_loss(s, t, ms, mt, distillation_weight=0.5, crossentropy_weight=0.3, logps=lp)[0]
    _close(got, 0.5 * np_uld(s, t, ms, mt) + 0.3 * -np.asarray(lp)[ms].mean())


@pytest.mark.trl
def test_uld_trl_parity():
    """GOLD's ``ULDLoss`` (positional alignment: ``use_extended_uld=False``, no hybrid, EOS kept) on answer
    spans behind a 2-token prompt."""
    torch = pytest.importorskip("torch")
    from trl.experimental.gold.gold_trainer import ULDLoss

    s, t, ms, mt = _uld_data(11)
    cfg = types.SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=0.7, uld_student_temperature=0.8,
                                uld_teacher_temperature=1.5, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                                use_extended_uld=False, uld_token_merge_strategy="observed", beta=0.5)
    loss_fn = ULDLoss(cfg)
    pad = lambda x: np.concatenate([np.zeros(x.shape[:1] + (2,) + x.shape[2:]), x], 1)  # noqa: E731
    lab = lambda m: torch.tensor(np.where(pad(m), 1, -100))  # noqa: E731
    ids = lambda m: torch.zeros(pad(m).shape, dtype=torch.long)  # noqa: E731
    st_ = torch.tensor(pad(s), requires_grad=True)
    loss_t = loss_fn(st_, torch.tensor(pad(t)), lab(ms), lab(mt), ids(ms), ids(mt))
    loss_t.backward()
    val, g = _vg(_uld_loss, ("temps", "weight"))(jnp.asarray(s), t, ms, mt, temps=(0.8, 1.5), weight=0.7)
    _close(val, loss_t.item())
    _close(g, st_.grad.numpy()[:, 2:])


def _ULD(*a):
    return _vg(_uld_loss, ("temps", "weight"))(*a)


@given(seed=st.integers(0, 2**16), sharp=st.sampled_from([1.0, 50.0]))
def test_uld_properties(seed, sharp):
    s, t, ms, mt = _uld_data(seed)
    s = s * sharp
    val, g = _ULD(jnp.asarray(s), jnp.asarray(t), ms, mt)
    assert 0.0 <= float(val) <= 2.0 + 1e-9 and np.all(np.isfinite(np.asarray(g)))
    # any permutation of either vocabulary leaves the loss unchanged (ULD needs no token mapping)
    perm = np.random.default_rng(seed).permutation(t.shape[-1])
    _close(_ULD(jnp.asarray(s), jnp.asarray(t[..., perm]), ms, mt)[0], val)
    # unpaired positions (beyond either row length) get no gradient, whatever their logits
    pairs = np.minimum(ms.sum(1), mt.sum(1))
    unpaired = np.arange(T)[None] >= pairs[:, None]
    assert np.all(np.asarray(g)[unpaired] == 0)
    # a teacher with the student's own distribution (same vocabulary size, permuted) gives 0
    s6 = s[:, :, :V]
    _close(_ULD(jnp.asarray(s6), jnp.asarray(np.concatenate([s6[..., ::-1], s6[:, :1, ::-1]], 1)), ms, mt)[0], 0.0,
           atol=1e-12)


def test_uld_errors():
    s, t, ms, mt = _uld_data(12)
    with pytest.raises(ValueError, match="crossentropy_weight=0.5 needs `logps`"):
        O.uld_loss(s, t, ms, mt, crossentropy_weight=0.5)
    with pytest.raises(ValueError, match="teacher_mask"):
        O.uld_loss(s, t, ms, mt[:, :2])
    with pytest.raises(ValueError, match="teacher_temperature=0"):
        O.uld_divergence(s, t[:, :T], teacher_temperature=0)
    with pytest.raises(ValueError, match="`teacher_logits` must have shape"):
        O.uld_divergence(s, t)


# ------------------------------------------------------------------------------------------- BCO UDM


def _udm_data(seed, n=24, d=3):
    r = np.random.default_rng(seed)
    y = r.random(n) < 0.35
    y[:2] = (True, False)
    x = r.normal(0, 1, (n, d)) + 0.8 * y[:, None] * np.array([1.0, -0.5, 0.0])[:d]
    return x, y


def np_udm_objective(theta, x, y, l2):
    """sklearn's ``LogisticRegression(class_weight="balanced", C=1/l2)`` objective, scaled by l2."""
    w, b = theta[:-1], theta[-1]
    s = np.where(y, len(y) / (2 * y.sum()), len(y) / (2 * (~y).sum()))
    z = x @ w + b
    return (s * (np.logaddexp(0, z) - y * z)).sum() + 0.5 * l2 * (w @ w)


_UDM_FIT = jax.jit(lambda x, y, m: O.bco_udm_fit(x, y, mask=m, l2=0.5))
_UDM_PROBS = jax.jit(O.bco_udm_probs)
_UDM_W = jax.jit(lambda p, y: O.bco_udm_weights(p, min_density_ratio=0.6, max_density_ratio=1.5, labels=y))


def test_udm_fit_reference():
    from scipy.optimize import minimize

    x, y = _udm_data(13)
    clf = _UDM_FIT(x, y, None)
    ref = minimize(np_udm_objective, np.zeros(x.shape[1] + 1), args=(x, y, 0.5), method="BFGS",
                   options={"gtol": 1e-12})
    _close(np.append(clf.w, clf.b), ref.x, rtol=1e-5, atol=1e-7)
    # the reference objective is at its minimum: no direction decreases it
    g = fd_grad(lambda t: np_udm_objective(t, x, y, 0.5), np.append(clf.w, clf.b))
    assert np.abs(g).max() < 1e-6
    # probabilities and weights (TRL: ratio p/(1−p+1e-8) clipped, undesirable rows only)
    p = 1 / (1 + np.exp(-(x @ ref.x[:-1] + ref.x[-1])))
    _close(_UDM_PROBS(clf, x), p, rtol=1e-5)
    _close(_UDM_W(_UDM_PROBS(clf, x), y), np.where(y, 1.0, np.clip(p / (1 - p + 1e-8), 0.6, 1.5)), rtol=1e-5)
    # the classifier's output is a constant of the BCO loss
    assert np.all(np.asarray(jax.jit(jax.grad(lambda e: O.bco_udm_probs(clf, e).sum()))(x)) == 0)


def test_udm_weighted_bco_gradient():
    """``bco_loss`` with UDM weights: value and gradient against a float64 NumPy BCO (δ from the batch)."""
    x, y = _udm_data(14, n=8)
    r = np.random.default_rng(14)
    lp, ref = -r.uniform(1, 5, 8), -r.uniform(1, 5, 8)
    w = np.asarray(_UDM_W(_UDM_PROBS(_UDM_FIT(x, y, None), x), y))
    assert np.any(w != 1.0)
    # δ: the running mean after merging this batch into bco_init's moments (mean 0, count 1e-24), a constant
    delta = (0.1 * (lp - ref)).mean() * 8 / (8 + 1e-24)

    def np_loss(v):
        z = 0.1 * (v - ref) - delta
        return np.where(y, np.logaddexp(0, -z), w * np.logaddexp(0, z)).mean()

    val, g = jax.jit(jax.value_and_grad(lambda v: O.bco_loss(v, ref, y, O.bco_init(jnp.float64), beta=0.1,
                                                             weights=w)[0]))(lp)
    _close(val, np_loss(lp))
    _close(g, fd_grad(np_loss, lp), rtol=1e-5, atol=1e-9)


@given(seed=st.integers(0, 2**16))
def test_udm_fit_properties(seed):
    x, y = _udm_data(seed)
    ones = np.ones(len(y), bool)
    clf = _UDM_FIT(x, y, ones)
    theta = np.append(clf.w, clf.b)
    assert np.all(np.isfinite(theta))
    # swapping the labels flips the classifier (balanced weights and the log-loss are symmetric)
    flip = _UDM_FIT(x, ~y, ones)
    _close(np.append(flip.w, flip.b), -theta, rtol=1e-6, atol=1e-9)
    # masked rows change nothing, whatever their embeddings; the row order does not matter
    m = ones.copy()
    m[-4:] = False
    x2 = x.copy()
    x2[-4:] = 1e3
    a = _UDM_FIT(x2, y, m)
    sub = _UDM_FIT(x[:-4], y[:-4], None)
    _close(np.append(a.w, a.b), np.append(sub.w, sub.b), rtol=1e-6, atol=1e-9)
    perm = np.random.default_rng(seed).permutation(len(y))
    pc = _UDM_FIT(x[perm], y[perm], ones)
    _close(np.append(pc.w, pc.b), theta, rtol=1e-6, atol=1e-9)
    w = np.asarray(_UDM_W(_UDM_PROBS(clf, x), np.zeros(len(y), bool)))
    assert np.all((w >= 0.6) & (w <= 1.5))


def test_udm_errors():
    x, y = _udm_data(15)
    with pytest.raises(ValueError, match="l2=0"):
        O.bco_udm_fit(x, y, l2=0)
    with pytest.raises(ValueError, match="num_steps=0"):
        O.bco_udm_fit(x, y, num_steps=0)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        O.bco_udm_fit(x, y[:5])
    with pytest.raises(ValueError, match="`embeddings` must have 3 columns"):
        O.bco_udm_probs(_UDM_FIT(x, y, None), x[:, :2])


# ------------------------------------------------------------------------------- traced hyperparameters


def test_traced_label_smoothing_and_top1_beta():
    """ε and β as JAX scalars (vmapped, differentiated) give the Python-number results: one compile each."""
    _, z, _, m, tok = _data(16)
    eps = jnp.asarray([0.0, 0.1, 0.3])
    f = jax.jit(jax.vmap(lambda e: O.sft_loss(token_logps(z, tok), m, label_smoothing=e, logits=z)[0]))
    _close(f(eps), [np_smoothed_sft(z, tok, m, float(e), "nll") for e in eps])
    # dL/dε = mean(U) − mean(NLL), the loss being affine in ε
    lp = np_token_logps(z, tok)
    d = jax.jit(jax.grad(lambda e: O.sft_loss(lp, m, label_smoothing=e, logits=z)[0]))(0.2)
    _close(d, np.where(m, -log_softmax(z).mean(-1) + lp, 0).sum() / m.sum())
    s, t, m, tok = _top1_data(17)
    betas = jnp.asarray([0.0, 0.5, 1.0])
    g = jax.jit(jax.vmap(lambda b: O.sparse_top1_divergence(s, t, tok, beta=b)))(betas)
    for i, b in enumerate([0.0, 0.5, 1.0]):
        _close(g[i], np_top1(s, t, tok, b, 1.0, True, "sampled"))
