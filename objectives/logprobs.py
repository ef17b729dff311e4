"""Per-token log-probabilities and entropies, from logits or fused with the LM head.

The policy-gradient objectives take per-token log-probs ``logps`` of the sampled tokens (shape
``[B, T]``) and, for entropy masks / bonuses, per-token entropies. This module computes both:

- :func:`token_logps`, :func:`token_entropy`, :func:`logps_and_entropy` — from materialised logits
  ``[..., V]`` (the "plain" path). Log-softmax is evaluated row-wise in float32 or wider even for
  bf16 logits (``x_y − logsumexp(x)`` in bf16 is inaccurate; see the research notes on TRL's
  ``selective_log_softmax``).
- :func:`fused_logps_and_entropy` — from final hidden states ``[..., H]`` and the LM-head matrix
  ``[V, H]``. It walks over chunks of tokens and has a custom VJP that recomputes each chunk's logits in
  the backward pass, so neither pass ever holds the float32 ``[N, V]`` logits of all ``N`` tokens: the
  largest live buffer is ``[chunk_size, V]`` plus the float32 ``[V, H]`` weight gradient accumulator.
  Values and gradients equal the plain path (tests/objectives/test_logprobs.py).

Definitions (sampling temperature ``τ``, logits ``z = (h Wᵀ) / τ``; Williams 1992 for the score
function, Shannon entropy): ``log π(y) = z_y − logsumexp(z)`` and ``H = logsumexp(z) − Σ_v p_v z_v``.
Their derivatives w.r.t. the logits, used by the fused backward pass:
``∂ log π(y)/∂z = onehot(y) − p`` and ``∂H/∂z = −p ⊙ (log p + H)``.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "token_logps",
    "token_entropy",
    "logps_and_entropy",
    "fused_logps_and_entropy",
]
from trlax.objectives._checks import ArrayLike

# ----------------------------------------------------------------------------------- validation


def _check_temperature(temperature: Any) -> jnp.ndarray:
    if isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(temperature, bool):
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature={temperature!r} is out of range; allowed: (0, inf)")
    t = jnp.asarray(temperature)
    if t.ndim != 0:
        raise ValueError(f"`temperature` must be a scalar, got shape {tuple(t.shape)}")
    return t


def _check_targets(targets: Any, batch_shape: Tuple[int, ...], name: str = "targets") -> jnp.ndarray:
    ids = jnp.asarray(targets)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be an integer array of token ids, got dtype {ids.dtype}")
    if tuple(ids.shape) != tuple(batch_shape):
        raise ValueError(f"`{name}` must have shape {tuple(batch_shape)} (the leading dims of the input), "
                         f"got {tuple(ids.shape)}")
    return ids


def _as_logits(logits: Any) -> jnp.ndarray:
    x = jnp.asarray(logits)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`logits` must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"`logits` must have rank >= 1 ([..., V]), got shape {tuple(x.shape)}")
    if jnp.finfo(x.dtype).bits < 32:
        x = x.astype(jnp.float32)
    return x


# ------------------------------------------------------------------------------------ plain path


def token_logps(logits: ArrayLike, targets: ArrayLike, temperature: Any = 1.0) -> jax.Array:
    """Log-probability of each target token, ``log softmax(logits / τ)[..., y]``.

    The per-token ``log π_θ(o_t | q, o_<t)`` of GRPO (Shao et al. 2024, arXiv 2402.03300, eq. 3) and
    PPO (Schulman et al. 2017, arXiv 1707.06347, eq. 6), with the sampling temperature ``τ`` applied
    as in TRL (logits divided by ``τ`` before the softmax).

    Args:
      logits: ``[..., V]`` floating logits (bf16 is upcast to float32).
      targets: ``[...]`` integer token ids in ``[0, V)``.
      temperature: positive scalar ``τ``.

    Returns:
      ``[...]`` log-probs in float32 (float64 for float64 logits), always ``≤ 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import token_logps
      >>> logits = jnp.array([[[0.0, 0.0], [0.0, 2.0]]])
      >>> print(token_logps(logits, jnp.array([[0, 1]])))  # log softmax(logits)[target]
      [[-0.6931 -0.1269]]
    """
    return logps_and_entropy(logits, targets, temperature)[0]


def token_entropy(logits: ArrayLike, temperature: Any = 1.0) -> jax.Array:
    """Shannon entropy of ``softmax(logits / τ)`` per position, ``H = logsumexp(z) − Σ p z``.

    Used by entropy masks / bonuses (Wang et al. 2025, arXiv 2506.01939, eq. 2).

    Args:
      logits: ``[..., V]`` floating logits (bf16 is upcast to float32).
      temperature: positive scalar ``τ``.

    Returns:
      ``[...]`` entropies in nats, in ``[0, log V]``; finite for any finite logits (a ``-inf`` logit
      contributes 0).
    """
    z = _as_logits(logits) / _check_temperature(temperature)
    return _stats(z)[1]


def logps_and_entropy(logits: ArrayLike, targets: ArrayLike, temperature: Any = 1.0) -> Tuple[jax.Array, jax.Array]:
    """Both :func:`token_logps` and :func:`token_entropy` from one pass over ``[..., V]`` logits.

    Args:
      logits: ``[..., V]``; targets: ``[...]`` integer ids; temperature: positive scalar.

    Returns:
      ``(logps, entropy)``, each ``[...]`` float32 (or float64).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import logps_and_entropy
      >>> logps, entropy = logps_and_entropy(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
      >>> print(logps, entropy)  # uniform over 4: log 1/4 and entropy log 4
      [[-1.3863]] [[1.3863]]
    """
    x = _as_logits(logits)
    ids = _check_targets(targets, x.shape[:-1])
    z = x / _check_temperature(temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_y = jnp.take_along_axis(z, ids[..., None], axis=-1)[..., 0]
    logps = jnp.minimum(z_y - lse, 0.0)
    return logps, token_entropy(x, temperature)


# ------------------------------------------------------------------------------------ fused path


def _chunk_logits(h, w, inv_t):
    """Logits ``z = h wᵀ / τ`` of one chunk, accumulated in float32 (or wider). h [C,H], w [V,H]."""
    acc = jnp.promote_types(jnp.result_type(h.dtype, w.dtype), jnp.float32)
    return jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=acc) * inv_t.astype(acc)


def _stats(z):
    """``(logsumexp, entropy)`` over the last axis with one ``exp``: with ``d = z − max z``,
    ``lse = max z + log Σ e^d`` and ``H = log Σ e^d − Σ e^d d / Σ e^d`` (no cancellation for large logits).
    Entries with ``e^d = 0`` (incl. ``−inf`` logits) contribute exactly 0."""
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    d = z - m
    e = jnp.exp(d)
    s = jnp.sum(e, axis=-1)
    ed = jnp.sum(jnp.where(e > 0, e * jnp.where(e > 0, d, 0.0), 0.0), axis=-1)
    log_s = jnp.log(s)
    return m[..., 0] + log_s, log_s - ed / s


def _fused_forward(h, w, y, inv_t, chunk):
    n = h.shape[0] // chunk

    def one(args):
        hc, yc = args
        z = _chunk_logits(hc, w, inv_t)
        lse, ent = _stats(z)
        z_y = jnp.take_along_axis(z, yc[:, None], axis=-1)[:, 0]
        return z_y - lse, ent, lse

    logp, ent, lse = jax.lax.map(one, (h.reshape(n, chunk, -1), y.reshape(n, chunk)))
    return logp.reshape(-1), ent.reshape(-1), lse.reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h, w, y, inv_t, chunk):
    return _fused_forward(h, w, y, inv_t, chunk)[:2]


def _fused_fwd(h, w, y, inv_t, chunk):
    logp, ent, lse = _fused_forward(h, w, y, inv_t, chunk)
    return (logp, ent), (h, w, y, inv_t, ent, lse)


def _fused_bwd(chunk, res, cts):
    h, w, y, inv_t, ent, lse = res
    g_logp, g_ent = cts
    n = h.shape[0] // chunk

    def step(dw, args):
        hc, yc, glc, gec, entc, lsec = args
        z = _chunk_logits(hc, w, inv_t)
        logp_all = z - lsec[:, None]
        p = jnp.exp(logp_all)
        # ∂/∂z of g_logp·log p_y + g_ent·H (module docstring): g_logp (onehot − p) − g_ent p (log p + H);
        # the one-hot term is added at the target column only. Then the chain rule through z = h wᵀ / τ.
        gz = p * (-glc[:, None] - gec[:, None] * (logp_all + entc[:, None]))
        gz = gz.at[jnp.arange(yc.shape[0]), yc].add(glc)
        gz = gz * inv_t.astype(gz.dtype)
        # the two matmuls in the inputs' dtype (bf16 inputs: bf16 matmuls), accumulated in float32 (or wider)
        gzc = gz.astype(jnp.result_type(hc.dtype, w.dtype))
        dh = jax.lax.dot_general(gzc, w, (((1,), (0,)), ((), ())), preferred_element_type=gz.dtype)
        dw = dw + jax.lax.dot_general(gzc, hc, (((0,), (0,)), ((), ())), preferred_element_type=gz.dtype)
        return dw, dh.astype(h.dtype)

    acc = ent.dtype
    xs = (h.reshape(n, chunk, -1), y.reshape(n, chunk), g_logp.reshape(n, chunk).astype(acc),
          g_ent.reshape(n, chunk).astype(acc), ent.reshape(n, chunk), lse.reshape(n, chunk))
    dw, dh = jax.lax.scan(step, jnp.zeros(w.shape, acc), xs)
    d_y = np.zeros(y.shape, dtype=jax.dtypes.float0)
    return dh.reshape(h.shape), dw.astype(w.dtype), d_y, jnp.zeros_like(inv_t)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_logps_and_entropy(
    hidden: ArrayLike,
    lm_head: ArrayLike,
    targets: ArrayLike,
    temperature: Any = 1.0,
    chunk_size: int = 1024,
) -> Tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies straight from hidden states and the LM head, in chunks.

    Equals ``logps_and_entropy(hidden @ lm_head.T, targets, temperature)`` in value and gradient
    (w.r.t. ``hidden`` and ``lm_head``), but the ``N = prod(hidden.shape[:-1])`` tokens are processed
    ``chunk_size`` at a time with a custom VJP that recomputes each chunk's logits in the backward pass
    (the "fused LM head" of TRL 1.16 / Liger's fused linear cross-entropy, Hsu et al. 2024,
    arXiv 2410.10989, sec. 3.3): peak extra memory ``O(chunk_size·V + V·H)`` instead of ``O(N·V)``.
    Logits are accumulated in float32 whatever the input dtype; gradients come back in the input
    dtypes. Formulas: module docstring (``log π(y) = z_y − logsumexp(z)``, ``H = logsumexp(z) − Σ p z``).

    Args:
      hidden: ``[..., H]`` final (normed) hidden states, e.g. ``[B, T, H]``.
      lm_head: ``[V, H]`` output projection (Hugging Face ``lm_head.weight`` layout; for tied
        embeddings pass the ``[V, H]`` embedding table).
      targets: ``[...]`` integer token ids in ``[0, V)`` (give padding positions any valid id and mask
        the result).
      temperature: positive scalar ``τ`` (no gradient flows to it).
      chunk_size: tokens per chunk (static); ``N`` is zero-padded up to a multiple of it.

    Returns:
      ``(logps, entropy)``, each ``[...]`` float32 (float64 when an input is float64).
    """
    h = jnp.asarray(hidden)
    w = jnp.asarray(lm_head)
    if not jnp.issubdtype(h.dtype, jnp.floating) or h.ndim < 1:
        raise TypeError(f"`hidden` must be a floating [..., H] array, got dtype {h.dtype} shape {h.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"`lm_head` must be a floating [V, H={h.shape[-1]}] array, got {w.dtype} {tuple(w.shape)}")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is out of range; allowed: integers >= 1")
    lead = h.shape[:-1]
    ids = _check_targets(targets, lead)
    inv_t = (1.0 / _check_temperature(temperature)).astype(jnp.promote_types(h.dtype, jnp.float32))
    n = int(np.prod(lead, dtype=np.int64))
    if n == 0:
        empty = jnp.zeros(lead, jnp.promote_types(jnp.result_type(h.dtype, w.dtype), jnp.float32))
        return empty, empty
    chunk = int(min(chunk_size, n))
    pad = (-n) % chunk
    hf = jnp.pad(h.reshape(n, h.shape[-1]), ((0, pad), (0, 0)))
    yf = jnp.pad(ids.reshape(n).astype(jnp.int32), (0, pad))
    logp, ent = _fused(hf, w, yf, inv_t, chunk)
    logp = jnp.minimum(logp[:n], 0.0).reshape(lead)
    return logp, ent[:n].reshape(lead)
