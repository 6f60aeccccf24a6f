"""All bam-zoo error classes (model registry, Hub, training), in one module.

Why one module: callers catch bam-zoo failures without importing the module
that raised them, and every class also subclasses the builtin a generic caller
would already catch (``ValueError``, ``FileNotFoundError``, ``PermissionError``,
``ConnectionError``), so ``except ValueError`` code written against timm keeps
working. Every error carries the offending values as attributes and a message
that says how to fix the problem; each docstring shows that message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "BamZooError",
    "UnknownModelError",
    "UnknownPretrainedTagError",
    "UnregisteredArchitectureError",
    "RepoNotFoundError",
    "PretrainedNotFoundError",
    "HubAuthError",
    "HubOfflineError",
    "CorruptCheckpointError",
    "ChecksumMismatchError",
    "StateDictMismatchError",
    "PushError",
    "TrainingError",
    "DatasetNotFoundError",
    "NonFiniteLossError",
    "UnsafeCheckpointError",
]


def _did_you_mean(suggestions: Sequence[str]) -> str:
    return f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""


class BamZooError(Exception):
    """Base class of every bam-zoo error: ``except BamZooError`` catches them all."""

    def __str__(self) -> str:
        # OSError subclasses would otherwise format as "[Errno None] None: <filename>"
        # as soon as a ``filename`` attribute is set; the message is what users need.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UnknownModelError(BamZooError, ValueError):
    """A model name that no registered architecture matches.

    Message::

        Unknown model 'bam_resnet2'. Did you mean: bam_resnet20, bam_resnet32? See bam_zoo.list_models().

    Attributes:
        name: The name that was asked for.
        suggestions: Close registered names (may be empty).
    """

    def __init__(self, name: str, suggestions: Iterable[str] = ()) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        super().__init__(
            f"Unknown model {name!r}.{_did_you_mean(self.suggestions)} See bam_zoo.list_models()."
        )


class UnknownPretrainedTagError(BamZooError, ValueError):
    """A known architecture asked for with a pretrained tag it does not ship.

    Message::

        Unknown pretrained tag 'imagenet' for 'bam_resnet20'. Available tags: fmnist.
        See bam_zoo.list_pretrained('bam_resnet20*').

    Attributes:
        arch: The architecture name.
        tag: The tag that was asked for.
        available: The tags the architecture does ship.
    """

    def __init__(self, arch: str, tag: str, available: Iterable[str] = ()) -> None:
        self.arch = arch
        self.tag = tag
        self.available = list(available)
        avail = ", ".join(self.available) if self.available else "(none)"
        super().__init__(
            f"Unknown pretrained tag {tag!r} for {arch!r}. Available tags: {avail}. "
            f"See bam_zoo.list_pretrained('{arch}*')."
        )


class UnregisteredArchitectureError(BamZooError, ValueError):
    """A Hub ``config.json`` names an architecture that neither timm nor bam-zoo registers.

    Message::

        config.json of 'org/name' names architecture 'bam_resnet99', which is not
        registered in timm. Run `import bam_zoo` before timm.create_model, or upgrade
        bam-zoo; registered BAM models: bam_resnet20, ...

    Attributes:
        repo_id: The Hub repository (or local folder) whose config was read.
        architecture: The architecture named in ``config.json``.
    """

    def __init__(self, repo_id: str, architecture: str, known: Iterable[str] = ()) -> None:
        self.repo_id = repo_id
        self.architecture = architecture
        known = list(known)
        tail = f"; registered BAM models: {', '.join(known)}" if known else ""
        super().__init__(
            f"config.json of {repo_id!r} names architecture {architecture!r}, which is not "
            f"registered in timm. Run `import bam_zoo` before timm.create_model, or upgrade "
            f"bam-zoo{tail}."
        )


class RepoNotFoundError(BamZooError, FileNotFoundError):
    """The Hub has no repository (or revision) with that id, or it is private to someone else.

    Message::

        Hugging Face Hub repository 'org/name' (revision 'main') was not found at
        https://huggingface.co. Check the repo id and revision; a private repo also
        needs a token with read access (HF_TOKEN or `hf auth login`).

    Attributes:
        repo_id: The repository id.
        revision: The revision asked for, or ``None`` for the default branch.
        endpoint: The Hub endpoint that was asked.
    """

    def __init__(self, repo_id: str, revision: str | None = None, endpoint: str | None = None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = endpoint
        rev = f" (revision {revision!r})" if revision else ""
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(
            f"Hugging Face Hub repository {repo_id!r}{rev} was not found{where}. Check the repo id "
            f"and revision; a private repo also needs a token with read access "
            f"(HF_TOKEN or `hf auth login`)."
        )


class PretrainedNotFoundError(BamZooError, FileNotFoundError):
    """A weight file could be found neither on the Hub nor in the offline mirror.

    Message::

        No 'model.safetensors' for 'bam_resnet20.fmnist': not in Hub repo
        'bam-zoo/bam_resnet20.fmnist' (revision 'main') and not in the mirror folder
        /repo/checkpoints/bam_resnet20.fmnist. Push it with `python cli.py push`, or set
        BAM_ZOO_CHECKPOINTS to a folder holding <arch>.<tag>/model.safetensors.

    Attributes:
        name: ``arch.tag`` or the Hub repo id the file belongs to.
        filename: The file that is missing.
        repo_id: The Hub repository that was asked, if any.
        revision: The revision that was asked, if any.
        mirror: The mirror folder that was looked in, if any.
        reason: Extra detail (e.g. the underlying Hub error), if any.
        hint: How to fix it, replacing the default advice.
    """

    def __init__(
        self,
        name: str,
        filename: str = "model.safetensors",
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        mirror: str | None = None,
        reason: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.name = name
        self.filename = filename
        self.repo_id = repo_id
        self.revision = revision
        self.mirror = mirror
        self.reason = reason
        where = []
        if repo_id:
            rev = f" (revision {revision!r})" if revision else ""
            where.append(f"not in Hub repo {repo_id!r}{rev}")
        if mirror:
            where.append(f"not in the mirror folder {mirror}")
        where_s = (": " + " and ".join(where)) if where else ""
        reason_s = f" ({reason})" if reason else ""
        hint = hint or (
            f"Push it with `python cli.py push`, or set BAM_ZOO_CHECKPOINTS to a folder holding "
            f"<arch>.<tag>/{filename}."
        )
        super().__init__(f"No {filename!r} for {name!r}{where_s}{reason_s}. {hint}")


class HubAuthError(BamZooError, PermissionError):
    """The Hub refused the token (missing, invalid, or without write access).

    The token itself is never part of the message.

    Message::

        The Hugging Face Hub at https://huggingface.co rejected the request for
        'org/name': invalid or missing token. Set HF_TOKEN or run `hf auth login`
        with a valid token (one with write access to 'org' to push).

    Attributes:
        repo_id: The repository the request was for.
        endpoint: The Hub endpoint.
        detail: Short reason (never contains the token).
    """

    def __init__(self, repo_id: str, endpoint: str | None = None, detail: str = "invalid or missing token") -> None:
        self.repo_id = repo_id
        self.endpoint = endpoint
        self.detail = detail
        org = repo_id.split("/")[0] if "/" in repo_id else repo_id
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(
            f"The Hugging Face Hub{where} rejected the request for {repo_id!r}: {detail}. "
            f"Set HF_TOKEN or run `hf auth login` with a valid token (one with write access to "
            f"{org!r} to push)."
        )


class HubOfflineError(BamZooError, ConnectionError):
    """The Hub cannot be reached (or HF_HUB_OFFLINE=1) and nothing usable is cached or mirrored.

    Message::

        Cannot load 'bam_resnet20.fmnist': the Hugging Face Hub is unreachable or
        HF_HUB_OFFLINE=1, the cache at /home/u/.cache/huggingface/hub has no copy, and
        the mirror folder /repo/checkpoints/bam_resnet20.fmnist has none either.
        Connect once (unset HF_HUB_OFFLINE) to fill the cache, or set BAM_ZOO_CHECKPOINTS.

    Attributes:
        name: What was being loaded (``arch.tag`` or repo id).
        cache_dir: The Hub cache that was searched.
        mirror: The mirror folder that was searched, if any.
    """

    def __init__(self, name: str, cache_dir: str | None = None, mirror: str | None = None) -> None:
        self.name = name
        self.cache_dir = cache_dir
        self.mirror = mirror
        cache_s = f"the cache at {cache_dir} has no copy" if cache_dir else "the cache has no copy"
        mirror_s = f", and the mirror folder {mirror} has none either" if mirror else ""
        super().__init__(
            f"Cannot load {name!r}: the Hugging Face Hub is unreachable or HF_HUB_OFFLINE=1, "
            f"{cache_s}{mirror_s}. Connect once (unset HF_HUB_OFFLINE) to fill the cache, "
            f"or set BAM_ZOO_CHECKPOINTS."
        )


class CorruptCheckpointError(BamZooError, ValueError):
    """A weight file exists but cannot be parsed (truncated download, wrong format, missing entries).

    Message::

        Cannot read /cache/.../model.safetensors as safetensors: <parser error>.
        Delete the file (or the cache entry) and download it again.

    Attributes:
        path: The file.
        detail: The parser's complaint.
        fmt: The format it was read as (``safetensors``, ``Lightning checkpoint`` ...).
    """

    def __init__(self, path: str, detail: str, fmt: str = "safetensors", hint: str | None = None) -> None:
        self.path = str(path)
        self.detail = detail
        self.fmt = fmt
        hint = hint or "Delete the file (or the cache entry) and download it again."
        super().__init__(f"Cannot read {self.path} as {fmt}: {detail}. {hint}")


class ChecksumMismatchError(CorruptCheckpointError):
    """A mirrored weight file whose sha256 differs from the one recorded in its pretrained cfg.

    Message::

        /repo/checkpoints/bam_resnet20.fmnist/model.safetensors has sha256 1a2b...,
        expected 3c4d... . Delete the file (or the cache entry) and download it again.

    Attributes:
        path: The file.
        expected: The sha256 recorded in the pretrained cfg.
        actual: The sha256 of the file on disk.
    """

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        self.path = str(path)
        self.detail = f"sha256 {actual}, expected {expected}"
        # Skip CorruptCheckpointError.__init__: the message names the hashes, not a parser error.
        Exception.__init__(
            self,
            f"{self.path} has sha256 {actual}, expected {expected}. Delete the file (or the "
            f"cache entry) and download it again.",
        )


class StateDictMismatchError(BamZooError, RuntimeError):
    """Weights whose keys or shapes do not match the model they are loaded into.

    bam-zoo loads strictly: silently skipping tensors would give a model that runs
    but predicts noise.

    Message::

        Weights from model.safetensors do not match bam_resnet20:
          missing keys (2): layer1.0.bam.conv.weight, ...
          unexpected keys (1): fc2.weight
          shape mismatches (1): fc.weight: checkpoint (10, 64) vs model (3, 64)
        Create the model with the same model_args/num_classes as the checkpoint,
        or pass num_classes to re-initialise the head.

    Attributes:
        missing: Keys the model has and the checkpoint lacks.
        unexpected: Keys the checkpoint has and the model lacks.
        mismatched: ``(key, checkpoint_shape, model_shape)`` triples.
        source: Where the weights came from.
        model_name: The model they were loaded into.
    """

    def __init__(
        self,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
        *,
        source: str = "checkpoint",
        model_name: str = "model",
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = [(k, tuple(a), tuple(b)) for k, a, b in mismatched]
        self.source = source
        self.model_name = model_name

        def _fmt(keys: list[str], limit: int = 8) -> str:
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        lines = [f"Weights from {source} do not match {model_name}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {_fmt(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {_fmt(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatches ({len(shown)}): {_fmt(shown)}")
        lines.append(
            "Create the model with the same model_args/num_classes as the checkpoint, "
            "or pass num_classes to re-initialise the head."
        )
        super().__init__("\n".join(lines))


class PushError(BamZooError, RuntimeError):
    """A push to the Hub that failed; the remote repository was left unchanged.

    Message::

        Push of runs/best.ckpt to 'org/name' (revision 'main') failed; the remote
        repository is unchanged: <reason>

    Attributes:
        source: The local checkpoint or folder.
        repo_id: The target repository.
        revision: The target branch.
        reason: Why it failed.
    """

    def __init__(self, source: str, repo_id: str, revision: str | None, reason: str) -> None:
        self.source = str(source)
        self.repo_id = repo_id
        self.revision = revision
        self.reason = reason
        rev = f" (revision {revision!r})" if revision else ""
        super().__init__(
            f"Push of {self.source} to {repo_id!r}{rev} failed; the remote repository is "
            f"unchanged: {reason}"
        )


# Training errors: the ``bam-zoo`` command prints them without a traceback.


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
