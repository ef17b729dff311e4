"""Run in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before jax starts).

Trains a tiny pure-JAX causal LM (embedding -> tanh MLP -> LM head) for two steps with a GRPO-family
loss on (a) one device and (b) a data=2 x fsdp=2 x tensor=2 mesh with sharded parameters, with and
without micro-batching, and prints the max abs differences as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get("TRLAX_TEST_XLA_FLAGS", "")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from trlax.objectives import PolicyLossConfig, policy_loss  # noqa: E402
from trlax.train.step import (  # noqa: E402
    init_train_state,
    make_mesh,
    make_train_step,
    shard_state,
    state_sharding_from_params,
)

V, H, B, T = 32, 16, 16, 12


def init_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (V, H)) * 0.5,
        "mlp": jax.random.normal(k2, (H, 4 * H)) * 0.3,
        "head": jax.random.normal(k3, (4 * H, V)) * 0.3,
    }


SPECS = {"embed": P("tensor", "fsdp"), "mlp": P("fsdp", "tensor"), "head": P("tensor", "fsdp")}


def logps_fn(params, tokens):
    x = params["embed"][tokens[:, :-1]]
    h = jnp.tanh(x @ params["mlp"])
    logits = h @ params["head"]
    lp = jax.nn.log_softmax(logits, -1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]


def make_loss(cfg):
    def loss_fn(params, batch, totals):
        lp = logps_fn(params, batch["tokens"])
        return policy_loss(lp, batch["old_logps"], batch["advantages"], batch["mask"], cfg,
                           ref_logps=batch["ref_logps"], num_items=totals["num_items"],
                           num_sequences=totals["num_sequences"])
    return loss_fn


def make_batch(params):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, V, (B, T + 1)))
    lengths = rng.integers(2, T + 1, B)
    mask = jnp.asarray(np.arange(T)[None] < lengths[:, None])
    lp = logps_fn(params, tokens)
    return {
        "tokens": tokens,
        "mask": mask,
        "old_logps": lp + jnp.asarray(rng.normal(0, 0.05, (B, T))),
        "ref_logps": lp + jnp.asarray(rng.normal(0, 0.05, (B, T))),
        "advantages": jnp.asarray(rng.normal(size=B)),
    }


def run(cfg, mesh, sharded, k):
    # eps well above float32 round-off of the gradient: Adam divides by sqrt(v) + eps, so with a tiny eps a
    # gradient entry that is 0 in exact arithmetic (1e-9 either side after summation-order round-off)
    # becomes a full +-lr step whose sign depends on the reduction order.
    opt = optax.adamw(1e-2, eps=1e-4)
    params = init_params(jax.random.PRNGKey(0))
    batch = make_batch(params)
    state = init_train_state(params, opt)
    if mesh is not None:
        psh = {n: NamedSharding(mesh, SPECS[n] if sharded else P()) for n in params}
        ssh = state_sharding_from_params(state, psh, mesh, opt)
        state = shard_state(state, ssh)
        step = make_train_step(make_loss(cfg), opt, mesh=mesh, state_sharding=ssh, num_microbatches=k)
    else:
        step = make_train_step(make_loss(cfg), opt, num_microbatches=k)
    losses, grads_norms = [], []
    for _ in range(2):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        grads_norms.append(float(m["grad_norm"]))
    return losses, grads_norms, jax.tree_util.tree_map(np.asarray, state.params)


def maxdiff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main():
    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    for lt in sys.argv[1].split(","):
        cfg = PolicyLossConfig(loss_type=lt, beta=0.05, epsilon_high=0.28 if lt != "cispo" else 5.0)
        base = run(cfg, make_mesh(devices=jax.devices()[:1]), False, 1)
        mesh8 = make_mesh(data=2, fsdp=2, tensor=2)
        for name, (mesh, sharded, k) in {
            "mesh8_sharded": (mesh8, True, 1),
            "mesh8_sharded_micro4": (mesh8, True, 4),
            "one_device_micro4": (None, False, 4),
        }.items():
            res = run(cfg, mesh, sharded, k)
            out[f"{lt}/{name}"] = {
                "loss": max(abs(x - y) for x, y in zip(res[0], base[0])),
                "grad_norm": max(abs(x - y) for x, y in zip(res[1], base[1])),
                "params": maxdiff(res[2], base[2]),
                "loss_value": base[0][0],
            }
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
