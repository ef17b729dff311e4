"""Claim: the built-in toy multi-turn run (README "Multi-turn and tools") raises both the tool-call rate and the
task accuracy: `trlax train grpo --environment trlax.rollouts.environments:CalculatorEnv --sft_warmup_steps 600
--max_turns 3 --max_completion_length 48 --batch_size 32 --num_generations 8 --max_steps 150` (an SFT warm start
on demonstrations of the tool-call flow, trlax.train.agentic.warm_start, then GRPO at its default learning rate).

Runs that command's configuration (or reads a finished run's metrics with --metrics PATH) and prints the first
10% -> last 10% of GRPO steps for each rollout metric, with wall and CPU time; then samples the warm-started model
and GRPO's export on every distinct problem of the task (55 x 8 rollouts each, temperature 1) so that the
accuracy right after the warm start is measured on more than one step's 32 rollouts.

    python benchmarks/toy_agentic.py [--max_steps 150] [--sft_warmup_steps 600] [--seed 0] [--output_dir DIR]
    python benchmarks/toy_agentic.py --metrics DIR/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

METRICS = [("agent/tool_call_rate", "tool-call rate (>= 1 <tool_call> block)"),
           ("env/well_formed_call", "well-formed call"),
           ("env/successful_call", "call that ran without error"),
           ("env/accuracy", "accuracy (final answer exact)"),
           ("reward", "reward"),
           ("agent/turns", "policy turns per rollout")]


def first_last(values):
    v = np.asarray(values, float)
    k = max(1, len(v) // 10)
    return float(np.nanmean(v[:k])), float(np.nanmean(v[-k:]))


def table(path: str) -> str:
    hist = [json.loads(line) for line in open(path)]
    lines = [f"GRPO steps: {len(hist)} (first 10% -> last 10%)", "", "| metric | first -> last |", "|---|---|"]
    for key, name in METRICS:
        if key in hist[0]:
            a, b = first_last([h.get(key, np.nan) for h in hist])
            lines.append(f"| {name} | {a:.2f} -> {b:.2f} |")
    return "\n".join(lines)


def sample_model(model_dir: str, cfg, rows, seed: int = 0, generations: int = 8):
    """Tool-call rate, accuracy and mean reward of ``model_dir`` sampled on each distinct problem of ``rows``
    (``generations`` rollouts each, the run's sampling settings)."""
    import dataclasses

    import jax

    from trlax.rollouts import MultiTurnSampler, SamplingConfig
    from trlax.rollouts.environments import environment_factory
    from trlax.train import modeling

    policy = modeling.build_policy(dataclasses.replace(cfg, model=model_dir))
    tok = policy.tokenizer
    sampler = MultiTurnSampler(policy.sampler_graphdef, SamplingConfig(
        max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, stop_token_ids=(tok.eos_token_id,),
        pad_token_id=tok.pad_token_id, num_generations=generations, prompt_multiple=cfg.max_prompt_length), tok,
        max_turns=cfg.max_turns)
    problems = list({r["prompt"]: r for r in rows}.values())
    roll = sampler.rollout(policy.sampler_params(policy.params), problems, environment_factory(cfg.environment),
                           jax.random.PRNGKey(seed + 1000))
    m = sampler.last_metrics
    return {"tool_call_rate": m["tool_call_rate"], "accuracy": m["env/accuracy"],
            "reward": float(np.mean(roll.total_rewards)), "rollouts": len(problems) * generations}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metrics", default="")
    ap.add_argument("--max_steps", type=int, default=150)
    ap.add_argument("--sft_warmup_steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output_dir", default="")
    args = ap.parse_args()
    if not args.metrics:
        from trlax.train import loops
        from trlax.train.agentic import environment_rows
        from trlax.train.config import build_config

        out = args.output_dir or tempfile.mkdtemp(prefix="trlax-toy-agentic-")
        cfg = build_config("grpo", dict(environment="trlax.rollouts.environments:CalculatorEnv", max_turns=3,
                                        max_completion_length=48, batch_size=32, num_generations=8,
                                        max_steps=args.max_steps, sft_warmup_steps=args.sft_warmup_steps,
                                        seed=args.seed, output_dir=out, progress=False))
        rows = environment_rows(cfg)
        t0, c0 = time.time(), time.process_time()
        loops.run("grpo", cfg, rows)
        print(f"warm start + GRPO: wall {time.time() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s (this "
              f"process; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
        args.metrics = os.path.join(out, "metrics.jsonl")
        models = [("random init", None)] if args.sft_warmup_steps == 0 else [
            ("after the warm start", os.path.join(out, "warmup", "final"))]
        models.append(("after GRPO", os.path.join(out, "final")))
        lines = ["", "| model (every problem x 8, temperature 1) | tool-call rate | accuracy | reward |",
                 "|---|---|---|---|"]
        for name, path in models:
            if path is None or not os.path.isfile(os.path.join(path, "config.json")):
                continue
            s = sample_model(path, cfg, rows, args.seed)
            lines.append(f"| {name} ({s['rollouts']} rollouts) | {s['tool_call_rate']:.2f} | {s['accuracy']:.2f} | "
                         f"{s['reward']:.2f} |")
        print(table(args.metrics))
        print("\n".join(lines))
        return
    print(table(args.metrics))


if __name__ == "__main__":
    main()
