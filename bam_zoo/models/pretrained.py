"""Shipped pretrained weights: one timm tag per weight, its metadata beside it.

Each entry is a timm pretrained cfg (``arch.tag``) carrying where the weights live (``hf_hub_id`` on the
Hub, mirrored in the repository's ``checkpoints/<arch>.<tag>/``; or the ``url`` of weights published
elsewhere, converted on load), what they were trained on and what they measured. ``list_pretrained()``,
MODEL_CARD.md and the Hub model cards are generated from this table.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
)
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg

from ..errors import ChecksumMismatchError
from .convert import convert_state_dict

__all__ = [
    "FASHION_MNIST_LABELS", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FASHION_MNIST_TAGS", "HF_HUB_ORG",
    "PretrainedInfo", "WEIGHTS_NAME", "WEIGHT_METADATA", "fashion_mnist_cfg", "list_pretrained", "mirror_root",
    "prepare_pretrained", "resolve_weights", "sha256sum", "strict_keys", "tag_model_args",
]

_logger = logging.getLogger(__name__)

HF_HUB_ORG = "bam-zoo"
WEIGHTS_NAME = "model.safetensors"
# Fashion-MNIST: the one source of its label names and statistics (training-set mean / std), for the
# shipped weights' cfgs and for FashionMNISTDataModule.
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def fashion_mnist_cfg(arch: str, tag: str) -> Dict[str, Any]:
    """A Fashion-MNIST weight entry (timm cfg fields only): 1 x 28 x 28 inputs, 10 classes, its Hub repo."""
    return {
        "hf_hub_id": f"{HF_HUB_ORG}/{arch}.{tag}",
        "num_classes": 10, "input_size": (1, 28, 28), "pool_size": (7, 7), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "mit",
        "label_names": FASHION_MNIST_LABELS,
    }


# arch.tag -> timm cfg. Only weights that exist in checkpoints/ are listed. Each BAM weight ships with its
# plain twin, trained with the identical recipe and seed.
FASHION_MNIST_TAGS: Dict[str, Dict[str, Any]] = {
    "bam_resnet20.fmnist": fashion_mnist_cfg("bam_resnet20", "fmnist"),
    "resnet20.fmnist": fashion_mnist_cfg("resnet20", "fmnist"),
    "bam_resnet56.fmnist_long": fashion_mnist_cfg("bam_resnet56", "fmnist_long"),
    "resnet56.fmnist_long": fashion_mnist_cfg("resnet56", "fmnist_long"),
}

# arch.tag -> what the weights measured and how they were made (timm's cfg has no fields for these).
# Keys: dataset, top1, top5, per_class (percent, official test split), num_params, macs (per image at
# input_size), recipe (config path), epochs, seed, train_time_s (wall clock of fit on the 2-core CPU), command,
# sha256 (of model.safetensors, checked on every load), top1_flip (with test-time flip) and, where the default
# (the 2-core CPU, one or both cores) does not say how the time was taken, train_setting. Entries are printed by
# scripts/ship_weights.py.
# Weights published elsewhere record instead: source, license, what the publisher lists (never measured here),
# the publisher's hash of the download, and the create_model arguments the weights need (model_args).
WEIGHT_METADATA: Dict[str, Dict[str, Any]] = {
    "bam_resnet20.fmnist": {
        "dataset": "fashion_mnist", "top1": 93.14, "top5": 99.89, "top1_flip": 93.33,
        "num_params": 269844, "macs": 30875896,
        "per_class": {"T-shirt/top": 89.0, "Trouser": 99.0, "Pullover": 90.3, "Dress": 93.6, "Coat": 90.3,
                      "Sandal": 98.5, "Shirt": 78.2, "Sneaker": 97.1, "Bag": 99.0, "Ankle boot": 96.4},
        "epochs": 15, "seed": 0, "train_time_s": 1457, "recipe": "configs/fashion_mnist/bam_resnet20.yaml",
        "command": "OMP_NUM_THREADS=1 python cli.py fit --config configs/fashion_mnist/bam_resnet20.yaml",
        "sha256": "a9ce83f8bc81dab25ac12f4d00e0cb1ca4547c749228dccf9ffd99069eb79011",
    },
    "resnet20.fmnist": {
        "dataset": "fashion_mnist", "top1": 93.08, "top5": 99.89, "top1_flip": 93.28,
        "num_params": 269434, "macs": 30821248,
        "per_class": {"T-shirt/top": 88.0, "Trouser": 98.4, "Pullover": 89.7, "Dress": 93.2, "Coat": 91.0,
                      "Sandal": 98.3, "Shirt": 78.6, "Sneaker": 97.7, "Bag": 99.0, "Ankle boot": 96.9},
        "epochs": 15, "seed": 0, "train_time_s": 1403, "recipe": "configs/fashion_mnist/resnet20.yaml",
        "command": "OMP_NUM_THREADS=1 python cli.py fit --config configs/fashion_mnist/resnet20.yaml",
        "sha256": "dbb47f773ca5b5c41e536c5914a2140dc07237e3c2dd681de40e53721f2cdc5c",
    },
    "bam_resnet56.fmnist_long": {
        "dataset": "fashion_mnist", "top1": 94.6, "top5": 99.94, "top1_flip": 94.67, "num_params": 853140,
        "macs": 95903992,
        "per_class": {"T-shirt/top": 91.0, "Trouser": 99.3, "Pullover": 91.6, "Dress": 94.7, "Coat": 93.6,
                      "Sandal": 98.9, "Shirt": 82.3, "Sneaker": 98.3, "Bag": 99.5, "Ankle boot": 96.8},
        "epochs": 55, "seed": 0, "train_time_s": 6320, "recipe": "configs/fashion_mnist_long/bam_resnet56.yaml",
        "command": "python cli.py fit --config configs/fashion_mnist_long/bam_resnet56.yaml",
        "sha256": "90b9b02e82657115b7af0b6fdea65c66d223a8fc04d7a061263cc717a3a1a614",
    },
    "resnet56.fmnist_long": {
        "dataset": "fashion_mnist", "top1": 94.82, "top5": 99.95, "top1_flip": 94.92, "num_params": 852730,
        "macs": 95849344,
        "per_class": {"T-shirt/top": 91.0, "Trouser": 99.1, "Pullover": 92.4, "Dress": 96.0, "Coat": 93.1,
                      "Sandal": 99.0, "Shirt": 83.2, "Sneaker": 98.2, "Bag": 99.6, "Ankle boot": 96.6},
        "epochs": 55, "seed": 0, "train_time_s": 8943, "recipe": "configs/fashion_mnist_long/resnet56.yaml",
        "command": "python cli.py fit --config configs/fashion_mnist_long/resnet56.yaml",
        "sha256": "5ac41146f144be97f9497094703a9823af0a43c7a06384bcef2a99f602830163",
        # not the run's own clock (15,755 s): that adds up both machines and the pauses for benchmarks
        "train_setting": "2-core CPU, both cores; epochs 21-55 took 2.71 min each (validation included) on the "
                         "AVX-512 machine of 2026-12-01, and the time is 55 epochs at that rate; epochs 1-20 ran on "
                         "a slower AVX2 machine (5.5 min each) and were resumed from there",
    },
    "bam_resnet50.imgclsmob_in1k": {
        "dataset": "imagenet-1k", "num_params": 25914763,
        "source": "pytorchcv (osmr/imgclsmob) release v0.0.499, bam_resnet50-0547-a04adf3c.pth.zip",
        "license": "MIT (osmr/imgclsmob)",
        # pytorchcv's model_metainfos.csv: top-5 error on ImageNet-1k val (the column listing resnet50 at 6.33)
        "listed_top5_error": 5.47,
        "sha1": "a04adf3c93f56836509f66668aa90360c9688eb8",
        "model_args": {"bam_args": {"fusion": "product"}},
    },
}


def mirror_root() -> Path:
    """The offline mirror: ``$BAM_ZOO_CHECKPOINTS``, else the repository's ``checkpoints/`` (one ``<arch>.<tag>/`` each)."""
    env = os.environ.get("BAM_ZOO_CHECKPOINTS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "checkpoints"


def sha256sum(path: str | Path, algorithm: str = "sha256") -> str:
    """The file's sha256 (or another ``hashlib`` algorithm's) digest, in hex."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: str | Path, name: str, expected: Optional[str], fix: str, algorithm: str = "sha256") -> str:
    actual = sha256sum(path, algorithm) if expected else None
    if expected and actual != expected:
        raise ChecksumMismatchError(str(path), name, expected, actual, fix, algorithm)
    return str(path)


def _download(url: str, name: str, sha1: str) -> str:
    """A ``.zip`` weight in torch.hub's cache (as timm's), sha1-checked; returns its one file, extracted beside it.

    Why not timm's own download: torch.hub checks a sha256 prefix in the file name; pytorchcv publishes sha1.
    """
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / url.rsplit("/", 1)[-1]
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path))
        except OSError as e:  # urllib's URLError too
            e.add_note(f"bam-zoo: offline, copy {path.name} to {path} (it is sha1-checked), or pass "
                       "pretrained_cfg_overlay=dict(file=<the .pth inside it>).")
            raise
    _verified(path, name, sha1, f"the download is incomplete or was changed. Delete {path} to download it "
              "again.", "sha1")
    with zipfile.ZipFile(path) as archive:  # the sha1 fixes what it holds: one .pth
        return archive.extract(archive.namelist()[0], folder)


_mirror_notice_given = False


def _notice_mirror(error: Exception, repo_id: str) -> None:
    """Say once per process, in plain words, that weights come from the mirror and why."""
    global _mirror_notice_given
    if _mirror_notice_given:
        return
    _mirror_notice_given = True
    why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else
           "it cannot be reached" if isinstance(error, LocalEntryNotFoundError) else f"{repo_id} does not hold them yet")
    _logger.warning("bam-zoo loads pretrained weights from its offline copies in %s (sha256-checked): the "
                    "Hugging Face Hub was not used because %s.", mirror_root(), why)


def _hub_unreachable(repo_id: str, revision: Optional[str]) -> bool:
    """One HEAD request without retries. Why: unreachable, ``hf_hub_download`` retries for ~20 s first."""
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, WEIGHTS_NAME, revision=revision))
    except HfHubHTTPError:
        return False  # it answered; hf_hub_download turns the answer into the right error
    except Exception:  # connection refused, DNS, timeout: the Hub is not there
        return True
    return False


def resolve_weights(cfg: Dict[str, Any], variant: str) -> Optional[str]:
    """A local, verified ``model.safetensors`` for a pretrained cfg: the Hub (and its cache), else the mirror.

    Why not timm's own download: it falls back to a pickled ``pytorch_model.bin`` and knows no mirror.
    A ``file`` in the cfg (``local-dir:``, ``pretrained_file``) is the user's choice and is returned as is.
    A ``url`` (weights published elsewhere) is downloaded once and checked against the publisher's sha1.
    Tags (``arch.tag``) use the revision and sha256 in :data:`WEIGHT_METADATA`; ``hf-hub:`` names use
    their ``@revision``. Returns ``None`` when the cfg names no weights (timm then says so).

    Raises:
        ChecksumMismatchError: The file differs from the recorded sha256.
        huggingface_hub.errors.HfHubHTTPError: and its subclasses, when the Hub fails and nothing is mirrored
            (a note says where the mirror was looked for).
    """
    if cfg.get("file"):
        path = Path(cfg["file"]).expanduser()
        return str(path / WEIGHTS_NAME if path.is_dir() else path)
    if not cfg.get("hf_hub_id"):
        name = f"{cfg.get('architecture') or variant}.{cfg.get('tag')}"
        sha1 = WEIGHT_METADATA.get(name, {}).get("sha1")
        return _download(cfg["url"], name, sha1) if cfg.get("url") and sha1 else None
    tag = None if cfg.get("source") == "hf-hub" else cfg.get("tag")
    name = f"{cfg.get('architecture') or variant}.{tag}" if tag else cfg["hf_hub_id"]
    meta = WEIGHT_METADATA.get(name, {}) if tag else {}
    repo_id, _, revision = cfg["hf_hub_id"].partition("@")
    revision = meta.get("hf_hub_revision") or revision or None
    mirrored = mirror_root() / name / WEIGHTS_NAME if tag else None
    mirrored = mirrored if mirrored is not None and mirrored.is_file() else None
    local_only = bool(mirrored) and not constants.is_offline_mode() and _hub_unreachable(repo_id, revision)
    try:
        path = hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, library_name="bam-zoo",
                               local_files_only=local_only)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        if mirrored is None:
            e.add_note(f"bam-zoo: {name} has no offline copy either (looked in {mirror_root() / name}); "
                       f"set BAM_ZOO_CHECKPOINTS to a folder holding <arch>.<tag>/{WEIGHTS_NAME}." if tag else
                       f"bam-zoo reads {WEIGHTS_NAME} only: a repo holding only pytorch_model.bin is refused, "
                       f"never unpickled.")
            raise
        _notice_mirror(e, repo_id)
        return _verified(mirrored, name, meta.get("sha256"), "the file was changed or is incomplete. These "
                         "weights are not on the Hub: restore the file from the repository "
                         f"(`git checkout -- checkpoints/{name}`) or from where BAM_ZOO_CHECKPOINTS was copied.")
    return _verified(path, name, meta.get("sha256"), f"{repo_id}@{revision or 'main'} holds other weights than "
                     f"bam-zoo recorded. Pin the recorded hf_hub_revision, or delete {path} to download it again.")


def strict_keys(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn``: pytorchcv and official-code layouts are converted (:mod:`.convert`), then
    weights whose keys differ from the model's fail with torch's strict error.

    Why: timm loads with ``strict=False`` whenever it drops a classifier of another size, which would also let
    missing or unexpected keys elsewhere pass. Shapes stay torch's to check (it raises on them either way) and
    the stem is adapted by timm after this filter, so only the head and stem adaptation is allowed. A model
    built for another ``num_classes`` (0: no head) does not take the weights' classifier: its keys are left out
    on both sides and the new head keeps its initialisation, as timm does.
    """
    state_dict = convert_state_dict(state_dict, model, check_shapes=False)
    expected = model.state_dict().keys()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if getattr(model, "num_classes", None) != cfg.get("num_classes"):
        heads = cfg.get("classifier") or ()
        heads = {heads} if isinstance(heads, str) else set(heads)
        state_dict = {k: v for k, v in state_dict.items() if k.rpartition(".")[0] not in heads}
        expected = {k for k in expected if k.rpartition(".")[0] not in heads}
    if state_dict.keys() != expected:
        model.load_state_dict(state_dict, strict=True)  # raises, listing missing, unexpected, misshaped keys
    return state_dict


