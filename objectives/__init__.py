"""trlax.objectives: pure, jit-compatible post-training objectives.

Imports jax, numpy and chex only. Every public function is re-exported here, so
``from trlax.objectives import dpo_loss, policy_loss, aggregate`` works; each also lives in the one
obvious module named after its family:

- ``aggregation``  masked reductions, ``aggregate`` (GRPO / BNPO / Dr. GRPO / DAPO / LUSPO), metrics.
- ``ratios``       token / sequence (GSPO) / GSPO-token importance ratios.
- ``surrogates``   PPO clip (clip-higher, two-sided delta, dual clip), CISPO, SAPO, VESPO, LUSPO, GMPO,
                   GPG / REINFORCE, Clip-Cov / KL-Cov, ASPO, TOPR, DPPO, M2PO, Kimi, entropy-dependent clip.
- ``kl``           k1 / k2 / k3 / abs / mse estimators, straight-through variants, bias-corrected k3,
                   KL-in-reward with fixed / adaptive controllers.
- ``correction``   sampler-trainer mismatch (truncated / masked IS), off-policy sequence masking, rollout
                   correction stages (divergence rejection, Geo-RS, veto, self-normalised IS, diagnostics).
- ``entropy``      entropy masks and bonus, truncated-completion masks.
- ``advantages``   group-relative advantages, multi-reward aggregation, overlong punishment, GFPO, RLOO,
                   REINFORCE++, GAE + clipped value loss, ReMax, OPO, pass@k, OTB, MaxRL, dynamic sampling.
- ``policy``       ``PolicyLossConfig`` + ``policy_loss`` (the GRPO-family recipe) and its presets.
- ``preference``   the DPO family, ``PreferenceLossConfig`` + ``preference_loss``.
- ``unpaired``     KTO, BCO, ORPO, CPO / SimPO / AlphaPO, TPO, reward modelling, online DPO / XPO /
                   Nash-MD, A*-PO, TR-DPO reference updates.
- ``supervised``   SFT NLL, DFT, BEMA.
- ``distillation`` GKD generalised JSD, forward / reverse KL, on-policy distillation, IW-OPD, SDPO, MiniLLM.
- ``logprobs``     per-token log-probs and entropy from logits, chunked fused LM-head kernel.
"""

from trlax.objectives.aggregation import *  # noqa: F401,F403
from trlax.objectives.ratios import *  # noqa: F401,F403
from trlax.objectives.surrogates import *  # noqa: F401,F403
from trlax.objectives.kl import *  # noqa: F401,F403
from trlax.objectives.correction import *  # noqa: F401,F403
from trlax.objectives.entropy import *  # noqa: F401,F403
from trlax.objectives.advantages import *  # noqa: F401,F403
from trlax.objectives.policy import *  # noqa: F401,F403
from trlax.objectives.preference import *  # noqa: F401,F403
from trlax.objectives.unpaired import *  # noqa: F401,F403
from trlax.objectives.supervised import *  # noqa: F401,F403
from trlax.objectives.distillation import *  # noqa: F401,F403
from trlax.objectives.logprobs import *  # noqa: F401,F403
