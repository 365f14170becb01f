"""``nmsparse prune MODEL --pattern 2:4 --out DIR``: one-shot pruning to an export."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from ..export import load_export, save_export
from ..models import build_model, example_input, forward_output, load_weights
from ..oneshot import prune
from ..select import LAYER_SETS, Rule, Selection
from .display import print_table
from .errors import CliError


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", default="2:4", help="default pattern: 'n:m' keeps n of every m (e.g. 2:4, 1:8), "
                        "'n:m@out' groups along output channels, '1xN:density' for 1xN blocks")
    parser.add_argument("--layers", default="all", help=f"comma-separated layer sets: {', '.join(LAYER_SETS)}")
    parser.add_argument("--rule", action="append", default=[], metavar="MATCH=PATTERN|skip",
                        help="per-layer override, first match wins; MATCH is an fqn, 're:REGEX' or 'type:Class' "
                             "(e.g. --rule 're:.*head=skip' --rule 'blocks.0.attn.qkv=2:4,2:4,4:8')")
    parser.add_argument("--include-first-conv", action="store_true", help="make the first conv sparse too")
    parser.add_argument("--include-classifier", action="store_true", help="make the classifier sparse too")
    parser.add_argument("--include-grouped-conv", action="store_true", help="make grouped/depthwise convs sparse too")


def selection_from_args(args: argparse.Namespace) -> Selection:
    return Selection(
        layers=tuple(s.strip() for s in args.layers.split(",") if s.strip()),
        rules=tuple(Rule.parse(text) for text in args.rule),
        keep_first_conv=not args.include_first_conv,
        keep_classifier=not args.include_classifier,
        skip_grouped_conv=not args.include_grouped_conv,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm:NAME, torchvision:NAME, hf:PATH (or hf:minilm), or an export directory")
    add_selection_arguments(parser)
    parser.add_argument("--method", default="magnitude", help="one-shot method (magnitude)")
    parser.add_argument("--checkpoint", help="local weights to load first (.safetensors or torch file)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs of a vision model")
    parser.add_argument("--in-chans", type=int, help="input channels of a vision model")
    parser.add_argument("--out", required=True, help="export directory to write (replaced atomically)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    selection = selection_from_args(args)
    model, source = build_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    model.eval()
    reference = copy.deepcopy(model)  # the pruned model's outputs are checked against masked-dense ones
    result = prune(model, args.pattern, args.method, selection)
    if not result.layers:
        raise CliError(f"no layer of {args.model} was selected for pattern {args.pattern}; check --layers/--rule")
    out = save_export(model, args.out, result.layers, source.as_dict(), result.skipped,
                      extra={"method": args.method})
    # Verify the round trip: reload the export and compare with the pruned model in memory.
    reloaded, _ = load_export(out, copy.deepcopy(reference))
    inputs = example_input(model, source)
    with torch.no_grad():
        max_diff = float((forward_output(model, inputs) - forward_output(reloaded, inputs)).abs().max())
    if args.json:
        print(json.dumps({"export": str(out), "layers": [r.as_dict() for r in result.report],
                          "reload_max_abs_diff": max_diff}, indent=2))
        return 0
    rows = [(r.fqn, r.shape, r.pattern, r.density, r.verified, r.skip_reason) for r in result.report]
    print_table(f"{args.model} pruned with {args.method}", ["layer", "shape", "pattern", "density", "verified", "skipped"], rows)
    sparse = [r for r in result.report if r.skip_reason is None]
    print(f"{len(sparse)} sparse layers, {len(result.skipped)} kept dense; all verified: "
          f"{all(r.verified for r in sparse)}; export reload max |diff| = {max_diff:.2e}")
    print(f"wrote {Path(out) / 'model.safetensors'} and manifest.json")
    return 0
