"""The sampler: prefill + KV-cached decode of a :class:`~trlax.models.Decoder` under ``jit``.

The trainer asks a :class:`Sampler` for generations (``sampler.generate(params, prompts, key)``) and gets a
:class:`Rollout` back; it never reaches into how they were made, so another backend (an external inference
server) implements the same one-method interface.

:class:`JaxSampler` runs the whole generation as one jitted function, with one of two engines:

- **shared prefix** (default, ``share_prefix=True``): the ``B0`` *distinct* prompts are prefilled once into a
  :class:`~trlax.models.SlotCache`; the ``G`` samples of a prompt read the same prompt keys / values (a group
  of 8 pays one prefill, not 8; cascade attention, Hydragen arXiv 2402.05099). Then ``lax.while_loop``
  decodes one token per *slot* per step. With ``decode_slots=None`` every completion has its slot and the
  loop runs until the longest one stopped. With ``decode_slots=Sl`` (continuous batching, Orca, Yu et al.
  OSDI 2022) ``Sl`` slots stream through the ``B0·G`` requests: a slot whose completion stopped takes the
  next pending request in the same step (its first token is already sampled from the prompt's prefill
  logits, so no prefill is needed: only the slot's prompt index and buffer length change).
- **reference** (``share_prefix=False``): every prompt is copied ``G`` times, the ``[B, P]`` block fills a
  fixed-size stacked KV cache in one prefill, and the batch decodes until every row stopped.

Every request ``r`` (row ``r`` of the rollout, prompt ``r // G``) draws token ``i`` with the key
``fold_in(fold_in(key, r), i)`` and one uniform by inverting the CDF, so both engines and every slot count
give the same tokens for the same key (tests/rollouts/test_sampler_engines.py). Sampling follows
the processed distribution

    π̃(· | q, o_<t) = softmax( truncate( logits / τ ) ),                                         (1)

where ``truncate`` applies, in this order (the order of Hugging Face ``generate``'s logits warpers), top-k
(keep the k largest logits; ties at the k-th value are kept), top-p / nucleus sampling (Holtzman et al.
2019, arXiv 1904.09751, sec. 3.1: keep the smallest set of most likely tokens whose probability mass reaches
p, computed on the top-k-renormalised distribution) and min-p (Nguyen et al. 2024, arXiv 2407.01082: keep
tokens whose probability is at least ``min_p`` times the top token's). Removed tokens get probability 0 and
the kept ones are **renormalised**. Cutoffs keep every token tied with the threshold value (for top-p this
can keep a few more tokens than Hugging Face, which splits a tie by sort order); they are found by exact
bisection over the float bit patterns rather than a sort (much cheaper on CPU). With a single truncation the order does not matter; combined, it can (vLLM
applies min-p before top-k / top-p, Hugging Face after).

Sampler log-probs. ``Rollout.logps[b, t] = log π̃(o_t | q, o_<t)`` of eq. (1): the log-probability of the
sampled token under the distribution that was actually sampled from (after temperature *and* truncation,
renormalised). This is vLLM's ``logprobs_mode="processed_logprobs"``, which TRL 1.16 requires of its vLLM
server for the truncated-importance-sampling correction (Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training"; TIS weight ``min(π_θ / π_sampler, C)``): the sampler-side
probability must be the one the token was drawn with. Note that the trainer's ``π_θ`` (e.g.
:func:`trlax.models.completion_logps`) applies the temperature but no truncation, so for tokens inside the
kept set ``log π̃ ≥ log softmax(logits / τ)``. Greedy decoding (``temperature=0``) takes the arg-max and
reports the log-softmax of the *unscaled* logits (temperature 1) after truncation.

Shapes: ``B`` rows (prompts × ``num_generations``), ``P`` prompt width, ``N`` ``max_new_tokens``,
``S`` cache slots (``max_length``), ``V`` vocabulary.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.models.attention import SlotCache
from trlax.models.decoder import Decoder, positions_from_mask, rms_norm, rope_inv_freq

__all__ = [
    "SamplingConfig",
    "Rollout",
    "Sampler",
    "JaxSampler",
    "process_logits",
    "left_pad",
    "make_two_model_sampler",
]


# ----------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable; a new value recompiles the sampler).

    Attributes:
      max_new_tokens: ``N``, completion tokens per row (the completion block is always ``[B, N]``).
      temperature: ``τ`` of eq. (1); ``0`` means greedy (arg-max) decoding.
      top_k: keep the ``k`` most likely tokens (``0`` or ``None`` = off).
      top_p: nucleus mass in ``(0, 1]`` (``1`` or ``None`` = off).
      min_p: min-p ratio in ``[0, 1)`` (``0`` or ``None`` = off).
      stop_token_ids: tokens that end a completion (the stop token itself is part of the completion and
        of its mask, as in TRL); e.g. the tokenizer's EOS id(s).
      pad_token_id: id written at completion positions after the stop token.
      num_generations: completions per prompt; row ``b`` of the rollout belongs to prompt ``b // G``
        (consecutive groups, the layout :mod:`trlax.objectives.advantages` expects).
      max_length: KV-cache slots ``S`` (prompt + completion); ``None`` sizes it to ``P + N`` per call. A
        prompt whose real tokens plus ``max_new_tokens`` do not fit raises ``ValueError``.
      prompt_multiple: ``None`` keeps the width of the prompt block as given (one compilation per width:
        pass a fixed-width block, as a trainer with ``max_prompt_length`` does); an integer re-pads the
        block to the smallest multiple of it that holds the longest prompt (drops all-padding columns, so
        the prefill is cheaper, at one compilation per bucket).
      share_prefix: prefill each distinct prompt once and let its ``G`` samples read the same prompt keys /
        values (:class:`~trlax.models.SlotCache`); ``False`` is the reference engine that copies every prompt
        ``G`` times. Both give the same tokens for the same key.
      decode_slots: ``None``: one decode slot per completion (the batch decodes until its longest row
        stops); an integer ``Sl``: continuous batching, ``Sl`` slots stream through the ``prompts x G``
        requests and a slot whose completion stopped takes the next one at once (needs ``share_prefix``).
        Same tokens for any slot count.
      slot_halvings: continuous batching: once no request is pending and at most half the slots are busy,
        the busy slots move into a batch half as wide, at most this many times (0: never), so a few long
        completions at the end do not keep the whole width busy (same tokens; each width is one more
        compiled loop).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: Optional[int] = 0
    top_p: Optional[float] = 1.0
    min_p: Optional[float] = 0.0
    stop_token_ids: Tuple[int, ...] = ()
    pad_token_id: int = 0
    num_generations: int = 1
    max_length: Optional[int] = None
    prompt_multiple: Optional[int] = None
    share_prefix: bool = True
    decode_slots: Optional[int] = None
    slot_halvings: int = 2

    def __post_init__(self):
        for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):  # TRL / HF spell "off" as None
            if getattr(self, name) is None:
                object.__setattr__(self, name, off)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in np.atleast_1d(
            np.asarray(self.stop_token_ids, dtype=np.int64)).tolist()))
        ints = {"max_new_tokens": 1, "top_k": 0, "num_generations": 1, "pad_token_id": 0, "slot_halvings": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name}={v!r} is out of range; allowed: integers >= {low}")
        if self.decode_slots == 0:
            object.__setattr__(self, "decode_slots", None)
        ds = self.decode_slots
        if ds is not None and (isinstance(ds, bool) or not isinstance(ds, (int, np.integer)) or ds < 1):
            raise ValueError(f"decode_slots={ds!r} is out of range; allowed: None (one slot per completion) or "
                             "integers >= 1")
        if not isinstance(self.share_prefix, (bool, np.bool_)):
            raise ValueError(f"share_prefix={self.share_prefix!r} must be a bool")
        if ds is not None and not self.share_prefix:
            raise ValueError(f"decode_slots={ds} (continuous batching) needs share_prefix=True")
        pm = self.prompt_multiple
        if pm is not None and (isinstance(pm, bool) or not isinstance(pm, (int, np.integer)) or pm < 1):
            raise ValueError(f"prompt_multiple={pm!r} is out of range; allowed: None or integers >= 1")
        if self.max_length is not None and (isinstance(self.max_length, bool)
                                            or not isinstance(self.max_length, (int, np.integer))
                                            or self.max_length < 2):
            raise ValueError(f"max_length={self.max_length!r} is out of range; allowed: None or integers >= 2")
        for name, lo, hi, lo_inc, hi_inc in (("temperature", 0.0, None, True, True), ("top_p", 0.0, 1.0, False, True),
                                             ("min_p", 0.0, 1.0, True, False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                raise ValueError(f"{name}={v!r} must be a finite number")
            if (v < lo if lo_inc else v <= lo) or (hi is not None and (v > hi if hi_inc else v >= hi)):
                rng = f"{'[' if lo_inc else '('}{lo}, {'inf)' if hi is None else str(hi) + (']' if hi_inc else ')')}"
                raise ValueError(f"{name}={v!r} is out of range; allowed: {rng}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ------------------------------------------------------------------------------------ processing


def _order_keys(x: jnp.ndarray) -> jnp.ndarray:
    """Unsigned integers with the same order as the float values of ``x`` (IEEE-754 bit trick: flip all bits
    of negatives, set the sign bit of non-negatives)."""
    ut = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, ut)
    top = jnp.asarray(1, ut) << jnp.asarray(8 * x.dtype.itemsize - 1, ut)
    return jnp.where((u & top) != 0, ~u, u | top)


def _largest_key(keys: jnp.ndarray, pred) -> jnp.ndarray:
    """Largest ``t`` among ``[min(keys), max(keys)]`` (per row, ``[..., 1]``) with ``pred(t)`` True, for a
    predicate that is True at the row minimum and monotone (True below the answer, False above). Exact
    bisection over the integer keys: ``bits + 1`` vectorised compare-and-reduce passes over ``[..., V]``,
    much cheaper on CPU than the full sort behind ``lax.top_k`` / ``jnp.sort``."""
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)
    one = jnp.asarray(1, keys.dtype)

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo + one) // 2
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - one)

    lo, _ = jax.lax.fori_loop(0, 8 * keys.dtype.itemsize + 1, body, (lo, hi))
    return lo


def process_logits(logits: jnp.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> jnp.ndarray:
    """Log-probabilities of the processed sampling distribution, eq. (1) of the module docstring.

    ``log softmax(truncate(logits / τ))`` with top-k, then top-p (arXiv 1904.09751, sec. 3.1), then min-p
    (arXiv 2407.01082) truncation, renormalised over the kept tokens; removed tokens get ``-inf``. The most
    likely token is always kept. ``temperature=0`` (greedy) uses ``τ = 1``.

    Args:
      logits: ``[..., V]`` float logits (computed in float32, or float64 for float64 input).
      temperature, top_k, top_p, min_p: static Python numbers (see :class:`SamplingConfig`).

    Returns:
      ``[..., V]`` log-probabilities (``-inf`` outside the kept set).
    """
    acc = jnp.promote_types(jnp.asarray(logits).dtype, jnp.float32)
    x = jnp.asarray(logits).astype(acc)
    if temperature not in (0.0, 1.0):
        x = x / temperature
    neg = jnp.asarray(-jnp.inf, acc)
    v = x.shape[-1]
    if 0 < top_k < v:  # the k-th largest value: largest t with #{x >= t} >= k
        keys = _order_keys(x)
        t = _largest_key(keys, lambda m: jnp.sum(keys >= m, axis=-1, keepdims=True) >= top_k)
        x = jnp.where(keys >= t, x, neg)
    if top_p < 1.0:  # the nucleus cutoff: largest t with mass{x >= t} >= p (ties at the cutoff are kept)
        keys = _order_keys(x)
        p = jnp.exp(x - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        t = _largest_key(keys, lambda m: jnp.sum(jnp.where(keys >= m, p, 0.0), axis=-1, keepdims=True) >= top_p)
        x = jnp.where(keys >= t, x, neg)
    if min_p > 0.0:
        top = jnp.max(x, axis=-1, keepdims=True)
        x = jnp.where(x - top >= jnp.log(jnp.asarray(min_p, acc)), x, neg)
    return jax.nn.log_softmax(x, axis=-1)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int = 0, width: Optional[int] = None):
    """Left-pad ragged token-id lists into ``(ids [B, P] int32, mask [B, P] bool)`` NumPy arrays."""
    seqs = [list(map(int, s)) for s in sequences]
    if not seqs:
        raise ValueError("`prompts` is empty")
    p = max(len(s) for s in seqs) if width is None else width
    ids = np.full((len(seqs), max(p, 1)), pad_token_id, np.int32)
    mask = np.zeros((len(seqs), max(p, 1)), bool)
    for i, s in enumerate(seqs):
        if len(s) > p:
            raise ValueError(f"prompt {i} has {len(s)} tokens, more than width={p}")
        if s:
            ids[i, p - len(s):] = s
            mask[i, p - len(s):] = True
    return ids, mask


# ------------------------------------------------------------------------------------------ rollout


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
    """A batch of generations (a pytree of arrays; ``rollout["name"]`` also works).

    Attributes:
      prompt_ids, prompt_mask: ``[B, P]`` left-padded prompt block (each prompt repeated ``G`` times).
      completion_ids: ``[B, N]`` int32 sampled tokens, ``pad_token_id`` after the stop token.
      completion_mask: ``[B, N]`` bool, True up to and including the first stop token.
      logps: ``[B, N]`` float32 sampler log-probs ``log π̃(o_t|q, o_<t)`` of the sampled tokens under the
        processed sampling distribution (module docstring, eq. 1); 0 where the mask is False.
      truncated: ``[B]`` bool, True when the completion hit ``max_new_tokens`` without a stop token.
      group_ids: ``[B]`` int32 prompt index of each row (``b // num_generations``).
    """

    prompt_ids: jnp.ndarray
    prompt_mask: jnp.ndarray
    completion_ids: jnp.ndarray
    completion_mask: jnp.ndarray
    logps: jnp.ndarray
    truncated: jnp.ndarray
    group_ids: jnp.ndarray

    @property
    def sampler_logps(self) -> jnp.ndarray:
        """Alias of :attr:`logps` (the name the objectives use)."""
        return self.logps

    @property
    def lengths(self) -> jnp.ndarray:
        """``[B]`` completion lengths (tokens in the mask)."""
        return jnp.sum(self.completion_mask, axis=-1)

    def keys(self):
        """Field names (dict-style access for code that treats a rollout as a mapping)."""
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, name: str):
        """``rollout["completion_ids"]`` == ``rollout.completion_ids`` (also ``"sampler_logps"``, ``"lengths"``)."""
        if name in ("sampler_logps", "lengths") or name in self.keys():
            return getattr(self, name)
        raise KeyError(f"Rollout has no field {name!r}; fields: {self.keys()}")


# ---------------------------------------------------------------------------------------- interface


class Sampler(abc.ABC):
    """The interface the trainer uses: ``generate(params, prompts, key) -> Rollout``.

    ``params`` is the policy's parameter pytree (as trained), ``prompts`` a batch of prompts (a
    ``(prompt_ids, prompt_mask)`` pair of left-padded ``[B, P]`` arrays, a dict with those keys, or a list of
    token-id lists), ``key`` a ``jax.random`` key; the result is deterministic for a given key. An external
    inference server plugs in by subclassing this and returning the same :class:`Rollout`.
    """

    @abc.abstractmethod
    def generate(self, params: Any, prompts: Any, key: jax.Array, **kwargs) -> Rollout:
        """Sample completions for ``prompts`` with ``params``; see the class docstring."""


def _is_2d(x) -> bool:
    try:
        return np.ndim(x) == 2
    except ValueError:  # ragged
        return False


def _as_prompt_arrays(prompts, pad_token_id: int):
    if isinstance(prompts, dict):
        if "prompt_ids" not in prompts:
            raise ValueError("`prompts` dict must have 'prompt_ids' (and optionally 'prompt_mask')")
        ids, mask = prompts["prompt_ids"], prompts.get("prompt_mask")
    elif isinstance(prompts, tuple) and len(prompts) == 2 and (hasattr(prompts[0], "shape") or _is_2d(prompts[0])):
        ids, mask = prompts
    elif isinstance(prompts, (list, tuple)) and prompts and not hasattr(prompts[0], "shape") \
            and isinstance(prompts[0], (list, tuple)):
        return left_pad(prompts, pad_token_id)
    else:
        ids, mask = prompts, None
    ids = np.asarray(ids) if not isinstance(ids, jax.core.Tracer) else ids
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"`prompt_ids` must be an integer [B, P] array, got {ids.dtype} {tuple(ids.shape)}")
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"`prompt_mask` must have shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return ids, mask


# ---------------------------------------------------------------------------------------- jax sampler


def _layers_forward(model: Decoder, ids, positions, key_mask, kvs, index):
    """The decoder's layers (:meth:`Decoder.run_layers`: one ``lax.scan`` over stacked layers, or the
    unrolled loop) with the stacked KV cache ``kvs = (k, v)``, each ``[L, B, S, K, D]``, carried through the
    layers so that only the new slots ``[index, index + T)`` of each layer are written
    (``dynamic_update_slice``, in place inside the decode loop). Same maths as :meth:`Decoder.hidden_states`
    with a cache. Returns (final normed hidden ``[B, T, H]``, new kvs)."""
    cfg = model.config
    inv_freq = rope_inv_freq(cfg)
    x = jnp.take(model.embed[...], ids, axis=0, mode="clip").astype(model.dtype)
    x, kvs = model.run_layers(x, positions, inv_freq, key_mask, kvs, index)
    return rms_norm(x, model.final_norm[...], cfg.rms_norm_eps), kvs


def _sample_inverse_cdf(keys, logp):
    """One draw per row from ``exp(logp)`` ``[B, V]`` by inversion of the CDF: ``o = #{j : C_j ≤ u}`` with
    ``C = cumsum(p)``, ``u ~ U[0, C_V)`` — one uniform per row (from that row's key, ``keys`` ``[B]``) instead
    of ``V`` Gumbels. Two levels (blocks
    of ``⌈√V⌉`` tokens: pick the block from the block-mass CDF, then the token inside it) so no length-``V``
    cumulative sum is needed. Zero-probability tokens are never chosen (rounding at a block's upper edge
    falls back to its last positive token)."""
    b, v = logp.shape
    p = jnp.exp(logp)
    size = max(1, int(np.ceil(np.sqrt(v))))
    nb = -(-v // size)
    blocks = jnp.pad(p, ((0, 0), (0, nb * size - v))).reshape(b, nb, size)
    cb = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, nb]
    u = jax.vmap(lambda k: jax.random.uniform(k, (1,), cb.dtype))(keys) * cb[:, -1:]
    j = jnp.minimum(jnp.sum(cb <= u, axis=-1), nb - 1)
    below = jnp.where(j > 0, jnp.take_along_axis(cb, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, size]
    t = jnp.sum(jnp.cumsum(inner, axis=-1) <= (u[:, 0] - below)[:, None], axis=-1)
    last = size - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    return (j * size + jnp.minimum(t, last)).astype(jnp.int32)


def _row_keys(key, rows):
    """``[R]`` per-request keys: a request's tokens do not depend on which slot or batch row decodes it."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def _heads(model: Decoder, cfg: SamplingConfig):
    """``(head, draw)``: hidden ``[B, H]`` -> processed log-probs ``[B, V]`` (eq. 1), and
    ``draw(keys [B], logp) -> (token [B], its log-prob [B])`` (arg-max when greedy)."""
    proc = functools.partial(process_logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             min_p=cfg.min_p)
    w = model.lm_head_weight().astype(model.dtype)
    out_dt = jnp.promote_types(model.dtype, jnp.float32)

    def head(h):  # [B, H] -> [B, V], as Decoder.__call__ does for one position
        return proc(jnp.einsum("bh,vh->bv", h, w, preferred_element_type=out_dt))

    def draw(keys, logp):
        tok = jnp.argmax(logp, axis=-1).astype(jnp.int32) if cfg.greedy else _sample_inverse_cdf(keys, logp)
        return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0].astype(jnp.float32)

    return head, draw


