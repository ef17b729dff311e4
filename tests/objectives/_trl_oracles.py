"""Shared helpers for the objective tests: TRL stand-ins, a JAX token-log-prob helper for logits
parity, and a central-difference gradient for float64 NumPy references.

TRL is used only as a test-time oracle: its own methods are called on small stand-in ``self``
objects that carry exactly the attributes those methods read.
"""

from __future__ import annotations

import collections
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class Accel:
    """Single-process stand-in for ``accelerate.Accelerator`` (identity gathers, CPU device)."""

    num_processes = 1
    sync_gradients = True
    parallelism_config = None

    def __init__(self):
        import torch

        self.device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, m):
        return m


def metrics_store():
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


def stub(**attrs) -> types.SimpleNamespace:
    """A stand-in ``self`` with the common trainer attributes plus ``attrs``."""
    base = dict(
        accelerator=Accel(),
        model=types.SimpleNamespace(training=True),
        _metrics=metrics_store(),
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
    )
    base.update(attrs)
    return types.SimpleNamespace(**base)


def bind(obj, cls, *names):
    """Bind ``cls.<name>`` methods onto the stand-in ``obj``."""
    for n in names:
        setattr(obj, n, types.MethodType(getattr(cls, n), obj))
    return obj


def token_logps(logits: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """``log softmax(logits)[ids]`` on the last axis (``[B, T, V]``, ``[B, T]`` -> ``[B, T]``)."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[..., None], axis=-1)[..., 0]


def fd_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of a float64 NumPy scalar function (reference gradients)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        xp = flat.copy()
        xm = flat.copy()
        xp[i] += h
        xm[i] -= h
        gf[i] = (f(xp.reshape(x.shape)) - f(xm.reshape(x.shape))) / (2 * h)
    return g


def log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def log_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))
