"""Multi-turn, tool-using generation for the RL loops (``--environment pkg.module:Env`` or ``--tools
pkg.module:fn,...`` with ``--max_turns``): one place for what the GRPO loop's ``produce`` needs instead of a
single-turn ``sampler.generate``.

- ``--environment``: a :class:`trlax.rollouts.Environment` class (or factory); one instance per rollout, reset
  with its dataset row; the reward of a rollout is the sum of its per-turn rewards (one reward column,
  ``environment``).
- ``--tools``: a :class:`trlax.rollouts.ToolEnvironment` with those functions (their JSON schemas rendered into
  the prompt by the chat template); the final turn's text (after the last tool response) is scored by the run's
  ``reward_funcs``.

The batch gets the interleaved completion block: ``mask`` is the policy-token loss mask (gaps at the
observations), ``attention_mask`` the full context mask the training forward pass attends with.

With ``model=tiny`` the policy's tokenizer is :func:`trlax.rollouts.tool_tokenizer` (ChatML + Hermes tool
calls), so ``trlax train grpo --environment trlax.rollouts.environments:CalculatorEnv`` is the built-in
toy multi-turn run.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def uses_environment(cfg) -> bool:
    """Whether the run config asks for multi-turn rollouts (``environment`` or ``tools`` set)."""
    return bool(getattr(cfg, "environment", "") or getattr(cfg, "tools", ""))


def check_fields(cfg) -> None:
    """Validate ``environment`` / ``tools`` / ``max_turns`` before any compute (errors name the field)."""
    from trlax.objectives._checks import check_range
    from trlax.rollouts.environments import environment_factory

    check_range("max_turns", getattr(cfg, "max_turns", 1), low=1)
    if uses_environment(cfg):
        environment_factory(getattr(cfg, "environment", ""), getattr(cfg, "tools", ""))


def _final_turns(roll) -> List[List[int]]:
    """The token ids of each rollout's last policy turn (the trailing run of loss-mask tokens)."""
    ids, cm, lm = (np.asarray(x) for x in (roll.completion_ids, roll.completion_mask, roll.loss_mask))
    out = []
    for b in range(ids.shape[0]):
        end = int(cm[b].sum())
        start = end
        while start > 0 and lm[b, start - 1]:
            start -= 1
        out.append(ids[b, start:end].tolist())
    return out


class AgentRollouts:
    """The multi-turn generator of a GRPO-family run: ``rollout(sampler_params, rows, key) -> (rollout, R,
    metrics)`` with ``R`` ``[B, len(reward_names)]`` rewards (NaN = unscorable)."""

    def __init__(self, cfg, graphdef, tokenizer, reward_fn, reward_names: Sequence[str], num_generations: int):
        from trlax.rollouts import MultiTurnSampler, SamplingConfig
        from trlax.rollouts.environments import environment_factory

        self.cfg, self.tok, self.G = cfg, tokenizer, num_generations
        self.env_mode = bool(getattr(cfg, "environment", ""))
        self.factory = environment_factory(getattr(cfg, "environment", ""), getattr(cfg, "tools", ""))
        self.reward_fn = reward_fn
        self.reward_names: Tuple[str, ...] = ("environment",) if self.env_mode else tuple(reward_names)
        self.sampler = MultiTurnSampler(graphdef, SamplingConfig(
            max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            min_p=cfg.min_p, stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
            num_generations=num_generations, prompt_multiple=cfg.max_prompt_length), tokenizer,
            max_turns=cfg.max_turns)

    def rollout(self, params, rows: Sequence[Dict[str, Any]], key) -> Tuple[Any, np.ndarray, Dict[str, float]]:
        roll = self.sampler.rollout(params, rows, self.factory, key)
        if self.env_mode:
            R = roll.total_rewards[:, None].astype(np.float64)
        else:
            final = _final_turns(roll)
            texts = self.tok.batch_decode(final, skip_special_tokens=True)
            group_rows = [rows[i // self.G] for i in range(len(final))]
            R = self.reward_fn(texts, final, [str(r.get("prompt", "")) for r in group_rows], group_rows,
                               np.asarray(roll.truncated))
        metrics = {k if k.startswith("env/") else f"agent/{k}": v for k, v in self.sampler.last_metrics.items()}
        return roll, np.asarray(R, np.float64), metrics


__all__ = ["AgentRollouts", "check_fields", "uses_environment"]
