"""RL trainers beyond GRPO: ``trlax train rloo | ppo | a2po | gmpo``.

All four sample from the policy with the run's :class:`trlax.rollouts.JaxSampler`, score completions with
:func:`trlax.train.loops.reward_functions` (``builtin`` = the addition task's verifier) and train through
:meth:`trlax.train.loops._Run.train_step`; the layout is the loops' (left-padded prompts ``[B, P]`` +
right-padded completions ``[B, C]``).

- ``rloo``: RLOO (Ahmadian et al. 2024, arXiv 2402.14740, eq. 6) as TRL's ``RLOOTrainer``:
  ``num_generations`` completions per prompt, KL to the reference folded into the *reward*
  (``r ← r − β·Σ_t (log π_old − log π_ref)``, TRL's k1 sum), leave-one-out baseline
  (:func:`trlax.objectives.rloo_advantages`), optional REINFORCE++ batch whitening
  (``normalize_advantages``, arXiv 2501.03262, eq. 8; :func:`trlax.objectives.masked_whiten`), PPO-clipped
  loss through :func:`trlax.objectives.policy_loss`. TRL clips the *sequence* ratio
  ``exp(Σ_t ℓ − Σ_t ℓ_old)``; trlax clips token ratios and sums over the completion (``loss_agg_mode
  ="luspo"``, i.e. ``Σ_t`` per sequence, mean over sequences): the gradient is TRL's on a fresh rollout
  (ratio 1); only the clipping of off-policy steps (``num_iterations > 1``) differs.
- ``ppo``: PPO with a value model (Schulman et al. 2017, arXiv 1707.06347; TRL's PPOTrainer):
  sequence score on the last token minus KL-in-reward (Ziegler et al. 2019, arXiv 1909.08593) with a
  fixed or adaptive coefficient, GAE (arXiv 1506.02438), whitened advantages, clipped policy and value
  losses, ``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches over each rollout. The value
  model is a separate copy of the policy decoder (TRL: a separate value model) with a per-token scalar
  head (``nnx.Linear`` on ``Decoder.hidden_states``); trainable tree ``{"policy", "value"}``.
- ``a2po``: A*-PO (Brantley et al. 2025, arXiv 2505.20686, alg. 1): stage 1 estimates
  ``V*(x)`` (eq. 4) from ``num_value_samples`` completions of the *reference* per prompt (lazily per
  batch, cached, kept in the checkpoint); stage 2 samples one completion per prompt from the policy and
  regresses ``β₂·log π/π_ref`` onto ``r − V*`` (eq. 6).
- ``gmpo``: GMPO (arXiv 2507.20673): the GRPO loop with the ``gmpo`` ``PolicyLossConfig`` preset as defaults.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives._checks import check_choice, check_range
from trlax.train import data as D
from trlax.train import loops as L
from trlax.train.checkpoint import key_from_meta, key_to_meta
from trlax.train.config import GRPO_DEFAULTS, make_run_config

# ------------------------------------------------------------------------------------ shared pieces

# completions per held-out prompt in the evaluation of the trainers that sample one per prompt in training
# (ppo, a2po): accuracy is their mean, pass@EVAL_GENERATIONS whether one of them is right
EVAL_GENERATIONS = 4

_SAMPLING_FIELDS = [
    ("temperature", float, 1.0), ("top_p", float, 1.0), ("top_k", int, 0), ("min_p", float, 0.0),
    # comma-separated reward functions (see trlax.train.loops.reward_functions) and optional weights
    ("reward_funcs", str, "builtin"), ("reward_weights", str, ""),
    ("reward_model", str, ""),  # reward_funcs=reward_model: a local sequence-classification checkpoint
]


def _validate_sampling(self) -> None:
    L.check_reward_fields(self)


class _Rollouts:
    """Prompts (tokenised once), the sampler and the reward functions of a run."""

    def __init__(self, run, cfg, rows):
        from trlax.rollouts import JaxSampler, SamplingConfig

        self.run, self.cfg, self.rows, tok = run, cfg, rows, run.tokenizer
        self.P_ids, self.P_mask = D.encode_left_padded(tok, [D.as_text(tok, r["prompt"]) for r in rows],
                                                       cfg.max_prompt_length)
        empty = np.flatnonzero(self.P_mask.sum(1) == 0)
        if empty.size:
            raise ValueError(f"dataset={cfg.dataset!r}: prompt(s) {empty[:5].tolist()} tokenise to nothing")
        self.sampler = JaxSampler(run.policy.sampler_graphdef, SamplingConfig(
            max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_k=cfg.top_k,
            top_p=cfg.top_p, min_p=cfg.min_p, stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
            prompt_multiple=cfg.max_prompt_length), mesh=run.mesh)
        self.reward_fn, self.reward_names = L.reward_functions(cfg, tok)
        w = [float(x) for x in cfg.reward_weights.split(",")] if cfg.reward_weights else None
        self.weights = np.ones(len(self.reward_names)) if w is None else np.asarray(w)
        self.agent = None
        from trlax.train.agentic import AgentRollouts, uses_environment

        if uses_environment(cfg):  # --environment / --tools (rloo): multi-turn rollouts, trlax.train.agentic
            self.agent = AgentRollouts(cfg, run.policy.sampler_graphdef, tok, self.reward_fn, self.reward_names,
                                       cfg.num_generations)
            if self.agent.env_mode:
                self.reward_names, self.weights = self.agent.reward_names, np.ones(1)

    def sample(self, policy_params, idx, key, G: int) -> Dict[str, Any]:
        """``G`` completions per prompt ``idx`` (rows ``b // G``) sampled with ``policy_params`` (policy tree,
        not the trainable tree); adds ``reward`` ``[N]`` (weighted sum, NaN when unscorable) and ``R``. Multi-turn
        (``agent``): ``completion_mask`` is the context mask, ``loss_mask`` the policy tokens."""
        if self.agent is not None:
            roll, R, am = self.agent.rollout(self.run.policy.sampler_params(policy_params),
                                             [self.rows[i] for i in idx], key)
            reward = np.where(np.isnan(R).all(1), np.nan, np.nansum(R * self.weights, axis=1))
            return {"prompt_ids": roll.prompt_ids, "prompt_mask": roll.prompt_mask,
                    "completion_ids": roll.completion_ids, "completion_mask": roll.completion_mask,
                    "loss_mask": roll.loss_mask, "truncated": roll.truncated, "R": R, "reward": reward,
                    "agent_metrics": am}
        roll = self.sampler.generate(self.run.policy.sampler_params(policy_params),
                                     (self.P_ids[idx], self.P_mask[idx]), key, num_generations=G)
        c_ids, c_mask, trunc = L._host(roll.completion_ids), L._host(roll.completion_mask), L._host(roll.truncated)
        comp = [c_ids[b][c_mask[b]].tolist() for b in range(c_ids.shape[0])]
        texts = self.run.tokenizer.batch_decode(comp, skip_special_tokens=True)
        grows = [self.rows[i] for i in np.repeat(idx, G)]
        R = self.reward_fn(texts, comp, [str(r["prompt"]) for r in grows], grows, trunc)
        reward = np.where(np.isnan(R).all(1), np.nan, np.nansum(R * self.weights, axis=1))
        return {"prompt_ids": L._host(roll.prompt_ids), "prompt_mask": L._host(roll.prompt_mask),
                "completion_ids": c_ids, "completion_mask": c_mask, "truncated": trunc, "R": R, "reward": reward}

    def gen_metrics(self, s) -> Dict[str, float]:
        out = {"reward": float(np.nanmean(s["reward"])), "reward_std": float(np.nanstd(s["reward"])),
               "completion_length": float(np.mean(s["completion_mask"].sum(1))),
               "truncated_frac": float(np.mean(s["truncated"]))}
        from trlax.rollouts.rewards import reward_metrics

        # per function: rewards/<name>/mean, /std (TRL) and rewards/<name>; NaN rewards: left out of the weighted
        # sum (TRL), counted
        out.update(reward_metrics(s["R"], self.reward_names))
        out.update(s.get("agent_metrics", {}))
        return out


def _logps_fn(run, temperature, reference=False):
    """Jitted ``(policy_params, p_ids, p_mask, c_ids, c_mask) -> logps``: the policy's (old log-probs) or,
    with ``reference=True``, the reference model's for ``run.frozen_params`` (``Policy.reference_logps``:
    with LoRA the base model, adapters off)."""
    fn = run.policy.reference_logps if reference else run.policy.completion_logps
    return jax.jit(lambda p, a, b, c, d: fn(p, a, b, c, d, temperature=temperature)[0])


def _rounds(run, cfg, rows, n_prompts, do_round, extra_meta=lambda: {}, evaluate=None):
    """The outer loop: each round draws ``n_prompts`` prompt indices and a PRNG key, and
    ``do_round(idx, key, step) -> step`` runs (and logs) its optimiser steps; the data position, key and
    ``extra_meta()`` are checkpointed after every round (so ``--resume`` is exact). ``evaluate(step)`` (held-out
    evaluation, :meth:`_Evaluation.__call__`) runs before the first step and when due (``eval_steps``, last step)."""
    data = D.EpochSampler(len(rows), n_prompts, cfg.seed, **run.meta.get("data", {}))
    key = jax.random.PRNGKey(cfg.seed) if "key" not in run.meta else jnp.asarray(key_from_meta(run.meta["key"]))
    step = run.start_step
    if evaluate is not None and step == 0:
        evaluate(0)
    while step < cfg.max_steps:
        key, round_key = jax.random.split(key)
        prev = step
        step = do_round(data.next(), round_key, step)
        if evaluate is not None and run.due_eval(step, prev):
            evaluate(step)
        run.maybe_checkpoint(step, {"data": data.state(), "key": key_to_meta(key), **extra_meta()}, prev_step=prev)


class _Evaluation:
    """Held-out evaluation of an RL trainer (``--eval_dataset`` / ``--eval_split``, ``--eval_steps``), the code
    path of ``trlax train grpo`` (:func:`trlax.train.loops.sample_eval`): ``k`` completions of every held-out
    prompt sampled with the rollouts' sampler, in batches of ``n_prompts`` prompts (the training round's
    when ``k`` is its group size: no new sampling program); mean reward, each reward function, accuracy and
    pass@k. ``policy_params(state_params)``: the policy's tree of the trainable tree (PPO: ``["policy"]``)."""

    def __init__(self, run, ro, eval_rows, algo, k, n_prompts, policy_params=lambda p: p):
        self.run, self.ro, self.k, self.n_prompts, self.policy_params = run, ro, k, max(1, n_prompts), policy_params
        self.rows = L.sample_eval_rows(eval_rows, run, algo, single_turn=ro.agent is None)

    def __call__(self, step):
        ro = self.ro
        L.sample_eval(self.run, ro.sampler, ro.reward_fn, ro.reward_names, ro.weights, self.rows, step, k=self.k,
                      n_prompts=self.n_prompts, params=self.policy_params(self.run.state.params))

    def summary(self, out):
        """Adds the ``eval_*_first`` / ``_last`` fields to ``out``; returns the final line's addition."""
        return L.sample_eval_summary(self.run, out, self.rows, self.k,
                                     L.accuracy_column(self.ro.reward_names) is not None)


