"""Parity with TRL 1.16's own GRPOTrainer loss code (TRL as a test-time oracle).

``GRPOTrainer._compute_loss`` is called unbound on a small stand-in ``self`` that carries exactly the
attributes the method reads; the model forward is replaced by a function returning our per-token
log-probs (float64 torch tensors with ``requires_grad``) and entropies. Loss values and gradients
w.r.t. the log-probs are compared with :func:`trlax.objectives.policy_loss` (float64, rtol 1e-6).

TRL computes the vLLM importance-sampling ratio inside its generation step (not a callable), so the
test builds that tensor in torch from TRL's documented recipe (``exp((old − sampler)·mask)`` with NaN
-> 0, summed for sequence modes, then clamped or masked), and trlax computes its own from the raw
sampler log-probs: the two paths meet only at the final loss.
"""

from __future__ import annotations

import collections
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trlax.objectives import PolicyLossConfig, finalize_metrics, policy_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer

B, T = 6, 7


class _Accel:
    num_processes = 1
    sync_gradients = True

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _make_stub(cfg: PolicyLossConfig, use_vllm: bool, entropy_coef: float):
    args = types.SimpleNamespace(
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        delta=cfg.delta,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos,
        vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
        steps_per_generation=1,
        entropy_target=0.2,
    )
    s = types.SimpleNamespace(
        args=args,
        aux_loss_enabled=False,
        top_entropy_quantile=cfg.top_entropy_quantile,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.effective_epsilon_high,
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=cfg.max_completion_length or T,
        accelerator=_Accel(),
        _entropy_bonus_enabled=entropy_coef != 0.0,
        use_adaptive_entropy=False,
        entropy_coef=entropy_coef,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
    s.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    s.get_gamma_weights = GRPOTrainer.get_gamma_weights
    return s


def _trl_is_ratio(old, sampler, mask, mode, cmin, cmax):
    d = torch.nan_to_num((old - sampler) * mask, nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = torch.exp(d)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=cmin, max=cmax)
    lo = -math.inf if cmin is None else cmin
    hi = math.inf if cmax is None else cmax
    return r.masked_fill((r < lo) | (r > hi), 0.0)


def trl_loss_and_grad(cfg, logps, old, adv, mask, ref, sampler, ent):
    use_vllm = cfg.sampler_correction is not None
    stub = _make_stub(cfg, use_vllm, cfg.entropy_coef)
    lp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    ent_t = torch.tensor(ent, dtype=torch.float64)
    mask_t = torch.tensor(mask, dtype=torch.float64)
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent_t, None)
    inputs = {
        "prompt_ids": torch.zeros((B, 2), dtype=torch.long),
        "prompt_mask": torch.ones((B, 2), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
        "completion_mask": mask_t,
        "advantages": torch.tensor(adv, dtype=torch.float64),
        "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
        "num_items_in_batch": mask_t.sum(),
    }
    if cfg.beta != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float64)
    if use_vllm:
        samp = torch.tensor(sampler, dtype=torch.float64)
        inputs["sampling_per_token_logps"] = samp
        inputs["importance_sampling_ratio"] = _trl_is_ratio(
            inputs["old_per_token_logps"], samp, mask_t, cfg.sampler_correction, cfg.sampler_clip_min, cfg.sampler_clip_max
        )
    # TRL builds some constants from Python scalars (e.g. SAPO's temperatures through torch.where), which
    # torch makes float32 by default; float64 default keeps the oracle at float64 precision throughout.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss = GRPOTrainer._compute_loss(stub, None, inputs)
        loss.backward()
    finally:
        torch.set_default_dtype(prev)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.item(), lp.grad.numpy(), metrics


def _inputs(seed, nan_sampler=False):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-1.5, 0.6, (B, T))
    old = logps + rng.normal(0.0, 0.25, (B, T))
    ref = logps + rng.normal(0.0, 0.3, (B, T))
    sampler = old + rng.normal(0.0, 0.3, (B, T))
    if nan_sampler:
        sampler[0, 1] = np.nan
        sampler[3, 0] = np.nan
    ent = rng.uniform(0.0, 3.0, (B, T))
    lengths = np.array([T, T - 2, 3, T, 1, T - 1])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(0.0, 1.0, (B,))
    adv[2] = 0.0
    return logps, old, adv, mask, ref, sampler, ent


_jit_cache = {}


def trlax_loss_and_grad(cfg, logps, old, adv, mask, ref, sampler, ent):
    fn = _jit_cache.get(cfg)
    if fn is None:

        def f(lp, old, adv, mask, ref, sampler, ent):
            return policy_loss(lp, old, adv, mask, cfg, ref_logps=ref, sampler_logps=sampler, entropies=ent)

        # Eager (no jit): hundreds of static configs, and op-by-op dispatch is far cheaper than
        # compiling each one on a 2-core CPU. The jitted path is exercised by the other test files.
        fn = jax.value_and_grad(f, has_aux=True)
        _jit_cache[cfg] = fn
    if cfg.sampler_correction is None:
        sampler = None  # TRL only has sampler log-probs with vLLM; OPSM then falls back to old log-probs
    (loss, metrics), grad = fn(logps, old, adv, mask.astype(bool), ref, sampler, ent)
    return float(loss), np.asarray(grad), {k: float(v) for k, v in finalize_metrics(metrics).items()}


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
LEVELS = ["token", "sequence"]
KL = [(0.0, False), (0.05, False), (0.05, True)]
SAMPLER = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
EXTRAS = ["none", "opsm", "entropy_mask", "entropy_bonus", "all"]


