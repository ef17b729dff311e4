"""``trlax train grpo --async_generation true``: round k+1 is sampled on a worker thread with the parameters
round k starts from, while round k trains (one step stale).

- The rollout trained on at step s >= 2 was generated with the parameters of step s - 1 (the state before
  step s - 1): checked by the recorded ``policy_version`` / ``policy_lag`` metrics, by comparing the
  parameters the sampler was handed with the state before step s - 1, and by recomputing the rollout's
  sampler log-probs from those parameters with a plain forward (they differ from the log-probs under the
  parameters being trained, which are the ratio's ``old_logps``).
- The toy run's reward still rises.
- A run killed after a checkpoint (with a round in flight) and resumed logs the uninterrupted run's losses.
"""

import jax
import numpy as np
import pytest

from _trainer_utils import (first_last, gather_logps, plain_completion_logits, read_metrics, run_killed_after,
                            run_trainer)
from trlax.rollouts import JaxSampler
from trlax.train import loops


# the default task at a small batch; the same shapes in every run of the module (compiled programs are shared
# through the test session's persistent compilation cache)
SHAPES = dict(async_generation=True, batch_size=32, num_generations=8, max_prompt_length=8, max_completion_length=4,
              learning_rate=3e-3)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One async run of the default task (30 steps) with every generation call and optimiser step recorded."""
    gens, steps = [], []
    generate, train_step = JaxSampler.generate, loops._Run.train_step

    def rec_generate(self, params, prompts, key, **kw):
        roll = generate(self, params, prompts, key, **kw)
        gens.append((jax.tree.map(np.asarray, params), np.asarray(roll.completion_ids)))
        return roll

    def rec_step(self, batch):
        before = jax.tree.map(np.asarray, self.state.params)
        steps.append((self, before, {k: np.asarray(v) for k, v in batch.items()}))
        return train_step(self, batch)

    mp = pytest.MonkeyPatch()
    mp.setattr(JaxSampler, "generate", rec_generate)
    mp.setattr(loops._Run, "train_step", rec_step)
    try:
        out = tmp_path_factory.mktemp("async")
        run_trainer("grpo", out, max_steps=30, seed=0, **SHAPES)
    finally:
        mp.undo()
    return gens, steps, read_metrics(out)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rollout_of_step_s_comes_from_the_parameters_of_step_s_minus_1(recorded):
    gens, steps, metrics = recorded
    assert len(gens) == len(steps) == 30  # one generation per step (batch_size completions, spg = 1)
    assert [m["policy_version"] for m in metrics[:5]] == [0, 0, 1, 2, 3]
    assert [m["policy_lag"] for m in metrics[:5]] == [0, 1, 1, 1, 1]
    run = steps[0][0]
    for s in range(2, 6):  # 1-based step s trains on generation s - 1 (0-based)
        gen_params, gen_ids = gens[s - 1]
        _, before, batch = steps[s - 1]
        np.testing.assert_array_equal(batch["completion_ids"], gen_ids)
        assert _same(gen_params, steps[s - 2][1]), s  # the state before step s - 1 ...
        assert not _same(gen_params, before), s  # ... not the one step s updates
        p_ids, p_mask, c_ids = batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"]
        c_mask = batch["mask"]
        gd = run.policy.sampler_graphdef
        sampler_lp = gather_logps(plain_completion_logits(gd, gen_params, p_ids, p_mask, c_ids, c_mask), c_ids, c_mask)
        current_lp = gather_logps(plain_completion_logits(gd, before, p_ids, p_mask, c_ids, c_mask), c_ids, c_mask)
        np.testing.assert_allclose(batch["sampler_logps"] * c_mask, sampler_lp, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batch["old_logps"] * c_mask, current_lp, rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(sampler_lp) - np.asarray(current_lp)).max() > 1e-4  # the staleness is real


def test_async_run_reward_rises(recorded):
    first, last = first_last([m["reward"] for m in recorded[2]])
    assert last >= first + 0.15, (first, last)


def test_kill_and_resume_with_a_round_in_flight_is_exact(tmp_path, monkeypatch):
    kw = dict(SHAPES, max_steps=5, save_every=2, seed=3)
    run_trainer("grpo", tmp_path / "full", **kw)
    run_killed_after("grpo", tmp_path / "part", monkeypatch, 2, **kw)
    run_trainer("grpo", tmp_path / "part", resume=True, **kw)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "reward", "policy_version", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