def _evaluation(run, cfg, ro, eval_rows, algo, k, n_prompts, policy_params=lambda p: p):
    return None if eval_rows is None else _Evaluation(run, ro, eval_rows, algo, k, n_prompts, policy_params)


def _summary(run, algo, cfg, evaluation=None, **extra):
    first, last = L.first_last([r["reward"] for r in run.logger.history])
    out = {"algorithm": algo, "steps": cfg.max_steps, "reward_first_10pct": first, "reward_last_10pct": last, **extra}
    line = f"mean reward: first 10% of steps {first:.3f} -> last 10% of steps {last:.3f}"
    if evaluation is not None:
        line += evaluation.summary(out)
    print(line)
    return run.finish(out)


# --------------------------------------------------------------------------------------------- RLOO


def _rloo_cls():
    from trlax.objectives.aggregation import AGGREGATION_MODES

    def validate(self):
        _validate_sampling(self)
        check_range("num_generations", self.num_generations, low=2)
        if self.batch_size % self.num_generations:
            raise ValueError(f"num_generations={self.num_generations} must divide batch_size={self.batch_size}")
        check_range("beta", self.beta, low=0.0)
        check_range("epsilon", self.epsilon, low=0.0)
        check_range("epsilon_high", self.epsilon_high, low=0.0, allow_none=True)
        check_choice("loss_agg_mode", self.loss_agg_mode, AGGREGATION_MODES)
        check_range("num_iterations", self.num_iterations, low=1)
        check_range("steps_per_generation", self.steps_per_generation, low=1)
        from trlax.train.agentic import check_fields

        check_fields(self)

    fields = [("preset", str, ""), ("num_generations", int, 4), *_SAMPLING_FIELDS,
              ("beta", float, 0.05),  # KL coefficient, in the reward (TRL RLOOConfig.beta)
              ("normalize_advantages", bool, False),  # REINFORCE++ batch whitening
              ("epsilon", float, 0.2), ("epsilon_high", "Optional[float]", None),
              ("loss_agg_mode", str, "luspo"),  # Σ_t per sequence, mean over sequences (see module doc)
              ("mask_truncated_completions", bool, False),
              ("num_iterations", int, 1), ("steps_per_generation", int, 1),
              # multi-turn, tool-using rollouts (trlax.train.agentic; as `trlax train grpo`)
              ("environment", str, ""), ("tools", str, ""), ("max_turns", int, 4)]
    return make_run_config("rloo", fields, defaults=GRPO_DEFAULTS, validate=validate,
                           doc="trlax train rloo: RLOO / REINFORCE++ (arXiv 2402.14740, 2501.03262).")


