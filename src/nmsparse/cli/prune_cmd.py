"""``nmsparse prune MODEL --pattern 2:4 --out DIR``: one-shot pruning to an export."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..env import PRECISIONS
from ..select import LAYER_SETS, Rule, Selection
from .display import print_json, print_table
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
        keep_grouped_conv=not args.include_grouped_conv,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm:NAME, torchvision:NAME, hf:PATH (or hf:minilm), gguf:FILE, or an export "
                        "directory")
    add_selection_arguments(parser)
    parser.add_argument(
        "--method",
        default="magnitude",
        help="magnitude, wanda, ria, sparsegpt, or best (the most accurate pipeline measured for the model kind: "
        "for causal LMs sparsegpt + decoder permutation + sequential calibration on 256 windows of text:mixed "
        "unless --calib / --samples say otherwise, then 6 minutes of scale tuning unless --tune-minutes says "
        "otherwise; for encoders sparsegpt on text:mixed, then 3 minutes of scale tuning; sparsegpt otherwise)",
    )
    parser.add_argument("--calib", help="calibration data: text:builtin, text:varied (the built-in text plus "
                        "standard-library docstrings), text:broad (text:varied plus the docstrings of numpy, torch, "
                        "sympy and networkx), text:wiki (gensim's Wikipedia sample), text:news (gensim's news "
                        "stories), text:mixed (broad, wiki and news), text:PATH, hf-dataset:NAME[:CONFIG[:SPLIT]], "
                        "images:DIR, digits, mnist5k (default for wanda/sparsegpt: text:builtin for hf: models, "
                        "digits for vision models); recovery trains on the same text unless --recover-data names "
                        "another")
    parser.add_argument("--samples", type=int, help="calibration samples (default 128; --method best on causal "
                        "LMs: 256)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per text calibration sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    parser.add_argument("--recover-steps", type=int, help="distil from the dense model for N steps, masks fixed")
    parser.add_argument("--recover-minutes", type=float, help="time budget of the recovery")
    parser.add_argument("--recover-lr", type=float, default=2e-4, help="AdamW learning rate of the recovery")
    parser.add_argument("--recover-objective", choices=["auto", "hidden", "pooled", "layers", "causal"], default="auto",
                        help="hidden: MSE of output hidden states/logits; pooled: cosine of mean-pooled outputs; "
                             "layers: pooled plus every layer's hidden states (Hugging Face models); causal: KL of "
                             "next-token distributions plus every layer's hidden states (causal LMs); "
                             "auto: causal for causal LMs, layers for other text models, hidden otherwise")
    parser.add_argument("--recover-precision", choices=PRECISIONS, default="auto",
                        help="matmul precision of the recovery: bf16 (autocast; weights and optimizer state stay "
                             "float32), fp32, or auto: bf16 where the CPU/GPU multiplies it natively")
    parser.add_argument("--recover-data", help="the data recovery and scale tuning train on, any --calib spec "
                        "(default: the calibration data; e.g. --calib text:broad --recover-data text:wiki)")
    parser.add_argument("--tune-minutes", type=float,
                        help="after pruning, fit the norms, the pruned layers' biases and one scale per input and "
                             "output channel of each pruned layer to the dense model for this many minutes (weights "
                             "and masks held; the scales are folded into the weights, so the export is an ordinary "
                             "model with the same masks); 0 turns off --method best's 6 minutes")
    parser.add_argument("--tune-steps", type=int, help="step budget of the scale tuning (instead of or with minutes)")
    parser.add_argument("--tune-lr", type=float, default=3e-3, help="AdamW learning rate of the scale tuning")
    parser.add_argument("--heldout", help="held-out data of the fidelity measure: text:heldout (default for causal "
                        "LMs: built-in text calibration never sees), text:other (text of another source: the "
                        "dataset descriptions shipped with scikit-learn), text:PATH, or an image spec for vision "
                        "models")
    parser.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens for perplexity (causal LMs)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window in tokens (causal LMs)")
    parser.add_argument("--permute", action="store_true",
                        help="search input-channel permutations that raise the kept magnitude and fold them into "
                             "the producing layers first (function unchanged)")
    parser.add_argument("--permute-sweeps", type=int, default=100, help="cap on the swap sweeps of the permutation "
                        "search (it stops at the first sweep that gains nothing)")
    parser.add_argument("--refine", action="store_true",
                        help="after the method, swap kept and pruned weights inside each group where that lowers the "
                             "layer's output error on the calibration data (n:m and 1xN Linear layers; sparsegpt "
                             "re-solves its kept weights; a layer keeps whichever error is lower)")
    parser.add_argument("--sequential", action="store_true",
                        help="inside each block, calibrate the layers group by group in the order the block calls "
                             "them (q/k/v, o, gate/up, down), each group on inputs through the groups already "
                             "pruned and quantized (GPTQ's true-sequential order)")
    parser.add_argument("--asymmetric", action="store_true",
                        help="prune each layer toward the weight that gives, on the pruned model's inputs, what the "
                             "dense layer gives on the dense model's: each layer also undoes the drift of the layers "
                             "before it (a weight update; an unpruned copy of each block runs beside it)")
    parser.add_argument("--stream", action="store_true", help="causal LMs larger than memory: load, prune and write "
                        "one decoder block at a time from the safetensors shards (hf:DIR or gguf:FILE)")
    parser.add_argument("--checkpoint", help="local weights to load first (.safetensors or torch file)")
    parser.add_argument("--num-classes", type=int, help="classifier outputs of a vision model")
    parser.add_argument("--in-chans", type=int, help="input channels of a vision model")
    parser.add_argument("--out", required=True, help="export directory to write (replaced atomically)")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "int8", "int4"],
                        help="prune and quantize in one pass: the export's Linear weights on the runtime's int8/int4 "
                        "grid (sparsegpt rounds inside its updates; the others round to nearest)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="with --weights: kept values per scale along the input axis (multiple of 16, 16-512)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def config_from_args(args: argparse.Namespace):
    """The :class:`~nmsparse.oneshot.config.PruneConfig` of the flags (its errors name the flag)."""
    from ..oneshot.config import ConfigError, PruneConfig

    try:
        return PruneConfig(
            pattern=args.pattern, method=args.method, selection=selection_from_args(args), calib=args.calib,
            samples=args.samples, seq_len=args.seq_len, seed=args.seed,
            permute_sweeps=args.permute_sweeps if args.permute else None, refine=args.refine,
            sequential=args.sequential, asymmetric=args.asymmetric,
            recover_steps=args.recover_steps, recover_minutes=args.recover_minutes, recover_lr=args.recover_lr,
            recover_objective=args.recover_objective, recover_precision=args.recover_precision,
            recover_data=args.recover_data,
            tune_steps=args.tune_steps, tune_minutes=args.tune_minutes, tune_lr=args.tune_lr,
            heldout=args.heldout, heldout_tokens=args.heldout_tokens,
            window=args.window, weights=args.weights, group_size=args.group_size, stream=args.stream,
            checkpoint=args.checkpoint, num_classes=args.num_classes, in_chans=args.in_chans)
    except ConfigError as exc:
        raise CliError(_as_flags(str(exc))) from None


def _as_flags(text: str) -> str:
    """A config error's field names as the flags that set them."""
    text = re.sub(r"^([a-z_]+) must", lambda m: f"--{m.group(1).replace('_', '-')} must", text)
    text = re.sub(r"\bgroup size\b", "--group-size", text)
    text = re.sub(r"\b(?:recover|tune)_(?:data|minutes|steps)\b", lambda m: "--" + m.group(0).replace("_", "-"), text)
    return re.sub(r"\b(stream|refine|method best|permute|checkpoint)\b", r"--\1", text)


