"""SR-STE 2:4 training-step time over dense, same harness, same process.

    python benchmarks/train_step_overhead.py [--repeats 10]

Cases (issue targets: <= 1.10x): timm resnet18 at batch 64, 32x32 inputs; deit_tiny_patch16_224 at
batch 16, 224x224. A step is forward + backward + SGD step (+ ``sparsifier.step`` for SR-STE, which
recomputes every 2:4 mask from the dense weights, as the paper does every iteration). Medians with
min/max over repeats after warm-up; the mask update is also timed on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

from nmsparse import Selection, Sparsifier

CASES = [
    {"model": "resnet18", "batch": 64, "size": 32, "layers": ("all",)},
    {"model": "deit_tiny_patch16_224", "batch": 16, "size": 224, "layers": ("ff", "attention")},
]


def time_steps(model_name, batch, size, layers, sparse, repeats, update_every):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    sparsifier = None
    if sparse:
        sparsifier = Sparsifier("srste", "2:4", Selection(layers=layers), method_options={"update_every_steps": update_every})
        sparsifier.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    times, mask_times = [], []
    for step in range(repeats + 3):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mark = time.perf_counter()
        if sparsifier is not None:
            sparsifier.step(step)
        end = time.perf_counter()
        if step >= 3:
            times.append(end - start)
            mask_times.append(end - mark)
    return times, mask_times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/train_step_overhead.json")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        dense, _ = time_steps(case["model"], case["batch"], case["size"], case["layers"], False, args.repeats, 1)
        for every in (1, 10):
            sparse, masks = time_steps(case["model"], case["batch"], case["size"], case["layers"], True, args.repeats, every)
            rows.append({
                **{k: v for k, v in case.items() if k != "layers"}, "layers": ",".join(case["layers"]),
                "mask_update_every_steps": every,
                "dense_step_ms": 1e3 * statistics.median(dense),
                "dense_min_max_ms": [1e3 * min(dense), 1e3 * max(dense)],
                "srste_step_ms": 1e3 * statistics.median(sparse),
                "srste_min_max_ms": [1e3 * min(sparse), 1e3 * max(sparse)],
                "mask_update_ms": 1e3 * statistics.median(masks),
                "ratio": statistics.median(sparse) / statistics.median(dense),
            })
            print(json.dumps(rows[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
