"""SFT packing through `trlax train sft --packing bfd` (trlax.models.packing): packed rows give the same per-token
log-probs as the unpacked prompt + completion layout (the trainer's own forwards, segment-aware attention), the
first step's loss is sft_loss on the packed log-probs (normalised by the real target tokens), and the loss goes
down."""

import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_utils import capture_first_step, first_last, read_metrics, run_trainer
from trlax.models.packing import packed_logps
from trlax.train import data as D
from trlax.train.config import build_config
from trlax.train.loops import pack_examples


def test_sft_packed_run(tmp_path, monkeypatch):
    from trlax.objectives.supervised import sft_loss

    box = capture_first_step(monkeypatch)
    run_trainer("sft", tmp_path, max_steps=25, batch_size=8, packing="bfd", max_length=24, learning_rate=3e-3)
    run, b, cfg = box["run"], box["batch"], box["run"].cfg
    params = box["state"].params

    # the packed rows are the data set's prompt + completion tokens, completion tokens the only targets
    rows = D.load_records("sft", cfg.dataset, seed=cfg.seed)
    tok = run.tokenizer
    P_ids, P_mask = D.encode_left_padded(tok, [D.as_text(tok, r["prompt"]) for r in rows], cfg.max_prompt_length)
    C_ids, C_mask = D.encode_right_padded(tok, [D.as_text(tok, r["completion"]) for r in rows],
                                          cfg.max_completion_length)
    packed = pack_examples(P_ids, P_mask, C_ids, C_mask, 24, "bfd", tok.pad_token_id)
    assert packed.input_ids.shape[0] < len(rows) / 2  # several examples per row
    assert int(packed.loss_mask.sum()) == int(C_mask.sum())  # every completion token is a target, nothing else
    for r in b["input_ids"]:
        assert (packed.input_ids == r).all(1).any()  # the run's batch rows come from this packing

    # per-token log-probs: packed == unpacked (the trainer's own forwards, same initial params)
    sel = np.arange(12)
    got, _ = run.policy.packed_logps(params, packed.input_ids[sel], packed.segment_ids[sel], packed.positions[sel],
                                     packed.loss_mask[sel])
    ex = np.unique(packed.example_ids[sel][packed.loss_mask[sel]])
    ref, _ = run.policy.completion_logps(params, P_ids[ex], P_mask[ex], C_ids[ex], C_mask[ex])
    got, ref = np.asarray(got), np.asarray(ref)
    where = {e: i for i, e in enumerate(ex)}
    n_checked = 0
    for r, t in zip(*np.nonzero(packed.loss_mask[sel])):
        e, j = packed.example_ids[sel][r, t], packed.token_index[sel][r, t]
        k = j - int(P_mask[e].sum())  # index within the completion block
        np.testing.assert_allclose(got[r, t], ref[where[e], k], rtol=1e-5, atol=1e-5)
        n_checked += 1
    assert n_checked == int(C_mask[ex].sum()) > 20

    # first step: the logged loss is sft_loss of the packed batch, computed directly
    logps, _ = packed_logps((run.policy.graphdef, params), _Rows(b))
    loss, _ = sft_loss(logps, b["mask"])
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(loss), -float(np.asarray(logps)[b["mask"]].sum()) / b["mask"].sum(), rtol=1e-6)

    losses = [r["loss"] for r in read_metrics(tmp_path)]
    first, last = first_last(losses)
    assert last < first - 0.3, (first, last)


class _Rows:
    def __init__(self, b):
        self.input_ids, self.segment_ids = jnp.asarray(b["input_ids"]), jnp.asarray(b["segment_ids"])
        self.positions, self.loss_mask = jnp.asarray(b["positions"]), jnp.asarray(b["mask"])


@pytest.mark.parametrize("values, field", [
    (dict(packing="greedy"), "packing"),
    (dict(packing="bfd", max_length=-1), "max_length"),
    (dict(preset="bfd"), "preset"),
])
def test_bad_packing_values_name_the_field(tmp_path, values, field):
    with pytest.raises(ValueError, match=field):
        build_config("sft", dict(values, output_dir=str(tmp_path)))


def test_packing_presets(tmp_path):
    assert build_config("sft", {"output_dir": str(tmp_path), "preset": "bfd_split"}).packing == "bfd_split"
    assert build_config("sft", {"output_dir": str(tmp_path), "preset": "t5"}).packing == "wrapped"
    assert build_config("sft", {"output_dir": str(tmp_path), "preset": "t5", "packing": "bfd"}).packing == "bfd"
