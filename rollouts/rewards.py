"""Reward functions: plain Python callables on decoded text (and token ids), combined with weights.

Convention. A reward function is called once per completion with keyword arguments only::

    fn(completion=str, completion_ids=list[int], prompt=str, **columns) -> float | None

where ``columns`` are the dataset fields of that example (e.g. ``solution=...``, ``answer=...``); it
takes what it needs and ignores the rest (``**_``). ``None`` means *unscorable* (e.g. the gold answer
cannot be parsed). A function with attribute ``batched = True`` (e.g. a reward model) is instead called
once with lists: ``fn(completions=[...], completion_ids=[...], prompts=[...], **columns_as_lists)``.

:func:`compute_rewards` runs several at once and returns the ``[N, R]`` float64 matrix with NaN for
unscorable entries — what :func:`trlax.objectives.multi_reward_advantages` (weights, NaN = unscorable)
takes — and :func:`weighted_reward_sum` combines them.

Verifiable rewards shipped here (each cites its paper):

- :func:`exact_match_reward` — maths answer extraction (last ``\\boxed{}`` or last number) + equivalence;
- :func:`accuracy_reward`, :func:`format_reward`, :func:`think_format_reward` — DeepSeek-R1's rule-based
  accuracy and format rewards (arXiv 2501.12948, sec. 2.2.2);
- :class:`CosineScaledReward` — length-scaled correctness (Yeo et al., "Demystifying Long Chain-of-Thought
  Reasoning in LLMs", arXiv 2502.03373, eq. 1 / App. C.1);
- :class:`RepetitionPenalty` — n-gram repetition penalty (arXiv 2502.03373, App. C.2);
- :class:`SoftOverlongPunishment` — DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).

Answer equivalence is a small, dependency-free checker (not ``math_verify``): after normalisation
(``$``, ``\\left/\\right``, ``\\!``, ``\\text{}``, ``\\dfrac``/``\\tfrac``, thousands separators, trailing
period, spaces) two answers are equal if the strings match or both parse as the same rational number
(integers, decimals, ``a/b``, ``\\frac{a}{b}``, percentages are *not* converted). Symbolic equivalence
(``x+1`` vs ``1+x``) is out of scope.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "extract_boxed",
    "extract_last_number",
    "extract_answer_tag",
    "normalize_answer",
    "answers_equal",
    "exact_match_reward",
    "accuracy_reward",
    "format_reward",
    "think_format_reward",
    "CosineScaledReward",
    "RepetitionPenalty",
    "SoftOverlongPunishment",
    "RewardFunctionError",
    "nan_reward_counts",
    "reward_metrics",
    "compute_rewards",
    "weighted_reward_sum",
    "decode_rollout",
]


# ----------------------------------------------------------------------------------- extraction


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` with balanced braces, else None.

    The answer convention of the MATH benchmark (Hendrycks et al. 2021, arXiv 2103.03874, sec. 3).
    ``\\boxed 5`` (no braces) yields ``"5"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
                j += 1
            continue  # unbalanced: try an earlier one
        bare = re.match(r"\s*([^\s$]+)", text[i:])
        if bare and text[m.start():m.end()].endswith(" "):
            return bare.group(1)
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_last_number(text: str) -> Optional[str]:
    """The last number in ``text`` (integer, decimal, ``a/b``; thousands commas allowed), else None.

    GSM8K-style extraction (Cobbe et al. 2021, arXiv 2110.14168: the final numeric answer)."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    return nums[-1].rstrip(",")


def extract_answer_tag(text: str) -> Optional[str]:
    """Content of the last ``<answer>...</answer>`` block (DeepSeek-R1 template, arXiv 2501.12948, Table 1)."""
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return found[-1].strip() if found else None


def _unwrap(s: str, cmd: str) -> str:
    """Replace ``\\cmd{X}`` by ``X`` (balanced braces)."""
    out, i = [], 0
    pat = "\\" + cmd + "{"
    while True:
        j = s.find(pat, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        k, depth = j + len(pat) - 1, 0
        while k < len(s):
            depth += s[k] == "{"
            depth -= s[k] == "}"
            if depth == 0:
                break
            k += 1
        out.append(s[j + len(pat):k])
        i = k + 1


def normalize_answer(ans: str) -> str:
    """Canonical string form of a short maths answer (see the module docstring for the rules)."""
    s = str(ans).strip()
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^{\\circ}", "").replace("^\\circ", "")
    for cmd in ("text", "textbf", "mathrm", "mbox"):
        s = _unwrap(s, cmd)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)
    s = re.sub(r"\((-?[\d.]+)\)", r"\1", s)  # (3)/(4) -> 3/4
    return s


