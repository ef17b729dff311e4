"""LoRA / DoRA (arXiv 2106.09685, 2402.09353) through `trlax train`: only the adapters train (the base weights
stay bit-identical to a freshly built model), the first step's loss is the objective computed directly on a
plain decoder with the adapters merged in (and, for DPO, the base model as the reference), the loss goes down,
and the merged export loads in transformers with the trained adapter model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _trainer_utils import (TINY_RUN, addition_task_rewards, capture_first_step, check_loss_and_grad, first_last,
                            group_advantages, read_metrics, run_trainer)
from trlax.train import data as D, loops
from trlax.models import completion_logps, merge_lora
from trlax.train.config import build_config, loss_config
from trlax.train.modeling import LoraPolicy, build_policy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.array([[3, 9, 14, 7, 12, 5, 11, 16], [8, 8, 2, 17, 4, 10, 13, 1]])  # < vocab size (19)


def _merged_logps(run, adapters, ids_p, mask_p, ids_c, mask_c):
    """Log-probs of a plain Decoder with the adapters merged in (independent of the LoRA forward path)."""
    merged = merge_lora(run.policy.model(adapters))
    return completion_logps(merged, jnp.asarray(ids_p), jnp.asarray(mask_p), jnp.asarray(ids_c),
                            jnp.asarray(mask_c))[0]


def _check_adapters_only(run, before, tmp_path, seed):
    # the trainable tree holds adapter leaves only (what the optimiser and checkpoints see)
    assert isinstance(run.policy, LoraPolicy)
    leaves = jax.tree_util.tree_leaves(run.state.params)
    base_leaves = jax.tree_util.tree_leaves(run.policy.frozen)
    n_base = sum(x.size for x in base_leaves)
    assert sum(x.size for x in leaves) < 0.5 * n_base
    # base weights bit-unchanged: equal to the same seed's model built from scratch without LoRA
    plain = build_policy(build_config("sft", {"output_dir": str(tmp_path / "plain"), "seed": seed}))
    fresh = jax.tree_util.tree_leaves(plain.params)
    assert len(fresh) == len(base_leaves)
    for a, b in zip(fresh, base_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # adapters moved
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree_util.tree_leaves(before), leaves)]
    assert max(moved) > 1e-3


def _check_export(run, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "final"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS)).logits.numpy()
    got = np.asarray(run.policy.model(run.state.params)(jnp.asarray(IDS)))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    base = np.asarray(nnx.merge(run.policy.base_graphdef, run.policy.frozen["base"])(jnp.asarray(IDS)))
    assert np.abs(got - base).max() > 1e-3  # the trained adapters matter


def test_sft_lora(tmp_path, monkeypatch):
    from trlax.objectives.supervised import sft_loss

    box = capture_first_step(monkeypatch)
    run_trainer("sft", tmp_path, max_steps=20, batch_size=16, learning_rate=1e-2, lora_rank=4, lora_alpha=8,
                export=True, seed=3)
    run, b = box["run"], box["batch"]
    logps = _merged_logps(run, box["state"].params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                          b["mask"])
    loss, _ = sft_loss(logps, b["mask"])
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    first, last = first_last(losses)
    assert last < first - 0.3, (first, last)
    _check_adapters_only(run, box["state"].params, tmp_path, seed=3)
    _check_export(run, tmp_path)


def test_dpo_dora(tmp_path, monkeypatch):
    from trlax.objectives.preference import preference_loss

    box = capture_first_step(monkeypatch)
    # one fixed batch of 16 pairs (the built-in preference set is too noisy for a 20-step margin)
    cfg = build_config("dpo", dict(TINY_RUN, output_dir=str(tmp_path), max_steps=20, batch_size=16,
                                   learning_rate=1e-2, lora_rank=4, lora_alpha=8, use_dora=True,
                                   lora_target_modules="q_proj,v_proj,up_proj,down_proj", export=True, seed=4))
    loops.run("dpo", cfg, rows=D.preference_examples(16, 4))
    run, b = box["run"], box["batch"]
    # the reference: the base decoder alone (adapters off)
    base = nnx.merge(run.policy.base_graphdef, run.policy.frozen["base"])
    ref = [completion_logps(base, b["prompt_ids"], b["prompt_mask"], b[k + "_ids"], b[k + "_mask"])[0]
           for k in ("chosen", "rejected")]
    np.testing.assert_allclose(b["ref_chosen"], np.asarray(ref[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b["ref_rejected"], np.asarray(ref[1]), rtol=1e-6, atol=1e-6)

    def objective(p):
        ch = _merged_logps(run, p, b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"])
        rj = _merged_logps(run, p, b["prompt_ids"], b["prompt_mask"], b["rejected_ids"], b["rejected_mask"])
        return preference_loss(ch, rj, ref[0], ref[1], b["chosen_mask"], b["rejected_mask"],
                               loss_config("dpo", run.cfg))[0]

    # value (log 2 at step 1: the adapters start as the identity), gradient norm, and the trainer's step from
    # adapters that differ from the base model's
    check_loss_and_grad(box, objective)
    hist = read_metrics(tmp_path)
    first, last = first_last([r["loss"] for r in hist])
    assert last < first - 0.1, (first, last)  # 0.69 -> 0.55 at this seed
    assert "magnitude" in str(jax.tree_util.tree_structure(run.state.params))  # DoRA magnitudes train too
    _check_adapters_only(run, box["state"].params, tmp_path, seed=4)
    _check_export(run, tmp_path)


def test_grpo_lora_first_step(tmp_path, monkeypatch):
    """GRPO with LoRA: the sampler runs the merged weights, the KL reference is the base model, and the first
    step's loss is policy_loss on the merged decoder's log-probs."""
    from trlax.objectives import policy_loss

    box = capture_first_step(monkeypatch)
    run_trainer("grpo", tmp_path, max_steps=1, batch_size=8, num_generations=4, beta=0.04, lora_rank=2,
                lora_target_modules="q_proj,v_proj")
    run, b = box["run"], box["batch"]
    logps = _merged_logps(run, box["state"].params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
    _, ent = run.policy.completion_logps(box["state"].params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                         b["mask"])
    base = nnx.merge(run.policy.base_graphdef, run.policy.frozen["base"])
    ref = completion_logps(base, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])[0]
    np.testing.assert_allclose(b["ref_logps"], np.asarray(ref), rtol=1e-6, atol=1e-6)
    adv = group_advantages(addition_task_rewards(run, b), 4, run.cfg.scale_rewards)  # from the rewards
    np.testing.assert_allclose(b["advantages"], adv, rtol=1e-6, atol=1e-6)
    loss, _ = policy_loss(logps, None, adv, b["mask"], loss_config("grpo", run.cfg),
                          ref_logps=ref, entropies=ent)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)
    # the sampler's parameters are the merged decoder's state
    merged = nnx.state(merge_lora(run.policy.model(run.state.params)))
    got = run.policy.sampler_params(run.state.params)
    for a, c in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("values, field", [
    (dict(lora_rank=-1), "lora_rank"),
    (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha"),
    (dict(lora_rank=4, lora_target_modules="q_proj,lm_head"), "lora_target_modules"),
    (dict(use_dora=True), "use_dora"),
])
def test_bad_lora_values_name_the_field(tmp_path, values, field):
    with pytest.raises(ValueError, match=field):
        build_config("sft", dict(values, output_dir=str(tmp_path)))
