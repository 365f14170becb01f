"""``nmsparse`` command line: one module per subcommand, each with ``add_parser`` and ``run``.

Bad input exits with status 2 and one line on stderr naming what is wrong and what would be right.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import errors
from .errors import CliError

COMMANDS = {
    "train": "train sparse from a YAML recipe (default: ResNet, 2:4 SR-STE, real MNIST digits)",
    "prune": "one-shot prune a trained model and write an export",
    "inspect": "per-layer pattern, density and verification of an export or a model",
    "eval": "evaluate a checkpoint or export on a dataset",
    "configs": "list, show or validate the shipped recipes",
    "env": "versions and available backends",
    "bench": "time dense PyTorch against the sparse CPU runtime (layers or whole models)",
    "compress": "write an export in the compressed layout (kept values + indices) and report its size",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nmsparse", description="N:M and 1xN structured sparsity for PyTorch")
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"nmsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"nmsparse.cli.{name}_cmd")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"]  # the built-in default job
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "json", False):
            return _run_json(args)
        return int(args._run(args) or 0)
    except CliError as exc:
        sys.stderr.write(f"nmsparse {args.command}: error: {exc}\n")
        return 2
    except errors.USER_ERRORS as exc:
        message = str(exc).strip() or type(exc).__name__
        if os.environ.get("NMSPARSE_DEBUG"):
            raise
        sys.stderr.write(f"nmsparse {args.command}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def _quiet_third_party_bars() -> None:
    """transformers' and huggingface_hub's own progress bars add nothing to a scripted run."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def _run_json(args: argparse.Namespace) -> int:
    """A ``--json`` command: the JSON document alone on stdout; progress (throttled, plain lines where
    stderr is not a terminal) and every other line on stderr."""
    import contextlib

    from .. import progress
    from .display import json_mode

    real = sys.stdout
    progress.set_stream(sys.stderr, throttle_seconds=5.0)
    json_mode(real)
    _quiet_third_party_bars()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return int(args._run(args) or 0)
    finally:
        progress.set_stream(None)
        json_mode(None)


if __name__ == "__main__":
    sys.exit(main())
