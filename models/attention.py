"""Memory-linear causal attention for :mod:`trlax.models`: a blockwise kernel with a blockwise backward, plus
dispatch to the backend's fused kernels (cuDNN flash attention on GPU, Pallas splash attention on TPU).

Blockwise attention (Rabe & Staats 2021, "Self-attention does not need O(n²) memory", arXiv 2112.05682;
FlashAttention, Dao et al. 2022, arXiv 2205.14135, alg. 1 forward / alg. 2 and app. B.2 backward;
FlashAttention-2, arXiv 2307.08691, alg. 1-2). Queries are cut into blocks of ``block_q`` rows and keys /
values into blocks of ``block_k`` slots. For one query row ``i`` and key blocks ``j = 1, 2, ...`` the forward
keeps a running max ``m``, normaliser ``ℓ`` and unnormalised output ``o`` (the online softmax, Rabe & Staats
sec. 3; FlashAttention alg. 1 lines 9-12)::

    s_ij   = q_i · k_j / √D                       (−∞ where the mask forbids slot j)
    m⁽ʲ⁾   = max(m⁽ʲ⁻¹⁾, max_j s_ij)
    ℓ⁽ʲ⁾   = e^(m⁽ʲ⁻¹⁾ − m⁽ʲ⁾) ℓ⁽ʲ⁻¹⁾ + Σ_j e^(s_ij − m⁽ʲ⁾)
    o⁽ʲ⁾   = e^(m⁽ʲ⁻¹⁾ − m⁽ʲ⁾) o⁽ʲ⁻¹⁾ + Σ_j e^(s_ij − m⁽ʲ⁾) v_j
    out_i  = o / ℓ,     L_i = m + log ℓ            (the row's logsumexp, saved for the backward)

The backward (a ``jax.custom_vjp``) recomputes every block from the saved ``q, k, v, out, L``
(FlashAttention app. B.2, eqs. for dV, dP, dS; FlashAttention-2 alg. 2)::

    P_ij = exp(s_ij − L_i),   Δ_i = Σ_d dO_id · out_id
    dV_j += Σ_i P_ij dO_i,    dP_ij = dO_i · v_j,   dS_ij = P_ij (dP_ij − Δ_i)
    dQ_i += Σ_j dS_ij k_j / √D,    dK_j += Σ_i dS_ij q_i / √D

so neither pass ever holds a ``[T, S]`` array: the temporaries of one step are ``[B, K, G, block_q, block_k]``
and the residuals are ``O(T)``. Scores, softmax statistics and accumulators are float32 (float64 for float64
inputs) whatever the input dtype. With the causal rule, key blocks that lie entirely above the diagonal are
never visited (the loops' bounds are computed from the block indices), which halves the work of a causal
self-attention. Rows with no allowed key (padding queries) give output 0 and zero gradients.

Masking (every path): query ``t`` sits at cache slot ``q_offset + t``; key slot ``s`` is allowed iff
``s <= q_offset + t`` (when ``causal``), ``key_mask[b, s]`` (or ``key_mask[b, t, s]``) is True, and — when
segment ids are given — ``q_segment_ids[b, t] == kv_segment_ids[b, s]`` (packed rows; Krell et al. 2021,
arXiv 2107.02027). Segment ids keep packed rows linear in memory: no dense ``[B, T, S]`` mask is built
except by the ``"plain"`` path.

Implementations (``implementation=``):

- ``"plain"``: the dense reference (float32 ``[B, K, G, T, S]`` scores; memory grows with ``T·S``).
- ``"blockwise"``: the kernel above, any backend.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only; inputs cast to bf16
  unless already bf16/fp16). Used for cache-free self-attention (``T == S``, ``q_offset == 0``) with a
  ``[B, S]`` key mask made of one contiguous run per row (left and/or right padding): rows are rotated so the
  run starts at slot 0 and ``query_seq_lengths`` / ``key_value_seq_lengths`` carry the lengths; a row with
  holes switches the call (``lax.cond``) to the blockwise kernel. Packed segments, dense masks and KV-cache
  calls use the blockwise kernel (the cuDNN entry point of ``jax.nn`` has no segment ids), or the plain one
  when the problem is tiny by the ``"auto"`` rule below (KV-cache decode steps).
- ``"splash"``: ``jax.experimental.pallas.ops.tpu.splash_attention`` (TPU only), for cache-free
  self-attention; padding and packing become splash segment ids. KV-cache calls fall back as for cuDNN.
- ``"auto"``: on GPU ``"cudnn"`` for bf16/fp16 inputs with ``D <= 128`` (else blockwise), on TPU
  ``"splash"``, elsewhere ``"blockwise"`` — except that tiny problems use ``"plain"``, which is faster there:
  ``T <= 16`` (KV-cache decode; ``[B, N, T, S]`` scores are linear in ``S``) or ``T·S <= 2¹⁵`` (on a 2-core
  CPU, 14 / 2 heads of 64, loss + gradient: plain wins at T = 128, blockwise at T = 256 by 2.5x).

Shapes: ``B`` batch, ``T`` queries, ``S`` key slots, ``N`` query heads, ``K`` key/value heads (``N = K·G``),
``D`` head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ATTENTION_IMPLEMENTATIONS", "AttentionMask", "SlotCache", "dot_product_attention",
           "resolve_implementation", "set_attention_impl", "slot_attention"]

ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "plain", "cudnn", "splash")
_BACKEND_KERNELS = {"cudnn": ("gpu", "cuda", "rocm"), "splash": ("tpu",)}
_PLAIN_MAX_T = 16  # auto: plain for KV-cache decode steps ...
_PLAIN_MAX_TS = 2 ** 15  # ... and for problems whose dense scores have at most this many entries per head
_INVALID_KEY = np.iinfo(np.int32).min  # segment id of a masked-out / padded key slot
_PADDED_QUERY = np.iinfo(np.int32).min + 1  # segment id of a padded query row (matches no key)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
    """The key mask of a decoder call, as passed from :class:`~trlax.models.Decoder` down to its attention
    layers when rows are packed: ``key_mask`` ``[B, S]`` bool (valid key slots) and the packed sequences'
    ``q_segment_ids`` ``[B, T]`` / ``kv_segment_ids`` ``[B, S]`` int (a query attends only to keys of its own
    segment). Keeping segment ids instead of a dense ``[B, T, S]`` mask keeps packed rows linear in memory."""

    key_mask: jnp.ndarray
    q_segment_ids: Optional[jnp.ndarray] = None
    kv_segment_ids: Optional[jnp.ndarray] = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotCache:
    """The decode cache of :class:`~trlax.rollouts.JaxSampler`'s shared-prefix, continuous-batching engine:
    the key / values of ``B0`` distinct prompts, written once by one prefill, plus one completion buffer per
    decode *slot*; each slot reads the prompt it is working on, so ``G`` samples of a prompt share one prefill
    and one copy of its keys (Hydragen / cascade attention: Juravsky et al. 2024, arXiv 2402.05099).

    Attributes:
      prefix_k, prefix_v: ``[L, B0, P, K, D]`` the prompts' keys / values (read only while decoding).
      prefix_mask: ``[B0, P]`` bool, real prompt slots (prompts are left-padded).
      prompt: ``[Sl]`` int32, the prompt each slot is working on.
      k, v: ``[L, Sl, N, K, D]`` each slot's own (completion) keys / values.
      length: ``[Sl]`` int32, tokens already in a slot's buffer; a call with ``T`` new tokens writes them at
        ``[length, length + T)`` and query ``t`` sees buffer entries ``< length + t + 1`` (causal). Entries at
        or beyond ``length`` are never read, so a slot that takes a new request only resets ``length``.
      layer: int32 scalar, the layer being run (set by :meth:`~trlax.models.Decoder.run_layers`).
      group: static; ``> 0`` when slot ``s`` works on prompt ``s // group`` (every sample of every prompt has
        its own slot): the prefix scores are then one batched matmul per prompt with no gather.
    """

    prefix_k: jnp.ndarray
    prefix_v: jnp.ndarray
    prefix_mask: jnp.ndarray
    prompt: jnp.ndarray
    k: jnp.ndarray
    v: jnp.ndarray
    length: jnp.ndarray
    layer: jnp.ndarray
    group: int = dataclasses.field(default=0, metadata=dict(static=True))


def slot_attention(q, k_new, v_new, cache: SlotCache):
    """Attention of ``T`` new tokens per slot over their prompt's prefix and the slot's own buffer, after
    writing their keys / values into the buffer at ``[length, length + T)`` (positions past the buffer are
    dropped). One softmax over ``[prefix | buffer]`` (float32 scores), so the result equals
    :func:`dot_product_attention` over the concatenated cache of that row.

    Args:
      q: ``[Sl, T, N, D]``; k_new, v_new: ``[Sl, T, K, D]``; cache: :class:`SlotCache` at ``cache.layer``.

    Returns:
      ``(out [Sl, T, N, D], cache with the new keys / values written)``.
    """
    sl, t, n, d = q.shape
    _, b0, p, kh, _ = cache.prefix_k.shape
    nb = cache.k.shape[2]
    dt, acc = q.dtype, jnp.promote_types(q.dtype, jnp.float32)
    rows = jnp.arange(sl)[:, None]
    cols = cache.length[:, None] + jnp.arange(t)[None, :]  # [Sl, T] buffer entries of the new tokens
    ck = cache.k.at[cache.layer, rows, cols].set(k_new.astype(cache.k.dtype), mode="drop")
    cv = cache.v.at[cache.layer, rows, cols].set(v_new.astype(cache.v.dtype), mode="drop")
    cache = dataclasses.replace(cache, k=ck, v=cv)
    qg = q.reshape(sl, t, kh, n // kh, d)
    pk, pv = cache.prefix_k[cache.layer].astype(dt), cache.prefix_v[cache.layer].astype(dt)
    if cache.group:  # slot s -> prompt s // group: [B0, group, ...] against [B0, P, ...], no gather
        qp = qg.reshape(b0, cache.group, t, kh, n // kh, d)
        s_pre = jnp.einsum("bjtkgd,bpkd->bjkgtp", qp, pk, preferred_element_type=acc).reshape(sl, kh, n // kh, t, p)
        m_pre = jnp.repeat(cache.prefix_mask, cache.group, axis=0)
    else:
        pk, pv = pk[cache.prompt], pv[cache.prompt]
        s_pre = jnp.einsum("stkgd,spkd->skgtp", qg, pk, preferred_element_type=acc)
        m_pre = cache.prefix_mask[cache.prompt]
    bk, bv = ck[cache.layer].astype(dt), cv[cache.layer].astype(dt)
    s_buf = jnp.einsum("stkgd,snkd->skgtn", qg, bk, preferred_element_type=acc)
    m_buf = jnp.arange(nb)[None, None, :] <= cols[:, :, None]  # [Sl, T, N]
    allowed = jnp.concatenate([jnp.broadcast_to(m_pre[:, None, :], (sl, t, p)), m_buf], axis=-1)
    s = jnp.concatenate([s_pre, s_buf], axis=-1) / math.sqrt(d)
    s = jnp.where(allowed[:, None, None], s, jnp.finfo(acc).min)
    w = jax.nn.softmax(s, axis=-1).astype(dt)
    w_pre, w_buf = w[..., :p], w[..., p:]
    if cache.group:
        o_pre = jnp.einsum("bjkgtp,bpkd->bjtkgd", w_pre.reshape(b0, cache.group, kh, n // kh, t, p), pv)
        o_pre = o_pre.reshape(sl, t, kh, n // kh, d)
    else:
        o_pre = jnp.einsum("skgtp,spkd->stkgd", w_pre, pv)
    out = o_pre + jnp.einsum("skgtn,snkd->stkgd", w_buf, bv)
    return out.reshape(sl, t, n, d), cache


def _backend() -> str:
    return jax.default_backend()


def resolve_implementation(implementation: str, *, t: int, s: int, dtype, head_dim: int,
                           backend: Optional[str] = None) -> str:
    """The implementation ``dot_product_attention`` runs for ``implementation`` on ``backend`` (default:
    ``jax.default_backend()``) and a ``[T, S]`` problem; see the module docstring for the ``"auto"`` rule.
    Raises ``ValueError`` for an unknown name or a kernel the backend lacks."""
    backend = _backend() if backend is None else backend
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r} is not allowed; allowed values: "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    if implementation in _BACKEND_KERNELS and backend not in _BACKEND_KERNELS[implementation]:
        avail = [i for i in ATTENTION_IMPLEMENTATIONS if i not in _BACKEND_KERNELS or backend in _BACKEND_KERNELS[i]]
        raise ValueError(f"attention implementation={implementation!r} needs a {_BACKEND_KERNELS[implementation][0]} "
                         f"backend, but the backend is {backend!r}; choices on {backend!r}: {tuple(avail)}")
    if implementation != "auto":
        return implementation
    if t <= _PLAIN_MAX_T or t * s <= _PLAIN_MAX_TS:
        return "plain"
    if backend in _BACKEND_KERNELS["cudnn"]:
        ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128
        return "cudnn" if ok else "blockwise"
    if backend == "tpu":
        return "splash"
    return "blockwise"


# ------------------------------------------------------------------------------------------- plain


def _dense_mask(t, s, q_offset, key_mask, q_segment_ids, kv_segment_ids, causal):
    """``[B or 1, T, S]`` bool: the allowed (query, key) pairs."""
    allowed = jnp.ones((1, t, s), bool)
    if causal:
        q_slot = q_offset + jnp.arange(t)
        allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None]
    if key_mask is not None:
        allowed = allowed & (key_mask if key_mask.ndim == 3 else key_mask[:, None, :])
    if q_segment_ids is not None:
        allowed = allowed & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return allowed


def _plain(q, k, v, allowed):
    """The dense reference: ``softmax(q kᵀ/√D)`` over allowed keys (fully masked rows: uniform weights)."""
    b, t, n, d = q.shape
    kh, dt = k.shape[2], q.dtype
    qg = q.reshape(b, t, kh, n // kh, d)
    acc = jnp.promote_types(dt, jnp.float32)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc) / math.sqrt(d)
    s = jnp.where(allowed[:, None, None], s, jnp.finfo(acc).min)
    p = jax.nn.softmax(s, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, n, d)


# --------------------------------------------------------------------------------------- blockwise


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    causal: bool
    bq: int
    bk: int


def _block_allowed(st: _Static, q_offset, i, j, qseg_i, kseg_j, mask_ij):
    """``[B, 1, 1, bq, bk]`` bool for query block ``i`` against key block ``j``."""
    ok = qseg_i[:, :, None] == kseg_j[:, None, :]
    if st.causal:
        q_slot = q_offset + i * st.bq + jnp.arange(st.bq, dtype=jnp.int32)
        k_slot = j * st.bk + jnp.arange(st.bk, dtype=jnp.int32)
        ok = ok & (k_slot[None, None, :] <= q_slot[None, :, None])
    if mask_ij is not None:
        ok = ok & mask_ij
    return ok[:, None, None]


def _mask_block(maskb, i, j, st: _Static):
    if maskb is None:
        return None
    return jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(maskb, i, 0, keepdims=False),
                                        j * st.bk, st.bk, axis=2)


def _k_blocks_needed(st: _Static, q_offset, i, nk: int):
    """Number of leading key blocks query block ``i`` can see (causal: up to its last row's slot)."""
    if not st.causal:
        return jnp.int32(nk)
    last = q_offset + (i + 1) * st.bq - 1
    return jnp.clip(last // st.bk + 1, 0, nk).astype(jnp.int32)


def _first_q_block(st: _Static, q_offset, j, nq: int):
    """First query block that can see key block ``j`` (causal: its last row's slot reaches ``j·bk``)."""
    if not st.causal:
        return jnp.int32(0)
    return jnp.clip((j * st.bk - q_offset) // st.bq, 0, nq).astype(jnp.int32)


def _fwd_impl(st: _Static, qb, kb, vb, qsegb, ksegb, maskb, q_offset):
    """qb ``[nq, B, K, G, bq, D]``, kb/vb ``[nk, B, K, bk, D]``, qsegb ``[nq, B, bq]``, ksegb ``[nk, B, bk]``,
    maskb ``[nq, B, bq, Sp]`` or None. Returns (out like qb, lse ``[nq, B, K, G, bq]``)."""
    nk = kb.shape[0]
    acc = jnp.promote_types(qb.dtype, jnp.float32)
    neg_inf = jnp.array(-jnp.inf, acc)

    def q_step(_, xs):
        i, qi, qseg_i = xs
        stat_shape = qi.shape[:-1]

        def k_step(j, carry):
            m, l, o = carry
            kj = jax.lax.dynamic_index_in_dim(kb, j, 0, keepdims=False)
            vj = jax.lax.dynamic_index_in_dim(vb, j, 0, keepdims=False)
            kseg_j = jax.lax.dynamic_index_in_dim(ksegb, j, 0, keepdims=False)
            ok = _block_allowed(st, q_offset, i, j, qseg_i, kseg_j, _mask_block(maskb, i, j, st))
            s = jnp.einsum("bkgqd,bkcd->bkgqc", qi, kj, preferred_element_type=acc) * st.scale
            s = jnp.where(ok, s, neg_inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == neg_inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            o = alpha[..., None] * o + jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(vb.dtype), vj,
                                                  preferred_element_type=acc)
            return m_new, l, o

        init = (jnp.full(stat_shape, neg_inf), jnp.zeros(stat_shape, acc), jnp.zeros(qi.shape, acc))
        m, l, o = jax.lax.fori_loop(0, _k_blocks_needed(st, q_offset, i, nk), k_step, init)
        nonempty = l > 0
        l_safe = jnp.where(nonempty, l, 1.0)
        out = (o / l_safe[..., None]).astype(qb.dtype)
        lse = jnp.where(nonempty, m + jnp.log(l_safe), 0.0)
        return None, (out, lse)

    idx = jnp.arange(qb.shape[0], dtype=jnp.int32)
    _, (out, lse) = jax.lax.scan(q_step, None, (idx, qb, qsegb))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_core(st: _Static, qb, kb, vb, qsegb, ksegb, maskb, q_offset):
    return _fwd_impl(st, qb, kb, vb, qsegb, ksegb, maskb, q_offset)[0]


def _core_fwd(st, qb, kb, vb, qsegb, ksegb, maskb, q_offset):
    out, lse = _fwd_impl(st, qb, kb, vb, qsegb, ksegb, maskb, q_offset)
    return out, (qb, kb, vb, qsegb, ksegb, maskb, q_offset, out, lse)


def _core_bwd(st, res, dout):
    qb, kb, vb, qsegb, ksegb, maskb, q_offset, out, lse = res
    nq = qb.shape[0]
    acc = jnp.promote_types(qb.dtype, jnp.float32)
    neg_inf = jnp.array(-jnp.inf, acc)
    dout = dout.astype(qb.dtype)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1)  # [nq, B, K, G, bq]

    def k_step(dq, xs):
        j, kj, vj, kseg_j = xs

        def q_step(i, carry):
            dq, dk, dv = carry
            qi = jax.lax.dynamic_index_in_dim(qb, i, 0, keepdims=False)
            doi = jax.lax.dynamic_index_in_dim(dout, i, 0, keepdims=False)
            lse_i = jax.lax.dynamic_index_in_dim(lse, i, 0, keepdims=False)
            delta_i = jax.lax.dynamic_index_in_dim(delta, i, 0, keepdims=False)
            qseg_i = jax.lax.dynamic_index_in_dim(qsegb, i, 0, keepdims=False)
            ok = _block_allowed(st, q_offset, i, j, qseg_i, kseg_j, _mask_block(maskb, i, j, st))
            s = jnp.einsum("bkgqd,bkcd->bkgqc", qi, kj, preferred_element_type=acc) * st.scale
            p = jnp.exp(jnp.where(ok, s, neg_inf) - lse_i[..., None])
            dv = dv + jnp.einsum("bkgqc,bkgqd->bkcd", p.astype(qb.dtype), doi, preferred_element_type=acc)
            dp = jnp.einsum("bkgqd,bkcd->bkgqc", doi, vj, preferred_element_type=acc)
            ds = (p * (dp - delta_i[..., None]) * st.scale).astype(qb.dtype)
            dq_i = jnp.einsum("bkgqc,bkcd->bkgqd", ds, kj, preferred_element_type=acc)
            dq = jax.lax.dynamic_update_index_in_dim(
                dq, jax.lax.dynamic_index_in_dim(dq, i, 0, keepdims=False) + dq_i, i, 0)
            dk = dk + jnp.einsum("bkgqc,bkgqd->bkcd", ds, qi, preferred_element_type=acc)
            return dq, dk, dv

        zeros = jnp.zeros(kj.shape, acc)
        dq, dk, dv = jax.lax.fori_loop(_first_q_block(st, q_offset, j, nq), nq, q_step, (dq, zeros, zeros))
        return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

    idx = jnp.arange(kb.shape[0], dtype=jnp.int32)
    dq, (dk, dv) = jax.lax.scan(k_step, jnp.zeros(qb.shape, acc), (idx, kb, vb, ksegb))
    return dq.astype(qb.dtype), dk, dv, None, None, None, None


_blockwise_core.defvjp(_core_fwd, _core_bwd)


def _blockwise(q, k, v, *, q_offset, key_mask, q_segment_ids, kv_segment_ids, causal, block_q, block_k):
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = min(block_q, _round_up(t, 8)), min(block_k, _round_up(s, 8))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    nq, nk = tp // bq, sp // bk
    qseg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kseg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    mask3 = None
    if key_mask is not None and key_mask.ndim == 2:
        kseg = jnp.where(key_mask, kseg, _INVALID_KEY)
    elif key_mask is not None:
        mask3 = jnp.pad(jnp.broadcast_to(key_mask, (b, t, s)), ((0, 0), (0, tp - t), (0, sp - s)))
        mask3 = mask3.reshape(b, nq, bq, sp).transpose(1, 0, 2, 3)
    qseg = jnp.pad(qseg, ((0, 0), (0, tp - t)), constant_values=_PADDED_QUERY).reshape(b, nq, bq).transpose(1, 0, 2)
    kseg = jnp.pad(kseg, ((0, 0), (0, sp - s)), constant_values=_INVALID_KEY).reshape(b, nk, bk).transpose(1, 0, 2)
    qb = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, nq, bq, kh, g, d).transpose(1, 0, 3, 4, 2, 5)
    kb = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).reshape(b, nk, bk, kh, d).transpose(1, 0, 3, 2, 4)
    vb = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).reshape(b, nk, bk, kh, d).transpose(1, 0, 3, 2, 4)
    st = _Static(scale=1.0 / math.sqrt(d), causal=bool(causal), bq=bq, bk=bk)
    out = _blockwise_core(st, qb, kb, vb, qseg, kseg, mask3, jnp.asarray(q_offset, jnp.int32))
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, d)[:, :t]


