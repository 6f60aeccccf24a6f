"""The errors bam-zoo itself raises; Hub, timm and torch failures reach users as those libraries' own errors.

Each class also subclasses the builtin a generic caller already catches (``ValueError``,
``FileNotFoundError`` ...), carries the offending values as attributes, and its message says how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "BamZooError", "UnknownModelError", "UnknownPretrainedTagError", "InvalidModelArgumentError", "InputChannelsError",
    "ChecksumMismatchError", "CheckpointKeysError", "CorruptCheckpointError", "MetricConflictError", "TrainingError",
    "CheckpointNotFoundError", "DatasetNotFoundError", "DatasetDownloadError", "NoImagesError", "NonFiniteLossError",
    "TRUST_OPTION", "UnsafeCheckpointError", "WeightsNotFoundError",
]


def _first(names: Sequence[str], n: int) -> str:
    """The first ``n`` names and how many more: a checkpoint of another depth misses hundreds of keys."""
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


class BamZooError(Exception):
    """Base class of every bam-zoo error: ``except BamZooError`` catches them all."""

    def __str__(self) -> str:  # OSError subclasses would print "[Errno None] ..." once a filename is set
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UnknownModelError(BamZooError, ValueError):
    """A model name no registered architecture matches: ``Unknown model 'bam_resnet2'. Did you mean: ...?``"""

    def __init__(self, name: str, suggestions: Iterable[str] = ()) -> None:
        self.name, self.suggestions = name, list(suggestions)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"Unknown model {name!r}.{hint} See bam_zoo.list_models().")


class UnknownPretrainedTagError(BamZooError, ValueError):
    """A known architecture with a tag it does not ship: ``Unknown pretrained tag 'x' for 'bam_resnet20' ...``"""

    def __init__(self, arch: str, tag: str, available: Iterable[str] = ()) -> None:
        self.arch, self.tag, self.available = arch, tag, list(available)
        super().__init__(
            f"Unknown pretrained tag {tag!r} for {arch!r}. Available tags: {', '.join(self.available) or '(none)'}. "
            f"See bam_zoo.list_pretrained('{arch}*').")


class InvalidModelArgumentError(BamZooError, ValueError):
    """``num_classes`` or ``in_chans`` is not a usable whole number: ``... got '5' (str); pass num_classes=5.``"""

    def __init__(self, name: str, value: Any, minimum: int, meaning: str) -> None:
        self.name, self.value = name, value
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        fixable = number is not None and number.is_integer() and number >= minimum
        fix = f"; pass {name}={int(number)}" if fixable else ""
        super().__init__(f"{name} must be a whole number >= {minimum} ({meaning}), got {value!r} "
                         f"({type(value).__name__}){fix}.")


class InputChannelsError(BamZooError, ValueError):
    """An image batch whose channel count differs from the model's ``in_chans``; the message says how to convert."""

    def __init__(self, model_name: str, expected: int, shape: tuple[int, ...]) -> None:
        self.expected, self.shape = expected, tuple(shape)
        convert = "image.convert('L'); tensor: x.mean(1, keepdim=True)" if expected == 1 else (
            "image.convert('RGB'); tensor: x.expand(-1, 3, -1, -1)" if expected == 3 else "match the channel count")
        got = shape[1] if len(shape) == 4 else "?"
        super().__init__(
            f"{model_name} takes {expected}-channel images, got a batch of shape {tuple(shape)}. Convert the images "
            f"(PIL: {convert}), or build the model with in_chans={got} (pretrained stems are adapted by timm)."
        )


class ChecksumMismatchError(BamZooError, ValueError):
    """A weight file whose hash (sha256; sha1 where the publisher lists only that) differs from the recorded one;
    the message says how to restore it (for the offline mirror: ``git checkout -- checkpoints/<arch.tag>``)."""

    def __init__(self, path: str, name: str, expected: str, actual: str, fix: str, algorithm: str = "sha256") -> None:
        self.path, self.expected, self.actual = str(path), expected, actual
        super().__init__(f"{path} has {algorithm} {actual}, but {name} records {expected}: {fix}")


class WeightsNotFoundError(BamZooError, FileNotFoundError):
    """A tag whose weights are neither on the Hub (nor in its cache) nor in a mirror folder: one line, not
    huggingface_hub's traceback, saying why the Hub was not used and where the mirror was looked for."""

    def __init__(self, name: str, why_not_hub: str, mirror: object = None) -> None:
        self.name, self.mirror = name, mirror
        where = (f"{mirror}/{name} holds no model.safetensors" if mirror else
                 "no mirror folder is set (BAM_ZOO_CHECKPOINTS)")
        super().__init__(f"No weights for {name}: the Hugging Face Hub was not used because {why_not_hub}, and "
                         f"{where}. Connect to the Hub, or set BAM_ZOO_CHECKPOINTS to a folder holding "
                         f"{name}/model.safetensors (a copy of the repository's checkpoints/).")


class CheckpointKeysError(BamZooError, ValueError, RuntimeError):
    """Weights whose keys or shapes do not fit the model (another architecture or layout): ``... does not fit
    bam_resnet18: 312 missing (layer1.0.conv1.weight, ... 309 more); 2 unexpected (...). Pass the architecture ...``
    Also a ``RuntimeError``, which torch's strict ``load_state_dict`` raises for the same problem."""

    def __init__(self, what: str, arch: str, unexpected: Sequence[str], missing: Sequence[str],
                 misshaped: Sequence[str], fix: str) -> None:
        self.unexpected, self.missing, self.misshaped = list(unexpected), list(missing), list(misshaped)
        found = [f"{len(keys)} {kind} ({_first(keys, 3)})" for kind, keys in
                 (("missing", self.missing), ("unexpected", self.unexpected), ("misshaped", self.misshaped)) if keys]
        super().__init__(f"{what} does not fit {arch}: {'; '.join(found)}. {fix}")


