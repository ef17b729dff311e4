"""Online DPO / XPO / Nash-MD (`trlax train online_dpo | xpo | nash_md`): the first optimiser step logs the
objective called directly on the captured pair batch (policy and reference log-probs recomputed outside the
step, the judge's ordering / preference recomputed from the decoded texts), the built-in addition task's
judged reward rises, the reward-model judges run, and bad fields stop before compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_utils import TINY_RUN, capture_first_step, check_loss_and_grad, first_last, read_metrics, run_trainer
from trlax.train import data as D
from trlax.train.config import build_config

# one toy run per trainer (fixed seed); its first step is the one the first-step test checks. XPO and Nash-MD
# use TRL's missing_eos_penalty (as TRL's examples do): from the random tiny model almost every pair is a tie
# at reward 0 otherwise (XPO then only reinforces its own samples over the reference's).
TOY = {
    "online_dpo": dict(max_steps=60, batch_size=16, learning_rate=2e-3),
    "xpo": dict(max_steps=60, batch_size=32, learning_rate=1e-3, missing_eos_penalty=1.0),
    "nash_md": dict(max_steps=60, batch_size=64, learning_rate=2e-3, missing_eos_penalty=1.0),
}


def _logps(run, params, b, ids, mask):
    """Per-token log-probs (T = 1) of a completion block, recomputed outside the train step."""
    fn = jax.jit(lambda p, *a: run.policy.completion_logps(p, *a)[0])
    return fn(params, b["prompt_ids"], b["prompt_mask"], ids, mask)


def _rewards(run, b, ids, mask):
    """The built-in verifier (accuracy + format) of the decoded completions minus the missing-EOS penalty,
    recomputed here."""
    tok = run.tokenizer
    prompts = tok.batch_decode([p[m].tolist() for p, m in zip(b["prompt_ids"], b["prompt_mask"])])
    answers = [str(sum(int(x) for x in p.rstrip("=").split("+"))) for p in prompts]  # "3+4=" -> "7"
    texts = tok.batch_decode([c[m].tolist() for c, m in zip(ids, mask)], skip_special_tokens=True)
    eos = np.array([bool(m.any()) and c[m][-1] == tok.eos_token_id for c, m in zip(ids, mask)])
    return D.addition_rewards(texts, answers, ~eos).sum(1) - run.cfg.missing_eos_penalty * ~eos


@pytest.fixture(scope="module", params=list(TOY))
def toy(request, tmp_path_factory):
    algo = request.param
    out = tmp_path_factory.mktemp(algo)
    with pytest.MonkeyPatch.context() as mp:
        box = capture_first_step(mp)
        run_trainer(algo, out, preset=algo, seed=0, **TOY[algo])
    return algo, box, read_metrics(out)


def test_first_step_equals_objective(toy):
    """The first step's loss, its gradient norm and the trainer's step from a policy that differs from the
    reference (:func:`check_loss_and_grad`: at step 1 policy = reference, so online DPO's loss is log 2 and
    Nash-MD's KL term 0 whatever the batch); XPO's exploration term (~1e-4 of its loss) is compared on its own."""
    from trlax.objectives import nash_md_loss, online_dpo_loss, xpo_loss

    algo, box, _ = toy
    run, b, p0 = box["run"], box["batch"], box["state"].params
    ref = run.frozen_params  # the reference model is the initial policy
    for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(p0)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if algo == "nash_md":
        ref_lp = _logps(run, ref, b, b["completion_ids"], b["mask"])
        np.testing.assert_allclose(b["ref_logps"], ref_lp, rtol=1e-5, atol=1e-6)
        r_pol = _rewards(run, b, b["completion_ids"], b["mask"])
        r_mix = _rewards(run, b, b["mixture_ids"], b["mixture_mask"])
        np.testing.assert_allclose(b["preference"], 1.0 / (1.0 + np.exp(-(r_pol - r_mix))), rtol=1e-6)

        def objective(p, with_metrics=False):
            lp = _logps(run, p, b, b["completion_ids"], b["mask"])
            out = nash_md_loss(lp, b["ref_logps"], b["mask"], b["preference"], beta=0.1)
            return out if with_metrics else out[0]
    else:
        ref_ch = _logps(run, ref, b, b["chosen_ids"], b["chosen_mask"]).sum(-1)
        ref_rj = _logps(run, ref, b, b["rejected_ids"], b["rejected_mask"]).sum(-1)
        np.testing.assert_allclose(b["ref_chosen"], ref_ch, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b["ref_rejected"], ref_rj, rtol=1e-5, atol=1e-5)
        assert np.all(_rewards(run, b, b["chosen_ids"], b["chosen_mask"])
                      >= _rewards(run, b, b["rejected_ids"], b["rejected_mask"]))
        kw = dict(chosen_mask=b["chosen_mask"], rejected_mask=b["rejected_mask"], beta=0.1, loss_type="sigmoid")

        def objective(p, with_metrics=False):
            ch = _logps(run, p, b, b["chosen_ids"], b["chosen_mask"])
            rj = _logps(run, p, b, b["rejected_ids"], b["rejected_mask"])
            if algo == "online_dpo":
                out = online_dpo_loss(ch, rj, b["ref_chosen"], b["ref_rejected"], **kw)
            else:
                pol = b["chosen_is_policy"][:, None]
                out = xpo_loss(ch, rj, b["ref_chosen"], b["ref_rejected"], jnp.where(pol, rj, ch),
                               ref_sample_mask=np.where(pol, b["rejected_mask"], b["chosen_mask"]), alpha=1e-5,
                               **kw)
            return out if with_metrics else out[0]

    check_loss_and_grad(box, objective)
    if algo == "xpo":  # the exploration term alone: alpha * log-probs of the reference's samples
        _, m = objective(p0, with_metrics=True)
        assert abs(float(m["loss/xpo"])) > 0 and abs(float(m["loss/xpo"])) < 1e-2 * abs(float(m["loss/dpo"]))
        for key in ("loss/xpo", "loss/dpo"):
            np.testing.assert_allclose(box["metrics"][key], float(m[key]), rtol=1e-5, atol=1e-12)


def test_toy_run_judged_reward_rises(toy):
    algo, _, rows = toy
    assert [r["step"] for r in rows] == list(range(1, TOY[algo]["max_steps"] + 1))
    first, last = first_last([r["reward"] for r in rows])
    print(f"{algo}: mean judged reward, first fifth {first:.3f} -> last fifth {last:.3f}")
    assert last >= first + 0.15, (algo, first, last)


# ------------------------------------------------------------------------------------ reward models


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny random Llama sequence-classification checkpoint (transformers) with the built-in tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm")
    tok = D.build_tokenizer(str(path))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_labels=1,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=64)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)  # scores far enough apart for the judge to prefer
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("algo,judge", [("online_dpo", "reward_model"), ("nash_md", "pairwise")])
def test_reward_model_judges(tmp_path, monkeypatch, reward_model_dir, algo, judge):
    """A sequence-classification reward model scores (judge=reward_model) or judges pairs (judge=pairwise,
    P = σ(r_a − r_b)); the first step equals the objective and the judge's values are the reward model's."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from trlax.objectives import nash_md_loss, online_dpo_loss

    box = capture_first_step(monkeypatch)
    run_trainer(algo, tmp_path, max_steps=1, batch_size=8, judge=judge, reward_model=reward_model_dir)
    run, b, p0 = box["run"], box["batch"], box["state"].params
    hf = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()

    def rm(ids, mask):  # reward of prompt + completion, scored by transformers itself
        out = []
        for pi, pm, ci, cm in zip(b["prompt_ids"], b["prompt_mask"], ids, mask):
            seq = np.concatenate([pi[pm], ci[cm]])
            seq = seq[~np.isin(seq, run.tokenizer.all_special_ids)]  # the judge scores the decoded text
            with torch.no_grad():
                out.append(float(hf(torch.tensor(seq[None], dtype=torch.long)).logits[0, 0]))
        return np.asarray(out)

    if algo == "nash_md":
        r_pol, r_mix = rm(b["completion_ids"], b["mask"]), rm(b["mixture_ids"], b["mixture_mask"])
        np.testing.assert_allclose(b["preference"], 1.0 / (1.0 + np.exp(-(r_pol - r_mix))), rtol=1e-4, atol=1e-5)
        lp = _logps(run, p0, b, b["completion_ids"], b["mask"])
        ref_lp = _logps(run, run.frozen_params, b, b["completion_ids"], b["mask"])
        loss, _ = nash_md_loss(lp, ref_lp, b["mask"], b["preference"], beta=0.1)
    else:
        r_ch, r_rj = rm(b["chosen_ids"], b["chosen_mask"]), rm(b["rejected_ids"], b["rejected_mask"])
        assert np.all(r_ch >= r_rj - 1e-4) and np.any(r_ch > r_rj + 1e-3)
        kw = dict(chosen_mask=b["chosen_mask"], rejected_mask=b["rejected_mask"])
        loss, _ = online_dpo_loss(_logps(run, p0, b, b["chosen_ids"], b["chosen_mask"]),
                                  _logps(run, p0, b, b["rejected_ids"], b["rejected_mask"]),
                                  b["ref_chosen"], b["ref_rejected"], **kw)
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ mixture sampler


def test_mixture_sampler_draws_from_the_geometric_mixture(tmp_path):
    """Nash-MD's second sample: the first token's empirical frequencies match
    softmax((κ·z_ref + (1 − κ)·z_θ) / T) computed here from both models' logits; EOS ends a completion."""
    from flax import nnx

    from trlax.models import Decoder, DecoderConfig
    from trlax.train.modeling import tiny_hf_config
    from trlax.train.online import make_mixture_sampler

    tok = D.build_tokenizer(str(tmp_path))
    dc = DecoderConfig.from_hf(tiny_hf_config(tok))
    gd, pol = nnx.split(Decoder(dc, rngs=nnx.Rngs(1)))
    _, ref = nnx.split(Decoder(dc, rngs=nnx.Rngs(2)))
    for st in (pol, ref):  # sharpen the random models' next-token distributions (logit std ~3)
        st["lm_head"][...] = st["lm_head"][...] * 30.0
    kappa, temp, n = 0.4, 0.8, 2000
    prompt = np.asarray(tok("3+4=", add_special_tokens=False)["input_ids"])
    p_ids, p_mask = np.tile(prompt, (n, 1)), np.ones((n, len(prompt)), bool)
    fn = make_mixture_sampler(gd, 2, mixture_coef=kappa, temperature=temp, top_k=0, top_p=1.0,
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    ids, mask, trunc = (np.asarray(x) for x in fn(pol, ref, p_ids, p_mask, jax.random.PRNGKey(0)))
    z = np.asarray(nnx.merge(gd, pol)(p_ids[:1]))[0, -1].astype(np.float64)
    zr = np.asarray(nnx.merge(gd, ref)(p_ids[:1]))[0, -1].astype(np.float64)
    logit = (kappa * zr + (1 - kappa) * z) / temp
    expected = np.exp(logit - logit.max())
    expected /= expected.sum()
    freq = np.bincount(ids[:, 0], minlength=len(expected)) / n
    tol = 4 * np.sqrt(expected.max() / n)
    assert np.abs(freq - expected).max() < tol, (freq, expected)
    policy_only = np.exp(z / temp - (z / temp).max())
    assert np.abs(policy_only / policy_only.sum() - expected).max() > 2 * tol  # the check can tell them apart
    stopped = ids[:, 0] == tok.eos_token_id
    assert stopped.any() and np.all(~mask[stopped, 1]) and np.all(~trunc[stopped])
    assert np.all(mask[~stopped, 1]) and np.array_equal(trunc[~stopped], ids[~stopped, 1] != tok.eos_token_id)


# ------------------------------------------------------------------------------------ beta schedule


def test_per_epoch_schedules(tmp_path):
    """TRL's per-epoch beta / alpha lists: 16 prompts, 8 per step -> a new epoch every 2 steps; the last
    value holds once the list runs out."""
    from trlax.train.online import run_online

    cfg = build_config("xpo", dict(TINY_RUN, output_dir=str(tmp_path), max_steps=5, batch_size=8,
                                   beta_schedule="0.1,0.5", alpha_schedule="0,1"))
    run_online(cfg, D.addition_examples(16), algo="xpo")
    rows = read_metrics(tmp_path)
    assert [(r["beta"], r["alpha"]) for r in rows] == [(0.1, 0.0)] * 2 + [(0.5, 1.0)] * 3
    assert all(r["loss/xpo"] == 0.0 for r in rows[:2]) and all(r["loss/xpo"] < -1.0 for r in rows[2:])


# ---------------------------------------------------------------------------------------- bad fields


@pytest.mark.parametrize("algo,field,value", [
    ("online_dpo", "loss_type", "hinge"),
    ("online_dpo", "beta", "0"),
    ("online_dpo", "beta_schedule", "0.1,x"),
    ("xpo", "alpha", "-1"),
    ("nash_md", "mixture_coef", "1.5"),
    ("nash_md", "temperature", "0"),
    ("online_dpo", "judge", "oracle"),
    ("xpo", "judge", "pairwise"),  # needs reward_model
    ("nash_md", "reward_model", "/nonexistent"),
    ("xpo", "alpha_schedule", "1,-1"),
])
def test_bad_field_raises_naming_it(tmp_path, algo, field, value):
    with pytest.raises(ValueError, match=field):
        build_config(algo, dict(TINY_RUN, output_dir=str(tmp_path), **{field: value}))


def test_presets_resolve():
    cfg = build_config("online_dpo", {"preset": "ipo", "output_dir": "/tmp/x"})
    assert (cfg.loss_type, cfg.beta, cfg.temperature) == ("ipo", 0.1, 0.9)
    cfg = build_config("xpo", {"preset": "xpo", "beta": "0.2", "output_dir": "/tmp/x"})
    assert (cfg.alpha, cfg.beta) == (1e-5, 0.2)  # explicit flags win over the preset
    cfg = build_config("nash_md", {"preset": "nash_md", "output_dir": "/tmp/x"})
    assert (cfg.beta, cfg.mixture_coef) == (0.1, 0.5)