def _as_number(s: str) -> Optional[Fraction]:
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?|-?\.\d+)(?:/(-?\d+(?:\.\d+)?))?", s)
    if not m:
        return None
    try:
        num = Fraction(m.group(1))
        if m.group(2) is not None:
            den = Fraction(m.group(2))
            if den == 0:
                return None
            num /= den
        return num
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(pred: Optional[str], gold: Optional[str]) -> bool:
    """Whether two extracted answers are equivalent (normalised string or exact rational equality)."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


_EXTRACT = ("auto", "boxed", "last_number", "answer_tag")


def _extract(text: str, how: str) -> Optional[str]:
    if how == "boxed":
        return extract_boxed(text)
    if how == "last_number":
        return extract_last_number(text)
    if how == "answer_tag":
        return extract_answer_tag(text)
    for f in (extract_boxed, extract_answer_tag, extract_last_number):  # auto
        got = f(text)
        if got is not None:
            return got
    return None


def _gold(answer: Any) -> Optional[str]:
    """The gold answer: a boxed / tagged one inside a worked solution, else the whole (stripped) string."""
    if answer is None:
        return None
    s = str(answer).strip()
    got = extract_boxed(s) or extract_answer_tag(s)
    s = got if got is not None else s
    return s if normalize_answer(s) else None


# ------------------------------------------------------------------------------------ rewards


def exact_match_reward(completion: str, answer: Any = None, *, extract: str = "auto", **columns) -> Optional[float]:
    """1.0 if the answer extracted from ``completion`` equals the gold ``answer``, else 0.0; None if the gold
    answer is missing or empty (unscorable).

    Outcome reward of RL with verifiable rewards (Lambert et al. 2024, Tülu 3, arXiv 2411.15124, sec. 6.1).
    ``extract``: ``"boxed"`` (last ``\\boxed{}``), ``"last_number"``, ``"answer_tag"`` or ``"auto"`` (the
    first of those three that finds something). The gold is read from ``answer`` or else ``solution``;
    a worked solution containing ``\\boxed{}`` is reduced to the boxed part.
    """
    if extract not in _EXTRACT:
        raise ValueError(f"extract={extract!r} is not allowed; allowed values: {_EXTRACT}")
    gold = _gold(answer if answer is not None else columns.get("solution"))
    if gold is None:
        return None
    return 1.0 if answers_equal(_extract(completion, extract), gold) else 0.0


def accuracy_reward(completion: str, solution: Any = None, **columns) -> Optional[float]:
    """DeepSeek-R1 rule-based accuracy reward (arXiv 2501.12948, sec. 2.2.2, "Accuracy rewards"): 1.0 if
    the final answer — the last ``\\boxed{}`` in the completion, else its ``<answer>`` block — matches the
    gold ``solution`` (or ``answer``), else 0.0; None when the gold cannot be read (as TRL's
    ``accuracy_reward``). Unlike :func:`exact_match_reward` there is no last-number fallback: the answer
    must be in the specified format."""
    gold = _gold(solution if solution is not None else columns.get("answer"))
    if gold is None:
        return None
    pred = extract_boxed(completion)
    if pred is None:
        pred = extract_answer_tag(completion)
    return 1.0 if answers_equal(pred, gold) else 0.0


_R1_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\Z", re.DOTALL)
_THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)


def format_reward(completion: str, **_) -> float:
    """DeepSeek-R1 format reward (arXiv 2501.12948, sec. 2.2.2, "Format rewards"; template of Table 1): 1.0
    if the completion is exactly ``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>``, else 0.0."""
    return 1.0 if _R1_FORMAT.match(completion) else 0.0


def think_format_reward(completion: str, **_) -> float:
    """1.0 if the completion starts with a single ``<think>…</think>`` block (DeepSeek-R1 reasoning format,
    arXiv 2501.12948, sec. 2.2.2; TRL's ``think_format_reward`` rule), else 0.0."""
    return 1.0 if _THINK_FORMAT.match(completion) else 0.0


class CosineScaledReward:
    """Length-scaled correctness reward (Yeo et al. 2025, arXiv 2502.03373, eq. 1, App. C.1)::

        r(L) = v_min + ½ (v_max − v_min) (1 + cos(π L / L_max))

    with ``L`` the completion length in tokens. Correct answers (by :func:`accuracy_reward`'s rule, with the
    last-number fallback of :func:`exact_match_reward` when ``extract="auto"``) use
    ``(v_min, v_max) = (min_value_correct, max_value_correct)``, so shorter is better; wrong ones use
    ``(max_value_wrong, min_value_wrong)``, so a longer wrong answer is penalised less. ``L ≥ L_max`` gives
    ``exceed_length_value`` when set (the paper's ``r_e``), else the schedule's end value. None when the
    gold answer is unreadable. Defaults are TRL's / open-r1's.
    """

    __name__ = "cosine_scaled_reward"

    def __init__(self, max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                 min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                 exceed_length_value: Optional[float] = None, extract: str = "boxed"):
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len={max_len!r} is out of range; allowed: integers >= 1")
        if extract not in _EXTRACT:
            raise ValueError(f"extract={extract!r} is not allowed; allowed values: {_EXTRACT}")
        self.max_len, self.extract, self.exceed_length_value = int(max_len), extract, exceed_length_value
        self.correct = (float(min_value_correct), float(max_value_correct))
        self.wrong = (float(max_value_wrong), float(min_value_wrong))

    def __call__(self, completion: str, completion_ids: Sequence[int] = (), solution: Any = None,
                 **columns) -> Optional[float]:
        gold = _gold(solution if solution is not None else columns.get("answer"))
        if gold is None:
            return None
        length = len(completion_ids)
        if self.exceed_length_value is not None and length >= self.max_len:
            return float(self.exceed_length_value)
        ok = answers_equal(_extract(completion, self.extract), gold)
        lo, hi = self.correct if ok else self.wrong
        return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * min(length, self.max_len) / self.max_len))


