"""SFT packing: token accounting per strategy, row layout (segments, positions, loss mask), parity with TRL's
``pack_dataset`` row contents, BFD tightness, and the key property: per-token log-probs of a packed batch
through the decoder with segment-aware attention equal those of every sequence run alone (float64 1e-10,
float32 1e-5), while plain attention over the same rows does not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from trlax.models import Decoder, DecoderConfig, positions_from_segments
from trlax.models.packing import PACKING_STRATEGIES, best_fit_decreasing, pack_sequences, packed_logps

V = 64


def _seqs(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, V, size=n) for n in lengths]


def _runs(seg_row):
    """(segment id, start, stop) of every run of equal non-zero ids in a row (numpy, independent)."""
    out, t = [], 0
    while t < len(seg_row):
        if seg_row[t] == 0:
            t += 1
            continue
        s = t
        while t < len(seg_row) and seg_row[t] == seg_row[s]:
            t += 1
        out.append((seg_row[s], s, t))
    return out


# ------------------------------------------------------------------------------------- layout invariants

lengths_st = st.lists(st.integers(0, 13), min_size=0, max_size=12)


@given(lengths=lengths_st, L=st.sampled_from([1, 4, 8]), strategy=st.sampled_from(PACKING_STRATEGIES),
       seed=st.integers(0, 3))
def test_every_token_once_and_layout(lengths, L, strategy, seed):
    seqs = _seqs(lengths, seed)
    rng = np.random.RandomState(seed + 10)
    masks = [rng.rand(n) < 0.7 for n in lengths]
    b = pack_sequences(seqs, L, strategy, loss_masks=masks, pad_id=-7)
    n_rows = b.input_ids.shape[0]
    assert b.input_ids.shape == (n_rows, L)
    for a in (b.segment_ids, b.positions, b.loss_mask, b.example_ids, b.token_index):
        assert a.shape == (n_rows, L)
    real = b.segment_ids > 0
    # what must appear: everything (split / wrapped) or each sequence's first L tokens (bfd truncation)
    expected = {(e, i) for e, n in enumerate(lengths) for i in range(n if strategy != "bfd" else min(n, L))}
    got = list(zip(b.example_ids[real].tolist(), b.token_index[real].tolist()))
    assert len(got) == len(set(got)) and set(got) == expected
    # tokens are the source tokens, padding is padding
    for (e, i), tok in zip(got, b.input_ids[real].tolist()):
        assert tok == seqs[e][i]
    assert np.all(b.input_ids[~real] == -7) and np.all(b.example_ids[~real] == -1)
    assert not np.any(b.loss_mask[~real]) and np.all(b.positions[~real] == 0)
    total = len(expected)
    if strategy != "wrapped":
        assert n_rows >= -(-total // L)
    for r in range(n_rows):
        row_real = real[r]
        # padding only at the end of a row
        k = int(row_real.sum())
        assert row_real[:k].all() and not row_real[k:].any()
        for seg, s, t in _runs(b.segment_ids[r]):
            ex = b.example_ids[r, s:t]
            ti = b.token_index[r, s:t]
            assert np.all(ex == ex[0]), "a segment holds tokens of one sequence"
            np.testing.assert_array_equal(ti, np.arange(ti[0], ti[0] + (t - s)))  # contiguous, in order
            np.testing.assert_array_equal(b.positions[r, s:t], np.arange(t - s))
            want = np.array([masks[ex[0]][i] for i in ti]) & (np.arange(t - s) > 0)
            np.testing.assert_array_equal(b.loss_mask[r, s:t], want)
            if strategy == "bfd":
                assert ti[0] == 0, "bfd keeps the head of a sequence"
        ids = [sg for sg, _, _ in _runs(b.segment_ids[r])]
        assert ids == list(range(1, len(ids) + 1)), "segments numbered 1, 2, ... within a row"
    if strategy == "wrapped" and n_rows:
        assert real[:-1].all(), "wrapped rows are full except the last"


def test_wrapped_single_segment_rows_and_num_rows():
    b = pack_sequences([[1, 2, 3], [4, 5, 6, 7, 8]], 3, "wrapped", separate_segments=False, num_rows=4)
    np.testing.assert_array_equal(b.input_ids, [[1, 2, 3], [4, 5, 6], [7, 8, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b.positions, [[0, 1, 2], [0, 1, 2], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b.loss_mask, [[0, 1, 1], [0, 1, 1], [0, 1, 0], [0, 0, 0]])
    b = pack_sequences([[1, 2, 3], [4, 5, 6, 7, 8]], 3, "wrapped")
    np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1], [1, 1, 1], [1, 1, 0]])


def test_bfd_hand_example():
    # lengths 3, 7->4 (truncated), 1, 0 (dropped), 2 into rows of 4
    b = pack_sequences([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [], [12, 13]], 4, "bfd")
    np.testing.assert_array_equal(b.input_ids, [[4, 5, 6, 7], [1, 2, 3, 11], [12, 13, 0, 0]])
    np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 0, 0]])
    b = pack_sequences([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [], [12, 13]], 4, "bfd_split")
    np.testing.assert_array_equal(b.input_ids, [[4, 5, 6, 7], [1, 2, 3, 11], [8, 9, 10, 0], [12, 13, 0, 0]])


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy='ffd'.*allowed values"):
        pack_sequences([[1]], 4, "ffd")
    with pytest.raises(ValueError, match="max_length=0"):
        pack_sequences([[1]], 0)
    with pytest.raises(ValueError, match="loss_masks\\[0\\]"):
        pack_sequences([[1, 2]], 4, loss_masks=[[True]])
    with pytest.raises(ValueError, match="num_rows=1 is too small"):
        pack_sequences([[1, 2, 3], [4, 5]], 4, num_rows=1)
    with pytest.raises(ValueError, match="sequences\\[0\\]"):
        pack_sequences([[[1, 2]]], 4)
    with pytest.raises(ValueError, match="lengths\\[1\\]=5"):
        best_fit_decreasing([1, 5], 4)


# ------------------------------------------------------------------------------------- BFD quality / TRL


def _first_fit(lengths, capacity):
    rooms = []
    for x in lengths:
        for j, r in enumerate(rooms):
            if r >= x:
                rooms[j] -= x
                break
        else:
            rooms.append(capacity - x)
    return len(rooms)


@pytest.mark.parametrize("seed", range(6))
def test_bfd_at_least_as_tight_as_first_fit(seed):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, 33, size=60).tolist()
    bins = best_fit_decreasing(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(60))
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    assert -(-sum(lengths) // 32) <= len(bins) <= _first_fit(lengths, 32)


def test_bfd_strictly_beats_first_fit_on_adversarial_order():
    lengths = [1, 1, 1, 1, 4, 4, 4, 4]  # first-fit in order: [1,1,1,1], then one 4 per row -> 5 rows
    assert _first_fit(lengths, 5) == 5
    assert len(best_fit_decreasing(lengths, 5)) == 4


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_rows_match_trl_pack_dataset(strategy):
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import pack_dataset

    lengths = [5, 9, 1, 0, 3, 8, 2, 2, 7, 4, 6, 1, 11]
    seqs = _seqs(lengths, 3)
    ds = datasets.Dataset.from_dict({"input_ids": [s.tolist() for s in seqs]})
    trl_rows = pack_dataset(ds, seq_length=8, strategy=strategy)
    b = pack_sequences(seqs, 8, strategy, separate_segments=False)
    assert b.input_ids.shape[0] == len(trl_rows)
    for r, row in enumerate(trl_rows):
        n = len(row["input_ids"])
        assert b.input_ids[r, :n].tolist() == row["input_ids"] and not (b.segment_ids[r, n:] > 0).any()
        if strategy != "wrapped":
            assert [t - s for _, s, t in _runs(b.segment_ids[r])] == row["seq_lengths"]


# ------------------------------------------------------------------------------------- decoder with segments

CFG = DecoderConfig(model_type="qwen3", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, rope_theta=100.0)


@pytest.fixture(scope="module")
def models():
    return {dt: Decoder(CFG, rngs=nnx.Rngs(0), param_dtype=dt) for dt in ("float32", "float64")}


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _alone_logps(model, segs, width=12, rows=16):
    """log p(x_t | x_<t) of each sequence in ``segs`` run alone: a plain causal forward of a right-padded
    ``[rows, width]`` batch (one sequence per row, no segment ids), full logits, NumPy log-softmax."""
    ids, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), bool)
    for i, x in enumerate(segs):
        ids[i, :len(x)], mask[i, :len(x)] = x, True
    logp = _log_softmax(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    return [logp[i, np.arange(len(x) - 1), np.asarray(x)[1:]] for i, x in enumerate(segs)]


LENGTHS = [5, 11, 2, 7, 1, 4, 9, 3, 14]


@pytest.mark.parametrize("strategy", PACKING_STRATEGIES)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_packed_logps_equal_unpacked(models, strategy, dtype, tol):
    model = models[dtype]
    b = pack_sequences(_seqs(LENGTHS, 5), 12, strategy, num_rows=7)
    logps, ent = packed_logps(model, b, chunk_size=16)
    logps = np.asarray(logps)
    assert logps.shape == b.input_ids.shape and np.isfinite(np.asarray(ent)).all()
    assert np.all(logps[~b.loss_mask] == 0)
    where = [(r, s, t) for r in range(b.input_ids.shape[0]) for _, s, t in _runs(b.segment_ids[r])]
    alone = _alone_logps(model, [b.input_ids[r, s:t] for r, s, t in where])
    for (r, s, t), ref in zip(where, alone):
        np.testing.assert_allclose(logps[r, s + 1:t], ref, atol=tol, rtol=0)
    assert sum(t - s - 1 for _, s, t in where) == int(b.loss_mask.sum()) > 30


def test_packed_logps_jit_functional_form(models):
    """``packed_logps((graphdef, state), batch)`` under ``jax.jit`` (the batch is a pytree) == eager."""
    model = models["float32"]
    b = pack_sequences(_seqs(LENGTHS, 6), 12, "bfd_split", num_rows=7)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda st, batch: packed_logps((graphdef, st), batch, chunk_size=16)[0])
    np.testing.assert_allclose(np.asarray(jitted(state, b)), np.asarray(packed_logps(model, b, chunk_size=16)[0]),
                               atol=1e-5, rtol=0)


def test_plain_attention_over_packed_rows_differs(models):
    """The same rows without segment ids leak context across sequences: the comparison above can fail."""
    model = models["float64"]
    b = pack_sequences(_seqs(LENGTHS, 5), 12, "bfd", num_rows=7)
    logits = np.asarray(model(jnp.asarray(b.input_ids), attention_mask=jnp.asarray(b.attention_mask)))
    r, s, t = next((r, s, t) for r in range(len(b.input_ids)) for k, (_, s, t) in enumerate(_runs(b.segment_ids[r]))
                   if k > 0 and t - s > 1)
    leaky = _log_softmax(logits[r])[np.arange(s, t - 1), b.input_ids[r, s + 1:t]]
    assert np.max(np.abs(leaky - _alone_logps(model, [b.input_ids[r, s:t]])[0])) > 1e-4


def test_segment_ids_defaults_and_errors(models):
    model = models["float64"]
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    np.testing.assert_array_equal(positions_from_segments(jnp.asarray(seg)), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]])
    ids = jnp.asarray(np.random.RandomState(0).randint(0, V, (2, 6)))
    a = model(ids, segment_ids=jnp.asarray(seg))
    bb = model(ids, segment_ids=jnp.asarray(seg), positions=positions_from_segments(jnp.asarray(seg)),
               attention_mask=jnp.asarray(seg > 0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(bb))
    assert np.isfinite(np.asarray(a)).all()
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=jnp.asarray(seg[:, :5]))
    with pytest.raises(ValueError, match="segment_ids.*cache"):
        model(ids, segment_ids=jnp.asarray(seg), cache=model.init_cache(2, 8))
