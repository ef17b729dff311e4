"""Online preference trainers: ``trlax train online_dpo | xpo | nash_md``.

One loop (:func:`run_online`) serves the three; each optimiser step

1. samples two completions per prompt with the KV-cached rollout sampler (temperature 0.9 by default, as
   TRL): *online DPO* — both from the policy; *XPO* — one from the policy, one from the frozen reference;
   *Nash-MD* — one from the policy, one from the geometric mixture of policy and reference
   (:func:`trlax.objectives.nash_md_mixture_logits`, sampled token by token with full forwards, since the
   KV sampler runs a single model);
2. judges them: rewards (the built-in task's verifier / any GRPO reward function / a sequence-classification
   reward model, summed; minus ``missing_eos_penalty`` for a completion without EOS) or a pairwise judge
   (:class:`trlax.rollouts.RewardModelJudge`, ``P(a ≻ b) = σ(r_a − r_b)``);
3. orders them into chosen / rejected (:func:`trlax.objectives.order_by_reward`, ties to the first), or for
   Nash-MD turns them into ``P(y ≻ y')``;
4. takes one step on the objective, log-probs at temperature 1 (TRL), the reference's from the frozen
   initial policy (``run.frozen_params``), computed outside the step:

- online DPO (Guo et al. 2024, arXiv 2402.04792, alg. 1): :func:`trlax.objectives.online_dpo_loss`
  (``sigmoid`` / ``ipo``);
- XPO (Xie et al. 2024, arXiv 2405.21046, alg. 1 line 7): :func:`trlax.objectives.xpo_loss` — the DPO term
  plus ``α·log π_θ(ỹ)`` of the reference sample;
- Nash-MD (Munos et al. 2023, arXiv 2312.00886, eq. 11): :func:`trlax.objectives.nash_md_loss`.

Held-out evaluation (``--eval_dataset`` / ``--eval_split``, ``--eval_steps``) is GRPO's
(:func:`trlax.train.loops.sample_eval`): the policy's samples of the held-out prompts scored by the judge's rewards
(mean reward, each reward function, accuracy and pass@k with the builtin / accuracy judges; k = 2 for online
DPO, whose pair is the policy's, 1 for XPO and Nash-MD), logged with split "eval".

``beta_schedule`` / ``alpha_schedule`` are TRL's per-epoch lists (``β[epoch]``, the last value once the
list runs out; an epoch is a pass over the prompts); each distinct value compiles its own step.
The loss is the mean over pairs of the whole batch (micro-batches return their share of it).
"""

from __future__ import annotations

import os
import types
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from trlax.rollouts.rewards import reward_metrics
from trlax.train import data as D
from trlax.train import loops as L
from trlax.train.checkpoint import key_from_meta, key_to_meta
from trlax.train.config import make_run_config
from trlax.train.loops import _host, _Run, _texts, first_last, reward_functions
from trlax.train.registry import TrainerSpec
from trlax.train.step import make_train_step

ALGOS = ("online_dpo", "xpo", "nash_md")


# ------------------------------------------------------------------------------------------- config


def _parse_floats(name: str, text: str):
    try:
        vals = [float(v) for v in text.split(",")] if text else []
    except ValueError:
        raise ValueError(f"{name}={text!r} must be comma-separated numbers") from None
    return vals


def _judge_names(judge: str):
    return [n.strip() for n in judge.split(",")]


