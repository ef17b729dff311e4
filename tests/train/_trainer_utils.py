"""Shared helpers of the trainer tests: capture the first optimiser step of a run (the state it started
from, the host batch, the logged metrics) so a test can recompute the objective directly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trlax.train import loops
from trlax.train.config import build_config

# small shapes shared by the trainer tests (compile time dominates on CPU)
# (no curves.png: ~0.2 CPU-s per run; tests/train/test_default_job.py checks the plot)
TINY_RUN = dict(progress=False, plot=False, export=False, max_prompt_length=4, max_completion_length=3)


def capture_first_step(monkeypatch):
    """Install the loops' first-step hook; returns the dict it fills with ``run``, ``state``
    (the TrainState before the step), ``batch`` (host arrays) and ``metrics`` (floats)."""
    box = {}

    def hook(run, state, batch, metrics):
        box.update(run=run, state=state, batch={k: np.asarray(v) for k, v in batch.items()}, metrics=metrics)

    monkeypatch.setattr(loops, "_on_first_step", hook)
    return box


def _fresh(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def perturbed(params, scale=0.05, seed=0):
    """``params`` plus N(0, scale²) noise on every leaf (a policy that differs from the reference)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                  if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x for x, k in zip(leaves, keys)])


def check_loss_and_grad(box, objective, away=None, rtol=1e-5, grad_rtol=1e-4):
    """Check a trainer's step against ``objective(params) -> loss`` recomputed outside the step.

    1. The first step: the logged ``loss`` is ``objective(initial params)`` and the logged ``grad_norm`` the
       norm of its gradient.
    2. Away from the reference: the trainer's own compiled step, run once more on the same captured batch but
       from the parameters ``away`` (default: the initial ones plus noise, a policy that differs from the
       reference), logs the objective's value and gradient norm at ``away``. At step 1 the policy *is* the
       reference, so a reference-based loss is a constant there (DPO log 2, IPO (1/2β)²) and its gradient
       norm does not see a swapped chosen / rejected; away from it both do.
    Returns ``(loss at initial, loss at away)``."""
    fn = jax.jit(jax.value_and_grad(objective))
    state = box["state"]
    loss0, g0 = fn(state.params)
    assert np.isfinite(box["metrics"]["loss"])
    np.testing.assert_allclose(box["metrics"]["loss"], float(loss0), rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(box["metrics"]["grad_norm"], float(optax.tree.norm(g0)), rtol=grad_rtol, atol=1e-9)
    assert box["metrics"]["grad_norm"] > 0
    run = box["run"]
    away = perturbed(state.params) if away is None else away
    loss1, g1 = fn(away)
    _, m = run.step_fn(_fresh(state._replace(params=away)), run.place(box["batch"]))  # the step donates its input
    np.testing.assert_allclose(float(m["loss"]), float(loss1), rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(g1)), rtol=grad_rtol, atol=1e-9)
    assert abs(float(loss1) - float(loss0)) > 1e-4 * max(1.0, abs(float(loss0))), (loss0, loss1)  # it moved
    return float(loss0), float(loss1)


# `trlax train grpo` on the built-in task and tiny model resolves its auto fields to the default job's warm start
# and held-out evaluation (loops.DEFAULT_JOB): tests/train/test_default_job.py and test_eval.py test those; the
# other toy runs test the GRPO step itself and leave them off unless they ask (each costs an SFT run, an export
# and a reload, and evaluation rounds at new shapes)
GRPO_TOY_RUN = dict(sft_warmup_steps=0, eval_split=0.0)


def run_trainer(name, tmp_path, **values):
    """``loops.run(name, build_config(name, values))`` into ``tmp_path`` with the tiny defaults."""
    base = dict(TINY_RUN, **(GRPO_TOY_RUN if name == "grpo" else {}))
    cfg = build_config(name, dict(base, output_dir=str(tmp_path), **values))
    return loops.run(name, cfg)


