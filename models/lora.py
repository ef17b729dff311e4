"""LoRA and DoRA adapters for :class:`~trlax.models.Decoder`.

- LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3): a frozen weight ``W`` (Hugging Face ``[out, in]``) gets a
  trainable low-rank update, ``W' = W + s·B A`` with ``A ∈ R^{r×in}`` (random init), ``B ∈ R^{out×r}``
  (zero init, so training starts at the base model) and ``s = alpha / r`` (rsLoRA, Kalajdzievski 2023,
  arXiv 2312.03732, eq. 3: ``s = alpha / sqrt(r)``).
- DoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5): ``W' = m ⊙ (W + s·B A) / ||W + s·B A||_c`` where
  ``||·||_c`` is the norm of each output unit's weight vector over the input dimension (the "column norm"
  of the paper's ``d×k`` layout, PEFT's ``norm(weight, dim=1)``) and the magnitude ``m`` (one per output
  unit) starts at ``||W||_c``. As in the paper's sec. 4.3 (and PEFT) the norm is treated as a constant in
  the backward pass (``stop_gradient``); the forward value is exact.

Conventions follow PEFT: targets are named ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj`` ("all-linear" = all of them; the LM head and embeddings are never adapted); ``A`` is initialised
uniform in ``±1/sqrt(in)`` (PyTorch's Kaiming-uniform with ``a = sqrt(5)``), ``B`` at zero; biases are
not adapted (and not rescaled by DoRA).

Layout: the decoder keeps heads as separate axes (``q: [H, N, D]``, ``o: [N, D, H]``, in-features first),
so an adapter stores ``a: in_shape + (r,)`` and ``b: (r,) + out_shape`` (``B A`` of PEFT is
``tensordot(a, b, 1)`` transposed) and ``magnitude: out_shape``. Adapters follow the decoder's layer layout:
with scanned layers (``Decoder(scan_layers=True)``, the default) each target has one stacked adapter,
``adapters/q_proj/a`` ``[L, ...]`` (logical axis ``"layers"`` first), applied with ``jax.vmap`` over the layer
axis; with ``scan_layers=False`` one per layer, ``adapters/{i}/q_proj/a``. Both layouts draw the same initial
values (:func:`trlax.models.stack_layers` converts between them). All adapter parameters are
``nnx.LoRAParam`` (a subclass of ``nnx.Param``), the filter that selects the trainable state::

    model = LoraDecoder(base, LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)       # adapters only
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)      # pure-function form
    ref_logps = completion_logps(adapters_off(model), ...)                  # the base model, shared weights
    save_pretrained(merge_lora(model), path)                                # plain HF checkpoint

The forward builds the adapted weights ``W'`` of each targeted layer (no copy of the untouched ones) and runs
the base decoder with them: exact for LoRA and DoRA, at the memory cost of one full-size weight per adapted
matrix in the activations. Adapter dropout is not supported by this merged-weight forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from trlax.models.decoder import Decoder, _stack_modules

__all__ = ["LORA_TARGETS", "LoraConfig", "LoraAdapter", "LoraDecoder", "adapters_off", "merge_lora",
           "lora_params", "base_params"]

# PEFT / Hugging Face module name -> (sub-module, parameter, number of leading input axes) in a Block.
_TARGETS = {
    "q_proj": ("attn", "q", 1),
    "k_proj": ("attn", "k", 1),
    "v_proj": ("attn", "v", 1),
    "o_proj": ("attn", "o", 2),
    "gate_proj": ("mlp", "gate", 1),
    "up_proj": ("mlp", "up", 1),
    "down_proj": ("mlp", "down", 1),
}
LORA_TARGETS = tuple(_TARGETS)


def _normalise_targets(target_modules) -> Tuple[str, ...]:
    if isinstance(target_modules, str):
        if target_modules in ("all-linear", "all_linear"):
            return LORA_TARGETS
        target_modules = (target_modules,)
    out = []
    for t in target_modules:
        name = str(t).split(".")[-1]  # "self_attn.q_proj" -> "q_proj"
        if name not in _TARGETS:
            raise ValueError(f"target_modules entry {t!r} is not allowed; allowed values: {LORA_TARGETS} "
                             f"or 'all-linear'")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"target_modules is empty; allowed values: {LORA_TARGETS} or 'all-linear'")
    return tuple(sorted(out, key=LORA_TARGETS.index))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter hyper-parameters (validated on construction; hashable, static under ``jit``).

    Attributes:
      rank: ``r >= 1``.
      alpha: scaling numerator ``> 0``; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
      target_modules: names among :data:`LORA_TARGETS`, or ``"all-linear"``.
      use_dora: weight-decomposed adapters (arXiv 2402.09353).
      use_rslora: rank-stabilised scaling (arXiv 2312.03732).
      dropout: must be 0.0 (the merged-weight forward has no adapter dropout).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: Any = LORA_TARGETS
    use_dora: bool = False
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} is out of range; allowed: integers >= 1")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is out of range; allowed: finite numbers > 0")
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
        for f in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f}={getattr(self, f)!r} is not allowed; allowed values: (True, False)")
        if self.dropout != 0.0:
            raise ValueError(f"dropout={self.dropout!r} is not supported (the merged-weight forward has no "
                             f"adapter dropout); allowed values: (0.0,)")

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` (LoRA eq. 3) or ``alpha / sqrt(r)`` (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_peft(cls, **fields) -> "LoraConfig":
        """From PEFT ``LoraConfig`` field names (``r``, ``lora_alpha``, ``target_modules``, ``use_dora``,
        ``use_rslora``, ``lora_dropout``, ``bias``); other fields are ignored. ``bias`` must be ``"none"``."""
        bias = fields.get("bias", "none")
        if bias != "none":
            raise ValueError(f"bias={bias!r} is not supported; allowed values: ('none',)")
        kw = dict(rank=fields.get("r", 8), alpha=fields.get("lora_alpha", 8),
                  use_dora=bool(fields.get("use_dora", False)), use_rslora=bool(fields.get("use_rslora", False)),
                  dropout=float(fields.get("lora_dropout", 0.0)))
        if fields.get("target_modules") is not None:
            kw["target_modules"] = fields["target_modules"]
        return cls(**kw)


def _lora_param(value, names):
    return nnx.LoRAParam(value, out_sharding=names, eager_sharding=False)


class LoraAdapter(nnx.Module):
    """One adapted matrix: ``a: in_shape + (r,)``, ``b: (r,) + out_shape`` and, for DoRA,
    ``magnitude: out_shape`` (all ``nnx.LoRAParam``, stored in the base weight's dtype or float32)."""

    def __init__(self, weight: jnp.ndarray, n_in: int, names, config: LoraConfig, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        in_shape, out_shape = weight.shape[:n_in], weight.shape[n_in:]
        names = tuple(names) if names else (None,) * weight.ndim
        fan_in = math.prod(in_shape)
        r = config.rank
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), in_shape + (r,), jnp.float32, -bound, bound)
        self.n_in = n_in
        self.a = _lora_param(a.astype(param_dtype), names[:n_in] + (None,))
        self.b = _lora_param(jnp.zeros((r,) + out_shape, param_dtype), (None,) + names[n_in:])
        if config.use_dora:
            self.magnitude = _lora_param(self._norm(weight.astype(jnp.float32)).astype(param_dtype),
                                         names[n_in:])

    def _norm(self, w):
        """Per-output-unit norm over the input axes, ``out_shape``."""
        return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(self.n_in))))

    def adapted(self, weight: jnp.ndarray, scaling: float, use_dora: bool) -> jnp.ndarray:
        """``W + s·BA`` (LoRA, arXiv 2106.09685 eq. 3) or ``m ⊙ (W + s·BA) / sg(||W + s·BA||_c)`` (DoRA,
        arXiv 2402.09353 eq. 5, sec. 4.3), computed in float32 (or wider) and returned in ``weight.dtype``.
        weight: ``in_shape + out_shape``."""
        acc = jnp.promote_types(weight.dtype, jnp.float32)
        delta = jnp.tensordot(self.a[...].astype(acc), self.b[...].astype(acc), axes=1)
        v = weight.astype(acc) + scaling * delta
        if use_dora:
            norm = jax.lax.stop_gradient(self._norm(v))
            safe = jnp.where(norm > 0, norm, 1.0)
            v = v * (self.magnitude[...].astype(acc) / safe)
        return v.astype(weight.dtype)


