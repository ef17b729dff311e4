"""Supervised fine-tuning objectives: token NLL, DFT, SFT masks, and BEMA weight averaging.

- :func:`sft_loss` — token-level NLL (or DFT) normalised by the *global* token count, so micro-batch
  losses sum to the full-batch loss (TRL ``SFTTrainer`` with ``num_items_in_batch``).
- :func:`sft_mask` — completion-only / assistant-only loss masks.
- :func:`mean_log_softmax` — the uniform-target term of label smoothing (``sft_loss(label_smoothing=ε)``).
- :func:`dft_per_token_loss` — Dynamic Fine-Tuning, ``−sg(p_t)·log p_t`` (arXiv 2508.05629, eq. 9).
- :func:`bema` — bias-corrected EMA of parameters (arXiv 2508.00180), an optax-shaped ``(init, update)``
  pair of pure functions on parameter pytrees (objectives/ does not import optax).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from trlax.objectives._checks import (
    ArrayLike,
    Scalar,
    as_float,
    as_mask,
    check_choice,
    check_range,
    check_rank,
    check_same_shape,
    is_array,
    maybe_nonzero,
)
from trlax.objectives.aggregation import masked_sum, mean_metric

SFT_LOSS_TYPES = ("nll", "dft")

_sg = jax.lax.stop_gradient


def sft_mask(
    attention_mask: ArrayLike,
    *,
    completion_mask: Optional[ArrayLike] = None,
    assistant_mask: Optional[ArrayLike] = None,
) -> jax.Array:
    """Loss mask for SFT: completion-only / assistant-only training (InstructGPT, arXiv 2203.02155,
    sec. 3.5 trains on the response tokens; TRL ``completion_only_loss`` / ``assistant_only_loss``).

    ``mask = attention_mask ∧ completion_mask ∧ assistant_mask`` (each optional factor is all-True
    when None). All arrays are ``[B, T]`` aligned with the per-token log-probs (i.e. already
    shifted to the *predicted* token positions).

    Returns:
      ``[B, T]`` bool mask.
    """
    m = as_mask(attention_mask, "attention_mask")
    check_rank(m, 2, "attention_mask")
    for name, extra in (("completion_mask", completion_mask), ("assistant_mask", assistant_mask)):
        if extra is not None:
            e = as_mask(extra, name)
            check_same_shape(m, "attention_mask", **{name: e})
            m = m & e
    return m


def dft_per_token_loss(logps: ArrayLike) -> jax.Array:
    """Dynamic Fine-Tuning per-token loss (Wu et al., arXiv 2508.05629, eq. 9):
    ``L_t = −sg(p_t)·log p_t`` with ``p_t = exp(log p_t)``. Shape-preserving (``[B, T]`` in and out);
    the gradient is ``−p_t·∇log p_t`` (the SFT gradient reweighted by the token probability)."""
    lp = as_float(logps, "logps")
    return -_sg(jnp.exp(lp)) * lp


def mean_log_softmax(logits: ArrayLike) -> jax.Array:
    """``[B, T, V] -> [B, T]``: ``(1/V)·Σ_v log p_v`` with ``p = softmax(logits)`` — minus the cross-entropy
    to the uniform distribution, the term label smoothing mixes in (Szegedy et al., arXiv 1512.00567,
    sec. 7). Computed in float32 or wider."""
    z = as_float(logits, "logits")
    check_rank(z, 3, "logits")
    return jnp.mean(jax.nn.log_softmax(z, axis=-1), axis=-1)


def sft_loss(
    logps: ArrayLike,
    mask: ArrayLike,
    *,
    loss_type: str = "nll",
    num_items: Optional[Any] = None,
    label_smoothing: Scalar = 0.0,
    logits: Optional[ArrayLike] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """SFT loss: ``Σ_{b,t} m·L_t / max(N, 1)`` (TRL ``SFTTrainer.compute_loss``).

    ``L_t = −log p_t`` (``nll``, maximum likelihood) or the DFT loss ``−sg(p_t) log p_t`` (``dft``,
    arXiv 2508.05629, eq. 9). ``N = num_items`` — the global number of loss tokens of the optimiser
    batch (all micro-batches, all devices) — or the local count when None; with ``num_items`` the
    micro-batch losses add up exactly to the full-batch loss. A batch without loss tokens gives 0.

    Label smoothing ε (Szegedy et al., arXiv 1512.00567, sec. 7; transformers ``LabelSmoother``, which
    TRL ``SFTTrainer`` applies for ``label_smoothing_factor``): the target is ``(1 − ε)·onehot + ε/V``, so
    ``L_t^ε = (1 − ε)·(−log p_t) + ε·(−(1/V)·Σ_v log p_v)`` (:func:`mean_log_softmax`) — it needs the full
    ``logits``; masked positions are ignored and ``N`` is the same. ``dft`` reweights the smoothed loss,
    ``sg(p_t)·L_t^ε`` (an extension: TRL applies ``label_smoothing_factor`` only with ``nll``).

    Args:
      logps: ``[B, T]`` per-token log-probs of the target tokens (any float dtype; computed in ≥ f32);
        with ``logits``, they must be ``log_softmax(logits)`` at the targets.
      mask: ``[B, T]`` loss mask (see :func:`sft_mask`).
      loss_type: ``nll`` | ``dft``.
      num_items: global loss-token count.
      label_smoothing: ε in [0, 1] (a number or a JAX scalar).
      logits: ``[B, T, V]``; required when ``label_smoothing`` is not 0.

    Returns:
      ``(loss, metrics)`` with ``nll`` (Mean over tokens) and ``num_tokens``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import sft_loss
      >>> logps = jnp.array([[-1.0, -2.0, -5.0], [-0.5, -5.0, -5.0]])
      >>> mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
      >>> loss, metrics = sft_loss(logps, mask)  # token mean of -log p over the 3 completion tokens
      >>> print(round(float(loss), 4))
      1.1667
    """
    check_choice("loss_type", loss_type, SFT_LOSS_TYPES)
    check_range("label_smoothing", label_smoothing, low=0.0, high=1.0)
    lp = as_float(logps, "logps")
    check_rank(lp, 2, "logps")
    m = as_mask(mask)
    check_same_shape(lp, "logps", mask=m)
    zero = jnp.zeros((), lp.dtype)
    lp = jnp.where(m, lp, zero)
    per_token = -lp
    if maybe_nonzero(label_smoothing):
        if logits is None:
            raise ValueError(f"label_smoothing={label_smoothing!r} needs the full `logits` ([B, T, V]); got None")
        z = as_float(logits, "logits")
        if z.ndim != 3 or z.shape[:2] != lp.shape:
            raise ValueError(f"`logits` must have shape {tuple(lp.shape) + ('V',)}, got {tuple(z.shape)}")
        uniform = jnp.where(m, mean_log_softmax(z).astype(lp.dtype), zero)
        per_token = (1.0 - label_smoothing) * per_token - label_smoothing * uniform
    if loss_type == "dft":
        per_token = _sg(jnp.exp(lp)) * per_token
    n = jnp.sum(m).astype(lp.dtype) if num_items is None else jnp.asarray(num_items, lp.dtype)
    loss = masked_sum(per_token, m) / jnp.maximum(n, 1)
    metrics = {"nll": mean_metric(_sg(-lp), m), "num_tokens": jnp.sum(m).astype(jnp.float32)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------- BEMA


class BEMAState(NamedTuple):
    """State of :func:`bema` (BEMA, arXiv 2508.00180): the optimiser-step counter (int32 scalar),
    the snapshot θ₀, the EMA and the current BEMA weights (pytrees like the parameters; the BEMA
    weights are TRL's "running model")."""

    step: jnp.ndarray
    theta0: Any
    ema: Any
    bema: Any


class BEMATransformation(NamedTuple):
    """BEMA (arXiv 2508.00180) as an ``(init, update)`` pair shaped like
    ``optax.GradientTransformation``, but acting on *parameters* (objectives/ does not import optax):

    - ``init(params) -> BEMAState``
    - ``update(params, state) -> (bema_params, new_state)``

    Call ``update`` once after every optimiser step with the new parameters.
    """

    init: Callable[[Any], BEMAState]
    update: Callable[[Any, BEMAState], Tuple[Any, BEMAState]]


def bema(
    update_freq: int = 400,
    ema_power: Scalar = 0.5,
    bias_power: Scalar = 0.2,
    lag: Scalar = 10.0,
    update_after: int = 0,
    multiplier: Scalar = 1.0,
    min_ema_multiplier: Scalar = 0.0,
) -> BEMATransformation:
    """Bias-corrected exponential moving average of parameters (Block & Zhang, arXiv 2508.00180,
    alg. 1 / eq. 8; TRL ``BEMACallback``).

    With ``t`` the optimiser step (1 after the first step), at steps ``t > τ`` with
    ``(t − τ) % φ == 0``::

        β_t = max((ρ + γt)^(−κ), β_min)          α_t = (ρ + γt)^(−η)
        EMA_t = (1 − β_t)·EMA + β_t·θ_t
        θ_BEMA = EMA_t + α_t·(θ_t − θ₀)

    At ``t == τ`` (never for τ = 0), θ₀ and the EMA are reset to θ_t. Between updates the BEMA
    weights stay as they were (initially θ_init). Pure and jit-friendly: the schedule is selected
    with ``jnp.where`` on the traced step counter.

    Args:
      update_freq: φ ≥ 1. ema_power: κ ≥ 0 (0 disables averaging). bias_power: η ≥ 0.
      lag: ρ ≥ 0. update_after: τ ≥ 0. multiplier: γ ≥ 0. min_ema_multiplier: β_min in [0, 1].

    Returns:
      :class:`BEMATransformation` ``(init, update)``. θ₀ and the EMA are kept in float32 or wider
      (bf16 parameters are not averaged in bf16); the returned BEMA weights have the parameters' dtypes.
    """
    for name, v in (("update_freq", update_freq), ("update_after", update_after)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}={v!r} must be an integer")
    check_range("update_freq", update_freq, low=1)
    check_range("update_after", update_after, low=0)
    check_range("ema_power", ema_power, low=0.0)
    check_range("bias_power", bias_power, low=0.0)
    check_range("lag", lag, low=0.0)
    check_range("multiplier", multiplier, low=0.0)
    check_range("min_ema_multiplier", min_ema_multiplier, low=0.0, high=1.0)
    if not is_array(lag) and not is_array(multiplier) and lag == 0.0 and multiplier == 0.0:
        raise ValueError("lag=0 and multiplier=0 make (lag + multiplier·t) zero; allowed: lag > 0 or multiplier > 0")

    def init(params) -> BEMAState:
        wide = jax.tree_util.tree_map(
            lambda p: jnp.asarray(p).astype(jnp.promote_types(jnp.asarray(p).dtype, jnp.float32)), params)
        return BEMAState(jnp.zeros((), jnp.int32), wide, wide, jax.tree_util.tree_map(jnp.asarray, params))

    def update(params, state: BEMAState):
        step = state.step + 1
        t = step.astype(jnp.result_type(float))
        base = lag + multiplier * t
        beta = jnp.maximum(base ** (-ema_power), min_ema_multiplier)
        alpha = base ** (-bias_power)
        snap = step == update_after
        do = (step > update_after) & ((step - update_after) % update_freq == 0)

        def leaf(p, th0, ema, cur):
            p = jnp.asarray(p)
            dt = jnp.promote_types(p.dtype, jnp.float32)
            pf, th0f, emaf = p.astype(dt), th0.astype(dt), ema.astype(dt)
            new_ema = (1.0 - beta.astype(dt)) * emaf + beta.astype(dt) * pf
            new_bema = new_ema + alpha.astype(dt) * (pf - th0f)
            th0_out = jnp.where(snap, pf, th0f).astype(th0.dtype)
            ema_out = jnp.where(snap, pf, jnp.where(do, new_ema, emaf)).astype(ema.dtype)
            cur_out = jnp.where(do, new_bema, cur.astype(dt)).astype(cur.dtype)
            return th0_out, ema_out, cur_out

        out = jax.tree_util.tree_map(leaf, params, state.theta0, state.ema, state.bema)
        # ``out`` has a (θ₀, EMA, BEMA) triple at each leaf of ``params``: split it into three trees
        th0, ema, cur = (jax.tree_util.tree_map(lambda _, o, i=i: o[i], params, out) for i in range(3))
        return cur, BEMAState(step, th0, ema, cur)

    return BEMATransformation(init, update)


__all__ = [
    "BEMAState",
    "BEMATransformation",
    "SFT_LOSS_TYPES",
    "bema",
    "dft_per_token_loss",
    "mean_log_softmax",
    "sft_loss",
    "sft_mask",
]
