"""``nmsparse eval CHECKPOINT_OR_EXPORT [--data NAME --root DIR]``: top-1, top-5 and loss."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config.sections import Config, DataConfig
from ..export import is_export, load_export
from ..schema import build
from .errors import CliError, register_user_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="an export directory, a run directory (uses its best checkpoint) or a .pt checkpoint")
    parser.add_argument("--data", help="mnist5k, digits, imagefolder, cifar10, cifar100 (default: the run's data)")
    parser.add_argument("--root", help="dataset root for imagefolder/cifar")
    parser.add_argument("--image-size", type=int, help="input resolution")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", action="store_true")


def _model_from_checkpoint(path: Path):
    from ..train.checkpoint import load_checkpoint
    from ..train.data import build_data
    from ..train.setup import build_run_model, build_sparsifier

    ckpt = load_checkpoint(path)
    config = build(Config, ckpt["config"])
    bundle = build_data(config.data)
    model, _ = build_run_model(config, bundle)
    sparsifier = build_sparsifier(config, ckpt.get("steps_per_epoch") or 1)
    if sparsifier is not None:
        sparsifier.prepare(model)
    model.load_state_dict(ckpt["model"])
    if sparsifier is not None:
        sparsifier.load_state_dict(ckpt["sparsifier"])
    if ckpt.get("ema"):
        from ..train.setup import Ema

        ema = Ema(model, 0.5)
        ema.load_state_dict(ckpt["ema"])
        model = ema.model
    return model, config.data


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import CheckpointError
    from ..train.data import DataError, build_data
    from ..train.setup import eval_loader, evaluate, finalize_eval

    register_user_error(DataError)
    register_user_error(CheckpointError)
    target = Path(args.target)
    data_cfg: DataConfig | None = None
    if is_export(target):
        model, _ = load_export(target)
    elif target.is_dir():
        best = target / "checkpoints" / "best.pt"
        if not best.is_file():
            raise CliError(f"{target} is neither an export nor a run directory with checkpoints/best.pt")
        model, data_cfg = _model_from_checkpoint(best)
    elif target.is_file():
        model, data_cfg = _model_from_checkpoint(target)
    else:
        raise CliError(f"{target} does not exist (expected an export dir, a run dir or a .pt checkpoint)")
    if args.data:
        data_cfg = build(DataConfig, {"name": args.data, "root": args.root, "image_size": args.image_size})
    if data_cfg is None:
        raise CliError("an export does not record its dataset: pass --data (and --root for imagefolder/cifar)")
    bundle = build_data(data_cfg)
    loader = eval_loader(bundle.val, args.batch_size, 0, 1, 0)
    sums = evaluate(model.eval(), loader, torch.device("cpu"))
    result = finalize_eval([sums[k] for k in ("loss_sum", "top1", "top5", "count")])
    result["samples"] = int(sums["count"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"({result['samples']} samples of {data_cfg.name})")
    return 0
