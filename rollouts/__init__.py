"""trlax.rollouts: the sampler and reward functions (see DESIGN.md). Knows models, not train.

- ``sampler``  :class:`Sampler` (the interface), :class:`JaxSampler` (prefill + KV-cached ``lax.while_loop``
               decode under ``jit``), :class:`SamplingConfig`, :class:`Rollout`, :func:`process_logits`.
- ``rewards``  verifiable rewards on decoded text / token ids, weighted combination with NaN for unscorable.
- ``reward_model``  a sequence-classification reward model on the trlax decoder and a pairwise judge.
- ``environments``  multi-turn environments, tools (JSON schema, ``<tool_call>`` parsing, execution with a
               timeout), chat formatting of prompts / observations, the built-in calculator toy task.
- ``multiturn``  :class:`MultiTurnSampler`: tool-using multi-turn rollouts on the KV cache (interleaved
               observations, loss masks with gaps, per-turn rewards).
"""

if __name__ != "trlax.rollouts":  # pragma: no cover - guard against importing the bare folder
    raise ImportError("import this package as trlax.rollouts (pip install -e .), not as a top-level 'rollouts'")

from trlax.rollouts.sampler import *  # noqa: F401,F403,E402
from trlax.rollouts.rewards import *  # noqa: F401,F403,E402
from trlax.rollouts.reward_model import *  # noqa: F401,F403,E402
from trlax.rollouts.environments import *  # noqa: F401,F403,E402
from trlax.rollouts.multiturn import *  # noqa: F401,F403,E402