class LoraDecoder(nnx.Module):
    """A :class:`~trlax.models.Decoder` with LoRA / DoRA adapters on its linear layers.

    Duck-types the decoder (``hidden_states``, ``__call__``, ``lm_head_weight``, ``init_cache``,
    ``config``, ``dtype``), so :func:`~trlax.models.completion_logps`, :func:`~trlax.models.packing.packed_logps`
    and the sampler accept it. ``self.base`` is the wrapped decoder itself (its weights are not copied);
    :func:`adapters_off` returns it for reference log-probs.

    Args:
      base: the decoder to adapt (its parameters stay ``nnx.Param``; freeze them by optimising only
        ``nnx.LoRAParam``).
      config: :class:`LoraConfig`.
      rngs: ``nnx.Rngs`` for the ``A`` initialisation.
    """

    def __init__(self, base: Decoder, config: LoraConfig, *, rngs: nnx.Rngs):
        if not isinstance(base, Decoder):
            raise ValueError(f"`base` must be a trlax.models.Decoder, got {type(base).__name__}")
        if not isinstance(config, LoraConfig):
            raise ValueError(f"`config` must be a LoraConfig, got {type(config).__name__}")
        self.base, self.lora_config = base, config
        self.config, self.dtype, self.param_dtype = base.config, base.dtype, base.param_dtype
        pdt = jnp.promote_types(base.param_dtype, jnp.float32)
        self.scan_layers = bool(getattr(base, "scan_layers", False))
        layers = []
        for i in range(base.config.num_layers):  # same random stream in both layouts: layer by layer
            ad = {}
            for name in config.target_modules:
                sub, leaf, n_in = _TARGETS[name]
                if self.scan_layers:
                    var = getattr(getattr(base.layers, sub), leaf)
                    w, names = var[...][i], (var.get_metadata().get("out_sharding") or (None,) * var[...].ndim)[1:]
                else:
                    var = getattr(getattr(base.layers[i], sub), leaf)
                    w, names = var[...], var.get_metadata().get("out_sharding")
                ad[name] = LoraAdapter(w, n_in, names, config, rngs=rngs, param_dtype=pdt)
            layers.append(ad)
        if self.scan_layers:  # one stacked adapter per target, leading layer axis (logical name "layers")
            self.adapters = nnx.Dict({name: _stack_modules([ad[name] for ad in layers])
                                      for name in config.target_modules})
        else:
            self.adapters = nnx.List([nnx.Dict(ad) for ad in layers])

    def adapted_decoder(self) -> Decoder:
        """A :class:`Decoder` view whose targeted weights are the adapted ``W'`` and whose other parameters
        are the base model's arrays (not copies). Differentiable w.r.t. the adapters."""
        graphdef, state = nnx.split(self.base)
        pure = nnx.to_pure_dict(state)
        cfg = self.lora_config
        if self.scan_layers:
            for name, adapter in self.adapters.items():
                sub, leaf, _ = _TARGETS[name]
                slot = pure["layers"][sub]
                a_graphdef, a_state = nnx.split(adapter)

                def one(a_state, w, a_graphdef=a_graphdef):
                    return nnx.merge(a_graphdef, a_state).adapted(w, cfg.scaling, cfg.use_dora)

                slot[leaf] = jax.vmap(one)(a_state, slot[leaf])  # over the layer axis
            return nnx.merge(graphdef, pure)
        for i, ad in enumerate(self.adapters):
            for name, adapter in ad.items():
                sub, leaf, _ = _TARGETS[name]
                slot = pure["layers"][i][sub]
                slot[leaf] = adapter.adapted(slot[leaf], cfg.scaling, cfg.use_dora)
        return nnx.merge(graphdef, pure)

    def hidden_states(self, input_ids, **kwargs):
        """:meth:`Decoder.hidden_states` of the adapted model (same arguments)."""
        return self.adapted_decoder().hidden_states(input_ids, **kwargs)

    def __call__(self, input_ids, **kwargs):
        """Logits of the adapted model (same arguments as :meth:`Decoder.__call__`)."""
        return self.adapted_decoder()(input_ids, **kwargs)

    def lm_head_weight(self) -> jnp.ndarray:
        """The base ``[V, H]`` output projection (never adapted)."""
        return self.base.lm_head_weight()

    def init_cache(self, batch_size: int, max_length: int, dtype=None):
        """As :meth:`Decoder.init_cache`."""
        return self.base.init_cache(batch_size, max_length, dtype)


def adapters_off(model) -> Decoder:
    """The reference model "with adapters off": the base :class:`Decoder` inside a :class:`LoraDecoder`
    (shared weights, no copy); a plain decoder is returned as is."""
    return model.base if isinstance(model, LoraDecoder) else model


def merge_lora(model: LoraDecoder) -> Decoder:
    """A new plain :class:`Decoder` with the adapters folded in (``W' = W + s·BA``, or DoRA's
    ``m ⊙ V/||V||_c``), e.g. for :func:`~trlax.models.save_pretrained`. ``model`` is left unchanged."""
    if not isinstance(model, LoraDecoder):
        raise ValueError(f"`model` must be a LoraDecoder, got {type(model).__name__}")
    view = model.adapted_decoder()
    graphdef, state = nnx.split(view)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, nnx.to_pure_dict(state)))


def lora_params(model) -> nnx.State:
    """The trainable adapter state ``nnx.state(model, nnx.LoRAParam)``."""
    return nnx.state(model, nnx.LoRAParam)


def base_params(model) -> nnx.State:
    """The frozen (non-adapter) parameters ``nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))``."""
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
