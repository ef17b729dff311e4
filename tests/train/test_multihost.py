"""Multi-host for real: `trlax launch --nproc 2 --devices_per_proc 4` (2 processes x 4 simulated CPU devices,
gloo collectives, `jax.distributed.initialize` on a free loopback port) against the same config run by one
process with 8 simulated devices; elastic resume of its orbax checkpoint into 1 x 8 and 1 x 2 devices; a
process SIGKILLed mid-run.

The multi-process run and the one-process run execute the same global programs on the same mesh (data 4 x
fsdp 2): every process takes its block of the same global batch order, so losses and parameters agree to
float32 rounding of the cross-process reductions (rtol 1e-5). GRPO samples with temperature 1: the sampler
is one global program over every process's prompts (`JaxSampler.generate_global`) and its randomness
(`jax.random` draws on the global row index) does not depend on the device layout, so the 2-process run
draws the same tokens as the 1-process run; only a logit within float32 rounding of a sampling boundary
could flip a token (not the case at this seed).

Lean on purpose (each subprocess pays the JAX import and the compiles): 4 launches of 2 processes, one
8-device process (the three references + an elastic resume) and one 2-device process (an elastic resume
and the restart after the kill), module-scoped and reused by every assertion."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ALGOS = {
    "sft": [],
    "dpo": [],
    # beta > 0 (reference log-probs) and two optimiser steps per generation (old log-probs; each step's rows
    # move between processes on the devices)
    "grpo": ["--num_generations", "4", "--beta", "0.04", "--steps_per_generation", "2"],
}
COMMON = ["--max_steps", "3", "--batch_size", "8", "--max_prompt_length", "4", "--max_completion_length", "3",
          "--mesh_fsdp", "2", "--save_every", "1", "--keep_checkpoints", "3", "--progress", "false"]
WAIT_S = 240  # bound on every subprocess


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _rows(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _params(run_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def _pids(out):
    with open(os.path.join(out, "launch", "processes.json")) as fh:
        return json.load(fh)["pids"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_all(proc, out):
    """Kill the launcher and whatever it started (used in ``finally``)."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the launcher kills its processes
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    try:
        pids = _pids(out)
    except (OSError, ValueError):
        pids = []
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _launch(out, args, **popen):
    cmd = [sys.executable, "-m", "trlax.train.cli", "launch", "--nproc", "2", "--devices_per_proc", "4",
           "--timeout_s", str(WAIT_S - 20), "--", "train", *args, "--output_dir", str(out)]
    return subprocess.Popen(cmd, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _run_launch(out, args):
    proc = None
    try:
        proc = _launch(out, args)
        stdout, stderr = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
        return stdout
    finally:
        _kill_all(proc, out)


def _python(code, devices):
    env = _env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=WAIT_S)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


def _resume_copy(src, dst, step):
    """``src``'s run as if killed right after checkpoint ``step``: later checkpoints removed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "summary.json", "launch"))
    for d in os.listdir(os.path.join(dst, "checkpoints")):
        if not d.isdigit() or int(d) > step:
            shutil.rmtree(os.path.join(dst, "checkpoints", d))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three trainers launched as 2 processes x 4 devices; launch 0's stdout kept."""
    root = tmp_path_factory.mktemp("multihost")
    out = {"root": root}
    for algo, extra in ALGOS.items():
        out[algo] = str(root / f"{algo}_2x4")
        out[f"{algo}_stdout"] = _run_launch(out[algo], [algo, *COMMON, *extra])
    return out


@pytest.fixture(scope="module")
def killed(runs):
    """SFT launched as 2 x 4 with a checkpoint every step and no end in sight; process 1 is SIGKILLed once
    checkpoint 2 is finalised. Returns what the launcher did."""
    out = str(runs["root"] / "sft_killed")
    args = ["sft", *COMMON, "--max_steps", "100000", "--export", "false"]  # the last --max_steps wins
    proc, res = None, {"out": out}
    try:
        proc = _launch(out, args)
        t0 = time.monotonic()
        while not os.path.isdir(os.path.join(out, "checkpoints", "2")):
            assert proc.poll() is None, proc.communicate(timeout=10)
            assert time.monotonic() - t0 < WAIT_S, "no checkpoint 2"
            time.sleep(0.05)
        pids = _pids(out)
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        stdout, stderr = proc.communicate(timeout=90)
        res.update(rc=proc.returncode, seconds=time.monotonic() - t_kill, stderr=stderr, pids=pids)
        res["alive"] = [p for p in pids if _alive(p)]
    finally:
        _kill_all(proc, out)
    return res


