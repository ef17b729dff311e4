"""Per-token log-probs / entropy: NumPy float64 references, TRL 1.16 oracle, fused kernel == plain path.

References are written from the definitions (log-softmax, Shannon entropy, and their analytic logits
gradients ``onehot − p`` and ``−p (log p + H)``) in float64 NumPy; TRL's ``selective_log_softmax`` and
``entropy_from_logits`` run on float64 torch tensors. The fused kernel is compared with the plain path and
with the NumPy reference in value and in gradient w.r.t. the hidden states and the LM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from trlax.objectives import fused_logps_and_entropy, logps_and_entropy, token_entropy, token_logps
from trlax.objectives import logprobs as lp_mod

B, T, H, V = 3, 5, 8, 37


def np_logsoftmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_ref(logits, targets, temp):
    """float64 reference values and analytic d/d logits of sum(c1·logp + c2·H)."""
    z = np.asarray(logits, np.float64) / temp
    logp_all = np_logsoftmax(z)
    p = np.exp(logp_all)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    ent = -(p * logp_all).sum(-1)
    return logp, ent, logp_all, p


def np_grad_logits(logits, targets, temp, c1, c2):
    _, ent, logp_all, p = np_ref(logits, targets, temp)
    onehot = np.eye(logits.shape[-1])[targets]
    gz = c1[..., None] * (onehot - p) - c2[..., None] * p * (logp_all + ent[..., None])
    return gz / temp


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    h = rng.randn(B, T, H)
    w = rng.randn(V, H) * 0.7
    y = rng.randint(0, V, (B, T))
    c1, c2 = rng.randn(B, T), rng.randn(B, T)
    return h, w, y, c1, c2


# ------------------------------------------------------------------------------------ plain path


@pytest.mark.parametrize("temp", [1.0, 0.7, 1.6])
def test_plain_matches_numpy_value_and_grad(data, temp):
    h, w, y, c1, c2 = data
    logits = h @ w.T
    ref_lp, ref_ent, _, _ = np_ref(logits, y, temp)
    lp, ent = logps_and_entropy(jnp.asarray(logits), jnp.asarray(y), temp)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(token_logps(logits, y, temp), ref_lp, atol=1e-12)
    np.testing.assert_allclose(token_entropy(logits, temp), ref_ent, atol=1e-12)
    g = jax.grad(lambda z: jnp.sum(c1 * logps_and_entropy(z, y, temp)[0]) + jnp.sum(c2 * token_entropy(z, temp)))(
        jnp.asarray(logits))
    np.testing.assert_allclose(g, np_grad_logits(logits, y, temp, c1, c2), rtol=1e-9, atol=1e-12)


@pytest.mark.trl
def test_plain_matches_trl(data):
    torch = pytest.importorskip("torch")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    h, w, y, c1, c2 = data
    logits = h @ w.T
    for temp in (1.0, 0.6):
        zt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        lp_t = trl_utils.selective_log_softmax(zt, torch.tensor(y), temperature=temp)
        ent_t = trl_utils.entropy_from_logits(zt / temp)
        (lp_t * torch.tensor(c1)).sum().add((ent_t * torch.tensor(c2)).sum()).backward()
        f = lambda z: jnp.sum(c1 * token_logps(z, y, temp)) + jnp.sum(c2 * token_entropy(z, temp))
        lp, ent = logps_and_entropy(jnp.asarray(logits), jnp.asarray(y), temp)
        np.testing.assert_allclose(lp, lp_t.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ent, ent_t.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logits)), zt.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_plain_bf16_and_extreme_inputs():
    rng = np.random.RandomState(1)
    z = rng.randn(4, 50) * 3
    y = rng.randint(0, 50, 4)
    lp, ent = logps_and_entropy(jnp.asarray(z, jnp.bfloat16), y)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32  # computed in float32
    ref_lp, ref_ent, _, _ = np_ref(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float64), y, 1.0)
    np.testing.assert_allclose(lp, ref_lp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)
    # huge logits, -inf logits (masked vocabulary), a one-hot distribution: finite, in range
    big = np.array([[1e30, 0.0, -1e30, 5.0], [0.0, -np.inf, 1.0, -np.inf], [-np.inf, 3.0, -np.inf, -np.inf]])
    lp, ent = logps_and_entropy(jnp.asarray(big), jnp.array([0, 2, 1]))
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(ent))
    np.testing.assert_allclose(lp, [0.0, np.log(np.e / (1 + np.e)), 0.0], atol=1e-12)
    np.testing.assert_allclose(ent, [0.0, np_ref(np.array([0.0, 1.0]), np.array(0), 1.0)[1], 0.0], atol=1e-12)
    g = jax.grad(lambda z: jnp.sum(token_entropy(z)) + jnp.sum(token_logps(z, jnp.array([0, 2, 1]))))(jnp.asarray(big))
    assert np.all(np.isfinite(g))


@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0.5, 1.0, 2.0]))
def test_plain_properties(seed, temp):
    rng = np.random.RandomState(seed)
    z = rng.randn(4, 6, 11) * rng.uniform(0.1, 20)
    y = rng.randint(0, 11, (4, 6))
    lp, ent = logps_and_entropy(z, y, temp)
    assert np.all(np.asarray(lp) <= 0) and np.all(np.asarray(ent) >= -1e-12)
    assert np.all(np.asarray(ent) <= np.log(11) + 1e-12)
    perm = rng.permutation(4)
    lp2, ent2 = logps_and_entropy(z[perm], y[perm], temp)
    np.testing.assert_allclose(lp2, np.asarray(lp)[perm], atol=1e-12)
    np.testing.assert_allclose(ent2, np.asarray(ent)[perm], atol=1e-12)
    # a logit shift per row changes nothing
    lp3, ent3 = logps_and_entropy(z + rng.randn(4, 6, 1) * 5, y, temp)
    np.testing.assert_allclose(lp3, lp, atol=1e-9)
    np.testing.assert_allclose(ent3, ent, atol=1e-9)


# ------------------------------------------------------------------------------------ fused path


def _loss(fn, c1, c2):
    def f(h, w):
        lp, ent = fn(h, w)
        return jnp.sum(c1 * lp) + jnp.sum(c2 * ent)
    return f


@pytest.mark.parametrize("chunk,temp", [(4, 1.0), (15, 0.7), (64, 1.3), (1, 1.0)])
def test_fused_matches_plain_and_numpy(data, chunk, temp):
    h, w, y, c1, c2 = data
    fused = lambda h_, w_: fused_logps_and_entropy(h_, w_, y, temp, chunk_size=chunk)
    plain = lambda h_, w_: logps_and_entropy(jnp.einsum("bth,vh->btv", h_, w_), y, temp)
    lp, ent = fused(jnp.asarray(h), jnp.asarray(w))
    ref_lp, ref_ent, _, _ = np_ref(h @ w.T, y, temp)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-12, atol=1e-12)
    gh, gw = jax.grad(_loss(fused, c1, c2), (0, 1))(jnp.asarray(h), jnp.asarray(w))
    gh_p, gw_p = jax.grad(_loss(plain, c1, c2), (0, 1))(jnp.asarray(h), jnp.asarray(w))
    gz = np_grad_logits(h @ w.T, y, temp, c1, c2)  # [B, T, V]
    np.testing.assert_allclose(gh, np.einsum("btv,vh->bth", gz, w), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gw, np.einsum("btv,bth->vh", gz, h), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gh, gh_p, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gw, gw_p, rtol=1e-9, atol=1e-11)


def test_fused_jit_float32_and_bf16(data):
    h, w, y, c1, c2 = data
    c1, c2 = jnp.asarray(c1, jnp.float32), jnp.asarray(c2, jnp.float32)
    ref_lp, ref_ent, _, _ = np_ref(h @ w.T, y, 0.9)
    gz = np_grad_logits(h @ w.T, y, 0.9, np.asarray(c1, np.float64), np.asarray(c2, np.float64))
    f = jax.jit(jax.value_and_grad(_loss(lambda a, b: fused_logps_and_entropy(a, b, y, 0.9, chunk_size=8),
                                         c1, c2), (0, 1)))
    for dt, atol in ((jnp.float32, 1e-4), (jnp.bfloat16, 0.15)):
        hh, ww = jnp.asarray(h, dt), jnp.asarray(w, dt)
        lp, ent = fused_logps_and_entropy(hh, ww, y, 0.9, chunk_size=8)
        assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
        np.testing.assert_allclose(lp, ref_lp, atol=atol * 2)
        np.testing.assert_allclose(ent, ref_ent, atol=atol * 2)
        _, (gh, gw) = f(hh, ww)
        assert gh.dtype == dt and gw.dtype == dt
        np.testing.assert_allclose(np.asarray(gh, np.float64), np.einsum("btv,vh->bth", gz, w), atol=atol * 4)
        np.testing.assert_allclose(np.asarray(gw, np.float64), np.einsum("btv,bth->vh", gz, h), atol=atol * 4)


def test_fused_extreme_and_empty():
    rng = np.random.RandomState(3)
    h = rng.randn(2, 3, 4) * 1e3  # logits ~1e3-1e4: a near one-hot softmax
    w = rng.randn(9, 4) * 3
    y = rng.randint(0, 9, (2, 3))
    lp, ent = fused_logps_and_entropy(h, w, y, chunk_size=4)
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(ent)) and np.all(np.asarray(lp) <= 0)
    g = jax.grad(lambda a, b: jnp.sum(fused_logps_and_entropy(a, b, y, chunk_size=4)[0]
                                      + fused_logps_and_entropy(a, b, y, chunk_size=4)[1]), (0, 1))(h, w)
    assert all(np.all(np.isfinite(x)) for x in g)
    lp, ent = fused_logps_and_entropy(np.zeros((2, 0, 4)), w, np.zeros((2, 0), np.int32))
    assert lp.shape == (2, 0) and ent.shape == (2, 0)


def test_fused_never_holds_full_logits():
    """XLA's compiled memory analysis of value+grad: the fused temp memory stays below one float32
    [N, V] buffer, while the plain path needs more than one."""
    n, hdim, v, chunk = 2048, 32, 4096, 128
    h = jax.ShapeDtypeStruct((n, hdim), jnp.float32)
    w = jax.ShapeDtypeStruct((v, hdim), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def fused(h, w, y):
        lp, ent = fused_logps_and_entropy(h, w, y, chunk_size=chunk)
        return jnp.sum(lp) + jnp.sum(ent)

    def plain(h, w, y):
        lp, ent = logps_and_entropy(h @ w.T, y)
        return jnp.sum(lp) + jnp.sum(ent)

    full = n * v * 4
    mem = lambda f: jax.jit(jax.grad(f, (0, 1))).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
    fused_temp, plain_temp = mem(fused), mem(plain)
    assert plain_temp >= full
    assert fused_temp < full / 4, (fused_temp, full)


def test_errors():
    z = jnp.zeros((2, 3, 5))
    y = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="temperature"):
        token_logps(z, y, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(z, -1.0)
    with pytest.raises(ValueError, match="targets"):
        token_logps(z, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="targets"):
        token_logps(z, jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="logits"):
        token_logps(jnp.zeros((2, 3, 5), jnp.int32), y)
    with pytest.raises(ValueError, match="lm_head"):
        fused_logps_and_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((5, 3)), y)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_logps_and_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((5, 4)), y, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        fused_logps_and_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((5, 4)), jnp.zeros((3,), jnp.int32))


def test_all_exported():
    assert set(lp_mod.__all__) == {"token_logps", "token_entropy", "logps_and_entropy", "fused_logps_and_entropy"}
    import trlax.objectives as O

    assert all(hasattr(O, n) for n in lp_mod.__all__)
