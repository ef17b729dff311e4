"""TRL's dataset formats rendered by trlax exactly as TRL renders them (no JAX: text and token ids only).

Two chat-templated tokenizers are built locally (byte-level BPE trained here with the ``tokenizers`` library):
one with Qwen 2.5's chat template, one with Llama 3.1's (the templates as TRL ships them for identity checks,
read from the installed TRL: the oracle). A few hundred random rows of each TRL format (standard and
conversational; system messages, multi-turn prompts, assistant-prefilled prompts, tools) go through trlax
(:func:`trlax.train.data.load_records` from json / jsonl / parquet / a ``save_to_disk`` directory, then
:func:`~trlax.train.data.render_example` and the trainers' tokenisation) and through TRL's own
``maybe_extract_prompt`` / ``maybe_apply_chat_template`` / ``_tokenize``; text and token ids must be identical.
"""

import json
import os
import random
import zlib

import numpy as np
import pytest

from trlax.train import data as D

trl_data = pytest.importorskip("trl.data_utils")

N_ROWS = 200
WORDS = ("the sky is blue green why how many apples add two three sum of what color please answer briefly "
         "weather in Paris tool result 7 12 yes no").split()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "the city"}},
                                               "required": ["city"]}}}]


def _template(name: str) -> str:
    import trl

    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", name)) as fh:
        return fh.read()


def _tokenizer(style: str):
    """A byte-level BPE tokenizer with Qwen 2.5's or Llama 3.1's special tokens and chat template (Llama's adds
    ``<|begin_of_text|>`` to plain text, as the real one does)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "qwen":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        extra = ["<tool_call>", "</tool_call>"]
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        template = _template("qwen2_5.jinja")
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
        extra = []
        kw = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
        template = _template("llama3_1.jinja")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), template, json.dumps(TOOLS)] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    if style == "llama":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module", params=["qwen", "llama"])
def tok(request):
    return _tokenizer(request.param)


def _text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))


def _prompt(rng, conversational, prefill_ok=True):
    """A prompt: text, or messages (optional system message, 1-2 earlier turns, sometimes an assistant prefill)."""
    if not conversational:
        return _text(rng) + rng.choice(["", " ", "?"])
    msgs = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(0, 1)):
        msgs += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
    msgs.append({"role": "user", "content": _text(rng)})
    if prefill_ok and rng.random() < 0.2:
        msgs.append({"role": "assistant", "content": _text(rng)})
    return msgs


def _answer(rng, conversational):
    return [{"role": "assistant", "content": _text(rng)}] if conversational else " " + _text(rng)


def make_rows(fmt: str, conversational: bool, n: int = N_ROWS, seed: int = 0):
    rng = random.Random(zlib.crc32(f"{fmt}/{conversational}/{seed}".encode()))
    rows = []
    for _ in range(n):
        answers = fmt in ("prompt_completion", "preference", "implicit_preference", "unpaired")
        p = _prompt(rng, conversational, prefill_ok=not answers)  # TRL: a completion follows a user turn
        if fmt == "prompt_only":
            r = {"prompt": p, "answer": str(rng.randint(0, 9))}
        elif fmt == "prompt_completion":
            r = {"prompt": p, "completion": _answer(rng, conversational)}
        elif fmt == "preference":
            r = {"prompt": p, "chosen": _answer(rng, conversational), "rejected": _answer(rng, conversational)}
        elif fmt == "implicit_preference":
            ch, rj = _answer(rng, conversational), _answer(rng, conversational)
            if ch == rj:
                rj = _answer(rng, conversational) + ([{"role": "assistant", "content": "no"}] if conversational
                                                     else " no")
            r = {"chosen": p + ch, "rejected": p + rj}
        elif fmt == "unpaired":
            r = {"prompt": p, "completion": _answer(rng, conversational), "label": rng.random() < 0.5}
        else:  # stepwise supervision
            k = rng.randint(1, 3)
            r = {"prompt": p, "completions": [_text(rng) for _ in range(k)], "labels": [rng.random() < 0.5] * k}
        if conversational and rng.random() < 0.25:
            r["tools"] = json.dumps(TOOLS)  # TRL's trainers read a JSON string (or a list) from the row
        rows.append(r)
    return rows


FORMATS = {  # TRL format -> a trlax trainer that reads it
    "prompt_only": "grpo", "prompt_completion": "sft", "preference": "dpo", "implicit_preference": "dpo",
    "unpaired": "kto", "stepwise": "prm",
}
WRITERS = ("jsonl", "json", "parquet", "disk")


def _write(rows, path, how):
    if how in ("parquet", "disk"):  # columnar: every row gets every column (absent = None), as datasets does
        keys = list(dict.fromkeys(k for r in rows for k in r))
        rows = [{k: r.get(k) for k in keys} for r in rows]
    if how == "jsonl":
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif how == "json":
        with open(path, "w") as fh:
            json.dump(rows, fh)
    elif how == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def _trl(row, tok):
    """TRL's rendering of one row (the prompt of an implicit-prompt preference row extracted first)."""
    row = {**row, **trl_data.maybe_extract_prompt(row)}  # as Dataset.map: other columns kept
    return trl_data.maybe_apply_chat_template(row, tok, tools=D.row_tools(row))