class RepetitionPenalty:
    """N-gram repetition penalty (arXiv 2502.03373, App. C.2)::

        r = (1 − #unique n-grams / #n-grams) · max_penalty

    over the completion's token ids (``on="tokens"``, as TRL) or its whitespace-separated lower-cased words
    (``on="words"``, as open-r1). Fewer than ``ngram_size`` units give 0. ``max_penalty ≤ 0``.
    """

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0, on: str = "tokens"):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, (int, np.integer)) or ngram_size < 1:
            raise ValueError(f"ngram_size={ngram_size!r} is out of range; allowed: integers >= 1")
        if not np.isfinite(max_penalty) or max_penalty > 0:
            raise ValueError(f"max_penalty={max_penalty!r} is out of range; allowed: (-inf, 0]")
        if on not in ("tokens", "words"):
            raise ValueError(f"on={on!r} is not allowed; allowed values: ('tokens', 'words')")
        self.n, self.max_penalty, self.on = int(ngram_size), float(max_penalty), on

    def __call__(self, completion: str = "", completion_ids: Sequence[int] = (), **_) -> float:
        units = list(completion_ids) if self.on == "tokens" else completion.lower().split()
        if len(units) < self.n:
            return 0.0
        grams = [tuple(units[i:i + self.n]) for i in range(len(units) - self.n + 1)]
        return (1.0 - len(set(grams)) / len(grams)) * self.max_penalty


class SoftOverlongPunishment:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), ``|y|`` = completion tokens::

        0                              if |y| ≤ L_max − L_cache
        ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
        −1                             if |y| > L_max
    """

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        for name, v, low in (("max_completion_len", max_completion_len, 1), ("soft_punish_cache", soft_punish_cache, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name}={v!r} is out of range; allowed: integers >= {low}")
        if soft_punish_cache > max_completion_len:
            raise ValueError(f"soft_punish_cache={soft_punish_cache} must be <= max_completion_len={max_completion_len}")
        self.l_max, self.l_cache = int(max_completion_len), int(soft_punish_cache)

    def __call__(self, completion_ids: Sequence[int] = (), **_) -> float:
        n = len(completion_ids)
        if n <= self.l_max - self.l_cache:
            return 0.0
        if n <= self.l_max:
            return (self.l_max - self.l_cache - n) / self.l_cache
        return -1.0


# ---------------------------------------------------------------------------------- combination


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def compute_rewards(reward_fns: Sequence[Callable], completions: Sequence[str], *,
                    completion_ids: Optional[Sequence[Sequence[int]]] = None, prompts: Optional[Sequence[str]] = None,
                    **columns: Sequence[Any]) -> np.ndarray:
    """Run every reward function on every completion: ``[N, R]`` float64, NaN where a function returned None.

    Args:
      reward_fns: ``R`` callables following the module convention (per example, or ``batched = True``).
      completions: ``N`` decoded completion strings.
      completion_ids: ``N`` token-id lists (default: empty lists).
      prompts: ``N`` prompt strings (default: empty strings).
      **columns: per-example dataset fields, each a length-``N`` sequence (e.g. ``solution=[...]``); for
        group sampling repeat each prompt's fields ``num_generations`` times.

    Returns:
      the ``rewards_per_func`` matrix of :func:`trlax.objectives.multi_reward_advantages`.
    """
    fns = list(reward_fns)
    if not fns:
        raise ValueError("`reward_fns` is empty")
    for f in fns:
        if not callable(f):
            raise TypeError(f"reward function {f!r} is not callable")
    n = len(completions)
    ids = [list(map(int, x)) for x in completion_ids] if completion_ids is not None else [[] for _ in range(n)]
    prm = list(prompts) if prompts is not None else ["" for _ in range(n)]
    for name, col in (("completion_ids", ids), ("prompts", prm), *columns.items()):
        if len(col) != n:
            raise ValueError(f"`{name}` has {len(col)} entries, expected {n} (one per completion)")
    out = np.full((n, len(fns)), np.nan, np.float64)

    def sample(i):
        text = completions[i] if len(completions[i]) <= 80 else completions[i][:77] + "..."
        return f"sample {i} (prompt={prm[i][:80]!r}, completion={text!r})"

    for j, f in enumerate(fns):
        if getattr(f, "batched", False):
            try:
                vals = list(f(completions=list(completions), completion_ids=ids, prompts=prm,
                              **{k: list(v) for k, v in columns.items()}))
            except Exception as e:  # noqa: BLE001 - name the function (and the batch) for the user
                raise RewardFunctionError(f"reward function {_name(f)} raised {type(e).__name__}: {e} "
                                          f"on a batch of {n} samples; first: {sample(0) if n else '-'}") from e
            if len(vals) != n:
                raise ValueError(f"batched reward function {_name(f)} returned {len(vals)} values, expected {n}")
        else:
            vals = []
            for i in range(n):
                try:
                    vals.append(f(completion=completions[i], completion_ids=ids[i], prompt=prm[i],
                                  **{k: v[i] for k, v in columns.items()}))
                except Exception as e:  # noqa: BLE001 - name the function and the sample
                    raise RewardFunctionError(f"reward function {_name(f)} raised {type(e).__name__}: {e} "
                                              f"on {sample(i)}") from e
        for i, v in enumerate(vals):
            if v is not None:
                try:
                    out[i, j] = float(v)
                except (TypeError, ValueError):
                    raise RewardFunctionError(f"reward function {_name(f)} returned {v!r} (not a number or None) "
                                              f"for {sample(i)}") from None
    return out


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something that is not a number or None; the message names the
    function and the sample."""