def rloo_loss_config(cfg):
    """The :class:`PolicyLossConfig` of an RLOO run: PPO clip, no KL in the loss (it is in the reward)."""
    from trlax.objectives.policy import PolicyLossConfig

    return PolicyLossConfig(loss_type="grpo", loss_agg_mode=cfg.loss_agg_mode, epsilon=cfg.epsilon,
                            epsilon_high=cfg.epsilon_high, beta=0.0,
                            mask_truncated_completions=cfg.mask_truncated_completions)


def rloo_advantages_from_rewards(reward, old_logps, ref_logps, mask, beta, G, normalize):
    """RLOO advantages of ``[N]`` rewards (``G`` per prompt, NaN = unscorable) with TRL's KL-in-reward
    ``r − β·Σ_t k1_t`` (:func:`trlax.objectives.kl_in_reward`) and optional REINFORCE++ whitening.
    Returns ``(advantages [N], kl [N])`` as NumPy."""
    from trlax.objectives import kl_in_reward, masked_whiten, rloo_advantages

    r = jnp.asarray(reward)
    kl = jnp.zeros_like(r)
    if beta > 0:
        tok, _ = kl_in_reward(jnp.zeros(mask.shape), old_logps, ref_logps, mask, beta, kind="k1")
        kl = -jnp.sum(tok, axis=1) / beta
        r = r - beta * kl
    adv = rloo_advantages(r, G)
    if normalize:
        adv = masked_whiten(adv, ~jnp.isnan(r))
    return np.asarray(adv), np.asarray(kl)


