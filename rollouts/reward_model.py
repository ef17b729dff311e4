"""A reward model (sequence-classification head on the trlax decoder) and a pairwise judge.

:class:`RewardModel` is the trlax :class:`~trlax.models.Decoder` trunk plus a linear score head
``score: [num_labels, H]`` (no bias) read at the last real token — the layout of Hugging Face's
``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification`` / ``Qwen3ForSequenceClassification``
(the Bradley-Terry reward model of InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, sec. 3.5).
:func:`load_reward_model` reads such a checkpoint (``config.json`` + ``model.*`` and ``score.weight`` in
safetensors) without changing :mod:`trlax.models`: the trunk is loaded through
:func:`trlax.models.from_hf_state` and ``score.weight`` separately.

:class:`RewardModelScorer` turns it into a batched reward function for
:func:`trlax.rollouts.compute_rewards`; :class:`RewardModelJudge` is a pairwise judge
``(prompt, completion_a, completion_b) -> P(a better than b) = σ(r_a − r_b)`` (Bradley & Terry 1952;
arXiv 2203.02155, eq. 1) for online preference methods (online DPO, arXiv 2402.04792; NashMD, arXiv
2312.00886).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.models.decoder import SUPPORTED_ARCHITECTURES, Decoder, DecoderConfig
from trlax.models.hf_io import from_hf_state, read_safetensors

__all__ = ["RewardModel", "load_reward_model", "RewardModelScorer", "PairwiseJudge", "RewardModelJudge"]

_SEQ_CLS = {mt: arch.replace("ForCausalLM", "ForSequenceClassification") for mt, arch in SUPPORTED_ARCHITECTURES.items()}


class RewardModel(nnx.Module):
    """Decoder trunk + linear score head at the last real token.

    Args:
      config: :class:`~trlax.models.DecoderConfig` of the trunk (its LM head is unused).
      num_labels: outputs of the score head (1 for a scalar reward model).
      rngs, param_dtype, dtype: as :class:`~trlax.models.Decoder`.
    """

    def __init__(self, config: DecoderConfig, num_labels: int = 1, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=None):
        if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
            raise ValueError(f"num_labels={num_labels!r} is out of range; allowed: integers >= 1")
        self.backbone = Decoder(dataclasses.replace(config, tie_word_embeddings=True), rngs=rngs,
                                param_dtype=param_dtype, dtype=dtype)
        self.score = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_labels, config.hidden_size),
                                                        jnp.float32).astype(param_dtype),
                               out_sharding=(None, "embed"), eager_sharding=False)

    def __call__(self, input_ids, attention_mask=None) -> jnp.ndarray:
        """Scores ``[B, num_labels]`` (float32 or wider) from the hidden state of each row's last real token.

        input_ids: ``[B, T]`` int; attention_mask: ``[B, T]`` (left- or right-padded; default all real).
        A row without real tokens scores the (meaningless but finite) state at position 0."""
        ids = jnp.asarray(input_ids)
        mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        h = self.backbone.hidden_states(ids, attention_mask=mask)  # [B, T, H]
        t = ids.shape[1]
        last = jnp.max(jnp.where(mask, jnp.arange(t)[None, :], 0), axis=1)  # index of the last real token
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        acc = jnp.promote_types(h.dtype, jnp.float32)
        return jnp.einsum("bh,lh->bl", h_last.astype(acc), self.score[...].astype(acc))


def _read_classifier(path: str, archs_by_type, what: str, kind: str):
    """``(DecoderConfig, tensors)`` of a Hugging Face classifier checkpoint directory whose architecture is
    ``archs_by_type[model_type]``; checks the architecture and that ``score.weight`` is present."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no config.json in {what} directory {path!r}")
    with open(cfg_file) as fh:
        hf = json.load(fh)
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if mt not in archs_by_type or any(a != archs_by_type[mt] for a in archs):
        raise ValueError(f"unsupported {what} architecture model_type={mt!r} architectures={archs}; "
                         f"supported: {sorted(archs_by_type.values())}")
    cfg = DecoderConfig.from_hf(dict(hf, architectures=[SUPPORTED_ARCHITECTURES[mt]]))
    tensors = read_safetensors(path, framework="numpy")
    if "score.weight" not in tensors:
        raise ValueError(f"checkpoint is missing tensor 'score.weight' (not a {kind} model?)")
    return cfg, tensors


