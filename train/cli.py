"""The ``trlax`` command.

    trlax train NAME [--config file.yaml] [--key value ...]      (trlax train --help: every NAME)
    trlax launch --nproc 2 --devices_per_proc 4 -- train NAME ...   (local multi-process run; train/launch.py)

Every field of the algorithm's run config (train/config.py) is a flag; ``--help`` lists them with
their defaults. Values from ``--config`` are overridden by flags. The resolved config is written to
``<output_dir>/config.yaml`` beside the run. Bad values, unknown fields and unknown algorithms stop
the run before any compute, with a message naming the field. ``--config`` also reads a TRL trainer's YAML /
JSON config (GRPOConfig, DPOConfig, SFTConfig ... field names and values; see
:func:`trlax.train.config.from_trl_config`): what trlax has is applied, the rest listed in one warning.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, List, Optional, Tuple



def _truthy(v) -> bool:
    return v is True or str(v).lower() in ("1", "true", "yes", "on")


def _int(v, default: int) -> int:
    return default if v is None else int(float(v))


def _field_help(algo: str) -> str:
    from trlax.train.config import config_class

    cls = config_class(algo)
    lines = [f"fields of `trlax train {algo}` (--name value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"  --{f.name:<32} {str(tp):<18} default: {default!r}")
    return "\n".join(lines)


def _parse_overrides(tokens: List[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}; use --name value")
        name = tok[2:].replace("-", "_")
        if not name or name.startswith("="):
            after = f" after --{list(out)[-1]}" if out else ""
            raise ValueError(f"unexpected argument {tok!r}{after}; use --name value")
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag sets a boolean
            i += 1
        out[name] = value
    return out


def initialize_distributed(values: Dict[str, object]) -> None:
    """Multi-host runs: ``jax.distributed.initialize`` with the config's coordinator address / process
    count / process id (auto-detected on Cloud TPU, SLURM and Open MPI when left empty). Every host
    runs the same command; the mesh then spans the devices of all hosts.

    Must run before anything touches the XLA backend (importing :mod:`trlax.objectives` does), so
    :func:`main` calls it before importing the trainers. Failure detection: a process that misses
    heartbeats for ``heartbeat_timeout_s`` seconds (default 15) is declared dead by the coordinator and
    every other process is terminated with an error naming the dead task (a SIGKILLed peer's sockets also
    break any gloo collective in flight at once); start-up waits ``init_timeout_s`` (default 120) for all
    processes; the shutdown barrier waits at most ``2 x heartbeat_timeout_s``. On CPU (``JAX_PLATFORMS=cpu``)
    cross-process collectives use gloo."""
    import os

    import jax

    kw: Dict[str, object] = {}
    if values.get("coordinator_address"):
        kw["coordinator_address"] = str(values["coordinator_address"])
    try:
        n, pid = _int(values.get("num_processes"), 0), _int(values.get("process_id"), -1)
        hb = _int(values.get("heartbeat_timeout_s"), 15)
        init = _int(values.get("init_timeout_s"), 120)
    except ValueError:
        raise ValueError(f"num_processes={values.get('num_processes')!r} / process_id={values.get('process_id')!r} / "
                         f"heartbeat_timeout_s={values.get('heartbeat_timeout_s')!r} / init_timeout_s="
                         f"{values.get('init_timeout_s')!r} must be integers") from None
    if hb < 1 or init < 1:
        raise ValueError(f"heartbeat_timeout_s={hb} / init_timeout_s={init} must be >= 1")
    if n > 0:
        kw["num_processes"] = n
    if pid >= 0:
        kw["process_id"] = pid
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw, initialization_timeout=init, heartbeat_timeout_seconds=hb,
                               shutdown_timeout_seconds=2 * hb)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
          f"{jax.device_count()} global devices", flush=True)


def _read_values(rest: List[str]) -> Tuple[Dict[str, object], Dict[str, object], str]:
    """``(file_values, flags, config_path)``: the ``--config`` file's values (YAML or JSON), the ``--name value``
    flags (which override them) and the file's path (plain Python: no JAX yet)."""
    flags: Dict[str, object] = dict(_parse_overrides(rest))
    cfg_file = str(flags.pop("config", None) or "")
    return (read_config_file(cfg_file) if cfg_file else {}), flags, cfg_file


