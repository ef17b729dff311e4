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


def environment_rows(cfg) -> Optional[List[Dict[str, Any]]]:
    """The environment's own built-in task when ``cfg.dataset == "builtin"`` and the environment class has a
    ``builtin_rows(n, seed)`` (the built-in :class:`~trlax.rollouts.CalculatorEnv`: addition problems); else None
    (the run loads its data set as usual)."""
    from trlax.rollouts.environments import load_object

    if getattr(cfg, "dataset", "") != "builtin" or not getattr(cfg, "environment", ""):
        return None
    fn = getattr(load_object(cfg.environment, "environment"), "builtin_rows", None)
    return None if fn is None else list(fn(1024, cfg.seed))


def demonstration_rows(factory, tokenizer, rows: Sequence[Dict[str, Any]], seed: int = 0,
                       per_turn: bool = False) -> List[Dict[str, str]]:
    """SFT rows ``{"prompt", "completion"}`` (text) of one demonstration episode per dataset row: each
    environment's :meth:`~trlax.rollouts.Environment.demonstration` turns played against a fresh environment, the
    prompt and observations rendered exactly as :class:`~trlax.rollouts.MultiTurnSampler` renders them (the
    completion is the interleaved block: turn, observation, turn ...). With ``per_turn`` an episode gives one row
    per policy turn instead: the prompt is the context before the turn (prompt, earlier turns and observations),
    the completion the turn alone, so an SFT loss over completions covers the policy's tokens only (the
    environment's observations are context, as in the sampler's loss mask). Raises naming the environment when it
    has no demonstrations."""
    import random

    from trlax.rollouts.environments import ChatFormat, Tool
    from trlax.rollouts.multiturn import _step_result

    rng = random.Random(seed)
    eos = tokenizer.eos_token or ""
    out = []
    for row in rows:
        env = factory()
        obs = env.reset(row)
        turns = env.demonstration(row, rng)
        if not turns:
            raise ValueError(f"sft_warmup_steps: environment {type(env).__name__} has no demonstrations (define "
                             "demonstration(row, rng)); pass --sft_warmup_steps 0")
        fmt = ChatFormat(tokenizer, [t if isinstance(t, Tool) else Tool(t) for t in getattr(env, "tools", ()) or ()])
        prompt = fmt.prompt_text(obs)
        completion = ""
        for i, turn in enumerate(turns):
            if per_turn:
                out.append({"prompt": prompt + completion, "completion": turn})
            completion += turn
            ended_with_eos = bool(eos) and turn.endswith(eos)
            res = _step_result(env.step(turn[: -len(eos)] if ended_with_eos else turn), type(env).__name__)
            if res.done or i + 1 == len(turns):
                break
            completion += fmt.observation_text(res.observation, ended_with_eos)
        if not per_turn:
            out.append({"prompt": prompt, "completion": completion})
    return out


def warm_start(cfg, rows: Sequence[Dict[str, Any]]) -> str:
    """R1-style cold start of a multi-turn run (``--sft_warmup_steps N`` with ``--environment``; DeepSeek-R1,
    arXiv 2501.12948, sec. 2.3.1): ``N`` steps of :func:`trlax.train.loops.run_sft` (learning rate at least
    :data:`WARM_START_LR`) on the environment's
    demonstration transcripts (:func:`demonstration_rows`; the built-in :class:`~trlax.rollouts.CalculatorEnv`'s
    teach the tool-call flow, not the task), in ``<output_dir>/warmup``. Returns its Hugging Face export, the
    model GRPO starts from. The SFT rows are one per policy turn (:data:`WARM_START_PER_TURN`), so the loss covers
    the policy's tokens only, as GRPO's loss mask does: the observations are context, not targets. With
    ``model=tiny`` the initial random model (with the tool tokenizer) is saved first, so that the SFT stage and
    GRPO use the same tokenizer; a resumed run reuses a finished warm start."""
    import os

    from trlax.rollouts.environments import environment_factory
    from trlax.train import loops, modeling
    from trlax.train.config import build_config

    out = os.path.join(cfg.output_dir, "warmup")
    final = os.path.join(out, "final")
    if cfg.resume and os.path.isfile(os.path.join(final, "config.json")):
        return final
    if os.path.isdir(out):  # a killed run's: start over
        import shutil

        shutil.rmtree(out)
    policy = modeling.build_policy(cfg)
    sft_rows = demonstration_rows(environment_factory(cfg.environment, cfg.tools), policy.tokenizer, rows, cfg.seed,
                                  per_turn=WARM_START_PER_TURN)
    model = cfg.model
    if model == "tiny":
        model = os.path.join(out, "init")
        policy.save(policy.params, model)
    mult = cfg.max_prompt_length
    longest = max(len(policy.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in sft_rows)
    values = {k: getattr(cfg, k) for k in _WARMUP_FIELDS}
    values.update(model=model, output_dir=out, max_steps=cfg.sft_warmup_steps, resume=False, export=True,
                  learning_rate=max(cfg.learning_rate, WARM_START_LR),
                  max_prompt_length=-(-longest // mult) * mult)  # the sampler's prompt width: same positions
    print(f"warm start: {cfg.sft_warmup_steps} SFT steps on {len(rows)} demonstrations of "
          f"{cfg.environment or 'the tools'} ({len(sft_rows)} rows) -> {final}", flush=True)
    loops.run_sft(build_config("sft", values), sft_rows)
    return final


# the warm start's SFT rows: one per policy turn (the loss on the policy's tokens only; observations are context)
WARM_START_PER_TURN = True

# the warm start's learning rate (at least; the run's if larger): SFT of a small model takes larger steps than RL
WARM_START_LR = 3e-3

# fields of a multi-turn GRPO run that its warm-start SFT stage takes over unchanged
_WARMUP_FIELDS = ("seed", "batch_size", "learning_rate", "weight_decay", "max_grad_norm", "max_completion_length",
                  "param_dtype", "compute_dtype", "attention_impl", "progress")


__all__ = ["AgentRollouts", "check_fields", "demonstration_rows", "environment_rows", "uses_environment", "warm_start"]
