"""JaxSampler engines: the shared-prefix engine (one prefill per distinct prompt) and continuous batching
(``decode_slots``) give the reference engine's rollout (every prompt copied G times) token for token, for the
same key — greedy and sampled, with stop tokens, ``max_new_tokens`` truncation and sampler log-probs — and
the output does not depend on the slot count. The scheduler's statistics are checked against the lengths.

One tiny float64 Decoder with peaked next-token distributions (as in test_sampler.py); a handful of fixed
configs, so a few compilations only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from trlax.models import Decoder, DecoderConfig
from trlax.rollouts import JaxSampler, SamplingConfig

V = 48
CFG = DecoderConfig(model_type="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 29, 11], [40, 2], [7, 7, 31, 8], [9]]  # ragged -> left-padded; a one-token prompt
STOP = tuple(range(10, 22))  # a quarter of the vocabulary: completions stop at ragged lengths
G, N = 4, 9
SLOTS = (1, 5)  # fewer slots than requests (16): continuous batching


@pytest.fixture(scope="module")
def model():
    m = Decoder(CFG, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    gd, st = nnx.split(m)
    return nnx.merge(gd, jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x, st))  # peaked logits


def _rollouts(model, temperature, n, slots):
    base = SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=0, top_p=1.0, stop_token_ids=STOP,
                          num_generations=G, pad_token_id=0)
    out = {}
    for name, kw in [("reference", dict(share_prefix=False)), ("shared", {})] + \
            [(f"slots{k}", dict(decode_slots=k)) for k in slots]:
        s = JaxSampler(model, dataclasses.replace(base, **kw))
        out[name] = (s.generate(None, PROMPTS, jax.random.key(7)), s.last_stats)
    return out


@pytest.fixture(scope="module", params=[(1.0, N, SLOTS), (0.0, N - 1, SLOTS[1:])], ids=["sampled", "greedy"])
def rollouts(model, request):
    return _rollouts(model, *request.param)


def test_engines_equal_reference_token_for_token(rollouts):
    ref, _ = rollouts["reference"]
    lengths = np.asarray(ref.lengths)
    assert len(set(lengths.tolist())) >= 3, lengths  # ragged stops ...
    assert np.asarray(ref.truncated).any() and not np.asarray(ref.truncated).all()  # ... and some truncations
    for name, (r, _) in rollouts.items():
        for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "group_ids"):
            np.testing.assert_array_equal(np.asarray(r[field]), np.asarray(ref[field]), err_msg=f"{name}.{field}")
        np.testing.assert_allclose(np.asarray(r.logps), np.asarray(ref.logps), rtol=1e-12, atol=1e-12,
                                   err_msg=name)


def test_rollout_layout_stop_and_padding(rollouts):
    r, _ = rollouts["slots5"]
    ids, mask, lps = (np.asarray(x) for x in (r.completion_ids, r.completion_mask, r.logps))
    trunc = np.asarray(r.truncated)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert (ids[b, n:] == 0).all() and (lps[b, n:] == 0).all() and (lps[b, :n] <= 0).all()
        stops = np.isin(ids[b, :n], STOP)
        assert stops.sum() == (0 if trunc[b] else 1) and (trunc[b] or stops[-1])  # the stop token ends it
        assert (n == ids.shape[1]) if trunc[b] else (n <= ids.shape[1])
    np.testing.assert_array_equal(np.asarray(r.group_ids), np.arange(len(PROMPTS) * G) // G)


def simulate_scheduler(lengths, slots, halvings):
    """The slot scheduler replayed in plain Python from the completion lengths: requests that decode past
    their first token queue in order; each step every busy slot produces one token; a finished request's
    slot takes the next queued one; with nothing queued and at most half the width busy, the width halves
    (at most ``halvings`` times). Returns (decode steps, slot-steps)."""
    left = {r: int(n) - 1 for r, n in enumerate(lengths) if n > 1}
    queue = list(left)
    widths = [slots]
    while len(widths) <= halvings and widths[-1] >= 2:
        widths.append(widths[-1] // 2)
    phase, busy, nxt, steps, slot_steps = 0, queue[:slots], min(slots, len(queue)), 0, 0
    while busy:
        while phase < len(widths) - 1 and nxt >= len(queue) and len(busy) <= widths[phase + 1]:
            phase += 1
        steps, slot_steps = steps + 1, slot_steps + widths[phase]
        for r in busy:
            left[r] -= 1
        busy = [r for r in busy if left[r] > 0]
        while len(busy) < widths[phase] and nxt < len(queue):
            busy, nxt = busy + [queue[nxt]], nxt + 1
    return steps, slot_steps


def test_scheduler_statistics(rollouts):
    """Every decode slot-step that produces a token is counted once: Σ(len − 1) useful slot-steps in every
    engine (the first token comes from the prefill). The decode steps and slot-steps equal a plain-Python
    replay of the scheduler from the lengths: the reference and the static batch run max(len) − 1 steps at
    full width; continuous batching refills slots in order and halves its width in the tail (2 halvings by
    default); one slot never idles."""
    ref, _ = rollouts["reference"]
    lengths = np.asarray(ref.lengths)
    useful = int((lengths - 1).sum())
    r_all = len(PROMPTS) * G
    for name, (_, st) in rollouts.items():
        assert st["useful_slot_steps"] == useful, name
        assert st["slot_utilization"] == pytest.approx(useful / st["slot_steps"])
        k = int(name[5:]) if name.startswith("slots") else r_all
        assert st["slots"] == k, name
        expect = simulate_scheduler(lengths, k, 2 if name.startswith("slots") else 0)
        assert (st["decode_steps"], st["slot_steps"]) == expect, (name, expect)
    assert rollouts["reference"][1]["decode_steps"] == lengths.max() - 1
    if "slots1" in rollouts:
        assert rollouts["slots1"][1]["decode_steps"] == useful and rollouts["slots1"][1]["slot_utilization"] == 1.0


def test_one_new_token_and_all_stop_at_first(model):
    """Edge cases: ``max_new_tokens=1`` (no decode step) and a stop set that ends every completion at its first
    token (nothing to schedule)."""
    for extra in (dict(max_new_tokens=1), dict(stop_token_ids=tuple(range(V)))):
        base = SamplingConfig(**{**dict(max_new_tokens=N, stop_token_ids=STOP, num_generations=2), **extra})
        outs = [JaxSampler(model, dataclasses.replace(base, **kw)).generate(None, PROMPTS, jax.random.key(1))
                for kw in (dict(share_prefix=False), dict(decode_slots=3))]
        for r in outs:
            np.testing.assert_array_equal(np.asarray(r.completion_ids), np.asarray(outs[0].completion_ids))
            np.testing.assert_array_equal(np.asarray(r.lengths), 1)
            np.testing.assert_array_equal(np.asarray(r.truncated), "max_new_tokens" in extra
                                          and ~np.isin(np.asarray(r.completion_ids[:, 0]), STOP))


def test_engine_config_errors():
    assert SamplingConfig(decode_slots=0).decode_slots is None
    with pytest.raises(ValueError, match="decode_slots=-2 is out of range"):
        SamplingConfig(decode_slots=-2)
    with pytest.raises(ValueError, match="decode_slots=4 .*needs share_prefix=True"):
        SamplingConfig(decode_slots=4, share_prefix=False)
    with pytest.raises(ValueError, match="share_prefix='yes' must be a bool"):
        SamplingConfig(share_prefix="yes")
