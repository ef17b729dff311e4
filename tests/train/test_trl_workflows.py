"""What a TRL user brings to trlax: Python reward functions (by import path on the command line, or as callables
to the Python API), conversational datasets with a chat-templated local checkpoint, and TRL trainer configs.

The toy runs use test_loops.py's small GRPO shapes (one compile set, shared through the persistent cache)."""

import json
import math
import os
import sys
import textwrap

import numpy as np
import pytest
import yaml

from trlax.train import cli, loops
from trlax.train import data as D
from trlax.train.config import build_config, from_trl_config

# no warm-up stage and no held-out evaluation: every reward-function call is a training round's
SMALL_GRPO = dict(batch_size=16, num_generations=4, max_completion_length=3, max_prompt_length=4, progress=False,
                  export=False, preset="grpo", sft_warmup_steps=0, eval_split=0.0)

REWARDS_MODULE = textwrap.dedent('''
    CALLS = []

    def length_penalty(prompts, completions, completion_ids, **kwargs):
        """TRL's signature; every fourth completion is unscorable (None)."""
        out = [None if i % 4 == 3 else -0.1 * len(ids) for i, ids in enumerate(completion_ids)]
        CALLS.append(dict(prompts=list(prompts), completions=list(completions),
                          completion_ids=[list(x) for x in completion_ids], kwargs=kwargs, out=out))
        return out
''')


@pytest.fixture(scope="module")
def mypkg(tmp_path_factory):
    """A package `mypkg` with `mypkg/rewards.py` in a fresh directory (the test's working directory: as `trl grpo`,
    trlax finds reward modules there)."""
    root = tmp_path_factory.mktemp("userland")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "rewards.py").write_text(REWARDS_MODULE)
    yield root
    for name in ("mypkg.rewards", "mypkg"):
        sys.modules.pop(name, None)
    if str(root) in sys.path:
        sys.path.remove(str(root))