# ------------------------------------------------------------------------------------ cuDNN / splash


def _cudnn(q, k, v, key_mask, fallback, *, dpa_implementation="cudnn"):
    """Cache-free causal self-attention through ``jax.nn.dot_product_attention`` with a contiguous-run key
    mask (see the module docstring). ``dpa_implementation="xla"`` runs the same arithmetic on any backend
    (used by the tests to check the mask handling)."""
    b, t, n, d = q.shape
    dt = q.dtype
    cdt = dt if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.dtype(jnp.bfloat16)
    if dpa_implementation != "cudnn":
        cdt = dt
    if key_mask is None:
        out = jax.nn.dot_product_attention(q.astype(cdt), k.astype(cdt), v.astype(cdt), is_causal=True,
                                           implementation=dpa_implementation)
        return out.astype(dt)
    m = key_mask.astype(bool)
    start = jnp.argmax(m, axis=1).astype(jnp.int32)  # first valid slot (0 for an empty row)
    length = jnp.maximum(jnp.sum(m, axis=1, dtype=jnp.int32), 1)  # an empty row sees one slot (output zeroed)
    runs = jnp.sum(m & ~jnp.pad(m, ((0, 0), (1, 0)))[:, :-1], axis=1)  # False->True edges (incl. slot 0)
    contiguous = jnp.all(runs <= 1)

    def fused(q, k, v):
        idx = (jnp.arange(t, dtype=jnp.int32)[None, :] + start[:, None]) % t  # rotate: run starts at slot 0
        take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1).astype(cdt)  # noqa: E731
        out = jax.nn.dot_product_attention(take(q), take(k), take(v), is_causal=True, query_seq_lengths=length,
                                           key_value_seq_lengths=length, implementation=dpa_implementation)
        back = (jnp.arange(t, dtype=jnp.int32)[None, :] - start[:, None]) % t
        out = jnp.take_along_axis(out, back[:, :, None, None], axis=1).astype(dt)
        return jnp.where(m[:, :, None, None], out, jnp.zeros((), dt))

    return jax.lax.cond(contiguous, fused, fallback, q, k, v)


