"""Data: a tiny local tokenizer, built-in toy tasks, Hugging Face ``datasets`` loading with column
checks, TRL's dataset formats rendered as TRL renders them (chat templates: :func:`render_example`), and
tokenisation into fixed-shape numpy batches.

Nothing here downloads anything unless the user names a hub dataset.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Sequence

import numpy as np

def required_columns(algo: str):
    """The dataset columns trainer ``algo`` reads (its :class:`trlax.train.registry.TrainerSpec`)."""
    from trlax.train import registry

    return registry.get(algo).columns

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# The built-in tasks only need digits and a few operators. A small vocabulary keeps the tiny random
# model's starting distribution close enough to the task that GRPO sees non-zero rewards from step 1;
# other characters map to <unk> (use a real checkpoint's tokenizer for real text).
_CHARS = list("0123456789+-*= ")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% else %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer(directory: str):
    """Train a character-level tokenizer with the ``tokenizers`` library on a small local text and
    save it (``tokenizer.json`` + config) as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    trainer = trainers.WordLevelTrainer(special_tokens=_SPECIALS, min_frequency=1)
    tok.train_from_iterator(["".join(_CHARS)] * 2, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


# --------------------------------------------------------------------------------- built-in tasks


def addition_examples(n: int, seed: int = 0, max_sum: int = 9) -> List[Dict[str, str]]:
    """``{"prompt": "3+4=", "answer": "7"}`` with single-digit operands and ``a + b <= max_sum`` —
    the built-in verifiable task."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if a + b <= max_sum:
            out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def max_digit_examples(n: int, seed: int = 0, n_digits: int = 3) -> List[Dict[str, str]]:
    """``{"prompt": "382=", "answer": "8"}``: the largest of ``n_digits`` random digits — the built-in
    verifiable task of ``trlax train grpo``. Its 10^n_digits distinct prompts make a held-out split meaningful
    (:func:`split_by_prompt`): a policy that learned to pick the largest digit answers prompts it never saw, one
    that memorised its training prompts does not (single-digit addition, 55 prompts, can only be memorised)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(n_digits)]
        out.append({"prompt": "".join(map(str, digits)) + "=", "answer": str(max(digits))})
    return out


def split_by_prompt(rows: Sequence[Dict[str, Any]], fraction: float, seed: int = 0):
    """``(train_rows, eval_rows)``: the rows of a random ``fraction`` of the *distinct* prompts (at least one)
    held out for evaluation, every row of a held-out prompt with it, so no evaluation prompt is ever trained on
    (the built-in task repeats its prompts). Needs at least two distinct prompts."""
    keys = [repr(r["prompt"]) for r in rows]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ValueError(f"eval_split={fraction}: the data set has {len(distinct)} distinct prompt(s); a held-out "
                         "split needs at least 2 (or pass --eval_dataset)")
    n_eval = min(len(distinct) - 1, max(1, int(round(fraction * len(distinct)))))
    held = set(random.Random(seed).sample(distinct, n_eval))
    return [r for r, k in zip(rows, keys) if k not in held], [r for r, k in zip(rows, keys) if k in held]


def preference_examples(n: int, seed: int = 0) -> List[Dict[str, str]]:
    """Synthetic preference set on the built-in task: the right sum is chosen, a wrong one rejected."""
    rng = random.Random(seed + 1)
    out = []
    for ex in addition_examples(n, seed):
        wrong = str((int(ex["answer"]) + rng.randint(1, 9)) % 10)
        out.append({"prompt": ex["prompt"], "chosen": ex["answer"], "rejected": wrong})
    return out


def sft_examples(n: int, seed: int = 0) -> List[Dict[str, str]]:
    """Synthetic SFT set on the built-in task (prompt, completion = the sum)."""
    return [{"prompt": e["prompt"], "completion": e["answer"]} for e in addition_examples(n, seed)]


REWARD_NAMES = ("accuracy", "format")


