"""Hostile data: every bad data set stops `trlax train` before any compute with exit status 2 and one line naming
the file, row and column; over-long prompts are truncated (documented) and counted in the logs; user reward
functions that raise are named with the sample, NaN rewards are left out of the weighted sum (as TRL) and
counted."""

import json

import numpy as np
import pytest

from trlax.train import cli, loops


@pytest.fixture
def no_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the run started: the data error was not caught before compute")

    monkeypatch.setattr(loops, "run", fail)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_rows(n=6):
    return [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)]


def _cases(tmp):
    """(trainer, dataset path, fragments the one-line error must contain)."""
    t = tmp
    rows = _sft_rows()
    empty_prompt = [dict(r) for r in rows]
    empty_prompt[2]["prompt"] = "  "
    int_completion = [dict(r) for r in rows]
    int_completion[4]["completion"] = 5
    dict_prompt = [dict(r) for r in rows]
    dict_prompt[1]["prompt"] = {"text": "1+1="}
    missing = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"} for _ in range(5)]
    del missing[3]["rejected"]
    kto = [{"prompt": "1+1=", "completion": "2", "label": True} for _ in range(4)]
    kto[1]["label"] = "yes"
    prm = [{"prompt": "1+1=", "completions": ["step", "2"], "labels": [True, True]} for _ in range(4)]
    prm[2]["completions"] = ["step", 2]
    bad_line = t / "bad_line.jsonl"
    bad_line.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2=", "completion": "3"}\n{"prompt": 1+2\n')
    (t / "data.csv").write_text("prompt,completion\n1+1=,2\n")
    (t / "empty.jsonl").write_text("")
    (t / "empty.json").write_text("[]")
    (t / "garbage.parquet").write_bytes(b"not parquet at all")
    (t / "chat.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": ""}], "completion": "2"}) + "\n")
    return [
        ("sft", _jsonl(t / "empty_prompt.jsonl", empty_prompt), ["row 2", "'prompt'", "empty"]),
        ("sft", t / "chat.jsonl", ["row 0", "'prompt'", "empty"]),
        ("sft", _jsonl(t / "int_completion.jsonl", int_completion), ["row 4", "'completion'", "expected text", "int"]),
        ("grpo", _jsonl(t / "dict_prompt.jsonl", dict_prompt), ["row 1", "'prompt'", "expected text", "dict"]),
        ("dpo", _jsonl(t / "missing.jsonl", missing), ["row 3", "missing column 'rejected'"]),
        ("kto", _jsonl(t / "kto.jsonl", kto), ["row 1", "'label'", "true / false", "'yes'"]),
        ("prm", _jsonl(t / "prm.jsonl", prm), ["row 2", "'completions'", "item 1", "expected text"]),
        ("sft", bad_line, ["line 3", "not valid JSON"]),
        ("sft", t / "data.csv", ["unsupported file type '.csv'"]),
        ("sft", t / "empty.jsonl", ["is empty"]),
        ("sft", t / "empty.json", ["is empty"]),
        ("sft", t / "garbage.parquet", ["not a readable parquet file"]),
        ("sft", t / "nope.jsonl", ["no such file"]),
    ]


def test_hostile_data_sets_give_one_line_errors_naming_file_row_column(tmp_path, capsys, no_compute):
    for algo, path, needles in _cases(tmp_path):
        status = cli.main(["train", algo, "--dataset", str(path), "--output_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert status == 2, (algo, path, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: dataset="), err
        assert repr(str(path)) in err, err  # the file
        for n in needles:
            assert n in err, (n, err)


def test_well_formed_files_load(tmp_path):
    """The same loader reads the accepted layouts: JSON lines, a JSON list, a JSON object of columns, parquet."""
    from trlax.train.data import load_records

    rows = _sft_rows()
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in rows))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("a.json", "b.json", "c.json", "d.parquet"):
        assert load_records("sft", str(tmp_path / name)) == rows


