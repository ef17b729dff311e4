"""The GRPO-family recipe: :class:`PolicyLossConfig` + :func:`policy_loss`.

One function covers every policy-gradient loss of TRL's ``GRPOTrainer`` and the TRL paper index
(GRPO, DAPO, Dr. GRPO, GSPO, GSPO-token, Lite PPO, CISPO / ScaleRL, SAPO, LUSPO, VESPO, INTELLECT-2,
DeepSeek-V3.2, Beyond-80/20, Skywork-OR1, truncated / masked IS). Per-token pipeline, in TRL's order:

1. importance log-ratio at ``importance_sampling_level`` (token / sequence / sequence_token),
   clamped to ``±log_ratio_clamp`` before ``exp``;
2. per-token surrogate of ``loss_type`` (PPO clip with ε_low / ε_high / δ, CISPO, SAPO, VESPO ...), looked
   up in ``POLICY_LOSS_REGISTRY`` (:func:`register_policy_loss` adds a user's own);
3. × off-policy sequence mask (OPSM) if ``off_policy_mask_threshold`` is set;
4. × high-entropy token mask if ``top_entropy_quantile < 1``;
5. × sampler importance weight if ``sampler_correction`` is set (not for VESPO, where it is inside φ;
   for GMPO the token weights enter as their per-sequence geometric mean, as verl's ``geo_mean``);
6. + β · KL(π_θ‖π_ref) (k3 by default; × ratio if ``use_bias_correction_kl``) — not masked by 3–5;
7. aggregation of ``loss_type`` (:func:`trlax.objectives.aggregate`);
8. − ``entropy_coef`` × mean entropy over the effective mask (with ``num_items``: × this
   micro-batch's share ``Σ mask / num_items`` of the global token count, so the micro-batch bonuses
   sum to the full-batch mean entropy; exact without the entropy mask).

Gradient-accumulation note: TRL divides ``grpo/bnpo/dr_grpo/luspo/sapo`` losses by the number of
accumulation steps; trlax instead takes the global ``num_sequences`` / ``num_items`` so that summing
micro-batch losses gives the full-batch loss exactly. With one micro-batch both agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives import advantages as _adv  # noqa: F401  (re-exported names live there)
from trlax.objectives._checks import (
    ArrayLike,
    ConfigMixin,
    Scalar,
    as_float,
    as_mask,
    check_choice,
    check_order,
    check_range,
    check_rank,
    check_same_shape,
    is_array,
    maybe_nonzero,
    register_config,
)
from trlax.objectives.aggregation import (
    AGGREGATION_MODES,
    aggregate,
    masked_max,
    masked_min,
    masked_sum,
    mean_metric,
)
from trlax.objectives.correction import (
    SAMPLER_CORRECTION_MODES,
    off_policy_sequence_mask,
    sampler_importance_weights,
)
from trlax.objectives.entropy import high_entropy_mask, mask_truncated_completions
from trlax.objectives.kl import ALL_KL_ESTIMATORS, kl_penalty
from trlax.objectives.ratios import IMPORTANCE_SAMPLING_LEVELS, importance_log_ratio
from trlax.objectives.surrogates import (
    DPPO_DIVERGENCES,
    aspo_loss,
    cispo_loss,
    clip_cov_loss,
    clip_cov_mask,
    clip_indicators,
    covariance_scores,
    dppo_loss,
    dppo_mask,
    dual_clip_indicator,
    entropy_dependent_epsilon,
    gmpo_clip_indicators,
    gmpo_loss,
    kl_cov_loss,
    kl_cov_mask,
    m2po_loss,
    m2po_mask,
    ppo_clip_loss,
    reinforce_loss,
    sapo_loss,
    squared_log_ratio_penalty,
    topr_loss,
    vespo_loss,
    vespo_weights,
)

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# objectives beyond TRL (issue 3): token-level only (GMPO / TOPR build their own sequence ratio)
BEYOND_TRL_LOSS_TYPES = ("gmpo", "gpg", "clip_cov", "kl_cov", "aspo", "topr", "dppo", "m2po")
ALL_POLICY_LOSS_TYPES = POLICY_LOSS_TYPES + BEYOND_TRL_LOSS_TYPES
_CLIP_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# default aggregation of the beyond-TRL losses (the papers' / verl's defaults)
_DEFAULT_AGGREGATION = {"gmpo": "grpo", "gpg": "token_mean", "clip_cov": "token_mean", "kl_cov": "token_mean",
                        "aspo": "token_mean", "topr": "token_mean", "dppo": "token_mean", "m2po": "token_mean"}


@register_config
@dataclasses.dataclass(frozen=True)
class PolicyLossConfig(ConfigMixin):
    """Configuration of :func:`policy_loss`. Hashable (close over it, or pass it as a static argument
    to ``jit``) and a pytree (:func:`~trlax.objectives._checks.register_config`): the float fields
    (β, ε, δ, temperatures, coefficients, clip bounds) are leaves that may be JAX scalars, traced or not,
    so ``jax.jit(f)(config)``, ``jax.vmap`` over a stacked batch of configs and ``jax.grad`` w.r.t. a field
    work; loss types, modes, flags and ``max_completion_length`` are static (``STATIC_FIELDS``).

    Field names follow TRL's ``GRPOConfig`` where one exists. Defaults equal TRL 1.16's defaults,
    except ``sampler_correction`` (None here: no sampler log-probs are assumed).

    Attributes:
      loss_type: ``grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo`` (or any name added with
        :func:`register_policy_loss`; ``POLICY_LOSS_REGISTRY`` lists them all).
      importance_sampling_level: ``token`` (PPO), ``sequence`` (GSPO), ``sequence_token`` (GSPO-token).
      epsilon: lower clip ε_low (``epsilon`` in TRL).
      epsilon_high: upper clip ε_high; ``None`` -> ``epsilon``. For CISPO an *absolute* ratio cap.
      delta: INTELLECT-2 two-sided cap on the unclipped ratio (> 1), or None.
      beta: KL coefficient (0 disables the reference model).
      kl_estimator: ``k3`` (TRL) or ``k1 | k2 | abs | mse``.
      use_bias_correction_kl: multiply the KL by the importance ratio (DeepSeek-V3.2; TRL default True).
      top_entropy_quantile: keep the top-ρ entropy tokens (1.0 keeps all).
      off_policy_mask_threshold: OPSM δ (None disables).
      sampler_correction: None or ``token_truncate | token_mask | sequence_truncate | sequence_mask``.
      sampler_clip_min / sampler_clip_max: bounds of the sampler IS weight.
      sapo_temperature_pos / sapo_temperature_neg: SAPO τ for positive / non-positive advantages.
      vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO gamma-weight parameters.
      max_completion_length: Dr. GRPO normaliser (None -> the batch's ``T``).
      entropy_coef: entropy-bonus coefficient (Skywork-OR1).
      mask_truncated_completions: zero rows flagged ``truncated`` (DAPO overlong filtering).
      log_ratio_clamp: clamp on log-ratios before ``exp`` (None disables).

    Beyond TRL (issue 3; defaults leave every TRL loss unchanged):

      loss_type also accepts ``gmpo | gpg | clip_cov | kl_cov | aspo | topr | dppo | m2po``
        (token level only; see :mod:`trlax.objectives.surrogates`). ``gmpo`` reads ``epsilon`` /
        ``epsilon_high`` as *log-space* clip bounds, ``dppo`` as the divergence thresholds δ_low / δ_high.
      loss_agg_mode: override of the aggregation (an ``aggregate`` mode); None -> by loss type.
      clip_ratio_c: dual-clip bound c > 1 for A < 0 (PPO-clip loss types; verl ``clip_ratio_c``).
      clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov selection (needs ``rng`` in ``policy_loss``).
      kl_cov_ratio, ppo_kl_coef: KL-Cov selection fraction and ``|δ|`` coefficient.
      aspo_negative_clip_ratio_c, aspo_positive_clip_ratio_c: ASPO soft dual-clip bounds.
      topr_positive_weight, topr_negative_weight: TOPR weights; topr_sequence_ratio: use the
        trajectory ratio ``Π_t r_t`` (the paper) instead of the token ratio (ROLL).
      dppo_divergence: ``binary_tv | binary_kl``; dppo_ratio_cap: truncation of the DPPO IS weight.
      m2po_threshold: M2PO second-moment bound τ_M2.
      squared_log_ratio_coef: adds ``coef·(log π_θ − log π_old)²`` per token (Kimi k1.5 τ/2, K2.5 kl_tau).
      high_entropy_epsilon, high_entropy_epsilon_high, entropy_clip_quantile: entropy-dependent clip
        (Archer): tokens above the row's entropy quantile use these ε instead of ``epsilon`` /
        ``epsilon_high`` (PPO-clip loss types and ``aspo``; needs ``entropies``).
      force_on_policy_ratio: ratio ``exp(log π_θ − sg(log π_θ))`` whatever ``old_logps`` (NeMo-RL).
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: Scalar = 0.2
    epsilon_high: Optional[Scalar] = None
    delta: Optional[Scalar] = None
    beta: Scalar = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = True
    top_entropy_quantile: Scalar = 1.0
    off_policy_mask_threshold: Optional[Scalar] = None
    sampler_correction: Optional[str] = None
    sampler_clip_min: Optional[Scalar] = None
    sampler_clip_max: Optional[Scalar] = 3.0
    sapo_temperature_pos: Scalar = 1.0
    sapo_temperature_neg: Scalar = 1.05
    vespo_k_pos: Scalar = 2.0
    vespo_lambda_pos: Scalar = 3.0
    vespo_k_neg: Scalar = 3.0
    vespo_lambda_neg: Scalar = 2.0
    max_completion_length: Optional[int] = None
    entropy_coef: Scalar = 0.0
    mask_truncated_completions: bool = False
    log_ratio_clamp: Optional[Scalar] = 20.0
    # ---- beyond TRL (issue 3) ----
    loss_agg_mode: Optional[str] = None
    clip_ratio_c: Optional[Scalar] = None
    clip_cov_ratio: Scalar = 2e-4
    clip_cov_lb: Scalar = 1.0
    clip_cov_ub: Scalar = 5.0
    kl_cov_ratio: Scalar = 2e-4
    ppo_kl_coef: Scalar = 1.0
    aspo_negative_clip_ratio_c: Scalar = 3.0
    aspo_positive_clip_ratio_c: Scalar = 3.0
    topr_positive_weight: Scalar = 1.0
    topr_negative_weight: Scalar = 1.0
    topr_sequence_ratio: bool = False
    dppo_divergence: str = "binary_tv"
    dppo_ratio_cap: Optional[Scalar] = 20.0
    m2po_threshold: Scalar = 0.04
    squared_log_ratio_coef: Scalar = 0.0
    high_entropy_epsilon: Optional[Scalar] = None
    high_entropy_epsilon_high: Optional[Scalar] = None
    entropy_clip_quantile: Scalar = 0.8
    force_on_policy_ratio: bool = False

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, tuple(POLICY_LOSS_REGISTRY))
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_range("epsilon", self.epsilon, low=0.0)
        check_range("epsilon_high", self.epsilon_high, low=0.0, allow_none=True)
        check_range("delta", self.delta, low=1.0, low_inclusive=False, allow_none=True)
        check_range("beta", self.beta, low=0.0)
        check_choice("kl_estimator", self.kl_estimator, ALL_KL_ESTIMATORS)
        check_range("top_entropy_quantile", self.top_entropy_quantile, low=0.0, high=1.0, low_inclusive=False)
        check_range("off_policy_mask_threshold", self.off_policy_mask_threshold, low=0.0, allow_none=True)
        if self.sampler_correction is not None:
            check_choice("sampler_correction", self.sampler_correction, SAMPLER_CORRECTION_MODES)
            if self.sampler_clip_min is None and self.sampler_clip_max is None:
                raise ValueError("sampler_clip_min and sampler_clip_max are both None; set at least one bound")
        check_range("sampler_clip_min", self.sampler_clip_min, low=0.0, allow_none=True)
        check_range("sampler_clip_max", self.sampler_clip_max, low=0.0, allow_none=True)
        check_order("sampler_clip_min", self.sampler_clip_min, "sampler_clip_max", self.sampler_clip_max)
        check_range("sapo_temperature_pos", self.sapo_temperature_pos, low=0.0, low_inclusive=False)
        check_range("sapo_temperature_neg", self.sapo_temperature_neg, low=0.0, low_inclusive=False)
        for f in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            check_range(f, getattr(self, f), low=0.0)
        check_range("max_completion_length", self.max_completion_length, low=1, allow_none=True)
        mcl = self.max_completion_length
        if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, (int, np.integer))):
            raise ValueError(f"max_completion_length={mcl!r} must be an integer (or None)")
        for f in ("use_bias_correction_kl", "mask_truncated_completions"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                raise ValueError(f"{f}={getattr(self, f)!r} is not allowed; allowed values: True, False")
        check_range("entropy_coef", self.entropy_coef)
        check_range("log_ratio_clamp", self.log_ratio_clamp, low=0.0, low_inclusive=False, allow_none=True)
        if self.loss_type == "vespo" and self.sampler_correction not in (None, "token_truncate", "token_mask"):
            raise ValueError(
                f"sampler_correction={self.sampler_correction!r} is not allowed with loss_type='vespo'; "
                "allowed values: None, 'token_truncate', 'token_mask'"
            )
        self._check_beyond_trl()

    def _check_beyond_trl(self):
        if self.loss_agg_mode is not None:
            check_choice("loss_agg_mode", self.loss_agg_mode, AGGREGATION_MODES)
        if POLICY_LOSS_REGISTRY[self.loss_type].token_level_only and self.importance_sampling_level != "token":
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} is not allowed with "
                f"loss_type={self.loss_type!r}; allowed values: 'token'"
            )
        check_range("clip_ratio_c", self.clip_ratio_c, low=1.0, low_inclusive=False, allow_none=True)
        if self.clip_ratio_c is not None and self.loss_type not in _CLIP_LOSSES:
            raise ValueError(f"clip_ratio_c={self.clip_ratio_c!r} is not allowed with loss_type={self.loss_type!r}; "
                             f"allowed loss types: {', '.join(map(repr, _CLIP_LOSSES))}")
        check_range("clip_cov_ratio", self.clip_cov_ratio, low=0.0, high=1.0, low_inclusive=False)
        check_range("clip_cov_lb", self.clip_cov_lb)
        check_range("clip_cov_ub", self.clip_cov_ub)
        check_order("clip_cov_lb", self.clip_cov_lb, "clip_cov_ub", self.clip_cov_ub, strict=True)
        check_range("kl_cov_ratio", self.kl_cov_ratio, low=0.0, high=1.0, low_inclusive=False)
        check_range("ppo_kl_coef", self.ppo_kl_coef, low=0.0)
        for f in ("aspo_negative_clip_ratio_c", "aspo_positive_clip_ratio_c"):
            check_range(f, getattr(self, f), low=1.0, low_inclusive=False)
        for f in ("topr_positive_weight", "topr_negative_weight"):
            check_range(f, getattr(self, f), low=0.0)
        check_choice("dppo_divergence", self.dppo_divergence, DPPO_DIVERGENCES)
        check_range("dppo_ratio_cap", self.dppo_ratio_cap, low=0.0, low_inclusive=False, allow_none=True)
        check_range("m2po_threshold", self.m2po_threshold, low=0.0, low_inclusive=False)
        check_range("squared_log_ratio_coef", self.squared_log_ratio_coef, low=0.0)
        check_range("high_entropy_epsilon", self.high_entropy_epsilon, low=0.0, allow_none=True)
        check_range("high_entropy_epsilon_high", self.high_entropy_epsilon_high, low=0.0, allow_none=True)
        if self.high_entropy_epsilon is None and self.high_entropy_epsilon_high is not None:
            raise ValueError("high_entropy_epsilon_high is set but high_entropy_epsilon is None; set both")
        if self.high_entropy_epsilon is not None and self.loss_type not in _CLIP_LOSSES + ("aspo",):
            raise ValueError(f"high_entropy_epsilon is not allowed with loss_type={self.loss_type!r}; allowed loss "
                             f"types: {', '.join(map(repr, _CLIP_LOSSES + ('aspo',)))}")
        check_range("entropy_clip_quantile", self.entropy_clip_quantile, low=0.0, high=1.0)
        for f in ("topr_sequence_ratio", "force_on_policy_ratio"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                raise ValueError(f"{f}={getattr(self, f)!r} is not allowed; allowed values: True, False")

    @property
    def aggregation_mode(self) -> str:
        """The ``aggregate`` mode this config uses (``loss_agg_mode`` or the loss type's default)."""
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return POLICY_LOSS_REGISTRY[self.loss_type].aggregation

    # ------------------------------------------------------------------------------------ presets
    @property
    def epsilon_low(self) -> Scalar:
        return self.epsilon

    @property
    def effective_epsilon_high(self) -> Scalar:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def grpo(cls, **overrides) -> "PolicyLossConfig":
        """GRPO / DeepSeekMath (arXiv 2402.03300; paper index with DeepSeek-R1 values): per-sequence
        token mean, ``beta=0.001``, ``epsilon=10.0`` (R1's very loose clip), k3 KL."""
        return cls(**{"loss_type": "grpo", "beta": 0.001, "epsilon": 10.0, "use_bias_correction_kl": False,
                      **overrides})

    @classmethod
    def dapo(cls, **overrides) -> "PolicyLossConfig":
        """DAPO (arXiv 2503.14476): clip-higher ``epsilon=0.2, epsilon_high=0.28``, global token-mean
        loss, no KL, truncated completions masked (pair with :func:`soft_overlong_punishment`)."""
        return cls(**{"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0,
                      "mask_truncated_completions": True, **overrides})

    @classmethod
    def dr_grpo(cls, max_completion_length: int = 3000, **overrides) -> "PolicyLossConfig":
        """Dr. GRPO (arXiv 2503.20783): token sum over a constant ``B × max_completion_length`` (3000
        in the paper), no KL; pair with ``scale_rewards="none"`` advantages."""
        return cls(**{"loss_type": "dr_grpo", "beta": 0.0, "max_completion_length": max_completion_length, **overrides})

    @classmethod
    def gspo(cls, **overrides) -> "PolicyLossConfig":
        """GSPO (arXiv 2507.18071): sequence-level geometric-mean ratio, ``epsilon=3e-4``,
        ``epsilon_high=4e-4``, per-sequence loss (``grpo`` aggregation), no KL."""
        return cls(**{"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
                      "epsilon_high": 4e-4, "beta": 0.0, **overrides})

    @classmethod
    def gspo_token(cls, **overrides) -> "PolicyLossConfig":
        """GSPO-token (arXiv 2507.18071, eq. 13): sequence ratio value, per-token gradient."""
        return cls.gspo(**{"importance_sampling_level": "sequence_token", **overrides})

    @classmethod
    def lite_ppo(cls, **overrides) -> "PolicyLossConfig":
        """Lite PPO ("Tricks or Traps", arXiv 2508.08221): token-level loss aggregation, no KL; pair
        with ``scale_rewards="batch"`` advantages (group mean, batch std)."""
        return cls(**{"loss_type": "dapo", "beta": 0.0, **overrides})

    @classmethod
    def cispo(cls, **overrides) -> "PolicyLossConfig":
        """CISPO / ScaleRL (arXiv 2506.13585, 2510.13786): clipped IS-weight REINFORCE with an absolute
        ratio cap ``epsilon_high=5.0``, token-mean; pair with ``scale_rewards="batch"``."""
        return cls(**{"loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.0, **overrides})

    @classmethod
    def sapo(cls, **overrides) -> "PolicyLossConfig":
        """SAPO (arXiv 2511.20347): soft gate, ``tau_pos=1.0``, ``tau_neg=1.05``, group scaling."""
        return cls(**{"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05,
                      "beta": 0.0, **overrides})

    @classmethod
    def luspo(cls, **overrides) -> "PolicyLossConfig":
        """LUSPO (arXiv 2602.05261): sequence ratio, ``epsilon=2e-3``, ``epsilon_high=2.5e-3``,
        per-sequence sum aggregation."""
        return cls(**{"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 2e-3,
                      "epsilon_high": 2.5e-3, "beta": 0.0, **overrides})

    @classmethod
    def vespo(cls, **overrides) -> "PolicyLossConfig":
        """VESPO (arXiv 2602.10693): gamma-weighted REINFORCE, ``k_pos=2, λ_pos=3, k_neg=3, λ_neg=2``,
        token-level truncated sampler correction."""
        return cls(**{"loss_type": "vespo", "sampler_correction": "token_truncate", "sampler_clip_max": 3.0,
                      "beta": 0.0, **overrides})

    @classmethod
    def intellect2(cls, **overrides) -> "PolicyLossConfig":
        """INTELLECT-2 (arXiv 2505.07291): two-sided clip ``delta=4``, ``epsilon=0.2``, ``beta=0.001``."""
        return cls(**{"loss_type": "grpo", "delta": 4.0, "epsilon": 0.2, "beta": 0.001, **overrides})

    @classmethod
    def deepseek_v32(cls, **overrides) -> "PolicyLossConfig":
        """DeepSeek-V3.2 (arXiv 2512.02556): unbiased (ratio-weighted) k3 KL with ``beta=0.001`` and
        off-policy sequence masking ``δ=0.5``."""
        return cls(**{"loss_type": "grpo", "beta": 0.001, "use_bias_correction_kl": True,
                      "off_policy_mask_threshold": 0.5, **overrides})

    @classmethod
    def high_entropy(cls, **overrides) -> "PolicyLossConfig":
        """Beyond the 80/20 rule (arXiv 2506.01939): DAPO settings, gradient only on the top 20%
        highest-entropy tokens."""
        return cls.dapo(**{"top_entropy_quantile": 0.2, **overrides})

    @classmethod
    def skywork_or1(cls, **overrides) -> "PolicyLossConfig":
        """Skywork-OR1 (arXiv 2505.22312): entropy bonus ``entropy_coef=0.01`` (the adaptive
        controller that moves it lives in the train loop: ``adaptive_entropy_coef``)."""
        return cls(**{"entropy_coef": 0.01, "beta": 0.0, **overrides})

    @classmethod
    def tis(cls, mode: str = "token_truncate", **overrides) -> "PolicyLossConfig":
        """Truncated importance sampling for sampler–trainer mismatch (Yao et al. 2025): ``clip_max=2``."""
        return cls(**{"sampler_correction": mode, "sampler_clip_max": 2.0, **overrides})

    @classmethod
    def icepop(cls, mode: str = "token_mask", **overrides) -> "PolicyLossConfig":
        """Masked importance sampling / IcePop (arXiv 2510.18855): ρ outside ``[0.5, 2]`` masked."""
        return cls(**{"sampler_correction": mode, "sampler_clip_min": 0.5, "sampler_clip_max": 2.0, **overrides})

    # ------------------------------------------------------------------------ beyond-TRL presets
    @classmethod
    def dual_clip_ppo(cls, **overrides) -> "PolicyLossConfig":
        """Dual-clip PPO (Ye et al. 2019, arXiv 1912.09729; verl ``vanilla``): ``epsilon=0.2``,
        ``clip_ratio_c=3.0``, token-mean loss."""
        return cls(**{"loss_type": "dapo", "epsilon": 0.2, "clip_ratio_c": 3.0, "beta": 0.0, **overrides})

    @classmethod
    def gmpo(cls, **overrides) -> "PolicyLossConfig":
        """GMPO (arXiv 2507.20673): geometric-mean sequence ratio with log-space token clip
        ``ε_low = ε_high = 0.4`` (ratio range ``(e^−0.4, e^0.4)``), mean over sequences, no KL."""
        return cls(**{"loss_type": "gmpo", "epsilon": 0.4, "epsilon_high": 0.4, "beta": 0.0, **overrides})

    @classmethod
    def gpg(cls, **overrides) -> "PolicyLossConfig":
        """GPG (arXiv 2504.02546): plain ``−A·log π`` with token-mean aggregation, no ratio, no clip, no
        KL; pair with GPG's group-mean advantages (no std) scaled by ``B/(B−M)``."""
        return cls(**{"loss_type": "gpg", "beta": 0.0, **overrides})

    @classmethod
    def clip_cov(cls, **overrides) -> "PolicyLossConfig":
        """Clip-Cov (arXiv 2505.22617): PPO clip ``ε=0.2`` plus gradient detachment of a
        random ``r=2e-4`` fraction of tokens with covariance in ``(1, 5)`` (the authors' recipe values);
        token mean, no KL."""
        return cls(**{"loss_type": "clip_cov", "epsilon": 0.2, "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0,
                      "clip_cov_ub": 5.0, "beta": 0.0, **overrides})

    @classmethod
    def kl_cov(cls, **overrides) -> "PolicyLossConfig":
        """KL-Cov (arXiv 2505.22617): unclipped ``−A·r`` plus ``1.0·|δ|`` on the top
        ``k=2e-3`` covariance tokens (the authors' 7B recipe, ``recipe/entropy/7b_kl_cov.sh``); token mean."""
        return cls(**{"loss_type": "kl_cov", "kl_cov_ratio": 2e-3, "ppo_kl_coef": 1.0, "beta": 0.0, **overrides})

    @classmethod
    def aspo(cls, **overrides) -> "PolicyLossConfig":
        """ASPO (arXiv 2510.06062): flipped IS weight for ``A > 0``, soft dual clip ``c=3`` on both
        sides, ``ε=0.2``, token mean (the knob defaults of the reference code)."""
        return cls(**{"loss_type": "aspo", "epsilon": 0.2, "epsilon_high": 0.2, "aspo_negative_clip_ratio_c": 3.0,
                      "aspo_positive_clip_ratio_c": 3.0, "beta": 0.0, **overrides})

    @classmethod
    def archer(cls, **overrides) -> "PolicyLossConfig":
        """Archer (arXiv 2507.15778): entropy-dependent clip — ``ε=0.2`` for low-entropy tokens, ``0.4``
        for tokens above the row's 80% entropy quantile; token mean."""
        return cls(**{"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.2, "high_entropy_epsilon": 0.4,
                      "entropy_clip_quantile": 0.8, **overrides})

    @classmethod
    def topr(cls, **overrides) -> "PolicyLossConfig":
        """TOPR (arXiv 2503.14286): positive trajectories SFT-like, negative ones weighted by the
        truncated trajectory ratio ``[π(τ)/μ(τ)]_0^1``; weights 1, token mean, no KL."""
        return cls(**{"loss_type": "topr", "topr_sequence_ratio": True, "beta": 0.0, **overrides})

    @classmethod
    def dppo(cls, **overrides) -> "PolicyLossConfig":
        """DPPO-Binary-TV (arXiv 2602.04879): probability-difference trust region ``δ_low = δ_high = 0.2``
        (prime-rl's defaults), IS weight truncated at 20 (sec. 5.4), token mean, no KL."""
        return cls(**{"loss_type": "dppo", "dppo_divergence": "binary_tv", "epsilon": 0.2, "epsilon_high": 0.2,
                      "dppo_ratio_cap": 20.0, "beta": 0.0, **overrides})

    @classmethod
    def prime_rl(cls, **overrides) -> "PolicyLossConfig":
        """prime-rl's default loss: DPPO-Binary-TV mask (0.2 / 0.2) plus the Kimi K2.5 squared
        log-ratio term ``kl_tau=1e-3`` (arXiv 2602.04879, 2602.02276)."""
        return cls.dppo(**{"squared_log_ratio_coef": 1e-3, **overrides})

    @classmethod
    def kimi15(cls, tau: Scalar = 0.1, **overrides) -> "PolicyLossConfig":
        """Kimi k1.5 (arXiv 2501.12599, eq. 3): ``−A·log π + τ/2·(log π − log π_old)²``; the paper does
        not publish τ, ``0.1`` is ROLL's ``kimi15_tau`` default."""
        return cls(**{"loss_type": "gpg", "squared_log_ratio_coef": 0.5 * tau, "beta": 0.0, **overrides})

    @classmethod
    def m2po(cls, **overrides) -> "PolicyLossConfig":
        """M2PO (arXiv 2510.01161): unclipped ``−M·r·A`` with the second-moment mask ``τ_M2 = 0.04``,
        token mean, no KL."""
        return cls(**{"loss_type": "m2po", "m2po_threshold": 0.04, "beta": 0.0, **overrides})

    PRESETS = ("grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "lite_ppo", "cispo", "sapo", "luspo", "vespo",
               "intellect2", "deepseek_v32", "high_entropy", "skywork_or1", "tis", "icepop",
               "dual_clip_ppo", "gmpo", "gpg", "clip_cov", "kl_cov", "aspo", "archer", "topr", "dppo", "prime_rl",
               "kimi15", "m2po")

    # ------------------------------------------------------------------------------------ from TRL
    @classmethod
    def from_trl(cls, **fields: Any) -> "PolicyLossConfig":
        """Build from TRL ``GRPOConfig`` field names and values (a whole ``GRPOConfig.to_dict()`` is
        fine: fields unrelated to the loss are ignored; unknown loss values are rejected).

        The sampler correction is on iff ``use_vllm`` and ``vllm_importance_sampling_correction``
        (TRL's rule), with ``vllm_importance_sampling_mode`` / ``_clip_min`` / ``_clip_max`` (the
        deprecated ``_cap`` is accepted for ``_clip_max``). ``use_adaptive_entropy`` needs the train
        loop's controller; here it only sets the starting ``entropy_coef``.
        """
        f = dict(fields)
        out: Dict[str, Any] = {}
        direct = ("loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "beta",
                  "use_bias_correction_kl", "top_entropy_quantile", "off_policy_mask_threshold",
                  "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                  "vespo_k_neg", "vespo_lambda_neg", "max_completion_length", "mask_truncated_completions")
        for key in direct:
            if key in f and f[key] is not None:
                out[key] = f[key]
        if "delta" in f:
            out["delta"] = f["delta"]
        if "epsilon_high" in f:
            out["epsilon_high"] = f["epsilon_high"]
        if "off_policy_mask_threshold" in f:
            out["off_policy_mask_threshold"] = f["off_policy_mask_threshold"]
        ent = f.get("entropy_coef")
        if ent is not None and (ent != 0.0 or f.get("use_adaptive_entropy")):
            out["entropy_coef"] = float(ent)
        if f.get("use_vllm") and f.get("vllm_importance_sampling_correction", True):
            out["sampler_correction"] = f.get("vllm_importance_sampling_mode", "sequence_mask")
            cap = f.get("vllm_importance_sampling_clip_max", f.get("vllm_importance_sampling_cap", 3.0))
            out["sampler_clip_max"] = cap
            out["sampler_clip_min"] = f.get("vllm_importance_sampling_clip_min")
            if out.get("loss_type") == "vespo" and out["sampler_correction"] not in ("token_truncate", "token_mask"):
                raise ValueError(
                    f"vllm_importance_sampling_mode={out['sampler_correction']!r} is not allowed with "
                    "loss_type='vespo'; allowed values: 'token_truncate', 'token_mask'"
                )
        return cls(**out)


# ---------------------------------------------------------------------------------------- the loss


def _runs(coef: Any, needed: Any, off: float = 0.0) -> bool:
    """Whether the pipeline step driven by ``coef`` runs: a number runs it unless it equals ``off``; an
    array (e.g. a traced config leaf, whose value is unknown) runs it when its input ``needed`` is given."""
    return needed is not None if is_array(coef) else coef != off


def _advantages_2d(advantages, B: int, T: int) -> jnp.ndarray:
    adv = as_float(advantages, "advantages")
    if adv.ndim == 1 and adv.shape[0] == B:
        return adv[:, None]
    if adv.ndim == 2 and adv.shape in ((B, 1), (B, T)):
        return adv
    raise ValueError(f"`advantages` must have shape ({B},), ({B}, 1) or ({B}, {T}), got {tuple(adv.shape)}")


def policy_loss(
    logps: ArrayLike,
    old_logps: Optional[ArrayLike],
    advantages: ArrayLike,
    mask: ArrayLike,
    config: PolicyLossConfig,
    *,
    ref_logps: Optional[ArrayLike] = None,
    sampler_logps: Optional[ArrayLike] = None,
    entropies: Optional[ArrayLike] = None,
    num_items: Optional[Any] = None,
    num_sequences: Optional[Any] = None,
    entropy_threshold: Optional[ArrayLike] = None,
    truncated: Optional[ArrayLike] = None,
    rng: Optional[jax.Array] = None,
) -> Tuple[jax.Array, Dict[str, Any]]:
    """GRPO-family policy loss (pipeline in the module docstring).

    Args:
      logps: ``[B, T]`` log π_θ of the sampled tokens (differentiable; any float dtype, computed in
        float32 or wider).
      old_logps: ``[B, T]`` log π_old (stop-gradient), or ``None`` for on-policy (``sg(logps)``).
      advantages: ``[B]``, ``[B, 1]`` or ``[B, T]`` (stop-gradient).
      mask: ``[B, T]`` completion mask.
      config: :class:`PolicyLossConfig` (static, or a jit / vmap / grad argument: see below).
      ref_logps: ``[B, T]`` reference log-probs; required when ``config.beta > 0``.
      sampler_logps: ``[B, T]`` sampler log-probs; required when ``config.sampler_correction`` is
        set; also used by OPSM when given. NaN entries mean "no correction" for that token.
      entropies: ``[B, T]`` per-token entropies; required for ``top_entropy_quantile < 1`` or
        ``entropy_coef != 0``, and reported as a metric when given.
      num_items: global completion-token count for ``dapo / cispo / vespo`` (micro-batching); also
        weights the entropy bonus by this micro-batch's token share (step 8).
      num_sequences: global row count for ``grpo / sapo / dr_grpo / luspo``.
      entropy_threshold: precomputed (e.g. global) threshold for the entropy mask.
      truncated: ``[B]`` bool truncation flags; required when ``config.mask_truncated_completions``.
      rng: a ``jax.random`` key; required for ``loss_type="clip_cov"`` (random token selection).

    Traced hyperparameters: ``config`` may be a ``jit`` / ``vmap`` / ``grad`` argument (its float fields
    are pytree leaves). An array ``beta``, ``entropy_coef`` or ``top_entropy_quantile`` cannot be
    compared with its "off" value (0, 0, 1), so its step runs exactly when its input (``ref_logps``,
    ``entropies``) is given, and is skipped otherwise; with Python numbers the rules above apply.

    Returns:
      ``(loss, metrics)``: scalar loss and a dict of ``Mean`` pairs / min / max scalars.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import PolicyLossConfig, policy_loss
      >>> logps = jnp.array([[-1.0, -1.2, -0.8], [-0.5, -0.7, -2.0]])
      >>> old = logps + jnp.array([[0.1, -0.1, 0.0], [0.0, 0.2, 0.0]])
      >>> adv = jnp.array([1.0, -1.0])
      >>> mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
      >>> truncated = jnp.array([False, True])  # DAPO drops truncated completions from the loss
      >>> config = PolicyLossConfig.dapo()
      >>> loss, metrics = policy_loss(logps, old, adv, mask, config, truncated=truncated)
      >>> print(round(float(loss), 4), round(float(metrics["clip_ratio/region_mean"].value), 4))
      -1.0033 0.0
      >>> grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, config, truncated=truncated)[0])(logps)
      >>> print(grad[1])  # the truncated row gets no gradient
      [0. 0. 0.]
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"`config` must be a PolicyLossConfig, got {type(config).__name__}")
    logps = as_float(logps, "logps")
    check_rank(logps, 2, "logps")
    B, T = logps.shape
    mask = as_mask(mask)
    check_same_shape(logps, "logps", mask=mask, old_logps=old_logps, ref_logps=ref_logps,
                     sampler_logps=sampler_logps, entropies=entropies)
    if config.mask_truncated_completions:
        if truncated is None:
            raise ValueError("`truncated` ([B] bool flags) is required when mask_truncated_completions=True")
        if jnp.shape(truncated) != (B,):
            raise ValueError(f"`truncated` must have shape ({B},), got {tuple(jnp.shape(truncated))}")
        mask = mask_truncated_completions(mask, truncated)
    adv = _advantages_2d(advantages, B, T)
    adv = jax.lax.stop_gradient(jnp.where(jnp.isnan(adv), 0.0, adv))
    zero = jnp.zeros((), logps.dtype)
    logps_safe = jnp.where(mask, logps, zero)
    old_raw = None if old_logps is None else jax.lax.stop_gradient(as_float(old_logps, "old_logps"))
    old = jax.lax.stop_gradient(logps_safe) if old_raw is None else jnp.where(mask, old_raw, zero)
    metrics: Dict[str, Any] = {}

    # 1. importance ratio (from the raw arrays: the ratio functions select once, on the difference)
    ratio_old = jax.lax.stop_gradient(logps_safe) if config.force_on_policy_ratio else old
    log_ratio = importance_log_ratio(logps, None if config.force_on_policy_ratio else old_raw, mask,
                                     config.importance_sampling_level)
    raw_log_ratio = log_ratio
    clamp = config.log_ratio_clamp
    if clamp is not None:
        clamped = jnp.abs(log_ratio) > clamp
        lr_mask = mask if log_ratio.shape == mask.shape else jnp.ones((B, 1), bool)
        metrics["log_ratio/clamped_frac"] = mean_metric(clamped.astype(jnp.float32), lr_mask)
        log_ratio = jnp.clip(log_ratio, -clamp, clamp)
    ratio = jnp.exp(log_ratio)

    # sampler importance weights (computed from old log-probs: constants)
    rho = None
    sampler_log_is = None
    if config.sampler_correction is not None:
        if sampler_logps is None:
            raise ValueError(f"`sampler_logps` is required when sampler_correction={config.sampler_correction!r}")
        rho = sampler_importance_weights(old, sampler_logps, mask, config.sampler_correction,
                                         config.sampler_clip_min, config.sampler_clip_max)
        rho_mask = mask if rho.shape == mask.shape else jnp.ones((B, 1), bool)
        metrics["sampling/importance_sampling_ratio/mean"] = mean_metric(rho, rho_mask)
        metrics["sampling/importance_sampling_ratio/min"] = masked_min(rho, rho_mask)
        metrics["sampling/importance_sampling_ratio/max"] = masked_max(rho, rho_mask)
        if config.loss_type == "vespo":
            sampler_log_is = jnp.where(rho > 0, jnp.log(jnp.where(rho > 0, rho, 1.0)), -jnp.inf)

    # 2. surrogate
    lt = config.loss_type
    eps_l: Any = config.epsilon  # a scalar, or [B, T] with the entropy-dependent clip
    eps_h: Any = config.effective_epsilon_high
    if config.high_entropy_epsilon is not None:
        if entropies is None:
            raise ValueError("`entropies` is required when high_entropy_epsilon is set")
        _, high_ent = entropy_dependent_epsilon(entropies, mask, quantile=config.entropy_clip_quantile)
        he_l = config.high_entropy_epsilon
        he_h = he_l if config.high_entropy_epsilon_high is None else config.high_entropy_epsilon_high
        eps_l = jnp.where(high_ent, he_l, eps_l).astype(logps.dtype)
        eps_h = jnp.where(high_ent, he_h, eps_h).astype(logps.dtype)
        metrics["entropy_clip/high_entropy_frac"] = mean_metric(high_ent.astype(jnp.float32), mask)
    inputs = SurrogateInputs(config, logps_safe, old, ratio_old, raw_log_ratio, log_ratio, ratio, adv, mask, eps_l,
                             eps_h, sampler_logps, sampler_log_is, rng, metrics)
    per_token = POLICY_LOSS_REGISTRY[lt].surrogate(inputs)

    # 3. off-policy sequence mask
    if config.off_policy_mask_threshold is not None:
        behaviour = old if sampler_logps is None else as_float(sampler_logps, "sampler_logps")
        opsm = off_policy_sequence_mask(adv, logps_safe, behaviour, mask, config.off_policy_mask_threshold)
        per_token = per_token * opsm
        metrics["off_policy_mask/kept_frac"] = mean_metric(opsm)

    # 4. high-entropy token mask
    effective_mask = mask
    if _runs(config.top_entropy_quantile, entropies, off=1.0):
        if entropies is None:
            raise ValueError("`entropies` is required when top_entropy_quantile < 1")
        if entropy_threshold is not None and jnp.ndim(entropy_threshold) != 0:
            raise ValueError(f"`entropy_threshold` must be a scalar, got shape {tuple(jnp.shape(entropy_threshold))}")
        keep = high_entropy_mask(entropies, mask, config.top_entropy_quantile, entropy_threshold)
        per_token = jnp.where(keep, per_token, jnp.zeros((), per_token.dtype))
        effective_mask = keep
        metrics["entropy_mask/kept_frac"] = mean_metric(keep.astype(jnp.float32), mask)

    # 5. sampler IS weight
    if rho is not None and lt == "gmpo" and rho.shape == mask.shape:
        # GMPO's per-sequence loss takes the geometric mean of the token weights (as verl's geo_mean)
        log_rho = jnp.where(mask, jnp.log(jnp.where(mask, rho, 1.0) + 1e-10), 0.0)
        n_tok = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(log_rho.dtype)
        per_token = per_token * jnp.exp(jnp.sum(log_rho, axis=-1, keepdims=True) / n_tok)
    elif rho is not None and lt != "vespo":
        per_token = per_token * rho

    # 6. KL to the reference (and Kimi's squared log-ratio term, also unmasked by 3-5)
    if maybe_nonzero(config.squared_log_ratio_coef):
        tok_lr = importance_log_ratio(logps_safe, ratio_old, mask, "token")
        per_token = per_token + squared_log_ratio_penalty(tok_lr, config.squared_log_ratio_coef)
    if _runs(config.beta, ref_logps):
        if ref_logps is None:
            raise ValueError(f"`ref_logps` is required when beta={config.beta} != 0")
        ref = jnp.where(mask, as_float(ref_logps, "ref_logps"), zero)
        kl = kl_penalty(logps_safe, ref, mask, config.kl_estimator, clamp=config.log_ratio_clamp)
        metrics["kl"] = mean_metric(kl, mask)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + config.beta * kl

    # 7. aggregation
    loss = aggregate(per_token, mask, config.aggregation_mode, num_items=num_items, num_sequences=num_sequences,
                     max_completion_length=config.max_completion_length)
    metrics["policy_loss"] = jax.lax.stop_gradient(loss)

    # 8. entropy bonus
    if entropies is not None:
        ent = as_float(entropies, "entropies")
        metrics["entropy"] = mean_metric(ent, mask)
        if _runs(config.entropy_coef, entropies):
            ent_mean = masked_sum(ent, effective_mask) / jnp.maximum(jnp.sum(effective_mask), 1).astype(ent.dtype)
            if num_items is not None:
                # this micro-batch's token share, so that micro-batch losses sum to the full-batch bonus
                ent_mean = ent_mean * jnp.sum(mask).astype(ent.dtype) / jnp.maximum(
                    jnp.asarray(num_items, ent.dtype), 1)
            loss = loss - config.entropy_coef * ent_mean
    elif _runs(config.entropy_coef, entropies):
        raise ValueError(f"`entropies` is required when entropy_coef={config.entropy_coef} != 0")

    metrics["num_tokens"] = jnp.sum(mask).astype(jnp.float32)
    return loss, metrics


# ----------------------------------------------------------------------------- surrogate registry


class SurrogateInputs(NamedTuple):
    """What step 2 of :func:`policy_loss` hands a surrogate (see :func:`register_policy_loss`).

    ``logps`` / ``old_logps`` are ``[B, T]`` with 0 under the mask (``old_logps`` a constant);
    ``ratio_old`` is the ratio's denominator (``sg(logps)`` with ``force_on_policy_ratio``);
    ``log_ratio`` / ``ratio`` are the clamped importance log-ratio / ratio at the config's level
    (``[B, T]``, or ``[B, 1]`` for ``sequence``) and ``raw_log_ratio`` the unclamped one; ``advantages``
    ``[B, 1]`` or ``[B, T]`` (constants, NaN already 0); ``epsilon_low`` / ``epsilon_high`` scalars or
    ``[B, T]`` (entropy-dependent clip); ``sampler_log_is`` the log sampler IS weight (VESPO only); a
    surrogate may add scalar metrics to ``metrics`` (``Mean`` pairs via ``mean_metric``).
    """

    config: PolicyLossConfig
    logps: jax.Array
    old_logps: jax.Array
    ratio_old: jax.Array
    raw_log_ratio: jax.Array
    log_ratio: jax.Array
    ratio: jax.Array
    advantages: jax.Array
    mask: jax.Array
    epsilon_low: Any
    epsilon_high: Any
    sampler_logps: Optional[ArrayLike]
    sampler_log_is: Optional[jax.Array]
    rng: Optional[jax.Array]
    metrics: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PolicyLossType:
    """A registered ``loss_type``: its per-token ``surrogate`` (``SurrogateInputs -> [B, T]`` or
    broadcastable loss to minimise), the default ``aggregation`` (an :func:`aggregate` mode) and whether it
    is defined at ``importance_sampling_level="token"`` only."""

    surrogate: Callable[[SurrogateInputs], jax.Array]
    aggregation: str
    token_level_only: bool = False


POLICY_LOSS_REGISTRY: Dict[str, PolicyLossType] = {}
"""Every ``loss_type`` :class:`PolicyLossConfig` accepts, built-ins included (name -> :class:`PolicyLossType`)."""


def register_policy_loss(name: str, surrogate: Callable[[SurrogateInputs], jax.Array], *,
                         aggregation: str = "token_mean", token_level_only: bool = False,
                         overwrite: bool = False) -> PolicyLossType:
    """Register a surrogate under ``loss_type=name``, so :class:`PolicyLossConfig` accepts it and
    :func:`policy_loss` runs it through the whole pipeline (ratio and clamp, sampler correction, OPSM,
    entropy mask, KL, aggregation, entropy bonus, metrics) without editing trlax. The built-in loss
    types are registered the same way.

    Args:
      name: the new ``loss_type``.
      surrogate: ``SurrogateInputs -> per-token loss`` (pure and jit-compatible; read hyperparameters from
        ``inputs.config``).
      aggregation: its default :func:`aggregate` mode (``loss_agg_mode`` overrides it).
      token_level_only: reject ``importance_sampling_level`` other than ``token``.
      overwrite: allow replacing an existing name (built-ins included).

    Examples:
      >>> import jax.numpy as jnp
      >>> from trlax.objectives import PolicyLossConfig, policy_loss, register_policy_loss
      >>> def reinforce(x):  # -A log pi per token (the importance ratio is ignored)
      ...     return -x.advantages * x.logps
      >>> _ = register_policy_loss("reinforce_doc", reinforce, token_level_only=True, overwrite=True)
      >>> logps = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
      >>> mask = jnp.array([[1, 1], [1, 0]], bool)
      >>> config = PolicyLossConfig(loss_type="reinforce_doc")
      >>> loss, _ = policy_loss(logps, logps, jnp.array([1.0, -1.0]), mask, config)
      >>> print(round(float(loss), 4))  # token mean of [1, 2] and [-0.5]: 2.5 / 3
      0.8333
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a non-empty string")
    if name in POLICY_LOSS_REGISTRY and not overwrite:
        raise ValueError(f"loss_type {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(surrogate):
        raise TypeError(f"`surrogate` must be callable, got {type(surrogate).__name__}")
    check_choice("aggregation", aggregation, AGGREGATION_MODES)
    entry = PolicyLossType(surrogate, aggregation, bool(token_level_only))
    POLICY_LOSS_REGISTRY[name] = entry
    return entry


def _clip_surrogate(x: SurrogateInputs) -> jax.Array:
    """PPO clip (ε_low / ε_high, δ, dual clip) and its clip-fraction metrics."""
    c, ratio, adv, mask = x.config, x.ratio, x.advantages, x.mask
    per_token = ppo_clip_loss(ratio, adv, x.epsilon_low, x.epsilon_high, c.delta, clip_ratio_c=c.clip_ratio_c)
    low, high, region = clip_indicators(ratio, adv, x.epsilon_low, x.epsilon_high)
    # token level: a fraction of tokens; sequence level ([B, 1] ratio and advantage): of rows
    cm = mask if low.shape == mask.shape else jnp.ones(low.shape, bool)
    for name, ind in (("low", low), ("high", high), ("region", region)):
        x.metrics[f"clip_ratio/{name}_mean"] = mean_metric(ind.astype(jnp.float32), cm)
    if c.clip_ratio_c is not None:
        dual = dual_clip_indicator(ratio, adv, x.epsilon_low, x.epsilon_high, c.clip_ratio_c)
        x.metrics["clip_ratio/dual_mean"] = mean_metric(dual.astype(jnp.float32), cm)
    return per_token


def _cispo_surrogate(x: SurrogateInputs) -> jax.Array:
    clipped = jnp.broadcast_to((jax.lax.stop_gradient(x.ratio) > x.epsilon_high) & (x.advantages > 0), x.mask.shape)
    x.metrics["cispo_clip_ratio"] = mean_metric(clipped.astype(jnp.float32), x.mask)
    return cispo_loss(x.ratio, x.advantages, x.logps, x.epsilon_high)


def _sapo_surrogate(x: SurrogateInputs) -> jax.Array:
    return sapo_loss(x.ratio, x.advantages, x.config.sapo_temperature_pos, x.config.sapo_temperature_neg)


def _vespo_surrogate(x: SurrogateInputs) -> jax.Array:
    c = x.config
    tok_lr = importance_log_ratio(x.logps, x.old_logps, x.mask, "token")
    phi = vespo_weights(tok_lr, x.advantages, x.mask, sampler_log_is=x.sampler_log_is, k_pos=c.vespo_k_pos,
                        lambda_pos=c.vespo_lambda_pos, k_neg=c.vespo_k_neg, lambda_neg=c.vespo_lambda_neg)
    x.metrics["vespo/phi_seq_mean"] = mean_metric(phi)
    return vespo_loss(phi, x.advantages, x.logps)


# The beyond-TRL surrogates (token level). ``raw_log_ratio`` is the unclamped token log-ratio, ``log_ratio``
# / ``ratio`` the clamped ones (against ``ratio_old``); DPPO and M2PO measure the divergence from the
# behaviour policy ``old_logps`` (sampler log-probs for M2PO when given), also under force_on_policy_ratio.


def _gmpo_surrogate(x: SurrogateInputs) -> jax.Array:
    per_token = gmpo_loss(x.raw_log_ratio, x.advantages, x.mask, x.epsilon_low, x.epsilon_high,
                          x.config.log_ratio_clamp)
    hi, lo = gmpo_clip_indicators(x.raw_log_ratio, x.advantages, x.mask, x.epsilon_low, x.epsilon_high)
    x.metrics["clip_ratio/high_mean"] = mean_metric(hi.astype(jnp.float32), x.mask)
    x.metrics["clip_ratio/low_mean"] = mean_metric(lo.astype(jnp.float32), x.mask)
    return per_token


def _gpg_surrogate(x: SurrogateInputs) -> jax.Array:
    return reinforce_loss(x.logps, x.advantages)


def _clip_cov_surrogate(x: SurrogateInputs) -> jax.Array:
    c = x.config
    if x.rng is None:
        raise ValueError("`rng` (a jax.random key) is required when loss_type='clip_cov'")
    cov = covariance_scores(x.advantages, x.logps, x.mask)
    _, _, region = clip_indicators(x.ratio, x.advantages, x.epsilon_low, x.epsilon_high)
    sel = clip_cov_mask(cov, x.mask, jnp.broadcast_to(region, x.mask.shape), x.rng, c.clip_cov_ratio,
                        c.clip_cov_lb, c.clip_cov_ub)
    x.metrics["clip_cov/selected_frac"] = mean_metric(sel.astype(jnp.float32), x.mask)
    return clip_cov_loss(x.ratio, x.advantages, sel, x.epsilon_low, x.epsilon_high)


def _kl_cov_surrogate(x: SurrogateInputs) -> jax.Array:
    cov = covariance_scores(x.advantages, x.logps, x.mask)
    sel = kl_cov_mask(cov, x.mask, x.config.kl_cov_ratio)
    x.metrics["kl_cov/selected_frac"] = mean_metric(sel.astype(jnp.float32), x.mask)
    return kl_cov_loss(x.ratio, x.log_ratio, x.advantages, sel, x.config.ppo_kl_coef)


def _aspo_surrogate(x: SurrogateInputs) -> jax.Array:
    c = x.config
    return aspo_loss(x.ratio, x.advantages, x.logps, x.epsilon_low, x.epsilon_high, c.aspo_negative_clip_ratio_c,
                     c.aspo_positive_clip_ratio_c)


def _topr_surrogate(x: SurrogateInputs) -> jax.Array:
    c, r = x.config, x.ratio
    if c.topr_sequence_ratio:
        seq = jnp.sum(jnp.where(x.mask, x.raw_log_ratio, 0.0), axis=-1, keepdims=True)
        if c.log_ratio_clamp is not None:
            seq = jnp.clip(seq, -c.log_ratio_clamp, c.log_ratio_clamp)
        r = jnp.exp(seq)
    return topr_loss(r, x.advantages, x.logps, c.topr_positive_weight, c.topr_negative_weight)


def _dppo_surrogate(x: SurrogateInputs) -> jax.Array:
    keep = dppo_mask(x.logps, x.old_logps, x.advantages, x.mask, x.epsilon_low, x.epsilon_high,
                     x.config.dppo_divergence)
    x.metrics["dppo/masked_frac"] = mean_metric((x.mask & ~keep).astype(jnp.float32), x.mask)
    return dppo_loss(x.ratio, x.advantages, x.logps, keep, x.config.dppo_ratio_cap)


def _m2po_surrogate(x: SurrogateInputs) -> jax.Array:
    # second moment of log π_θ − log π_behaviour (sampler log-probs when given, else old)
    mask, logps = x.mask, x.logps
    if x.sampler_logps is not None:
        samp = as_float(x.sampler_logps, "sampler_logps")
        ok = mask & ~jnp.isnan(samp)
        behav = jnp.where(ok, samp, jax.lax.stop_gradient(logps))
        m2_lr = jax.lax.stop_gradient(jnp.where(ok, logps - behav, 0.0))
    else:
        m2_lr = jax.lax.stop_gradient(jnp.where(mask, logps - x.old_logps, 0.0))
    keep = m2po_mask(m2_lr, mask, x.config.m2po_threshold)
    x.metrics["m2po/masked_frac"] = mean_metric((mask & ~keep).astype(jnp.float32), mask)
    return m2po_loss(x.ratio, x.advantages, keep)


for _name in _CLIP_LOSSES:
    register_policy_loss(_name, _clip_surrogate, aggregation=_name)
register_policy_loss("cispo", _cispo_surrogate, aggregation="cispo")
register_policy_loss("sapo", _sapo_surrogate, aggregation="sapo")
register_policy_loss("vespo", _vespo_surrogate, aggregation="vespo")
for _name, _fn in (("gmpo", _gmpo_surrogate), ("gpg", _gpg_surrogate), ("clip_cov", _clip_cov_surrogate),
                   ("kl_cov", _kl_cov_surrogate), ("aspo", _aspo_surrogate), ("topr", _topr_surrogate),
                   ("dppo", _dppo_surrogate), ("m2po", _m2po_surrogate)):
    register_policy_loss(_name, _fn, aggregation=_DEFAULT_AGGREGATION[_name], token_level_only=True)


def adaptive_entropy_coef(
    coef: ArrayLike,
    window_entropy: ArrayLike,
    target: Scalar = 0.2,
    delta: Scalar = 0.005,
    coef_min: Scalar = 0.0,
    coef_max: Scalar = 1.0,
) -> jax.Array:
    """Skywork-OR1 adaptive entropy controller (arXiv 2505.22312, sec. 3.2.3; TRL
    ``use_adaptive_entropy``): after each optimiser step, raise the coefficient by ``delta`` when the
    window's entropy is at or below ``target``, else lower it, within ``[coef_min, coef_max]``.
    Pure: the caller keeps ``coef`` in its train state. The bonus is applied only while the last
    window's entropy is ``≤ target`` (use ``jnp.where(window_entropy <= target, coef, 0)``)."""
    coef, window_entropy = jnp.asarray(coef), jnp.asarray(window_entropy)
    return jnp.where(window_entropy <= target, jnp.minimum(coef + delta, coef_max), jnp.maximum(coef - delta, coef_min))


__all__ = ["ALL_POLICY_LOSS_TYPES", "BEYOND_TRL_LOSS_TYPES", "POLICY_LOSS_REGISTRY", "POLICY_LOSS_TYPES",
           "PolicyLossConfig", "PolicyLossType", "SurrogateInputs", "adaptive_entropy_coef", "policy_loss",
           "register_policy_loss"]
