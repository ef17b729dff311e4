"""Claim: the built-in toy multi-turn run (README "Multi-turn and tools") raises both the tool-call rate and the
task accuracy: `trlax train grpo --environment trlax.rollouts.environments:CalculatorEnv --sft_warmup_steps 40`
(an SFT warm start on demonstrations of the tool-call flow, trlax.train.agentic.warm_start, then GRPO).

Runs that command's configuration (or reads a finished run's metrics with --metrics PATH) and prints the first
10% -> last 10% of GRPO steps for each rollout metric, with wall and CPU time.

    python benchmarks/toy_agentic.py [--max_steps 60] [--sft_warmup_steps 40] [--output_dir DIR]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metrics", default="")
    ap.add_argument("--max_steps", type=int, default=60)
    ap.add_argument("--sft_warmup_steps", type=int, default=40)
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
                                        output_dir=out, progress=False))
        t0, c0 = time.time(), time.process_time()
        loops.run("grpo", cfg, environment_rows(cfg))
        print(f"wall {time.time() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s (this process; "
              f"{os.cpu_count()} cores)")
        args.metrics = os.path.join(out, "metrics.jsonl")
    print(table(args.metrics))


if __name__ == "__main__":
    main()
