"""Peak memory of streamed one-shot pruning (one decoder block at a time) against the model's size.

    python benchmarks/llm_stream_memory.py --model gguf:smollm2 --method sparsegpt --samples 32 --seq-len 256

Prints one JSON line: the model's weight bytes (MB), the process's resident memory before pruning
(torch, transformers and the tokenised calibration data loaded), its peak during pruning (VmHWM,
reset at the baseline) and the difference. Run in a fresh process; Linux only (reads /proc/self).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024
    raise KeyError(key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gguf:smollm2")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", help="output directory (default: a temporary one)")
    args = parser.parse_args()

    import torch  # noqa: F401  (baseline includes the libraries)
    import transformers  # noqa: F401

    from nmsparse.models import ModelSource, gguf_to_hf, parse_model_spec, smollm2_gguf
    from nmsparse.oneshot.calibrate import release_freed_memory
    from nmsparse.oneshot.data import build_calibration
    from nmsparse.oneshot.stream import prune_streaming

    kind, name = parse_model_spec(args.model)
    directory = gguf_to_hf(smollm2_gguf() if name == "smollm2" else name) if kind == "gguf" else Path(name)
    model_mb = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20
    batches = build_calibration("text:builtin", None, ModelSource(f"hf:{directory}"), args.samples, args.seq_len)
    release_freed_memory()
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "streamed"
        result = prune_streaming(directory, out, args.pattern, args.method, batches, progress="none")
    peak = _status_mb("VmHWM")
    print(json.dumps({"model": args.model, "model_mb": round(model_mb, 1), "baseline_rss_mb": round(base, 1),
                      "peak_rss_mb": round(peak, 1), "extra_mb": round(peak - base, 1),
                      "sparse_layers": len(result.sparse_rows), "seconds": round(time.perf_counter() - start, 1),
                      "calibration": f"{args.samples} x {args.seq_len}"}))


if __name__ == "__main__":
    main()
