"""SFT sequence packing: many short token sequences into a few fixed-width rows, with segment ids so that
packed sequences never attend to each other (:meth:`trlax.models.Decoder.hidden_states` ``segment_ids=``).

Strategies (names and semantics of TRL 1.16's ``pack_dataset``; the algorithms are written here from their
textbook definitions):

- ``"bfd"`` — best-fit decreasing bin packing (Johnson 1973; the packing use of Krell et al. 2021,
  arXiv 2107.02027, sec. 3): sequences longer than ``max_length`` are **truncated** to their first
  ``max_length`` tokens, empty sequences dropped, the rest sorted by length (descending, ties in input
  order) and each put into the open row with the least room that still fits it (ties: the row that has had
  that room longest), or
  a new row. Rows are returned in the order they were opened.
- ``"bfd_split"`` — as ``"bfd"`` but a long sequence is **split** into consecutive chunks of
  ``max_length`` tokens (the last one shorter), each chunk packed as a sequence of its own; no token is lost.
- ``"wrapped"`` — T5-style wrapping (Raffel et al. 2020, arXiv 1910.10683, sec. 3.1.2 "packing"): all
  sequences concatenated in input order and cut into rows of ``max_length`` tokens (the last row padded);
  a sequence may run over a row boundary. By default every piece of a sequence in a row is its own segment
  (``separate_segments=True``); ``separate_segments=False`` makes each row a single segment (TRL's
  ``"wrapped"``, where attention crosses sequence boundaries).

Every segment's positions restart at 0 (as TRL's padding-free ``position_ids``). ``loss_mask[n, t]`` is True
where token ``t`` is a prediction target: a real token whose predecessor is in the same segment (so the first
token of each segment — and of each row — is never a target) and which the caller's per-sequence mask (e.g.
completion-only loss) allows. :func:`packed_logps` returns ``log π(x_t | x_<t of its segment)`` there.

Shapes: ``N`` packed rows, ``L = max_length``.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives.logprobs import fused_logps_and_entropy

__all__ = ["PACKING_STRATEGIES", "PackedBatch", "pack_sequences", "best_fit_decreasing", "packed_logps"]

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Packed rows (NumPy, host side; a pytree, so it can be passed to a jitted step). All arrays ``[N, L]``.

    Attributes:
      input_ids: int32 token ids (``pad_id`` at padding).
      segment_ids: int32, ``1, 2, ...`` per segment within a row, 0 at padding.
      positions: int32, position of the token within its segment (restarts at 0), 0 at padding.
      loss_mask: bool, token is a prediction target (see the module docstring).
      example_ids: int32, index of the input sequence the token comes from, -1 at padding.
      token_index: int32, index of the token within that input sequence, -1 at padding.
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    example_ids: np.ndarray
    token_index: np.ndarray

    @property
    def attention_mask(self) -> np.ndarray:
        """``[N, L]`` bool, real (non-padding) tokens."""
        return self.segment_ids > 0


def best_fit_decreasing(lengths: Sequence[int], capacity: int):
    """Best-fit decreasing bin packing (Johnson 1973; arXiv 2107.02027, sec. 3).

    Items are taken longest first (ties in input order); each goes into the open bin with the least free
    room that still holds it (ties: the bin that has had that room longest, as TRL), else into a new bin. ``O(n log n)`` plus list
    insertion.

    Args:
      lengths: ``[n]`` item sizes, each in ``[1, capacity]``.
      capacity: bin size ``>= 1``.

    Returns:
      list of bins (in opening order), each a list of item indices in insertion order.
    """
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity={capacity!r} is out of range; allowed: integers >= 1")
    lengths = [int(x) for x in lengths]
    for i, x in enumerate(lengths):
        if not 1 <= x <= capacity:
            raise ValueError(f"lengths[{i}]={x} is out of range; allowed: 1 <= length <= capacity={capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    bins, free = [], []  # free: sorted (room, stamp, bin index) of bins with room > 0
    for stamp, i in enumerate(order):
        x = lengths[i]
        j = bisect.bisect_left(free, (x, -1, -1))
        if j < len(free):
            room, _, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - x > 0:
            bisect.insort(free, (room - x, stamp, b))
    return bins


def _as_sequences(sequences, name):
    out = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim != 1:
            raise ValueError(f"`{name}[{i}]` must be a 1-D sequence, got shape {a.shape}")
        out.append(a)
    return out


def pack_sequences(sequences: Sequence[Sequence[int]], max_length: int, strategy: str = "bfd", *,
                   loss_masks: Optional[Sequence[Sequence[bool]]] = None, pad_id: int = 0,
                   separate_segments: bool = True, num_rows: Optional[int] = None) -> PackedBatch:
    """Pack token sequences into ``[N, max_length]`` rows (module docstring: strategies and masks).

    Args:
      sequences: ``n`` 1-D int sequences (lists or arrays) of token ids.
      max_length: row width ``L >= 1``.
      strategy: one of :data:`PACKING_STRATEGIES` (``"bfd"`` truncates sequences longer than ``L``,
        ``"bfd_split"`` splits them, ``"wrapped"`` concatenates and cuts).
      loss_masks: optional ``n`` bool sequences, same lengths as ``sequences``: which tokens may be targets
        (e.g. completion tokens only). Default: all.
      pad_id: token id written at padding.
      separate_segments: ``"wrapped"`` only: False makes each row one segment (TRL's ``"wrapped"``).
      num_rows: pad the output with empty rows up to this many (a fixed batch shape for ``jit``); fewer
        rows than needed is an error.

    Returns:
      a :class:`PackedBatch` with ``N`` rows (``N = 0`` when every sequence is empty and no ``num_rows``).
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed; allowed values: {PACKING_STRATEGIES}")
    if isinstance(max_length, bool) or int(max_length) != max_length or max_length < 1:
        raise ValueError(f"max_length={max_length!r} is out of range; allowed: integers >= 1")
    L = int(max_length)
    seqs = _as_sequences(sequences, "sequences")
    for i, s in enumerate(seqs):
        if s.size and not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"`sequences[{i}]` must hold integer token ids, got {s.dtype}")
    if loss_masks is None:
        masks = [np.ones(len(s), bool) for s in seqs]
    else:
        masks = [m.astype(bool) for m in _as_sequences(loss_masks, "loss_masks")]
        if len(masks) != len(seqs):
            raise ValueError(f"`loss_masks` must have one entry per sequence ({len(seqs)}), got {len(masks)}")
        for i, (s, m) in enumerate(zip(seqs, masks)):
            if len(m) != len(s):
                raise ValueError(f"`loss_masks[{i}]` has length {len(m)}, `sequences[{i}]` has {len(s)}")

    # pieces: (example index, start, stop); rows: list of lists of piece indices
    if strategy == "wrapped":
        pieces, rows, fill = [], [[]], 0
        for e, s in enumerate(seqs):
            start = 0
            while start < len(s):
                if fill == L:
                    rows.append([])
                    fill = 0
                take = min(L - fill, len(s) - start)
                rows[-1].append(len(pieces))
                pieces.append((e, start, start + take))
                start, fill = start + take, fill + take
        if not pieces:
            rows = []
    else:
        pieces = []
        for e, s in enumerate(seqs):
            n = len(s) if strategy == "bfd_split" else min(len(s), L)
            pieces += [(e, a, min(a + L, n)) for a in range(0, n, L)]
        rows = best_fit_decreasing([b - a for _, a, b in pieces], L)

    n_rows = len(rows)
    if num_rows is not None:
        if int(num_rows) < n_rows:
            raise ValueError(f"num_rows={num_rows} is too small: the packing needs {n_rows} rows")
        n_rows = int(num_rows)
    ids = np.full((n_rows, L), pad_id, np.int32)
    seg = np.zeros((n_rows, L), np.int32)
    pos = np.zeros((n_rows, L), np.int32)
    lm = np.zeros((n_rows, L), bool)
    ex = np.full((n_rows, L), -1, np.int32)
    ti = np.full((n_rows, L), -1, np.int32)
    for r, row in enumerate(rows):
        col = 0
        for k, p in enumerate(row):
            e, a, b = pieces[p]
            w = b - a
            sl = slice(col, col + w)
            ids[r, sl] = seqs[e][a:b]
            seg[r, sl] = k + 1 if (strategy != "wrapped" or separate_segments) else 1
            ex[r, sl] = e
            ti[r, sl] = np.arange(a, b)
            col += w
        # positions restart and the first token is no target wherever the segment id changes
        real = seg[r] > 0
        start = real & np.concatenate([[True], seg[r, 1:] != seg[r, :-1]])
        first = np.maximum.accumulate(np.where(start, np.arange(L), 0))
        pos[r] = np.where(real, np.arange(L) - first, 0)
        m = np.zeros(L, bool)
        m[real] = np.concatenate([masks[e][a:b] for e, a, b in (pieces[p] for p in row)])
        lm[r] = real & ~start & m
    return PackedBatch(input_ids=ids, segment_ids=seg, positions=pos, loss_mask=lm, example_ids=ex,
                       token_index=ti)


