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

GRPO-shaped rollouts (issue "generation at RL scale"), ``--grpo``: 16 prompts x G = 8 samples each.

- (a) 1,024-token prompts, 64 new tokens, no stop token: the reference engine (``share_prefix=False``: every
  prompt copied G times and prefilled G times) vs the shared-prefix engine (one prefill per prompt; the G
  samples read the same prompt keys / values) vs transformers ``generate(num_return_sequences=8)``.
- (b) 48-64-token prompts, up to 512 new tokens, 48 stop ids on the random model (per-token stop chance
  ~48/8192, so completion lengths spread roughly geometrically, mean ~170, a few hit 512 as in RL): the
  reference engine and the shared-prefix static batch (128 rows decode until the longest stops) vs
  continuous batching (``decode_slots``: a row that stops hands its slot to the next pending sample) vs
  transformers. tokens/s counts *useful* tokens (completion tokens up to and including the stop token);
  ``slot use`` is the fraction of decode slot-steps that produced one.

    python benchmarks/sampling.py --grpo     # both GRPO cases, ~10 minutes on 2 CPU cores
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
    cfg = transformers.Qwen2Config(**size, max_position_embeddings=2048, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params, size


def _median_time(fn, repeats):
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn(i + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def grpo_cases(repeats: int, slots, cases="ab"):
    """The GRPO-shaped table (module docstring): trlax engines vs transformers, alternating per repeat."""
    import torch

    from trlax.models import load_pretrained
    from trlax.rollouts import JaxSampler, SamplingConfig, left_pad

    with tempfile.TemporaryDirectory() as path:
        hf, n_params, size = build_checkpoint(path)
        ours = load_pretrained(path)
    vocab, n_prompts, G = size["vocab_size"], 16, 8
    stop = tuple(range(100, 148))
    print(f"checkpoint: Qwen2 {n_params / 1e6:.1f}M params {size}; {n_prompts} prompts x G={G}; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rng = np.random.RandomState(0)
    table = []
    for case, plen, n_new, stops in (("a", (1024, 1025), 64, ()), ("b", (48, 65), 512, stop)):
        if case not in cases:
            continue
        prompts = [rng.randint(200, vocab, rng.randint(*plen)).tolist() for _ in range(n_prompts)]
        ids, mask = left_pad(prompts, 0)
        base = SamplingConfig(max_new_tokens=n_new, temperature=1.0, stop_token_ids=stops, num_generations=G)
        engines = [("reference (prompt x G)", dict(share_prefix=False)), ("shared prefix, static", {})]
        if case == "b":
            engines += [(f"shared prefix, {k} slots", dict(decode_slots=k)) for k in slots]
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask.astype(np.int64))

        def run_hf(seed):
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=n_new, do_sample=True,
                                  temperature=1.0, top_k=None, top_p=1.0, num_return_sequences=G, pad_token_id=0,
                                  eos_token_id=list(stops) or None, min_new_tokens=0 if stops else n_new)
            comp = out[:, ids.shape[1]:].numpy()
            if not stops:
                return comp.size
            hit = np.isin(comp, stops)
            first = np.where(hit.any(1), hit.argmax(1) + 1, comp.shape[1])
            return int(first.sum())

        run_hf(0)  # warm-up
        samplers = []
        for name, kw in engines:
            sm = JaxSampler(ours, base, **kw)

            def run_trlax(seed, sm=sm):
                r = sm.generate(sm.default_params, (ids, mask), jax.random.key(seed))
                return int(np.asarray(r.completion_mask).sum())

            t0 = time.perf_counter()
            run_trlax(0)
            samplers.append((name, sm, run_trlax, time.perf_counter() - t0))
        res = {name: [] for name, *_ in engines}
        res["transformers"] = []
        for i in range(repeats):  # alternate the sides so that background load hits all alike
            for name, sm, fn, _ in samplers:
                t0 = time.perf_counter()
                toks = fn(i + 1)
                res[name].append((toks, time.perf_counter() - t0, sm.last_stats["slot_utilization"]))
            t0 = time.perf_counter()
            toks = run_hf(i + 1)
            res["transformers"].append((toks, time.perf_counter() - t0, float("nan")))
        tps = {k: statistics.median(t / s for t, s, _ in v) for k, v in res.items()}
        ref = tps["reference (prompt x G)"]
        for name, *rest in samplers + [("transformers", None, None, float("nan"))]:
            v = res[name]
            table.append((case, name, statistics.median(t for t, _, _ in v), tps[name], tps[name] / ref,
                          tps[name] / tps["transformers"], statistics.median(u for *_, u in v), rest[-1]))
    print()
    print("| case | engine | useful tokens | tok/s | vs reference | vs transformers | slot use | compile s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for c, name, toks, t, r, h, u, comp in table:
        print(f"| {c} | {name} | {toks:,.0f} | {t:,.0f} | {r:.2f}x | {h:.2f}x | "
              f"{'-' if u != u else f'{u:.2f}'} | {'-' if comp != comp else f'{comp:.1f}'} |")
    best = {c: max((row for row in table if row[0] == c and row[1] != "transformers"), key=lambda r: r[3])
            for c in cases}
    if "a" in best:
        a = best["a"]
        print(f"\n(a) prefix sharing >= 4x the reference: {'met' if a[4] >= 4 else 'NOT met'} ({a[4]:.2f}x, {a[1]})")
    if "b" not in best:
        return
    b = best["b"]
    print(f"(b) continuous batching >= 1.5x the reference: {'met' if b[4] >= 1.5 else 'NOT met'} ({b[4]:.2f}x, "
          f"{b[1]}); slot use >= 0.85: {'met' if b[6] >= 0.85 else 'NOT met'} ({b[6]:.2f})")
    print(f"(c) >= 3x transformers on (b): {'met' if b[5] >= 3 else 'NOT met'} ({b[5]:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grpo", action="store_true", help="the GRPO-shaped table (module docstring)")
    ap.add_argument("--slots", default="16,32", help="--grpo: continuous-batching slot counts for case (b)")
    ap.add_argument("--cases", default="ab", help="--grpo: which cases to run (a, b or ab)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    args = ap.parse_args()
    if args.grpo:
        return grpo_cases(args.repeats or 2, [int(k) for k in args.slots.split(",")], args.cases)
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
