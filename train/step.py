"""The step builder: one jitted ``(state, batch) -> (state, metrics)`` over any device mesh.

``make_train_step`` composes a loss function (any trlax objective behind a model's log-prob
function), an optax optimiser, micro-batching with ``lax.scan`` and explicit shardings over a
``jax.sharding.Mesh`` with axes ``("data", "fsdp", "tensor")``. The same code runs on 1 CPU device,
8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), a GPU or a TPU pod.

Micro-batching without accumulation bias: before splitting, the step computes the *global* token and
sequence counts of the whole batch (``totals``) and hands them to every micro-batch's loss; objectives
normalise by them (``num_items`` / ``num_sequences``), so the sum of the micro-batch losses and
gradients equals the full-batch loss and gradient exactly (every aggregation except ``bnpo``, which is
defined per micro-batch).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trlax.objectives.aggregation import Mean, finalize_metrics

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor)``; ``-1`` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor} x data")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} != {n} devices")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


class TrainState(NamedTuple):
    """Everything a step changes. ``extra`` holds objective state (BEMA, BCO running mean, KL /
    entropy controllers ...) as a pytree, or None."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    extra: Any = None


def init_train_state(params, optimizer: optax.GradientTransformation, extra=None) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), extra)


def batch_totals(batch: Dict[str, Any]) -> Dict[str, jnp.ndarray]:
    """Global counts of a full batch, before micro-batching: ``num_items`` (tokens under
    ``batch["mask"]``) and ``num_sequences`` (rows).

    ``batch["mask"]`` must be the mask the loss normalises by: apply row filters that remove tokens
    from the loss (``mask_truncated_completions``, GFPO's dropped completions) to it *before* the step,
    or the token-mean denominators would still count the removed tokens (TRL #6439)."""
    out = {}
    if "mask" in batch:
        out["num_items"] = jnp.sum(jnp.asarray(batch["mask"]).astype(jnp.float32))
    first = jax.tree_util.tree_leaves(batch)[0]
    out["num_sequences"] = jnp.asarray(first.shape[0], jnp.float32)
    return out


def _split(batch, k: int):
    def f(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches={k}")
        return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    return jax.tree_util.tree_map(f, batch)


def _sum_metrics(a, b):
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, Mean):
            out[key] = Mean(x.total + y.total, x.count + y.count)
        elif key.endswith("min"):
            out[key] = jnp.minimum(x, y)
        elif key.endswith("max"):
            out[key] = jnp.maximum(x, y)
        else:
            out[key] = x + y  # summed; divided by the micro-batch count at the end
    return out


def all_finite(tree) -> jnp.ndarray:
    """True iff every floating-point entry of ``tree`` is finite (a scalar bool array)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


LossFn = Callable[[Any, Dict[str, Any], Dict[str, jnp.ndarray]], Tuple[jnp.ndarray, Dict[str, Any]]]


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Optional[Mesh] = None,
    state_sharding: Any = None,
    num_microbatches: int = 1,
    donate: bool = True,
):
    """Build the jitted train step.

    Args:
      loss_fn: ``(params, micro_batch, totals) -> (loss, metrics)``. ``totals`` holds the global
        ``num_items`` / ``num_sequences`` of the whole batch (pass them to the objective). The loss of
        each micro-batch must be its *share* of the full-batch loss (so the shares add up).
      optimizer: any optax transformation.
      mesh: a mesh from :func:`make_mesh` (None: let jit place everything, e.g. one device).
      state_sharding: a ``TrainState`` of ``NamedSharding`` (from the model's sharding rules); None
        replicates the state on the mesh.
      num_microbatches: gradient-accumulation steps inside the jitted step (``lax.scan``).
      donate: donate the input state's buffers.

    Returns:
      ``step(state, batch) -> (state, metrics)``; batch arrays have the global batch as leading axis
      and are split over ``("data", "fsdp")``. A step whose loss, any gradient or any updated parameter
      is non-finite changes nothing but ``state.step`` and reports ``metrics["skipped"] = 1`` (else 0).
    """
    k = int(num_microbatches)
    if k < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")

    def step(state: TrainState, batch):
        totals = batch_totals(batch)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if k == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, totals)
        else:
            micro = _split(batch, k)

            def body(carry, mb):
                if mesh is not None:
                    mb = jax.lax.with_sharding_constraint(
                        mb, jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(BATCH_AXES)), mb))
                (l, m), g = grad_fn(state.params, mb, totals)
                if carry is None:
                    return (l, m, g), None
                cl, cm, cg = carry
                return (cl + l, _sum_metrics(cm, m), jax.tree_util.tree_map(jnp.add, cg, g)), None

            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            rest = jax.tree_util.tree_map(lambda x: x[1:], micro)
            init, _ = body(None, first)
            (loss, metrics, grads), _ = jax.lax.scan(body, init, rest)
            metrics = {key: (v if isinstance(v, Mean) or key.endswith(("min", "max")) else v / k)
                       for key, v in metrics.items()}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # non-finite guard (as optax.apply_if_finite, without changing the optimiser state's structure): a
        # step whose loss, any gradient or any updated parameter is NaN / inf leaves params, optimiser state
        # and objective state as they were; only the step counter moves (the batch is consumed).
        finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
        params, opt_state = optax.tree.where(finite, (params, opt_state), (state.params, state.opt_state))
        out = finalize_metrics(metrics)
        out["loss"] = loss
        out["grad_norm"] = optax.tree.norm(grads)
        out["skipped"] = jnp.where(finite, 0.0, 1.0).astype(jnp.float32)
        return TrainState(state.step + 1, params, opt_state, state.extra), out

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    replicated = NamedSharding(mesh, P())
    if state_sharding is None:
        state_sharding = replicated
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )


def shard_state(state: TrainState, state_sharding) -> TrainState:
    """Place a state on the mesh with the given sharding tree."""
    return jax.device_put(state, state_sharding)


def state_sharding_from_params(
    state: TrainState, param_sharding, mesh: Mesh, optimizer: optax.GradientTransformation
) -> TrainState:
    """Sharding tree for a ``TrainState``: params as ``param_sharding``; optimiser-state leaves that
    mirror the parameters (Adam moments ...) follow their parameter's sharding (found with
    ``optax.tree_map_params``); counts and other scalars are replicated; ``extra`` sub-trees shaped like
    the parameters follow the parameters' sharding, the rest of ``extra`` is replicated."""
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        state.opt_state,
        param_sharding,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=param_sharding,
        opt_state=opt,
        extra=_extra_sharding(state.extra, state.params, param_sharding, replicated),
    )


def _extra_sharding(extra, params, param_sharding, replicated):
    """Objective state: every sub-tree shaped like the parameters (an EMA / BEMA copy, a TR-DPO reference)
    is sharded like them; everything else (counters, running moments) is replicated."""
    target = jax.tree_util.tree_structure(params)

    def go(x):
        if x is None:
            return None
        if jax.tree_util.tree_structure(x) == target:
            return param_sharding
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # NamedTuple state (BEMAState, BCOState ...)
            return type(x)(*(go(c) for c in x))
        if isinstance(x, (tuple, list)):
            return type(x)(go(c) for c in x)
        if isinstance(x, dict):
            return {k: go(v) for k, v in x.items()}
        return jax.tree_util.tree_map(lambda _: replicated, x)

    return go(extra)


__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "TrainState",
    "all_finite",
    "batch_totals",
    "init_train_state",
    "make_mesh",
    "make_train_step",
    "shard_state",
    "state_sharding_from_params",
]
