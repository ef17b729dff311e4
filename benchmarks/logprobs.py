"""Benchmark: fused chunked log-prob / entropy kernel vs the plain log-softmax path vs TRL.

Claim (issue "models/ + memory-lean log-prob kernel"): at vocabulary 151,936, hidden 1024 and 16k tokens,
``trlax.objectives.fused_logps_and_entropy`` (hidden states + LM head, chunks over tokens, custom VJP)
needs at most 1/8 of the peak memory of the plain path (``logits = h @ Wᵀ`` then
``logps_and_entropy``), in at most 1.3x its time. TRL 1.16's ``selective_log_softmax`` +
``entropy_from_logits`` (eager PyTorch, float32, same inputs) is the peer.

Three paths on the same float32 inputs, in one process, two modes each: ``fwd`` (log-probs + entropies,
as for old / reference log-probs) and ``fwd+bwd`` (value and gradient w.r.t. hidden states and the LM
head of ``Σ c1·logp + c2·H``, as in a train step).

Memory, two measurements:
- ``xla_peak``: XLA's compiled memory analysis (``jit(f).lower(...).compile().memory_analysis()``),
  ``temp + output`` bytes, i.e. everything the computation allocates beyond its inputs (the inputs,
  identical for all paths, are excluded). Compile-only, so it is reported even where a path is too
  big to run on this machine. Not available for PyTorch.
- ``rss_peak``: growth of the process resident set size over the run, sampled every 2 ms from
  ``/proc/self/statm`` by a background thread (peak RSS during the call minus RSS before it).

Time: wall-clock median of ``--repeats`` runs after compilation (jit compile excluded, reported
separately); the jitted paths and TRL alternate so background load hits all sides alike. A path whose
estimated need exceeds the machine's available memory (minus a 3 GiB margin) is not run; the table
says so.

    python benchmarks/logprobs.py            # full: V=151936, H=1024, tokens 16384 (and 4096)
    python benchmarks/logprobs.py --quick    # small shapes, < 1 minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives import fused_logps_and_entropy, logps_and_entropy

GiB = 1024 ** 3
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak RSS growth during a ``with`` block, sampled by a thread every 2 ms."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.delta = self.peak - self.base


# ------------------------------------------------------------------------------------------ paths


def make_jax(path, mode, temperature, chunk):
    def values(h, w, y):
        if path == "fused":
            return fused_logps_and_entropy(h, w, y, temperature, chunk_size=chunk)
        logits = jnp.einsum("nh,vh->nv", h, w, preferred_element_type=jnp.float32)
        return logps_and_entropy(logits, y, temperature)

    if mode == "fwd":
        return jax.jit(values)

    def loss(h, w, y, c1, c2):
        lp, ent = values(h, w, y)
        return jnp.sum(c1 * lp) + jnp.sum(c2 * ent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def make_trl(mode, temperature, arrays):
    import torch
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    torch.set_num_threads(os.cpu_count() or 1)
    h, w, y, c1, c2 = (torch.from_numpy(np.asarray(a)) for a in arrays)
    # TRL sees [B, T, ...] batches (its selective_log_softmax loops over B): sequences of 1024 tokens.
    t = min(1024, h.shape[0])
    b = h.shape[0] // t
    h, y, c1, c2 = h.reshape(b, t, -1), y.long().reshape(b, t), c1.reshape(b, t), c2.reshape(b, t)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                logits = h @ w.T
                lp = selective_log_softmax(logits, y, temperature)
                ent = entropy_from_logits(logits / temperature)
            return lp, ent
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = hh @ ww.T
        lp = selective_log_softmax(logits, y, temperature)
        ent = entropy_from_logits(logits / temperature)
        loss = (c1 * lp).sum() + (c2 * ent).sum()
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    return run


def _block(x):
    jax.block_until_ready(x)
    return x


# ------------------------------------------------------------------------------------------ bench


def bench(n, hdim, v, mode, args, rows):
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((n, hdim), np.float32))
    w = (rng.standard_normal((v, hdim), np.float32) * (1.0 / np.sqrt(hdim))).astype(np.float32)
    y = rng.integers(0, v, n).astype(np.int32)
    c1 = rng.standard_normal(n).astype(np.float32)
    c2 = rng.standard_normal(n).astype(np.float32)
    host = (h, w, y, c1, c2)
    dev = tuple(jnp.asarray(a) for a in host)
    call_args = dev[:3] if mode == "fwd" else dev
    nv = n * v * 4

    results, runners = {}, {}
    for path in ("fused", "plain"):
        fn = make_jax(path, mode, args.temperature, args.chunk)
        t = time.perf_counter()
        compiled = fn.lower(*call_args).compile()
        ma = compiled.memory_analysis()
        xla_peak = ma.temp_size_in_bytes + ma.output_size_in_bytes
        results[path] = dict(xla=xla_peak, compile=time.perf_counter() - t, need=xla_peak)
        runners[path] = (lambda c=compiled: _block(c(*call_args)))
    trl_need = nv * (2 if mode == "fwd" else 5)  # logits, logits/τ copy (+ softmax, grads, saved chunks)
    results["trl"] = dict(xla=None, compile=None, need=trl_need)
    runners["trl"] = make_trl(mode, args.temperature, host)

    for path in ("fused", "plain", "trl"):
        avail = mem_available() - 3 * GiB
        if args.skip_run or results[path]["need"] > avail:
            results[path]["skip"] = (f"not run: needs ~{results[path]['need'] / GiB:.1f} GiB, "
                                     f"{max(avail, 0) / GiB:.1f} GiB available") if not args.skip_run else "not run"
            runners.pop(path)
    times = {p: [] for p in runners}
    for _ in range(args.repeats):
        for p, fn in runners.items():
            with PeakRSS() as pk:
                t = time.perf_counter()
                out = fn()
                times[p].append(time.perf_counter() - t)
            del out
            results[p]["rss"] = max(results[p].get("rss", 0), pk.delta)
    for p, ts in times.items():
        results[p]["time"] = statistics.median(ts)

    base = results["plain"]
    for p in ("fused", "plain", "trl"):
        r = results[p]
        rows.append(dict(
            tokens=n, mode=mode, path={"fused": "trlax fused", "plain": "trlax plain", "trl": "TRL torch"}[p],
            xla=r["xla"], rss=r.get("rss"), time=r.get("time"), compile=r["compile"],
            mem_ratio=(r["xla"] / base["xla"]) if r["xla"] is not None else None,
            time_ratio=(r["time"] / base["time"]) if "time" in r and "time" in base else None,
            note=r.get("skip", "")))


def fmt_bytes(b):
    return "-" if b is None else f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:.1f} MiB"


def print_table(rows, hdim, v, args):
    print(f"\nlog-probs + entropy, V={v}, H={hdim}, float32, temperature={args.temperature}, "
          f"fused chunk={args.chunk}; {jax.devices()[0].device_kind} x{jax.device_count()} "
          f"({os.cpu_count()} CPU threads); repeats={args.repeats}")
    print("xla_peak = XLA compiled memory analysis temp+output bytes (inputs excluded); "
          "rss_peak = process RSS growth during the run (2 ms sampling)")
    hdr = ("tokens", "mode", "path", "xla_peak", "vs plain", "rss_peak", "time", "vs plain", "compile", "note")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        cells = (str(r["tokens"]), r["mode"], r["path"], fmt_bytes(r["xla"]),
                 "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.3f}", fmt_bytes(r["rss"]),
                 "-" if r["time"] is None else f"{r['time']:.2f} s",
                 "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x",
                 "-" if r["compile"] is None else f"{r['compile']:.1f} s", r["note"])
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (V=32768, H=256, 2048 tokens)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--skip-run", action="store_true", help="memory analysis only (compile, do not run)")
    args = ap.parse_args(argv)
    tokens = args.tokens or ([2048] if args.quick else [16384, 4096])
    if any(n % min(n, 1024) for n in tokens):
        ap.error("--tokens must be multiples of 1024 (or smaller than 1024)")
    hdim = args.hidden or (256 if args.quick else 1024)
    v = args.vocab or (32768 if args.quick else 151936)
    args.repeats = args.repeats or (3 if args.quick else 1)
    rows = []
    for n in tokens:
        for mode in args.modes:
            bench(n, hdim, v, mode, args, rows)
            print(f"done: tokens={n} mode={mode}", flush=True)
    print_table(rows, hdim, v, args)


if __name__ == "__main__":
    main()
