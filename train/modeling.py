"""The policy the loops train: a :class:`trlax.models.Decoder` split into a static graph and a parameter
pytree, its tokenizer, its sharding over the run's mesh and its Hugging Face export.

With ``lora_rank > 0`` the policy is a :class:`LoraPolicy`: LoRA / DoRA adapters (arXiv 2106.09685,
2402.09353; :mod:`trlax.models.lora`) on the decoder's linear layers, the adapters the only trainable state.

``model="tiny"`` builds a small random Llama (2 layers, hidden 64, GQA 4/2 heads) and a character-level
tokenizer locally (nothing is downloaded); any other value is a local Hugging Face checkpoint directory
(``config.json`` + safetensors + tokenizer files), loaded with :func:`trlax.models.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from trlax.models import Decoder, DecoderConfig, completion_logps, load_pretrained, save_pretrained, set_attention_impl
from trlax.models.lora import LoraConfig, LoraDecoder, merge_lora
from trlax.models.packing import packed_logps
from trlax.models.sharding import param_shardings, sharding_rules
from trlax.train.step import state_sharding_from_params

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def tiny_hf_config(tokenizer, **overrides) -> Dict[str, Any]:
    """A Hugging Face ``LlamaForCausalLM`` ``config.json`` dict for the built-in tiny model (token ids
    from ``tokenizer``; ``overrides`` replace any field)."""
    hf = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 256,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **TINY,
    }
    hf.update(overrides)
    return hf


@dataclasses.dataclass
class Policy:
    """A decoder as ``(graphdef, params)`` plus its tokenizer.

    Attributes:
      graphdef: ``nnx.split`` graph of the :class:`Decoder` (static).
      params: the parameter pytree (``nnx.State``) — what the optimiser updates.
      config: the :class:`DecoderConfig`.
      tokenizer: a transformers tokenizer with ``pad_token_id`` / ``eos_token_id`` set.
    """

    graphdef: Any
    params: Any
    config: DecoderConfig
    tokenizer: Any

    def _model(self, params):
        """What the forward functions take for trainable ``params`` (a ``(graphdef, state...)`` tuple)."""
        return (self.graphdef, params)

    def completion_logps(self, params, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
        """``(logps, entropy)``, each ``[B, C]``: :func:`trlax.models.completion_logps` of the
        completion block (GRPO's ``log π_θ(o_t|q, o_<t)``, arXiv 2402.03300, eq. 3) under ``params``."""
        return completion_logps(self._model(params), prompt_ids, prompt_mask, completion_ids, completion_mask,
                                temperature=temperature)

    def reference_logps(self, frozen_params, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=1.0):
        """``completion_logps`` of the reference model = the initial policy ``frozen_params``
        (``run.frozen_params``). :class:`LoraPolicy` overrides it with the base model, adapters off."""
        return self.completion_logps(frozen_params, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                     temperature=temperature)

    def packed_logps(self, params, input_ids, segment_ids, positions, loss_mask, temperature=1.0):
        """``(logps, entropy)``, each ``[N, L]``, of packed rows (:func:`trlax.models.packing.packed_logps`:
        segment-aware attention, ``log π(x_t | x_<t of its segment)`` at ``loss_mask``, 0 elsewhere)."""
        rows = _Packed(input_ids, segment_ids, positions, loss_mask)
        return packed_logps(self._model(params), rows, temperature=temperature)

    def place(self, mesh, layout: str = "fsdp_tp") -> None:
        """Put frozen (non-trainable) weights on ``mesh`` (nothing to do for a plain decoder)."""

    @property
    def sampler_graphdef(self):
        """The graph the rollout sampler runs (:class:`trlax.rollouts.JaxSampler`)."""
        return self.graphdef

    def sampler_params(self, params):
        """The parameters to hand the sampler together with :attr:`sampler_graphdef` for trainable
        ``params`` (the identity for a plain decoder)."""
        return params

    def model(self, params=None) -> Decoder:
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def state_sharding(self, state, mesh, optimizer, layout: str = "fsdp_tp"):
        """``TrainState`` sharding tree: parameters from their logical axis names under ``layout``
        (:func:`trlax.models.sharding_rules`), optimiser moments like their parameters."""
        psh = param_shardings(state.params, mesh, sharding_rules(layout))
        return state_sharding_from_params(state, psh, mesh, optimizer)

    def save(self, params, path: str) -> None:
        """Export in Hugging Face format (``save_pretrained``: config.json + safetensors + tokenizer)."""
        params = jax.device_get(params)
        save_pretrained(self.model(params), path, tokenizer=self.tokenizer)


@dataclasses.dataclass(frozen=True)
class _Packed:
    input_ids: Any
    segment_ids: Any
    positions: Any
    loss_mask: Any


@dataclasses.dataclass
class LoraPolicy(Policy):
    """A :class:`~trlax.models.lora.LoraDecoder` policy: ``params`` (what the optimiser sees and the
    checkpoints hold) is only the ``nnx.LoRAParam`` adapter state; the base weights ``frozen`` stay fixed
    inside the policy and are merged in at every forward (LoRA ``W + s·BA``, arXiv 2106.09685 eq. 3; DoRA
    ``m ⊙ V/||V||_c``, arXiv 2402.09353 eq. 5).

    Reference model = the base model with adapters off (:func:`trlax.models.adapters_off`):
    :meth:`reference_logps`. The initial adapters are the base model exactly for LoRA (``B = 0``), and to
    float rounding (~1e-7 relative) for DoRA (``m = ||W||_c``), so ``completion_logps(run.frozen_params,
    ...)`` is the reference too; :meth:`reference_logps` is the exact and cheaper path (no adapted weights).

    The sampler runs the plain decoder graph (:attr:`sampler_graphdef`) on merged weights
    (:meth:`sampler_params`); :meth:`save` exports the merged model (:func:`trlax.models.merge_lora`), a
    plain Hugging Face checkpoint.

    Attributes (besides :class:`Policy`'s): frozen: the base-weight state (``nnx.State``);
    base_graphdef: the plain :class:`Decoder` graph; lora_config: the :class:`LoraConfig`.
    """

    frozen: Any = None
    base_graphdef: Any = None
    lora_config: Optional[LoraConfig] = None

    def __post_init__(self):
        self._merge = jax.jit(lambda p: nnx.split(merge_lora(nnx.merge(self.graphdef, p, self.frozen)))[1])

    def _model(self, params):
        return (self.graphdef, params, self.frozen)

    def reference_logps(self, frozen_params, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature=1.0):
        """The base model's ``completion_logps`` (adapters off; ``frozen_params`` is not used)."""
        return completion_logps((self.base_graphdef, self.frozen["base"]), prompt_ids, prompt_mask, completion_ids,
                                completion_mask, temperature=temperature)

    @property
    def sampler_graphdef(self):
        """The plain :class:`Decoder` graph (the sampler runs merged weights)."""
        return self.base_graphdef

    def sampler_params(self, params):
        """The merged decoder state for adapters ``params`` (:func:`trlax.models.merge_lora`)."""
        return self._merge(params)

    def model(self, params=None) -> LoraDecoder:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.frozen)

    def place(self, mesh, layout: str = "fsdp_tp") -> None:
        """Shard the frozen base weights over ``mesh`` by their logical axis names."""
        self.frozen = jax.device_put(self.frozen, param_shardings(self.frozen, mesh, sharding_rules(layout)))

    def save(self, params, path: str) -> None:
        """Export the merged model (``merge_lora``) in Hugging Face format."""
        params = jax.device_get(params)
        save_pretrained(merge_lora(self.model(params)), path, tokenizer=self.tokenizer)


