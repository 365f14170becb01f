"""The reference training loop: short and visible (minGPT's trainer is the model).

Per optimizer step: seed the step, forward (+ the method's penalty), backward, clip, optimizer
step, ``sparsifier.step(step)``, EMA update, log, checkpoint when due. Evaluation after each epoch;
best/last checkpoints; at the end, squash, export and verify the patterns, then plots.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..allocate import save_scheme
from ..config.load import dump_config
from ..config.sections import Config
from ..export import load_export, save_export
from ..oneshot.recover import kl_logits
from ..progress import Progress
from ..schema import to_dict
from ..sparsifier import Sparsifier
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import EpochSampler, SeededDataset, build_data
from .distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_masks,
    setup_distributed,
    teardown_distributed,
    wait_for_all,
)
from .logs import RunLog, plot_curves, plot_density
from .plan import lr_schedule, make_plan
from .setup import (
    Ema,
    autocast,
    build_optimizer,
    build_run_model,
    build_sparsifier,
    eval_loader,
    evaluate,
    finalize_eval,
    forward_logits,
    task_loss,
)

__all__ = ["TrainingDiverged", "run_training", "new_run_dir"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunProgress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = float("-inf")
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0


def new_run_dir(config: Config) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``... when taken (earlier runs are never overwritten)."""
    base = Path(config.run.out_dir) / config.run.name
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _seed_step(seed: int, step: int) -> None:
    """Dropout, drop-path and mixup randomness are a pure function of (seed, step): resumable."""
    value = (seed * 1_000_003 + step) % (2**31)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def _criterion(config: Config, num_classes: int):
    aug = config.data.augment
    if aug.mixup > 0 or aug.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=aug.label_smoothing)


