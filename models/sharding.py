"""Logical axis names -> mesh axes: data-parallel, FSDP and tensor-parallel layouts.

Every decoder parameter carries logical axis names (``nnx.Param`` metadata ``out_sharding``):
``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``norm``, and ``layers`` for
the leading layer axis of scanned layers (``Decoder(scan_layers=True)``; no mesh axis in every layout: each
device holds all layers of its shard, as MaxText's default); activations use ``batch`` and ``length``.
A rules table maps each logical name to a mesh axis (or None = replicated). The mesh axes are ``data``, ``fsdp`` and ``tensor`` (DESIGN.md), in the style of MaxText /
``flax.linen.logical_axis_rules``:

- ``dp``       parameters replicated, batch split over ``data`` (and ``fsdp``);
- ``fsdp``     ZeRO-3 style (Rajbhandari et al. 2020, arXiv 1910.02054): the ``embed`` dim of every matrix
               split over ``fsdp``, batch over ``data`` x ``fsdp``;
- ``tp``       Megatron tensor parallelism (Shoeybi et al. 2019, arXiv 1909.08053, sec. 3): attention heads,
               MLP width and vocabulary split over ``tensor``;
- ``fsdp_tp``  both.

A dimension whose size is not divisible by its mesh axis size (e.g. 2 KV heads over 4 tensor shards),
or whose mesh axis is absent from the mesh, is replicated instead of failing.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["LAYOUTS", "sharding_rules", "logical_to_spec", "param_specs", "param_shardings", "batch_spec"]

MeshAxes = Union[None, str, Tuple[str, ...]]
LAYOUTS = ("dp", "fsdp", "tp", "fsdp_tp")
_BASE = {"batch": ("data", "fsdp"), "length": None, "vocab": None, "embed": None, "heads": None,
         "kv_heads": None, "head_dim": None, "mlp": None, "norm": None, "layers": None}


def sharding_rules(layout: str = "fsdp_tp") -> Tuple[Tuple[str, MeshAxes], ...]:
    """The rules table ``((logical_name, mesh_axes), ...)`` of a layout in :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not allowed; allowed values: {LAYOUTS}")
    r: Dict[str, MeshAxes] = dict(_BASE)
    if layout in ("fsdp", "fsdp_tp"):
        r["embed"] = "fsdp"
    if layout in ("tp", "fsdp_tp"):
        r.update(vocab="tensor", heads="tensor", kv_heads="tensor", mlp="tensor")
    return tuple(r.items())


def _axis_size(mesh: Optional[Mesh], axes: MeshAxes) -> int:
    if mesh is None or axes is None:
        return 1
    size = 1
    for a in (axes,) if isinstance(axes, str) else axes:
        size *= mesh.shape[a]
    return size


def logical_to_spec(names: Sequence[Optional[str]], rules, shape: Optional[Sequence[int]] = None,
                    mesh: Optional[Mesh] = None) -> PartitionSpec:
    """PartitionSpec for an array with logical axis ``names`` under ``rules``.

    With ``mesh`` (and ``shape``), mesh axes missing from the mesh are dropped and a dimension not divisible
    by its mesh axes' total size is replicated. A mesh axis is used at most once per array.
    """
    table = dict(rules)
    out, used = [], set()
    for i, name in enumerate(names):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = table.get(name) if name is not None else None
        if axes is not None:
            axes_t = tuple(a for a in ((axes,) if isinstance(axes, str) else axes)
                           if a not in used and (mesh is None or a in mesh.shape))
            axes = axes_t[0] if len(axes_t) == 1 else (axes_t or None)
            if shape is not None and mesh is not None and shape[i] % _axis_size(mesh, axes):
                axes = None
            used.update((axes,) if isinstance(axes, str) else (axes or ()))
        out.append(axes)
    return PartitionSpec(*out)


def _state(model_or_state):
    return nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state


def _map_vars(fn, state):
    return jax.tree.map(lambda v: v.replace(fn(v)), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_specs(model_or_state, rules, mesh: Optional[Mesh] = None):
    """A state-shaped tree of ``PartitionSpec`` for every parameter (from its logical names); accepts a
    module, its ``nnx.state`` or an abstract ``nnx.eval_shape`` state. ``mesh`` enables the fallbacks of
    :func:`logical_to_spec`."""
    def spec(v):
        shape = v.get_value().shape  # works for concrete and abstract (eval_shape) states
        names = v.get_metadata().get("out_sharding") or (None,) * len(shape)
        return logical_to_spec(names, rules, shape, mesh)

    return _map_vars(spec, _state(model_or_state))


def param_shardings(model_or_state, mesh: Mesh, rules):
    """A state-shaped tree of ``NamedSharding`` on ``mesh`` (use with ``jax.device_put`` / ``jit``)."""
    return _map_vars(lambda v: NamedSharding(mesh, v.get_value()), param_specs(model_or_state, rules, mesh))


def batch_spec(rules, ndim: int = 2) -> PartitionSpec:
    """PartitionSpec of a ``[B, T, ...]`` batch array: batch over the batch mesh axes, the rest replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)