def addition_rewards(completions: Sequence[str], answers: Sequence[str], truncated: Sequence[bool]) -> np.ndarray:
    """``[N, 2]`` rewards of the built-in task (a verifier on the decoded text):

    - ``accuracy``: 1 if the completion is exactly the answer followed by EOS, else 0;
    - ``format``: 0.5 if the completion is one or two digits followed by EOS (not truncated), else 0.
    """
    acc, fmt = [], []
    for c, a, t in zip(completions, answers, truncated):
        ok = (not t) and c.isdigit() and len(c) <= 2
        fmt.append(0.5 if ok else 0.0)
        acc.append(1.0 if (not t) and c == str(a) else 0.0)
    return np.stack([np.asarray(acc), np.asarray(fmt)], axis=1)


# ------------------------------------------------------------------------------------------ loading


LOCAL_FORMATS = (".json", ".jsonl", ".parquet")


def load_records(algo: str, dataset: str, *, n_builtin: int = 1024, seed: int = 0, split: str = "train"):
    """Rows for ``algo`` from ``dataset`` ("builtin", a local .json / .jsonl / .parquet file, or a hub name),
    checked before any compute (:func:`check_records`): an unreadable file, an empty data set, a missing column,
    an empty prompt or a value of the wrong type raises one ``ValueError`` naming the file, row and column."""
    from trlax.train import registry

    spec = registry.get(algo)
    if dataset == "builtin":
        rows = spec.builtin(n_builtin, seed)
    else:
        ext = os.path.splitext(dataset)[1].lower()
        if os.path.isfile(dataset):
            rows = read_local(dataset)
        elif os.path.isdir(dataset):
            rows = read_saved(dataset, split)
        elif ext in LOCAL_FORMATS + (".csv", ".tsv", ".txt", ".arrow"):
            raise FileNotFoundError(f"dataset={dataset!r}: no such file")
        else:
            try:
                import datasets

                rows = [dict(r) for r in datasets.load_dataset(dataset, split=split)]
            except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split ...: one clear line
                msg = " ".join(str(e).split())[:200]
                raise ValueError(f"dataset={dataset!r} is not a local file and could not be loaded from the Hugging "
                                 f"Face hub ({type(e).__name__}: {msg})") from None
    return prepare_records(algo, dataset, rows, seed=seed)


def prepare_records(algo: str, dataset: str, rows: List[Dict[str, Any]], seed: int = 0) -> List[Dict[str, Any]]:
    """Rows for ``algo`` from rows already read (``dataset`` names them in errors): preference rows with an
    implicit prompt get it extracted (:func:`extract_prompt`), then every row is checked (:func:`check_records`)."""
    from trlax.train import registry

    spec = registry.get(algo)
    rows = list(rows)
    if set(spec.columns) == {"prompt", "completion"}:  # language-modelling rows: the last assistant turn learns
        rows = [split_messages(r) if isinstance(r, dict) and "messages" in r and "prompt" not in r else r
                for r in rows]
    if {"prompt", "chosen", "rejected"} <= set(spec.columns):  # preference rows with an implicit prompt
        for i, r in enumerate(rows):
            if isinstance(r, dict) and "chosen" in r and "rejected" in r:
                try:
                    rows[i] = extract_prompt(r)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"dataset={dataset!r}, row {i}: no prompt column, and {e}") from None
    check_records(algo, dataset, rows, spec.columns, spec.builtin(1, seed)[0])
    return rows


def read_saved(path: str, split: str = "train") -> List[Dict[str, Any]]:
    """The rows of a ``datasets`` directory written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` from
    which ``split`` is taken); anything else raises naming the directory."""
    try:
        import datasets

        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - not a saved dataset: one clear line
        raise ValueError(f"dataset={path!r} is a directory but not a dataset saved with save_to_disk "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); give a .json, .jsonl or .parquet "
                         "file or such a directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset={path!r} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    return [dict(r) for r in ds]


def read_local(path: str) -> List[Dict[str, Any]]:
    """The rows of a local .jsonl (one JSON object per line), .json (a list of objects, an object of equal-length
    column lists, or JSON lines) or .parquet file; anything else or a malformed file raises naming the file and
    the line."""
    import json

    ext = os.path.splitext(path)[1].lower()
    where = f"dataset={path!r}"
    if ext not in LOCAL_FORMATS:
        raise ValueError(f"{where}: unsupported file type {ext or '(none)'!r}; use .json, .jsonl or .parquet")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - not parquet / truncated
            raise ValueError(f"{where} is not a readable parquet file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise ValueError(f"{where}: the column lists have different lengths {sorted(lengths)}")
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]
        if isinstance(data, list):
            for i, r in enumerate(data):
                if not isinstance(r, dict):
                    raise ValueError(f"{where}, row {i}: expected a JSON object, got {type(r).__name__}")
            return data
        if data is not None:
            raise ValueError(f"{where}: expected a list of objects or an object of column lists, "
                             f"got {type(data).__name__}")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{where}, line {n}: expected a JSON object, got {type(r).__name__}")
        rows.append(r)
    return rows


