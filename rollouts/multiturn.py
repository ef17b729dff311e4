"""Multi-turn, tool-using rollouts on the KV-cached sampler: the policy's turns and the environment's
observations interleave in one completion block, and the prefix is never recomputed.

Per batch: the distinct prompts (``reset`` of each row's environment rendered with the chat template and its
tools, :class:`~trlax.rollouts.environments.ChatFormat`) are prefilled once into a
:class:`~trlax.models.SlotCache` (one decode slot per rollout, ``G`` per prompt, as
:class:`~trlax.rollouts.JaxSampler`'s shared-prefix engine). Then, for up to ``max_turns`` turns:

1. jitted decode of every running rollout until a stop token (EOS, or a token ending a tool call such as
   ``</tool_call>``) or the end of the completion block (``max_new_tokens``, the total token budget of policy
   *and* observation tokens);
2. on the host, each rollout's turn text goes to its environment's ``step``: ``(observation, reward, done)``;
3. the observation's tokens (what the chat template puts between the turn and the next generation prompt,
   :meth:`ChatFormat.observation_ids`) are fed to the slot at its current length in one jitted call
   (right-padded to the longest, ``T`` rounded up to ``observation_multiple``; the slot's length advances by
   its real observation length only, so padding writes are never read) and the next turn is sampled from there.

Token ``i`` of the completion block of request ``r`` (rollout ``r = prompt·G + sample``) is drawn with key
``fold_in(fold_in(key, r), i)`` at RoPE position ``prompt_len + i``, exactly the position a full forward pass
over ``[prompt | completion block]`` gives it: the policy tokens' sampler log-probs equal that forward pass's
(processed, eq. 1 of :mod:`trlax.rollouts.sampler`) log-probs, and observation tokens shift nothing.

Masks (``[B, N]``): ``completion_mask`` marks every real context token (policy and observation: the attention
mask a training forward must use), ``loss_mask`` only the policy's tokens (gaps at the observations: the
``mask`` the objectives take); ``logps`` are the sampler log-probs of policy tokens, 0 elsewhere. Rewards per
turn are ``rewards [B, max_turns]`` (NaN where the environment gave none); :func:`turn_token_rewards` places
them at each turn's last policy token for per-token returns (REINFORCE++ / GAE over the gapped mask).

A rollout whose next observation does not fit in the block (with room for one more policy token), or that
fills the block inside a turn, is ``truncated``; one still running after ``max_turns`` is not (its
``env_done`` is False). An environment that raises stops the run with
:class:`~trlax.rollouts.environments.EnvironmentRunError` naming it, the method, the rollout and the turn.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.models.attention import SlotCache
from trlax.models.decoder import Decoder, rms_norm, rope_inv_freq
from trlax.rollouts.environments import ChatFormat, Environment, EnvironmentRunError, StepResult, Tool
from trlax.rollouts.sampler import Rollout, SamplingConfig, _heads, _prefill_prompts, _row_keys, left_pad

__all__ = ["MultiTurnRollout", "MultiTurnSampler", "turn_token_rewards"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MultiTurnRollout(Rollout):
    """A :class:`~trlax.rollouts.Rollout` whose completion block interleaves policy turns and observations.

    Attributes (besides :class:`Rollout`'s; ``completion_mask`` = every real context token, ``logps`` 0 at
    observation tokens):
      loss_mask: ``[B, N]`` bool, the policy's tokens only (the objectives' ``mask``).
      rewards: ``[B, max_turns]`` float32 per-turn rewards, NaN where the environment gave none.
      turn_ends: ``[B, max_turns]`` int32 block index of each turn's last policy token, -1 for no turn.
      num_turns: ``[B]`` int32 policy turns.
      env_done: ``[B]`` bool, the environment ended the episode (False: ``max_turns`` or the budget ended it).
      tool_calls, tool_failures: ``[B]`` int32 counters of the environment (0 if it keeps none).
    """

    loss_mask: jnp.ndarray = None
    rewards: jnp.ndarray = None
    turn_ends: jnp.ndarray = None
    num_turns: jnp.ndarray = None
    env_done: jnp.ndarray = None
    tool_calls: jnp.ndarray = None
    tool_failures: jnp.ndarray = None

    @property
    def total_rewards(self) -> np.ndarray:
        """``[B]`` sum of the per-turn rewards (NaN when the environment gave none at all)."""
        r = np.asarray(self.rewards, np.float64)
        return np.where(np.isnan(r).all(axis=1), np.nan, np.nansum(r, axis=1))


def turn_token_rewards(rollout: MultiTurnRollout) -> np.ndarray:
    """``[B, N]`` token rewards: turn ``k``'s reward at its last policy token (NaN rewards as 0), 0 elsewhere —
    the input of :func:`trlax.objectives.discounted_returns` / ``reinforce_plus_plus_advantages`` /
    ``gae_advantages`` with ``rollout.loss_mask`` (observation tokens skipped)."""
    ends, r = np.asarray(rollout.turn_ends), np.nan_to_num(np.asarray(rollout.rewards, np.float32))
    out = np.zeros(np.shape(rollout.completion_ids), np.float32)
    b, k = np.nonzero(ends >= 0)
    np.add.at(out, (b, ends[b, k]), r[b, k])
    return out


# ---------------------------------------------------------------------------------------- jitted turns


def _decode_loop(model: Decoder, cfg: SamplingConfig, stop, cache, plen, row_keys, prev, pos, alive, out):
    """Decode every ``alive`` slot until a stop token or the end of the block. ``prev`` ``[R]`` is each slot's
    last sampled token (block index ``pos - 1``, not yet in the cache); ``out = (ids, lps, pol)`` ``[R, N]``."""
    mc = model.config
    n = out[0].shape[1]
    head, draw = _heads(model, cfg)
    inv_freq = rope_inv_freq(mc)
    alive = alive & ~jnp.isin(prev, stop) & (pos < n)

    def body(state):
        cache, prev, pos, alive, (ids, lps, pol) = state
        cache = dataclasses.replace(cache, length=pos - 1)  # a stopped slot re-writes its own last token: no-op
        x = jnp.take(model.embed[...], prev[:, None], axis=0, mode="clip").astype(model.dtype)
        x, cache = model.run_layers(x, (plen[cache.prompt] + pos - 1)[:, None], inv_freq, None, cache, 0)
        h = rms_norm(x[:, 0], model.final_norm[...], mc.rms_norm_eps)
        tok, lp = draw(jax.vmap(jax.random.fold_in)(row_keys, pos), head(h))
        prev, pos, (ids, lps, pol) = _emit(alive, tok, lp, prev, pos, (ids, lps, pol))
        alive = alive & ~jnp.isin(tok, stop) & (pos < n)
        return cache, prev, pos, alive, (ids, lps, pol)

    cache, prev, pos, alive, out = jax.lax.while_loop(lambda st: jnp.any(st[3]), body,
                                                      (cache, prev, pos, alive, out))
    return cache, pos, out


def _emit(active, tok, lp, prev, pos, out):
    """Write each active slot's policy token ``tok`` (log-prob ``lp``) at its position ``pos`` of the
    completion block, then advance it: returns ``(prev, pos, (ids, lps, pol))``."""
    ids, lps, pol = out
    slots = jnp.arange(ids.shape[0])
    at = jnp.where(active, slots, ids.shape[0])  # inactive slots write nowhere
    ids = ids.at[at, pos].set(tok, mode="drop")
    lps = lps.at[at, pos].set(lp, mode="drop")
    pol = pol.at[at, pos].set(True, mode="drop")
    return jnp.where(active, tok, prev), pos + active.astype(jnp.int32), (ids, lps, pol)


def _first_turn(graphdef, cfg: SamplingConfig, n: int, params, prompt_ids, prompt_mask, key):
    """Prefill the ``B0`` distinct prompts, draw every rollout's first token from its prompt's logits, decode
    turn 1. Returns ``(cache, plen, pos, (ids, lps, pol))``."""
    model = nnx.merge(graphdef, params)
    mc = model.config
    g = cfg.num_generations
    r_all = prompt_ids.shape[0] * g
    stop = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    prompt_mask = prompt_mask.astype(bool)
    pk, pv, plen, row_keys, tok, lp = _prefill_prompts(model, cfg, prompt_ids, prompt_mask, key)
    ids = jnp.full((r_all, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((r_all, n), jnp.float32).at[:, 0].set(lp)
    pol = jnp.zeros((r_all, n), bool).at[:, 0].set(True)
    cshape = (mc.num_layers, r_all, n, mc.num_kv_heads, mc.head_dim)
    cache = SlotCache(prefix_k=pk, prefix_v=pv, prefix_mask=prompt_mask, prompt=jnp.arange(r_all) // g,
                      k=jnp.zeros(cshape, model.dtype), v=jnp.zeros(cshape, model.dtype),
                      length=jnp.zeros((r_all,), jnp.int32), layer=jnp.zeros((), jnp.int32), group=g)
    pos = jnp.ones((r_all,), jnp.int32)
    cache, pos, out = _decode_loop(model, cfg, stop, cache, plen, row_keys, tok, pos, jnp.ones((r_all,), bool),
                                   (ids, lps, pol))
    return cache, plen, pos, out


def _next_turn(graphdef, cfg: SamplingConfig, params, cache, plen, key, feed, feed_len, active, pos, out):
    """Append each active slot's observation ``feed[:feed_len]`` (``[R, T]`` right-padded) after its pending
    last token, draw the turn's first token from the last observation token's logits, decode the turn."""
    model = nnx.merge(graphdef, params)
    mc = model.config
    r_all, t = feed.shape
    head, draw = _heads(model, cfg)
    stop = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    row_keys = _row_keys(key, jnp.arange(r_all))
    slots = jnp.arange(r_all)
    ids, lps, pol = out
    prev = ids[slots, pos - 1]  # the last token of the previous turn: sampled, not yet in the cache
    x_ids = jnp.concatenate([prev[:, None], feed], axis=1)  # [R, T + 1]
    cache = dataclasses.replace(cache, length=pos - 1)
    positions = (plen[cache.prompt] + pos - 1)[:, None] + jnp.arange(t + 1)[None, :]
    x = jnp.take(model.embed[...], x_ids, axis=0, mode="clip").astype(model.dtype)
    x, cache = model.run_layers(x, positions, rope_inv_freq(mc), None, cache, 0)
    h = rms_norm(x[slots, feed_len], model.final_norm[...], mc.rms_norm_eps)  # the last observation token
    cols = pos[:, None] + jnp.arange(t)[None, :]
    valid = active[:, None] & (jnp.arange(t)[None, :] < feed_len[:, None])
    ids = ids.at[jnp.where(valid, slots[:, None], r_all), cols].set(feed, mode="drop")
    pos = pos + jnp.where(active, feed_len, 0)
    tok, lp = draw(jax.vmap(jax.random.fold_in)(row_keys, pos), head(h))
    prev, pos, (ids, lps, pol) = _emit(active, tok, lp, prev, pos, (ids, lps, pol))
    cache, pos, out = _decode_loop(model, cfg, stop, cache, plen, row_keys, prev, pos, active, (ids, lps, pol))
    return cache, pos, out


# ------------------------------------------------------------------------------------------ host loop


def _tool_stop_ids(tokenizer) -> List[int]:
    """Ids of added tokens whose text ends a tool call (``</tool_call>``): a turn stops there."""
    out = []
    for text, i in getattr(tokenizer, "get_added_vocab", lambda: {})().items():
        if text.rstrip().endswith("</tool_call>"):
            out.append(int(i))
    return sorted(out)


def _step_result(res, name: str) -> StepResult:
    if isinstance(res, StepResult):
        return res
    if isinstance(res, tuple) and len(res) == 3:
        return StepResult(*res)
    raise EnvironmentRunError(f"{name}.step must return (observation, reward, done) or a StepResult, got {res!r}")


class MultiTurnSampler:
    """Multi-turn rollouts of a :class:`~trlax.models.Decoder` against environments (module docstring).

    Args:
      model: a :class:`Decoder` or its ``graphdef`` (``nnx.split``).
      config: :class:`SamplingConfig`: ``max_new_tokens`` is the completion block ``N`` (policy + observation
        tokens), ``stop_token_ids`` end a turn (EOS; tool-call closing tokens of ``tokenizer`` are added, see
        ``tool_stop_ids``), ``num_generations`` rollouts per row, ``prompt_multiple`` buckets the prompt width
        (default 16). ``decode_slots`` / ``share_prefix`` are not used (one slot per rollout, shared prefix).
      tokenizer: a transformers tokenizer (chat template with ``tools=`` support for tool environments).
      max_turns: policy turns per rollout.
      observation_multiple: observation blocks are padded to a multiple of this (one compilation per width).
      tool_stop_ids: token ids that end a turn besides ``stop_token_ids`` (default: added tokens whose text ends
        with ``</tool_call>``).
    """

    def __init__(self, model: Any, config: SamplingConfig, tokenizer, *, max_turns: int = 4,
                 observation_multiple: int = 8, tool_stop_ids: Optional[Sequence[int]] = None):
        if isinstance(model, nnx.Module):
            self.graphdef, self.default_params = nnx.split(model)
        else:
            self.graphdef, self.default_params = model, None
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"`config` must be a SamplingConfig, got {type(config).__name__}")
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns={max_turns!r} is out of range; allowed: integers >= 1")
        if isinstance(observation_multiple, bool) or not isinstance(observation_multiple, int) or observation_multiple < 1:
            raise ValueError(f"observation_multiple={observation_multiple!r} is out of range; allowed: integers >= 1")
        self.tokenizer = tokenizer
        self.eos_ids = set(config.stop_token_ids)
        extra = _tool_stop_ids(tokenizer) if tool_stop_ids is None else [int(t) for t in tool_stop_ids]
        stops = tuple(dict.fromkeys(list(config.stop_token_ids) + extra))
        self.config = dataclasses.replace(config, stop_token_ids=stops)
        self.max_turns = max_turns
        self.observation_multiple = observation_multiple
        self._fns: Dict[Any, Callable] = {}
        self.last_metrics: Dict[str, float] = {}

    def _first(self, cfg):
        k = ("first", cfg)
        if k not in self._fns:
            self._fns[k] = jax.jit(functools.partial(_first_turn, self.graphdef, cfg, cfg.max_new_tokens))
        return self._fns[k]

    def _next(self, cfg):
        k = ("next", cfg)
        if k not in self._fns:
            self._fns[k] = jax.jit(functools.partial(_next_turn, self.graphdef, cfg))
        return self._fns[k]

    def _env_call(self, env, method: str, r: int, turn: int, *args):
        name = type(env).__name__
        fn = getattr(env, method, None)
        if fn is None:
            if method in ("end_reward", "metrics"):
                return None if method == "end_reward" else {}
            raise EnvironmentRunError(f"environment {name} has no {method}() method (see trlax.rollouts.Environment)")
        try:
            return fn(*args)
        except EnvironmentRunError:
            raise
        except Exception as e:
            raise EnvironmentRunError(f"environment {name}.{method} raised on rollout {r} (turn {turn}): "
                                    f"{type(e).__name__}: {e}") from e

    def rollout(self, params: Any, rows: Sequence[Dict[str, Any]], env_factory: Callable[[], Environment],
                key: jax.Array, *, num_generations: Optional[int] = None) -> MultiTurnRollout:
        """Run ``num_generations`` episodes per row (a new environment from ``env_factory()`` for each, reset
        with its row) and return the interleaved :class:`MultiTurnRollout` (rows ``r = row·G + sample``)."""
        cfg = self.config
        g = cfg.num_generations if num_generations is None else int(num_generations)
        if g < 1:
            raise ValueError(f"num_generations={g!r} is out of range; allowed: integers >= 1")
        cfg = dataclasses.replace(cfg, num_generations=g)
        if params is None:
            params = self.default_params
            if params is None:
                raise ValueError("`params` is None and the sampler was built from a graphdef without weights")
        elif isinstance(params, nnx.Module):
            params = nnx.state(params)
        tok, n = self.tokenizer, cfg.max_new_tokens
        rows = list(rows)
        r_all = len(rows) * g
        envs, fmts, prompts = [], [], []
        for r in range(r_all):
            try:
                env = env_factory()
            except Exception as e:
                raise EnvironmentRunError(f"environment {getattr(env_factory, '__name__', env_factory)!r} could not "
                                          f"be created for rollout {r}: {type(e).__name__}: {e}") from e
            obs = self._env_call(env, "reset", r, 0, rows[r // g])
            tools = [t if isinstance(t, Tool) else Tool(t) for t in getattr(env, "tools", ()) or ()]
            fmt = ChatFormat(tok, tools)
            ids = fmt.prompt_ids(obs)
            if not ids:
                raise ValueError(f"environment {type(env).__name__}.reset gave an empty prompt for row {r // g}")
            if r % g and ids != prompts[r - r % g]:
                raise ValueError(f"environment {type(env).__name__}.reset gave different prompts for the samples of "
                                 f"row {r // g}; reset(row) must depend on the row only")
            envs.append(env), fmts.append(fmt), prompts.append(ids)
        mult = cfg.prompt_multiple or 16
        longest = max(len(p) for p in prompts)
        p_ids, p_mask = left_pad(prompts[::g], cfg.pad_token_id, -(-longest // mult) * mult)
        cache, plen, pos, out = self._first(cfg)(params, jnp.asarray(p_ids), jnp.asarray(p_mask), key)

        rewards = np.full((r_all, self.max_turns), np.nan, np.float32)
        turn_ends = np.full((r_all, self.max_turns), -1, np.int32)
        running = np.ones(r_all, bool)
        env_done = np.zeros(r_all, bool)
        truncated = np.zeros(r_all, bool)
        start = np.zeros(r_all, np.int64)
        obs_tokens = 0
        for turn in range(self.max_turns):
            ids_h, pos_h = np.asarray(out[0]), np.asarray(pos)
            feeds: Dict[int, List[int]] = {}
            for r in np.flatnonzero(running):
                turn_ids = ids_h[r, start[r]:pos_h[r]].tolist()
                turn_ends[r, turn] = pos_h[r] - 1
                last = turn_ids[-1]
                stopped = last in cfg.stop_token_ids
                text = tok.decode([t for t in turn_ids if t not in self.eos_ids], skip_special_tokens=False)
                res = _step_result(self._env_call(envs[r], "step", r, turn + 1, text), type(envs[r]).__name__)
                if res.reward is not None:
                    rewards[r, turn] = float(res.reward)
                if res.done:
                    env_done[r] = True
                    running[r] = False
                    continue
                obs = None
                if stopped and turn + 1 < self.max_turns:
                    obs = fmts[r].observation_ids(res.observation, last in self.eos_ids)
                if obs and pos_h[r] + len(obs) + 1 <= n:  # room for the observation and one more token
                    feeds[int(r)] = obs
                    continue
                # not stopped: the block is full inside the turn; obs too long: no room for it
                truncated[r] = not stopped or bool(obs)
                running[r] = False
                if np.isnan(rewards[r, turn]):
                    end = self._env_call(envs[r], "end_reward", r, turn + 1)
                    if end is not None:
                        rewards[r, turn] = float(end)
            if not feeds:
                break
            t = -(-max(len(f) for f in feeds.values()) // self.observation_multiple) * self.observation_multiple
            feed = np.full((r_all, t), cfg.pad_token_id, np.int32)
            feed_len = np.zeros(r_all, np.int32)
            active = np.zeros(r_all, bool)
            for r, f in feeds.items():
                feed[r, :len(f)], feed_len[r], active[r] = f, len(f), True
                start[r] = pos_h[r] + len(f)
                obs_tokens += len(f)
            cache, pos, out = self._next(cfg)(params, cache, plen, key, jnp.asarray(feed), jnp.asarray(feed_len),
                                              jnp.asarray(active), pos, out)
        ids_h, lps_h, pol_h, pos_h = (np.asarray(x) for x in (*out, pos))
        c_mask = np.arange(n)[None, :] < pos_h[:, None]
        loss_mask = pol_h & c_mask
        counts = lambda a: np.asarray([int(getattr(e, a, 0) or 0) for e in envs], np.int32)  # noqa: E731
        roll = MultiTurnRollout(
            prompt_ids=np.repeat(p_ids, g, axis=0), prompt_mask=np.repeat(p_mask, g, axis=0),
            completion_ids=np.where(c_mask, ids_h, cfg.pad_token_id).astype(np.int32), completion_mask=c_mask,
            logps=np.where(loss_mask, lps_h, 0.0).astype(np.float32), truncated=truncated,
            group_ids=np.arange(r_all, dtype=np.int32) // g, loss_mask=loss_mask, rewards=rewards,
            turn_ends=turn_ends, num_turns=(turn_ends >= 0).sum(1).astype(np.int32), env_done=env_done,
            tool_calls=counts("tool_calls"), tool_failures=counts("tool_failures"))
        self.last_metrics = {
            "turns": float(roll.num_turns.mean()),
            "tool_call_rate": float((roll.tool_calls > 0).mean()),
            "tool_calls": float(roll.tool_calls.mean()),
            "tool_failure_rate": float(roll.tool_failures.sum() / max(1, roll.tool_calls.sum())),
            "observation_tokens": float(obs_tokens / r_all),
            "policy_tokens": float(loss_mask.sum() / r_all),
        }
        env_metrics: Dict[str, List[float]] = {}
        for r, env in enumerate(envs):
            if callable(getattr(env, "metrics", None)):
                for k, v in self._env_call(env, "metrics", r, int(roll.num_turns[r])).items():
                    env_metrics.setdefault(k, []).append(float(v))
        self.last_metrics.update({f"env/{k}": float(np.mean(v)) for k, v in env_metrics.items()})
        return roll
