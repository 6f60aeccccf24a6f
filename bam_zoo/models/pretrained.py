"""Shipped pretrained weights: one timm tag (``arch.tag``) per weight, on the Hub or in a mirror folder
(``checkpoints/`` or ``$BAM_ZOO_CHECKPOINTS``), or published elsewhere (``url``) and converted on load.
What a weight measured is written once, in its own ``config.json`` (:func:`weight_facts`).
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
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
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg

from ..errors import ChecksumMismatchError, WeightsNotFoundError
from .convert import check_keys, convert_state_dict

__all__ = [
    "FASHION_MNIST_LABELS", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FASHION_MNIST_TAGS", "FASHION_MNIST_TWINS",
    "HF_HUB_ORG", "PretrainedInfo", "WEIGHTS_NAME", "WEIGHT_METADATA", "fashion_mnist_cfg", "list_pretrained",
    "mirror_root", "prepare_pretrained", "resolve_weights", "sha256sum", "strict_keys", "tag_model_args",
    "weight_facts",
]

_logger = logging.getLogger(__name__)

HF_HUB_ORG = "bam-zoo"
WEIGHTS_NAME = "model.safetensors"
# Fashion-MNIST's label names and training-set mean / std: one source for the cfgs and FashionMNISTDataModule
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def fashion_mnist_cfg(arch: str, tag: str) -> Dict[str, Any]:
    """A Fashion-MNIST weight entry (timm cfg fields only): 1 x 28 x 28 inputs, 10 classes, its Hub repo."""
    return {
        "hf_hub_id": f"{HF_HUB_ORG}/{arch}.{tag}", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": (7, 7),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "mit", "label_names": FASHION_MNIST_LABELS,
    }


# The weights in checkpoints/: each BAM weight -> its plain twin, the same recipe and seed without BAM (bam_inserted's:
# resnet56.fmnist_long fine-tuned with BAM added by bam_zoo.add_bam; its twin, the same fine-tune without)
FASHION_MNIST_TWINS: Dict[str, str] = {
    "bam_resnet20.fmnist": "resnet20.fmnist",
    "bam_resnet56.fmnist_long": "resnet56.fmnist_long",
    "bam_inserted.resnet56_fmnist_long_ft": "resnet56.fmnist_long_ft",
    "bam_inserted.resnet56_fmnist_long_cycle3": "resnet56.fmnist_long_cycle3",
}
# arch.tag -> timm cfg, each BAM weight followed by its twin
FASHION_MNIST_TAGS = {n: fashion_mnist_cfg(*n.split(".")) for pair in FASHION_MNIST_TWINS.items() for n in pair}

# arch.tag -> the sha256 of model.safetensors, checked on every load (a mirror folder cannot vouch for itself),
# and once pinned the Hub revision (hf_hub_revision). Weights published elsewhere have no folder: their entry
# holds their facts (source, license, what the publisher lists, its sha1) and the model_args they need.
_INSERTED_56 = {"base_model": "resnet56", "bam_stages": ["layer1", "layer2"]}  # add_bam at stages 1-2
WEIGHT_METADATA: Dict[str, Dict[str, Any]] = {
    "bam_resnet20.fmnist": {"sha256": "a9ce83f8bc81dab25ac12f4d00e0cb1ca4547c749228dccf9ffd99069eb79011"},
    "resnet20.fmnist": {"sha256": "dbb47f773ca5b5c41e536c5914a2140dc07237e3c2dd681de40e53721f2cdc5c"},
    "bam_resnet56.fmnist_long": {"sha256": "90b9b02e82657115b7af0b6fdea65c66d223a8fc04d7a061263cc717a3a1a614"},
    "resnet56.fmnist_long": {"sha256": "5ac41146f144be97f9497094703a9823af0a43c7a06384bcef2a99f602830163"},
    "bam_inserted.resnet56_fmnist_long_ft": {
        "sha256": "504a685988d3fde67e6b587856e57261457669086d18edc3d7325f1589b155d7", "model_args": _INSERTED_56},
    "resnet56.fmnist_long_ft": {"sha256": "e4fee7c44620e55578f4a07e657574de767b54bb546b01dd5f3a56dbb7e0e03b"},
    "bam_inserted.resnet56_fmnist_long_cycle3": {
        "sha256": "940967f8d4255d371665a7de56cc6987cdfcaf826270933625c36f194dd3b7c8", "model_args": _INSERTED_56},
    "resnet56.fmnist_long_cycle3": {"sha256": "1c15f705c06b3509e6112679f5d5cda73e056f13cc7259e17797279213d78e13"},
    "bam_resnet50.imgclsmob_in1k": {
        "dataset": "imagenet-1k", "num_params": 25914763, "license": "MIT (osmr/imgclsmob)",
        "source": "pytorchcv (osmr/imgclsmob) release v0.0.499, bam_resnet50-0547-a04adf3c.pth.zip",
        # pytorchcv's model_metainfos.csv: top-5 error on ImageNet-1k val (the column listing resnet50 at 6.33)
        "listed_top5_error": 5.47,
        "sha1": "a04adf3c93f56836509f66668aa90360c9688eb8",
        "model_args": {"bam_args": {"fusion": "product"}},
    },
}


def mirror_root() -> Optional[Path]:
    """The offline mirror (one ``<arch>.<tag>/`` each): ``$BAM_ZOO_CHECKPOINTS``, else the source checkout's
    ``checkpoints/``; ``None`` for an installed package without the variable."""
    env = os.environ.get("BAM_ZOO_CHECKPOINTS")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    return checkout / "checkpoints" if (checkout / "pyproject.toml").is_file() else None


def _mirrored(name: str) -> Optional[Path]:
    root = mirror_root()
    return root / name / WEIGHTS_NAME if root and (root / name / WEIGHTS_NAME).is_file() else None


def sha256sum(path: str | Path, algorithm: str = "sha256") -> str:
    """The file's sha256 (or another ``hashlib`` algorithm's) digest, in hex."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: str | Path, name: str, expected: Optional[str], fix: str, algorithm: str = "sha256") -> str:
    if expected and (actual := sha256sum(path, algorithm)) != expected:
        raise ChecksumMismatchError(str(path), name, expected, actual, fix, algorithm)
    return str(path)