def run_rloo(cfg, rows=None, algo: str = "rloo") -> Dict[str, Any]:
    """RLOO (arXiv 2402.14740) with TRL's schedule (see the module docstring and :func:`trlax.train.loops.run_grpo`:
    ``steps_per_generation × batch_size`` completions per round, consumed ``num_iterations`` times)."""
    from trlax.objectives import policy_loss

    lcfg = rloo_loss_config(cfg)
    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)
    G, spg, n_iter = cfg.num_generations, cfg.steps_per_generation, cfg.num_iterations
    off_policy = spg > 1 or n_iter > 1

    def loss_builder(run):
        def loss_fn(params, b, totals):
            # multi-turn: attend over policy + observation tokens, the loss over the policy's (b["mask"])
            logps, ent = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                     b.get("attention_mask", b["mask"]), temperature=cfg.temperature)
            return policy_loss(logps, b.get("old_logps"), b["advantages"], b["mask"], lcfg, entropies=ent,
                               num_items=totals["num_items"], num_sequences=totals["num_sequences"],
                               truncated=b["truncated"])
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    ro = _Rollouts(run, cfg, rows)
    logps, ref_logps = _logps_fn(run, cfg.temperature), _logps_fn(run, cfg.temperature, reference=True)

    def do_round(idx, key, step):
        s = ro.sample(run.state.params, idx, key, G)
        p_ids, p_mask, c_ids, c_mask = s["prompt_ids"], s["prompt_mask"], s["completion_ids"], s["completion_mask"]
        old = ref = None
        if off_policy or cfg.beta > 0:
            old = L._host(logps(run.state.params, p_ids, p_mask, c_ids, c_mask))
        if cfg.beta > 0:
            ref = L._host(ref_logps(run.frozen_params, p_ids, p_mask, c_ids, c_mask))
        pol = s.get("loss_mask", c_mask)  # multi-turn: the policy's tokens (KL and loss skip observations)
        adv, kl = rloo_advantages_from_rewards(s["reward"], old, ref, pol, cfg.beta, G, cfg.normalize_advantages)
        mask = pol & ~s["truncated"][:, None] if cfg.mask_truncated_completions else pol
        buf = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "mask": mask,
               "advantages": adv, "truncated": s["truncated"]}
        if "loss_mask" in s:
            buf["attention_mask"] = c_mask
        if off_policy:
            buf["old_logps"] = old
        gm = ro.gen_metrics(s)
        gm["kl"] = float(np.mean(kl))
        for _ in range(n_iter):
            for j in range(spg):
                if step >= cfg.max_steps:
                    return step
                sl = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
                m = run.train_step({k: v[sl] for k, v in buf.items()})
                step += 1
                run.logger.log(step, {**m, **gm}, tokens=int(c_mask[sl].sum()))
        return step

    n_prompts = cfg.batch_size * spg // G
    ev = _evaluation(run, cfg, ro, eval_rows, algo, G, n_prompts)  # G per prompt: the training round's program
    _rounds(run, cfg, rows, n_prompts, do_round, evaluate=ev)
    return _summary(run, algo, cfg, ev, normalize_advantages=cfg.normalize_advantages)