def packed_logps(model, batch: PackedBatch, temperature: float = 1.0, chunk_size: int = 1024):
    """Per-token log-probs ``log π_θ(x_t | x_<t in its segment)`` and entropies of a packed batch (the terms
    of the SFT negative log-likelihood), with segment-aware attention so no token sees another packed
    sequence (arXiv 2107.02027, sec. 3), through the fused chunked LM head (no ``[N, L, V]`` logits).

    Args:
      model: a :class:`~trlax.models.Decoder` (or :class:`~trlax.models.lora.LoraDecoder`), or a ``(graphdef,
        state)`` pair from ``nnx.split``.
      batch: a :class:`PackedBatch` (or any object with ``input_ids``, ``segment_ids``, ``positions``,
        ``loss_mask`` ``[N, L]`` arrays, e.g. its fields as jnp arrays inside a jitted step).
      temperature: logits divided by it.
      chunk_size: tokens per chunk of the fused kernel.

    Returns:
      ``(logps, entropy)``, each ``[N, L]`` float32 (float64 for a float64 model), aligned with the target
      token ``t`` and 0 where ``loss_mask`` is False (in particular column 0).
    """
    if isinstance(model, tuple):
        from flax import nnx

        model = nnx.merge(*model)
    ids, seg = jnp.asarray(batch.input_ids), jnp.asarray(batch.segment_ids)
    pos, lm = jnp.asarray(batch.positions), jnp.asarray(batch.loss_mask).astype(bool)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"`batch.input_ids` must be [N, L] with L >= 2, got {tuple(ids.shape)}")
    for name, a in (("segment_ids", seg), ("positions", pos), ("loss_mask", lm)):
        if a.shape != ids.shape:
            raise ValueError(f"`batch.{name}` must have shape {tuple(ids.shape)}, got {tuple(a.shape)}")
    hidden = model.hidden_states(ids, segment_ids=seg, positions=pos)
    tmask = lm[:, 1:]
    logps, ent = fused_logps_and_entropy(hidden[:, :-1], model.lm_head_weight().astype(model.dtype),
                                         jnp.where(tmask, ids[:, 1:], 0),
                                         temperature, chunk_size=chunk_size)
    zero = jnp.zeros((ids.shape[0], 1), logps.dtype)
    logps = jnp.concatenate([zero, jnp.where(tmask, logps, 0.0)], axis=1)
    ent = jnp.concatenate([zero, jnp.where(tmask, ent, 0.0)], axis=1)
    return logps, ent