def _is_messages(v) -> bool:
    """Chat messages: dicts with a string ``role`` and a string ``content`` (or, for an assistant's tool calls,
    ``tool_calls`` and no content)."""
    return (isinstance(v, list) and len(v) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and (isinstance(m.get("content"), str) or m.get("content") is None and "tool_calls" in m) for m in v))


def _value_error(v, example) -> str:
    """Why ``v`` does not fit a column whose built-in example value is ``example`` ("" when it fits)."""
    if isinstance(example, bool):
        return "" if isinstance(v, bool) or v in (0, 1) and not isinstance(v, float) else "expected true / false"
    if isinstance(example, list):
        if not isinstance(v, list) or not v:
            return f"expected a non-empty list of {type(example[0]).__name__}"
        bad = next((j for j, x in enumerate(v) if _value_error(x, example[0])), None)
        return "" if bad is None else f"item {bad}: {_value_error(v[bad], example[0])}"
    if isinstance(example, str):
        return "" if isinstance(v, str) or _is_messages(v) else "expected text (a string or a list of chat messages)"
    return ""


ANSWER_COLUMNS = ("answer", "solution")  # verifier targets: text or a number (compared as text)


def check_records(algo: str, dataset: str, rows, columns, example) -> None:
    """Every row has every column ``algo`` reads, with a value of the type of the built-in ``example`` row (text:
    a string or chat messages; labels: booleans; lists of them) and a non-empty prompt; the first problem raises
    a ``ValueError`` naming the file, row (0-based) and column."""
    if not rows:
        raise ValueError(f"dataset={dataset!r} is empty (no rows)")
    for i, r in enumerate(rows):
        for c in columns:
            if c not in r or r[c] is None:
                has = ", ".join(sorted(k for k, v in r.items() if v is not None))
                raise ValueError(f"dataset={dataset!r}, row {i}: missing column {c!r} required by '{algo}' "
                                 f"(the row has: {has or 'nothing'})")
            why = "" if c in ANSWER_COLUMNS and isinstance(r[c], (str, int, float)) else _value_error(r[c], example.get(c))
            if why:
                raise ValueError(f"dataset={dataset!r}, row {i}, column {c!r}: {why}, got "
                                 f"{type(r[c]).__name__} {_short(r[c])}")
        p = r["prompt"] if "prompt" in columns else None
        if isinstance(p, str) and not p.strip() or isinstance(p, list) and not any(
                (m.get("content") or "").strip() for m in p):
            raise ValueError(f"dataset={dataset!r}, row {i}, column 'prompt': the prompt is empty")
        chat = [c for c in CHAT_KEYS if c in r and c in columns]
        kinds = {c: _is_messages(r[c]) for c in chat}
        if len(set(kinds.values())) > 1:
            msgs = ", ".join(repr(c) for c in chat if kinds[c])
            text = ", ".join(repr(c) for c in chat if not kinds[c])
            raise ValueError(f"dataset={dataset!r}, row {i}: column(s) {msgs} are chat messages but {text} plain "
                             "text; a row is either standard (all text) or conversational (all messages)")
        if kinds and all(kinds.values()) and "prompt" in kinds:
            try:
                _prompt_kwargs(r["prompt"])
            except ValueError as e:
                raise ValueError(f"dataset={dataset!r}, row {i}, column 'prompt': {e}") from None


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------- TRL dataset formats
#
# TRL's dataset types (standard = text, conversational = lists of {"role", "content"} messages): prompt-only
# (prompt), prompt-completion (prompt, completion), preference (prompt, chosen, rejected; or chosen, rejected with
# the prompt implicit in both), unpaired preference (prompt, completion, label), stepwise supervision (prompt,
# completions, labels) and language modelling (messages / text). Conversational rows are rendered as TRL renders
# them: the prompt with the generation prompt (or, when it ends with an assistant message, continuing that
# message), each completion as the text the whole conversation adds after the prompt; a row's ``tools`` (JSON
# schemas, or a JSON string of them) and ``chat_template_kwargs`` go to the template.

