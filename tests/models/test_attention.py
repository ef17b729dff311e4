"""Blockwise (memory-linear) attention vs the dense reference: values and gradients, every mask the decoder
uses (left padding, packed segments, dense per-query masks, KV-cache prefill / decode), odd lengths, GQA,
fully masked rows; the implementation choice and its errors; the temp memory of the compiled kernel.

Few fixed small shapes (B=2, T=37 not a multiple of the 8/16 blocks, N=4 query / K=2 kv heads, D=8) and one
jitted function per implementation, so the file compiles a handful of programs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trlax.models import Decoder, DecoderConfig
from trlax.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    _cudnn,
    _splash,
    dot_product_attention,
    resolve_implementation,
)

B, T, N, K, D = 2, 37, 4, 2, 8
RNG = np.random.RandomState(0)
Q = jnp.asarray(RNG.randn(B, T, N, D), jnp.float32)
KEYS = jnp.asarray(RNG.randn(B, T, K, D), jnp.float32)
VALS = jnp.asarray(RNG.randn(B, T, K, D), jnp.float32)
COT = jnp.asarray(RNG.randn(B, T, N, D), jnp.float32)  # output cotangent
LEFT = np.ones((B, T), bool)
LEFT[1, :6] = False  # row 1 left-padded
RAGGED = LEFT.copy()
RAGGED[0, 30:] = False  # row 0 right-padded (prompt left-padded, completion right-padded)
SEG = np.array([[1] * 10 + [2] * 20 + [0] * 7, [0] * 5 + [1] * 3 + [2] * 27 + [3] * 2])
TOL = dict(rtol=1e-5, atol=1e-6)


@jax.jit
def _both(q, k, v, cot, row_valid, q_offset, key_mask, q_seg, kv_seg):
    """Outputs and (q, k, v) gradients of the plain and the blockwise kernel (block 8 x 16: several blocks, a
    padded last one). The cotangent is zero on ``row_valid == False`` rows (plain gives those a meaningless
    uniform average; blockwise gives 0)."""
    def run(impl):
        def f(q, k, v):
            o = dot_product_attention(q, k, v, q_offset=q_offset, key_mask=key_mask, q_segment_ids=q_seg,
                                      kv_segment_ids=kv_seg, implementation=impl, block_q=8, block_k=16)
            return jnp.where(row_valid[:, :, None, None], o, 0.0)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(cot)
    return run("plain"), run("blockwise")


def _check(q=Q, k=KEYS, v=VALS, row_valid=None, q_offset=0, key_mask=None, q_seg=None, kv_seg=None):
    row_valid = np.ones(q.shape[:2], bool) if row_valid is None else row_valid
    if q_seg is None and key_mask.ndim == 2:  # one segment: same program as the packed case (one compile)
        q_seg, kv_seg = np.zeros(q.shape[:2], np.int32), np.zeros(k.shape[:2], np.int32)
    (o_p, g_p), (o_b, g_b) = _both(q, k, v, COT[:, :q.shape[1]], row_valid, q_offset, key_mask, q_seg, kv_seg)
    np.testing.assert_allclose(o_b, o_p, **TOL)
    for name, gb, gp in zip("qkv", g_b, g_p):
        np.testing.assert_allclose(gb, gp, **TOL, err_msg=f"d{name}")
    assert float(jnp.max(jnp.abs(o_b))) > 0.1  # not vacuous


def test_blockwise_matches_plain_ragged_left_and_right_padding():
    _check(row_valid=LEFT, key_mask=RAGGED)


def test_blockwise_matches_plain_packed_segments_and_dense_mask():
    valid = SEG > 0
    _check(row_valid=valid, key_mask=valid, q_seg=SEG, kv_seg=SEG)
    dense = valid[:, None, :] & (SEG[:, :, None] == SEG[:, None, :])  # the same mask, [B, T, S]
    _check(row_valid=valid, key_mask=dense)


def test_blockwise_matches_plain_cache_prefill():
    """13 queries at slots [5, 18) of a 37-slot cache (traced offset: the dynamic causal bound). Decode steps
    (T = 1) are checked through the Decoder below."""
    t, off = 13, 5
    _check(q=Q[:, :t], row_valid=LEFT[:, off:off + t], q_offset=jnp.int32(off), key_mask=LEFT)


@jax.jit
def _blockwise_vjp(q, k, v, key_mask):
    def f(q, k, v):
        return dot_product_attention(q, k, v, key_mask=key_mask, implementation="blockwise", block_q=8, block_k=16)
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(COT.astype(o.dtype))


def test_fully_masked_rows_are_zero_with_zero_finite_gradients():
    mask = LEFT.copy()
    mask[0] = False  # row 0 has no valid key at all; row 1's first 6 queries see none either (causal)
    o, (dq, dk, dv) = _blockwise_vjp(Q, KEYS, VALS, mask)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(dq)) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    np.testing.assert_array_equal(o[0], 0.0)
    np.testing.assert_array_equal(o[1, :6], 0.0)
    np.testing.assert_array_equal(dq[0], 0.0)
    np.testing.assert_array_equal(dq[1, :6], 0.0)
    np.testing.assert_array_equal(dk[0], 0.0)
    np.testing.assert_array_equal(dv[1, :6], 0.0)  # masked keys get no gradient


def test_bf16_inputs_accumulate_in_float32():
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (Q, KEYS, VALS))
    out, _ = _blockwise_vjp(qb, kb, vb, LEFT)
    ref, _ = _blockwise_vjp(*(x.astype(jnp.float32) for x in (qb, kb, vb)), LEFT)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[LEFT], np.asarray(ref)[LEFT], atol=3e-2)


def test_cudnn_mask_handling_matches_plain():
    """The cuDNN wrapper's arithmetic (rotate each row's run of valid slots to the front, pass lengths, rotate
    back) run through ``jax.nn.dot_product_attention(implementation="xla")``; a row with a hole takes the
    blockwise fallback."""
    holes = RAGGED.copy()
    holes[1, 20] = False

    @jax.jit
    def both(mask):
        def fallback(q, k, v):
            return jnp.zeros_like(q)  # marks the fallback branch
        out = _cudnn(Q, KEYS, VALS, mask, fallback, dpa_implementation="xla")
        return out, dot_product_attention(Q, KEYS, VALS, key_mask=mask, implementation="plain")

    out, ref = both(RAGGED)
    np.testing.assert_allclose(np.asarray(out)[RAGGED], np.asarray(ref)[RAGGED], **TOL)
    out, _ = both(holes)
    np.testing.assert_array_equal(out, 0.0)


def test_splash_segment_ids_match_plain_in_interpret_mode():
    """The TPU splash path (padding and packing as splash segment ids, T padded to its 128 block) run by the
    Pallas interpreter on CPU (x64 off: the kernel's index arithmetic is int32). Forward only."""
    valid = SEG > 0
    with jax.enable_x64(False):
        out = jax.jit(lambda q, k, v: _splash(q, k, v, valid, SEG, SEG, block=128, interpret=True))(Q, KEYS, VALS)
    ref = dot_product_attention(Q, KEYS, VALS, key_mask=valid, q_segment_ids=SEG, kv_segment_ids=SEG,
                                implementation="plain")
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], **TOL)
    np.testing.assert_array_equal(np.asarray(out)[~valid], 0.0)


