"""Held-out evaluation (`--eval_dataset` / `--eval_split` with `--eval_steps`): the rows it writes to
metrics.jsonl and summary.json, the held-out SFT loss recomputed from the initial policy, DPO's reward accuracy
and margin (0 while the policy is the reference), GRPO's reward / accuracy / pass@k (and RLOO's, online DPO's, SSD's,
MiniLLM's, KTO's margin: the same code paths), the reward models' held-out pairwise / step accuracy and loss, and the
errors.

Tiny shapes of the other trainer tests (TINY_RUN); each trainer runs once."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_utils import capture_first_step, read_metrics, run_trainer
from trlax.train import data as D
from trlax.train.config import build_config


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _eval_rows(tmp_path):
    return [r for r in read_metrics(tmp_path) if r.get("split") == "eval"]


def test_split_by_prompt_holds_out_whole_prompts():
    rows = D.addition_examples(300, seed=3)
    train, held = D.split_by_prompt(rows, 0.2, seed=1)
    assert len(train) + len(held) == len(rows)
    tp, hp = {r["prompt"] for r in train}, {r["prompt"] for r in held}
    assert not tp & hp  # no held-out prompt is ever trained on
    assert len(hp) == round(0.2 * len(tp | hp))  # a fraction of the *distinct* prompts, all their rows
    assert D.split_by_prompt(rows, 0.2, seed=1) == (train, held)  # deterministic
    with pytest.raises(ValueError, match="eval_split=0.5: the data set has 1 distinct prompt"):
        D.split_by_prompt([{"prompt": "1+1=", "answer": "2"}] * 3, 0.5)


@pytest.mark.parametrize("values, match", [
    (dict(eval_split=1.0), "eval_split=1.0"),
    (dict(eval_split=-0.1), "eval_split=-0.1"),
    (dict(eval_steps=-1), "eval_steps=-1"),
    (dict(eval_split=0.1, eval_dataset="x.jsonl"), "either eval_dataset='x.jsonl' or eval_split=0.1"),
])
def test_bad_eval_fields_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        build_config("sft", values)


def test_sft_packing_with_eval_refused(tmp_path):
    with pytest.raises(ValueError, match="packing='bfd'.*held-out evaluation"):
        run_trainer("sft", tmp_path, packing="bfd", eval_split=0.2, max_steps=1)


def test_sft_held_out_loss(tmp_path, monkeypatch):
    """The step-0 held-out loss is the mean NLL of the eval file's completions under the initial policy
    (recomputed here); after training on the same task it is lower."""
    held = D.sft_examples(16, seed=7)
    path = _write_jsonl(tmp_path / "eval.jsonl", held)
    box = capture_first_step(monkeypatch)
    s = run_trainer("sft", tmp_path / "run", batch_size=8, max_steps=12, eval_dataset=path, eval_steps=6)
    ev = _eval_rows(tmp_path / "run")
    assert [r["step"] for r in ev] == [0, 6, 12]
    run = box["run"]
    tok = run.tokenizer
    p_ids, p_mask = D.encode_left_padded(tok, [r["prompt"] for r in held], 4)
    c_ids, c_mask = D.encode_right_padded(tok, [r["completion"] for r in held], 3)
    logps, _ = run.policy.completion_logps(box["state"].params, p_ids, p_mask, c_ids, c_mask)
    nll = -float(jnp.sum(jnp.where(c_mask, logps, 0.0)) / c_mask.sum())
    np.testing.assert_allclose(ev[0]["eval/loss"], nll, rtol=1e-5)
    assert s["eval_loss_first"] == ev[0]["eval/loss"] and s["eval_loss_last"] == ev[-1]["eval/loss"]
    assert s["eval_loss_last"] < s["eval_loss_first"] - 0.5, s
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_last"] == s["eval_loss_last"]
    train_rows = [r for r in read_metrics(tmp_path / "run") if r.get("split") != "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 13))  # training rows unchanged


def test_dpo_held_out_reward_accuracy_and_margin(tmp_path):
    s = run_trainer("dpo", tmp_path, batch_size=16, max_steps=20, eval_split=0.2)
    ev = _eval_rows(tmp_path)
    assert [r["step"] for r in ev] == [0, 20]  # eval_steps=0: before and after training
    # step 0: the policy is the reference, every implicit reward is 0 up to float rounding (the evaluation's
    # forward is another XLA program than the reference's; the strict `>` of the accuracy then counts noise)
    assert abs(ev[0]["eval/rewards/margins"]) < 1e-6 and abs(ev[0]["eval/rewards/chosen"]) < 1e-6, ev[0]
    assert ev[-1]["eval/rewards/margins"] > 0.05 and ev[-1]["eval/rewards/accuracies"] > 0.55, ev[-1]
    assert s["eval_margin_first"] == ev[0]["eval/rewards/margins"]
    assert s["eval_accuracy_last"] == ev[-1]["eval/rewards/accuracies"]


def test_grpo_held_out_reward_accuracy_pass_at_k(tmp_path):
    s = run_trainer("grpo", tmp_path, batch_size=16, num_generations=4, max_steps=4, eval_split=0.2, eval_steps=2,
                    sft_warmup_steps=0)
    ev = _eval_rows(tmp_path)
    assert [r["step"] for r in ev] == [0, 2, 4]
    rows = D.load_records("grpo", "builtin", seed=0)
    _, held = D.split_by_prompt(rows, 0.2, 0)
    assert s["eval_prompts"] == len({r["prompt"] for r in held})
    for r in ev:
        assert 0.0 <= r["eval/accuracy"] <= r["eval/pass@4"] <= 1.0
        assert r["eval/accuracy"] == r["eval/rewards/accuracy"]  # the built-in verifier's accuracy column
        np.testing.assert_allclose(r["eval/reward"], r["eval/rewards/accuracy"] + r["eval/rewards/format"])
    assert s["eval_accuracy_first"] == ev[0]["eval/accuracy"] and s["eval_pass@4_last"] == ev[-1]["eval/pass@4"]


# samples per held-out prompt (pass@k) of the trainers evaluated through loops.sample_eval: rloo its group
# (num_generations 4), online_dpo its pair, ssd and minillm their one sample
SAMPLED_K = {"rloo": 4, "online_dpo": 2, "ssd": 1, "minillm": 1}
DISTILL = ("ssd", "minillm")  # scored for accuracy alone (no format reward)
# the reward models' held-out metrics (train/reward.py)
REWARD_MODELS = {"reward": ("accuracy", "margin", "loss"), "prm": ("accuracy", "loss")}
# run fields beyond the shared ones: prm's steps ("3+4=7\n", 6 tokens each) need a longer completion than
# TINY_RUN's for a label to survive; minillm's builtin teacher needs only to exist (2 SFT steps, not 60)
EXTRA = {"prm": dict(max_prompt_length=6, max_completion_length=12), "minillm": dict(teacher_steps=2)}


@pytest.mark.parametrize("name", ["rloo", "kto", "online_dpo", "ssd", "minillm", "reward", "prm"])
def test_rl_and_unpaired_trainers_evaluate(tmp_path, name):
    """The other RL trainers, the online preference trainers (the judge's rewards) and the distillation trainers
    that sample (accuracy against the answer) share GRPO's held-out evaluation (loops.sample_eval: reward,
    accuracy, pass@k over the samples per prompt), the other preference trainers DPO's (held-out reward margin;
    KTO's from its chosen / rejected rewards, 0 while the policy is the reference); the reward models log the
    held-out pairwise (reward) / step-label (prm) accuracy and loss, the reward model also the mean margin
    r(chosen) - r(rejected). Two steps, evaluated before and after."""
    s = run_trainer(name, tmp_path, batch_size=8, max_steps=2, eval_split=0.2, **EXTRA.get(name, {}))
    ev = _eval_rows(tmp_path)
    assert [r["step"] for r in ev] == [0, 2]
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("split") != "eval"] == [1, 2]  # training rows
    if name in REWARD_MODELS:
        keys = REWARD_MODELS[name]
        for r in ev:
            assert set(r) >= {f"eval/{k}" for k in keys}, r
            assert 0.0 <= r["eval/accuracy"] <= 1.0 and np.isfinite(r["eval/loss"]) and r["eval/loss"] > 0, r
        assert ev[-1]["eval/loss"] != ev[0]["eval/loss"]  # the trained model is evaluated, not the initial one
        for k in keys:
            assert s[f"eval_{k}_first"] == ev[0][f"eval/{k}"] and s[f"eval_{k}_last"] == ev[-1][f"eval/{k}"]
    elif name in SAMPLED_K:
        k = SAMPLED_K[name]
        rows = D.load_records(name, "builtin", seed=0)
        assert s["eval_prompts"] == len({r["prompt"] for r in D.split_by_prompt(rows, 0.2, 0)[1]})
        for r in ev:
            assert 0.0 <= r["eval/accuracy"] <= r[f"eval/pass@{k}"] <= 1.0
            assert r["eval/accuracy"] == r["eval/rewards/accuracy"]
            # the built-in verifier (accuracy + format); the distillation trainers score accuracy alone
            fmt = r["eval/rewards/format"] if name not in DISTILL else 0.0
            np.testing.assert_allclose(r["eval/reward"], r["eval/rewards/accuracy"] + fmt)
        assert s["eval_accuracy_first"] == ev[0]["eval/accuracy"]
        assert s[f"eval_pass@{k}_last"] == ev[-1][f"eval/pass@{k}"]
    else:
        assert abs(ev[0]["eval/rewards/chosen"]) < 1e-6 and abs(ev[0]["eval/rewards/margins"]) < 1e-6, ev[0]
        for r in ev:
            np.testing.assert_allclose(r["eval/rewards/margins"], r["eval/rewards/chosen"] - r["eval/rewards/rejected"])
        assert ev[-1]["eval/rewards/margins"] != 0.0
        assert s["eval_margin_first"] == ev[0]["eval/rewards/margins"]
        assert s["eval_margin_last"] == ev[-1]["eval/rewards/margins"]


@pytest.mark.parametrize("n", [10, 3, 8])
def test_eval_batches_counts_every_row_once(n):
    """``_Run.eval_batches`` on a stub whose per-batch metric is the batch's row mean: the logged value is the
    mean over the held-out rows whatever ``n % batch_size`` (a last batch filled up with repeats of the first
    rows gave (8+9+0+1)/4 weighted 2/10 for n = 10, batch 4: 4.2 instead of 4.5)."""
    from types import SimpleNamespace

    from trlax.train import loops

    logged, shapes = {}, []

    def eval_loss(batch):
        shapes.append(len(batch))
        return {"loss": float(np.mean(batch)), "other": 1.0}

    stub = SimpleNamespace(cfg=SimpleNamespace(batch_size=4), eval_loss=eval_loss,
                           logger=SimpleNamespace(log_eval=lambda step, m: logged.update(m, step=step)))
    loops._Run.eval_batches(stub, list(range(n)), lambda sel: np.asarray(sel, float), 7, weight_keys=("loss",),
                            derive=lambda m: {"twice": 2 * m["loss"]})
    np.testing.assert_allclose(logged["loss"], (n - 1) / 2, rtol=1e-12)
    assert logged["twice"] == 2 * logged["loss"] and "other" not in logged and logged["step"] == 7
    assert shapes == [4] * (n // 4) + ([n % 4] if n % 4 else [])
