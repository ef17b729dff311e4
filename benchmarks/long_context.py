"""Benchmark: the trainer's loss + gradient at real sequence lengths and depths.

The path measured is the one every RL trainer runs: :func:`trlax.models.completion_logps` (fused LM-head
log-probs) + :func:`trlax.objectives.policy_loss` (GRPO preset), ``jax.value_and_grad`` w.r.t. the
parameters, B = 1, ``Decoder(..., remat=True)``, at the Qwen2.5-0.5B shape (hidden 896, 14 query / 2 KV
heads of 64, MLP 4864, vocab 151,936, tied embeddings). The sequence of T tokens is a prompt of T/8
tokens and a completion of 7T/8.

Three tables, every figure from one run of this script:

1. **Memory** — XLA's compiled memory analysis (``jax.jit(f).lower(...).compile().memory_analysis()``,
   ``temp_size_in_bytes``: exact and noise-free; arguments are ``jax.ShapeDtypeStruct`` so nothing is
   allocated) at 24 layers for T = 4k, 8k, 16k, 32k, blockwise vs plain attention.
2. **Compile time** at 2 and 24 layers (T = 2k), scanned layers vs the unrolled Python loop.
3. **Step time** of blockwise vs plain attention at T = 2k and 4k, 2 layers, median of ``--repeats``
   calls after one warm-up call. ``--step_vocab`` (default 8,192) replaces the 151,936-token vocabulary
   in this table only, so that the LM head (identical on both sides, ~2 TFLOP per step at 2k) does not
   hide the attention cost on a 2-core CPU; pass ``--step_vocab 151936`` for the full model.

``--trl`` adds the peak resident memory of the same loss + gradient through transformers' Qwen2 (sdpa
attention, gradient checkpointing, TRL's ``selective_log_softmax``) where it fits in this machine.

    python benchmarks/long_context.py                 # all tables
    python benchmarks/long_context.py --quick         # T = 4k, 8k memory rows; compile and step at 2k
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from logprobs import PeakRSS, mem_available  # benchmarks/logprobs.py: RSS sampler, /proc/meminfo
from trlax.models import Decoder, DecoderConfig, completion_logps
from trlax.objectives import PolicyLossConfig, policy_loss

GiB = 2 ** 30

QWEN25_05B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768,
)


def make_config(layers: int, attention: str, vocab: int = 151936) -> DecoderConfig:
    cfg = DecoderConfig.from_hf(dict(QWEN25_05B, num_hidden_layers=layers, vocab_size=vocab))
    return dataclasses.replace(cfg, attention_impl=attention)


def abstract_model(cfg: DecoderConfig, scan: bool):
    """``(graphdef, abstract params)`` of the model, without allocating it."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), remat=True, scan_layers=scan))
    return nnx.split(model, nnx.Param)


def loss_and_grad(graphdef):
    config = PolicyLossConfig.grpo()

    def loss(params, p_ids, p_mask, c_ids, c_mask, old_logps, adv):
        logps, _ = completion_logps((graphdef, params), p_ids, p_mask, c_ids, c_mask)
        return policy_loss(logps, old_logps, adv, c_mask, config, ref_logps=old_logps)[0]  # GRPO: beta > 0

    return jax.jit(jax.value_and_grad(loss))


def batch_shapes(t: int):
    p = t // 8
    c = t - p
    i32, b = jnp.int32, jnp.bool_
    return (jax.ShapeDtypeStruct((1, p), i32), jax.ShapeDtypeStruct((1, p), b), jax.ShapeDtypeStruct((1, c), i32),
            jax.ShapeDtypeStruct((1, c), b), jax.ShapeDtypeStruct((1, c), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32))


def compile_stats(layers: int, t: int, attention: str, scan: bool = True):
    """(temp bytes, compile seconds) of the loss + gradient."""
    graphdef, params = abstract_model(make_config(layers, attention), scan)
    fn = loss_and_grad(graphdef)
    t0 = time.perf_counter()
    compiled = fn.lower(params, *batch_shapes(t)).compile()
    secs = time.perf_counter() - t0
    return compiled.memory_analysis().temp_size_in_bytes, secs


