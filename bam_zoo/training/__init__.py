"""Training and fine-tuning with PyTorch Lightning: ``ImageClassifier``, DataModules, callbacks, the CLI."""

from bam_zoo.training.callbacks import HubExport
from bam_zoo.training.data import (BatchAugment, CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule,
                                   ImageFilesDataModule, ImageFolderDataModule, InMemoryDataModule, MNISTDataModule)
from bam_zoo.errors import DatasetNotFoundError, NonFiniteLossError, UnsafeCheckpointError
from bam_zoo.training.module import ImageClassifier, create_model

__all__ = [
    "BatchAugment", "CIFAR10DataModule", "CIFAR100DataModule", "DatasetNotFoundError", "FashionMNISTDataModule",
    "HubExport", "ImageClassifier", "ImageFilesDataModule", "ImageFolderDataModule", "InMemoryDataModule",
    "MNISTDataModule", "NonFiniteLossError", "UnsafeCheckpointError", "create_model",
]
