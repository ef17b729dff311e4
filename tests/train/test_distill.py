"""Distillation trainers (gkd, opd, iw_opd, sdft, sdpo, ssd): for each, one short run on the built-in task
(shared across two tests) whose FIRST step must log exactly the objective called directly — student and
teacher forwards recomputed here from the captured batch, the initial student parameters and the teacher's
checkpoint — and whose metric must move the right way; plus bad-field errors.

The teacher (``teacher_model``) is built once for the module (``builtin_teacher``: SFT of the tiny model on
the addition task) and the self-distillation warm start once (the tiny model taught to copy the
demonstration shown in its prompt)."""

import jax
import numpy as np
import pytest
from flax import nnx

from _trainer_utils import (TINY_RUN, capture_first_step, first_last, gather_logps, plain_completion_logits,
                            read_metrics, run_trainer)
from trlax.models import load_pretrained
from trlax.train import distill
from trlax.train.config import build_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``{"teacher": dir, "warm": dir}``: the builtin teacher and the self-distillation warm start."""
    root = tmp_path_factory.mktemp("distill_base")
    cfg = build_config("gkd", dict(TINY_RUN, output_dir=str(root / "gkd"), teacher_steps=60))
    scfg = build_config("sdft", dict(TINY_RUN, output_dir=str(root / "sdft"), warm_start="builtin"))
    return {"teacher": distill.builtin_teacher(cfg), "warm": distill._warm_start(scfg)}


_RUNS = {}


@pytest.fixture(scope="module")
def runs(built, tmp_path_factory):
    """``runs(name) -> (box, metrics rows)``: one cached toy run per trainer; ``box`` holds the first step."""

    def get(name):
        if name not in _RUNS:
            path = tmp_path_factory.mktemp(name)
            with pytest.MonkeyPatch.context() as mp:
                box = capture_first_step(mp)
                run_trainer(name, path, **_TOY[name](built))
            _RUNS[name] = (box, read_metrics(path))
        return _RUNS[name]

    return get


_TOY = {
    "gkd": lambda b: dict(teacher_model=b["teacher"], preset="gkd", max_steps=20, batch_size=16),
    "opd": lambda b: dict(teacher_model=b["teacher"], preset="opd", max_steps=20, batch_size=16),
    "iw_opd": lambda b: dict(teacher_model=b["teacher"], preset="iw_opd", max_steps=20, batch_size=16),
    "ssd": lambda b: dict(preset="ssd", max_steps=20, batch_size=16, learning_rate=3e-3),
    "sdft": lambda b: dict(model=b["warm"], warm_start="off", preset="sdft", max_steps=40, batch_size=32,
                           learning_rate=3e-3),
    # 16 groups of 8 samples of the warm start (a uniform guess without a demonstration): ~2/3 of the groups
    # hold a success from the first step on (the test's first step relies on it)
    "sdpo": lambda b: dict(model=b["warm"], warm_start="off", preset="sdpo", max_steps=60, batch_size=128,
                           num_generations=8, learning_rate=3e-3),
}


def _student(box):
    b = box["batch"]
    return plain_completion_logits(box["run"].policy.graphdef, box["state"].params, b["prompt_ids"], b["prompt_mask"],
                   b["completion_ids"], b["mask"])


def _teacher(built, b):
    graphdef, params = nnx.split(load_pretrained(built["teacher"]))
    return plain_completion_logits(graphdef, params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])


def _check(box, loss):
    assert np.isfinite(box["metrics"]["loss"])
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ first step


def test_gkd_first_step(runs, built):
    from trlax.objectives.distillation import gkd_loss

    box, _ = runs("gkd")
    b, cfg = box["batch"], box["run"].cfg
    t = _teacher(built, b)
    np.testing.assert_allclose(b["teacher_logits"], t, rtol=1e-5, atol=1e-5)
    loss, _ = gkd_loss(_student(box), t, b["mask"], beta=0.5, temperature=cfg.kd_temperature)
    assert (cfg.lmbda, cfg.beta) == (0.5, 0.5)
    _check(box, loss)


@pytest.mark.parametrize("name", ["opd", "iw_opd"])
def test_opd_first_step(runs, built, name):
    from trlax.objectives.distillation import iw_opd_loss, on_policy_distillation_loss

    box, _ = runs(name)
    b = box["batch"]
    t_logps = gather_logps(_teacher(built, b), b["completion_ids"], b["mask"])
    np.testing.assert_allclose(b["teacher_logps"], t_logps, rtol=1e-5, atol=1e-5)
    s_logps = gather_logps(_student(box), b["completion_ids"], b["mask"])
    if name == "opd":
        loss, _ = on_policy_distillation_loss(s_logps, t_logps, b["mask"], kl_coef=1.0)
    else:
        loss, _ = iw_opd_loss(s_logps, t_logps, b["mask"], gamma=0.5)
    _check(box, loss)


def test_ssd_first_step(runs):
    from trlax.objectives.supervised import sft_loss

    box, _ = runs("ssd")
    b = box["batch"]
    loss, _ = sft_loss(gather_logps(_student(box), b["completion_ids"], b["mask"]), b["mask"])
    _check(box, loss)


@pytest.mark.parametrize("name", ["sdft", "sdpo"])
def test_self_distillation_first_step(runs, name):
    from trlax.objectives.distillation import self_distillation_loss

    box, _ = runs(name)
    b, run, st = box["batch"], box["run"], box["state"]
    tok = run.tokenizer
    # the teacher sees prompt + a correct demonstration + prompt (SDFT: the dataset's; SDPO: a successful sample)
    rows_in = np.flatnonzero(b["mask"].any(1))
    assert rows_in.size > 0
    for i in rows_in:
        prompt = tok.decode(b["prompt_ids"][i][b["prompt_mask"][i]])
        a, c = prompt.rstrip("=").split("+")
        assert tok.decode(b["teacher_prompt_ids"][i][b["teacher_prompt_mask"][i]]) == \
            f"{prompt}{int(a) + int(c)} {prompt}"
    # first step: the EMA teacher is the initial policy
    jax.tree_util.tree_map(np.testing.assert_array_equal, st.extra, st.params)
    t = plain_completion_logits(run.policy.graphdef, st.params, b["teacher_prompt_ids"], b["teacher_prompt_mask"],
                b["completion_ids"], b["mask"])
    np.testing.assert_allclose(b["teacher_logits"], t / run.cfg.temperature, rtol=1e-5, atol=1e-5)  # logits / tau
    s = _student(box) / run.cfg.temperature
    topk = 5 if name == "sdft" else run.policy.config.vocab_size  # SDPO's 100 > the tiny vocabulary
    loss, _ = self_distillation_loss(s, t / run.cfg.temperature, b["mask"], mode="topk_logits", alpha=0.5, topk=topk,
                                     logps=gather_logps(s, b["completion_ids"], b["mask"]), old_logps=b["old_logps"],
                                     is_clip=None if name == "sdft" else 2.0, aggregation="dapo")
    _check(box, loss)


# ------------------------------------------------------------------------------------------ toy runs


@pytest.mark.parametrize("name,metric,factor", [
    ("gkd", "jsd", 0.7),  # student-teacher generalised JSD
    ("opd", "sampled_reverse_kl", 0.9),  # mean log pi_S - log pi_T of the student's samples
    ("iw_opd", "sampled_reverse_kl", 0.9),
    ("ssd", "nll", 0.8),  # NLL of its own fresh samples (the model sharpens)
    ("sdft", "distillation_divergence", 0.5),  # bare-prompt student vs demonstration-conditioned teacher
    # on the rows of groups with a success (the rows SDPO trains on); the sampled accuracy itself stays
    # ~0.15 at this scale (the student sharpens on its own answers, right or wrong)
    ("sdpo", "distillation_divergence", 0.2),
])
def test_toy_run_metric_goes_down(runs, name, metric, factor):
    _, rows = runs(name)
    first, last = first_last([r[metric] for r in rows])
    print(f"{name}: {metric} {first:.4f} -> {last:.4f}")
    assert np.isfinite(first) and last < factor * first, (first, last)


def test_sdpo_masks_groups_without_success(runs):
    """SDPO distils only rows whose group holds a successful sample (the teacher's demonstration)."""
    box, rows = runs("sdpo")
    b = box["batch"]
    has = b["mask"].any(1).reshape(-1, 8).any(1)  # groups with a teacher
    assert 0 < has.mean() < 1 or rows[0]["accuracy"] in (0.0, 1.0)
    assert abs(rows[0]["teacher_rows"] - has.mean()) < 1e-6
    assert all(np.isfinite(r["loss"]) for r in rows)


# ------------------------------------------------------------------------------------------ bad fields


@pytest.mark.parametrize("name,field,value", [
    ("gkd", "lmbda", 1.5), ("gkd", "beta", -0.1), ("gkd", "teacher_model", "/no/such/dir"),
    ("opd", "kl_coef", -1.0), ("iw_opd", "iw_opd_gamma", -0.5), ("ssd", "top_p", 0.0),
    ("sdft", "distillation_mode", "bogus"), ("sdft", "teacher_template", "{prompt} only"),
    ("sdpo", "num_generations", 3), ("sdpo", "teacher_update_rate", 2.0), ("sdft", "warm_start", "maybe"),
])
def test_bad_fields_raise_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=field):
        build_config(name, {field: value})