def _download(url: str, name: str, sha1: str) -> str:
    """A ``.zip`` weight in torch.hub's cache, sha1-checked (pytorchcv publishes sha1, torch.hub checks sha256);
    returns its one file, extracted beside it."""
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


def _why_not_hub(error: Exception, repo_id: str) -> str:
    return ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "it cannot be reached"
            if isinstance(error, LocalEntryNotFoundError) else f"{repo_id} does not hold them yet")


def _notice_mirror(error: Exception, repo_id: str) -> None:
    """Say once per process, in plain words, that weights come from the mirror and why."""
    global _mirror_notice_given
    if not _mirror_notice_given:
        _mirror_notice_given = True
        _logger.warning("bam-zoo loads pretrained weights from its offline copies in %s (sha256-checked): the "
                        "Hugging Face Hub was not used because %s.", mirror_root(), _why_not_hub(error, repo_id))


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

    Why not timm's own download: it falls back to a pickled ``pytorch_model.bin`` and knows no mirror. A cfg's
    ``file`` is returned as is; a ``url`` is downloaded once and sha1-checked. Returns ``None`` when the cfg
    names no weights (timm then says so).

    Raises:
        ChecksumMismatchError: The file differs from the recorded sha256.
        WeightsNotFoundError: A tag's weights are neither on the Hub (or its cache) nor mirrored.
        huggingface_hub.errors.HfHubHTTPError: and its subclasses, for ``hf-hub:`` names the Hub cannot serve.
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
    mirrored = _mirrored(name) if tag else None
    local_only = bool(mirrored) and not constants.is_offline_mode() and _hub_unreachable(repo_id, revision)
    try:
        path = hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, library_name="bam-zoo",
                               local_files_only=local_only)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        if mirrored is None and tag:
            raise WeightsNotFoundError(name, _why_not_hub(e, repo_id), mirror_root()) from None
        if mirrored is None:
            e.add_note(f"bam-zoo reads {WEIGHTS_NAME} only: a repo holding only pytorch_model.bin is refused, "
                       "never unpickled.")
            raise
        _notice_mirror(e, repo_id)
        return _verified(mirrored, name, meta.get("sha256"), "the file was changed or is incomplete. These "
                         "weights are not on the Hub: restore the file from the repository "
                         f"(`git checkout -- checkpoints/{name}`) or from where BAM_ZOO_CHECKPOINTS was copied.")
    return _verified(path, name, meta.get("sha256"), f"{repo_id}@{revision or 'main'} holds other weights than "
                     f"bam-zoo recorded. Pin the recorded hf_hub_revision, or delete {path} to download it again.")


