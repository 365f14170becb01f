"""Which training text carries a recovery furthest: from one pruned SmolLM2 export, the same recovery budget
on each data source, perplexity measured on text none of them is (``text:other`` by default).

    python benchmarks/recovery_data.py PRUNED_DIR --out DIR [--data text:broad,text:wiki+text:news,generated:512]
        [--minutes 15] [--lr 2e-4] [--heldout text:other]

PRUNED_DIR is an export of ``nmsparse prune gguf:smollm2 --pattern 2:4 ... --out PRUNED_DIR`` (its manifest names
the pruned layers, whose masks the recovery holds). Each data entry is a ``--calib`` spec, specs joined by ``+``
(their texts concatenated), or ``generated:N``: N windows of 128 tokens sampled from the dense model itself
(temperature 1 from its first token; the sampling time is reported beside the recovery's, not inside it). Every
entry restarts from PRUNED_DIR and trains for the same wall-clock budget (``nmsparse.oneshot.recover.recover``:
512 windows of 128 tokens in batches of 8, the CLI's recovery data for causal LMs). Writes ``DIR/recovery_data.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _generated(teacher, count: int, seq_len: int, seed: int) -> list[dict]:
    """``count`` windows the dense model samples from its first token (ids 0: ``<|endoftext|>`` for SmolLM2)."""
    torch.manual_seed(seed)
    rows = []
    with torch.no_grad():
        for start in range(0, count, 128):
            size = min(128, count - start)
            first = torch.zeros(size, 1, dtype=torch.long)
            rows.append(teacher.generate(first, attention_mask=torch.ones_like(first), do_sample=True, temperature=1.0,
                                         top_k=0, top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                         pad_token_id=0))
    ids = torch.cat(rows)
    return [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])} for i in range(0, len(ids), 8)]


def _batches(entry: str, teacher, tokenizer, seed: int) -> tuple[list[dict], float]:
    from nmsparse.oneshot.data import load_texts, token_windows

    start = time.perf_counter()
    if entry.startswith("generated:"):
        batches = _generated(teacher, int(entry.split(":", 1)[1]), 128, seed)
    else:
        text = "\n\n".join(load_texts(spec) for spec in entry.split("+"))
        batches = token_windows(tokenizer, text, 512, 128, seed=seed + 1, batch_size=8)
    return batches, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pruned")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="text:broad,text:wiki+text:news,generated:512")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--heldout", default="text:other")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nmsparse.export import open_model
    from nmsparse.oneshot.data import heldout_data, load_tokenizer
    from nmsparse.oneshot.fidelity import FidelityCheck
    from nmsparse.oneshot.recover import recover

    teacher, source = open_model("gguf:smollm2")
    teacher.eval()
    tokenizer = load_tokenizer(source.hf_dir)
    layers = json.loads((Path(args.pruned) / "manifest.json").read_text())["layers"]
    check = FidelityCheck(teacher, heldout_data(teacher, source, "causal_lm", args.heldout))
    dense = check.dense()["perplexity"]
    rows = []
    for entry in args.data.split(","):
        model, _ = open_model(args.pruned)
        model.eval()
        start = check(model)["perplexity"]
        batches, data_seconds = _batches(entry, teacher, tokenizer, args.seed)
        stats = recover(model, teacher, layers, batches, max_seconds=args.minutes * 60, lr=args.lr, progress="lines")
        after = check(model)["perplexity"]
        rows.append({"data": entry, "data_seconds": round(data_seconds, 1), "steps": stats["steps"],
                     "precision": stats["precision"], "start": start, "recovered": after,
                     "ratio_to_dense": round(after / dense, 4)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"pruned": args.pruned, "heldout": args.heldout, "dense": dense, "minutes": args.minutes, "lr": args.lr,
              "rows": rows}
    (out / "recovery_data.json").write_text(json.dumps(report, indent=1))
    lines = [f"Recovery of {args.pruned} for {args.minutes:g} min, lr {args.lr:g}; perplexity of {args.heldout} "
             f"(dense {dense:.2f})", "", "| data | steps | start | recovered | vs dense |", "|---|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['steps']} | {r['start']:.2f} | {r['recovered']:.2f} | {r['ratio_to_dense']:.2f}x |"
              for r in rows]
    (out / "recovery_data.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
