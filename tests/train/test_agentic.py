"""`trlax train grpo --environment ...` (trlax.train.agentic): the round's batch carries the interleaved
completion block with the policy-token loss mask (gaps at the observations) and the full attention mask, and
the step's loss is the objective over those (the forward attends to the observations); run-field errors name
the field. One 1-step tiny run (a few compilations)."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from trlax.rollouts import Environment
from trlax.train import loops
from trlax.train.config import build_config


class Observe(Environment):
    """Two turns; the first always answered with a short user message; reward = length of the last turn."""

    def __init__(self):
        self.k = 0

    def reset(self, row):
        return row["prompt"]

    def step(self, action_text):
        self.k += 1
        if self.k == 2:
            return None, float(len(action_text) % 3), True
        return "12", None, False


def test_grpo_with_environment_trains_on_gapped_masks(tmp_path, monkeypatch):
    from trlax.objectives import policy_loss

    box = {}
    monkeypatch.setattr(loops, "_on_first_step", lambda run, state, batch, metrics: box.update(
        run=run, state=state, batch={k: np.asarray(v) for k, v in batch.items()}, metrics=metrics))
    cfg = build_config("grpo", dict(environment=f"{__name__}:Observe", max_turns=2, max_steps=1, batch_size=8,
                                    num_generations=4, max_completion_length=40, max_prompt_length=16, beta=0.0,
                                    log_kl=False, progress=False, export=False, output_dir=str(tmp_path)))
    loops.run("grpo", cfg)
    b, m = box["batch"], box["metrics"]
    mask, att = b["mask"].astype(bool), b["attention_mask"].astype(bool)
    assert not (mask & ~att).any() and (att & ~mask).any()  # gaps: observation tokens attended, not trained on
    assert m["agent/turns"] > 1 and m["agent/observation_tokens"] > 0
    run, lcfg = box["run"], loops.loss_config("grpo", cfg)

    def loss_and_entropy(attention):
        logps, ent = run.policy.completion_logps(box["state"].params, b["prompt_ids"], b["prompt_mask"],
                                                 b["completion_ids"], attention)
        value = policy_loss(logps, None, jnp.asarray(b["advantages"]), jnp.asarray(mask), lcfg, entropies=ent,
                            truncated=jnp.asarray(b["truncated"]))[0]
        return float(value), float(np.sum(np.asarray(ent) * mask) / mask.sum())

    loss, entropy = loss_and_entropy(att)
    assert m["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    assert m["entropy"] == pytest.approx(entropy, rel=1e-4)  # token mean over the gapped mask
    # the step's forward attends to the observations: without them the policy tokens' log-probs differ
    lp = [np.asarray(run.policy.completion_logps(box["state"].params, b["prompt_ids"], b["prompt_mask"],
                                                 b["completion_ids"], a)[0]) for a in (att, mask)]
    assert np.abs(lp[0] - lp[1])[mask].max() > 1e-3


def test_environment_fields_are_checked():
    with pytest.raises(ValueError, match="max_turns"):
        build_config("grpo", dict(max_turns=0))
    with pytest.raises(ValueError, match="environment='nowhere:Env': cannot import module"):
        build_config("grpo", dict(environment="nowhere:Env"))
    with pytest.raises(ValueError, match="tools="):
        build_config("grpo", dict(tools="trlax.rollouts.environments:NoSuchTool"))
    with pytest.raises(ValueError, match="give one"):
        build_config("grpo", dict(environment="trlax.rollouts.environments:CalculatorEnv",
                                  tools="trlax.rollouts.environments:calculator"))


def test_final_turn_is_the_trailing_policy_run():
    from types import SimpleNamespace

    from trlax.train.agentic import _final_turns

    ids = np.arange(10)[None].repeat(2, 0)
    cm = np.array([[1] * 8 + [0] * 2, [1] * 10], bool)
    lm = np.array([[1, 1, 0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], bool)
    # row 1 ends with observation tokens (cut by the budget): its final turn is empty
    assert _final_turns(SimpleNamespace(completion_ids=ids, completion_mask=cm, loss_mask=lm)) == [[], []]
    lm[0, 7] = True
    assert _final_turns(SimpleNamespace(completion_ids=ids, completion_mask=cm, loss_mask=lm))[0] == [4, 5, 6, 7]


def test_environment_rows_and_warm_start_demonstrations_are_checked():
    """--dataset builtin with an environment that has its own task (CalculatorEnv: addition) uses it; a warm start
    (--sft_warmup_steps) on an environment without demonstrations is refused naming it."""
    from trlax.rollouts import tool_tokenizer
    from trlax.train.agentic import demonstration_rows, environment_rows

    calc = "trlax.rollouts.environments:CalculatorEnv"
    rows = environment_rows(build_config("grpo", dict(environment=calc)))
    assert len(rows) == 1024 and rows[0]["prompt"].endswith("=") and "+" in rows[0]["prompt"]
    assert environment_rows(build_config("grpo", dict(environment=calc, dataset="x.jsonl"))) is None
    assert environment_rows(build_config("grpo", dict(environment=f"{__name__}:Observe"))) is None
    assert environment_rows(build_config("grpo", {})) is None
    with pytest.raises(ValueError, match="environment Observe has no demonstrations"):
        demonstration_rows(Observe, tool_tokenizer(), [{"prompt": "1+2="}])
