"""trlax: pure-functional JAX post-training objectives and a minimal reference stack.

Subpackages are imported lazily so ``import trlax.objectives`` pulls in nothing heavier than JAX:

- ``trlax.objectives``: losses, advantages, importance-sampling corrections (jax, numpy, chex only).
- ``trlax.models``: Flax NNX decoder with Hugging Face checkpoint load / save.
- ``trlax.rollouts``: the KV-cached sampler and reward functions.
- ``trlax.train``: step builder, loops and the ``trlax`` command.
"""

__version__ = "0.1.0"
