"""The test configuration's own machinery (tests/conftest.py): compiles are counted per module, a module over
its compile budget fails, every budgeted module exists, the persistent compilation cache is outside the
repository."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

import conftest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODULE = "tests/test_budgets.py"


def test_compiles_are_counted_against_the_running_module():
    before = conftest._COMPILES.get(MODULE, {}).get("compiles", 0)
    f = jax.jit(lambda x: x * 3.0 + 1.0)  # a fresh program
    assert float(f(jnp.arange(7.0))[2]) == 7.0
    assert conftest._COMPILES[MODULE]["compiles"] >= before + 1
    f(jnp.arange(7.0))  # cached in memory: no new executable
    after = conftest._COMPILES[MODULE]["compiles"]
    f(jnp.arange(7.0))
    assert conftest._COMPILES[MODULE]["compiles"] == after


def test_over_budget_fails_and_within_budget_passes(monkeypatch):
    monkeypatch.delenv("TRLAX_NO_COMPILE_BUDGET", raising=False)
    conftest.check_compile_budget("tests/x.py", 10, 10)
    conftest.check_compile_budget("tests/x.py", 10, None)  # no budget recorded
    with pytest.raises(pytest.fail.Exception, match="over its budget of 9"):
        conftest.check_compile_budget("tests/x.py", 10, 9)


def test_budgeted_modules_exist_and_are_well_formed():
    with open(os.path.join(HERE, "budgets.json")) as fh:
        modules = json.load(fh)["modules"]
    assert modules
    for module, row in modules.items():
        assert os.path.isfile(os.path.join(ROOT, module)), f"budgets.json lists a missing module {module}"
        assert set(row) <= {"seconds", "compiles"} and float(row["seconds"]) >= 0, (module, row)
        assert int(row.get("compiles", 0)) >= 0, (module, row)


def test_compilation_cache_is_outside_the_repository():
    path = conftest.JAX_CACHE_DIR
    if path is None:
        pytest.skip("TRLAX_TEST_JAX_CACHE=off")
    assert not os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep)
    assert jax.config.jax_compilation_cache_dir == path
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == path  # inherited by subprocess tests