def _trl_ids(row, tok):
    """The token ids TRL's trainers build for a row: conversational, ``prompt`` tokenised by the chat template
    with the generation prompt (continued when it ends with an assistant message) and each answer as what
    ``prompt + answer`` adds after their common prefix (``common_prefix_length``); standard, ``tok(text)``."""
    row = {**row, **trl_data.maybe_extract_prompt(row)}  # as Dataset.map: other columns kept
    out = {}
    if trl_data.is_conversational(row):
        kw = {"tools": D.row_tools(row)}
        last = row["prompt"][-1]["role"]
        pkw = {"add_generation_prompt": True} if last != "assistant" else {"continue_final_message": True}
        prompt = trl_data._tokenize(tok, row["prompt"], **pkw, **kw)["input_ids"]
        full = {k: trl_data._tokenize(tok, row["prompt"] + row[k], **kw)["input_ids"]
                for k in ("chosen", "rejected", "completion") if k in row}
        n = min([len(prompt)] + [trl_data.common_prefix_length(prompt, f) for f in full.values()])
        out["prompt"] = prompt[:n]
        out.update({k: f[n:] for k, f in full.items()})
    else:
        out["prompt"] = trl_data._tokenize(tok, row["prompt"])["input_ids"]
        for k in ("chosen", "rejected", "completion"):
            if k in row:  # TRL: prompt + answer tokenised together, EOS added to the text first
                text = row[k] if row[k].endswith(tok.eos_token) else row[k] + tok.eos_token
                both = trl_data._tokenize(tok, row["prompt"] + text)["input_ids"]
                out[k] = both[len(out["prompt"]):]
    return out


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_rendering_matches_trl(tok, fmt, conversational, tmp_path):
    """Every row, read back by load_records from one of the four local formats, renders to TRL's text."""
    rows = make_rows(fmt, conversational)
    how = WRITERS[(list(FORMATS).index(fmt) + conversational) % len(WRITERS)]
    path = _write(rows, str(tmp_path / f"data.{how}") if how != "disk" else str(tmp_path / "saved"), how)
    loaded = D.load_records(FORMATS[fmt], path)
    assert len(loaded) == len(rows)
    for i, (mine, orig) in enumerate(zip(loaded, rows)):
        want = _trl(dict(orig), tok)
        got = D.render_example(tok, mine)
        for k in want:
            assert got[k] == want[k], (fmt, i, k)
        if fmt in ("prompt_only", "stepwise"):  # a prompt alone: what the RL trainers' as_text gives
            assert D.as_text(tok, mine["prompt"], D.row_tools(mine)) == want["prompt"], (fmt, i)


@pytest.mark.parametrize("fmt", ["prompt_only", "prompt_completion", "preference", "unpaired"])
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_token_ids_match_trl(tok, fmt, conversational):
    """The ids trlax feeds the model (prompt left-padded, answers right-padded with EOS) are TRL's."""
    rows = make_rows(fmt, conversational, n=60, seed=1)
    for i, row in enumerate(rows):
        want = _trl_ids(dict(row), tok)
        for k, ids in want.items():
            text = D.column_texts(tok, [row], k)
            if k == "prompt":
                got, m = D.encode_left_padded(tok, text, 1024)
            else:
                got, m = D.encode_right_padded(tok, text, 1024)
            assert np.asarray(got)[np.asarray(m)].tolist() == ids, (fmt, i, k, text)


def test_generation_prompt_and_prefill(tok):
    """The issue's case: a user turn ends with the assistant header (the model answers instead of continuing the
    user), a prefilled assistant turn is continued (no end-of-turn after it)."""
    user = [{"role": "user", "content": "what color is the sky"}]
    text = D.as_text(tok, user)
    assert text.endswith("assistant\n" if "im_start" in text else "assistant<|end_header_id|>\n\n")
    pre = D.as_text(tok, user + [{"role": "assistant", "content": "It is"}])
    assert pre.endswith("It is")


def test_format_errors_name_the_row(tmp_path):
    bad = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "plain text"}]
    p = _write(bad, str(tmp_path / "bad.jsonl"), "jsonl")
    with pytest.raises(ValueError, match=r"row 0: column\(s\) 'prompt' are chat messages but 'completion' plain"):
        D.load_records("sft", p)
    sys_only = [{"prompt": [{"role": "system", "content": "be brief"}]}]
    p = _write(sys_only, str(tmp_path / "sys.jsonl"), "jsonl")
    with pytest.raises(ValueError, match="row 0, column 'prompt': a prompt must end with a user, tool or assistant"):
        D.load_records("grpo", p)
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        D.load_records("grpo", str(tmp_path))


def test_saved_dataset_dict_split(tmp_path):
    """A `save_to_disk` DatasetDict: the split asked for (default train); a missing one is named."""
    datasets = pytest.importorskip("datasets")
    rows = make_rows("prompt_only", True, n=8)
    test = make_rows("prompt_only", True, n=3, seed=2)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(test)}) \
        .save_to_disk(str(tmp_path / "dd"))
    assert [r["prompt"] for r in D.load_records("grpo", str(tmp_path / "dd"))] == [r["prompt"] for r in rows]
    assert len(D.load_records("grpo", str(tmp_path / "dd"), split="test")) == 3
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'validation'"):
        D.load_records("grpo", str(tmp_path / "dd"), split="validation")


def test_language_modelling_rows_for_sft(tok, tmp_path):
    """TRL's language-modelling rows (`messages`) for `trlax train sft`: the last assistant turn is the completion;
    the rendered prompt + completion is TRL's rendered `text` of the whole conversation."""
    rows = []
    for r in make_rows("prompt_completion", True, n=N_ROWS, seed=3):
        m = {"messages": r["prompt"] + r["completion"]}
        if "tools" in r:
            m["tools"] = r["tools"]
        rows.append(m)
    loaded = D.load_records("sft", _write(rows, str(tmp_path / "lm.jsonl"), "jsonl"))
    for i, (mine, orig) in enumerate(zip(loaded, rows)):
        assert mine["completion"] == orig["messages"][-1:] and mine["prompt"] + mine["completion"] == orig["messages"]
        got = D.render_example(tok, mine)
        assert got["prompt"] + got["completion"] == _trl(dict(orig), tok)["text"], i
