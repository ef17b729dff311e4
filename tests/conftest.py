"""Test-wide settings: float64 on (references and TRL parity run in float64), CPU only.

Also: a persistent JAX compilation cache for the test session (outside the repository; see tests/README.md),
per-module compile accounting (``TRLAX_COMPILE_REPORT=path`` writes one JSON line per test module), and the
hypothesis profile."""

import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _jax_cache_dir():
    """The persistent compilation cache of the test session: ``TRLAX_TEST_JAX_CACHE`` (``off``: none), else
    ``$XDG_CACHE_HOME`` or ``~/.cache`` / ``trlax-tests/jax``: outside the repository, safe to delete. JAX keys
    every entry by the program, the compile options, the backend and its own version, so a stale entry is
    never read; an empty directory only costs the compiles."""
    path = os.environ.get("TRLAX_TEST_JAX_CACHE")
    if path and path.strip().lower() in ("off", "0", "none", "false"):
        return None
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "trlax-tests", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path


# XLA compile options of the test session (exported so subprocess tests use them too; the subprocess tests
# append them to their device-count flag). On CPU the suite's time is almost all compilation of tiny programs
# whose run time does not matter, so the flags trade run-time speed for compile speed:
# - LLVM at -O0: a toy trainer run's CPU time -35% (the PRNG's initialisers 5x);
# - XLA:CPU's classic loop emitters instead of its MLIR fusion emitters (`use_fusion_emitters=false`), and
#   one LLVM module instead of a split into parallel codegen parts: a toy DPO run's 43 compiles took 8.3 s
#   of backend compile at -O0 alone, 1.7 s with both (2026-11-30, tests/README.md).
# Results differ from XLA's defaults only by float rounding (every assertion has a tolerance);
# TRLAX_TEST_XLA_FLAGS="" runs the suite with XLA's defaults, as users get them.
TEST_XLA_FLAGS = os.environ.setdefault(
    "TRLAX_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    "--xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

JAX_CACHE_DIR = _jax_cache_dir()
if JAX_CACHE_DIR:
    # set in the environment so subprocess tests (8-device runs, `trlax launch`) read the same cache; within a
    # cold session it already pays: identical programs built by different jitted closures (every toy run's
    # model init, sampler, optimiser) are compiled once, and the other xdist worker reads them
    os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = os.environ.get(
        "TRLAX_TEST_JAX_CACHE_MIN_COMPILE_S", "0.05")
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
if JAX_CACHE_DIR:
    jax.config.update("jax_compilation_cache_dir", JAX_CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from hypothesis import HealthCheck, settings  # noqa: E402

# jit compile time dominates on CPU: few examples, no deadline (compiles are slow, not the code). The README
# test command (CI) draws derandomized examples (the same per test, so CI is deterministic); a session seed
# (`--hypothesis-seed N` or TRLAX_HYPOTHESIS_SEED=N, e.g. a random one) draws other examples, printed in the
# header and in every failure's report. A seeded session found a real edge case on 2026-11-30 (seed 66086800:
# kl_penalty's clamp gave half the gradient exactly at ±20), fixed and kept as a plain test.
settings.register_profile(
    "trlax", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
    database=None, print_blob=True,
)
settings.register_profile("trlax_seeded", parent=settings.get_profile("trlax"), derandomize=False)
settings.load_profile("trlax")

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from hypothesis import core

    seed = config.getoption("hypothesis_seed", None) or os.environ.get("TRLAX_HYPOTHESIS_SEED")
    if seed is None:  # derandomized draws (the profile above)
        return
    # xdist workers (started later) inherit the seed through the environment
    os.environ["TRLAX_HYPOTHESIS_SEED"] = str(seed)
    config.option.hypothesis_seed = str(seed)
    settings.load_profile("trlax_seeded")
    core.global_force_seed = int(seed)


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed", None)
    return f"hypothesis seed: {seed} (replay: --hypothesis-seed=<it>)" if seed else \
        "hypothesis: derandomized draws (TRLAX_HYPOTHESIS_SEED=N or --hypothesis-seed=N for others)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("hypothesis") is not None:
        seed = item.config.getoption("hypothesis_seed", None)
        how = f"--hypothesis-seed={seed}" if seed else "(derandomized draws: the same command)"
        report.sections.append(("hypothesis seed", f"replay with: python -m pytest '{item.nodeid}' {how}"))
    _strict_oracles(report)


def _strict_oracles(report):
    """In CI a test-time oracle (TRL, torch, transformers ...) that fails to import fails the test or module
    instead of skipping it (``pytest.importorskip`` would otherwise turn a broken install green)."""
    if IN_CI and report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"


def pytest_collectreport(report):
    _strict_oracles(report)


# ---------------------------------------------------------------------------------------------------------
# Per-module compile accounting: every XLA executable built (a compile or a persistent-cache hit) is counted
# against the test module whose test (or module fixture) is running.
_COMPILES: dict = {}
_CURRENT = {"module": None}


def _on_duration(event, duration, **kwargs):
    module = _CURRENT["module"]
    if module is None:
        return
    row = _row(module)
    if event == "/jax/core/compile/backend_compile_duration":
        row["compiles"] += 1
        row["compile_s"] += duration
    elif event == "/jax/core/compile/jaxpr_trace_duration":
        row["trace_s"] += duration


def _on_event(event, **kwargs):
    module = _CURRENT["module"]
    if module is not None and event == "/jax/compilation_cache/cache_hits":
        _row(module)["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def _row(module):
    return _COMPILES.setdefault(module, {"compiles": 0, "compile_s": 0.0, "cache_hits": 0, "trace_s": 0.0,
                                         "wall_s": 0.0, "cpu_s": 0.0, "child_cpu_s": 0.0})


def _cpu():
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    module = item.nodeid.split("::")[0]
    _CURRENT["module"] = module
    t0, (c0, k0) = time.perf_counter(), _cpu()
    yield
    (c1, k1), row = _cpu(), _row(module)
    row["wall_s"] += time.perf_counter() - t0
    row["cpu_s"] += c1 - c0  # this process's CPU seconds (all threads): far less sensitive to load than wall
    row["child_cpu_s"] += k1 - k0  # CPU of subprocesses (8-device runs, launches) waited for meanwhile
    if nextitem is None or nextitem.nodeid.split("::")[0] != module:
        _report(module)


# ---------------------------------------------------------------------------------------------------------
# Recorded cost of every test module (tests/budgets.json): the number of XLA executables it may build (its
# compile budget, checked when the module finishes) and its measured seconds (heaviest modules are handed
# out first, so that no xdist worker is left with a long module at the end).
_BUDGETS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "budgets.json")
try:
    with open(_BUDGETS_PATH) as _fh:
        BUDGETS = json.load(_fh)["modules"]
except (OSError, ValueError, KeyError):
    BUDGETS = {}
UNLISTED_SECONDS = 10.0  # a module not in budgets.json yet: scheduled as a mid-sized one
SLOW_MODULE_SECONDS = 30.0  # modules recorded at this many CPU seconds or more are marked ``slow``


def module_seconds(module):
    return float(BUDGETS.get(module, {}).get("seconds", UNLISTED_SECONDS))


def pytest_collection_modifyitems(session, config, items):
    """Heaviest modules first (stable: the order inside a module is kept). With ``--dist loadfile`` and
    ``--no-loadscope-reorder`` (pyproject addopts) xdist hands out whole modules in this order."""
    items.sort(key=lambda item: -module_seconds(item.nodeid.split("::")[0]))
    for item in items:  # `-m "not slow"`: the quick subset for iteration (CI runs everything)
        if module_seconds(item.nodeid.split("::")[0]) >= SLOW_MODULE_SECONDS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def _compile_budget(request):
    """The module's compile budget: fail (at its last test's teardown) when the module built more XLA
    executables than tests/budgets.json allows. Raise the budget only with a reason (see tests/README.md)."""
    yield
    module = request.node.nodeid.split("::")[0]
    check_compile_budget(module, _COMPILES.get(module, {}).get("compiles", 0), BUDGETS.get(module, {}).get("compiles"))


def _report(module):
    """``TRLAX_COMPILE_REPORT=path``: append the module's row (JSON line) when it finishes."""
    path = os.environ.get("TRLAX_COMPILE_REPORT")
    if path and module in _COMPILES:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as f:
            f.write(json.dumps({"module": module, "worker": worker, "time": time.time(), **_COMPILES[module]}) + "\n")


def check_compile_budget(module, used, budget):
    if budget is not None and used > budget and not os.environ.get("TRLAX_NO_COMPILE_BUDGET"):
        pytest.fail(f"{module} built {used} XLA executables, over its budget of {budget} (tests/budgets.json): "
                    "share the compiled functions / toy runs (tests/README.md) or raise the budget with a reason",
                    pytrace=False)
