"""``nmsparse compress EXPORT --out DIR``: the compressed layout of an export, with its size against dense."""

from __future__ import annotations

import argparse

from .display import print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", help="a dense-with-zeros export directory (from train, prune)")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--json", action="store_true", help="print the size report as JSON")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "int8", "int4"],
                        help="store the Linear layers quantized (as convert(weights=...) runs them)")
    parser.add_argument("--group-size", type=int, default=64, help="with --weights: values per scale")
    parser.add_argument("--choose-batch", type=int, metavar="N",
                        help="time every layer dense vs sparse on this machine at batch N of the model's example "
                        "input and store the layers that were slower sparse as dense (saved in the manifest)")


def run(args: argparse.Namespace) -> int:
    from ..runtime.compressed import save_compressed
    from .errors import CliError

    inputs = None
    if args.choose_batch is not None:
        if args.choose_batch < 1:
            raise CliError(f"--choose-batch must be >= 1, got {args.choose_batch}")
        from ..export import load_export
        from ..models import ModelSource, example_input

        model, manifest = load_export(args.export)
        source = ModelSource(manifest["model"]["source"], dict(manifest["model"].get("options", {})))
        inputs = example_input(model, source, batch=args.choose_batch)
    report = save_compressed(args.export, args.out, example_inputs=inputs, weights=args.weights,
                             group_size=args.group_size)
    if args.json:
        print_json(report)
    else:
        print(f"{args.out}: {report['compressed_bytes'] / 1e6:.2f} MB vs dense {report['dense_bytes'] / 1e6:.2f} MB "
              f"({100 * report['ratio']:.1f}%), {report['packed_layers']} packed layers")
        if "sparse_layers_ratio" in report:
            print(f"  pruned layers, {args.weights} values + float16 scales + index codes: "
                  f"{100 * report['sparse_layers_ratio']:.1f}% of their float32 bytes")
        for row in report["layers_left_dense"]:
            print(f"  left dense: {row['fqn']} ({row['pattern']}): {row['reason']}")
        if report.get("kept_dense") is not None and args.choose_batch:
            print(f"  layer choice at batch {args.choose_batch}: {len(report['kept_dense'])} layers stored dense")
    return 0
