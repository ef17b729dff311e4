"""Shared helpers of the trainer tests: capture the first optimiser step of a run (the state it started
from, the host batch, the logged metrics) so a test can recompute the objective directly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.train import loops
from trlax.train.config import build_config

# small shapes shared by the trainer tests (compile time dominates on CPU)
TINY_RUN = dict(progress=False, export=False, max_prompt_length=4, max_completion_length=3)


def capture_first_step(monkeypatch):
    """Install the loops' first-step hook; returns the dict it fills with ``run``, ``state``
    (the TrainState before the step), ``batch`` (host arrays) and ``metrics`` (floats)."""
    box = {}

    def hook(run, state, batch, metrics):
        box.update(run=run, state=state, batch={k: np.asarray(v) for k, v in batch.items()}, metrics=metrics)

    monkeypatch.setattr(loops, "_on_first_step", hook)
    return box


def run_trainer(name, tmp_path, **values):
    """``loops.run(name, build_config(name, values))`` into ``tmp_path`` with the tiny defaults."""
    cfg = build_config(name, dict(TINY_RUN, output_dir=str(tmp_path), **values))
    return loops.run(name, cfg)


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
