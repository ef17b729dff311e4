"""Benchmark: full training steps of ``trlax train rloo | kto | reward | cpo | orpo | gkd`` (jitted JAX) vs
the TRL 1.16 trainer of the same name (PyTorch, CPU): ``RLOOTrainer``, ``KTOTrainer``, ``RewardTrainer``,
``experimental.cpo.CPOTrainer``, ``experimental.orpo.ORPOTrainer``, ``experimental.gkd.GKDTrainer``.
Same tiny model on both sides (trlax's random init exported with ``save_pretrained`` and loaded by TRL;
the reward model's score head is freshly initialised on each side), same data, batch and lengths, one run.
The companion of ``train_step.py`` (GRPO / DPO), whose helpers this script imports.

Step time = median wall time between consecutive optimiser steps after ``--warmup`` steps (jit compile and
TRL's first-step set-up excluded). tokens/s = trained completion tokens per step / step time, counted the
same way on both sides: RLOO — sampled completion tokens (both stop at EOS: mean length printed);
KTO — B completions of C tokens; reward / CPO / ORPO — 2B (chosen + rejected) of C tokens; GKD — B
dataset completions of C tokens (``lmbda = 0``: no student sampling, so the step is the distillation
update itself; the teacher is the same tiny model on both sides). A TRL trainer that cannot be built or
fails is printed as ``n/a (reason)``.

On a loaded machine TRL's multi-threaded (OpenMP) steps vary by up to 100x between runs (likely OpenMP
threads waiting on a descheduled sibling); ``taskset -c 0`` pins both sides to one core for a comparison that
such contention barely moves (see benchmarks/README.md).

    python benchmarks/trainers.py --quick          # ~1 minute (5 steps)
    python benchmarks/trainers.py                  # default table (15 steps, ~2 minutes)
    taskset -c 0 python benchmarks/trainers.py     # both sides on one core
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import traceback

import numpy as np

from train_step import _digits, _Timer, make_data, make_model, step_stats, trlax_run

TRAINERS = ("rloo", "kto", "reward", "cpo", "orpo", "gkd")


def _common(out, B, steps, lr):
    """TrainingArguments shared by every TRL trainer: CPU, float32, constant LR, no logging / saving
    (per-step logging slowed TRL's GRPO ~7x in ``train_step.py``), AdamW as in trlax (β2 = 0.99, clip 1)."""
    return dict(output_dir=out, per_device_train_batch_size=B, learning_rate=lr, max_steps=steps, report_to="none",
                use_cpu=True, save_strategy="no", logging_steps=10**6, disable_tqdm=True, bf16=False,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.99, max_grad_norm=1.0)


def _write(tmp, name, rows):
    path = os.path.join(tmp, f"{name}.jsonl")
    with open(path, "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    return path


def _train(trainer, timer):
    trainer.train()
    return timer.deltas()


# --------------------------------------------------------------------------------------------- TRL


def trl_rloo(model, tok, rows, out, steps, B, G, C, lr, beta):
    import datasets
    import torch
    from trl import RLOOConfig, RLOOTrainer

    from trlax.train.data import addition_rewards

    torch.manual_seed(0)
    lengths = []

    def acc(prompts, completions, answer, **kw):
        return addition_rewards([c.strip() for c in completions], answer, [False] * len(answer))[:, 0].tolist()

    def fmt(prompts, completions, answer, completion_ids=None, **kw):
        lengths.extend(len(c) for c in completion_ids)
        return addition_rewards([c.strip() for c in completions], answer, [False] * len(answer))[:, 1].tolist()

    args = RLOOConfig(**_common(out, B, steps, lr), num_generations=G, max_completion_length=C, beta=beta,
                      epsilon=0.2, temperature=1.0)
    timer = _Timer()
    tr = RLOOTrainer(model=model, reward_funcs=[acc, fmt], args=args, train_dataset=datasets.Dataset.from_list(rows),
                     processing_class=tok, callbacks=[timer.callback()])
    return _train(tr, timer), float(np.mean(lengths)) if lengths else float("nan")


def trl_kto(model, tok, rows, out, steps, B, max_len, lr):
    import datasets
    import torch
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    args = KTOConfig(**_common(out, B, steps, lr), beta=0.1, max_length=max_len, precompute_ref_log_probs=False)
    timer = _Timer()
    tr = KTOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                    callbacks=[timer.callback()])
    return _train(tr, timer)


def trl_reward(model, tok, rows, out, steps, B, max_len, lr):
    import datasets
    import torch
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    args = RewardConfig(**_common(out, B, steps, lr), max_length=max_len, center_rewards_coefficient=None)
    timer = _Timer()
    tr = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                       callbacks=[timer.callback()])
    return _train(tr, timer)


