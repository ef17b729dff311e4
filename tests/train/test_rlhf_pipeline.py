"""The classic RLHF pipeline through `trlax train`: a reward model trained by `trlax train reward` is the
reward of `grpo` / `rloo` (`--reward_funcs reward_model --reward_model PATH`). The first step's rewards
are the exported checkpoint's scores of the decoded prompt + completion (scored here independently with
transformers), and its advantages are the group-normalised rewards."""

import numpy as np
import pytest
import torch

from _trainer_utils import capture_first_step, read_metrics, run_trainer
from trlax.train.config import build_config


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    s = run_trainer("reward", out, max_steps=20, batch_size=16, export=True)
    return s["exported_to"]


def _hf_scores(path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return np.asarray(out)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_reward_model_export_is_the_rl_reward(name, reward_model_dir, tmp_path, monkeypatch):
    box = capture_first_step(monkeypatch)
    s = run_trainer(name, tmp_path, max_steps=1, batch_size=8, num_generations=4, reward_funcs="reward_model",
                    reward_model=reward_model_dir)
    run, b = box["run"], box["batch"]
    tok = run.tokenizer
    prompts = tok.batch_decode([r[m].tolist() for r, m in zip(b["prompt_ids"], b["prompt_mask"].astype(bool))])
    c_mask = b.get("completion_mask", b["mask"]).astype(bool)
    comps = tok.batch_decode([r[m].tolist() for r, m in zip(b["completion_ids"], c_mask)], skip_special_tokens=True)
    scores = _hf_scores(reward_model_dir, [p + c for p, c in zip(prompts, comps)])
    logged = read_metrics(tmp_path)[0]
    np.testing.assert_allclose(logged["rewards/reward_model"], scores.mean(), rtol=1e-4, atol=1e-5)
    if name == "grpo":  # GRPO: (r - group mean) / (group std + 1e-4), TRL's unbiased std
        g = scores.reshape(-1, 4)
        adv = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)
        np.testing.assert_allclose(b["advantages"], adv.reshape(-1), rtol=1e-3, atol=1e-4)
    assert np.isfinite(box["metrics"]["loss"]) and s["steps"] == 1


def test_reward_model_field_is_checked(tmp_path):
    with pytest.raises(ValueError, match="reward_model"):
        build_config("grpo", {"output_dir": str(tmp_path), "reward_funcs": "reward_model"})
    with pytest.raises(ValueError, match="reward_model="):
        build_config("rloo", {"output_dir": str(tmp_path), "reward_funcs": "reward_model",
                              "reward_model": str(tmp_path / "nope")})
