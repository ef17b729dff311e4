"""Run configurations for ``trlax train ALGO``: dataclasses whose every field is settable from a
YAML file and from the command line, validated before any compute.

The loss fields of each algorithm are *the fields of its objective's config dataclass*
(``PolicyLossConfig`` for GRPO, ``PreferenceLossConfig`` for DPO), generated from it, so a new loss
knob is a new command-line flag with no extra code.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, Optional, Tuple, Type

from trlax.objectives._checks import check_choice, check_range


RUN_OUTPUT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "curves.png")  # written into output_dir


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
    param_dtype: str = "float32"  # master weights, gradients and optimiser state
    compute_dtype: str = "float32"  # "bfloat16": bf16 activations / matmuls, float32 norms, softmax and log-probs
    # attention kernel of the policy (trlax.models.attention): auto / blockwise / plain / cudnn / splash
    attention_impl: str = "auto"
    # rematerialisation of the policy's layers in the backward pass: off / full (keep only each layer's input) /
    # dots (also keep the weight-matmul outputs); "full" is what long sequences need (benchmarks/long_context.py)
    remat: str = "off"
    max_prompt_length: int = 32
    max_completion_length: int = 16
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: bool = False
    # a step whose loss or a gradient is NaN / inf is skipped (state unchanged, counted in `skipped_steps`);
    # this many skips in a row stop the run with an error and a checkpoint of the last good state
    max_consecutive_skips: int = 10
    progress: bool = True
    plot: bool = True  # draw the metrics into <output_dir>/curves.png at the end of the run
    export: bool = True  # save_pretrained the final policy (HF format) into <output_dir>/final
    # multi-host: call jax.distributed.initialize before anything else (same command on every host)
    distributed: bool = False
    coordinator_address: str = ""  # host:port of process 0 ("" = auto-detect on TPU / SLURM / Open MPI)
    num_processes: int = 0  # 0 = auto-detect
    process_id: int = -1  # -1 = auto-detect
    # a process that misses heartbeats this long is dead: every other process then exits with an error
    heartbeat_timeout_s: int = 15
    init_timeout_s: int = 120  # how long processes wait for each other at start-up
    # LoRA / DoRA adapters (arXiv 2106.09685 / 2402.09353; trlax.models.lora): lora_rank 0 = off (full fine-
    # tuning). On: only the adapters train, the reference is the base model (adapters off), the export is merged.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # scaling alpha / rank (alpha / sqrt(rank) with use_rslora)
    lora_target_modules: str = "all-linear"  # comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    use_dora: bool = False  # weight-decomposed adapters (DoRA)
    use_rslora: bool = False  # rank-stabilised scaling (arXiv 2312.03732)
    # held-out evaluation (RL: mean reward, accuracy, pass@k; preference: reward accuracy / margin; SFT: loss):
    # eval_dataset is a local file or directory like `dataset`; eval_split > 0 instead holds out that fraction
    # of the training set's distinct prompts; eval_steps: every this many steps (0: only before and after training)
    eval_dataset: str = ""
    eval_split: float = 0.0
    eval_steps: int = 0

    def validate(self) -> None:
        check_range("max_steps", self.max_steps, low=1)
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("warmup_steps", self.warmup_steps, low=0)
        check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        check_range("batch_size", self.batch_size, low=1)
        check_mesh(self)
        check_range("num_microbatches", self.num_microbatches, low=1)
        if self.batch_size % self.num_microbatches:
            raise ValueError(
                f"num_microbatches={self.num_microbatches} must divide batch_size={self.batch_size}")
        check_choice("param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        check_choice("compute_dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        check_choice("remat", self.remat, ("off", "full", "dots"))
        from trlax.models.attention import ATTENTION_IMPLEMENTATIONS

        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLEMENTATIONS)
        check_range("max_prompt_length", self.max_prompt_length, low=1)
        check_range("max_completion_length", self.max_completion_length, low=1)
        check_range("save_every", self.save_every, low=0)
        check_range("keep_checkpoints", self.keep_checkpoints, low=1)
        check_range("max_consecutive_skips", self.max_consecutive_skips, low=1)
        from trlax.train.modeling import check_model

        check_model(self.model)
        if self.eval_split != -1:  # -1: auto (trlax train grpo: 0.1 on the built-in task, else 0)
            check_range("eval_split", self.eval_split, low=0.0, high=1.0, high_inclusive=False)
        check_range("eval_steps", self.eval_steps, low=0)
        if self.eval_dataset and self.eval_split > 0:
            raise ValueError(f"give either eval_dataset={self.eval_dataset!r} or eval_split={self.eval_split}, not both")
        check_range("lora_rank", self.lora_rank, low=0)
        check_range("lora_alpha", self.lora_alpha, low=0.0, low_inclusive=False)
        check_choice("use_dora", self.use_dora, (True, False))
        check_choice("use_rslora", self.use_rslora, (True, False))
        if self.lora_rank == 0 and (self.use_dora or self.use_rslora):
            raise ValueError(f"use_dora={self.use_dora} / use_rslora={self.use_rslora} need lora_rank >= 1, "
                             f"got lora_rank=0")
        from trlax.train.modeling import lora_config_of

        lora_config_of(self)  # checks lora_target_modules
        if self.dataset != "builtin" and not isinstance(self.dataset, str):
            raise ValueError(f"dataset={self.dataset!r} must be 'builtin', a file path or a hub name")
        import os

        own = {os.path.abspath(os.path.join(self.output_dir or ".", f)) for f in RUN_OUTPUT_FILES}
        if self.dataset != "builtin" and os.path.abspath(self.dataset) in own:
            raise ValueError(f"dataset={self.dataset!r} is a file this run writes in output_dir={self.output_dir!r}; "
                             "copy it elsewhere or choose another output_dir")


def check_mesh(cfg) -> None:
    """``mesh_data`` / ``mesh_fsdp`` / ``mesh_tensor`` are >= 1 or -1 (the rest of the devices; at most one) and
    their product fits the devices JAX sees; errors name the fields."""
    import jax

    sizes = {k: getattr(cfg, k) for k in ("mesh_data", "mesh_fsdp", "mesh_tensor")}
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise ValueError(f"{k}={v!r} is out of range; allowed: -1 (the remaining devices) or an integer >= 1")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"at most one of mesh_data / mesh_fsdp / mesh_tensor may be -1, got {sizes}")
    n, known = jax.device_count(), 1
    for v in sizes.values():
        known *= v if v != -1 else 1
    if n % known or (-1 not in sizes.values() and known != n):
        given = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"{given} does not fit the {n} device(s) JAX sees")


def check_sampling(cfg) -> None:
    """The sampling fields a run config has (``temperature``, ``top_p``, ``top_k``, ``min_p``) are in range;
    errors name the field."""
    if hasattr(cfg, "temperature"):
        check_range("temperature", cfg.temperature, low=0.0, low_inclusive=False)
    if hasattr(cfg, "top_p"):
        check_range("top_p", cfg.top_p, low=0.0, high=1.0, low_inclusive=False)
    if hasattr(cfg, "top_k"):
        check_range("top_k", cfg.top_k, low=0)
    if hasattr(cfg, "min_p"):
        check_range("min_p", cfg.min_p, low=0.0, high=1.0, high_inclusive=False)


def _loss_fields(loss_cls, skip=()) -> list:
    out = []
    for f in dataclasses.fields(loss_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        out.append((f.name, f.type, dataclasses.field(default=default)))
    return out


def config_class(algo: str) -> Type:
    """The run-config dataclass of trainer ``algo`` (see :func:`trlax.train.registry.names`)."""
    from trlax.train import registry

    return registry.config_class(algo)


def make_run_config(name: str, fields, *, defaults: Optional[Dict[str, Any]] = None, loss_cls=None,
                    loss_skip=(), validate=None, doc: str = "") -> Type:
    """A run-config dataclass for ``trlax train NAME``: :class:`CommonConfig` + ``defaults`` (new
    defaults of common fields) + ``fields`` (``(name, type, default)`` triples) + every field of
    ``loss_cls`` (an objective config dataclass) except ``loss_skip``. ``validate(self)`` runs after
    :meth:`CommonConfig.validate`."""
    common = [(k, type(v), dataclasses.field(default=v)) for k, v in (defaults or {}).items()]
    extra = [(n, t, dataclasses.field(default=d)) for n, t, d in fields]
    have = {f[0] for f in common + extra}
    loss = _loss_fields(loss_cls, set(loss_skip) | have | {"max_completion_length"}) if loss_cls else []
    cls = dataclasses.make_dataclass(f"{name.replace('-', '_').title().replace('_', '')}RunConfig",
                                     common + extra + loss, bases=(CommonConfig,))
    cls.__doc__ = doc or f"trlax train {name}"

    def _validate(self) -> None:
        CommonConfig.validate(self)
        check_sampling(self)
        if validate is not None:
            validate(self)

    cls.validate = _validate
    return cls


GRPO_DEFAULTS = dict(batch_size=64, max_steps=200, learning_rate=3e-3, max_completion_length=4,
                     max_prompt_length=8)


# `trlax train grpo`'s own defaults (the main job; rloo and the other RL trainers keep GRPO_DEFAULTS):
# 400 steps at lr 1e-3 with a small entropy bonus (keeps groups disagreeing, so the loss keeps a signal), held-out
# evaluation every 50 steps; eval_split -1 = auto (trlax.train.loops.DEFAULT_JOB: 0.1 on the built-in task)
GRPO_JOB = dict(max_steps=400, learning_rate=1e-3, entropy_coef=0.02, eval_steps=50, eval_split=-1.0)


def _grpo_cls():
    from trlax.objectives.policy import PolicyLossConfig

    extra = [
        ("preset", str, dataclasses.field(default="")),  # a PolicyLossConfig preset; explicit flags override it
        ("num_generations", int, dataclasses.field(default=8)),
        ("temperature", float, dataclasses.field(default=1.0)),
        ("top_p", float, dataclasses.field(default=1.0)),
        ("top_k", int, dataclasses.field(default=0)),
        ("min_p", float, dataclasses.field(default=0.0)),
        ("scale_rewards", str, dataclasses.field(default="group")),
        ("multi_objective_aggregation", str, dataclasses.field(default="sum_then_normalize")),
        # comma-separated: builtin (accuracy + format of the built-in task), exact_match, accuracy, format,
        # think_format, cosine, repetition, soft_overlong (trlax.rollouts.rewards), reward_model, or a Python
        # reward function with TRL's signature by import path pkg.module:function (trlax.train.rewarding)
        ("reward_funcs", str, dataclasses.field(default="builtin")),
        ("reward_weights", str, dataclasses.field(default="")),  # comma-separated, one per reward column
        # reward_funcs=reward_model: a local sequence-classification checkpoint (e.g. `trlax train reward`'s export)
        ("reward_model", str, dataclasses.field(default="")),
        ("num_iterations", int, dataclasses.field(default=1)),
        ("steps_per_generation", int, dataclasses.field(default=1)),
        ("log_kl", bool, dataclasses.field(default=True)),  # with beta=0, still log KL to the initial policy
        # rollouts at scale (trlax.rollouts.JaxSampler): continuous-batching decode slots (0: one per completion),
        # and one-step-off-policy generation overlapped with training (round k+1 sampled while round k trains)
        ("decode_slots", int, dataclasses.field(default=0)),
        ("async_generation", bool, dataclasses.field(default=False)),
        # multi-turn, tool-using rollouts (trlax.train.agentic): an Environment class "pkg.module:Env", or tool
        # functions "pkg.module:fn,..." scored by reward_funcs on the final turn; max_turns policy turns per rollout
        # (max_completion_length is the whole interleaved block: policy and observation tokens)
        ("environment", str, dataclasses.field(default="")),
        ("tools", str, dataclasses.field(default="")),
        ("max_turns", int, dataclasses.field(default=4)),
        # Skywork-OR1 adaptive entropy control (arXiv 2505.22312, sec. 3.2.3): entropy_coef is the start value
        ("use_adaptive_entropy", bool, dataclasses.field(default=False)),
        ("entropy_target", float, dataclasses.field(default=0.2)),
        ("entropy_coef_delta", float, dataclasses.field(default=0.005)),
        ("entropy_coef_min", float, dataclasses.field(default=0.0)),
        ("entropy_coef_max", float, dataclasses.field(default=1.0)),
        # R1-style cold start (trlax.train.loops.format_warmup): this many SFT steps on the answer format (each
        # prompt paired with its own answer 30% of the time, else a random row's) before GRPO, which starts from
        # that model; 0 = off;
        # -1 = auto: trlax.train.loops.DEFAULT_JOB's value for the built-in task and model, else 0
        ("sft_warmup_steps", int, dataclasses.field(default=-1)),
    ]
    common = [(k, type(v), dataclasses.field(default=v)) for k, v in dict(GRPO_DEFAULTS, **GRPO_JOB).items()]
    skip = {"max_completion_length", *GRPO_JOB}  # shared with CommonConfig / set above
    cls = dataclasses.make_dataclass("GRPORunConfig", common + extra + _loss_fields(PolicyLossConfig, skip),
                                     bases=(CommonConfig,))
    cls.__doc__ = "trlax train grpo: GRPO-family run (every PolicyLossConfig field is a flag)."
    cls.validate = _validate_grpo
    return cls


def _validate_grpo(self) -> None:
    from trlax.objectives.advantages import MULTI_REWARD_AGGREGATIONS, SCALE_REWARDS

    CommonConfig.validate(self)
    check_range("num_generations", self.num_generations, low=2)
    if self.batch_size % self.num_generations:
        raise ValueError(f"num_generations={self.num_generations} must divide batch_size={self.batch_size} "
                         "(completions per optimiser step)")
    check_sampling(self)
    check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
    check_choice("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_REWARD_AGGREGATIONS)
    if self.sft_warmup_steps != -1:  # -1: auto
        check_range("sft_warmup_steps", self.sft_warmup_steps, low=0)
    check_range("num_iterations", self.num_iterations, low=1)
    check_range("steps_per_generation", self.steps_per_generation, low=1)
    check_range("decode_slots", self.decode_slots, low=0)
    check_choice("async_generation", self.async_generation, (True, False))
    from trlax.train.agentic import check_fields

    check_fields(self)
    check_choice("use_adaptive_entropy", self.use_adaptive_entropy, (True, False))
    check_range("entropy_target", self.entropy_target, low=0.0)
    check_range("entropy_coef_delta", self.entropy_coef_delta, low=0.0)
    check_range("entropy_coef_min", self.entropy_coef_min, low=0.0)
    check_range("entropy_coef_max", self.entropy_coef_max, low=self.entropy_coef_min)
    if self.use_adaptive_entropy:
        check_range("entropy_coef", self.entropy_coef, low=self.entropy_coef_min, high=self.entropy_coef_max)
    from trlax.train.rewarding import check_reward_fields

    check_reward_fields(self)


def _dpo_cls():
    from trlax.objectives.preference import PreferenceLossConfig

    extra = [("preset", str, dataclasses.field(default="")),  # a PreferenceLossConfig preset
             ("precompute_ref_logps", bool, dataclasses.field(default=True)),
             # TR-DPO (arXiv 2404.09656): theta_ref <- alpha * theta + (1 - alpha) * theta_ref every sync_steps
             ("sync_ref_model", bool, dataclasses.field(default=False)),
             ("ref_model_mixup_alpha", float, dataclasses.field(default=0.6)),
             ("ref_model_sync_steps", int, dataclasses.field(default=512))]
    common = [("batch_size", int, dataclasses.field(default=32)), ("max_steps", int, dataclasses.field(default=60)),
              ("learning_rate", float, dataclasses.field(default=1e-3)),
              ("max_completion_length", int, dataclasses.field(default=4)),
              ("max_prompt_length", int, dataclasses.field(default=8))]
    cls = dataclasses.make_dataclass("DPORunConfig", common + extra + _loss_fields(PreferenceLossConfig),
                                     bases=(CommonConfig,))
    cls.__doc__ = "trlax train dpo: preference run (every PreferenceLossConfig field is a flag)."
    cls.validate = _validate_dpo
    return cls


def _validate_dpo(self) -> None:
    CommonConfig.validate(self)
    check_choice("sync_ref_model", self.sync_ref_model, (True, False))
    check_range("ref_model_mixup_alpha", self.ref_model_mixup_alpha, low=0.0, high=1.0, low_inclusive=False)
    check_range("ref_model_sync_steps", self.ref_model_sync_steps, low=1)
    if self.sync_ref_model and getattr(self, "reference_free", False):
        raise ValueError("sync_ref_model=True needs a reference model; got reference_free=True")


def _sft_cls():
    extra = [
        ("batch_size", int, dataclasses.field(default=32)), ("max_steps", int, dataclasses.field(default=60)),
        ("max_completion_length", int, dataclasses.field(default=4)),
        ("max_prompt_length", int, dataclasses.field(default=8)),
        ("loss_type", str, dataclasses.field(default="nll")),  # nll | dft (arXiv 2508.05629)
        # transformers' LabelSmoother (TRL SFTConfig.label_smoothing_factor): target (1 - eps) onehot + eps / V
        ("label_smoothing_factor", float, dataclasses.field(default=0.0)),
        ("bema", bool, dataclasses.field(default=False)),  # BEMA weights (arXiv 2508.00180) -> final_bema/
        ("bema_update_freq", int, dataclasses.field(default=10)),
        ("preset", str, dataclasses.field(default="")),  # bfd_split | t5 (packing presets)
        # SFT packing (trlax.models.packing): "" (off) | bfd | bfd_split | wrapped; rows of max_length tokens
        ("packing", str, dataclasses.field(default="")),
        ("max_length", int, dataclasses.field(default=0)),  # packed row width; 0 = max_prompt + max_completion
    ]
    cls = dataclasses.make_dataclass("SFTRunConfig", extra, bases=(CommonConfig,))
    cls.__doc__ = "trlax train sft: supervised fine-tuning (NLL or DFT, optional BEMA)."
    cls.validate = _validate_sft
    return cls


def _validate_sft(self) -> None:
    from trlax.objectives.supervised import SFT_LOSS_TYPES

    CommonConfig.validate(self)
    check_choice("loss_type", self.loss_type, SFT_LOSS_TYPES)
    check_range("label_smoothing_factor", self.label_smoothing_factor, low=0.0, high=1.0)
    if self.label_smoothing_factor and self.packing:
        raise ValueError(f"label_smoothing_factor={self.label_smoothing_factor} with packing={self.packing!r} is not "
                         "supported yet; pass --packing '' or --label_smoothing_factor 0")
    check_range("bema_update_freq", self.bema_update_freq, low=1)
    from trlax.models.packing import PACKING_STRATEGIES

    check_choice("packing", self.packing, ("",) + PACKING_STRATEGIES)
    check_range("max_length", self.max_length, low=0)
    if self.packing and 0 < self.max_length < 2:
        raise ValueError(f"max_length={self.max_length} is out of range with packing; allowed: 0 or >= 2")


def __getattr__(name):  # ALGORITHMS: every registered trainer (computed on first use)
    if name == "ALGORITHMS":
        from trlax.train import registry

        return registry.names()
    raise AttributeError(name)


def _is_optional(tp) -> Tuple[bool, Any]:
    if isinstance(tp, str):
        # dataclass string annotations (from __future__ annotations); the objectives' configs annotate their
        # continuous hyperparameters `Scalar` (float or a JAX scalar): a flag / YAML value of one is a float
        tp = eval(tp, {**vars(typing), "Scalar": float}, {})
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
        if base is not str and isinstance(raw, (bool, list, tuple, dict)):  # YAML true / [1, 2] / {a: 1}
            raise ValueError(f"{field}={raw!r} is not a valid {base.__name__}")
        if base is str and isinstance(raw, (list, tuple, dict)):
            raise ValueError(f"{field}={raw!r} is not a valid str")
        try:
            if base is int and (isinstance(raw, float) or isinstance(raw, str) and "e" in raw.lower()):
                val = float(raw)
                if not val.is_integer():
                    raise ValueError
                return int(val)
            val = base(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{field}={raw!r} is not a valid {base.__name__}") from None
        if base is float and not math.isfinite(val):
            raise ValueError(f"{field}={raw!r} must be a finite number")
        return val
    origin = typing.get_origin(base)
    if origin in (tuple, typing.Union) or base is Any:
        if isinstance(raw, str) and "," in raw:
            return tuple(x.strip() for x in raw.split(","))
        return raw
    return raw



# ------------------------------------------------------------------------------------ TRL configs
#
# `trlax train NAME --config x.yaml` also reads the YAML / JSON config of the corresponding TRL trainer
# (GRPOConfig, DPOConfig, SFTConfig, KTOConfig ... and the `trl` CLI's script / model arguments): fields with a
# trlax equivalent are applied (same name and meaning, or translated below; the loss fields through the
# objective config's ``from_trl``), the others are listed in one warning, bad values raise naming the TRL field.

# TRL / transformers field -> the trlax field with the same meaning
TRL_RENAMES = {"save_total_limit": "keep_checkpoints", "reward_model_name_or_path": "reward_model",
               "model_name_or_path": "model", "dataset_name": "dataset", "lora_r": "lora_rank",
               "precompute_ref_log_probs": "precompute_ref_logps"}
# the `trl grpo` CLI's built-in reward names -> trlax's
TRL_REWARD_NAMES = {"accuracy_reward": "accuracy", "think_format_reward": "think_format",
                    "get_soft_overlong_punishment": "soft_overlong"}
# fields only a TRL / transformers config has: one of them marks a config file as TRL's
TRL_MARKERS = frozenset(TRL_RENAMES) | {
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "logging_steps",
    "report_to", "lr_scheduler_type", "bf16", "fp16", "gradient_checkpointing", "activation_checkpointing", "save_steps", "save_strategy",
    "warmup_ratio", "use_vllm", "use_peft", "per_device_eval_batch_size", "eval_strategy", "packing_strategy",
    "generation_batch_size", "dataset_train_split", "dataset_text_field", "completion_only_loss",
    "assistant_only_loss", "padding_free", "truncation_mode", "log_completions", "vllm_mode", "run_name",
    "push_to_hub", "hub_model_id", "optim", "adam_beta1", "adam_beta2", "chat_template_path"}


def is_trl_config(mapping: Dict[str, Any]) -> bool:
    """Whether a config mapping is a TRL trainer config (it has a field only TRL / transformers configs have)."""
    return any(k in TRL_MARKERS for k in mapping)


def from_trl_config(algo: str, mapping: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """The run-config values of trainer ``algo`` from a TRL config mapping (``GRPOConfig.to_dict()``, a ``trl``
    CLI YAML ...): trlax fields of the same name and meaning as they are; TRL's batch (``per_device_train_batch_
    size x gradient_accumulation_steps`` completions / rows per optimiser step, the accumulation as micro-batches),
    warm-up ratio, ``bf16`` / ``fp16`` (compute dtype), ``gradient_checkpointing`` (remat), checkpointing,
    ``packing``, PEFT LoRA, reward function and renamed fields (:data:`TRL_RENAMES`) translated; the loss fields
    through the objective config's ``from_trl`` (e.g. ``use_vllm`` + ``vllm_importance_sampling_*`` -> the
    sampler correction). Fields that do not apply are listed in one ``UserWarning``; a bad value raises a
    ``ValueError`` naming the TRL field."""
    import warnings

    from trlax.train import registry

    cls = config_class(algo)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    m = {k: v for k, v in mapping.items()}
    out: Dict[str, Any] = {}
    skipped = []

    def put(trl_name: str, field: str, raw) -> None:
        if field not in fields:
            skipped.append(trl_name)
            return
        try:
            out[field] = parse_value(field, fields[field].type, raw)
        except ValueError as e:
            raise ValueError(f"{source}: {trl_name}={raw!r}: {e}") from None

    def number(name: str, raw) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"{source}: {name}={raw!r} is not a number")
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{source}: {name}={raw!r} is not a number") from None

    def integer(name: str, default: int) -> int:
        raw = m.pop(name, default)
        v = default if raw is None else number(name, raw)
        if not float(v).is_integer() or v < 1:
            raise ValueError(f"{source}: {name}={raw!r} must be an integer >= 1")
        return int(v)

    given_batch = "per_device_train_batch_size" in m
    accum = integer("gradient_accumulation_steps", 1)
    per = integer("per_device_train_batch_size", 1)
    if given_batch:
        put("per_device_train_batch_size", "batch_size", per * accum)
    if accum > 1:
        put("gradient_accumulation_steps", "num_microbatches", accum)
    # TRL counts steps_per_generation (and generation_batch_size / per_device_train_batch_size) in micro-batches,
    # trlax in optimiser steps of batch_size = per_device x accumulation completions
    gen_batch = m.pop("generation_batch_size", None)
    spg = m.pop("steps_per_generation", None)
    if spg is None and gen_batch is not None:
        spg = number("generation_batch_size", gen_batch) / per
    if spg is not None and "steps_per_generation" in fields:
        if number("steps_per_generation", spg) % accum or number("steps_per_generation", spg) < accum:
            raise ValueError(f"{source}: steps_per_generation={spg!r} (micro-batches) must be a multiple of "
                             f"gradient_accumulation_steps={accum}")
        put("steps_per_generation", "steps_per_generation", int(number("steps_per_generation", spg)) // accum)
    elif spg is not None:
        skipped.append("steps_per_generation")
    if m.get("max_steps") is not None and number("max_steps", m["max_steps"]) <= 0:
        m.pop("max_steps")
        skipped.append("max_steps (<= 0: TRL trains num_train_epochs; trlax needs max_steps)")
    ratio = m.pop("warmup_ratio", None) or 0.0
    if isinstance(m.get("warmup_steps"), float) and 0 < m["warmup_steps"] < 1:  # transformers 5: a ratio
        ratio = m.pop("warmup_steps")
    if ratio:
        steps = out.get("max_steps", m.get("max_steps", fields["max_steps"].default))
        put("warmup_ratio", "warmup_steps", math.ceil(number("warmup_ratio", ratio) * number("max_steps", steps)))
    for flag, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if flag in m and parse_value(f"{source}: {flag}", bool, m.pop(flag)):
            put(flag, "compute_dtype", dtype)
    for flag in ("gradient_checkpointing", "activation_checkpointing"):  # transformers 5 renamed the first
        if flag in m and parse_value(f"{source}: {flag}", bool, m.pop(flag)):
            put(flag, "remat", "full")
    strategy = m.pop("save_strategy", "steps")
    if "save_steps" in m or strategy == "no":
        save_steps = m.pop("save_steps", 0)
        put("save_steps", "save_every", 0 if strategy == "no" else save_steps)
    if "packing" in m and "packing" in fields:
        on = parse_value(f"{source}: packing", bool, m.pop("packing"))
        put("packing", "packing", m.pop("packing_strategy", "bfd") if on else "")
    if "use_peft" in m:
        lora = {k: m.pop(k) for k in ("lora_r", "lora_alpha", "lora_target_modules", "use_dora", "use_rslora")
                if k in m}
        if parse_value(f"{source}: use_peft", bool, m.pop("use_peft")):
            lora.setdefault("lora_r", 16)  # TRL ModelConfig's default rank
            for k, v in lora.items():
                if k == "lora_target_modules" and isinstance(v, (list, tuple)):
                    v = ",".join(v)
                put(k, TRL_RENAMES.get(k, k), v)
    for key in ("reward_funcs", "reward_weights"):
        if isinstance(m.get(key), (list, tuple)):
            items = [TRL_REWARD_NAMES.get(str(x), str(x)) if key == "reward_funcs" else str(x) for x in m.pop(key)]
            put(key, key, ",".join(items))
    if isinstance(m.get("reward_funcs"), str):
        m["reward_funcs"] = ",".join(TRL_REWARD_NAMES.get(x.strip(), x.strip()) for x in m["reward_funcs"].split(","))
    L = registry.get(algo).loss_config_cls
    if L is not None and hasattr(L, "from_trl"):
        try:
            lc = L.from_trl(**m)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        default = L()
        for f in dataclasses.fields(lc):
            v = getattr(lc, f.name)
            if f.name in fields and (f.name in m or v != getattr(default, f.name)):
                out[f.name] = v
                m.pop(f.name, None)
        for k in [k for k in m if k.startswith("vllm_importance_sampling") or k == "use_vllm"]:
            if "sampler_correction" in out:
                m.pop(k)  # applied: the sampler correction
    for k, v in m.items():
        field = TRL_RENAMES.get(k, k)
        if field not in fields:
            skipped.append(k)
        elif v is None and not _is_optional(fields[field].type)[0]:
            skipped.append(f"{k} (null)")
        else:
            put(k, field, v)
    if skipped:
        warnings.warn(f"{source}: a TRL config; {len(skipped)} field(s) do not apply to `trlax train {algo}` and are "
                      f"ignored: {', '.join(skipped)}", UserWarning, stacklevel=2)
    return out


def build_config(algo: str, values: Dict[str, Any]):
    """Instantiate and validate the run config of ``algo`` from a dict of raw values (strings from the
    command line or typed values from YAML). Errors name the field. A ``preset`` is resolved here
    (the trainer's run-config presets, then its objective config's presets; explicitly given fields win)
    and written into the fields, so the saved config shows the values the run uses."""
    from trlax.train import registry

    spec = registry.get(algo)
    cls = config_class(algo)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(values)
    if "dtype" in values and "dtype" not in fields:  # `--dtype bfloat16`: the compute dtype (float32 master weights)
        if "compute_dtype" in values:
            raise ValueError("give either dtype or compute_dtype, not both (dtype is an alias of compute_dtype)")
        values["compute_dtype"] = values.pop("dtype")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) for '{algo}': {', '.join(unknown)}; "
                         f"see `trlax train {algo} --help`")
    kwargs = {k: parse_value(k, fields[k].type, v) for k, v in values.items()}
    explicit = set(kwargs)
    preset = kwargs.get("preset", "") if "preset" in fields else ""
    if preset:
        loss_level = spec.loss_config_cls is not None and preset in getattr(spec.loss_config_cls, "PRESETS", ())
        if preset not in spec.presets and not loss_level:
            raise ValueError(f"preset={preset!r} is not a preset of '{algo}'; allowed: "
                             f"{', '.join(spec.preset_names()) or '(none)'}")
        # run-level settings of the paper (sampling, rewards, trainer options) refine the objective's preset
        # of the same name, if any; explicit fields win over both
        for k, v in spec.presets.get(preset, {}).items():
            kwargs.setdefault(k, v)
        explicit = set(kwargs)
        kwargs["preset"] = preset if loss_level else ""
    cfg = cls(**kwargs)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{algo}"
    cfg.validate()
    lc = loss_config(algo, cfg, explicit=explicit)  # validates the objective's fields before any compute
    if lc is not None:
        for f in dataclasses.fields(lc):
            if f.name in fields and f.name != "max_completion_length":
                setattr(cfg, f.name, getattr(lc, f.name))
        if "preset" in fields:
            cfg.preset = ""  # resolved into the fields above
    return cfg


def loss_config(algo: str, cfg, explicit=None):
    """The objective's config of trainers with a ``loss_config_cls`` (validated: a bad loss field raises
    naming the field), else None. With a ``preset``, the preset's values are used except for fields in
    ``explicit`` (None: every field that differs from the objective config's default)."""
    from trlax.train import registry

    L = registry.get(algo).loss_config_cls
    if L is None:
        return None
    names = [f.name for f in dataclasses.fields(L)]
    kw = {k: getattr(cfg, k) for k in names if k != "max_completion_length" and hasattr(cfg, k)}
    if "max_completion_length" in names:
        kw["max_completion_length"] = cfg.max_completion_length
    if getattr(cfg, "preset", ""):
        defaults = L()
        if explicit is None:
            explicit = {k for k, v in kw.items() if v != getattr(defaults, k, None)}
        over = {k: v for k, v in kw.items() if k in explicit or k == "max_completion_length"}
        return L.preset(cfg.preset, **over)
    return L(**kw)


__all__ = ["CommonConfig", "build_config", "from_trl_config", "is_trl_config", "check_mesh", "config_class", "loss_config", "check_sampling", "make_run_config", "parse_value"]