@pytest.fixture(scope="module")
def one_process(runs, killed):
    """One process: 8 devices (the three references, then SFT's 2 x 4 checkpoint 2 resumed on data 2 x fsdp 4)
    and 2 devices (the same resume on data 2 x fsdp 1; then the killed run restarted with --resume)."""
    root = runs["root"]
    res = {"ref": {a: str(root / f"{a}_1x8") for a in ALGOS}}
    for name in ("el8", "el2"):
        _resume_copy(runs["sft"], str(root / name), 2)
    calls = [["train", a, "--output_dir", res["ref"][a], *COMMON, *extra] for a, extra in ALGOS.items()]
    resume = ["--resume", "true", "--max_steps", "3", "--progress", "false", "--batch_size", "8",
              "--max_prompt_length", "4", "--max_completion_length", "3"]
    calls.append(["train", "sft", "--output_dir", str(root / "el8"), *resume, "--mesh_fsdp", "4"])
    code = "import jax\nassert jax.device_count() == {n}\nfrom trlax.train import cli\n"
    code8 = code.format(n=8) + "".join(f"assert cli.main({c!r}) == 0\n" for c in calls)
    res["stdout8"] = _python(code8, 8)
    last = max(int(d) for d in os.listdir(os.path.join(killed["out"], "checkpoints")) if d.isdigit())
    res["killed_last"] = last
    calls2 = [["train", "sft", "--output_dir", str(root / "el2"), *resume, "--mesh_fsdp", "1"],
              ["train", "sft", "--output_dir", killed["out"], *resume[:2], "--max_steps", str(last + 1),
               *resume[4:], "--mesh_fsdp", "1", "--export", "false"]]
    res["stdout2"] = _python(code.format(n=2) + "".join(f"assert cli.main({c!r}) == 0\n" for c in calls2), 2)
    res["el8"], res["el2"] = str(root / "el8"), str(root / "el2")
    return res


@pytest.mark.parametrize("algo", list(ALGOS))
def test_launch_equals_one_process_eight_devices(runs, one_process, algo):
    """`trlax launch --nproc 2` of grpo / dpo / sft on the built-in tasks: every step's loss (the first
    included) and the exported parameters after 3 steps equal the 1-process 8-device run (rtol 1e-5)."""
    multi, one = _rows(os.path.join(runs[algo], "metrics.jsonl")), _rows(
        os.path.join(one_process["ref"][algo], "metrics.jsonl"))
    assert [r["step"] for r in multi] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "grad_norm") + (("reward", "completion_length") if algo == "grpo" else ()):
        np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in one], rtol=1e-5, atol=1e-7, err_msg=key)
    a, b = _params(runs[algo]), _params(one_process["ref"][algo])
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_launch_writes_logs_and_export_once(runs):
    """Process 0 alone writes metrics (one row per step), the plot, TensorBoard, the summary and the HF export;
    process 1's output goes to launch/process_1.log; the checkpoints hold steps 1-3, written by both."""
    out = runs["sft"]
    assert "process 0 of 2: 4 local / 8 global devices" in runs["sft_stdout"]
    with open(os.path.join(out, "launch", "process_1.log")) as fh:
        assert "process 1 of 2: 4 local / 8 global devices" in fh.read()
    assert [r["step"] for r in _rows(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    assert runs["sft_stdout"].count('"exported_to"') == 1
    for f in ("summary.json", "curves.png", "config.yaml", "final/model.safetensors", "final/config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    assert sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == ["1", "2", "3"]


def test_elastic_resume_into_other_device_counts(runs, one_process):
    """The orbax checkpoint written by 2 processes x 4 devices (data 4 x fsdp 2) at step 2 resumes in one
    process on 8 devices (data 2 x fsdp 4) and on 2 devices (data 2): step 3's loss equals the
    uninterrupted run's (rtol 1e-5), and so do the final parameters."""
    full = _rows(os.path.join(runs["sft"], "metrics.jsonl"))
    assert one_process["stdout8"].count("resumed from step 2") == 1
    assert "resumed from step 2" in one_process["stdout2"]
    for name in ("el8", "el2"):
        rows = _rows(os.path.join(one_process[name], "metrics.jsonl"))
        assert [r["step"] for r in rows] == [1, 2, 3], name
        np.testing.assert_allclose(rows[2]["loss"], full[2]["loss"], rtol=1e-5, err_msg=name)
        a, b = _params(runs["sft"]), _params(one_process[name])
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")


def test_killed_process_stops_the_launch_and_the_run_resumes(killed, one_process):
    """SIGKILL of process 1 mid-run: the launcher exits non-zero within 60 s naming process 1 and its signal,
    no process of the run is left; restarted with --resume true (here on 1 process x 2 devices) the run
    continues from the last finalised checkpoint."""
    assert killed["rc"] != 0
    assert killed["seconds"] < 60, killed["seconds"]
    assert f"process 1 (pid {killed['pids'][1]}) was killed by SIGKILL" in killed["stderr"], killed["stderr"][-3000:]
    assert killed["alive"] == []
    last = one_process["killed_last"]
    assert last >= 2
    assert f"resumed from step {last}" in one_process["stdout2"]
    rows = _rows(os.path.join(killed["out"], "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, last + 2))
    full = _rows(os.path.join(one_process["ref"]["sft"], "metrics.jsonl"))  # same data, seed and steps
    for r, f in zip(rows, full):
        np.testing.assert_allclose(r["loss"], f["loss"], rtol=1e-5, err_msg=str(r["step"]))
