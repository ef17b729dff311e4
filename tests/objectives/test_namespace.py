"""The flat ``trlax.objectives`` namespace: every module's ``__all__`` is real, re-exported, and no two
modules export the same name (a star-import collision would silently shadow one of them)."""

import collections
import importlib

import trlax.objectives as tx

MODULES = ["aggregation", "ratios", "surrogates", "kl", "correction", "entropy", "advantages", "policy",
           "preference", "unpaired", "supervised", "distillation", "logprobs"]


def test_every_exported_name_exists_once_and_is_reexported():
    owners = collections.defaultdict(list)
    for name in MODULES:
        mod = importlib.import_module(f"trlax.objectives.{name}")
        assert mod.__all__, f"{name} exports nothing"
        for sym in mod.__all__:
            assert hasattr(mod, sym), f"{name}.__all__ lists missing {sym}"
            owners[sym].append(name)
            assert getattr(tx, sym) is getattr(mod, sym), f"trlax.objectives.{sym} is not {name}.{sym}"
    clashes = {s: m for s, m in owners.items() if len(m) > 1}
    assert not clashes, clashes


def test_public_callables_have_docstrings():
    missing = [n for n in dir(tx) if not n.startswith("_") and callable(getattr(tx, n))
               and not (getattr(tx, n).__doc__ or "").strip()]
    assert not missing, missing
