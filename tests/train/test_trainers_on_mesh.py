"""Every trainer family (and the trainers whose state mirrors the parameters: SDFT's EMA teacher, BEMA,
TR-DPO's reference) runs on a data=2 x fsdp=2 x tensor=2 mesh of 8 simulated CPU devices (one
subprocess, since the device count is fixed when JAX starts). The offline trainers' first-step loss on the
mesh equals the one-device loss (float32, 1e-4): sharding changes nothing but the placement. The sampling
trainers (RL, online preference, distillation) must run and log finite losses. DPO runs its RPO preset: at
step 1 the policy is the reference, so the plain DPO loss is log 2 on any layout, while RPO's added NLL of the
chosen completions depends on the batch and the model (the gradient norm is compared too)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _trainer_utils import read_metrics, run_trainer

COMPARED = {"kto": {}, "bco": {}, "cpo": {"preset": "simpo"}, "reward": {},
            "prm": {"max_prompt_length": 8, "max_completion_length": 16},
            "dpo": {"preset": "rpo"}, "orpo": {}, "tpo": {}}
RUN_ONLY = {"ppo": {"num_mini_batches": 1, "num_ppo_epochs": 1}, "a2po": {"num_value_samples": 2},
            "online_dpo": {}, "nash_md": {}, "gkd": {"lmbda": 1.0}, "sdft": {},
            "sft": {"bema": True, "bema_update_freq": 1},
            "tr_dpo": {"preset": "tr_dpo", "ref_model_sync_steps": 1}}
ALGO = {"tr_dpo": "dpo"}  # job name -> trainer (default: the job name itself)
COMMON = {"batch_size": 8, "max_prompt_length": 4, "max_completion_length": 3, "progress": False,
          "export": False}


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    jobs = {n: {**COMMON, **kw, "max_steps": 1} for n, kw in COMPARED.items()}
    jobs.update({n: {**COMMON, **kw, "max_steps": 2} for n, kw in RUN_ONLY.items()})
    code = (
        "import os, json, sys\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8 ' + os.environ.get('TRLAX_TEST_XLA_FLAGS', '')\n"
        "import jax\n"
        "assert len(jax.devices()) == 8\n"
        "from trlax.train import loops\n"
        "from trlax.train.config import build_config\n"
        f"jobs = json.loads({json.dumps(json.dumps(jobs))})\n"
        f"algo = json.loads({json.dumps(json.dumps(ALGO))})\n"
        "for name, kw in jobs.items():\n"
        f"    kw = dict(kw, output_dir=os.path.join({str(root)!r}, name), mesh_data=2, mesh_fsdp=2, mesh_tensor=2)\n"
        "    loops.run(algo.get(name, name), build_config(algo.get(name, name), kw))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.parametrize("name", sorted(COMPARED))
def test_offline_first_step_on_mesh_equals_one_device(name, mesh_runs, tmp_path):
    kw = {k: v for k, v in {**COMMON, **COMPARED[name]}.items() if k not in ("progress", "export")}
    run_trainer(name, tmp_path, max_steps=1, mesh_data=1, **kw)
    one, eight = read_metrics(tmp_path)[0], read_metrics(mesh_runs / name)[0]
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eight["grad_norm"], one["grad_norm"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(RUN_ONLY))
def test_sampling_trainers_run_on_mesh(name, mesh_runs):
    rows = read_metrics(mesh_runs / name)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
