"""orbax checkpoints: the train state (params, optimiser state, objective state), the data position
and the PRNG key every N steps; keep the last K; resume from the latest *finalised* one.

orbax writes each step into a temporary directory and renames it when the write has finished, so a
checkpoint interrupted mid-write (a kill -9 at any moment) is never listed as a valid step; leftover
temporary directories are cleaned up when the next run opens the directory. A listed checkpoint that cannot
be read (truncated or edited by hand) is reported, moved aside to ``<output_dir>/checkpoints_unreadable/``
(never deleted) and :meth:`Checkpointer.restore_latest` falls back to the previous one
(tests/train/test_checkpoint.py, tests/train/test_reliability_checkpoint.py).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with a ``(state, meta)`` layout.

    ``state`` is any pytree of arrays (a ``TrainState``); ``meta`` a JSON-able dict (data position,
    PRNG key as a list of ints, config hash ...).
    """

    def __init__(self, directory: str, *, save_every: int = 100, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                               cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: Dict[str, Any], *, force: bool = False) -> bool:
        saved = self._mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        return bool(saved)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def all_steps(self):
        return list(self._mgr.all_steps())

    def restore(self, target_state: Any, step: Optional[int] = None) -> Tuple[int, Any, Dict[str, Any]]:
        """Restore into the structure (and shardings) of ``target_state``. A checkpoint whose decoder layers
        are in the other layout (per-layer ``layers/{i}/...``, e.g. saved before scanned layers existed, vs
        stacked ``layers/...`` of ``Decoder(scan_layers=True)``; LoRA ``adapters`` alike) is restored in its
        own layout and converted (:func:`trlax.models.stack_layers` / :func:`~trlax.models.unstack_layers`)."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
        try:
            out = self._restore(step, abstract)
            return step, out["state"], dict(out["meta"])
        except (ValueError, KeyError, TypeError) as err:
            # A checkpoint of the other decoder layer layout (per-layer ``layers/{i}/...`` as saved before
            # scanned layers, or stacked ``layers/...``): restore it in its own layout, then convert.
            from trlax.models.layout import stack_layers, unstack_layers

            for to_saved, to_target in ((unstack_layers, stack_layers), (stack_layers, unstack_layers)):
                alt = to_saved(abstract)
                if jax.tree_util.tree_structure(alt) == jax.tree_util.tree_structure(abstract):
                    continue
                try:
                    out = self._restore(step, alt)
                except (ValueError, KeyError, TypeError):
                    continue
                state = jax.tree_util.tree_map(lambda x, a: jax.device_put(x, a.sharding),
                                               to_target(out["state"]), abstract)
                return step, state, dict(out["meta"])
            raise err

    def restore_latest(self, target_state: Any) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """Restore the latest checkpoint that can be read, newest first: one that fails to restore (truncated,
        corrupted or edited by hand) is reported on stderr, moved aside (:meth:`quarantine`) and the previous
        one is tried. None when no checkpoint is readable."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.restore(target_state, step)
            except Exception as err:  # noqa: BLE001 - any read failure: report, skip, fall back
                msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                where = self.quarantine(step)
                print(f"warning: checkpoint {os.path.join(self.directory, str(step))} is unreadable "
                      f"({type(err).__name__}: {msg}); moved to {where}, falling back to the previous checkpoint",
                      file=sys.stderr, flush=True)
        return None

    def quarantine(self, step: int) -> str:
        """Move the step directory ``step`` out of the checkpoint directory (to
        ``<parent>/checkpoints_unreadable/<step>-<time>``) so it is never listed again; nothing is deleted."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable", f"{step}-{time.time_ns()}")
        if jax.process_index() == 0 and os.path.isdir(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
        self._mgr.reload()
        return dst

    def _restore(self, step: int, abstract: Any):
        return self._mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def key_to_meta(key) -> list:
    return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).tolist()


def key_from_meta(data) -> jax.Array:
    return np.asarray(data, dtype=np.uint32)


__all__ = ["Checkpointer", "key_from_meta", "key_to_meta"]
