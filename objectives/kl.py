"""KL estimators between the policy and a reference policy, per token (Schulman, "Approximating KL
Divergence", 2020; GRPO arXiv 2402.03300 eq. 4 uses k3).

With ``d = log π_θ − log π_ref`` (sampled from π_θ):

=======  ================================  ========================================
kind     value                             note
=======  ================================  ========================================
``k1``   ``d``                             unbiased value, zero expected gradient
``k2``   ``½ d²``  (alias ``mse``)         gradient = on-policy ∇KL(π‖π_ref)
``k3``   ``exp(−d) + d − 1``               TRL / GRPO ("low_var_kl"), ≥ 0
``abs``  ``|d|``
=======  ================================  ========================================

``d`` is clamped to ``±clamp`` *before* ``exp`` (default 20), which bounds the value and zeroes the
gradient outside the clamp. ``ref_logps`` is a stop-gradient constant.

Straight-through kinds ``k1+ | k2+ | k3+ | abs+ | mse+`` (verl's ``+``) keep the value of the named
estimator and take the gradient of k2 (:func:`straight_through_kl`). KL can also enter the reward
instead of the loss (:func:`kl_in_reward`) with a fixed or adaptive coefficient
(:func:`fixed_kl_controller`, :func:`adaptive_kl_controller`; the coefficient is the caller's state).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from trlax.objectives._checks import (
    ArrayLike,
    Scalar,
    as_float,
    as_mask,
    check_choice,
    check_same_shape,
)

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "mse")
# verl's "+" suffix: forward value of the named estimator, gradient of k2 (straight-through)
STRAIGHT_THROUGH_KL_ESTIMATORS = ("k1+", "k2+", "k3+", "abs+", "mse+")
ALL_KL_ESTIMATORS = KL_ESTIMATORS + STRAIGHT_THROUGH_KL_ESTIMATORS

_sg = jax.lax.stop_gradient


def _estimate(d: jnp.ndarray, kind: str) -> jnp.ndarray:
    if kind == "k1":
        return d
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    if kind == "abs":
        return jnp.abs(d)
    return jnp.exp(-d) + d - 1.0


def _log_ratio(logps, ref_logps, mask, clamp) -> jnp.ndarray:
    """``d = log π_θ − sg(log π_ref)``, 0 under the mask (select-then-compute), clamped to ``±clamp``."""
    logps = as_float(logps, "logps")
    ref = jax.lax.stop_gradient(as_float(ref_logps, "ref_logps"))
    check_same_shape(logps, "logps", ref_logps=ref)
    d = logps - ref
    if mask is not None:
        mask = as_mask(mask)
        check_same_shape(logps, "logps", mask=mask)
        d = jnp.where(mask, d, jnp.zeros((), d.dtype))
    if clamp is None:
        return d
    # torch.clamp's gradient (verl, OpenRLHF): 1 on the closed interval, also exactly at ±clamp (jnp.clip's
    # gradient is ½ there)
    return jnp.where(jnp.abs(d) <= clamp, d, jnp.clip(d, -clamp, clamp))


def kl_penalty(
    logps: ArrayLike,
    ref_logps: ArrayLike,
    mask: Optional[ArrayLike] = None,
    kind: str = "k3",
    clamp: Optional[Scalar] = 20.0,
    output_clamp: Optional[Scalar] = None,
) -> jax.Array:
    """Per-token KL estimate ``[B, T]`` of ``KL(π_θ ‖ π_ref)`` (table in the module docstring).

    Args:
      logps: ``[B, T]`` current log-probs (differentiable).
      ref_logps: ``[B, T]`` reference log-probs (stop-gradient).
      mask: optional ``[B, T]``; masked positions give exactly 0 (select-then-compute).
      kind: one of ``KL_ESTIMATORS``, or a straight-through ``"k1+" | "k2+" | "k3+" | "abs+" | "mse+"``
        (verl's ``+``): the value of the named estimator with the gradient of k2,
        ``sg(f(d)) + ½d² − sg(½d²)`` — see :func:`straight_through_kl`.
      clamp: clamp on ``d`` before ``exp`` (``None`` disables).
      output_clamp: optional clamp of the estimate to ``±output_clamp`` (verl / OpenRLHF clamp k3 to
        ±10). Off by default: it silently zeroes the KL gradient on outliers (survey pitfall 4.7).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import kl_penalty
      >>> logps = jnp.array([[-1.0, -2.0]])
      >>> ref = jnp.array([[-1.5, -2.0]])
      >>> print(kl_penalty(logps, ref, kind="k1"))  # log pi - log pi_ref
      [[0.5 0. ]]
      >>> print(kl_penalty(logps, ref, kind="k3"))  # exp(ref - logps) - (ref - logps) - 1 >= 0
      [[0.1065 0.    ]]
    """
    check_choice("kind", kind, ALL_KL_ESTIMATORS)
    if kind.endswith("+"):
        out = straight_through_kl(logps, ref_logps, mask, value_kind=kind[:-1], grad_kind="k2", clamp=clamp)
        return out if output_clamp is None else jnp.clip(out, -output_clamp, output_clamp)
    out = _estimate(_log_ratio(logps, ref_logps, mask, clamp), kind)
    return out if output_clamp is None else jnp.clip(out, -output_clamp, output_clamp)


def straight_through_kl(
    logps: ArrayLike,
    ref_logps: ArrayLike,
    mask: Optional[ArrayLike] = None,
    value_kind: str = "k3",
    grad_kind: str = "k2",
    clamp: Optional[Scalar] = 20.0,
) -> jax.Array:
    """Straight-through KL ``[B, T]``: the *value* of ``value_kind``, the *gradient* of ``grad_kind``,
    ``sg(f_v(d)) + f_g(d) − sg(f_g(d))`` with ``d = log π_θ − log π_ref`` (clamped to ``±clamp``).

    verl's ``k1+`` / ``k3+`` (``grad_kind="k2"``): ``∇k2 = d·∇log π`` is the on-policy score-function
    gradient of ``KL(π_θ‖π_ref)``, whereas ``E_π[∇k1] = 0`` and ``∇k3`` descends the *forward* KL
    (Schulman 2020, "Approximating KL Divergence"; survey pitfall 4.7). Masked positions are 0.
    """
    check_choice("value_kind", value_kind, KL_ESTIMATORS)
    check_choice("grad_kind", grad_kind, KL_ESTIMATORS)
    d = _log_ratio(logps, ref_logps, mask, clamp)
    g = _estimate(d, grad_kind)
    return _sg(_estimate(d, value_kind)) + g - _sg(g)


def bias_corrected_kl(kl: ArrayLike, ratio: ArrayLike) -> jax.Array:
    """DeepSeek-V3.2's unbiased KL (arXiv 2512.02556, eq. 7): ``k3 · π_θ/π_old``.

    Samples come from π_old; weighting by the (differentiable) ratio makes the k3 gradient an
    unbiased estimate of ``∇KL(π_θ‖π_ref)``. ``ratio`` may be ``[B, T]`` or the ``[B, 1]`` sequence
    ratio (as TRL, which broadcasts it). TRL's ``use_bias_correction_kl``.
    """
    return jnp.multiply(kl, ratio)


# ----------------------------------------------------------------------------- KL in the reward


def kl_in_reward(
    token_scores: ArrayLike,
    logps: ArrayLike,
    ref_logps: ArrayLike,
    mask: ArrayLike,
    beta: Scalar,
    kind: str = "k1",
    clamp: Optional[Scalar] = 20.0,
) -> Tuple[jax.Array, jax.Array]:
    """KL penalty folded into the per-token reward (Ziegler et al. 2019, arXiv 1909.08593, the KL-penalised reward;
    Ouyang et al. 2022, arXiv 2203.02155, eq. 2; verl ``use_kl_in_reward``):
    ``r_t = score_t − β·KL_t`` with ``KL_t`` the ``kind`` estimate of the *sampling* policy's
    log-probs (``logps``, usually the old log-probs) against the reference. Everything here is a
    constant (rewards carry no gradient).

    Args:
      token_scores: ``[B, T]`` per-token scores (an outcome reward usually sits on the last token).
      logps, ref_logps: ``[B, T]`` log-probs of the sampled tokens under the policy / reference.
      mask: ``[B, T]``; masked positions get reward 0.
      beta: KL coefficient (a float or a scalar array — the controller's state).
      kind: a KL estimator name (``k1`` by default, verl's ``kl_penalty="kl"``).

    Returns:
      ``(rewards [B, T], current_kl)``: ``current_kl`` is the batch mean of the per-sequence mean KL
      (verl's ``actor/reward_kl_penalty``; empty rows count 0), the input of
      :func:`adaptive_kl_controller`.
    """
    scores = _sg(as_float(token_scores, "token_scores"))
    mask = as_mask(mask)
    check_same_shape(scores, "token_scores", mask=mask, logps=logps, ref_logps=ref_logps)
    kl = _sg(kl_penalty(_sg(as_float(logps, "logps")), ref_logps, mask, kind, clamp))
    zero = jnp.zeros((), scores.dtype)
    beta = _sg(jnp.asarray(beta, scores.dtype))
    rewards = jnp.where(mask, jnp.where(mask, scores, zero) - beta * kl, zero)
    row_len = jnp.sum(mask, axis=-1)
    row_kl = jnp.sum(kl, axis=-1) / jnp.maximum(row_len, 1).astype(kl.dtype)
    return rewards, jnp.mean(row_kl)


def fixed_kl_controller(
    beta: Scalar, current_kl: Optional[ArrayLike] = None, n_steps: Optional[ArrayLike] = None
) -> jax.Array:
    """Fixed KL coefficient (Ziegler et al. 2019, arXiv 1909.08593, constant β; verl ``FixedKLController``):
    returns ``beta`` (a scalar) unchanged. Same signature as
    :func:`adaptive_kl_controller`, so a train loop can swap them."""
    return jnp.asarray(beta)


def adaptive_kl_controller(
    beta: Scalar,
    current_kl: ArrayLike,
    n_steps: ArrayLike,
    target_kl: Scalar = 0.1,
    horizon: Scalar = 10000.0,
    max_error: Scalar = 0.2,
) -> jax.Array:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv 1909.08593, adaptive β schedule; verl
    ``AdaptiveKLController``): ``e = clip(KL/KL_target − 1, −0.2, 0.2)``,
    ``β ← β·(1 + e·n_steps/horizon)``. Pure: the caller keeps ``beta`` (the state) and passes it
    back in. ``n_steps`` is the number of samples since the last update (verl: the batch size).

    Examples:
      >>> from trlax.objectives import adaptive_kl_controller
      >>> beta = adaptive_kl_controller(0.1, current_kl=0.2, n_steps=100, target_kl=0.1, horizon=1000)
      >>> print(round(float(beta), 4))  # KL above target: beta grows by 1 + clip(0.2/0.1 - 1, -0.2, 0.2) * 100/1000
      0.102
    """
    beta = jnp.asarray(beta)
    err = jnp.clip(jnp.asarray(current_kl, beta.dtype) / target_kl - 1.0, -max_error, max_error)
    return beta * (1.0 + err * jnp.asarray(n_steps, beta.dtype) / horizon)


__all__ = [
    "ALL_KL_ESTIMATORS",
    "KL_ESTIMATORS",
    "STRAIGHT_THROUGH_KL_ESTIMATORS",
    "adaptive_kl_controller",
    "bias_corrected_kl",
    "fixed_kl_controller",
    "kl_in_reward",
    "kl_penalty",
    "straight_through_kl",
]
