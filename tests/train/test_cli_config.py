"""`trlax train` configuration: every field settable, --help lists them, bad input stops the run
before any compute with a message naming the field."""

import json

import pytest

from trlax.train import cli
from trlax.train.config import build_config, config_class, loss_config
from trlax.train.data import EpochSampler, load_records


def test_help_lists_every_field_with_defaults(capsys):
    assert cli.main(["train", "grpo", "--help"]) == 0
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(config_class("grpo")):
        assert f"--{f.name}" in out
    assert "--epsilon_high" in out and "--num_generations" in out and "default:" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "ppo2"], "unknown algorithm 'ppo2'"),
        (["train", "grpo", "--epsilon", "-0.5"], "epsilon=-0.5"),
        (["train", "grpo", "--loss_type", "grpoo"], "loss_type='grpoo'"),
        (["train", "grpo", "--bogus_field", "1"], "bogus_field"),
        (["train", "grpo", "--max_steps", "abc"], "max_steps='abc'"),
        (["train", "sft", "--batch_size", "6", "--num_microbatches", "4"], "num_microbatches=4"),
        (["train", "grpo", "--preset", "nope"], "preset='nope'"),
        (["train", "grpo", "--remat", "everything"], "remat='everything'"),
        (["train", "grpo", "--attention_impl", "flash"], "attention_impl='flash'"),
        (["train", "grpo", "--dtype", "bfloat16", "--compute_dtype", "float32"], "dtype or compute_dtype"),
    ],
)
def test_bad_config_stops_before_compute(argv, needle, capsys, monkeypatch):
    import trlax.train.loops as loops

    monkeypatch.setattr(loops, "run", lambda *a, **k: pytest.fail("compute started"))
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.01\nepsilon_high: 0.28\nloss_type: dapo\n")
    import yaml

    values = yaml.safe_load(path.read_text())
    values.update({"learning_rate": "0.02", "beta": "0.01"})
    cfg = build_config("grpo", values)
    assert cfg.learning_rate == 0.02 and cfg.epsilon_high == 0.28
    lc = loss_config("grpo", cfg)
    assert lc.loss_type == "dapo" and lc.beta == 0.01 and lc.max_completion_length == cfg.max_completion_length


def test_preset_with_override():
    cfg = build_config("grpo", {"preset": "gspo", "beta": "0.02"})
    lc = loss_config("grpo", cfg)
    assert lc.importance_sampling_level == "sequence" and lc.epsilon == 3e-4 and lc.beta == 0.02


def test_missing_dataset_columns_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": "1+1=", "chosen": "2"}) for _ in range(4)))
    with pytest.raises(ValueError, match="missing column.*rejected"):
        load_records("dpo", str(p))


def test_local_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_records("sft", str(p)) == rows
    import pandas as pd

    q = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(q)
    assert load_records("sft", str(q)) == rows


def test_epoch_sampler_resumes_identically():
    a = EpochSampler(10, 3, seed=7)
    seq = [a.next().tolist() for _ in range(7)]
    b = EpochSampler(10, 3, seed=7)
    for _ in range(4):
        b.next()
    c = EpochSampler(10, 3, seed=7, **b.state())
    assert [c.next().tolist() for _ in range(3)] == seq[4:]


def test_example_config_file_parses(monkeypatch):
    import os

    seen = {}
    import trlax.train.loops as loops

    monkeypatch.setattr(loops, "run", lambda algo, cfg, rows=None: seen.update(cfg=cfg))
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "grpo.yaml")
    assert cli.main(["train", "grpo", "--config", path, "--max_steps", "7"]) == 0
    cfg = seen["cfg"]
    assert cfg.max_steps == 7 and cfg.importance_sampling_level == "sequence" and cfg.beta == 0.02
    assert cfg.save_every == 50


def test_run_level_preset_refines_the_loss_preset():
    """`--preset dapo` sets DAPO's loss fields (PolicyLossConfig.dapo) and its run-level reward shaping
    (soft overlong punishment); explicit flags win over both; run-level-only presets (gdpo) work."""
    cfg = build_config("grpo", {"preset": "dapo"})
    lc = loss_config("grpo", cfg)
    assert lc.loss_type == "dapo" and lc.epsilon_high == 0.28 and lc.mask_truncated_completions
    assert cfg.reward_funcs == "builtin,soft_overlong"
    cfg = build_config("grpo", {"preset": "dapo", "reward_funcs": "builtin", "epsilon_high": "0.3"})
    assert cfg.reward_funcs == "builtin" and loss_config("grpo", cfg).epsilon_high == 0.3
    cfg = build_config("grpo", {"preset": "skywork_or1"})
    assert cfg.use_adaptive_entropy and loss_config("grpo", cfg).entropy_coef == 0.01
    assert build_config("grpo", {"preset": "gdpo"}).multi_objective_aggregation == "normalize_then_sum"
    assert build_config("grpo", {"preset": "lite_ppo"}).scale_rewards == "batch"


def test_long_sequence_fields_reach_the_policy(tmp_path):
    """`--dtype bfloat16` is the compute dtype (float32 master weights); `--remat` / `--attention_impl` build the
    policy's Decoder with them."""
    import jax.numpy as jnp

    from trlax.train import modeling

    cfg = build_config("sft", {"dtype": "bfloat16", "remat": "dots", "attention_impl": "blockwise",
                               "output_dir": str(tmp_path)})
    assert cfg.compute_dtype == "bfloat16" and cfg.param_dtype == "float32"
    from flax import nnx

    policy = modeling.build_policy(cfg)
    model = nnx.merge(policy.graphdef, policy.params)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert model.remat == ("dots",) * model.config.num_layers and model.config.attention_impl == "blockwise"
    off = build_config("sft", {"remat": "off", "output_dir": str(tmp_path)})
    assert off.remat == "off" and modeling._remat(off) is False
