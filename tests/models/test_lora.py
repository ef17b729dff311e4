"""LoRA / DoRA adapters: config validation (PEFT field names), zero-initialised B gives the base model, a few
optax steps change only the adapters (base weights bit-identical, adapters-off logits == the original base
model's), the merged weights equal a NumPy float64 evaluation of PEFT's formulas in Hugging Face layout, and
the merged export loads in transformers with the adapter model's logits (1e-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trlax.models import Decoder, completion_logps, load_pretrained, save_pretrained  # noqa: E402
from trlax.models.hf_io import to_hf_state  # noqa: E402
from trlax.models.lora import (  # noqa: E402
    LORA_TARGETS,
    LoraConfig,
    LoraDecoder,
    adapters_off,
    base_params,
    lora_params,
    merge_lora,
)

V = 96
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, max_position_embeddings=128)
IDS = np.random.RandomState(0).randint(0, V, (2, 9))

# (HF config, LoraConfig): LoRA on every linear of a Llama with attention bias; DoRA + rsLoRA on a subset
# (including o_proj, whose input has two axes) of a tied-embedding Qwen2 with q/k/v bias.
VARIANTS = {
    "lora": (lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, tie_word_embeddings=False),
             LoraConfig(rank=4, alpha=8.0, target_modules="all-linear")),
    "dora": (lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
             LoraConfig(rank=3, alpha=5.0, target_modules=("self_attn.q_proj", "v_proj", "o_proj", "down_proj"),
                        use_dora=True, use_rslora=True)),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, (make, _) in VARIANTS.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(make(), dtype=torch.float32).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.05 * torch.randn_like(p))
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(params=list(VARIANTS))
def variant(request, ckpts):
    return request.param, ckpts[request.param], VARIANTS[request.param][1]


def _np_tree(state):
    return jax.tree.map(np.array, nnx.to_pure_dict(state))


def _adapter_groups(model):
    """The adapter dicts ``{target: LoraAdapter}``: one stacked dict (scanned layers) or one per layer."""
    return [model.adapters] if model.scan_layers else list(model.adapters)


def _layer_arrays(model):
    """Per layer ``{target: (a, b, magnitude or None)}`` arrays, whatever the layout."""
    out = []
    for i in range(model.config.num_layers):
        ad = model.adapters if model.scan_layers else model.adapters[i]
        pick = (lambda x: x[...][i]) if model.scan_layers else (lambda x: x[...])
        out.append({name: (pick(a.a), pick(a.b), pick(a.magnitude) if hasattr(a, "magnitude") else None)
                    for name, a in ad.items()})
    return out


def _randomise_adapters(model, seed):
    """Non-zero B (and a magnitude away from ||W||) so that every adapter matters."""
    rng = np.random.RandomState(seed)
    for ad in _adapter_groups(model):
        for a in ad.values():
            a.b[...] = jnp.asarray(0.3 * rng.randn(*a.b[...].shape), a.b[...].dtype)
            if hasattr(a, "magnitude"):
                m = a.magnitude[...]
                a.magnitude[...] = m * jnp.asarray(1 + 0.2 * rng.randn(*m.shape), m.dtype)


# ------------------------------------------------------------------------------------------------ config


def test_config_validation_and_from_peft():
    assert LoraConfig().target_modules == LORA_TARGETS
    c = LoraConfig.from_peft(r=4, lora_alpha=8, target_modules=["model.layers.0.self_attn.v_proj", "q_proj"],
                             use_rslora=True, task_type="CAUSAL_LM", lora_dropout=0.0)
    assert (c.rank, c.alpha, c.target_modules, c.scaling) == (4, 8, ("q_proj", "v_proj"), 4.0)
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0
    assert hash(c) == hash(LoraConfig(rank=4, alpha=8, target_modules=("v_proj", "q_proj"), use_rslora=True))
    for kw, msg in [(dict(rank=0), "rank=0"), (dict(alpha=-1.0), "alpha=-1.0"),
                    (dict(target_modules=["lm_head"]), "'lm_head'.*allowed values"),
                    (dict(target_modules=[]), "target_modules is empty"),
                    (dict(use_dora="yes"), "use_dora='yes'"), (dict(dropout=0.1), "dropout=0.1")]:
        with pytest.raises(ValueError, match=msg):
            LoraConfig(**kw)
    with pytest.raises(ValueError, match="bias='all'"):
        LoraConfig.from_peft(r=4, bias="all")
    with pytest.raises(ValueError, match="`base` must be a trlax.models.Decoder"):
        LoraDecoder(object(), LoraConfig(), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------ behaviour


def test_zero_b_gives_base_logits(variant):
    _, path, cfg = variant
    base = load_pretrained(path)
    ref = np.asarray(base(jnp.asarray(IDS)))
    model = LoraDecoder(base, cfg, rngs=nnx.Rngs(1))
    got = np.asarray(model(jnp.asarray(IDS)))
    if cfg.use_dora:  # m/||W|| * W == W up to float32 rounding
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    else:
        np.testing.assert_array_equal(got, ref)


def test_training_changes_only_adapters(variant):
    _, path, cfg = variant
    base = load_pretrained(path)
    graphdef, original = nnx.split(base)
    original = _np_tree(original)
    model = LoraDecoder(base, cfg, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    ids = jnp.asarray(IDS)

    def loss_fn(m):  # next-token NLL on IDS
        lp, _ = completion_logps(m, ids[:, :3], jnp.ones((2, 3), bool), ids[:, 3:], jnp.ones((2, 6), bool))
        return -jnp.mean(lp)

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        o.update(m, grads)
        return loss

    before = _np_tree(lora_params(model))
    losses = [float(step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    # base weights bit-identical (as stored in the LoraDecoder and in the wrapped decoder)
    for a, b in zip(jax.tree.leaves(_np_tree(base_params(model))["base"]), jax.tree.leaves(original)):
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(original)) == len(jax.tree.leaves(nnx.state(base, nnx.Param)))
    # every B moved (the update reached every adapter)
    after = _np_tree(lora_params(model))
    groups = (lambda t: [t["adapters"]]) if model.scan_layers else (lambda t: list(t["adapters"].values()))
    for ad_b, ad_a in zip(groups(before), groups(after)):
        for name in ad_b:
            assert np.abs(ad_a[name]["b"]).max() > 0 and not np.array_equal(ad_a[name]["b"], ad_b[name]["b"])
    # adapters off == the original base model (rebuilt from the snapshot); adapters on differ
    fresh = nnx.merge(graphdef, jax.tree.map(jnp.asarray, original))
    off = np.asarray(adapters_off(model)(ids))
    np.testing.assert_array_equal(off, np.asarray(fresh(ids)))
    assert np.abs(np.asarray(model(ids)) - off).max() > 1e-3
    # reference log-probs through the functional (graphdef, state) form use the base model too
    g, state = nnx.split(model)
    ref_lp, _ = completion_logps(adapters_off(nnx.merge(g, state)), ids[:, :3], jnp.ones((2, 3), bool),
                                 ids[:, 3:], jnp.ones((2, 6), bool))
    fresh_lp, _ = completion_logps(fresh, ids[:, :3], jnp.ones((2, 3), bool), ids[:, 3:], jnp.ones((2, 6), bool))
    np.testing.assert_array_equal(np.asarray(ref_lp), np.asarray(fresh_lp))


def _expected_merged_hf(base, model, cfg):
    """PEFT's merge in Hugging Face [out, in] layout, NumPy float64: W + s·B A, DoRA m ⊙ V / ||V||_row."""
    hf = {k: np.asarray(v, np.float64) for k, v in to_hf_state(base).items()}
    names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
             "down_proj": "mlp.down_proj"}
    s = cfg.alpha / (np.sqrt(cfg.rank) if cfg.use_rslora else cfg.rank)
    for i, ad in enumerate(_layer_arrays(model)):
        for name, (a, b, mag) in ad.items():
            key = f"model.layers.{i}.{names[name]}.weight"
            w = hf[key]
            out_dim, in_dim = w.shape
            A = np.asarray(a, np.float64).reshape(in_dim, cfg.rank).T  # [r, in]
            B = np.asarray(b, np.float64).reshape(cfg.rank, out_dim).T  # [out, r]
            v = w + s * B @ A
            if cfg.use_dora:
                m = np.asarray(mag, np.float64).reshape(out_dim)
                v = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
            hf[key] = v
    return hf


