"""Decoder parity with transformers' PyTorch forward (the oracle), KV-cache decode, HF round trip.

One tiny random checkpoint per family is built locally with transformers (no download) and saved once per
module: Llama with Llama-3 RoPE scaling and attention bias (untied), Qwen2 (q/k/v bias, tied embeddings),
Qwen3 (q/k-norm, head_dim != hidden/heads, untied). Weights are perturbed away from transformers' init
(zero biases, unit norms) so every parameter matters.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trlax.models import (  # noqa: E402
    Decoder,
    DecoderConfig,
    completion_logps,
    load_config,
    load_pretrained,
    save_pretrained,
)
from trlax.objectives import logps_and_entropy  # noqa: E402

V = 160
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON, attention_bias=True, tie_word_embeddings=False, rope_theta=500.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000.0),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
}

RNG = np.random.RandomState(0)
IDS = RNG.randint(0, V, (3, 10))
MASK = np.ones((3, 10), bool)
MASK[1, :3] = False  # left padding
MASK[2, :5] = False


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Each family's checkpoint, built and saved once per module."""
    out = {}
    for name, make_config in FAMILIES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        trlax_model = load_pretrained(path, dtype=jnp.float32)
        out[name] = dict(name=name, path=path, hf=model, model=trlax_model, ref=hf_logits(model, IDS, MASK))
    return out


@pytest.fixture(params=list(FAMILIES))
def ckpt(request, ckpts):
    return ckpts[request.param]


def test_logits_match_transformers_left_padded(ckpt):
    out = np.asarray(ckpt["model"](jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
    assert out.dtype == np.float32 and out.shape == (3, 10, V)
    err = np.abs(out - ckpt["ref"])[MASK].max()
    assert err < 1e-4, err
    assert np.all(np.isfinite(out))  # padding rows are finite too
    # left padding == the unpadded sequence (transformers on the unpadded row is the oracle)
    unpadded = hf_logits(ckpt["hf"], IDS[2:3, 5:], MASK[2:3, 5:])
    assert np.abs(out[2, 5:] - unpadded[0]).max() < 1e-4


def test_kv_cache_decode_matches_full_forward(ckpt):
    model = ckpt["model"]
    full = np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
    cache = model.init_cache(3, 14)
    logits, cache = model(jnp.asarray(IDS[:, :6]), attention_mask=jnp.asarray(MASK[:, :6]), cache=cache)
    steps = [np.asarray(logits)]
    step = jax.jit(lambda m, i, k, c: m(i, attention_mask=k, cache=c))
    for t in range(6, 10):
        logits, cache = step(model, jnp.asarray(IDS[:, t:t + 1]), jnp.asarray(MASK[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    dec = np.concatenate(steps, axis=1)
    assert int(cache.index) == 10 and np.array_equal(np.asarray(cache.mask[:, :10]), MASK)
    assert np.abs(dec - full)[MASK].max() < 1e-5
    assert np.abs(dec - ckpt["ref"])[MASK].max() < 1e-4


def test_round_trip_loads_in_transformers(ckpt, tmp_path):
    out = str(tmp_path / "rt")
    save_pretrained(ckpt["model"], out, max_shard_size=30_000)  # force several shards + index
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ckpt["hf"])
    np.testing.assert_array_equal(hf_logits(reloaded, IDS, MASK), ckpt["ref"])  # bit-identical weights
    cfg_in = json.load(open(os.path.join(ckpt["path"], "config.json")))
    cfg_out = json.load(open(os.path.join(out, "config.json")))
    for k in ("rope_parameters", "rope_scaling", "tie_word_embeddings", "num_key_value_heads", "head_dim"):
        assert cfg_out.get(k) == cfg_in.get(k), k
    again = load_pretrained(out)  # and back into trlax, single file this time
    save_pretrained(again, out)
    assert "model.safetensors" in os.listdir(out) and "model.safetensors.index.json" not in os.listdir(out)
    a, b = nnx.state(ckpt["model"]), nnx.state(load_pretrained(out))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # bf16 storage: config says so, transformers reads bf16 tensors, trlax reloads the rounded values
    save_pretrained(ckpt["model"], out, dtype=jnp.bfloat16)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(hf_bf16.parameters()).dtype == torch.bfloat16
    c = nnx.state(load_pretrained(out, dtype=jnp.float32))
    assert all(np.array_equal(np.asarray(x.astype(jnp.bfloat16), np.float32), y)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def _split(model, P=6):
    ids, mask = IDS, MASK.copy()
    mask[0, 8:] = False  # right padding in the completion block
    return ids[:, :P], mask[:, :P], ids[:, P:], mask[:, P:]


def test_completion_logps_match_transformers(ckpt):
    p_ids, p_mask, c_ids, c_mask = _split(ckpt["model"])
    full_mask = np.concatenate([p_mask, c_mask], 1)
    ref = torch.log_softmax(torch.tensor(hf_logits(ckpt["hf"], IDS, full_mask), dtype=torch.float64) / 0.8, -1)
    ref = ref[:, 5:-1].gather(-1, torch.tensor(c_ids)[..., None])[..., 0].numpy()
    ref_ent = -(ref_p := torch.softmax(torch.tensor(hf_logits(ckpt["hf"], IDS, full_mask), dtype=torch.float64)
                                       / 0.8, -1)[:, 5:-1]).mul(torch.log(ref_p)).sum(-1).numpy()
    f = jax.jit(completion_logps, static_argnames="chunk_size")
    lp, ent = f(ckpt["model"], p_ids, p_mask, c_ids, c_mask, 0.8, chunk_size=5)
    assert lp.shape == c_ids.shape and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp)[c_mask], ref[c_mask], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[c_mask], ref_ent[c_mask], atol=1e-4)
    assert np.all(np.asarray(lp)[~c_mask] == 0) and np.all(np.asarray(ent)[~c_mask] == 0)
    lp0, ent0 = f(ckpt["model"], p_ids, p_mask, c_ids, np.zeros_like(c_mask), 0.8, chunk_size=5)  # empty mask
    assert np.all(np.asarray(lp0) == 0) and np.all(np.asarray(ent0) == 0)


def test_completion_logps_grad_equals_plain_path(ckpts):
    """Float64 model: the fused path's parameter gradients equal the plain logits -> log-softmax path.
    Qwen2 (tied embeddings: the table gets gradient through both the input and the LM head); the
    kernel's own gradients are tested per shape in tests/objectives/test_logprobs.py."""
    ckpt = ckpts["qwen2"]
    model = load_pretrained(ckpt["path"], dtype=jnp.float64)
    graphdef, state = nnx.split(model)
    p_ids, p_mask, c_ids, c_mask = _split(model)
    w1 = RNG.randn(*c_ids.shape)
    w2 = RNG.randn(*c_ids.shape)

    def fused(state):
        lp, ent = completion_logps((graphdef, state), p_ids, p_mask, c_ids, c_mask, 1.3, chunk_size=4)
        return jnp.sum(w1 * lp + w2 * ent)

    def plain(state):
        m = nnx.merge(graphdef, state)
        logits = m(jnp.asarray(IDS), attention_mask=jnp.asarray(np.concatenate([p_mask, c_mask], 1)))
        lp, ent = logps_and_entropy(logits[:, 5:-1], c_ids, 1.3)
        return jnp.sum(jnp.where(c_mask, w1 * lp + w2 * ent, 0.0))

    vf, gf = jax.jit(jax.value_and_grad(fused))(state)  # one compile beats op-by-op dispatch here
    vp, gp = jax.jit(jax.value_and_grad(plain))(state)
    np.testing.assert_allclose(vf, vp, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(gf))


def test_bf16_compute_f32_params_and_remat(ckpts):
    """bf16 compute over float32 master weights: f32 params and grads, finite, close to the f32 forward;
    rematerialising a layer changes nothing in the gradients."""
    ckpt = ckpts["qwen3"]  # dtype / remat mechanics are family-independent
    mbf = load_pretrained(ckpt["path"], dtype=jnp.float32, compute_dtype=jnp.bfloat16, remat=[True, False])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(mbf)))
    out = np.asarray(jax.jit(lambda m, i, k: m(i, attention_mask=k))(mbf, IDS, MASK))  # eager bf16 is slow
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.abs(out - ckpt["ref"])[MASK].max() < 5e-2  # bf16 activations, same function
    p_ids, p_mask, c_ids, c_mask = _split(mbf)
    loss = lambda g, s: jnp.sum(completion_logps((g, s), p_ids, p_mask, c_ids, c_mask)[0])
    grad = jax.jit(jax.grad(loss, 1), static_argnums=0)
    g_remat = grad(*nnx.split(mbf))
    g_plain = grad(*nnx.split(load_pretrained(ckpt["path"], compute_dtype=jnp.bfloat16)))
    assert all(x.dtype == jnp.float32 and np.all(np.isfinite(x)) for x in jax.tree.leaves(g_remat))
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(g_remat))