def _flags(**kw):
    return [x for k, v in kw.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _nanstd(x):
    x = np.asarray([v for v in x if v is not None], float)
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


# --------------------------------------------------------------------------------- reward functions


@pytest.fixture(scope="module")
def cli_run(mypkg, tmp_path_factory):
    """`trlax train grpo --reward_funcs mypkg.rewards:length_penalty,builtin` (2 steps, the built-in task)."""
    out = tmp_path_factory.mktemp("cli_run")
    cwd = os.getcwd()
    os.chdir(mypkg)
    try:
        rc = cli.main(["train", "grpo", "--reward_funcs", "mypkg.rewards:length_penalty,builtin", "--max_steps", "2",
                       "--output_dir", str(out), *_flags(**SMALL_GRPO)])
    finally:
        os.chdir(cwd)
    import mypkg.rewards

    return rc, out, list(mypkg.rewards.CALLS)


def test_cli_user_reward_function(cli_run):
    """The user's function is imported from the working directory and called as TRL calls it (dataset prompts,
    decoded completions, completion ids, the other columns as lists); its None entries are left out of the
    weighted sum (nansum) and of its per-function mean / std, as TRL logs them."""
    rc, out, calls = cli_run
    assert rc == 0
    rows = _jsonl(out / "metrics.jsonl")
    assert len(calls) == len(rows) == 2  # one generation round per step
    for call, r in zip(calls, rows):
        n = len(call["completions"])
        assert n == SMALL_GRPO["batch_size"]
        assert all(isinstance(c, str) for c in call["completions"])
        assert all(p == call["prompts"][4 * (i // 4)] for i, p in enumerate(call["prompts"]))  # a group per prompt
        assert all(isinstance(p, str) and p.endswith("=") for p in call["prompts"])
        assert set(call["kwargs"]) == {"answer"} and len(call["kwargs"]["answer"]) == n
        assert all(len(ids) <= SMALL_GRPO["max_completion_length"] for ids in call["completion_ids"])
        scored = [v for v in call["out"] if v is not None]
        assert r["rewards/length_penalty/mean"] == pytest.approx(np.mean(scored))
        assert r["rewards/length_penalty/std"] == pytest.approx(_nanstd(call["out"]))
        assert r["rewards/nan"] == n // 4 and r["rewards/unscorable"] == 0
        # reward = mean over completions of accuracy + format + length_penalty (None -> left out of the sum)
        assert r["reward"] == pytest.approx(r["rewards/accuracy/mean"] + r["rewards/format/mean"] + sum(scored) / n)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["reward_funcs"] == "mypkg.rewards:length_penalty,builtin"  # config.yaml reruns as it is


def test_reward_function_paths_and_errors(mypkg, monkeypatch):
    monkeypatch.chdir(mypkg)
    ok = build_config("grpo", dict(SMALL_GRPO, reward_funcs="mypkg.rewards.length_penalty, builtin",
                                   reward_weights="0.5,1,1"))
    fn, names = __import__("trlax.train.rewarding", fromlist=["x"]).reward_functions(ok)
    assert names == ("length_penalty", "accuracy", "format")
    for bad, why in [("mypkg.nope:f", "cannot import module 'mypkg.nope'"),
                     ("mypkg.rewards:missing", "has no attribute 'missing'"),
                     ("mypkg.rewards:CALLS", "is a list, not a callable"),
                     ("nonsense", "neither a built-in reward")]:
        with pytest.raises(ValueError, match="reward_funcs") as e:
            build_config("grpo", dict(SMALL_GRPO, reward_funcs=f"builtin,{bad}"))
        assert bad in str(e.value) and why in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="reward_weights='1,1' must have 3 values"):
        build_config("grpo", dict(SMALL_GRPO, reward_funcs="mypkg.rewards:length_penalty,builtin",
                                  reward_weights="1,1"))


def test_python_api_with_callables_and_rows(tmp_path):
    """`trlax.train.grpo(config, reward_funcs=[callable, ...], train_dataset=rows)`: a closure (no import path)
    and a built-in name; TRL's reward_weights; a function returning None for every completion of some rows ...
    as TRL, rows no function scores count as unscorable."""
    import trlax.train

    seen = []

    def half(prompts, completions, completion_ids, answer, **kw):
        seen.append(list(answer))
        return [None if i < 4 else 1.0 for i in range(len(completions))]

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    s = trlax.train.grpo(dict(SMALL_GRPO, max_steps=1, output_dir=str(tmp_path / "o")), reward_funcs=[half],
                         train_dataset=rows, reward_weights=[2])  # TRL's list form
    assert s["steps"] == 1 and len(seen) == 1 and set(seen[0]) <= {r["answer"] for r in rows}
    (r,) = _jsonl(tmp_path / "o" / "metrics.jsonl")
    assert r["rewards/half/mean"] == 1.0 and r["rewards/half/std"] == 0.0
    assert r["rewards/unscorable"] == 4 and r["rewards/nan"] == 4
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["reward_funcs"] == "python:half" and saved["reward_weights"] == "2.0"
    with pytest.raises(TypeError, match="neither a name / import path nor callable"):
        trlax.train.grpo(dict(SMALL_GRPO, max_steps=1), reward_funcs=[3], train_dataset=rows)


def test_python_api_takes_a_dataset_and_a_trl_config(tmp_path, monkeypatch):
    """`trlax.train.train("dpo", DPOConfig(...), train_dataset=datasets.Dataset)`: an implicit-prompt conversational
    preference set gets its prompt extracted before the run; a trlax YAML is not mistaken for a TRL one."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    import trlax.train
    from trlax.train.config import is_trl_config

    user = [{"role": "user", "content": "2+2="}]
    ds = datasets.Dataset.from_list([{"chosen": user + [{"role": "assistant", "content": "4"}],
                                      "rejected": user + [{"role": "assistant", "content": "5"}]}] * 4)
    got = {}
    monkeypatch.setattr(loops, "run", lambda algo, cfg, rows: got.update(algo=algo, cfg=cfg, rows=rows))
    with pytest.warns(UserWarning, match="DPOConfig: a TRL config"):
        trlax.train.train("dpo", trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.3),
                          train_dataset=ds, max_steps=3)
    assert got["algo"] == "dpo" and (got["cfg"].beta, got["cfg"].max_steps) == (0.3, 3)
    assert got["rows"][0]["prompt"] == user and got["rows"][0]["chosen"] == [{"role": "assistant", "content": "4"}]
    saved = yaml.safe_load(yaml.safe_dump({"dtype": "bfloat16", "beta": 0.1, "max_steps": 2}))
    assert not is_trl_config(saved)


def test_async_reward_function():
    """An `async def` reward function (TRL awaits them) is awaited; its None stays unscorable (NaN)."""
    from trlax.rollouts.rewards import compute_rewards
    from trlax.train.rewarding import TRLRewardFunction

    async def judge(prompts, completions, **kw):
        return [float(len(c)) if c else None for c in completions]

    R = compute_rewards([TRLRewardFunction(judge, "judge")], ["ab", "", "c"], prompts=["p"] * 3, answer=[1, 2, 3])
    np.testing.assert_array_equal(R[:, 0], [2.0, np.nan, 1.0])


def test_reward_function_wrong_length_is_named():
    from trlax.rollouts.rewards import compute_rewards
    from trlax.train.rewarding import TRLRewardFunction

    def short(prompts, completions, **kw):
        return [0.0]

    with pytest.raises(ValueError, match="reward function 'short' returned 1 rewards for 3 completions"):
        compute_rewards([TRLRewardFunction(short, "short")], ["a", "b", "c"])


# ------------------------------------------------------------ conversational data + chat-templated checkpoint


def test_conversational_jsonl_with_chat_templated_checkpoint(tmp_path, monkeypatch, mypkg):
    """A local checkpoint whose tokenizer has a ChatML chat template, a conversational jsonl (system + user
    messages): the policy samples after the generation prompt (the prompt ids it is given decode to TRL's
    rendering, ending with the assistant header), and a TRL-style reward function gets the messages and
    chat-shaped completions."""
    from flax import nnx

    from trlax.models import Decoder, DecoderConfig, save_pretrained
    from trlax.rollouts.environments import tool_tokenizer
    from trlax.train import modeling

    tok = tool_tokenizer()
    ckpt = tmp_path / "ckpt"
    hf = modeling.tiny_hf_config(tok, num_hidden_layers=1)  # (model_type qwen2 would load as Qwen2Tokenizer)
    save_pretrained(Decoder(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0)), str(ckpt), tokenizer=tok)
    rows = [{"prompt": [{"role": "system", "content": "1+1=2"}, {"role": "user", "content": f"{i}+2="}],
             "answer": str(i + 2)} for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    box = {}
    monkeypatch.setattr(loops, "_on_first_step", lambda run, state, batch, metrics: box.update(batch=batch))
    monkeypatch.chdir(mypkg)
    monkeypatch.syspath_prepend(str(mypkg))  # importable here even when no earlier test ran the CLI there
    import mypkg.rewards

    mypkg.rewards.CALLS.clear()
    flags = dict(SMALL_GRPO, max_prompt_length=24, max_steps=1, model=str(ckpt), dataset=str(data),
                 output_dir=str(tmp_path / "o"), reward_funcs="builtin,mypkg.rewards:length_penalty")
    assert cli.main(["train", "grpo", *_flags(**flags)]) == 0
    ids, mask = np.asarray(box["batch"]["prompt_ids"]), np.asarray(box["batch"]["prompt_mask"])
    prompts = {tok.decode(ids[b][mask[b] > 0]) for b in range(ids.shape[0])}
    want = {D.render_example(tok, r)["prompt"] for r in rows}
    assert prompts <= want and all(p.endswith("<|im_start|>assistant\n") for p in prompts)
    assert all(p.startswith("<|im_start|>system\n1+1=2<|im_end|>\n<|im_start|>user\n") for p in prompts)
    trl_data = pytest.importorskip("trl.data_utils")
    assert want == {trl_data.maybe_apply_chat_template({"prompt": r["prompt"]}, tok)["prompt"] for r in rows}
    (call,) = mypkg.rewards.CALLS
    assert all(p in [r["prompt"] for r in rows] for p in call["prompts"])  # the messages themselves, as TRL
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in call["completions"])


# ------------------------------------------------------------------------------------------- TRL configs


GRPO_YAML = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=4,
                 learning_rate=3e-3, max_steps=40,
                 num_generations=4, beta=0.04, loss_type="dr_grpo", epsilon_high=0.28, use_vllm=True,
                 vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.5,
                 scale_rewards="batch", temperature=0.9, top_p=0.95, max_completion_length=3, seed=3,
                 warmup_ratio=0.1, bf16=True, gradient_checkpointing=True, save_strategy="steps", save_steps=20,
                 save_total_limit=3, logging_steps=5, report_to="none", lr_scheduler_type="cosine",
                 reward_funcs=["accuracy_reward", "think_format_reward"], reward_weights=[1.0, 0.5],
                 model_name_or_path="tiny", num_train_epochs=3, use_peft=True, lora_r=8, lora_alpha=32,
                 lora_target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_trl_grpo_yaml_through_the_cli(tmp_path, monkeypatch, ext):
    """`trlax train grpo --config trl.yaml` (or .json): TRL's field names and values applied (batch = per-device x
    accumulation, the accumulation as micro-batches, warm-up ratio, bf16, checkpointing, the loss and the sampler
    correction through PolicyLossConfig.from_trl, TRL's reward names), the rest in one warning; flags win."""
    p = tmp_path / f"grpo.{ext}"
    p.write_text(yaml.safe_dump(GRPO_YAML) if ext == "yaml" else json.dumps(GRPO_YAML))
    got = {}
    monkeypatch.setattr(loops, "run", lambda algo, cfg, rows: got.update(cfg=cfg))
    with pytest.warns(UserWarning) as w:
        rc = cli.main(["train", "grpo", "--config", str(p), "--output_dir", str(tmp_path / "o"), "--seed", "5"])
    assert rc == 0
    cfg = got["cfg"]
    assert (cfg.batch_size, cfg.num_microbatches, cfg.learning_rate, cfg.max_steps) == (16, 2, 3e-3, 40)
    assert cfg.steps_per_generation == 2  # TRL's 4 micro-batches of 8 = 2 optimiser steps of 16 completions
    assert (cfg.beta, cfg.loss_type, cfg.epsilon_high, cfg.scale_rewards) == (0.04, "dr_grpo", 0.28, "batch")
    assert (cfg.sampler_correction, cfg.sampler_clip_max) == ("token_truncate", 2.5)
    assert (cfg.temperature, cfg.top_p, cfg.warmup_steps, cfg.seed) == (0.9, 0.95, 4, 5)
    assert (cfg.compute_dtype, cfg.remat, cfg.save_every, cfg.keep_checkpoints) == ("bfloat16", "full", 20, 3)
    assert (cfg.reward_funcs, cfg.reward_weights) == ("accuracy,think_format", "1.0,0.5")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules) == (8, 32.0, "q_proj,v_proj")
    msgs = [str(x.message) for x in w if "TRL config" in str(x.message)]
    assert len(msgs) == 1
    for field in ("logging_steps", "report_to", "lr_scheduler_type", "num_train_epochs"):
        assert field in msgs[0]
    assert "learning_rate" not in msgs[0] and "use_vllm" not in msgs[0]


@pytest.mark.parametrize("field,value,match", [
    ("per_device_train_batch_size", "eight", "per_device_train_batch_size='eight' is not a number"),
    ("loss_type", "nope", "loss_type='nope' is not allowed"),
    ("temperature", "hot", "temperature='hot' is not a valid float"),
    ("save_total_limit", "x", "save_total_limit='x'"),
    ("steps_per_generation", 3, r"steps_per_generation=3 \(micro-batches\) must be a multiple of gradient_acc"),
])
def test_trl_config_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_config("grpo", from_trl_config("grpo", dict(GRPO_YAML, **{field: value})))


@pytest.mark.parametrize("algo,name", [("grpo", "GRPOConfig"), ("dpo", "DPOConfig"), ("sft", "SFTConfig"),
                                       ("kto", "KTOConfig")])
def test_whole_trl_config_objects(algo, name, tmp_path):
    """A whole TRL config (every field, as `to_dict()` dumps it): the same-named fields TRL and trlax share are
    applied with TRL's values, the run config validates, the rest is one warning."""
    trl = pytest.importorskip("trl")
    trl_cfg = getattr(trl, name)(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=7,
                                 learning_rate=2e-3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    with pytest.warns(UserWarning, match="do not apply"):
        values = __import__("trlax.train.api", fromlist=["x"]).config_values(algo, trl_cfg)
    cfg = build_config(algo, values)
    d = trl_cfg.to_dict()
    assert (cfg.max_steps, cfg.learning_rate, cfg.batch_size, cfg.num_microbatches) == (7, 2e-3, 8, 2)
    assert cfg.seed == d["seed"] and cfg.output_dir == str(tmp_path)
    for k in ("beta", "loss_type", "num_generations", "temperature", "max_completion_length"):
        if k in d and hasattr(cfg, k) and d[k] is not None:
            assert getattr(cfg, k) == (d[k] if not isinstance(d[k], list) else d[k][0]), k
    if algo == "grpo":  # TRL: steps_per_generation defaults to the accumulation (micro-batches): one step here
        assert d["steps_per_generation"] == 2 and cfg.steps_per_generation == 1
    if algo == "sft":
        assert cfg.packing == ("bfd" if d["packing"] else "")
