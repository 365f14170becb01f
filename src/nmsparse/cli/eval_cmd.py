"""``nmsparse eval CHECKPOINT_OR_EXPORT [--data NAME --root DIR]``: top-1, top-5 and loss; or
``nmsparse eval EXPORT_OR_MODEL --perplexity text:...``: perplexity of a causal LM in sliding windows."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config.sections import Config, DataConfig
from ..export import is_export, load_export
from ..schema import build
from .display import print_json
from .errors import CliError, register_user_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", help="an export directory, a run directory (uses its best checkpoint) or a .pt checkpoint"
    )
    parser.add_argument("--perplexity", metavar="TEXT", help="causal LMs: perplexity of text:heldout (built-in text "
                        "that calibration never sees), text:builtin, text:PATH or hf-dataset:NAME[:CONFIG[:SPLIT]]; "
                        "the target may also be a model spec (hf:DIR, gguf:FILE) to measure the dense model")
    parser.add_argument("--tokens", type=int, default=4096, help="perplexity: tokens of the text to score")
    parser.add_argument("--window", type=int, default=512, help="perplexity: window in tokens")
    parser.add_argument("--stride", type=int, help="perplexity: tokens between window starts (default: the window)")
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
    bundle = build_data(config.data, config.model.name)
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
    return model, config.data, config.model.name


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import CheckpointError
    from ..train.data import DataError, build_data
    from ..train.setup import eval_loader, evaluate, finalize_eval

    register_user_error(DataError)
    register_user_error(CheckpointError)
    if args.perplexity:
        return _perplexity(args)
    target = Path(args.target)
    data_cfg: DataConfig | None = None
    model_name = None
    if is_export(target):
        model, _ = load_export(target)
    elif target.is_dir():
        best = target / "checkpoints" / "best.pt"
        if not best.is_file():
            raise CliError(f"{target} is neither an export nor a run directory with checkpoints/best.pt")
        model, data_cfg, model_name = _model_from_checkpoint(best)
    elif target.is_file():
        model, data_cfg, model_name = _model_from_checkpoint(target)
    else:
        raise CliError(f"{target} does not exist (expected an export dir, a run dir or a .pt checkpoint)")
    if args.data:
        data_cfg = build(DataConfig, {"name": args.data, "root": args.root, "image_size": args.image_size})
    if data_cfg is None:
        raise CliError("an export does not record its dataset: pass --data (and --root for imagefolder/cifar)")
    bundle = build_data(data_cfg, model_name)
    loader = eval_loader(bundle.val, args.batch_size, 0, 1, 0)
    sums = evaluate(model.eval(), loader, torch.device("cpu"), task=bundle.task)
    result = finalize_eval([sums[k] for k in ("loss_sum", "top1", "top5", "count")], bundle.task)
    result["samples"] = int(sums["count"])
    return _emit(args, result, f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
                               f"({result['samples']} samples of {data_cfg.name})")


def _perplexity(args: argparse.Namespace) -> int:
    from ..export import open_model
    from ..oneshot import CalibrationError, model_kind, perplexity
    from ..oneshot.data import check_vocabulary, load_texts, load_tokenizer, token_ids

    register_user_error(CalibrationError)
    model, source = open_model(args.target)
    if model_kind(model) != "causal_lm":
        raise CliError(f"{args.target} is not a causal language model; --perplexity needs one (e.g. hf:DIR of a "
                       "...ForCausalLM, gguf:FILE, or their export)")
    if args.window < 2 or (args.stride is not None and not 0 < args.stride <= args.window):
        raise CliError(f"need --window >= 2 and 0 < --stride <= --window, got {args.window}, {args.stride}")
    folder = Path(args.target)
    tokenizer = load_tokenizer(folder if (folder / "tokenizer_config.json").is_file() else source.hf_dir)
    ids = token_ids(tokenizer, load_texts(args.perplexity), args.tokens)
    check_vocabulary(model, int(ids.max()) if ids.numel() else 0, str(tokenizer.name_or_path))
    result = perplexity(model, ids, args.window, args.stride, progress="auto")
    result["text"] = args.perplexity
    return _emit(args, result, f"perplexity {result['perplexity']:.3f} on {result['tokens']} tokens of "
                               f"{args.perplexity} ({result['windows']} windows of {result['window']}, stride "
                               f"{result['stride']})")


def _emit(args: argparse.Namespace, result: dict, line: str) -> int:
    """Print the result as JSON (--json) or as one line."""
    if args.json:
        print_json(result)
    else:
        print(line)
    return 0
