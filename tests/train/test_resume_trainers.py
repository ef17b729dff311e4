"""Kill + --resume is exact for the trainers that carry state beyond params / optimiser / data position:
PPO (value model, adaptive KL coefficient), A*-PO (cached V* of reference samples), TR-DPO (synced
reference parameters), GRPO with the adaptive entropy controller, SDFT (EMA teacher). A run killed after
step 2 and resumed logs exactly the losses of an uninterrupted run and ends with the same weights."""

import numpy as np
import pytest

from _trainer_utils import read_metrics, run_killed_after, run_trainer

CASES = {
    "ppo": dict(kl_ctl="adaptive", batch_size=4, num_mini_batches=1, num_ppo_epochs=2),
    "a2po": dict(batch_size=4, num_value_samples=2),
    "dpo": dict(preset="tr_dpo", batch_size=4, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
    "grpo": dict(preset="skywork_or1", batch_size=4, num_generations=2, entropy_target=5.0),
    "sdft": dict(batch_size=4),
}


def _safetensors(path):
    from safetensors.numpy import load_file

    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("name", sorted(CASES))
def test_kill_and_resume_is_exact(name, tmp_path, monkeypatch):
    kw = dict(CASES[name], max_steps=4, save_every=2, export=True, seed=1)
    full = run_trainer(name, tmp_path / "full", **kw)

    run_killed_after(name, tmp_path / "part", monkeypatch, 2, **kw)
    assert not (tmp_path / "part" / "final").exists()
    part = run_trainer(name, tmp_path / "part", resume=True, **kw)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = _safetensors(full["exported_to"]), _safetensors(part["exported_to"])
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