CHAT_KEYS = ("prompt", "completion", "chosen", "rejected", "messages")


def is_conversational(row: Dict[str, Any]) -> bool:
    """Whether a row's text columns are chat messages (lists of ``{"role": ..., "content": ...}``)."""
    v = next((row[k] for k in CHAT_KEYS if k in row), None)
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict) and "role" in v[0]


def _prompt_kwargs(messages) -> Dict[str, bool]:
    """A prompt ending with a user / tool turn gets the generation prompt; one ending with an assistant turn (a
    prefilled answer) is continued."""
    role = messages[-1].get("role")
    if role in ("user", "tool"):
        return {"add_generation_prompt": True}
    if role == "assistant":
        return {"continue_final_message": True}
    raise ValueError(f"a prompt must end with a user, tool or assistant message, not {role!r}")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def row_tools(row: Dict[str, Any]):
    """The row's ``tools`` column (a list of JSON schemas, or a JSON string of one), else None."""
    import json

    tools = row.get("tools")
    return (json.loads(tools) if isinstance(tools, str) else tools) or None


def render_example(tokenizer, row: Dict[str, Any], tools=None) -> Dict[str, Any]:
    """A TRL-format row with its chat messages rendered to text by the tokenizer's chat template (standard rows
    are returned unchanged): ``prompt`` with the generation prompt (continued if it ends with an assistant
    message); ``completion`` / ``chosen`` / ``rejected`` as the text that ``prompt + completion`` adds after the
    prompt (the prompt is cut to the part common to all, for templates that render the generation prompt
    differently); with an implicit prompt, ``chosen`` / ``rejected`` whole; ``messages`` -> ``text``. Other
    columns pass through. ``tools`` (default: the row's ``tools`` column) and the row's ``chat_template_kwargs``
    are passed to the template."""
    if not is_conversational(row):
        return dict(row)
    tools = tools if tools is not None else row_tools(row)
    extra = dict(row.get("chat_template_kwargs") or {})

    def chat(messages, **kw):
        return tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False, **kw, **extra)

    out = {k: v for k, v in row.items() if k != "messages"}
    if "messages" in row:
        out["text"] = chat(row["messages"])
    answers = [k for k in ("chosen", "rejected", "completion") if k in row]
    if "prompt" in row:
        prompt = chat(row["prompt"], **_prompt_kwargs(row["prompt"]))
        full = {k: chat(list(row["prompt"]) + list(row[k])) for k in answers}
        for text in full.values():
            prompt = _common_prefix(prompt, text)
        out["prompt"] = prompt
        out.update({k: text[len(prompt):] for k, text in full.items()})
    else:
        out.update({k: chat(row[k]) for k in answers})
    return out


def column_texts(tokenizer, rows: Sequence[Dict[str, Any]], column: str) -> List[str]:
    """Column ``column`` of every row as text (:func:`render_example`)."""
    return [str(render_example(tokenizer, r)[column]) for r in rows]


def extract_prompt(row: Dict[str, Any]) -> Dict[str, Any]:
    """A preference row with an implicit prompt (``chosen`` and ``rejected`` both start with it) as an explicit
    one: the longest common prefix of the two (messages, or characters with a space before the first difference
    left to the answers) becomes ``prompt``; each answer keeps at least its last element. A row that has a
    ``prompt`` of the same kind (text / messages) as its answers is returned unchanged."""
    ch, rj = row["chosen"], row["rejected"]
    if "prompt" in row and is_conversational({"prompt": row["prompt"]}) == is_conversational({"chosen": ch}):
        return row
    n = 0
    while n < min(len(ch), len(rj)) and ch[n] == rj[n]:
        n += 1
    if n == min(len(ch), len(rj)):  # one contains the other: keep the last element in the answers
        n -= 1
    elif n and isinstance(ch, str) and ch[n - 1] == " ":
        n -= 1
    if n <= 0:
        raise ValueError("chosen and rejected share no prompt")
    return dict(row, prompt=ch[:n], chosen=ch[n:], rejected=rj[n:])


