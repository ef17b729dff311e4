"""The first optimiser step of the GRPO / DPO / SFT trainers logs exactly the objective called directly on
the captured batch with the initial parameters (the model forward recomputed outside the train step)."""

import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_utils import (addition_task_rewards, capture_first_step, check_loss_and_grad, gather_logps,
                            group_advantages, plain_completion_logits, run_trainer)
from trlax.train.config import loss_config


def _logps(run, params, ids_p, mask_p, ids_c, mask_c, temperature=1.0):
    return run.policy.completion_logps(params, jnp.asarray(ids_p), jnp.asarray(mask_p), jnp.asarray(ids_c),
                                       jnp.asarray(mask_c), temperature=temperature)


def test_grpo_first_step_equals_policy_loss(tmp_path, monkeypatch):
    from trlax.objectives import policy_loss

    box = capture_first_step(monkeypatch)
    # the DAPO loss with the built-in reward only: the preset's soft overlong punishment gives every completion
    # of these 3-token budgets the same -1 (zero advantages: the loss would not depend on the rewards)
    run_trainer("grpo", tmp_path, max_steps=1, batch_size=32, num_generations=4, preset="dapo", beta=0.04,
                reward_funcs="builtin")
    run, b = box["run"], box["batch"]
    lcfg = loss_config("grpo", run.cfg)
    # advantages recomputed in NumPy from the rewards of the decoded completions (groups of 4 rows), not read
    # from the batch
    adv = group_advantages(addition_task_rewards(run, b), 4, run.cfg.scale_rewards)
    assert np.any(adv != 0)
    np.testing.assert_allclose(b["advantages"], adv, rtol=1e-6, atol=1e-6)
    logps, ent = _logps(run, box["state"].params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
    loss, _ = policy_loss(logps, b.get("old_logps"), adv, b["mask"], lcfg, ref_logps=b["ref_logps"],
                          entropies=ent, truncated=b["truncated"])
    assert np.isfinite(box["metrics"]["loss"])
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)


def test_dpo_first_step_equals_preference_loss(tmp_path, monkeypatch):
    """IPO: at step 1 the policy is the reference, so the loss is (1/2β)² = 25 whatever the model or batch;
    the gradient (its norm) and the trainer's step from a policy that differs from the reference are
    compared too (:func:`check_loss_and_grad`)."""
    from trlax.objectives.preference import preference_loss

    box = capture_first_step(monkeypatch)
    run_trainer("dpo", tmp_path, max_steps=1, batch_size=8, preset="ipo")
    run, b = box["run"], box["batch"]
    lcfg = loss_config("dpo", run.cfg)
    ref_ch = _logps(run, run.frozen_params, b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"])[0]
    ref_rj = _logps(run, run.frozen_params, b["prompt_ids"], b["prompt_mask"], b["rejected_ids"],
                    b["rejected_mask"])[0]
    np.testing.assert_allclose(b["ref_chosen"], np.asarray(ref_ch), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b["ref_rejected"], np.asarray(ref_rj), rtol=1e-5, atol=1e-6)

    def objective(p):
        ch, _ = _logps(run, p, b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"])
        rj, _ = _logps(run, p, b["prompt_ids"], b["prompt_mask"], b["rejected_ids"], b["rejected_mask"])
        return preference_loss(ch, rj, b["ref_chosen"], b["ref_rejected"], b["chosen_mask"], b["rejected_mask"],
                               lcfg)[0]

    loss0, _ = check_loss_and_grad(box, objective)
    np.testing.assert_allclose(loss0, (1 / (2 * run.cfg.beta)) ** 2, rtol=1e-5)  # the constant at step 1


def test_sft_label_smoothing_first_step_equals_sft_loss(tmp_path, monkeypatch):
    """``--label_smoothing_factor`` (TRL SFTConfig / transformers' LabelSmoother): the first step logs
    ``sft_loss(label_smoothing=0.1, logits=...)`` of the full logits, recomputed here, and differs from plain NLL."""
    from trlax.objectives.supervised import sft_loss

    box = capture_first_step(monkeypatch)
    run_trainer("sft", tmp_path, max_steps=1, batch_size=8, label_smoothing_factor=0.1)
    run, b = box["run"], box["batch"]
    logits = plain_completion_logits(run.policy.graphdef, box["state"].params, b["prompt_ids"], b["prompt_mask"],
                                     b["completion_ids"], b["mask"])
    logps = gather_logps(logits, b["completion_ids"], b["mask"])
    loss, _ = sft_loss(logps, b["mask"], label_smoothing=0.1, logits=logits)
    plain, _ = sft_loss(logps, b["mask"])
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    assert abs(float(loss) - float(plain)) > 1e-3


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_first_step_equals_sft_loss(tmp_path, monkeypatch, loss_type):
    from trlax.objectives.supervised import sft_loss

    box = capture_first_step(monkeypatch)
    run_trainer("sft", tmp_path, max_steps=1, batch_size=8, loss_type=loss_type)
    run, b = box["run"], box["batch"]
    logps, _ = _logps(run, box["state"].params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
    loss, _ = sft_loss(logps, b["mask"], loss_type=loss_type)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
