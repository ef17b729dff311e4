"""Every registered trainer is reachable and documented: `trlax train NAME --help` works, every preset
resolves to a valid config (no compute), the README's trainer table has a row with its command and every
preset name, and some test file captures its first step (the objective-value check)."""

import os
import re

import pytest

from trlax.train import cli, registry
from trlax.train.config import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = registry.names()


def _readme_rows():
    text = open(os.path.join(ROOT, "README.md")).read()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`([a-z0-9_]+)`\s*\|", line)
        if m and "trlax train" in line:
            rows[m.group(1)] = line
    return rows


def test_every_paper_index_trainer_is_registered():
    need = {"grpo", "dpo", "sft", "rloo", "ppo", "a2po", "gmpo", "kto", "bco", "orpo", "cpo", "tpo",
            "online_dpo", "xpo", "nash_md", "reward", "prm", "gkd", "opd", "iw_opd", "sdpo", "sdft", "ssd"}
    assert need <= set(NAMES), sorted(need - set(NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_help_and_every_preset_resolve(name, capsys, tmp_path):
    assert cli.main(["train", name, "--help"]) == 0
    assert f"trlax train {name}" in capsys.readouterr().out
    spec = registry.get(name)
    build_config(name, {"output_dir": str(tmp_path)})
    for preset in spec.preset_names():
        build_config(name, {"output_dir": str(tmp_path), "preset": preset})
    import dataclasses

    has_field = "preset" in {f.name for f in dataclasses.fields(registry.config_class(name))}
    assert has_field or not spec.preset_names()
    if has_field:
        with pytest.raises(ValueError, match="preset='no_such_preset'"):
            build_config(name, {"output_dir": str(tmp_path), "preset": "no_such_preset"})


@pytest.mark.parametrize("name", NAMES)
def test_readme_row_lists_command_and_presets(name):
    rows = _readme_rows()
    assert name in rows, f"README trainer table has no row for `{name}`"
    row = rows[name]
    assert f"trlax train {name}" in row
    for preset in registry.get(name).preset_names():
        assert f"`{preset}`" in row, f"README row of {name} lacks preset {preset}"


def _first_step_sources():
    """Sources of the tests/train modules (this one excluded: it names every trainer) that capture a first
    step and define a first-step test."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for fn in sorted(os.listdir(here)):
        if fn.startswith("test_") and fn.endswith(".py") and fn != os.path.basename(__file__):
            src = open(os.path.join(here, fn)).read()
            if "capture_first_step(" in src and re.search(r"^def test_\w*first_step\w*\(", src, re.M):
                out[fn] = src
    return out


@pytest.mark.parametrize("name", NAMES)
def test_first_step_test_exists(name):
    found = [fn for fn, src in _first_step_sources().items() if f'"{name}"' in src or f"'{name}'" in src]
    assert found, f"no test in tests/train captures the first step of `{name}`"


def test_first_step_guard_can_fail():
    """The guard above reads other files only: a trainer name that no other file mentions is not found."""
    assert os.path.basename(__file__) not in _first_step_sources()
    assert not any('"no_such_trainer"' in src for src in _first_step_sources().values())