def _validate(algo: str):
    def validate(self) -> None:
        from trlax.objectives._checks import check_choice, check_range
        from trlax.train.loops import REWARD_FUNCS

        check_range("missing_eos_penalty", self.missing_eos_penalty, low=0.0)
        # Nash-MD allows beta = 0 (no KL term); the DPO losses need beta > 0
        nash = algo == "nash_md"
        check_range("beta", self.beta, low=0.0, low_inclusive=nash)
        for b in _parse_floats("beta_schedule", self.beta_schedule):
            check_range("beta_schedule", b, low=0.0, low_inclusive=nash)
        if algo != "nash_md":
            check_choice("loss_type", self.loss_type, ("sigmoid", "ipo"))
        if algo == "xpo":
            check_range("alpha", self.alpha, low=0.0)
            for a in _parse_floats("alpha_schedule", self.alpha_schedule):
                check_range("alpha_schedule", a, low=0.0)
        if algo == "nash_md":
            check_range("mixture_coef", self.mixture_coef, low=0.0, high=1.0)
        names = _judge_names(self.judge)
        if "pairwise" in names:
            if names != ["pairwise"]:
                raise ValueError(f"judge={self.judge!r}: 'pairwise' cannot be combined with reward functions")
        else:
            for n in names:
                check_choice("judge", n, REWARD_FUNCS + ("reward_model",))
        needs_rm = "pairwise" in names or "reward_model" in names
        if needs_rm and not self.reward_model:
            raise ValueError(f"judge={self.judge!r} needs reward_model=PATH (a sequence-classification checkpoint)")
        if self.reward_model and not needs_rm:
            raise ValueError(f"reward_model={self.reward_model!r} is set but judge={self.judge!r} does not use it; "
                             "add 'reward_model' to judge or use judge=pairwise")
        if "pairwise" in names and self.missing_eos_penalty:
            raise ValueError(f"missing_eos_penalty={self.missing_eos_penalty} applies to reward judges only, "
                             "not judge='pairwise'")
        if self.reward_model and not os.path.isfile(os.path.join(self.reward_model, "config.json")):
            raise ValueError(f"reward_model={self.reward_model!r} is not a checkpoint directory with config.json")

    return validate


def _config_cls(algo: str):
    def make():
        fields = [
            ("preset", str, ""),
            # the pair judge: "pairwise" (RewardModelJudge on reward_model) or comma-separated rewards,
            # summed: builtin (the built-in task's verifier), reward_model, or any GRPO reward function
            ("judge", str, "builtin"),
            ("reward_model", str, ""),  # local HF *ForSequenceClassification checkpoint
            ("missing_eos_penalty", float, 0.0),  # subtracted from the reward of a completion without EOS
            ("temperature", float, 0.9),  # sampling only; log-probs at T = 1 (TRL)
            ("top_p", float, 1.0),
            ("top_k", int, 0),
            ("beta", float, 0.1),
            ("beta_schedule", str, ""),  # comma-separated per-epoch beta (TRL's beta list); overrides beta
        ]
        if algo != "nash_md":
            fields.append(("loss_type", str, "sigmoid"))  # sigmoid | ipo
        if algo == "xpo":
            fields += [("alpha", float, 1e-5), ("alpha_schedule", str, "")]
        if algo == "nash_md":
            fields.append(("mixture_coef", float, 0.5))
        defaults = dict(batch_size=16, max_steps=200, learning_rate=1e-3, max_prompt_length=8,
                        max_completion_length=4)
        return make_run_config(algo, fields, defaults=defaults, validate=_validate(algo),
                               doc=f"trlax train {algo}: {DESCRIPTIONS[algo]}")

    return make


DESCRIPTIONS = {
    "online_dpo": "online DPO (arXiv 2402.04792): DPO / IPO on judged pairs of policy samples",
    "xpo": "XPO (arXiv 2405.21046): online DPO on a policy vs reference sample + α·log π(ỹ_ref) exploration",
    "nash_md": "Nash-MD (arXiv 2312.00886): policy gradient against a policy/reference geometric mixture",
}


# ------------------------------------------------------------------------------------------- judges