class Killed(Exception):
    """Raised by :func:`run_killed_after` to stop a run as a kill would (after a finalised checkpoint)."""


def run_killed_after(name, tmp_path, monkeypatch, step, **values):
    """Run trainer ``name`` and stop it once ``step`` optimiser steps are logged and its checkpoint is written."""
    def kill(run, at):
        if at >= step:
            run.ckpt.wait()
            raise Killed

    monkeypatch.setattr(loops, "_after_step", kill)
    try:
        run_trainer(name, tmp_path, **values)
    except Killed:
        return
    finally:
        monkeypatch.setattr(loops, "_after_step", None)
    raise AssertionError(f"{name} finished before step {step}")


def read_metrics(tmp_path):
    with open(tmp_path / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def first_last(values, n=None):
    """Means of the first and last ``n`` values (default: a fifth of them, at least one)."""
    values = np.asarray(values, float)
    n = n or max(1, len(values) // 5)
    return float(np.nanmean(values[:n])), float(np.nanmean(values[-n:]))


def plain_completion_logits(graphdef, params, p_ids, p_mask, c_ids, c_mask):
    """``[B, C, V]`` completion logits by a plain forward of the whole sequence (independent of the trainers'
    fused log-prob helpers)."""
    P, C = p_ids.shape[1], c_ids.shape[1]
    ids = jnp.concatenate([jnp.asarray(p_ids), jnp.where(c_mask, c_ids, 0)], 1)
    mask = jnp.concatenate([jnp.asarray(p_mask), jnp.asarray(c_mask)], 1)
    return nnx.merge(graphdef, params)(ids, attention_mask=mask)[:, P - 1:P + C - 1]


def gather_logps(logits, ids, mask):
    """``[B, C]`` log-probs of ``ids`` under ``logits`` (or log-probs: log-softmax is idempotent), 0 off mask."""
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.where(mask, ids, 0)[..., None], -1)[..., 0]
    return jnp.where(mask, lp, 0.0)


def addition_task_rewards(run, b):
    """The built-in tasks' reward recomputed in plain Python from the decoded batch: accuracy (1 if the
    completion is exactly the answer then EOS: str(a+b) for "a+b=", the largest digit for grpo's "382=") +
    format (0.5 for 1-2 digits then EOS)."""
    tok = run.tokenizer
    out = []
    for p_ids, p_m, c_ids, c_m in zip(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"]):
        prompt = tok.decode(p_ids[p_m].tolist(), skip_special_tokens=True).rstrip("=")
        if "+" in prompt:  # addition ("3+4=")
            a, rest = prompt.split("+")
            answer = int(a) + int(rest)
        else:  # grpo's built-in task: the largest digit ("382=")
            answer = max(int(d) for d in prompt)
        toks = c_ids[c_m].tolist()
        done = bool(toks) and toks[-1] == tok.eos_token_id
        text = tok.decode(toks, skip_special_tokens=True)
        acc = 1.0 if done and text == str(answer) else 0.0
        fmt = 0.5 if done and text.isdigit() and len(text) <= 2 else 0.0
        out.append(acc + fmt)
    return np.asarray(out)


def group_advantages(rewards, num_generations, scale_rewards="group", eps=1e-4):
    """GRPO group-relative advantages in NumPy (float64): ``(r − mean_group) / (std + eps)`` with the group's
    unbiased std (``scale_rewards="group"``), the batch's (``"batch"``) or none; 0 for constant groups."""
    r = np.asarray(rewards, np.float64).reshape(-1, num_generations)
    adv = r - r.mean(1, keepdims=True)
    if scale_rewards == "group":
        adv = adv / (r.std(1, ddof=1, keepdims=True) + eps)
    elif scale_rewards == "batch":
        adv = adv / (r.std(ddof=1) + eps)
    adv = np.where(np.ptp(r, axis=1, keepdims=True) > 0, adv, 0.0)
    return adv.reshape(-1)
