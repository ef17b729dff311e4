"""Benchmark: trlax ``preference_loss`` (jitted, value + gradient) vs TRL 1.16's DPOTrainer loss (eager
PyTorch, forward + backward) on identical float32 inputs, on this machine's CPU.

Both sides run in this one process, on the same arrays; each timing is the median of ``--repeats``
runs after a warm-up (the jit compile is excluded and reported separately); the min is printed too,
since on a shared machine it is the steadier figure. TRL's ``_compute_loss``
is driven through the same stand-in ``self`` and fused-LM-head stand-in model as the parity tests
(tests/objectives/test_preference_trl.py), so only the loss maths is timed on both sides (no model).

    python benchmarks/preference_loss.py            # full table (8x512 ... 128x8192)
    python benchmarks/preference_loss.py --quick    # two small sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "objectives"))
import test_preference_trl as oracle  # noqa: E402  (the TRL stand-in harness)

from trlax.objectives import PreferenceLossConfig, preference_loss  # noqa: E402

SIZES = [(8, 512), (32, 1024), (64, 2048), (128, 4096), (128, 8192)]
CONFIGS = {
    "dpo": PreferenceLossConfig.dpo(),
    "ipo+ld": PreferenceLossConfig.ipo(ld_alpha=0.5),
    "mpo+wpo": PreferenceLossConfig.mpo(use_weighting=True),
}


def _times(fn, repeats):
    """(median, min) wall time of ``repeats`` calls: the min is the better estimate on a busy machine."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def bench(cfg, B, T, repeats):
    rng = np.random.default_rng(0)
    lp = rng.normal(-1.5, 0.5, (2, B, T)).astype(np.float32)
    ref = (lp + rng.normal(0, 0.1, (2, B, T))).astype(np.float32)
    lssp = rng.uniform(-2.0, -0.5, (2, B, T)).astype(np.float32)
    lengths = rng.integers(T // 4, T + 1, (2, B))
    mask = np.arange(T)[None, None, :] < lengths[..., None]

    def f(c, r, rc, rr, cm, rm, lc, lr):
        return preference_loss(c, r, rc, rr, cm, rm, cfg, chosen_log_sum_sq_probs=lc, rejected_log_sum_sq_probs=lr)[0]

    jfn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    args = [jnp.asarray(x) for x in (lp[0], lp[1], ref[0], ref[1], mask[0], mask[1], lssp[0], lssp[1])]
    t0 = time.perf_counter()
    jax.block_until_ready(jfn(*args))
    compile_s = time.perf_counter() - t0
    t_jax = _times(lambda: jax.block_until_ready(jfn(*args)), repeats)

    m = torch.tensor(np.concatenate([mask[0], mask[1]]))
    lp_base = torch.tensor(np.concatenate([lp[0], lp[1]]))
    ref_t = torch.where(m, torch.tensor(np.concatenate([ref[0], ref[1]])), 0.0)
    lssp_t = torch.tensor(np.concatenate([lssp[0], lssp[1]]))
    zeros = torch.zeros(2 * B, T)
    top1 = torch.zeros(2 * B, T, dtype=torch.bool)
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), m.long()], dim=1)
    inputs = {"input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long), "completion_mask": completion_mask}
    ref_out = types.SimpleNamespace(log_probs=ref_t)

    def trl_step():
        leaf = lp_base.clone().requires_grad_(True)
        out = types.SimpleNamespace(log_probs=torch.where(m, leaf, 0.0), log_sum_sq_probs=lssp_t, entropy=zeros,
                                    mean_logits=zeros, is_top1=top1, aux_loss=None)
        stub = oracle._stub(cfg, out, ref_out)
        with oracle._no_inplace_autograd_traps():  # TRL 1.16 crashes on sft + WPO without it
            loss = oracle.DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
            loss.backward()
        return leaf.grad

    trl_step()
    t_trl = _times(trl_step, repeats)
    return t_jax, t_trl, compile_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two small sizes only")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    sizes = SIZES[:2] if a.quick else SIZES
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, value+grad, median / min of {a.repeats}; B = pairs")
    print(f"{'config':<9} {'B x T':>11} {'trlax ms':>10} {'TRL ms':>10} {'speed-up':>9} {'min trlax':>10} "
          f"{'min TRL':>9} {'speed-up':>9} {'compile s':>10}")
    for name, cfg in CONFIGS.items():
        for B, T in sizes:
            tj, tt, c = bench(cfg, B, T, a.repeats)
            (tj, tj_min), (tt, tt_min) = tj, tt
            print(f"{name:<9} {f'{B}x{T}':>11} {tj*1e3:>10.2f} {tt*1e3:>10.2f} {tt/tj:>8.1f}x {tj_min*1e3:>10.2f} "
                  f"{tt_min*1e3:>9.2f} {tt_min/tj_min:>8.1f}x {c:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
