"""End-to-end loops behind `trlax train` (the default GRPO job: test_default_job.py): DPO / SFT train, kill + --resume
equals an uninterrupted run bit for bit, a half-written checkpoint is never resumed from, a local HF
checkpoint trains and its export loads in transformers, logging artefacts, bad input stops before compute.

Tiny models and few steps."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from trlax.train import cli, loops
from trlax.train.config import build_config

# the default job's warm start and held-out evaluation off (tests/train/test_default_job.py checks them)
SMALL_GRPO = dict(batch_size=16, num_generations=4, max_completion_length=3, max_prompt_length=4, progress=False,
                  sft_warmup_steps=0, eval_split=0.0)


def _read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _safetensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


class _Killed(Exception):
    pass


# the main job (`trlax train grpo` with no other argument): tests/train/test_default_job.py


# ----------------------------------------------------------------------------------------- resume


def test_kill_and_resume_is_bit_identical(tmp_path, monkeypatch):
    """GRPO with beta > 0 (reference model) and num_iterations = 2 (old log-probs): a run killed after
    step 2 and resumed with --resume ends with exactly the parameters of an uninterrupted run. A
    checkpoint directory left half-written by the kill is ignored."""
    common = dict(SMALL_GRPO, max_steps=6, save_every=2, beta=0.05, num_iterations=2, learning_rate=3e-3)
    full = loops.run("grpo", build_config("grpo", dict(common, output_dir=str(tmp_path / "full"))))

    def kill_after_2(run, step):
        if step == 2:
            run.ckpt.wait()
            raise _Killed

    monkeypatch.setattr(loops, "_after_step", kill_after_2)
    part = tmp_path / "part"
    with pytest.raises(_Killed):
        loops.run("grpo", build_config("grpo", dict(common, output_dir=str(part))))
    monkeypatch.setattr(loops, "_after_step", None)
    assert not (part / "final").exists()
    # a step-4 checkpoint interrupted mid-write (orbax writes to a tmp dir and renames when done)
    tmp = part / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    os.makedirs(tmp / "state")
    (tmp / "state" / "partial").write_bytes(b"\x00" * 64)
    resumed = loops.run("grpo", build_config("grpo", dict(common, output_dir=str(part), resume=True)))
    a, b = _safetensors(full["exported_to"]), _safetensors(resumed["exported_to"])
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra, rb = _read_jsonl(tmp_path / "full" / "metrics.jsonl"), _read_jsonl(part / "metrics.jsonl")
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]
    # and the run did move: the parameters differ from the initial ones
    assert any(np.any(a[k] != _init[k]) for _init in [_safetensors_initial(tmp_path)] for k in a)


def _safetensors_initial(tmp_path):
    cfg = build_config("grpo", dict(SMALL_GRPO, output_dir=str(tmp_path / "init"), max_steps=1))
    from trlax.train import modeling

    pol = modeling.build_policy(cfg)
    pol.save(pol.params, str(tmp_path / "init" / "hf"))
    return _safetensors(str(tmp_path / "init" / "hf"))


def test_existing_checkpoints_without_resume_refused(tmp_path):
    cfg = dict(batch_size=8, max_steps=1, progress=False, output_dir=str(tmp_path), export=False)
    loops.run("sft", build_config("sft", cfg))
    with pytest.raises(ValueError, match="output_dir=.*--resume"):
        loops.run("sft", build_config("sft", cfg))


# ------------------------------------------------------------------------------------ DPO and SFT


def test_dpo_default_data_learns(tmp_path):
    s = loops.run("dpo", build_config("dpo", dict(output_dir=str(tmp_path), max_steps=25, batch_size=16,
                                                  progress=False, export=False)))
    assert s["loss_last_10pct"] < s["loss_first_10pct"] - 0.05, s
    # against chance, not against step 1: there both implicit rewards are 0 (policy = reference) and the
    # strict comparison makes the accuracy 0 by construction
    assert s["accuracy_last_10pct"] >= 0.75, s
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert {"rewards/margins", "rewards/accuracies", "loss"} <= set(rows[0])
    assert rows[0]["rewards/accuracies"] == 0.0 and rows[0]["rewards/margins"] == 0.0  # policy = reference
    assert np.mean([r["rewards/accuracies"] for r in rows[-5:]]) >= 0.75


def test_dpo_on_the_fly_reference_equals_precomputed(tmp_path):
    kw = dict(max_steps=3, batch_size=8, progress=False, export=False, preset="ipo")
    a = loops.run("dpo", build_config("dpo", dict(kw, output_dir=str(tmp_path / "a"))))
    b = loops.run("dpo", build_config("dpo", dict(kw, output_dir=str(tmp_path / "b"), precompute_ref_logps=False)))
    del a, b
    ra, rb = _read_jsonl(tmp_path / "a" / "metrics.jsonl"), _read_jsonl(tmp_path / "b" / "metrics.jsonl")
    np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=1e-6)
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["loss_type"] == "ipo"


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_learns_and_bema_exported(tmp_path, loss_type):
    s = loops.run("sft", build_config("sft", dict(output_dir=str(tmp_path), max_steps=30, batch_size=16,
                                                  progress=False, loss_type=loss_type, bema=True,
                                                  bema_update_freq=5)))
    nll = [r["nll"] for r in _read_jsonl(tmp_path / "metrics.jsonl")]
    assert np.mean(nll[-3:]) < 0.7 * np.mean(nll[:3]), nll  # DFT's own loss -p·log p is not monotone in p
    a, b = _safetensors(s["exported_to"]), _safetensors(s["bema_exported_to"])
    assert any(np.any(a[k] != b[k]) for k in a)  # BEMA weights are their own average, not the policy


# ------------------------------------------------------------------------ HF checkpoint in and out


def test_local_hf_checkpoint_trains_and_export_loads_in_transformers(tmp_path):
    import torch
    import transformers
    from flax import nnx

    from trlax.models import Decoder, DecoderConfig, load_pretrained, save_pretrained
    from trlax.train import modeling
    from trlax.train.data import build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok"))
    hf = modeling.tiny_hf_config(tok, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                                 num_hidden_layers=1, tie_word_embeddings=True)
    src = tmp_path / "src"
    save_pretrained(Decoder(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(3)), str(src), tokenizer=tok)
    s = loops.run("sft", build_config("sft", dict(model=str(src), output_dir=str(tmp_path / "run"), max_steps=8,
                                                  batch_size=8, learning_rate=1e-2, progress=False)))
    assert s["loss_last_10pct"] < s["loss_first_10pct"]
    ids = tok("3+4=7", add_special_tokens=False)["input_ids"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(s["exported_to"], torch_dtype=torch.float32)
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(load_pretrained(s["exported_to"])(np.asarray([ids], np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    before = np.asarray(load_pretrained(str(src))(np.asarray([ids], np.int32)))
    assert np.max(np.abs(before - ours)) > 1e-3  # it trained
    tok2 = transformers.AutoTokenizer.from_pretrained(s["exported_to"])
    assert tok2("3+4=7", add_special_tokens=False)["input_ids"] == ids


def test_grpo_user_dataset_with_rollouts_rewards(tmp_path):
    """A local JSONL prompt set scored by trlax.rollouts.rewards functions (exact match on `answer`,
    n-gram repetition), weighted; one reward column per function is logged."""
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(8)))
    s = loops.run("grpo", build_config("grpo", dict(SMALL_GRPO, dataset=str(p), max_steps=2, export=False,
                                                    output_dir=str(tmp_path / "o"), preset="grpo",
                                                    reward_funcs="exact_match,repetition",
                                                    reward_weights="1.0,0.5")))
    rows = _read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert {"rewards/exact_match", "rewards/repetition"} <= set(rows[0]) and s["steps"] == 2
    for r in rows:  # the logged reward is the weighted sum of the per-function means (none unscorable here)
        np.testing.assert_allclose(r["reward"], r["rewards/exact_match"] + 0.5 * r["rewards/repetition"],
                                   atol=1e-9)
    assert all(r["rewards/repetition"] <= 0 for r in rows)


# ---------------------------------------------------------------------------- errors before compute


def _no_compute(monkeypatch):
    from trlax.train import modeling

    monkeypatch.setattr(modeling, "build_policy", lambda *a, **k: pytest.fail("compute started"))
    monkeypatch.setattr(loops, "run", lambda *a, **k: pytest.fail("compute started"))


@pytest.mark.parametrize("algo, row, missing", [
    ("dpo", {"prompt": "1+1=", "chosen": "2"}, "rejected"),
    ("sft", {"question": "1+1=", "completion": "2"}, "prompt"),
    ("grpo", {"question": "1+1="}, "prompt"),
])
def test_missing_dataset_column_stops_cli_before_compute(tmp_path, monkeypatch, capsys, algo, row, missing):
    _no_compute(monkeypatch)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(row) for _ in range(4)))
    assert cli.main(["train", algo, "--dataset", str(p), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing column" in err and missing in err and "dataset=" in err


@pytest.mark.parametrize("argv, needle", [
    (["train", "grpo", "--batch_size", "30", "--num_generations", "8"], "num_generations=8"),
    (["train", "grpo", "--temperature", "0"], "temperature=0"),
    (["train", "grpo", "--scale_rewards", "max"], "scale_rewards='max'"),
    (["train", "grpo", "--model", "/nonexistent/ckpt"], "model='/nonexistent/ckpt'"),
    (["train", "sft", "--loss_type", "kl"], "loss_type='kl'"),
    (["train", "dpo", "--loss_type", "sigmoidd"], "loss_type"),
    (["train", "dpo", "--beta", "-1"], "beta"),
    (["train", "dpo", "--preset", "nope"], "preset='nope'"),
    (["train", "grpo", "--reward_weights", "1,x"], "reward_weights"),
    (["train", "grpo", "--reward_weights", "1,2,3"], "reward_weights='1,2,3' must have 2 values"),
    (["train", "grpo", "--reward_funcs", "builtin,bleu"], "reward_funcs='bleu'"),
])
def test_bad_values_stop_cli_before_compute(monkeypatch, capsys, argv, needle):
    _no_compute(monkeypatch)
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_preset_resolved_into_saved_config(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(loops, "run", lambda algo, cfg, rows=None: seen.update(cfg=cfg))
    assert cli.main(["train", "grpo", "--preset", "gspo", "--beta", "0.02", "--output_dir", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert cfg.importance_sampling_level == "sequence" and cfg.epsilon == 3e-4 and cfg.beta == 0.02
    loops.save_config("grpo", cfg)
    again = build_config("grpo", yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.__dict__ == cfg.__dict__


# ------------------------------------------------------------------------ 8 simulated devices


def test_loops_on_eight_devices_fsdp_tp(tmp_path):
    """`trlax train` on a data=2 x fsdp=2 x tensor=2 mesh of 8 simulated CPU devices: SFT ends with the
    parameters of the same run on one device (float32, 1e-5); GRPO (sampler + step on the mesh, with the default
    job's warm start and held-out evaluation) runs."""
    one = loops.run("sft", build_config("sft", dict(output_dir=str(tmp_path / "one"), max_steps=3, batch_size=8,
                                                    progress=False, mesh_data=1)))
    code = (
        "import os\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8 ' + os.environ.get('TRLAX_TEST_XLA_FLAGS', '')\n"
        "import sys, jax\n"
        "assert len(jax.devices()) == 8\n"
        "from trlax.train import cli\n"
        f"m = ['--mesh_data', '2', '--mesh_fsdp', '2', '--mesh_tensor', '2', '--progress', 'false']\n"
        f"assert cli.main(['train', 'sft', '--output_dir', {str(tmp_path / 'eight')!r}, '--max_steps', '3',"
        " '--batch_size', '8'] + m) == 0\n"
        f"assert cli.main(['train', 'grpo', '--output_dir', {str(tmp_path / 'grpo8')!r}, '--max_steps', '2',"
        " '--batch_size', '16', '--num_generations', '4', '--max_completion_length', '3', '--beta', '0.04',"
        " '--export', 'false'] + m) == 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _safetensors(one["exported_to"]), _safetensors(str(tmp_path / "eight" / "final"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert any(np.any(a[k] != _safetensors_initial(tmp_path)[k]) for k in a)
    rows = _read_jsonl(tmp_path / "grpo8" / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    # the default job's warm start and held-out evaluation run on the mesh too
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [0, 2]
    assert os.path.isfile(tmp_path / "grpo8" / "warmup" / "final" / "config.json")