def test_long_prompts_are_truncated_and_counted(tmp_path, capsys):
    """Prompts longer than max_prompt_length keep their last tokens; the first prints a note and the distinct
    truncated prompts are counted in metrics.jsonl (`truncated_prompts`)."""
    from trlax.train import data as D

    tok = D.build_tokenizer(str(tmp_path / "tok"))
    D.truncated_prompts(reset=True)
    ids, mask = D.encode_left_padded(tok, ["1+2=", "12345678+1=", "12345678+1="], 4)
    assert D.truncated_prompts() == 1
    np.testing.assert_array_equal(ids[1], tok("12345678+1=", add_special_tokens=False)["input_ids"][-4:])
    assert mask[0].sum() == 4 and mask[1].all()

    rows = _sft_rows(4) + [{"prompt": "1234567" * (i + 1) + "+1=", "completion": "8"} for i in range(4)]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "run"
    assert cli.main(["train", "sft", "--dataset", str(path), "--output_dir", str(out), "--max_steps", "1",
                     "--batch_size", "8", "--max_prompt_length", "4", "--max_completion_length", "2",
                     "--progress", "false", "--export", "false"]) == 0
    assert "prompts longer than max_prompt_length=4 tokens are truncated" in capsys.readouterr().out
    with open(out / "metrics.jsonl") as fh:
        logged = [json.loads(line)["truncated_prompts"] for line in fh]
    assert logged == [4.0]


# ------------------------------------------------------------------------------------ reward functions


def test_reward_function_that_raises_is_named_with_the_sample():
    from trlax.rollouts.rewards import RewardFunctionError, compute_rewards

    def my_reward(completion, **_):
        if completion == "boom":
            raise KeyError("answer")
        return 1.0

    with pytest.raises(RewardFunctionError, match=r"my_reward raised KeyError.*sample 1 \(prompt='p1', "
                                                   r"completion='boom'\)"):
        compute_rewards([my_reward], ["ok", "boom"], prompts=["p0", "p1"])

    def batched_reward(completions, **_):
        raise ZeroDivisionError("x")

    batched_reward.batched = True
    with pytest.raises(RewardFunctionError, match="batched_reward raised ZeroDivisionError"):
        compute_rewards([batched_reward], ["ok", "boom"])

    def not_a_number(completion, **_):
        return "high"

    with pytest.raises(RewardFunctionError, match="not_a_number returned 'high'.*sample 0"):
        compute_rewards([not_a_number], ["ok"])


def test_nan_rewards_are_left_out_of_the_weighted_sum_as_trl_and_counted():
    """TRL 1.16 (GRPOTrainer._generate_and_score_completions): rewards = (R * w).nansum(1); rows where every function
    is NaN are unscorable (NaN, excluded from the group mean / std, advantage 0). Reference written from that."""
    import jax.numpy as jnp

    from trlax.objectives import multi_reward_advantages
    from trlax.rollouts.rewards import compute_rewards, nan_reward_counts

    def flaky(completion, **_):
        return float("nan") if completion.startswith("x") else 1.0 + len(completion)

    def other(completion, **_):
        return None if completion == "xx" else 0.5 * len(completion)

    texts = ["a", "xb", "ccc", "xx", "dd", "e"]  # groups of 3
    R = compute_rewards([flaky, other], texts)
    w = np.array([1.0, 2.0])
    assert nan_reward_counts(R) == {"rewards/nan": 3.0, "rewards/unscorable": 1.0}
    # reference (TRL): nansum, unscorable rows NaN, group nanmean / unbiased nanstd, (r - mean) / (std + 1e-4), NaN -> 0
    r = np.nansum(R * w, axis=1)
    r[np.isnan(R).all(1)] = np.nan
    g = r.reshape(2, 3)
    mean = np.nanmean(g, 1, keepdims=True)
    std = np.nanstd(g, 1, ddof=1, keepdims=True)
    ref = np.nan_to_num(((g - mean) / (std + 1e-4)).ravel(), nan=0.0)
    adv = np.asarray(multi_reward_advantages(jnp.asarray(R), w, 3))
    np.testing.assert_allclose(adv, ref, rtol=1e-6, atol=1e-6)
    assert np.isfinite(adv).all() and adv[3] == 0.0
