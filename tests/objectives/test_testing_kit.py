"""trlax.testing (issue 19): the strategies draw what they promise, every law checker passes trlax's own
objectives and catches a loss that breaks its law, and the README's "Property-test your own objective"
block runs as written (read from README.md, so the two cannot drift)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from trlax import testing as tt
from trlax.objectives import PolicyLossConfig, PreferenceLossConfig, gkd_loss, kto_loss, policy_loss, preference_loss

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


# ------------------------------------------------------------------------------------------- README


def _readme_block() -> str:
    text = README.read_text()
    section = text.split("## Property-test your own objective", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README section should hold exactly one python block"
    return blocks[0]


def test_readme_example_runs():
    ns: dict = {}
    exec(compile(_readme_block(), str(README), "exec"), ns)  # noqa: S102 (our own README)
    tests = [v for k, v in ns.items() if k.startswith("test_") and callable(v)]
    assert len(tests) == 1
    tests[0]()  # runs the hypothesis examples of the README's property test


def _reinforce(batch, num_items=None):
    m = batch["mask"]
    per_token = jnp.where(m, -batch["advantages"][:, None] * batch["logps"], 0.0)
    return jnp.sum(per_token) / jnp.maximum(m.sum() if num_items is None else num_items, 1)


def _leaky(batch):
    """Token mean over *every* position, padding included: the classic padding leak."""
    return jnp.mean(-batch["advantages"][:, None] * batch["logps"])


def test_padding_leak_is_caught():
    """The kit's own search (its strategy + its law) finds that ``_leaky`` reads the padding."""

    @settings(max_examples=25, database=None)
    @given(batch=tt.policy_batches())
    def leaky_property(batch):
        tt.check_padding_invariance(_leaky, batch, grad_key="logps")

    with pytest.raises(AssertionError, match="padding invariance"):
        leaky_property()


# --------------------------------------------------------------------------------- broken losses


def _row_weighted(batch):
    """Weights rows by their index: not permutation invariant."""
    w = jnp.arange(batch["mask"].shape[0], dtype=jnp.float32) + 1.0
    return jnp.sum(w[:, None] * jnp.where(batch["mask"], batch["logps"], 0.0))


def _local_mean(batch, num_items=None):
    """Ignores the global count: micro-batch losses do not add up."""
    return _reinforce(batch)


def _with_entropy_term(batch):
    """A log-prob term independent of the advantages: zero advantages still give a gradient."""
    return _reinforce(batch) + 0.1 * jnp.sum(jnp.where(batch["mask"], batch["logps"] ** 2, 0.0))


def _unclamped_ratio(batch):
    ratio = jnp.exp(batch["logps"] - batch["old_logps"])  # no clamp before exp
    return jnp.sum(jnp.where(batch["mask"], -ratio * batch["advantages"][:, None], 0.0))


def _trace_dependent(batch):
    x = jnp.sum(jnp.where(batch["mask"], batch["logps"], 0.0))
    return x + (1.0 if isinstance(x, jax.core.Tracer) else 0.0)


FIXED = {
    "logps": np.array([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]], np.float32),
    "old_logps": np.array([[-1.2, -2.0, -0.1], [-0.3, -3.0, -1.0]], np.float32),
    "advantages": np.array([1.0, -0.5], np.float32),
    "mask": np.array([[True, True, False], [True, True, True]]),
}


def test_each_law_catches_its_broken_loss():
    with pytest.raises(AssertionError, match="batch-permutation equivariance"):
        tt.check_permutation_equivariance(_row_weighted, FIXED)
    with pytest.raises(AssertionError, match="micro-batch additivity"):
        tt.check_microbatch_additivity(_local_mean, FIXED)
    with pytest.raises(AssertionError, match="zero advantages give zero policy gradient"):
        tt.check_zero_advantages_zero_gradient(_with_entropy_term, FIXED)
    extreme = dict(FIXED, old_logps=FIXED["old_logps"] - 500.0)
    with pytest.raises(AssertionError, match="finiteness"):
        tt.check_finite(_unclamped_ratio, extreme, grad_key="logps")
    with pytest.raises(AssertionError, match="jit consistency"):
        tt.check_jit_consistency(_trace_dependent, FIXED)
    # and the correct loss passes each of them on the same batch
    tt.check_permutation_equivariance(_reinforce, FIXED, perm=[1, 0], grad_key="logps")
    tt.check_microbatch_additivity(_reinforce, FIXED, grad_key="logps")
    tt.check_zero_advantages_zero_gradient(_reinforce, FIXED)
    tt.check_finite(_reinforce, extreme, grad_key="logps")
    tt.check_jit_consistency(_reinforce, FIXED)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dtype='float16' is not allowed"):
        find(tt.policy_batches(dtype="float16"), lambda b: True)
    with pytest.raises(ValueError, match="perm"):
        tt.check_permutation_equivariance(_reinforce, FIXED, perm=[0, 0])
    with pytest.raises(ValueError, match="num_microbatches=3 must divide"):
        tt.check_microbatch_additivity(_reinforce, FIXED, num_microbatches=3)
    with pytest.raises(ValueError, match="must accept `num_items`"):
        tt.check_microbatch_additivity(_leaky, FIXED)
    with pytest.raises(ValueError, match="mask_keys"):
        tt.check_padding_invariance(_reinforce, {"logps": FIXED["logps"]})


# ------------------------------------------------------------------------------------ strategies


@settings(max_examples=15)
@given(batch=tt.policy_batches(shapes=((4, 6), (2, 3)), dtype="bfloat16", token_advantages=True,
                               padding_fill=float("nan")),
       extreme=tt.policy_batches(extreme=True, empty_rows=False),
       pref=tt.preference_batches(dtype="float64"), unp=tt.unpaired_batches(),
       dist=tt.distillation_batches(padding_fill=float("nan")))
