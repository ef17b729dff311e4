"""Reference-point, reference-free and online preference objectives, reward modelling, A*-PO, TR-DPO.

Everything here that is not the offline, paired, reference-based DPO family (that lives in
``preference.py``):

=====================  =======================================================================
function               objective
=====================  =======================================================================
:func:`kto_loss`       KTO (arXiv 2402.01306, eq. 7-8) and unpaired APO-zero (arXiv 2408.06266)
:func:`bco_loss`       BCO (arXiv 2404.04656, eq. 9) with the running reward mean δ as explicit state;
                       UDM weights (sec. 4.3): :func:`bco_udm_fit`, :func:`bco_udm_probs`, :func:`bco_udm_weights`
:func:`orpo_loss`      ORPO (arXiv 2403.07691, eq. 6-7): NLL − λ·log σ(log odds ratio)
:func:`cpo_loss`       CPO (arXiv 2401.08417, eq. 3), SimPO (arXiv 2405.14734, eq. 6), AlphaPO
                       (arXiv 2501.03884, eq. 5), hinge / IPO variants; + ``cpo_alpha``·NLL
:func:`tpo_loss`       TPO / TPO-L (arXiv 2405.16681, eq. 11 / 14)
:func:`online_dpo_loss`  Online DPO (arXiv 2402.04792) on reward-ranked policy samples
:func:`xpo_loss`       XPO (arXiv 2405.21046, alg. 1): online DPO + α·log π(ỹ_ref)
:func:`nash_md_loss`   Nash-MD (arXiv 2312.00886, eq. 11) policy gradient against a mixture policy
:func:`reward_model_loss`  Bradley-Terry RM (+ Llama-2 margin, + centring, arXiv 2312.09244)
:func:`process_reward_loss`  PRM token classification (arXiv 2211.14275)
:func:`astar_po_loss`  A*-PO stage 2 (arXiv 2505.20686, eq. 6); :func:`astar_po_values` stage 1
:func:`trdpo_ref_update`  TR-DPO soft / hard reference update (arXiv 2404.09656, eq. 5-6)
=====================  =======================================================================

Inputs: per-sequence log-probabilities are either ``[B]`` sequence scores (``mask=None``) or
``[B, T]`` per-token log-probs reduced here through a ``[B, T]`` mask (sum, or length-normalised
mean where the objective says so); summed-score arguments such as ``ref_logps`` may be ``[B]`` even
when a mask is given (precomputed reference sums). Losses that TRL averages over the micro-batch take an optional
``num_sequences`` (the global row count): the loss is then ``Σ_rows / num_sequences`` so that summing
micro-batch losses gives the full-batch loss. All maths runs in float32 or wider.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

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

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
TPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")
ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")

_sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------------------ helpers


def _seq_score(logps, mask, name: str, average: bool = False, mask_name: str = "mask") -> jnp.ndarray:
    """``[B]`` score from ``[B]`` sequence log-probs (``mask=None``) or ``[B, T]`` per-token ones.

    With a mask: masked sum (``average=False``) or masked mean over valid tokens (``average=True``,
    0 for an empty row). Select-then-compute: padding never reaches value or gradient. A ``[B]``
    input is an already-reduced sequence score and is used as is (e.g. precomputed reference sums).
    """
    x = as_float(logps, name)
    if mask is None or (x.ndim == 1 and not average):
        if average:
            raise ValueError(f"`{mask_name}` is required to length-normalise `{name}`")
        check_rank(x, 1, name)
        return x
    check_rank(x, 2, name)
    m = as_mask(mask, mask_name)
    check_same_shape(x, name, **{mask_name: m})
    total = masked_sum(x, m, axis=-1)
    if not average:
        return total
    return total / jnp.maximum(jnp.sum(m, axis=-1), 1).astype(x.dtype)


def _token_nll(logps, mask, name: str, mask_name: str, num_items=None) -> jnp.ndarray:
    """Token-mean NLL ``−Σ m ℓ / max(N, 1)`` (N = ``num_items`` or the local token count)."""
    x = as_float(logps, name)
    check_rank(x, 2, name)
    m = as_mask(mask, mask_name)
    check_same_shape(x, name, **{mask_name: m})
    n = jnp.sum(m).astype(x.dtype) if num_items is None else jnp.asarray(num_items, x.dtype)
    return -masked_sum(x, m) / jnp.maximum(n, 1)


def _row_mean(per_row: jnp.ndarray, num_sequences) -> jnp.ndarray:
    n = per_row.shape[0] if num_sequences is None else num_sequences
    return jnp.sum(per_row) / jnp.maximum(jnp.asarray(n, per_row.dtype), 1)


def _check_rows(ref: jnp.ndarray, ref_name: str, **others) -> None:
    for name, arr in others.items():
        if arr is not None and tuple(jnp.shape(arr)) != tuple(ref.shape):
            raise ValueError(f"`{name}` must have shape {tuple(ref.shape)} (like `{ref_name}`), "
                             f"got {tuple(jnp.shape(arr))}")


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_scores, rejected_scores) -> Dict[str, Any]:
    c, r = _sg(chosen_rewards), _sg(rejected_rewards)
    return {
        "rewards/chosen": mean_metric(c),
        "rewards/rejected": mean_metric(r),
        "rewards/margins": mean_metric(c - r),
        "rewards/accuracies": mean_metric((c > r).astype(jnp.float32)),
        "logps/chosen": mean_metric(_sg(chosen_scores)),
        "logps/rejected": mean_metric(_sg(rejected_scores)),
    }


def _logsig_pair(x, beta: Scalar, label_smoothing: Scalar) -> jax.Array:
    """Conservative sigmoid loss ``−(1−ε) log σ(βx) − ε log σ(−βx)`` (CPO eq. 3 with label smoothing)."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * x) - label_smoothing * jax.nn.log_sigmoid(-beta * x)


def _log1mexp(x: jnp.ndarray) -> jnp.ndarray:
    """``log(1 − eˣ)`` for ``x < 0`` (Mächler's two branches); ``x`` is capped at ``−eps`` so a
    sequence of probability 1 gives a large finite value instead of ``−inf``."""
    x = jnp.minimum(x, -jnp.finfo(x.dtype).eps)
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# ---------------------------------------------------------------------------------------------- KTO