def split_messages(row: Dict[str, Any]) -> Dict[str, Any]:
    """A language-modelling row (TRL's ``messages``) as prompt-completion: the last assistant message is the
    completion, everything before it the prompt (rendered together they are the whole conversation; trlax's SFT
    loss is on the completion, as TRL's ``assistant_only_loss`` on the last turn). Rows without an assistant
    message after a first turn are returned unchanged (the column check then names them)."""
    msgs = row["messages"]
    last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"), default=0)
    if not _is_messages(msgs) or last == 0:
        return row
    out = {k: v for k, v in row.items() if k != "messages"}
    return dict(out, prompt=list(msgs[:last]), completion=list(msgs[last:last + 1]))


def as_text(tokenizer, value: Any, tools=None) -> str:
    """A prompt as text: a plain string passes through; chat messages are rendered by the tokenizer's chat
    template with the generation prompt (continuing a final assistant message) and ``tools`` (JSON schemas), as
    TRL renders prompts (:func:`render_example` renders whole rows, with their ``tools`` column)."""
    if isinstance(value, str):
        return value
    if _is_messages(value):
        return tokenizer.apply_chat_template(list(value), tools=tools or None, tokenize=False, **_prompt_kwargs(value))
    raise ValueError(f"cannot turn {type(value).__name__} into text")


_TRUNCATED: set = set()  # distinct prompt texts cut by encode_left_padded since the last reset


def truncated_prompts(reset: bool = False) -> int:
    """How many distinct prompts :func:`encode_left_padded` has cut to ``max_length`` (logged by the trainers as
    the ``truncated_prompts`` metric); ``reset=True`` starts a new count (a new run)."""
    n = len(_TRUNCATED)
    if reset:
        _TRUNCATED.clear()
    return n


def encode_left_padded(tokenizer, texts: Sequence[str], max_length: int):
    """``(ids [N, L], mask [N, L])`` left-padded to ``max_length``. A longer prompt is truncated from the left
    (it keeps its last ``max_length`` tokens, as TRL's ``truncation_side="left"``): the first one prints a note,
    all are counted (:func:`truncated_prompts`). As TRL, a plain-text prompt gets the tokenizer's special tokens
    (e.g. Llama's BOS); a prompt that starts with one (rendered by a chat template) is tokenised as it is."""
    pad = tokenizer.pad_token_id
    ids = np.full((len(texts), max_length), pad, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    added = tuple(t for t in tokenizer.get_added_vocab() if t)
    for i, t in enumerate(texts):
        toks = tokenizer(t, add_special_tokens=not t.startswith(added))["input_ids"]
        if len(toks) > max_length:
            if not _TRUNCATED:
                print(f"note: prompts longer than max_prompt_length={max_length} tokens are truncated to their last "
                      f"{max_length} tokens (first: {len(toks)} tokens); the `truncated_prompts` metric counts them",
                      flush=True)
            _TRUNCATED.add(t)
            toks = toks[-max_length:]
        if toks:
            ids[i, -len(toks):] = toks
            mask[i, -len(toks):] = True
    return ids, mask


def encode_right_padded(tokenizer, texts: Sequence[str], max_length: int, add_eos: bool = True):
    """``(ids [N, L], mask [N, L])`` right-padded, EOS appended, truncated at ``max_length``. As TRL, no EOS is
    appended to a text that already ends with it (a chat-rendered completion ends with the template's end of turn,
    e.g. ``<|im_end|>\n``)."""
    pad = tokenizer.pad_token_id
    ids = np.full((len(texts), max_length), pad, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    eos = tokenizer.eos_token
    for i, t in enumerate(texts):
        toks = tokenizer(t, add_special_tokens=False)["input_ids"]
        if add_eos and not (eos and t.rstrip().endswith(eos)):
            toks = toks + [tokenizer.eos_token_id]
        toks = toks[:max_length]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = True
    return ids, mask


# ------------------------------------------------------------------------------ multi-host batches
#
# Every process draws the same global batch order (same seed, same :class:`EpochSampler`); process ``i``
# then tokenises only the rows its devices hold (:func:`local_slice`) and contributes them with
# ``jax.make_array_from_process_local_data`` (:func:`global_batch`). With one process the slice is the
# whole batch, so a multi-host run sees exactly the batches of a one-process run of the same config.


def local_slice(sharding, n: int) -> slice:
    """The rows ``[start, stop)`` of a global batch of ``n`` rows (split on axis 0 by ``sharding``) that this
    process's devices hold: a contiguous block, the whole batch with one process."""
    import jax

    if jax.process_count() == 1:
        return slice(0, n)
    spans = set()
    for index in sharding.addressable_devices_indices_map((n,)).values():
        a, b, _ = index[0].indices(n) if index else (0, n, 1)
        spans.add((a, b))
    spans = sorted(spans)
    start, stop = spans[0][0], max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(f"the rows this process holds of a batch of {n} are not one contiguous block ({spans}); "
                         "order the mesh's devices by process")
    return slice(start, stop)


def global_batch(sharding, local: Dict[str, Any], n: int) -> Dict[str, Any]:
    """Global arrays of ``n`` rows from this process's rows ``local`` (each ``[n_local, ...]``, the rows of
    :func:`local_slice`); with one process the arrays are returned unchanged (jit places them)."""
    import jax

    if jax.process_count() == 1:
        return dict(local)
    out = {}
    for k, v in local.items():
        if isinstance(v, jax.Array) and not v.is_fully_addressable:
            out[k] = v  # already global
            continue
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (n,) + v.shape[1:])
    return out


def local_rows(x, rows: slice) -> np.ndarray:
    """Rows ``rows`` of the global array ``x`` as a host NumPy array, read from this process's shards only
    (no communication); ``x`` is a NumPy / fully addressable array with one process."""
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)[rows]
    n = x.shape[0]
    out = np.empty((rows.stop - rows.start,) + tuple(x.shape[1:]), x.dtype)
    filled = np.zeros(rows.stop - rows.start, bool)
    for shard in x.addressable_shards:
        a, b, _ = shard.index[0].indices(n) if shard.index else (0, n, 1)
        lo, hi = max(a, rows.start), min(b, rows.stop)
        if lo < hi and not filled[lo - rows.start:hi - rows.start].all():
            out[lo - rows.start:hi - rows.start] = np.asarray(shard.data)[lo - a:hi - a]
            filled[lo - rows.start:hi - rows.start] = True
    if not filled.all():
        raise ValueError(f"rows {rows.start}:{rows.stop} of an array of {n} rows are not all on this process")
    return out


