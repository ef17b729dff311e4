"""The policy the loops train: a :class:`trlax.models.Decoder` split into a static graph and a parameter
pytree, its tokenizer, its sharding over the run's mesh and its Hugging Face export.

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

from trlax.models import Decoder, DecoderConfig, completion_logps, load_pretrained, save_pretrained
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

    def completion_logps(self, params, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
        """``(logps, entropy)``, each ``[B, C]``: :func:`trlax.models.completion_logps` of the
        completion block (GRPO's ``log π_θ(o_t|q, o_<t)``, arXiv 2402.03300, eq. 3) under ``params``."""
        return completion_logps((self.graphdef, params), prompt_ids, prompt_mask, completion_ids, completion_mask,
                                temperature=temperature)

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


def build_tokenizer_for(cfg):
    from trlax.train.data import build_tokenizer

    return build_tokenizer(os.path.join(cfg.output_dir, "tokenizer"))


def build_policy(cfg, tokenizer=None) -> Policy:
    """The run's policy: the built-in tiny model (``cfg.model == "tiny"``, seeded by ``cfg.seed``) or a
    local Hugging Face checkpoint directory."""
    param_dtype, dtype = _DTYPES[cfg.param_dtype], _DTYPES[cfg.compute_dtype]
    if cfg.model == "tiny":
        tok = tokenizer or build_tokenizer_for(cfg)
        dc = DecoderConfig.from_hf(tiny_hf_config(tok))
        model = Decoder(dc, rngs=nnx.Rngs(cfg.seed), param_dtype=param_dtype, dtype=dtype)
    else:
        model, tok = load_pretrained(cfg.model, dtype=param_dtype, compute_dtype=dtype, return_tokenizer=True)
        tok = tokenizer or tok
        if tok is None:
            raise ValueError(f"model={cfg.model!r} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
        dc = model.config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"model={cfg.model!r}: the tokenizer has no eos_token")
    graphdef, params = nnx.split(model)
    return Policy(graphdef, params, dc, tok)


def check_model(model: str) -> None:
    """Before any compute: ``model`` must be ``"tiny"`` or a directory with a ``config.json``."""
    if model == "tiny":
        return
    if not os.path.isdir(model) or not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"model={model!r} is neither 'tiny' nor a local Hugging Face checkpoint directory "
                         "(a folder with config.json and model.safetensors)")


__all__ = ["Policy", "TINY", "build_policy", "check_model", "tiny_hf_config"]
