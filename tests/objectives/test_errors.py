"""Bad inputs to the GRPO-family objectives raise clear errors that name the argument.

Shapes and dtypes: ``ValueError`` / ``TypeError`` naming the argument. Config fields: ``ValueError``
naming the field, the value and the allowed values. Missing optional inputs that the config needs:
``ValueError`` naming the input and the config field. Plus the import-isolation check of
``trlax.objectives`` in a fresh interpreter.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import trlax.objectives as tx
from trlax.objectives import PolicyLossConfig

B, T = 4, 5
LP = -np.ones((B, T))
M = np.ones((B, T), bool)
ADV = np.ones((B, 1))
IL = np.ones((B, T), np.int32)  # integer "log-probs": always a bug upstream


def _raises(exc, *needles):
    """``pytest.raises`` whose message must contain every needle (argument names, allowed values)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(n)})" for n in needles))


# ---------------------------------------------------------------------------------------------- shapes

SHAPE_CASES = [
    ("logps rank", lambda: tx.token_log_ratio(np.ones(B), None, np.ones(B, bool)), "logps"),
    ("old shape", lambda: tx.token_log_ratio(LP, np.ones((B, T + 1)), M), "old_logps"),
    ("ratio mask", lambda: tx.sequence_log_ratio(LP, None, np.ones((B, T + 1), bool)), "mask"),
    ("gspo-token mask", lambda: tx.gspo_token_log_ratio(LP, LP, np.ones((B + 1, T), bool)), "mask"),
    ("aggregate loss", lambda: tx.aggregate(np.ones((B, T + 1)), M, "dapo"), "per_token_loss"),
    ("aggregate loss 1d", lambda: tx.aggregate(np.ones(B), M, "grpo"), "per_token_loss"),
    ("aggregate mask rank", lambda: tx.aggregate(LP, np.ones(B, bool), "grpo"), "mask"),
    ("masked_sum mask", lambda: tx.masked_sum(LP, np.ones((B, T + 1), bool)), "mask"),
    ("masked_mean mask", lambda: tx.masked_mean(LP, np.ones((B + 1, 1), bool)), "mask"),
    ("ppo adv rows", lambda: tx.ppo_clip_loss(LP, np.ones((B + 1, 1))), "advantages"),
    ("ppo adv 1d", lambda: tx.ppo_clip_loss(LP, np.ones(B)), "advantages"),
    ("clip indicators adv", lambda: tx.clip_indicators(LP, np.ones((B, T + 1)), 0.2), "advantages"),
    ("cispo logps", lambda: tx.cispo_loss(LP, ADV, np.ones((B, T + 1)), 5.0), "logps"),
    ("sapo adv", lambda: tx.sapo_loss(LP, np.ones((B + 1, 1))), "advantages"),
    ("vespo adv", lambda: tx.vespo_weights(LP, np.ones((B + 1, 1)), M), "advantages"),
    ("vespo mask", lambda: tx.vespo_weights(LP, ADV, np.ones((B, T + 1), bool)), "mask"),
    ("vespo log_ratio rank", lambda: tx.vespo_weights(np.ones(B), ADV, M), "log_ratio"),
    ("vespo sampler", lambda: tx.vespo_weights(LP, ADV, M, sampler_log_is=np.ones((B, 2))), "sampler_log_is"),
    ("vespo_loss phi", lambda: tx.vespo_loss(np.ones((B + 1, 1)), ADV, LP), "phi"),
    ("luspo adv", lambda: tx.luspo_loss(LP, np.ones((B, 2)), 0.2), "advantages"),
    ("kl ref", lambda: tx.kl_penalty(LP, np.ones((B, T + 1)), M), "ref_logps"),
    ("kl mask", lambda: tx.kl_penalty(LP, LP, np.ones((B, T + 1), bool)), "mask"),
    ("sampler shape", lambda: tx.sampler_importance_weights(LP, np.ones((B, T + 1)), M), "sampler_logps"),
    ("sampler mask", lambda: tx.sampler_log_ratio(LP, LP, np.ones((B, 1), bool)), "mask"),
    ("sampler rank", lambda: tx.sampler_log_ratio(np.ones(B), np.ones(B), np.ones(B, bool)), "old_logps"),
    ("opsm adv rows", lambda: tx.off_policy_sequence_mask(np.ones(B + 1), LP, LP, M, 0.1), "advantages"),
    ("opsm adv cols", lambda: tx.off_policy_sequence_mask(np.ones((B, T + 1)), LP, LP, M, 0.1), "advantages"),
    ("opsm behaviour", lambda: tx.off_policy_sequence_mask(ADV, LP, np.ones((B, 2)), M, 0.1), "behaviour_logps"),
    ("entropy threshold mask", lambda: tx.entropy_threshold(LP, np.ones((B, T + 1), bool), 0.2), "mask"),
    ("high entropy mask", lambda: tx.high_entropy_mask(LP, np.ones((B, 1), bool), 0.2, threshold=0.5), "mask"),
    ("high entropy threshold", lambda: tx.high_entropy_mask(LP, M, 0.2, threshold=np.ones(3)), "threshold"),
    ("entropy bonus mask", lambda: tx.entropy_bonus(LP, np.ones((B, T + 1), bool)), "mask"),
    ("is_truncated", lambda: tx.is_truncated(np.ones((B, T), int), np.ones((B, T + 1), bool), [1]), "mask"),
    ("truncated flags", lambda: tx.mask_truncated_completions(M, np.ones(B + 1, bool)), "truncated"),
    ("rewards rank", lambda: tx.group_relative_advantages(np.ones((4, 1)), 2), "rewards"),
    ("group_ids shape", lambda: tx.group_relative_advantages(np.ones(4), group_ids=np.zeros(3, int)), "group_ids"),
    ("group_ids dtype", lambda: tx.group_relative_advantages(np.ones(4), group_ids=np.zeros(4)), "group_ids"),
    ("no groups", lambda: tx.group_relative_advantages(np.ones(4)), "num_generations"),
    ("multi rank", lambda: tx.multi_reward_advantages(np.ones(4), None, 2), "rewards_per_func"),
    ("multi weights", lambda: tx.multi_reward_advantages(np.ones((4, 2)), [1.0, 2.0, 3.0], 2), "weights"),
    ("top-k scores", lambda: tx.group_top_k_mask(np.ones((4, 1)), 1, 2), "scores"),
    ("policy logps rank", lambda: tx.policy_loss(np.ones(B), None, ADV, M, PolicyLossConfig()), "logps"),
    ("policy mask", lambda: tx.policy_loss(LP, None, ADV, np.ones((B, T + 1)), PolicyLossConfig()), "mask"),
    ("policy old", lambda: tx.policy_loss(LP, np.ones((B, 2)), ADV, M, PolicyLossConfig()), "old_logps"),
    ("policy adv", lambda: tx.policy_loss(LP, None, np.ones(B + 1), M, PolicyLossConfig()), "advantages"),
    ("policy ref", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(beta=0.1), ref_logps=np.ones((B, 2))),
     "ref_logps"),
    ("policy sampler", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(sampler_correction="token_mask"),
                                              sampler_logps=np.ones((B, 2))), "sampler_logps"),
    ("policy entropies", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(entropy_coef=0.1),
                                                entropies=np.ones((B, 2))), "entropies"),
    ("policy truncated", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(mask_truncated_completions=True),
                                                truncated=np.ones(B + 1, bool)), "truncated"),
    ("policy truncated missing", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(mask_truncated_completions=True)),
     "truncated"),
    ("policy entropy_threshold", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(top_entropy_quantile=0.5),
                                                        entropies=LP, entropy_threshold=np.ones(2)),
     "entropy_threshold"),
]


