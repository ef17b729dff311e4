"""Reward plumbing of the RL trainers: which reward functions a run config names (``reward_funcs``), their
weights (``reward_weights``), and the scorer that turns sampled completions into an ``[N, R]`` reward matrix
(one column per reward function, NaN = unscorable).

``reward_funcs`` is a comma-separated list of built-in names (:data:`REWARD_FUNCS`), ``reward_model``, and
Python reward functions given by import path, ``pkg.module:function`` or ``pkg.module.function`` (any callable:
a function, a ``functools.partial``, an instance with ``__call__``). A Python reward function has TRL's
signature (plain or ``async def``) and is called once per generation round with lists::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **dataset_columns) -> list[float | None]

where, as in TRL, ``prompts`` are the dataset's prompts (text, or chat messages), ``completions`` the decoded
completions (text, or for conversational prompts ``[{"role": "assistant", "content": text}]``) and the other
dataset columns (``answer``, ``solution`` ...) are lists; ``None`` marks a completion the function cannot score
(NaN: left out of the weighted sum, as TRL's ``nansum``; a row no function scores gets advantage 0). TRL's extra
keywords ``trainer_state``, ``log_extra`` and ``log_metric`` are not passed. The Python API
(:func:`trlax.train.api.train`) also takes the callables themselves (:func:`reward_spec`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
from typing import Any, Callable, Dict, List

import numpy as np

from trlax.train import data as D


REWARD_FUNCS = ("builtin", "exact_match", "accuracy", "format", "think_format", "cosine", "repetition",
                "soft_overlong", "reward_model")

_CALLABLES: Dict[str, Callable] = {}  # reward functions handed to the Python API that have no import path


def callable_name(fn) -> str:
    """The metric name of a reward function, as TRL names it: a partial's function, ``__name__``, else the
    class name of a callable instance."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def reward_spec(fn) -> str:
    """The ``reward_funcs`` entry of a Python reward function: ``module:qualname`` when that imports back to
    ``fn`` (the saved config.yaml then reruns as it is), else a name for this process only (``python:<name>``)."""
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise TypeError(f"reward_funcs: {fn!r} is neither a name / import path nor callable")
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if mod and qual and "<" not in qual:
        try:
            if load_reward_function(f"{mod}:{qual}") is fn:
                return f"{mod}:{qual}"
        except ValueError:
            pass
    key = f"python:{callable_name(fn)}"
    while key in _CALLABLES and _CALLABLES[key] is not fn:
        key += "_"
    _CALLABLES[key] = fn
    return key


def load_reward_function(spec: str, field: str = "reward_funcs") -> Callable:
    """The callable at ``spec``: ``pkg.module:function`` (``function`` may be dotted: ``Class.method``) or
    ``pkg.module.function``, or a ``python:<name>`` of :func:`reward_spec`. Errors name ``field`` and the path."""
    from trlax.rollouts.environments import load_object

    if spec.startswith("python:"):
        if spec not in _CALLABLES:
            raise ValueError(f"{field}={spec!r} was a Python callable given to the trlax Python API in another "
                             "process; give its import path (pkg.module:function) or pass the function again")
        return _CALLABLES[spec]
    if ":" not in spec:
        mod, _, name = spec.rpartition(".")
        if not mod:
            raise ValueError(f"{field}={spec!r} is neither a built-in reward ({', '.join(REWARD_FUNCS)}) nor an "
                             "import path pkg.module:function / pkg.module.function")
        spec_colon = f"{mod}:{name}"
    else:
        spec_colon = spec
    if os.getcwd() not in sys.path:  # as `trl grpo`: reward modules next to where the command runs
        sys.path.append(os.getcwd())
    try:
        obj = load_object(spec_colon, field)
    except ValueError as e:  # names the field and the path (as pkg.module:function)
        if spec_colon == spec:
            raise
        raise ValueError(f"{field}={spec!r}: {e}") from None
    if not callable(obj):
        raise ValueError(f"{field}={spec!r} is a {type(obj).__name__}, not a callable reward function")
    return obj


def reward_entries(spec: str) -> List[str]:
    """The comma-separated entries of ``reward_funcs``."""
    return [n.strip() for n in str(spec).split(",") if n.strip()]


def check_reward_fields(cfg) -> None:
    """Validate ``reward_funcs`` / ``reward_weights`` / ``reward_model`` of a run config (errors name the
    field): known names or importable reward functions, one weight per reward column, a checkpoint directory
    when ``reward_model`` is used."""
    names = reward_entries(cfg.reward_funcs)
    if not names:
        raise ValueError(f"reward_funcs={cfg.reward_funcs!r} names no reward function")
    for n in names:
        if n not in REWARD_FUNCS:
            load_reward_function(n)
    if cfg.reward_weights:
        try:
            [float(w) for w in cfg.reward_weights.split(",")]
        except ValueError:
            raise ValueError(f"reward_weights={cfg.reward_weights!r} must be comma-separated numbers") from None
        n_cols = sum(2 if n == "builtin" else 1 for n in names)
        if len(cfg.reward_weights.split(",")) != n_cols:
            raise ValueError(f"reward_weights={cfg.reward_weights!r} must have {n_cols} values, one per reward "
                             f"column of reward_funcs={cfg.reward_funcs!r} (builtin has two: accuracy, format)")
    path = getattr(cfg, "reward_model", "")
    if "reward_model" in names and not path:
        raise ValueError("reward_model='' : reward_funcs includes 'reward_model'; pass --reward_model PATH "
                         "(a sequence-classification checkpoint, e.g. the export of `trlax train reward`)")
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"reward_model={path!r} is not a local Hugging Face checkpoint directory (no config.json)")