def test_strategies_draw_valid_batches(batch, extreme, pref, unp, dist):
    b, t = batch["mask"].shape
    assert (b, t) in ((4, 6), (2, 3))
    for k in ("logps", "old_logps", "ref_logps", "sampler_logps", "entropies", "advantages"):
        x = batch[k]
        assert x.dtype == jnp.bfloat16 and x.shape == (b, t), k
        assert np.all(np.isnan(x.astype(np.float32)[~batch["mask"]])), k  # padding_fill under the mask
        assert np.all(np.isfinite(x.astype(np.float32)[batch["mask"]])), k
    assert np.all(batch["logps"].astype(np.float32)[batch["mask"]] <= 0.0)
    assert np.all(extreme["mask"].any(axis=1))  # empty_rows=False
    assert np.all(extreme["logps"] >= -1e4) and extreme["advantages"].shape == (4,)
    assert {pref[k].dtype for k in pref if "logps" in k} == {np.dtype("float64")}
    assert pref["chosen_mask"].any(axis=1).all() and pref["rejected_mask"].any(axis=1).all()
    assert unp["labels"].dtype == bool and unp["labels"].any() and (~unp["labels"]).any()
    assert dist["student_logits"].shape == (3, 4, 8) and dist["mask"].shape == (3, 4)
    assert np.all(np.isnan(dist["teacher_logits"][~dist["mask"]]))


def test_strategies_reach_the_edges():
    """The strategies can produce empty rows, full rows, holes (``contiguous=False``) and, with
    ``extreme``, log-ratios far beyond the usual exp clamp (``find`` fails if none is reachable)."""
    fast = settings(phases=[Phase.generate], database=None)  # the first hit will do: no shrinking
    find(tt.masks((4, 6)), lambda m: (~m.any(axis=1)).any() and m.all(axis=1).any(), settings=fast)
    find(tt.masks((4, 6), contiguous=False, empty_rows=False), lambda m: (m[:, 1:] & ~m[:, :-1]).any(),
         settings=fast)
    find(tt.policy_batches(extreme=True), lambda x: np.max(np.abs(x["logps"] - x["old_logps"])) > 100,
         settings=fast)


# ---------------------------------------------------------------------- trlax's objectives obey the laws

_DAPO = PolicyLossConfig.dapo(beta=0.04, mask_truncated_completions=False)
_GRPO = PolicyLossConfig.grpo(epsilon=0.2)


def _policy_dapo(b, num_items=None):
    return policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], _DAPO, ref_logps=b["ref_logps"],
                       num_items=num_items)


def _policy_grpo(b, num_sequences=None):
    return policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], _GRPO,
                       ref_logps=b["ref_logps"], num_sequences=num_sequences)[0]


def _policy_no_kl(b):
    return policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], PolicyLossConfig.dapo(
        mask_truncated_completions=False), sampler_logps=b["sampler_logps"])[0]


def _dpo(b):
    return preference_loss(b["chosen_logps"], b["rejected_logps"], b["ref_chosen_logps"], b["ref_rejected_logps"],
                           b["chosen_mask"], b["rejected_mask"], PreferenceLossConfig.dpo())[0]


def _kto(b):
    return kto_loss(b["logps"], b["ref_logps"], b["labels"], mask=b["mask"], kl=0.0)[0]


def _gkd(b, num_items=None):
    return gkd_loss(b["student_logits"], b["teacher_logits"], b["mask"], num_items=num_items)[0]


@settings(max_examples=10)
@given(batch=tt.policy_batches(padding_fill=float("nan")), extreme=tt.policy_batches(extreme=True),
       perm=st.permutations(range(4)))
def test_policy_loss_obeys_the_laws(batch, extreme, perm):
    for fn in (_policy_dapo, _policy_grpo):
        tt.check_padding_invariance(fn, batch, grad_key="logps", fill=np.nan)
        tt.check_permutation_equivariance(fn, batch, perm, grad_key="logps")
        tt.check_microbatch_additivity(fn, batch, grad_key="logps")
        tt.check_finite(fn, extreme, grad_key="logps")
    tt.check_jit_consistency(_policy_grpo, batch)  # eager: op by op, so one config only
    tt.check_zero_advantages_zero_gradient(_policy_no_kl, batch)


@settings(max_examples=10)
@given(pref=tt.preference_batches(padding_fill=float("nan")), unp=tt.unpaired_batches(padding_fill=float("nan")),
       dist=tt.distillation_batches(), dist_x=tt.distillation_batches(extreme=True))
def test_other_families_obey_the_laws(pref, unp, dist, dist_x):
    tt.check_padding_invariance(_dpo, pref, grad_key="chosen_logps", fill=np.nan)
    tt.check_permutation_equivariance(_dpo, pref, grad_key="chosen_logps")
    tt.check_padding_invariance(_kto, unp, grad_key="logps", fill=np.nan)
    tt.check_permutation_equivariance(_kto, unp, grad_key="logps")
    tt.check_padding_invariance(_gkd, dist, grad_key="student_logits")
    tt.check_permutation_equivariance(_gkd, dist, grad_key="student_logits")
    tt.check_microbatch_additivity(_gkd, dist, 3, grad_key="student_logits")
    tt.check_finite(_gkd, dist_x, grad_key="student_logits")


def test_import_trlax_objectives_does_not_load_the_kit():
    code = "import sys, trlax.objectives; print('trlax.testing' in sys.modules, 'hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
