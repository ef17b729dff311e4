"""Sharding rules: logical axis names -> PartitionSpecs per layout, divisibility fallback, and a real
8-device (simulated CPU) run where the sharded forward equals the single-device one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from trlax.models import Decoder, DecoderConfig, LAYOUTS, batch_spec, logical_to_spec, param_specs, sharding_rules

CFG = DecoderConfig(model_type="qwen3", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=1,
                    num_heads=8, num_kv_heads=2, head_dim=4, qk_norm=True, qkv_bias=True)


@pytest.fixture(scope="module")
def state():
    return nnx.state(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0))))


def _specs(state, layout, mesh):
    specs = param_specs(state, sharding_rules(layout), mesh)
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(specs)}


def test_layouts(state):
    mesh = AbstractMesh((2, 2, 4), ("data", "fsdp", "tensor"))
    dp = _specs(state, "dp", mesh)
    assert all(s == P(*(None,) * len(s)) for s in dp.values())
    # scanned layers: a leading layer axis (logical name "layers", no mesh axis in any layout)
    fsdp = _specs(state, "fsdp", mesh)
    assert fsdp["embed"] == P(None, "fsdp") and fsdp["layers/attn/q"] == P(None, "fsdp", None, None)
    assert fsdp["layers/mlp/down"] == P(None, None, "fsdp") and fsdp["final_norm"] == P(None)
    tp = _specs(state, "fsdp_tp", mesh)
    assert tp["embed"] == P("tensor", "fsdp") and tp["lm_head"] == P("tensor", "fsdp")
    assert tp["layers/attn/q"] == P(None, "fsdp", "tensor", None)
    assert tp["layers/attn/o"] == P(None, "tensor", None, "fsdp")
    assert tp["layers/mlp/gate"] == P(None, "fsdp", "tensor") and tp["layers/mlp/down"] == P(None, "tensor", "fsdp")
    # 2 KV heads cannot be split 4 ways: replicated on that dim instead of failing
    assert tp["layers/attn/k"] == P(None, "fsdp", None, None) and tp["layers/attn/k_bias"] == P(None, None, None)
    assert tp["layers/attn/q_norm"] == P(None, None)
    # axes absent from the mesh are dropped
    small = _specs(state, "fsdp_tp", AbstractMesh((2,), ("tensor",)))
    assert small["layers/attn/q"] == P(None, None, "tensor", None)
    # the unrolled layout (scan_layers=False): per-layer paths, no layer axis
    unrolled = _specs(nnx.state(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0), scan_layers=False))),
                      "fsdp_tp", mesh)
    assert unrolled["layers/0/attn/q"] == P("fsdp", "tensor", None)
    assert all(dict(sharding_rules(layout))["layers"] is None for layout in LAYOUTS)
    assert batch_spec(sharding_rules("fsdp")) == P(("data", "fsdp"), None)


def test_errors():
    with pytest.raises(ValueError, match="layout='zero3'.*allowed values"):
        sharding_rules("zero3")
    with pytest.raises(ValueError, match="'experts'"):
        logical_to_spec(("experts", "embed"), sharding_rules("dp"))
    assert set(LAYOUTS) == {"dp", "fsdp", "tp", "fsdp_tp"}


_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from trlax.models import Decoder, DecoderConfig, param_shardings, sharding_rules, batch_spec
    assert jax.device_count() == 8
    cfg = DecoderConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = np.random.RandomState(0).randint(0, 64, (4, 6)); mask = np.ones((4, 6), bool); mask[1, :2] = False
    fwd = jax.jit(lambda g, s, i, m: nnx.merge(g, s)(i, attention_mask=m))
    graphdef, state = nnx.split(model)
    ref = np.asarray(fwd(graphdef, state, ids, mask))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    for layout in ("dp", "fsdp", "tp", "fsdp_tp"):
        rules = sharding_rules(layout)
        sh = jax.device_put(state, param_shardings(state, mesh, rules))
        b = NamedSharding(mesh, batch_spec(rules))
        out = fwd(graphdef, sh, jax.device_put(ids, b), jax.device_put(mask, b))
        q = sh["layers"]["attn"]["q"][...]
        n_shards = len({tuple((s.start, s.stop) for s in idx) for idx in q.sharding.devices_indices_map(q.shape).values()})
        assert n_shards == {"dp": 1, "fsdp": 2, "tp": 2, "fsdp_tp": 4}[layout], (layout, n_shards)
        err = float(np.abs(np.asarray(out) - ref)[mask].max())
        assert err < 1e-5, (layout, err)
    print("OK")
""")


def test_sharded_forward_on_8_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 " + os.environ.get("TRLAX_TEST_XLA_FLAGS", ""))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
