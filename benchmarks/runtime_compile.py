"""A converted model under PyTorch's compiler and exporter: same outputs, and no slower than eager.

    python benchmarks/runtime_compile.py [--models resnet50,minilm] [--pattern 1x16:0.25] [--repeats 20]

For each model (random weights pruned by magnitude; timm resnet50 at 224x224, the real MiniLM on
16-token sequences), at batch 1: ``convert`` with layer choice, then the converted model eager,
``torch.compile(model, fullgraph=True)`` (inductor) and ``torch.export.export(model, ...).module()``,
timed in one interleaved harness (with the dense model exported too: the per-op overhead of an
exported program's module is export's own); max |difference| to the eager converted output. Writes
benchmarks/results/runtime_compile.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from nmsparse.bench import _model, machine_meta
from nmsparse.oneshot import PruneConfig, prune
from nmsparse.runtime import convert
from nmsparse.runtime.timing import summary, time_interleaved


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out["last_hidden_state"] if isinstance(out, dict) else out.last_hidden_state


def run(name: str, pattern: str, repeats: int) -> dict:
    model, inputs, selection = _model(name, 1)
    result = prune(model, PruneConfig(pattern, "magnitude", selection))
    sparse, report = convert(copy.deepcopy(model), {e["fqn"]: e["pattern"] for e in result.layers}, infer=False,
                             example_inputs=inputs)
    with torch.no_grad():
        eager = _call(sparse, inputs)
        t0 = time.perf_counter()
        compiled = torch.compile(sparse, fullgraph=True)
        out_compiled = _call(compiled, inputs)
        compile_s = time.perf_counter() - t0
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        t0 = time.perf_counter()
        exported = torch.export.export(sparse, args, kwargs).module()
        export_s = time.perf_counter() - t0
        out_exported = _call(exported, inputs)
        dense_exported = torch.export.export(model, args, kwargs).module()  # export's own overhead, for reference
        callers = [lambda i, m=m: _call(m, inputs) for m in (model, sparse, compiled, exported, dense_exported)]
        times = [summary(t) for t in time_interleaved(callers, warmup=2, repeats=repeats)]
    return {"model": name, "pattern": pattern, "batch": 1, "isa": report.isa,
            "converted_layers": sum(r.converted for r in report), "eligible_layers": len(result.layers),
            "max_abs_diff_compiled": float((out_compiled - eager).abs().max()),
            "max_abs_diff_exported": float((out_exported - eager).abs().max()),
            "compile_s": compile_s, "export_s": export_s,
            "dense": times[0], "eager": times[1], "compiled": times[2], "exported": times[3],
            "dense_exported": times[4]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,minilm")
    parser.add_argument("--pattern", default="1x16:0.25")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/runtime_compile")
    args = parser.parse_args()
    rows = [run(m.strip(), args.pattern, args.repeats) for m in args.models.split(",") if m.strip()]
    meta = machine_meta(torch.get_num_threads(), "converted model: eager vs torch.compile(fullgraph) vs torch.export")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"kernels {meta['isa']} ({meta['cpu']}), threads {meta['threads']}, float32, batch 1", "",
             "| model | pattern | layers sparse | dense ms | converted eager ms | compiled ms | exported ms "
             "| dense exported ms | max diff compiled / exported | compile s / export s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pattern']} | {r['converted_layers']}/{r['eligible_layers']} "
                     f"| {r['dense']['median_ms']:.2f} | {r['eager']['median_ms']:.2f} | {r['compiled']['median_ms']:.2f} "
                     f"| {r['exported']['median_ms']:.2f} | {r['dense_exported']['median_ms']:.2f} "
                     f"| {r['max_abs_diff_compiled']:.1e} / "
                     f"{r['max_abs_diff_exported']:.1e} | {r['compile_s']:.0f} / {r['export_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
