import pickle

import numpy as np
import pytest
import torch

from nmsparse.config.sections import DataConfig
from nmsparse.schema import build
from nmsparse.train.data import DataError, EpochSampler, SeededDataset, build_data


def _cfg(**kw):
    return build(DataConfig, kw)


def test_mnist5k_is_real_and_split_is_fixed():
    a = build_data(_cfg(name="mnist5k"))
    b = build_data(_cfg(name="mnist5k"))
    assert len(a.train) + len(a.val) == 5000 and len(a.val) == 500
    assert (a.num_classes, a.in_chans, a.image_size) == (10, 1, 28)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert set(a.val.labels.tolist()) == set(range(10))  # the sorted source is shuffled before splitting
    image, label = a.val[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10


def test_digits_resized():
    bundle = build_data(_cfg(name="digits", image_size=16, val_fraction=0.2))
    assert bundle.image_size == 16 and len(bundle.val) == round(1797 * 0.2)
    assert bundle.train[0][0].shape == (1, 16, 16)


def _write_cifar(root, ten=True, n=6):
    rng = np.random.default_rng(0)
    def batch(k):
        data = rng.integers(0, 256, (k, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10 if ten else 100, k))
        return {b"data": data, (b"labels" if ten else b"fine_labels"): labels}
    if ten:
        sub = root / "cifar-10-batches-py"
        sub.mkdir(parents=True)
        for i in range(1, 6):
            (sub / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n)))
        (sub / "test_batch").write_bytes(pickle.dumps(batch(n)))
    else:
        sub = root / "cifar-100-python"
        sub.mkdir(parents=True)
        (sub / "train").write_bytes(pickle.dumps(batch(n)))
        (sub / "test").write_bytes(pickle.dumps(batch(n)))
    return sub


@pytest.mark.parametrize("ten", [True, False])
def test_cifar_pickles(tmp_path, ten):
    _write_cifar(tmp_path, ten)
    bundle = build_data(_cfg(name="cifar10" if ten else "cifar100", root=str(tmp_path)))
    assert len(bundle.train) == (30 if ten else 6) and len(bundle.val) == 6
    assert bundle.num_classes == (10 if ten else 100)
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_cifar_missing_and_foreign_files(tmp_path):
    with pytest.raises(DataError, match="expected data_batch_1..5 and test_batch"):
        build_data(_cfg(name="cifar10", root=str(tmp_path)))
    sub = _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (sub / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        build_data(_cfg(name="cifar10", root=str(tmp_path)))


def _write_imagefolder(root, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder(tmp_path):
    pytest.importorskip("timm")
    _write_imagefolder(tmp_path)
    bundle = build_data(_cfg(name="imagefolder", root=str(tmp_path), image_size=32, augment={"kind": "timm"}))
    assert bundle.num_classes == 2 and len(bundle.train) == 6
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="no train/ directory.*ImageNet layout"):
        build_data(_cfg(name="imagefolder", root=str(tmp_path)))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="ImageNet layout"):
        build_data(_cfg(name="imagefolder", root=str(tmp_path)))


def test_sampler_shards_and_resumes():
    s0, s1 = EpochSampler(10, seed=3, rank=0, world=2), EpochSampler(10, seed=3, rank=1, world=2)
    for s in (s0, s1):
        s.set_epoch(1)
    a, b = s0.indices(), s1.indices()
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))
    s0.set_epoch(1, start=2)
    assert [i for i, _ in s0] == a[2:] and all(e == 1 for _, e in s0)
    s0.set_epoch(2)
    assert s0.indices() != a  # a new order each epoch
    odd = EpochSampler(7, seed=0, rank=1, world=2)
    assert len(odd.indices()) == 4  # padded like DistributedSampler


def test_augmentation_is_a_function_of_seed_epoch_index():
    bundle = build_data(_cfg(name="digits", image_size=16))
    ds = SeededDataset(bundle.train, seed=1, augmented=True)
    x1, _ = ds[(5, 2)]
    torch.manual_seed(999)  # unrelated global RNG use does not matter
    x2, _ = ds[(5, 2)]
    x3, _ = ds[(5, 3)]
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
