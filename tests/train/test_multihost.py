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

Lean on purpose (each subprocess pays the JAX import and the compiles): three launches of 2 processes (GRPO and
DPO to the end; SFT killed after its second checkpoint, whose logged losses and checkpoints serve the SFT
comparison, the elastic resumes and the restart), one 8-device process (the three references, an elastic
resume, an export of the killed run's checkpoint 2) and one 2-device process (an elastic resume, the restart
after the kill), both started (imports, devices) before the launches and run after them, module-scoped and
reused by every assertion; the subprocesses share a persistent compilation cache in the module's tmp dir."""

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
    # beta > 0 (reference log-probs) and two optimiser steps per generation (old log-probs; the second step's
    # rows move between processes on the devices)
    # (the default job's warm start off; its held-out evaluation on 1% of the prompts: 6 prompts x 4 samples,
    # before step 1 and after step 2)
    # rewards: the built-in accuracy (0 for an untrained model) and a user function that varies between
    # samples (the fraction of digits: non-zero advantages, so the policy term moves the parameters)
    "grpo": ["--num_generations", "4", "--beta", "0.04", "--steps_per_generation", "2",
             "--sft_warmup_steps", "0", "--eval_split", "0.01", "--reward_funcs", "mh_rewards:digits,accuracy"],
}
REWARDS_MODULE = '''
def digits(prompts, completions, completion_ids, **columns):
    """The fraction of the completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''
COMMON = ["--max_steps", "2", "--batch_size", "8", "--max_prompt_length", "4", "--max_completion_length", "3",
          "--mesh_fsdp", "2", "--progress", "false"]
WAIT_S = 240  # bound on every subprocess


_CACHE = {}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = env.get("TRLAX_TEST_XLA_FLAGS", "")  # the test session's compile flags (conftest.py)
    if _CACHE:  # one persistent compilation cache for this module's subprocesses (model init, checkpoint ops)
        env["JAX_COMPILATION_CACHE_DIR"] = _CACHE["dir"]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if "root" in _CACHE:  # the user reward module (mh_rewards.py) importable by every process
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_CACHE["root"], env.get("PYTHONPATH", "")) if p)
    return env


def _rows(path, split=None):
    """The training rows of a metrics.jsonl (``split="eval"``: its held-out evaluation rows)."""
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if r.get("split") == split]


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


def _launch(out, args, grace=5):
    cmd = [sys.executable, "-m", "trlax.train.cli", "launch", "--nproc", "2", "--devices_per_proc", "4",
           "--grace_s", str(grace), "--timeout_s", str(WAIT_S - 20), "--", "train", *args, "--output_dir", str(out)]
    return subprocess.Popen(cmd, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_launch(out, args):
    proc = None
    try:
        proc = _launch(out, args)
        stdout, stderr = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
        return stdout
    finally:
        _kill_all(proc, out)


_WORKER = """
import json, os, sys, time
import jax
assert jax.device_count() == {n}, jax.devices()
from trlax.train import cli, loops  # imported (and the devices started) while the launches run
go, t0 = sys.argv[1], time.monotonic()
while not os.path.exists(go):  # the test writes the list of calls when their inputs are there
    assert time.monotonic() - t0 < {wait}, "never told to go"
    time.sleep(0.1)
with open(go) as fh:
    calls = json.load(fh)
for c in calls:
    assert cli.main(c) == 0, c
"""


class _Worker:
    """A process with ``devices`` simulated devices, started early (its start-up overlaps the launches), that
    runs the ``trlax`` argv lists handed to :meth:`go` (nothing runs alongside the launches: with 2 shared
    cores, concurrent runs only slow the launches' collectives down)."""

    def __init__(self, root, name, devices):
        env = _env()
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {env.get('TRLAX_TEST_XLA_FLAGS', '')}"
        self.go_path, self.log = str(root / f"{name}.go"), str(root / f"{name}.log")
        self._out = open(self.log, "w")
        code = _WORKER.format(n=devices, wait=WAIT_S * 3)
        self.proc = subprocess.Popen([sys.executable, "-c", code, self.go_path], env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT, text=True)

    def go(self, calls):
        with open(self.go_path + ".tmp", "w") as fh:
            json.dump(calls, fh)
        os.replace(self.go_path + ".tmp", self.go_path)

    def finish(self) -> str:
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        finally:
            self.kill()
        with open(self.log) as fh:
            out = fh.read()
        assert rc == 0, out[-5000:]
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._out.close()


def _resume_copy(src, dst, step):
    """``src``'s run as if killed right after checkpoint ``step``: later checkpoints removed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "summary.json", "launch"))
    for d in os.listdir(os.path.join(dst, "checkpoints")):
        if not d.isdigit() or int(d) > step:
            shutil.rmtree(os.path.join(dst, "checkpoints", d))


RESUME = ["--resume", "true", "--max_steps", "2", "--progress", "false", "--batch_size", "8",
          "--max_prompt_length", "4", "--max_completion_length", "3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    # the test session's persistent compilation cache (tests/conftest.py) when there is one, else the module's
    _CACHE["dir"] = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "jax_cache")
    _CACHE["root"] = str(root)
    (root / "mh_rewards.py").write_text(REWARDS_MODULE)
    yield root
    _CACHE.clear()


@pytest.fixture(scope="module")
def workers(root):
    """The one-process runs (8 devices; 2 devices), started before the launches."""
    w = {}
    try:
        w["8"] = _Worker(root, "one_8", 8)
        w["2"] = _Worker(root, "one_2", 2)
        yield w
    finally:
        for k in ("8", "2"):
            if k in w:
                w[k].kill()


@pytest.fixture(scope="module")
def runs(root, workers):
    """GRPO and DPO launched as 2 processes x 4 devices; launch 0's stdout kept."""
    out = {"root": root}
    for algo in ("grpo", "dpo"):
        out[algo] = str(root / f"{algo}_2x4")
        out[f"{algo}_stdout"] = _run_launch(out[algo], [algo, *COMMON, *ALGOS[algo]])
    return out


@pytest.fixture(scope="module")
def killed(runs):
    """SFT launched as 2 x 4 with a checkpoint every step and no end in sight; process 1 is SIGKILLed once
    checkpoint 2 is finalised (heartbeat timeout 10 s: process 0 then aborts by itself, well within the
    launcher's 40 s of grace). Returns what the launcher did."""
    out = str(runs["root"] / "sft_2x4")
    args = ["sft", *COMMON, "--max_steps", "100000", "--save_every", "1", "--keep_checkpoints", "1000",
            "--export", "false", "--heartbeat_timeout_s", "10"]  # the last --max_steps wins
    proc, res = None, {"out": out}
    try:
        proc = _launch(out, args, grace=40)
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
    res["last"] = max(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit())
    res["rows"] = _rows(os.path.join(out, "metrics.jsonl"))  # as the kill left them
    return res


@pytest.fixture(scope="module")
def one_process(root, workers, killed):
    """On 8 devices: the three references (the launches' configs in 1 process); the killed SFT run's
    checkpoint 1 resumed on data 2 x fsdp 4 for one step (el8); its checkpoint 2 restored and exported (k2).
    Then on 2 devices: checkpoint 1 resumed on data 2 x fsdp 1 (el2); the killed run itself restarted with
    --resume for one step."""
    res = {"ref": {a: str(root / f"{a}_1x8") for a in ALGOS}}
    for name, step in (("el8", 1), ("k2", 2), ("el2", 1)):
        _resume_copy(killed["out"], str(root / name), step)
        res[name] = str(root / name)
    workers["8"].go([["train", a, "--output_dir", res["ref"][a], *COMMON, *extra] for a, extra in ALGOS.items()]
                    + [["train", "sft", "--output_dir", res["el8"], *RESUME, "--mesh_fsdp", "4"],
                       ["train", "sft", "--output_dir", res["k2"], *RESUME, "--mesh_fsdp", "2"]])
    res["stdout8"] = workers["8"].finish()
    workers["2"].go([["train", "sft", "--output_dir", res["el2"], *RESUME, "--mesh_fsdp", "1"],
                     ["train", "sft", "--output_dir", killed["out"], *RESUME[:2], "--max_steps",
                      str(killed["last"] + 1), *RESUME[4:], "--mesh_fsdp", "1", "--export", "false"]])
    res["stdout2"] = workers["2"].finish()
    return res


def _close(a, b, what):
    for key in ("loss", "grad_norm") + (("reward", "completion_length") if "reward" in a[0] else ()):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{what}: {key}")


def _same_params(dir_a, dir_b):
    a, b = _params(dir_a), _params(dir_b)
    assert sorted(a) == sorted(b)
    for k in a:
        # atol 1e-5 (lr 3e-3 steps): Adam's m / sqrt(v) turns float-rounding differences of near-zero gradient
        # entries into ~5e-6 parameter differences (measured: 3 of 1216 lm_head entries after 2 GRPO steps)
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=f"{dir_b}: {k}")


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_launch_equals_one_process_eight_devices(runs, one_process, algo):
    """`trlax launch --nproc 2` of grpo / dpo on the built-in tasks: every step's loss (the first included),
    gradient norm (GRPO: reward, completion length) and the exported parameters after 2 steps equal the
    1-process 8-device run of the same config (rtol 1e-5)."""
    multi = _rows(os.path.join(runs[algo], "metrics.jsonl"))
    one = _rows(os.path.join(one_process["ref"][algo], "metrics.jsonl"))
    assert [r["step"] for r in multi] == [r["step"] for r in one] == [1, 2]
    _close(multi, one, algo)
    _same_params(one_process["ref"][algo], runs[algo])
    if algo == "grpo":  # the rewards vary within groups (else both runs would leave the parameters as they are)
        assert min(r["frac_reward_zero_std"] for r in one) < 1 and max(r["rewards/digits"] for r in one) > 0, one
    if algo == "grpo":  # held-out evaluation: one global sampling program, each process scoring its completions
        ev_multi = _rows(os.path.join(runs[algo], "metrics.jsonl"), "eval")
        ev_one = _rows(os.path.join(one_process["ref"][algo], "metrics.jsonl"), "eval")
        assert [r["step"] for r in ev_multi] == [r["step"] for r in ev_one] == [0, 2]
        keys = sorted(k for k in ev_one[0] if k.startswith("eval/"))
        assert {"eval/reward", "eval/accuracy", "eval/pass@4", "eval/rewards/digits"} <= set(keys) and keys == sorted(
            k for k in ev_multi[0] if k.startswith("eval/"))
        for a, b in zip(ev_multi, ev_one):
            np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-6, err_msg=str(keys))
        assert all(r["eval/rewards/digits"] > 0 for r in ev_one), ev_one  # a figure that can differ
        summary = json.load(open(os.path.join(runs[algo], "summary.json")))
        assert summary["eval_prompts"] == 6, summary


def test_launched_sft_equals_one_process(killed, one_process):
    """SFT launched as 2 x 4 (the run killed later): its first two logged steps equal the 1-process 8-device
    run's, and the parameters in its checkpoint 2 (written by both processes, restored and exported by one
    process) equal the reference's after 2 steps (rtol 1e-5)."""
    ref = _rows(os.path.join(one_process["ref"]["sft"], "metrics.jsonl"))
    _close(killed["rows"][:2], ref, "sft")
    _same_params(one_process["ref"]["sft"], one_process["k2"])


def test_launch_writes_logs_and_export_once(runs):
    """Process 0 alone writes metrics (one row per step), the plot, TensorBoard, the summary and the HF export;
    process 1's output goes to launch/process_1.log; the final checkpoint is written by both into one directory."""
    out = runs["dpo"]
    assert "process 0 of 2: 4 local / 8 global devices" in runs["dpo_stdout"]
    with open(os.path.join(out, "launch", "process_1.log")) as fh:
        assert "process 1 of 2: 4 local / 8 global devices" in fh.read()
    assert [r["step"] for r in _rows(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    assert runs["dpo_stdout"].count('"exported_to"') == 1
    for f in ("summary.json", "curves.png", "config.yaml", "final/model.safetensors", "final/config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    assert sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == ["2"]


def test_elastic_resume_into_other_device_counts(killed, one_process):
    """The orbax checkpoint 1 written by 2 processes x 4 devices (data 4 x fsdp 2) resumes in one process on 8
    devices (data 2 x fsdp 4) and on 2 devices (data 2): step 2's loss equals the uninterrupted runs' (the
    2-process run's and the 1-process reference's, rtol 1e-5), and so do the parameters after it."""
    ref = _rows(os.path.join(one_process["ref"]["sft"], "metrics.jsonl"))
    assert one_process["stdout8"].count("resumed from step 1 ") == 1
    assert "resumed from step 1 " in one_process["stdout2"]
    for name in ("el8", "el2"):
        rows = _rows(os.path.join(one_process[name], "metrics.jsonl"))
        assert [r["step"] for r in rows] == [1, 2], name
        np.testing.assert_allclose(rows[1]["loss"], killed["rows"][1]["loss"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(rows[1]["loss"], ref[1]["loss"], rtol=1e-5, err_msg=name)
        _same_params(one_process["ref"]["sft"], one_process[name])


def test_killed_process_stops_the_launch_and_the_run_resumes(killed, one_process):
    """SIGKILL of process 1 mid-run: process 0 exits by itself with an error (the coordinator's heartbeat
    timeout, or a broken collective), the launcher exits non-zero within 60 s naming process 1 and its signal,
    no process of the run is left; restarted with --resume true (here on 1 process x 2 devices) the run
    continues from the last finalised checkpoint (its metrics rows: one per step, none lost or repeated)."""
    assert killed["rc"] != 0
    assert killed["seconds"] < 60, killed["seconds"]
    err = killed["stderr"]
    assert f"process 1 (pid {killed['pids'][1]}) was killed by SIGKILL" in err, err[-3000:]
    assert "killed process(es)" not in err, err[-3000:]  # process 0 stopped by itself, with an error
    assert "stopped sending heartbeats" in err or "process 0 exited with code" in err, err[-3000:]
    assert killed["alive"] == []
    last = killed["last"]
    assert last >= 2
    assert f"resumed from step {last} " in one_process["stdout2"]
    rows = _rows(os.path.join(killed["out"], "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, last + 2))


def test_launcher_arguments_and_environment():
    """In-process, no JAX started: the command after `--` must be `train NAME`; each process gets its own
    device count (replacing any in XLA_FLAGS, keeping the other flags), CPU only, gloo; ports are free."""
    from trlax.train import launch

    assert launch.main(["train", "sft"]) == 2  # no `--`
    assert launch.main(["--nproc", "2", "--", "sft"]) == 2
    env = launch.child_env(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1", "A": "b"})
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo" and env["A"] == "b"
    assert launch._output_dir(["train", "sft", "--output_dir", "x/y"]) == "x/y"
    assert launch._output_dir(["train", "sft"]) == os.path.join("runs", "sft")
    p = launch.free_port()
    assert 0 < p < 65536
