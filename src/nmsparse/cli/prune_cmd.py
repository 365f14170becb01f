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
from .errors import CliError, register_user_error


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
    parser.add_argument("--method", default="magnitude", help="magnitude, wanda or sparsegpt")
    parser.add_argument("--calib", help="calibration data: text:builtin, text:PATH, hf-dataset:NAME[:CONFIG[:SPLIT]], "
                        "images:DIR, digits, mnist5k (default for wanda/sparsegpt: text:builtin for hf: models, "
                        "digits for vision models)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per text calibration sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    parser.add_argument("--recover-steps", type=int, help="distil from the dense model for N steps, masks fixed")
    parser.add_argument("--recover-minutes", type=float, help="time budget of the recovery")
    parser.add_argument("--recover-lr", type=float, default=2e-4, help="AdamW learning rate of the recovery")
    parser.add_argument("--recover-objective", choices=["auto", "hidden", "pooled", "layers"], default="auto",
                        help="hidden: MSE of output hidden states/logits; pooled: cosine of mean-pooled outputs; "
                             "layers: pooled plus every layer's hidden states (Hugging Face models); "
                             "auto: layers for text models, hidden otherwise")
    parser.add_argument("--permute", action="store_true",
                        help="search input-channel permutations that raise the kept magnitude and fold them into "
                             "the producing layers first (function unchanged)")
    parser.add_argument("--permute-sweeps", type=int, default=100, help="cap on the swap sweeps of the permutation "
                        "search (it stops at the first sweep that gains nothing)")
    parser.add_argument("--checkpoint", help="local weights to load first (.safetensors or torch file)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs of a vision model")
    parser.add_argument("--in-chans", type=int, help="input channels of a vision model")
    parser.add_argument("--out", required=True, help="export directory to write (replaced atomically)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _fidelity_setup(source):
    """Held-out sentence batches for hf: text models (None for other models)."""
    if not source.source.startswith("hf:"):
        return None
    from ..calib_data import builtin_text, load_tokenizer, sentence_batches

    _, sentences = builtin_text()
    return sentence_batches(load_tokenizer(source.source[3:]), sentences)


def run(args: argparse.Namespace) -> int:
    from ..calib_data import CalibrationError, build_calibration
    from ..method import CalibratedMethod, build_method

    register_user_error(CalibrationError)
    selection = selection_from_args(args)
    model, source = build_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    model.eval()
    reference = copy.deepcopy(model)  # the dense original: reload check, fidelity, recovery teacher
    method = build_method(args.method)
    recovering = bool(args.recover_steps or args.recover_minutes)
    calibrated = isinstance(method, CalibratedMethod) or args.calib or recovering
    report: dict = {"model": args.model, "method": args.method, "pattern": args.pattern}
    if args.permute:
        from ..permute import permute_channels

        perms = permute_channels(model, args.pattern, selection, args.permute_sweeps,
                                 progress="none" if args.json else "auto")
        report["permutation"] = [p.as_dict() for p in perms]
    if calibrated:
        from ..calibrate import prune_calibrated

        spec = args.calib or ("text:builtin" if source.source.startswith("hf:") else "digits")
        batches = build_calibration(spec, model, source, args.samples, args.seq_len, args.seed)
        report["calibration"] = {"source": spec, "samples": args.samples, "seq_len": args.seq_len}
        result = prune_calibrated(model, batches, args.pattern, args.method, selection,
                                  progress="none" if args.json else "auto")
        rows, layers, skipped = result.report, result.layers, result.skipped
    else:
        plain = prune(model, args.pattern, args.method, selection)
        rows = [dict(r.as_dict(), reconstruction_error=None) for r in plain.report]
        layers, skipped = plain.layers, plain.skipped
    if not layers:
        raise CliError(f"no layer of {args.model} was selected for pattern {args.pattern}; check --layers/--rule")
    report["layers"] = rows
    sentences = _fidelity_setup(source)
    if sentences is not None:
        from ..fidelity import embedding_fidelity, sentence_embeddings

        dense_emb = sentence_embeddings(reference, sentences)
        report["fidelity_one_shot"] = embedding_fidelity(dense_emb, sentence_embeddings(model, sentences))
    if recovering:
        from ..recover import recover

        train_batches = batches
        if source.source.startswith("hf:"):  # whole sentences of the calibration text, batched by length
            from ..calib_data import load_texts, load_tokenizer, sentence_training_batches

            train_batches = sentence_training_batches(load_tokenizer(source.source[3:]), load_texts(spec),
                                                      max_length=args.seq_len, seed=args.seed + 1)
        report["recovery"] = recover(model, reference, layers, train_batches, args.recover_steps,
                                     args.recover_minutes * 60 if args.recover_minutes else None, args.recover_lr,
                                     objective=args.recover_objective, progress="none" if args.json else "auto")
        if sentences is not None:
            report["fidelity_recovered"] = embedding_fidelity(dense_emb, sentence_embeddings(model, sentences))
    out = save_export(model, args.out, layers, source.as_dict(), skipped, extra={"method": args.method},
                      files={"report.json": json.dumps(report, indent=2) + "\n"})
    # Verify the round trip: reload the export and compare with the pruned model in memory.
    reloaded, _ = load_export(out, copy.deepcopy(reference))
    inputs = example_input(model, source)
    with torch.no_grad():
        max_diff = float((forward_output(model, inputs) - forward_output(reloaded, inputs)).abs().max())
    if args.json:
        print(json.dumps({"export": str(out), **report, "reload_max_abs_diff": max_diff}, indent=2))
        return 0
    table = [(r["fqn"], r["shape"], r["pattern"], r["density"], r["verified"], r.get("reconstruction_error"),
              r["skip_reason"]) for r in rows]
    print_table(f"{args.model} pruned with {args.method}",
                ["layer", "shape", "pattern", "density", "verified", "recon. error", "skipped"], table)
    sparse = [r for r in rows if r["skip_reason"] is None]
    print(f"{len(sparse)} sparse layers, {len(skipped)} kept dense; all verified: "
          f"{all(r['verified'] for r in sparse)}; export reload max |diff| = {max_diff:.2e}")
    for key in ("fidelity_one_shot", "fidelity_recovered"):
        if key in report:
            print(f"{key.replace('_', ' ')}: {report[key]}")
    print(f"wrote {Path(out) / 'model.safetensors'}, manifest.json and report.json")
    return 0
