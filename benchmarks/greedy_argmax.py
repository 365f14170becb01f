"""The greedy loop's argmax: PyTorch's (its intra-op threads) against NumPy's on the calling thread.

    python benchmarks/greedy_argmax.py

A SmolLM2-shaped Llama (random weights, 2:4 by magnitude on every decoder projection) converted with
``weights="int8"`` (no layer choice), ``generate(prompt of 128, max_new_tokens=64)`` with each argmax,
alternated six times; prints the median tokens/s of each and whether both gave the same tokens.
docs/runtime.md and docs/benchmarks.md (session 14) have the figures.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nmsparse.runtime.decode as decode
from nmsparse.bench import machine_meta
from nmsparse.runtime import convert


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers" in name:
                w = module.weight.view(module.out_features, -1, 4)
                w.scatter_(-1, w.abs().argsort(-1)[..., :2], 0.0)
    model, _ = convert(model, weights="int8")
    prompt = torch.randint(0, config.vocab_size, (1, 128))
    ours = decode._argmax
    forms = {"torch.argmax": lambda logits: int(logits.reshape(-1).argmax()), "numpy (now)": ours}
    speed: dict[str, list[float]] = {name: [] for name in forms}
    tokens = {}
    try:
        for r in range(6):
            for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
                decode._argmax = forms[name]
                t0 = time.perf_counter()
                tokens[name] = model.generate(prompt, max_new_tokens=64, do_sample=False)
                speed[name].append(64 / (time.perf_counter() - t0))
    finally:
        decode._argmax = ours
    meta = machine_meta(torch.get_num_threads(), "")
    print(f"kernels {meta['isa']} ({meta['cpu']}), threads {meta['threads']}")
    print("  ".join(f"{name}: {statistics.median(v):.1f} tokens/s" for name, v in speed.items()),
          " same tokens:", all(torch.equal(t, tokens["numpy (now)"]) for t in tokens.values()))


if __name__ == "__main__":
    main()