def lora_config_of(cfg) -> Optional[LoraConfig]:
    """The run's :class:`LoraConfig` (None when ``lora_rank == 0``); a bad value raises naming the run-config
    field."""
    from trlax.models.lora import _normalise_targets

    targets = getattr(cfg, "lora_target_modules", "all-linear")
    if isinstance(targets, str) and targets not in ("all-linear", "all_linear"):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    try:
        targets = _normalise_targets(targets)
    except ValueError as e:
        raise ValueError(f"lora_target_modules={cfg.lora_target_modules!r}: {e}") from None
    rank = getattr(cfg, "lora_rank", 0)
    if not rank:
        return None
    return LoraConfig(rank=int(rank), alpha=float(cfg.lora_alpha), target_modules=targets,
                      use_dora=bool(cfg.use_dora), use_rslora=bool(cfg.use_rslora))


def build_tokenizer_for(cfg):
    from trlax.train.data import build_tokenizer

    if getattr(cfg, "environment", "") or getattr(cfg, "tools", ""):  # multi-turn / tools: ChatML + Hermes calls
        from trlax.rollouts.environments import tool_tokenizer

        return tool_tokenizer(os.path.join(cfg.output_dir, "tokenizer"))
    return build_tokenizer(os.path.join(cfg.output_dir, "tokenizer"))


def _remat(cfg):
    """The run field ``remat`` (``off`` / ``full`` / ``dots``) as :class:`~trlax.models.Decoder`'s ``remat``."""
    r = getattr(cfg, "remat", "off")
    return False if r == "off" else r


def build_policy(cfg, tokenizer=None) -> Policy:
    """The run's policy: the built-in tiny model (``cfg.model == "tiny"``, seeded by ``cfg.seed``) or a
    local Hugging Face checkpoint directory."""
    param_dtype, dtype = _DTYPES[cfg.param_dtype], _DTYPES[cfg.compute_dtype]
    if cfg.model == "tiny":
        tok = tokenizer or build_tokenizer_for(cfg)
        dc = dataclasses.replace(DecoderConfig.from_hf(tiny_hf_config(tok)),
                                 attention_impl=getattr(cfg, "attention_impl", "auto"))
        model = Decoder(dc, rngs=nnx.Rngs(cfg.seed), param_dtype=param_dtype, dtype=dtype,
                        remat=_remat(cfg))
    else:
        model, tok = load_pretrained(cfg.model, dtype=param_dtype, compute_dtype=dtype,
                                     remat=_remat(cfg), return_tokenizer=True)
        tok = tokenizer or tok
        if tok is None:
            raise ValueError(f"model={cfg.model!r} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
        dc = set_attention_impl(model, getattr(cfg, "attention_impl", "auto")).config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"model={cfg.model!r}: the tokenizer has no eos_token")
    lcfg = lora_config_of(cfg)
    if lcfg is not None:
        # adapters initialised from their own stream (seed + 1): the base weights do not depend on LoRA
        lora = LoraDecoder(model, lcfg, rngs=nnx.Rngs(cfg.seed + 1))
        graphdef, adapters, frozen = nnx.split(lora, nnx.LoRAParam, ...)
        base_graphdef = nnx.split(model)[0]
        return LoraPolicy(graphdef, adapters, dc, tok, frozen=frozen, base_graphdef=base_graphdef,
                          lora_config=lcfg)
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, dc, tok)


def check_model(model: str) -> None:
    """Before any compute: ``model`` must be ``"tiny"`` or a directory with a ``config.json``."""
    if model == "tiny":
        return
    if not os.path.isdir(model) or not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"model={model!r} is neither 'tiny' nor a local Hugging Face checkpoint directory "
                         "(a folder with config.json and model.safetensors)")


__all__ = ["LoraPolicy", "Policy", "TINY", "build_policy", "check_model", "lora_config_of", "tiny_hf_config"]
