"""Parity with TRL 1.16's own DPOTrainer loss code (TRL as a test-time oracle).

``DPOTrainer._compute_loss`` is called unbound on a small stand-in ``self`` that carries exactly the
attributes the method reads. TRL 1.16 computes log-probs with a fused LM head, so the policy "model"
is a callable returning an object whose ``log_probs`` are our per-token log-probs (float64 torch,
``requires_grad``; zero under padding, as the fused head gives for ignored labels) and whose
``log_sum_sq_probs`` feed WPO; the reference "model" returns the reference log-probs. Loss values and
gradients w.r.t. the per-token log-probs (chosen and rejected rows) are compared with
:func:`trlax.objectives.preference_loss` at rtol 1e-6, plus the logged reward / logp metrics.

TRL 1.16 bugs worked around (autograd bookkeeping only, the math is untouched): with
``use_weighting=True`` it multiplies the per-pair loss in place (``per_sequence_loss *= w``), which
breaks backward for ``hinge`` (``torch.relu`` saves its output) and raises for ``sft`` (an
``expand``-ed scalar). While TRL runs, ``torch.relu`` is replaced by ``torch.clamp(x, min=0)`` and
``Tensor.expand`` returns a copy; ``test_trl_wpo_inplace_bug_still_present`` pins the bug.

Exception: TRL's alpha-divergence guard looks its clamp up in a table keyed by float16 / bfloat16 /
float32 only, so TRL cannot run it on float64; those cases run both sides in float32 (rtol 2e-5).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import types

import jax
import numpy as np
import pytest
import torch

from trlax.objectives import PreferenceLossConfig, finalize_metrics, preference_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
DPOTrainer = trl_dpo.DPOTrainer

B, T = 5, 7


class _Accel:
    num_processes = 1
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


class _FakeModel:
    """Stands in for a model patched with TRL's fused LM head: returns fixed per-token outputs."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, **kwargs):
        return self.outputs


def _stub(cfg: PreferenceLossConfig, policy_out, ref_out):
    loss_types = list(cfg.loss_types)
    weights = list(cfg.loss_weights) if cfg.loss_weights is not None else None
    if cfg.rpo_alpha is not None:  # TRL 1.16 spells RPO as an extra "sft" loss
        weights = (weights or [1.0] * len(loss_types)) + [cfg.rpo_alpha]
        loss_types = loss_types + ["sft"]
    return types.SimpleNamespace(
        model=_FakeModel(policy_out),
        ref_model=_FakeModel(ref_out),
        accelerator=_Accel(),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=cfg.beta,
        loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types),
        ld_alpha=cfg.ld_alpha,
        f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        label_smoothing=cfg.label_smoothing,
        use_weighting=cfg.use_weighting,
        args=types.SimpleNamespace(discopop_tau=cfg.discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _inputs(seed):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.2, 0.6, (2, B, T))
    ref = lp + rng.normal(0.0, 0.4, (2, B, T))
    lssp = rng.uniform(-2.5, -0.3, (2, B, T))
    len_c = np.array([T, 4, 2, T - 1, 1])
    len_r = np.array([3, T, 2, T - 3, 5])
    mask = np.stack([np.arange(T)[None, :] < len_c[:, None], np.arange(T)[None, :] < len_r[:, None]])
    mask[0, 0, 3] = False  # a hole inside a chosen completion
    lp = np.where(mask, lp, np.nan)  # padding garbage must not leak into trlax
    return lp, ref, lssp, mask


@contextlib.contextmanager
def _no_inplace_autograd_traps():
    relu, expand = torch.relu, torch.Tensor.expand
    torch.relu = lambda x: torch.clamp(x, min=0.0)
    torch.Tensor.expand = lambda self, *size: expand(self, *size).clone()
    try:
        yield
    finally:
        torch.relu, torch.Tensor.expand = relu, expand


