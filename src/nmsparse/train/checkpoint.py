"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint holds everything a resumed run needs to continue bit-for-bit: model, optimizer,
sparsifier and EMA state, progress (step, epoch, position in the epoch), RNG states, the metric
history and the resolved config. A corrupt or foreign file is refused with a clear error.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_file
from ..version import __version__

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "nmsparse-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign, or does not fit the run."""


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format markers) to ``path`` atomically."""
    payload = {"format": FORMAT, "version": VERSION, "library_version": __version__, **payload}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing code from it.

    Raises:
        CheckpointError: missing, unreadable (corrupt, or holding objects other than tensors and
            plain data), or not an nmsparse checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user-facing error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (corrupt or not a tensors-only file): {first}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an nmsparse training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {payload.get('version')}; this nmsparse reads {VERSION}"
        )
    return payload
