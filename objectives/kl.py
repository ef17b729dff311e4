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
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from trlax.objectives._checks import as_float, as_mask, check_choice, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "mse")


def kl_penalty(
    logps: jnp.ndarray,
    ref_logps: jnp.ndarray,
    mask: Optional[jnp.ndarray] = None,
    kind: str = "k3",
    clamp: Optional[float] = 20.0,
) -> jnp.ndarray:
    """Per-token KL estimate ``[B, T]`` of ``KL(π_θ ‖ π_ref)`` (table in the module docstring).

    Args:
      logps: ``[B, T]`` current log-probs (differentiable).
      ref_logps: ``[B, T]`` reference log-probs (stop-gradient).
      mask: optional ``[B, T]``; masked positions give exactly 0 (select-then-compute).
      kind: one of ``KL_ESTIMATORS``.
      clamp: clamp on ``d`` before ``exp`` (``None`` disables).
    """
    check_choice("kind", kind, KL_ESTIMATORS)
    logps = as_float(logps, "logps")
    ref = jax.lax.stop_gradient(as_float(ref_logps, "ref_logps"))
    check_same_shape(logps, "logps", ref_logps=ref)
    d = logps - ref
    if mask is not None:
        mask = as_mask(mask)
        check_same_shape(logps, "logps", mask=mask)
        d = jnp.where(mask, d, jnp.zeros((), d.dtype))
    if clamp is not None:
        d = jnp.clip(d, -clamp, clamp)
    if kind == "k1":
        return d
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    if kind == "abs":
        return jnp.abs(d)
    return jnp.exp(-d) + d - 1.0


def bias_corrected_kl(kl: jnp.ndarray, ratio: jnp.ndarray) -> jnp.ndarray:
    """DeepSeek-V3.2's unbiased KL (arXiv 2512.02556, eq. 7): ``k3 · π_θ/π_old``.

    Samples come from π_old; weighting by the (differentiable) ratio makes the k3 gradient an
    unbiased estimate of ``∇KL(π_θ‖π_ref)``. ``ratio`` may be ``[B, T]`` or the ``[B, 1]`` sequence
    ratio (as TRL, which broadcasts it). TRL's ``use_bias_correction_kl``.
    """
    return kl * ratio


__all__ = ["KL_ESTIMATORS", "bias_corrected_kl", "kl_penalty"]
