"""Run logging: a progress bar (step, reward, KL, loss, tokens/s), metrics to JSONL and TensorBoard
event files, and a PNG of the run's curves at the end of a run (reward, each reward function, KL, loss,
entropy, the fraction of zero-variance groups and the held-out evaluation, whichever the run logged).

Evaluation rows (:meth:`RunLogger.log_eval`) go to the same ``metrics.jsonl`` with ``"split": "eval"`` and
keys ``eval/...``; they are kept apart from the training rows (:attr:`RunLogger.eval_history`)."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

try:  # tqdm is a transformers / datasets dependency; fall back to plain prints without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


class RunLogger:
    """Per-step metrics: ``metrics.jsonl`` (one JSON row per step), TensorBoard event files under
    ``tensorboard/``, a tqdm progress bar showing reward / KL / loss / tokens/s, and :meth:`plot`."""

    def __init__(self, output_dir: str, total_steps: int, *, tensorboard: bool = True, progress: bool = True,
                 start_step: int = 0, history: Optional[List[Dict[str, float]]] = None, enabled: bool = True):
        # enabled=False (processes other than 0 of a multi-host run): keep the history, write nothing.
        self.output_dir = output_dir
        self.enabled = enabled
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a") if enabled else None
        self._tb = None
        progress = progress and enabled
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:  # pragma: no cover
                self._tb = None
        self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True) if (progress and tqdm) else None
        # rows restored on --resume: training rows, and evaluation rows (``"split": "eval"``) kept apart
        self.history: List[Dict[str, float]] = [r for r in history or [] if r.get("split") != "eval"]
        self.eval_history: List[Dict[str, float]] = [r for r in history or [] if r.get("split") == "eval"]
        self._t = time.perf_counter()

    def log(self, step: int, metrics: Dict[str, float], tokens: Optional[int] = None) -> Dict[str, float]:
        now = time.perf_counter()
        row = {k: float(v) for k, v in metrics.items()}
        row["step"] = step
        row["step_time"] = now - self._t  # seconds since the previous logged step (data + sampling + update)
        if tokens is not None:
            row["tokens_per_s"] = tokens / max(now - self._t, 1e-9)
        self._t = now
        self.history.append(row)
        self._write(row, step, [k for k in row if k != "step"])
        if self._bar is not None:
            show = {k: f"{row[k]:.4g}" for k in ("reward", "kl", "loss", "tokens_per_s") if k in row}
            self._bar.set_postfix(show, refresh=False)
            self._bar.update(1)
        return row

    def log_eval(self, step: int, metrics: Dict[str, float]) -> Dict[str, float]:
        """An evaluation after ``step`` optimiser steps (0: the initial policy): keys ``eval/<name>``, written to
        ``metrics.jsonl`` as a row with ``"split": "eval"`` and to TensorBoard; printed on one line."""
        row = {f"eval/{k}": float(v) for k, v in metrics.items()}
        if self.enabled:
            print("eval at step %d: %s" % (step, ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items())), flush=True)
        row.update(step=step, split="eval")
        self.eval_history.append(row)
        self._write(row, step, [k for k in row if k.startswith("eval/")])
        return row

    def _write(self, row: Dict[str, Any], step: int, scalars: List[str]) -> None:
        """``row`` as one line of ``metrics.jsonl``; its finite ``scalars`` to TensorBoard at ``step``."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k in scalars:
                if np.isfinite(row[k]):
                    self._tb.add_scalar(k, row[k], step)

    def plot(self, keys=("reward", "rewards/*", "eval/*", "kl", "loss", "entropy", "frac_reward_zero_std"),
             filename: str = "curves.png") -> Optional[str]:
        """One panel per key present in the history (``prefix/*``: every such key, e.g. each reward function
        ``rewards/<name>`` and the evaluation ``eval/<name>``)."""
        rows = self.history + self.eval_history
        seen = list(dict.fromkeys(k for r in rows for k in r))
        present = []
        for k in keys:
            if k.endswith("/*"):  # one panel per function / evaluation metric (TRL's /mean, /std spellings left out)
                present += [n for n in seen if n.startswith(k[:-1]) and n.count("/") == 1
                            and n not in ("rewards/nan", "rewards/unscorable")]  # counts, not reward functions
            elif k in seen:
                present.append(k)
        if not present or not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ncol = min(4, len(present))
        nrow = -(-len(present) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.2 * nrow), squeeze=False)
        for ax in axes.flat[len(present):]:
            ax.set_visible(False)
        for ax, k in zip(axes.flat, present):
            xs = [r["step"] for r in rows if k in r]
            ys = [r[k] for r in rows if k in r]
            ax.plot(xs, ys, lw=1.2, marker="o" if k.startswith("eval/") else None)
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        # fixed margins (in inches, as fractions of the figure): half the cost of tight_layout, paid by every run
        w, h = 4.5 * ncol, 3.2 * nrow
        fig.subplots_adjust(left=0.55 / w, right=1 - 0.15 / w, bottom=0.5 / h, top=1 - 0.35 / h, wspace=0.3,
                            hspace=0.55)
        path = os.path.join(self.output_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


__all__ = ["RunLogger"]