def trl_cpo_orpo(algo, model, tok, rows, out, steps, B, P, C, lr):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    if algo == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
        extra = dict(loss_type="sigmoid", cpo_alpha=1.0)
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
        extra = {}
    torch.manual_seed(0)
    args = Config(**_common(out, B, steps, lr), beta=0.1, max_length=P + C, max_completion_length=C, **extra)
    timer = _Timer()
    tr = Trainer(model=AutoModelForCausalLM.from_pretrained(model), args=args,
                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[timer.callback()])
    return _train(tr, timer)


def trl_gkd(model, tok, rows, out, steps, B, max_len, C, lr):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(0)
    msgs = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]
    args = GKDConfig(**_common(out, B, steps, lr), lmbda=0.0, beta=0.5, temperature=1.0, max_new_tokens=C,
                     max_length=max_len)
    timer = _Timer()
    tr = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(model),
                    teacher_model=AutoModelForCausalLM.from_pretrained(model), args=args,
                    train_dataset=datasets.Dataset.from_list(msgs), processing_class=tok, callbacks=[timer.callback()])
    return _train(tr, timer)


def _na(exc):
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return "n/a (" + (msg[:90] + "…" if len(msg) > 90 else msg) + ")"


# ------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS))
    a = ap.parse_args()
    steps = a.steps or (5 if a.quick else 15)
    only = [n.strip() for n in a.only.split(",") if n.strip()]
    import jax
    import torch
    import trl

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"trl {trl.__version__}; {steps} steps, median after {a.warmup}")
    B, P, C, G, Cr, lr = 16, 32, 32, 4, 16, 1e-4
    results = []  # (trainer, shape, trlax s, TRL s | "n/a (...)", trlax tok/step, TRL tok/step)
    with tempfile.TemporaryDirectory() as tmp:
        paths, add_rows, pairs = make_data(tmp, 256, P, C)
        rng = random.Random(1)
        unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                    for p in pairs for k in ("chosen", "rejected")]
        rng.shuffle(unpaired)
        sft = [{"prompt": _digits(rng, P), "completion": _digits(rng, C)} for _ in range(256)]
        paths["kto"], paths["sft"] = _write(tmp, "kto", unpaired), _write(tmp, "sft", sft)
        model, tok = make_model(os.path.join(tmp, "tiny"), {})
        pref = dict(batch_size=B, max_prompt_length=P, max_completion_length=C + 1, learning_rate=lr)

        def side(fn, *args, **kw):
            try:
                return fn(*args, **kw)
            except Exception as e:  # report and move on: one row must not sink the table
                traceback.print_exc(limit=2)
                return e

        for name in only:
            print(f"-- {name}", flush=True)
            out = lambda s: os.path.join(tmp, f"{s}_{name}")  # noqa: E731
            if name == "rloo":
                shape = f"B={B} ({B // G} prompts x G={G}), C<={Cr}"
                t = side(trlax_run, "rloo", model, paths["grpo"], out("x"), steps, batch_size=B, num_generations=G,
                         max_completion_length=Cr, max_prompt_length=8, learning_rate=lr, beta=0.05)
                q = side(trl_rloo, model, tok, add_rows, out("t"), steps, B, G, Cr, lr, 0.05)
                ln_t = None if isinstance(t, Exception) else float(np.mean([r["completion_length"] for r in t]))
                ln_q = None if isinstance(q, Exception) else q[1]
                q = q if isinstance(q, Exception) else q[0]
                tok_t, tok_q = (B * ln_t if ln_t else None), (B * ln_q if ln_q else None)
                shape += f"; mean len {ln_t or float('nan'):.1f} / {ln_q or float('nan'):.1f}"
            elif name == "kto":
                shape = f"B={B} unpaired, P={P} C={C}"
                t = side(trlax_run, "kto", model, paths["kto"], out("x"), steps, beta=0.1, **pref)
                q = side(trl_kto, model, tok, unpaired, out("t"), steps, B, P + C + 1, lr)
                tok_t = tok_q = B * (C + 1)
            elif name == "reward":
                shape = f"B={B} pairs, P={P} C={C}"
                t = side(trlax_run, "reward", model, paths["dpo"], out("x"), steps, **pref)
                q = side(trl_reward, model, tok, pairs, out("t"), steps, B, P + C + 1, lr)
                tok_t = tok_q = 2 * B * (C + 1)
            elif name in ("cpo", "orpo"):
                shape = f"B={B} pairs, P={P} C={C}"
                kw = dict(loss_type="sigmoid", cpo_alpha=1.0) if name == "cpo" else {}
                t = side(trlax_run, name, model, paths["dpo"], out("x"), steps, beta=0.1, **pref, **kw)
                q = side(trl_cpo_orpo, name, model, tok, pairs, out("t"), steps, B, P, C + 1, lr)
                tok_t = tok_q = 2 * B * (C + 1)
            elif name == "gkd":
                shape = f"B={B}, P={P} C={C}, lmbda=0"
                t = side(trlax_run, "gkd", model, paths["sft"], out("x"), steps, teacher_model=model, lmbda=0.0,
                         beta=0.5, temperature=1.0, kd_temperature=1.0, seq_kd=False, **pref)
                q = side(trl_gkd, model, tok, sft, out("t"), steps, B, P + C + 16, C + 1, lr)
                tok_t = tok_q = B * (C + 1)
            else:
                raise SystemExit(f"unknown trainer {name!r}; choose from {TRAINERS}")
            t_s = t if isinstance(t, Exception) else step_stats([r["step_time"] for r in t], a.warmup)
            q_s = q if isinstance(q, Exception) else step_stats(q, a.warmup)
            print("   step s (median, min): trlax " + (_na(t_s) if isinstance(t_s, Exception) else "%.4f, %.4f" % t_s)
                  + "; TRL " + (_na(q_s) if isinstance(q_s, Exception) else "%.4f, %.4f" % q_s), flush=True)
            results.append((name, shape, t_s if isinstance(t_s, Exception) else t_s[0],
                            q_s if isinstance(q_s, Exception) else q_s[0], tok_t, tok_q))
    print()
    print(f"{'trainer':8} {'shape':48} {'trlax s/step':>12} {'TRL s/step':>11} {'speed-up':>8} "
          f"{'tok/s trlax':>11} {'tok/s TRL':>10}")
    for name, shape, t, q, k1, k2 in results:
        ts = _na(t) if isinstance(t, Exception) else f"{t:12.4f}"
        if isinstance(q, Exception):
            print(f"{name:8} {shape:48} {ts:>12} {_na(q)}")
            continue
        qs = f"{q:11.4f}"
        sp = f"{q / t:7.2f}x" if not isinstance(t, Exception) else "n/a"
        kt = f"{k1 / t:11.0f}" if k1 and not isinstance(t, Exception) else "n/a"
        kq = f"{k2 / q:10.0f}" if k2 else "n/a"
        print(f"{name:8} {shape:48} {ts:>12} {qs:>11} {sp:>8} {kt:>11} {kq:>10}")


if __name__ == "__main__":
    sys.exit(main())