def real_batch(t: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = t // 8
    c = t - p
    return (rng.integers(0, vocab, (1, p)).astype(np.int32), np.ones((1, p), bool),
            rng.integers(0, vocab, (1, c)).astype(np.int32), np.ones((1, c), bool),
            (-rng.random((1, c)) * 5).astype(np.float32), np.ones((1,), np.float32))


def step_times(t: int, vocab: int, repeats: int):
    """Median seconds per loss + gradient call, blockwise vs plain (same weights, same batch)."""
    out, values = {}, {}
    batch = real_batch(t, vocab)
    for attention in ("blockwise", "plain"):
        model = Decoder(make_config(2, attention, vocab), rngs=nnx.Rngs(0), remat=True)
        graphdef, params = nnx.split(model, nnx.Param)
        fn = loss_and_grad(graphdef)
        loss, _ = jax.block_until_ready(fn(params, *batch))  # compile + warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, *batch))
            ts.append(time.perf_counter() - t0)
        out[attention], values[attention] = statistics.median(ts), float(loss)
        del model, params
    return out, values


def trl_peak_rss(layers: int, t: int):
    """Peak RSS growth (bytes) of one loss + backward through transformers' Qwen2 (sdpa, gradient
    checkpointing) with TRL's ``selective_log_softmax``, the same shapes and GRPO loss on one sequence."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import selective_log_softmax

    torch.set_num_threads(os.cpu_count() or 1)
    hf = dict(QWEN25_05B, num_hidden_layers=layers)
    hf.pop("architectures"), hf.pop("model_type")
    model = Qwen2ForCausalLM(Qwen2Config(**hf, attn_implementation="sdpa"))
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.from_numpy(real_batch(t, hf["vocab_size"])[0].repeat(8, axis=1)[:, :t].astype(np.int64))
    p = t // 8
    with PeakRSS() as peak:  # weights excluded (built before), their gradients included
        logits = model(input_ids=ids).logits[:, p - 1:-1]
        logps = selective_log_softmax(logits, ids[:, p:])
        loss = -torch.exp(logps - logps.detach()).mean()
        loss.backward()
    return peak.delta


def trl_estimate(layers: int, t: int) -> int:
    """Rough bytes the torch side needs: float32 weights + gradients, a few ``[T, V]`` float32 buffers
    (logits, log-softmax, their gradients) and the checkpointed layer inputs."""
    h, v, i = QWEN25_05B["hidden_size"], QWEN25_05B["vocab_size"], QWEN25_05B["intermediate_size"]
    n_params = v * h + layers * (4 * h * h + 3 * h * i)
    return 8 * n_params + 4 * t * v * 4 + layers * t * h * 4 + 6 * t * i * 4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step_vocab", type=int, default=8192)
    ap.add_argument("--trl", action="store_true", help="also measure transformers + TRL peak RSS")
    ap.add_argument("--skip", default="", help="comma list of tables to skip: memory,compile,step")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    dev = jax.devices()[0]
    print(f"# {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"{os.cpu_count()} CPUs\n")

    if "memory" not in skip:
        lengths = (4096, 8192) if args.quick else (4096, 8192, 16384, 32768)
        print("## loss + gradient temp memory, 24 layers, B = 1 (XLA memory analysis)\n")
        print("| T | blockwise | plain | blockwise / plain | compile s (blockwise) |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        temps = {}
        for t in lengths:
            tb, cb = compile_stats(24, t, "blockwise")
            tp, _ = compile_stats(24, t, "plain")
            temps[t] = tb
            print(f"| {t:,} | {tb / GiB:.2f} GiB | {tp / GiB:.1f} GiB | {tb / tp:.4f} | {cb:.1f} |", flush=True)
        if 8192 in temps and 32768 in temps:
            print(f"\ntemp(32k) / temp(8k) = {temps[32768] / temps[8192]:.2f} (target <= 4.5); "
                  f"temp(32k) = {temps[32768] / GiB:.2f} GiB (target <= 12)\n")

    if "compile" not in skip:
        print("## compile time of the loss + gradient, T = 2,048 (blockwise attention)\n")
        print("| layers | scanned s | unrolled s |")
        print("| ---: | ---: | ---: |")
        ct = {}
        for layers in (2, 24):
            _, cs = compile_stats(layers, 2048, "blockwise", scan=True)
            _, cu = compile_stats(layers, 2048, "blockwise", scan=False)
            ct[layers] = (cs, cu)
            print(f"| {layers} | {cs:.1f} | {cu:.1f} |", flush=True)
        print(f"\ncompile(24) / compile(2): scanned {ct[24][0] / ct[2][0]:.2f} (target <= 1.5), "
              f"unrolled {ct[24][1] / ct[2][1]:.2f}\n")

    if "step" not in skip:
        lengths = (2048,) if args.quick else (2048, 4096)
        print(f"## step time (loss + gradient), 2 layers, vocab {args.step_vocab:,}, median of {args.repeats}\n")
        print("| T | blockwise s | plain s | blockwise / plain | loss blockwise | loss plain |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for t in lengths:
            st, lv = step_times(t, args.step_vocab, args.repeats)
            print(f"| {t:,} | {st['blockwise']:.3f} | {st['plain']:.3f} | {st['blockwise'] / st['plain']:.2f} | "
                  f"{lv['blockwise']:.6f} | {lv['plain']:.6f} |", flush=True)
        print()

    if args.trl:
        print("## transformers Qwen2 + TRL selective_log_softmax: peak RSS growth of loss + backward\n")
        print("| layers | T | peak RSS |")
        print("| ---: | ---: | ---: |")
        for layers, t in ((2, 4096), (24, 4096), (24, 8192)):
            need = trl_estimate(layers, t)
            if need > mem_available() - 2 * GiB:
                print(f"| {layers} | {t:,} | not run: needs ~{need / GiB:.0f} GiB, "
                      f"{mem_available() / GiB:.0f} GiB available |", flush=True)
                continue
            try:
                r = trl_peak_rss(layers, t)
                print(f"| {layers} | {t:,} | {r / GiB:.2f} GiB |", flush=True)
            except (RuntimeError, MemoryError) as e:  # torch raises RuntimeError when out of memory
                print(f"| {layers} | {t:,} | failed: {str(e)[:80]} |", flush=True)


if __name__ == "__main__":
    main()
