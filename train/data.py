"""Data: a tiny local tokenizer, built-in toy tasks, Hugging Face ``datasets`` loading with column
checks, and tokenisation into fixed-shape numpy batches.

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


def load_records(algo: str, dataset: str, *, n_builtin: int = 1024, seed: int = 0, split: str = "train"):
    """Rows for ``algo`` from ``dataset`` ("builtin", a local json / jsonl / parquet file, or a hub
    name). Missing columns raise before any compute, naming them."""
    from trlax.train import registry

    spec = registry.get(algo)
    if dataset == "builtin":
        rows = spec.builtin(n_builtin, seed)
    else:
        import datasets

        ext = os.path.splitext(dataset)[1].lower()
        if ext in (".json", ".jsonl"):
            ds = datasets.load_dataset("json", data_files=dataset, split=split)
        elif ext == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=dataset, split=split)
        elif os.path.exists(dataset):
            raise ValueError(f"dataset={dataset!r}: unsupported file type {ext!r}; use .json, .jsonl or .parquet")
        else:
            ds = datasets.load_dataset(dataset, split=split)
        rows = [dict(r) for r in ds]
    if not rows:
        raise ValueError(f"dataset={dataset!r} is empty")
    missing = [c for c in spec.columns if c not in rows[0]]
    if missing:
        raise ValueError(
            f"dataset={dataset!r} is missing column(s) {', '.join(missing)} required by '{algo}' "
            f"(has: {', '.join(sorted(rows[0]))})")
    return rows


def as_text(tokenizer, value: Any) -> str:
    """A prompt / completion as text: plain strings pass through, chat messages go through the
    tokenizer's chat template."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return tokenizer.apply_chat_template(value, tokenize=False)
    raise ValueError(f"cannot turn {type(value).__name__} into text")


def encode_left_padded(tokenizer, texts: Sequence[str], max_length: int):
    """``(ids [N, L], mask [N, L])`` left-padded to ``max_length`` (long prompts keep their end)."""
    pad = tokenizer.pad_token_id
    ids = np.full((len(texts), max_length), pad, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    for i, t in enumerate(texts):
        toks = tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:]
        if toks:
            ids[i, -len(toks):] = toks
            mask[i, -len(toks):] = True
    return ids, mask


def encode_right_padded(tokenizer, texts: Sequence[str], max_length: int, add_eos: bool = True):
    """``(ids [N, L], mask [N, L])`` right-padded, EOS appended, truncated at ``max_length``."""
    pad = tokenizer.pad_token_id
    ids = np.full((len(texts), max_length), pad, np.int32)
    mask = np.zeros((len(texts), max_length), bool)
    for i, t in enumerate(texts):
        toks = tokenizer(t, add_special_tokens=False)["input_ids"]
        if add_eos:
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
    "REWARD_NAMES",
    "addition_rewards",
    "as_text",
    "build_tokenizer",
    "encode_left_padded",
    "encode_right_padded",
    "load_records",
    "preference_examples",
    "sft_examples",
]
