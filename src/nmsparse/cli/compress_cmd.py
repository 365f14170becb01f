"""``nmsparse compress EXPORT --out DIR``: the compressed layout of an export, with its size against dense."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", help="a dense-with-zeros export directory (from train, prune)")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--json", action="store_true", help="print the size report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..runtime.compressed import save_compressed

    report = save_compressed(args.export, args.out)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.out}: {report['compressed_bytes'] / 1e6:.2f} MB vs dense {report['dense_bytes'] / 1e6:.2f} MB "
              f"({100 * report['ratio']:.1f}%), {report['packed_layers']} packed layers")
        for row in report["layers_left_dense"]:
            print(f"  left dense: {row['fqn']} ({row['pattern']}): {row['reason']}")
    return 0