def prepare_pretrained(variant: str, kwargs: Dict[str, Any]) -> None:
    """Builder hook for ``pretrained=True``: hand timm a verified local file, loaded with :func:`strict_keys`.

    Set here, not through ``create_model`` kwargs, which would end up in ``model._model_args`` and break
    ``save_for_hf``. timm's ``load_pretrained`` still adapts the head (``num_classes``) and stem (``in_chans``).
    """
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("state_dict") is None:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=overlay).to_dict()
        path = resolve_weights(cfg, variant)
        if path is not None:
            kwargs["pretrained_cfg_overlay"] = {**overlay, "file": path, "source": ""}
    kwargs.setdefault("pretrained_filter_fn", strict_keys)


def tag_model_args(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The ``create_model`` arguments the tag in ``kwargs`` needs (``model_args``), set where the caller gave none.

    Why: a tag names weights, and weights trained with ``fusion="product"`` need a model that multiplies.
    Returns them, for the builder to record in ``model._model_args`` (exports then rebuild the same model).
    """
    tag = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg")).tag
    args = copy.deepcopy(WEIGHT_METADATA.get(f"{variant}.{tag}", {}).get("model_args", {}))
    for key, value in args.items():
        kwargs.setdefault(key, value)
    return args


@dataclass(frozen=True)
class PretrainedInfo:
    """One shipped weight: ``name`` (``arch.tag``), where it lives and what it measured (percent)."""

    name: str
    hf_hub_id: Optional[str]
    revision: Optional[str]
    dataset: Optional[str]
    metrics: Dict[str, float]
    num_classes: Optional[int]
    input_size: Optional[tuple]
    mirrored: bool
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def list_pretrained(pattern: str = "*") -> List[PretrainedInfo]:
    """The tags in :data:`WEIGHT_METADATA` that timm has registered, with their metrics, sorted by name."""
    out = []
    for name in timm.list_pretrained(pattern):
        if name not in WEIGHT_METADATA or not fnmatch.fnmatch(name, pattern):
            continue
        meta, cfg = dict(WEIGHT_METADATA[name]), get_pretrained_cfg(name)
        out.append(PretrainedInfo(
            name=name, hf_hub_id=cfg.hf_hub_id, revision=meta.pop("hf_hub_revision", None),
            dataset=meta.pop("dataset", None), metrics={k: meta.pop(k) for k in ("top1", "top5") if k in meta},
            num_classes=cfg.num_classes, input_size=tuple(cfg.input_size) if cfg.input_size else None,
            mirrored=(mirror_root() / name / WEIGHTS_NAME).is_file(), extra=meta,
        ))
    return sorted(out, key=lambda p: p.name)
