"""Run logging: a progress bar (step, reward, KL, loss, tokens/s), metrics to JSONL and TensorBoard
event files, and a PNG of the reward / KL / loss curves at the end of a run."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

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
        self.history: List[Dict[str, float]] = list(history or [])  # rows restored on --resume
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
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and np.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            show = {k: f"{row[k]:.4g}" for k in ("reward", "kl", "loss", "tokens_per_s") if k in row}
            self._bar.set_postfix(show, refresh=False)
            self._bar.update(1)
        return row

    def plot(self, keys=("reward", "kl", "loss"), filename: str = "curves.png") -> Optional[str]:
        present = [k for k in keys if any(k in r for r in self.history)]
        if not present or not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
        for ax, k in zip(axes[0], present):
            xs = [r["step"] for r in self.history if k in r]
            ys = [r[k] for r in self.history if k in r]
            ax.plot(xs, ys, lw=1.2)
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
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
