"""Scale tuning's ablation on SmolLM2-135M 2:4: from one set of ``--method best`` masks, what each budget,
learning rate and set of free numbers gives on text of another source.

    python benchmarks/scale_tuning.py --out DIR [--minutes 4] [--lrs 1e-3,3e-3,1e-2] [--norms-only]
        [--samples 256] [--seed 0]

Prunes once (``best`` without its tuning: ``tune_minutes=0``), keeps the pruned state, then for each
learning rate restores it and runs either ``tune_scales`` (norms + per-channel scales, what ``--tune-minutes``
runs) or, with ``--norms-only``, the same distillation loop (``nmsparse.oneshot.recover.distil``) on the
norms' gains alone. Writes ``DIR/scale_tuning.json`` and ``.md``: perplexity of ``text:other`` (dense, the
masks alone, each variant) with the steps each got.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def _norms_only(model, teacher, batches, seconds: float, lr: float) -> dict:
    from nmsparse.oneshot.recover import distil, resolve_objective
    from nmsparse.oneshot.tune import tunable_norms

    objective = resolve_objective(model, batches, "auto", None, seconds, "cosine")
    for p in model.parameters():
        p.requires_grad_(False)
    params = [m.weight for m in tunable_norms(model)]
    for p in params:
        p.requires_grad_(True)
    stats = distil(model, teacher, params, batches, objective, None, seconds, lr, progress="lines")
    for p in model.parameters():
        p.requires_grad_(True)
    return {**stats, "params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--norms-only", action="store_true")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nmsparse.oneshot import PruneConfig, prune
    from nmsparse.oneshot.fidelity import FidelityCheck
    from nmsparse.oneshot.pipeline import open_source
    from nmsparse.oneshot.tune import tune_scales

    config = PruneConfig("2:4", "best", samples=args.samples, seed=args.seed, heldout="text:other",
                         tune_steps=None, tune_minutes=args.minutes)
    prepared = open_source("gguf:smollm2", config)  # builds the tuning's windows too
    model, data = prepared.model, prepared.data
    teacher = copy.deepcopy(model)
    check = FidelityCheck(teacher, data["heldout"])
    start = time.perf_counter()
    result = prune(model, PruneConfig("2:4", "best", tune_minutes=0), calibration=data["calibration"],
                   progress="lines")
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"variant": "dense", **check.dense()},
            {"variant": f"{result.method} (masks alone)", "prune_seconds": round(time.perf_counter() - start, 1),
             **check(model)}]
    for lr in (float(x) for x in args.lrs.split(",")):
        model.load_state_dict(pruned)
        batches = data["tune"].batches
        if args.norms_only:
            stats = _norms_only(model, teacher, batches, args.minutes * 60, lr)
        else:
            stats = tune_scales(model, teacher, result.layers, batches, max_seconds=args.minutes * 60, lr=lr,
                                progress="lines")
        rows.append({"variant": ("norms" if args.norms_only else "norms + channel scales") + f", lr {lr:g}, "
                     f"{args.minutes:g} min", "steps": stats["steps"], "params": stats["params"], **check(model)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_tuning.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| variant | steps | numbers trained | perplexity (text:other) | vs dense |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r.get('steps', '')} | {r.get('params', '')} | {r['perplexity']:.2f} | "
              f"{r.get('ratio_to_dense', 1.0):.2f}x |" for r in rows]
    (out / "scale_tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
