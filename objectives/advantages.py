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
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from trlax.objectives._checks import as_float, check_choice, check_rank, check_range

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
    rewards: jnp.ndarray,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[jnp.ndarray] = None,
    num_groups: Optional[int] = None,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> jnp.ndarray:
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
    rewards_per_func: jnp.ndarray,
    weights: Optional[Sequence[float]] = None,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[jnp.ndarray] = None,
    num_groups: Optional[int] = None,
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> jnp.ndarray:
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
    completion_lengths: jnp.ndarray,
    max_completion_length: int,
    cache_length: int,
) -> jnp.ndarray:
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
    scores: jnp.ndarray,
    k: int,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
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
    rewards: jnp.ndarray,
    scores: jnp.ndarray,
    k: int,
    num_generations: Optional[int] = None,
    *,
    group_ids: Optional[jnp.ndarray] = None,
    num_groups: Optional[int] = None,
    scale_rewards: str = "group",
    eps: float = 1e-4,
):
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


__all__ = [
    "MULTI_REWARD_AGGREGATIONS",
    "SCALE_REWARDS",
    "gfpo_advantages",
    "group_relative_advantages",
    "group_top_k_mask",
    "multi_reward_advantages",
    "soft_overlong_punishment",
]
