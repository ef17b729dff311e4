"""Cross-cutting trainer options: TR-DPO reference sync in `trlax train dpo` (arXiv 2404.09656) and the
Skywork-OR1 adaptive entropy controller in `trlax train grpo` (arXiv 2505.22312), each checked against the
formula applied by hand to what the run logged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_utils import TINY_RUN, capture_first_step, read_metrics, run_trainer
from trlax.train import data as D, loops
from trlax.train.checkpoint import Checkpointer
from trlax.train.config import build_config, loss_config


def _record_steps(monkeypatch):
    """Wrap ``_Run.train_step``: every step's host batch, parameters before and after (NumPy copies)."""
    trace = []
    orig = loops._Run.train_step

    def to_np(tree):
        return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)

    def wrapped(self, batch):
        before = to_np(self.state.params)
        m = orig(self, batch)
        trace.append(dict(batch={k: np.asarray(v) for k, v in batch.items()}, before=before,
                          after=to_np(self.state.params), metrics=m))
        return m

    monkeypatch.setattr(loops._Run, "train_step", wrapped)
    return trace


def test_trdpo_reference_sync(tmp_path, monkeypatch):
    box = capture_first_step(monkeypatch)
    trace = _record_steps(monkeypatch)
    alpha, every, steps = 0.6, 3, 15
    cfg = build_config("dpo", dict(TINY_RUN, output_dir=str(tmp_path), max_steps=steps, batch_size=16,
                                   learning_rate=1e-2, preset="tr_dpo", ref_model_sync_steps=every, seed=1))
    assert cfg.sync_ref_model and cfg.ref_model_mixup_alpha == alpha and cfg.beta == 0.05
    loops.run("dpo", cfg, rows=D.preference_examples(16, 1))
    run = box["run"]
    assert len(trace) == steps
    # TR-DPO eq. 5 by hand: after optimiser step k with k % every == 0, ref <- alpha * theta_k + (1 - alpha) * ref
    ref = trace[0]["before"]
    refs = []
    for k, t in enumerate(trace, start=1):
        refs.append(ref)  # the reference step k's batch was scored with
        if k % every == 0:
            ref = jax.tree_util.tree_map(lambda r, p: alpha * p + (1 - alpha) * r, ref, t["after"])
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(run.state.extra)):
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-6, atol=1e-7)
    # the reference log-probs of a batch after the last sync come from the synced parameters
    b = trace[-1]["batch"]
    got = run.policy.completion_logps(refs[-1], b["prompt_ids"], b["prompt_mask"], b["chosen_ids"],
                                      b["chosen_mask"])[0]
    np.testing.assert_allclose(b["ref_chosen"], np.asarray(got), rtol=1e-5, atol=1e-6)
    assert np.abs(b["ref_chosen"] - trace[0]["batch"]["ref_chosen"]).max() > 1e-3  # the reference moved
    # the checkpoint holds the reference (a resumed run continues from it)
    _, state, _ = Checkpointer(str(tmp_path / "checkpoints")).restore(run.state)
    for a, c in zip(jax.tree_util.tree_leaves(state.extra), jax.tree_util.tree_leaves(run.state.extra)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    # it trains: the policy's log-prob margin chosen - rejected on the (fixed) batch grows (the DPO loss itself is
    # measured against the moving reference)
    def margin(params):
        lp = [run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b[k + "_ids"],
                                          b[k + "_mask"])[0].sum(-1) for k in ("chosen", "rejected")]
        return float(jnp.mean(lp[0] - lp[1]))

    m0, m1 = margin(trace[0]["before"]), margin(trace[-1]["after"])
    assert m1 > m0 + 5.0, (m0, m1)  # 0.01 -> 20.2 at this seed


def test_adaptive_entropy_controller(tmp_path, monkeypatch):
    from trlax.objectives import policy_loss

    trace = _record_steps(monkeypatch)
    box = capture_first_step(monkeypatch)
    c0, target, delta, cmax, steps = 0.05, 10.0, 0.04, 0.12, 4
    run_trainer("grpo", tmp_path, max_steps=steps, batch_size=8, num_generations=4, use_adaptive_entropy=True,
                entropy_coef=c0, entropy_target=target, entropy_coef_delta=delta, entropy_coef_max=cmax)
    run = box["run"]
    rows = read_metrics(tmp_path)
    ent = [r["entropy"] for r in rows]
    # Skywork-OR1 controller by hand: c_{k+1} = clip(c_k + delta if H_k <= target else c_k - delta, [0, cmax]);
    # step k applies c_k if H_{k-1} <= target (no bonus at step 1)
    c, last, want_c, want_applied = c0, None, [], []
    for h in ent:
        want_c.append(c)
        want_applied.append(c if last is not None and last <= target else 0.0)
        c = min(c + delta, cmax) if h <= target else max(c - delta, 0.0)
        last = h
    np.testing.assert_allclose([r["entropy_coef"] for r in rows], want_c, rtol=1e-12)
    np.testing.assert_allclose([r["entropy_coef_applied"] for r in rows], want_applied, rtol=1e-12)
    np.testing.assert_allclose([t["batch"]["entropy_coef"][0] for t in trace], want_applied, rtol=1e-12)
    assert want_c[-1] == cmax  # the clip was reached
    # the applied coefficient reaches the loss: step 2's logged loss is policy_loss with entropy_coef = c_2
    t = trace[1]
    b = t["batch"]
    logps, ent2 = run.policy.completion_logps(t["before"], b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                              b["mask"])
    lcfg = dataclasses.replace(loss_config("grpo", run.cfg), entropy_coef=want_applied[1])
    loss, _ = policy_loss(logps, None, b["advantages"], b["mask"], lcfg, entropies=ent2, truncated=b["truncated"])
    assert want_applied[1] > 0
    np.testing.assert_allclose(t["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)
    # the controller state is in the checkpoint meta (resume exact)
    _, _, meta = Checkpointer(str(tmp_path / "checkpoints")).restore(run.state)
    assert meta["entropy_coef"] == pytest.approx(c, rel=1e-12) and meta["last_entropy"] == pytest.approx(ent[-1])


@pytest.mark.parametrize("algo, values, field", [
    ("dpo", dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha"),
    ("dpo", dict(ref_model_sync_steps=0), "ref_model_sync_steps"),
    ("grpo", dict(entropy_coef_delta=-0.1), "entropy_coef_delta"),
    ("grpo", dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_max"),
    ("grpo", dict(use_adaptive_entropy=True, entropy_coef=2.0), "entropy_coef"),
])
def test_bad_option_values_name_the_field(tmp_path, algo, values, field):
    with pytest.raises(ValueError, match=field):
        build_config(algo, dict(values, output_dir=str(tmp_path)))


def test_paper_presets():
    g = build_config("grpo", {"preset": "skywork_or1"})
    assert g.use_adaptive_entropy and g.entropy_coef == 0.01 and g.entropy_target == 5.0 and g.beta == 0.0
    d = build_config("dpo", {"preset": "tr_dpo"})
    assert (d.sync_ref_model, d.ref_model_mixup_alpha, d.ref_model_sync_steps, d.beta) == (True, 0.6, 512, 0.05)
