"""Quick start: drop a trlax loss into an existing JAX training step.

A toy "language model" (a table of logits per position, vocabulary 8, completions of 6 tokens) is
trained with GRPO-family losses to emit as many copies of token 3 as possible. Everything outside
the loss is ordinary JAX + optax: trlax supplies the advantages and the loss, nothing else.

    python examples/quickstart.py            # DAPO preset
    python examples/quickstart.py gspo       # any PolicyLossConfig preset name
"""

import sys

import jax
import jax.numpy as jnp
import optax

from trlax.objectives import PolicyLossConfig, group_relative_advantages, policy_loss

V, T, PROMPTS, G = 8, 6, 4, 8  # vocabulary, completion length, prompts per step, generations per prompt


def log_probs(params, tokens):
    logp = jax.nn.log_softmax(params, axis=-1)  # [T, V]
    return jnp.take_along_axis(jnp.broadcast_to(logp, (tokens.shape[0], T, V)), tokens[..., None], -1)[..., 0]


def main(preset: str = "dapo"):
    config = PolicyLossConfig.preset(preset, beta=0.0)
    opt = optax.adam(0.1)
    params = jnp.zeros((T, V))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, key):
        tokens = jax.random.categorical(key, params, shape=(PROMPTS * G, T))  # sample completions
        rewards = jnp.mean(tokens == 3, axis=-1)  # verifiable reward
        adv = group_relative_advantages(rewards, num_generations=G)  # GRPO advantages
        old = log_probs(params, tokens)  # the sampling policy's log-probs
        mask = jnp.ones_like(tokens, bool)

        def loss_fn(p):
            return policy_loss(log_probs(p, tokens), old, adv, mask, config)  # <- the trlax loss

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, jnp.mean(rewards)

    key = jax.random.PRNGKey(0)
    history = []
    for i in range(60):
        key, sub = jax.random.split(key)
        params, opt_state, reward = step(params, opt_state, sub)
        history.append(float(reward))
        if i % 10 == 0:
            print(f"step {i:3d}  mean reward {reward:.3f}")
    first, last = sum(history[:6]) / 6, sum(history[-6:]) / 6
    print(f"{preset}: mean reward first 10% {first:.3f} -> last 10% {last:.3f}")
    return first, last


if __name__ == "__main__":
    main(*sys.argv[1:])
