"""``trlax train reward`` and ``trlax train prm``: the first step logs exactly the objective recomputed from
the captured batch and the initial parameters; a short built-in run improves pairwise / step accuracy
clearly; the exported checkpoints load in trlax and in transformers with the same scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _trainer_utils import capture_first_step, first_last, read_metrics, run_trainer
from trlax.objectives.unpaired import process_reward_loss, reward_model_loss
from trlax.train import data as D
from trlax.train import loops
from trlax.train.config import build_config
from trlax.train.reward import encode_steps, margin_preference_examples, step_examples


def test_reward_first_step_equals_reward_model_loss(tmp_path, monkeypatch):
    box = capture_first_step(monkeypatch)
    # margin + centring together, and two micro-batches (each contributes its share of the batch mean)
    run_trainer("reward", tmp_path, max_steps=1, batch_size=8, num_microbatches=2, preset="reward_center",
                use_margin=True)
    run, b = box["run"], box["batch"]
    assert run.cfg.center_rewards_coefficient == 0.01
    model = run.model(box["state"].params)
    r_w = model(jnp.asarray(b["chosen_ids"]), jnp.asarray(b["chosen_mask"]))
    r_l = model(jnp.asarray(b["rejected_ids"]), jnp.asarray(b["rejected_mask"]))
    assert np.ptp(b["margin"]) > 0  # the margin column really is used
    loss, metrics = reward_model_loss(r_w, r_l, margin=b["margin"], center_rewards_coefficient=0.01)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(box["metrics"]["accuracy"], float(np.mean(np.asarray(r_w > r_l))), atol=1e-6)


def test_prm_first_step_equals_process_reward_loss(tmp_path, monkeypatch):
    box = capture_first_step(monkeypatch)
    run_trainer("prm", tmp_path, max_steps=1, batch_size=8, num_microbatches=2, max_completion_length=12,
                max_prompt_length=6)
    run, b = box["run"], box["batch"]
    assert b["mask"].sum() > 8  # several steps per row are trained
    logits = run.model(box["state"].params)(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))
    loss, _ = process_reward_loss(logits, b["labels"], b["labels"] >= 0)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)


def test_prm_tokenisation_and_last_step_only(tmp_path):
    tok = D.build_tokenizer(str(tmp_path))
    rows = [{"prompt": "3+4+2=", "completions": ["3+4=7", "7+2=8"], "labels": [True, False]}]
    ids, att, labels, mask = encode_steps(tok, rows, 8, 16, "\n")
    text = tok.decode(ids[0][att[0]].tolist())
    sep = tok("\n", add_special_tokens=False)["input_ids"][0]
    # labels sit on the separator after each step: 6 prompt tokens, then 6 tokens per step
    assert text.startswith("3+4+2=3+4=7")
    assert np.flatnonzero(labels[0] >= 0).tolist() == [11, 17] and ids[0, 11] == ids[0, 17] == sep
    assert labels[0, 11] == 1 and labels[0, 17] == 0
    _, _, _, last = encode_steps(tok, rows, 8, 16, "\n", last_step_only=True)
    assert np.flatnonzero(last[0]).tolist() == [17]
    # the host-side last-step mask is the objective's own train_on_last_step_only selection
    logits = np.random.default_rng(0).normal(size=(1, 24, 2))
    a = process_reward_loss(logits, labels, mask, last_step_only=True)[0]
    np.testing.assert_allclose(float(process_reward_loss(logits, labels, last)[0]), float(a), rtol=1e-12)
    with pytest.raises(ValueError, match="labels"):
        encode_steps(tok, [dict(rows[0], labels=[True])], 8, 16, "\n")


def test_builtin_data_is_honest():
    for r in margin_preference_examples(64):
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert int(r["chosen"]) == a + b != int(r["rejected"]) and 0 <= r["margin"] <= 1
    rows = step_examples(200)
    for r in rows:
        ok = True
        for s, y in zip(r["completions"], r["labels"]):
            lhs, res = s.split("=")
            x, t = map(int, lhs.split("+"))
            ok = ok and x + t == int(res)
            assert y == ok
    frac = np.mean([all(r["labels"]) for r in rows])
    assert 0.35 < frac < 0.65


def _hf_scores(path, ids, mask, token=False):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    m = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long)).logits.numpy()


def test_reward_toy_run_and_export(tmp_path):
    import json

    from trlax.rollouts import RewardModelScorer, load_reward_model

    s = run_trainer("reward", tmp_path, max_steps=100, batch_size=32, export=True, max_prompt_length=4,
                    max_completion_length=2)
    acc = [r["accuracy"] for r in read_metrics(tmp_path)]
    first, last = first_last(acc)
    assert last > 0.72 and last > first + 0.1, (first, last)  # seed 0: 0.62 -> 0.81
    path = s["exported_to"]
    with open(f"{path}/config.json") as fh:
        assert json.load(fh)["architectures"] == ["LlamaForSequenceClassification"]
    rows = margin_preference_examples(8, seed=5)
    rm = load_reward_model(path)
    tok = D.build_tokenizer(str(tmp_path / "tok"))
    texts = [r["prompt"] + c + tok.eos_token for r in rows for c in (r["chosen"], r["rejected"])]
    ids, mask = D.encode_right_padded(tok, [t[:-len(tok.eos_token)] for t in texts], 8)
    ours = np.asarray(rm(jnp.asarray(ids), jnp.asarray(mask)))[:, 0]
    theirs = _hf_scores(path, ids, mask)[:, 0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    scorer = RewardModelScorer(rm, tok, batch_size=8)
    np.testing.assert_allclose(scorer.score_texts(texts), ours, rtol=1e-5, atol=1e-5)
    assert np.ptp(ours) > 0.1  # trained scores, not a constant


def test_prm_toy_run_and_export(tmp_path):
    import json

    from trlax.rollouts import load_process_reward_model

    s = run_trainer("prm", tmp_path, max_steps=250, batch_size=32, export=True, max_prompt_length=6,
                    max_completion_length=12)
    acc = [r["accuracy"] for r in read_metrics(tmp_path)]
    first, last = first_last(acc)
    # the majority class (correct) is 62.5% of the steps: the PRM must beat it, not only learn the prior
    assert last > 0.72 and last > first + 0.1, (first, last)  # seed 0: 0.62 -> 0.78
    path = s["exported_to"]
    with open(f"{path}/config.json") as fh:
        assert json.load(fh)["architectures"] == ["LlamaForTokenClassification"]
    tok = D.build_tokenizer(str(tmp_path / "tok"))
    ids, att, _, _ = encode_steps(tok, step_examples(4, seed=9), 6, 12, "\n")
    prm = load_process_reward_model(path)
    ours = np.asarray(prm(jnp.asarray(ids), jnp.asarray(att)))
    theirs = _hf_scores(path, ids, att, token=True)
    np.testing.assert_allclose(ours[att], theirs[att], rtol=1e-5, atol=1e-5)


def _check_lora_run(run, before, path, ids, mask, token=False):
    """Base weights bit-unchanged (equal to a fresh copy of the policy's base decoder), only adapters + head
    trainable, both moved, and the merged export scores like the trlax adapter model in transformers."""
    from flax import nnx

    from trlax.models.lora import adapters_off
    from trlax.rollouts.reward_model import classifier_from_decoder

    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(run.state.params))]
    keys = {str(getattr(p[0], "key", p[0])) for p in paths}
    assert keys == ({"backbone", "score", "score_bias"} if token else {"backbone", "score"}), keys
    lora = run.state.params["backbone"]
    variables = jax.tree_util.tree_leaves(lora, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and all(isinstance(v, nnx.LoRAParam) for v in variables)  # trunk: adapters only
    fresh = classifier_from_decoder(adapters_off(run.policy.model()), 2 if token else 1,
                                    kind="token" if token else "sequence")
    want = nnx.to_pure_dict(nnx.state(fresh.backbone))
    got = nnx.to_pure_dict(run.frozen["backbone"]["base"])
    w_leaves, g_leaves = jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)
    assert len(w_leaves) == len(g_leaves) > 0
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(w_leaves, g_leaves))
    old, new = nnx.to_pure_dict(before.params), nnx.to_pure_dict(run.state.params)
    assert not np.array_equal(np.asarray(old["score"]), np.asarray(new["score"]))
    b0 = np.asarray(old["backbone"]["adapters"]["q_proj"]["b"])  # scanned layers: [L, r, ...] stacked adapters
    b1 = np.asarray(new["backbone"]["adapters"]["q_proj"]["b"])
    assert not b0.any() and np.abs(b1).max() > 1e-4  # B starts at zero (LoRA / DoRA) and moved
    ours = np.asarray(run.model(run.state.params)(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = _hf_scores(path, ids, mask, token=token)
    sel = np.asarray(mask, bool) if token else slice(None)
    np.testing.assert_allclose(theirs[sel], ours[sel], rtol=1e-5, atol=1e-5)
    return ours


def test_reward_lora_first_step_frozen_base_and_export(tmp_path, monkeypatch):
    import json

    box = capture_first_step(monkeypatch)
    s = run_trainer("reward", tmp_path, max_steps=3, batch_size=8, lora_rank=4, export=True)
    run, b = box["run"], box["batch"]
    model = run.model(box["state"].params)
    r_w = model(jnp.asarray(b["chosen_ids"]), jnp.asarray(b["chosen_mask"]))
    r_l = model(jnp.asarray(b["rejected_ids"]), jnp.asarray(b["rejected_mask"]))
    np.testing.assert_allclose(box["metrics"]["loss"], float(reward_model_loss(r_w, r_l)[0]), rtol=1e-5)
    with open(f"{s['exported_to']}/config.json") as fh:
        assert json.load(fh)["architectures"] == ["LlamaForSequenceClassification"]
    ids = np.concatenate([b["chosen_ids"], b["rejected_ids"]])
    mask = np.concatenate([b["chosen_mask"], b["rejected_mask"]])
    _check_lora_run(run, box["state"], s["exported_to"], ids, mask)


def test_prm_dora_first_step_frozen_base_and_export(tmp_path, monkeypatch):
    import json

    box = capture_first_step(monkeypatch)
    s = run_trainer("prm", tmp_path, max_steps=3, batch_size=8, lora_rank=4, use_dora=True, export=True,
                    max_prompt_length=6, max_completion_length=12)
    run, b = box["run"], box["batch"]
    assert "magnitude" in run.state.params["backbone"]["adapters"]["q_proj"]  # DoRA really is on
    logits = run.model(box["state"].params)(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))
    loss, _ = process_reward_loss(logits, b["labels"], b["labels"] >= 0)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5)
    with open(f"{s['exported_to']}/config.json") as fh:
        assert json.load(fh)["architectures"] == ["LlamaForTokenClassification"]
    _check_lora_run(run, box["state"], s["exported_to"], b["input_ids"], b["attention_mask"], token=True)


@pytest.mark.parametrize("name,values,field", [
    ("reward", {"center_rewards_coefficient": -0.1}, "center_rewards_coefficient"),
    ("reward", {"use_margin": "maybe"}, "use_margin"),
    ("reward", {"preset": "nope"}, "preset"),
    ("prm", {"step_separator": ""}, "step_separator"),
    ("prm", {"lora_rank": 4, "lora_target_modules": "score"}, "lora_target_modules"),
    ("reward", {"lora_rank": 4, "lora_alpha": 0.0}, "lora_alpha"),
    ("prm", {"train_on_last_step_only": "sometimes"}, "train_on_last_step_only"),
])
def test_bad_fields(name, values, field):
    with pytest.raises(ValueError, match=field):
        build_config(name, dict(values, progress=False))


def test_use_margin_needs_the_column(tmp_path):
    cfg = build_config("reward", dict(output_dir=str(tmp_path), use_margin=True, progress=False))
    rows = [dict(prompt="1+1=", chosen="2", rejected="3")] * 4
    with pytest.raises(ValueError, match="margin"):
        loops.run("reward", cfg, rows)
