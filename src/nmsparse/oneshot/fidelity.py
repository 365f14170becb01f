"""Model-level fidelity of a pruned model against its dense original, chosen by what the model is.

* causal language models (a Hugging Face model with an LM head): **perplexity** of held-out text in
  sliding windows (:func:`perplexity`), and its ratio to the dense model's;
* encoders (other Hugging Face models): **sentence-embedding cosine** and nearest-neighbour agreement
  of mean-pooled embeddings of held-out sentences (:func:`embedding_fidelity`);
* everything else (classifiers, CNNs): **top-1 agreement** with the dense model and the relative
  error of the outputs on held-out inputs (:func:`output_fidelity`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import forward_output, no_cache
from ..progress import Progress

__all__ = ["model_kind", "mean_pool", "sentence_embeddings", "embedding_fidelity", "perplexity",
           "output_fidelity", "FidelityCheck"]



def model_kind(model: nn.Module) -> str:
    """``causal_lm`` (a Hugging Face model that generates: it has an LM head), ``encoder`` (another
    Hugging Face model) or ``classifier`` (anything else)."""
    if getattr(model, "config", None) is None or not hasattr(model, "get_output_embeddings"):
        return "classifier"
    head = model.get_output_embeddings()
    generates = getattr(model, "can_generate", None)
    if head is not None and (generates is None or generates()):
        return "causal_lm"
    return "encoder"


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


# The most memory one batch's logits may take (float32 [windows, window, vocab]): with SmolLM2's
# 49,152-token vocabulary four 512-token windows made 400 MB of logits and as much again for the
# log-softmax and its reshaped slice, and evaluating the 538 MB model peaked at 2.7 GB.
LOGITS_BUDGET_BYTES = 128 * 1024**2


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int | None = None,
               batch_size: int = 4, progress: str = "none") -> dict[str, Any]:
    """Perplexity of a causal LM on a token sequence, in sliding windows.

    Each window of ``window`` tokens starts ``stride`` tokens after the previous one (default: the
    window, i.e. disjoint windows); only the tokens a window adds beyond the previous one are scored,
    each conditioned on up to ``window - 1`` tokens before it (the usual sliding-window evaluation).
    Windows of equal shape run in batches of up to ``batch_size``, fewer where their logits would
    exceed :data:`LOGITS_BUDGET_BYTES` (one window at least).

    Args:
        model: a causal LM called as ``model(input_ids=...)`` returning ``.logits``.
        ids: ``[N]`` or ``[1, N]`` token ids.

    Returns:
        ``{"perplexity", "nll", "tokens", "windows", "window", "stride"}``.
    """
    ids = ids.reshape(-1)
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window}, stride={stride}")
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    spans, prev_end = [], 0  # (begin, end, scored): score the last `scored` tokens of ids[begin:end]
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + window, ids.numel())
        scored = end - max(prev_end, begin + 1)
        if scored > 0:
            spans.append((begin, end, scored))
        prev_end = end
        if end == ids.numel():
            break
    was_training = model.training
    model.eval()
    extra = no_cache(model)
    nll, count = 0.0, 0
    groups: dict[tuple[int, int], list[int]] = {}
    for begin, end, scored in spans:
        groups.setdefault((end - begin, scored), []).append(begin)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None and hasattr(head, "weight") else \
        getattr(getattr(model, "config", None), "vocab_size", 1)
    bar = Progress(len(spans), 0, progress, every=1)
    done = 0
    for (length, scored), begins in groups.items():
        per_batch = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (4 * length * vocab)))
        for i in range(0, len(begins), per_batch):
            chunk = begins[i : i + per_batch]
            inputs = torch.stack([ids[b : b + length] for b in chunk])  # [B, length]
            logits = model(input_ids=inputs, **extra).logits  # [B, length, V]
            # position t predicts token t + 1: the scored targets are the last `scored` tokens
            pred = logits[:, length - scored - 1 : length - 1].float()
            target = inputs[:, length - scored :]
            nll += float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"))
            count += target.numel()
            done += len(chunk)
            bar.update(done, f"ppl {math.exp(nll / count):.3f}")
    bar.close()
    model.train(was_training)
    mean = nll / count
    return {"perplexity": round(math.exp(mean), 4), "nll": round(mean, 6), "tokens": count, "windows": len(spans),
            "window": window, "stride": stride}


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[Any]) -> torch.Tensor:
    model.eval()
    return torch.cat([forward_output(model, b).float() for b in batches])


def output_fidelity(dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement (argmax over the last dim) and relative error ``||y' - y|| / ||y||`` of outputs."""
    agree = (dense.argmax(-1) == sparse.argmax(-1)).float().mean()
    error = (sparse - dense).norm() / dense.norm().clamp_min(1e-12)
    return {"top1_agreement": round(float(agree), 4), "relative_error": round(float(error), 5),
            "samples": int(dense.shape[0])}


class FidelityCheck:
    """The fidelity measure of a model's kind, with the dense reference computed once.

    Args:
        model: the dense model (measured now, before pruning).
        data: held-out data of the kind's form -- causal LM: token ids ``[N]``; encoder: sentence
            batches (dicts with ``attention_mask``); classifier: input batches.
        window / stride: perplexity windows (causal LMs).
    """

    def __init__(self, model: nn.Module, data: Any, window: int = 512, stride: int | None = None) -> None:
        self.kind = model_kind(model)
        self.data, self.window, self.stride = data, window, stride
        if self.kind == "causal_lm":
            self.reference: Any = perplexity(model, data, window, stride)
        elif self.kind == "encoder":
            self.reference = sentence_embeddings(model, data)
        else:
            self.reference = _outputs(model, data)

    @property
    def measure(self) -> str:
        return {"causal_lm": "perplexity", "encoder": "embedding_cosine", "classifier": "output_agreement"}[self.kind]

    def dense(self) -> dict[str, Any]:
        """The dense model's own figure (perplexity; the other measures are relative to it)."""
        return dict(self.reference) if self.kind == "causal_lm" else {}

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        if self.kind == "causal_lm":
            result = perplexity(model, self.data, self.window, self.stride)
            result["ratio_to_dense"] = round(result["perplexity"] / self.reference["perplexity"], 4)
            return result
        if self.kind == "encoder":
            return embedding_fidelity(self.reference, sentence_embeddings(model, self.data))
        return output_fidelity(self.reference, _outputs(model, self.data))