def _decode(graphdef, cfg: SamplingConfig, params, prompt_ids, prompt_mask, key):
    """The reference engine (``share_prefix=False``): every completion is a batch row with its own copy of the
    prompt (prefilled ``G`` times), then ``lax.while_loop`` decode of the whole batch until every row stopped.
    Shapes in the module docstring; ``prompt_ids`` ``[B0, P]`` holds each prompt once."""
    model = nnx.merge(graphdef, params)
    mc = model.config
    g = cfg.num_generations
    prompt_ids, prompt_mask = jnp.repeat(prompt_ids, g, axis=0), jnp.repeat(prompt_mask.astype(bool), g, axis=0)
    b, p = prompt_ids.shape
    n = cfg.max_new_tokens
    s = cfg.max_length or p + n
    head, draw = _heads(model, cfg)
    stop = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    row_keys = _row_keys(key, jnp.arange(b))

    def sample(i, h):
        return draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, i), head(h))

    shape = (mc.num_layers, b, s, mc.num_kv_heads, mc.head_dim)
    kvs = (jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
    key_mask = jnp.zeros((b, s), bool).at[:, :p].set(prompt_mask)
    h, kvs = _layers_forward(model, prompt_ids, positions_from_mask(prompt_mask), key_mask, kvs,
                             jnp.zeros((), jnp.int32))
    n_real = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)  # position of the next token
    tok, lp = sample(0, h[:, -1])
    ids = jnp.full((b, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    mask = jnp.zeros((b, n), bool).at[:, 0].set(True)
    done = jnp.isin(tok, stop)
    alive = jnp.ones((b,), bool)  # whether the previous token is a real completion token

    def cond(state):
        i, _, _, done, *_ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, prev, alive, done, n_real, key_mask, kvs, ids, lps, mask, useful = state
        slot = p + i - 1  # cache slot of ``prev``
        key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, alive[:, None], slot, axis=1)
        hh, kvs = _layers_forward(model, prev[:, None], n_real[:, None], key_mask, kvs, slot)
        n_real = n_real + alive.astype(jnp.int32)
        tok, lp = sample(i, hh[:, 0])
        emit = ~done
        tok = jnp.where(emit, tok, cfg.pad_token_id)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, tok[:, None], i, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, jnp.where(emit, lp, 0.0)[:, None], i, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, emit[:, None], i, axis=1)
        done = done | (emit & jnp.isin(tok, stop))
        return i + 1, tok, emit, done, n_real, key_mask, kvs, ids, lps, mask, useful + jnp.sum(emit, dtype=jnp.int32)

    state = (jnp.asarray(1, jnp.int32), tok, alive, done, n_real, key_mask, kvs, ids, lps, mask,
             jnp.zeros((), jnp.int32))
    out = jax.lax.while_loop(cond, body, state)
    done, ids, lps, mask = out[3], out[7], out[8], out[9]
    stats = jnp.stack([out[0] - 1, out[10], (out[0] - 1) * b, jnp.asarray(b, jnp.int32)])
    return prompt_ids, prompt_mask, ids, mask, lps, ~done, stats


