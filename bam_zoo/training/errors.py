"""Errors raised by the training stack; each says what went wrong and how to fix it.

They subclass builtins (``FileNotFoundError``, ``FloatingPointError``, ``ValueError``) so callers
that already catch those keep working, and carry the offending values as attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

from bam_zoo.errors import BamZooError

__all__ = ["TrainingError", "DatasetNotFoundError", "NonFiniteLossError", "UnsafeCheckpointError"]


class TrainingError(BamZooError):
    """Base class of the training errors; the ``bam-zoo`` command prints them without a traceback."""


class DatasetNotFoundError(TrainingError, FileNotFoundError):
    """A DataModule found none of the files it needs.

    Example message::

        Fashion-MNIST not found: looked for train-images-idx3-ubyte[.gz] in /data and /data/FashionMNIST/raw.
        Get it with one of:
          sudo apt-get install dataset-fashion-mnist   (files land in /usr/share/datasets/fashion-mnist)
          --data.root DIR                              (a folder that holds the files)
          --data.download true --data.root DIR         (download with torchvision; needs internet)

    Attributes:
        dataset: human name of the data set.
        searched: folders that were searched.
    """

    def __init__(
        self,
        dataset: str,
        searched: Sequence[str],
        missing: str,
        *,
        apt_package: str | None = None,
        apt_dir: str | None = None,
        can_download: bool = True,
    ) -> None:
        self.dataset = dataset
        self.searched = [str(s) for s in searched]
        lines = [f"{dataset} not found: looked for {missing} in {' and '.join(self.searched)}.", "Get it with one of:"]
        if apt_package:
            lines.append(f"  sudo apt-get install {apt_package}   (files land in {apt_dir})")
        lines.append("  --data.root DIR   (a folder that holds the files)")
        if can_download:
            lines.append("  --data.download true --data.root DIR   (download with torchvision; needs internet)")
        super().__init__("\n".join(lines))


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite, so continuing would only waste compute.

    Example message::

        Training loss is nan at epoch 3, step 1410 (lr 0.4). Lower --model.lr, add warm-up
        (--model.warmup_epochs 5), clip gradients (--trainer.gradient_clip_val 1.0) or train in 32-bit
        (--trainer.precision 32-true); resume from the last good checkpoint with --ckpt_path last.

    Attributes:
        loss: the offending loss value.
        epoch: epoch at which it happened.
        step: global step at which it happened.
    """

    def __init__(self, loss: float, epoch: int, step: int, lr: float) -> None:
        self.loss, self.epoch, self.step = loss, epoch, step
        super().__init__(
            f"Training loss is {loss} at epoch {epoch}, step {step} (lr {lr:.4g}). Lower --model.lr, add warm-up "
            "(--model.warmup_epochs 5), clip gradients (--trainer.gradient_clip_val 1.0) or train in 32-bit "
            "(--trainer.precision 32-true); resume from the last good checkpoint with --ckpt_path last."
        )


class UnsafeCheckpointError(TrainingError, ValueError):
    """A Lightning checkpoint was requested from somewhere other than a local path.

    Lightning ``.ckpt`` files are pickles, and unpickling runs code, so they are only read from the
    user's own disk.

    Example message::

        Refusing to read the Lightning checkpoint 'https://x/y.ckpt': .ckpt files are pickles and are only
        read from local paths. Download it yourself if you trust it and pass the local file, or load
        published weights with --model.pretrained true / --model.pretrained_file model.safetensors.

    Attributes:
        path: the refused location.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"Refusing to read the Lightning checkpoint {path!r}: .ckpt files are pickles and are only read from "
            "local paths. Download it yourself if you trust it and pass the local file, or load published weights "
            "with --model.pretrained true / --model.pretrained_file model.safetensors."
        )
