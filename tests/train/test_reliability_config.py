"""Hostile configs: for every registered trainer, hypothesis draws `trlax train NAME --field value ...` command
lines (wrong types, out-of-range and non-finite numbers, unknown names, unknown presets, contradictory options):
the command either runs or exits with status 2 and one line naming a drawn field — never an uncaught exception
or a traceback.

Parsing and validation run for every draw (in-process, ``cli.main``); the training itself is replaced by a
recorder for the draws, and a few accepted draws then really run (one tiny step each).
"""

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trlax.train import cli, loops, registry

# fields a draw leaves alone: process / file-system plumbing (distributed=true would start a coordinator)
SKIP = {"distributed", "coordinator_address", "num_processes", "process_id", "heartbeat_timeout_s", "init_timeout_s",
        "output_dir", "resume", "dataset", "model", "reward_model", "teacher_model"}
HOSTILE = ["abc", "", "nan", "inf", "-inf", "1e400", "-1", "0", "1.5", "2", "true", "false", "None", "[1, 2]",
           "{a: 1}", "1,2", "-0", " 3 ", "1e3", "0.0", "💥", "--", "=", "1" * 30]
CONTRADICTIONS = [
    ["--lora_rank", "0", "--use_dora", "true"],
    ["--batch_size", "6", "--num_microbatches", "4"],
    ["--num_generations", "3", "--batch_size", "4"],
    ["--sync_ref_model", "true", "--reference_free", "true"],
    ["--dtype", "bfloat16", "--compute_dtype", "float32"],
    ["--packing", "bfd", "--max_length", "1"],
    ["--use_adaptive_entropy", "true", "--entropy_coef", "5", "--entropy_coef_max", "1"],
]


def _fields(algo):
    return [f for f in dataclasses.fields(registry.config_class(algo)) if f.name not in SKIP]


def _value(field, algo):
    """Values for one field: the hostile set, its default, and for presets / choices some real and fake names."""
    default = field.default if field.default is not dataclasses.MISSING else None
    valid = [str(default)] if default is not None else []
    if field.name == "preset":
        valid += list(registry.get(algo).preset_names()[:6]) + ["nope", "GRPO"]
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        valid += ["1", "2", "0.5"]
    return st.one_of(st.sampled_from(HOSTILE), st.sampled_from(valid or ["1"]))


@st.composite
def command_lines(draw, algo):
    fields = _fields(algo)
    argv, named = [], []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field"] * 6 + ["unknown", "contradiction"]))
        if kind == "unknown":
            name = draw(st.sampled_from(["lr", "not_a_field", "learning-rate-x", "BATCH_SIZE", "steps"]))
            argv += [f"--{name}", draw(st.sampled_from(HOSTILE))]
            named.append(name.replace("-", "_"))
        elif kind == "contradiction":
            pair = draw(st.sampled_from(CONTRADICTIONS))
            argv += pair
            named += [a[2:] for a in pair if a.startswith("--")]
        else:
            f = draw(st.sampled_from(fields))
            argv += [f"--{f.name}", draw(_value(f, algo))]
            named.append(f.name)
    return argv, named


ALGOS = registry.names()
RUN_FOR_REAL = ("sft", "dpo")  # trainers whose first accepted draws then really run


@pytest.fixture(scope="module")
def accepted():
    return {}


@pytest.mark.parametrize("algo", ALGOS)
def test_hostile_command_lines_run_or_exit_2_naming_the_field(algo, tmp_path_factory, accepted):
    out = tmp_path_factory.mktemp(algo)
    seen = {"rejected": 0, "accepted": 0}

    @settings(max_examples=30 if algo in RUN_FOR_REAL else 12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(command_lines(algo))
    def check(drawn):
        argv, named = drawn
        mp = pytest.MonkeyPatch()
        mp.setattr(loops, "run", lambda name, cfg, rows: seen.__setitem__("last", (argv, cfg)))
        import io
        import contextlib

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = cli.main(["train", algo, "--output_dir", str(out)] + argv)
        finally:
            mp.undo()
        msg = err.getvalue()
        assert status in (0, 2), (argv, status, msg)
        if status == 2:
            seen["rejected"] += 1
            lines = msg.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (argv, msg)
            assert "Traceback" not in msg
            assert any(re.search(rf"\b{re.escape(n)}\b", lines[0], re.IGNORECASE) for n in named), (argv, lines[0])
        else:
            seen["accepted"] += 1
            accepted.setdefault(algo, []).append(argv)

    check()
    assert seen["rejected"] > 0
    if algo in RUN_FOR_REAL:
        assert seen["accepted"] > 0


# a few accepted draws really run (one tiny step): the run-time checks (mesh / batch / data sizes ...) also end in
# a one-line exit 2, never a traceback


@pytest.mark.parametrize("algo", RUN_FOR_REAL)
def test_accepted_draws_really_run_or_exit_2(algo, accepted, tmp_path, capsys):
    draws = accepted.get(algo, [])
    if not draws:
        pytest.skip("the hostile-config test of this trainer did not run first (or accepted nothing)")
    tiny = ["--max_steps", "1", "--batch_size", "4", "--max_prompt_length", "4", "--max_completion_length", "3",
            "--progress", "false", "--export", "false"]
    for i, argv in enumerate(draws[:1]):
        status = cli.main(["train", algo, "--output_dir", str(tmp_path / str(i))] + argv + tiny)
        err = capsys.readouterr().err.strip()
        assert status in (0, 2), (argv, err)
        if status == 2:
            assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err


def test_hostile_config_files_exit_2_naming_config(tmp_path, capsys, monkeypatch):
    """`--config FILE`: missing, not YAML, not a mapping, or holding a bad value: exit 2, one line, never a traceback."""
    monkeypatch.setattr(loops, "run", lambda *a: pytest.fail("ran"))
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "value.yaml").write_text("learning_rate: .nan\nmax_steps: 1.5\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    for name, needle in (("nope.yaml", "config="), ("bad.yaml", "config="), ("list.yaml", "config="),
                         ("value.yaml", "learning_rate"), ("binary.yaml", "config=")):
        status = cli.main(["train", "sft", "--config", str(tmp_path / name), "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, (name, err)