def trl_loss_and_grad(cfg, lp, ref, lssp, mask, dtype=torch.float64, reference_free=False, patch=True):
    m = torch.tensor(np.concatenate([mask[0], mask[1]]))
    lp_t = torch.tensor(np.nan_to_num(np.concatenate([lp[0], lp[1]])), dtype=dtype, requires_grad=True)
    ref_np = np.zeros_like(ref) if reference_free else ref
    ref_t = torch.tensor(np.concatenate([ref_np[0], ref_np[1]]), dtype=dtype)
    zeros = torch.zeros(2 * B, T, dtype=dtype)
    policy_out = types.SimpleNamespace(
        log_probs=torch.where(m, lp_t, torch.zeros((), dtype=dtype)),  # the fused head gives 0 at ignored labels
        log_sum_sq_probs=torch.tensor(np.concatenate([lssp[0], lssp[1]]), dtype=dtype),
        entropy=zeros, mean_logits=zeros, is_top1=torch.zeros(2 * B, T, dtype=torch.bool), aux_loss=None)
    ref_out = types.SimpleNamespace(log_probs=torch.where(m, ref_t, torch.zeros((), dtype=dtype)))
    stub = _stub(cfg, policy_out, ref_out)
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), m.long()], dim=1)  # 1 prompt token
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # TRL builds some constants (exo's epsilon) with torch.tensor(python float)
    try:
        with _no_inplace_autograd_traps() if patch else contextlib.nullcontext():
            loss = DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
            loss.backward()
    finally:
        torch.set_default_dtype(prev)
    g = lp_t.grad.numpy()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.item(), np.stack([g[:B], g[B:]]), metrics


_fns = {}


def trlax_loss_and_grad(cfg, lp, ref, lssp, mask, dtype=np.float64):
    # Eager value_and_grad (no jit): hundreds of static configs; compiling each would dominate on CPU.
    fn = _fns.get(cfg)
    if fn is None:

        def f(c, r, rc, rr, cm, rm, lc, lr):
            return preference_loss(c, r, rc, rr, cm, rm, cfg, chosen_log_sum_sq_probs=lc, rejected_log_sum_sq_probs=lr)

        fn = _fns[cfg] = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    a = [x.astype(dtype) for x in (lp[0], lp[1], ref[0], ref[1])]
    (loss, metrics), (gc, gr) = fn(*a, mask[0], mask[1], lssp[0].astype(dtype), lssp[1].astype(dtype))
    return float(loss), np.stack([np.asarray(gc), np.asarray(gr)]), {
        k: float(v) for k, v in finalize_metrics(metrics).items()}


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def _compare(cfg, seed, reference_free=False):
    lp, ref, lssp, mask = _inputs(seed)
    f32 = cfg.f_divergence_type == "alpha_divergence" and abs(cfg.f_alpha_divergence_coef - 1.0) >= 1e-6
    tdt, ndt, rtol, atol = (torch.float32, np.float32, 2e-5, 1e-6) if f32 else (torch.float64, np.float64, 1e-6, 1e-12)
    l_trl, g_trl, m_trl = trl_loss_and_grad(cfg, lp, ref, lssp, mask, tdt, reference_free)
    l_jax, g_jax, m_jax = trlax_loss_and_grad(cfg, lp, ref, lssp, mask, ndt)
    assert np.isfinite(l_trl), cfg
    np.testing.assert_allclose(l_jax, l_trl, rtol=rtol, atol=atol, err_msg=str(cfg))
    np.testing.assert_allclose(g_jax, g_trl, rtol=rtol, atol=atol, err_msg=str(cfg))
    assert np.all(g_jax[~mask] == 0.0)
    for k in METRICS:  # trlax metrics are float32 (Mean pairs)
        np.testing.assert_allclose(m_jax[k], m_trl[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} {cfg}")


TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIVS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
          ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)]
F_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


def _single_cases(loss_type):
    for (fd, fa), ls, ld, wpo in itertools.product(F_DIVS, [0.0, 0.1], [None, 0.5], [False, True]):
        if fd != "reverse_kl" and loss_type not in F_LOSS_TYPES:
            continue
        if loss_type == "exo_pair" and ls == 0.0:
            ls = 1e-3
        if wpo and loss_type in ("aot", "aot_unpaired"):
            continue
        yield PreferenceLossConfig(loss_type=loss_type, beta=0.3, label_smoothing=ls, f_divergence_type=fd,
                                   f_alpha_divergence_coef=fa, ld_alpha=ld, use_weighting=wpo, discopop_tau=0.4)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_single_loss_type_matches_trl(loss_type):
    """Each loss type x f-divergence x label smoothing x LD-DPO x WPO: value, gradient, metrics."""
    cases = list(_single_cases(loss_type))
    assert len(cases) >= 4
    for i, cfg in enumerate(cases):
        _compare(cfg, seed=i)