def run_training(config: Config, run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train according to ``config``; returns the run summary (also written to summary.json).

    Args:
        config: the resolved config.
        run_dir: run directory (default :func:`new_run_dir`); with ``resume`` the one to continue.
        resume: continue from ``run_dir/checkpoints/last.pt``.
    """
    dist_info = setup_distributed(config.run.device, config.distributed.backend)
    try:
        result = _train(config, run_dir, resume, dist_info)
        wait_for_all()
        return result
    finally:
        teardown_distributed()


def _run_directory(config: Config, run_dir: Path | None, dist_info: DistInfo) -> Path:
    """The run directory (every rank agrees on rank 0's), with config.yaml and env.json written by rank 0."""
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    if dist_info.enabled:
        import torch.distributed as dist

        holder = [str(run_dir)]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    if dist_info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
        from ..env import environment

        (run_dir / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")
    return run_dir


def _permute(model: nn.Module, sparsifier: Sparsifier, run_dir: Path, resume: bool, main: bool) -> None:
    """``sparsity.permute``: search and fold the channel permutations (their report in permutation.json),
    or on resume re-attach the input index maps (folded ones live in the checkpoint's weights)."""
    from ..parametrize import attach_input_map, input_map
    from ..permute import permute_channels

    maps_file = run_dir / "input_maps.json"
    if resume:
        maps = json.loads(maps_file.read_text()) if maps_file.exists() else {}
        for fqn, perm in maps.items():
            attach_input_map(model.get_submodule(fqn), perm)
        return
    rows = permute_channels(model, sparsifier.pattern, sparsifier.selection)
    maps = {r.fqn: input_map(model.get_submodule(r.fqn)) for r in rows if r.input_map}
    if main:
        (run_dir / "permutation.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
        maps_file.write_text(json.dumps(maps) + "\n")


@dataclass
class _Run:
    """One training run's parts, built once by :func:`_train`; ``step`` and ``end_epoch`` advance it."""

    config: Config
    run_dir: Path
    dist_info: DistInfo
    bundle: Any
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: Sparsifier | None
    ema: Ema | None
    mixup: Any
    criterion: Any
    plan: Any
    lr_at: Any
    log: RunLog
    progress: RunProgress
    t_start: float
    teacher: nn.Module | None = None  # the dense starting model, with train.distill > 0

    def checkpoint(self, name: str = "last.pt") -> None:
        if not self.dist_info.is_main:
            return
        save_checkpoint(self.run_dir / "checkpoints" / name, {
            "config": to_dict(self.config),
            "steps_per_epoch": self.plan.steps_per_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sparsifier": self.sparsifier.state_dict() if self.sparsifier is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "progress": self.progress.__dict__.copy(),
            "history": self.log.history(),
            "rng": rng_state(),
        })

    def resume(self) -> None:
        ckpt = load_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(ckpt["sparsifier"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.progress = RunProgress(**ckpt["progress"])
        self.log.load_history(ckpt["history"])
        set_rng_state(ckpt["rng"])

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[float, float]:
        """One optimizer step on a batch (images or token ids; labels or next tokens): ``(loss, lr)``."""
        config, device, step, task = self.config, self.dist_info.device, self.progress.step, self.bundle.task
        _seed_step(config.run.seed, step)
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if config.model.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = labels
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, labels)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, config.train.precision):
            logits = forward_logits(self.train_model, inputs, task)
            weight = config.train.distill if self.teacher is not None else 0.0
            loss = task_loss(logits, targets, task, self.criterion) if weight < 1.0 else 0.0
            if weight > 0.0:
                with torch.no_grad():
                    teacher_logits = forward_logits(self.teacher, inputs, task)
                loss = (1.0 - weight) * loss + weight * kl_logits(logits, teacher_logits)
            if self.sparsifier is not None:
                loss = loss + self.sparsifier.penalty().to(loss.device)
        loss_value = all_reduce_sum([float(loss.detach())], device)[0] / self.dist_info.world
        if not np.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step} (epoch {epoch}); the last good checkpoint "
                f"{self.run_dir / 'checkpoints' / 'last.pt'} is kept. Lower optim.lr or set optim.clip_grad_norm"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.clip_grad_norm)
        self.optimizer.step()
        if self.sparsifier is not None:
            self.sparsifier.step(step)
        if self.ema is not None:
            self.ema.update(self.model)
        progress = self.progress
        progress.step += 1
        progress.batch_in_epoch += 1
        progress.epoch_loss_sum += loss_value
        progress.epoch_loss_count += 1
        if progress.step % config.train.log_every_steps == 0:
            self.log.log_step({"step": progress.step, "epoch": epoch, "loss": round(loss_value, 6), "lr": lr})
        every = config.train.checkpoint_every_steps
        if every and progress.step % every == 0 and progress.step < self.plan.total_steps:
            self.checkpoint()
        return loss_value, lr

    def end_epoch(self, epoch: int, val_loader: Any, bar: Progress) -> None:
        """Evaluate when due (always after the last step), reset the epoch's counters, checkpoint
        ``last.pt`` and, when the tracked metric improved, ``best.pt``."""
        config, progress = self.config, self.progress
        last = progress.step >= self.plan.total_steps
        improved = False
        if last or (epoch + 1) % config.train.eval_every_epochs == 0:
            row = _evaluate_all(config, self.model, self.ema, val_loader, self.dist_info.device, progress, epoch,
                                self.lr_at, self.t_start, self.bundle.task)
            self.log.log_eval(row)
            bar.message("  ".join(f"{k} {v}" for k, v in row.items()))
            prefix = "ema_" if self.ema is not None else ""
            # lower perplexity is better; higher top-1
            metric = -row[prefix + "perplexity"] if self.bundle.task == "causal_lm" else row[prefix + "top1"]
            improved = metric > progress.best_metric
            progress.best_metric = max(progress.best_metric, metric)
        progress.epoch += 1
        progress.batch_in_epoch = 0
        progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
        self.checkpoint()
        if improved:
            self.checkpoint("best.pt")


def _train(config: Config, run_dir: Path | None, resume: bool, dist_info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    device, main = dist_info.device, dist_info.is_main
    run_dir = _run_directory(config, run_dir, dist_info)

    # ---- data, model, sparsifier, optimizer
    seed = config.run.seed
    bundle = build_data(config.data, config.model.name)
    torch.manual_seed(seed)
    model, source = build_run_model(config, bundle)
    model.to(device)
    if config.model.channels_last:
        model.to(memory_format=torch.channels_last)
    train_set = SeededDataset(bundle.train, seed, config.data.augment.kind != "none")
    sampler = EpochSampler(len(bundle.train), seed, dist_info.rank, dist_info.world)  # type: ignore[arg-type]
    loader = DataLoader(train_set, batch_size=config.data.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.data.workers, persistent_workers=False)
    val_loader = eval_loader(
        bundle.val, config.data.eval_batch_size, dist_info.rank, dist_info.world, config.data.workers
    )
    steps_per_epoch = sampler.per_rank // config.data.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"data.batch_size={config.data.batch_size} exceeds the {sampler.per_rank} training "
                         "samples per process; lower it")
    plan = make_plan(config, steps_per_epoch)
    teacher = None
    if config.train.distill > 0:  # the dense model as it starts (also on a resume: rebuilt from its source)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    sparsifier = build_sparsifier(config, steps_per_epoch)
    if sparsifier is not None and config.sparsity.permute:
        _permute(model, sparsifier, run_dir, resume, main)
    if sparsifier is not None:  # phases and stages span the configured epochs, like the LR schedule
        sparsifier.prepare(model, total_steps=plan.steps_per_epoch * config.train.epochs)
    optimizer = build_optimizer(config, model)
    ema = Ema(model, config.train.ema_decay) if config.train.ema_decay else None
    mixup, criterion = _criterion(config, bundle.num_classes) if bundle.task == "classifier" else (None, None)
    run = _Run(config, run_dir, dist_info, bundle, model, model, optimizer, sparsifier, ema, mixup, criterion, plan,
               lr_schedule(config, plan), RunLog(run_dir, main, config.logging.tensorboard), RunProgress(), t_start,
               teacher)
    if resume:
        run.resume()
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run.train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        broadcast_masks(sparsifier)
    if config.model.compile:
        run.train_model = torch.compile(run.train_model)  # type: ignore[assignment]

    progress = run.progress
    bar = Progress(plan.total_steps, progress.step, config.logging.progress, config.train.log_every_steps, main)
    bar.message(f"run directory {run_dir}  ({plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
                f"{dist_info.world} process(es), device {device})")
    run.train_model.train()
    while progress.step < plan.total_steps:
        epoch = progress.epoch
        sampler.set_epoch(epoch, progress.batch_in_epoch * config.data.batch_size)
        for inputs, labels in loader:
            loss_value, lr = run.step(inputs, labels, epoch)
            bar.update(progress.step, f"epoch {epoch + 1}/{config.train.epochs} loss {loss_value:.4f} lr {lr:.4g}")
            if progress.step >= plan.total_steps or progress.batch_in_epoch >= steps_per_epoch:
                break
        if progress.batch_in_epoch >= steps_per_epoch or progress.step >= plan.total_steps:
            run.end_epoch(epoch, val_loader, bar)
    bar.close()
    digests = _mask_digests(sparsifier, dist_info)
    if digests is not None and len(set(digests)) != 1:
        raise RuntimeError(f"masks differ between ranks: {digests}")
    return _finish(config, run_dir, model, ema, sparsifier, source, run.log, bundle, device, main, t_start, digests)


def _mask_digests(sparsifier: Sparsifier | None, dist_info: DistInfo) -> list[str] | None:
    """SHA-1 of all masks on every rank (gathered), proving the ranks agree; None when single-process."""
    if sparsifier is None or not dist_info.enabled:
        return None
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha1()
    for fqn in sorted(sparsifier.layers):
        digest.update(sparsifier.layers[fqn].mask.cpu().numpy().tobytes())
    gathered: list[str] = [""] * dist_info.world
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered


def _evaluate_all(config, model, ema, val_loader, device, progress, epoch, lr_at, t_start, task) -> dict:
    sums = evaluate(model, val_loader, device, config.train.precision, config.model.channels_last, task)
    result = finalize_eval(all_reduce_sum([sums[k] for k in ("loss_sum", "top1", "top5", "count")], device), task)
    row = {
        "epoch": epoch + 1, "step": progress.step,
        "train_loss": round(progress.epoch_loss_sum / max(1, progress.epoch_loss_count), 6),
        "val_loss": round(result["loss"], 6), "top1": round(result["top1"], 4), "top5": round(result["top5"], 4),
        "lr": lr_at(max(0, progress.step - 1)),
    }
    if "perplexity" in result:
        row["perplexity"] = result["perplexity"]
    if ema is not None:
        sums = evaluate(ema.model, val_loader, device, config.train.precision, config.model.channels_last, task)
        ema_result = finalize_eval(
            all_reduce_sum([sums[k] for k in ("loss_sum", "top1", "top5", "count")], device), task)
        row["ema_top1"] = round(ema_result["top1"], 4)
        if "perplexity" in ema_result:
            row["ema_perplexity"] = ema_result["perplexity"]
    row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return row


def _finish(config, run_dir, model, ema, sparsifier, source, log, bundle, device, main, t_start,
            digests) -> dict[str, Any]:
    final = log.metrics[-1] if log.metrics else {}
    summary: dict[str, Any] = {"run_dir": str(run_dir), "final": final, "best_top1": max(
        (r.get("ema_top1", r["top1"]) for r in log.metrics), default=None)}
    if bundle.task == "causal_lm":
        summary["best_perplexity"] = min((r.get("ema_perplexity", r["perplexity"]) for r in log.metrics), default=None)
    if digests is not None:
        summary["mask_digest_per_rank"] = digests
    if sparsifier is not None:
        summary["method"] = sparsifier.method.summary()
        scheme = summary["method"].get("scheme")
        if main and scheme:
            save_scheme(run_dir / "scheme.json", scheme)
    if main and config.train.export:
        source_model = ema.model if ema is not None else model
        export_model = copy.deepcopy(source_model).cpu().eval()
        if sparsifier is not None:
            report = sparsifier.report()
            layers = sparsifier.squash(export_model)
            skipped = [{"fqn": r.fqn, "reason": r.skip_reason} for r in report if r.skip_reason]
        else:
            layers, skipped, report = [], [], []
        source.options.update({"num_classes": bundle.num_classes, "in_chans": bundle.in_chans})
        out = save_export(export_model, run_dir / "export", layers, source.as_dict(), skipped,
                          extra={"metrics": final, "method": config.sparsity.method if sparsifier else "dense"})
        reloaded, _ = load_export(out)
        probe = torch.stack([bundle.val[i][0] for i in range(min(8, len(bundle.val)))])
        with torch.no_grad():
            diff = float(
                (forward_logits(reloaded, probe, bundle.task) - forward_logits(export_model, probe, bundle.task))
                .abs()
                .max()
            )
        summary["export"] = {"dir": str(out), "sparse_layers": len(layers), "all_verified": True,
                             "reload_max_abs_diff": diff}
        if config.logging.plots:
            plot_curves(run_dir, log.steps, log.metrics)
            if report:
                rows = [r.as_dict() for r in report]
                plot_density(run_dir / "density.png", rows, f"per-layer density ({config.sparsity.pattern}, "
                             f"{config.sparsity.method})")
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    return summary