def load_reward_model(path: str, dtype=jnp.float32, *, compute_dtype=None) -> RewardModel:
    """Load a Hugging Face ``*ForSequenceClassification`` checkpoint (Llama / Qwen2 / Qwen3) from ``path``.

    Reads ``config.json`` (``num_labels`` from ``id2label``), the trunk tensors ``model.*`` and the head
    ``score.weight`` ``[num_labels, H]`` from ``model.safetensors`` (or shards + index)."""
    cfg, tensors = _read_classifier(path, _SEQ_CLS, "reward model", "sequence-classification")
    score = tensors.pop("score.weight")
    tensors.pop("lm_head.weight", None)
    num_labels = int(score.shape[0])
    model = nnx.eval_shape(lambda: RewardModel(cfg, num_labels, rngs=nnx.Rngs(0), param_dtype=dtype,
                                               dtype=compute_dtype))
    gd, state = nnx.split(model)
    model = nnx.merge(gd, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    from_hf_state(model.backbone, tensors)
    if score.shape != (num_labels, cfg.hidden_size):
        raise ValueError(f"tensor 'score.weight': shape {score.shape} does not match hidden_size={cfg.hidden_size}")
    model.score[...] = jnp.asarray(score).astype(dtype)
    return model


def _encode(tokenizer, text: str) -> List[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text))