def test_merge_matches_peft_formula(variant):
    _, path, cfg = variant
    base = load_pretrained(path)
    model = LoraDecoder(base, cfg, rngs=nnx.Rngs(2))
    _randomise_adapters(model, 3)
    merged = merge_lora(model)
    assert type(merged) is Decoder
    got = {k: np.asarray(v, np.float64) for k, v in to_hf_state(merged).items()}
    want = _expected_merged_hf(base, model, cfg)
    assert got.keys() == want.keys()
    base_hf = to_hf_state(base)
    n_changed = 0
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-6, err_msg=k)
        n_changed += not np.array_equal(np.asarray(base_hf[k]), np.asarray(got[k]))
    assert n_changed == len(cfg.target_modules) * 2  # exactly the targeted matrices of both layers
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(IDS))), np.asarray(model(jnp.asarray(IDS))),
                               atol=1e-5, rtol=0)


def test_merged_export_loads_in_transformers(variant, tmp_path):
    _, path, cfg = variant
    base = load_pretrained(path)
    model = LoraDecoder(base, cfg, rngs=nnx.Rngs(4))
    _randomise_adapters(model, 5)
    save_pretrained(merge_lora(model), str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS)).logits.numpy()
    got = np.asarray(model(jnp.asarray(IDS)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(got - np.asarray(base(jnp.asarray(IDS)))).max() > 1e-2  # the adapters matter
