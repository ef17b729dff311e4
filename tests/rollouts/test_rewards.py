"""Rewards: TRL's own reward functions as oracles (repetition penalty, soft overlong punishment, think format),
hand-computed fixtures for answer extraction / equivalence / R1 accuracy + format / cosine length scaling,
NaN for unscorable in compute_rewards, and the reward model + pairwise judge vs transformers'
``*ForSequenceClassification`` forward (tiny checkpoints built locally)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jax.numpy as jnp

from trlax.rollouts import (
    CosineScaledReward,
    RepetitionPenalty,
    RewardModelJudge,
    RewardModelScorer,
    SoftOverlongPunishment,
    accuracy_reward,
    answers_equal,
    compute_rewards,
    decode_rollout,
    exact_match_reward,
    extract_boxed,
    extract_last_number,
    format_reward,
    load_reward_model,
    think_format_reward,
    weighted_reward_sum,
)

trl_rewards = pytest.importorskip("trl.rewards")

ids_lists = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=12), min_size=1, max_size=6)


# ------------------------------------------------------------------------------------ TRL oracles


@pytest.mark.trl
@given(ids=ids_lists, n=st.sampled_from([1, 2, 3]), pen=st.sampled_from([-1.0, -0.3]))
def test_repetition_penalty_matches_trl(ids, n, pen):
    ref = trl_rewards.get_repetition_penalty_reward(ngram_size=n, max_penalty=pen)(completion_ids=ids)
    ours = [RepetitionPenalty(n, pen)(completion="", completion_ids=x) for x in ids]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)


@pytest.mark.trl
@given(ids=st.lists(st.lists(st.just(1), min_size=0, max_size=30), min_size=1, max_size=6),
       lmax=st.sampled_from([10, 20]), cache=st.sampled_from([1, 5, 10]))
def test_soft_overlong_matches_trl(ids, lmax, cache):
    ref = trl_rewards.get_soft_overlong_punishment(lmax, cache)(completion_ids=ids)
    ours = [SoftOverlongPunishment(lmax, cache)(completion_ids=x) for x in ids]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)


THINK = ["<think>\nreasoning\n</think>\nanswer", "<think>a</think>", "<think>\nno close", "answer <think>x</think>",
         "<think>a</think><think>b</think>", "<think>\n\n</think>\n<answer>\n1\n</answer>", ""]


@pytest.mark.trl
def test_think_format_matches_trl():
    ref = trl_rewards.think_format_reward([[{"content": c}] for c in THINK])
    assert ref == [think_format_reward(completion=c) for c in THINK]
    assert ref == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # fixture: guards the oracle too


def test_repetition_penalty_words():
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 unique of 5 -> (1 - 2/5) * -1
    assert RepetitionPenalty(2, -1.0, on="words")(completion="A b a B a b") == pytest.approx(-0.6)
    assert RepetitionPenalty(3, -1.0, on="words")(completion="one two") == 0.0


# ------------------------------------------------------------------------------ extraction fixtures


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{x^{2} + {y}}", "x^{2} + {y}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5", "5"),
    (r"\boxed{unclosed", None),
    ("no box 12", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is 1,234.", "1,234"), ("a -3.5 b 7", "7"), ("x = -2", "-2"), ("ratio 3/4.", "3/4"),
    ("none here", None), ("value .5", ".5"),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize("a,b,eq", [
    (r"\frac{1}{2}", "0.5", True), (r"\dfrac{3}{4}", "3/4", True), ("1,000", "1000", True), ("$12$", "12", True),
    (r"\text{(B)}", "(B)", True), ("5.", "5", True), ("0.333", "1/3", False), ("2", "3", False),
    (r"\left(1, 2\right)", "(1,2)", True), ("x+1", "1+x", False), ("", "", False), (None, "1", False),
    ("1/0", "2/0", False), (r"90^\circ", "90", True),
])
def test_answers_equal(a, b, eq):
    assert answers_equal(a, b) is eq


def test_exact_match_and_accuracy_rewards():
    assert exact_match_reward(r"... \boxed{\frac{1}{3}}", r"\frac{1}{3}") == 1.0
    assert exact_match_reward("so 18 apples, total 20", "20") == 1.0  # last number
    assert exact_match_reward("so 18 apples, total 20", "20", extract="boxed") == 0.0
    assert exact_match_reward("anything", "   ") is None  # unscorable gold
    assert exact_match_reward(r"\boxed{5}", solution=r"Hence the answer is $\boxed{5}$.") == 1.0
    with pytest.raises(ValueError, match="extract='bad'.*allowed values"):
        exact_match_reward("1", "1", extract="bad")
    # DeepSeek-R1 accuracy: boxed first, then <answer>; no last-number fallback
    assert accuracy_reward("<think>\nx\n</think>\n<answer>\n7\n</answer>", solution="7") == 1.0
    assert accuracy_reward(r"<answer>\boxed{8}</answer>", solution="7") == 0.0
    assert accuracy_reward("the answer is 7", solution="7") == 0.0
    assert accuracy_reward("7", solution=None) is None


def test_format_reward():
    assert format_reward("<think>\nreason\n</think>\n<answer>\n42\n</answer>") == 1.0
    assert format_reward("<think>\nreason\n</think>\n<answer>\n42\n</answer>\n") == 0.0
    assert format_reward("<think>reason</think><answer>42</answer>") == 0.0
    assert format_reward("<answer>\n42\n</answer>") == 0.0


def test_cosine_scaled_reward_values():
    f = CosineScaledReward(max_len=100)
    # TRL's documented example: 50 of 100 tokens -> correct 0.75, wrong -0.75
    assert f(completion=r"\boxed{\frac{1}{3}}", completion_ids=[1] * 50, solution=r"\frac{1}{3}") == pytest.approx(0.75)
    assert f(completion=r"\boxed{\frac{1}{2}}", completion_ids=[1] * 50, solution=r"\frac{1}{3}") == pytest.approx(-0.75)
    assert f(completion=r"\boxed{3}", completion_ids=[], solution="3") == pytest.approx(1.0)  # short correct: v_max
    assert f(completion=r"\boxed{4}", completion_ids=[], solution="3") == pytest.approx(-1.0)  # short wrong: worst
    assert f(completion=r"\boxed{4}", completion_ids=[1] * 100, solution="3") == pytest.approx(-0.5)
    # L = 25: 0.5 + 0.25 * (1 + cos(pi/4))
    want = 0.5 + 0.25 * (1 + math.cos(math.pi / 4))
    assert f(completion=r"\boxed{3}", completion_ids=[0] * 25, solution="3") == pytest.approx(want, abs=1e-15)
    assert f(completion=r"\boxed{3}", completion_ids=[0] * 25, solution="") is None
    g = CosineScaledReward(max_len=10, exceed_length_value=-10.0)
    assert g(completion=r"\boxed{3}", completion_ids=[0] * 10, solution="3") == -10.0
    with pytest.raises(ValueError, match="max_len"):
        CosineScaledReward(max_len=0)


def test_reward_config_errors():
    with pytest.raises(ValueError, match="max_penalty"):
        RepetitionPenalty(3, 0.5)
    with pytest.raises(ValueError, match="ngram_size"):
        RepetitionPenalty(0)
    with pytest.raises(ValueError, match="on='chars'"):
        RepetitionPenalty(2, on="chars")
    with pytest.raises(ValueError, match="soft_punish_cache"):
        SoftOverlongPunishment(10, 20)


# ---------------------------------------------------------------------------------- combination


def test_compute_rewards_nan_for_unscorable_and_weighted_sum():
    def batched(completions, **_):
        return [float(len(c)) for c in completions]

    batched.batched = True
    comps = [r"\boxed{3}", "<think>\na\n</think>\n<answer>\n4\n</answer>", "nothing"]
    R = compute_rewards([exact_match_reward, format_reward, batched, RepetitionPenalty(1)], comps,
                        completion_ids=[[1, 1], [1, 2], []], answer=["3", "4", ""])
    want = np.array([[1.0, 0.0, 9.0, -0.5], [1.0, 1.0, 39.0, 0.0], [np.nan, 0.0, 7.0, 0.0]])
    np.testing.assert_array_equal(R, want)
    only_none = compute_rewards([exact_match_reward], ["x", r"\boxed{1}"], answer=["", "1"])
    np.testing.assert_array_equal(weighted_reward_sum(only_none), [np.nan, 1.0])
    np.testing.assert_allclose(weighted_reward_sum(R, [2.0, 1.0, 0.0, 1.0]), [1.5, 3.0, 0.0])
    with pytest.raises(ValueError, match="`answer` has 1 entries, expected 3"):
        compute_rewards([exact_match_reward], comps, answer=["3"])
    with pytest.raises(ValueError, match="`weights` must have shape"):
        weighted_reward_sum(R, [1.0])
    with pytest.raises(ValueError, match="reward_fns"):
        compute_rewards([], comps)


def test_compute_rewards_feeds_multi_reward_advantages():
    from trlax.objectives import multi_reward_advantages

    R = compute_rewards([exact_match_reward], [r"\boxed{1}", r"\boxed{2}", "a", "b"], answer=["1", "1", "", ""])
    adv = np.asarray(multi_reward_advantages(jnp.asarray(R), None, 2))
    assert np.isnan(R[2:]).all() and np.isfinite(adv).all()
    assert adv[0] > 0 > adv[1] and (adv[2:] == 0).all()


class CharTok:
    """A character tokenizer for the tests (ids 1..V-1; 0 is padding)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text, add_special_tokens=False):
        return [1 + ord(ch) % (self.vocab - 1) for ch in text]

    def decode(self, ids):
        return "".join(chr(96 + i % 26) for i in ids)