class CorruptCheckpointError(BamZooError, ValueError):
    """A local file given to ``push`` that is neither a Lightning checkpoint of bam-zoo nor an export folder."""

    def __init__(self, path: str, detail: str) -> None:
        self.path, self.detail = str(path), detail
        super().__init__(
            f"{path} is not a Lightning checkpoint of bam-zoo ({detail}). Point --checkpoint at a .ckpt written by "
            "`cli.py fit`, or at an export folder (config.json + model.safetensors)."
        )


class MetricConflictError(BamZooError, ValueError):
    """``--metric`` would replace a metric that was measured: ``top1 is 44.79 in ...; --metric gave 99.9 ...``"""

    def __init__(self, key: str, measured: float, given: float, source: str) -> None:
        self.key, self.measured, self.given = key, measured, given
        super().__init__(
            f"{key} was measured as {measured:g} in {source}; --metric gave {given:g}. A card reports measured "
            f"results only: drop --metric {key}=..., or re-measure and export again.")


class TrainingError(BamZooError):
    """Base class of the training errors; the ``bam-zoo`` command prints them without a traceback."""


class DatasetNotFoundError(TrainingError, FileNotFoundError):
    """A DataModule found none of the files it needs; the message lists where it looked and how to get them."""

    def __init__(self, dataset: str, searched: Sequence[str], missing: str, *, apt_package: str | None = None,
                 apt_dir: str | None = None, can_download: bool = True) -> None:
        self.dataset, self.searched = dataset, [str(s) for s in searched]
        lines = [f"{dataset} not found: looked for {missing} in {' and '.join(self.searched)}.", "Get it with one of:"]
        if apt_package:
            lines.append(f"  sudo apt-get install {apt_package}   (files land in {apt_dir})")
        lines.append("  --data.root DIR   (a folder that holds the files)")
        if can_download:
            lines.append("  --data.download true --data.root DIR   (download with torchvision; needs internet)")
        super().__init__("\n".join(lines))


class CheckpointNotFoundError(TrainingError, FileNotFoundError):
    """``--ckpt_path`` names no checkpoint; raised before the run creates its folders, with the paths a run writes
    (``<default_root_dir>/checkpoints/last.ckpt``, ``best-*.ckpt``) and ``--ckpt_path last``."""


class DatasetDownloadError(TrainingError, ConnectionError):
    """``--data.download true`` could not fetch the data set (no network, proxy, server down); the message
    gives the command that fetches it on a machine with internet."""

    def __init__(self, dataset: str, root: object, reason: BaseException, fetch: str) -> None:
        self.dataset, self.root = dataset, root
        super().__init__(
            f"Could not download {dataset} into {root}: {reason}. Without internet, copy the files there from a "
            f"machine that has it ({fetch}) and drop --data.download."
        )


class NoImagesError(TrainingError, ValueError):
    """No image files where some were expected: an empty (class) folder, or a named path that does not exist."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} (image files end in {' '.join(IMG_EXTENSIONS)})")


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite, so continuing would only waste compute."""

    def __init__(self, loss: float, epoch: int, step: int, lr: float) -> None:
        self.loss, self.epoch, self.step = loss, epoch, step
        super().__init__(
            f"Training loss is {loss} at epoch {epoch}, step {step} (lr {lr:.4g}). Lower --model.lr, add warm-up "
            "(--model.warmup_epochs 5), clip gradients (--trainer.gradient_clip_val 1.0) or train in 32-bit "
            "(--trainer.precision 32-true); resume from the last good checkpoint with --ckpt_path last."
        )


#: The option that lets a checkpoint's pickle run code, under one name everywhere (CLI and Python arguments).
TRUST_OPTION = "trust_checkpoint_code"


class UnsafeCheckpointError(BamZooError, ValueError):
    """A checkpoint bam-zoo will not unpickle: it needs more than torch's ``weights_only`` allowlist, whose classes
    and functions cannot run code (``Refused to unpickle evil.ckpt: it names posix.system, ...``), or it is not a
    local file. The message names the option that trusts it."""

    def __init__(self, path: str, refused: Sequence[str] = (), reason: str | None = None) -> None:
        self.path, self.refused, self.reason = str(path), list(refused), reason
        if self.refused or reason:
            why = (f"it names {_first(self.refused, 5)}, beyond torch's weights_only allowlist, so unpickling it can "
                   "run any code" if self.refused else
                   f"torch's weights_only loader refused it ({reason}), and a full unpickle can run any code")
            message = (f"Refused to unpickle {path}: {why}. If you trust this file and whoever made it, pass "
                       f"--{TRUST_OPTION} true ({TRUST_OPTION}=True in Python).")
        else:  # a location that is not a local file
            message = (f"Refusing to read the Lightning checkpoint {path!r}: .ckpt files are pickles and are only "
                       "read from local paths. Download it yourself if you trust it and pass the local file, or load "
                       "published weights with --model.pretrained true / --model.pretrained_file model.safetensors.")
        super().__init__(message)
