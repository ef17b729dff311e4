"""Hugging Face checkpoint io: ``load_pretrained`` / ``save_pretrained`` for :class:`~trlax.models.Decoder`.

Format (what transformers' ``save_pretrained`` writes and vLLM reads): ``config.json``, weights in
``model.safetensors`` or in shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``), and optional tokenizer files read
through ``transformers.AutoTokenizer``. Hugging Face ``Linear`` weights are ``[out, in]``; the decoder keeps
heads as separate axes (``q: [H, N, D]``, ``o: [N, D, H]``), so loading reshapes / transposes and saving
undoes it exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.models.decoder import Decoder, DecoderConfig

__all__ = ["load_pretrained", "save_pretrained", "load_tokenizer", "load_config", "read_safetensors", "to_hf_state",
           "from_hf_state"]

_DTYPE_NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16",
                jnp.dtype(jnp.float16): "float16"}


def load_config(path: str) -> DecoderConfig:
    """Read ``<path>/config.json`` into a :class:`DecoderConfig` (error lists the supported architectures)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(cfg_file) as fh:
        return DecoderConfig.from_hf(json.load(fh))


def load_tokenizer(path: str):
    """``transformers.AutoTokenizer.from_pretrained(path)`` if tokenizer files exist there, else None."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def read_safetensors(path: str, framework: str = "flax") -> Dict[str, np.ndarray]:
    """Every tensor of a local checkpoint directory (one ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``) by name, as ``framework`` arrays (``"flax"`` or ``"numpy"``)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), framework=framework) as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def _layer_map(cfg: DecoderConfig, i: int):
    """(trlax path, HF name, to_trlax(w), to_hf(w)) for layer ``i``."""
    n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    p = f"model.layers.{i}."

    def proj_in(heads):  # HF [heads*D, H] <-> [H, heads, D]
        return (lambda w: w.reshape(heads, d, h).transpose(2, 0, 1),
                lambda w: w.transpose(1, 2, 0).reshape(heads * d, h))

    def bias(heads):
        return (lambda w: w.reshape(heads, d), lambda w: w.reshape(heads * d))

    ident = (lambda w: w, lambda w: w)
    tr = (lambda w: w.T, lambda w: w.T)
    rows = [
        (("input_norm",), p + "input_layernorm.weight", ident),
        (("post_attention_norm",), p + "post_attention_layernorm.weight", ident),
        (("attn", "q"), p + "self_attn.q_proj.weight", proj_in(n)),
        (("attn", "k"), p + "self_attn.k_proj.weight", proj_in(k)),
        (("attn", "v"), p + "self_attn.v_proj.weight", proj_in(k)),
        (("attn", "o"), p + "self_attn.o_proj.weight",
         (lambda w: w.reshape(h, n, d).transpose(1, 2, 0), lambda w: w.transpose(2, 0, 1).reshape(h, n * d))),
        (("mlp", "gate"), p + "mlp.gate_proj.weight", tr),
        (("mlp", "up"), p + "mlp.up_proj.weight", tr),
        (("mlp", "down"), p + "mlp.down_proj.weight", tr),
    ]
    if cfg.qkv_bias:
        rows += [(("attn", "q_bias"), p + "self_attn.q_proj.bias", bias(n)),
                 (("attn", "k_bias"), p + "self_attn.k_proj.bias", bias(k)),
                 (("attn", "v_bias"), p + "self_attn.v_proj.bias", bias(k))]
    if cfg.o_bias:
        rows.append((("attn", "o_bias"), p + "self_attn.o_proj.bias", ident))
    if cfg.mlp_bias:
        rows += [(("mlp", "gate_bias"), p + "mlp.gate_proj.bias", ident),
                 (("mlp", "up_bias"), p + "mlp.up_proj.bias", ident),
                 (("mlp", "down_bias"), p + "mlp.down_proj.bias", ident)]
    if cfg.qk_norm:
        rows += [(("attn", "q_norm"), p + "self_attn.q_norm.weight", ident),
                 (("attn", "k_norm"), p + "self_attn.k_norm.weight", ident)]
    return [(("layers", i) + path, name, fns) for path, name, fns in rows]


def _param_map(cfg: DecoderConfig):
    ident = (lambda w: w, lambda w: w)
    rows = [(("embed",), "model.embed_tokens.weight", ident), (("final_norm",), "model.norm.weight", ident)]
    if not cfg.tie_word_embeddings:
        rows.append((("lm_head",), "lm_head.weight", ident))
    for i in range(cfg.num_layers):
        rows += _layer_map(cfg, i)
    return rows


def _get(module, path):
    for p in path:
        module = module[p] if isinstance(p, int) else getattr(module, p)
    return module


def _var(model: Decoder, path):
    """``(variable, layer)`` of a ``_param_map`` path: with scanned layers (``model.scan_layers``) a per-layer
    path ``("layers", i, ...)`` names row ``i`` of the stacked variable ``layers/...``; else ``layer`` is None."""
    if path[0] == "layers" and getattr(model, "scan_layers", False):
        return _get(model, ("layers",) + tuple(path[2:])), path[1]
    return _get(model, path), None


