"""Benchmark: trlax ``policy_loss`` (jitted, value + gradient) vs TRL 1.16's GRPOTrainer loss (eager
PyTorch, forward + backward) on identical float32 inputs, on this machine's CPU.

Both sides run in this one process, on the same arrays, timed in alternating blocks of 10 calls (at
least ``--repeats`` calls each and at least 0.5 s of work); each timing is the median after a warm-up (the jit compile is
excluded and reported separately). TRL's loss is driven
through the same stand-in ``self`` as the parity tests (tests/objectives/test_policy_trl.py).

    python benchmarks/policy_loss.py            # full table (8x512 ... 256x8192)
    python benchmarks/policy_loss.py --quick    # two small sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "objectives"))
import test_policy_trl as oracle  # noqa: E402  (the TRL stand-in harness)

from trlax.objectives import PolicyLossConfig, policy_loss  # noqa: E402

SIZES = [(8, 512), (32, 1024), (64, 2048), (128, 4096), (256, 8192)]
CONFIGS = {
    "dapo": PolicyLossConfig(loss_type="dapo", epsilon_high=0.28),
    "grpo+kl": PolicyLossConfig(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    "gspo": PolicyLossConfig.gspo(),
}


def _alternating_medians(fn_a, fn_b, repeats, min_seconds=0.5, block=10):
    """Median wall time of ``fn_a`` and ``fn_b``, timed in alternating blocks of ``block`` calls (so a
    background load hits both sides alike, while neither side's thread pool is still spinning from the
    other's last call when most of a block is timed), at least ``repeats`` calls each and until both
    have run for ``min_seconds`` (at most 2000 calls)."""
    ta, tb = [], []
    while len(ta) < repeats or (sum(ta) < min_seconds and sum(tb) < min_seconds and len(ta) < 2000):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            for _ in range(block):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb), len(ta)


def bench(name, cfg, B, T, repeats):
    rng = np.random.default_rng(0)
    logps = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.1, (B, T))).astype(np.float32)
    ref = (logps + rng.normal(0, 0.1, (B, T))).astype(np.float32)
    lengths = rng.integers(T // 4, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    adv = rng.normal(size=B).astype(np.float32)

    def f(lp, old, adv, mask, ref):
        return policy_loss(lp, old, adv, mask, cfg, ref_logps=ref)[0]

    jfn = jax.jit(jax.value_and_grad(f))
    args = [jnp.asarray(x) for x in (logps, old, adv, mask, ref)]
    t0 = time.perf_counter()
    jax.block_until_ready(jfn(*args))
    compile_s = time.perf_counter() - t0

    stub = oracle._make_stub(cfg.replace(max_completion_length=T), use_vllm=False, entropy_coef=0.0)
    mask_t = torch.tensor(mask, dtype=torch.float32)
    base_inputs = {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
        "completion_mask": mask_t,
        "advantages": torch.tensor(adv),
        "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref),
        "num_items_in_batch": mask_t.sum(),
    }
    ent = torch.zeros((B, T))
    lp_np = torch.tensor(logps)

    def trl_step():
        lp = lp_np.clone().requires_grad_(True)
        stub._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
        loss = oracle.GRPOTrainer._compute_loss(stub, None, dict(base_inputs))
        loss.backward()
        return lp.grad

    trl_step()
    t_jax, t_trl, n = _alternating_medians(lambda: jax.block_until_ready(jfn(*args)), trl_step, repeats)
    return t_jax, t_trl, compile_s, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    sizes = SIZES[:2] if a.quick else SIZES
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, value+grad, alternating blocks, median")
    print(f"{'config':<9} {'B x T':>11} {'trlax ms':>10} {'TRL ms':>10} {'speed-up':>9} {'compile s':>10} {'runs':>6}")
    for name, cfg in CONFIGS.items():
        for B, T in sizes:
            tj, tt, c, n = bench(name, cfg, B, T, a.repeats)
            print(f"{name:<9} {f'{B}x{T}':>11} {tj*1e3:>10.3f} {tt*1e3:>10.3f} {tt/tj:>8.1f}x {c:>10.2f} {n:>6}",
                  flush=True)


if __name__ == "__main__":
    main()
