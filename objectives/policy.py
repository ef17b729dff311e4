"""The GRPO-family recipe: :class:`PolicyLossConfig` + :func:`policy_loss`.

One function covers every policy-gradient loss of TRL's ``GRPOTrainer`` and the TRL paper index
(GRPO, DAPO, Dr. GRPO, GSPO, GSPO-token, Lite PPO, CISPO / ScaleRL, SAPO, LUSPO, VESPO, INTELLECT-2,
DeepSeek-V3.2, Beyond-80/20, Skywork-OR1, truncated / masked IS). Per-token pipeline, in TRL's order:

1. importance log-ratio at ``importance_sampling_level`` (token / sequence / sequence_token),
   clamped to ``±log_ratio_clamp`` before ``exp``;
2. per-token surrogate of ``loss_type`` (PPO clip with ε_low / ε_high / δ, CISPO, SAPO, VESPO);
3. × off-policy sequence mask (OPSM) if ``off_policy_mask_threshold`` is set;
4. × high-entropy token mask if ``top_entropy_quantile < 1``;
5. × sampler importance weight if ``sampler_correction`` is set (not for VESPO, where it is inside φ);
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
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives import advantages as _adv  # noqa: F401  (re-exported names live there)
from trlax.objectives._checks import (
    as_float,
    as_mask,
    check_choice,
    check_range,
    check_rank,
    check_same_shape,
)
from trlax.objectives.aggregation import Mean, aggregate, masked_max, masked_min, masked_sum, mean_metric
from trlax.objectives.correction import (
    SAMPLER_CORRECTION_MODES,
    off_policy_sequence_mask,
    sampler_importance_weights,
    sampler_log_ratio,
)
from trlax.objectives.entropy import high_entropy_mask, mask_truncated_completions
from trlax.objectives.kl import KL_ESTIMATORS, kl_penalty
from trlax.objectives.ratios import IMPORTANCE_SAMPLING_LEVELS, importance_log_ratio
from trlax.objectives.surrogates import (
    cispo_loss,
    clip_indicators,
    ppo_clip_loss,
    sapo_loss,
    vespo_loss,
    vespo_weights,
)

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_CLIP_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Static configuration of :func:`policy_loss` (hashable: pass it as a static argument to ``jit``).

    Field names follow TRL's ``GRPOConfig`` where one exists. Defaults equal TRL 1.16's defaults,
    except ``sampler_correction`` (None here: no sampler log-probs are assumed).

    Attributes:
      loss_type: ``grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo``.
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
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = True
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None
    sampler_correction: Optional[str] = None
    sampler_clip_min: Optional[float] = None
    sampler_clip_max: Optional[float] = 3.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    max_completion_length: Optional[int] = None
    entropy_coef: float = 0.0
    mask_truncated_completions: bool = False
    log_ratio_clamp: Optional[float] = 20.0

    def __post_init__(self):
        check_choice("loss_type", self.loss_type, POLICY_LOSS_TYPES)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_range("epsilon", self.epsilon, low=0.0)
        check_range("epsilon_high", self.epsilon_high, low=0.0, allow_none=True)
        check_range("delta", self.delta, low=1.0, low_inclusive=False, allow_none=True)
        check_range("beta", self.beta, low=0.0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_range("top_entropy_quantile", self.top_entropy_quantile, low=0.0, high=1.0, low_inclusive=False)
        check_range("off_policy_mask_threshold", self.off_policy_mask_threshold, low=0.0, allow_none=True)
        if self.sampler_correction is not None:
            check_choice("sampler_correction", self.sampler_correction, SAMPLER_CORRECTION_MODES)
            if self.sampler_clip_min is None and self.sampler_clip_max is None:
                raise ValueError("sampler_clip_min and sampler_clip_max are both None; set at least one bound")
        check_range("sampler_clip_min", self.sampler_clip_min, low=0.0, allow_none=True)
        check_range("sampler_clip_max", self.sampler_clip_max, low=0.0, allow_none=True)
        if self.sampler_clip_min is not None and self.sampler_clip_max is not None:
            if self.sampler_clip_min > self.sampler_clip_max:
                raise ValueError(
                    f"sampler_clip_min={self.sampler_clip_min} must be <= sampler_clip_max={self.sampler_clip_max}"
                )
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

    # ------------------------------------------------------------------------------------ presets
    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def replace(self, **changes) -> "PolicyLossConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def grpo(cls, **overrides) -> "PolicyLossConfig":
        """GRPO / DeepSeekMath (arXiv 2402.03300; paper index with DeepSeek-R1 values): per-sequence
        token mean, ``beta=0.001``, ``epsilon=10.0`` (R1's very loose clip), k3 KL."""
        return cls(**{"loss_type": "grpo", "beta": 0.001, "epsilon": 10.0, "use_bias_correction_kl": False, **overrides})

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

    PRESETS = ("grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "lite_ppo", "cispo", "sapo", "luspo", "vespo",
               "intellect2", "deepseek_v32", "high_entropy", "skywork_or1", "tis", "icepop")

    @classmethod
    def preset(cls, name: str, **overrides) -> "PolicyLossConfig":
        check_choice("preset", name, cls.PRESETS)
        return getattr(cls, name)(**overrides)

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


def _advantages_2d(advantages, B: int, T: int) -> jnp.ndarray:
    adv = as_float(advantages, "advantages")
    if adv.ndim == 1 and adv.shape[0] == B:
        return adv[:, None]
    if adv.ndim == 2 and adv.shape in ((B, 1), (B, T)):
        return adv
    raise ValueError(f"`advantages` must have shape ({B},), ({B}, 1) or ({B}, {T}), got {tuple(adv.shape)}")


def policy_loss(
    logps: jnp.ndarray,
    old_logps: Optional[jnp.ndarray],
    advantages: jnp.ndarray,
    mask: jnp.ndarray,
    config: PolicyLossConfig,
    *,
    ref_logps: Optional[jnp.ndarray] = None,
    sampler_logps: Optional[jnp.ndarray] = None,
    entropies: Optional[jnp.ndarray] = None,
    num_items: Optional[Any] = None,
    num_sequences: Optional[Any] = None,
    entropy_threshold: Optional[jnp.ndarray] = None,
    truncated: Optional[jnp.ndarray] = None,
) -> Tuple[jnp.ndarray, Dict[str, Any]]:
    """GRPO-family policy loss (pipeline in the module docstring).

    Args:
      logps: ``[B, T]`` log π_θ of the sampled tokens (differentiable; any float dtype, computed in
        float32 or wider).
      old_logps: ``[B, T]`` log π_old (stop-gradient), or ``None`` for on-policy (``sg(logps)``).
      advantages: ``[B]``, ``[B, 1]`` or ``[B, T]`` (stop-gradient).
      mask: ``[B, T]`` completion mask.
      config: :class:`PolicyLossConfig` (static).
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

    Returns:
      ``(loss, metrics)``: scalar loss and a dict of ``Mean`` pairs / min / max scalars.
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
    old = jax.lax.stop_gradient(logps_safe) if old_logps is None else jax.lax.stop_gradient(
        jnp.where(mask, as_float(old_logps, "old_logps"), zero))
    metrics: Dict[str, Any] = {}

    # 1. importance ratio
    log_ratio = importance_log_ratio(logps_safe, old, mask, config.importance_sampling_level)
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
    eps_l, eps_h = config.epsilon, config.effective_epsilon_high
    if lt in _CLIP_LOSSES:
        per_token = ppo_clip_loss(ratio, adv, eps_l, eps_h, config.delta)
        low, high, region = clip_indicators(ratio, adv, eps_l, eps_h)
        # token level: a fraction of tokens; sequence level ([B, 1] ratio and advantage): of rows
        cm = mask if low.shape == mask.shape else jnp.ones(low.shape, bool)
        for name, ind in (("low", low), ("high", high), ("region", region)):
            metrics[f"clip_ratio/{name}_mean"] = mean_metric(ind.astype(jnp.float32), cm)
    elif lt == "cispo":
        per_token = cispo_loss(ratio, adv, logps_safe, eps_h)
        clipped = jnp.broadcast_to((jax.lax.stop_gradient(ratio) > eps_h) & (adv > 0), mask.shape)
        metrics["cispo_clip_ratio"] = mean_metric(clipped.astype(jnp.float32), mask)
    elif lt == "sapo":
        per_token = sapo_loss(ratio, adv, config.sapo_temperature_pos, config.sapo_temperature_neg)
    else:  # vespo
        tok_lr = importance_log_ratio(logps_safe, old, mask, "token")
        phi = vespo_weights(tok_lr, adv, mask, sampler_log_is=sampler_log_is, k_pos=config.vespo_k_pos,
                            lambda_pos=config.vespo_lambda_pos, k_neg=config.vespo_k_neg,
                            lambda_neg=config.vespo_lambda_neg)
        per_token = vespo_loss(phi, adv, logps_safe)
        metrics["vespo/phi_seq_mean"] = mean_metric(phi)

    # 3. off-policy sequence mask
    if config.off_policy_mask_threshold is not None:
        behaviour = old if sampler_logps is None else as_float(sampler_logps, "sampler_logps")
        opsm = off_policy_sequence_mask(adv, logps_safe, behaviour, mask, config.off_policy_mask_threshold)
        per_token = per_token * opsm
        metrics["off_policy_mask/kept_frac"] = mean_metric(opsm)

    # 4. high-entropy token mask
    effective_mask = mask
    if config.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("`entropies` is required when top_entropy_quantile < 1")
        if entropy_threshold is not None and jnp.ndim(entropy_threshold) != 0:
            raise ValueError(f"`entropy_threshold` must be a scalar, got shape {tuple(jnp.shape(entropy_threshold))}")
        keep = high_entropy_mask(entropies, mask, config.top_entropy_quantile, entropy_threshold)
        per_token = jnp.where(keep, per_token, jnp.zeros((), per_token.dtype))
        effective_mask = keep
        metrics["entropy_mask/kept_frac"] = mean_metric(keep.astype(jnp.float32), mask)

    # 5. sampler IS weight
    if rho is not None and lt != "vespo":
        per_token = per_token * rho

    # 6. KL to the reference
    if config.beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"`ref_logps` is required when beta={config.beta} != 0")
        ref = jnp.where(mask, as_float(ref_logps, "ref_logps"), zero)
        kl = kl_penalty(logps_safe, ref, mask, config.kl_estimator, clamp=config.log_ratio_clamp)
        metrics["kl"] = mean_metric(kl, mask)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + config.beta * kl

    # 7. aggregation
    loss = aggregate(per_token, mask, lt, num_items=num_items, num_sequences=num_sequences,
                     max_completion_length=config.max_completion_length)
    metrics["policy_loss"] = jax.lax.stop_gradient(loss)

    # 8. entropy bonus
    if entropies is not None:
        ent = as_float(entropies, "entropies")
        metrics["entropy"] = mean_metric(ent, mask)
        if config.entropy_coef != 0.0:
            ent_mean = masked_sum(ent, effective_mask) / jnp.maximum(jnp.sum(effective_mask), 1).astype(ent.dtype)
            if num_items is not None:
                # this micro-batch's token share, so that micro-batch losses sum to the full-batch bonus
                ent_mean = ent_mean * jnp.sum(mask).astype(ent.dtype) / jnp.maximum(
                    jnp.asarray(num_items, ent.dtype), 1)
            loss = loss - config.entropy_coef * ent_mean
    elif config.entropy_coef != 0.0:
        raise ValueError(f"`entropies` is required when entropy_coef={config.entropy_coef} != 0")

    metrics["num_tokens"] = jnp.sum(mask).astype(jnp.float32)
    return loss, metrics


def adaptive_entropy_coef(
    coef: jnp.ndarray,
    window_entropy: jnp.ndarray,
    target: float = 0.2,
    delta: float = 0.005,
    coef_min: float = 0.0,
    coef_max: float = 1.0,
) -> jnp.ndarray:
    """Skywork-OR1 adaptive entropy controller (arXiv 2505.22312, sec. 3.2.3; TRL
    ``use_adaptive_entropy``): after each optimiser step, raise the coefficient by ``delta`` when the
    window's entropy is at or below ``target``, else lower it, within ``[coef_min, coef_max]``.
    Pure: the caller keeps ``coef`` in its train state. The bonus is applied only while the last
    window's entropy is ``≤ target`` (use ``jnp.where(window_entropy <= target, coef, 0)``)."""
    coef = jnp.asarray(coef)
    return jnp.where(window_entropy <= target, jnp.minimum(coef + delta, coef_max), jnp.maximum(coef - delta, coef_min))


__all__ = ["POLICY_LOSS_TYPES", "PolicyLossConfig", "adaptive_entropy_coef", "policy_loss"]
