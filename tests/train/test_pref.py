"""`trlax train kto | bco | orpo | cpo | tpo`: the first optimiser step logs the objective called directly on
the captured batch (model forward recomputed outside the train step), a short run on the built-in data moves
the right way, BCO's running mean is threaded and resumed exactly, bad fields are refused by name.

One toy run per trainer (batch 16, 40 steps, seed 0) serves both its first-step and its learning test."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _trainer_utils import capture_first_step, first_last, read_metrics, run_trainer
from trlax.objectives import unpaired as U
from trlax.train import loops
from trlax.train.config import build_config

TOY = dict(batch_size=16, max_steps=40, seed=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """``toy(name, **values) -> (first-step box, metrics history, summary)``, each run done once."""
    cache = {}

    def get(name, **values):
        key = (name, tuple(sorted(values.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as mp:
                box = capture_first_step(mp)
                summary = run_trainer(name, out, **values)
            cache[key] = (box, read_metrics(out), summary)
        return cache[key]

    return get


def _lp(run, params, b, col, prompt="prompt"):
    ids, mask = (jnp.asarray(b[f"{col}_{k}"]) for k in ("ids", "mask"))
    return run.policy.completion_logps(params, jnp.asarray(b[f"{prompt}_ids"]), jnp.asarray(b[f"{prompt}_mask"]),
                                       ids, mask)[0]


def _check_loss_and_grad(box, objective):
    """``objective(params) -> loss`` recomputed from the initial params: equals the logged loss and its
    gradient norm the logged ``grad_norm`` (the loss of a reference-based objective is a constant at step 1,
    where policy = reference; the gradient is not)."""
    loss, g = jax.jit(jax.value_and_grad(objective))(box["state"].params)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(box["metrics"]["grad_norm"], float(optax.tree.norm(g)), rtol=1e-4)
    assert box["metrics"]["grad_norm"] > 0


# ------------------------------------------------------------------------------------- first step


def test_kto_first_step(toy):
    box, _, _ = toy("kto", preset="kto", **TOY)
    run, b = box["run"], box["batch"]
    # KL pairs: each prompt with the previous row's completion
    np.testing.assert_array_equal(b["kl_ids"], np.roll(b["completion_ids"], 1, axis=0))
    assert b["labels"].any() and (~b["labels"]).any()
    ref, ref_kl = _lp(run, run.frozen_params, b, "completion"), _lp(run, run.frozen_params, b, "kl")
    np.testing.assert_allclose(b["ref_completion"], ref, rtol=1e-5, atol=1e-6)

    def objective(p):
        return U.kto_loss(_lp(run, p, b, "completion"), ref, b["labels"], mask=b["completion_mask"],
                          kl_logps=_lp(run, p, b, "kl"), ref_kl_logps=ref_kl, kl_mask=b["kl_mask"], beta=0.1)[0]

    _check_loss_and_grad(box, objective)


def test_bco_first_step(toy):
    box, _, _ = toy("bco", preset="bco", **TOY)
    run, b = box["run"], box["batch"]
    ref = _lp(run, run.frozen_params, b, "completion")

    def objective(p):
        return U.bco_loss(_lp(run, p, b, "completion"), ref, b["labels"], U.bco_init(), mask=b["completion_mask"],
                          beta=0.1)[0]

    _check_loss_and_grad(box, objective)


def _first_step_paired(box, objective, cols, **kw):
    """``objective(*logps, *masks, **kw)`` on the captured batch equals the logged first-step loss."""
    run, b = box["run"], box["batch"]
    lps = [_lp(run, box["state"].params, b, c) for c in cols]
    masks = [jnp.asarray(b[f"{c}_mask"]) for c in cols]
    loss, _ = objective(*lps, *masks, **kw)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)


def test_orpo_first_step(toy):
    box, _, _ = toy("orpo", preset="orpo", **TOY)
    _first_step_paired(box, U.orpo_loss, ("chosen", "rejected"), beta=0.1)


def test_cpo_first_step(toy):
    box, _, _ = toy("cpo", preset="cpo", **TOY)
    _first_step_paired(box, U.cpo_loss, ("chosen", "rejected"), loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)


def test_tpo_first_step(toy):
    box, _, _ = toy("tpo", preset="tpo", **TOY)
    b = box["batch"]
    np.testing.assert_array_equal(b["mask"], b["reference_mask"])
    ch, rj, gold = (_lp(box["run"], box["state"].params, b, c) for c in ("chosen", "rejected", "reference"))
    loss, _ = U.tpo_loss(ch, rj, gold, b["chosen_mask"], b["rejected_mask"], b["reference_mask"],
                         loss_type="sigmoid", beta=0.01, tpo_alpha=1.0)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)


@pytest.mark.parametrize("name,values,objective,kw", [
    ("cpo", dict(preset="simpo"), U.cpo_loss, dict(loss_type="simpo", beta=2.5, simpo_gamma=1.375, cpo_alpha=0.0)),
    # two micro-batches: the pair mean (+ the NLL token mean of TPO) still add up to the full-batch objective
    ("cpo", dict(preset="alphapo", num_microbatches=2), U.cpo_loss,
     dict(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=0.1)),
    ("tpo", dict(preset="tpo_l", num_microbatches=2), U.tpo_loss,
     dict(loss_type="tpo-l", tpo_l_gamma=0.5, beta=0.01, tpo_alpha=1.0)),
])
def test_variant_first_step(tmp_path, monkeypatch, name, values, objective, kw):
    box = capture_first_step(monkeypatch)
    run_trainer(name, tmp_path, max_steps=1, batch_size=8, **values)
    cols = ("chosen", "rejected", "reference") if name == "tpo" else ("chosen", "rejected")
    _first_step_paired(box, objective, cols, **kw)


def test_kto_apo_zero_first_step(tmp_path, monkeypatch):
    box = capture_first_step(monkeypatch)
    run_trainer("kto", tmp_path, max_steps=1, batch_size=8, loss_type="apo_zero_unpaired", undesirable_weight=1.5,
                num_microbatches=2)
    run, b = box["run"], box["batch"]
    assert "kl_ids" not in b
    ref = _lp(run, run.frozen_params, b, "completion")

    def objective(p):
        return U.kto_loss(_lp(run, p, b, "completion"), ref, b["labels"], mask=b["completion_mask"], beta=0.1,
                          undesirable_weight=1.5, loss_type="apo_zero_unpaired")[0]

    _check_loss_and_grad(box, objective)


# --------------------------------------------------------------------------------------- toy runs


@pytest.mark.parametrize("name", ["orpo", "cpo", "tpo"])
def test_paired_toy_run_learns(toy, name):
    """Reference-free paired trainers: the chosen (right) sum overtakes the rejected (wrong) one."""
    _, hist, summary = toy(name, preset=name, **TOY)
    acc0, acc1 = first_last([r["rewards/accuracies"] for r in hist])
    m0, m1 = first_last([r["rewards/margins"] for r in hist])
    assert acc1 > acc0 + 0.1, (acc0, acc1)
    assert m1 > 2 * m0 > 0, (m0, m1)
    assert summary["accuracy_last_10pct"] > summary["accuracy_first_10pct"]
    if name == "tpo":
        n0, n1 = first_last([r["nll_loss"] for r in hist])
        assert n1 < 0.8 * n0, (n0, n1)  # gold-response NLL


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_unpaired_toy_run_learns(toy, name):
    """KTO / BCO: the implicit reward of desirable (right-sum) rows rises above undesirable ones."""
    _, hist, _ = toy(name, preset=name, **TOY)
    m0, m1 = first_last([r["rewards/margins"] for r in hist])
    l0, l1 = first_last([r["loss"] for r in hist])
    assert m1 > max(3 * m0, m0 + 0.05), (m0, m1)
    assert l1 < l0, (l0, l1)


def test_bco_running_mean_threaded(toy):
    """δ logged at step t is the mean of every reward seen up to t (equal batches, initial count ≈ 0), and the
    stored moments count every row."""
    box, hist, _ = toy("bco", preset="bco", **TOY)
    batch_means = np.asarray([r["rewards/mean"] for r in hist])
    expected = np.cumsum(batch_means) / np.arange(1, len(hist) + 1)
    np.testing.assert_allclose([r["delta"] for r in hist], expected, rtol=1e-4, atol=1e-6)
    assert np.ptp(expected) > 1e-3  # δ moved
    extra = box["run"].state.extra
    np.testing.assert_allclose(float(extra.count), TOY["max_steps"] * TOY["batch_size"], rtol=1e-6)
    np.testing.assert_allclose(float(extra.mean), expected[-1], rtol=1e-4, atol=1e-6)


class _Killed(Exception):
    pass


def test_bco_resume_is_exact(toy, tmp_path, monkeypatch):
    """A BCO run killed after step 2 and resumed logs exactly the losses and δ of the uninterrupted toy run:
    the running moments come back from the checkpoint."""
    _, full, _ = toy("bco", preset="bco", **TOY)

    def kill(run, step):
        if step == 2:
            run.ckpt.wait()
            raise _Killed

    monkeypatch.setattr(loops, "_after_step", kill)
    with pytest.raises(_Killed):
        run_trainer("bco", tmp_path, preset="bco", save_every=2, **TOY)
    monkeypatch.setattr(loops, "_after_step", None)
    run_trainer("bco", tmp_path, preset="bco", save_every=2, resume=True, **TOY)
    part = read_metrics(tmp_path)
    assert [r["step"] for r in part] == list(range(1, TOY["max_steps"] + 1))
    for key in ("loss", "delta", "rewards/margins"):
        assert [r[key] for r in part] == [r[key] for r in full], key


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name,values,field", [
    ("kto", dict(beta=0.0), "beta"),
    ("kto", dict(desirable_weight=-1.0), "desirable_weight"),
    ("kto", dict(loss_type="sigmoid"), "loss_type"),
    ("kto", dict(batch_size=1), "batch_size"),
    ("bco", dict(beta=-0.1), "beta"),
    ("orpo", dict(beta=-1.0), "beta"),
    ("cpo", dict(loss_type="dpo"), "loss_type"),
    ("cpo", dict(label_smoothing=0.7), "label_smoothing"),
    ("cpo", dict(cpo_alpha=-1.0), "cpo_alpha"),
    ("cpo", dict(preset="tpo"), "preset"),
    ("tpo", dict(loss_type="simpo"), "loss_type"),
    ("tpo", dict(tpo_alpha=-0.5), "tpo_alpha"),
])
def test_bad_fields_refused(name, values, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        build_config(name, dict(output_dir=str(tmp_path), **values))


def test_presets_resolve_and_flags_win(tmp_path):
    cfg = build_config("cpo", dict(output_dir=str(tmp_path), preset="simpo", beta=2.0))
    assert (cfg.loss_type, cfg.beta, cfg.simpo_gamma, cfg.cpo_alpha) == ("simpo", 2.0, 1.375, 0.0)
    cfg = build_config("tpo", dict(output_dir=str(tmp_path), preset="tpo_l"))
    assert (cfg.loss_type, cfg.tpo_l_gamma, cfg.beta) == ("tpo-l", 0.5, 0.01)


def test_missing_label_column_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+2=", "completion": "3"}\n')
    with pytest.raises(ValueError, match="label"):
        run_trainer("kto", tmp_path / "out", dataset=str(path))
