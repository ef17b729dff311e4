"""The GRPO, DPO and SFT loops behind ``trlax train``.

Each loop: resolve the run config -> build / load the policy (``train/modeling.py``) and tokenizer
-> data -> ``make_train_step`` over the mesh -> steps with logging and orbax checkpoints (resumable
bit for bit: params, optimiser state, data position and PRNG key are saved) -> export the final
policy in Hugging Face format -> summary.

Batches use one layout everywhere: a left-padded prompt block ``[B, P]`` followed by a right-padded
completion block ``[B, C]``; the loss sees per-token log-probs of the completion block only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trlax.objectives.aggregation import aggregate
from trlax.train import data as D
from trlax.train.checkpoint import Checkpointer, key_from_meta, key_to_meta
from trlax.train.config import loss_config
from trlax.train.logging import RunLogger
from trlax.train.step import TrainState, init_train_state, make_mesh, make_train_step, shard_state


# ------------------------------------------------------------------------------------------ helpers


def _save_config(algo: str, cfg) -> None:
    import yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump({"algorithm": algo, **dataclasses.asdict(cfg)}, fh, sort_keys=False)


def make_optimizer(cfg) -> optax.GradientTransformation:
    sched = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)) if cfg.warmup_steps else cfg.learning_rate
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


class _Run:
    """State shared by the loops: policy, tokenizer, mesh, step function, checkpoints, logging."""

    def __init__(self, algo: str, cfg, loss_fn_builder, *, extra_state=None):
        from trlax.train import modeling

        self.algo, self.cfg = algo, cfg
        _save_config(algo, cfg)
        self.policy = modeling.build_policy(cfg)
        self.tokenizer = self.policy.tokenizer
        self.mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
        self.optimizer = make_optimizer(cfg)
        state = init_train_state(self.policy.params, self.optimizer, extra_state)
        self.state_sharding = self.policy.state_sharding(state, self.mesh, self.optimizer)
        self.state = shard_state(state, self.state_sharding)
        self.step_fn = make_train_step(loss_fn_builder(self), self.optimizer, mesh=self.mesh,
                                       state_sharding=self.state_sharding, num_microbatches=cfg.num_microbatches)
        self.ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                 save_every=cfg.save_every or cfg.max_steps, keep=cfg.keep_checkpoints)
        self.start_step = 0
        self.meta: Dict[str, Any] = {}
        if cfg.resume and self.ckpt.latest_step() is not None:
            step, self.state, self.meta = self.ckpt.restore(self.state)
            self.start_step = int(step)
            print(f"resumed from step {self.start_step} in {self.ckpt.directory}")
        self.logger = RunLogger(cfg.output_dir, cfg.max_steps, progress=cfg.progress, start_step=self.start_step)

    def checkpoint(self, step: int, meta: Dict[str, Any]) -> None:
        self.ckpt.save(step, self.state, meta, force=step == self.cfg.max_steps)

    def finish(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        self.ckpt.close()
        plot = self.logger.plot()
        self.logger.close()
        if self.cfg.export:
            path = os.path.join(self.cfg.output_dir, "final")
            self.policy.save(self.state.params, path)
            summary["exported_to"] = path
        if plot:
            summary["plot"] = plot
        with open(os.path.join(self.cfg.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        print(json.dumps(summary, indent=2))
        return summary


def _first_last(values, frac=0.1):
    n = max(1, int(round(len(values) * frac)))
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def _prompt_completion_batch(tok, prompts, completions, cfg):
    p_ids, p_mask = D.encode_left_padded(tok, prompts, cfg.max_prompt_length)
    c_ids, c_mask = D.encode_right_padded(tok, completions, cfg.max_completion_length)
    return p_ids, p_mask, c_ids, c_mask


# --------------------------------------------------------------------------------------------- SFT


def run_sft(cfg) -> Dict[str, Any]:
    from trlax.objectives import supervised  # noqa: F401  (DFT / NLL live there)

    rows = D.load_records("sft", cfg.dataset, seed=cfg.seed)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            logps, _ = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                   b["mask"])
            per_tok = -logps if cfg.loss_type == "nll" else -jax.lax.stop_gradient(jnp.exp(logps)) * logps
            loss = aggregate(per_tok, b["mask"], "token_mean", num_items=totals["num_items"])
            return loss, {"nll": aggregate(-jax.lax.stop_gradient(logps), b["mask"], "token_mean",
                                           num_items=totals["num_items"])}
        return loss_fn

    run = _Run("sft", cfg, loss_builder)
    sampler = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    losses = []
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = sampler.next()
        prompts = [D.as_text(run.tokenizer, rows[i]["prompt"]) for i in idx]
        comps = [D.as_text(run.tokenizer, rows[i]["completion"]) for i in idx]
        p_ids, p_mask, c_ids, c_mask = _prompt_completion_batch(run.tokenizer, prompts, comps, cfg)
        batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "mask": c_mask}
        run.state, m = run.step_fn(run.state, batch)
        row = run.logger.log(step, {k: float(v) for k, v in m.items()}, tokens=int(c_mask.sum()))
        losses.append(row["loss"])
        run.checkpoint(step, {"data": sampler.state()})
    first, last = _first_last(losses)
    return run.finish({"algorithm": "sft", "steps": cfg.max_steps, "loss_first_10pct": first, "loss_last_10pct": last})


# --------------------------------------------------------------------------------------------- DPO


def run_dpo(cfg) -> Dict[str, Any]:
    from trlax.objectives.preference import preference_loss

    lcfg = loss_config("dpo", cfg)
    rows = D.load_records("dpo", cfg.dataset, seed=cfg.seed)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            both_ids = jnp.concatenate([b["chosen_ids"], b["rejected_ids"]], 0)
            both_mask = jnp.concatenate([b["chosen_mask"], b["rejected_mask"]], 0)
            p_ids = jnp.concatenate([b["prompt_ids"]] * 2, 0)
            p_mask = jnp.concatenate([b["prompt_mask"]] * 2, 0)
            logps, _ = run.policy.completion_logps(params, p_ids, p_mask, both_ids, both_mask)
            n = b["chosen_ids"].shape[0]
            loss, metrics = preference_loss(logps[:n], logps[n:], b["ref_chosen"], b["ref_rejected"],
                                            b["chosen_mask"], b["rejected_mask"], lcfg)
            # preference losses are means over pairs: scale to this micro-batch's share
            return loss * n / totals["num_sequences"], metrics
        return loss_fn

    run = _Run("dpo", cfg, loss_builder)
    ref_params = run.policy.params  # frozen copy of the initial policy

    @jax.jit
    def ref_logps(p_ids, p_mask, c_ids, c_mask):
        return run.policy.completion_logps(ref_params, p_ids, p_mask, c_ids, c_mask)[0]

    sampler = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    losses, accs = [], []
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = sampler.next()
        prompts = [D.as_text(run.tokenizer, rows[i]["prompt"]) for i in idx]
        chosen = [D.as_text(run.tokenizer, rows[i]["chosen"]) for i in idx]
        rejected = [D.as_text(run.tokenizer, rows[i]["rejected"]) for i in idx]
        p_ids, p_mask = D.encode_left_padded(run.tokenizer, prompts, cfg.max_prompt_length)
        c_ids, c_mask = D.encode_right_padded(run.tokenizer, chosen, cfg.max_completion_length)
        r_ids, r_mask = D.encode_right_padded(run.tokenizer, rejected, cfg.max_completion_length)
        batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "chosen_ids": c_ids, "chosen_mask": c_mask,
                 "rejected_ids": r_ids, "rejected_mask": r_mask,
                 "ref_chosen": ref_logps(p_ids, p_mask, c_ids, c_mask),
                 "ref_rejected": ref_logps(p_ids, p_mask, r_ids, r_mask)}
        batch["mask"] = c_mask
        run.state, m = run.step_fn(run.state, batch)
        row = run.logger.log(step, {k: float(v) for k, v in m.items()}, tokens=int(c_mask.sum() + r_mask.sum()))
        losses.append(row["loss"])
        accs.append(row.get("rewards/accuracies", float("nan")))
        run.checkpoint(step, {"data": sampler.state()})
    first, last = _first_last(losses)
    a_first, a_last = _first_last(accs)
    return run.finish({"algorithm": "dpo", "steps": cfg.max_steps, "loss_first_10pct": first,
                       "loss_last_10pct": last, "accuracy_first_10pct": a_first, "accuracy_last_10pct": a_last})


# -------------------------------------------------------------------------------------------- GRPO


def run_grpo(cfg) -> Dict[str, Any]:
    from trlax.objectives import multi_reward_advantages, policy_loss

    lcfg = loss_config("grpo", cfg)
    rows = D.load_records("grpo", cfg.dataset, seed=cfg.seed)
    G = cfg.num_generations
    if cfg.batch_size % G:
        raise ValueError(f"num_generations={G} must divide batch_size={cfg.batch_size} (completions per step)")
    n_prompts = cfg.batch_size // G

    def loss_builder(run):
        def loss_fn(params, b, totals):
            logps, ent = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                     b["mask"], temperature=cfg.temperature)
            return policy_loss(logps, b.get("old_logps"), b["advantages"], b["mask"], lcfg,
                               ref_logps=b.get("ref_logps"), sampler_logps=b.get("sampler_logps"),
                               entropies=ent, num_items=totals["num_items"], num_sequences=totals["num_sequences"],
                               truncated=b.get("truncated"))
        return loss_fn

    run = _Run("grpo", cfg, loss_builder)
    from trlax.train import modeling

    sampler_fn = modeling.make_sampler(run.policy, cfg)
    ref_params = run.policy.params if lcfg.beta > 0 else None

    @jax.jit
    def forward_logps(params, p_ids, p_mask, c_ids, c_mask):
        return run.policy.completion_logps(params, p_ids, p_mask, c_ids, c_mask, temperature=cfg.temperature)[0]

    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else None
    data = D.EpochSampler(len(rows), n_prompts, cfg.seed, **run.meta.get("data", {}))
    key = jax.random.PRNGKey(cfg.seed) if "key" not in run.meta else jnp.asarray(key_from_meta(run.meta["key"]))
    rewards_hist = []
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        key, gen_key = jax.random.split(key)
        idx = data.next()
        prompts = [D.as_text(run.tokenizer, rows[i]["prompt"]) for i in idx]
        answers = [str(rows[i].get("answer", rows[i].get("solution", ""))) for i in idx]
        p_ids, p_mask = D.encode_left_padded(run.tokenizer, prompts, cfg.max_prompt_length)
        p_ids, p_mask = np.repeat(p_ids, G, 0), np.repeat(p_mask, G, 0)
        roll = sampler_fn(run.state.params, p_ids, p_mask, gen_key)
        texts = run.tokenizer.batch_decode(np.where(roll["completion_mask"], roll["completion_ids"],
                                                    run.tokenizer.pad_token_id), skip_special_tokens=True)
        R = D.addition_rewards(texts, np.repeat(answers, G))
        adv = multi_reward_advantages(jnp.asarray(R), weights, G, aggregation=cfg.multi_objective_aggregation,
                                      scale_rewards=cfg.scale_rewards)
        reward = float(np.mean(np.nansum(R * (np.asarray(weights) if weights else 1.0), axis=1)))
        batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": roll["completion_ids"],
                 "mask": roll["completion_mask"], "advantages": adv, "truncated": roll["truncated"]}
        if lcfg.sampler_correction is not None:
            batch["sampler_logps"] = roll["logps"]
        off_policy = cfg.num_iterations > 1 or lcfg.sampler_correction is not None
        if off_policy:
            batch["old_logps"] = forward_logps(run.state.params, p_ids, p_mask, roll["completion_ids"],
                                               roll["completion_mask"])
        if ref_params is not None:
            batch["ref_logps"] = forward_logps(ref_params, p_ids, p_mask, roll["completion_ids"],
                                               roll["completion_mask"])
        for _ in range(cfg.num_iterations):
            run.state, m = run.step_fn(run.state, batch)
        metrics = {k: float(v) for k, v in m.items()}
        metrics["reward"] = reward
        metrics["completion_length"] = float(np.mean(np.sum(roll["completion_mask"], 1)))
        run.logger.log(step, metrics, tokens=int(np.sum(roll["completion_mask"])))
        rewards_hist.append(reward)
        run.checkpoint(step, {"data": data.state(), "key": key_to_meta(key)})
    first, last = _first_last(rewards_hist)
    print(f"mean reward: first 10% of steps {first:.3f} -> last 10% {last:.3f}")
    return run.finish({"algorithm": "grpo", "loss_type": lcfg.loss_type, "steps": cfg.max_steps,
                       "reward_first_10pct": first, "reward_last_10pct": last})


def run(algo: str, cfg) -> Dict[str, Any]:
    return {"grpo": run_grpo, "dpo": run_dpo, "sft": run_sft}[algo](cfg)


__all__ = ["make_optimizer", "run", "run_dpo", "run_grpo", "run_sft"]