def _prefill_prompts(model: Decoder, cfg: SamplingConfig, prompt_ids, prompt_mask, key):
    """One prefill of the ``B0`` distinct prompts (``prompt_mask`` bool) and every request's first token:
    ``(prefix_k, prefix_v [L, B0, P, K, D], prompt lengths [B0], per-request keys [R], first tokens [R],
    their log-probs [R])`` with ``R = B0·G``; all samples of a prompt draw from the same logits."""
    mc, g = model.config, cfg.num_generations
    b0, p = prompt_ids.shape
    head, draw = _heads(model, cfg)
    shape = (mc.num_layers, b0, p, mc.num_kv_heads, mc.head_dim)
    kvs = (jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
    h, (pk, pv) = _layers_forward(model, prompt_ids, positions_from_mask(prompt_mask), prompt_mask, kvs,
                                  jnp.zeros((), jnp.int32))
    plen = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    row_keys = _row_keys(key, jnp.arange(b0 * g))
    tok0, lp0 = draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, 0), jnp.repeat(head(h[:, -1]), g, axis=0))
    return pk, pv, plen, row_keys, tok0, lp0


def _decode_slots(graphdef, cfg: SamplingConfig, params, prompt_ids, prompt_mask, key):
    """The shared-prefix engine: one prefill of the ``B0`` distinct prompts fills a
    :class:`~trlax.models.SlotCache`; then ``Sl`` decode slots stream through the ``R = B0·G`` requests
    (prompt, sample). Request ``r`` belongs to prompt ``r // G``; its first token comes from its prompt's
    prefill logits, token ``i`` from the key ``fold_in(fold_in(key, r), i)``, so the tokens do not depend on
    the slot count. With ``Sl = R`` (``decode_slots=None``) slot ``r`` decodes request ``r`` (a static batch
    whose prefix attention needs no gather); with ``Sl < R`` (continuous batching) a slot whose request
    stopped takes the next pending request at once: no prefill is needed, only the slot's prompt index and
    buffer length change. Returns the rollout arrays and ``[decode steps, useful slot-steps, Sl]``."""
    model = nnx.merge(graphdef, params)
    mc = model.config
    b0, p = prompt_ids.shape
    g, n = cfg.num_generations, cfg.max_new_tokens
    r_all = b0 * g
    sl = min(cfg.decode_slots or r_all, r_all)
    cont = sl < r_all
    head, draw = _heads(model, cfg)
    stop = jnp.asarray(cfg.stop_token_ids or (-1,), jnp.int32)
    prompt_mask = prompt_mask.astype(bool)
    req = jnp.arange(r_all)
    pk, pv, plen, row_keys, tok0, lp0 = _prefill_prompts(model, cfg, prompt_ids, prompt_mask, key)
    out_ids = jnp.full((r_all, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok0)
    out_lps = jnp.zeros((r_all, n), jnp.float32).at[:, 0].set(lp0)
    out_len = jnp.ones((r_all,), jnp.int32)
    stopped = jnp.isin(tok0, stop)
    needs = ~stopped & (n > 1)  # requests that decode past their first token
    if cont:
        queue = jnp.nonzero(needs, size=r_all, fill_value=r_all - 1)[0].astype(jnp.int32)
        n_queue = jnp.sum(needs, dtype=jnp.int32)
        slot_req = queue[:sl]
        active = jnp.arange(sl) < n_queue
        nxt = jnp.minimum(n_queue, sl)
    else:
        queue, n_queue, slot_req, active, nxt = None, jnp.zeros((), jnp.int32), req.astype(jnp.int32), needs, \
            jnp.zeros((), jnp.int32)
    buf = max(n - 1, 1)  # completion tokens 0 .. n-2 are fed back; the last one never is
    cshape = (mc.num_layers, sl, buf, mc.num_kv_heads, mc.head_dim)
    cache = SlotCache(prefix_k=pk, prefix_v=pv, prefix_mask=prompt_mask, prompt=slot_req // g,
                      k=jnp.zeros(cshape, model.dtype), v=jnp.zeros(cshape, model.dtype),
                      length=jnp.zeros((sl,), jnp.int32), layer=jnp.zeros((), jnp.int32), group=0 if cont else g)
    inv_freq = rope_inv_freq(mc)

    def body(state):
        steps, useful, slot_steps, slot_req, active, prev, slen, cache, nxt, out_ids, out_lps, out_len, stopped = state
        cache = dataclasses.replace(cache, length=slen - 1)  # ``prev`` is completion token slen - 1
        x = jnp.take(model.embed[...], prev[:, None], axis=0, mode="clip").astype(model.dtype)
        pos = (plen[cache.prompt] + slen - 1)[:, None]
        x, cache = model.run_layers(x, pos, inv_freq, None, cache, 0)
        hh = rms_norm(x[:, 0], model.final_norm[...], mc.rms_norm_eps)
        tok, lp = draw(jax.vmap(jax.random.fold_in)(row_keys[slot_req], slen), head(hh))
        at = jnp.where(active, slot_req, r_all)  # idle slots write nowhere
        out_ids = out_ids.at[at, slen].set(tok, mode="drop")
        out_lps = out_lps.at[at, slen].set(lp, mode="drop")
        slen = slen + active.astype(jnp.int32)
        out_len = out_len.at[at].set(slen, mode="drop")
        hit = active & jnp.isin(tok, stop)
        stopped = stopped.at[jnp.where(hit, slot_req, r_all)].set(True, mode="drop")
        useful = useful + jnp.sum(active, dtype=jnp.int32)
        slot_steps = slot_steps + active.shape[0]
        active = active & ~hit & (slen < n)
        prev = tok
        if cont:  # freed slots take the next pending requests, in order
            free = ~active
            cand = nxt + jnp.cumsum(free, dtype=jnp.int32) - 1
            take = free & (cand < n_queue)
            new = queue[jnp.clip(cand, 0, r_all - 1)]
            slot_req = jnp.where(take, new, slot_req)
            prev = jnp.where(take, tok0[new], prev)
            slen = jnp.where(take, 1, slen)
            active = active | take
            nxt = nxt + jnp.sum(take, dtype=jnp.int32)
            cache = dataclasses.replace(cache, prompt=slot_req // g)
        return steps + 1, useful, slot_steps, slot_req, active, prev, slen, cache, nxt, out_ids, out_lps, out_len, \
            stopped

    zero = jnp.zeros((), jnp.int32)
    state = (zero, zero, zero, slot_req, active, tok0[slot_req], jnp.ones((sl,), jnp.int32), cache, nxt, out_ids,
             out_lps, out_len, stopped)
    # Shrinking (continuous batching): once no request is pending and at most half the slots are busy, the busy
    # ones move into a batch half as wide (at most ``slot_halvings`` times), so the tail of long completions
    # does not drag idle slots.
    widths = [sl]
    while cont and len(widths) <= cfg.slot_halvings and widths[-1] >= 2:
        widths.append(widths[-1] // 2)
    for i, width in enumerate(widths):
        last = i == len(widths) - 1

        def cond(st, half=None if last else widths[i + 1]):
            busy = jnp.sum(st[4], dtype=jnp.int32)
            go = busy > 0
            return go if half is None else go & ((st[8] < n_queue) | (busy > half))

        state = jax.lax.while_loop(cond, body, state)
        if not last:  # keep the busy slots (all of them fit), busy first
            keep = jnp.argsort(~state[4], stable=True)[:widths[i + 1]]
            c = state[7]
            c = dataclasses.replace(c, k=c.k[:, keep], v=c.v[:, keep], prompt=c.prompt[keep], length=c.length[keep],
                                    group=0)
            state = state[:3] + tuple(x[keep] for x in state[3:7]) + (c,) + state[8:]
    steps, useful, slot_steps, out_ids, out_lps, out_len, stopped = (state[j] for j in (0, 1, 2, 9, 10, 11, 12))
    mask = jnp.arange(n)[None, :] < out_len[:, None]
    stats = jnp.stack([steps, useful, slot_steps, jnp.asarray(sl, jnp.int32)])
    return (jnp.repeat(prompt_ids, g, axis=0), jnp.repeat(prompt_mask, g, axis=0), out_ids, mask,
            jnp.where(mask, out_lps, 0.0), ~stopped, stats)


class JaxSampler(Sampler):
    """KV-cached sampler for a :class:`~trlax.models.Decoder` (one jitted prefill + decode loop).

    Args:
      model: a :class:`~trlax.models.Decoder` (its graph is kept; its weights are only the default
        ``params``) or the ``graphdef`` from ``nnx.split``.
      config: :class:`SamplingConfig` (or keyword overrides ``**overrides``).
      mesh: optional ``jax.sharding.Mesh`` the sampler runs on. Weights handed to :meth:`generate` are
        moved there with ``jax.device_put`` (a no-op when they already live there with that layout, a
        reshard when the trainer's mesh differs), prompts are split over the batch axes.
      rules: sharding rules table (:func:`trlax.models.sharding_rules`) for ``mesh`` (default ``"fsdp_tp"``).

    ``generate(params, prompts, key)`` samples ``num_generations`` completions per prompt and returns a
    :class:`Rollout`; the compiled function is cached per (prompt width, batch size).
    """

    def __init__(self, model: Union[Decoder, Any], config: Optional[SamplingConfig] = None, *, mesh=None,
                 rules=None, **overrides):
        if isinstance(model, nnx.Module):
            self.graphdef, self.default_params = nnx.split(model)
            self.model_config = model.config
        else:
            self.graphdef, self.default_params, self.model_config = model, None, None
        config = SamplingConfig() if config is None else config
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"`config` must be a SamplingConfig, got {type(config).__name__}")
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.mesh = mesh
        if mesh is not None and rules is None:
            from trlax.models.sharding import sharding_rules
            rules = sharding_rules("fsdp_tp")
        self.rules = rules
        self._shardings = None
        self._fns = {}
        self._stats = None

    def _fn(self, cfg: SamplingConfig):
        if cfg not in self._fns:
            engine = _decode_slots if cfg.share_prefix else _decode
            self._fns[cfg] = jax.jit(functools.partial(engine, self.graphdef, cfg))
        return self._fns[cfg]

    def _run(self, cfg: SamplingConfig, params, ids, mask, key, g: int) -> Rollout:
        cfg = dataclasses.replace(cfg, num_generations=g)
        p_ids, p_mask, c_ids, c_mask, lps, trunc, stats = self._fn(cfg)(params, ids, mask, key)
        self._stats = stats
        return Rollout(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                       logps=lps, truncated=trunc, group_ids=jnp.asarray(np.arange(c_ids.shape[0], dtype=np.int32) // g))

    @property
    def last_stats(self) -> Dict[str, float]:
        """Decode statistics of the last call (reading them waits for it): ``decode_steps`` (loop iterations
        after the prefill), ``slots`` (the initial width), ``slot_steps`` (slots x iterations, summed over the
        shrinking phases), ``useful_slot_steps`` (those that produced a completion token) and
        ``slot_utilization`` (their ratio; 1 = no slot ever idle)."""
        steps, useful, slot_steps, slots = (int(x) for x in np.asarray(self._stats))
        return {"decode_steps": steps, "slots": slots, "slot_steps": slot_steps, "useful_slot_steps": useful,
                "slot_utilization": useful / slot_steps if slot_steps else 1.0}

    def _place(self, params, ids, mask):
        from jax.sharding import NamedSharding, PartitionSpec

        from trlax.models.sharding import batch_spec, param_shardings
        if self._shardings is None:
            self._shardings = param_shardings(params, self.mesh, self.rules)
        params = jax.device_put(params, self._shardings)
        spec = batch_spec(self.rules, 2)
        axes = spec[0] if spec else None
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in self.mesh.shape)
        size = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
        pspec = PartitionSpec(axes if axes and ids.shape[0] % size == 0 else None, None)
        sh = NamedSharding(self.mesh, pspec)
        return params, jax.device_put(ids, sh), jax.device_put(mask, sh)

    def generate(self, params: Any, prompts: Any, key: jax.Array, *, num_generations: Optional[int] = None,
                 **overrides) -> Rollout:
        """Sample completions; see :class:`Sampler` and the module docstring.

        Args:
          params: the policy parameters (``nnx.State`` from ``nnx.split(model)``, or a ``Decoder``); ``None``
            uses the weights of the model the sampler was built from.
          prompts: ``(prompt_ids [B0, P], prompt_mask [B0, P])`` left-padded, a dict with those keys, a plain
            ``[B0, P]`` id array (all real), or a list of token-id lists (left-padded here).
          key: ``jax.random`` key; the same key gives the same rollout.
          num_generations: completions per prompt (default ``config.num_generations``); ``B = B0 · G``.
          **overrides: :class:`SamplingConfig` fields for this call (e.g. ``temperature=0``).

        Returns:
          a :class:`Rollout` with ``B`` rows.
        """
        cfg = dataclasses.replace(self.config, **overrides) if overrides else self.config
        g = cfg.num_generations if num_generations is None else num_generations
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise ValueError(f"num_generations={g!r} is out of range; allowed: integers >= 1")
        if params is None:
            params = self.default_params
            if params is None:
                raise ValueError("`params` is None and the sampler was built from a graphdef without weights")
        elif isinstance(params, nnx.Module):
            params = nnx.state(params)
        ids, mask = _as_prompt_arrays(prompts, cfg.pad_token_id)
        n_real = mask.sum(axis=1)
        if np.any(n_real == 0):
            raise ValueError(f"`prompt_mask` has rows without any real token: {np.flatnonzero(n_real == 0).tolist()}")
        if not np.all(mask[:, -1]):
            raise ValueError("prompts must be left-padded: `prompt_mask[:, -1]` must be True for every row")
        longest = int(n_real.max())
        width = ids.shape[1]
        if cfg.prompt_multiple is not None:
            width = -(-longest // cfg.prompt_multiple) * cfg.prompt_multiple
        if cfg.max_length is not None:
            if longest + cfg.max_new_tokens > cfg.max_length:
                raise ValueError(
                    f"prompt too long for the KV cache: the longest prompt has {longest} tokens and "
                    f"max_new_tokens={cfg.max_new_tokens}, but max_length={cfg.max_length} cache slots "
                    f"(need >= {longest + cfg.max_new_tokens}); shorten the prompt or raise max_length")
            width = min(width, cfg.max_length - cfg.max_new_tokens)  # drops all-padding columns only
        if width <= ids.shape[1]:  # drop all-padding leading columns
            ids, mask = ids[:, ids.shape[1] - width:], mask[:, mask.shape[1] - width:]
        else:
            extra = width - ids.shape[1]
            ids = np.concatenate([np.full((ids.shape[0], extra), cfg.pad_token_id, ids.dtype), ids], axis=1)
            mask = np.concatenate([np.zeros((mask.shape[0], extra), bool), mask], axis=1)
        if self.model_config is not None:
            vocab = self.model_config.vocab_size
            if np.any((ids < 0) | (ids >= vocab)):
                raise ValueError(f"`prompt_ids` contains ids outside [0, vocab_size={vocab})")
        ids = np.asarray(ids, np.int32)
        if self.mesh is not None:
            params, ids_d, mask_d = self._place(params, ids, mask)
        else:
            ids_d, mask_d = jnp.asarray(ids), jnp.asarray(mask)
        return self._run(cfg, params, ids_d, mask_d, key, g)

    def generate_global(self, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array, *,
                        num_generations: Optional[int] = None, **overrides) -> Rollout:
        """:meth:`generate` for prompts that are already device arrays, e.g. global arrays of a multi-host
        run whose processes each built their rows with ``jax.make_array_from_process_local_data``: one row
        per prompt (``[B0, P]``, the sampler makes ``num_generations`` completions of each), left-padded to the
        final width, ``int32`` ids and ``bool`` mask sharded over the batch axes. No host-side checks or
        re-padding; the same jitted program as :meth:`generate`, so the same key and rows give the same
        tokens. The rollout's arrays stay on the devices (global)."""
        cfg = dataclasses.replace(self.config, **overrides) if overrides else self.config
        g = cfg.num_generations if num_generations is None else num_generations
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        if self.mesh is not None:
            from trlax.models.sharding import param_shardings
            if self._shardings is None:
                self._shardings = param_shardings(params, self.mesh, self.rules)
            params = jax.device_put(params, self._shardings)
        return self._run(cfg, params, prompt_ids, prompt_mask, key, g)


def make_two_model_sampler(graphdef_a, graphdef_b, max_new_tokens: int, mix, *, eos_id: int, pad_id: int):
    """Jitted token-by-token sampling from a mixture of two models (Nash-MD's geometric mixture, MiniLLM's
    teacher-mixed sampling): ``(params_a, params_b, prompt_ids [B, P], prompt_mask [B, P], key) -> (ids
    [B, C], mask [B, C], truncated [B], weights [B, C])``.

    ``mix(z_a, z_b) -> (logp_sample, logp_target)`` maps the two models' next-token logits ``[B, V]`` to the
    log-probs sampled from and a target distribution; ``weights[b, t] = p_target(y_t) / p_sample(y_t)`` is
    the importance weight of each sampled token (0 after EOS). A completion stops at ``eos_id``; later
    positions hold ``pad_id`` and are masked. Each token is one full forward of both models (no KV cache:
    meant for short completions)."""
    C = max_new_tokens

    def generate(params_a, params_b, p_ids, p_mask, key):
        model_a, model_b = nnx.merge(graphdef_a, params_a), nnx.merge(graphdef_b, params_b)
        b, P = p_ids.shape
        ids = jnp.concatenate([p_ids, jnp.full((b, C), pad_id, p_ids.dtype)], axis=1)
        mask = jnp.concatenate([p_mask.astype(bool), jnp.zeros((b, C), bool)], axis=1)

        def body(t, carry):
            ids, mask, w, done = carry
            pos = P + t - 1  # the state at pos predicts token P + t
            z_a, z_b = (jax.lax.dynamic_index_in_dim(m(ids, attention_mask=mask), pos, axis=1, keepdims=False)
                        for m in (model_a, model_b))
            logp, target = mix(z_a, z_b)
            tok = jax.random.categorical(jax.random.fold_in(key, t), logp, axis=-1).astype(ids.dtype)
            ratio = jnp.exp(jnp.take_along_axis(target - logp, tok[:, None].astype(jnp.int32), axis=-1)[:, 0])
            emit = ~done
            tok = jnp.where(emit, tok, pad_id)
            ids = jax.lax.dynamic_update_slice_in_dim(ids, tok[:, None], P + t, axis=1)
            mask = jax.lax.dynamic_update_slice_in_dim(mask, emit[:, None], P + t, axis=1)
            w = w.at[:, t].set(jnp.where(emit, ratio, 0.0))
            return ids, mask, w, done | (emit & (tok == eos_id))

        init = (ids, mask, jnp.zeros((b, C), jnp.float32), jnp.zeros((b,), bool))
        ids, mask, w, done = jax.lax.fori_loop(0, C, body, init)
        return ids[:, P:], mask[:, P:], ~done, w

    return jax.jit(generate)