def strict_keys(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn``: foreign layouts are converted (:mod:`.convert`), then keys must match.

    Why: timm loads with ``strict=False`` whenever it drops a classifier of another size, which would also let
    other missing or unexpected keys pass. For another ``num_classes`` the classifier keys are left out on both
    sides; shapes stay torch's to check and the stem timm's to adapt.
    """
    state_dict = convert_state_dict(state_dict, model, check_shapes=False)
    expected = model.state_dict().keys()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if getattr(model, "num_classes", None) != cfg.get("num_classes"):
        heads = cfg.get("classifier") or ()
        heads = {heads} if isinstance(heads, str) else set(heads)
        state_dict = {k: v for k, v in state_dict.items() if k.rpartition(".")[0] not in heads}
        expected = {k for k in expected if k.rpartition(".")[0] not in heads}
    check_keys(state_dict, model, "The pretrained state dict", "Pass the architecture it was trained as; num_classes "
               "and in_chans adapt only the head and the stem.", expected)
    return state_dict


def prepare_pretrained(variant: str, kwargs: Dict[str, Any]) -> None:
    """Builder hook for ``pretrained=True``: hand timm a verified local file, loaded with :func:`strict_keys`.

    Set here, not through ``create_model`` kwargs, which would end up in ``model._model_args`` and break
    ``save_for_hf``.
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
    """Set the ``model_args`` the tag in ``kwargs`` needs (e.g. ``fusion="product"``) where the caller gave none;
    returns them for the builder to record in ``model._model_args``, so exports rebuild the same model."""
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


def weight_facts(name: str, folder: Optional[Path] = None) -> Dict[str, Any]:
    """What the weight ``name`` measured and how it was made, as one flat dict (``top1``, ``per_class`` ...): the
    ``bam_zoo`` section of its ``config.json`` in ``folder`` (default: the mirror's), merged with its
    :data:`WEIGHT_METADATA` entry (all that is known without a copy)."""
    root = mirror_root()
    folder = folder or (root / name if root else None)
    config = folder / "config.json" if folder else None
    meta = json.loads(config.read_text()).get("bam_zoo", {}) if config and config.is_file() else {}
    facts = {"dataset": meta["dataset"]} if "dataset" in meta else {}
    return {**facts, **meta.get("metrics", {}), **meta.get("details", {}), **WEIGHT_METADATA.get(name, {})}


def list_pretrained(pattern: str = "*") -> List[PretrainedInfo]:
    """The tags in :data:`WEIGHT_METADATA` that timm has registered, with their metrics, sorted by name."""
    out = []
    for name in timm.list_pretrained(pattern):
        if name not in WEIGHT_METADATA or not fnmatch.fnmatch(name, pattern):
            continue
        meta, cfg = weight_facts(name), get_pretrained_cfg(name)
        out.append(PretrainedInfo(
            name=name, hf_hub_id=cfg.hf_hub_id, revision=meta.pop("hf_hub_revision", None),
            dataset=meta.pop("dataset", None), metrics={k: meta.pop(k) for k in ("top1", "top5") if k in meta},
            num_classes=cfg.num_classes, input_size=tuple(cfg.input_size) if cfg.input_size else None,
            mirrored=_mirrored(name) is not None, extra=meta))
    return sorted(out, key=lambda p: p.name)
