"""``trlax train iw_opd --distillation_objective jsd``: IW-OPD's sparse top-1 generalised JSD (TRL
``IWOPDTrainer`` with ``loss_top_k=1``, ``beta > 0``) on the student's own samples.

One toy run (module-scoped) with the ``builtin`` teacher. Its FIRST step must log exactly
:func:`trlax.objectives.sparse_top1_distillation_loss` recomputed from plain forwards of the initial student and
of the teacher's checkpoint; the logged divergence must go down; bad fields raise.
"""

import numpy as np
import pytest
from flax import nnx

from _trainer_utils import (TINY_RUN, capture_first_step, first_last, plain_completion_logits, read_metrics,
                            run_trainer)
from trlax.models import load_pretrained
from trlax.train.config import build_config

TOP1 = dict(preset="iw_opd", distillation_objective="jsd", beta=0.5, loss_top_k=1, max_steps=20, batch_size=16)


@pytest.fixture(scope="module")
def top1(tmp_path_factory):
    path = tmp_path_factory.mktemp("iw_opd_top1")
    with pytest.MonkeyPatch.context() as mp:
        box = capture_first_step(mp)
        run_trainer("iw_opd", path, **TOP1)
    return box, read_metrics(path), path


def test_iw_opd_top1_first_step(top1):
    from trlax.objectives.distillation import sparse_top1_distillation_loss

    box, _, path = top1
    b, run, cfg = box["batch"], box["run"], box["run"].cfg
    graphdef, params = nnx.split(load_pretrained(str(path / "teacher" / "final")))
    t = plain_completion_logits(graphdef, params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
    np.testing.assert_allclose(b["teacher_logits"], t, rtol=1e-5, atol=1e-5)
    s = plain_completion_logits(run.policy.graphdef, box["state"].params, b["prompt_ids"], b["prompt_mask"],
                                b["completion_ids"], b["mask"])
    assert (cfg.beta, cfg.loss_top_k, cfg.loss_add_tail, cfg.reverse_kl_top_1_mode) == (0.5, 1, True, "sampled")
    loss, _ = sparse_top1_distillation_loss(s, t, b["completion_ids"], b["mask"], beta=0.5,
                                            temperature=cfg.temperature)
    assert np.isfinite(box["metrics"]["loss"]) and float(loss) > 0
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)


def test_iw_opd_top1_divergence_goes_down(top1):
    _, rows, _ = top1
    first, last = first_last([r["jsd"] for r in rows])
    print(f"iw_opd (jsd, top-1): jsd {first:.4f} -> {last:.4f}")
    assert np.isfinite(first) and last < 0.7 * first, (first, last)


@pytest.mark.parametrize("values,field", [(dict(distillation_objective="kl"), "distillation_objective"),
                                          (dict(loss_top_k=5), "loss_top_k"),
                                          (dict(reverse_kl_top_1_mode="max"), "reverse_kl_top_1_mode"),
                                          (dict(distillation_objective="jsd", beta=0.0), "beta=0"),
                                          (dict(beta=1.5), "beta")])
def test_iw_opd_top1_bad_fields(values, field):
    with pytest.raises(ValueError, match=field):
        build_config("iw_opd", dict(TINY_RUN, **values))
