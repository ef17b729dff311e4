"""The ``Examples:`` of trlax.objectives' docstrings run as doctests (issue 19): every recipe
(``policy_loss``, ``preference_loss``, the two loss registries) and at least 25 primitives.

Examples print scalars with ``round(float(x), 4)``; arrays are printed here with NumPy's precision 4
(``np.printoptions``), so the same text comes out in float32 (a user's default) and float64 (this test
session). Examples use tiny arrays and no ``jit``: each is a handful of eager dispatches.
"""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

import trlax.objectives as tx

MODULES = ("aggregation", "ratios", "surrogates", "kl", "correction", "entropy", "advantages", "policy", "preference",
           "unpaired", "supervised", "distillation", "logprobs")
RECIPES = {"policy_loss", "preference_loss", "register_policy_loss", "register_preference_loss"}


def _examples(module):
    mod = importlib.import_module(f"trlax.objectives.{module}")
    tests = doctest.DocTestFinder(exclude_empty=True).find(mod, mod.__name__)
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    report = []
    with np.printoptions(precision=4, suppress=True):
        for test in _examples(module):
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
    assert runner.tries > 0, module


def test_every_recipe_and_25_primitives_have_examples():
    names = {t.name.rsplit(".", 1)[-1] for m in MODULES for t in _examples(m)}
    public = set(tx.__all__) if hasattr(tx, "__all__") else {n for n in dir(tx) if not n.startswith("_")}
    assert RECIPES <= names, RECIPES - names
    primitives = (names & public) - RECIPES
    assert len(primitives) >= 25, sorted(primitives)