def test_presets_set_paper_values():
    cfg = build_config("sdpo", {"preset": "sdpo"})
    assert (cfg.distillation_topk, cfg.distillation_is_clip, cfg.teacher_update_rate) == (100, 2.0, 0.05)
    cfg = build_config("ssd", {"preset": "ssd", "top_k": 10})  # explicit flags win
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.6, 10, 0.95)
    assert build_config("iw_opd", {"preset": "iw_opd"}).iw_opd_gamma == 0.5


def test_sdft_with_lora_runs_and_its_teacher_is_the_adapted_policy(built, tmp_path):
    """With ``lora_rank`` the trainable tree (and its EMA teacher) are the adapters only; the teacher's
    forward must add the frozen base (``policy.model``), not merge the adapters as a full decoder."""
    with pytest.MonkeyPatch.context() as mp:
        box = capture_first_step(mp)
        run_trainer("sdft", tmp_path, model=built["warm"], warm_start="off", lora_rank=4, max_steps=2, batch_size=8)
    run, st, b = box["run"], box["state"], box["batch"]
    size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert size(st.params) < size(nnx.split(load_pretrained(built["warm"]))[1]) / 2  # adapters, not the decoder
    t = plain_completion_logits(*nnx.split(run.policy.model(st.params)), b["teacher_prompt_ids"],
                                b["teacher_prompt_mask"], b["completion_ids"], b["mask"])
    np.testing.assert_allclose(b["teacher_logits"], t / run.cfg.temperature, rtol=1e-5, atol=1e-5)
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