@functools.lru_cache(maxsize=32)
def _splash_kernel(n: int, tp: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(n)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, key_mask, q_segment_ids, kv_segment_ids, *, block=512, interpret=False):
    """Cache-free causal self-attention through Pallas splash attention (TPU). Key padding and packing become
    splash segment ids; a padding query gets its own id (it sees itself, so no row is empty) and output 0."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, d = q.shape
    block = min(block, _round_up(t, 128))
    tp = _round_up(t, block)
    valid = jnp.ones((b, t), bool) if key_mask is None else key_mask.astype(bool)
    qseg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kseg = jnp.zeros((b, t), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    qseg, kseg = jnp.where(valid, qseg, _INVALID_KEY), jnp.where(valid, kseg, _INVALID_KEY)
    pad = ((0, 0), (0, tp - t))
    qseg = jnp.pad(qseg, pad, constant_values=_PADDED_QUERY)
    kseg = jnp.pad(kseg, pad, constant_values=_PADDED_QUERY)
    scale = 1.0 / math.sqrt(d)
    qs = (q.astype(jnp.promote_types(q.dtype, jnp.float32)) * scale).astype(q.dtype)
    to_heads = lambda x: jnp.pad(x, pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731  [B, heads, Tp, D]
    with jax.ensure_compile_time_eval():  # the kernel's mask tables are constants, never tracers (cached)
        kernel = _splash_kernel(n, tp, block, interpret)
    out = jax.vmap(lambda q_, k_, v_, a, c: kernel(q_, k_, v_, segment_ids=sk.SegmentIds(q=a, kv=c)))(
        to_heads(qs), to_heads(k), to_heads(v), qseg, kseg)
    out = out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
    return jnp.where(valid[:, :, None, None], out, jnp.zeros((), q.dtype))


# ------------------------------------------------------------------------------------------- entry


def dot_product_attention(q, k, v, *, q_offset=0, key_mask=None, q_segment_ids=None, kv_segment_ids=None,
                          causal: bool = True, implementation: str = "auto", block_q: int = 128,
                          block_k: int = 128):
    """Grouped-query (causal) attention ``softmax(q kᵀ/√D) v`` over the allowed keys; see the module docstring.

    Args:
      q: ``[B, T, N, D]`` queries; query ``t`` sits at key slot ``q_offset + t``.
      k, v: ``[B, S, K, D]`` keys / values (``N`` a multiple of ``K``; with a KV cache, the whole cache).
      q_offset: int or int32 scalar (traced is fine): the slot of the first query (a KV cache's ``index``;
        0 for self-attention without a cache).
      key_mask: ``[B, S]`` bool valid key slots, or ``[B, T, S]`` per-query mask (dense; prefer segment ids).
      q_segment_ids, kv_segment_ids: ``[B, T]`` / ``[B, S]`` int ids of packed sequences (both or neither);
        a query sees only keys of its own segment. Values ``-2**31`` and ``-2**31 + 1`` are reserved.
      causal: apply the causal rule ``s <= q_offset + t``.
      implementation: one of :data:`ATTENTION_IMPLEMENTATIONS` (see :func:`resolve_implementation`).
      block_q, block_k: blockwise tile sizes (clipped to the padded lengths; odd lengths are padded inside).
        128 was fastest on a 2-core CPU for 14 / 2 heads of 64 (the ``[B, K, G, bq, bk]`` float32 scores of
        one step stay in cache). The splash kernel uses its own 512 (clipped to ``T`` rounded up to 128).

    Returns:
      ``[B, T, N, D]`` in ``q.dtype``. A query with no allowed key gets 0 (``"plain"``: the mean of ``v``).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B, T, N, D] and k, v [B, S, K, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={kh}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both `q_segment_ids` and `kv_segment_ids`, or neither")
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask).astype(bool)
        if key_mask.shape not in ((b, s), (b, t, s)):
            raise ValueError(f"`key_mask` must be [B, S]={(b, s)} or [B, T, S]={(b, t, s)}, got {key_mask.shape}")
    if q_segment_ids is not None:
        q_segment_ids, kv_segment_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
        if q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
            raise ValueError(f"segment ids must be [B, T]={(b, t)} and [B, S]={(b, s)}, got "
                             f"{q_segment_ids.shape} and {kv_segment_ids.shape}")
    impl = resolve_implementation(implementation, t=t, s=s, dtype=q.dtype, head_dim=d)

    def blockwise(q, k, v):
        return _blockwise(q, k, v, q_offset=q_offset, key_mask=key_mask, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, causal=causal, block_q=block_q, block_k=block_k)

    if impl == "plain":
        return _plain(q, k, v, _dense_mask(t, s, q_offset, key_mask, q_segment_ids, kv_segment_ids, causal))
    self_attention = causal and t == s and isinstance(q_offset, int) and q_offset == 0
    dense_mask = key_mask is not None and key_mask.ndim == 3
    if impl == "cudnn" and self_attention and q_segment_ids is None and not dense_mask:
        return _cudnn(q, k, v, key_mask, blockwise)
    if impl == "splash" and self_attention and not dense_mask:
        return _splash(q, k, v, key_mask, q_segment_ids, kv_segment_ids, block=512)
    if impl in _BACKEND_KERNELS and resolve_implementation("auto", t=t, s=s, dtype=q.dtype, head_dim=d,
                                                           backend="cpu") == "plain":
        # a fused kernel's fallback for a KV-cache decode step or a tiny problem: the dense path
        return _plain(q, k, v, _dense_mask(t, s, q_offset, key_mask, q_segment_ids, kv_segment_ids, causal))
    return blockwise(q, k, v)


def set_attention_impl(model, implementation: Optional[str] = None, block_size: Optional[int] = None):
    """Switch a built (or loaded) :class:`~trlax.models.Decoder` — or any NNX module holding decoder configs —
    to another attention kernel in place: every ``config`` / ``cfg`` attribute with an ``attention_impl`` field
    is replaced (``dataclasses.replace``, so the value is validated). Call it outside ``jit``; graphdefs split
    afterwards carry the new choice. Returns ``model``."""
    from flax import nnx

    changes = {}
    if implementation is not None:
        changes["attention_impl"] = implementation
    if block_size is not None:
        changes["attention_block_size"] = int(block_size)
    if not changes:
        return model
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for name in ("config", "cfg"):
            c = getattr(node, name, None)
            if dataclasses.is_dataclass(c) and hasattr(c, "attention_impl"):
                setattr(node, name, dataclasses.replace(c, **changes))
    return model