class RewardModelScorer:
    """A batched reward function backed by a :class:`RewardModel` (``batched = True``; see
    :func:`trlax.rollouts.compute_rewards`): the reward is ``score[:, label]`` of ``prompt + completion``.

    Args:
      model: :class:`RewardModel`.
      tokenizer: object with ``encode(text)`` (a transformers tokenizer, called with
        ``add_special_tokens=False``) or a callable ``text -> ids``.
      format_fn: ``(prompt, completion) -> text`` to score (default: concatenation; pass a chat template).
      batch_size: rows per forward pass; max_length: tokens kept per row (the last ``max_length``).
      label: which score-head output is the reward.
    """

    batched = True
    __name__ = "reward_model"

    def __init__(self, model: RewardModel, tokenizer: Any, *, format_fn: Optional[Callable[[str, str], str]] = None,
                 batch_size: int = 16, max_length: int = 1024, label: int = 0, pad_token_id: int = 0):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size!r} and max_length={max_length!r} must be >= 1")
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer, self.format_fn = tokenizer, format_fn or (lambda p, c: p + c)
        self.batch_size, self.max_length, self.label, self.pad = batch_size, max_length, label, pad_token_id
        self._fwd = jax.jit(lambda params, ids, mask: nnx.merge(self.graphdef, params)(ids, mask))

    def score_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Scores ``[B, num_labels]`` of padded token ids ``[B, T]`` with mask ``[B, T]``."""
        return np.asarray(self._fwd(self.params, jnp.asarray(ids), jnp.asarray(mask)))

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``[N]`` rewards of whole texts (label ``self.label``), in batches of ``batch_size`` rows padded to
        a power-of-two width (few recompilations)."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            rows = [_encode(self.tokenizer, t)[-self.max_length:] or [self.pad] for t in texts[s:s + self.batch_size]]
            width = 1 << max(3, int(np.ceil(np.log2(max(len(r) for r in rows)))))
            ids = np.full((self.batch_size, width), self.pad, np.int32)
            mask = np.zeros((self.batch_size, width), bool)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = r, True
            mask[len(rows):, 0] = True  # filler rows
            out.append(self.score_ids(ids, mask)[:len(rows), self.label])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def __call__(self, completions: Sequence[str], prompts: Optional[Sequence[str]] = None, **_) -> List[float]:
        prompts = list(prompts) if prompts is not None else [""] * len(completions)
        return self.score_texts([self.format_fn(p, c) for p, c in zip(prompts, completions)]).astype(float).tolist()


class PairwiseJudge:
    """Interface: ``judge(prompt, completion_a, completion_b) -> P(a is better than b)`` in ``[0, 1]``;
    ``judge.batch(prompts, as, bs) -> [N]`` probabilities."""

    def __call__(self, prompt: str, completion_a: str, completion_b: str) -> float:
        return float(self.batch([prompt], [completion_a], [completion_b])[0])

    def batch(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class RewardModelJudge(PairwiseJudge):
    """Bradley-Terry judge from a reward model: ``P(a ≻ b) = σ((r_a − r_b) / τ)`` (arXiv 2203.02155, eq. 1;
    ``temperature`` τ = 1 by default)."""

    def __init__(self, scorer: RewardModelScorer, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is out of range; allowed: (0, inf)")
        self.scorer, self.temperature = scorer, float(temperature)

    def batch(self, prompts, completions_a, completions_b) -> np.ndarray:
        if not (len(prompts) == len(completions_a) == len(completions_b)):
            raise ValueError("`prompts`, `completions_a` and `completions_b` must have the same length")
        ra = np.asarray(self.scorer(completions_a, prompts), np.float64)
        rb = np.asarray(self.scorer(completions_b, prompts), np.float64)
        z = (ra - rb) / self.temperature
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), overflow-free


# ------------------------------------------------------------------------ building and saving heads

_TOK_CLS = {mt: arch.replace("ForCausalLM", "ForTokenClassification") for mt, arch in SUPPORTED_ARCHITECTURES.items()}


class ProcessRewardModel(RewardModel):
    """Decoder trunk + per-token linear head ``score: [num_labels, H]`` with bias ``[num_labels]`` — the
    layout of Hugging Face's ``LlamaForTokenClassification`` (``token_classification_bias=True``), used as a
    process reward model (Uesato et al. 2022, arXiv 2211.14275; Math-Shepherd, arXiv 2312.08935): class
    logits at every token, read at the end of each reasoning step.

    Args: as :class:`RewardModel` (``num_labels`` defaults to 2: incorrect / correct).
    """

    def __init__(self, config: DecoderConfig, num_labels: int = 2, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=None):
        super().__init__(config, num_labels, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.score_bias = nnx.Param(jnp.zeros((num_labels,), param_dtype), out_sharding=(None,),
                                    eager_sharding=False)

    def __call__(self, input_ids, attention_mask=None) -> jnp.ndarray:
        """Per-token class logits ``[B, T, num_labels]`` (float32 or wider); padding positions are finite
        but meaningless. input_ids / attention_mask: ``[B, T]`` (right-padded or unpadded)."""
        ids = jnp.asarray(input_ids)
        mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        h = self.backbone.hidden_states(ids, attention_mask=mask)
        acc = jnp.promote_types(h.dtype, jnp.float32)
        return (jnp.einsum("bth,lh->btl", h.astype(acc), self.score[...].astype(acc))
                + self.score_bias[...].astype(acc))


def classifier_from_decoder(decoder: Decoder, num_labels: int = 1, *, seed: int = 0, kind: str = "sequence"):
    """A :class:`RewardModel` (``kind="sequence"``) or :class:`ProcessRewardModel` (``kind="token"``) whose
    trunk is a copy of ``decoder``'s weights (its LM head dropped) and whose score head is fresh
    (normal, std 0.02, as transformers' ``initializer_range``; zero bias), seeded by ``seed`` — how TRL's
    ``RewardTrainer`` / ``PRMTrainer`` start from a causal LM."""
    from trlax.models.hf_io import to_hf_state

    cls = {"sequence": RewardModel, "token": ProcessRewardModel}.get(kind)
    if cls is None:
        raise ValueError(f"kind={kind!r} is not allowed; allowed: 'sequence', 'token'")
    abstract = nnx.eval_shape(lambda: cls(decoder.config, num_labels, rngs=nnx.Rngs(0),
                                          param_dtype=decoder.param_dtype, dtype=decoder.dtype))
    gd, state = nnx.split(abstract)
    model = nnx.merge(gd, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    from_hf_state(model.backbone, to_hf_state(decoder))
    head = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), model.score[...].shape, jnp.float32)
    model.score[...] = head.astype(decoder.param_dtype)
    return model


def _save_classifier(model, path: str, arch: str, head: dict, tokenizer, dtype) -> None:
    from safetensors.flax import save_file

    from trlax.models.hf_io import save_pretrained

    save_pretrained(model.backbone, path, tokenizer=tokenizer, dtype=dtype)  # config.json + trunk + tokenizer
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as fh:
        hf = json.load(fh)
    n = int(model.score[...].shape[0])
    hf.update(architectures=[arch], id2label={str(i): f"LABEL_{i}" for i in range(n)},
              label2id={f"LABEL_{i}": i for i in range(n)})
    hf.pop("num_labels", None)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        hf["pad_token_id"] = int(tokenizer.pad_token_id)  # transformers finds the last real token by it
    with open(cfg_file, "w") as fh:
        json.dump(hf, fh, indent=2, sort_keys=True)
    dt = jnp.dtype(dtype or model.backbone.param_dtype)
    head = {k: jnp.asarray(v).astype(dt) for k, v in head.items()}
    meta = {"format": "pt"}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded trunk: the head is one more shard named in the index
        save_file(head, os.path.join(path, "model-head.safetensors"), metadata=meta)
        with open(index) as fh:
            idx = json.load(fh)
        for k, v in head.items():
            idx["weight_map"][k] = "model-head.safetensors"
            idx["metadata"]["total_size"] = idx["metadata"].get("total_size", 0) + v.size * v.dtype.itemsize
        with open(index, "w") as fh:
            json.dump(idx, fh, indent=2)
    else:
        tensors = read_safetensors(path)
        tensors.update(head)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=meta)


def save_reward_model(model: RewardModel, path: str, *, tokenizer=None, dtype=None) -> None:
    """Write ``model`` as a Hugging Face ``*ForSequenceClassification`` checkpoint (``config.json`` with
    ``architectures`` and ``id2label``; trunk tensors ``model.*`` and ``score.weight`` ``[num_labels, H]``)
    that :func:`load_reward_model` and transformers' ``AutoModelForSequenceClassification`` both open.
    transformers scores the last token that is not ``pad_token_id`` (taken from ``tokenizer``): score
    texts whose last real token differs from the pad token (e.g. ending in EOS when pad != EOS)."""
    arch = _SEQ_CLS[model.backbone.config.model_type]
    _save_classifier(model, path, arch, {"score.weight": model.score[...]}, tokenizer, dtype)


def save_process_reward_model(model: ProcessRewardModel, path: str, *, tokenizer=None, dtype=None) -> None:
    """Write ``model`` as a Hugging Face ``*ForTokenClassification`` checkpoint (``score.weight`` and
    ``score.bias``) that :func:`load_process_reward_model` and ``AutoModelForTokenClassification`` open."""
    arch = _TOK_CLS[model.backbone.config.model_type]
    _save_classifier(model, path, arch, {"score.weight": model.score[...], "score.bias": model.score_bias[...]},
                     tokenizer, dtype)


def load_process_reward_model(path: str, dtype=jnp.float32, *, compute_dtype=None) -> ProcessRewardModel:
    """Load a Hugging Face ``*ForTokenClassification`` checkpoint (Llama / Qwen2 / Qwen3; ``score.weight``
    and, if present, ``score.bias``) into a :class:`ProcessRewardModel`."""
    cfg, tensors = _read_classifier(path, _TOK_CLS, "process reward model", "token-classification")
    score = tensors.pop("score.weight")
    bias = tensors.pop("score.bias", None)
    tensors.pop("lm_head.weight", None)
    n = int(score.shape[0])
    if score.shape != (n, cfg.hidden_size) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"head tensors 'score.weight' {score.shape} / 'score.bias' "
                         f"{None if bias is None else bias.shape} do not match hidden_size={cfg.hidden_size}")
    model = nnx.eval_shape(lambda: ProcessRewardModel(cfg, n, rngs=nnx.Rngs(0), param_dtype=dtype,
                                                      dtype=compute_dtype))
    gd, state = nnx.split(model)
    model = nnx.merge(gd, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    from_hf_state(model.backbone, tensors)
    model.score[...] = jnp.asarray(score).astype(dtype)
    if bias is not None:
        model.score_bias[...] = jnp.asarray(bias).astype(dtype)
    return model


__all__ += ["ProcessRewardModel", "classifier_from_decoder", "save_reward_model", "save_process_reward_model",
            "load_process_reward_model"]
