"""Kept magnitude gained by the 2:4 channel permutation search: 3 sweeps against running to convergence.

    python benchmarks/permutation_gain.py

Layers: timm resnet18 ``layer1.0.conv2`` (random init, seed 0) and the real all-MiniLM-L6-v2's
``encoder.layer.0.attention.self.query``; the figures to compare with NVIDIA apex's exhaustive
search are in docs/benchmarks.md.
"""

from __future__ import annotations

import timm
import torch

from nmsparse.models import build_model
from nmsparse.pattern import parse_pattern
from nmsparse.permute import MAX_SWEEPS, search_permutation


def main() -> None:
    pattern = parse_pattern("2:4")
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18")
    minilm, _ = build_model("hf:minilm")
    layers = {"resnet18 layer1.0.conv2": resnet.layer1[0].conv2.weight.detach(),
              "minilm encoder.layer.0.attention.self.query": minilm.encoder.layer[0].attention.self.query.weight.detach()}
    for name, weight in layers.items():
        for sweeps in (3, MAX_SWEEPS):
            result = search_permutation(weight, pattern, sweeps)
            print(f"{name}: max_sweeps {sweeps}: +{100 * (result.after / result.before - 1):.2f}% kept magnitude "
                  f"({result.sweeps} sweeps)")


if __name__ == "__main__":
    main()