class _Judge:
    """The pair judge of ``cfg.judge``: :meth:`rewards` (per-completion rewards, summed, minus the missing-EOS
    penalty) and :meth:`prefer` (``P(a ≻ b)``: the pairwise reward-model judge, or σ of the reward gap)."""

    def __init__(self, cfg, tokenizer):
        self.names = _judge_names(cfg.judge)
        self.pairwise = self.names == ["pairwise"]
        self.penalty = cfg.missing_eos_penalty
        self.scorer = None
        if cfg.reward_model:
            from trlax.rollouts import RewardModelJudge
            from trlax.train.loops import reward_model_scorer

            self.scorer = reward_model_scorer(cfg.reward_model, tokenizer,
                                              cfg.max_prompt_length + cfg.max_completion_length)
            self.judge = RewardModelJudge(self.scorer) if self.pairwise else None
        funcs = [n for n in self.names if n not in ("reward_model", "pairwise")]
        self.fn, self.col_names = (reward_functions(types.SimpleNamespace(
            reward_funcs=",".join(funcs), max_completion_length=cfg.max_completion_length)) if funcs else (None, ()))
        if "reward_model" in self.names:
            self.col_names = tuple(self.col_names) + ("reward_model",)

    def rewards(self, texts, comp_ids, prompts, rows, truncated):
        """Reward judges: ``(total [N] with the missing-EOS penalty, columns [N, R])``. Pairwise judge: the
        reward model's scores (for logging) as both."""
        if self.pairwise:
            s = np.asarray(self.scorer(texts, prompts), np.float64)
            return s, s[:, None]
        cols = []
        if self.fn is not None:
            cols.append(self.fn(texts, comp_ids, prompts, rows, truncated))
        if "reward_model" in self.names:
            cols.append(np.asarray(self.scorer(texts, prompts), np.float64)[:, None])
        R = np.concatenate(cols, axis=1)
        total = np.nansum(R, axis=1) - self.penalty * np.asarray(truncated, np.float64)
        return total, R

    def prefer(self, prompts, texts_a, texts_b, total_a, total_b):
        """``[N]`` P(a ≻ b): the pairwise judge's, else Bradley-Terry ``σ(r_a − r_b)`` of the rewards."""
        if self.pairwise:
            return np.asarray(self.judge.batch(prompts, texts_a, texts_b), np.float64)
        return 0.5 * (1.0 + np.tanh(0.5 * (np.asarray(total_a) - np.asarray(total_b))))


# -------------------------------------------------------------------------------- mixture sampling


def make_mixture_sampler(graphdef, max_new_tokens: int, *, mixture_coef: float, temperature: float, top_k: int,
                         top_p: float, eos_id: int, pad_id: int):
    """Jitted ``(policy_params, ref_params, prompt_ids, prompt_mask, key) -> (ids [B, C], mask [B, C],
    truncated [B])``: token-by-token sampling from Nash-MD's geometric mixture (arXiv 2312.00886, eq. 9)
    ``softmax(κ·z_ref + (1 − κ)·z_θ)`` (:func:`trlax.objectives.nash_md_mixture_logits`), then temperature /
    top-k / top-p (:func:`trlax.rollouts.process_logits`), through
    :func:`trlax.rollouts.make_two_model_sampler`."""
    from trlax.objectives import nash_md_mixture_logits
    from trlax.rollouts import make_two_model_sampler, process_logits

    def mix(z, z_ref):
        logp = process_logits(nash_md_mixture_logits(z, z_ref, mixture_coef), temperature, top_k, top_p)
        return logp, logp

    gen = make_two_model_sampler(graphdef, graphdef, max_new_tokens, mix, eos_id=eos_id, pad_id=pad_id)
    return lambda *args: gen(*args)[:3]


# --------------------------------------------------------------------------------------------- loop


def _per_epoch(value: float, schedule: str, epoch: int) -> float:
    vals = _parse_floats("schedule", schedule)
    return (vals[min(epoch, len(vals) - 1)] if vals else value)


def _loss_builder(algo: str, cfg, beta: float, alpha: float):
    from trlax.objectives import nash_md_loss, online_dpo_loss, xpo_loss

    def builder(run):
        def logps_of(params, b, ids, mask):
            return run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], ids, mask)[0]

        def loss_fn(params, b, totals):
            share = b["prompt_ids"].shape[0] / totals["num_sequences"]  # micro-batch share of the batch mean
            if algo == "nash_md":
                lp = logps_of(params, b, b["completion_ids"], b["mask"])
                loss, m = nash_md_loss(lp, b["ref_logps"], b["mask"], b["preference"], beta=beta)
                return loss * share, m
            n = b["chosen_ids"].shape[0]
            both = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x], 0),
                                          {"prompt_ids": b["prompt_ids"], "prompt_mask": b["prompt_mask"]})
            lp = logps_of(params, both, jnp.concatenate([b["chosen_ids"], b["rejected_ids"]], 0),
                          jnp.concatenate([b["chosen_mask"], b["rejected_mask"]], 0))
            ch, rj = lp[:n], lp[n:]
            kw = dict(chosen_mask=b["chosen_mask"], rejected_mask=b["rejected_mask"], beta=beta,
                      loss_type=cfg.loss_type)
            if algo == "online_dpo":
                loss, m = online_dpo_loss(ch, rj, b["ref_chosen"], b["ref_rejected"], **kw)
            else:  # XPO: the reference sample ỹ is the rejected one where the policy sample won
                pol_won = b["chosen_is_policy"][:, None]
                loss, m = xpo_loss(ch, rj, b["ref_chosen"], b["ref_rejected"], jnp.where(pol_won, rj, ch),
                                   ref_sample_mask=jnp.where(pol_won, b["rejected_mask"], b["chosen_mask"]),
                                   alpha=alpha, **kw)
            return loss * share, m

        return loss_fn

    return builder


