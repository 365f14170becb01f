"""Building blocks of a training run: model, optimizer, EMA, evaluation."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..allocate import ERKAllocator, load_scheme
from ..config.sections import Config
from ..env import autocast
from ..models import ModelSource, build_model, load_weights
from ..select import Rule, Selection
from ..sparsifier import Sparsifier
from .data import DataBundle
from .plan import options_in_steps

__all__ = [
    "build_run_model",
    "build_sparsifier",
    "forward_logits",
    "task_loss",
    "build_optimizer",
    "Ema",
    "evaluate",
    "eval_loader",
    "autocast",
]


def build_run_model(config: Config, bundle: DataBundle) -> tuple[nn.Module, ModelSource]:
    mc = config.model
    model, source = build_model(
        mc.name, num_classes=mc.num_classes or bundle.num_classes, in_chans=mc.in_chans or bundle.in_chans,
        pretrained=mc.pretrained, options=mc.options,
    )
    if mc.checkpoint:
        load_weights(model, mc.checkpoint)
    if mc.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError("model.gradient_checkpointing needs a Hugging Face model")
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model, source


def build_sparsifier(config: Config, steps_per_epoch: int) -> Sparsifier | None:
    """The run's Sparsifier from ``config.sparsity`` (None when sparsity is off); method options given
    in epochs become steps here (:func:`nmsparse.train.plan.options_in_steps`)."""
    sp = config.sparsity
    if not sp.enabled:
        return None
    selection = Selection(
        layers=tuple(sp.layers), rules=tuple(Rule(r.match, r.pattern, r.skip, r.slices) for r in sp.rules),
        keep_first_conv=sp.keep_first_conv, keep_classifier=sp.keep_classifier, keep_grouped_conv=sp.keep_grouped_conv,
    )
    allocation: Any = dict(sp.allocation or {})
    if sp.allocation_file:
        allocation.update(load_scheme(sp.allocation_file))
    if sp.allocate.kind == "erk":
        al = sp.allocate
        allocation = ERKAllocator(al.sparsity, al.m, tuple(al.candidates) or None, al.power_scale)
    options = options_in_steps(dict(sp.options or {}), steps_per_epoch)
    if sp.method == "block_1xn":
        options.setdefault("update_every_steps", steps_per_epoch)  # SUBP re-draws masks once per epoch
    return Sparsifier(sp.method, sp.pattern, selection, allocation or None, options)


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; biases and normalisation parameters (1-d) get no weight decay."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    oc = config.optim
    groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov)
    return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas))  # type: ignore[arg-type]


class Ema:
    r"""Exponential moving average of a model's parameters: :math:`\bar\theta \leftarrow d\bar\theta + (1-d)\theta`.

    Buffers (BN statistics and the sparsity masks, which are buffers of the parametrizations) are
    copied, so the EMA model always uses the current masks.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {name: t.detach().clone() for name, t in self.model.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world: int, workers: int) -> DataLoader:
    """Each rank evaluates an unpadded shard (rank::world); sums are all-reduced by the caller."""
    shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)


def forward_logits(model: nn.Module, inputs: torch.Tensor, task: str = "classifier") -> torch.Tensor:
    """The model's logits: ``model(images)`` for classifiers, ``model(input_ids=...).logits`` for causal LMs."""
    if task == "causal_lm":
        return model(input_ids=inputs, use_cache=False).logits
    return model(inputs)


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str, criterion=None) -> torch.Tensor:
    """The training loss: ``criterion`` for classifiers; next-token cross-entropy for causal LMs
    (position t predicts token t + 1 of ``targets``)."""
    if task == "causal_lm":
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())
    return criterion(logits, targets)



@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             channels_last: bool = False, task: str = "classifier") -> dict[str, float]:
    """Sums over this rank's shard: loss, top-1 and top-5 correct counts, count (samples, or predicted
    tokens for causal LMs, whose top-k is next-token accuracy and whose mean loss is log-perplexity)."""
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = forward_logits(model, images, task)
        logits = logits.float()
        if task == "causal_lm":
            logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels.unsqueeze(1)
        top1 += float(hits[:, 0].sum())
        top5 += float(hits.any(dim=1).sum())
        count += labels.numel()
    model.train(was_training)
    return {"loss_sum": loss_sum, "top1": top1, "top5": top5, "count": count}


def finalize_eval(sums: list[float], task: str = "classifier") -> dict[str, float]:
    """Means of :func:`evaluate`'s sums (``[loss_sum, top1, top5, count]``, gathered over ranks): loss,
    top-1 and top-5 in percent; for a causal LM also ``perplexity``, ``exp`` of the mean next-token loss
    over the disjoint held-out windows."""
    loss_sum, top1, top5, count = sums
    count = max(count, 1.0)
    result = {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
    if task == "causal_lm":
        result["perplexity"] = round(math.exp(result["loss"]), 4)
    return result