def read_config_file(path: str) -> Dict[str, object]:
    """A YAML (or JSON, a subset of YAML) mapping of field names to values; errors name ``config`` and the file."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config={path!r}: no such file")
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"config={path!r} is not valid YAML / JSON: {_one_line(e)}") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ValueError(f"config={path!r} must be a YAML / JSON mapping of field names to values")
    return loaded


def _one_line(err) -> str:
    """An exception as one line (its message with whitespace runs collapsed)."""
    return " ".join(str(err).split()) or type(err).__name__


def _fail(err, status: int = 2) -> int:
    print(f"error: {_one_line(err)}", file=sys.stderr)
    return status


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "launch":
        from trlax.train import launch

        return launch.main(argv[1:])
    if argv[0] != "train":
        print(f"error: unknown command {argv[0]!r}; the commands are `trlax train ALGO` and `trlax launch`",
              file=sys.stderr)
        return 2
    rest = argv[2:]
    wants_help = len(argv) < 2 or argv[1] in ("-h", "--help") or "-h" in rest or "--help" in rest
    values: Dict[str, object] = {}
    file_values: Dict[str, object] = {}
    flags: Dict[str, object] = {}
    cfg_file = ""
    if not wants_help:
        try:
            file_values, flags, cfg_file = _read_values(rest)
            values = {**file_values, **flags}
            if _truthy(values.get("distributed", False)):
                # before anything touches the XLA backend: importing the trainers / objectives does
                initialize_distributed(values)
        except (ValueError, TypeError, FileNotFoundError) as e:
            return _fail(e)
    from trlax.train import registry

    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print("usage: trlax train NAME [--config file.yaml] [--key value ...]\n\ntrainers:")
        for name in registry.names():
            spec = registry.get(name)
            presets = ", ".join(spec.preset_names())
            print(f"  {name:<12} {spec.description}" + (f" [presets: {presets}]" if presets else ""))
        return 0 if len(argv) >= 2 else 2
    algo = argv[1]
    if algo not in registry.names():
        print(f"error: unknown algorithm {algo!r}; allowed: {', '.join(registry.names())}", file=sys.stderr)
        return 2
    if wants_help:
        print(f"usage: trlax train {algo} [--config file.yaml] [--name value ...]\n")
        from trlax.train.config import config_class

        print(config_class(algo).__doc__ + "\n")
        names = registry.get(algo).preset_names()
        if names:
            print(f"presets (--preset NAME): {', '.join(names)}\n")
        print(_field_help(algo))
        return 0
    try:
        from trlax.train.config import build_config, from_trl_config, is_trl_config

        if is_trl_config(file_values):  # a TRL trainer's config: translated, the rest listed in one warning
            values = {**from_trl_config(algo, file_values, source=f"config={cfg_file!r}"), **flags}
        cfg = build_config(algo, values)
        from trlax.train.agentic import environment_rows
        from trlax.train.data import load_records

        # --environment with --dataset builtin: the environment's own task when it has one (CalculatorEnv: addition)
        rows = environment_rows(cfg) or load_records(algo, cfg.dataset, seed=cfg.seed)  # missing columns stop here
    except (ValueError, TypeError, FileNotFoundError) as e:
        return _fail(e)
    from trlax.train import loops

    try:
        loops.run(algo, cfg, rows)
    except loops.NonFiniteError as e:  # the last good state is checkpointed; --resume true continues
        return _fail(e, 1)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # checks that need the model / mesh / data
        return _fail(e)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
