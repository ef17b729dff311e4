"""``trlax train bco --use_udm true``: BCO with UDM density-ratio weights (arXiv 2404.04656, sec. 4.3).

One toy run (the shapes of tests/train/test_pref.py). The built-in rows pair every prompt with a desirable and an
undesirable completion, so a classifier fitted on all of them is flat (weights 1); the run fits on a 64-row
sample, whose prompts are not balanced, to get weights that differ from 1. Its FIRST step must log :func:`trlax.objectives.bco_loss`
with weights recomputed here: prompt embeddings from a plain forward of the initial model (mean-pooled final
hidden states), the classifier refitted with :func:`trlax.objectives.bco_udm_fit` on the same seeded sample,
its clipped density ratios on the batch's undesirable rows; the margin must grow; bad fields raise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _trainer_utils import capture_first_step, first_last, read_metrics, run_trainer
from trlax.objectives import unpaired as U
from trlax.train import data as D
from trlax.train.config import build_config
from trlax.train.pref import unpaired_examples

TOY = dict(batch_size=16, max_steps=40, seed=0)


@pytest.fixture(scope="module")
def udm(tmp_path_factory):
    path = tmp_path_factory.mktemp("bco_udm")
    with pytest.MonkeyPatch.context() as mp:
        box = capture_first_step(mp)
        run_trainer("bco", path, preset="bco", use_udm=True, prompt_sample_size=64, min_density_ratio=0.8,
                    max_density_ratio=1.25, **TOY)
    return box, read_metrics(path)


def _embed(run, params, ids, mask):
    h = nnx.merge(run.policy.graphdef, params).hidden_states(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    m = jnp.asarray(mask, jnp.float32)[..., None]
    return np.asarray(jnp.sum(h * m, 1) / jnp.maximum(jnp.sum(m, 1), 1))


def test_bco_udm_first_step(udm):
    box, _ = udm
    run, b, cfg = box["run"], box["batch"], box["run"].cfg
    tok = run.tokenizer
    rows = unpaired_examples(1024, cfg.seed)
    sample = np.sort(np.random.default_rng([cfg.seed, 1]).permutation(len(rows))[:cfg.prompt_sample_size])
    ids, mask = D.encode_left_padded(tok, [rows[i]["prompt"] for i in sample], cfg.max_prompt_length)
    clf = U.bco_udm_fit(_embed(run, run.frozen_params, ids, mask), np.asarray([rows[i]["label"] for i in sample]))
    p = np.asarray(U.bco_udm_probs(clf, _embed(run, run.frozen_params, b["prompt_ids"], b["prompt_mask"])))
    w = np.where(b["labels"], 1.0, np.clip(p / (1 - p + 1e-8), 0.8, 1.25))
    np.testing.assert_allclose(b["udm_weights"], w, rtol=1e-5, atol=1e-6)
    assert np.any(np.abs(w[~b["labels"]] - 1.0) > 1e-4)  # the weights are not trivially 1

    def lp(params):
        return run.policy.completion_logps(params, jnp.asarray(b["prompt_ids"]), jnp.asarray(b["prompt_mask"]),
                                           jnp.asarray(b["completion_ids"]), jnp.asarray(b["completion_mask"]))[0]

    ref = lp(run.frozen_params)

    def objective(params):
        return U.bco_loss(lp(params), ref, b["labels"], U.bco_init(), mask=b["completion_mask"], beta=0.1,
                          weights=w)[0]

    loss, g = jax.jit(jax.value_and_grad(objective))(box["state"].params)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(box["metrics"]["grad_norm"], float(optax.tree.norm(g)), rtol=1e-4)
    # the weights matter: without them the loss differs
    unweighted = U.bco_loss(ref, ref, b["labels"], U.bco_init(), mask=b["completion_mask"], beta=0.1)[0]
    assert abs(float(unweighted) - float(loss)) > 1e-6


def test_bco_udm_margin_grows(udm):
    _, hist = udm
    first, last = first_last([r["rewards/margins"] for r in hist])
    assert np.isfinite(first) and last > first + 0.02, (first, last)


@pytest.mark.parametrize("field,value", [("prompt_sample_size", 1), ("min_density_ratio", -0.5),
                                         ("max_density_ratio", 0.1)])
def test_bco_udm_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        build_config("bco", {field: value, "use_udm": True})
