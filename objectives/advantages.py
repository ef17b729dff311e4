"""Group-relative advantages, multi-reward aggregation, reward shaping and GFPO filtering.

Advantages are computed once per generation batch, outside the gradient (they are data for the
loss). Groups are given by integer ``group_ids`` (``[N]``, values in ``[0, num_groups)``) or, for
the usual layout of ``num_generations`` consecutive completions per prompt, by ``num_generations``.

NaN rewards mean *unscorable* (every reward function returned None): they are left out of the group
statistics and get advantage 0.

Documented degenerate cases (NumPy-tested):

- zero-variance group (all valid rewards equal): advantage exactly 0 for every member, whatever
  ``scale_rewards`` (avoids the ``(x − mean)/(0 + eps)`` round-off residue, objectives-survey 4.5);
- singleton group (one valid reward): advantage 0 (no baseline exists; TRL's unbiased std is NaN);
- empty group: nothing to do.

Beyond TRL (verl / OpenRLHF / SkyRL estimators, written from the papers): RLOO, MaxRL, OPO, GRPO
pass@k, REINFORCE++ and REINFORCE++-baseline (with :func:`masked_whiten`), GAE (reverse ``lax.scan``)
and the PPO clipped value loss, ReMax, the Optimal Token Baseline, entropy advantage shaping, DAPO
dynamic sampling as a filter, and per-prompt token weights for prompt-level token-mean aggregation.
Group statistics use ``segment_sum`` on ``group_ids``; singleton policy is explicit (``singleton``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

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
)

SCALE_REWARDS = ("group", "batch", "none")
MULTI_REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _groups(n: int, num_generations: Optional[int], group_ids, num_groups: Optional[int]):
    if group_ids is None:
        if num_generations is None:
            raise ValueError("pass either `num_generations` or `group_ids`")
        if num_generations < 1 or n % num_generations:
            raise ValueError(f"num_generations={num_generations} must be >= 1 and divide the batch size {n}")
        return jnp.arange(n) // num_generations, n // num_generations
    gid = jnp.asarray(group_ids)
    if gid.shape != (n,) or not jnp.issubdtype(gid.dtype, jnp.integer):
        raise ValueError(f"`group_ids` must be an integer array of shape ({n},), got {gid.dtype}{tuple(gid.shape)}")
    return gid, (n if num_groups is None else num_groups)


def _group_stats(x, valid, gid, num_groups):
    """nan-aware per-group mean, unbiased std (NaN for < 2 valid), constant flag; broadcast to rows."""
    seg = lambda v: jax.ops.segment_sum(v, gid, num_segments=num_groups)  # noqa: E731
    x0 = jnp.where(valid, x, 0.0)
    count = seg(valid.astype(x.dtype))
    mean = seg(x0) / jnp.maximum(count, 1)
    dev = jnp.where(valid, x - mean[gid], 0.0)
    var = seg(dev * dev) / jnp.maximum(count - 1, 1)
    std = jnp.where(count > 1, jnp.sqrt(var), jnp.nan)
    hi = jax.ops.segment_max(jnp.where(valid, x, -jnp.inf), gid, num_segments=num_groups)
    lo = jax.ops.segment_min(jnp.where(valid, x, jnp.inf), gid, num_segments=num_groups)
    const = (hi == lo) | (count < 2)
    return mean[gid], std[gid], const[gid]


def _batch_std(x, valid):
    count = jnp.sum(valid)
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(count, 1)
    dev = jnp.where(valid, x - mean, 0.0)
    var = jnp.sum(dev * dev) / jnp.maximum(count - 1, 1)
    return mean, jnp.where(count > 1, jnp.sqrt(var), jnp.nan)


def group_relative_advantages(
    rewards: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    scale_rewards: str = "group",
    eps: Scalar = 1e-4,
) -> jax.Array:
    """GRPO group-relative advantages ``A_i = (r_i − mean_g) / (std + eps)`` (Shao et al. 2024,
    arXiv 2402.03300, eq. 3 / sec. 4.1.2; TRL ``scale_rewards``).

    ``scale_rewards``: ``"group"`` divides by the group's unbiased std; ``"batch"`` by the std of the
    whole batch (Lite PPO, arXiv 2508.08221, mean still per group); ``"none"`` does not divide
    (Dr. GRPO, arXiv 2503.20783, eq. 5). ``eps = 1e-4`` as TRL.

    Args:
      rewards: ``[N]`` total reward per completion; NaN = unscorable.
      num_generations: group size for consecutive groups, or
      group_ids: ``[N]`` integer group of each completion (with optional static ``num_groups``).

    Returns:
      ``[N]`` advantages (0 for unscorable rows, singleton and zero-variance groups).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import group_relative_advantages
      >>> rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two prompts, three completions each
      >>> print(group_relative_advantages(rewards, 3, scale_rewards="none"))  # r - group mean (Dr. GRPO)
      [ 0.6667 -0.3333 -0.3333  0.      0.      0.    ]
      >>> print(group_relative_advantages(rewards, 3))  # / group std; a zero-std group gives 0
      [ 1.1545 -0.5773 -0.5773  0.      0.      0.    ]
    """
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    r = as_float(rewards, "rewards")
    check_rank(r, 1, "rewards")
    gid, ng = _groups(r.shape[0], num_generations, group_ids, num_groups)
    valid = ~jnp.isnan(r)
    mean, std, const = _group_stats(r, valid, gid, ng)
    adv = jnp.where(valid, r - mean, 0.0)
    if scale_rewards == "group":
        adv = adv / (jnp.where(const, 1.0, std) + eps)
    elif scale_rewards == "batch":
        _, bstd = _batch_std(r, valid)
        adv = adv / (jnp.where(jnp.isnan(bstd), 1.0, bstd) + eps)
    adv = jnp.where(valid & ~const, adv, 0.0)
    return jax.lax.stop_gradient(adv)


def multi_reward_advantages(
    rewards_per_func: ArrayLike,
    weights: Optional[Sequence[float]] = None,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    eps: Scalar = 1e-4,
) -> jax.Array:
    """Advantages from several reward functions ``[N, K]`` with weights ``[K]`` (TRL
    ``multi_objective_aggregation``).

    - ``sum_then_normalize``: ``r = Σ_k w_k R_k`` (NaN entries skipped; all-NaN rows unscorable),
      then :func:`group_relative_advantages`.
    - ``normalize_then_sum`` (GDPO, arXiv 2601.05242, eq. 4): normalise each reward within its group
      first, ``Â_k = (R_k − mean_g)/(std_g + eps)``, sum with weights, then normalise over the batch,
      ``A = (r − mean_batch)/(std_batch + eps)``. ``scale_rewards`` is ignored (as TRL).
    """
    check_choice("aggregation", aggregation, MULTI_REWARD_AGGREGATIONS)
    R = as_float(rewards_per_func, "rewards_per_func")
    check_rank(R, 2, "rewards_per_func")
    n, k = R.shape
    w = jnp.ones((k,), R.dtype) if weights is None else jnp.asarray(weights, R.dtype)
    if w.shape != (k,):
        raise ValueError(f"`weights` must have shape ({k},) (one per reward function), got {tuple(w.shape)}")
    unscorable = jnp.all(jnp.isnan(R), axis=1)
    if aggregation == "sum_then_normalize":
        r = jnp.sum(jnp.where(jnp.isnan(R), 0.0, R) * w, axis=1)
        r = jnp.where(unscorable, jnp.nan, r)
        return group_relative_advantages(
            r, num_generations, group_ids=group_ids, num_groups=num_groups, scale_rewards=scale_rewards, eps=eps
        )
    gid, ng = _groups(n, num_generations, group_ids, num_groups)
    cols = []
    for j in range(k):
        x = R[:, j]
        valid = ~jnp.isnan(x)
        mean, std, const = _group_stats(x, valid, gid, ng)
        a = (x - mean) / (jnp.where(const, 1.0, std) + eps)
        cols.append(jnp.where(valid & ~const, a, jnp.where(valid, 0.0, jnp.nan)))
    Rn = jnp.stack(cols, axis=1)
    r = jnp.sum(jnp.where(jnp.isnan(Rn), 0.0, Rn) * w, axis=1)
    valid = ~unscorable
    bmean, bstd = _batch_std(r, valid)
    adv = (r - bmean) / (jnp.where(jnp.isnan(bstd), 1.0, bstd) + eps)
    return jax.lax.stop_gradient(jnp.where(valid & ~jnp.isnan(bstd), adv, 0.0))


def soft_overlong_punishment(
    completion_lengths: ArrayLike,
    max_completion_length: int,
    cache_length: int,
) -> jax.Array:
    """DAPO soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to ``L_max − L_cache`` tokens,
    then a linear ramp ``((L_max − L_cache) − |y|)/L_cache`` down to −1 at ``L_max``, −1 beyond.
    Returns ``[N]`` rewards to add to the task reward."""
    check_range("max_completion_length", max_completion_length, low=1)
    check_range("cache_length", cache_length, low=0, high=max_completion_length, low_inclusive=False)
    length = jnp.asarray(completion_lengths).astype(jnp.float32)
    start = max_completion_length - cache_length
    ramp = (start - length) / cache_length
    return jnp.where(length <= start, 0.0, jnp.where(length <= max_completion_length, ramp, -1.0))


def group_top_k_mask(
    scores: ArrayLike,
    k: int,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
) -> jax.Array:
    """``[N]`` bool: the ``k`` highest-scoring completions of each group (ties -> lower index first).
    Works on arbitrary ``group_ids`` (no reshape); groups smaller than ``k`` keep every member."""
    check_range("k", k, low=1)
    s = as_float(scores, "scores")
    check_rank(s, 1, "scores")
    gid, _ = _groups(s.shape[0], num_generations, group_ids, None)
    idx = jnp.arange(s.shape[0])
    same = gid[:, None] == gid[None, :]
    beats = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(same & beats, axis=1)
    return rank < k


def gfpo_advantages(
    rewards: ArrayLike,
    scores: ArrayLike,
    k: int,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    scale_rewards: str = "group",
    eps: Scalar = 1e-4,
) -> Tuple[jax.Array, jax.Array]:
    """GFPO group filtering (Shrivastava et al. 2025, "Sample More to Think Less", arXiv 2508.09726,
    eq. 2): keep the best ``k`` of each group by a per-completion ``scores`` (e.g. ``-length`` or
    reward per token: higher is kept), compute group-relative advantages over the kept set only.

    Returns ``(advantages [N], keep [N] bool)``; dropped completions get advantage 0 and should leave
    the loss (``mask & keep[:, None]``), including its token count.
    """
    check_range("k", k, low=1)
    keep = group_top_k_mask(scores, k, num_generations, group_ids=group_ids)
    r = jnp.where(keep, as_float(rewards, "rewards"), jnp.nan)
    adv = group_relative_advantages(
        r, num_generations, group_ids=group_ids, num_groups=num_groups, scale_rewards=scale_rewards, eps=eps
    )
    return adv, keep


# ============================================================================ beyond TRL: estimators

SINGLETON_POLICIES = ("zero", "raw")


def _scores(rewards, num_generations, group_ids, num_groups):
    r = as_float(rewards, "rewards")
    check_rank(r, 1, "rewards")
    gid, ng = _groups(r.shape[0], num_generations, group_ids, num_groups)
    valid = ~jnp.isnan(r)
    count = jax.ops.segment_sum(valid.astype(r.dtype), gid, num_segments=ng)[gid]
    return r, gid, ng, valid, count


def _singleton(adv, r, valid, count, singleton):
    check_choice("singleton", singleton, SINGLETON_POLICIES)
    if singleton == "raw":
        adv = jnp.where(valid & (count == 1), r, adv)
    return adv


def rloo_advantages(
    rewards: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    singleton: str = "zero",
) -> jax.Array:
    """REINFORCE leave-one-out (RLOO; Kool et al. 2019; Ahmadian et al. arXiv 2402.14740, eq. 6):
    ``A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) · (r_i − mean_g)``.

    Computed as the scaled deviation, and exactly 0 in zero-variance groups (the direct
    ``r_i − (S − r_i)/(n−1)`` form leaves a float32 residue for identical non-dyadic rewards,
    objectives-survey 4.5). ``singleton``: ``"zero"`` (no leave-one-out baseline exists: 0) or
    ``"raw"`` (``A = r``, verl's loop ``rloo``; verl's ``rloo_vectorized`` gives 0 — the two disagree).
    NaN rewards are unscorable: left out of the group, advantage 0.

    Args:
      rewards: ``[N]``; groups by ``num_generations`` or ``group_ids`` ``[N]`` (+ static ``num_groups``).

    Returns:
      ``[N]`` advantages (stop-gradient).
    """
    r, gid, ng, valid, n = _scores(rewards, num_generations, group_ids, num_groups)
    mean, _, const = _group_stats(r, valid, gid, ng)
    adv = jnp.where(valid & ~const, n / jnp.maximum(n - 1, 1) * (r - mean), 0.0)
    return jax.lax.stop_gradient(_singleton(adv, r, valid, n, singleton))


def maxrl_advantages(
    rewards: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    eps: Scalar = 1e-6,
) -> jax.Array:
    """MaxRL (Tajwar et al. 2026, "Maximum Likelihood Reinforcement Learning", arXiv 2602.02710, sec. 4;
    SkyRL ``maxrl``): ``A_i = (r_i − μ_g) / (μ_g + eps)``.

    For binary pass/fail rewards ``μ_g`` is the empirical pass rate ``p̂``, and the estimator averages
    ``∇log π`` over the successful samples (the ``1/p`` re-weighting of the maximum-likelihood gradient
    ``∇ log p``). Rewards should be non-negative (a negative group mean flips the sign). All-fail,
    all-pass, singleton groups and unscorable (NaN) rows get 0. Returns ``[N]`` (stop-gradient).
    """
    check_range("eps", eps, low=0.0)
    r, gid, ng, valid, _ = _scores(rewards, num_generations, group_ids, num_groups)
    mean, _, const = _group_stats(r, valid, gid, ng)
    adv = jnp.where(valid & ~const, (r - mean) / (jnp.where(const, 1.0, mean) + eps), 0.0)
    return jax.lax.stop_gradient(adv)


def opo_advantages(
    rewards: ArrayLike,
    lengths: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    singleton: str = "zero",
) -> jax.Array:
    """On-Policy RL with Optimal reward baseline (OPO; Hao et al. arXiv 2505.23585, eq. 5): the
    length-weighted group baseline ``b_g = Σ_i |y_i| r_i / Σ_i |y_i|``, ``A_i = r_i − b_g`` (no std).

    Args:
      rewards: ``[N]`` (NaN unscorable, excluded, advantage 0).
      lengths: ``[N]`` completion lengths ``|y_i|`` (e.g. ``mask.sum(-1)``). A group whose valid lengths
        are all 0 falls back to the plain mean.
      singleton: ``"zero"`` or ``"raw"`` (verl: baseline 0, ``A = r``).

    Returns:
      ``[N]`` (0 in zero-variance groups; stop-gradient).
    """
    r, gid, ng, valid, n = _scores(rewards, num_generations, group_ids, num_groups)
    length = as_float(jnp.asarray(lengths).astype(r.dtype), "lengths")
    if length.shape != r.shape:
        raise ValueError(f"`lengths` must have shape {tuple(r.shape)}, got {tuple(length.shape)}")
    seg = lambda v: jax.ops.segment_sum(v, gid, num_segments=ng)[gid]  # noqa: E731
    lv = jnp.where(valid, length, 0.0)
    num = seg(jnp.where(valid, lv * jnp.where(valid, r, 0.0), 0.0))
    den = seg(lv)
    mean, _, const = _group_stats(r, valid, gid, ng)
    base = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), mean)
    adv = jnp.where(valid & ~const, r - base, 0.0)
    return jax.lax.stop_gradient(_singleton(adv, r, valid, n, singleton))


def grpo_passk_advantages(
    rewards: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    scale_by_std: bool = True,
    eps: Scalar = 1e-6,
) -> jax.Array:
    """GRPO pass@k advantage (Tang, Zheng, Synnaeve & Munos, "Optimizing language models for inference
    time objectives using RL", arXiv 2503.19595, sec. 3, pass@k with k = group size and a leave-one-out
    control variate; verl ``grpo_passk``):
    only the best member of each group is credited, ``A_best = (r_max − r_2nd) / (σ_g + eps)``
    (``σ_g`` the unbiased group std; without it when ``scale_by_std=False``); every other member gets 0.

    Ties for the maximum give 0 (``r_max = r_2nd``); the best is the lowest index among ties. Groups
    with fewer than 2 valid rewards give 0 (verl raises). NaN = unscorable. ``[N]``, stop-gradient.
    """
    r, gid, ng, valid, n = _scores(rewards, num_generations, group_ids, num_groups)
    idx = jnp.arange(r.shape[0])
    rv = jnp.where(valid, r, -jnp.inf)
    same = (gid[:, None] == gid[None, :]) & valid[None, :]
    beats = (rv[None, :] > rv[:, None]) | ((rv[None, :] == rv[:, None]) & (idx[None, :] < idx[:, None]))
    best = valid & (jnp.sum(same & beats, axis=1) == 0)
    second = jax.ops.segment_max(jnp.where(best, -jnp.inf, rv), gid, num_segments=ng)[gid]
    ok = best & (n >= 2)
    gap = jnp.where(ok, r - jnp.where(ok, second, 0.0), 0.0)
    if scale_by_std:
        _, std, _ = _group_stats(r, valid, gid, ng)
        gap = gap / (jnp.where(ok, std, 1.0) + eps)
    return jax.lax.stop_gradient(jnp.where(ok, gap, 0.0))


def dynamic_sampling_mask(
    scores: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
) -> jax.Array:
    """DAPO dynamic sampling as a pure filter (Yu et al. arXiv 2503.14476, eq. 11 constraint
    ``0 < |{o_i : correct}| < G``): keep a group iff its valid scores (accuracy or reward) are not all
    equal — all-correct / all-wrong groups give zero advantage and only dilute the batch.

    Returns ``[N]`` bool: the group's decision broadcast to its rows (groups with < 2 valid scores are
    dropped). Resampling until the batch is full is the caller's loop; this only says which to keep.
    """
    s = as_float(scores, "scores")
    check_rank(s, 1, "scores")
    gid, ng = _groups(s.shape[0], num_generations, group_ids, num_groups)
    _, _, const = _group_stats(s, ~jnp.isnan(s), gid, ng)
    return ~const


def masked_whiten(x: ArrayLike, mask: ArrayLike, shift_mean: bool = True, eps: Scalar = 1e-8) -> jax.Array:
    """Batch whitening over masked positions (REINFORCE++ global normalisation, arXiv 2501.03262,
    eq. 8; verl ``masked_whiten``): ``(x − mean) / sqrt(var + eps)`` with the unbiased masked variance;
    ``shift_mean=False`` adds the mean back.

    Degenerate cases (finite, documented): fewer than 2 valid elements -> variance 0 (verl raises);
    all valid values equal -> ``x − mean`` is exactly 0 (no ``residue/sqrt(eps)`` blow-up). Returns the
    shape of ``x``, 0 under the mask.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import masked_whiten
      >>> x = jnp.array([[1.0, 3.0, 50.0]])
      >>> print(masked_whiten(x, jnp.array([[1, 1, 0]], bool)))  # mean / std over the masked entries only
      [[-0.7071  0.7071  0.    ]]
    """
    x = as_float(x, "x")
    m = jnp.broadcast_to(as_mask(mask), x.shape)
    zero = jnp.zeros((), x.dtype)
    cnt = jnp.sum(m).astype(x.dtype)
    mean = jnp.sum(jnp.where(m, x, zero)) / jnp.maximum(cnt, 1)
    dev = jnp.where(m, x - mean, zero)
    const = jnp.max(jnp.where(m, x, -jnp.inf)) == jnp.min(jnp.where(m, x, jnp.inf))
    dev = jnp.where(const, zero, dev)
    var = jnp.where(cnt > 1, jnp.sum(dev * dev) / jnp.maximum(cnt - 1, 1), zero)
    out = dev * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, zero)


def _masked_reverse_scan(step, init, xs):
    """Reverse ``lax.scan`` over the time axis of ``[B, T]`` arrays (scan runs over ``T``)."""
    xs_t = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), xs)
    _, ys = jax.lax.scan(step, init, xs_t, reverse=True)
    return jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), ys)


def _token_inputs(token_rewards, mask, name="token_rewards"):
    r = as_float(token_rewards, name)
    check_rank(r, 2, name)
    m = as_mask(mask)
    check_same_shape(r, name, mask=m)
    return jnp.where(m, r, jnp.zeros((), r.dtype)), m


def discounted_returns(token_rewards: ArrayLike, mask: ArrayLike, gamma: Scalar = 1.0) -> jax.Array:
    """Masked discounted reward-to-go (Sutton & Barto 2018, eq. 3.8; REINFORCE++ arXiv 2501.03262, eq. 6)
    ``G_t = r_t + γ G_{t'}`` (``t'`` the next *valid* position;
    masked positions — padding or interleaved observation tokens — are skipped: they neither add reward
    nor discount). ``[B, T]``, 0 under the mask. Reverse ``lax.scan`` over ``T``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import discounted_returns
      >>> rewards = jnp.array([[0.0, 0.0, 1.0]])
      >>> print(discounted_returns(rewards, jnp.ones((1, 3), bool), gamma=0.5))
      [[0.25 0.5  1.  ]]
    """
    check_range("gamma", gamma, low=0.0, high=1.0)
    r, m = _token_inputs(token_rewards, mask)

    def step(g, x):
        rt, mt = x
        g_new = jnp.where(mt, rt + gamma * g, g)
        return g_new, jnp.where(mt, g_new, jnp.zeros((), r.dtype))

    return _masked_reverse_scan(step, jnp.zeros(r.shape[:1], r.dtype), (r, m))


def reinforce_plus_plus_advantages(
    token_rewards: ArrayLike,
    mask: ArrayLike,
    gamma: Scalar = 1.0,
    whiten: bool = True,
) -> Tuple[jax.Array, jax.Array]:
    """REINFORCE++ (Hu et al. arXiv 2501.03262, eqs. 6–8): discounted returns :func:`discounted_returns`
    (token rewards usually the outcome at the last token minus ``β·KL_t``) whitened over every valid
    token of the batch (:func:`masked_whiten`).

    Masked positions are skipped (verl resets the running return at every masked position instead; the
    two agree for right-padded masks, which is what verl's outcome estimators assume).

    Returns:
      ``(advantages [B, T], returns [B, T])``, 0 under the mask, stop-gradient.
    """
    ret = discounted_returns(token_rewards, mask, gamma)
    adv = masked_whiten(ret, mask) if whiten else ret
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(ret)


def reinforce_plus_plus_baseline_advantages(
    rewards: ArrayLike,
    mask: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    singleton: str = "zero",
) -> jax.Array:
    """REINFORCE++-baseline (arXiv 2501.03262, sec. 3.2, eq. 9): ``A_i = r_i − mean_g``, broadcast over
    the valid tokens, then whitened over all valid tokens of the batch (:func:`masked_whiten`).

    Args:
      rewards: ``[N]`` outcome rewards (NaN unscorable: its tokens leave the whitening, advantage 0).
      mask: ``[N, T]``.
      singleton: ``"zero"`` (``A = 0`` before whitening) or ``"raw"`` (verl: mean 0, ``A = r``).

    Returns:
      ``[N, T]`` advantages, 0 under the mask (stop-gradient).
    """
    r, gid, ng, valid, n = _scores(rewards, num_generations, group_ids, num_groups)
    m = as_mask(mask)
    check_rank(m, 2, "mask")
    if m.shape[0] != r.shape[0]:
        raise ValueError(f"`mask` must have {r.shape[0]} rows (one per reward), got shape {tuple(m.shape)}")
    mean, _, const = _group_stats(r, valid, gid, ng)
    adv = jnp.where(valid & ~const, r - mean, 0.0)
    adv = _singleton(adv, r, valid, n, singleton)
    tok_mask = m & valid[:, None]
    return jax.lax.stop_gradient(masked_whiten(jnp.broadcast_to(adv[:, None], m.shape), tok_mask))


def gae_advantages(
    token_rewards: ArrayLike,
    values: ArrayLike,
    mask: ArrayLike,
    gamma: Scalar = 1.0,
    lam: Scalar = 1.0,
    *,
    bootstrap_values: Optional[ArrayLike] = None,
    whiten: bool = False,
) -> Tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. arXiv 1506.02438, eqs. 11–16) with a reverse
    ``lax.scan``: ``δ_t = r_t + γ V_{t'} − V_t``, ``Â_t = δ_t + γλ Â_{t'}``, returns ``R_t = Â_t + V_t``,
    where ``t'`` is the next *valid* position (masked positions — interleaved observation tokens — are
    skipped, as verl's ``gae``).

    After the last valid token the next value is 0 (the episode ended): values at padded positions are
    never read. Pass ``bootstrap_values`` ``[B]`` (``V`` of the state after a *truncated* completion)
    to bootstrap instead. ``whiten=True`` whitens the advantages over the batch (verl does by default).

    Returns:
      ``(advantages [B, T], returns [B, T])``, 0 under the mask; stop-gradient (targets are data).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import gae_advantages
      >>> rewards = jnp.array([[0.0, 0.0, 1.0]])
      >>> values = jnp.array([[0.5, 0.5, 0.5]])
      >>> adv, returns = gae_advantages(rewards, values, jnp.ones((1, 3), bool), gamma=1.0, lam=1.0)
      >>> print(adv, returns)  # lam = 1: advantages = returns - values
      [[0.5 0.5 0.5]] [[1. 1. 1.]]
    """
    check_range("gamma", gamma, low=0.0, high=1.0)
    check_range("lam", lam, low=0.0, high=1.0)
    r, m = _token_inputs(token_rewards, mask)
    v = as_float(values, "values")
    check_same_shape(r, "token_rewards", values=v)
    dt = jnp.result_type(r.dtype, v.dtype)
    r = r.astype(dt)
    v = jax.lax.stop_gradient(jnp.where(m, v, jnp.zeros((), v.dtype)).astype(dt))
    B = r.shape[0]
    if bootstrap_values is None:
        v_next0 = jnp.zeros((B,), dt)
    else:
        bv = as_float(bootstrap_values, "bootstrap_values")
        if bv.shape not in ((B,), (B, 1)):
            raise ValueError(f"`bootstrap_values` must have shape ({B},) or ({B}, 1), got {tuple(bv.shape)}")
        v_next0 = jax.lax.stop_gradient(bv.reshape(B).astype(dt))

    def step(carry, x):
        v_next, a_next = carry
        rt, vt, mt = x
        a = rt + gamma * v_next - vt + gamma * lam * a_next
        carry = (jnp.where(mt, vt, v_next), jnp.where(mt, a, a_next))
        return carry, jnp.where(mt, a, jnp.zeros((), dt))

    xs_t = (jnp.swapaxes(r, 0, 1), jnp.swapaxes(v, 0, 1), jnp.swapaxes(m, 0, 1))
    _, adv = jax.lax.scan(step, (v_next0, jnp.zeros((B,), dt)), xs_t, reverse=True)
    adv = jnp.swapaxes(adv, 0, 1)
    ret = jnp.where(m, adv + v, jnp.zeros((), dt))
    if whiten:
        adv = masked_whiten(adv, m)
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(ret)


def clipped_value_loss(
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    clip_range: Optional[Scalar] = 0.2,
) -> Tuple[jax.Array, jax.Array]:
    """PPO clipped value loss (Schulman et al. arXiv 1707.06347, eq. 9 value term, with the value
    clipping of OpenAI baselines; Engstrom et al. arXiv 2005.12729, sec. 3):
    ``L_t = ½ max((V_t − R_t)², (V^clip_t − R_t)²)``, ``V^clip = V_old + clip(V − V_old, −ε_v, ε_v)``
    (``clip_range`` ε_v; None: unclipped ``½(V − R)²``). verl ``compute_value_loss`` / TRL PPO.

    Gradient flows into ``values`` only (``old_values`` and ``returns`` are stop-gradient).

    Returns:
      ``(per_token_loss [B, T], clipped [B, T] bool)`` — 0 / False under the mask; ``clipped`` marks
      tokens where the clipped branch is strictly larger (verl ``vf_clipfrac``). Aggregate the loss
      with :func:`trlax.objectives.aggregate`.
    """
    check_range("clip_range", clip_range, low=0.0, allow_none=True)
    v = as_float(values, "values")
    check_rank(v, 2, "values")
    m = as_mask(mask)
    old = jax.lax.stop_gradient(as_float(old_values, "old_values"))
    ret = jax.lax.stop_gradient(as_float(returns, "returns"))
    check_same_shape(v, "values", old_values=old, returns=ret, mask=m)
    zero = jnp.zeros((), v.dtype)
    v = jnp.where(m, v, zero)
    old = jnp.where(m, old, zero).astype(v.dtype)
    ret = jnp.where(m, ret, zero).astype(v.dtype)
    l1 = jnp.square(v - ret)
    if clip_range is None:
        loss, clipped = 0.5 * l1, jnp.zeros(m.shape, bool)
    else:
        vc = old + jnp.clip(v - old, -clip_range, clip_range)
        l2 = jnp.square(vc - ret)
        loss, clipped = 0.5 * jnp.maximum(l1, l2), l2 > l1
    return jnp.where(m, loss, zero), clipped & m


def remax_advantages(
    token_rewards: ArrayLike, baseline_rewards: ArrayLike, mask: ArrayLike
) -> Tuple[jax.Array, jax.Array]:
    """ReMax (Li et al. arXiv 2310.10505, Algorithm 1 / eq. 6): REINFORCE with the reward of the greedy
    completion as baseline, ``A_t = Σ_{k≥t} m_k r_k − b_i`` with ``b_i = r(x, ŷ_greedy)`` (verl ``remax``).

    Args:
      token_rewards: ``[B, T]`` (outcome reward at the last token for outcome supervision).
      baseline_rewards: ``[B]`` greedy-rollout reward.
      mask: ``[B, T]``.

    Returns:
      ``(advantages [B, T], returns [B, T])``, 0 under the mask, stop-gradient.
    """
    ret = discounted_returns(token_rewards, mask, 1.0)
    m = as_mask(mask)
    b = as_float(baseline_rewards, "baseline_rewards")
    if b.shape not in ((m.shape[0],), (m.shape[0], 1)):
        raise ValueError(f"`baseline_rewards` must have shape ({m.shape[0]},), got {tuple(b.shape)}")
    adv = jnp.where(m, ret - b.reshape(-1, 1).astype(ret.dtype), jnp.zeros((), ret.dtype))
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(ret)


def sum_pi_squared(logits: ArrayLike) -> jax.Array:
    """``Σ_v π_v²`` per position from logits ``[..., V]`` (the collision probability, also the "aligned"
    normaliser of WPO, arXiv 2406.11827, eq. 2): ``exp(LSE(2z) − 2·LSE(z))`` (float32 or
    wider), used by :func:`optimal_token_baseline_advantages`. ``[...]``, stop-gradient."""
    z = as_float(logits, "logits")
    return jax.lax.stop_gradient(jnp.exp(jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * jax.nn.logsumexp(z, axis=-1)))


def optimal_token_baseline_advantages(
    token_rewards: ArrayLike,
    old_logps: ArrayLike,
    sum_pi_sq: ArrayLike,
    mask: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    is_weights: Optional[ArrayLike] = None,
    handle_zero_tail: bool = False,
    eps: Scalar = 1e-8,
) -> Tuple[jax.Array, jax.Array]:
    """Optimal Token Baseline (OTB; Li 2025, "Optimal Token Baseline" blog, richardli.xyz; verl
    ``optimal_token_baseline``; minimum-variance baseline of Greensmith et al. 2004, JMLR 5, eq. 10 with
    the logit-gradient norm proxy).

    ``G_t`` reward-to-go, ``w_j = 1 − 2π_j + Σ_v π_v²`` (``π_j = exp ℓ^old_j``; × ``ρ̄_j²`` with
    ``is_weights``), ``W_t = Σ_{j≤t} m_j w_j``; per group and time step
    ``B_t = Σ_i m G_t W_t / (Σ_i m W_t + eps)``; ``A_t = (G_t − B_t)·m``. Singleton groups: ``B = 0``
    (``A = G``), as verl. ``handle_zero_tail``: in a group whose longest completion is unique, its
    baseline is 0 beyond the second-longest length (where it is alone). Positions are aligned by index
    ``t`` (right-padded completions).

    Args:
      token_rewards, old_logps, sum_pi_sq, mask: ``[N, T]``; ``is_weights`` ``[N, T]`` or None.

    Returns:
      ``(advantages [N, T], returns [N, T])``, 0 under the mask, stop-gradient.
    """
    check_range("eps", eps, low=0.0)
    r, m = _token_inputs(token_rewards, mask)
    lp = as_float(old_logps, "old_logps")
    sp = as_float(sum_pi_sq, "sum_pi_sq")
    check_same_shape(r, "token_rewards", old_logps=lp, sum_pi_sq=sp)
    N, T = r.shape
    gid, ng = _groups(N, num_generations, group_ids, num_groups)
    dt = jnp.result_type(r.dtype, lp.dtype, sp.dtype)
    zero = jnp.zeros((), dt)
    G = discounted_returns(r, m, 1.0).astype(dt)
    w = 1.0 - 2.0 * jnp.exp(jnp.where(m, lp, zero)) + jnp.where(m, sp, zero)
    if is_weights is not None:
        iw = as_float(is_weights, "is_weights")
        check_same_shape(r, "token_rewards", is_weights=iw)
        w = w * jnp.square(jnp.where(m, iw, zero))
    W = jnp.cumsum(jnp.where(m, w, zero), axis=-1)
    seg = lambda v: jax.ops.segment_sum(v, gid, num_segments=ng)  # noqa: E731
    num = seg(jnp.where(m, G * W, zero))
    den = seg(jnp.where(m, W, zero)) + eps
    base = (num / den)[gid]
    rows = seg(jnp.ones((N,), dt))[gid]
    base = jnp.where((rows > 1)[:, None], base, zero)
    if handle_zero_tail:
        L = jnp.sum(m, axis=-1)
        lmax = jax.ops.segment_max(L, gid, num_segments=ng)[gid]
        is_max = L == lmax
        n_max = seg(is_max.astype(dt))[gid]
        second = jax.ops.segment_max(jnp.where(is_max, -1, L), gid, num_segments=ng)[gid]
        lone = is_max & (n_max == 1) & (rows > 1)
        tail = lone[:, None] & (jnp.arange(T)[None, :] >= second[:, None])
        base = jnp.where(tail, zero, base)
    adv = jnp.where(m, G - base, zero)
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(G)


def entropy_advantage_shaping(
    advantages: ArrayLike,
    entropies: ArrayLike,
    mask: ArrayLike,
    alpha: Scalar = 0.4,
    kappa: Scalar = 2.0,
) -> jax.Array:
    """Entropy-based advantage shaping (Cheng et al. arXiv 2506.14758, eqs. 3–4):
    ``A'_t = A_t + min(α · sg(H_t), |A_t| / κ)`` — an exploration bonus that can never flip the sign of a
    negative advantage (``κ > 1``) and vanishes with it. Defaults α = 0.4, κ = 2 (paper, sec. 4).

    Args:
      advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
      entropies: ``[B, T]`` per-token entropy of the current policy (stop-gradient here).
      mask: ``[B, T]``.

    Returns:
      ``[B, T]`` shaped advantages, 0 under the mask (stop-gradient: advantages are data).
    """
    check_range("alpha", alpha, low=0.0)
    check_range("kappa", kappa, low=0.0, low_inclusive=False)
    H = jax.lax.stop_gradient(as_float(entropies, "entropies"))
    check_rank(H, 2, "entropies")
    m = as_mask(mask)
    check_same_shape(H, "entropies", mask=m)
    B, T = H.shape
    a = as_float(advantages, "advantages")
    if a.shape == (B,):
        a = a[:, None]
    if a.shape not in ((B, 1), (B, T)):
        raise ValueError(f"`advantages` must have shape ({B},), ({B}, 1) or ({B}, {T}), got {tuple(a.shape)}")
    a = jnp.broadcast_to(a, (B, T))
    dt = jnp.result_type(a.dtype, H.dtype)
    zero = jnp.zeros((), dt)
    a = jnp.where(m, a, zero).astype(dt)
    h = jnp.where(m, H, zero).astype(dt)
    out = a + jnp.minimum(alpha * h, jnp.abs(a) / kappa)
    return jax.lax.stop_gradient(jnp.where(m, out, zero))


def group_token_counts(
    mask: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
) -> jax.Array:
    """Valid-token count of each prompt group (the prompt-level denominator of DAPO-style token means,
    arXiv 2503.14476, eq. 8), ``[num_groups]`` (``N`` segments when ``group_ids`` is
    given without ``num_groups``). All-reduce it across micro-batches / devices for
    :func:`prompt_mean_weights`."""
    m = as_mask(mask)
    check_rank(m, 2, "mask")
    gid, ng = _groups(m.shape[0], num_generations, group_ids, num_groups)
    return jax.ops.segment_sum(jnp.sum(m, axis=-1).astype(jnp.float32), gid, num_segments=ng)


def prompt_mean_weights(
    mask: ArrayLike,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[ArrayLike] = None,
    num_groups: Optional[int] = None,
    token_counts: Optional[ArrayLike] = None,
    num_prompts: Optional[Any] = None,
) -> jax.Array:
    """Per-row weights for prompt-level token-mean aggregation (DAPO arXiv 2503.14476, eq. 8 applied per
    prompt; SkyRL ``prompt_mean``; the
    "prompt-level" token mean of DAPO's eq. 8 discussion, TRL issue #5375):
    ``w_i = 1 / (P · N_tok(g(i)))`` so that ``Σ_i w_i Σ_t m_{i,t} L_{i,t} = (1/P) Σ_g (token mean of g)``.

    A helper for the aggregation, not an aggregation mode: multiply the per-token loss by ``w`` and sum.
    For micro-batches pass the global ``token_counts`` (``[num_groups]``, from
    :func:`group_token_counts`, all-reduced) and the global ``num_prompts`` P; by default both come
    from this ``mask`` (P = groups with at least one valid token).

    Returns:
      ``[B, 1]`` float32 weights (0 for rows of prompts without tokens).
    """
    m = as_mask(mask)
    check_rank(m, 2, "mask")
    gid, ng = _groups(m.shape[0], num_generations, group_ids, num_groups)
    counts = group_token_counts(m, group_ids=gid, num_groups=ng) if token_counts is None else \
        jnp.asarray(token_counts, jnp.float32)
    if counts.shape != (ng,):
        raise ValueError(f"`token_counts` must have shape ({ng},) (one per group), got {tuple(counts.shape)}")
    P = jnp.sum(counts > 0).astype(jnp.float32) if num_prompts is None else jnp.asarray(num_prompts, jnp.float32)
    c = counts[gid]
    w = jnp.where(c > 0, 1.0 / (jnp.maximum(P, 1.0) * jnp.where(c > 0, c, 1.0)), 0.0)
    return jax.lax.stop_gradient(w[:, None])


__all__ = [
    "MULTI_REWARD_AGGREGATIONS",
    "SCALE_REWARDS",
    "SINGLETON_POLICIES",
    "clipped_value_loss",
    "discounted_returns",
    "dynamic_sampling_mask",
    "entropy_advantage_shaping",
    "gae_advantages",
    "group_token_counts",
    "grpo_passk_advantages",
    "masked_whiten",
    "maxrl_advantages",
    "opo_advantages",
    "optimal_token_baseline_advantages",
    "prompt_mean_weights",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "sum_pi_squared",
    "gfpo_advantages",
    "group_relative_advantages",
    "group_top_k_mask",
    "multi_reward_advantages",
    "soft_overlong_punishment",
]
