"""Multi-turn rollouts (trlax.rollouts.multiturn): the completion block interleaves policy turns and the
environment's observations, continued from the KV cache.

- the sampler log-probs of the policy tokens equal a full forward pass over [prompt | final completion block]
  (observations attended to, not shifted); with the observations dropped from the attention they do not;
- the block is exactly turn 1 + observation 1 + turn 2 + ... (observations as the chat template renders them)
  and the loss mask has gaps exactly at the observation tokens; per-turn rewards land at each turn's last
  policy token;
- with one turn the tokens are JaxSampler's for the same key;
- REINFORCE++ returns / advantages and the GRPO loss over the gapped mask equal the same objectives on the
  compacted policy tokens (observations removed), and the gradient is 0 at observation tokens;
- an environment that raises stops the run naming it; the token budget truncates.

One tiny float64 model (peaked logits so turns end at stop tokens), one module-scoped rollout shared by most
tests: a first-turn and one or two next-turn compilations.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from trlax.models import Decoder, DecoderConfig, completion_logps
from trlax.objectives import PolicyLossConfig, policy_loss, reinforce_plus_plus_advantages
from trlax.rollouts import (ChatFormat, Environment, EnvironmentRunError, JaxSampler, MultiTurnSampler,
                            SamplingConfig, StepResult, tool_tokenizer, turn_token_rewards)
from trlax.train.modeling import tiny_hf_config

ROWS = [{"prompt": "3+4="}, {"prompt": "12*3="}, {"prompt": "7-2="}]
G, N, TURNS = 3, 72, 3


class EchoEnv(Environment):
    """Three turns: observations are user messages of varying length; rewards 0.1·k per turn, 1 at the end."""

    def __init__(self):
        self.k, self.observations, self.actions = 0, [], []

    def reset(self, row):
        return row["prompt"]

    def step(self, action_text):
        self.k += 1
        self.actions.append(action_text)
        if self.k == TURNS:
            return StepResult(None, 1.0, True)
        obs = "1" * (1 + (len(action_text) + self.k) % 6)
        self.observations.append(obs)
        return obs, 0.1 * self.k, False


@pytest.fixture(scope="module")
def setup():
    tok = tool_tokenizer()
    cfg = DecoderConfig.from_hf(tiny_hf_config(tok))
    m = Decoder(cfg, rngs=nnx.Rngs(3), param_dtype=jnp.float64)
    gd, st = nnx.split(m)
    model = nnx.merge(gd, jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, st))  # peaked logits
    scfg = SamplingConfig(max_new_tokens=N, stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                          num_generations=G)
    sampler = MultiTurnSampler(model, scfg, tok, max_turns=TURNS)
    envs = []

    def factory():
        envs.append(EchoEnv())
        return envs[-1]

    roll = sampler.rollout(None, ROWS, factory, jax.random.PRNGKey(0))
    return dict(tok=tok, model=model, sampler=sampler, roll=roll, envs=envs, scfg=scfg)


def test_logps_equal_full_forward_over_final_context(setup):
    roll, model = setup["roll"], setup["model"]
    assert int(roll.num_turns.max()) >= 2 and int((roll.num_turns >= 2).sum()) >= 3  # observations were inserted
    lp, _ = completion_logps(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    lm = np.asarray(roll.loss_mask)
    np.testing.assert_allclose(np.where(lm, np.asarray(lp), 0.0), roll.logps, atol=2e-6)  # sampler logps: float32
    # dropping the observations from the attention (the loss mask as attention mask) changes later tokens
    lp_gap, _ = completion_logps(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.loss_mask)
    assert np.abs(np.where(lm, np.asarray(lp_gap), 0.0) - roll.logps).max() > 1e-3


def test_block_is_turns_and_observations_with_gaps_at_observations(setup):
    roll, tok, envs = setup["roll"], setup["tok"], setup["envs"]
    fmt = ChatFormat(tok)
    stops = set(setup["sampler"].config.stop_token_ids)
    eos = tok.eos_token_id
    for r in range(len(envs)):
        ids = np.asarray(roll.completion_ids[r])[np.asarray(roll.completion_mask[r])].tolist()
        lm = np.asarray(roll.loss_mask[r])[: len(ids)].tolist()
        pos, expect_mask = 0, []
        for k in range(int(roll.num_turns[r])):
            end = int(roll.turn_ends[r, k])
            turn = ids[pos:end + 1]
            assert all(t not in stops for t in turn[:-1])  # a turn runs to its first stop token
            assert tok.decode([t for t in turn if t != eos], skip_special_tokens=False) == envs[r].actions[k]
            expect_mask += [True] * len(turn)
            pos = end + 1
            if k < len(envs[r].observations) and pos < len(ids):
                obs = fmt.observation_ids(envs[r].observations[k], turn[-1] == eos)
                assert ids[pos:pos + len(obs)] == obs
                expect_mask += [False] * len(obs)
                pos += len(obs)
        assert pos == len(ids) and lm == expect_mask
        assert not np.asarray(roll.loss_mask[r])[len(ids):].any()
        np.testing.assert_array_equal(np.asarray(roll.logps[r])[~np.asarray(roll.loss_mask[r])], 0.0)
        # per-turn rewards: 0.1 k for the turns that handed back an observation, 1 for the final one
        for k in range(int(roll.num_turns[r])):
            want = 1.0 if k + 1 == TURNS else 0.1 * (k + 1)
            if roll.env_done[r] or k + 1 < int(roll.num_turns[r]):
                assert roll.rewards[r, k] == pytest.approx(want)
    assert roll.env_done.any() and (roll.num_turns == TURNS).any()
    tr = turn_token_rewards(roll)
    b, k = np.nonzero(roll.turn_ends >= 0)
    np.testing.assert_allclose(tr[b, roll.turn_ends[b, k]], np.nan_to_num(roll.rewards[b, k]))
    assert np.count_nonzero(tr) <= (roll.turn_ends >= 0).sum()


def test_one_turn_equals_single_turn_sampler(setup):
    tok, model, scfg = setup["tok"], setup["model"], setup["scfg"]
    mt = MultiTurnSampler(model, scfg, tok, max_turns=1, tool_stop_ids=())
    roll = mt.rollout(None, ROWS, EchoEnv, jax.random.PRNGKey(5))
    ref = JaxSampler(model, scfg).generate(None, (roll.prompt_ids[::G], roll.prompt_mask[::G]), jax.random.PRNGKey(5))
    np.testing.assert_array_equal(roll.completion_ids, ref.completion_ids)
    np.testing.assert_array_equal(roll.loss_mask, ref.completion_mask)
    np.testing.assert_allclose(roll.logps, ref.logps, atol=1e-7)


def _compact(x, mask):
    """Policy tokens moved to the left, observations removed (a [B, N] right-padded block)."""
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        v = x[b][mask[b]]
        out[b, : len(v)] = v
    return out


def test_objectives_over_gapped_masks(setup):
    roll = setup["roll"]
    m = np.asarray(roll.loss_mask)
    cm = np.zeros_like(m)
    for b in range(m.shape[0]):
        cm[b, : m[b].sum()] = True
    tr = turn_token_rewards(roll).astype(np.float64)
    # REINFORCE++: the returns skip observation tokens (neither reward nor discount there)
    adv, ret = reinforce_plus_plus_advantages(jnp.asarray(tr), jnp.asarray(m), gamma=0.9)
    adv_c, ret_c = reinforce_plus_plus_advantages(jnp.asarray(_compact(tr, m)), jnp.asarray(cm), gamma=0.9)
    np.testing.assert_allclose(_compact(np.asarray(ret), m), ret_c, atol=1e-12)
    np.testing.assert_allclose(_compact(np.asarray(adv), m), adv_c, atol=1e-9)
    assert not np.asarray(adv)[~m].any()
    # NumPy reference of the masked return of row 0 (policy tokens only, from the end)
    want, g = [], 0.0
    for t in reversed(range(m.shape[1])):
        if m[0, t]:
            g = tr[0, t] + 0.9 * g
            want.append((t, g))
    for t, v in want:
        assert float(ret[0, t]) == pytest.approx(v)
    # GRPO loss (per-sequence token mean) and DAPO (token mean): gapped block == compacted block, 0 gradient at gaps
    rng = np.random.default_rng(0)
    logps = np.where(m, roll.logps + rng.normal(0, 0.1, m.shape), 0.0)
    old = np.asarray(roll.logps)
    ref = np.where(m, old + rng.normal(0, 0.1, m.shape), 0.0)
    seq_adv = rng.normal(size=m.shape[0])
    for lcfg in (PolicyLossConfig.grpo(), PolicyLossConfig.dapo()):  # grpo: with the k3 KL term (beta > 0)
        def f(lp, mask, old_, ref_):
            return policy_loss(lp, old_, jnp.asarray(seq_adv), mask, lcfg, ref_logps=ref_,
                               truncated=jnp.asarray(roll.truncated))[0]
        loss, grad = jax.value_and_grad(f)(jnp.asarray(logps), jnp.asarray(m), jnp.asarray(old), jnp.asarray(ref))
        loss_c, grad_c = jax.value_and_grad(f)(jnp.asarray(_compact(logps, m)), jnp.asarray(cm),
                                               jnp.asarray(_compact(old, m)), jnp.asarray(_compact(ref, m)))
        assert float(loss) == pytest.approx(float(loss_c), rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(_compact(np.asarray(grad), m), grad_c, atol=1e-12)
        assert not np.asarray(grad)[~m].any()
    # per-token advantages (REINFORCE++) through the loss too
    tc = jnp.asarray(roll.truncated)
    loss_t = policy_loss(jnp.asarray(logps), jnp.asarray(old), adv, jnp.asarray(m), PolicyLossConfig.dapo(),
                         truncated=tc)[0]
    loss_tc = policy_loss(jnp.asarray(_compact(logps, m)), jnp.asarray(_compact(old, m)), adv_c, jnp.asarray(cm),
                          PolicyLossConfig.dapo(), truncated=tc)[0]
    assert float(loss_t) == pytest.approx(float(loss_tc), rel=1e-9, abs=1e-12)


class BrokenEnv(EchoEnv):
    def step(self, action_text):
        if self.k == 1:
            raise KeyError("scoreboard")
        return super().step(action_text)


def test_environment_that_raises_stops_the_run_naming_it(setup):
    with pytest.raises(EnvironmentRunError, match=r"BrokenEnv\.step raised on rollout \d+ \(turn 2\).*scoreboard"):
        setup["sampler"].rollout(None, ROWS, BrokenEnv, jax.random.PRNGKey(0))


def test_budget_truncates_and_errors_name_arguments(setup):
    tok, model, scfg = setup["tok"], setup["model"], setup["scfg"]
    import dataclasses

    short = MultiTurnSampler(model, dataclasses.replace(scfg, max_new_tokens=12), tok, max_turns=TURNS)
    roll = short.rollout(None, ROWS[:1], EchoEnv, jax.random.PRNGKey(0))
    assert roll.truncated.any() or (roll.num_turns == 1).all()
    assert (roll.completion_mask.sum(1) <= 12).all()
    with pytest.raises(ValueError, match="max_turns"):
        MultiTurnSampler(model, scfg, tok, max_turns=0)
    with pytest.raises(ValueError, match="observation_multiple"):
        MultiTurnSampler(model, scfg, tok, observation_multiple=0)


class BadReset(EchoEnv):
    def reset(self, row):
        raise ValueError("no prompt today")


class NoStep:
    def reset(self, row):
        return row["prompt"]


def test_environment_creation_reset_and_interface_errors_name_it(setup):
    sampler, key = setup["sampler"], jax.random.PRNGKey(0)
    with pytest.raises(EnvironmentRunError, match=r"BadReset\.reset raised on rollout 0 \(turn 0\).*no prompt today"):
        sampler.rollout(None, ROWS, BadReset, key)

    def broken_factory():
        raise RuntimeError("no sandbox")

    with pytest.raises(EnvironmentRunError, match="'broken_factory' could not be created.*no sandbox"):
        sampler.rollout(None, ROWS, broken_factory, key)
    with pytest.raises(EnvironmentRunError, match=r"NoStep has no step\(\) method"):
        sampler.rollout(None, ROWS, NoStep, key)
