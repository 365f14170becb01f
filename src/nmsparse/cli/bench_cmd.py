"""``nmsparse bench``: dense PyTorch vs the sparse runtime, timed in one process and harness."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .errors import CliError

DEFAULT_PATTERNS = {"layers": "1x16:0.25,1x16:0.5,2:4", "models": "1x16:0.25,2:4"}
DEFAULT_BATCHES = {"layers": "1,8,64", "models": "1,32"}
DEFAULT_MODELS = "resnet50,vit_small_patch16_224,minilm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=["layers", "models"], default="layers",
                        help="layers: single layers of real models; models: whole models end to end")
    parser.add_argument("--pattern", help="comma-separated patterns (default: layers "
                        f"{DEFAULT_PATTERNS['layers']}; models {DEFAULT_PATTERNS['models']})")
    parser.add_argument("--batch", help="comma-separated batch sizes (rows, images or sequences; default: layers "
                        f"{DEFAULT_BATCHES['layers']}, models {DEFAULT_BATCHES['models']})")
    parser.add_argument("--no-layer-choice", action="store_true",
                        help="models: run every eligible layer sparse (default: each layer measured at its real "
                        "input and kept dense where sparse was slower)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated models of the model suite "
                        "(timm names, minilm; causal LMs smollm2, hf:DIR or gguf:FILE run the decoding benchmark)")
    parser.add_argument("--case", action="append", default=[], help="only layer cases whose name contains this")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case")
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="causal LMs: prompt length of the decode benchmark"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="causal LMs: greedy tokens generated")
    parser.add_argument("--weights", default="fp32,int8,int4",
                        help="causal LMs: comma-separated weight storage of the converted model (fp32, int8, int4)")
    parser.add_argument("--group-size", type=int, default=64, help="causal LMs: quantized rows' values per scale "
                        "(a multiple of 16, 16-512)")
    parser.add_argument("--llamacpp", help="causal LMs: the llamacpp.sh tool that builds llama-bench and converts "
                        "the model to GGUF (default: $NMSPARSE_LLAMACPP or llamacpp.sh on PATH; absent: those rows "
                        "are skipped)")
    parser.add_argument("--out", default="bench", help="directory for bench_<suite>.{json,md,png}")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout "
                        "(progress on stderr)")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CliError(f"--{what} needs positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from ..bench import layer_cases, machine_meta, run_layer_suite, run_model_suite, write_report
    from ..pattern import parse_pattern

    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    patterns = [p.strip() for p in (args.pattern or DEFAULT_PATTERNS[args.suite]).split(",") if p.strip()]
    for p in patterns:
        parse_pattern(p)  # PatternError is a one-line user error
    if args.repeats < 2:
        raise CliError("--repeats must be >= 2 (the report gives a median and a spread)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # checked before minutes of timing, not after
        raise CliError(f"--out {out} is a file; give a directory for bench_{args.suite}.json/.md/.png")
    threads = torch.get_num_threads()
    decode_rows = None  # the decoding benchmark's rows, when causal LMs ran beside other models
    if args.suite == "layers":
        cases = [c for c in layer_cases() if not args.case or any(k in c.name for k in args.case)]
        if not cases:
            raise CliError(f"no layer case matches {args.case}; cases: {', '.join(c.name for c in layer_cases())}")
        rows = run_layer_suite(patterns, _ints(args.batch or DEFAULT_BATCHES["layers"], "batch"), args.repeats,
                               cases=cases)
        note = "batch <= 8 cases rotate weight copies beyond the last-level cache"
    else:
        from ..bench_decode import decode_model_spec, run_decode_suite, write_decode_report

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        choose = not args.no_layer_choice
        llms = [m for m in models if decode_model_spec(m)]
        models = [m for m in models if not decode_model_spec(m)]
        if llms:
            from ..bench_decode import find_llamacpp
            from ..runtime.quant import WEIGHT_CHOICES, QuantError, parse_weights

            if args.prompt_tokens < 1 or args.new_tokens < 2:
                raise CliError("--prompt-tokens must be >= 1 and --new-tokens >= 2")
            weights = [w.strip() for w in args.weights.split(",") if w.strip()]
            if not weights or any(w not in WEIGHT_CHOICES for w in weights):
                raise CliError(
                    f"--weights takes a comma-separated list of {', '.join(WEIGHT_CHOICES)}; got {args.weights!r}"
                )
            try:
                parse_weights("int8", args.group_size)
            except QuantError as exc:
                raise CliError(f"--group-size: {exc}") from None
            tool, why = find_llamacpp(args.llamacpp)
            if args.llamacpp and tool is None:
                raise CliError(f"--llamacpp {args.llamacpp} does not exist; give the path of llamacpp.sh")
            if why:
                print(why)
            rows = run_decode_suite(llms, patterns, args.prompt_tokens, args.new_tokens, max(2, args.repeats // 3),
                                    choose, weights=tuple(weights), llamacpp=tool, threads=threads,
                                    group_size=args.group_size)
            note = ("greedy generation, batch 1, KV cache on, decoder Linears pruned by magnitude; "
                    + ("layer choice at the decode step's input" if choose else "every eligible layer sparse")
                    + ("; " + why if why else "; llama.cpp: llama-bench of the same model's GGUF, same threads"))
            meta = machine_meta(threads, note)
            paths = write_decode_report(rows, args.out, meta)
            if not models:
                return _show(args, paths, {"meta": meta, "rows": rows})
            decode_rows = rows
        rows = run_model_suite(
            patterns,
            models,
            args.repeats,
            batches=tuple(_ints(args.batch or DEFAULT_BATCHES["models"], "batch")),
            choose=choose,
        )
        note = ("whole models, random weights pruned by magnitude; "
                + ("layer choice on (each layer timed dense vs sparse at its input, the faster kept)" if choose
                   else "every eligible layer sparse"))
    meta = machine_meta(threads, note)
    paths = write_report(rows, args.out, args.suite, meta)
    document = {"meta": meta, "rows": rows}
    if decode_rows:
        document["decode_rows"] = decode_rows
    return _show(args, paths, document)


def _show(args: argparse.Namespace, paths: dict, document: dict) -> int:
    """The results: the JSON document on stdout (--json), else the Markdown table; and the files written."""
    if args.json:
        from .display import print_json

        print_json(document)
    else:
        print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