def _config(loss_type, level, kl, sampler, extra, delta=None):
    beta, bias = kl
    kw = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        use_bias_correction_kl=bias,
        epsilon=0.2,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28,
        delta=delta,
        sampler_correction=sampler,
        sampler_clip_min=0.6 if sampler and sampler.endswith("mask") else None,
        sampler_clip_max=1.5,
        max_completion_length=10,
    )
    if extra in ("opsm", "all"):
        kw["off_policy_mask_threshold"] = 0.02
    if extra in ("entropy_mask", "all"):
        kw["top_entropy_quantile"] = 0.4
    if extra in ("entropy_bonus", "all"):
        kw["entropy_coef"] = 0.03
    return PolicyLossConfig(**kw)


def _cases():
    for lt, level, kl, samp, extra in itertools.product(LOSS_TYPES, LEVELS, KL, SAMPLER, EXTRAS):
        if lt == "vespo" and samp is not None and samp.startswith("sequence"):
            continue  # TRL rejects this combination (VESPO needs token-level correction)
        if lt == "vespo" and level == "sequence":
            continue  # VESPO is defined on token-level ratios (TRL warns; its phi uses token log-ratios)
        yield lt, level, kl, samp, extra


# metrics compared with TRL's (same name on both sides)
METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio", "kl",
           "entropy", "vespo/phi_seq_mean")


def _expected_metrics(cfg):
    """The METRICS both TRL and trlax must report for ``cfg`` (a renamed or dropped metric fails)."""
    out = {"entropy"}
    if cfg.beta != 0.0:
        out.add("kl")
    if cfg.loss_type == "cispo":
        out.add("cispo_clip_ratio")
    elif cfg.loss_type == "vespo":
        out.add("vespo/phi_seq_mean")
    elif cfg.loss_type != "sapo":  # SAPO's soft gate clips nothing
        out |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    return out


def _compare(cfg, seed, nan_sampler=False, check_metrics=True):
    data = _inputs(seed, nan_sampler)
    l_trl, g_trl, m_trl = trl_loss_and_grad(cfg, *data)
    l_jax, g_jax, m_jax = trlax_loss_and_grad(cfg, *data)
    np.testing.assert_allclose(l_jax, l_trl, rtol=1e-6, atol=1e-12, err_msg=str(cfg))
    np.testing.assert_allclose(g_jax, g_trl, rtol=1e-6, atol=1e-12, err_msg=str(cfg))
    expected = _expected_metrics(cfg)
    assert {k for k in METRICS if k in m_trl} == expected, (sorted(m_trl), cfg)
    assert {k for k in METRICS if k in m_jax} == expected, (sorted(m_jax), cfg)
    if check_metrics:
        for key in sorted(expected):
            if key == "kl" and cfg.use_bias_correction_kl:
                continue  # TRL logs the ratio-weighted KL, trlax logs the plain estimator
            np.testing.assert_allclose(m_jax[key], m_trl[key], rtol=1e-6, atol=1e-12, err_msg=f"{key} {cfg}")


ALL_CASES = list(_cases())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_trl(loss_type):
    """Every loss type x IS level x KL (off / on / bias-corrected) x sampler mode x OPSM / entropy
    mask / entropy bonus / all: same value, same gradient, same metrics as TRL."""
    cases = [c for c in ALL_CASES if c[0] == loss_type]
    assert len(cases) >= 30
    for i, (lt, level, kl, samp, extra) in enumerate(cases):
        _compare(_config(lt, level, kl, samp, extra), seed=i)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_two_sided_delta_matches_trl(loss_type):
    for level in LEVELS:
        # Metrics differ on purpose: TRL measures its clip fractions on the delta-capped ratio (so the
        # high clip never shows when delta < 1 + epsilon_high); trlax measures them on the ratio itself.
        _compare(_config(loss_type, level, (0.05, True), None, "none", delta=1.1), seed=3, check_metrics=False)


@pytest.mark.parametrize("mode", SAMPLER[1:])
def test_nan_sampler_logps_mean_no_correction_like_trl(mode):
    for lt in ["grpo", "dapo", "cispo"]:
        _compare(_config(lt, "token", (0.0, False), mode, "opsm"), seed=11, nan_sampler=True)


def test_from_trl_config_reproduces_trl_loss(tmp_path):
    """A whole TRL GRPOConfig dict -> PolicyLossConfig.from_trl -> same loss as TRL with that config."""
    from trl import GRPOConfig

    trl_cfg = GRPOConfig(
        output_dir=str(tmp_path),
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.02,
        top_entropy_quantile=0.5,
        off_policy_mask_threshold=0.1,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    cfg = PolicyLossConfig.from_trl(**trl_cfg.to_dict())
    assert cfg.loss_type == "dapo" and cfg.epsilon_high == 0.28 and cfg.beta == 0.02
    assert cfg.use_bias_correction_kl is True  # TRL 1.16 default
    assert cfg.sampler_correction is None  # use_vllm is False
    _compare(cfg.replace(max_completion_length=10), seed=5)
