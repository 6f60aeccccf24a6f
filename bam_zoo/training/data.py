"""DataModules: Fashion-MNIST (the default), MNIST, digits, CIFAR-10/100 in memory; ImageFolder; image files.

The small sets stay ``uint8`` in memory and are augmented a batch at a time on the device (:class:`BatchAugment`),
as per-image PIL transforms in workers would be the bottleneck on few cores. The CLI links ``num_classes``,
``in_chans`` and ``classes`` of every DataModule into the model before ``setup``.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_convert, random_split
from torchvision import datasets
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import is_image_file

from bam_zoo.errors import DatasetDownloadError, DatasetNotFoundError, NoImagesError, TrainingError
from bam_zoo.models.pretrained import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD

__all__ = [
    "BatchAugment", "InMemoryDataModule", "FashionMNISTDataModule", "MNISTDataModule", "CIFAR10DataModule",
    "CIFAR100DataModule", "ImageFolderDataModule", "ImageFilesDataModule", "image_files", "read_idx",
]

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


class BatchAugment(nn.Module):
    """torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` + ``Normalize``, on a whole batch.

    Args:
        mean: per-channel mean of the data in [0, 1].
        std: per-channel standard deviation of the data in [0, 1].
        padding: zero padding on each side before the random crop; 0 disables cropping.
        hflip: probability of flipping an image horizontally.
        erasing: probability of timm's random erasing (noise rectangle) per image; 0 disables it.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 0, hflip: float = 0.0,
                 erasing: float = 0.0) -> None:
        super().__init__()
        self.padding, self.hflip, self.erasing = padding, hflip, erasing
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Augment and normalise ``x`` (N, C, H, W), ``uint8`` in [0, 255] or float in [0, 1].
        Crop and flip are one gather on the ``uint8`` batch; normalisation runs in place on its one float copy."""
        n, c, h, w = x.shape
        if self.padding > 0 or self.hflip > 0:
            p = self.padding
            if p > 0:
                x = nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n, 1, 1), device=x.device)
            dx = torch.randint(0, 2 * p + 1, (n, 1, 1), device=x.device)
            rows = torch.arange(h, device=x.device).view(1, h, 1) + dy
            cols = torch.arange(w, device=x.device).view(1, 1, w)
            if self.hflip > 0:
                flip = torch.rand(n, device=x.device) < self.hflip
                cols = torch.where(flip.view(n, 1, 1), w - 1 - cols, cols)
            batch = torch.arange(n, device=x.device).view(n, 1, 1)
            # advanced indices around a slice put the indexed dims first: (N, H, W, C)
            x = x[batch, :, rows, cols + dx].permute(0, 3, 1, 2)
        scale = 255.0 if x.dtype == torch.uint8 else 1.0  # (x / 255 - mean) / std: one subtract, one divide
        x = x.to(torch.float32, copy=True).sub_(self.mean * scale).div_(self.std * scale).contiguous()
        if self.erasing > 0:
            RandomErasing(self.erasing, mode="pixel", device=x.device)(x)
        return x


class _TensorBatches(TensorDataset):
    """A ``TensorDataset`` that the DataLoader indexes once per batch (``__getitems__``), not once per image."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        return self[torch.as_tensor(indices)]


def _materialise(split: Subset, limit: int | None) -> _TensorBatches:
    """One split as tensors of its own: its first ``limit`` images (a random sample), else all in file order.
    File order, not the split's random order: the shipped weights were trained in it."""
    indices = torch.as_tensor(split.indices[:limit] if limit else sorted(split.indices), dtype=torch.long)
    return _TensorBatches(*(tensor[indices] for tensor in split.dataset.tensors))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (the MNIST format), plain or gzip-compressed (as Debian ships them), as a ``uint8`` tensor."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    dtype_code, ndim = magic // 256, magic % 256
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only uint8 IDX files are supported, found type code {dtype_code:#x}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).reshape(dims).clone()


class _SplitDataModule(pl.LightningDataModule):
    """What the CLI links into the model, and a dataloader per split from ``_loader``; predict takes the test split."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    predict_dataloader = test_dataloader


class InMemoryDataModule(_SplitDataModule):
    """Base of the DataModules whose whole data set fits in memory as ``uint8`` tensors.

    Subclasses set the class attributes and implement ``_load(train)`` (``uint8`` images (N, C, H, W), labels) and
    ``_missing()`` (files not under ``root``). A seeded ``random_split`` of the training set holds out validation.

    Args:
        root: folder with the data set files; ``None``: the class default (``default_root``).
        download: download the data set with torchvision when it is not found under ``root``.
        batch_size: training batch size per process.
        eval_batch_size: batch size for validation and test; ``None`` uses ``2 * batch_size``.
        val_size: number of training images held out for validation (0 disables validation).
        split_seed: seed of the ``random_split`` that chooses the validation images.
        padding: zero padding of the random crop; 0 disables it.
        hflip: probability of a horizontal flip.
        erasing: probability of random erasing per training image (:class:`BatchAugment`); 0 disables it.
        class_subset: keep only these class indices (relabelled 0..k-1 in the given order).
        limit_train: keep only this many training images (after the split).
        limit_val: keep only this many validation images.
        limit_test: keep only this many test images (a fixed random subset).
    """

    name: str = ""
    human_name: str = ""
    default_root: str = "data"
    torchvision_class: type[datasets.VisionDataset]  # the torchvision data set that downloads these files
    class_names: tuple[str, ...] = ()
    in_chans: int = 1
    image_size: int = 28
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    default_hflip: float = 0.5

    def __init__(
        self, root: str | None = None, download: bool = False, batch_size: int = 128,
        eval_batch_size: int | None = None, val_size: int = 5000, split_seed: int = 0, padding: int = 4,
        hflip: float | None = None, erasing: float = 0.0, class_subset: list[int] | None = None,
        limit_train: int | None = None, limit_val: int | None = None, limit_test: int | None = None) -> None:
        super().__init__()
        self.root = Path(root if root is not None else self.default_root).expanduser()
        self.download, self.batch_size, self.eval_batch_size = download, batch_size, eval_batch_size or 2 * batch_size
        self.val_size, self.split_seed = val_size, split_seed
        self.class_subset = list(class_subset) if class_subset is not None else None
        self.limit_train, self.limit_val, self.limit_test = limit_train, limit_val, limit_test
        hflip = self.default_hflip if hflip is None else hflip
        self.train_augment = BatchAugment(self.mean, self.std, padding=padding, hflip=hflip, erasing=erasing)
        self.eval_augment = BatchAugment(self.mean, self.std)
        self.train_set = self.val_set = self.test_set = None  # TensorDatasets, once set up

    @property
    def classes(self) -> list[str]:
        """Label names, in label order."""
        return list(self.class_names) if self.class_subset is None else [self.class_names[i] for i in self.class_subset]

    def prepare_data(self) -> None:
        """Download on one process per node; nothing to do when the files are there."""
        if self.download and self._missing():
            try:
                self.torchvision_class(str(self.root), train=True, download=True)  # fetches both splits
            except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision's mirrors raise RuntimeError
                fetch = (f"python -c \"import torchvision; torchvision.datasets.{self.torchvision_class.__name__}"
                         f"('{self.root}', download=True)\"")
                raise DatasetDownloadError(self.human_name, self.root, getattr(error, "reason", error), fetch) from None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = TensorDataset(*self._select_classes(*self._load(train=True)))
        test = TensorDataset(*self._select_classes(*self._load(train=False)))
        val, train = self._split(train, self.val_size)
        self.train_set, self.val_set = _materialise(train, self.limit_train), _materialise(val, self.limit_val)
        self.test_set = _materialise(self._split(test, self.limit_test or len(test))[0], self.limit_test)

    def _split(self, data: TensorDataset, first: int) -> list[Subset]:
        """``data`` in two at random, ``first`` images and the rest; the same two for every run with ``split_seed``."""
        first = min(first, len(data))
        return random_split(data, [first, len(data) - first], generator=torch.Generator().manual_seed(self.split_seed))

    def _select_classes(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.class_subset is None:
            return x, y
        keep = torch.isin(y, torch.tensor(self.class_subset))
        remap = torch.full((len(self.class_names),), -1, dtype=torch.long)
        remap[torch.tensor(self.class_subset)] = torch.arange(len(self.class_subset))
        return x[keep], remap[y[keep]]

    def _loader(self, split: str) -> DataLoader:
        dataset, train = getattr(self, f"{split}_set"), split == "train"
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        batch_size = self.batch_size if train else self.eval_batch_size
        # drop_last: timm's Mixup needs full, even-sized batches; default_convert passes __getitems__'s batches on
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) >= batch_size,
                          collate_fn=default_convert, num_workers=0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment (training) or only normalise (evaluation) the batch on its device."""
        x, y = batch
        training = self.trainer is not None and self.trainer.training
        augment = self.train_augment if training else self.eval_augment
        return augment.to(x.device)(x), y


class MNISTDataModule(InMemoryDataModule):
    """MNIST digits: four IDX files, plain or ``.gz``, in a flat folder or torchvision's ``root/MNIST/raw``."""

    name, human_name = "mnist", "MNIST"
    torchvision_class = datasets.MNIST
    class_names = tuple(str(i) for i in range(10))
    mean, std = (0.1307,), (0.3081,)
    default_hflip = 0.0  # digits are not flipped
    files = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # train -> images, labels
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    apt_package: str | None = None

    def _search_dirs(self) -> list[Path]:
        return [self.root, self.root / self.torchvision_class.__name__ / "raw"]

    def _find(self, name: str) -> Path | None:
        candidates = (folder / f"{name}{gz}" for folder in self._search_dirs() for gz in ("", ".gz"))
        return next((path for path in candidates if path.is_file()), None)

    def _missing(self) -> list[str]:
        return [n for names in self.files.values() for n in names if self._find(n) is None]

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [self._find(n) for n in self.files[train]]
        if None in paths:
            missing = self.files[train][paths.index(None)]
            raise DatasetNotFoundError(self.human_name, self._search_dirs(), f"{missing}[.gz]",
                                       apt_package=self.apt_package, apt_dir=FASHION_MNIST_DEBIAN_DIR)
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        return images.unsqueeze(1), labels.long()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: 28x28 grey images of 10 clothing classes; 60k train (55k + 5k val), 10k test.
    Reads Debian's ``dataset-fashion-mnist`` files by default."""

    name, human_name = "fashion_mnist", "Fashion-MNIST"
    default_root = FASHION_MNIST_DEBIAN_DIR
    torchvision_class = datasets.FashionMNIST
    apt_package = "dataset-fashion-mnist"
    class_names = FASHION_MNIST_LABELS
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    default_hflip = 0.5


class DigitsDataModule(InMemoryDataModule):
    """scikit-learn's bundled digits (1,797 8x8 images of 0-9; no download), scaled to 24x24 in a 28x28 frame.
    A fixed random 497 images are the test set and the other 1,300 the training set (``val_size`` held out)."""

    name, human_name = "digits", "scikit-learn digits"
    class_names = tuple(str(i) for i in range(10))
    mean, std = (0.2247,), (0.3142,)
    default_hflip = 0.0
    test_size = 497

    def _missing(self) -> list[str]:
        return []  # bundled with scikit-learn

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise TrainingError("the digits data set comes with scikit-learn, which is not installed: "
                                "pip install scikit-learn (or pip install 'bam-zoo[demo]')") from None
        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        x = nn.functional.pad(nn.functional.interpolate(x, size=24, mode="bilinear").clamp(0, 1), (2, 2, 2, 2))
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        keep = (order[self.test_size:] if train else order[:self.test_size]).sort().values
        return x[keep].mul(255).round().to(torch.uint8), torch.as_tensor(digits.target)[keep]


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes, as torchvision reads them (``root/cifar-10-batches-py``).
    Label names come from the files' meta file: with ``download`` the files are fetched when first asked for."""

    name, human_name = "cifar10", "CIFAR-10"
    torchvision_class = datasets.CIFAR10
    in_chans = 3
    image_size = 32
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._torchvision(train=False).classes)

    def _missing(self) -> list[str]:
        cls = self.torchvision_class
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [name for name in names if not (self.root / cls.base_folder / name).is_file()]

    def _torchvision(self, train: bool) -> datasets.CIFAR10:
        self.prepare_data()
        folder = self.root / self.torchvision_class.base_folder
        if missing := self._missing():
            raise DatasetNotFoundError(self.human_name, [folder], missing[0])
        try:
            return self.torchvision_class(str(self.root), train=train)
        except RuntimeError as error:  # every file is there, so torchvision's md5 check failed
            error.add_note(f"bam-zoo: a file in {folder} is corrupted or incomplete; delete the folder and fetch "
                           "it again (--data.download true).")
            raise

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        split = self._torchvision(train)
        return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(split.targets)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 32x32 colour images of 100 fine classes (``root/cifar-100-python``), the BAM paper's set."""

    name, human_name = "cifar100", "CIFAR-100"
    torchvision_class = datasets.CIFAR100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def image_files_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, as torchvision's ImageFolder would find them."""
    return sorted(Path(d) / f for d, _, files in os.walk(folder) for f in files if is_image_file(f))


def image_files(paths: str | Sequence[str], what: str) -> list[Path]:
    """The image files named in ``paths`` and those under its folders; ``what`` names the source in errors."""
    found: list[Path] = []
    for path in (Path(p).expanduser() for p in ([paths] if isinstance(paths, str) else paths)):
        if not (path.is_file() or path.is_dir()):
            raise NoImagesError(f"{what}: {path} is neither an image file nor a folder; check the path")
        images = [path] if path.is_file() else image_files_under(path)
        if not images:
            raise NoImagesError(f"{what}: {path} holds no images")
        found += images
    if not found:
        raise NoImagesError(f"{what} names no images; name image files or folders")
    return found


def _open_as(mode: str, path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert(mode)


def image_loader(in_chans: int) -> Callable[[str], Image.Image]:
    """PIL loader that converts every image to the model's channel count (1: ``L``, 3: ``RGB``)."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB) for image files, got {in_chans}")
    return functools.partial(_open_as, "L" if in_chans == 1 else "RGB")  # a partial pickles into workers


class _WalkedImageFolder(ImageFolder):
    """torchvision's ImageFolder over a split already walked and checked, so ImageNet's 1.28M files are listed once."""

    def __init__(self, images: dict[str, list[Path]], root: str, **kwargs: Any) -> None:
        self.images = images
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self.images), {name: i for i, name in enumerate(self.images)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any) -> list:
        return [(str(file), class_to_idx[name]) for name, files in self.images.items() for file in files]


class ImageFolderDataModule(_SplitDataModule):
    """Images in class folders (ImageNet layout: ``root/train/<class>/*.JPEG``, ``root/val/<class>/*``).

    timm's ``create_transform`` (RandomResizedCrop + flip for training, resize + centre crop for evaluation).
    Every image is converted to ``in_chans``, so a folder mixing modes gives tensors of one shape.

    Args:
        root: folder holding the split folders.
        train_split: training folder name under ``root``.
        val_split: validation folder name under ``root``.
        test_split: test folder name under ``root`` (ImageNet has no labelled test split: the validation one).
        img_size: training crop and evaluation size.
        crop_pct: evaluation centre-crop ratio (0.875 = resize to 256, crop 224).
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size; ``None`` uses ``batch_size``.
        num_workers: decoding worker processes per training process.
        scale: RandomResizedCrop area range.
        color_jitter: colour jitter strength (0 disables it).
        auto_augment: timm auto-augment policy such as ``rand-m9-mstd0.5`` (``None`` disables it).
        interpolation: resize interpolation.
        in_chans: 1 (grey) or 3 (RGB); ``None`` reads it from the first training image (``L``/``I``/``1``: 1).
        mean: normalisation mean; ``None``: ImageNet's, or their average (0.449) for grey images.
        std: normalisation std; ``None``: ImageNet's, or their average (0.226) for grey images.
    """

    name = "imagefolder"

    def __init__(
        self, root: str, train_split: str = "train", val_split: str = "val", test_split: str = "val",
        img_size: int = 224, crop_pct: float = 0.875, batch_size: int = 32, eval_batch_size: int | None = None,
        num_workers: int = 8, scale: tuple[float, float] = (0.08, 1.0), color_jitter: float = 0.0,
        auto_augment: str | None = None, interpolation: str = "bilinear", in_chans: int | None = None,
        mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.image_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.transform_args = dict(scale=tuple(scale), color_jitter=color_jitter, auto_augment=auto_augment,
                                   interpolation=interpolation, crop_pct=crop_pct)  # timm's create_transform's
        self._in_chans, self._mean_arg, self._std_arg = in_chans, mean, std
        self._walked: dict[Path, dict[str, list[Path]]] = {}  # split folder -> class -> its images, walked once
        self.datasets: dict[str, Dataset] = {}

    def _split_dir(self, split: str) -> Path:
        """The split's folder, checked once: it exists, holds class folders, and each of them holds images."""
        path = self.root / self.splits[split]
        if path in self._walked:
            return path
        if not path.is_dir():
            raise DatasetNotFoundError("ImageFolder data", [self.root],
                                       f"the folder '{self.splits[split]}/<class>/<images>'", can_download=False)
        images = {d.name: image_files_under(d) for d in sorted(path.iterdir()) if d.is_dir()}
        if not images:
            raise NoImagesError(f"ImageFolder data: {path} holds no class folders; put each class's images in "
                                f"{path}/<class>/")
        empty = [name for name, files in images.items() if not files]
        if empty:
            raise NoImagesError(f"ImageFolder data: class folder(s) {', '.join(empty)} in {path} hold no images; "
                                "add images to them or remove them")
        self._walked[path] = images
        return path

    @property
    def classes(self) -> list[str]:
        """Class folder names of the training split, sorted; every split is checked here, before anything runs."""
        for split in self.splits:
            self._split_dir(split)
        return list(self._walked[self._split_dir("train")])

    @property
    def in_chans(self) -> int:
        if self._in_chans is None:
            with Image.open(next(iter(self._walked[self._split_dir("train")].values()))[0]) as image:
                self._in_chans = 1 if image.mode in ("L", "I", "I;16", "F", "1", "LA") else 3
        return self._in_chans

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self._mean_arg or ((0.449,) if self.in_chans == 1 else IMAGENET_DEFAULT_MEAN))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self._std_arg or ((0.226,) if self.in_chans == 1 else IMAGENET_DEFAULT_STD))

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                transform = create_transform(self.input_size, is_training=split == "train", mean=self.mean,
                                             std=self.std, **self.transform_args)
                path = self._split_dir(split)
                self.datasets[split] = _WalkedImageFolder(self._walked[path], str(path), transform=transform,
                                                          loader=image_loader(self.in_chans))

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return DataLoader(self.datasets[split], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, drop_last=train, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)


class _ImageFiles(Dataset):
    """Unlabelled image files; an item is ``(image tensor, path)`` so predictions keep their file."""

    def __init__(self, files: list[Path], transform: Any, loader: Any) -> None:
        self.files, self.transform, self.loader = files, transform, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.transform(self.loader(str(self.files[index]))), str(self.files[index])


class ImageFilesDataModule(pl.LightningDataModule):
    """Image files to ``predict`` on: any mix of files and folders (searched recursively), no labels needed.
    Transformed and labelled as the model's ``pretrained_cfg`` says (timm's ``inference.py`` way).

    Args:
        paths: an image file or folder, or a list of them (`--data.paths "[a.png, more/]"`).
        batch_size: images per batch.
        num_workers: decoding worker processes.
    """

    name = "images"
    num_classes = None  # taken from the model: its weights define the classes
    in_chans = None
    classes = None

    def __init__(self, paths: list[str] | str, batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        self.files = image_files(paths, "--data.paths")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset: _ImageFiles | None = None

    def setup(self, stage: str | None = None) -> None:
        model = self.trainer.lightning_module.eval_model
        config = resolve_data_config({}, model=model)
        self.dataset = _ImageFiles(self.files, create_transform(**config), image_loader(config["input_size"][0]))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)
