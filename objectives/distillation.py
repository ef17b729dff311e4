"""Knowledge-distillation objectives on logits and sampled-token log-probs.

- :func:`generalized_jsd` — per-token generalised Jensen-Shannon divergence of GKD (arXiv 2306.13649,
  eq. 1); ``beta = 0`` is forward KL(p_T‖p_S), ``beta = 1`` reverse KL(p_S‖p_T) (:func:`forward_kl`,
  :func:`reverse_kl`). :func:`gkd_loss` reduces it at token or sequence level.
- :func:`on_policy_distillation_loss` — per-token reverse KL ``−(ℓ_S − ℓ_T)`` on student samples used as
  a policy-gradient advantage (Agarwal et al. 2306.13649 sec. 3; Thinking Machines "On-Policy
  Distillation"); :func:`on_policy_distillation_advantages` is the advantage alone.
- :func:`iw_opd_loss` — IW-OPD position-bias importance weighting (arXiv 2606.22600);
  :func:`sparse_top1_divergence` — its sparse top-1 generalised JSD (TRL ``loss_top_k=1``).
- :func:`uld_loss` — ULD / GOLD cross-tokenizer distillation on sorted probabilities (arXiv 2402.12030).
- :func:`transform_logits` — LM-head bias, logit scale and soft-capping (``gkd_loss``'s head options).
- :func:`self_distillation_loss` — SDPO / SDFT self-distillation on the student's top-k logits (or full
  vocabulary, or the sampled token) with an importance-sampling clip (arXiv 2601.20802, 2601.19897).
- :func:`minillm_loss` — MiniLLM reverse-KL policy gradient (arXiv 2306.08543, eq. 5-7).

Teacher quantities are always treated as constants (``stop_gradient``). Logits are ``[B, T, V]``;
per-token quantities ``[B, T]``; ``mask`` is ``[B, T]``. Divergences are computed in float32 or wider.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

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
    check_shape,
    is_array,
    maybe_nonzero,
)
from trlax.objectives.aggregation import AGGREGATION_MODES, aggregate, masked_sum, mean_metric

DISTILLATION_LEVELS = ("token", "sequence", "mean", "sum")
TOP1_REVERSE_MODES = ("sampled", "argmax")
SELF_DISTILLATION_MODES = ("topk_logits", "full_logit", "sampled_token")

_sg = jax.lax.stop_gradient


def _kl_from_logprobs(log_p, log_q) -> jnp.ndarray:
    """``Σ_v p (log p − log q)`` over the last axis; terms with ``p = 0`` contribute 0 (selected
    before the product, so ``log p = −inf`` never makes a NaN)."""
    pos = log_p > -jnp.inf
    lp = jnp.where(pos, log_p, 0.0)
    diff = jnp.where(pos, lp - jnp.where(pos, log_q, 0.0), 0.0)
    return jnp.sum(jnp.where(pos, jnp.exp(lp) * diff, 0.0), axis=-1)


def _divergence(log_s, log_t, beta: Scalar) -> jax.Array:
    """Generalised JSD between log-prob vectors (last axis): β·KL(T‖M) + (1−β)·KL(S‖M)."""
    if is_array(beta):  # traced β: the same three cases as selects (the mixture sees β inside (0, 1))
        mixture = _mixture(log_s, log_t, jnp.clip(beta, 1e-6, 1.0 - 1e-6))
        return jnp.where(beta == 0.0, _kl_from_logprobs(log_t, log_s),
                         jnp.where(beta == 1.0, _kl_from_logprobs(log_s, log_t), mixture))
    if beta == 0.0:
        return _kl_from_logprobs(log_t, log_s)
    if beta == 1.0:
        return _kl_from_logprobs(log_s, log_t)
    return _mixture(log_s, log_t, beta)


def _mixture(log_s, log_t, beta) -> jnp.ndarray:
    both = (log_s == -jnp.inf) & (log_t == -jnp.inf)  # (an empty support entry: no NaN gradient)
    log_m = jnp.logaddexp(jnp.where(both, 0.0, log_s) + jnp.log1p(-beta), jnp.where(both, 0.0, log_t) + jnp.log(beta))
    return beta * _kl_from_logprobs(log_t, log_m) + (1.0 - beta) * _kl_from_logprobs(log_s, log_m)


def _logits_pair(student_logits, teacher_logits, same_vocab: bool = True):
    s = as_float(student_logits, "student_logits")
    t = _sg(as_float(teacher_logits, "teacher_logits"))
    check_rank(s, 3, "student_logits")
    if same_vocab:
        check_same_shape(s, "student_logits", teacher_logits=t)
    else:
        check_rank(t, 3, "teacher_logits")
    dt = jnp.promote_types(s.dtype, t.dtype)
    return s.astype(dt), t.astype(dt)


def transform_logits(
    logits: ArrayLike,
    *,
    bias: Optional[ArrayLike] = None,
    scale: Scalar = 1.0,
    softcap: Optional[Scalar] = None,
) -> jax.Array:
    """Final-logit post-processing of LM heads, in TRL ``DistillationTrainer``'s order: ``z = (z + bias)·scale``
    (LM-head bias; Cohere / Granite-style ``logit_scale``), then Gemma-style soft-capping
    ``softcap·tanh(z / softcap)``. ``[..., V]`` in and out; ``bias`` is ``[V]``."""
    z = as_float(logits, "logits")
    if bias is not None:
        b = as_float(bias, "bias")
        if b.shape != z.shape[-1:]:
            raise ValueError(f"`bias` must have shape {tuple(z.shape[-1:])}, got {tuple(b.shape)}")
        z = z + b.astype(z.dtype)
    check_range("scale", scale, low=0.0, low_inclusive=False)
    check_range("softcap", softcap, low=0.0, low_inclusive=False, allow_none=True)
    z = z * scale
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def _head_options(s, t, heads):
    """Apply the ``student_*`` / ``teacher_*`` :func:`transform_logits` options (``HEAD_OPTIONS``)."""
    bad = sorted(set(heads) - set(HEAD_OPTIONS))
    if bad:
        raise TypeError(f"unknown logit option(s) {bad}; allowed: {', '.join(HEAD_OPTIONS)}")
    if not heads:
        return s, t
    for who, x in (("student", s), ("teacher", t)):  # errors name the option
        check_range(f"{who}_logit_scale", heads.get(f"{who}_logit_scale", 1.0), low=0.0, low_inclusive=False)
        cap = f"{who}_final_logit_softcapping"
        check_range(cap, heads.get(cap), low=0.0, low_inclusive=False, allow_none=True)
        bias = heads.get(f"{who}_lm_head_bias")
        if bias is not None and jnp.shape(bias) != x.shape[-1:]:
            raise ValueError(f"`{who}_lm_head_bias` must have shape {tuple(x.shape[-1:])}, got {jnp.shape(bias)}")

    def opts(who):
        return dict(bias=heads.get(f"{who}_lm_head_bias"), scale=heads.get(f"{who}_logit_scale", 1.0),
                    softcap=heads.get(f"{who}_final_logit_softcapping"))
    return transform_logits(s, **opts("student")), _sg(transform_logits(t, **opts("teacher")))


HEAD_OPTIONS = ("student_lm_head_bias", "teacher_lm_head_bias", "student_logit_scale", "teacher_logit_scale",
                "student_final_logit_softcapping", "teacher_final_logit_softcapping")


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: Scalar = 0.5,
    temperature: Scalar = 1.0,
    **head_options,
) -> jax.Array:
    """Per-token generalised JSD of GKD (Agarwal et al., arXiv 2306.13649, eq. 1; TRL
    ``GKDTrainer.generalized_jsd_loss`` before reduction).

    With ``p_S = softmax(z_S/τ)``, ``p_T = softmax(z_T/τ)`` and ``M = (1−β)p_S + βp_T``:
    ``JSD_β = β·KL(p_T‖M) + (1−β)·KL(p_S‖M)``; ``β = 0`` gives KL(p_T‖p_S) and ``β = 1``
    KL(p_S‖p_T) exactly (not the degenerate mixture).

    ``head_options`` (TRL ``DistillationTrainer``, read there from each model's config / LM head) are applied
    before the temperature by :func:`transform_logits`: ``student_lm_head_bias`` / ``teacher_lm_head_bias``
    (``[V]``), ``student_logit_scale`` / ``teacher_logit_scale`` (> 0, default 1),
    ``student_final_logit_softcapping`` / ``teacher_final_logit_softcapping`` (> 0 or None).

    Args:
      student_logits, teacher_logits: ``[B, T, V]`` (teacher is a constant).
      beta: β in [0, 1]. temperature: τ > 0.

    Returns:
      ``[B, T]`` divergence per position (unmasked; reduce with :func:`gkd_loss` or ``aggregate``).
    """
    check_range("beta", beta, low=0.0, high=1.0)
    check_range("temperature", temperature, low=0.0, low_inclusive=False)
    s, t = _logits_pair(student_logits, teacher_logits)
    s, t = _head_options(s, t, head_options)
    log_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_t = jax.nn.log_softmax(t / temperature, axis=-1)
    return _divergence(log_s, log_t, beta)


def forward_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *, temperature: Scalar = 1.0) -> jax.Array:
    """Per-token forward KL(p_T‖p_S) (mode-covering; word-level KD, Hinton et al. arXiv 1503.02531,
    Kim & Rush arXiv 1606.07947): ``[B, T, V] -> [B, T]``. Equal to :func:`generalized_jsd` with ``beta=0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import forward_kl
      >>> student = jnp.log(jnp.array([[[0.5, 0.5]]]))
      >>> teacher = jnp.log(jnp.array([[[0.9, 0.1]]]))
      >>> print(forward_kl(student, teacher))  # KL(teacher || student) = 0.9 log 1.8 + 0.1 log 0.2
      [[0.3681]]
    """
    return generalized_jsd(student_logits, teacher_logits, beta=0.0, temperature=temperature)


def reverse_kl(student_logits: ArrayLike, teacher_logits: ArrayLike, *, temperature: Scalar = 1.0) -> jax.Array:
    """Per-token reverse KL(p_S‖p_T) (mode-seeking; MiniLLM arXiv 2306.08543 eq. 1, GKD β = 1):
    ``[B, T, V] -> [B, T]``. Equal to :func:`generalized_jsd` with ``beta=1``."""
    return generalized_jsd(student_logits, teacher_logits, beta=1.0, temperature=temperature)


def gkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    mask: ArrayLike,
    *,
    beta: Scalar = 0.5,
    temperature: Scalar = 1.0,
    level: str = "token",
    num_items: Optional[Any] = None,
    num_sequences: Optional[Any] = None,
    **head_options,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """GKD loss (arXiv 2306.13649, eq. 1-2; TRL ``GKDTrainer``): masked generalised JSD, reduced

    - ``token``: ``Σ_{b,t} m·JSD / max(N, 1)`` with ``N = num_items`` (global token count of the
      optimiser batch) or the local count — TRL's ``num_items_in_batch`` / ``batchmean`` reduction;
    - ``sequence``: ``Σ_b Σ_t m·JSD / num_sequences`` — the sequence-level divergence (sum over
      positions, the chain rule of KL) averaged over rows (``num_sequences`` defaults to ``B``);
    - ``mean``: ``Σ_{b,t} m·JSD / max(N·V, 1)`` — TRL's ``reduction="mean"`` (the mean over the masked
      ``[N, V]`` elementwise divergence terms, i.e. ``token`` divided by the vocabulary size);
    - ``sum``: ``Σ_{b,t} m·JSD`` (TRL ``reduction="sum"``).

    ``head_options``: the logit post-processing of :func:`generalized_jsd` (LM-head bias, logit scale,
    final-logit soft-capping of either model; TRL ``DistillationTrainer``).

    Which sequences are fed (on-policy student samples with probability ``lmbda``, teacher or
    dataset otherwise) is the data pipeline's choice; the loss is the same.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``.
      mask: ``[B, T]`` completion mask.
      beta: β in [0, 1] (paper index 0.5). temperature: τ > 0 (TRL's loss uses 1).
      level: ``token`` (TRL ``batchmean``) | ``sequence`` | ``mean`` | ``sum``.

    Returns:
      ``(loss, metrics)`` with ``jsd`` (Mean over tokens).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import gkd_loss
      >>> student = jnp.array([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
      >>> teacher = jnp.array([[[2.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
      >>> mask = jnp.array([[1, 0]], bool)  # the second position is padding
      >>> loss, metrics = gkd_loss(student, teacher, mask, beta=0.5)
      >>> print(round(float(loss), 4))
      0.2476
    """
    check_choice("level", level, DISTILLATION_LEVELS)
    jsd = generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature, **head_options)
    m = as_mask(mask)
    check_same_shape(jsd, "student_logits[..., 0]", mask=m)
    total = masked_sum(jsd, m)
    if level in ("token", "mean"):
        n = jnp.sum(m).astype(jsd.dtype) if num_items is None else jnp.asarray(num_items, jsd.dtype)
        n = n * jnp.shape(student_logits)[-1] if level == "mean" else n
    elif level == "sequence":
        n = jnp.asarray(jsd.shape[0] if num_sequences is None else num_sequences, jsd.dtype)
    else:
        n = jnp.ones((), jsd.dtype)
    loss = total / jnp.maximum(n, 1)
    return loss, {"jsd": mean_metric(_sg(jsd), m)}


# ---------------------------------------------------------------------------- on-policy distillation


def on_policy_distillation_advantages(
    student_logps: ArrayLike,
    teacher_logps: ArrayLike,
    mask: ArrayLike,
    *,
    kl_coef: Scalar = 1.0,
) -> jax.Array:
    """Per-token reverse-KL advantage of on-policy distillation (Thinking Machines, "On-Policy
    Distillation", 2025; GKD arXiv 2306.13649 sec. 3 with β = 1, discount 0):
    ``A_t = −kl_coef·(log π_S(y_t) − log π_T(y_t))`` on the student's own samples, 0 where masked.

    Args:
      student_logps: ``[B, T]`` log-probs of the sampled tokens under the sampling student.
      teacher_logps: ``[B, T]`` teacher log-probs of the same tokens.
      mask: ``[B, T]``.

    Returns:
      ``[B, T]`` advantages (constants).
    """
    check_range("kl_coef", kl_coef, low=0.0)
    s = _sg(as_float(student_logps, "student_logps"))
    t = _sg(as_float(teacher_logps, "teacher_logps"))
    check_rank(s, 2, "student_logps")
    m = as_mask(mask)
    check_same_shape(s, "student_logps", teacher_logps=t, mask=m)
    zero = jnp.zeros((), s.dtype)
    return jnp.where(m, -kl_coef * (jnp.where(m, s, zero) - jnp.where(m, t, zero)), zero)


def on_policy_distillation_loss(
    logps: ArrayLike,
    teacher_logps: ArrayLike,
    mask: ArrayLike,
    *,
    sampler_logps: Optional[ArrayLike] = None,
    kl_coef: Scalar = 1.0,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """On-policy distillation (GKD arXiv 2306.13649 sec. 3 with β = 1; Thinking Machines 2025) as an
    importance-sampled policy gradient with the per-token reverse-KL advantage
    (:func:`on_policy_distillation_advantages` of the *sampler* log-probs):
    ``loss = −Σ_{b,t} m·(π_θ/π_sampler)(y_t)·A_t / max(N, 1)``. On-policy (``sampler_logps=None``)
    the ratio is 1 and the gradient is ``−Σ A_t ∇log π_θ(y_t) / N`` — the reverse-KL gradient
    (per-token, no future terms).

    Args:
      logps: ``[B, T]`` student log-probs (differentiable). teacher_logps: ``[B, T]`` (constant).
      mask: ``[B, T]``. sampler_logps: ``[B, T]`` behaviour log-probs (``sg(logps)`` if None).
      kl_coef: advantage scale ≥ 0. num_items: global token count.

    Returns:
      ``(loss, metrics)`` with ``reverse_kl`` (Mean of ``ℓ_sampler − ℓ_T``).
    """
    lp = as_float(logps, "logps")
    check_rank(lp, 2, "logps")
    m = as_mask(mask)
    check_same_shape(lp, "logps", mask=m, sampler_logps=sampler_logps)
    zero = jnp.zeros((), lp.dtype)
    lp = jnp.where(m, lp, zero)
    beh = _sg(lp) if sampler_logps is None else _sg(jnp.where(m, as_float(sampler_logps, "sampler_logps"), zero))
    adv = on_policy_distillation_advantages(beh, teacher_logps, m, kl_coef=kl_coef)
    ratio = jnp.exp(jnp.clip(lp - beh, -20.0, 20.0))
    per_token = -ratio * adv
    loss = aggregate(per_token, m, "token_mean", num_items=num_items)
    rkl = jnp.where(m, beh - jnp.where(m, _sg(as_float(teacher_logps, "teacher_logps")), zero), zero)
    return loss, {"reverse_kl": mean_metric(rkl, m)}


def iw_opd_weights(advantages: ArrayLike, mask: ArrayLike, *, gamma: Scalar = 0.5, eps: Scalar = 1e-8) -> jax.Array:
    """IW-OPD position weights (arXiv 2606.22600, eq. 7; TRL ``IWOPDTrainer``):
    ``w_t = 1 + γ·(1 − Σ_{s<t}|a_s| / max(Σ_s|a_s|, ε))`` — tokens before most of the row's
    teacher-student disagreement get up to ``1 + γ``, the tail down to 1.

    Args:
      advantages: ``[B, T]`` per-token ``a_t`` (masked entries ignored). mask: ``[B, T]``.
      gamma: γ ≥ 0 (paper index 0.5). eps: ε > 0.

    Returns:
      ``[B, T]`` weights (constants), 0 where masked.
    """
    check_range("gamma", gamma, low=0.0)
    check_range("eps", eps, low=0.0, low_inclusive=False)
    a = _sg(as_float(advantages, "advantages"))
    check_rank(a, 2, "advantages")
    m = as_mask(mask)
    check_same_shape(a, "advantages", mask=m)
    abs_a = jnp.where(m, jnp.abs(jnp.where(m, a, 0.0)), 0.0)
    prefix = jnp.cumsum(abs_a, axis=-1) - abs_a
    total = jnp.maximum(jnp.sum(abs_a, axis=-1, keepdims=True), eps)
    w = 1.0 + gamma * (1.0 - prefix / total)
    return jnp.where(m, w, 0.0)


def iw_opd_loss(
    logps: ArrayLike,
    teacher_logps: ArrayLike,
    mask: ArrayLike,
    *,
    rollout_logps: Optional[ArrayLike] = None,
    gamma: Scalar = 0.5,
    eps: Scalar = 1e-8,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """IW-OPD, importance-weighted on-policy distillation (arXiv 2606.22600, eq. 8; TRL
    ``IWOPDTrainer._compute_iw_opd_loss``):
    ``a_t = sg(ℓ_T − ℓ_roll)``, ``w_t`` = :func:`iw_opd_weights`,
    ``loss = −Σ m·ℓ_S(y_t)·w_t·a_t / max(N, 1)``.

    Args:
      logps: ``[B, T]`` student log-probs of the sampled tokens (differentiable).
      teacher_logps: ``[B, T]`` teacher log-probs. rollout_logps: ``[B, T]`` sampler log-probs
        (student's own, detached, when None).
      mask: ``[B, T]``. gamma, eps: as :func:`iw_opd_weights`. num_items: global token count.

    Returns:
      ``(loss, metrics)`` with ``mean_advantage``, ``mean_abs_advantage``, ``mean_weight``.
    """
    lp = as_float(logps, "logps")
    check_rank(lp, 2, "logps")
    m = as_mask(mask)
    check_same_shape(lp, "logps", mask=m, teacher_logps=teacher_logps, rollout_logps=rollout_logps)
    zero = jnp.zeros((), lp.dtype)
    lp = jnp.where(m, lp, zero)
    t = jnp.where(m, _sg(as_float(teacher_logps, "teacher_logps")), zero)
    roll = lp if rollout_logps is None else jnp.where(m, as_float(rollout_logps, "rollout_logps"), zero)
    a = jnp.where(m, _sg(t - roll), zero)
    w = iw_opd_weights(a, m, gamma=gamma, eps=eps)
    adv = w * a
    loss = aggregate(-lp * adv, m, "token_mean", num_items=num_items)
    return loss, {
        "mean_advantage": mean_metric(adv, m),
        "mean_abs_advantage": mean_metric(jnp.abs(a), m),
        "mean_weight": mean_metric(w, m),
    }


def sparse_top1_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    tokens: ArrayLike,
    *,
    beta: Scalar = 0.5,
    temperature: Scalar = 1.0,
    add_tail: bool = True,
    reverse_token: str = "sampled",
) -> jax.Array:
    """Sparse top-1 generalised JSD of TRL ``IWOPDTrainer`` (``loss_top_k=1``, ``beta > 0``;
    ``_compute_sparse_top_1_divergence_loss``): the support is the teacher's top-1 token (forward term) and
    a reverse-KL token — the sampled ``tokens`` (``reverse_token="sampled"``) or the student's argmax
    (``"argmax"``); one token when both coincide, only the reverse token when ``beta == 1``. Student and
    teacher log-probs at ``temperature`` are gathered on it and, with ``add_tail``, completed by the tail
    bucket ``log(1 − Σ p)`` (else renormalised on the support); then :func:`generalized_jsd`'s divergence.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``. tokens: ``[B, T]`` int sampled tokens.
      beta: β in [0, 1]. temperature: τ > 0. add_tail: TRL ``loss_add_tail``.
      reverse_token: TRL ``reverse_kl_top_1_mode`` (``sampled`` | ``argmax``).

    Returns:
      ``[B, T]`` per-token divergence (unmasked).
    """
    check_range("beta", beta, low=0.0, high=1.0)
    check_range("temperature", temperature, low=0.0, low_inclusive=False)
    check_choice("reverse_token", reverse_token, TOP1_REVERSE_MODES)
    s, t = _logits_pair(student_logits, teacher_logits)
    tok = jnp.asarray(tokens)
    if tok.shape != s.shape[:2] or not jnp.issubdtype(tok.dtype, jnp.integer):
        raise ValueError(f"`tokens` must be integers of shape {tuple(s.shape[:2])}, got {tok.dtype}{tuple(tok.shape)}")
    log_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_t = jax.nn.log_softmax(t / temperature, axis=-1)
    rev = tok if reverse_token == "sampled" else jnp.argmax(s, axis=-1)
    top = jnp.argmax(t, axis=-1)

    def on_support(support, valid, b):
        ls = jnp.where(valid, jnp.take_along_axis(log_s, support, axis=-1), -jnp.inf)
        lt = jnp.where(valid, jnp.take_along_axis(log_t, support, axis=-1), -jnp.inf)
        if add_tail:
            ls, lt = _add_tail_bucket(ls), _add_tail_bucket(lt)
        else:
            ls = ls - jax.scipy.special.logsumexp(ls, axis=-1, keepdims=True)
            lt = lt - jax.scipy.special.logsumexp(lt, axis=-1, keepdims=True)
        return _divergence(ls, lt, b)

    reverse_only = lambda: on_support(rev[..., None], jnp.ones(rev.shape + (1,), bool), 1.0)  # noqa: E731
    both = lambda b: on_support(jnp.stack([top, rev], axis=-1),  # noqa: E731
                                jnp.stack([jnp.ones_like(top, bool), rev != top], axis=-1), b)
    if is_array(beta):  # traced β: the β = 1 support as a select
        return jnp.where(beta == 1.0, reverse_only(), both(beta))
    return reverse_only() if beta == 1.0 else both(float(beta))


def sparse_top1_distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    tokens: ArrayLike,
    mask: ArrayLike,
    *,
    beta: Scalar = 0.5,
    temperature: Scalar = 1.0,
    add_tail: bool = True,
    reverse_token: str = "sampled",
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """:func:`sparse_top1_divergence` reduced like TRL (``Σ m·D / max(N, 1)``, ``N = num_items`` or the
    local token count). Returns ``(loss, metrics)`` with ``jsd`` (Mean over tokens)."""
    d = sparse_top1_divergence(student_logits, teacher_logits, tokens, beta=beta, temperature=temperature,
                               add_tail=add_tail, reverse_token=reverse_token)
    m = as_mask(mask)
    check_same_shape(d, "tokens", mask=m)
    return aggregate(d, m, "token_mean", num_items=num_items), {"jsd": mean_metric(_sg(d), m)}


# ------------------------------------------------------------------------- cross-tokenizer distillation


def uld_divergence(student_logits: ArrayLike, teacher_logits: ArrayLike, *, student_temperature: Scalar = 1.0,
                   teacher_temperature: Scalar = 1.0) -> jax.Array:
    """Universal Logit Distillation per-token distance (Boizard et al., arXiv 2402.12030, eq. 4-5; TRL
    ``GOLDTrainer``'s ``ULDLoss``): ``Σ_i |p_S^(i) − p_T^(i)|`` between the *sorted* (descending) next-token
    probabilities, the smaller vocabulary zero-padded — the closed-form Wasserstein-1 distance between the
    two distributions up to a permutation of tokens, so student and teacher may use different tokenizers.

    Args:
      student_logits: ``[B, T, V_S]``. teacher_logits: ``[B, T, V_T]`` (a constant), positions aligned with
        the student's (``V_S`` and ``V_T`` may differ).
      student_temperature, teacher_temperature: > 0 (TRL ``uld_student_temperature`` / ``uld_teacher_temperature``).

    Returns:
      ``[B, T]`` distances in [0, 2] (unmasked).
    """
    check_range("student_temperature", student_temperature, low=0.0, low_inclusive=False)
    check_range("teacher_temperature", teacher_temperature, low=0.0, low_inclusive=False)
    s, t = _logits_pair(student_logits, teacher_logits, same_vocab=False)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f"`teacher_logits` must have shape {tuple(s.shape[:2]) + ('V_T',)}, got {tuple(t.shape)}")
    ps = -jnp.sort(-jax.nn.softmax(s / student_temperature, axis=-1), axis=-1)
    pt = -jnp.sort(-jax.nn.softmax(t / teacher_temperature, axis=-1), axis=-1)
    v = max(ps.shape[-1], pt.shape[-1])
    pad = lambda p: jnp.pad(p, [(0, 0), (0, 0), (0, v - p.shape[-1])])  # noqa: E731
    return jnp.sum(jnp.abs(pad(ps) - pad(pt)), axis=-1)


def uld_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    student_mask: ArrayLike,
    teacher_mask: ArrayLike,
    *,
    student_temperature: Scalar = 1.0,
    teacher_temperature: Scalar = 1.0,
    distillation_weight: Scalar = 1.0,
    crossentropy_weight: Scalar = 0.0,
    logps: Optional[ArrayLike] = None,
    num_sequences: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """ULD / GOLD cross-tokenizer distillation loss (arXiv 2402.12030, eq. 5; TRL ``GOLDTrainer`` with
    ``use_uld_loss=True``, positional alignment, no hybrid matching).

    Each row's completion is tokenised by each model's own tokenizer (student ``[B, T_S]``, teacher
    ``[B, T_T]``, both right-padded); the ``k``-th student position is paired with the ``k``-th teacher
    position for ``k < min(n_S, n_T)`` (the row's two lengths). Per row, the mean of
    :func:`uld_divergence` over its pairs; rows averaged (``num_sequences``, default ``B``; a row without a
    pair counts 0); times ``distillation_weight``, plus ``crossentropy_weight`` × the student's token-mean
    NLL of ``logps`` (over ``student_mask``).

    Args:
      student_logits: ``[B, T_S, V_S]``. teacher_logits: ``[B, T_T, V_T]`` (constant).
      student_mask: ``[B, T_S]``. teacher_mask: ``[B, T_T]`` (completion tokens, left-aligned).
      student_temperature, teacher_temperature: > 0. distillation_weight, crossentropy_weight: ≥ 0.
      logps: ``[B, T_S]`` student log-probs of its completion tokens (required if ``crossentropy_weight > 0``).

    Returns:
      ``(loss, metrics)`` with ``uld`` (Mean over paired positions) and ``aligned_tokens``.
    """
    check_range("distillation_weight", distillation_weight, low=0.0)
    check_range("crossentropy_weight", crossentropy_weight, low=0.0)
    s, t = _logits_pair(student_logits, teacher_logits, same_vocab=False)
    ms, mt = as_mask(student_mask, "student_mask"), as_mask(teacher_mask, "teacher_mask")
    check_shape(ms, s.shape[:2], "student_mask")
    check_shape(mt, t.shape[:2], "teacher_mask")
    n = min(s.shape[1], t.shape[1])
    pairs = jnp.minimum(jnp.sum(ms, axis=1), jnp.sum(mt, axis=1))
    m = jnp.arange(n)[None, :] < pairs[:, None]
    d = uld_divergence(s[:, :n], t[:, :n], student_temperature=student_temperature,
                       teacher_temperature=teacher_temperature)
    per_row = masked_sum(d, m, axis=1) / jnp.maximum(pairs, 1).astype(d.dtype)
    rows = jnp.asarray(s.shape[0] if num_sequences is None else num_sequences, d.dtype)
    loss = distillation_weight * jnp.sum(per_row) / jnp.maximum(rows, 1)
    metrics: Dict[str, Any] = {"uld": mean_metric(_sg(d), m), "aligned_tokens": jnp.sum(m).astype(jnp.float32)}
    if maybe_nonzero(crossentropy_weight):
        if logps is None:
            raise ValueError(f"crossentropy_weight={crossentropy_weight!r} needs `logps` ([B, T_S]); got None")
        lp = as_float(logps, "logps")
        check_same_shape(ms, "student_mask", logps=lp)
        nll = aggregate(-jnp.where(ms, lp, 0.0), ms, "token_mean")
        loss = loss + crossentropy_weight * nll
        metrics["nll"] = mean_metric(_sg(-jnp.where(ms, lp, 0.0)), ms)
    return loss, metrics


# ------------------------------------------------------------------------------- self-distillation


def _add_tail_bucket(log_p: jnp.ndarray) -> jnp.ndarray:
    log_mass = jnp.minimum(jax.scipy.special.logsumexp(log_p, axis=-1, keepdims=True), -1e-7)
    return jnp.concatenate([log_p, jnp.log(-jnp.expm1(log_mass))], axis=-1)


def topk_distillation_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    topk: int,
    alpha: Scalar = 0.5,
    add_tail: bool = False,
) -> jax.Array:
    """Top-k logit divergence of SDPO / SDFT (arXiv 2601.20802 sec. 3.2; TRL
    ``compute_topk_self_distillation_loss``): the student's top-k tokens define the support; teacher
    log-probs are gathered on it. With ``add_tail`` both get a tail bucket ``log(1 − Σ_topk p)``;
    otherwise both are renormalised on the top-k. Then the generalised JSD with ``alpha``
    (0 forward KL, 1 reverse KL).

    Args:
      student_logits, teacher_logits: ``[B, T, V]``. topk: 1 ≤ k ≤ V. alpha: in [0, 1].

    Returns:
      ``[B, T]`` per-token divergence.
    """
    s, t = _logits_pair(student_logits, teacher_logits)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= s.shape[-1]:
        raise ValueError(f"topk={topk!r} is out of range; allowed: integers in [1, {s.shape[-1]}]")
    check_range("alpha", alpha, low=0.0, high=1.0)
    top_s, idx = jax.lax.top_k(s, topk)
    log_s = top_s - jax.scipy.special.logsumexp(s, axis=-1, keepdims=True)
    log_t = jnp.take_along_axis(t, idx, axis=-1) - jax.scipy.special.logsumexp(t, axis=-1, keepdims=True)
    if add_tail:
        log_s, log_t = _add_tail_bucket(log_s), _add_tail_bucket(log_t)
    else:
        log_s = log_s - jax.scipy.special.logsumexp(log_s, axis=-1, keepdims=True)
        log_t = log_t - jax.scipy.special.logsumexp(log_t, axis=-1, keepdims=True)
    return _divergence(log_s, log_t, alpha if is_array(alpha) else float(alpha))


def self_distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    mask: ArrayLike,
    *,
    mode: str = "topk_logits",
    alpha: Scalar = 0.5,
    topk: int = 100,
    add_tail: bool = False,
    tokens: Optional[ArrayLike] = None,
    logps: Optional[ArrayLike] = None,
    old_logps: Optional[ArrayLike] = None,
    is_clip: Optional[Scalar] = None,
    aggregation: str = "dapo",
    num_items: Optional[Any] = None,
    num_sequences: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """SDPO / SDFT self-distillation loss (Hübotter et al. arXiv 2601.20802 eq. 4; Shenfeld et al.
    arXiv 2601.19897; TRL ``experimental.sdpo`` / ``sdft`` ``loss_utils``).

    Per-token divergence by ``mode``: ``topk_logits`` (:func:`topk_distillation_divergence`),
    ``full_logit`` (:func:`generalized_jsd` with ``beta=alpha``), ``sampled_token`` (reverse KL
    estimate ``sg(ℓ_S − ℓ_T)·ℓ_S`` on ``tokens``, ``alpha`` must be 1). With ``is_clip`` the
    divergence is multiplied by ``min(exp(clip(sg(ℓ − ℓ_old), −20, 20)), is_clip)`` (off-policy
    importance clip). Reduced with :func:`aggregate` (``aggregation`` mode).

    Paper-index values: SDPO ``alpha=0.5, topk=100, is_clip=2.0``; SDFT ``alpha=0.5, topk=5``.

    Args:
      student_logits, teacher_logits: ``[B, T, V]``. mask: ``[B, T]``.
      tokens: ``[B, T]`` int sampled tokens (``sampled_token`` mode).
      logps, old_logps: ``[B, T]`` student / old log-probs of the sampled tokens (for ``is_clip``).
      aggregation: an ``AGGREGATION_MODES`` value. num_items / num_sequences: global counts.

    Returns:
      ``(loss, metrics)`` with ``distillation_divergence`` (Mean over tokens).
    """
    check_choice("mode", mode, SELF_DISTILLATION_MODES)
    check_choice("aggregation", aggregation, AGGREGATION_MODES)
    check_range("alpha", alpha, low=0.0, high=1.0)
    check_range("is_clip", is_clip, low=0.0, low_inclusive=False, allow_none=True)
    m = as_mask(mask)
    if mode == "topk_logits":
        div = topk_distillation_divergence(student_logits, teacher_logits, topk=topk, alpha=alpha, add_tail=add_tail)
    elif mode == "full_logit":
        div = generalized_jsd(student_logits, teacher_logits, beta=alpha)
    else:
        if not is_array(alpha) and alpha != 1.0:
            raise ValueError(f"alpha={alpha!r} is not allowed with mode='sampled_token'; allowed values: 1.0")
        if tokens is None:
            raise ValueError("`tokens` is required with mode='sampled_token'")
        s, t = _logits_pair(student_logits, teacher_logits)
        tok = jnp.asarray(tokens)
        if tok.shape != s.shape[:2]:
            raise ValueError(f"`tokens` must have shape {tuple(s.shape[:2])}, got {tuple(tok.shape)}")
        ls = jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), tok[..., None], axis=-1)[..., 0]
        lt = jnp.take_along_axis(jax.nn.log_softmax(t, axis=-1), tok[..., None], axis=-1)[..., 0]
        div = _sg(ls - lt) * ls
    check_same_shape(div, "student_logits[..., 0]", mask=m)
    per_token = div
    metrics: Dict[str, Any] = {"distillation_divergence": mean_metric(_sg(div), m)}
    if is_clip is not None:
        if logps is None or old_logps is None:
            raise ValueError(f"`logps` and `old_logps` are required when is_clip={is_clip}")
        lp, old = as_float(logps, "logps"), as_float(old_logps, "old_logps")
        check_same_shape(m, "mask", logps=lp, old_logps=old)
        zero = jnp.zeros((), lp.dtype)
        d = _sg(jnp.where(m, lp, zero) - jnp.where(m, old, zero))
        ratio = jnp.minimum(jnp.exp(jnp.clip(d, -20.0, 20.0)), is_clip)
        per_token = per_token * ratio
        metrics["is_ratio"] = mean_metric(ratio, m)
    loss = aggregate(per_token, m, aggregation, num_items=num_items, num_sequences=num_sequences)
    return loss, metrics


# ---------------------------------------------------------------------------------------------- MiniLLM


def minillm_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    tokens: ArrayLike,
    mask: ArrayLike,
    *,
    gamma: Scalar = 1.0,
    length_normalize: bool = True,
    single_step_coef: Scalar = 1.0,
    temperature: Scalar = 1.0,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """MiniLLM reverse-KL policy gradient (Gu et al., arXiv 2306.08543, eq. 5-7, sec. 2.2).

    On student samples ``y`` with per-token reward ``r_t = log p_T(y_t) − log q_θ(y_t)`` (constant):

    - long-term part (eq. 5-6): ``R_{t+1} = Σ_{t'>t} γ^{t'−t−1} r_{t'}`` — normalised by the number
      of future tokens when ``length_normalize`` (eq. 7) — and ``L_long = −Σ_t sg(R_{t+1})·log q_θ(y_t)``;
    - single-step part (eq. 6): ``L_single = Σ_t KL(q_θ(·|y_<t) ‖ p_T(·|y_<t))`` exactly over the
      vocabulary (its full gradient, lower variance);

    ``loss = (L_long + single_step_coef·L_single) / max(N, 1)`` over masked tokens.

    Args:
      student_logits, teacher_logits: ``[B, T, V]`` (logits ÷ ``temperature``).
      tokens: ``[B, T]`` int sampled tokens. mask: ``[B, T]``.
      gamma: discount in [0, 1]. length_normalize: eq. 7. single_step_coef: ≥ 0.
      num_items: global token count.

    Returns:
      ``(loss, metrics)`` with ``reverse_kl`` (Mean of the single-step KL).
    """
    check_range("gamma", gamma, low=0.0, high=1.0)
    check_range("single_step_coef", single_step_coef, low=0.0)
    check_range("temperature", temperature, low=0.0, low_inclusive=False)
    s, t = _logits_pair(student_logits, teacher_logits)
    m = as_mask(mask)
    tok = jnp.asarray(tokens)
    if tok.shape != s.shape[:2] or m.shape != s.shape[:2]:
        raise ValueError(f"`tokens` and `mask` must have shape {tuple(s.shape[:2])}, got "
                         f"{tuple(tok.shape)} and {tuple(m.shape)}")
    log_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_t = jax.nn.log_softmax(t / temperature, axis=-1)
    safe_tok = jnp.where(m, tok, 0)
    ls = jnp.take_along_axis(log_s, safe_tok[..., None], axis=-1)[..., 0]
    lt = jnp.take_along_axis(log_t, safe_tok[..., None], axis=-1)[..., 0]
    zero = jnp.zeros((), ls.dtype)
    r = jnp.where(m, _sg(lt - ls), zero)
    # R_t = r_t + γ·R_{t+1} (reverse scan over time); masked positions pass the carry through
    def body(carry, x):
        rt, mt = x
        ret = jnp.where(mt, rt + gamma * carry, carry)
        return ret, ret

    _, returns = jax.lax.scan(body, jnp.zeros(r.shape[0], r.dtype), (r.T[::-1], m.T[::-1]))
    returns = returns[::-1].T  # R_t (including t)
    future = jnp.concatenate([returns[:, 1:], jnp.zeros((r.shape[0], 1), r.dtype)], axis=1)
    if length_normalize:
        m_int = m.astype(r.dtype)
        n_future = jnp.flip(jnp.cumsum(jnp.flip(m_int, axis=1), axis=1), axis=1) - m_int
        future = future / jnp.maximum(n_future, 1)
    long_term = -_sg(future) * ls
    single = _kl_from_logprobs(log_s, log_t)
    per_token = long_term + single_step_coef * single
    loss = aggregate(per_token, m, "token_mean", num_items=num_items)
    return loss, {"reverse_kl": mean_metric(_sg(single), m)}


__all__ = [
    "DISTILLATION_LEVELS",
    "HEAD_OPTIONS",
    "TOP1_REVERSE_MODES",
    "SELF_DISTILLATION_MODES",
    "forward_kl",
    "generalized_jsd",
    "gkd_loss",
    "iw_opd_loss",
    "iw_opd_weights",
    "minillm_loss",
    "on_policy_distillation_advantages",
    "on_policy_distillation_loss",
    "reverse_kl",
    "self_distillation_loss",
    "sparse_top1_distillation_loss",
    "sparse_top1_divergence",
    "topk_distillation_divergence",
    "transform_logits",
    "uld_divergence",
    "uld_loss",
]