def kto_kl_baseline(
    kl_logps: ArrayLike,
    ref_kl_logps: ArrayLike,
    kl_mask: Optional[ArrayLike] = None,
    *,
    axis_name: Optional[str] = None,
) -> jax.Array:
    """KTO reference point ``z₀`` (arXiv 2402.01306, eq. 8; TRL ``KTOTrainer``).

    ``z₀ = max(mean_i [log π_θ(y'_i|x_i) − log π_ref(y'_i|x_i)], 0)``, stop-gradient, where ``y'_i`` are
    *mismatched* completions (TRL shifts completions by one within the batch: ``(x_1, y_n), (x_2, y_1), …``).

    Args:
      kl_logps, ref_kl_logps: ``[B']`` sequence log-probs, or ``[B', T']`` per-token with ``kl_mask``.
      kl_mask: ``[B', T']`` completion mask of the mismatched pairs (None for ``[B']`` inputs).
      axis_name: if given, the batch mean is ``lax.pmean``-ed over this mapped axis before the clamp
        (TRL gathers the micro-batch means of every process).

    Returns:
      Scalar ``z₀ ≥ 0`` (no gradient).
    """
    s = _seq_score(kl_logps, kl_mask, "kl_logps", mask_name="kl_mask")
    s_ref = _seq_score(ref_kl_logps, kl_mask, "ref_kl_logps", mask_name="kl_mask")
    _check_rows(s, "kl_logps", ref_kl_logps=s_ref)
    kl = jnp.mean(s - s_ref) if s.shape[0] > 0 else jnp.zeros((), s.dtype)
    if axis_name is not None:
        kl = jax.lax.pmean(kl, axis_name)
    return _sg(jnp.maximum(kl, 0.0))


def kto_kl_pairs(completions: Any) -> Any:
    """Mismatched (prompt, completion) pairs for the KTO reference point (arXiv 2402.01306, eq. 8 /
    sec. 4.1; TRL ``KTOTrainer``):
    completion ``i`` is paired with prompt ``i + 1`` — ``(x_1, y_n), (x_2, y_1), …`` — by rolling the
    completion arrays one row down the batch (``jnp.roll(…, 1, axis=0)``). Works on arrays or pytrees
    of arrays with leading dimension ``B``; tokenise / score the new pairs, then :func:`kto_kl_baseline`.
    """
    return jax.tree_util.tree_map(lambda x: jnp.roll(jnp.asarray(x), 1, axis=0), completions)


