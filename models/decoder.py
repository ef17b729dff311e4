"""A Flax NNX decoder-only transformer for the Llama 2/3, Qwen2 / Qwen2.5 and Qwen3 families.

One module family, config-driven variants:

- RoPE (Su et al. 2021, arXiv 2104.09864, eq. 34, "rotate-half" layout as in Hugging Face) with optional
  ``linear`` or Llama-3 (``llama3``) frequency scaling (Llama 3 report, arXiv 2407.21783, sec. 3.1 /
  Meta's reference implementation);
- grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245) with a padding mask and explicit
  positions, so left-padded batches give the same result as unpadded sequences;
- RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467, eq. 4), SwiGLU MLP (Shazeer 2020, arXiv 2002.05202,
  eq. 6), q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied or untied embeddings;
- a fixed-size KV cache for prefill + decode (:meth:`Decoder.init_cache`, ``cache=`` argument).

Parameters are stored in ``param_dtype`` (float32 master weights by default) and cast to the compute
``dtype`` (e.g. bf16) inside the forward; norms, softmax and RoPE run in float32. Every parameter
carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``,
``norm``; ``layers`` for the leading axis of scanned layers) that :mod:`trlax.models.sharding` maps to
mesh axes. The layers are scanned by default (``scan_layers=True``: stacked ``[L, ...]`` parameters run by
``jax.lax.scan``, compile time flat in depth) or unrolled (``scan_layers=False``); ``remat`` (``False``,
``True`` / ``"full"``, ``"dots"`` or one entry per layer) rematerialises them in the backward pass
(``jax.checkpoint``).

Shapes: ``B`` batch, ``T`` new tokens, ``S`` cache slots, ``H`` hidden, ``N`` query heads,
``K`` key/value heads, ``D`` head dim, ``I`` MLP width, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.models.attention import (ATTENTION_IMPLEMENTATIONS, AttentionMask, SlotCache, dot_product_attention,
                                    slot_attention)
from trlax.objectives.logprobs import fused_logps_and_entropy

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "DecoderConfig",
    "Decoder",
    "KVCache",
    "positions_from_mask",
    "positions_from_segments",
    "completion_logps",
]

# model_type -> Hugging Face architecture class name.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


def _unsupported(what: str) -> ValueError:
    names = ", ".join(f"{v} (model_type={k!r})" for k, v in SUPPORTED_ARCHITECTURES.items())
    return ValueError(f"unsupported architecture {what}; supported: {names}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture hyper-parameters, read from a Hugging Face ``config.json`` by :meth:`from_hf`.

    ``hf_config_json`` keeps the original ``config.json`` text so that ``save_pretrained`` writes
    back every field (including ones this module does not use, e.g. token ids).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # attention kernel (trlax.models.attention): "auto" (GPU: cuDNN flash, TPU: splash, else blockwise; tiny
    # shapes: plain), "blockwise", "plain" (dense [T, S] scores), "cudnn", "splash"; and the blockwise tile size.
    attention_impl: str = "auto"
    attention_block_size: int = 128
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(f"model_type={self.model_type!r}")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not allowed; allowed values: {_ROPE_TYPES}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r} is out of range; allowed: integers >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not allowed; allowed values: "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        if int(self.attention_block_size) < 1:
            raise ValueError(f"attention_block_size={self.attention_block_size!r} is out of range; allowed: "
                             "integers >= 1")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @classmethod
    def from_hf(cls, hf: Dict[str, Any]) -> "DecoderConfig":
        """Build from a Hugging Face ``config.json`` dict (old ``rope_scaling`` or new ``rope_parameters``)."""
        mt = hf.get("model_type")
        archs = hf.get("architectures") or []
        if mt not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(f"model_type={mt!r} (architectures={archs})")
        bad = [a for a in archs if a != SUPPORTED_ARCHITECTURES[mt]]
        if bad:
            raise _unsupported(f"architectures={bad}")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (full causal attention only)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not allowed; allowed values: ('silu',)")
        rope = dict(hf.get("rope_parameters") or {})
        rope.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if v is not None})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type={rope_type!r} is not allowed; allowed values: {_ROPE_TYPES}")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            hf_config_json=json.dumps(hf, sort_keys=True),
        )

    @property
    def hf_config(self) -> Dict[str, Any]:
        return json.loads(self.hf_config_json)


# ------------------------------------------------------------------------------------ primitives


def _param(value: jnp.ndarray, names: Tuple[Optional[str], ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm (arXiv 1910.07467, eq. 4): ``x / sqrt(mean(x²) + eps) · g``, computed in float32 and
    returned in ``x.dtype``. x: ``[..., F]``, scale: ``[F]``."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(acc) * y.astype(x.dtype).astype(acc)).astype(x.dtype)


def rope_inv_freq(cfg: DecoderConfig) -> jnp.ndarray:
    """Inverse RoPE frequencies ``θ^(−2i/D)`` (arXiv 2104.09864, eq. 15), ``[D/2]`` float32, with
    ``linear`` (divide by ``factor``) or ``llama3`` scaling (arXiv 2407.21783: wavelengths longer than
    ``original_max/low_freq_factor`` are divided by ``factor``, shorter than ``original_max/high_freq_factor``
    kept, and the band in between interpolated linearly in ``original_max/wavelength``)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        old = cfg.rope_original_max_positions
        lo, hi, f = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv
        inv = jnp.where(wavelen > old / lo, inv / f, jnp.where(wavelen < old / hi, inv, mid))
    return inv


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` ``[B, T, heads, D]`` by angle ``position · inv_freq`` in the rotate-half layout
    (first and second halves of the head dim form the pairs). positions: ``[B, T]`` int."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    ang = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2] (float32, as HF)
    cos, sin = jnp.cos(ang).astype(acc), jnp.sin(ang).astype(acc)
    xf = x.astype(acc)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Positions for a left-padded (or any) ``[B, T]`` mask: number of real tokens before each one
    (``cumsum(mask) − 1``, clipped at 0 for leading padding)."""
    m = jnp.asarray(mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Positions for a packed ``[B, T]`` row of ``segment_ids`` (0 = padding): the offset of each token from
    the start of its run of equal segment ids, so positions restart at 0 for every packed sequence (as in
    padding-free packing, Krell et al. 2021, arXiv 2107.02027, sec. 3). Returns ``[B, T]`` int32."""
    seg = jnp.asarray(segment_ids)
    t = jnp.arange(seg.shape[-1], dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones(seg.shape[:-1] + (1,), bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(start, t, 0), axis=seg.ndim - 1)
    return t - first


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Fixed-size key/value cache. ``k``, ``v``: ``[L, B, S, K, D]``; ``mask``: ``[B, S]`` bool, slots
    holding real tokens; ``index``: int32 scalar, next slot to write (shared by the batch)."""

    k: jnp.ndarray
    v: jnp.ndarray
    mask: jnp.ndarray
    index: jnp.ndarray


# --------------------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE, optional qkv/o bias and q/k-norm."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.dtype = cfg, dtype
        self.q = _param(_init(rngs, (h, n, d), param_dtype), ("embed", "heads", "head_dim"))
        self.k = _param(_init(rngs, (h, k, d), param_dtype), ("embed", "kv_heads", "head_dim"))
        self.v = _param(_init(rngs, (h, k, d), param_dtype), ("embed", "kv_heads", "head_dim"))
        self.o = _param(_init(rngs, (n, d, h), param_dtype), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias = _param(jnp.zeros((n, d), param_dtype), ("heads", "head_dim"))
            self.k_bias = _param(jnp.zeros((k, d), param_dtype), ("kv_heads", "head_dim"))
            self.v_bias = _param(jnp.zeros((k, d), param_dtype), ("kv_heads", "head_dim"))
        if cfg.o_bias:
            self.o_bias = _param(jnp.zeros((h,), param_dtype), ("embed",))
        if cfg.qk_norm:
            self.q_norm = _param(jnp.ones((d,), param_dtype), ("norm",))
            self.k_norm = _param(jnp.ones((d,), param_dtype), ("norm",))

    def __call__(self, x, positions, inv_freq, key_mask, kv: Optional[Tuple[jnp.ndarray, jnp.ndarray]], index):
        """x ``[B, T, H]``; key_mask ``[B, S]`` bool (valid key slots, S = T without cache), ``[B, T, S]``
        (per-query key mask), or an :class:`~trlax.models.attention.AttentionMask` (``[B, S]`` mask plus the
        segment ids of packed rows, which keeps the blockwise kernel linear in memory); the kernel is
        ``cfg.attention_impl`` (:func:`trlax.models.attention.dot_product_attention`);
        kv: this layer's cached ``([B, S, K, D], [B, S, K, D])``, or the whole stacked cache and this layer's
        index ``([L, B, S, K, D], [L, B, S, K, D], layer)`` (only the new slots are written), or None;
        index: first slot of x.
        Returns (``[B, T, H]``, updated kv or None)."""
        cfg, dt = self.cfg, self.dtype
        q = jnp.einsum("bth,hnd->btnd", x, self.q[...].astype(dt))
        k = jnp.einsum("bth,hkd->btkd", x, self.k[...].astype(dt))
        v = jnp.einsum("bth,hkd->btkd", x, self.v[...].astype(dt))
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps), rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if isinstance(kv, SlotCache):  # the sampler's shared-prefix / per-slot cache (positions are per row)
            out, kv = slot_attention(q, k, v, kv)
            return self._out(out), kv
        if kv is not None and len(kv) == 3:  # stacked (k, v) [L, B, S, K, D] + this layer: write in place, read
            at = tuple(jnp.asarray(i, jnp.int32) for i in (kv[2], 0, index, 0, 0))
            ck = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype)[None], at)
            cv = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype)[None], at)
            kv, k, v = (ck, cv, kv[2]), ck[kv[2]].astype(dt), cv[kv[2]].astype(dt)
        elif kv is not None:
            ck = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            kv, k, v = (ck, cv), ck.astype(dt), cv.astype(dt)
        seg = key_mask if isinstance(key_mask, AttentionMask) else AttentionMask(key_mask)
        # Without a cache the T new tokens are the keys, at slots [0, T): a static offset (causal block skipping).
        out = dot_product_attention(q, k, v, q_offset=0 if kv is None else index, key_mask=seg.key_mask,
                                    q_segment_ids=seg.q_segment_ids, kv_segment_ids=seg.kv_segment_ids,
                                    implementation=cfg.attention_impl, block_q=cfg.attention_block_size,
                                    block_k=cfg.attention_block_size)
        return self._out(out), kv

    def _out(self, out):
        y = jnp.einsum("btnd,ndh->bth", out, self.o[...].astype(self.dtype))
        if self.cfg.o_bias:
            y = y + self.o_bias[...].astype(self.dtype)
        return y


class MLP(nnx.Module):
    """SwiGLU feed-forward (arXiv 2002.05202, eq. 6): ``down(silu(gate x) ⊙ up x)``."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.gate = _param(_init(rngs, (h, i), param_dtype), ("embed", "mlp"))
        self.up = _param(_init(rngs, (h, i), param_dtype), ("embed", "mlp"))
        self.down = _param(_init(rngs, (i, h), param_dtype), ("mlp", "embed"))
        if cfg.mlp_bias:
            self.gate_bias = _param(jnp.zeros((i,), param_dtype), ("mlp",))
            self.up_bias = _param(jnp.zeros((i,), param_dtype), ("mlp",))
            self.down_bias = _param(jnp.zeros((h,), param_dtype), ("embed",))

    def __call__(self, x):
        dt = self.dtype
        g, u = x @ self.gate[...].astype(dt), x @ self.up[...].astype(dt)
        if self.cfg.mlp_bias:
            g, u = g + self.gate_bias[...].astype(dt), u + self.up_bias[...].astype(dt)
        y = (jax.nn.silu(g.astype(jnp.promote_types(dt, jnp.float32))).astype(dt) * u) @ self.down[...].astype(dt)
        if self.cfg.mlp_bias:
            y = y + self.down_bias[...].astype(dt)
        return y


class Block(nnx.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_norm = _param(jnp.ones((cfg.hidden_size,), param_dtype), ("norm",))
        self.attn = Attention(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.post_attention_norm = _param(jnp.ones((cfg.hidden_size,), param_dtype), ("norm",))
        self.mlp = MLP(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, inv_freq, key_mask, kv, index):
        eps = self.cfg.rms_norm_eps
        a, kv = self.attn(rms_norm(x, self.input_norm[...], eps), positions, inv_freq, key_mask, kv, index)
        x = x + a
        x = x + self.mlp(rms_norm(x, self.post_attention_norm[...], eps))
        return x, kv


def _layer_kv(kv, i):
    """A layer's view of the stacked cache: ``(k, v, i)``, or the :class:`SlotCache` at layer ``i``."""
    if kv is None:
        return None
    return dataclasses.replace(kv, layer=i) if isinstance(kv, SlotCache) else (kv[0], kv[1], i)


def _stacked_kv(kv_l):
    return kv_l if kv_l is None or isinstance(kv_l, SlotCache) else kv_l[:2]


def _block_call(block, x, positions, inv_freq, key_mask, kv, index):
    return block(x, positions, inv_freq, key_mask, kv, index)


# remat option -> jax.checkpoint policy (None: no rematerialisation). "full" saves nothing (every activation of a
# layer is recomputed in the backward pass); "dots" saves the outputs of the weight matmuls (dot_generals without
# batch dimensions: the q/k/v/o and MLP projections) and recomputes the rest (norms, RoPE, attention, SwiGLU).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_BLOCK_CALLS = {name: _block_call if pol is None else nnx.remat(_block_call, policy=pol)
                for name, pol in REMAT_POLICIES.items()}
_remat_block_call = _BLOCK_CALLS["full"]


def _remat_name(r) -> str:
    if isinstance(r, str):
        if r in REMAT_POLICIES:
            return r
    elif r is None or isinstance(r, (bool, np.bool_)):
        return "full" if r else "none"
    raise ValueError(f"remat entry {r!r} is not allowed; allowed values: False, True, 'none', 'full', 'dots'")


def remat_policies(remat, num_layers: int) -> Tuple[str, ...]:
    """One remat option per layer (``"none"``, ``"full"`` or ``"dots"``) from ``remat``: ``False`` / ``"none"``,
    ``True`` / ``"full"``, ``"dots"``, or a sequence with one such entry per layer."""
    if remat is None or isinstance(remat, (bool, np.bool_, str)):
        return (_remat_name(remat),) * num_layers
    names = tuple(_remat_name(r) for r in remat)
    if len(names) != num_layers:
        raise ValueError(f"remat must be a bool, 'full', 'dots' or have one entry per layer ({num_layers}), "
                         f"got {len(names)}")
    return names


def _runs(names: Sequence[str]):
    """``[(start, stop, name)]``: the maximal runs of equal consecutive entries of ``names``."""
    out = []
    for i, n in enumerate(names):
        if out and out[-1][2] == n:
            out[-1] = (out[-1][0], i + 1, n)
        else:
            out.append((i, i + 1, n))
    return out


def _stack_modules(modules):
    """One module of the same type whose every variable is the stack of the ``modules``' variables along a new
    leading axis (logical sharding name ``"layers"``)."""
    graphdef, first = nnx.split(modules[0])
    states = [first] + [nnx.state(m) for m in modules[1:]]

    def stack(*vs):
        names = vs[0].get_metadata().get("out_sharding")
        meta = {} if names is None else {"out_sharding": ("layers",) + tuple(names)}
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **meta)

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class Decoder(nnx.Module):
    """Decoder-only causal LM (Llama / Qwen2 / Qwen3). See the module docstring.

    Args:
      config: :class:`DecoderConfig`.
      rngs: ``nnx.Rngs`` for the (random normal, std 0.02) initialisation.
      param_dtype: storage dtype of the parameters (float32 master weights by default).
      dtype: compute dtype of activations and matmuls (defaults to ``param_dtype``; bf16 for training).
      remat: rematerialisation of the layers in the backward pass (``jax.checkpoint``): ``False`` / ``"none"``
        (keep every activation), ``True`` / ``"full"`` (keep only each layer's input, recompute the rest),
        ``"dots"`` (also keep the outputs of the weight matmuls, policy
        ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``; recompute norms, RoPE, attention and
        SwiGLU), or a sequence with one such entry per layer. With ``scan_layers`` a per-layer sequence runs
        one scan per run of equal consecutive entries (compile time grows with the number of runs, not the
        depth); the parameter layout does not depend on ``remat``.
      scan_layers: ``True`` (default): the layers are one :class:`Block` whose every parameter has a leading
        layer axis ``[L, ...]`` (logical sharding name ``"layers"``, replicated by the default rules), run with
        ``jax.lax.scan``, so compile time and program size do not grow with depth; parameter paths are
        ``layers/attn/q`` etc. ``False``: an ``nnx.List`` of ``L`` blocks (paths ``layers/{i}/attn/q``) run by
        a Python loop. Both layouts are initialised identically from the same ``rngs`` and compute the same
        function; :func:`trlax.models.stack_layers` / :func:`trlax.models.unstack_layers` convert state trees
        (e.g. checkpoints saved before scanned layers) between them.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 remat: Union[bool, str, Sequence[Union[bool, str]]] = False, scan_layers: bool = True):
        cfg = config
        dtype = param_dtype if dtype is None else dtype
        remat = remat_policies(remat, cfg.num_layers)
        self.config, self.dtype, self.param_dtype, self.remat = cfg, jnp.dtype(dtype), jnp.dtype(param_dtype), remat
        self.scan_layers = bool(scan_layers)
        self.embed = _param(_init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype), ("vocab", "embed"))
        # The blocks are built one by one in both layouts (same random stream, same initial weights).
        blocks = [Block(cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        self.layers = _stack_modules(blocks) if self.scan_layers else nnx.List(blocks)
        self.final_norm = _param(jnp.ones((cfg.hidden_size,), param_dtype), ("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(_init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype), ("vocab", "embed"))

    # ----------------------------------------------------------------------------------- helpers

    def lm_head_weight(self) -> jnp.ndarray:
        """The ``[V, H]`` output projection (the embedding table when tied), in ``param_dtype``."""
        return self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...]

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty :class:`KVCache` with ``max_length`` slots (compute dtype unless ``dtype`` given)."""
        c = self.config
        shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim)
        dt = self.dtype if dtype is None else dtype
        return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                       mask=jnp.zeros((batch_size, max_length), bool), index=jnp.zeros((), jnp.int32))

    # ----------------------------------------------------------------------------------- forward

    def hidden_states(self, input_ids: jnp.ndarray, *, attention_mask=None, positions=None,
                      cache: Optional[KVCache] = None, segment_ids=None):
        """Final normed hidden states ``[B, T, H]`` (compute dtype).

        Args:
          input_ids: ``[B, T]`` int token ids.
          attention_mask: ``[B, T]`` bool / 0-1, False for padding (default all True). Padding keys are
            never attended to; outputs at padding positions are finite but meaningless.
          positions: ``[B, T]`` int RoPE positions (default :func:`positions_from_mask` of the mask,
            offset by the cache's filled length when decoding).
          cache: a :class:`KVCache`; the T new tokens are written at slots ``[index, index + T)``, which
            must fit in its ``S`` slots (size it with :meth:`init_cache` for prompt + completion length;
            writes past the end are clamped by ``dynamic_update_slice`` and would overwrite the last slots).
          segment_ids: optional ``[B, T]`` int ids of packed sequences (0 = padding; see
            :mod:`trlax.models.packing`). A token attends only to earlier tokens of its own segment; the
            default positions restart at 0 per segment (:func:`positions_from_segments`) and the default
            mask is ``segment_ids > 0``. Not combinable with ``cache``.

        Returns:
          ``hidden`` if ``cache`` is None, else ``(hidden, new_cache)``.
        """
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"`input_ids` must be an integer [B, T] array, got {ids.dtype} {tuple(ids.shape)}")
        b, t = ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if mask.shape != (b, t):
            raise ValueError(f"`attention_mask` must have shape {(b, t)}, got {tuple(mask.shape)}")
        seg = None
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids)
            if seg.shape != (b, t) or not jnp.issubdtype(seg.dtype, jnp.integer):
                raise ValueError(f"`segment_ids` must be an integer array of shape {(b, t)}, got "
                                 f"{seg.dtype} {tuple(seg.shape)}")
            if cache is not None:
                raise ValueError("`segment_ids` cannot be combined with `cache` (packed rows are for training)")
            mask = mask & (seg > 0)
            if positions is None:
                positions = positions_from_segments(seg)
        if positions is None:
            positions = positions_from_mask(mask)
            if cache is not None:
                positions = positions + jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
        positions = jnp.asarray(positions)
        if positions.shape != (b, t):
            raise ValueError(f"`positions` must have shape {(b, t)}, got {tuple(positions.shape)}")
        if cache is not None:
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, index, axis=1)
        else:
            index, key_mask = jnp.zeros((), jnp.int32), mask
            if seg is not None:  # same segment only (segment ids, not a dense [B, T, S] mask)
                key_mask = AttentionMask(mask, seg, seg)
        inv_freq = rope_inv_freq(self.config)
        x = jnp.take(self.embed[...], ids, axis=0, mode="clip").astype(self.dtype)
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = self.run_layers(x, positions, inv_freq, key_mask, kv, index)
        x = rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)
        if cache is None:
            return x
        return x, KVCache(k=kv[0], v=kv[1], mask=key_mask, index=index + t)

    def run_layers(self, x, positions, inv_freq, key_mask, kv=None, index=0):
        """The transformer layers on embedded inputs ``x`` ``[B, T, H]`` (compute dtype); ``key_mask`` as in
        :meth:`Attention.__call__`; ``kv``: None or the stacked ``(k, v)`` cache, each ``[L, B, S, K, D]``, whose
        slots ``[index, index + T)`` receive the new keys / values of every layer (only those slots are written:
        inside a jitted decode loop the cache is updated in place, not copied).

        Scanned layers run one ``jax.lax.scan`` per run of equal remat entries; the whole cache travels in the
        scan's carry and each layer writes its slots and reads its ``[B, S, K, D]`` slice at its layer index.
        Returns ``(x, kv)``."""
        index = jnp.asarray(index, jnp.int32)
        if not self.scan_layers:
            for i, layer in enumerate(self.layers):
                x, kv_l = _BLOCK_CALLS[self.remat[i]](layer, x, positions, inv_freq, key_mask,
                                                      _layer_kv(kv, jnp.asarray(i, jnp.int32)), index)
                kv = _stacked_kv(kv_l)
            return x, kv
        graphdef, state = nnx.split(self.layers)
        n_layers = self.config.num_layers
        for start, stop, name in _runs(self.remat):

            def body(carry, xs):
                x, kv = carry
                params, i = xs
                x, kv_l = nnx.merge(graphdef, params)(x, positions, inv_freq, key_mask, _layer_kv(kv, i), index)
                return (x, _stacked_kv(kv_l)), None

            if REMAT_POLICIES[name] is not None:
                body = jax.checkpoint(body, policy=REMAT_POLICIES[name], prevent_cse=False)
            part = state if (start, stop) == (0, n_layers) else jax.tree.map(lambda a: a[start:stop], state)
            (x, kv), _ = jax.lax.scan(body, (x, kv), (part, jnp.arange(start, stop, dtype=jnp.int32)))
        return x, kv

    def __call__(self, input_ids, *, attention_mask=None, positions=None, cache: Optional[KVCache] = None,
                 segment_ids=None):
        """Float32 (float64 for a float64 model) logits ``[B, T, V]`` (and the new cache when ``cache`` is given); arguments as
        :meth:`hidden_states`. For training losses prefer :func:`completion_logps`, which never
        materialises ``[B, T, V]``."""
        out = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions, cache=cache,
                                 segment_ids=segment_ids)
        h, new_cache = (out, None) if cache is None else out
        w = self.lm_head_weight().astype(self.dtype)
        logits = jnp.einsum("bth,vh->btv", h, w, preferred_element_type=jnp.promote_types(self.dtype, jnp.float32))
        return logits if cache is None else (logits, new_cache)


# -------------------------------------------------------------------------------- train-step helper


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0,
                     chunk_size: int = 1024):
    """Per-token log-probs and entropies of the completion tokens under ``model`` (the ``log π_θ(o_t|q,o_<t)``
    of GRPO, arXiv 2402.03300, eq. 3), through the fused chunked LM-head kernel
    (:func:`trlax.objectives.fused_logps_and_entropy`), so ``[B, T, V]`` logits are never materialised.

    Args:
      model: a :class:`Decoder`, or a ``(graphdef, state)`` pair from ``nnx.split`` (pure-function use in a
        jitted train step: ``completion_logps((graphdef, params), ...)``).
      prompt_ids, prompt_mask: ``[B, P]`` left-padded prompt block (``P ≥ 1``).
      completion_ids, completion_mask: ``[B, C]`` right-padded completion block.
      temperature: sampling temperature ``τ`` (logits divided by it).
      chunk_size: tokens per chunk of the fused kernel.

    Returns:
      ``(logps, entropy)``, each ``[B, C]`` float32, 0 at masked completion positions.
    """
    if isinstance(model, tuple):
        model = nnx.merge(*model)
    p_ids, c_ids = jnp.asarray(prompt_ids), jnp.asarray(completion_ids)
    if p_ids.ndim != 2 or p_ids.shape[1] < 1:
        raise ValueError(f"`prompt_ids` must be [B, P] with P >= 1, got {tuple(p_ids.shape)}")
    if c_ids.ndim != 2 or c_ids.shape[0] != p_ids.shape[0]:
        raise ValueError(f"`completion_ids` must be [B, C] with B={p_ids.shape[0]}, got {tuple(c_ids.shape)}")
    p_mask, c_mask = jnp.asarray(prompt_mask).astype(bool), jnp.asarray(completion_mask).astype(bool)
    if p_mask.shape != p_ids.shape:
        raise ValueError(f"`prompt_mask` must have shape {tuple(p_ids.shape)}, got {tuple(p_mask.shape)}")
    if c_mask.shape != c_ids.shape:
        raise ValueError(f"`completion_mask` must have shape {tuple(c_ids.shape)}, got {tuple(c_mask.shape)}")
    P, C = p_ids.shape[1], c_ids.shape[1]
    ids = jnp.concatenate([p_ids, c_ids], axis=1)
    mask = jnp.concatenate([p_mask, c_mask], axis=1)
    hidden = model.hidden_states(ids, attention_mask=mask)
    h = hidden[:, P - 1:P + C - 1]  # the state at t predicts token t + 1
    # the LM head in the compute dtype (bf16 matmul, float32 accumulation and softmax), not upcast to float32
    w = model.lm_head_weight().astype(model.dtype)
    logps, ent = fused_logps_and_entropy(h, w, jnp.where(c_mask, c_ids, 0), temperature,
                                         chunk_size=chunk_size)
    return jnp.where(c_mask, logps, 0.0), jnp.where(c_mask, ent, 0.0)
