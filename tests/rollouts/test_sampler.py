"""JaxSampler: sampler log-probs vs a full forward (NumPy processing reference), greedy vs repeated full
forwards and vs transformers' ``generate``, stop tokens / max length / padding / truncation on ragged
batches, group layout, determinism, the empirical sampling distribution, HF logits warpers, errors.

One tiny float64 Decoder (weights scaled up so the next-token distributions are peaked) is shared by the
module; sampler configs are few and fixed so jit compiles a handful of functions only.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from trlax.models import Decoder, DecoderConfig, completion_logps
from trlax.rollouts import JaxSampler, Rollout, Sampler, SamplingConfig, left_pad, process_logits

V = 48
CFG = DecoderConfig(model_type="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=128)
PROMPTS = [[5, 17, 3, 29, 11], [40, 2], [7, 7, 31, 8]]  # ragged -> left-padded
STOP = tuple(range(10, 22))  # a quarter of the vocabulary: completions stop at ragged lengths


def _scaled_model(dtype, seed=0, scale=6.0):
    model = Decoder(CFG, rngs=nnx.Rngs(seed), param_dtype=dtype)
    gd, st = nnx.split(model)
    st = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, st)  # peaked logits, norms untouched
    return nnx.merge(gd, st)


@pytest.fixture(scope="module")
def model():
    return _scaled_model(jnp.float64)


# --------------------------------------------------------------------------------- NumPy references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x[np.isfinite(x)])
    e = np.where(np.isfinite(x), np.exp(x - m), 0.0)
    return np.where(np.isfinite(x), x - m - np.log(e.sum()), -np.inf)


def np_process(logits, temperature, top_k, top_p, min_p):
    """Eq. (1) of trlax.rollouts.sampler written plainly for one row: temperature, top-k, top-p, min-p."""
    x = np.asarray(logits, np.float64) / (temperature if temperature > 0 else 1.0)
    if top_k:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    if top_p < 1.0:
        probs = np.exp(np_log_softmax(x))
        keep, mass = np.zeros(x.shape, bool), 0.0
        for i in np.argsort(-probs, kind="stable"):
            keep[i] = True
            mass += probs[i]
            if mass >= top_p:
                break
        x = np.where(keep, x, -np.inf)
    if min_p > 0:
        probs = np.exp(np_log_softmax(x))
        x = np.where(probs >= min_p * probs.max(), x, -np.inf)
    return np_log_softmax(x)


def full_forward_logits(model, roll: Rollout):
    """Logits predicting every completion token, from one uncached forward pass on the finished sequences."""
    ids = jnp.concatenate([roll.prompt_ids, roll.completion_ids], axis=1)
    mask = jnp.concatenate([roll.prompt_mask, roll.completion_mask], axis=1)
    logits = np.asarray(model(ids, attention_mask=mask))
    p, n = roll.prompt_ids.shape[1], roll.completion_ids.shape[1]
    return logits[:, p - 1:p + n - 1]


def check_structure(roll: Rollout, cfg: SamplingConfig):
    """Per-row plain-Python check of stop / length / padding / truncation semantics."""
    ids, mask = np.asarray(roll.completion_ids), np.asarray(roll.completion_mask)
    lps, trunc = np.asarray(roll.logps), np.asarray(roll.truncated)
    n = cfg.max_new_tokens
    assert ids.shape == mask.shape == lps.shape == (roll.prompt_ids.shape[0], n)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        stops = [t for t in range(n) if row[t] in cfg.stop_token_ids and mask[b, t]]
        length = stops[0] + 1 if stops else n
        assert mask[b].tolist() == [True] * length + [False] * (n - length), (b, mask[b])
        assert all(t == cfg.pad_token_id for t in row[length:])
        assert not any(t in cfg.stop_token_ids for t in row[:length - 1])
        assert bool(trunc[b]) == (not stops), b
        assert np.all(lps[b, length:] == 0.0) and np.all(np.isfinite(lps[b, :length]))
        assert np.all(lps[b, :length] <= 0.0)


# ------------------------------------------------------------------------------------------- tests

SWEEP = [
    SamplingConfig(max_new_tokens=9, temperature=0.8, stop_token_ids=STOP, pad_token_id=1),
    SamplingConfig(max_new_tokens=9, temperature=0.7, top_k=6, stop_token_ids=STOP, pad_token_id=1),
    SamplingConfig(max_new_tokens=9, temperature=1.3, top_p=0.8, min_p=0.05, stop_token_ids=STOP, pad_token_id=1),
    SamplingConfig(max_new_tokens=9, temperature=0.9, top_k=12, top_p=0.9, min_p=0.1, stop_token_ids=STOP,
                   pad_token_id=1),
]


@pytest.mark.parametrize("cfg", SWEEP, ids=["plain", "topk", "topp_minp", "all"])
def test_sampler_logps_equal_full_forward_processed(model, cfg):
    roll = JaxSampler(model, cfg).generate(None, PROMPTS, jax.random.key(3), num_generations=3)
    check_structure(roll, cfg)
    logits = full_forward_logits(model, roll)
    ids, mask, lps = map(np.asarray, (roll.completion_ids, roll.completion_mask, roll.logps))
    assert mask.sum() > 9  # the comparison covers a real number of tokens
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if mask[b, t]:
                ref = np_process(logits[b, t], cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
                assert np.isfinite(ref[ids[b, t]]), "sampled a token outside the processed support"
                np.testing.assert_allclose(lps[b, t], ref[ids[b, t]], rtol=1e-5, atol=1e-5)
    if cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.min_p == 0.0:  # no truncation: the trainer's log-probs agree
        train_lp, _ = completion_logps(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                       roll.completion_mask, temperature=cfg.temperature)
        np.testing.assert_allclose(lps, np.asarray(train_lp), rtol=1e-5, atol=1e-5)


def test_sampler_logps_float32_model():
    m32 = _scaled_model(jnp.float32)
    cfg = SWEEP[1]
    roll = JaxSampler(m32, cfg).generate(None, PROMPTS, jax.random.key(1), num_generations=2)
    assert roll.logps.dtype == jnp.float32
    logits = full_forward_logits(m32, roll)
    ids, mask, lps = map(np.asarray, (roll.completion_ids, roll.completion_mask, roll.logps))
    for b, t in zip(*np.nonzero(mask)):
        ref = np_process(logits[b, t], cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
        np.testing.assert_allclose(lps[b, t], ref[ids[b, t]], rtol=1e-4, atol=1e-4)


def test_greedy_equals_repeated_full_forwards(model):
    n = 10
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=STOP, pad_token_id=1)
    roll = JaxSampler(model, cfg).generate(None, PROMPTS, jax.random.key(0))
    check_structure(roll, cfg)
    width = max(map(len, PROMPTS)) + n
    # one uncached full forward per token on the unpadded sequence, right-filled to a fixed width so it
    # compiles once (causal attention: positions < len(seq) never see the filler)
    forward = jax.jit(lambda ids, mask: model(ids, attention_mask=mask))
    for b, prompt in enumerate(PROMPTS):
        seq, out, lps = list(prompt), [], []
        for _ in range(n):
            buf = np.zeros((1, width), np.int32)
            buf[0, :len(seq)] = seq
            logits = np.asarray(forward(jnp.asarray(buf), jnp.asarray(np.arange(width)[None] < len(seq))))
            logits = logits[0, len(seq) - 1]
            tok = int(np.argmax(logits))
            out.append(tok)
            lps.append(np_log_softmax(logits)[tok])
            seq.append(tok)
            if tok in STOP:
                break
        k = len(out)
        assert np.asarray(roll.completion_ids[b, :k]).tolist() == out
        assert int(roll.lengths[b]) == k
        np.testing.assert_allclose(np.asarray(roll.logps[b, :k]), lps, rtol=1e-6, atol=1e-6)  # float32 out


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from trlax.models import load_pretrained

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0).add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path))
    ours = load_pretrained(str(tmp_path))
    n, eos, pad = 8, [12, 30], 1
    ids, mask = left_pad(PROMPTS, pad)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad, min_new_tokens=0).numpy()[:, ids.shape[1]:]
    roll = JaxSampler(ours, max_new_tokens=n, temperature=0.0, stop_token_ids=eos, pad_token_id=pad).generate(
        None, (ids, mask), jax.random.key(0))
    got = np.asarray(roll.completion_ids)
    for b in range(len(PROMPTS)):
        k = int(roll.lengths[b])
        assert got[b, :k].tolist() == out[b, :k].tolist()
        assert (k < n) == bool(np.isin(out[b], eos).any())


def test_ragged_padding_invariance_and_determinism(model):
    cfg = SWEEP[3]
    s = JaxSampler(model, cfg)
    key = jax.random.key(11)
    a = s.generate(None, PROMPTS, key, num_generations=2)
    b = s.generate(None, PROMPTS, key, num_generations=2)
    for f in a.keys():
        np.testing.assert_array_equal(np.asarray(a[f]), np.asarray(b[f]))
    # extra left padding columns change nothing
    ids, mask = left_pad(PROMPTS, 1, width=9)
    c = s.generate(None, (ids, mask), key, num_generations=2)
    assert c.prompt_ids.shape[1] == 9
    np.testing.assert_array_equal(np.asarray(a.completion_ids), np.asarray(c.completion_ids))
    np.testing.assert_allclose(np.asarray(a.logps), np.asarray(c.logps), atol=1e-6)
    d = s.generate(None, PROMPTS, jax.random.key(12), num_generations=2)
    assert not np.array_equal(np.asarray(a.completion_ids), np.asarray(d.completion_ids))


def test_prompt_multiple_padding_changes_nothing_for_greedy(model):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=STOP, pad_token_id=1)
    a = JaxSampler(model, cfg).generate(None, PROMPTS, jax.random.key(0))
    b = JaxSampler(model, cfg, prompt_multiple=8).generate(None, PROMPTS, jax.random.key(0))
    assert b.prompt_ids.shape[1] == 8 and a.prompt_ids.shape[1] == 5
    ids, mask = left_pad(PROMPTS, 1, width=12)  # trimmed to the bucket: all-padding columns dropped
    c = JaxSampler(model, cfg, prompt_multiple=8).generate(None, (ids, mask), jax.random.key(0))
    assert c.prompt_ids.shape[1] == 8
    np.testing.assert_array_equal(np.asarray(b.completion_ids), np.asarray(c.completion_ids))
    np.testing.assert_array_equal(np.asarray(a.completion_ids), np.asarray(b.completion_ids))
    np.testing.assert_allclose(np.asarray(a.logps), np.asarray(b.logps), atol=1e-10)


def test_group_layout(model):
    roll = JaxSampler(model, SWEEP[0]).generate(None, PROMPTS, jax.random.key(5), num_generations=4)
    assert roll.completion_ids.shape[0] == 12
    np.testing.assert_array_equal(np.asarray(roll.group_ids), np.repeat(np.arange(3), 4))
    ids, mask = left_pad(PROMPTS, 1)
    np.testing.assert_array_equal(np.asarray(roll.prompt_ids), np.repeat(ids, 4, 0))
    np.testing.assert_array_equal(np.asarray(roll.prompt_mask), np.repeat(mask, 4, 0))
    comp = np.asarray(roll.completion_ids)
    for g in range(3):  # members of a group are sampled independently
        assert len({tuple(r) for r in comp[4 * g:4 * g + 4]}) > 1


def test_truncation_and_max_new_tokens(model):
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, stop_token_ids=(), pad_token_id=0)
    roll = JaxSampler(model, cfg).generate(None, PROMPTS, jax.random.key(0))
    assert np.asarray(roll.truncated).all() and np.asarray(roll.completion_mask).all()
    every = SamplingConfig(max_new_tokens=4, temperature=1.0, stop_token_ids=tuple(range(V)))
    roll = JaxSampler(model, every).generate(None, PROMPTS, jax.random.key(0))  # stops after one token
    assert not np.asarray(roll.truncated).any()
    np.testing.assert_array_equal(np.asarray(roll.lengths), [1, 1, 1])
    assert (np.asarray(roll.completion_ids)[:, 1:] == 0).all()


def test_empirical_distribution_matches_processed(model):
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.5, top_k=10, top_p=0.95)
    g = 4000
    roll = JaxSampler(model, cfg).generate(None, [PROMPTS[0]], jax.random.key(2), num_generations=g)
    logits = np.asarray(model(jnp.asarray([PROMPTS[0]])))[0, -1]
    probs = np.exp(np_process(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p))
    freq = np.bincount(np.asarray(roll.completion_ids[:, 0]), minlength=V) / g
    assert freq[probs == 0].sum() == 0
    assert (probs > 0).sum() >= 3
    np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / g) + 1e-3)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0),
                                                           (1.2, 0, 1.0, 0.2), (0.8, 20, 0.9, 0.05)])
def test_process_logits_matches_transformers_warpers(temperature, top_k, top_p, min_p):
    torch = pytest.importorskip("torch")
    from transformers.generation import logits_process as lp

    x = np.random.RandomState(0).normal(size=(4, V)) * 3
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(lp.TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(lp.MinPLogitsWarper(min_p))
    s = torch.tensor(x)
    for w in warpers:
        s = w(None, s)
    ref = torch.log_softmax(s, -1).numpy()
    got = np.asarray(process_logits(jnp.asarray(x), temperature, top_k, top_p, min_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-12, atol=1e-12)


def test_process_logits_bf16_finite():
    x = (jnp.arange(V, dtype=jnp.float32) / 7.0).astype(jnp.bfloat16)[None]
    out = process_logits(x, 0.5, 8, 0.9, 0.01)
    assert out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).sum() >= 1
    np.testing.assert_allclose(np.exp(np.asarray(out)).sum(), 1.0, rtol=1e-5)


def test_mesh_placement_matches_unsharded(model):
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    cfg = SWEEP[2]
    a = JaxSampler(model, cfg).generate(None, PROMPTS, jax.random.key(4), num_generations=2)
    params = nnx.state(model)
    b = JaxSampler(nnx.split(model)[0], cfg, mesh=mesh).generate(params, PROMPTS, jax.random.key(4),
                                                                  num_generations=2)
    np.testing.assert_array_equal(np.asarray(a.completion_ids), np.asarray(b.completion_ids))
    np.testing.assert_allclose(np.asarray(a.logps), np.asarray(b.logps), atol=1e-12)
    assert b.completion_ids.sharding.mesh.shape == mesh.shape
    assert isinstance(JaxSampler(model), Sampler)


def test_rollout_dict_access(model):
    roll = JaxSampler(model, SWEEP[0]).generate(None, PROMPTS, jax.random.key(0))
    assert roll["completion_ids"] is roll.completion_ids and roll["sampler_logps"] is roll.logps
    leaves = jax.tree.leaves(roll)
    assert len(leaves) == 7
    with pytest.raises(KeyError, match="no field 'nope'"):
        roll["nope"]


def test_errors(model):
    s = JaxSampler(model, SamplingConfig(max_new_tokens=4, max_length=8))
    wide = left_pad([[1, 2, 3]], 0, width=6)  # fits once the all-padding columns are dropped
    assert s.generate(None, wide, jax.random.key(0)).prompt_ids.shape == (1, 4)
    with pytest.raises(ValueError, match="prompt too long for the KV cache.*max_length=8"):
        s.generate(None, [[1, 2, 3, 4, 5]], jax.random.key(0))
    with pytest.raises(ValueError, match="rows without any real token"):
        s.generate(None, [[1, 2], []], jax.random.key(0))
    ids, mask = left_pad([[1, 2]], 0, width=3)
    with pytest.raises(ValueError, match="left-padded"):
        s.generate(None, (ids[:, ::-1].copy(), mask[:, ::-1].copy()), jax.random.key(0))
    with pytest.raises(ValueError, match="vocab_size"):
        s.generate(None, [[1, V]], jax.random.key(0))
    with pytest.raises(ValueError, match="num_generations"):
        s.generate(None, [[1, 2]], jax.random.key(0), num_generations=0)
    for field, bad in (("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0), ("top_k", -1),
                       ("max_new_tokens", 0), ("max_length", 1), ("prompt_multiple", 0)):
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**{field: bad})
    assert SamplingConfig(top_k=None, top_p=None, min_p=None) == SamplingConfig(top_k=0, top_p=1.0, min_p=0.0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingConfig(stop_token_ids=(-3,))


_MESH_SCRIPT = r"""
import json, numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from trlax.models import Decoder, DecoderConfig, param_shardings, sharding_rules
from trlax.rollouts import JaxSampler, SamplingConfig
cfg = DecoderConfig(model_type="qwen3", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
model = Decoder(cfg, rngs=nnx.Rngs(0))
gd, st = nnx.split(model)
st = jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x, st)
devs = np.asarray(jax.devices())
train_mesh = Mesh(devs[:4].reshape(1, 4, 1), ("data", "fsdp", "tensor"))
trained = jax.device_put(st, param_shardings(st, train_mesh, sharding_rules("fsdp")))
samp_mesh = Mesh(devs[4:6].reshape(1, 1, 2), ("data", "fsdp", "tensor"))
prompts = [[5, 17, 3, 29, 11], [40, 2], [7, 7, 31, 8], [1, 2, 3]]
out = {}
for name, sc in (("greedy", SamplingConfig(max_new_tokens=8, temperature=0.0, stop_token_ids=(10, 11, 12))),
                 ("sampled", SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=8, stop_token_ids=(10, 11, 12)))):
    ref = JaxSampler(nnx.merge(gd, st), sc).generate(None, prompts, jax.random.key(0), num_generations=2)
    sh = JaxSampler(gd, sc, mesh=samp_mesh, rules=sharding_rules("tp")).generate(trained, prompts, jax.random.key(0),
                                                                                  num_generations=2)
    out[name] = dict(ids_equal=bool(np.array_equal(np.asarray(ref.completion_ids), np.asarray(sh.completion_ids))),
                     mask_equal=bool(np.array_equal(np.asarray(ref.completion_mask), np.asarray(sh.completion_mask))),
                     logp_diff=float(np.max(np.abs(np.asarray(ref.logps) - np.asarray(sh.logps)))),
                     devices=sorted(d.id for d in sh.completion_ids.sharding.device_set))
