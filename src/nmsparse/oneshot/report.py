"""What a one-shot prune writes for people beside ``report.json``: ``report.md`` and three plots.

* ``layer_error.png``: one bar per pruned layer (its reconstruction error on the calibration inputs),
  grouped by block, coloured by projection;
* ``tuning_loss.png``: the scale tuning's distillation loss over time;
* ``recovery_loss.png``: the recovery's distillation loss over time;
* ``fidelity.png``: the fidelity measure of the dense, pruned (before tuning), one-shot and recovered models.

A plot is written only where its data exists (a prune without calibration measures no layer error).
Each PNG carries the numbers it draws as JSON in its ``nmsparse-data`` text chunk, the same numbers
``report.json`` holds (the tests compare them). Written by :func:`report_files` into the export's
temporary directory, so they appear atomically with the rest of the export.
"""

from __future__ import annotations

import io
import json
import re
import textwrap
from typing import Any

__all__ = ["report_files", "report_markdown", "PLOT_NAMES", "plot_data"]

PLOT_NAMES = ("layer_error.png", "tuning_loss.png", "recovery_loss.png", "fidelity.png")
_DATA_KEY = "nmsparse-data"


def _block_of(fqn: str) -> tuple[str, str]:
    """``(block, projection)`` of a layer name: the prefix up to its last number, and the rest."""
    matches = list(re.finditer(r"\.(\d+)\.", fqn))
    if not matches:
        return "", fqn
    return fqn[: matches[-1].end() - 1], fqn[matches[-1].end():]


def _layer_error_data(report: dict[str, Any]) -> dict[str, Any] | None:
    rows = [
        r for r in report.get("layers", []) if r.get("reconstruction_error") is not None and not r.get("skip_reason")
    ]
    if not rows:
        return None
    return {"fqn": [r["fqn"] for r in rows], "reconstruction_error": [r["reconstruction_error"] for r in rows]}


def _fidelity_value(entry: dict[str, Any]) -> tuple[str, float] | None:
    for key in ("perplexity", "mean_cosine", "top1_agreement"):
        if key in entry:
            return key, float(entry[key])
    return None


def _fidelity_data(report: dict[str, Any]) -> dict[str, Any] | None:
    fidelity = report.get("fidelity") or {}
    stages, values, name = [], [], None
    for stage in ("dense", "before_tuning", "one_shot", "recovered"):
        found = _fidelity_value(fidelity.get(stage) or {})
        if found is not None:
            name = found[0]
            stages.append(stage)
            values.append(found[1])
    if not stages:
        return None
    return {"measure": name, "stage": stages, "value": values}


def _history_data(report: dict[str, Any], stage: str) -> dict[str, Any] | None:
    history = (report.get(stage) or {}).get("history")
    return dict(history) if history and history.get("step") else None