@pytest.mark.parametrize("fn,name", [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES])
def test_wrong_shapes_name_the_argument(fn, name):
    with _raises(ValueError, f"`{name}`"):
        fn()


# ---------------------------------------------------------------------------------------------- dtypes

DTYPE_CASES = [
    ("logps", lambda: tx.token_log_ratio(IL, None, M)),
    ("old_logps", lambda: tx.sequence_log_ratio(LP, IL, M)),
    ("logps", lambda: tx.kl_penalty(IL, LP, M)),
    ("ref_logps", lambda: tx.kl_penalty(LP, IL, M)),
    ("per_token_loss", lambda: tx.aggregate(IL, M, "grpo")),
    ("ratio", lambda: tx.ppo_clip_loss(IL, ADV)),
    ("advantages", lambda: tx.sapo_loss(LP, np.ones((B, 1), int))),
    ("logps", lambda: tx.cispo_loss(LP, ADV, IL, 5.0)),
    ("log_ratio", lambda: tx.vespo_weights(IL, ADV, M)),
    ("old_logps", lambda: tx.sampler_importance_weights(IL, LP, M)),
    ("sampler_logps", lambda: tx.sampler_importance_weights(LP, IL, M)),
    ("behaviour_logps", lambda: tx.off_policy_sequence_mask(ADV, LP, IL, M, 0.1)),
    ("entropies", lambda: tx.entropy_bonus(IL, M)),
    ("entropies", lambda: tx.high_entropy_mask(IL, M)),
    ("rewards_per_func", lambda: tx.multi_reward_advantages(np.ones((4, 2), int), None, 2)),
    ("scores", lambda: tx.group_top_k_mask(np.ones(4, int), 1, 2)),
    ("mask", lambda: tx.masked_sum(LP, np.full((B, T), 1 + 1j))),
    ("logps", lambda: tx.policy_loss(IL, None, ADV, M, PolicyLossConfig())),
    ("old_logps", lambda: tx.policy_loss(LP, IL, ADV, M, PolicyLossConfig())),
    ("advantages", lambda: tx.policy_loss(LP, None, np.ones(B, int), M, PolicyLossConfig())),
    ("ref_logps", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(beta=0.1), ref_logps=IL)),
    ("sampler_logps", lambda: tx.policy_loss(LP, LP, ADV, M, PolicyLossConfig(sampler_correction="token_truncate"),
                                             sampler_logps=IL)),
    ("entropies", lambda: tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(entropy_coef=0.1), entropies=IL)),
    ("config", lambda: tx.policy_loss(LP, None, ADV, M, {"loss_type": "grpo"})),
]


