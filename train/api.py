"""The Python entry point of the trainers: what ``trlax train NAME`` does, from a script or a notebook, with the
objects a TRL user already has (reward functions, a dataset, a TRL config)::

    from trlax.train import train

    def length_penalty(prompts, completions, completion_ids, **kwargs):
        return [-len(c) / 10 for c in completions]

    summary = train("grpo", {"max_steps": 50}, reward_funcs=["builtin", length_penalty],
                    train_dataset=[{"prompt": "3+4=", "answer": "7"}, ...])

``trlax.train.grpo(...)`` / ``trlax.train.dpo(...)`` / ... are the same with the trainer's name bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Union


def config_values(algo: str, config: Any) -> Dict[str, Any]:
    """Run-config values from ``config``: None, a dict of fields, a run config of ``algo``, a path to a YAML /
    JSON file, or a TRL config (an object with ``to_dict``, e.g. ``GRPOConfig``) or its dict (translated by
    :func:`trlax.train.config.from_trl_config`)."""
    from trlax.train.config import from_trl_config, is_trl_config

    if config is None:
        return {}
    source = "config"
    if isinstance(config, str):
        from trlax.train.cli import read_config_file

        source, config = f"config={config!r}", read_config_file(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type) and not hasattr(config, "to_dict"):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif hasattr(config, "to_dict"):  # a TRL / transformers TrainingArguments
        source, config = type(config).__name__, config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, a run config, a file path or a TRL config, got "
                        f"{type(config).__name__}")
    return from_trl_config(algo, config, source=source) if is_trl_config(config) else dict(config)


def train(algo: str, config: Any = None, *, reward_funcs: Union[None, str, Any, Sequence[Any]] = None,
          train_dataset: Any = None, **fields: Any) -> Dict[str, Any]:
    """Run trainer ``algo`` and return its summary (what ``trlax train ALGO`` writes to ``summary.json``).

    Args:
      algo: a trainer name (``trlax train --help``).
      config: the run config: see :func:`config_values` (a TRL config is accepted as it is).
      reward_funcs: RL trainers: reward functions, each a built-in name, an import path or a Python callable
        with TRL's signature (:mod:`trlax.train.rewarding`); one or a list.
      train_dataset: a path (as ``--dataset``), a list of row dicts, or a ``datasets.Dataset``; rows in any TRL
        format the trainer reads (checked before any compute, errors name the row and column).
      **fields: run-config fields, overriding ``config``.
    """
    from trlax.train import data as D
    from trlax.train import loops
    from trlax.train.config import build_config
    from trlax.train.rewarding import reward_spec

    values = {**config_values(algo, config), **fields}
    if reward_funcs is not None:
        funcs = [reward_funcs] if isinstance(reward_funcs, str) or callable(reward_funcs) else list(reward_funcs)
        values["reward_funcs"] = ",".join(reward_spec(f) for f in funcs)
    if isinstance(values.get("reward_weights"), (list, tuple)):  # TRL's form: one number per reward function
        values["reward_weights"] = ",".join(str(float(w)) for w in values["reward_weights"])
    rows = None
    if isinstance(train_dataset, str):
        values["dataset"] = train_dataset
    elif train_dataset is not None:
        rows = [dict(r) for r in train_dataset]
        values.setdefault("dataset", "python")  # the saved config.yaml records where the rows came from
    cfg = build_config(algo, values)
    if rows is None:
        rows = D.load_records(algo, cfg.dataset, seed=cfg.seed)
    else:
        rows = D.prepare_records(algo, "train_dataset", rows, seed=cfg.seed)
    return loops.run(algo, cfg, rows)


__all__ = ["config_values", "train"]