def test_tokenizer_files_loaded_when_present(ckpts, tmp_path):
    ckpt = ckpts["llama"]  # tokenizer io is family-independent
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ate the cat food"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    out = str(tmp_path / "with_tok")
    save_pretrained(ckpt["model"], out, tokenizer=fast)
    model, loaded = load_pretrained(out, return_tokenizer=True)
    assert loaded is not None
    assert loaded("the cat ate")["input_ids"] == fast("the cat ate")["input_ids"]
    assert load_pretrained(ckpt["path"], return_tokenizer=True)[1] is None  # no tokenizer files: fine


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        load_config(str(tmp_path))
    with pytest.raises(ValueError, match="supported"):
        DecoderConfig.from_hf({"model_type": "llama", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="rope_type"):
        DecoderConfig.from_hf(dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                                          "intermediate_size": 8, "num_hidden_layers": 1,
                                                          "num_attention_heads": 2}))
        load_pretrained(str(tmp_path))


def test_input_errors_name_the_argument():
    cfg = DecoderConfig(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=4)
    m = Decoder(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids"):
        m(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="attention_mask"):
        m(jnp.zeros((2, 3), jnp.int32), attention_mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="prompt_ids"):
        completion_logps(m, jnp.zeros((2, 0), jnp.int32), jnp.zeros((2, 0)), jnp.zeros((2, 3), jnp.int32),
                         jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="remat"):
        Decoder(cfg, rngs=nnx.Rngs(0), remat=[True, False])
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=3, num_kv_heads=2, head_dim=4)
