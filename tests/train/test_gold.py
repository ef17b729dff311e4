"""``trlax train gold``: cross-tokenizer distillation (GOLD / ULD) from a teacher whose tokenizer differs.

One toy run (module-scoped) with the ``builtin`` teacher — a tiny model with :func:`distill.cross_tokenizer`
(its own token ids, a larger vocabulary), trained on the addition task. Its FIRST step must log exactly
:func:`trlax.objectives.uld_loss` recomputed here from plain forwards of the initial student and of the
teacher's checkpoint on the teacher's own tokens; the ULD distance must go down; bad fields raise.
"""

import numpy as np
import pytest
from flax import nnx

from _trainer_utils import (TINY_RUN, capture_first_step, first_last, gather_logps, plain_completion_logits,
                            read_metrics, run_trainer)
from trlax.models import load_pretrained
from trlax.train.config import build_config


@pytest.fixture(scope="module")
def gold(tmp_path_factory):
    path = tmp_path_factory.mktemp("gold")
    with pytest.MonkeyPatch.context() as mp:
        box = capture_first_step(mp)
        run_trainer("gold", path, preset="gold", max_steps=20, batch_size=16, teacher_steps=60)
    return box, read_metrics(path), path


def test_gold_teacher_tokenizer_differs(gold):
    box, _, path = gold
    b, s_tok = box["batch"], box["run"].tokenizer
    _, t_tok = load_pretrained(str(path / "teacher" / "final"), return_tokenizer=True)
    assert len(t_tok) != len(s_tok) and t_tok.convert_tokens_to_ids("1") != s_tok.convert_tokens_to_ids("1")
    # the teacher reads the same texts, tokenised its own way
    for i in range(len(b["mask"])):
        s_text = s_tok.decode(b["completion_ids"][i][b["mask"][i]], skip_special_tokens=True)
        t_ids = b["teacher_completion_ids"][i][b["teacher_completion_mask"][i]]
        assert t_tok.decode(t_ids, skip_special_tokens=True) == s_text
        assert not np.array_equal(t_ids, b["completion_ids"][i][b["mask"][i]]) or not s_text
        assert s_tok.decode(b["prompt_ids"][i][b["prompt_mask"][i]]) == \
            t_tok.decode(b["teacher_prompt_ids"][i][b["teacher_prompt_mask"][i]])


def test_gold_first_step(gold):
    from trlax.objectives.distillation import uld_loss

    box, _, path = gold
    b, run, cfg = box["batch"], box["run"], box["run"].cfg
    model, t_tok = load_pretrained(str(path / "teacher" / "final"), return_tokenizer=True)
    graphdef, params = nnx.split(model)
    t = plain_completion_logits(graphdef, params, b["teacher_prompt_ids"], b["teacher_prompt_mask"],
                                b["teacher_completion_ids"], b["teacher_completion_mask"])
    np.testing.assert_allclose(b["teacher_logits"], t, rtol=1e-5, atol=1e-5)
    s = plain_completion_logits(run.policy.graphdef, box["state"].params, b["prompt_ids"], b["prompt_mask"],
                                b["completion_ids"], b["mask"])
    assert t.shape[-1] != s.shape[-1]  # different vocabularies
    # EOS left out of the alignment on both sides (uld_skip_student_eos / uld_skip_teacher_eos, TRL's defaults)
    s_mask = b["mask"] & (b["completion_ids"] != run.tokenizer.eos_token_id)
    t_mask = b["teacher_completion_mask"] & (b["teacher_completion_ids"] != t_tok.eos_token_id)
    np.testing.assert_array_equal(b["teacher_mask"], t_mask)
    assert (cfg.uld_distillation_weight, cfg.uld_crossentropy_weight) == (1.0, 0.0)
    loss, _ = uld_loss(s, t, s_mask, t_mask, logps=gather_logps(s, b["completion_ids"], b["mask"]))
    assert np.isfinite(box["metrics"]["loss"]) and float(loss) > 0
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)


def test_gold_uld_goes_down(gold):
    _, rows, _ = gold
    first, last = first_last([r["uld"] for r in rows])
    print(f"gold: uld {first:.4f} -> {last:.4f}")
    assert np.isfinite(first) and last < 0.7 * first, (first, last)


@pytest.mark.parametrize("field,value", [("lmbda", 1.5), ("uld_teacher_temperature", 0.0),
                                         ("uld_student_temperature", -1.0), ("uld_crossentropy_weight", -0.5),
                                         ("teacher_model", "/no/such/dir")])
def test_gold_bad_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        build_config("gold", dict(TINY_RUN, **{field: value}))