def run(args: argparse.Namespace) -> int:
    from ..oneshot import CalibrationError, prune
    from ..oneshot.config import ConfigError

    register_user_error(CalibrationError)
    config = config_from_args(args)
    try:
        result = prune(args.model, config, out=args.out)
    except ConfigError as exc:  # a combination only the model's kind shows (e.g. --recover-data with best)
        raise CliError(_as_flags(str(exc))) from None
    if args.json:
        print_json(result.as_dict())
        return 0
    if args.stream:
        print(f"{len(result.sparse_rows)} sparse layers written block by block to {args.out}; all verified: "
              f"{all(r.verified for r in result.sparse_rows)}. Perplexity: nmsparse eval {args.out} --perplexity "
              "text:heldout")
        return 0
    table = [(r.fqn, list(r.shape), r.pattern, round(r.density, 4), r.verified, r.reconstruction_error, r.skip_reason)
             for r in result.rows]
    print_table(f"{args.model} pruned with {result.method}",
                ["layer", "shape", "pattern", "density", "verified", "recon. error", "skipped"], table)
    print(f"{len(result.sparse_rows)} sparse layers, {len(result.skipped)} kept dense; all verified: "
          f"{all(r.verified for r in result.sparse_rows)}; export reload max |diff| = {result.reload_max_abs_diff:.2e}")
    for key, value in (result.fidelity or {}).items():
        print(f"fidelity {key.replace('_', ' ')}: {value}")
    for name, run in (("scale tuning", result.tuning), ("recovery", result.recovery)):
        if run:
            print(f"{name}: {run['steps']} steps in {run['seconds']} s, loss {run['first_loss']:.4g} -> "
                  f"{run['last_loss']:.4g}")
    print(f"wrote {Path(args.out)} (weights, manifest.json, report.json, report.md, plots)")
    return 0