def from_hf_state(model: Decoder, tensors: Dict[str, Any]) -> Decoder:
    """Copy Hugging Face-named ``tensors`` into ``model`` in place (cast to its ``param_dtype``).
    Missing or wrongly shaped tensors raise ``ValueError`` naming the tensor; unknown extra tensors are
    ignored only if they are known-derived (``rotary_emb.inv_freq``, tied ``lm_head.weight``)."""
    cfg = model.config
    used = set()
    stacked = {}  # scanned layers: path -> (variable, {layer: array}), written once per variable
    for path, name, (to_trlax, _) in _param_map(cfg):
        if name not in tensors:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        var, layer = _var(model, path)
        w = to_trlax(jnp.asarray(tensors[name]))
        if w.shape != var[...].shape[0 if layer is None else 1:]:
            raise ValueError(f"tensor {name!r}: shape {tuple(tensors[name].shape)} does not match the config")
        if layer is None:
            var[...] = w.astype(model.param_dtype)
        else:
            stacked.setdefault(path[2:], (var, {}))[1][layer] = w.astype(model.param_dtype)
        used.add(name)
    for var, rows in stacked.values():
        var[...] = jnp.stack([rows[i] for i in range(len(rows))])
    extra = [k for k in tensors if k not in used and "rotary_emb" not in k
             and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if extra:
        raise ValueError(f"checkpoint has tensors this architecture does not use: {sorted(extra)[:8]}")
    return model


def to_hf_state(model: Decoder, dtype=None) -> Dict[str, jnp.ndarray]:
    """Hugging Face-named ``{name: array}`` of ``model``'s parameters (in ``dtype``, default param dtype)."""
    out = {}
    for path, name, (_, to_hf) in _param_map(model.config):
        var, layer = _var(model, path)
        w = to_hf(var[...] if layer is None else var[...][layer])
        out[name] = w if dtype is None else w.astype(dtype)
    return out


def load_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None, remat=False, scan_layers: bool = True,
                    return_tokenizer: bool = False):
    """Load a local Hugging Face checkpoint directory into a :class:`Decoder`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or sharded files + index);
        tokenizer files are optional.
      dtype: parameter (storage) dtype, e.g. float32 master weights.
      compute_dtype: activation / matmul dtype (default ``dtype``), e.g. bf16.
      remat: rematerialisation (``False``, ``True`` / ``"full"``, ``"dots"`` or one entry per layer; see
        :class:`~trlax.models.Decoder`).
      scan_layers: stacked layers run with ``lax.scan`` (default) or an unrolled list of blocks (the
        Hugging Face tensors are per layer either way: ``model.layers.{i}.*`` fill row ``i`` of the stack).
      return_tokenizer: also return ``load_tokenizer(path)`` (None when there are no tokenizer files).

    Returns:
      the model, or ``(model, tokenizer)``.
    """
    cfg = load_config(path)
    tensors = read_safetensors(path)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=compute_dtype,
                                           remat=remat, scan_layers=scan_layers))
    # Materialise without running the random initialiser: every parameter is overwritten below.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    model = nnx.merge(graphdef, state)
    from_hf_state(model, tensors)
    if return_tokenizer:
        return model, load_tokenizer(path)
    return model


def save_pretrained(model: Decoder, path: str, *, tokenizer=None, dtype=None,
                    max_shard_size: int = 5 * 1024 ** 3) -> None:
    """Write ``model`` as a Hugging Face checkpoint that transformers / vLLM open unchanged.

    Writes ``config.json`` (the loaded ``config.json`` with ``architectures`` and ``dtype`` set),
    ``model.safetensors`` — or ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size``
    bytes plus ``model.safetensors.index.json`` — and ``tokenizer.save_pretrained(path)`` if given.

    Args:
      model: a :class:`Decoder` (``nnx.merge(graphdef, state)`` one after training).
      path: output directory (created).
      tokenizer: optional transformers tokenizer to save alongside.
      dtype: storage dtype of the weights (default: the model's ``param_dtype``).
      max_shard_size: bytes per safetensors file.
    """
    from safetensors.flax import save_file

    if max_shard_size < 1:
        raise ValueError(f"max_shard_size={max_shard_size!r} is out of range; allowed: integers >= 1")
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    tensors = {k: jnp.asarray(v) for k, v in to_hf_state(model, dtype).items()}
    dt = jnp.dtype(dtype or model.param_dtype)
    hf = dict(cfg.hf_config or {})  # a copy: the model's config is left as it was
    hf.update({
        "model_type": cfg.model_type,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "dtype": _DTYPE_NAMES.get(dt, str(dt)),
    })
    hf.pop("torch_dtype", None)
    if "head_dim" in hf or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        hf["head_dim"] = cfg.head_dim
    hf.setdefault("hidden_act", "silu")
    hf.setdefault("max_position_embeddings", cfg.max_position_embeddings)
    if cfg.model_type != "qwen2":
        hf.setdefault("attention_bias", cfg.qkv_bias)
        hf.setdefault("mlp_bias", cfg.mlp_bias)
    if "rope_parameters" not in hf and "rope_theta" not in hf:
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
        if cfg.rope_type != "default":
            rope["factor"] = cfg.rope_factor
        if cfg.rope_type == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                        original_max_position_embeddings=cfg.rope_original_max_positions)
        hf["rope_theta"] = cfg.rope_theta
        if cfg.rope_type != "default":
            hf["rope_scaling"] = rope
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2, sort_keys=True)

    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].size * tensors[name].dtype.itemsize
        if cur and size + nbytes > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = tensors[name], size + nbytes
    shards.append(cur)
    for stale in os.listdir(path):  # old shards of a previous save would confuse loaders
        if stale.startswith("model") and (stale.endswith(".safetensors") or stale.endswith(".index.json")):
            os.remove(os.path.join(path, stale))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata=meta)
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.size * v.dtype.itemsize
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
