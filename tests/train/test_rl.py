"""``trlax train rloo | ppo | a2po | gmpo`` (train/rl.py).

One short toy run per trainer on the built-in addition task (module-scoped, so each trainer compiles
once); from it, two checks:

- first step: the logged ``loss`` equals the objective called directly on the captured batch with the
  initial parameters (model forward recomputed here). Where the batch carries derived targets (RLOO / PPO
  advantages, PPO returns, A*-PO rewards) they are recomputed here in NumPy from the decoded prompts and
  completions (the task's answer is ``a + b`` of the prompt), so the reward -> advantage pipeline is checked
  too, not only the loss;
- learning: mean reward of the last fifth of the steps exceeds the first fifth by a clear margin.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _trainer_utils import (addition_task_rewards, capture_first_step, first_last, group_advantages, read_metrics,
                            run_trainer)
from trlax.train.config import build_config

TOY = dict(max_steps=40, batch_size=32, seed=0)


def _toy(name, tmp_path_factory, **values):
    out = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        box = capture_first_step(mp)
        box["summary"] = run_trainer(name, out, **dict(TOY, **values))
    box["rewards"] = [r["reward"] for r in read_metrics(out)]
    return box


def _logps(run, params, b, temperature=1.0):
    return run.policy.completion_logps(params, jnp.asarray(b["prompt_ids"]), jnp.asarray(b["prompt_mask"]),
                                       jnp.asarray(b["completion_ids"]), jnp.asarray(b["mask"]),
                                       temperature=temperature)


def _task_rewards(run, b):
    return addition_task_rewards(run, b)


def _assert_learns(box, margin):
    first, last = first_last(box["rewards"])
    print(f"reward first fifth {first:.3f} -> last fifth {last:.3f}")
    assert last > first + margin, (first, last)


# --------------------------------------------------------------------------------------------- RLOO


@pytest.fixture(scope="module")
def rloo(tmp_path_factory):
    return _toy("rloo", tmp_path_factory)


def test_rloo_first_step_equals_policy_loss(rloo):
    from trlax.objectives import policy_loss
    from trlax.objectives.policy import PolicyLossConfig

    run, b, p = rloo["run"], rloo["batch"], rloo["state"].params
    assert run.cfg.num_generations == 4 and run.cfg.beta == 0.05
    # leave-one-out baseline (eq. 6) over groups of 4 consecutive rows; at step 1 the sampling policy is
    # the reference, so the KL in the reward is 0
    r = _task_rewards(run, b).reshape(-1, 4)
    adv = (r - (r.sum(1, keepdims=True) - r) / 3).reshape(-1)
    np.testing.assert_allclose(b["advantages"], adv, atol=1e-6)
    logps, ent = _logps(run, p, b, run.cfg.temperature)
    cfg = PolicyLossConfig(loss_type="grpo", loss_agg_mode="luspo", epsilon=0.2, beta=0.0)
    loss, _ = policy_loss(logps, None, adv, b["mask"], cfg, entropies=ent)
    assert abs(rloo["metrics"]["loss"]) > 0
    np.testing.assert_allclose(rloo["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)


def test_rloo_toy_run_learns(rloo):
    _assert_learns(rloo, 0.25)


# ---------------------------------------------------------------------------------------------- PPO


@pytest.fixture(scope="module")
def ppo(tmp_path_factory):
    return _toy("ppo", tmp_path_factory, kl_ctl="adaptive", target_kl=0.5)


def _gae_whitened(token_rewards, values, mask, gamma, lam):
    B, T = mask.shape
    adv = np.zeros((B, T))
    for i in range(B):
        n = int(mask[i].sum())  # right-padded
        a_next = 0.0
        for t in reversed(range(n)):
            v_next = values[i, t + 1] if t + 1 < n else 0.0
            delta = token_rewards[i, t] + gamma * v_next - values[i, t]
            a_next = delta + gamma * lam * a_next
            adv[i, t] = a_next
    ret = np.where(mask, adv + values, 0.0)
    x = adv[mask]
    white = np.where(mask, (adv - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8), 0.0)
    return white, ret


def test_ppo_first_step_equals_policy_plus_value_loss(ppo):
    from flax import nnx

    from trlax.objectives import aggregate, clipped_value_loss, policy_loss
    from trlax.objectives.policy import PolicyLossConfig

    run, b, p = ppo["run"], ppo["batch"], ppo["state"].params
    logps, ent = _logps(run, p["policy"], b, run.cfg.temperature)
    mask = b["mask"]
    np.testing.assert_allclose(b["old_logps"], np.asarray(logps), atol=1e-5)  # on-policy at step 1
    # value model: the head on the value trunk's hidden state that predicts each completion token
    trunk = nnx.merge(run.policy.graphdef, p["value"]["trunk"])
    P, C = b["prompt_ids"].shape[1], b["completion_ids"].shape[1]
    h = trunk.hidden_states(jnp.concatenate([b["prompt_ids"], b["completion_ids"]], 1),
                            attention_mask=jnp.concatenate([b["prompt_mask"], mask], 1))[:, P - 1:P + C - 1]
    head = p["value"]["head"]
    values = np.where(mask, np.asarray(h @ head["kernel"][...] + head["bias"][...])[..., 0], 0.0)
    np.testing.assert_allclose(b["old_values"], values, atol=1e-5)
    # rewards: the score on the last token (KL to the reference is 0 at step 1); GAE(γ=1, λ=0.95), whitened
    score = _task_rewards(run, b)
    tok_r = np.zeros(mask.shape)
    tok_r[np.arange(len(score)), mask.sum(1) - 1] = score
    adv, ret = _gae_whitened(tok_r, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(b["advantages"], adv, atol=1e-4)
    np.testing.assert_allclose(b["returns"], ret, atol=1e-5)
    pg, _ = policy_loss(logps, b["old_logps"], adv, mask, PolicyLossConfig(loss_type="dapo", epsilon=0.2, beta=0.0))
    vf_tok, _ = clipped_value_loss(values, b["old_values"], ret, mask, 0.2)
    vf = aggregate(vf_tok, mask, "token_mean")
    assert float(vf) > 0
    np.testing.assert_allclose(ppo["metrics"]["loss"], float(pg + 0.1 * vf), rtol=1e-5, atol=1e-7)


def test_ppo_toy_run_learns_and_adapts_kl(ppo):
    _assert_learns(ppo, 0.15)
    # the adaptive controller moved the coefficient (KL far from the target at first -> it shrinks)
    assert ppo["summary"]["kl_coef_final"] != pytest.approx(0.05)


# -------------------------------------------------------------------------------------------- A*-PO


@pytest.fixture(scope="module")
def a2po(tmp_path_factory):
    return _toy("a2po", tmp_path_factory)


def test_a2po_first_step_equals_astar_po_loss(a2po):
    from trlax.objectives import astar_po_loss

    run, b, p = a2po["run"], a2po["batch"], a2po["state"].params
    logps, _ = _logps(run, p, b)  # temperature 1 (TRL)
    np.testing.assert_allclose(b["ref_logps"], np.asarray(logps), atol=1e-5)  # policy == reference at step 1
    np.testing.assert_allclose(b["rewards"], _task_rewards(run, b))
    # V*(x) = β₁ log mean exp(r/β₁) of 8 reference rewards in {0, 0.5, 1.5}: within [min r, max r]
    assert np.all((b["values"] >= 0) & (b["values"] <= 1.5)) and np.ptp(b["values"]) > 0
    loss, _ = astar_po_loss(logps, b["ref_logps"], b["rewards"], b["values"], mask=b["mask"], beta2=1e-3)
    np.testing.assert_allclose(a2po["metrics"]["loss"], float(loss), rtol=1e-5)
    # at step 1 the implicit reward is 0: the loss is the mean squared optimal advantage
    np.testing.assert_allclose(float(loss), np.mean((b["rewards"] - b["values"]) ** 2), rtol=1e-5)


def test_a2po_toy_run_learns(a2po):
    _assert_learns(a2po, 0.25)
    assert a2po["summary"]["num_prompts_valued"] > 0


# --------------------------------------------------------------------------------------------- GMPO


@pytest.fixture(scope="module")
def gmpo(tmp_path_factory):
    return _toy("gmpo", tmp_path_factory, num_generations=4)


def test_gmpo_first_step_equals_gmpo_loss(gmpo):
    from trlax.objectives import policy_loss
    from trlax.objectives.policy import PolicyLossConfig

    run, b, p = gmpo["run"], gmpo["batch"], gmpo["state"].params
    assert (run.cfg.loss_type, run.cfg.epsilon, run.cfg.epsilon_high, run.cfg.beta) == ("gmpo", 0.4, 0.4, 0.0)
    # group-relative advantages recomputed in NumPy from the decoded batch's rewards (groups of 4 rows)
    adv = group_advantages(_task_rewards(run, b), 4, run.cfg.scale_rewards)
    assert np.any(adv != 0)
    np.testing.assert_allclose(b["advantages"], adv, rtol=1e-6, atol=1e-6)

    def objective(params):
        logps, ent = _logps(run, params, b, run.cfg.temperature)
        return policy_loss(logps, None, adv, b["mask"], PolicyLossConfig.gmpo(), entropies=ent)[0]

    # at ratio 1 GMPO's loss is -mean(A), 0 up to rounding (group advantages sum to 0), whatever the model:
    # the value alone checks little, so the logged gradient norm must equal the objective's too
    loss, grad = jax.jit(jax.value_and_grad(objective))(p)
    np.testing.assert_allclose(gmpo["metrics"]["loss"], float(loss), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gmpo["metrics"]["grad_norm"], float(optax.tree.norm(grad)), rtol=1e-4)
    assert gmpo["metrics"]["grad_norm"] > 1e-3


def test_gmpo_toy_run_learns(gmpo):
    _assert_learns(gmpo, 0.25)


# ------------------------------------------------------------------------------------ configs, presets


def test_presets_resolve_to_the_papers_values():
    c = build_config("rloo", {"preset": "rloo", "output_dir": "x"})
    assert (c.beta, c.num_generations, c.normalize_advantages) == (0.03, 2, False)
    c = build_config("rloo", {"preset": "reinforce_pp", "beta": 0.1, "output_dir": "x"})
    assert (c.normalize_advantages, c.beta) == (True, 0.1)  # explicit fields win
    c = build_config("ppo", {"preset": "ppo", "output_dir": "x"})
    assert (c.cliprange, c.num_ppo_epochs, c.gamma, c.lam, c.kl_coef, c.vf_coef) == (0.2, 4, 1.0, 0.95, 0.05, 0.1)
    c = build_config("a2po", {"preset": "astar_po", "output_dir": "x"})
    assert (c.beta1, c.beta2, c.num_value_samples) == (0.5, 1e-3, 8)
    c = build_config("gmpo", {"output_dir": "x"})
    assert (c.loss_type, c.epsilon, c.epsilon_high) == ("gmpo", 0.4, 0.4)


@pytest.mark.parametrize("name, values, field", [
    ("rloo", {"num_generations": 3}, "num_generations"),
    ("rloo", {"beta": -0.1}, "beta"),
    ("rloo", {"loss_agg_mode": "mean"}, "loss_agg_mode"),
    ("rloo", {"reward_funcs": "builtin,bleu"}, "reward_funcs"),
    ("ppo", {"kl_ctl": "pid"}, "kl_ctl"),
    ("ppo", {"lam": 1.5}, "lam"),
    ("ppo", {"num_ppo_epochs": 0}, "num_ppo_epochs"),
    ("ppo", {"kl_estimator": "k9"}, "kl_estimator"),
    ("a2po", {"beta2": 0.0}, "beta2"),
    ("a2po", {"num_value_samples": 0}, "num_value_samples"),
    ("gmpo", {"epsilon": -1.0}, "epsilon"),
    ("rloo", {"preset": "dapo"}, "preset"),
])
def test_bad_fields_raise_naming_the_field(name, values, field):
    with pytest.raises(ValueError, match=field):
        build_config(name, dict(values, output_dir="x"))