class TRLRewardFunction:
    """A reward function with TRL's signature (plain or ``async def``), called once per round with lists (see the
    module docstring); checks that it returns one value per completion."""

    batched = True

    def __init__(self, fn: Callable, name: str):
        self.fn, self.__name__ = fn, name

    def __call__(self, completions, completion_ids, prompts, **columns) -> List[Any]:
        out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if inspect.isawaitable(out):  # an `async def` reward function (TRL awaits them too); its own event loop,
            import concurrent.futures  # in a worker thread, so that it also runs where a loop is running (Jupyter)

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                out = pool.submit(asyncio.run, out).result()
        out = list(out) if out is not None else []
        if len(out) != len(completions):
            raise ValueError(f"reward function {self.__name__!r} returned {len(out)} rewards for {len(completions)} "
                             "completions (one per completion expected; None for one it cannot score)")
        return out


def reward_model_scorer(path: str, tokenizer, max_length: int):
    """A :class:`trlax.rollouts.RewardModelScorer` for the sequence-classification checkpoint at ``path``
    (e.g. the export of ``trlax train reward``), with the checkpoint's own tokenizer if it has one, else
    ``tokenizer``; scores ``prompt + completion`` (the last ``max_length`` tokens)."""
    from trlax.rollouts import RewardModelScorer, load_reward_model

    tok = tokenizer
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return RewardModelScorer(load_reward_model(path), tok, pad_token_id=pad, max_length=max_length)


def reward_functions(cfg, tokenizer=None):
    """``(fn, names)``: ``fn(texts, completion_ids, prompts, rows, truncated) -> [N, R]`` rewards (NaN =
    unscorable) for the comma-separated ``cfg.reward_funcs``. ``builtin`` is the built-in task's verifier
    (:func:`trlax.train.data.addition_rewards`: accuracy + format); the other names are
    :mod:`trlax.rollouts.rewards` (exact-match / R1 accuracy on the ``answer`` / ``solution`` column, R1
    format, cosine length scaling, n-gram repetition, DAPO soft overlong punishment); ``reward_model`` the
    score of the sequence-classification checkpoint ``cfg.reward_model`` (:func:`reward_model_scorer`); an
    import path a Python reward function with TRL's signature (:class:`TRLRewardFunction`), named as TRL names
    it (:func:`callable_name`)."""
    from trlax.rollouts import rewards as RW

    C = cfg.max_completion_length
    table = {
        "exact_match": RW.exact_match_reward, "accuracy": RW.accuracy_reward, "format": RW.format_reward,
        "think_format": RW.think_format_reward, "cosine": lambda: RW.CosineScaledReward(C),
        "repetition": lambda: RW.RepetitionPenalty(), "soft_overlong": lambda: RW.SoftOverlongPunishment(
            C, max(1, C // 4)),
    }
    parts, out_names = [], []
    for n in reward_entries(cfg.reward_funcs):
        if n == "builtin":
            parts.append("builtin")
            out_names += list(D.REWARD_NAMES)
        elif n == "reward_model":
            parts.append(reward_model_scorer(cfg.reward_model, tokenizer,
                                             cfg.max_prompt_length + cfg.max_completion_length))
            out_names.append(n)
        elif n in table:
            f = table[n]
            parts.append(f() if n in ("cosine", "repetition", "soft_overlong") else f)
            out_names.append(n)
        else:
            f = load_reward_function(n)
            name = callable_name(f)
            while name in out_names:  # two functions of one name: distinct metric names
                name += "_"
            parts.append(TRLRewardFunction(f, name))
            out_names.append(name)

    def fn(texts, completion_ids, prompts, rows, truncated):
        cols = {}
        for k in rows[0]:
            if k != "prompt":
                cols[k] = [r.get(k) for r in rows]
        mats = []
        for part in parts:
            if part == "builtin":
                answers = [str(r.get("answer", r.get("solution", ""))).strip() for r in rows]
                mats.append(D.addition_rewards([t.strip() for t in texts], answers, truncated))
            elif isinstance(part, TRLRewardFunction):  # TRL's inputs: the dataset's prompts, chat-shaped completions
                chat = [D.is_conversational({"prompt": r.get("prompt")}) for r in rows]
                comps = [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)]
                mats.append(RW.compute_rewards([part], comps, completion_ids=completion_ids,
                                               prompts=[r.get("prompt") for r in rows], **cols))
            else:
                mats.append(RW.compute_rewards([part], texts, completion_ids=completion_ids, prompts=prompts,
                                               **cols))
        return np.concatenate(mats, axis=1)

    return fn, tuple(out_names)
