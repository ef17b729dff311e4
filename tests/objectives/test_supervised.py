"""Tests for objectives/supervised.py: SFT NLL / DFT and BEMA.

float64 NumPy references (value, and gradient by central differences), parity with TRL 1.16's
``SFTTrainer.compute_loss`` (``nll`` / ``dft``, with and without ``num_items_in_batch``) and with
``trl.BEMACallback`` driven step by step on a small torch module (rtol 1e-6 / 1e-12), hypothesis
properties, bad-input errors.
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
from _trl_oracles import fd_grad, stub  # noqa: E402

RTOL = 1e-6


def _close(a, b, rtol=RTOL, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _data(seed, b=4, t=6):
    r = np.random.default_rng(seed)
    lp = np.log(r.uniform(0.02, 0.98, (b, t)))
    m = r.random((b, t)) > 0.3
    return r, lp, m


def np_sft(lp, m, loss_type, n=None):
    p = np.exp(lp)
    per = -lp if loss_type == "nll" else -p * lp
    n = m.sum() if n is None else n
    return np.where(m, per, 0).sum() / max(n, 1)


def np_sft_grad(lp, m, loss_type, n=None):
    # DFT: the probability weight is a stop-gradient, so ∂/∂ℓ (−sg(p)·ℓ) = −p
    w = np.ones_like(lp) if loss_type == "nll" else np.exp(lp)
    n = m.sum() if n is None else n
    return np.where(m, -w, 0) / max(n, 1)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_sft_reference(loss_type, num_items):
    _, lp, m = _data(0)
    val, g = jax.value_and_grad(lambda x: O.sft_loss(x, m, loss_type=loss_type, num_items=num_items)[0])(jnp.asarray(lp))
    _close(val, np_sft(lp, m, loss_type, num_items))
    _close(g, np_sft_grad(lp, m, loss_type, num_items))
    if loss_type == "nll":  # NLL has no stop-gradient: the finite difference of the value agrees
        _close(g, fd_grad(lambda x: np_sft(x, m, "nll", num_items), lp), rtol=1e-5, atol=1e-9)


def test_dft_per_token():
    _, lp, _ = _data(1)
    _close(O.dft_per_token_loss(lp), -np.exp(lp) * lp)
    g = jax.grad(lambda x: jnp.sum(O.dft_per_token_loss(x)))(jnp.asarray(lp))
    _close(g, -np.exp(lp))


def test_sft_mask():
    r = np.random.default_rng(2)
    att, comp, asst = (r.random((3, 5)) > 0.3 for _ in range(3))
    _close(O.sft_mask(att), att)
    _close(O.sft_mask(att, completion_mask=comp.astype(int)), att & comp)
    _close(O.sft_mask(att, completion_mask=comp, assistant_mask=asst), att & comp & asst)


@given(st.integers(0, 2**31 - 1), st.sampled_from(["nll", "dft"]))
def test_sft_micro_batches_sum_to_full_batch(seed, loss_type):
    _, lp, m = _data(seed, b=6)
    full = O.sft_loss(lp, m, loss_type=loss_type)[0]
    n = int(m.sum())
    parts = sum(O.sft_loss(lp[i:i + 2], m[i:i + 2], loss_type=loss_type, num_items=n)[0] for i in (0, 2, 4))
    _close(parts, full)
    # masked garbage never leaks
    lp_bad = np.where(m, lp, np.nan)
    _close(O.sft_loss(lp_bad, m, loss_type=loss_type)[0], full)
    g = jax.grad(lambda x: O.sft_loss(x, m, loss_type=loss_type)[0])(jnp.asarray(lp_bad))
    assert np.all(np.isfinite(np.asarray(g)))


def test_sft_edge_cases():
    _, lp, m = _data(3)
    z = np.zeros_like(m)
    loss, _ = O.sft_loss(lp, z)
    assert float(loss) == 0.0
    assert np.all(np.asarray(jax.grad(lambda x: O.sft_loss(x, z)[0])(jnp.asarray(lp))) == 0)
    lb = jnp.asarray(lp, jnp.bfloat16)
    loss, _ = O.sft_loss(lb, m, loss_type="dft")
    assert loss.dtype == jnp.float32
    _close(loss, np_sft(np.asarray(lb, np.float64), m, "dft"), rtol=1e-6)
    assert np.isfinite(float(O.sft_loss(np.full_like(lp, -1e30), m)[0]))


# ------------------------------------------------------------------------------------ TRL SFT parity


@pytest.mark.trl
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("num_items", [None, 29])
def test_sft_trl_parity(loss_type, num_items):
    torch = pytest.importorskip("torch")
    from trl.trainer.sft_trainer import SFTTrainer

    _, lp, m = _data(4)
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    m_t = torch.tensor(m)
    s = stub(args=types.SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=True),
             compute_loss_func=None, label_smoother=None, get_tp_size=lambda: 1)
    out = types.SimpleNamespace(log_probs=torch.where(m_t, lp_t, torch.zeros((), dtype=torch.float64)),
                                label_mask=m_t, entropy=torch.zeros_like(lp_t), is_top1=torch.zeros_like(m_t))
    inputs = {"input_ids": torch.zeros((4, 6), dtype=torch.long), "attention_mask": torch.ones((4, 6), dtype=torch.long),
              "labels": torch.zeros((4, 6), dtype=torch.long)}
    nib = None if num_items is None else torch.tensor(num_items)
    loss_t = SFTTrainer.compute_loss(s, lambda **k: out, inputs, num_items_in_batch=nib)
    loss_t.backward()
    val, g = jax.value_and_grad(lambda x: O.sft_loss(x, m, loss_type=loss_type, num_items=num_items)[0])(
        jnp.asarray(lp))
    _close(val, loss_t.item())
    _close(g, lp_t.grad.numpy())


# ---------------------------------------------------------------------------------------------- BEMA


def np_bema(thetas, phi, kappa, eta, rho, tau, gamma, beta_min):
    """BEMA from the paper (arXiv 2508.00180, alg. 1) on a list θ_0 (init), θ_1, θ_2, …"""
    theta0 = thetas[0].copy()
    ema = thetas[0].copy()
    out = thetas[0].copy()
    outs = []
    for t in range(1, len(thetas)):
        th = thetas[t]
        if t < tau:
            pass
        elif t == tau:
            theta0, ema = th.copy(), th.copy()
        elif (t - tau) % phi == 0:
            beta = max((rho + gamma * t) ** (-kappa), beta_min)
            alpha = (rho + gamma * t) ** (-eta)
            ema = (1 - beta) * ema + beta * th
            out = ema + alpha * (th - theta0)
        outs.append(out.copy())
    return outs


BEMA_CASES = [
    dict(update_freq=1, ema_power=0.5, bias_power=0.2, lag=10, update_after=0, multiplier=1.0, min_ema_multiplier=0.0),
    dict(update_freq=3, ema_power=0.5, bias_power=0.2, lag=10, update_after=0, multiplier=1.0, min_ema_multiplier=0.0),
    dict(update_freq=2, ema_power=0.7, bias_power=0.4, lag=3, update_after=3, multiplier=2.0, min_ema_multiplier=0.0),
    dict(update_freq=1, ema_power=0.5, bias_power=0.0, lag=1, update_after=0, multiplier=1.0, min_ema_multiplier=0.3),
    dict(update_freq=2, ema_power=0.0, bias_power=8.0, lag=10, update_after=1, multiplier=0.5, min_ema_multiplier=0.0),
]


def _trajectory(seed, n=10):
    r = np.random.default_rng(seed)
    return [{"w": r.normal(size=(3, 2)), "b": r.normal(size=(2,))} for _ in range(n)]


_BEMA_JIT = {}


def _run_bema(cfg, traj):
    key = tuple(sorted(cfg.items()))
    if key not in _BEMA_JIT:
        tx = O.bema(**cfg)
        _BEMA_JIT[key] = (tx, jax.jit(tx.update))
    tx, upd = _BEMA_JIT[key]
    state = tx.init(traj[0])
    outs = []
    for p in traj[1:]:
        out, state = upd(p, state)
        outs.append(out)
    return outs, state


@pytest.mark.parametrize("cfg", BEMA_CASES)
def test_bema_reference(cfg):
    traj = _trajectory(5)
    outs, state = _run_bema(cfg, traj)
    args = [cfg[k] for k in ("update_freq", "ema_power", "bias_power", "lag", "update_after", "multiplier",
                             "min_ema_multiplier")]
    for leaf in ("w", "b"):
        want = np_bema([p[leaf] for p in traj], *args)
        for got, exp in zip(outs, want):
            _close(got[leaf], exp, rtol=1e-12)
    assert int(state.step) == len(traj) - 1


@pytest.mark.trl
@pytest.mark.parametrize("cfg", BEMA_CASES)
def test_bema_trl_parity(cfg):
    torch = pytest.importorskip("torch")
    from trl import BEMACallback

    class Tiny(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.w = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    traj = _trajectory(6)
    model = Tiny(types.SimpleNamespace())
    with torch.no_grad():
        model.w.copy_(torch.tensor(traj[0]["w"]))
        model.b.copy_(torch.tensor(traj[0]["b"]))
    cb = BEMACallback(**cfg)
    state = types.SimpleNamespace(global_step=0, is_world_process_zero=True)
    cb.on_train_begin(None, state, None, model)
    outs, _ = _run_bema(cfg, traj)
    for step, p in enumerate(traj[1:], start=1):
        with torch.no_grad():
            model.w.copy_(torch.tensor(p["w"]))
            model.b.copy_(torch.tensor(p["b"]))
        state.global_step = step
        cb.on_step_end(None, state, None, model)
        _close(outs[step - 1]["w"], cb.running_model.w.detach().numpy(), rtol=1e-12)
        _close(outs[step - 1]["b"], cb.running_model.b.detach().numpy(), rtol=1e-12)


@given(st.integers(0, 2**31 - 1))
def test_bema_properties(seed):
    r = np.random.default_rng(seed)
    p0 = {"w": r.normal(size=(3, 2))}
    # constant parameters are a fixed point
    tx = O.bema(update_freq=1)
    out, st_ = tx.update(p0, tx.init(p0))
    _close(out["w"], p0["w"], rtol=1e-12)
    # κ = 0 (no averaging: β = 1) and η = 0 (α = 1): BEMA = θ_t + (θ_t − θ₀)
    tx = O.bema(update_freq=1, ema_power=0.0, bias_power=0.0)
    p1 = {"w": r.normal(size=(3, 2))}
    out, _ = tx.update(p1, tx.init(p0))
    _close(out["w"], 2 * p1["w"] - p0["w"], rtol=1e-12)


def test_bema_bf16_params_keep_dtype_and_wide_state():
    tx = O.bema(update_freq=1)
    p = {"w": jnp.ones((2, 2), jnp.bfloat16)}
    state = tx.init(p)
    out, state = tx.update({"w": jnp.full((2, 2), 2.0, jnp.bfloat16)}, state)
    assert out["w"].dtype == jnp.bfloat16
    assert state.ema["w"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out["w"], np.float32)))


def test_bad_inputs():
    _, lp, m = _data(7)
    with pytest.raises(ValueError, match=r"loss_type='chunked_nll' is not allowed; allowed values: 'nll', 'dft'"):
        O.sft_loss(lp, m, loss_type="chunked_nll")
    with pytest.raises(ValueError, match="`mask` must have the same shape as `logps`"):
        O.sft_loss(lp, m[:, :2])
    with pytest.raises(ValueError, match="`logps` must have rank 2"):
        O.sft_loss(lp[0], m[0])
    with pytest.raises(ValueError, match="`completion_mask` must have the same shape"):
        O.sft_mask(m, completion_mask=m[:2])
    with pytest.raises(ValueError, match="update_freq=0 is out of range"):
        O.bema(update_freq=0)
    with pytest.raises(ValueError, match="update_freq=2.5 must be an integer"):
        O.bema(update_freq=2.5)
    with pytest.raises(ValueError, match="min_ema_multiplier=1.5 is out of range"):
        O.bema(min_ema_multiplier=1.5)
    with pytest.raises(ValueError, match="lag=0 and multiplier=0"):
        O.bema(lag=0.0, multiplier=0.0)