@pytest.mark.parametrize("name,fn", DTYPE_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(DTYPE_CASES)])
def test_wrong_dtypes_name_the_argument(name, fn):
    with _raises(TypeError, f"`{name}`"):
        fn()


# ------------------------------------------------------------------------------------- config fields

CONFIG_CASES = [
    (dict(loss_type="ppo"), ["loss_type='ppo'", "'grpo'", "'dapo'", "'vespo'"]),
    (dict(importance_sampling_level="seq"), ["importance_sampling_level='seq'", "'token'", "'sequence_token'"]),
    (dict(kl_estimator="k4"), ["kl_estimator='k4'", "'k1'", "'k3'", "'mse'"]),
    (dict(sampler_correction="tis"), ["sampler_correction='tis'", "'token_truncate'", "'sequence_mask'"]),
    (dict(epsilon=-0.1), ["epsilon=-0.1", "allowed", "[0.0, inf)"]),
    (dict(epsilon=float("nan")), ["epsilon=nan", "finite"]),
    (dict(epsilon="0.2"), ["epsilon='0.2'", "number"]),
    (dict(epsilon=True), ["epsilon=True", "number"]),
    (dict(epsilon_high=-1.0), ["epsilon_high=-1.0", "allowed"]),
    (dict(delta=1.0), ["delta=1.0", "allowed", "(1.0, inf)"]),
    (dict(beta=-0.01), ["beta=-0.01", "allowed"]),
    (dict(beta=float("inf")), ["beta=inf", "finite"]),
    (dict(top_entropy_quantile=0.0), ["top_entropy_quantile=0.0", "allowed", "(0.0, 1.0]"]),
    (dict(top_entropy_quantile=1.2), ["top_entropy_quantile=1.2", "allowed"]),
    (dict(off_policy_mask_threshold=-1.0), ["off_policy_mask_threshold=-1.0", "allowed"]),
    (dict(sampler_correction="token_mask", sampler_clip_min=None, sampler_clip_max=None),
     ["sampler_clip_min", "sampler_clip_max", "None"]),
    (dict(sampler_clip_min=2.0, sampler_clip_max=1.0), ["sampler_clip_min=2.0", "sampler_clip_max=1.0"]),
    (dict(sampler_clip_max=-1.0), ["sampler_clip_max=-1.0", "allowed"]),
    (dict(sapo_temperature_pos=0.0), ["sapo_temperature_pos=0.0", "allowed", "(0.0, inf)"]),
    (dict(sapo_temperature_neg=-1.0), ["sapo_temperature_neg=-1.0", "allowed"]),
    (dict(vespo_k_pos=-1.0), ["vespo_k_pos=-1.0", "allowed"]),
    (dict(vespo_lambda_neg=-2.0), ["vespo_lambda_neg=-2.0", "allowed"]),
    (dict(max_completion_length=0), ["max_completion_length=0", "allowed"]),
    (dict(max_completion_length=2.5), ["max_completion_length=2.5", "integer"]),
    (dict(entropy_coef=float("nan")), ["entropy_coef=nan", "finite"]),
    (dict(log_ratio_clamp=0.0), ["log_ratio_clamp=0.0", "allowed", "(0.0, inf)"]),
    (dict(use_bias_correction_kl="yes"), ["use_bias_correction_kl='yes'", "True, False"]),
    (dict(mask_truncated_completions=1), ["mask_truncated_completions=1", "True, False"]),
    (dict(loss_type="vespo", sampler_correction="sequence_mask"),
     ["sampler_correction='sequence_mask'", "vespo", "'token_truncate'", "'token_mask'"]),
]


