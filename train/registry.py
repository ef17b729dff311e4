"""The trainers behind ``trlax train NAME``: one :class:`TrainerSpec` per name.

Each trainer module (``loops``, ``rl``, ``pref``, ``online``, ``reward``, ``distill``) defines a list
``SPECS`` of specs; :func:`get` / :func:`names` collect them (imported lazily, so ``trlax --help`` stays
fast). A spec names everything the command needs: the run-config dataclass, the run function, the dataset
columns it reads, the built-in toy data and the presets.

Presets: ``--preset NAME`` first looks in ``spec.presets`` (run-config field overrides, e.g. SimPO's
``beta=2.5, gamma=1.375, cpo_alpha=0``), then in the objective config's own presets
(``spec.loss_config_cls.PRESETS``, e.g. every ``PolicyLossConfig`` preset for ``grpo``). Fields given
explicitly on the command line or in the YAML file always win over the preset.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

TRAINER_MODULES = (
    "trlax.train.loops",
    "trlax.train.rl",
    "trlax.train.pref",
    "trlax.train.online",
    "trlax.train.reward",
    "trlax.train.distill",
    "trlax.train.minillm",
)


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """One ``trlax train NAME`` trainer.

    Attributes:
      name: the command name.
      config: zero-argument callable returning the run-config dataclass (a subclass of
        :class:`trlax.train.config.CommonConfig`; ``validate()`` checks every field).
      run: ``run(cfg, rows) -> summary dict``.
      columns: dataset columns the trainer reads (checked before any compute).
      builtin: ``builtin(n, seed) -> rows``: the built-in toy dataset of ``dataset="builtin"``.
      presets: run-config overrides by preset name (paper settings).
      loss_config_cls: the objective config dataclass whose fields are run-config fields and whose
        ``PRESETS`` are also valid ``--preset`` names (``PolicyLossConfig`` / ``PreferenceLossConfig``), or None.
      description: one line for ``--help`` and the README table.
      metric: the summary key the toy run improves (for the README / tests), e.g. ``"reward"``.
    """

    name: str
    config: Callable[[], type]
    run: Callable[..., Dict[str, Any]]
    columns: Tuple[str, ...]
    builtin: Callable[[int, int], List[Dict[str, Any]]]
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    loss_config_cls: Optional[type] = None
    description: str = ""
    metric: str = "loss"

    def preset_names(self) -> Tuple[str, ...]:
        extra = tuple(getattr(self.loss_config_cls, "PRESETS", ())) if self.loss_config_cls else ()
        return tuple(self.presets) + tuple(p for p in extra if p not in self.presets)


_REGISTRY: Dict[str, TrainerSpec] = {}
_CONFIG_CACHE: Dict[str, type] = {}


def _load() -> Dict[str, TrainerSpec]:
    if not _REGISTRY:
        for mod in TRAINER_MODULES:
            try:
                m = importlib.import_module(mod)
            except ModuleNotFoundError as e:  # a trainer module not written yet
                if e.name == mod:
                    continue
                raise
            for spec in getattr(m, "SPECS", ()):
                if spec.name in _REGISTRY:
                    raise RuntimeError(f"trainer {spec.name!r} registered twice ({mod})")
                _REGISTRY[spec.name] = spec
    return _REGISTRY


def names() -> Tuple[str, ...]:
    """Every trainer name, in registration order."""
    return tuple(_load())


def get(name: str) -> TrainerSpec:
    """The spec of ``name``; an unknown name raises naming the allowed ones."""
    reg = _load()
    if name not in reg:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(reg)}")
    return reg[name]


def config_class(name: str) -> type:
    """The (cached) run-config dataclass of trainer ``name``."""
    if name not in _CONFIG_CACHE:
        _CONFIG_CACHE[name] = get(name).config()
    return _CONFIG_CACHE[name]


__all__ = ["TRAINER_MODULES", "TrainerSpec", "config_class", "get", "names"]