def run_online(cfg, rows=None, algo: str = "online_dpo") -> Dict[str, Any]:
    """Online DPO / XPO / Nash-MD (see the module docstring): sample a pair per prompt, judge, order, step."""
    from trlax.objectives import order_by_reward
    from trlax.rollouts import JaxSampler, SamplingConfig

    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}; allowed: {', '.join(ALGOS)}")
    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)
    alpha0 = getattr(cfg, "alpha", 0.0)
    alpha_sched = getattr(cfg, "alpha_schedule", "")
    coefs = (_per_epoch(cfg.beta, cfg.beta_schedule, 0), _per_epoch(alpha0, alpha_sched, 0))
    run = _Run(algo, cfg, _loss_builder(algo, cfg, *coefs))
    steps = {coefs: run.step_fn}
    tok = run.tokenizer
    judge = _Judge(cfg, tok)
    for name, rs in (("dataset", rows), ("eval_dataset", eval_rows or rows)):
        if "builtin" in judge.names and not any(k in rs[0] for k in ("answer", "solution")):
            raise ValueError(f"{name}={getattr(cfg, name)!r}: judge 'builtin' needs an 'answer' (or 'solution') "
                             "column")
    P_ids, P_mask = D.encode_left_padded(tok, _texts(tok, rows, "prompt"), cfg.max_prompt_length)
    empty = np.flatnonzero(P_mask.sum(1) == 0)
    if empty.size:
        raise ValueError(f"dataset={cfg.dataset!r}: prompt(s) {empty[:5].tolist()} tokenise to nothing")
    C = cfg.max_completion_length
    sampler = JaxSampler(run.policy.sampler_graphdef, SamplingConfig(
        max_new_tokens=C, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, num_generations=1,
        prompt_multiple=cfg.max_prompt_length), mesh=run.mesh)
    mixture = (make_mixture_sampler(run.policy.sampler_graphdef, C, mixture_coef=cfg.mixture_coef,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id) if algo == "nash_md" else None)

    @jax.jit
    def _ref_logps(frozen, p_ids, p_mask, c_ids, c_mask):  # the initial policy (LoRA: adapters off)
        return run.policy.reference_logps(frozen, p_ids, p_mask, c_ids, c_mask)[0]

    def ref_logps(*arrays):
        return _ref_logps(run.frozen_params, *arrays)

    def decode(ids, mask):
        comp = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
        return comp, tok.batch_decode(comp, skip_special_tokens=True)

    # held-out evaluation (--eval_dataset / --eval_split, --eval_steps): GRPO's code path (loops.sample_eval)
    # with the judge's rewards; k = the policy samples per prompt of a training step (online DPO: the pair, 2;
    # XPO / Nash-MD: 1, the other sample is the reference's / mixture's), batch_size prompts: the training
    # step's sampling program
    ev = _evaluation(run, cfg, judge, eval_rows, algo, sampler)
    if ev is not None and run.start_step == 0:
        ev(0)
    data = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    key = jax.random.PRNGKey(cfg.seed) if "key" not in run.meta else jnp.asarray(key_from_meta(run.meta["key"]))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        key, k1, k2 = jax.random.split(key, 3)
        idx = data.next()
        coefs = (_per_epoch(cfg.beta, cfg.beta_schedule, data.epoch), _per_epoch(alpha0, alpha_sched, data.epoch))
        if coefs not in steps:
            steps[coefs] = make_train_step(_loss_builder(algo, cfg, *coefs)(run), run.optimizer, mesh=run.mesh,
                                           state_sharding=run.state_sharding,
                                           num_microbatches=cfg.num_microbatches)
        run.step_fn = steps[coefs]
        policy_sp = run.policy.sampler_params(run.state.params)
        prompts = (P_ids[idx], P_mask[idx])
        # --- the pair: first = a policy sample; second = policy (online DPO) / reference (XPO) / mixture
        if algo == "online_dpo":
            roll = sampler.generate(policy_sp, prompts, k1, num_generations=2)
            ids, mask, trunc = (_host(roll.completion_ids), _host(roll.completion_mask), _host(roll.truncated))
            first = (ids[0::2], mask[0::2], trunc[0::2])
            second = (ids[1::2], mask[1::2], trunc[1::2])
            p_ids, p_mask = _host(roll.prompt_ids)[0::2], _host(roll.prompt_mask)[0::2]
        else:
            roll = sampler.generate(policy_sp, prompts, k1)
            first = (_host(roll.completion_ids), _host(roll.completion_mask), _host(roll.truncated))
            p_ids, p_mask = _host(roll.prompt_ids), _host(roll.prompt_mask)
            ref_sp = run.policy.sampler_params(run.frozen_params)
            if algo == "xpo":
                r2 = sampler.generate(ref_sp, prompts, k2)
                second = (_host(r2.completion_ids), _host(r2.completion_mask), _host(r2.truncated))
            else:
                second = tuple(_host(x) for x in mixture(policy_sp, ref_sp, jnp.asarray(p_ids),
                                                         jnp.asarray(p_mask), k2))
        # --- judge
        prow = [rows[i] for i in idx]
        ptxt = [str(D.as_text(tok, r["prompt"])) for r in prow]
        c1, t1 = decode(first[0], first[1])
        c2, t2 = decode(second[0], second[1])
        tot1, R1 = judge.rewards(t1, c1, ptxt, prow, first[2])
        tot2, R2 = judge.rewards(t2, c2, ptxt, prow, second[2])
        pref = judge.prefer(ptxt, t1, t2, tot1, tot2)  # P(first ≻ second)
        batch = {"prompt_ids": p_ids, "prompt_mask": p_mask}
        if algo == "nash_md":
            batch.update(completion_ids=first[0], mask=first[1], preference=pref.astype(np.float32),
                         ref_logps=_host(ref_logps(p_ids, p_mask, first[0], first[1])),
                         mixture_ids=second[0], mixture_mask=second[1])  # (the mixture sample: logs only)
        else:
            ref1 = _host(ref_logps(p_ids, p_mask, first[0], first[1]).sum(-1))
            ref2 = _host(ref_logps(p_ids, p_mask, second[0], second[1]).sum(-1))
            a = {"ids": first[0], "mask": first[1], "ref": ref1, "is_policy": np.ones(len(idx), bool)}
            b = {"ids": second[0], "mask": second[1], "ref": ref2, "is_policy": np.full(len(idx), algo != "xpo")}
            # chosen = first where its reward >= second's (pairwise judge: P(first ≻ second) >= 1/2)
            keys = (pref, 1.0 - pref) if judge.pairwise else (tot1, tot2)
            ch, rj = order_by_reward(*keys, a, b)
            ch, rj = jax.tree_util.tree_map(_host, ch), jax.tree_util.tree_map(_host, rj)
            batch.update(chosen_ids=ch["ids"], chosen_mask=ch["mask"], rejected_ids=rj["ids"],
                         rejected_mask=rj["mask"], ref_chosen=ch["ref"], ref_rejected=rj["ref"])
            if algo == "xpo":
                batch["chosen_is_policy"] = ch["is_policy"]
        m = run.train_step(batch)
        # --- logging: "reward" = mean judged reward of the policy's samples
        pol_tot, pol_R, pol_mask, pol_trunc = ((np.concatenate([tot1, tot2]), np.concatenate([R1, R2]),
                                                np.concatenate([first[1], second[1]]),
                                                np.concatenate([first[2], second[2]]))
                                               if algo == "online_dpo" else (tot1, R1, first[1], first[2]))
        m.update({"reward": float(np.mean(pol_tot)), "completion_length": float(pol_mask.sum(1).mean()),
                  "truncated_frac": float(np.mean(pol_trunc)), "beta": coefs[0]})
        names = ("reward_model",) if judge.pairwise else judge.col_names
        m.update(reward_metrics(pol_R, names))  # per function: rewards/<name>/mean, /std (TRL), rewards/<name>
        if algo != "online_dpo":
            m["reward/" + ("reference" if algo == "xpo" else "mixture")] = float(np.mean(tot2))
            m["preference"] = float(np.mean(pref))
        if algo == "xpo":
            m["alpha"] = coefs[1]
        run.logger.log(step, m, tokens=int(first[1].sum() + second[1].sum()))
        if ev is not None and run.due_eval(step, step - 1):
            ev(step)
        run.maybe_checkpoint(step, {"data": data.state(), "key": key_to_meta(key)})
    rewards = [r["reward"] for r in run.logger.history]
    first_r, last_r = first_last(rewards)
    out = {"algorithm": algo, "judge": cfg.judge, "steps": cfg.max_steps, "reward_first_10pct": first_r,
           "reward_last_10pct": last_r}
    line = f"mean reward: first 10% of steps {first_r:.3f} -> last 10% of steps {last_r:.3f}"
    print(line + (ev.summary(out) if ev is not None else ""))
    return run.finish(out)