COMBOS = [
    (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)),  # MPO
    (("sigmoid", "sft"), (1.0, 1.0)),  # IRPO
    (("sigmoid", "sft"), (1.0, 0.005)),  # RPO (paper index)
    (("ipo", "hinge", "robust", "discopop"), (0.5, 1.5, 0.25, 2.0)),
    (("nca_pair", "apo_zero", "apo_down", "sppo_hard"), None),
    (("aot", "aot_unpaired", "exo_pair", "sigmoid_norm"), (1.0, 0.3, 0.7, 1.1)),
    (("sigmoid", "sigmoid"), (0.5, 0.5)),
]


def test_combined_loss_types_match_trl():
    """Weighted combinations (MPO / IRPO / RPO and mixed sets) with label smoothing, LD-DPO, WPO and
    the f-divergences where TRL allows them."""
    n = 0
    for (types_, weights), ls, ld, wpo, (fd, fa) in itertools.product(COMBOS, [0.1], [None, 0.3], [False, True],
                                                                      F_DIVS[:4]):
        if fd != "reverse_kl" and not set(types_) <= F_LOSS_TYPES:
            continue
        if wpo and {"aot", "aot_unpaired"} & set(types_):
            continue
        cfg = PreferenceLossConfig(loss_type=types_, loss_weights=weights, beta=0.2, label_smoothing=ls,
                                   ld_alpha=ld, use_weighting=wpo, f_divergence_type=fd, f_alpha_divergence_coef=fa)
        _compare(cfg, seed=100 + n)
        n += 1
    assert n >= 30


def test_rpo_alpha_equals_trl_sft_term():
    """``rpo_alpha`` (pre-1.0 TRL field) gives TRL 1.16's ``["sigmoid", "sft"]`` with weight rpo_alpha."""
    for i, (ld, wpo) in enumerate(itertools.product([None, 0.5], [False, True])):
        _compare(PreferenceLossConfig(loss_type="sigmoid", rpo_alpha=0.7, ld_alpha=ld, use_weighting=wpo), seed=i)
        _compare(PreferenceLossConfig(loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), rpo_alpha=1.0),
                 seed=10 + i)


def test_reference_free_equals_trl_with_zero_reference():
    """``reference_free`` equals TRL with a reference that assigns log-prob 0 to every token."""
    for i, lt in enumerate(["sigmoid", "ipo", "hinge", "bco_pair", "aot", "apo_zero"]):
        _compare(PreferenceLossConfig(loss_type=lt, reference_free=True, beta=0.05), seed=i, reference_free=True)


def test_from_trl_config_reproduces_trl_loss(tmp_path):
    """A whole TRL DPOConfig dict -> PreferenceLossConfig.from_trl -> same loss as TRL with that config."""
    from trl import DPOConfig

    trl_cfg = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                        beta=0.25, ld_alpha=0.5, use_weighting=True, label_smoothing=0.05, report_to=[], use_cpu=True,
                        bf16=False)
    cfg = PreferenceLossConfig.from_trl(**trl_cfg.to_dict())
    assert cfg.loss_type == ("sigmoid", "bco_pair", "sft") and cfg.loss_weights == (0.8, 0.2, 1.0)
    assert cfg.beta == 0.25 and cfg.ld_alpha == 0.5 and cfg.use_weighting and cfg.label_smoothing == 0.05
    _compare(cfg, seed=7)
    default = PreferenceLossConfig.from_trl(**DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                        bf16=False).to_dict())
    assert default == PreferenceLossConfig()
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceLossConfig.from_trl(loss_type=["sigmoid", "kto"])


@pytest.mark.parametrize("loss_type", ["hinge", "sft"])
def test_trl_wpo_inplace_bug_still_present(loss_type):
    """Pins the TRL 1.16 bug the patch above works around; if TRL fixes it, drop the patch."""
    lp, ref, lssp, mask = _inputs(0)
    with pytest.raises(RuntimeError):
        trl_loss_and_grad(PreferenceLossConfig(loss_type=loss_type, use_weighting=True), lp, ref, lssp, mask,
                          patch=False)