def nan_reward_counts(rewards) -> dict:
    """Metrics of a ``[N, R]`` reward matrix's NaN entries (a function returned None or NaN): ``rewards/nan``
    (entries) and ``rewards/unscorable`` (rows where every function gave NaN; as TRL, NaN entries are left out of
    the weighted sum, unscorable rows get advantage 0)."""
    r = np.isnan(np.asarray(rewards, np.float64))
    return {"rewards/nan": float(r.sum()), "rewards/unscorable": float(r.all(axis=1).sum())}


def reward_metrics(rewards, names: Sequence[str]) -> dict:
    """Per-function metrics of a ``[N, R]`` reward matrix, as TRL logs them: ``rewards/<name>/mean`` and
    ``rewards/<name>/std`` over the entries the function scored (NaN left out; the std with Bessel's correction,
    0 with fewer than two entries), ``rewards/<name>`` (the mean again, trlax's earlier key) and
    :func:`nan_reward_counts`."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[1] != len(names):
        raise ValueError(f"`rewards` must be [N, {len(names)}] (one column per name), got shape {r.shape}")
    out = {}
    for j, name in enumerate(names):
        col = r[:, j][~np.isnan(r[:, j])]
        mean = float(col.mean()) if col.size else float("nan")
        out[f"rewards/{name}"] = out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = float(col.std(ddof=1)) if col.size > 1 else 0.0
    out.update(nan_reward_counts(r))
    return out


def weighted_reward_sum(rewards: np.ndarray, weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """``r = Σ_k w_k R_k`` over the non-NaN entries of ``[N, R]``; NaN for rows where all are NaN (unscorable),
    the ``sum_then_normalize`` combination of TRL / :func:`trlax.objectives.multi_reward_advantages`."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"`rewards` must be [N, R], got shape {r.shape}")
    w = np.ones(r.shape[1]) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (r.shape[1],):
        raise ValueError(f"`weights` must have shape ({r.shape[1]},) (one per reward function), got {w.shape}")
    total = np.sum(np.where(np.isnan(r), 0.0, r) * w, axis=1)
    return np.where(np.all(np.isnan(r), axis=1), np.nan, total)


def decode_rollout(rollout, tokenizer, skip_special_tokens: bool = True) -> Tuple[List[str], List[List[int]]]:
    """``(texts, completion_ids)`` of a :class:`~trlax.rollouts.Rollout`: each completion's masked ids (stop
    token included) and their decoding with ``tokenizer.batch_decode`` (or ``decode`` per row)."""
    ids = np.asarray(rollout.completion_ids)
    mask = np.asarray(rollout.completion_mask)
    rows = [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
    else:
        texts = [tokenizer.decode(r) for r in rows]
    return list(texts), rows
