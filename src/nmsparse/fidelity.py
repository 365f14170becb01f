"""Model-level fidelity of a pruned model against its dense original."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["mean_pool", "sentence_embeddings", "embedding_fidelity"]


def mean_pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` mean of ``hidden[B, T, D]`` over the tokens that ``weights[B, T, 1]`` marks as real."""
    weights = weights.to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised last hidden states ``[N, D]`` (sentence-transformers' pooling)."""
    model.eval()
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state  # [B, T, D]
        out.append(F.normalize(mean_pool(hidden, batch["attention_mask"].unsqueeze(-1)).float(), dim=-1))
    return torch.cat(out)


def embedding_fidelity(dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, Any]:
    """Mean/min cosine between matching embeddings, and nearest-neighbour agreement.

    Nearest-neighbour agreement: for each sentence, whether its most similar *other* sentence is
    the same under the dense and the sparse embeddings.
    """
    cosine = (F.normalize(dense, dim=-1) * F.normalize(sparse, dim=-1)).sum(-1)

    def neighbours(emb: torch.Tensor) -> torch.Tensor:
        sim = emb @ emb.t()
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    agree = (neighbours(dense) == neighbours(sparse)).float().mean()
    return {"mean_cosine": round(float(cosine.mean()), 4), "min_cosine": round(float(cosine.min()), 4),
            "nn_agreement": round(float(agree), 4), "sentences": int(dense.shape[0])}