def _evaluation(run, cfg, judge: _Judge, eval_rows, algo: str, sampler):
    """The held-out evaluation of an online trainer (None without eval rows): :class:`trlax.train.rl._Evaluation`
    (:func:`trlax.train.loops.sample_eval`: mean reward, each reward function, accuracy, pass@k) on the judge's
    reward columns, and with ``missing_eos_penalty`` a ``missing_eos_penalty`` column (``-penalty`` where
    truncated), so that ``eval/reward`` is the training ``reward`` (the judged total) of held-out samples. The
    pairwise judge: the reward model's score."""
    if eval_rows is None:
        return None
    from trlax.train.rl import _evaluation as rl_evaluation

    tok = run.tokenizer
    names = ("reward_model",) if judge.pairwise else tuple(judge.col_names)
    penalty = 0.0 if judge.pairwise else judge.penalty
    if penalty:
        names += ("missing_eos_penalty",)

    def reward_fn(texts, comp, prompts, rows, truncated):
        ptxt = [str(D.as_text(tok, r["prompt"])) for r in rows]  # as the training step judges them
        _, R = judge.rewards(texts, comp, ptxt, rows, truncated)
        if penalty:
            R = np.concatenate([R, -penalty * np.asarray(truncated, np.float64)[:, None]], axis=1)
        return R

    ro = types.SimpleNamespace(sampler=sampler, reward_fn=reward_fn, reward_names=names, weights=np.ones(len(names)),
                               agent=None)
    k = 2 if algo == "online_dpo" else 1
    return rl_evaluation(run, cfg, ro, eval_rows, algo, k, cfg.batch_size)


