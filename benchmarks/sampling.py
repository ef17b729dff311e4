"""Benchmark: generated tokens/s of the trlax sampler vs transformers' PyTorch ``generate``.

Claim (issue "rollouts/"): on this CPU, at batch 16, :class:`trlax.rollouts.JaxSampler` (prefill + KV-cached
``lax.while_loop`` decode under ``jit``) generates at least 2x the tokens/s of transformers' ``generate``
(eager PyTorch, KV cache, same checkpoint, same batch, same sampling settings).

Both sides, in one process: one randomly initialised checkpoint built locally with transformers (no
download) and saved to a temporary directory; trlax loads it with :func:`trlax.models.load_pretrained`.
Same left-padded prompt batch (ragged lengths), ancestral sampling at temperature 1 (optionally with top-k /
top-p), no stop token, so every row generates exactly ``max_new_tokens`` tokens on both sides. Time is the
wall-clock median of ``--repeats`` runs after one warm-up (jit compile reported separately); the two sides
alternate so background load hits both alike. tokens/s = batch * max_new_tokens / time.

    python benchmarks/sampling.py            # full: batch 1, 4, 16 (and 16 with top-k/top-p); 128 new tokens
    python benchmarks/sampling.py --quick    # batch 16 only, 48 new tokens, < 1 minute
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def build_checkpoint(path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    size = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=8192)
    cfg = transformers.Qwen2Config(**size, max_position_embeddings=1024, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params, size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    args = ap.parse_args()
    import torch
    import transformers

    from trlax.models import load_pretrained
    from trlax.rollouts import JaxSampler, SamplingConfig, left_pad

    quick = args.quick
    n_new = args.max_new_tokens or (48 if quick else 128)
    repeats = args.repeats or (3 if quick else 5)
    cases = [(16, 0, 1.0)] if quick else [(1, 0, 1.0), (4, 0, 1.0), (16, 0, 1.0), (16, 50, 0.95)]

    with tempfile.TemporaryDirectory() as path:
        hf, n_params, size = build_checkpoint(path)
        ours = load_pretrained(path)
    vocab = size["vocab_size"]
    print(f"checkpoint: Qwen2 {n_params / 1e6:.1f}M params {size}; max_new_tokens={n_new}; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    rng = np.random.RandomState(0)
    rows = []
    for batch, top_k, top_p in cases:
        prompts = [rng.randint(3, vocab, rng.randint(16, 33)).tolist() for _ in range(batch)]
        ids, mask = left_pad(prompts, 0)
        sampler = JaxSampler(ours, SamplingConfig(max_new_tokens=n_new, temperature=1.0, top_k=top_k, top_p=top_p))
        params = sampler.default_params

        def run_trlax(seed):
            r = sampler.generate(params, (ids, mask), jax.random.key(seed))
            jax.block_until_ready(r.completion_ids)
            return r

        t0 = time.perf_counter()
        r = run_trlax(0)
        compile_s = time.perf_counter() - t0
        assert int(np.asarray(r.completion_mask).sum()) == batch * n_new
        t_ids = torch.tensor(ids, dtype=torch.long)
        t_mask = torch.tensor(mask.astype(np.int64))

        def run_hf(seed):
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=True, temperature=1.0, top_k=top_k or None, top_p=top_p,
                                  pad_token_id=0, eos_token_id=None)
            assert out.shape == (batch, ids.shape[1] + n_new)
            return out

        run_hf(0)  # warm-up
        tj, th = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            run_trlax(i + 1)
            tj.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_hf(i + 1)
            th.append(time.perf_counter() - t0)
        toks = batch * n_new
        j, h = toks / statistics.median(tj), toks / statistics.median(th)
        rows.append((batch, top_k, top_p, j, h, j / h, compile_s))

    print()
    print(f"| batch | top_k | top_p | trlax tok/s | transformers tok/s | ratio | trlax compile s |")
    print(f"|------:|------:|------:|------------:|-------------------:|------:|----------------:|")
    for b, k, p, j, h, ratio, c in rows:
        print(f"| {b} | {k or '-'} | {p if p < 1 else '-'} | {j:,.0f} | {h:,.0f} | {ratio:.2f}x | {c:.1f} |")
    b16 = [r for r in rows if r[0] == 16 and r[1] == 0]
    if b16:
        ok = b16[0][5] >= 2.0
        print(f"\nbatch 16 target (>= 2x transformers): {'met' if ok else 'NOT met'} ({b16[0][5]:.2f}x)")


if __name__ == "__main__":
    main()
