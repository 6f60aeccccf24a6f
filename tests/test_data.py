"""DataModules: on-disk formats, splits, batch augmentation and the missing-data message."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest
import torch

from bam_zoo.training.data import (
    FASHION_MNIST_DEBIAN_DIR,
    BatchAugment,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    read_idx,
)
from bam_zoo.errors import DatasetNotFoundError
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import (
    CIFAR10_NAMES,
    FASHION_MNIST_NAMES,
    indexed_images,
    write_cifar,
    write_fashion_mnist,
    write_idx,
    write_imagefolder,
)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, compress: bool) -> None:
    array = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress=compress)
    assert torch.equal(read_idx(path), array)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_split_is_fixed_and_disjoint(tmp_path: Path, layout: str) -> None:
    write_fashion_mnist(tmp_path, n_train=200, n_test=60, layout=layout, compress=layout == "flat")
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=50, split_seed=3)
    dm.setup()
    (train_x, train_y), (val_x, _) = dm.train_set.tensors, dm.val_set.tensors
    train_ids, val_ids = train_x[:, 0, 0, 0].tolist(), val_x[:, 0, 0, 0].tolist()
    assert len(train_ids) == 150 and len(val_ids) == 50 and len(dm.test_set) == 60
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(200))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)  # file order, not the split's
    # labels travel with their images (image i has label i % 10)
    assert torch.equal(train_y, train_x[:, 0, 0, 0].long() % 10)
    again = FashionMNISTDataModule(root=str(tmp_path), val_size=50, split_seed=3)
    again.setup()
    assert again.val_set.tensors[0][:, 0, 0, 0].tolist() == val_ids
    other = FashionMNISTDataModule(root=str(tmp_path), val_size=50, split_seed=4)
    other.setup()
    assert other.val_set.tensors[0][:, 0, 0, 0].tolist() != val_ids
    assert (dm.num_classes, dm.in_chans, dm.input_size) == (10, 1, (1, 28, 28))


def test_class_subset_and_limits(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=250, n_test=60)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=20, class_subset=[7, 2], limit_train=30, limit_test=5)
    dm.setup()
    assert dm.classes == ["Sneaker", "Pullover"] and dm.num_classes == 2
    assert len(dm.train_set) == 30 and len(dm.val_set) == 20 and len(dm.test_set) == 5
    images, labels = dm.train_set.tensors
    original = images[:, 0, 0, 0].long() % 10
    assert torch.equal(labels, (original == 2).long())  # 7 -> 0, 2 -> 1
    assert set(original.tolist()) <= {7, 2}


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    for hint in ("apt-get install dataset-fashion-mnist", "--data.root", "--data.download true", "nowhere"):
        assert hint in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    with pytest.raises(DatasetNotFoundError, match="train/<class>"):
        ImageFolderDataModule(root=str(tmp_path)).num_classes


def test_prepare_data_does_not_download_present_files(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    FashionMNISTDataModule(root=str(tmp_path), download=True).prepare_data()  # offline: would fail if it tried
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(not Path(FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_NAMES[0] + ".gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package() -> None:
    dm = FashionMNISTDataModule()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    train_x, val_x = dm.train_set.tensors[0], dm.val_set.tensors[0]
    assert train_x.shape[1:] == (1, 28, 28) and train_x.dtype == torch.uint8
    assert torch.bincount(dm.test_set.tensors[1]).tolist() == [1000] * 10
    # the 5,000 validation images the shipped weights were selected on (sha256 of their pixels)
    assert hashlib.sha256(val_x.numpy().tobytes()).hexdigest()[:16] == "e601871cb8cf0a5d"
    pixels = torch.cat([train_x, val_x]).float() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3530, abs=5e-4)


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    x, y = indexed_images(30)[:, 0], torch.arange(30) % 10
    for name, array in zip(FASHION_MNIST_NAMES, [x, y, x[:10], y[:10]]):
        write_idx(raw / name, array, compress=False)
    dm = MNISTDataModule(root=str(tmp_path), val_size=10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 10, 10)
    assert dm.train_augment.hflip == 0.0  # digits are not flipped


@pytest.mark.parametrize("dm_cls,classes", [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_cifar_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dm_cls: type,
                                   classes: int) -> None:
    write_cifar(monkeypatch, tmp_path, classes=classes, n_train=100, n_test=40)
    dm = dm_cls(root=str(tmp_path), val_size=20)
    assert dm.classes[:2] == (CIFAR10_NAMES[:2] if classes == 10 else ["fine0", "fine1"])  # the meta file's
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (80, 20, 40)
    images = dm.train_set.tensors[0]
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert (images[:, 0] == 200).all() and not (images[:, 1] == 200).all()
    assert dm.num_classes == len(dm.classes) == classes and dm.in_chans == 3
    assert int(dm.test_set.tensors[1].max()) < classes


def test_corrupted_cifar_file_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(monkeypatch, tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "ab") as f:
        f.write(b"x")
    with pytest.raises(RuntimeError, match="corrupted") as info:
        CIFAR10DataModule(root=str(tmp_path)).setup()
    assert any("--data.download true" in note for note in info.value.__notes__)


def test_validation_split_is_the_one_the_shipped_weights_used(tmp_path: Path) -> None:
    """val = the first 5,000 of ``randperm(60000)`` seeded with ``split_seed`` 0; train = the rest, in file order.

    Pinned: the shipped weights were selected on this split and seeded studies compare runs on it.
    """
    ids = torch.arange(60000)
    write_idx(tmp_path / FASHION_MNIST_NAMES[0], torch.stack([ids // 256, ids % 256], 1).view(-1, 1, 2), compress=False)
    write_idx(tmp_path / FASHION_MNIST_NAMES[1], ids % 10, compress=False)
    write_idx(tmp_path / FASHION_MNIST_NAMES[2], torch.zeros(10, 1, 2), compress=False)
    write_idx(tmp_path / FASHION_MNIST_NAMES[3], torch.arange(10), compress=False)
    dm = FashionMNISTDataModule(root=str(tmp_path))
    dm.setup()
    val, train = ((split.tensors[0][:, 0, 0, 0].long() * 256 + split.tensors[0][:, 0, 0, 1]).tolist()
                  for split in (dm.val_set, dm.train_set))
    assert val[:8] == [1, 3, 47, 49, 80, 83, 109, 111] and len(val) == 5000 and sum(val) == 149911330
    assert train == sorted(set(range(60000)) - set(val))


def test_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, classes=("b", "a", "c"), per_class=3)
    dm = ImageFolderDataModule(root=str(tmp_path), img_size=32, batch_size=2, num_workers=0)
    assert dm.classes == ["a", "b", "c"] and dm.num_classes == 3 and dm.input_size == (3, 32, 32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 32, 32)
    assert len(dm.train_dataloader()) == 4  # 9 images, batch 2, drop_last


def test_imagefolder_walks_each_split_once_and_lists_what_torchvision_lists(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import ImageFolder
    write_imagefolder(tmp_path, classes=("b", "a", "c"), per_class=3)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / "more").mkdir()
    (tmp_path / "train" / "a" / "more" / "0.png").write_bytes((tmp_path / "train" / "a" / "0.png").read_bytes())
    walked = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **k: (walked.append(Path(top)), real_walk(top, *a, **k))[1])
    dm = ImageFolderDataModule(root=str(tmp_path), img_size=32, batch_size=2, num_workers=0)
    dm.setup()
    assert sorted(walked) == sorted(tmp_path / split / c for split in ("train", "val") for c in "abc")
    monkeypatch.setattr(os, "walk", real_walk)
    for split, folder in (("train", "train"), ("val", "val"), ("test", "val")):
        reference = ImageFolder(str(tmp_path / folder))
        assert dm.datasets[split].classes == reference.classes == ["a", "b", "c"]
        assert sorted(dm.datasets[split].samples) == sorted(reference.samples), split
    assert len(dm.datasets["train"]) == 10


def test_batch_augment_eval_only_normalises() -> None:
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = BatchAugment((0.2860,), (0.3530,))(x)
    assert torch.allclose(out, (x.float() / 255 - 0.2860) / 0.3530)


def test_batch_augment_is_a_padded_crop_and_flip_of_each_image() -> None:
    torch.manual_seed(0)
    n, p = 16, 4
    x = torch.randint(1, 256, (n, 2, 12, 12), dtype=torch.uint8)
    aug = BatchAugment((0.0, 0.0), (1.0, 1.0), padding=p, hflip=0.5)
    out = aug(x) * 255
    padded = torch.nn.functional.pad(x.float(), (p, p, p, p))
    shifts, flips = set(), []
    for i in range(n):
        matches = [(dy, dx, f) for dy, dx in itertools.product(range(2 * p + 1), repeat=2) for f in (False, True)
                   if torch.allclose((lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 12, dx:dx + 12]),
                                     out[i], atol=1e-3)]
        assert matches, f"image {i} is not a crop/flip of its input"
        shifts.add(matches[0][:2])
        flips.append(matches[0][2])
    assert len(shifts) > 1 and any(flips) and not all(flips)  # really random per image


def test_batch_augment_erases_one_rectangle_per_chosen_image() -> None:
    torch.manual_seed(0)
    x = torch.full((32, 1, 28, 28), 128, dtype=torch.uint8)
    clean = BatchAugment((0.5,), (0.25,))(x)
    out = BatchAugment((0.5,), (0.25,), erasing=0.5)(x)
    changed = out != clean
    erased = changed.flatten(1).any(1)
    assert 4 < erased.sum() < 28  # about half of the images
    for i in erased.nonzero().flatten().tolist():  # each erased region is one axis-aligned rectangle
        rows, cols = changed[i, 0].any(1).nonzero().flatten(), changed[i, 0].any(0).nonzero().flatten()
        box = changed[i, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.99 and changed[i].sum() == box.numel()
    assert torch.equal(BatchAugment((0.5,), (0.25,), erasing=0.0)(x), clean)


def test_digits_are_28x28_with_a_fixed_disjoint_test_split():
    pytest.importorskip("sklearn")
    from bam_zoo.training.data import DigitsDataModule

    dm = DigitsDataModule(val_size=200, split_seed=1)
    dm.setup("fit")
    train, val, test = (torch.cat([b[0] for b in loader]) for loader in
                        (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()))
    assert train.dtype == torch.uint8 and train.shape[1:] == (1, 28, 28)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1100, 200, 497)
    assert train[:, :, :2].max() == 0 and train.max() == 255  # 24x24 digits in a 28x28 frame, full range
    rows = {tuple(x.flatten().tolist()) for x in test}
    assert not rows & {tuple(x.flatten().tolist()) for x in torch.cat([val, train])}
    other = DigitsDataModule(val_size=200, split_seed=2)  # the validation seed never moves the test set
    other.setup("test")
    assert torch.equal(other.test_set.tensors[0], dm.test_set.tensors[0])
    assert sorted(torch.bincount(dm.test_set.tensors[1]).tolist())[0] > 40  # every digit is tested
