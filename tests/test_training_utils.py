"""Helpers for the training tests: tiny data sets written in the real on-disk formats, and probe callbacks.

Not a test module itself (no ``test_`` functions); the test files import it. The probe callbacks are
also loaded by ``cli.py`` subprocesses through ``--trainer.callbacks+=test_training_utils.X`` with this
folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FASHION_MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test with one intra-op thread (import this fixture into a test module to enable it).

    On a small shared machine two OpenMP threads per process thrash at every barrier once other
    processes compete for the cores: tiny-batch steps became ~100x slower than with one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_idx(path: Path, array: torch.Tensor, compress: bool = True) -> Path:
    """Write a ``uint8`` tensor in the IDX format (MNIST's), optionally gzipped."""
    array = array.to(torch.uint8).contiguous()
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.numpy().tobytes()
    path = Path(str(path) + ".gz") if compress else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def indexed_images(n: int, channels: int = 1, size: int = 28, offset: int = 0) -> torch.Tensor:
    """Images whose every pixel is ``(offset + i) % 256``: a random crop (<= 4 px) keeps the centre pixel,
    so the index of each image can be read back after augmentation."""
    values = (torch.arange(n) + offset) % 256
    return values.view(n, 1, 1, 1).expand(n, channels, size, size).to(torch.uint8).clone()


def write_fashion_mnist(root: Path, n_train: int = 200, n_test: int = 60, layout: str = "flat",
                        compress: bool = True) -> Path:
    """Fashion-MNIST-format files with ``n_train`` / ``n_test`` images: image i has value i, label i % 10.

    ``layout``: ``flat`` (Debian's folder) or ``torchvision`` (``root/FashionMNIST/raw``).
    """
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    train_x = indexed_images(n_train)[:, 0]
    test_x = indexed_images(n_test, offset=100)[:, 0]
    arrays = [train_x, torch.arange(n_train) % 10, test_x, torch.arange(n_test) % 10]
    for name, array in zip(FASHION_MNIST_NAMES, arrays):
        write_idx(folder / name, array, compress=compress)
    return root


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(monkeypatch: pytest.MonkeyPatch, root: Path, classes: int = 10, n_train: int = 100,
                n_test: int = 40) -> Path:
    """CIFAR-10 / CIFAR-100 "python version" files (pickled dicts and the meta file) with tiny random images.

    torchvision checks every file against the real CIFAR's md5; ``monkeypatch`` points its lists at these
    files' md5s for the test (CIFAR-100's label names are ``fine0`` ... ``fine99``).
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    gen = torch.Generator().manual_seed(0)

    def entry(n: int, start: int) -> dict[str, Any]:
        data = torch.randint(0, 256, (n, 3 * 32 * 32), generator=gen, dtype=torch.uint8)
        data[:, :1024] = 200  # red plane constant: lets a test check the channel order
        labels = [(start + i) % classes for i in range(n)]
        key = "labels" if classes == 10 else "fine_labels"
        return {"data": data.numpy(), key: labels}

    cls = CIFAR10 if classes == 10 else CIFAR100
    if classes == 10:
        files = {f"data_batch_{i}": entry(n_train // 5, i) for i in range(1, 6)}
        files["test_batch"] = entry(n_test, 0)
    else:
        files = {"train": entry(n_train, 0), "test": entry(n_test, 0)}
    files[cls.meta["filename"]] = {cls.meta["key"]: CIFAR10_NAMES if classes == 10 else [f"fine{i}" for i in range(100)]}
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    return root


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 4,
                      size: int = 40, channels: int = 3) -> Path:
    """``root/{train,val}/<class>/*.png`` with small random RGB (or, with ``channels=1``, grey) images."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, channels), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(folder / f"{i}.png")
    return root


def checkpoint(path: Path) -> dict[str, Any]:
    """Load one of our own Lightning checkpoints the way Lightning does (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class ShardRecorder(pl.Callback):
    """Record which images each DDP rank trained on (decoded from ``indexed_images``) and its final weights."""

    def __init__(self, out_dir: str, mean: float = 0.2860, std: float = 0.3530) -> None:
        self.out_dir, self.mean, self.std = Path(out_dir), mean, std
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        x = batch[0]
        centre = x[:, 0, x.shape[2] // 2, x.shape[3] // 2] * self.std + self.mean
        self.seen.extend(torch.round(centre * 255).long().tolist())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        params = {k: v.detach().cpu() for k, v in pl_module.named_parameters()}
        torch.save(params, self.out_dir / f"params_rank{rank}.pt")
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps({
            "seen": self.seen, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "val_acc1": float(trainer.callback_metrics.get("val/acc1", float("nan"))),
        }))


class ResumeRecorder(pl.Callback):
    """Record the state a (resumed) run starts training from: epoch, step, optimizer and scheduler state."""

    def __init__(self, out_file: str) -> None:
        self.out_file = Path(out_file)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        torch.save({
            "epoch": trainer.current_epoch, "global_step": trainer.global_step,
            "optimizer": trainer.optimizers[0].state_dict(), "scheduler": scheduler.state_dict(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }, self.out_file)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        torch.save({"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                    "scheduler_last_epoch": scheduler.last_epoch},
                   self.out_file.with_name(self.out_file.stem + "_end.pt"))


class StepMarker(pl.Callback):
    """Write the global step after every training batch to ``out_file`` and sleep, so a test can signal mid-epoch;
    with ``in_validation``, append it after every batch of a fit's validation instead."""

    def __init__(self, out_file: str, seconds: float = 0.2, in_validation: bool = False) -> None:
        self.out_file, self.seconds, self.in_validation = Path(out_file), seconds, in_validation

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.in_validation:
            self.out_file.write_text(str(trainer.global_step))
            time.sleep(self.seconds)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.in_validation and not trainer.sanity_checking:
            with open(self.out_file, "a") as f:
                f.write(f"{trainer.global_step}\n")
            time.sleep(self.seconds)


class NaNDataModule(pl.LightningDataModule):
    """Images full of NaN: the first training step's loss is NaN."""

    num_classes, in_chans, classes = 3, 1, ["a", "b", "c"]

    def train_dataloader(self) -> DataLoader:
        x = torch.full((8, 1, 16, 16), float("nan"))
        return DataLoader(TensorDataset(x, torch.arange(8) % 3), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()
