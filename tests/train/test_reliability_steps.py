"""Reliability of the train step: non-finite steps are skipped (state unchanged, counted, warned once, a run
of them stops the run with a checkpoint of the last good state), in every trainer family; same config and seed
give bit-identical runs.

Injections go through ``_Run.train_step`` (every trainer's optimiser step): NaN / inf values are written into
the batch a step sees (an inf advantage for GRPO, NaN reference log-probs for DPO, NaN teacher logits for GKD),
NaN rewards come from the reward function, and a poisoned parameter makes the policy's log-probs NaN.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_utils import GRPO_TOY_RUN
from trlax.train import cli, loops
from trlax.train.checkpoint import Checkpointer
from trlax.train.config import build_config

TINY = dict(progress=False, max_prompt_length=4, max_completion_length=3, learning_rate=1e-2)
VOLATILE = {"step_time", "tokens_per_s"}  # wall-clock metrics


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x), tree)


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)  # NaN == NaN here


def _read(path):
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _record(monkeypatch, inject=lambda run, k, batch: batch):
    """Wrap every trainer's optimiser step: ``inject(run, k, batch) -> batch`` before step ``k`` (1-based), and
    record ``(state before, metrics, skipped)`` of each step (host copies)."""
    log = []
    orig = loops._Run.train_step

    def patched(self, batch):
        batch = inject(self, len(log) + 1, dict(batch))
        before = _host(self.state)
        m = orig(self, batch)
        log.append({"before": before, "metrics": dict(m), "skipped": self.last_skipped})
        return m

    monkeypatch.setattr(loops._Run, "train_step", patched)
    return log


def _at(k, col, value, row=0):
    """An injection: at step ``k`` set ``batch[col][row]`` (first element of the row) to ``value``."""
    def inject(run, step, batch):
        if step == k:
            x = np.array(batch[col], np.float64 if np.asarray(batch[col]).dtype == np.float64 else np.float32)
            x.reshape(x.shape[0], -1)[row, 0] = value
            batch[col] = x
        return batch
    return inject


def _poison(run):
    """Write a NaN into one parameter of the live train state (every later loss is NaN)."""
    leaves, tdef = jax.tree_util.tree_flatten(run.state.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    run.state = run.state._replace(params=jax.tree_util.tree_unflatten(tdef, leaves))


def _then_poison(inject, k):
    def f(run, step, batch):
        batch = inject(run, step, batch)
        if step == k:
            _poison(run)
        return batch
    return f


def _state(rec):
    b = rec["before"]
    return b.params, b.opt_state, b.extra


# every family's run: a NaN / inf input at step 2 (skipped once, training goes on), a poisoned parameter at step 4
# (steps 4 and 5 skipped; max_consecutive_skips=2 stops the run at step 5 with a checkpoint of the state the
# skipped steps left alone)
FAMILY_RUN = dict(max_steps=8, max_consecutive_skips=2, save_every=0, export=False)


def _run_family(algo, values, out, log):
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        with pytest.raises(loops.NonFiniteError, match="2 consecutive steps had a non-finite loss"):
            loops.run(algo, build_config(algo, dict(TINY, **FAMILY_RUN, output_dir=str(out), **values)))
    assert sum("non-finite" in str(w.message) for w in caught) == 1  # warned once
    assert [r["skipped"] for r in log] == [False, True, False, True, True]
    m2 = log[1]["metrics"]
    assert not (np.isfinite(m2["loss"]) and np.isfinite(m2["grad_norm"]))
    # the skipped step 2 left params, optimiser and objective state as they were; step 3 trained on
    _assert_trees_equal(_state(log[1]), _state(log[2]))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(log[2]["before"].params))
    assert [r["metrics"]["skipped_steps"] for r in log] == [0, 1, 1, 2, 3]
    # steps 4, 5: the poisoned state is left as it is; the stop checkpoints it (step 5)
    _assert_trees_equal(_state(log[3]), _state(log[4]))
    rows = _read(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 3]
    ck = Checkpointer(str(out / "checkpoints"))
    assert ck.all_steps() == [5]
    step, state, meta = ck.restore(jax.tree_util.tree_map(jnp.asarray, log[4]["before"]))
    ck.close()
    assert step == 5 and meta["skipped_steps"] == 3 and meta["consecutive_skips"] == 2
    _assert_trees_equal((state.params, state.opt_state, state.extra), _state(log[4]))
    return rows


# ------------------------------------------------------------------------------------- every family


def test_rl_inf_advantage_nan_rewards_poisoned_parameter(tmp_path, monkeypatch):
    """GRPO (with the adaptive entropy controller, host state a skipped step must not move): an inf advantage at
    step 2 skips that step only; NaN rewards (some rows of one reward function, and rows where every function
    gives NaN) are left out of the weighted sum as TRL does — no step is lost to them — and counted."""
    real = loops.reward_functions

    def nan_rewards(cfg, tok=None):
        fn, names = real(cfg, tok)

        def wrapped(texts, *a, **kw):
            R = np.array(fn(texts, *a, **kw), np.float64) + 1.0  # every scored row > 0: a 0 in the mean shows
            R[0, 0] = np.nan  # one function gives NaN for one row
            R[1, :] = np.nan  # every function gives NaN for another (unscorable)
            seen.append(R.copy())
            return R
        return wrapped, names

    seen = []

    monkeypatch.setattr(loops, "reward_functions", nan_rewards)
    log = _record(monkeypatch, _then_poison(_at(2, "advantages", np.inf), 4))
    rows = _run_family("grpo", dict(batch_size=4, num_generations=2, use_adaptive_entropy=True, entropy_target=100.0,
                                    **GRPO_TOY_RUN), tmp_path / "grpo", log)
    for r, R in zip(rows, seen):
        assert r["rewards/nan"] == 3.0  # three NaN entries per generation round ...
        assert r["rewards/unscorable"] == 1.0  # ... one row with no reward at all
        # the logged reward: the mean of the weighted sums over the scorable rows (TRL leaves the unscorable out)
        np.testing.assert_allclose(r["reward"], np.nansum(np.delete(R, 1, axis=0), axis=1).mean(), rtol=1e-6)
        assert np.isfinite(r["entropy_coef"])
    # the entropy controller ignored the skipped step 2 (its entropy is NaN): step 3 applies step 2's coefficient
    assert rows[2]["entropy_coef_applied"] == rows[1]["entropy_coef"] == rows[2]["entropy_coef"] > 0


def test_offline_preference_nan_reference_logps_poisoned_parameter(tmp_path, monkeypatch):
    """DPO with TR-DPO (its reference is objective state, synced after every step): NaN reference log-probs at
    step 2 skip it and leave params, optimiser state and the reference unchanged."""
    log = _record(monkeypatch, _then_poison(_at(2, "ref_chosen", np.nan), 4))
    _run_family("dpo", dict(batch_size=4, sync_ref_model=True, ref_model_sync_steps=1, precompute_ref_logps=False),
                tmp_path / "dpo", log)
    assert log[1]["before"].extra is not None


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """Two identical tiny SFT runs (with BEMA objective state), exported: the determinism pair and the teacher of
    the distillation test."""
    root = tmp_path_factory.mktemp("sft")
    outs = []
    for i in range(2):
        cfg = build_config("sft", dict(TINY, output_dir=str(root / f"run{i}"), max_steps=3, batch_size=4, bema=True,
                                       bema_update_freq=1, export=True, seed=3))
        loops.run("sft", cfg)
        outs.append(root / f"run{i}")
    return outs


def test_distillation_nan_teacher_logits_poisoned_parameter(tmp_path, monkeypatch, sft_runs):
    """GKD: NaN teacher logits at step 2 skip that step only."""
    log = _record(monkeypatch, _then_poison(_at(2, "teacher_logits", np.nan), 4))
    _run_family("gkd", dict(batch_size=4, lmbda=0.0, teacher_model=str(sft_runs[0] / "final")), tmp_path / "gkd", log)


# ----------------------------------------------------------------- a poisoned parameter: the run stops


def test_sft_poisoned_parameter_stops_with_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """SFT with BEMA: a NaN written into one parameter after step 1 makes every later loss NaN; steps 2..4 are
    skipped (state, BEMA objective state included, unchanged), one warning, and at max_consecutive_skips=3 the
    command stops with exit status 1, a one-line error and a checkpoint holding the state every skipped step
    started from."""

    def poison(run, k, batch):
        if k == 2:
            leaves, tdef = jax.tree_util.tree_flatten(run.state.params)
            leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
            run.state = run.state._replace(params=jax.tree_util.tree_unflatten(tdef, leaves))
        return batch

    log = _record(monkeypatch, poison)
    out = tmp_path / "sft"
    argv = ["train", "sft", "--output_dir", str(out), "--max_steps", "8", "--batch_size", "4", "--bema", "true",
            "--bema_update_freq", "1", "--max_consecutive_skips", "3", "--export", "false"]
    argv += [x for k, v in TINY.items() for x in (f"--{k}", str(v).lower())]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = cli.main(argv)
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 3 consecutive steps had a non-finite loss") and "max_consecutive_skips=3" in err[-1]
    assert sum("non-finite" in str(w.message) for w in caught) == 1  # warned once
    assert [r["skipped"] for r in log] == [False, True, True, True]  # stopped after step 4
    for r in log[2:]:
        _assert_trees_equal((log[1]["before"].params, log[1]["before"].opt_state, log[1]["before"].extra),
                            (r["before"].params, r["before"].opt_state, r["before"].extra))
    assert [r["skipped_steps"] for r in _read(out)] == [0, 1, 2, 3]
    ck = Checkpointer(str(out / "checkpoints"))
    assert ck.all_steps() == [4]
    template = jax.tree_util.tree_map(jnp.asarray, log[1]["before"])
    step, state, meta = ck.restore(template)
    ck.close()
    assert step == 4 and meta["skipped_steps"] == 3 and meta["consecutive_skips"] == 3
    _assert_trees_equal((state.params, state.opt_state, state.extra),
                        (log[1]["before"].params, log[1]["before"].opt_state, log[1]["before"].extra))


# ----------------------------------------------------------------------------------------- determinism


def test_same_config_and_seed_give_bit_identical_runs(sft_runs):
    """Two runs of one config and seed: identical metrics (every logged value, bit for bit) and parameters."""
    a, b = (_read(p) for p in sft_runs)
    assert len(a) == 3
    strip = [{k: v for k, v in r.items() if k not in VOLATILE} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in VOLATILE} for r in b]
    from safetensors.numpy import load_file

    for name in ("final", "final_bema"):
        files = sorted(f for f in os.listdir(sft_runs[0] / name) if f.endswith(".safetensors"))
        assert files
        for f in files:
            ta, tb = load_file(str(sft_runs[0] / name / f)), load_file(str(sft_runs[1] / name / f))
            assert ta.keys() == tb.keys()
            for k in ta:
                np.testing.assert_array_equal(ta[k], tb[k])
