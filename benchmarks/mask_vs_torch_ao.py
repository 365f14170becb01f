"""Mask computation for every Linear weight of vit_base_patch16_224 at 2:4: nmsparse vs torch.ao.pruning.

    python benchmarks/mask_vs_torch_ao.py [--repeats 7]

torch.ao.pruning's WeightNormSparsifier (sparse_block_shape=(1, 4), zeros_per_block=2) is the
peer; its ``step()`` recomputes every mask. nmsparse's ``Sparsifier.update_masks()`` does the same
work (scores -> 2:4 masks written into the parametrizations). Both are timed in this process, on the
same model weights, with warm-up and repeats; medians and spreads are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

from nmsparse import Selection, Sparsifier
from nmsparse.mask import is_nm
from nmsparse.pattern import NMPattern


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/mask_vs_torch_ao.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    linears = [name for name, m in base.named_modules() if isinstance(m, nn.Linear)]
    params = sum(dict(base.named_modules())[n].weight.numel() for n in linears)

    ao_model = copy.deepcopy(base)
    ao = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    ao.prepare(ao_model, [{"tensor_fqn": f"{n}.weight"} for n in linears])
    ao_times = timed(ao.step, args.repeats)

    nm_model = copy.deepcopy(base)
    nm = Sparsifier("srste", "2:4", Selection(keep_classifier=False, rules=()))
    nm.prepare(nm_model)
    assert set(nm.layers) == set(linears), "both must mask the same layers"
    nm_times = timed(nm.update_masks, args.repeats)

    # the two masks agree wherever the 2:4 choice is unambiguous (no exact ties in random weights)
    ao_mods, nm_mods = dict(ao_model.named_modules()), nm.layers
    agree = sum(
        int(torch.equal(ao_mods[n].parametrizations.weight[0].mask.bool(), nm_mods[n].mask)) for n in linears
    )
    assert all(is_nm(nm_mods[n].dense_weight * nm_mods[n].mask, NMPattern(2, 4)) for n in linears)

    result = {
        "model": "vit_base_patch16_224",
        "linear_layers": len(linears),
        "parameters_masked": params,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "torch_ao_step_s": {"median": statistics.median(ao_times), "min": min(ao_times), "max": max(ao_times)},
        "nmsparse_update_masks_s": {"median": statistics.median(nm_times), "min": min(nm_times), "max": max(nm_times)},
        "speedup_median": statistics.median(ao_times) / statistics.median(nm_times),
        "layers_with_identical_masks": agree,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