def plot_data(report: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The numbers each plot draws, taken from the report: ``{plot name: data or None}``."""
    return {"layer_error.png": _layer_error_data(report), "tuning_loss.png": _history_data(report, "tuning"),
            "recovery_loss.png": _history_data(report, "recovery"), "fidelity.png": _fidelity_data(report)}


def _png(fig, data: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, metadata={_DATA_KEY: json.dumps(data)})
    plt.close(fig)
    return buffer.getvalue()


def _plot_layer_error(data: dict[str, Any], title: str) -> bytes:
    import matplotlib.pyplot as plt

    blocks = [_block_of(f) for f in data["fqn"]]
    kinds = sorted({p for _, p in blocks})
    palette = plt.get_cmap("tab10")
    colors = {k: palette(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.08 * len(blocks) + 2)), 3.6))
    x, ticks, labels, previous = 0.0, [], [], None
    for (block, proj), value in zip(blocks, data["reconstruction_error"]):
        if previous is not None and block != previous:
            x += 0.8  # a gap between blocks
        if block != previous:
            ticks.append(x)
            labels.append(block.split(".")[-1] if block else "")
        ax.bar(x, value, width=0.9, color=colors[proj])
        previous = block
        x += 1.0
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_xlabel("block (bars: its pruned layers in model order)")
    ax.set_ylabel("reconstruction error ||(W-W')X||^2/||WX||^2")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    if len(kinds) <= 12:
        ax.legend(handles, kinds, fontsize=7, ncol=min(4, len(kinds)))
    return _png(fig, data)


def _plot_loss(data: dict[str, Any], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot([s / 60 for s in data["seconds"]], data["loss"], color="#4c72b0")
    ax.set_xlabel("minutes")
    ax.set_ylabel("distillation loss")
    ax.set_title(title, fontsize=9)
    return _png(fig, data)


def _plot_fidelity(data: dict[str, Any], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    colours = {"dense": "#999999", "before_tuning": "#c44e52", "one_shot": "#dd8452", "recovered": "#4c72b0"}
    bars = ax.bar([s.replace("_", " ") for s in data["stage"]], data["value"],
                  color=[colours[s] for s in data["stage"]])
    ax.bar_label(bars, fmt="%.4g", fontsize=8)
    ax.set_ylabel(data["measure"].replace("_", " "))
    ax.set_title(title, fontsize=9)
    return _png(fig, data)


def report_markdown(report: dict[str, Any]) -> str:
    """A short human summary of a prune's report (``report.md``)."""
    lines = [f"# One-shot prune: {report.get('model', 'model')}", "",
             f"- pattern **{report.get('pattern')}**, method **{report.get('method')}**"]
    calibration = report.get("calibration")
    if calibration:
        described = ", ".join(f"{k} {v}" for k, v in calibration.items())
        lines.append(f"- calibration: {described}")
    else:
        lines.append("- calibration: none")
    seconds = report.get("seconds") or {}
    if seconds:
        lines.append("- time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    layers = report.get("layers", [])
    sparse = [r for r in layers if not r.get("skip_reason")]
    lines.append(f"- {len(sparse)} sparse layers, {len(layers) - len(sparse)} kept dense; all verified: "
                 f"{all(r.get('verified') for r in sparse)}")
    fidelity = _fidelity_data(report)
    if fidelity:
        lines += ["", f"## Fidelity ({fidelity['measure'].replace('_', ' ')})", "", "| model | value |", "|---|---|"]
        lines += [f"| {s.replace('_', ' ')} | {v:.4g} |" for s, v in zip(fidelity["stage"], fidelity["value"])]
    for stage, heading in (("tuning", "Scale tuning"), ("recovery", "Recovery")):
        run = report.get(stage)
        if run:
            trained = f"; {run['params']:,} numbers trained ({run.get('what')})" if run.get("params") else ""
            lines += ["", f"## {heading}", "",
                      f"{run.get('steps')} steps in {run.get('seconds')} s ({run.get('objective')}); "
                      f"loss {run.get('first_loss'):.4g} -> {run.get('last_loss'):.4g}{trained}"]
    worst = sorted((r for r in sparse if r.get("reconstruction_error") is not None),
                   key=lambda r: -r["reconstruction_error"])[:5]
    if worst:
        lines += [
            "",
            "## The 5 worst layers (reconstruction error)",
            "",
            "| layer | pattern | error |",
            "|---|---|---|",
        ]
        lines += [f"| {r['fqn']} | {r['pattern']} | {r['reconstruction_error']:.4g} |" for r in worst]
    skipped = [r for r in layers if r.get("skip_reason")]
    if skipped:
        lines += ["", "## Kept dense", "", "| layer | reason |", "|---|---|"]
        lines += [f"| {r['fqn']} | {r['skip_reason']} |" for r in skipped]
    plots = [name for name, data in plot_data(report).items() if data]
    if plots:
        lines += ["", "Plots: " + ", ".join(plots)]
    return "\n".join(lines) + "\n"


def report_files(report: dict[str, Any]) -> dict[str, str | bytes]:
    """``{"report.json", "report.md", plots...}`` of a prune's report dict (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    title = "\n".join(textwrap.wrap(f"{report.get('model', '')} {report.get('pattern')} {report.get('method')}".strip(),
                                     60))  # long method names on two lines, not cut off
    files: dict[str, str | bytes] = {"report.json": json.dumps(report, indent=2) + "\n",
                                     "report.md": report_markdown(report)}
    draw = {"layer_error.png": _plot_layer_error, "tuning_loss.png": _plot_loss, "recovery_loss.png": _plot_loss,
            "fidelity.png": _plot_fidelity}
    for name, data in plot_data(report).items():
        if data:
            files[name] = draw[name](data, title)
    return files