def kto_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    labels: ArrayLike,
    *,
    mask: Optional[ArrayLike] = None,
    kl: Optional[Any] = None,
    kl_logps: Optional[ArrayLike] = None,
    ref_kl_logps: Optional[ArrayLike] = None,
    kl_mask: Optional[ArrayLike] = None,
    beta: Scalar = 0.1,
    desirable_weight: Scalar = 1.0,
    undesirable_weight: Scalar = 1.0,
    loss_type: str = "kto",
    num_sequences: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """KTO (arXiv 2402.01306, eq. 7-8) and unpaired APO-zero (arXiv 2408.06266, eq. 7).

    With ``ρ = log π_θ(y|x) − log π_ref(y|x)`` (summed over completion tokens) and reference point
    ``z₀`` (:func:`kto_kl_baseline`):

    - ``kto``: desirable ``λ_D (1 − σ(β(ρ − z₀)))``, undesirable ``λ_U (1 − σ(β(z₀ − ρ)))``;
    - ``apo_zero_unpaired``: desirable ``λ_D (1 − σ(βρ))``, undesirable ``λ_U σ(βρ)`` (no ``z₀``).

    ``loss = Σ_i L_i / num_sequences`` (the micro-batch mean when ``num_sequences`` is None, as TRL).

    Args:
      policy_logps, ref_logps: ``[B]`` sequence log-probs, or ``[B, T]`` per-token with ``mask``.
      labels: ``[B]`` bool, True for desirable completions.
      mask: ``[B, T]`` completion mask (None for ``[B]`` inputs).
      kl: precomputed scalar ``z₀`` (e.g. :func:`kto_kl_baseline` with ``axis_name``); otherwise
        ``kl_logps`` / ``ref_kl_logps`` (/ ``kl_mask``) of the mismatched pairs are required for ``kto``.
      beta: β > 0. desirable_weight / undesirable_weight: λ_D, λ_U ≥ 0.
      loss_type: ``kto`` | ``apo_zero_unpaired``.
      num_sequences: global row count for micro-batching.

    Returns:
      ``(loss, metrics)``; metrics hold ``kl`` and per-label ``Mean`` rewards / log-probs.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import kto_loss
      >>> logps = jnp.array([-10.0, -12.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> labels = jnp.array([True, False])  # desirable, undesirable
      >>> loss, metrics = kto_loss(logps, ref, labels, kl=0.0, beta=0.1)
      >>> print(round(float(loss), 4))  # both examples: 1 - sigmoid(0.1 * 1)
      0.475
    """
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_range("beta", beta, low=0.0, low_inclusive=False)
    check_range("desirable_weight", desirable_weight, low=0.0)
    check_range("undesirable_weight", undesirable_weight, low=0.0)
    s = _seq_score(policy_logps, mask, "policy_logps")
    s_ref = _sg(_seq_score(ref_logps, mask, "ref_logps"))
    lab = jnp.asarray(labels)
    if lab.dtype != jnp.bool_:
        lab = as_mask(lab, "labels")
    _check_rows(s, "policy_logps", ref_logps=s_ref, labels=lab)
    if loss_type == "kto":
        if kl is None:
            if kl_logps is None or ref_kl_logps is None:
                raise ValueError("loss_type='kto' needs `kl` or both `kl_logps` and `ref_kl_logps`")
            z0 = kto_kl_baseline(kl_logps, ref_kl_logps, kl_mask)
        else:
            z0 = _sg(jnp.asarray(kl, s.dtype))
    else:
        z0 = jnp.zeros((), s.dtype)
    rho = s - s_ref
    if loss_type == "kto":
        desirable = 1.0 - jax.nn.sigmoid(beta * (rho - z0))
        undesirable = 1.0 - jax.nn.sigmoid(beta * (z0 - rho))
    else:
        desirable = 1.0 - jax.nn.sigmoid(beta * rho)
        undesirable = jax.nn.sigmoid(beta * rho)
    per_row = jnp.where(lab, desirable_weight * desirable, undesirable_weight * undesirable)
    loss = _row_mean(per_row, num_sequences)
    rewards = _sg(beta * rho)
    metrics = {
        "kl": z0,
        "rewards/chosen": mean_metric(rewards, lab),
        "rewards/rejected": mean_metric(rewards, ~lab),
        "logps/chosen": mean_metric(_sg(s), lab),
        "logps/rejected": mean_metric(_sg(s), ~lab),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------- BCO


class BCOState(NamedTuple):
    """Running moments of the BCO implicit reward (arXiv 2404.04656, sec. 4.2; TRL ``RunningMoments``):
    scalar mean, (population) variance and count. Start from :func:`bco_init`; thread it through
    :func:`bco_loss` (the train state carries it; it is never hidden module state)."""

    mean: jnp.ndarray
    var: jnp.ndarray
    count: jnp.ndarray  # type: ignore[assignment]  # (a field named like tuple.count)


def bco_init(dtype: Any = jnp.float32) -> BCOState:
    """Initial BCO running moments (BCO, arXiv 2404.04656, sec. 4.2: δ is the running mean of the
    rewards): mean 0, var 1, count 1e-24 (so the first update gives the batch mean almost exactly,
    as TRL). Returns a :class:`BCOState` of scalars."""
    return BCOState(jnp.zeros((), dtype), jnp.ones((), dtype), jnp.asarray(1e-24, dtype))


def bco_update_moments(state: BCOState, rewards: ArrayLike, mask: Optional[ArrayLike] = None) -> BCOState:
    """Merge a batch of rewards into BCO's running moments (arXiv 2404.04656, sec. 4.2; Chan et al.'s
    parallel mean / variance update).

    Args:
      state: :class:`BCOState`.
      rewards: ``[N]`` rewards (treated as constants). To use global statistics across devices,
        all-gather the rewards first.
      mask: optional ``[N]`` bool of the entries to include.

    Returns:
      The new :class:`BCOState`; an empty selection leaves it unchanged.
    """
    x = _sg(as_float(rewards, "rewards"))
    check_rank(x, 1, "rewards")
    m = jnp.ones(x.shape, bool) if mask is None else as_mask(mask, "mask")
    _check_rows(x, "rewards", mask=m)
    dtype = jnp.result_type(x.dtype, state.mean.dtype)
    x = x.astype(dtype)
    n = jnp.sum(m).astype(dtype)
    n_safe = jnp.maximum(n, 1)
    b_mean = masked_sum(x, m) / n_safe
    b_var = masked_sum(jnp.square(x - b_mean), m) / n_safe
    mean, var, count = (jnp.asarray(v, dtype) for v in state)
    delta = b_mean - mean
    tot = count + n
    new_mean = mean + delta * n / tot
    new_var = (var * count + delta**2 * count * n / tot + b_var * n) / tot
    keep = n > 0
    return BCOState(jnp.where(keep, new_mean, mean), jnp.where(keep, new_var, var), jnp.where(keep, tot, count))


class UDMClassifier(NamedTuple):
    """BCO's UDM prompt classifier (arXiv 2404.04656, sec. 4.3): logistic regression
    ``P(desirable | x) = σ(e(x)·w + b)`` on prompt embeddings ``e(x)`` (``w``: ``[D]``, ``b``: scalar)."""

    w: jnp.ndarray
    b: jnp.ndarray


def bco_udm_fit(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    mask: Optional[ArrayLike] = None,
    l2: Scalar = 1.0,
    num_steps: int = 20,
) -> UDMClassifier:
    """Fit BCO's UDM density-ratio classifier (arXiv 2404.04656, sec. 4.3) as TRL's ``BCOTrainer`` does —
    scikit-learn ``LogisticRegression(class_weight="balanced")`` (C = 1) on prompt embeddings, desirable = 1 —
    by ``num_steps`` Newton steps from 0 on the same convex objective::

        C·Σ_i s_i·(softplus(z_i) − y_i·z_i) + ½‖w‖²,   z_i = e_i·w + b,   s_i = N / (2·N_{y_i})

    (``C = 1 / l2``; the intercept is not penalised; a class without rows gets weight 0). Pure and jit-able.

    Args:
      embeddings: ``[N, D]`` prompt embeddings (constants). labels: ``[N]`` bool, True = desirable.
      mask: optional ``[N]`` rows to fit on. l2: penalty ``1/C`` > 0. num_steps: Newton steps ≥ 1.

    Returns:
      :class:`UDMClassifier`.
    """
    check_range("l2", l2, low=0.0, low_inclusive=False)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is out of range; allowed: integers >= 1")
    x = _sg(as_float(embeddings, "embeddings"))
    check_rank(x, 2, "embeddings")
    y = as_mask(labels, "labels")
    valid = jnp.ones_like(y) if mask is None else as_mask(mask, "mask")
    _check_rows(y, "labels", mask=valid)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"`labels` must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    n1, n0 = jnp.sum(valid & y), jnp.sum(valid & ~y)
    n = (n0 + n1).astype(x.dtype)
    s = jnp.where(valid, n / (2.0 * jnp.maximum(jnp.where(y, n1, n0), 1).astype(x.dtype)), 0.0)
    X = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
    yf = y.astype(x.dtype)
    reg = jnp.concatenate([jnp.full((x.shape[1],), l2, x.dtype), jnp.zeros((1,), x.dtype)])

    def newton(_, theta):
        p = jax.nn.sigmoid(X @ theta)
        g = X.T @ (s * (p - yf)) + reg * theta
        h = (X.T * (s * p * (1.0 - p))) @ X + jnp.diag(reg + 1e-10)
        return theta - jnp.linalg.solve(h, g)

    theta = jax.lax.fori_loop(0, num_steps, newton, jnp.zeros((X.shape[1],), x.dtype))
    return UDMClassifier(theta[:-1], theta[-1])


def bco_udm_probs(classifier: UDMClassifier, embeddings: ArrayLike) -> jax.Array:
    """``[N]`` ``P(desirable | prompt) = σ(e·w + b)`` of a :func:`bco_udm_fit` classifier (constants)."""
    x = _sg(as_float(embeddings, "embeddings"))
    check_rank(x, 2, "embeddings")
    if x.shape[1] != jnp.shape(classifier.w)[0]:
        raise ValueError(f"`embeddings` must have {jnp.shape(classifier.w)[0]} columns, got {x.shape[1]}")
    return _sg(jax.nn.sigmoid(x @ classifier.w.astype(x.dtype) + classifier.b.astype(x.dtype)))


def bco_udm_weights(desirable_probs: ArrayLike, *, min_density_ratio: Scalar = 0.5, max_density_ratio: Scalar = 10.0,
                    labels: Optional[ArrayLike] = None) -> jax.Array:
    """BCO underlying-distribution matching weights (arXiv 2404.04656, sec. 4.3 / eq. 11): with
    ``p = P(desirable | prompt)`` from a prompt classifier (:func:`bco_udm_fit`, :func:`bco_udm_probs`),
    the density ratio ``p / (1 − p)`` (``+1e-8`` in the denominator, as TRL) clipped to
    ``[min_density_ratio, max_density_ratio]``.

    Args:
      desirable_probs: ``[B]`` classifier probabilities in [0, 1] (constants).
      labels: optional ``[B]`` bool; desirable rows then get weight 1 (TRL weights undesirable rows only),
        so the result is the ``weights`` argument of :func:`bco_loss`.

    Returns:
      ``[B]`` weights for the undesirable rows of :func:`bco_loss` (all rows with ``labels``).
    """
    check_range("min_density_ratio", min_density_ratio, low=0.0)
    check_range("max_density_ratio", max_density_ratio, low=min_density_ratio)
    p = _sg(as_float(desirable_probs, "desirable_probs"))
    w = jnp.clip(p / (1.0 - p + 1e-8), min_density_ratio, max_density_ratio)
    if labels is None:
        return w
    lab = as_mask(labels, "labels")
    _check_rows(p, "desirable_probs", labels=lab)
    return jnp.where(lab, jnp.ones((), w.dtype), w)


def bco_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    labels: ArrayLike,
    state: BCOState,
    *,
    mask: Optional[ArrayLike] = None,
    beta: Scalar = 0.01,
    weights: Optional[ArrayLike] = None,
    update_state: bool = True,
    num_sequences: Optional[Any] = None,
) -> Tuple[jax.Array, BCOState, Dict[str, Any]]:
    """BCO, unpaired binary-classifier optimisation (arXiv 2404.04656, eq. 9 and sec. 4.2).

    Reward ``r = β(log π_θ(y|x) − log π_ref(y|x))``; the running mean δ of all rewards seen so far
    (``state``, updated with this batch *before* use, as TRL) shifts the classifier:
    desirable ``−log σ(r − δ)``, undesirable ``−w·log σ(−(r − δ))`` with optional density-ratio
    weights ``w`` (UDM, sec. 4.3). ``loss = Σ_i L_i / num_sequences``.

    Args:
      policy_logps, ref_logps: ``[B]`` sequence log-probs, or ``[B, T]`` with ``mask``.
      labels: ``[B]`` bool, True for desirable.
      state: :class:`BCOState` (from :func:`bco_init`).
      beta: β > 0.
      weights: optional ``[B]`` per-row weights (UDM density ratios from :func:`bco_udm_weights`;
        TRL applies them to undesirable rows only, so pass 1 for desirable rows; 1 where None).
      update_state: merge this batch's rewards into ``state`` before computing δ (TRL, training).
      num_sequences: global row count for micro-batching.

    Returns:
      ``(loss, new_state, metrics)``.
    """
    check_range("beta", beta, low=0.0, low_inclusive=False)
    if not isinstance(state, BCOState):
        raise TypeError(f"`state` must be a BCOState (see bco_init), got {type(state).__name__}")
    s = _seq_score(policy_logps, mask, "policy_logps")
    s_ref = _sg(_seq_score(ref_logps, mask, "ref_logps"))
    lab = as_mask(labels, "labels")
    _check_rows(s, "policy_logps", ref_logps=s_ref, labels=lab, weights=weights)
    rewards = beta * (s - s_ref)
    new_state = bco_update_moments(state, rewards) if update_state else state
    delta = _sg(new_state.mean).astype(rewards.dtype)
    z = rewards - delta
    per_row = jnp.where(lab, -jax.nn.log_sigmoid(z), -jax.nn.log_sigmoid(-z))
    if weights is not None:
        per_row = per_row * _sg(as_float(weights, "weights"))
    loss = _row_mean(per_row, num_sequences)
    r = _sg(rewards)
    metrics = {
        "delta": delta,
        "rewards/chosen": mean_metric(r, lab),
        "rewards/rejected": mean_metric(r, ~lab),
    }
    return loss, new_state, metrics


