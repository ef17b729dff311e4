"""Reward plumbing of the RL trainers: which reward functions a run config names (``reward_funcs``), their
weights (``reward_weights``), and the scorer that turns sampled completions into an ``[N, R]`` reward matrix
(one column per reward function, NaN = unscorable)."""

from __future__ import annotations

import os

import numpy as np

from trlax.train import data as D


REWARD_FUNCS = ("builtin", "exact_match", "accuracy", "format", "think_format", "cosine", "repetition",
                "soft_overlong", "reward_model")


def check_reward_fields(cfg) -> None:
    """Validate ``reward_funcs`` / ``reward_weights`` / ``reward_model`` of a run config (errors name the
    field): known names, one weight per reward column, a checkpoint directory when ``reward_model`` is used."""
    from trlax.objectives._checks import check_choice

    names = [n.strip() for n in cfg.reward_funcs.split(",")]
    for n in names:
        check_choice("reward_funcs", n, REWARD_FUNCS)
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
    (:func:`trlax.train.data.addition_rewards`: accuracy + format); the others are
    :mod:`trlax.rollouts.rewards` (exact-match / R1 accuracy on the ``answer`` / ``solution`` column, R1
    format, cosine length scaling, n-gram repetition, DAPO soft overlong punishment); ``reward_model`` the
    score of the sequence-classification checkpoint ``cfg.reward_model`` (:func:`reward_model_scorer`)."""
    from trlax.rollouts import rewards as RW

    C = cfg.max_completion_length
    table = {
        "exact_match": RW.exact_match_reward, "accuracy": RW.accuracy_reward, "format": RW.format_reward,
        "think_format": RW.think_format_reward, "cosine": lambda: RW.CosineScaledReward(C),
        "repetition": lambda: RW.RepetitionPenalty(), "soft_overlong": lambda: RW.SoftOverlongPunishment(
            C, max(1, C // 4)),
    }
    names = [n.strip() for n in cfg.reward_funcs.split(",")]
    parts, out_names = [], []
    for n in names:
        if n == "builtin":
            parts.append("builtin")
            out_names += list(D.REWARD_NAMES)
        elif n == "reward_model":
            parts.append(reward_model_scorer(cfg.reward_model, tokenizer,
                                             cfg.max_prompt_length + cfg.max_completion_length))
            out_names.append(n)
        else:
            f = table[n]
            parts.append(f() if n in ("cosine", "repetition", "soft_overlong") else f)
            out_names.append(n)

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
            else:
                mats.append(RW.compute_rewards([part], texts, completion_ids=completion_ids, prompts=prompts,
                                               **cols))
        return np.concatenate(mats, axis=1)

    return fn, tuple(out_names)