def gather_rows(sharding, local, n: int) -> np.ndarray:
    """The global ``[n, ...]`` host array whose rows :func:`local_slice` are ``local`` on each process
    (``process_allgather``: every process gets every row); ``local`` itself with one process."""
    import jax

    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    g = jax.make_array_from_process_local_data(sharding, local, (n,) + local.shape[1:])
    return np.asarray(multihost_utils.process_allgather(g, tiled=True))


def all_sum(*values: float) -> np.ndarray:
    """Per-process numbers summed over all processes (``values`` themselves with one process)."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(values, np.float64)
    from jax.experimental import multihost_utils

    x = np.asarray(values, np.float32)
    return np.asarray(multihost_utils.process_allgather(x), np.float64).reshape(jax.process_count(), -1).sum(0)


class EpochSampler:
    """Deterministic shuffled batches of row indices; the position (epoch, offset) is part of the
    checkpoint so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} rows)")
        self.n, self.batch_size, self.seed, self.epoch, self.offset = n, batch_size, seed, epoch, offset

    def _perm(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        if self.offset + self.batch_size > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self._perm()[self.offset: self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


__all__ = [
    "CHAT_TEMPLATE",
    "EpochSampler",
    "all_sum",
    "gather_rows",
    "global_batch",
    "local_rows",
    "local_slice",
    "required_columns",
    "addition_examples",
    "max_digit_examples",
    "split_by_prompt",
    "REWARD_NAMES",
    "addition_rewards",
    "as_text",
    "column_texts",
    "extract_prompt",
    "is_conversational",
    "render_example",
    "row_tools",
    "build_tokenizer",
    "encode_left_padded",
    "encode_right_padded",
    "check_records",
    "load_records",
    "prepare_records",
    "read_local",
    "read_saved",
    "split_messages",
    "truncated_prompts",
    "preference_examples",
    "sft_examples",
]