# --------------------------------------------------------------------------------------------- ORPO


def orpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    *,
    beta: Scalar = 0.1,
    nll_logps: Optional[ArrayLike] = None,
    nll_mask: Optional[ArrayLike] = None,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """ORPO (arXiv 2403.07691, eq. 6-7): ``L = L_NLL − λ·mean_i log σ(log OR_i)``.

    ``S̄`` is the length-normalised (mean) log-prob of each completion; the log odds ratio is
    ``(S̄_w − S̄_l) − (log(1 − e^{S̄_w}) − log(1 − e^{S̄_l}))``. ``L_NLL`` is the token-mean NLL of the
    chosen sequence. TRL computes it over *prompt + response*: pass the chosen prompt+completion
    per-token log-probs as ``nll_logps`` / ``nll_mask``; by default it is the chosen completion.

    Args:
      chosen_logps, rejected_logps: ``[B, T]`` per-token log-probs of the completions.
      chosen_mask, rejected_mask: ``[B, T]`` completion masks.
      beta: λ ≥ 0 (TRL ``beta``, 0.1).
      nll_logps, nll_mask: ``[B, T']`` per-token log-probs / mask for the NLL term.
      num_items: global NLL token count (micro-batching); the OR term is a micro-batch mean.

    Returns:
      ``(loss, metrics)`` with ``nll_loss``, ``log_odds_ratio`` (mean log σ), ``log_odds_chosen``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import orpo_loss
      >>> chosen, rejected = jnp.array([[-0.5, -0.5]]), jnp.array([[-2.0, -2.0]])
      >>> mask = jnp.ones((1, 2), bool)
      >>> loss, metrics = orpo_loss(chosen, rejected, mask, mask, beta=0.1)  # NLL - beta log sigmoid(log odds ratio)
      >>> print(round(float(loss), 4), round(float(metrics["nll_loss"]), 4))
      0.5097 0.5
    """
    check_range("beta", beta, low=0.0)
    sw = _seq_score(chosen_logps, chosen_mask, "chosen_logps", average=True, mask_name="chosen_mask")
    sl = _seq_score(rejected_logps, rejected_mask, "rejected_logps", average=True, mask_name="rejected_mask")
    _check_rows(sw, "chosen_logps", rejected_logps=sl)
    log_odds = (sw - sl) - (_log1mexp(sw) - _log1mexp(sl))
    ratio = jax.nn.log_sigmoid(log_odds)
    if nll_logps is None:
        nll = _token_nll(chosen_logps, chosen_mask, "chosen_logps", "chosen_mask", num_items)
    else:
        if nll_mask is None:
            raise ValueError("`nll_mask` is required with `nll_logps`")
        nll = _token_nll(nll_logps, nll_mask, "nll_logps", "nll_mask", num_items)
    loss = nll - beta * jnp.mean(ratio)
    metrics = _preference_metrics(beta * sw, beta * sl, sw, sl)
    metrics.update(nll_loss=_sg(nll), log_odds_ratio=_sg(jnp.mean(ratio)), log_odds_chosen=_sg(jnp.mean(log_odds)))
    return loss, metrics


# -------------------------------------------------------------------------------- CPO / SimPO / AlphaPO


def alphapo_reward(scores: ArrayLike, alpha: Scalar) -> jax.Array:
    """AlphaPO reward transform (arXiv 2501.03884, eq. 5): ``r = (1 − p^{−α})/α`` with ``p = e^S``,
    i.e. ``−expm1(−αS)/α``; ``α = 0`` gives ``S`` (SimPO). The exponent is capped at 80 to stay finite."""
    s = as_float(scores, "scores")
    if is_array(alpha):  # traced α: α = 0 (SimPO) as a select, with a safe divisor on the other side
        off = alpha == 0.0
        a = jnp.where(off, 1.0, alpha)
        return jnp.where(off, s, -jnp.expm1(jnp.minimum(-a * s, 80.0)) / a)
    if alpha == 0.0:
        return s
    return -jnp.expm1(jnp.minimum(-alpha * s, 80.0)) / alpha


def cpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    *,
    loss_type: str = "sigmoid",
    beta: Scalar = 0.1,
    label_smoothing: Scalar = 0.0,
    simpo_gamma: Scalar = 0.5,
    alpha: Scalar = 0.0,
    cpo_alpha: Scalar = 1.0,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """CPO family, reference-free (TRL ``CPOTrainer``): ``mean_i ℓ(x_i) + cpo_alpha·NLL_chosen``.

    Score ``S``: completion log-prob sum for ``sigmoid`` / ``hinge``, length-normalised mean for
    ``ipo`` / ``simpo`` / ``alphapo``. ``x = u(S_w) − u(S_l)`` with ``u`` = :func:`alphapo_reward`
    (identity when ``alpha = 0``).

    - ``sigmoid``: CPO (arXiv 2401.08417, eq. 3) ``−(1−ε) log σ(βx) − ε log σ(−βx)``;
    - ``simpo``: SimPO (arXiv 2405.14734, eq. 6) the same with ``x − γ/β`` (``γ = simpo_gamma``);
    - ``alphapo``: AlphaPO (arXiv 2501.03884, eq. 6) = ``simpo`` with ``cpo_alpha = 0`` (TRL sugar;
      ``cpo_alpha`` is forced to 0);
    - ``hinge``: ``relu(1 − βx)`` (SLiC); ``ipo``: ``(x − 1/(2β))²`` (arXiv 2310.12036, eq. 17).

    Args:
      chosen_logps, rejected_logps: ``[B, T]`` per-token log-probs of the completions.
      chosen_mask, rejected_mask: ``[B, T]`` completion masks.
      loss_type: one of ``CPO_LOSS_TYPES``. beta: β > 0. label_smoothing: ε in [0, 0.5].
      simpo_gamma: γ (SimPO margin). alpha: AlphaPO α (0 disables the transform).
      cpo_alpha: NLL weight (TRL default 1.0; SimPO / AlphaPO use 0).
      num_items: global NLL token count (micro-batching).

    Returns:
      ``(loss, metrics)`` with ``nll_loss`` and reward metrics (``β·u(S)``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import cpo_loss
      >>> chosen = jnp.array([[-1.0, -1.0], [-0.5, -0.5]])
      >>> rejected = jnp.array([[-2.0, -2.0], [-0.5, -1.5]])
      >>> mask = jnp.ones((2, 2), bool)
      >>> loss, metrics = cpo_loss(chosen, rejected, mask, mask, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
      ...                          cpo_alpha=0.0)
      >>> print(round(float(loss), 4), round(float(metrics["rewards/margins"].value), 4))
      0.3377 1.5
    """
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    check_range("beta", beta, low=0.0, low_inclusive=False)
    check_range("label_smoothing", label_smoothing, low=0.0, high=0.5)
    check_range("simpo_gamma", simpo_gamma)
    check_range("alpha", alpha)
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    check_range("cpo_alpha", cpo_alpha, low=0.0)
    average = loss_type in ("ipo", "simpo")
    sw = _seq_score(chosen_logps, chosen_mask, "chosen_logps", average=average, mask_name="chosen_mask")
    sl = _seq_score(rejected_logps, rejected_mask, "rejected_logps", average=average, mask_name="rejected_mask")
    _check_rows(sw, "chosen_logps", rejected_logps=sl)
    uw, ul = alphapo_reward(sw, alpha), alphapo_reward(sl, alpha)
    x = uw - ul
    if loss_type == "sigmoid":
        losses = _logsig_pair(x, beta, label_smoothing)
    elif loss_type == "simpo":
        losses = _logsig_pair(x - simpo_gamma / beta, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * x)
    else:
        losses = jnp.square(x - 1.0 / (2.0 * beta))
    loss = jnp.mean(losses)
    if maybe_nonzero(cpo_alpha):  # an array weight (traced: its value is unknown) keeps the term
        nll = _token_nll(chosen_logps, chosen_mask, "chosen_logps", "chosen_mask", num_items)
        loss = loss + cpo_alpha * nll
    else:
        nll = jnp.zeros((), loss.dtype)
    metrics = _preference_metrics(beta * uw, beta * ul, sw, sl)
    metrics["nll_loss"] = _sg(nll)
    return loss, metrics


def simpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    *,
    beta: Scalar = 2.5,
    gamma: Scalar = 1.375,
    label_smoothing: Scalar = 0.0,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """SimPO (arXiv 2405.14734, eq. 6) with the paper-index values ``β = 2.5``, ``γ = 1.375``, no NLL:
    ``−log σ(β(S̄_w − S̄_l) − γ)``. Shapes as :func:`cpo_loss`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import simpo_loss
      >>> chosen, rejected = jnp.array([[-1.0, -1.0]]), jnp.array([[-2.0, -2.0]])
      >>> mask = jnp.ones((1, 2), bool)
      >>> loss, _ = simpo_loss(chosen, rejected, mask, mask)  # -log sigmoid(2.5 * (-1 - (-2)) - 1.375)
      >>> print(round(float(loss), 4))
      0.2812
    """
    return cpo_loss(chosen_logps, rejected_logps, chosen_mask, rejected_mask, loss_type="simpo", beta=beta,
                    simpo_gamma=gamma, label_smoothing=label_smoothing, cpo_alpha=0.0)


def alphapo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    *,
    alpha: Scalar = 0.25,
    beta: Scalar = 2.5,
    gamma: Scalar = 0.1,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """AlphaPO (arXiv 2501.03884, eq. 6) with the paper-index values ``α = 0.25``, ``β = 2.5``,
    ``γ = 0.1``: SimPO on ``u(S̄) = (1 − e^{−αS̄})/α``. Shapes as :func:`cpo_loss`."""
    return cpo_loss(chosen_logps, rejected_logps, chosen_mask, rejected_mask, loss_type="alphapo", beta=beta,
                    simpo_gamma=gamma, alpha=alpha)


# ---------------------------------------------------------------------------------------------- TPO


def tpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    gold_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_mask: ArrayLike,
    gold_mask: ArrayLike,
    *,
    loss_type: str = "sigmoid",
    beta: Scalar = 0.01,
    tpo_alpha: Scalar = 1.0,
    tpo_l_gamma: Scalar = 0.5,
    label_smoothing: Scalar = 0.0,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """TPO, triple preference optimisation (arXiv 2405.16681, eq. 11; TPO-L eq. 14).

    Reference-free contrast ``x = S_w − S_l`` (sum for ``sigmoid`` / ``hinge``, mean for ``ipo`` /
    ``tpo-l``) plus ``tpo_alpha`` × the token-mean NLL of the gold completion:
    ``sigmoid`` ``−(1−ε)log σ(βx) − ε log σ(−βx)``; ``hinge`` ``relu(1 − βx)``; ``ipo``
    ``(x − 1/(2β))²``; ``tpo-l`` the sigmoid form on ``x − γ/β``.

    Args:
      chosen_logps, rejected_logps, gold_logps: ``[B, T]`` per-token log-probs (``gold_logps`` may
        be None when ``tpo_alpha = 0``).
      chosen_mask, rejected_mask, gold_mask: ``[B, T]`` completion masks.
      loss_type: one of ``TPO_LOSS_TYPES``. beta: β > 0. tpo_alpha: NLL weight ≥ 0.
      tpo_l_gamma: γ of TPO-L. label_smoothing: ε in [0, 0.5].
      num_items: global gold-token count (micro-batching).

    Returns:
      ``(loss, metrics)``.
    """
    check_choice("loss_type", loss_type, TPO_LOSS_TYPES)
    check_range("beta", beta, low=0.0, low_inclusive=False)
    check_range("tpo_alpha", tpo_alpha, low=0.0)
    check_range("tpo_l_gamma", tpo_l_gamma)
    check_range("label_smoothing", label_smoothing, low=0.0, high=0.5)
    average = loss_type in ("ipo", "tpo-l")
    sw = _seq_score(chosen_logps, chosen_mask, "chosen_logps", average=average, mask_name="chosen_mask")
    sl = _seq_score(rejected_logps, rejected_mask, "rejected_logps", average=average, mask_name="rejected_mask")
    _check_rows(sw, "chosen_logps", rejected_logps=sl)
    x = sw - sl
    if loss_type == "sigmoid":
        losses = _logsig_pair(x, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * x)
    elif loss_type == "ipo":
        losses = jnp.square(x - 1.0 / (2.0 * beta))
    else:
        losses = _logsig_pair(x - tpo_l_gamma / beta, beta, label_smoothing)
    loss = jnp.mean(losses)
    nll = jnp.zeros((), loss.dtype)
    if maybe_nonzero(tpo_alpha):  # an array weight (traced: its value is unknown) keeps the term
        if gold_logps is None or gold_mask is None:
            raise ValueError(f"`gold_logps` and `gold_mask` are required when tpo_alpha={tpo_alpha} != 0 "
                             "(or an array)")
        nll = _token_nll(gold_logps, gold_mask, "gold_logps", "gold_mask", num_items)
        loss = loss + tpo_alpha * nll
    metrics = _preference_metrics(beta * sw, beta * sl, sw, sl)
    metrics["nll_loss"] = _sg(nll)
    return loss, metrics


# ------------------------------------------------------------------------ Online DPO / XPO / Nash-MD


def order_by_reward(first_rewards: ArrayLike, second_rewards: ArrayLike, first: Any, second: Any) -> Tuple[Any, Any]:
    """Rank two policy samples per prompt by reward (Online DPO, arXiv 2402.04792): the chosen one is
    ``first`` where ``first_rewards >= second_rewards`` (ties go to ``first``, as TRL).

    Args:
      first_rewards, second_rewards: ``[B]`` rewards.
      first, second: arrays (or pytrees of arrays) with leading dimension ``B``.

    Returns:
      ``(chosen, rejected)`` with the structure of ``first``.
    """
    r1, r2 = as_float(first_rewards, "first_rewards"), as_float(second_rewards, "second_rewards")
    _check_rows(r1, "first_rewards", second_rewards=r2)
    pick = r1 >= r2

    def sel(a, b, flip):
        a, b = jnp.asarray(a), jnp.asarray(b)
        p = pick.reshape(pick.shape + (1,) * (a.ndim - 1))
        return jnp.where(p, a, b) if not flip else jnp.where(p, b, a)

    chosen = jax.tree_util.tree_map(lambda a, b: sel(a, b, False), first, second)
    rejected = jax.tree_util.tree_map(lambda a, b: sel(a, b, True), first, second)
    return chosen, rejected


def online_dpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    chosen_mask: Optional[ArrayLike] = None,
    rejected_mask: Optional[ArrayLike] = None,
    beta: Scalar = 0.1,
    loss_type: str = "sigmoid",
) -> Tuple[jax.Array, Dict[str, Any]]:
    """Online DPO (arXiv 2402.04792, alg. 1; TRL ``OnlineDPOTrainer``) on reward-ranked policy samples.

    ``x = (S_w − S_l) − (S^ref_w − S^ref_l)`` with completion log-prob sums;
    ``sigmoid``: ``−log σ(βx)``; ``ipo``: ``(x − 1/(2β))²``; ``loss = mean_i``.

    Args:
      chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` sequence log-probs,
        or ``[B, T]`` per-token with ``chosen_mask`` / ``rejected_mask``.
      beta: β > 0 (pick a per-epoch value outside). loss_type: ``sigmoid`` | ``ipo``.

    Returns:
      ``(loss, metrics)``.
    """
    check_choice("loss_type", loss_type, ONLINE_DPO_LOSS_TYPES)
    check_range("beta", beta, low=0.0, low_inclusive=False)
    sw = _seq_score(chosen_logps, chosen_mask, "chosen_logps", mask_name="chosen_mask")
    sl = _seq_score(rejected_logps, rejected_mask, "rejected_logps", mask_name="rejected_mask")
    rw = _sg(_seq_score(ref_chosen_logps, chosen_mask, "ref_chosen_logps", mask_name="chosen_mask"))
    rl = _sg(_seq_score(ref_rejected_logps, rejected_mask, "ref_rejected_logps", mask_name="rejected_mask"))
    _check_rows(sw, "chosen_logps", rejected_logps=sl, ref_chosen_logps=rw, ref_rejected_logps=rl)
    x = (sw - sl) - (rw - rl)
    losses = -jax.nn.log_sigmoid(beta * x) if loss_type == "sigmoid" else jnp.square(x - 1.0 / (2.0 * beta))
    metrics = _preference_metrics(beta * (sw - rw), beta * (sl - rl), sw, sl)
    return jnp.mean(losses), metrics


def xpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    ref_sample_logps: ArrayLike,
    *,
    chosen_mask: Optional[ArrayLike] = None,
    rejected_mask: Optional[ArrayLike] = None,
    ref_sample_mask: Optional[ArrayLike] = None,
    beta: Scalar = 0.1,
    alpha: Scalar = 1e-5,
    loss_type: str = "sigmoid",
) -> Tuple[jax.Array, Dict[str, Any]]:
    """XPO, exploratory preference optimisation (arXiv 2405.21046, alg. 1 line 7; TRL ``XPOTrainer``).

    The chosen / rejected pair is the reward ranking of one policy sample ``y`` and one reference
    sample ``ỹ`` (:func:`order_by_reward`). ``loss = mean_i [DPO_i + α·log π_θ(ỹ_i|x_i)]`` where
    ``DPO_i`` is :func:`online_dpo_loss`'s per-pair term and the exploration bonus sums the *policy*
    log-probs of the reference sample's tokens (with gradient: minimising it pushes π_θ away from
    what π_ref already covers).

    Args:
      chosen_logps … ref_rejected_logps: as :func:`online_dpo_loss`.
      ref_sample_logps: ``[B]`` or ``[B, T]`` (with ``ref_sample_mask``) policy log-probs of ``ỹ``.
      beta: β > 0. alpha: α ≥ 0 (paper index 1e-5). loss_type: ``sigmoid`` | ``ipo``.

    Returns:
      ``(loss, metrics)`` with ``loss/dpo`` and ``loss/xpo``.
    """
    check_range("alpha", alpha, low=0.0)
    dpo, metrics = online_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   chosen_mask=chosen_mask, rejected_mask=rejected_mask, beta=beta,
                                   loss_type=loss_type)
    s_ref = _seq_score(ref_sample_logps, ref_sample_mask, "ref_sample_logps", mask_name="ref_sample_mask")
    xpo = alpha * jnp.mean(s_ref)
    metrics["loss/dpo"] = _sg(dpo)
    metrics["loss/xpo"] = _sg(xpo)
    return dpo + xpo, metrics