def test_implementation_choice_and_errors():
    with pytest.raises(ValueError, match=r"attention_impl='flash'.*allowed values.*'blockwise'"):
        DecoderConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4, attention_impl="flash")
    with pytest.raises(ValueError, match=r"'cudnn'.*gpu.*backend is 'cpu'.*choices on 'cpu'.*'blockwise'"):
        dot_product_attention(Q, KEYS, VALS, implementation="cudnn")
    with pytest.raises(ValueError, match=r"'splash'.*tpu.*backend is 'cpu'"):
        dot_product_attention(Q, KEYS, VALS, implementation="splash")
    rule = dict(s=4096, dtype=jnp.bfloat16, head_dim=64)
    assert resolve_implementation("auto", t=4096, backend="cpu", **rule) == "blockwise"
    assert resolve_implementation("auto", t=4096, backend="gpu", **rule) == "cudnn"
    assert resolve_implementation("auto", t=4096, backend="gpu", **{**rule, "dtype": jnp.float32}) == "blockwise"
    assert resolve_implementation("auto", t=4096, backend="tpu", **rule) == "splash"
    assert resolve_implementation("auto", t=1, backend="tpu", **rule) == "plain"  # decode step
    assert resolve_implementation("auto", t=64, backend="gpu", **{**rule, "s": 64}) == "plain"  # tiny
    assert set(ATTENTION_IMPLEMENTATIONS) == {"auto", "blockwise", "plain", "cudnn", "splash"}


def test_decoder_blockwise_matches_plain_padding_packing_and_cache():
    cfg = DecoderConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=N, num_kv_heads=K, head_dim=D, qkv_bias=True, attention_impl="plain",
                        attention_block_size=8)
    models = [Decoder(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0)) for impl in
              ("plain", "blockwise")]
    ids = jnp.asarray(RNG.randint(0, 64, (B, T)))
    valid, n = SEG > 0, 21

    @nnx.jit
    def logits(m, ids):  # one program per model: full (left + right padding), packed, prefill + one decode step
        full = m(ids, attention_mask=RAGGED)
        packed = m(ids, segment_ids=SEG)
        prefill, cache = m(ids[:, :n - 1], attention_mask=RAGGED[:, :n - 1], cache=m.init_cache(B, T + 3))
        step, _ = m(ids[:, n - 1:n], attention_mask=RAGGED[:, n - 1:n], cache=cache)
        return full, packed, jnp.concatenate([prefill, step], axis=1)

    (full_p, packed_p, cached_p), (full_b, packed_b, cached_b) = (logits(m, ids) for m in models)
    np.testing.assert_allclose(np.asarray(full_b)[RAGGED], np.asarray(full_p)[RAGGED], **TOL)
    np.testing.assert_allclose(np.asarray(packed_b)[valid], np.asarray(packed_p)[valid], **TOL)
    for cached in (cached_b, cached_p):
        np.testing.assert_allclose(np.asarray(cached)[RAGGED[:, :n]], np.asarray(full_p)[:, :n][RAGGED[:, :n]], **TOL)


def test_blockwise_temp_memory_is_linear():
    """value_and_grad at T = 2048 (2 query heads, 1 kv head, D = 16): the compiled program's temp buffers stay
    far below one dense float32 ``[N, T, T]`` score array (which the plain path holds several of)."""
    t, n, d = 2048, 2, 16
    q = jax.ShapeDtypeStruct((1, t, n, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, implementation="blockwise", block_q=256, block_k=256) ** 2)

    temp = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().memory_analysis()
    dense = n * t * t * 4
    assert temp.temp_size_in_bytes < dense / 8, (temp.temp_size_in_bytes, dense)