# ---------------------------------------------------------------------------------------------- PPO


def _ppo_cls():
    from trlax.objectives.kl import KL_ESTIMATORS

    def validate(self):
        _validate_sampling(self)
        check_range("num_ppo_epochs", self.num_ppo_epochs, low=1)
        check_range("num_mini_batches", self.num_mini_batches, low=1)
        check_range("cliprange", self.cliprange, low=0.0, low_inclusive=False)
        check_range("cliprange_value", self.cliprange_value, low=0.0, low_inclusive=False)
        check_range("vf_coef", self.vf_coef, low=0.0)
        check_range("gamma", self.gamma, low=0.0, high=1.0)
        check_range("lam", self.lam, low=0.0, high=1.0)
        check_range("kl_coef", self.kl_coef, low=0.0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("kl_ctl", self.kl_ctl, ("fixed", "adaptive"))
        check_range("target_kl", self.target_kl, low=0.0, low_inclusive=False)
        check_range("kl_horizon", self.kl_horizon, low=0.0, low_inclusive=False)

    fields = [("preset", str, ""), *_SAMPLING_FIELDS,
              ("num_ppo_epochs", int, 4), ("num_mini_batches", int, 1),  # rollout = batch_size x num_mini_batches
              ("cliprange", float, 0.2), ("cliprange_value", float, 0.2), ("vf_coef", float, 0.1),
              ("gamma", float, 1.0), ("lam", float, 0.95), ("whiten_advantages", bool, True),
              ("kl_coef", float, 0.05), ("kl_estimator", str, "k1"),
              ("kl_ctl", str, "fixed"), ("target_kl", float, 6.0), ("kl_horizon", float, 10000.0)]
    return make_run_config("ppo", fields, defaults=dict(GRPO_DEFAULTS, batch_size=32, max_steps=120),
                           validate=validate, doc="trlax train ppo: PPO with a value model (arXiv 1707.06347).")


class ValueModel:
    """Per-token values ``V(s_t)`` (``[B, C]``) of the completion block: a scalar ``nnx.Linear`` head on the
    final hidden states of a decoder (the state that predicts token ``t``, as :func:`completion_logps`).

    The trunk is a full copy of the initial policy decoder (with LoRA: the merged plain decoder,
    ``Policy.sampler_graphdef`` / ``sampler_params``), trained in full; params ``{"trunk", "head"}``."""

    def __init__(self, policy, seed: int):
        from flax import nnx

        head = nnx.Linear(policy.config.hidden_size, 1, kernel_init=nnx.initializers.normal(0.02),
                          rngs=nnx.Rngs(seed + 1))
        self.head_graphdef, head_params = nnx.split(head)
        self.trunk_graphdef = policy.sampler_graphdef
        self.init_params = {"trunk": L._copy(policy.sampler_params(policy.params)), "head": head_params}

    def __call__(self, params, prompt_ids, prompt_mask, completion_ids, completion_mask):
        from flax import nnx

        P, C = prompt_ids.shape[1], completion_ids.shape[1]
        trunk = nnx.merge(self.trunk_graphdef, params["trunk"])
        h = trunk.hidden_states(jnp.concatenate([prompt_ids, completion_ids], 1),
                                attention_mask=jnp.concatenate([prompt_mask, completion_mask], 1).astype(bool))
        v = nnx.merge(self.head_graphdef, params["head"])(h[:, P - 1:P + C - 1].astype(jnp.float32))[..., 0]
        return jnp.where(completion_mask, v, 0.0)


def ppo_loss_config(cfg):
    """PPO's policy loss: token-level clip ``cliprange``, global token mean (TRL ``masked_mean``), no KL
    term (the KL is in the reward)."""
    from trlax.objectives.policy import PolicyLossConfig

    return PolicyLossConfig(loss_type="dapo", epsilon=cfg.cliprange, beta=0.0)


def ppo_loss(logps, values, b, lcfg, cliprange_value, vf_coef, num_items, entropies=None):
    """``pg + vf_coef·vf`` (arXiv 1707.06347, eq. 9 without the entropy bonus, as TRL): clipped policy loss
    (:func:`policy_loss`) and clipped value loss (:func:`clipped_value_loss`), both token means."""
    from trlax.objectives import aggregate, clipped_value_loss, mean_metric, policy_loss

    pg, m = policy_loss(logps, b["old_logps"], b["advantages"], b["mask"], lcfg, entropies=entropies,
                        num_items=num_items)
    vf_tok, clipped = clipped_value_loss(values, b["old_values"], b["returns"], b["mask"], cliprange_value)
    vf = aggregate(vf_tok, b["mask"], "token_mean", num_items=num_items)
    m["value_loss"] = jax.lax.stop_gradient(vf)
    m["value_clipfrac"] = mean_metric(clipped.astype(jnp.float32), b["mask"])
    m["value_mean"] = mean_metric(jax.lax.stop_gradient(values), b["mask"])
    return pg + vf_coef * vf, m


def ppo_token_rewards(scores, logps, ref_logps, mask, kl_coef, kind="k1"):
    """Per-token rewards: ``score`` on the last valid token, minus ``kl_coef·KL_t`` on every token
    (:func:`trlax.objectives.kl_in_reward`). Returns ``(rewards [B, C], mean KL)``."""
    from trlax.objectives import kl_in_reward

    mask = jnp.asarray(mask)
    last = jnp.maximum(jnp.sum(mask, 1) - 1, 0)
    tok = jnp.where(jnp.arange(mask.shape[1])[None] == last[:, None], jnp.asarray(scores)[:, None], 0.0)
    return kl_in_reward(tok, logps, ref_logps, mask, kl_coef, kind=kind)


def run_ppo(cfg, rows=None, algo: str = "ppo") -> Dict[str, Any]:
    """PPO (arXiv 1707.06347) with TRL's PPOTrainer recipe (module docstring). Each round samples one
    completion for each of ``batch_size × num_mini_batches`` prompts, then runs ``num_ppo_epochs`` shuffled
    passes of ``num_mini_batches`` optimiser steps over it. The KL coefficient (``kl_ctl=adaptive``: Ziegler
    et al.'s controller) is checkpointed with the data position."""
    from trlax.objectives import adaptive_kl_controller, fixed_kl_controller, gae_advantages

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)
    lcfg = ppo_loss_config(cfg)
    vm = {}

    def loss_builder(run):
        def loss_fn(params, b, totals):
            logps, ent = run.policy.completion_logps(params["policy"], b["prompt_ids"], b["prompt_mask"],
                                                     b["completion_ids"], b["mask"], temperature=cfg.temperature)
            values = vm["model"](params["value"], b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
            return ppo_loss(logps, values, b, lcfg, cfg.cliprange_value, cfg.vf_coef, totals["num_items"], ent)
        return loss_fn

    def params_fn(policy):
        vm["model"] = ValueModel(policy, cfg.seed)
        return {"policy": policy.params, "value": vm["model"].init_params}

    run = L._Run(algo, cfg, loss_builder, params_fn=params_fn)
    run.export_params = lambda p: p["policy"]
    ro = _Rollouts(run, cfg, rows)
    logps, ref_logps = _logps_fn(run, cfg.temperature), _logps_fn(run, cfg.temperature, reference=True)
    values = jax.jit(lambda p, a, b, c, d: vm["model"](p, a, b, c, d))
    ctl = adaptive_kl_controller if cfg.kl_ctl == "adaptive" else fixed_kl_controller
    kl_state = {"coef": float(run.meta.get("kl_coef", cfg.kl_coef))}
    n_rollout = cfg.batch_size * cfg.num_mini_batches

    def do_round(idx, key, step):
        pol = run.state.params["policy"]
        s = ro.sample(pol, idx, key, 1)
        p_ids, p_mask, c_ids, c_mask = s["prompt_ids"], s["prompt_mask"], s["completion_ids"], s["completion_mask"]
        old = L._host(logps(pol, p_ids, p_mask, c_ids, c_mask))
        ref = L._host(ref_logps(run.frozen_params["policy"], p_ids, p_mask, c_ids, c_mask))
        old_v = L._host(values(run.state.params["value"], p_ids, p_mask, c_ids, c_mask))
        coef = kl_state["coef"]
        tok_r, kl = ppo_token_rewards(np.nan_to_num(s["reward"]), old, ref, c_mask, coef, cfg.kl_estimator)
        adv, ret = gae_advantages(tok_r, old_v, c_mask, cfg.gamma, cfg.lam, whiten=cfg.whiten_advantages)
        buf = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "mask": c_mask,
               "old_logps": old, "old_values": old_v, "advantages": L._host(adv), "returns": L._host(ret)}
        kl_state["coef"] = float(ctl(coef, kl, n_rollout, target_kl=cfg.target_kl, horizon=cfg.kl_horizon)
                                 if cfg.kl_ctl == "adaptive" else ctl(coef))
        gm = {**ro.gen_metrics(s), "kl": float(kl), "kl_coef": coef}
        rng = np.random.default_rng([cfg.seed, step])
        for _ in range(cfg.num_ppo_epochs):
            perm = rng.permutation(n_rollout)
            for j in range(cfg.num_mini_batches):
                if step >= cfg.max_steps:
                    return step
                sl = perm[j * cfg.batch_size:(j + 1) * cfg.batch_size]
                m = run.train_step({k: v[sl] for k, v in buf.items()})
                step += 1
                run.logger.log(step, {**m, **gm}, tokens=int(c_mask[sl].sum()))
        return step

    # held-out: EVAL_GENERATIONS completions per prompt (PPO samples one per prompt in training), the rollout's rows
    k = EVAL_GENERATIONS
    ev = _evaluation(run, cfg, ro, eval_rows, algo, k, n_rollout // k, policy_params=lambda p: p["policy"])
    _rounds(run, cfg, rows, n_rollout, do_round, lambda: {"kl_coef": kl_state["coef"]}, evaluate=ev)
    return _summary(run, algo, cfg, ev, kl_coef_final=kl_state["coef"])


# --------------------------------------------------------------------------------------------- A*-PO


def _a2po_cls():
    def validate(self):
        _validate_sampling(self)
        check_range("beta1", self.beta1, low=0.0, low_inclusive=False)
        check_range("beta2", self.beta2, low=0.0, low_inclusive=False)
        check_range("num_value_samples", self.num_value_samples, low=1)

    fields = [("preset", str, ""), *_SAMPLING_FIELDS, ("beta1", float, 0.5), ("beta2", float, 1e-3),
              ("num_value_samples", int, 8)]
    return make_run_config("a2po", fields, defaults=dict(GRPO_DEFAULTS, batch_size=32, max_steps=100),
                           validate=validate, doc="trlax train a2po: A*-PO (arXiv 2505.20686).")


def run_a2po(cfg, rows=None, algo: str = "a2po") -> Dict[str, Any]:
    """A*-PO (arXiv 2505.20686): V* of each prompt from ``num_value_samples`` reference samples (eq. 4,
    computed the first time a batch meets the prompt, cached, checkpointed), then per step one policy
    sample per prompt and the regression loss of eq. 6 (log-probs at temperature 1, as TRL)."""
    from trlax.objectives import astar_po_loss, astar_po_values

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            logps, _ = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                   b["mask"])
            return astar_po_loss(logps, b["ref_logps"], b["rewards"], b["values"], mask=b["mask"], beta2=cfg.beta2,
                                 num_sequences=totals["num_sequences"])
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    ro = _Rollouts(run, cfg, rows)
    ref_logps = _logps_fn(run, 1.0, reference=True)
    cache = {int(k): float(v) for k, v in run.meta.get("values", {}).items()}
    N = cfg.num_value_samples

    def do_round(idx, key, step):
        ref_key, key = jax.random.split(key)
        if any(int(i) not in cache for i in idx):  # stage 1 for this batch's prompts (fixed shape)
            s = ro.sample(run.frozen_params, idx, ref_key, N)
            r = s["reward"].reshape(len(idx), N)
            v = np.asarray(astar_po_values(np.nan_to_num(r), cfg.beta1, mask=~np.isnan(r)))
            for i, vi in zip(idx, v):
                cache.setdefault(int(i), float(vi))
        s = ro.sample(run.state.params, idx, key, 1)
        p_ids, p_mask, c_ids, c_mask = s["prompt_ids"], s["prompt_mask"], s["completion_ids"], s["completion_mask"]
        batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "mask": c_mask,
                 "ref_logps": L._host(ref_logps(run.frozen_params, p_ids, p_mask, c_ids, c_mask)),
                 "rewards": np.nan_to_num(s["reward"]), "values": np.asarray([cache[int(i)] for i in idx])}
        m = run.train_step(batch)
        run.logger.log(step + 1, {**m, **ro.gen_metrics(s), "value_star": float(np.mean(batch["values"]))},
                       tokens=int(c_mask.sum()))
        return step + 1

    ev = _evaluation(run, cfg, ro, eval_rows, algo, EVAL_GENERATIONS, cfg.batch_size // EVAL_GENERATIONS)
    _rounds(run, cfg, rows, cfg.batch_size, do_round, lambda: {"values": {str(k): v for k, v in cache.items()}},
            evaluate=ev)
    return _summary(run, algo, cfg, ev, num_prompts_valued=len(cache))


# ---------------------------------------------------------------------------------------------- GMPO


def _gmpo_cls():
    """GRPO's run config with the ``gmpo`` ``PolicyLossConfig`` preset's values as field defaults."""
    from trlax.objectives.policy import PolicyLossConfig
    from trlax.train.config import _grpo_cls

    base = _grpo_cls()
    preset = PolicyLossConfig.gmpo()
    new = {f.name: getattr(preset, f.name) for f in dataclasses.fields(PolicyLossConfig)
           if getattr(preset, f.name) != getattr(PolicyLossConfig(), f.name)}
    # the GRPO loop's generic defaults, not `trlax train grpo`'s main-job recipe (config.GRPO_JOB)
    new.update(max_steps=GRPO_DEFAULTS["max_steps"], learning_rate=GRPO_DEFAULTS["learning_rate"],
               entropy_coef=preset.entropy_coef, eval_steps=0, eval_split=0.0)
    fields = [(k, next(f.type for f in dataclasses.fields(base) if f.name == k), dataclasses.field(default=v))
              for k, v in new.items()]
    cls = dataclasses.make_dataclass("GMPORunConfig", fields, bases=(base,))
    cls.__doc__ = "trlax train gmpo: GMPO (arXiv 2507.20673), the GRPO loop with the gmpo loss preset."
    return cls


# ------------------------------------------------------------------------------------------------ specs


def _specs():
    from trlax.objectives.policy import PolicyLossConfig
    from trlax.train.registry import TrainerSpec

    return [
        TrainerSpec("rloo", _rloo_cls, run_rloo, ("prompt",), D.addition_examples, metric="reward",
                    presets={"rloo": {"beta": 0.03, "num_generations": 2},
                             "reinforce_pp": {"normalize_advantages": True}},
                    description="RLOO / REINFORCE++: leave-one-out baseline, KL in the reward, PPO clip"),
        TrainerSpec("ppo", _ppo_cls, run_ppo, ("prompt",), D.addition_examples, metric="reward",
                    presets={"ppo": {"cliprange": 0.2, "num_ppo_epochs": 4, "gamma": 1.0, "lam": 0.95,
                                     "kl_coef": 0.05, "vf_coef": 0.1, "cliprange_value": 0.2}},
                    description="PPO with a value model: GAE, KL-in-reward (fixed / adaptive), clipped value loss"),
        TrainerSpec("a2po", _a2po_cls, run_a2po, ("prompt",), D.addition_examples, metric="reward",
                    presets={"astar_po": {"beta1": 0.5, "beta2": 1e-3, "num_value_samples": 8}},
                    description="A*-PO: V* from reference samples, then optimal-advantage regression"),
        TrainerSpec("gmpo", _gmpo_cls, functools.partial(L.run_grpo, algo="gmpo"), ("prompt",),
                    D.addition_examples, loss_config_cls=PolicyLossConfig, metric="reward",
                    description="GMPO: geometric-mean policy optimisation (GRPO loop, log-space clip 0.4)"),
    ]


SPECS = _specs()

__all__ = ["SPECS", "ValueModel", "ppo_loss", "ppo_token_rewards", "rloo_advantages_from_rewards", "run_a2po",
           "run_ppo", "run_rloo"]