out["sampler_devices"] = sorted(d.id for d in devs[4:6])
print("RESULT" + json.dumps(out))
"""


def test_weights_resharded_from_trainer_mesh_to_separate_sampler_devices():
    """8 simulated CPU devices: weights FSDP-sharded on a 4-device trainer mesh are handed to a sampler on
    2 other devices (tensor-parallel); the rollout equals the single-device one and lives on those 2."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64",)}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8 " + os.environ.get("TRLAX_TEST_XLA_FLAGS", ""),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    for name in ("greedy", "sampled"):
        assert res[name]["ids_equal"] and res[name]["mask_equal"], res
        # float32 log-probs (magnitude ~1-10) through tensor-parallel reductions in another order: rounding only
        assert res[name]["logp_diff"] < 5e-5, res
        assert res[name]["devices"] == res["sampler_devices"], res


def test_bf16_compute_model_samples_finite_logps_close_to_full_forward():
    m = Decoder(CFG, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.bfloat16)
    gd, st = nnx.split(m)
    m = nnx.merge(gd, jax.tree.map(lambda x: x * 6.0 if x.ndim >= 2 else x, st))
    cfg = SWEEP[1]
    roll = JaxSampler(m, cfg).generate(None, PROMPTS, jax.random.key(0), num_generations=2)
    check_structure(roll, cfg)
    assert roll.logps.dtype == jnp.float32
    logits = full_forward_logits(m, roll)  # bf16 full forward (float32 logits)
    ids, mask, lps = map(np.asarray, (roll.completion_ids, roll.completion_mask, roll.logps))
    ref = np.array([np_process(logits[b, t], cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)[ids[b, t]]
                    for b, t in zip(*np.nonzero(mask))])
    got = lps[mask]
    finite = np.isfinite(ref)  # bf16 rounding may move a token across the top-k boundary
    assert finite.mean() > 0.9
    np.testing.assert_allclose(got[finite], ref[finite], atol=0.1)