def test_decode_rollout():
    from trlax.rollouts import Rollout

    roll = Rollout(prompt_ids=np.zeros((2, 1), np.int32), prompt_mask=np.ones((2, 1), bool),
                   completion_ids=np.array([[1, 2, 3], [4, 0, 0]]), completion_mask=np.array([[1, 1, 1], [1, 0, 0]], bool),
                   logps=np.zeros((2, 3)), truncated=np.array([True, False]), group_ids=np.arange(2))
    texts, ids = decode_rollout(roll, CharTok(30))
    assert ids == [[1, 2, 3], [4]] and texts == ["abc", "d"]


# ----------------------------------------------------------------------------------- reward model

V = 64


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, pad_token_id=0, max_position_embeddings=256)
    out = {}
    for name, cfg in {"qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=False, num_labels=1),
                      "llama": transformers.LlamaConfig(**common, attention_bias=True, num_labels=1),
                      "qwen3": transformers.Qwen3Config(**common, head_dim=16, num_labels=2)}.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.1 * torch.randn_like(p))
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = (hf, load_reward_model(path))
    return out


def _hf_scores(hf, ids, mask):
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("name", ["qwen2", "llama", "qwen3"])
def test_reward_model_matches_transformers(reward_models, name):
    hf, rm = reward_models[name]
    rng = np.random.RandomState(1)
    ids = rng.randint(1, V, (3, 9))
    mask = np.ones((3, 9), bool)
    mask[1, 6:] = False  # right padding (HF reads the last non-pad token)
    mask[2, 3:] = False
    ids = np.where(mask, ids, 0)
    ref = _hf_scores(hf, ids, mask)
    got = np.asarray(rm(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # left padding of the same rows gives the same scores
    left = np.zeros_like(ids)
    lmask = np.zeros_like(mask)
    for b in range(3):
        n = mask[b].sum()
        left[b, 9 - n:], lmask[b, 9 - n:] = ids[b, :n], True
    np.testing.assert_allclose(np.asarray(rm(jnp.asarray(left), jnp.asarray(lmask))), ref, rtol=1e-4, atol=1e-5)


def test_scorer_and_judge_match_transformers(reward_models):
    hf, rm = reward_models["qwen2"]
    tok = CharTok(V)
    scorer = RewardModelScorer(rm, tok, batch_size=4)
    prompts = ["Q: 2+2? ", "Say hi. ", "x", "Q: 3*3? ", "long prompt " * 3]
    comps = ["4", "hello there", "yz", "nine", "ok"]
    texts = [p + c for p, c in zip(prompts, comps)]
    ref = []
    for t in texts:
        ids = np.asarray([tok.encode(t)])
        ref.append(_hf_scores(hf, ids, np.ones_like(ids, bool))[0, 0])
    got = scorer(completions=comps, prompts=prompts)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    R = compute_rewards([scorer], comps, prompts=prompts)
    np.testing.assert_allclose(R[:, 0], ref, rtol=1e-4, atol=1e-5)
    judge = RewardModelJudge(scorer)
    other = ["5", "bye", "zz", "9", "no"]
    ref_b = [_hf_scores(hf, np.asarray([tok.encode(p + c)]), np.ones((1, len(p + c)), bool))[0, 0]
             for p, c in zip(prompts, other)]
    want = 1.0 / (1.0 + np.exp(-(np.asarray(ref) - np.asarray(ref_b))))
    np.testing.assert_allclose(judge.batch(prompts, comps, other), want, rtol=1e-4, atol=1e-5)
    assert judge(prompts[0], comps[0], other[0]) == pytest.approx(want[0], rel=1e-4, abs=1e-5)
    assert judge(prompts[0], comps[0], comps[0]) == pytest.approx(0.5, abs=1e-7)


def test_load_reward_model_rejects_causal_lm(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=V)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported reward model architecture.*Qwen2ForCausalLM"):
        load_reward_model(str(tmp_path))
