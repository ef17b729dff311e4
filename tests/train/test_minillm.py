"""``trlax train minillm`` (MiniLLM, arXiv 2306.08543): the first step logs exactly
:func:`trlax.objectives.minillm_loss` (+ the pre-training NLL) recomputed here from the captured batch, the
initial student parameters and the teacher's checkpoint — both with the paper preset (teacher-mixed samples,
importance weights recomputed from both models) and with TRL's defaults (student samples); a toy run whose
reverse KL to the teacher goes down; bad fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _trainer_utils import (TINY_RUN, capture_first_step, first_last, gather_logps,
                            plain_completion_logits, read_metrics, run_trainer)
from trlax.models import load_pretrained
from trlax.train import distill
from trlax.train.config import build_config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The builtin teacher (SFT of the tiny model on the addition task), built once."""
    cfg = build_config("minillm", dict(TINY_RUN, output_dir=str(tmp_path_factory.mktemp("minillm_teacher"))))
    return distill.builtin_teacher(cfg)


def _expected_first_loss(box, teacher_dir):
    from trlax.objectives import minillm_loss, sft_loss

    b, cfg = box["batch"], box["run"].cfg
    gd, params = box["run"].policy.graphdef, box["state"].params
    s = plain_completion_logits(gd, params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
    t = plain_completion_logits(*nnx.split(load_pretrained(teacher_dir)), b["prompt_ids"], b["prompt_mask"],
                                b["completion_ids"], b["mask"])
    np.testing.assert_allclose(b["teacher_logits"], t, rtol=1e-5, atol=1e-5)
    # importance weights q / (a p_T + (1 - a) q) of the sampled tokens (1 for student samples)
    a = cfg.teacher_mix_alpha
    lq = gather_logps(jax.nn.log_softmax(s / cfg.temperature, -1), b["completion_ids"], b["mask"])
    lp = gather_logps(jax.nn.log_softmax(t / cfg.temperature, -1), b["completion_ids"], b["mask"])
    w = np.where(b["mask"], np.exp(lq) / (a * np.exp(lp) + (1 - a) * np.exp(lq)), 0.0)
    np.testing.assert_allclose(b["is_weight"], w, rtol=1e-4, atol=1e-6)
    loss, _ = minillm_loss(s, t, b["completion_ids"], b["mask"], gamma=cfg.gamma,
                           length_normalize=cfg.length_normalize, single_step_coef=cfg.single_step_coef,
                           temperature=cfg.kd_temperature)
    if cfg.pt_coef > 0:
        pt = plain_completion_logits(gd, params, b["pt_prompt_ids"], b["pt_prompt_mask"], b["pt_ids"], b["pt_mask"])
        pt_loss, _ = sft_loss(gather_logps(jax.nn.log_softmax(pt, -1), b["pt_ids"], b["pt_mask"]), b["pt_mask"])
        loss = loss + cfg.pt_coef * pt_loss
    return float(loss)


_RUN = {}


@pytest.fixture(scope="module")
def paper_run(teacher, tmp_path_factory):
    """20 steps of ``--preset minillm`` (teacher-mixed sampling, gamma 0.95, pre-training loss)."""
    mp = pytest.MonkeyPatch()
    try:
        box = capture_first_step(mp)
        path = tmp_path_factory.mktemp("minillm_paper")
        run_trainer("minillm", path, teacher_model=teacher, preset="minillm", max_steps=20, batch_size=16, seed=0)
    finally:
        mp.undo()
    return box, read_metrics(path)


def test_first_step_paper_preset(paper_run, teacher):
    box, _ = paper_run
    cfg = box["run"].cfg
    assert (cfg.teacher_mix_alpha, cfg.gamma, cfg.pt_coef, cfg.length_normalize) == (0.2, 0.95, 1.0, True)
    assert not np.allclose(box["batch"]["is_weight"][box["batch"]["mask"]], 1.0)  # the mixture was sampled
    np.testing.assert_allclose(box["metrics"]["loss"], _expected_first_loss(box, teacher), rtol=1e-5, atol=1e-7)


def test_first_step_trl_defaults(teacher, tmp_path, monkeypatch):
    """TRL's defaults: student samples (weights 1), gamma 0, no pre-training loss."""
    box = capture_first_step(monkeypatch)
    run_trainer("minillm", tmp_path, teacher_model=teacher, max_steps=1, batch_size=16, seed=0)
    b, cfg = box["batch"], box["run"].cfg
    assert (cfg.teacher_mix_alpha, cfg.gamma, cfg.pt_coef) == (0.0, 0.0, 0.0) and "pt_ids" not in b
    np.testing.assert_array_equal(b["is_weight"], b["mask"].astype(np.float32))
    np.testing.assert_allclose(box["metrics"]["loss"], _expected_first_loss(box, teacher), rtol=1e-5, atol=1e-7)


def test_toy_run_reverse_kl_goes_down(paper_run):
    """Exact per-position KL(student || teacher) on the sampled positions: last fifth vs first fifth."""
    _, rows = paper_run
    first, last = first_last([r["reverse_kl"] for r in rows])
    print(f"minillm: reverse_kl {first:.4f} -> {last:.4f}")
    assert np.isfinite(first) and last < 0.8 * first, (first, last)
    assert all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("field,value", [
    ("gamma", 1.5), ("teacher_mix_alpha", 1.0), ("teacher_mix_alpha", -0.1), ("pt_coef", -1.0),
    ("single_step_coef", -0.5), ("kd_temperature", 0.0), ("teacher_model", "/no/such/dir"),
])
def test_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        build_config("minillm", {field: value})


def test_preset_sets_paper_values_and_flags_win():
    cfg = build_config("minillm", {"preset": "minillm", "gamma": 0.5})
    assert (cfg.teacher_mix_alpha, cfg.pt_coef, cfg.gamma, cfg.temperature) == (0.2, 1.0, 0.5, 1.0)


def test_importance_weights_scale_each_positions_gradient(paper_run):
    """The trainer weights eq. 8 through the logits' cotangent: for minillm_loss this must give exactly
    ``w_t ×`` the plain gradient at position t (its per-position terms depend on that position's logits only)."""
    from trlax.objectives import minillm_loss

    box, _ = paper_run
    b, run = box["batch"], box["run"]
    s = plain_completion_logits(run.policy.graphdef, box["state"].params, b["prompt_ids"], b["prompt_mask"],
                                b["completion_ids"], b["mask"])
    w = jnp.asarray(b["is_weight"])[..., None]

    def f(z):
        return minillm_loss(z, b["teacher_logits"], b["completion_ids"], b["mask"], gamma=0.95)[0]

    plain = jax.grad(f)(s)
    weighted = jax.grad(lambda z: f(jax.lax.stop_gradient(z) + w * (z - jax.lax.stop_gradient(z))))(s)
    assert float(jnp.abs(plain).max()) > 0
    np.testing.assert_allclose(weighted, w * plain, rtol=1e-5, atol=1e-8)
