"""Run configurations for ``trlax train ALGO``: dataclasses whose every field is settable from a
YAML file and from the command line, validated before any compute.

The loss fields of each algorithm are *the fields of its objective's config dataclass*
(``PolicyLossConfig`` for GRPO, ``PreferenceLossConfig`` for DPO), generated from it, so a new loss
knob is a new command-line flag with no extra code.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Optional, Tuple, Type

from trlax.objectives._checks import check_choice, check_range


@dataclasses.dataclass
class CommonConfig:
    """Fields shared by every algorithm."""

    model: str = "tiny"  # "tiny": a built-in tiny random model + local tokenizer; else a local HF checkpoint dir
    dataset: str = "builtin"  # "builtin", a local .json / .jsonl / .parquet file, or a hub dataset name (online)
    output_dir: str = ""  # default: runs/<algo>
    seed: int = 0
    max_steps: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    num_microbatches: int = 1
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    max_prompt_length: int = 32
    max_completion_length: int = 16
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    progress: bool = True
    export: bool = True  # save_pretrained the final policy (HF format) into <output_dir>/final

    def validate(self) -> None:
        check_range("max_steps", self.max_steps, low=1)
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("warmup_steps", self.warmup_steps, low=0)
        check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("num_microbatches", self.num_microbatches, low=1)
        if self.batch_size % self.num_microbatches:
            raise ValueError(
                f"num_microbatches={self.num_microbatches} must divide batch_size={self.batch_size}")
        check_choice("param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        check_choice("compute_dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        check_range("max_prompt_length", self.max_prompt_length, low=1)
        check_range("max_completion_length", self.max_completion_length, low=1)
        check_range("save_every", self.save_every, low=0)
        check_range("keep_checkpoints", self.keep_checkpoints, low=1)
        check_range("log_every", self.log_every, low=1)


def _loss_fields(loss_cls, skip=()) -> list:
    out = []
    for f in dataclasses.fields(loss_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        out.append((f.name, f.type, dataclasses.field(default=default)))
    return out


def config_class(algo: str) -> Type:
    """The run-config dataclass of ``algo`` (``grpo``, ``dpo``, ``sft``)."""
    check_choice("algorithm", algo, ALGORITHMS)
    return _CLASSES[algo]()


def _grpo_cls():
    from trlax.objectives.policy import PolicyLossConfig

    extra = [
        ("preset", str, dataclasses.field(default="")),
        ("num_generations", int, dataclasses.field(default=8)),
        ("temperature", float, dataclasses.field(default=1.0)),
        ("top_p", float, dataclasses.field(default=1.0)),
        ("top_k", int, dataclasses.field(default=0)),
        ("min_p", float, dataclasses.field(default=0.0)),
        ("scale_rewards", str, dataclasses.field(default="group")),
        ("multi_objective_aggregation", str, dataclasses.field(default="sum_then_normalize")),
        ("reward_weights", str, dataclasses.field(default="")),
        ("num_iterations", int, dataclasses.field(default=1)),
        ("steps_per_generation", int, dataclasses.field(default=1)),
    ]
    skip = {"max_completion_length"}  # shared with CommonConfig
    cls = dataclasses.make_dataclass("GRPORunConfig", extra + _loss_fields(PolicyLossConfig, skip), bases=(CommonConfig,))
    cls.__doc__ = "trlax train grpo: GRPO-family run (every PolicyLossConfig field is a flag)."
    return cls


def _dpo_cls():
    from trlax.objectives import preference

    loss_cls = getattr(preference, "PreferenceLossConfig", None)
    extra = [("precompute_ref_logps", bool, dataclasses.field(default=True))]
    fields = extra + (_loss_fields(loss_cls) if loss_cls is not None else [])
    cls = dataclasses.make_dataclass("DPORunConfig", fields, bases=(CommonConfig,))
    cls.__doc__ = "trlax train dpo: preference run (every PreferenceLossConfig field is a flag)."
    return cls


def _sft_cls():
    extra = [
        ("loss_type", str, dataclasses.field(default="nll")),
        ("bema", bool, dataclasses.field(default=False)),
        ("bema_update_freq", int, dataclasses.field(default=10)),
    ]
    cls = dataclasses.make_dataclass("SFTRunConfig", extra, bases=(CommonConfig,))
    cls.__doc__ = "trlax train sft: supervised fine-tuning (NLL or DFT, optional BEMA)."
    return cls


ALGORITHMS = ("grpo", "dpo", "sft")
_CLASSES = {"grpo": _grpo_cls, "dpo": _dpo_cls, "sft": _sft_cls}


def _is_optional(tp) -> Tuple[bool, Any]:
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # dataclass string annotations (from __future__ annotations)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return True, inner[0]
    return False, tp


def parse_value(field: str, tp, raw: Any):
    """Convert a command-line / YAML value to the field's type; errors name the field."""
    optional, base = _is_optional(tp)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{field}=None is not allowed")
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field}={raw!r} is not a boolean (true/false)")
    if base in (int, float, str):
        try:
            if base is int and isinstance(raw, str) and "e" in raw.lower():
                val = float(raw)
                if not val.is_integer():
                    raise ValueError
                return int(val)
            return base(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{field}={raw!r} is not a valid {base.__name__}") from None
    origin = typing.get_origin(base)
    if origin in (tuple, typing.Union) or base is Any:
        if isinstance(raw, str) and "," in raw:
            return tuple(x.strip() for x in raw.split(","))
        return raw
    return raw


def build_config(algo: str, values: Dict[str, Any]):
    """Instantiate and validate the run config of ``algo`` from a dict of raw values."""
    cls = config_class(algo)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) for '{algo}': {', '.join(unknown)}; "
                         f"see `trlax train {algo} --help`")
    kwargs = {k: parse_value(k, fields[k].type, v) for k, v in values.items()}
    cfg = cls(**kwargs)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{algo}"
    cfg.validate()
    loss_config(algo, cfg)  # validates the objective's fields now, before any compute
    return cfg


def loss_config(algo: str, cfg):
    """The objective's config (validated: a bad loss field raises naming the field)."""
    if algo == "grpo":
        from trlax.objectives.policy import PolicyLossConfig

        names = {f.name for f in dataclasses.fields(PolicyLossConfig)}
        kw = {k: getattr(cfg, k) for k in names if k != "max_completion_length"}
        kw["max_completion_length"] = cfg.max_completion_length
        if cfg.preset:
            base = PolicyLossConfig.preset(cfg.preset)
            defaults = PolicyLossConfig()
            # explicit (non-default) fields override the preset
            kw = {k: v for k, v in kw.items() if v != getattr(defaults, k)}
            kw.setdefault("max_completion_length", cfg.max_completion_length)
            return base.replace(**kw)
        return PolicyLossConfig(**kw)
    if algo == "dpo":
        from trlax.objectives.preference import PreferenceLossConfig

        names = {f.name for f in dataclasses.fields(PreferenceLossConfig)}
        return PreferenceLossConfig(**{k: getattr(cfg, k) for k in names})
    return None


__all__ = ["ALGORITHMS", "CommonConfig", "build_config", "config_class", "loss_config", "parse_value"]
