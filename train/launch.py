"""``trlax launch``: a multi-process run on one machine, the local twin of a multi-host pod run.

    trlax launch --nproc 2 --devices_per_proc 4 -- train grpo --mesh_fsdp 2 --output_dir runs/grpo2

starts ``nproc`` processes of ``trlax train ...`` on this machine, each owning ``devices_per_proc``
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``, ``JAX_PLATFORMS=cpu``,
gloo collectives), joined by ``jax.distributed.initialize`` through a coordinator on a free loopback
port (``--distributed true --coordinator_address 127.0.0.1:PORT --num_processes N --process_id i`` are
appended to the command). The mesh then spans ``nproc x devices_per_proc`` devices, exactly as the same
``trlax train`` command run on every host of a pod.

Process 0's output is streamed; the others write ``<output_dir>/launch/process_<i>.log`` (``--log_dir``
to put them elsewhere). The launcher exits 0 when every process does. When one fails (non-zero exit or
killed by a signal) it names that process, gives the others ``--grace_s`` seconds to stop by themselves
(they do: the coordinator's heartbeat timeout, ``--heartbeat_timeout_s`` of ``trlax train``, or a broken
collective makes them exit with an error), then kills what is left, prints the tail of the failed
process's log and exits 1. Children die with the launcher (``PR_SET_PDEATHSIG``) and are killed on
SIGINT / SIGTERM, so no process outlives it. ``--timeout_s`` bounds the whole run (exit 124).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional


def free_port() -> int:
    """A free TCP port on the loopback interface (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _output_dir(train_args: List[str]) -> str:
    """The run's ``--output_dir`` (``trlax train``'s default ``runs/<algo>`` when absent)."""
    for i, tok in enumerate(train_args):
        if tok.startswith("--output_dir="):
            return tok.split("=", 1)[1]
        if tok in ("--output_dir", "--output-dir") and i + 1 < len(train_args):
            return train_args[i + 1]
    algo = train_args[1] if len(train_args) > 1 else "run"
    return os.path.join("runs", algo)


def child_env(devices_per_proc: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of one process: ``devices_per_proc`` simulated CPU devices, CPU only, gloo."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_proc}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when the launcher dies, whatever killed it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setpgrp()  # its own process group: killing the group takes any grandchildren too


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _tail(path: Optional[str], n: int = 30) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-n:])


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def launch(train_args: List[str], *, nproc: int = 2, devices_per_proc: int = 4, port: int = 0,
           log_dir: str = "", grace_s: float = 5.0, timeout_s: float = 0.0, python: str = sys.executable) -> int:
    """Run ``trlax <train_args>`` as ``nproc`` cooperating processes; returns the exit code (see module doc)."""
    if nproc < 1 or devices_per_proc < 1:
        raise ValueError(f"nproc={nproc} / devices_per_proc={devices_per_proc} must be >= 1")
    if not train_args or train_args[0] != "train":
        raise ValueError(f"the command after `--` must be `train NAME ...`, got {' '.join(train_args)!r}")
    port = port or free_port()
    out_dir = _output_dir(train_args)
    log_dir = log_dir or os.path.join(out_dir, "launch")
    os.makedirs(log_dir, exist_ok=True)
    env = child_env(devices_per_proc)
    procs: List[subprocess.Popen] = []
    logs: List[Optional[str]] = []
    files = []

    def on_signal(signum, _frame):
        _kill(procs)
        print(f"trlax launch: got {signal.Signals(signum).name}; killed all {len(procs)} processes", file=sys.stderr)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        for i in range(nproc):
            cmd = [python, "-m", "trlax.train.cli", *train_args, "--distributed", "true",
                   "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(nproc),
                   "--process_id", str(i)]
            if i == 0:
                out, path = None, None  # streamed: inherits the launcher's stdout / stderr
            else:
                path = os.path.join(log_dir, f"process_{i}.log")
                out = open(path, "w")
                files.append(out)
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                          preexec_fn=_die_with_parent))
            logs.append(path)
        with open(os.path.join(log_dir, "processes.json"), "w") as fh:
            json.dump({"port": port, "pids": [p.pid for p in procs], "logs": logs}, fh)
        print(f"trlax launch: {nproc} processes x {devices_per_proc} CPU devices, coordinator 127.0.0.1:{port}, "
              f"pids {[p.pid for p in procs]}, logs of processes 1.. in {log_dir}", flush=True)
        failed: Optional[int] = None
        while True:
            codes = [p.poll() for p in procs]
            if failed is None:
                bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = bad[0]
                    t_fail = time.monotonic()
                    print(f"trlax launch: process {failed} (pid {procs[failed].pid}) {_describe(codes[failed])}; "
                          f"waiting up to {grace_s:g} s for the others, then killing them", file=sys.stderr,
                          flush=True)
            if all(c is not None for c in codes):
                break
            if failed is not None and time.monotonic() - t_fail > grace_s:
                alive = [i for i, c in enumerate(codes) if c is None]
                _kill(procs)
                print(f"trlax launch: killed process(es) {alive} still running {grace_s:g} s after process "
                      f"{failed} died", file=sys.stderr, flush=True)
                break
            if timeout_s and time.monotonic() - t0 > timeout_s:
                _kill(procs)
                print(f"trlax launch: timed out after {timeout_s:g} s; killed all processes", file=sys.stderr)
                return 124
            time.sleep(0.1)
        codes = [p.wait() for p in procs]
        if failed is None and all(c == 0 for c in codes):
            return 0
        if failed is None:
            failed = next(i for i, c in enumerate(codes) if c != 0)
        others = ", ".join(f"process {i} {_describe(c)}" for i, c in enumerate(codes) if i != failed)
        print(f"trlax launch: FAILED: process {failed} (pid {procs[failed].pid}) {_describe(codes[failed])} "
              f"after {time.monotonic() - t0:.1f} s" + (f"; {others}" if others else ""), file=sys.stderr)
        tail = _tail(logs[failed])
        if tail:
            print(f"--- last lines of {logs[failed]} ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        _kill(procs)
        for f in files:
            f.close()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        k = argv.index("--")
        own, train_args = argv[:k], argv[k + 1:]
    elif "-h" in argv or "--help" in argv:
        own, train_args = argv, []
    else:
        print("error: usage: trlax launch [--nproc N] [--devices_per_proc D] -- train NAME ...", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="trlax launch", description=__doc__.replace("``", "`"),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="trlax launch [options] -- train NAME [--name value ...]")
    ap.add_argument("--nproc", type=int, default=2, help="processes (simulated hosts); default 2")
    ap.add_argument("--devices_per_proc", type=int, default=4, help="simulated CPU devices per process; default 4")
    ap.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    ap.add_argument("--log_dir", default="", help="logs of processes 1.. (default <output_dir>/launch)")
    ap.add_argument("--grace_s", type=float, default=5.0,
                    help="after a process fails, seconds the others get to exit by themselves before being killed")
    ap.add_argument("--timeout_s", type=float, default=0.0, help="kill everything after this many seconds (0: none)")
    a = ap.parse_args(own)
    try:
        return launch(train_args, nproc=a.nproc, devices_per_proc=a.devices_per_proc, port=a.port,
                      log_dir=a.log_dir, grace_s=a.grace_s, timeout_s=a.timeout_s)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["child_env", "free_port", "launch", "main"]