def nash_md_mixture_logits(logits: ArrayLike, ref_logits: ArrayLike, mixture_coef: Scalar = 0.5) -> jax.Array:
    """Nash-MD geometric-mixture sampling policy (arXiv 2312.00886, eq. 9; TRL ``GeometricMixtureWrapper``):
    ``log π_mix ∝ κ·z_ref + (1 − κ)·z_θ`` per token, returned as normalised log-probs ``[..., V]``."""
    check_range("mixture_coef", mixture_coef, low=0.0, high=1.0)
    z, zr = as_float(logits, "logits"), as_float(ref_logits, "ref_logits")
    check_same_shape(z, "logits", ref_logits=zr)
    return jax.nn.log_softmax(mixture_coef * _sg(zr) + (1.0 - mixture_coef) * z, axis=-1)


def nash_md_loss(
    logps: ArrayLike,
    ref_logps: ArrayLike,
    mask: ArrayLike,
    preference_probs: ArrayLike,
    *,
    beta: Scalar = 0.1,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """Nash-MD policy loss (arXiv 2312.00886, eq. 11; TRL ``NashMDTrainer`` July 2026 code).

    For a policy sample ``y`` and a mixture sample ``y'`` with preference ``P = P(y ≻ y')`` (e.g.
    ``σ(r(y) − r(y'))``, a constant):
    ``score_i = (P_i − ½)·Σ_t ℓ_t``, ``kl_i = Σ_t sg(ℓ_t − ℓ^ref_t)·ℓ_t`` (REINFORCE gradient of
    KL(π_θ‖π_ref)), ``loss = mean_i [β·kl_i − score_i]``.

    Args:
      logps, ref_logps, mask: ``[B, T]`` policy / reference log-probs of ``y`` and its mask.
      preference_probs: ``[B]`` P(y ≻ y') in [0, 1] (no gradient).
      beta: β ≥ 0.

    Returns:
      ``(loss, metrics)`` with ``kl`` and ``preference``.
    """
    check_range("beta", beta, low=0.0)
    lp = as_float(logps, "logps")
    check_rank(lp, 2, "logps")
    m = as_mask(mask)
    check_same_shape(lp, "logps", mask=m, ref_logps=ref_logps)
    ref = _sg(as_float(ref_logps, "ref_logps"))
    p = _sg(as_float(preference_probs, "preference_probs"))
    if p.shape != (lp.shape[0],):
        raise ValueError(f"`preference_probs` must have shape ({lp.shape[0]},), got {tuple(p.shape)}")
    zero = jnp.zeros((), lp.dtype)
    lp_s = jnp.where(m, lp, zero)
    ref_s = jnp.where(m, ref, zero)
    score = (p - 0.5) * jnp.sum(lp_s, axis=-1)
    kl = jnp.sum(jnp.where(m, _sg(lp_s - ref_s) * lp_s, zero), axis=-1)
    loss = jnp.mean(beta * kl - score)
    return loss, {"kl": mean_metric(_sg(kl)), "preference": mean_metric(p)}


# ---------------------------------------------------------------------------------- reward modelling


def reward_model_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: Optional[ArrayLike] = None,
    center_rewards_coefficient: Optional[Scalar] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1; TRL ``RewardTrainer``).

    ``loss = mean_i −log σ(r_w − r_l − m_i)`` with the Llama-2 margin ``m`` (arXiv 2307.09288, eq. 2;
    0 when None) ``+ η·mean_i (r_w + r_l)²`` when ``center_rewards_coefficient = η`` is set
    (arXiv 2312.09244, eq. 9).

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards (or ``[B, 1]`` head outputs).
      margin: optional ``[B]`` per-pair margin (constant).
      center_rewards_coefficient: η ≥ 0 or None.

    Returns:
      ``(loss, metrics)`` with accuracy, margin, and min / mean / max reward.
    """
    check_range("center_rewards_coefficient", center_rewards_coefficient, low=0.0, allow_none=True)
    rw, rl = as_float(chosen_rewards, "chosen_rewards"), as_float(rejected_rewards, "rejected_rewards")
    if rw.ndim == 2 and rw.shape[-1] == 1:
        rw = rw[:, 0]
    if rl.ndim == 2 and rl.shape[-1] == 1:
        rl = rl[:, 0]
    check_rank(rw, 1, "chosen_rewards")
    _check_rows(rw, "chosen_rewards", rejected_rewards=rl)
    diff = rw - rl
    if margin is not None:
        mg = _sg(as_float(margin, "margin"))
        _check_rows(rw, "chosen_rewards", margin=mg)
        diff = diff - mg
    loss = -jnp.mean(jax.nn.log_sigmoid(diff))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * jnp.mean(jnp.square(rw + rl))
    both = _sg(jnp.concatenate([rw, rl]))
    metrics = {
        "accuracy": mean_metric((rw > rl).astype(jnp.float32)),
        "margin": mean_metric(_sg(rw - rl)),
        "reward/min": jnp.min(both),  # keys ending in min / max merge as min / max (merge_metrics)
        "reward/mean": mean_metric(both),
        "reward/max": jnp.max(both),
    }
    return loss, metrics


def process_reward_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    mask: ArrayLike,
    *,
    last_step_only: bool = False,
    num_items: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """Process reward model loss (Uesato et al., arXiv 2211.14275, sec. 3; TRL ``PRMTrainer``):
    token classification cross-entropy on the step-label positions (the last token of each
    reasoning step; ``mask`` selects them), averaged over labelled tokens.

    Args:
      logits: ``[B, T, C]`` per-token class logits (C = 2 for correct / incorrect).
      labels: ``[B, T]`` integer class labels (ignored where ``mask`` is False, e.g. -100).
      mask: ``[B, T]`` True at step-label positions.
      last_step_only: keep only each row's last labelled position (TRL ``train_on_last_step_only``).
      num_items: global labelled-token count (micro-batching).

    Returns:
      ``(loss, metrics)`` with ``accuracy``.
    """
    z = as_float(logits, "logits")
    check_rank(z, 3, "logits")
    lab = jnp.asarray(labels)
    if not jnp.issubdtype(lab.dtype, jnp.integer):
        raise TypeError(f"`labels` must be an integer array, got dtype {lab.dtype}")
    m = as_mask(mask)
    check_shape_bt = z.shape[:2]
    if lab.shape != check_shape_bt or m.shape != check_shape_bt:
        raise ValueError(f"`labels` and `mask` must have shape {tuple(check_shape_bt)}, got "
                         f"{tuple(lab.shape)} and {tuple(m.shape)}")
    if last_step_only:
        pos = jnp.arange(m.shape[1])
        last = jnp.max(jnp.where(m, pos, -1), axis=-1, keepdims=True)
        m = m & (pos == last)
    safe = jnp.where(m, lab, 0)
    logp = jax.nn.log_softmax(z, axis=-1)
    tok = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    loss = _token_nll(tok, m, "logits", "mask", num_items)
    correct = (jnp.argmax(z, axis=-1) == safe).astype(jnp.float32)
    return loss, {"accuracy": mean_metric(correct, m)}


# --------------------------------------------------------------------------------------------- A*-PO


def astar_po_values(rewards: ArrayLike, beta1: Scalar = 0.5, mask: Optional[ArrayLike] = None) -> jax.Array:
    """A*-PO stage 1 (arXiv 2505.20686, eq. 4): ``V*(x) = β₁·(log Σ_i e^{r_i/β₁} − log N)`` over the
    ``N`` rewards of reference samples per prompt.

    Args:
      rewards: ``[P, N]`` rewards of ``N`` reference samples per prompt.
      beta1: β₁ > 0 (paper index 0.5).
      mask: optional ``[P, N]`` bool of valid samples (``N`` becomes the valid count per row; a row
        without samples gives 0).

    Returns:
      ``[P]`` optimal values (constants).
    """
    check_range("beta1", beta1, low=0.0, low_inclusive=False)
    r = _sg(as_float(rewards, "rewards"))
    check_rank(r, 2, "rewards")
    m = jnp.ones(r.shape, bool) if mask is None else as_mask(mask)
    check_same_shape(r, "rewards", mask=m)
    z = jnp.where(m, r / beta1, -jnp.inf)
    n = jnp.sum(m, axis=-1)
    lse = jax.scipy.special.logsumexp(jnp.where(n[:, None] > 0, z, 0.0), axis=-1)
    v = beta1 * (lse - jnp.log(jnp.maximum(n, 1).astype(r.dtype)))
    return jnp.where(n > 0, v, jnp.zeros((), r.dtype))


def astar_po_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    rewards: ArrayLike,
    values: ArrayLike,
    *,
    mask: Optional[ArrayLike] = None,
    beta2: Scalar = 1e-3,
    num_sequences: Optional[Any] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """A*-PO stage 2 (arXiv 2505.20686, eq. 6; TRL ``A2POTrainer``): least-squares regression of the
    implicit reward onto the optimal advantage,
    ``loss = mean_i (β₂·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i)) − (r_i − V*(x_i)))²``.

    Args:
      policy_logps, ref_logps: ``[B]`` sequence log-probs, or ``[B, T]`` per-token with ``mask``.
      rewards: ``[B]`` rewards. values: ``[B]`` ``V*`` of each row's prompt (:func:`astar_po_values`).
      beta2: β₂ > 0 (paper index 1e-3). num_sequences: global row count.

    Returns:
      ``(loss, metrics)`` with ``implicit_reward`` and ``advantage``.
    """
    check_range("beta2", beta2, low=0.0, low_inclusive=False)
    s = _seq_score(policy_logps, mask, "policy_logps")
    s_ref = _sg(_seq_score(ref_logps, mask, "ref_logps"))
    r, v = _sg(as_float(rewards, "rewards")), _sg(as_float(values, "values"))
    _check_rows(s, "policy_logps", ref_logps=s_ref, rewards=r, values=v)
    implicit = beta2 * (s - s_ref)
    target = r - v
    loss = _row_mean(jnp.square(implicit - target), num_sequences)
    return loss, {"implicit_reward": mean_metric(_sg(implicit)), "advantage": mean_metric(target)}


# ---------------------------------------------------------------------------------------------- TR-DPO


def trdpo_soft_update(ref_params: Any, policy_params: Any, alpha: Scalar = 0.6) -> Any:
    """TR-DPO soft update (arXiv 2404.09656, eq. 5): ``θ_ref ← α·θ + (1 − α)·θ_ref`` leaf-wise.
    ``alpha = 1`` is the hard update (eq. 6). Pytrees must have the same structure."""
    check_range("alpha", alpha, low=0.0, high=1.0)
    return jax.tree_util.tree_map(
        lambda r, p: (1.0 - alpha) * jnp.asarray(r) + alpha * jnp.asarray(p).astype(jnp.asarray(r).dtype),
        ref_params, policy_params)


def trdpo_hard_update(ref_params: Any, policy_params: Any) -> Any:
    """TR-DPO hard update (arXiv 2404.09656, eq. 6): ``θ_ref ← θ`` (a copy of the policy pytree)."""
    return jax.tree_util.tree_map(lambda r, p: jnp.asarray(p).astype(jnp.asarray(r).dtype), ref_params, policy_params)


def trdpo_ref_update(
    ref_params: Any,
    policy_params: Any,
    step: ArrayLike,
    *,
    alpha: Scalar = 0.6,
    sync_steps: int = 512,
) -> Any:
    """TR-DPO reference update on a schedule (arXiv 2404.09656, sec. 3; TRL ``SyncRefModelCallback``):
    at optimiser steps where ``step % sync_steps == 0`` apply :func:`trdpo_soft_update` with
    ``alpha`` (1.0 = hard), else return ``ref_params`` unchanged. ``step`` may be a traced integer
    (jit-friendly selection).

    Paper-index values (TR-DPO): ``alpha = 0.6``, ``sync_steps = 512``.
    """
    check_range("alpha", alpha, low=0.0, high=1.0)
    if isinstance(sync_steps, bool) or not isinstance(sync_steps, int) or sync_steps < 1:
        raise ValueError(f"sync_steps={sync_steps!r} is out of range; allowed: integers >= 1")
    do = (jnp.asarray(step) % sync_steps) == 0
    mixed = trdpo_soft_update(ref_params, policy_params, alpha)
    return jax.tree_util.tree_map(lambda new, old: jnp.where(do, new, jnp.asarray(old)), mixed, ref_params)


__all__ = [
    "BCOState",
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "ONLINE_DPO_LOSS_TYPES",
    "TPO_LOSS_TYPES",
    "alphapo_loss",
    "alphapo_reward",
    "astar_po_loss",
    "astar_po_values",
    "bco_init",
    "bco_loss",
    "bco_udm_fit",
    "bco_udm_probs",
    "bco_udm_weights",
    "UDMClassifier",
    "bco_update_moments",
    "cpo_loss",
    "kto_kl_baseline",
    "kto_kl_pairs",
    "kto_loss",
    "nash_md_loss",
    "nash_md_mixture_logits",
    "online_dpo_loss",
    "order_by_reward",
    "orpo_loss",
    "process_reward_loss",
    "reward_model_loss",
    "simpo_loss",
    "tpo_loss",
    "trdpo_hard_update",
    "trdpo_ref_update",
    "trdpo_soft_update",
    "xpo_loss",
]
