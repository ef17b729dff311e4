"""The DPO family: sequence scores, pairwise preference losses, :class:`PreferenceLossConfig` and
:func:`preference_loss`.

Notation (per pair ``i``; ``S`` a sequence log-probability, ``n`` a completion length):

* ``S_w = Σ_t m_w ℓ_t`` (chosen), ``S_l`` (rejected), ``S^ref_w``, ``S^ref_l`` the reference sums;
  with LD-DPO the tail beyond the shorter completion of the pair is down-weighted by ``ld_alpha``.
* ``ρ_w = S_w − S^ref_w``, ``ρ_l = S_l − S^ref_l`` (implicit-reward log-ratios; ``S^ref = 0`` in
  reference-free mode).
* f-divergence scores ``s = g(ρ)`` (f-DPO), ``Δ = s_w − s_l``; the logit of the Bradley–Terry
  losses is ``x = β·Δ`` (optionally modified by R-DPO / DPOP / ODPO, see :func:`dpo_loss`).

Layers, each usable alone:

1. scores: :func:`sequence_logps`, :func:`ld_dpo_logps`, :func:`f_divergence_scores`,
   :func:`length_normalized_scores`, :func:`wpo_weights`, :func:`tdpo_token_kl`, :func:`odpo_offset`;
2. per-pair losses on ``[B]`` arrays: :func:`dpo_loss` (every TRL 1.16 ``loss_type`` plus Cal-DPO
   and TDPO), :func:`cal_dpo_loss`, :func:`tdpo_loss`, :func:`beta_dpo_loss` (dynamic β with pair
   filtering, stateful), :func:`preference_sft_loss` (the RPO / ``sft`` NLL term);
3. the recipe :func:`preference_loss` on per-token ``[B, T]`` arrays, driven by the frozen
   :class:`PreferenceLossConfig` (weighted combination of loss types as in MPO, WPO weighting, RPO);
   every ``loss_type`` is an entry of ``PREFERENCE_LOSS_REGISTRY``, and
   :func:`register_preference_loss` adds a user's own to the same pipeline.

Conventions follow TRL 1.16's ``DPOTrainer`` (``loss = Σ_k w_k · mean_pairs(ℓ_k · wpo)``; the WPO
weights and logged rewards are constants; ``sft`` is the token mean over all chosen tokens of the
batch). Deliberate differences from TRL (each documented where it happens):
``sigmoid_label_smoothing`` re-enables the cDPO label smoothing of the ``sigmoid`` loss that TRL 1.16
dropped; ``reference_free`` and
``rpo_alpha`` (removed in TRL 1.x) are kept; ``forward_kl`` and ``discopop`` get overflow guards so
huge log-ratios give finite values (TRL gives ``inf`` / ``nan`` there); empty chosen masks make the
``sft`` term 0 instead of NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from trlax.objectives._checks import (
    ArrayLike,
    ConfigMixin,
    Scalar,
    as_float,
    as_mask,
    check_choice,
    check_range,
    check_rank,
    check_same_shape,
    is_array,
    maybe_nonzero,
    register_config,
)
from trlax.objectives.aggregation import masked_sum, mean_metric

PREFERENCE_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    # beyond TRL
    "cal_dpo",
    "tdpo1",
    "tdpo2",
)
"""Loss types of :func:`preference_loss` (TRL 1.16's names, then Cal-DPO and TDPO)."""

LOSS_TYPE_ALIASES = {"aot_pair": "aot_unpaired"}
"""Older names accepted by :class:`PreferenceLossConfig` (TRL renamed ``aot_pair`` in PR #5038)."""

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
"""Loss types built on the chosen − rejected score difference: the only ones that accept a
non-default f-divergence (TRL 1.16 rule: elsewhere the β·log Z(x) term does not cancel)."""

LOGIT_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "robust", "discopop")
"""Loss types whose Bradley–Terry logit ``x = β·Δ`` takes the R-DPO / DPOP / ODPO modifiers."""

ALPHA_DIVERGENCE_CLAMP = 80.0
"""Upper clamp on ``(α − 1)·ρ`` before ``exp`` in the α-divergence score (TRL's float32 / bf16 guard)."""

_EXP_CLAMP = 80.0


# ------------------------------------------------------------------------------------------ scores


def sequence_logps(logps: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Sequence log-probability ``S = Σ_t m_t ℓ_t`` (DPO, arXiv 2305.18290, eq. 7: log π(y|x) as a sum).

    Args:
      logps: ``[B, T]`` per-token log-probs of the completion tokens.
      mask: ``[B, T]`` bool / 0-1 completion mask (masked entries, even NaN, never leak).

    Returns:
      ``[B]`` sums (0 for an empty row), float32 or wider.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import sequence_logps
      >>> print(sequence_logps(jnp.array([[-1.0, -2.0, -9.0]]), jnp.array([[1, 1, 0]])))
      [-3.]
    """
    logps = as_float(logps, "logps")
    check_rank(logps, 2, "logps")
    mask = as_mask(mask)
    check_same_shape(logps, "logps", mask=mask)
    return masked_sum(logps, mask, axis=-1)


def ld_dpo_logps(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    ld_alpha: Scalar,
) -> Tuple[jax.Array, jax.Array]:
    """LD-DPO length-desensitised sequence log-probs (arXiv 2409.06411, eq. 9–10).

    For pair ``i`` let ``l_p = min(|y_w|, |y_l|)``. In each row the first ``l_p`` completion tokens
    (counted along the mask) form the shared prefix, kept at full weight; later completion tokens
    are the verbose tail, weighted by ``ld_alpha``::

        S = Σ_{pos ≤ l_p} ℓ_t + ld_alpha · Σ_{pos > l_p} ℓ_t

    ``ld_alpha = 1`` is plain DPO; ``0`` drops the tail. Apply the same split to the reference
    log-probs (TRL does).

    Args:
      chosen_logps / rejected_logps: ``[B, Tc]`` / ``[B, Tr]`` per-token log-probs.
      chosen_mask / rejected_mask: completion masks of the same shapes.
      ld_alpha: tail weight in ``[0, 1]``.

    Returns:
      ``(S_w, S_l)``, each ``[B]``.
    """
    check_range("ld_alpha", ld_alpha, low=0.0, high=1.0)
    cl = as_float(chosen_logps, "chosen_logps")
    rl = as_float(rejected_logps, "rejected_logps")
    check_rank(cl, 2, "chosen_logps")
    check_rank(rl, 2, "rejected_logps")
    cm = as_mask(chosen_mask, "chosen_mask")
    rm = as_mask(rejected_mask, "rejected_mask")
    check_same_shape(cl, "chosen_logps", chosen_mask=cm)
    check_same_shape(rl, "rejected_logps", rejected_mask=rm)
    if cl.shape[0] != rl.shape[0]:
        raise ValueError(f"`rejected_logps` must have batch size {cl.shape[0]} like `chosen_logps`, got {rl.shape[0]}")
    shared = jnp.minimum(jnp.sum(cm, -1), jnp.sum(rm, -1))[:, None]
    return _ld_split_sum(cl, cm, shared, ld_alpha), _ld_split_sum(rl, rm, shared, ld_alpha)


def _ld_split_sum(logps, mask, shared, ld_alpha):
    pos = jnp.cumsum(mask, axis=-1)
    head = mask & (pos <= shared)
    tail = mask & (pos > shared)
    return masked_sum(logps, head, axis=-1) + ld_alpha * masked_sum(logps, tail, axis=-1)


def f_divergence_scores(
    logratios: ArrayLike, f_divergence_type: str = "reverse_kl", alpha: Scalar = 0.5
) -> jax.Array:
    """f-DPO scores ``g(ρ) = f'(π/π_ref)`` of the log-ratio ``ρ`` (arXiv 2309.16240, Table 1 / eq. 10).

    * ``reverse_kl``: ``ρ`` (standard DPO);
    * ``forward_kl``: ``1 − e^{−ρ}`` (``−ρ`` clamped at 80 before ``exp``: finite where TRL overflows);
    * ``js_divergence``: ``log 2 + log σ(ρ)``;
    * ``alpha_divergence``: ``(exp((α−1)ρ) − 1)/(α−1)`` with ``(α−1)ρ`` clamped at
      :data:`ALPHA_DIVERGENCE_CLAMP` (TRL 1.16's overflow guard); ``|α − 1| < 1e-6`` falls back to
      ``reverse_kl``.

    Args:
      logratios: any shape, typically ``[B]``.
      f_divergence_type: one of :data:`F_DIVERGENCE_TYPES`.
      alpha: the α of the α-divergence.

    Returns:
      scores with the shape of ``logratios``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import f_divergence_scores
      >>> rho = jnp.array([-1.0, 0.0, 1.0])
      >>> print(f_divergence_scores(rho, "reverse_kl"))  # the log-ratio itself (DPO)
      [-1.  0.  1.]
      >>> print(f_divergence_scores(rho, "forward_kl"))  # -exp(-rho)
      [-1.7183  0.      0.6321]
    """
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
    x = as_float(logratios, "logratios")
    if f_divergence_type == "reverse_kl":
        return x
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(jnp.minimum(-x, _EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(x)
    check_range("alpha", alpha)
    near_one = jnp.abs(alpha - 1.0) < 1e-6  # a select, not a Python branch: α may be traced
    am1 = jnp.where(near_one, 1.0, alpha - 1.0)
    t = jnp.minimum(am1 * x, ALPHA_DIVERGENCE_CLAMP)
    return jnp.where(near_one, x, jnp.expm1(t) / am1)


def length_normalized_scores(scores: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Per-token average ``s / max(|y|, 1)`` of a sequence score (IPO as run in TRL, arXiv
    2310.12036 eq. 17 with length normalisation; Tülu 3 ``sigmoid_norm``, arXiv 2411.15124 eq. 6).

    Args:
      scores: ``[B]`` sequence scores.
      mask: ``[B, T]`` completion mask (its row counts are the lengths).

    Returns:
      ``[B]``.
    """
    scores = as_float(scores, "scores")
    mask = as_mask(mask)
    check_rank(mask, 2, "mask")
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"`scores` must have shape ({mask.shape[0]},), got {tuple(scores.shape)}")
    return scores / jnp.maximum(jnp.sum(mask, -1), 1).astype(scores.dtype)


def wpo_weights(logps: ArrayLike, log_sum_sq_probs: ArrayLike, mask: ArrayLike) -> jax.Array:
    """WPO sequence weight (arXiv 2406.11827, eq. 2; TRL ``use_weighting``), a constant (stop-gradient).

    ``w = exp( Σ_t m_t (ℓ_t − log Σ_v π_v²) / max(|y|, 1) )``: the length-normalised probability of
    the completion, "aligned" by the per-token ``log Σ_v π(v|s_t)²`` (the probability that greedy-ish
    on-policy sampling would reproduce the token). The pair weight is ``w_chosen · w_rejected``.

    Args:
      logps: ``[B, T]`` per-token log-probs.
      log_sum_sq_probs: ``[B, T]`` ``log Σ_v π_v²`` at each position (``LSE(2z) − 2·LSE(z)`` of the
        logits ``z``).
      mask: ``[B, T]`` completion mask.

    Returns:
      ``[B]`` weights in ``(0, 1]`` (1 for an empty row).
    """
    logps = as_float(logps, "logps")
    check_rank(logps, 2, "logps")
    lssp = as_float(log_sum_sq_probs, "log_sum_sq_probs")
    mask = as_mask(mask)
    check_same_shape(logps, "logps", log_sum_sq_probs=lssp, mask=mask)
    aligned = jax.lax.stop_gradient(masked_sum(logps - lssp, mask, axis=-1))
    n = jnp.maximum(jnp.sum(mask, -1), 1).astype(aligned.dtype)
    return jnp.exp(jnp.minimum(aligned / n, _EXP_CLAMP))


def tdpo_token_kl(logits: ArrayLike, ref_logits: ArrayLike) -> jax.Array:
    """Per-position forward KL ``KL(π_ref(·|s_t) ‖ π_θ(·|s_t))`` over the full vocabulary
    (TDPO, arXiv 2404.11999, eq. 15 sequential KL, one term per position).

    Args:
      logits: ``[B, T, V]`` policy logits (differentiable).
      ref_logits: ``[B, T, V]`` reference logits (stop-gradient).

    Returns:
      ``[B, T]`` non-negative KL; sum it over the completion mask (``preference_loss`` does).
    """
    logits = as_float(logits, "logits")
    ref = jax.lax.stop_gradient(as_float(ref_logits, "ref_logits"))
    check_rank(logits, 3, "logits")
    check_same_shape(logits, "logits", ref_logits=ref)
    ref_lp = jax.nn.log_softmax(ref, axis=-1)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), axis=-1)


