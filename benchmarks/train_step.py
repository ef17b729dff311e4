"""Benchmark: full GRPO and DPO training steps of trlax (``trlax train``'s loops, jitted JAX) vs TRL 1.16's
``GRPOTrainer`` / ``DPOTrainer`` (PyTorch, CPU), on the same tiny model (identical weights: trlax's random
init exported with ``save_pretrained`` and loaded by TRL), the same data, batch and sequence lengths, in one
run; then the scaling of the trlax train step (``make_train_step``, policy loss) with batch and sequence
length.

Step time = median wall time between consecutive optimiser steps after ``--warmup`` steps (the jit compile
and TRL's first-step set-up are excluded). A GRPO step includes sampling (trlax: the KV-cached
``JaxSampler``; TRL: transformers ``generate``), rewards, advantages and the update; completions stop at EOS
on both sides, so the mean completion length is printed too and tokens/s (completion tokens for GRPO,
chosen + rejected tokens for DPO, per second) is the comparable figure. DPO computes the reference
log-probs on the fly on both sides.

    python benchmarks/train_step.py --quick     # ~1 minute
    python benchmarks/train_step.py             # full table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np


def _digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def make_data(tmp, n, prompt_len, completion_len, seed=0):
    rng = random.Random(seed)
    grpo = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
            ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]
    dpo = [{"prompt": _digits(rng, prompt_len), "chosen": _digits(rng, completion_len),
            "rejected": _digits(rng, completion_len)} for _ in range(n)]
    paths = {}
    for name, rows in (("grpo", grpo), ("dpo", dpo)):
        paths[name] = os.path.join(tmp, f"{name}.jsonl")
        with open(paths[name], "w") as fh:
            fh.write("\n".join(json.dumps(r) for r in rows))
    return paths, grpo, dpo


def make_model(tmp, model_kw):
    from flax import nnx

    from trlax.models import Decoder, DecoderConfig, save_pretrained
    from trlax.train import modeling
    from trlax.train.data import build_tokenizer

    tok = build_tokenizer(os.path.join(tmp, "tok"))
    path = os.path.join(tmp, "model")
    save_pretrained(Decoder(DecoderConfig.from_hf(modeling.tiny_hf_config(tok, **model_kw)), rngs=nnx.Rngs(0)),
                    path, tokenizer=tok)
    return path, tok


def step_stats(times, warmup):
    t = times[warmup:] or times[-1:]
    return statistics.median(t), min(t)


# ------------------------------------------------------------------------------------------- trlax


def trlax_run(algo, model, dataset, out, steps, **kw):
    from trlax.train import loops
    from trlax.train.config import build_config

    cfg = build_config(algo, dict(model=model, dataset=dataset, output_dir=out, max_steps=steps, progress=False,
                                  export=False, **kw))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        loops.run(algo, cfg)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(x) for x in fh]
    return rows


# --------------------------------------------------------------------------------------------- TRL


class _Timer:
    def __init__(self):
        self.t = []

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                outer.t.append(time.perf_counter())

            def on_train_begin(self, args, state, control, **kw):
                outer.t.append(time.perf_counter())

        return CB()

    def deltas(self):
        return list(np.diff(self.t))


def trl_grpo(model, tok, rows, out, steps, B, G, C, lr):
    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from trlax.train.data import addition_rewards

    torch.manual_seed(0)

    def acc(prompts, completions, answer, **kw):
        return addition_rewards([c.strip() for c in completions], answer, [False] * len(answer))[:, 0].tolist()

    def fmt(prompts, completions, answer, **kw):
        return addition_rewards([c.strip() for c in completions], answer, [False] * len(answer))[:, 1].tolist()

    args = GRPOConfig(output_dir=out, per_device_train_batch_size=B, num_generations=G, max_completion_length=C,
                      learning_rate=lr, beta=0.0, loss_type="dapo", epsilon=0.2, max_steps=steps, report_to="none",
                      use_cpu=True, save_strategy="no", logging_steps=10**6, disable_tqdm=True, bf16=False,
                      temperature=1.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      adam_beta2=0.99, max_grad_norm=1.0)
    timer = _Timer()
    lengths = []

    def length_hook(prompts, completions, completion_ids=None, **kw):
        lengths.extend(len(c) for c in completion_ids)
        return [0.0] * len(completions)

    tr = GRPOTrainer(model=model, reward_funcs=[acc, fmt, length_hook], args=args,
                     train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                     callbacks=[timer.callback()])
    tr.args.reward_weights = [1.0, 1.0, 0.0]
    tr.reward_weights = torch.tensor([1.0, 1.0, 0.0])
    tr.train()
    return timer.deltas(), float(np.mean(lengths)) if lengths else float("nan")


def trl_dpo(model, tok, rows, out, steps, B, max_len, lr):
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=B, learning_rate=lr, beta=0.1, loss_type="sigmoid",
                     max_steps=steps, report_to="none", use_cpu=True, save_strategy="no", logging_steps=10**6,
                     disable_tqdm=True, bf16=False, max_length=max_len, lr_scheduler_type="constant",
                     precompute_ref_log_probs=False, weight_decay=0.0, adam_beta2=0.99, max_grad_norm=1.0)
    timer = _Timer()
    tr = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                    callbacks=[timer.callback()])
    tr.train()
    return timer.deltas()


# ---------------------------------------------------------------------------------------- scaling


def scaling(sizes, repeats=5):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from trlax.models import Decoder, DecoderConfig
    from trlax.objectives import PolicyLossConfig, policy_loss
    from trlax.train import modeling
    from trlax.train.loops import make_optimizer
    from trlax.train.step import init_train_state, make_train_step

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

        def __len__(self):
            return 128

    dc = DecoderConfig.from_hf(modeling.tiny_hf_config(Tok()))
    graphdef, params = nnx.split(Decoder(dc, rngs=nnx.Rngs(0)))
    lcfg = PolicyLossConfig(loss_type="dapo", epsilon_high=0.28)

    class C:
        learning_rate, warmup_steps, max_grad_norm, weight_decay = 1e-3, 0, 1.0, 0.0

    opt = make_optimizer(C)

    def loss_fn(p, b, totals):
        from trlax.models import completion_logps

        lp, ent = completion_logps((graphdef, p), b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
        return policy_loss(lp, b["old_logps"], b["advantages"], b["mask"], lcfg, num_items=totals["num_items"],
                           num_sequences=totals["num_sequences"])

    step = make_train_step(loss_fn, opt, donate=False)
    out = []
    rng = np.random.default_rng(0)
    for B, T in sizes:
        P = 16
        b = {"prompt_ids": jnp.asarray(rng.integers(3, 128, (B, P)), jnp.int32), "prompt_mask": jnp.ones((B, P), bool),
             "completion_ids": jnp.asarray(rng.integers(3, 128, (B, T)), jnp.int32), "mask": jnp.ones((B, T), bool),
             "old_logps": jnp.full((B, T), -4.8), "advantages": jnp.asarray(rng.normal(size=B), jnp.float32)}
        state = init_train_state(params, opt)
        t0 = time.perf_counter()
        s2, m = step(state, b)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s2, m = step(state, b)
            jax.block_until_ready(m)
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        out.append((B, T, med, min(ts), B * (P + T) / med, compile_s))
    return out


# ------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    steps = a.steps or (6 if a.quick else 20)
    import jax

    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} on {jax.devices()[0].platform}; ", end="")
    import torch
    import trl

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); trl {trl.__version__}")
    models = {"tiny (2L, H=64)": {}} if a.quick else {
        "tiny (2L, H=64)": {}, "small (4L, H=256)": dict(hidden_size=256, intermediate_size=512,
                                                         num_hidden_layers=4, num_attention_heads=8,
                                                         num_key_value_heads=4, head_dim=32)}
    B, G, C, Pd, Cd = 32, 8, 16, 32, 32
    dB = 16
    lr = 1e-4
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, grpo_rows, dpo_rows = make_data(tmp, 512, Pd, Cd)
        for mname, mkw in models.items():
            model, tok = make_model(os.path.join(tmp, mname.split()[0]), mkw)
            # GRPO: trlax
            r = trlax_run("grpo", model, paths["grpo"], os.path.join(tmp, "tg" + mname[:4]), steps, batch_size=B,
                          num_generations=G, max_completion_length=C, max_prompt_length=8, learning_rate=lr,
                          beta=0.0, loss_type="dapo", log_kl=False)
            t_med, t_min = step_stats([x["step_time"] for x in r], a.warmup)
            ln = float(np.mean([x["completion_length"] for x in r]))
            toks = statistics.median([x["tokens_per_s"] for x in r[a.warmup:]])
            # GRPO: TRL
            d, ln_trl = trl_grpo(model, tok, grpo_rows, os.path.join(tmp, "rg"), steps, B, G, C, lr)
            q_med, q_min = step_stats(d, a.warmup)
            rows_out.append(("GRPO", mname, f"B={B} G={G} C<={C}", t_med, q_med, ln, ln_trl,
                             toks, B * ln_trl / q_med))
            # DPO: trlax
            r = trlax_run("dpo", model, paths["dpo"], os.path.join(tmp, "td" + mname[:4]), steps, batch_size=dB,
                          max_prompt_length=Pd, max_completion_length=Cd + 1, learning_rate=lr,
                          precompute_ref_logps=False)
            t_med, _ = step_stats([x["step_time"] for x in r], a.warmup)
            toks = statistics.median([x["tokens_per_s"] for x in r[a.warmup:]])
            d = trl_dpo(model, tok, dpo_rows, os.path.join(tmp, "rd"), steps, dB, Pd + Cd + 1, lr)
            q_med, _ = step_stats(d, a.warmup)
            rows_out.append(("DPO", mname, f"B={dB} P={Pd} C={Cd}", t_med, q_med, Cd + 1, Cd + 1, toks,
                             dB * 2 * (Cd + 1) / q_med))
    print()
    print(f"{'algo':5} {'model':18} {'batch':16} {'trlax s/step':>12} {'TRL s/step':>11} {'speed-up':>8} "
          f"{'len trlax':>9} {'len TRL':>8} {'tok/s trlax':>11} {'tok/s TRL':>10} {'tok/s ratio':>11}")
    for algo, m, shape, t, q, l1, l2, k1, k2 in rows_out:
        print(f"{algo:5} {m:18} {shape:16} {t:12.4f} {q:11.4f} {q / t:7.2f}x {l1:9.2f} {l2:8.2f} "
              f"{k1:11.0f} {k2:10.0f} {k1 / k2:10.2f}x")
    print("\ntrlax train step scaling (tiny model, policy loss; prompt 16 tokens; compile excluded):")
    sizes = ([(8, 16), (32, 16), (8, 64)] if a.quick else
             [(8, 32), (16, 32), (32, 32), (64, 32), (16, 16), (16, 64), (16, 128), (16, 256)])
    print(f"{'B':>4} {'T':>5} {'median s':>9} {'min s':>8} {'tokens/s':>9} {'compile s':>9}")
    for B_, T_, med, mn, tps, cs in scaling(sizes):
        print(f"{B_:4d} {T_:5d} {med:9.4f} {mn:8.4f} {tps:9.0f} {cs:9.2f}")


if __name__ == "__main__":
    sys.exit(main())
