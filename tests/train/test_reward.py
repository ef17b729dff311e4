"""``trlax train reward`` and ``trlax train prm``: the first step logs exactly the objective recomputed from
the captured batch and the initial parameters; a short built-in run improves pairwise / step accuracy
clearly; the exported checkpoints load in trlax and in transformers with the same scores."""

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


@pytest.mark.parametrize("name,values,field", [
    ("reward", {"center_rewards_coefficient": -0.1}, "center_rewards_coefficient"),
    ("reward", {"use_margin": "maybe"}, "use_margin"),
    ("reward", {"preset": "nope"}, "preset"),
    ("prm", {"step_separator": ""}, "step_separator"),
    ("prm", {"lora_rank": 4}, "lora_rank"),
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
