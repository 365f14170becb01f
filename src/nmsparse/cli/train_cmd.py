"""``nmsparse train [--config RECIPE|FILE] [key=value ...]`` and ``--resume RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.load import load_config
from ..config.sections import Config
from ..schema import build, yaml_load
from .errors import CliError, register_user_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a shipped recipe name (nmsparse configs list) or a YAML file; "
                        "default: the built-in default recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. sparsity.pattern=1:8 optim.lr=0.05")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import CheckpointError
    from ..train.data import DataError
    from ..train.loop import TrainingDiverged, run_training

    register_user_error(DataError)
    register_user_error(CheckpointError)
    if args.resume:
        if args.config or args.overrides:
            raise CliError("--resume continues a run with its saved config; drop --config and overrides")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise CliError(f"{run_dir} is not a run directory (no config.yaml)")
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise CliError(f"{run_dir} has no checkpoints/last.pt to resume from")
        config = build(Config, yaml_load((run_dir / "config.yaml").read_text()))
        summary_dir, resume = run_dir, True
    else:
        config = load_config(args.config, args.overrides)
        summary_dir, resume = None, False
    try:
        summary = run_training(config, summary_dir, resume=resume)
    except TrainingDiverged as exc:
        sys.stderr.write(f"nmsparse train: stopped: {exc}\n")
        return 1
    final = summary.get("final", {})
    if "perplexity" in final:  # a causal LM on text: next-token accuracy is the top-1
        line = (f"done in {summary['wall_s']:.0f}s: held-out perplexity {final['perplexity']}, next-token top-1 "
                f"{final.get('top1')}%")
    else:
        line = f"done in {summary['wall_s']:.0f}s: top-1 {final.get('top1')}%, top-5 {final.get('top5')}%"
    if "export" in summary:
        line += (f"; export {summary['export']['dir']} ({summary['export']['sparse_layers']} sparse layers, "
                 "patterns verified)")
    print(line)
    return 0