def test_process_logits_ties_and_float64_keys():
    """Ties at the k-th value are all kept (as HF's TopKLogitsWarper); a top-p cutoff inside a tie keeps
    the whole tie; the bisection is exact for float32 and float64 rows, including -inf entries."""
    x = np.array([[3.0, 1.0, 3.0, 2.0, 2.0, 2.0, -np.inf, 0.5]])
    for dt in (jnp.float32, jnp.float64):
        got = np.asarray(process_logits(jnp.asarray(x, dt), 1.0, top_k=3))
        np.testing.assert_array_equal(np.isfinite(got[0]), [1, 0, 1, 1, 1, 1, 0, 0])  # 3,3 and the tie of 2s
        got = np.asarray(process_logits(jnp.asarray(x, dt), 1.0, top_k=2))
        np.testing.assert_array_equal(np.isfinite(got[0]), [1, 0, 1, 0, 0, 0, 0, 0])
        # the two 3s carry 2e^3/(2e^3+3e^2+e+e^.5) ≈ 0.60 of the mass; p=0.7 cuts inside the tie of 2s
        got = np.asarray(process_logits(jnp.asarray(x, dt), 1.0, top_p=0.7))
        np.testing.assert_array_equal(np.isfinite(got[0]), [1, 0, 1, 1, 1, 1, 0, 0])
        got = np.asarray(process_logits(jnp.asarray(x, dt), 1.0, top_p=0.5))
        np.testing.assert_array_equal(np.isfinite(got[0]), [1, 0, 1, 0, 0, 0, 0, 0])
        np.testing.assert_allclose(np.exp(got[0, [0, 2]]), [0.5, 0.5], rtol=1e-6)