def odpo_offset(chosen_scores: ArrayLike, rejected_scores: ArrayLike, alpha: Scalar = 1.0) -> jax.Array:
    """ODPO offset ``Δ_r = α · log(r_w − r_l)`` from external scores (arXiv 2402.10571, eq. 8 with
    the log scaling of sec. 4). Score gaps are floored at ``1e-8`` so ties give a finite, very negative
    offset. Pass the result as ``offsets`` to :func:`dpo_loss` / :func:`preference_loss`.

    Args:
      chosen_scores / rejected_scores: ``[B]`` reward-model (or gold) scores.
      alpha: offset scale.

    Returns:
      ``[B]`` constant offsets (stop-gradient).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import odpo_offset
      >>> print(odpo_offset(jnp.array([3.0, 2.0]), jnp.array([1.0, 1.0])))  # alpha * log(s_w - s_l)
      [0.6931 0.    ]
    """
    check_range("alpha", alpha)
    w = as_float(chosen_scores, "chosen_scores")
    l_ = as_float(rejected_scores, "rejected_scores")
    check_same_shape(w, "chosen_scores", rejected_scores=l_)
    return jax.lax.stop_gradient(alpha * jnp.log(jnp.maximum(w - l_, 1e-8)))


# --------------------------------------------------------------------------------- per-pair losses