@pytest.mark.parametrize("kw,needles", CONFIG_CASES, ids=[",".join(c[0]) + str(i) for i, c in enumerate(CONFIG_CASES)])
def test_config_field_errors(kw, needles):
    with _raises(ValueError, *needles):
        PolicyLossConfig(**kw)


def test_config_errors_through_presets_replace_and_from_trl():
    with _raises(ValueError, "preset='ppo'", "'grpo'", "'gspo'", "'icepop'"):
        PolicyLossConfig.preset("ppo")
    with _raises(ValueError, "epsilon=-1", "allowed"):
        PolicyLossConfig.dapo(epsilon=-1)
    with _raises(ValueError, "sampler_correction='foo'", "'token_mask'"):
        PolicyLossConfig.tis(mode="foo")
    with _raises(ValueError, "loss_type='bogus'", "'grpo'"):
        PolicyLossConfig().replace(loss_type="bogus")
    with _raises(ValueError, "loss_type='bogus'", "'grpo'"):
        PolicyLossConfig.from_trl(loss_type="bogus", learning_rate=1e-6)
    with _raises(ValueError, "importance_sampling_level='x'"):
        PolicyLossConfig.from_trl(importance_sampling_level="x")
    with _raises(ValueError, "sampler_correction='bad'", "'token_truncate'"):
        PolicyLossConfig.from_trl(use_vllm=True, vllm_importance_sampling_mode="bad")
    with _raises(ValueError, "vllm_importance_sampling_mode='sequence_mask'", "vespo", "'token_mask'"):
        PolicyLossConfig.from_trl(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask")
    # frozen: fields cannot be mutated behind the validation
    cfg = PolicyLossConfig()
    with pytest.raises(Exception):
        cfg.beta = -1.0  # type: ignore[misc]


UNKNOWN_NAME_CASES = [
    ("mode='k9'", lambda: tx.aggregate(LP, M, "k9"), ["'grpo'", "'luspo'", "'token_mean'"]),
    ("kind='k4'", lambda: tx.kl_penalty(LP, LP, M, "k4"), ["'k1'", "'k3'", "'abs'"]),
    ("mode='tis'", lambda: tx.sampler_importance_weights(LP, LP, M, "tis"), ["'token_truncate'", "'sequence_mask'"]),
    ("level='seq'", lambda: tx.importance_log_ratio(LP, None, M, "seq"), ["'token'", "'sequence'"]),
    ("scale_rewards='std'", lambda: tx.group_relative_advantages(np.ones(4), 2, scale_rewards="std"),
     ["'group'", "'batch'", "'none'"]),
    ("scale_rewards='std'", lambda: tx.gfpo_advantages(np.ones(4), np.ones(4), 1, 2, scale_rewards="std"), ["'group'"]),
    ("aggregation='mean'", lambda: tx.multi_reward_advantages(np.ones((4, 2)), None, 2, aggregation="mean"),
     ["'sum_then_normalize'", "'normalize_then_sum'"]),
]


@pytest.mark.parametrize("head,fn,allowed", UNKNOWN_NAME_CASES, ids=[c[0] for c in UNKNOWN_NAME_CASES])
def test_unknown_names(head, fn, allowed):
    with _raises(ValueError, head, "allowed", *allowed):
        fn()


RANGE_CASES = [
    ("top_quantile=1.5", lambda: tx.entropy_threshold(LP, M, 1.5)),
    ("top_quantile=-0.1", lambda: tx.high_entropy_mask(LP, M, -0.1)),
    ("cache_length=11", lambda: tx.soft_overlong_punishment(np.ones(4), 10, 11)),
    ("cache_length=0", lambda: tx.soft_overlong_punishment(np.ones(4), 10, 0)),
    ("max_completion_length=0", lambda: tx.soft_overlong_punishment(np.ones(4), 0, 0)),
    ("k=0", lambda: tx.gfpo_advantages(np.ones(4), np.ones(4), 0, 2)),
    ("k=-1", lambda: tx.group_top_k_mask(np.ones(4), -1, 2)),
    ("num_generations=0", lambda: tx.group_relative_advantages(np.ones(4), 0)),
    ("num_generations=4", lambda: tx.group_relative_advantages(np.ones(6), 4)),
    ("clip_min=3.0", lambda: tx.sampler_importance_weights(LP, LP, M, "token_mask", 3.0, 1.0)),
    ("clip_min and clip_max", lambda: tx.sampler_importance_weights(LP, LP, M, "token_mask", None, None)),
]


@pytest.mark.parametrize("head,fn", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_out_of_range_function_arguments(head, fn):
    with _raises(ValueError, head):
        fn()


# ------------------------------------------------------------------------------ missing optional inputs


def test_missing_inputs_required_by_the_config():
    with _raises(ValueError, "`ref_logps`", "beta=0.04"):
        tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(beta=0.04))
    with _raises(ValueError, "`sampler_logps`", "sampler_correction='sequence_mask'"):
        tx.policy_loss(LP, LP, ADV, M, PolicyLossConfig(sampler_correction="sequence_mask"))
    with _raises(ValueError, "`sampler_logps`", "sampler_correction='token_mask'"):
        tx.policy_loss(LP, LP, ADV, M, PolicyLossConfig.vespo(sampler_correction="token_mask"))
    with _raises(ValueError, "`entropies`", "top_entropy_quantile"):
        tx.policy_loss(LP, None, ADV, M, PolicyLossConfig(top_entropy_quantile=0.2))
    with _raises(ValueError, "`entropies`", "entropy_coef=0.01"):
        tx.policy_loss(LP, None, ADV, M, PolicyLossConfig.skywork_or1())
    # the inputs are optional when the config does not need them
    loss, _ = tx.policy_loss(LP, None, ADV, M, PolicyLossConfig())
    assert np.isfinite(float(loss))


# --------------------------------------------------------------------------------------- import hygiene


def test_import_pulls_no_heavy_frameworks():
    code = (
        "import sys\n"
        "import trlax.objectives\n"
        "from trlax.objectives import policy_loss, aggregate, group_relative_advantages\n"
        "heavy = ('flax', 'torch', 'transformers', 'datasets', 'optax', 'orbax')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert 'jax' in sys.modules\n"
        "print('LOADED:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("LOADED:")][-1]
    assert line == "LOADED:", f"trlax.objectives imported heavy modules: {line[7:]}"


def test_non_numeric_mask_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="`mask`"):
        tx.masked_sum(LP, np.full(LP.shape, "a"))
