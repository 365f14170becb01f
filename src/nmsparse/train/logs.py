"""What a run leaves behind: metrics.csv, train_log.csv, TensorBoard events and PNG plots.
Only the main process writes. (The progress display is :mod:`nmsparse.progress`.)"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "plot_curves", "plot_density"]


class RunLog:
    """metrics.csv (one row per evaluation), train_log.csv (one row per logged step), TensorBoard.

    The history is kept in memory and stored in checkpoints, so a resumed run rewrites the CSV files
    up to its checkpoint and never duplicates rows.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.metrics: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed: no events written (pip install 'nmsparse[log]')",
                              stacklevel=2)

    def load_history(self, history: dict[str, list[dict[str, Any]]]) -> None:
        self.metrics, self.steps = list(history.get("metrics", [])), list(history.get("steps", []))
        self._rewrite()

    def history(self) -> dict[str, list[dict[str, Any]]]:
        return {"metrics": list(self.metrics), "steps": list(self.steps)}

    def log_step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)
        if self.enabled:
            self._append("train_log.csv", row, self.steps)
            if self._tb:
                for key in ("loss", "lr"):
                    self._tb.add_scalar(f"train/{key}", row[key], row["step"])

    def log_eval(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        if self.enabled:
            self._append("metrics.csv", row, self.metrics)
            if self._tb:
                for key, value in row.items():
                    if key not in ("epoch", "step") and isinstance(value, (int, float)):
                        self._tb.add_scalar(f"eval/{key}", value, row["step"])
                self._tb.flush()

    def _append(self, name: str, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        path = self.run_dir / name
        new = not path.exists() or len(rows) == 1
        with open(path, "w" if new else "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _rewrite(self) -> None:
        if not self.enabled:
            return
        for name, rows in (("metrics.csv", self.metrics), ("train_log.csv", self.steps)):
            path = self.run_dir / name
            if not rows:
                path.unlink(missing_ok=True)
                continue
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def plot_curves(run_dir: Path, steps: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> Path:
    """loss_curves.png: training loss by step, and validation loss/top-1 by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", alpha=0.7)
    if metrics:
        ax_loss.plot([r["step"] for r in metrics], [r["val_loss"] for r in metrics], "o-", label="val loss")
        ax_acc.plot([r["epoch"] for r in metrics], [r["top1"] for r in metrics], "o-", label="val top-1")
        if "ema_top1" in metrics[0]:
            ax_acc.plot([r["epoch"] for r in metrics], [r["ema_top1"] for r in metrics], "s--", label="EMA top-1")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = run_dir / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_density(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    """Bar chart of per-layer density (kept fraction), sparse layers coloured by pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(rows) + 2), 4.5))
    colors = ["tab:blue" if r.get("pattern") else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r["density"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["fqn"] for r in rows], rotation=90, fontsize=6)
    ax.set(ylabel="density (kept fraction)", ylim=(0, 1.05), title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
