"""Convert parameter trees between the per-layer and the scanned (stacked) layer layouts of
:class:`~trlax.models.Decoder`.

``Decoder(scan_layers=False)`` (and every checkpoint written before scanned layers existed) keeps one
sub-tree per layer, ``layers/{i}/attn/q`` ``[H, N, D]``; ``Decoder(scan_layers=True)`` keeps one sub-tree
whose leaves have a leading layer axis, ``layers/attn/q`` ``[L, H, N, D]``. LoRA adapters follow their
decoder (``adapters/{i}/q_proj/a`` vs ``adapters/q_proj/a``). :func:`stack_layers` and
:func:`unstack_layers` map any pytree holding such trees (an ``nnx.State``, ``nnx.to_pure_dict`` dicts, a
whole ``TrainState`` with its optimiser moments, an abstract ``jax.ShapeDtypeStruct`` tree) from one layout
to the other; ``nnx.Variable`` leaves keep their metadata with the ``"layers"`` logical axis name added or
removed. Everything else passes through unchanged, so converting a tree already in the target layout is a
no-op::

    old = nnx.to_pure_dict(nnx.state(unrolled_model))           # layers/{i}/...
    nnx.update(scanned_model, stack_layers(nnx.State(old)))      # or nnx.replace_by_pure_dict

:class:`trlax.train.checkpoint.Checkpointer` uses them to restore checkpoints of either layout into
either model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["LAYER_KEYS", "stack_layers", "unstack_layers"]

# Keys whose value is the per-layer list (int keys 0..L-1) or the stacked module.
LAYER_KEYS = ("layers", "adapters")


def _leaf(x) -> bool:
    return isinstance(x, (nnx.Variable, jax.ShapeDtypeStruct))


def _per_layer(node) -> bool:
    """A mapping keyed by the layer numbers ``0..L-1`` (ints or digit strings)."""
    if not isinstance(node, Mapping) or not node:
        return False
    keys = list(node.keys())
    if not all(isinstance(k, (int, np.integer)) or (isinstance(k, str) and k.isdigit()) for k in keys):
        return False
    return sorted(int(k) for k in keys) == list(range(len(keys)))


def _plain(node):
    """A nested ``Mapping`` (e.g. an ``nnx.State``) as nested plain dicts, leaves untouched."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in node.items()}


def _walk(tree, on_dict):
    """Apply ``on_dict`` to every outermost Mapping of ``tree`` (as plain nested dicts; an ``nnx.State`` is
    rebuilt around the result)."""
    def visit(node):
        if not isinstance(node, Mapping):
            return node
        out = on_dict(_plain(node))
        return nnx.State(out) if isinstance(node, nnx.State) else out

    return jax.tree.map(visit, tree, is_leaf=lambda n: isinstance(n, Mapping) or _leaf(n))


def _sharding_add(sh):
    if isinstance(sh, NamedSharding):
        return NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))
    return sh


def _sharding_drop(sh):
    if isinstance(sh, NamedSharding):
        return NamedSharding(sh.mesh, PartitionSpec(*tuple(sh.spec)[1:]))
    return sh


def _stack_leaves(*xs):
    x = xs[0]
    if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("out_sharding")
        meta = {} if names is None else {"out_sharding": ("layers",) + tuple(names)}
        return x.replace(_stack_leaves(*(v.get_value() for v in xs)), **meta)
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=_sharding_add(x.sharding))
    if all(isinstance(v, np.ndarray) for v in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _index_leaf(x, i: int):
    if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("out_sharding")
        meta = {} if not names or names[0] != "layers" else {"out_sharding": tuple(names[1:])}
        return x.replace(_index_leaf(x.get_value(), i), **meta)
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=_sharding_drop(x.sharding))
    return x[i]


def _leading(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=_leaf)
    if not leaves:
        return 0
    x = leaves[0].get_value() if isinstance(leaves[0], nnx.Variable) else leaves[0]
    return int(np.shape(x)[0]) if np.ndim(x) or isinstance(x, jax.ShapeDtypeStruct) else 0


def _stack_dict(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            if k in LAYER_KEYS and _per_layer(v):
                subs = [_stack_dict(v[key]) for key in sorted(v.keys(), key=int)]
                v = jax.tree.map(_stack_leaves, *subs, is_leaf=_leaf)
            else:
                v = _stack_dict(v)
        else:
            v = stack_layers(v)  # e.g. a tuple holding mappings
        out[k] = v
    return out


def _unstack_dict(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _unstack_dict(v)
            if k in LAYER_KEYS and v and not _per_layer(v):
                n = _leading(v)
                v = {i: jax.tree.map(lambda x, i=i: _index_leaf(x, i), v, is_leaf=_leaf) for i in range(n)}
        else:
            v = unstack_layers(v)
        out[k] = v
    return out


def stack_layers(tree: Any) -> Any:
    """Per-layer layout (``layers/{i}/...``, ``adapters/{i}/...``) -> scanned layout (one sub-tree, leaves
    stacked along a new leading axis). Trees already stacked pass through unchanged."""
    return _walk(tree, _stack_dict)


def unstack_layers(tree: Any) -> Any:
    """Scanned layout (``layers/attn/q`` ``[L, ...]``) -> per-layer layout (``layers/{i}/attn/q``, int keys
    as in ``nnx.state`` of an ``nnx.List``). Trees already per-layer pass through unchanged."""
    return _walk(tree, _unstack_dict)
