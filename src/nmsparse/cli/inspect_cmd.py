"""``nmsparse inspect PATH|MODEL``: per-layer pattern, density and verification."""

from __future__ import annotations

import argparse

import torch

from ..export import entry_patterns, is_export, load_export, open_model
from ..mask import sliced_satisfies
from ..select import select_layers
from .display import print_json, print_table
from .prune_cmd import add_selection_arguments, selection_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="an export directory, or a model spec (timm:NAME, torchvision:NAME, hf:PATH)")
    add_selection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


@torch.no_grad()
def _rows_for_export(path: str) -> tuple[str, list[dict]]:
    model, manifest = load_export(path)  # refuses exports whose weights break their manifest
    modules = dict(model.named_modules())
    rows = []
    for entry in manifest["layers"]:
        weight = getattr(modules[entry["fqn"]], entry["param"])
        rows.append({"fqn": entry["fqn"], "shape": entry["shape"], "pattern": entry["pattern"],
                     "density": float((weight != 0).float().mean()),
                     "verified": sliced_satisfies(weight, entry_patterns(entry)), "skip_reason": None})
    for item in manifest.get("skipped", []):
        weight = getattr(modules.get(item["fqn"]), "weight", None)
        rows.append({"fqn": item["fqn"], "shape": list(weight.shape) if weight is not None else None,
                     "pattern": None, "density": float((weight != 0).float().mean()) if weight is not None else None,
                     "verified": None, "skip_reason": item["reason"]})
    title = f"export {path} ({manifest['model']['source']}, nmsparse {manifest['library_version']})"
    return title, rows


@torch.no_grad()
def _rows_for_model(args: argparse.Namespace) -> tuple[str, list[dict]]:
    model, _ = open_model(args.target)
    rows = []
    for choice in select_layers(model, selection_from_args(args), args.pattern):
        weight = choice.module.weight
        pattern = ",".join(sorted({str(p) for p in choice.patterns})) or None
        rows.append({"fqn": choice.fqn, "shape": list(weight.shape), "pattern": pattern,
                     "density": float((weight != 0).float().mean()),
                     "verified": sliced_satisfies(weight, choice.patterns) if choice.patterns else None,
                     "skip_reason": choice.skip_reason})
    return f"{args.target}: layers eligible for {args.pattern} (verified = already holds it)", rows


def _report_files(path: str) -> list[str]:
    """The human-facing files of an export that a prune wrote (report.md and the plots)."""
    from pathlib import Path

    from ..oneshot.report import PLOT_NAMES

    return [name for name in ("report.md", *PLOT_NAMES) if (Path(path) / name).is_file()]


def run(args: argparse.Namespace) -> int:
    export = is_export(args.target)
    title, rows = _rows_for_export(args.target) if export else _rows_for_model(args)
    files = _report_files(args.target) if export else []
    if args.json:
        print_json({"title": title, "layers": rows, "report_files": files})
        return 0
    cols = ["fqn", "shape", "pattern", "density", "verified", "skip_reason"]
    print_table(
        title, ["layer", "shape", "pattern", "density", "verified", "skipped"], [[r[c] for c in cols] for r in rows]
    )
    sparse = [r for r in rows if r["pattern"]]
    print(f"{len(sparse)} layers with a pattern, {sum(bool(r['verified']) for r in sparse)} verified, "
          f"{len(rows) - len(sparse)} dense")
    if files:
        print(f"report: {', '.join(files)} in {args.target}")
    return 0