def _smoothed_logistic(x, eps):
    """``−(1−ε) log σ(x) − ε log σ(−x)`` (cDPO, Mitchell 2023, eq. 3)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def cal_dpo_loss(chosen_logratios: ArrayLike, rejected_logratios: ArrayLike, beta: Scalar = 0.1) -> jax.Array:
    """Cal-DPO per-pair loss (arXiv 2412.14516, eq. 10, in the official code's form: β only in the
    calibration targets)::

        −log σ(ρ_w − ρ_l) + ½[(ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²]

    Args:
      chosen_logratios / rejected_logratios: ``[B]`` ``ρ = S − S_ref``.
      beta: β > 0.

    Returns:
      ``[B]`` losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import cal_dpo_loss
      >>> print(cal_dpo_loss(jnp.array([5.0]), jnp.array([-5.0]), beta=0.1))  # on the calibration targets +-1/(2 beta)
      [0.]
    """
    check_range("beta", beta, low=0.0, low_inclusive=False)
    w = as_float(chosen_logratios, "chosen_logratios")
    l_ = as_float(rejected_logratios, "rejected_logratios")
    check_same_shape(w, "chosen_logratios", rejected_logratios=l_)
    target = 1.0 / (2.0 * beta)
    return -jax.nn.log_sigmoid(w - l_) + 0.5 * ((w - target) ** 2 + (l_ + target) ** 2)


TDPO_VARIANTS = ("tdpo1", "tdpo2")


def tdpo_loss(
    chosen_logratios: ArrayLike,
    rejected_logratios: ArrayLike,
    chosen_kl: ArrayLike,
    rejected_kl: ArrayLike,
    beta: Scalar = 0.1,
    alpha: Scalar = 0.5,
    variant: str = "tdpo2",
) -> jax.Array:
    """Token-level DPO (arXiv 2404.11999, eq. 17 TDPO1 and eq. 19 TDPO2).

    With ``D = Σ_t KL(π_ref ‖ π_θ)`` the sequential KL of a completion (:func:`tdpo_token_kl`)::

        tdpo1:  −log σ(β[(ρ_w − ρ_l) − (D_l − D_w)])
        tdpo2:  −log σ(β[(ρ_w − ρ_l) − α(D_l − sg(D_w))])

    Args:
      chosen_logratios / rejected_logratios: ``[B]`` ``ρ``.
      chosen_kl / rejected_kl: ``[B]`` sequential KLs ``D_w`` / ``D_l``.
      beta: β; alpha: TDPO2's α (paper: 0.5); variant: ``tdpo1 | tdpo2``.

    Returns:
      ``[B]`` losses.
    """
    check_choice("variant", variant, TDPO_VARIANTS)
    check_range("beta", beta, low=0.0, low_inclusive=False)
    check_range("alpha", alpha, low=0.0)
    w = as_float(chosen_logratios, "chosen_logratios")
    l_ = as_float(rejected_logratios, "rejected_logratios")
    dw = as_float(chosen_kl, "chosen_kl")
    dl = as_float(rejected_kl, "rejected_kl")
    check_same_shape(w, "chosen_logratios", rejected_logratios=l_, chosen_kl=dw, rejected_kl=dl)
    if variant == "tdpo1":
        logits = (w - l_) - (dl - dw)
    else:
        logits = (w - l_) - alpha * (dl - jax.lax.stop_gradient(dw))
    return -jax.nn.log_sigmoid(beta * logits)


def dpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: Optional[ArrayLike],
    ref_rejected_logps: Optional[ArrayLike],
    loss_type: str = "sigmoid",
    *,
    beta: Scalar = 0.1,
    label_smoothing: Scalar = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: Scalar = 0.5,
    discopop_tau: Scalar = 0.05,
    chosen_lengths: Optional[ArrayLike] = None,
    rejected_lengths: Optional[ArrayLike] = None,
    sigmoid_label_smoothing: bool = False,
    rdpo_alpha: Scalar = 0.0,
    dpop_lambda: Scalar = 0.0,
    offsets: Optional[ArrayLike] = None,
    chosen_kl: Optional[ArrayLike] = None,
    rejected_kl: Optional[ArrayLike] = None,
    tdpo_alpha: Scalar = 0.5,
) -> jax.Array:
    """Per-pair DPO-family loss on sequence log-probs ``[B]`` (one ``loss_type``; ``sft`` excluded).

    ``ρ = S − S_ref`` (``S_ref = 0`` if the reference is ``None``: reference-free), ``s = g(ρ)``
    (:func:`f_divergence_scores`), ``Δ = s_w − s_l``, ``ε`` = ``label_smoothing``, and the logit::

        x = β(Δ − λ·max(0, −ρ_w)) + α_R(n_w − n_l) − offset

    (DPOP, arXiv 2402.13228 eq. 3, ``λ`` = ``dpop_lambda``; R-DPO, arXiv 2403.19159 eq. 9, ``α_R`` =
    ``rdpo_alpha``; ODPO, arXiv 2402.10571 eq. 8, ``offset`` = ``offsets``; all off by default).

    =================  ================================================================  ===============
    loss_type          per-pair loss                                                     paper (arXiv)
    =================  ================================================================  ===============
    ``sigmoid``        ``−log σ(x)``; smoothed (cDPO): ``−(1−ε)log σ(x) − ε log σ(−x)``     2305.18290 eq. 7
    ``hinge``          ``max(0, 1 − x)``                                                 2305.10425 eq. 2
    ``ipo``            ``(Δ̄ − 1/(2β))²``, ``Δ̄ = s_w/n_w − s_l/n_l``                      2310.12036 eq. 17
    ``exo_pair``       ``σ(x)(log σ(x) − log(1−ε)) + σ(−x)(log σ(−x) − log ε)``           2402.00856 eq. 16
    ``nca_pair``       ``−log σ(βρ_w) − ½log σ(−βρ_w) − ½log σ(−βρ_l)``                   2402.05369 eq. 12
    ``robust``         ``[−(1−ε)log σ(x) + ε log σ(−x)]/(1 − 2ε)``                        2403.00409 eq. 8
    ``bco_pair``       ``−log σ(βρ_w) − log σ(−βρ_l)``                                    2404.04656 eq. 7
    ``sppo_hard``      ``(ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²``                              2405.00675 eq. 4.7
    ``aot``            smoothed logistic of ``β(sort(S_w−S_l) − sort(S^ref_w−S^ref_l))``   2406.05882 eq. 9
    ``aot_unpaired``   smoothed logistic of ``β(sort(ρ_w) − sort(ρ_l))``                   2406.05882 eq. 8
    ``apo_zero``       ``1 − σ(βρ_w) + σ(βρ_l)``                                          2408.06266 eq. 7
    ``apo_down``       ``σ(βρ_w) + 1 − σ(β(ρ_w − ρ_l))``                                   2408.06266 eq. 8
    ``discopop``       ``(1−m)(−log σ(x)) + m·e^{−x}``, ``m = σ(x/τ)``                      2406.08414 eq. 5
    ``sigmoid_norm``   ``−log σ(βΔ̄)``                                                    2411.15124 eq. 6
    ``cal_dpo``        :func:`cal_dpo_loss`                                              2412.14516 eq. 10
    ``tdpo1/2``        :func:`tdpo_loss` (needs ``chosen_kl`` / ``rejected_kl``)           2404.11999
    =================  ================================================================  ===============

    The AOT losses sort along the batch: the per-pair output is in sorted order (its mean is the loss).
    ``discopop``'s ``m·e^{−x}`` is evaluated as ``exp(log σ(x/τ) − x)`` (exponent clamped at 80) so it
    stays finite where TRL's product gives ``0·inf``.

    Args:
      chosen_logps / rejected_logps: ``[B]`` policy sequence log-probs ``S`` (differentiable).
      ref_chosen_logps / ref_rejected_logps: ``[B]`` reference sums (stop-gradient) or ``None``.
      loss_type: one of :data:`PREFERENCE_LOSS_TYPES` except ``sft``.
      beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau: as in
        :class:`PreferenceLossConfig`.
      chosen_lengths / rejected_lengths: ``[B]`` completion lengths (IPO / sigmoid_norm
        normalisation and R-DPO); ``None`` means 1 (no normalisation: the paper's IPO).
      sigmoid_label_smoothing: apply ``label_smoothing`` to ``sigmoid`` (cDPO).
      rdpo_alpha, dpop_lambda, offsets: logit modifiers above (``offsets``: ``[B]``).
      chosen_kl / rejected_kl: ``[B]`` TDPO sequential KLs; tdpo_alpha: TDPO2's α.

    Returns:
      ``[B]`` per-pair losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import dpo_loss
      >>> chosen, rejected = jnp.array([-10.0, -12.0]), jnp.array([-14.0, -11.0])
      >>> ref_chosen, ref_rejected = jnp.array([-11.0, -12.0]), jnp.array([-13.0, -12.0])
      >>> print(dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5))  # -log sigmoid(beta * margin)
      [0.3133 0.9741]
      >>> print(dpo_loss(chosen, rejected, ref_chosen, ref_rejected, "ipo", beta=0.5))  # (margin - 1/(2 beta))^2
      [1. 4.]
    """
    check_choice("loss_type", loss_type, tuple(t for t in PREFERENCE_LOSS_TYPES if t != "sft"))
    check_range("beta", beta, low=0.0, low_inclusive=False)
    cw = as_float(chosen_logps, "chosen_logps")
    cr = as_float(rejected_logps, "rejected_logps")
    check_rank(cw, 1, "chosen_logps")
    check_same_shape(cw, "chosen_logps", rejected_logps=cr, ref_chosen_logps=ref_chosen_logps,
                     ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths,
                     rejected_lengths=rejected_lengths, offsets=offsets, chosen_kl=chosen_kl,
                     rejected_kl=rejected_kl)
    zero = jnp.zeros_like(cw)
    rw = zero if ref_chosen_logps is None else jax.lax.stop_gradient(as_float(ref_chosen_logps, "ref_chosen_logps"))
    rr = zero if ref_rejected_logps is None else jax.lax.stop_gradient(
        as_float(ref_rejected_logps, "ref_rejected_logps"))
    rho_w, rho_l = cw - rw, cr - rr
    eps = label_smoothing
    lt = loss_type

    if lt in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired", "cal_dpo",
              "tdpo1", "tdpo2"):
        if lt == "nca_pair":
            a, b = beta * rho_w, beta * rho_l
            return -jax.nn.log_sigmoid(a) - 0.5 * jax.nn.log_sigmoid(-a) - 0.5 * jax.nn.log_sigmoid(-b)
        if lt == "bco_pair":
            return -jax.nn.log_sigmoid(beta * rho_w) - jax.nn.log_sigmoid(-beta * rho_l)
        if lt == "sppo_hard":
            return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
        if lt == "apo_zero":
            return (1.0 - jax.nn.sigmoid(beta * rho_w)) + jax.nn.sigmoid(beta * rho_l)
        if lt == "apo_down":
            return jax.nn.sigmoid(beta * rho_w) + (1.0 - jax.nn.sigmoid(beta * (rho_w - rho_l)))
        if lt == "aot":
            d = jnp.sort(cw - cr, axis=0) - jnp.sort(rw - rr, axis=0)
            return _smoothed_logistic(beta * d, eps)
        if lt == "aot_unpaired":
            d = jnp.sort(rho_w, axis=0) - jnp.sort(rho_l, axis=0)
            return _smoothed_logistic(beta * d, eps)
        if lt == "cal_dpo":
            return cal_dpo_loss(rho_w, rho_l, beta)
        if chosen_kl is None or rejected_kl is None:
            raise ValueError(f"`chosen_kl` and `rejected_kl` are required for loss_type={lt!r}")
        return tdpo_loss(rho_w, rho_l, chosen_kl, rejected_kl, beta, tdpo_alpha, lt)

    s_w = f_divergence_scores(rho_w, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_divergence_scores(rho_l, f_divergence_type, f_alpha_divergence_coef)
    if lt in ("ipo", "sigmoid_norm"):
        n_w = 1.0 if chosen_lengths is None else jnp.maximum(jnp.asarray(chosen_lengths, cw.dtype), 1.0)
        n_l = 1.0 if rejected_lengths is None else jnp.maximum(jnp.asarray(rejected_lengths, cw.dtype), 1.0)
        d = s_w / n_w - s_l / n_l
        if lt == "ipo":
            return (d - 1.0 / (2.0 * beta)) ** 2
        return -jax.nn.log_sigmoid(beta * d)

    x = _bradley_terry_logit(s_w - s_l, rho_w, beta, dpop_lambda, rdpo_alpha, chosen_lengths, rejected_lengths,
                             offsets)
    if lt == "sigmoid":
        return _smoothed_logistic(x, eps) if sigmoid_label_smoothing else -jax.nn.log_sigmoid(x)
    if lt == "hinge":
        return jax.nn.relu(1.0 - x)
    if lt == "exo_pair":
        check_range("label_smoothing", eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        lq_w, lq_l = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
        return jnp.exp(lq_w) * (lq_w - jnp.log1p(-eps)) + jnp.exp(lq_l) * (lq_l - jnp.log(eps))
    if lt == "robust":
        check_range("label_smoothing", eps, low=0.0, high=0.5, high_inclusive=False)
        return (-(1.0 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1.0 - 2.0 * eps)
    # discopop
    check_range("discopop_tau", discopop_tau, low=0.0, low_inclusive=False)
    log_m = jax.nn.log_sigmoid(x / discopop_tau)
    m = jnp.exp(log_m)
    return (1.0 - m) * (-jax.nn.log_sigmoid(x)) + jnp.exp(jnp.minimum(log_m - x, _EXP_CLAMP))


def _bradley_terry_logit(delta, rho_w, beta, dpop_lambda, rdpo_alpha, chosen_lengths, rejected_lengths, offsets):
    """``x = β(Δ − λ·max(0, −ρ_w)) + α_R(n_w − n_l) − offset`` (DPOP / R-DPO / ODPO, see :func:`dpo_loss`)."""
    if maybe_nonzero(dpop_lambda):
        delta = delta - dpop_lambda * jnp.maximum(-rho_w, 0.0)
    x = beta * delta
    if maybe_nonzero(rdpo_alpha):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("`chosen_lengths` and `rejected_lengths` are required when rdpo_alpha != 0 (or an array)")
        x = x + rdpo_alpha * (jnp.asarray(chosen_lengths, x.dtype) - jnp.asarray(rejected_lengths, x.dtype))
    if offsets is not None:
        x = x - jax.lax.stop_gradient(as_float(offsets, "offsets"))
    return x


def preference_sft_loss(
    chosen_logps: ArrayLike, chosen_mask: ArrayLike, num_tokens: Optional[Any] = None
) -> jax.Array:
    """The ``sft`` / RPO NLL term: ``−Σ m ℓ / max(N, 1)`` over *all* chosen completion tokens of the
    batch (token mean, TRL 1.16 ``loss_type="sft"``; RPO, arXiv 2405.16436 eq. 8; IRPO, arXiv
    2404.19733 eq. 2 normalises per sequence length instead).

    Args:
      chosen_logps: ``[B, T]`` chosen per-token log-probs.
      chosen_mask: ``[B, T]`` completion mask.
      num_tokens: global chosen-token count (micro-batching); defaults to this batch's. An empty
        batch gives 0 (TRL: NaN).

    Returns:
      scalar.
    """
    lp = as_float(chosen_logps, "chosen_logps")
    check_rank(lp, 2, "chosen_logps")
    m = as_mask(chosen_mask, "chosen_mask")
    check_same_shape(lp, "chosen_logps", chosen_mask=m)
    n = jnp.sum(m) if num_tokens is None else num_tokens
    return -masked_sum(lp, m) / jnp.maximum(jnp.asarray(n, lp.dtype), 1.0)


class BetaDPOState(NamedTuple):
    """Running statistics of β-DPO: EMA of the reward-gap mean ``M_0`` and std ``σ``."""

    mean: jnp.ndarray
    std: jnp.ndarray

    @classmethod
    def init(cls, mean: float = 0.0, std: float = 1.0) -> "BetaDPOState":
        return cls(jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))


def beta_dpo_loss(
    chosen_logratios: ArrayLike,
    rejected_logratios: ArrayLike,
    state: BetaDPOState,
    key: jax.Array,
    *,
    beta: Scalar = 0.1,
    alpha: Scalar = 0.6,
    rho: float = 0.8,
    gamma: Scalar = 0.9,
    beta_min: Scalar = 1e-3,
) -> Tuple[jax.Array, BetaDPOState, Dict[str, jax.Array]]:
    """β-DPO: batch-level dynamic β with data filtering (arXiv 2407.08639, eq. 7–9; Algorithm 1).

    With the reward gaps ``M_i = β_0 (ρ_w − ρ_l)`` (constants):

    1. ``M_0 ← γ M_0 + (1−γ) mean(M)``, ``σ ← γ σ + (1−γ) std(M)`` (updated first, then used);
    2. keep ``k = max(1, round(ρ·B))`` pairs sampled without replacement with probability
       ``∝ exp(−½((M_i − M_0)/σ)²)`` (outliers are filtered);
    3. ``β_b = max(β_0 (1 + α (mean_{kept}(M) − M_0)), beta_min)`` (stop-gradient);
    4. loss ``= mean_{kept} −log σ(β_b (ρ_w − ρ_l))``.

    Here ``rho`` is the kept fraction (paper: ``ρ = 0.8``; a Python number: it sets a shape), ``alpha``
    the paper's α. Under data
    parallelism compute the gap statistics on the gathered batch before calling.

    Args:
      chosen_logratios / rejected_logratios: ``[B]`` ``ρ``.
      state: :class:`BetaDPOState`; key: PRNG key for the pair sampling.

    Returns:
      ``(loss, new_state, metrics)`` with metrics ``beta`` (the batch β), ``kept`` (``[B]`` bool) and
      ``kept_frac``.
    """
    check_range("beta", beta, low=0.0, low_inclusive=False)
    check_range("alpha", alpha)
    check_range("rho", rho, low=0.0, high=1.0, low_inclusive=False)
    if is_array(rho):
        raise TypeError("rho must be a Python number, not an array: it sets the number of kept pairs (a shape)")
    check_range("gamma", gamma, low=0.0, high=1.0)
    check_range("beta_min", beta_min, low=0.0)
    w = as_float(chosen_logratios, "chosen_logratios")
    l_ = as_float(rejected_logratios, "rejected_logratios")
    check_rank(w, 1, "chosen_logratios")
    check_same_shape(w, "chosen_logratios", rejected_logratios=l_)
    B = w.shape[0]
    h = w - l_
    gaps = jax.lax.stop_gradient(beta * h)
    mean = gamma * state.mean + (1.0 - gamma) * jnp.mean(gaps)
    std = gamma * state.std + (1.0 - gamma) * jnp.std(gaps)
    z = (gaps - mean) / jnp.maximum(std, 1e-8)
    logp = -0.5 * z**2
    k = max(1, int(round(rho * B)))
    # sampling without replacement ∝ p: Gumbel top-k
    g = jax.random.gumbel(key, (B,), dtype=logp.dtype)
    _, idx = jax.lax.top_k(logp + g, k)
    keep = jnp.zeros((B,), bool).at[idx].set(True)
    sel_mean = jnp.sum(jnp.where(keep, gaps, 0.0)) / k
    beta_b = jax.lax.stop_gradient(jnp.maximum(beta * (1.0 + alpha * (sel_mean - mean)), beta_min))
    per_pair = -jax.nn.log_sigmoid(beta_b * h)
    loss = jnp.sum(jnp.where(keep, per_pair, 0.0)) / k
    new_state = BetaDPOState(mean.astype(state.mean.dtype), std.astype(state.std.dtype))
    return loss, new_state, {"beta": beta_b, "kept": keep, "kept_frac": jnp.asarray(k / B, jnp.float32)}


# ---------------------------------------------------------------------------------------- config


def _as_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(x)
    if isinstance(x, str) and "," in x:  # command-line form "sigmoid,sft"
        return tuple(p.strip() for p in x.split(","))
    return x


def _as_weights(x):
    """``loss_weights`` from a tuple / list / number / comma-separated string (command line)."""
    if x is None:
        return None
    if isinstance(x, str):
        x = tuple(p.strip() for p in x.split(","))
    elif not isinstance(x, (list, tuple)):
        x = (x,)
    out = []
    for w in x:
        if isinstance(w, str):
            try:
                w = float(w)
            except ValueError:
                raise ValueError(f"loss_weights={x!r} must be numbers") from None
        out.append(w)
    return tuple(out)


@register_config
@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig(ConfigMixin):
    """Configuration of :func:`preference_loss`. Hashable (a static argument under ``jit``) and a pytree
    whose float fields (``beta``, ``label_smoothing``, ``loss_weights``, ``ld_alpha``, ...) are leaves that
    may be JAX scalars, traced or not; loss types, f-divergence type and flags are static
    (``STATIC_FIELDS``).

    Field names and defaults follow TRL 1.16's ``DPOConfig``.

    Attributes:
      loss_type: one name of :data:`PREFERENCE_LOSS_TYPES` (or one added with
        :func:`register_preference_loss`) or a tuple of names (combined with
        ``loss_weights``, as MPO). ``aot_pair`` is accepted as the older name of ``aot_unpaired``.
      loss_weights: one weight per loss type (``None``: all 1). Command-line forms are accepted:
        ``loss_type="sigmoid,sft"``, ``loss_weights="1.0,0.005"``.
      beta: β > 0 (IPO's τ).
      label_smoothing: ε, used by ``robust`` (``[0, 0.5)``), ``exo_pair`` (``(0, 1)``), ``aot`` /
        ``aot_unpaired`` and, with ``sigmoid_label_smoothing``, ``sigmoid``.
      sigmoid_label_smoothing: apply ``label_smoothing`` to ``sigmoid`` (cDPO, conservative DPO; TRL
        1.16 ignores ``label_smoothing`` there). Preset: :meth:`cdpo`.
      f_divergence_type: ``reverse_kl | forward_kl | js_divergence | alpha_divergence`` (non-default
        only with the loss types of :data:`F_DIVERGENCE_LOSS_TYPES`).
      f_alpha_divergence_coef: α of the α-divergence.
      ld_alpha: LD-DPO tail weight in ``[0, 1]`` or ``None`` (off).
      use_weighting: WPO pair weights (needs the per-token ``log Σ π²``; not with ``aot*``).
      discopop_tau: DiscoPOP τ > 0.
      reference_free: ignore the reference (``S_ref = 0``), as TRL < 1.0's ``reference_free``.
      rpo_alpha: if set, add ``rpo_alpha ×`` the ``sft`` NLL term (RPO; TRL 1.16 spells it
        ``loss_type=[..., "sft"]``, ``loss_weights=[..., rpo_alpha]``, which gives the same loss).
      rdpo_alpha: R-DPO length coefficient (0: off).
      dpop_lambda: DPOP penalty λ ≥ 0 (0: off).
      tdpo_alpha: TDPO2 α ≥ 0.
    """

    loss_type: Union[str, Tuple[str, ...]] = "sigmoid"
    loss_weights: Optional[Tuple[Scalar, ...]] = None
    beta: Scalar = 0.1
    label_smoothing: Scalar = 0.0
    sigmoid_label_smoothing: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: Scalar = 0.5
    ld_alpha: Optional[Scalar] = None
    use_weighting: bool = False
    discopop_tau: Scalar = 0.05
    reference_free: bool = False
    rpo_alpha: Optional[Scalar] = None
    rdpo_alpha: Scalar = 0.0
    dpop_lambda: Scalar = 0.0
    tdpo_alpha: Scalar = 0.5

    def __post_init__(self):
        lt = _as_tuple(self.loss_type)
        names = (lt,) if isinstance(lt, str) else lt
        if not isinstance(names, tuple) or len(names) == 0 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"loss_type={self.loss_type!r} must be a loss name or a non-empty tuple of names; "
                             f"allowed values: {', '.join(map(repr, PREFERENCE_LOSS_TYPES))}")
        names = tuple(LOSS_TYPE_ALIASES.get(n, n) for n in names)
        for n in names:
            check_choice("loss_type", n, tuple(PREFERENCE_LOSS_REGISTRY))
        object.__setattr__(self, "loss_type", names[0] if isinstance(lt, str) else names)
        weights = _as_weights(self.loss_weights)
        if weights is not None:
            if len(weights) != len(names):
                raise ValueError(f"loss_weights={self.loss_weights!r} must have one weight per loss type "
                                 f"({len(names)} for loss_type={names!r})")
            for w in weights:
                check_range("loss_weights", w)
            weights = tuple(w if is_array(w) else float(w) for w in weights)
        object.__setattr__(self, "loss_weights", weights)
        check_range("beta", self.beta, low=0.0, low_inclusive=False)
        check_range("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False)
        if "robust" in names:
            check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5, high_inclusive=False)
        if "exo_pair" in names and not is_array(self.label_smoothing) and self.label_smoothing == 0.0:
            raise ValueError("label_smoothing=0.0 is not allowed with loss_type 'exo_pair'; allowed: (0.0, 1.0) "
                             "(the EXO paper uses 1e-3)")
        check_choice("f_divergence_type", self.f_divergence_type, F_DIVERGENCE_TYPES)
        if self.f_divergence_type != "reverse_kl":
            bad = [n for n in names if not PREFERENCE_LOSS_REGISTRY[n].f_divergence]
            if bad:
                ok = [n for n, e in PREFERENCE_LOSS_REGISTRY.items() if e.f_divergence]
                raise ValueError(f"f_divergence_type={self.f_divergence_type!r} is not allowed with loss_type "
                                 f"{bad!r}; allowed loss types: {', '.join(map(repr, ok))}")
        check_range("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        check_range("ld_alpha", self.ld_alpha, low=0.0, high=1.0, allow_none=True)
        if self.use_weighting:
            bad = [n for n in names if PREFERENCE_LOSS_REGISTRY[n].sorts_pairs]
            if bad:
                raise ValueError(f"use_weighting=True is not allowed with loss_type {bad!r} (AOT sorts pairs, "
                                 "which misaligns the per-pair weights); allowed: use_weighting=False")
        check_range("discopop_tau", self.discopop_tau, low=0.0, low_inclusive=False)
        check_range("rpo_alpha", self.rpo_alpha, low=0.0, allow_none=True)
        check_range("rdpo_alpha", self.rdpo_alpha)
        check_range("dpop_lambda", self.dpop_lambda, low=0.0)
        check_range("tdpo_alpha", self.tdpo_alpha, low=0.0)
        for f in ("sigmoid_label_smoothing", "use_weighting", "reference_free"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f}={getattr(self, f)!r} must be a bool; allowed values: True, False")
        modifies = [f for f in ("rdpo_alpha", "dpop_lambda")
                    if not is_array(getattr(self, f)) and getattr(self, f) != 0]
        if modifies and not any(PREFERENCE_LOSS_REGISTRY[n].logit_modifiers for n in names):
            ok = [n for n, e in PREFERENCE_LOSS_REGISTRY.items() if e.logit_modifiers]
            raise ValueError(f"rdpo_alpha / dpop_lambda modify the logit of loss types "
                             f"{', '.join(map(repr, ok))}; loss_type={names!r} has none")

    # -------------------------------------------------------------------------------- derived
    @property
    def loss_types(self) -> Tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def weighted_losses(self) -> Tuple[Tuple[str, Scalar], ...]:
        """``((loss_type, weight), ...)`` actually summed, the RPO ``sft`` term included."""
        weights = self.loss_weights or (1.0,) * len(self.loss_types)
        out = tuple(zip(self.loss_types, weights, strict=True))
        if self.rpo_alpha is not None:
            out = out + (("sft", self.rpo_alpha),)
        return out

    # -------------------------------------------------------------------------------- presets
    @classmethod
    def dpo(cls, **overrides) -> "PreferenceLossConfig":
        """DPO (arXiv 2305.18290): ``sigmoid``, ``beta=0.1``."""
        return cls(**{"loss_type": "sigmoid", "beta": 0.1, **overrides})

    @classmethod
    def cdpo(cls, label_smoothing: Scalar = 0.1, **overrides) -> "PreferenceLossConfig":
        """Conservative DPO (Mitchell 2023, eq. 3): label-smoothed ``sigmoid``, ``ε=0.1``."""
        return cls(**{"loss_type": "sigmoid", "sigmoid_label_smoothing": True, "label_smoothing": label_smoothing,
                      **overrides})

    @classmethod
    def ipo(cls, **overrides) -> "PreferenceLossConfig":
        """IPO (arXiv 2310.12036): ``ipo`` on length-averaged scores (τ = ``beta`` = 0.1)."""
        return cls(**{"loss_type": "ipo", **overrides})

    @classmethod
    def slic(cls, **overrides) -> "PreferenceLossConfig":
        """SLiC-HF (arXiv 2305.10425): ``hinge``."""
        return cls(**{"loss_type": "hinge", **overrides})

    @classmethod
    def rso(cls, **overrides) -> "PreferenceLossConfig":
        """RSO (arXiv 2309.06657): ``hinge`` with ``beta=0.05`` (pairs from rejection sampling)."""
        return cls(**{"loss_type": "hinge", "beta": 0.05, **overrides})

    @classmethod
    def robust(cls, **overrides) -> "PreferenceLossConfig":
        """Provably robust DPO (arXiv 2403.00409): ``robust``, ``beta=0.1``, ``label_smoothing=0.1``."""
        return cls(**{"loss_type": "robust", "beta": 0.1, "label_smoothing": 0.1, **overrides})

    @classmethod
    def exo(cls, **overrides) -> "PreferenceLossConfig":
        """EXO (arXiv 2402.00856): ``exo_pair``, ``beta=0.1``, ``label_smoothing=1e-3``."""
        return cls(**{"loss_type": "exo_pair", "beta": 0.1, "label_smoothing": 1e-3, **overrides})

    @classmethod
    def nca(cls, **overrides) -> "PreferenceLossConfig":
        """NCA (arXiv 2402.05369): ``nca_pair``, ``beta=0.01``."""
        return cls(**{"loss_type": "nca_pair", "beta": 0.01, **overrides})

    @classmethod
    def bco_pair(cls, **overrides) -> "PreferenceLossConfig":
        """BCO, paired (arXiv 2404.04656): ``bco_pair``, ``beta=0.01``."""
        return cls(**{"loss_type": "bco_pair", "beta": 0.01, **overrides})

    @classmethod
    def sppo_hard(cls, **overrides) -> "PreferenceLossConfig":
        """SPPO, hard labels (arXiv 2405.00675): ``sppo_hard``, ``beta=0.001``."""
        return cls(**{"loss_type": "sppo_hard", "beta": 0.001, **overrides})

    @classmethod
    def aot(cls, unpaired: bool = False, **overrides) -> "PreferenceLossConfig":
        """AOT (arXiv 2406.05882): ``aot`` (or ``aot_unpaired``), ``beta=0.01``."""
        return cls(**{"loss_type": "aot_unpaired" if unpaired else "aot", "beta": 0.01, **overrides})

    @classmethod
    def apo_zero(cls, **overrides) -> "PreferenceLossConfig":
        """APO-zero (arXiv 2408.06266): ``apo_zero``, ``beta=0.1``."""
        return cls(**{"loss_type": "apo_zero", "beta": 0.1, **overrides})

    @classmethod
    def apo_down(cls, **overrides) -> "PreferenceLossConfig":
        """APO-down (arXiv 2408.06266): ``apo_down``, ``beta=0.1``."""
        return cls(**{"loss_type": "apo_down", "beta": 0.1, **overrides})

    @classmethod
    def discopop(cls, **overrides) -> "PreferenceLossConfig":
        """DiscoPOP (arXiv 2406.08414): ``discopop``, ``beta=0.05``, ``discopop_tau=0.05``."""
        return cls(**{"loss_type": "discopop", "beta": 0.05, "discopop_tau": 0.05, **overrides})

    @classmethod
    def rpo(cls, **overrides) -> "PreferenceLossConfig":
        """RPO (arXiv 2405.16436; paper index): ``sigmoid`` + 0.005 × NLL, ``beta=0.01``."""
        return cls(**{"loss_type": "sigmoid", "rpo_alpha": 0.005, "beta": 0.01, **overrides})

    @classmethod
    def irpo(cls, **overrides) -> "PreferenceLossConfig":
        """Iterative RPO (arXiv 2404.19733): ``("sigmoid", "sft")`` with weights ``(1, 1)``."""
        return cls(**{"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0, 1.0), **overrides})

    @classmethod
    def mpo(cls, **overrides) -> "PreferenceLossConfig":
        """MPO (arXiv 2411.10442): ``("sigmoid", "bco_pair", "sft")`` weighted ``(0.8, 0.2, 1.0)``."""
        return cls(**{"loss_type": ("sigmoid", "bco_pair", "sft"), "loss_weights": (0.8, 0.2, 1.0), **overrides})

    @classmethod
    def wpo(cls, **overrides) -> "PreferenceLossConfig":
        """WPO (arXiv 2406.11827): ``sigmoid``, ``beta=0.01``, ``use_weighting=True``."""
        return cls(**{"loss_type": "sigmoid", "beta": 0.01, "use_weighting": True, **overrides})

    @classmethod
    def ld_dpo(cls, **overrides) -> "PreferenceLossConfig":
        """LD-DPO (arXiv 2409.06411): ``ld_alpha=0.5``."""
        return cls(**{"loss_type": "sigmoid", "ld_alpha": 0.5, **overrides})

    @classmethod
    def f_dpo(cls, **overrides) -> "PreferenceLossConfig":
        """f-DPO (arXiv 2309.16240): ``sigmoid`` with ``f_divergence_type="js_divergence"``, ``beta=0.1``."""
        return cls(**{"loss_type": "sigmoid", "f_divergence_type": "js_divergence", "beta": 0.1, **overrides})

    @classmethod
    def tulu3(cls, **overrides) -> "PreferenceLossConfig":
        """Tülu 3 length-normalised DPO (arXiv 2411.15124): ``sigmoid_norm``, ``beta=5``."""
        return cls(**{"loss_type": "sigmoid_norm", "beta": 5.0, **overrides})

    @classmethod
    def cal_dpo(cls, **overrides) -> "PreferenceLossConfig":
        """Cal-DPO (arXiv 2412.14516): ``cal_dpo``, ``beta=0.001``."""
        return cls(**{"loss_type": "cal_dpo", "beta": 0.001, **overrides})

    @classmethod
    def tdpo(cls, variant: str = "tdpo2", **overrides) -> "PreferenceLossConfig":
        """TDPO (arXiv 2404.11999): ``tdpo2`` with ``alpha=0.5``, ``beta=0.1`` (needs token KLs)."""
        return cls(**{"loss_type": variant, "beta": 0.1, "tdpo_alpha": 0.5, **overrides})

    @classmethod
    def rdpo(cls, **overrides) -> "PreferenceLossConfig":
        """R-DPO (arXiv 2403.19159): ``sigmoid`` with ``rdpo_alpha=0.01``."""
        return cls(**{"loss_type": "sigmoid", "rdpo_alpha": 0.01, **overrides})

    @classmethod
    def dpop(cls, **overrides) -> "PreferenceLossConfig":
        """DPOP / Smaug (arXiv 2402.13228): ``sigmoid`` with ``dpop_lambda=50``, ``beta=0.3``."""
        return cls(**{"loss_type": "sigmoid", "dpop_lambda": 50.0, "beta": 0.3, **overrides})

    PRESETS = ("dpo", "cdpo", "ipo", "slic", "rso", "robust", "exo", "nca", "bco_pair", "sppo_hard", "aot",
               "apo_zero", "apo_down", "discopop", "rpo", "irpo", "mpo", "wpo", "ld_dpo", "f_dpo", "tulu3",
               "cal_dpo", "tdpo", "rdpo", "dpop")

    # -------------------------------------------------------------------------------- from TRL
    @classmethod
    def from_trl(cls, **fields: Any) -> "PreferenceLossConfig":
        """Build from TRL ``DPOConfig`` field names and values (a whole ``DPOConfig.to_dict()`` is fine:
        unrelated fields are ignored, unknown loss values rejected). Also accepts the pre-1.0 fields
        ``reference_free`` and ``rpo_alpha``."""
        f = dict(fields)
        out: Dict[str, Any] = {}
        for key in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "ld_alpha",
                    "use_weighting", "discopop_tau", "reference_free", "rpo_alpha"):
            if key in f and f[key] is not None:
                out[key] = f[key]
        if "loss_type" in f and f["loss_type"] is not None:
            lt = f["loss_type"]
            out["loss_type"] = lt if isinstance(lt, str) else (lt[0] if len(lt) == 1 else tuple(lt))
        if f.get("loss_weights") is not None:
            w = tuple(f["loss_weights"])
            out["loss_weights"] = None if isinstance(out.get("loss_type"), str) and w == (1.0,) else w
        if "f_divergence_type" in out:  # an enum in some TRL versions
            out["f_divergence_type"] = getattr(out["f_divergence_type"], "value", out["f_divergence_type"])
        return cls(**out)


# ------------------------------------------------------------------------------------------ recipe


def _check_pair(lp, mask, name, mask_name, B=None):
    lp = as_float(lp, name)
    check_rank(lp, 2, name)
    mask = as_mask(mask, mask_name)
    check_same_shape(lp, name, **{mask_name: mask})
    if B is not None and lp.shape[0] != B:
        raise ValueError(f"`{name}` must have batch size {B} like `chosen_logps`, got {lp.shape[0]}")
    return lp, mask


def preference_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: Optional[ArrayLike],
    ref_rejected_logps: Optional[ArrayLike],
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    config: PreferenceLossConfig,
    *,
    chosen_log_sum_sq_probs: Optional[ArrayLike] = None,
    rejected_log_sum_sq_probs: Optional[ArrayLike] = None,
    chosen_token_kl: Optional[ArrayLike] = None,
    rejected_token_kl: Optional[ArrayLike] = None,
    offsets: Optional[ArrayLike] = None,
    num_pairs: Optional[Any] = None,
    num_chosen_tokens: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """DPO-family loss on per-token log-probs (DPO, arXiv 2305.18290, eq. 7, and its variants; MPO's
    weighted sum of losses, arXiv 2411.10442, eq. 6; TRL 1.16 ``DPOTrainer`` semantics).

    1. sequence log-probs ``S`` by masked sums, or the LD-DPO split (:func:`ld_dpo_logps`) when
       ``ld_alpha`` is set (policy and reference alike);
    2. for each ``(loss_type, weight)`` of ``config.weighted_losses``: the registered loss
       (``PREFERENCE_LOSS_REGISTRY``; built-ins: :func:`dpo_loss` per pair, or the scalar
       :func:`preference_sft_loss` for ``sft``; see :func:`register_preference_loss`), times the WPO pair
       weight ``w_w·w_l`` if ``use_weighting``, averaged over pairs, times the weight; summed.

    Args:
      chosen_logps / rejected_logps: ``[B, Tc]`` / ``[B, Tr]`` policy per-token log-probs.
      ref_chosen_logps / ref_rejected_logps: reference per-token log-probs of the same shapes
        (stop-gradient); may be ``None`` with ``reference_free``.
      chosen_mask / rejected_mask: completion masks.
      config: :class:`PreferenceLossConfig` (static, or a jit / vmap / grad argument: its float fields are leaves).
      chosen_log_sum_sq_probs / rejected_log_sum_sq_probs: per-token ``log Σ_v π_v²``, required by
        ``use_weighting``.
      chosen_token_kl / rejected_token_kl: per-token ``KL(π_ref ‖ π_θ)`` (:func:`tdpo_token_kl`),
        required by ``tdpo1`` / ``tdpo2``.
      offsets: ``[B]`` ODPO offsets (:func:`odpo_offset`), subtracted from the Bradley–Terry logit.
      num_pairs: global pair count (micro-batching; default ``B``); num_chosen_tokens: global chosen
        token count for the ``sft`` term. With both, micro-batch losses sum to the full-batch loss
        (except ``sft`` combined with WPO: a product of two batch means).

    Edge cases: an empty row has ``S = 0`` (so ``ρ = 0``; lengths are clamped to 1 where they divide)
    and gets zero gradient; NaN / inf under the masks never reach value or gradient; bf16 / fp16
    inputs are computed in float32.

    Returns:
      ``(loss, metrics)``: metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
      ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` as :class:`Mean` pairs over pairs
      (rewards are ``β·ρ``, constants), plus ``wpo/weight`` with ``use_weighting``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import PreferenceLossConfig, preference_loss
      >>> chosen = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
      >>> rejected = jnp.array([[-2.0, -2.0], [-1.0, -9.0]])
      >>> ref_chosen, ref_rejected = chosen + 0.5, rejected
      >>> mask_c = jnp.ones((2, 2), bool)
      >>> mask_r = jnp.array([[1, 1], [1, 0]], bool)  # the second rejected completion has one token
      >>> config = PreferenceLossConfig.dpo()
      >>> loss, metrics = preference_loss(chosen, rejected, ref_chosen, ref_rejected, mask_c, mask_r, config)
      >>> print(round(float(loss), 4), round(float(metrics["rewards/margins"].value), 4))
      0.7444 -0.1
    """
    if not isinstance(config, PreferenceLossConfig):
        raise TypeError(f"`config` must be a PreferenceLossConfig, got {type(config).__name__}")
    cl, cm = _check_pair(chosen_logps, chosen_mask, "chosen_logps", "chosen_mask")
    B = cl.shape[0]
    rl, rm = _check_pair(rejected_logps, rejected_mask, "rejected_logps", "rejected_mask", B)
    if config.reference_free:
        ref_c = ref_r = None
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("`ref_chosen_logps` and `ref_rejected_logps` are required unless reference_free=True")
        ref_c = as_float(ref_chosen_logps, "ref_chosen_logps")
        ref_r = as_float(ref_rejected_logps, "ref_rejected_logps")
        check_same_shape(cl, "chosen_logps", ref_chosen_logps=ref_c)
        check_same_shape(rl, "rejected_logps", ref_rejected_logps=ref_r)
        ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)

    # 1. sequence log-probs
    if config.ld_alpha is None:
        S_w, S_l = masked_sum(cl, cm, axis=-1), masked_sum(rl, rm, axis=-1)
        R_w = None if ref_c is None else masked_sum(ref_c, cm, axis=-1)
        R_l = None if ref_r is None else masked_sum(ref_r, rm, axis=-1)
    else:
        S_w, S_l = ld_dpo_logps(cl, rl, cm, rm, config.ld_alpha)
        R_w, R_l = (None, None) if ref_c is None or ref_r is None else ld_dpo_logps(ref_c, ref_r, cm, rm,
                                                                                     config.ld_alpha)
    n_w = jnp.sum(cm, -1).astype(S_w.dtype)
    n_l = jnp.sum(rm, -1).astype(S_w.dtype)

    kl_w = kl_l = None
    if chosen_token_kl is not None or rejected_token_kl is not None:
        if chosen_token_kl is None or rejected_token_kl is None:
            raise ValueError("`chosen_token_kl` and `rejected_token_kl` are required together (one of them is None)")
        ckl = as_float(chosen_token_kl, "chosen_token_kl")
        rkl = as_float(rejected_token_kl, "rejected_token_kl")
        check_same_shape(cl, "chosen_logps", chosen_token_kl=ckl)
        check_same_shape(rl, "rejected_logps", rejected_token_kl=rkl)
        kl_w, kl_l = masked_sum(ckl, cm, axis=-1), masked_sum(rkl, rm, axis=-1)
    entries = [(lt, PREFERENCE_LOSS_REGISTRY[lt], weight) for lt, weight in config.weighted_losses]
    if offsets is not None:
        offsets = as_float(offsets, "offsets")
        if offsets.shape != (B,):
            raise ValueError(f"`offsets` must have shape ({B},), got {tuple(offsets.shape)}")
        if not any(e.logit_modifiers for _, e, _ in entries):
            ok = [n for n, e in PREFERENCE_LOSS_REGISTRY.items() if e.logit_modifiers]
            raise ValueError(f"`offsets` (ODPO) modify the logit of loss types {', '.join(ok)}; "
                             f"loss_type={config.loss_type!r} has none")

    metrics: Dict[str, Any] = {}
    pair_w = None
    if config.use_weighting:
        if chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
            raise ValueError("`chosen_log_sum_sq_probs` and `rejected_log_sum_sq_probs` are required when "
                             "use_weighting=True")
        pair_w = wpo_weights(cl, chosen_log_sum_sq_probs, cm) * wpo_weights(rl, rejected_log_sum_sq_probs, rm)
        metrics["wpo/weight"] = mean_metric(pair_w)

    denom = jnp.asarray(B if num_pairs is None else num_pairs, S_w.dtype)
    denom = jnp.maximum(denom, 1.0)
    inputs = PreferenceInputs(config, S_w, S_l, R_w, R_l, n_w, n_l, offsets, kl_w, kl_l, cl, cm, num_chosen_tokens,
                              metrics)
    loss = jnp.zeros((), S_w.dtype)
    # 2. every (loss_type, weight) through the registry (built-ins and registered losses alike)
    for lt, entry, weight in entries:
        x = inputs if entry.logit_modifiers else inputs._replace(offsets=None)
        out = as_float(entry.loss(x), f"the output of loss_type {lt!r}")
        if not entry.per_pair:
            # a batch-level term (``sft``: a token mean, the same for every pair; TRL broadcasts it,
            # then averages over pairs): added directly so that micro-batch losses sum to the full-batch loss
            if out.shape != ():
                raise ValueError(f"loss_type {lt!r} is registered with per_pair=False and must return a scalar, "
                                 f"got shape {tuple(out.shape)}")
            if pair_w is not None:
                out = out * jnp.sum(pair_w) / denom
            loss = loss + weight * out
            continue
        if out.shape != (B,):
            raise ValueError(f"loss_type {lt!r} must return per-pair losses of shape ({B},), got {tuple(out.shape)}")
        if pair_w is not None:
            out = out * pair_w
        loss = loss + weight * (jnp.sum(out) / denom)

    # metrics (constants): implicit rewards β·ρ, as TRL
    sg = jax.lax.stop_gradient
    rho_w = S_w if R_w is None else S_w - R_w
    rho_l = S_l if R_l is None else S_l - R_l
    r_w, r_l = sg(config.beta * rho_w), sg(config.beta * rho_l)
    metrics["rewards/chosen"] = mean_metric(r_w)
    metrics["rewards/rejected"] = mean_metric(r_l)
    metrics["rewards/margins"] = mean_metric(r_w - r_l)
    metrics["rewards/accuracies"] = mean_metric((r_w > r_l).astype(jnp.float32))
    metrics["logps/chosen"] = mean_metric(sg(S_w))
    metrics["logps/rejected"] = mean_metric(sg(S_l))
    return loss, metrics


# -------------------------------------------------------------------------------------- loss registry


class PreferenceInputs(NamedTuple):
    """What step 2 of :func:`preference_loss` hands a registered loss (see :func:`register_preference_loss`).

    Sequence-level ``[B]`` arrays: ``chosen_logps`` / ``rejected_logps`` are the policy's ``S``
    (differentiable; LD-DPO-weighted when ``config.ld_alpha`` is set), ``ref_chosen_logps`` /
    ``ref_rejected_logps`` the reference's (constants; ``None`` with ``reference_free``),
    ``chosen_lengths`` / ``rejected_lengths`` the completion lengths, ``offsets`` the ODPO offsets
    (``None`` unless given and the loss takes the logit modifiers), ``chosen_kl`` / ``rejected_kl`` the
    TDPO sequential KLs (``None`` unless given). Per-token ``chosen_token_logps`` / ``chosen_mask``
    ``[B, Tc]`` and the global ``num_chosen_tokens`` serve token-level terms (the ``sft`` NLL). A loss
    may add scalar metrics to ``metrics`` (``Mean`` pairs via ``mean_metric``).
    """

    config: "PreferenceLossConfig"
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: Optional[jax.Array]
    ref_rejected_logps: Optional[jax.Array]
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array
    offsets: Optional[jax.Array]
    chosen_kl: Optional[jax.Array]
    rejected_kl: Optional[jax.Array]
    chosen_token_logps: jax.Array
    chosen_mask: jax.Array
    num_chosen_tokens: Optional[Any]
    metrics: Dict[str, Any]

    def logratios(self) -> Tuple[jax.Array, jax.Array]:
        """``(ρ_w, ρ_l)`` with ``ρ = S − S_ref`` (``S_ref = 0`` reference-free)."""
        rw = self.chosen_logps if self.ref_chosen_logps is None else self.chosen_logps - self.ref_chosen_logps
        rl = self.rejected_logps if self.ref_rejected_logps is None else self.rejected_logps - self.ref_rejected_logps
        return rw, rl

    def logit(self) -> jax.Array:
        """The Bradley–Terry logit ``x = β(Δ − λ·max(0, −ρ_w)) + α_R(n_w − n_l) − offset`` of
        :func:`dpo_loss`, with the config's f-divergence scores ``Δ = g(ρ_w) − g(ρ_l)``, DPOP ``λ``,
        R-DPO ``α_R`` and ODPO offsets (a loss registered with ``logit_modifiers=True`` uses it)."""
        c = self.config
        rho_w, rho_l = self.logratios()
        s_w = f_divergence_scores(rho_w, c.f_divergence_type, c.f_alpha_divergence_coef)
        s_l = f_divergence_scores(rho_l, c.f_divergence_type, c.f_alpha_divergence_coef)
        return _bradley_terry_logit(s_w - s_l, rho_w, c.beta, c.dpop_lambda, c.rdpo_alpha, self.chosen_lengths,
                                    self.rejected_lengths, self.offsets)


@dataclasses.dataclass(frozen=True)
class PreferenceLossType:
    """A registered preference ``loss_type``: ``loss`` (``PreferenceInputs -> [B]`` per-pair losses, or a
    scalar batch-level term when ``per_pair`` is False), and what the config may combine it with:
    ``f_divergence`` (a non-default ``f_divergence_type``), ``logit_modifiers`` (``rdpo_alpha``,
    ``dpop_lambda``, ODPO ``offsets``), ``sorts_pairs`` (its per-pair output is not in batch order, so
    no WPO weighting)."""

    loss: Callable[[PreferenceInputs], jax.Array]
    per_pair: bool = True
    f_divergence: bool = False
    logit_modifiers: bool = False
    sorts_pairs: bool = False


PREFERENCE_LOSS_REGISTRY: Dict[str, PreferenceLossType] = {}
"""Every ``loss_type`` :class:`PreferenceLossConfig` accepts, built-ins included
(name -> :class:`PreferenceLossType`)."""


def register_preference_loss(name: str, loss: Callable[[PreferenceInputs], jax.Array], *, per_pair: bool = True,
                             f_divergence: bool = False, logit_modifiers: bool = False, sorts_pairs: bool = False,
                             overwrite: bool = False) -> PreferenceLossType:
    """Register a preference loss under ``loss_type=name``, so :class:`PreferenceLossConfig` accepts it
    (alone or in a weighted combination, as MPO) and :func:`preference_loss` runs it through the whole
    pipeline (sequence sums or LD-DPO, reference, WPO weights, pair averaging with ``num_pairs``, RPO
    term, reward metrics) without editing trlax. The built-in loss types are registered the same way.

    Args:
      name: the new ``loss_type``.
      loss: ``PreferenceInputs -> [B]`` per-pair losses to minimise (pure and jit-compatible; read
        hyperparameters from ``inputs.config``, e.g. ``inputs.config.beta``, which may be traced).
      per_pair: False for a batch-level scalar term (as the ``sft`` NLL), added without pair averaging.
      f_divergence: accept a non-default ``f_divergence_type`` (the loss uses the scores of
        :meth:`PreferenceInputs.logit` or :func:`f_divergence_scores`).
      logit_modifiers: accept ``rdpo_alpha`` / ``dpop_lambda`` / ``offsets`` (use :meth:`PreferenceInputs.logit`).
      sorts_pairs: the per-pair output is not in batch order (refuses WPO weighting).
      overwrite: allow replacing an existing name (built-ins included).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import PreferenceLossConfig, preference_loss, register_preference_loss
      >>> def squared_margin(x):  # (β·(ρ_w − ρ_l) − 1)², a toy loss on the implicit-reward margin
      ...     rho_w, rho_l = x.logratios()
      ...     return (x.config.beta * (rho_w - rho_l) - 1.0) ** 2
      >>> _ = register_preference_loss("squared_margin_doc", squared_margin, overwrite=True)
      >>> lp = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
      >>> mask = jnp.ones((2, 2), bool)
      >>> cfg = PreferenceLossConfig(loss_type="squared_margin_doc", beta=0.5)
      >>> loss, metrics = preference_loss(lp, lp - 1.0, lp, lp, mask, mask, cfg)
      >>> print(round(float(loss), 4))  # ρ_w − ρ_l = 2 in both pairs: (0.5·2 − 1)² = 0
      0.0
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a non-empty string")
    if name in LOSS_TYPE_ALIASES:
        raise ValueError(f"name={name!r} is an alias of {LOSS_TYPE_ALIASES[name]!r}; pick another name")
    if name in PREFERENCE_LOSS_REGISTRY and not overwrite:
        raise ValueError(f"loss_type {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(loss):
        raise TypeError(f"`loss` must be callable, got {type(loss).__name__}")
    entry = PreferenceLossType(loss, bool(per_pair), bool(f_divergence), bool(logit_modifiers), bool(sorts_pairs))
    PREFERENCE_LOSS_REGISTRY[name] = entry
    return entry


def _builtin_pair_loss(lt: str) -> Callable[[PreferenceInputs], jax.Array]:
    """The per-pair loss of built-in ``lt``: :func:`dpo_loss` with the config's hyperparameters."""
    logit = lt in LOGIT_LOSS_TYPES

    def loss(x: PreferenceInputs) -> jax.Array:
        c = x.config
        if lt in TDPO_VARIANTS and (x.chosen_kl is None or x.rejected_kl is None):
            raise ValueError("`chosen_token_kl` and `rejected_token_kl` are required for loss_type tdpo1 / tdpo2")
        return dpo_loss(
            x.chosen_logps, x.rejected_logps, x.ref_chosen_logps, x.ref_rejected_logps, lt, beta=c.beta,
            label_smoothing=c.label_smoothing, f_divergence_type=c.f_divergence_type,
            f_alpha_divergence_coef=c.f_alpha_divergence_coef, discopop_tau=c.discopop_tau,
            chosen_lengths=x.chosen_lengths, rejected_lengths=x.rejected_lengths,
            sigmoid_label_smoothing=c.sigmoid_label_smoothing, rdpo_alpha=c.rdpo_alpha if logit else 0.0,
            dpop_lambda=c.dpop_lambda if logit else 0.0, offsets=x.offsets if logit else None,
            chosen_kl=x.chosen_kl, rejected_kl=x.rejected_kl, tdpo_alpha=c.tdpo_alpha)

    loss.__name__ = loss.__qualname__ = f"dpo_loss[{lt}]"
    return loss


def _sft_term(x: PreferenceInputs) -> jax.Array:
    return preference_sft_loss(x.chosen_token_logps, x.chosen_mask, x.num_chosen_tokens)


for _name in PREFERENCE_LOSS_TYPES:
    if _name == "sft":
        register_preference_loss("sft", _sft_term, per_pair=False, f_divergence=True)
    else:
        register_preference_loss(_name, _builtin_pair_loss(_name), f_divergence=_name in F_DIVERGENCE_LOSS_TYPES,
                                 logit_modifiers=_name in LOGIT_LOSS_TYPES,
                                 sorts_pairs=_name in ("aot", "aot_unpaired"))
del _name



__all__ = [
    "ALPHA_DIVERGENCE_CLAMP",
    "LOSS_TYPE_ALIASES",
    "TDPO_VARIANTS",
    "BetaDPOState",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LOGIT_LOSS_TYPES",
    "PREFERENCE_LOSS_REGISTRY",
    "PREFERENCE_LOSS_TYPES",
    "PreferenceInputs",
    "PreferenceLossConfig",
    "PreferenceLossType",
    "beta_dpo_loss",
    "cal_dpo_loss",
    "dpo_loss",
    "f_divergence_scores",
    "ld_dpo_logps",
    "length_normalized_scores",
    "odpo_offset",
    "preference_loss",
    "preference_sft_loss",
    "register_preference_loss",
    "sequence_logps",
    "tdpo_loss",
    "tdpo_token_kl",
    "wpo_weights",
]