def _runner(algo: str):
    def run(cfg, rows=None):
        return run_online(cfg, rows, algo=algo)

    run.__doc__ = f"trlax train {algo}: {DESCRIPTIONS[algo]}"
    return run


PRESETS = {
    # TRL OnlineDPOConfig defaults (arXiv 2402.04792): beta 0.1, sigmoid; the IPO variant
    "online_dpo": {"online_dpo": dict(beta=0.1, loss_type="sigmoid", temperature=0.9),
                   "ipo": dict(beta=0.1, loss_type="ipo", temperature=0.9)},
    # TRL paper index, XPO (arXiv 2405.21046): XPOConfig(alpha=1e-5, beta=0.1)
    "xpo": {"xpo": dict(alpha=1e-5, beta=0.1, loss_type="sigmoid", temperature=0.9)},
    # TRL paper index, Nash-MD (arXiv 2312.00886): NashMDConfig() defaults beta=0.1, mixture_coef=0.5
    "nash_md": {"nash_md": dict(beta=0.1, mixture_coef=0.5, temperature=0.9)},
}

SPECS = [TrainerSpec(a, _config_cls(a), _runner(a), ("prompt",), D.addition_examples, presets=PRESETS[a],
                     description=DESCRIPTIONS[a], metric="reward") for a in ALGOS]

__all__ = ["ALGOS", "PRESETS", "SPECS", "make_mixture_sampler", "run_online"]
