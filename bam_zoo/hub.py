"""The one boundary between bam-zoo and the Hugging Face Hub: write, read, push.

Why one module: every byte that leaves or enters the process through the Hub (or its offline
mirror, ``checkpoints/<arch>.<tag>/``) goes through here, so the safety rules hold in one place:

* the layout is exactly timm's ``push_to_hf_hub`` layout (``config.json`` written by timm's own
  ``save_for_hf``, ``model.safetensors``, ``README.md`` with YAML metadata), so a bam-zoo model loads
  with ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` after ``import bam_zoo`` and a BAM model
  pushed with timm's own function loads with bam-zoo;
* weights come from safetensors only, never from a pickle downloaded from the Hub;
* state dicts load strictly; every mismatch that is not the deliberate head / ``in_chans``
  adaptation is reported by key (:class:`~bam_zoo.errors.StateDictMismatchError`);
* Hub failures become the bam-zoo errors of :mod:`bam_zoo.errors`, whose messages say how to fix them;
* tokens are left to ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``) and never printed.

Only the real ``huggingface_hub`` client talks to the Hub. It reads ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when it is imported; set them before starting Python.

Writing:
    :func:`save_pretrained` (a model to a folder), :func:`push` / :func:`push_main` (a Lightning
    ``.ckpt`` or an exported folder to a Hub repo, in one atomic commit).

Reading:
    :func:`resolve_pretrained_file` (a registered ``arch.tag`` to a local safetensors file: Hub, else
    mirror), :func:`create_model_from_hub` (``hf-hub:ORG/NAME[@REV]``), :func:`load_safetensors`,
    :func:`check_state_dict`, :func:`list_pretrained`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import (
    BamZooError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    HubAuthError,
    HubOfflineError,
    PretrainedNotFoundError,
    PushError,
    RepoNotFoundError,
    StateDictMismatchError,
    UnregisteredArchitectureError,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "README_NAME",
    "PretrainedInfo",
    "save_pretrained",
    "push",
    "push_main",
    "load_checkpoint_for_push",
    "resolve_pretrained_file",
    "create_model_from_hub",
    "load_safetensors",
    "check_state_dict",
    "list_pretrained",
    "mirror_root",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"

#: Tags every bam-zoo model card carries (timm's defaults plus ours).
CARD_TAGS = ("image-classification", "timm", "bam", "attention")
BAM_PAPER = "arXiv:1807.06514"
BAM_CITATION = """@inproceedings{park2018bam,
  title={BAM: Bottleneck Attention Module},
  author={Park, Jongchan and Woo, Sanghyun and Lee, Joon-Young and Kweon, In So},
  booktitle={British Machine Vision Conference (BMVC)},
  year={2018}
}"""

#: How metric keys are written in the model-index: key -> (metric type, display name).
#: Values are given in percent for accuracies (``top1=92.4``), as in timm's result tables.
_METRIC_TYPES = {
    "top1": ("accuracy", "Top-1 accuracy (%)"),
    "top5": ("top_5_accuracy", "Top-5 accuracy (%)"),
    "loss": ("loss", "Cross-entropy loss"),
}


# --------------------------------------------------------------------------------------------------
# Write: one function, timm's layout
# --------------------------------------------------------------------------------------------------


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    *,
    model_name: str,
    label_names: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model`` to ``save_directory`` in exactly the layout timm's ``push_to_hf_hub`` uploads.

    Why timm's layout and timm's writer: so the same folder loads with
    ``timm.create_model("hf-hub:...")`` (after ``import bam_zoo``) and with
    ``timm.create_model("local-dir:...")``, and so that nothing here has to track timm's config schema.

    Files written:

    * ``config.json``: by :func:`timm.models._hub.save_for_hf` (architecture, num_classes, num_features,
      global_pool, label_names, pretrained_cfg, model_args) plus a ``bam_zoo`` entry holding
      ``model_name``, ``dataset``, ``metrics`` and ``recipe`` (timm ignores unknown top-level keys);
    * ``model.safetensors``: the state dict (safetensors only, no pickle);
    * ``README.md``: model card with YAML metadata (``library_name: timm``, tags incl. ``bam`` and
      ``image-classification``, license, datasets, ``model-index`` with the measured ``metrics``) and a
      results table.

    Args:
        model: A model built by timm's ``build_model_with_cfg`` (so it has ``pretrained_cfg``), e.g.
            from ``bam_zoo.create_model`` or ``timm.create_model``.
        save_directory: Folder to write into (created if needed; existing files are overwritten).
        model_name: Name of these weights, e.g. ``"bam_resnet20.fmnist"``; the model card's title.
        label_names: Class names in classifier order, stored in ``config.json``.
        metrics: Measured results, e.g. ``{"top1": 92.41, "top5": 99.83}`` (accuracies in percent);
            written to ``model-index`` and the results table. Non-finite values are rejected.
        dataset: Dataset the weights were trained / evaluated on, e.g. ``"fashion_mnist"``.
        recipe: The training configuration (e.g. the resolved LightningCLI config), so the card says
            how to reproduce the weights. Must be JSON-serializable.
        model_args: Serializable reconstruction arguments for ``create_model`` beyond those timm
            recorded itself (e.g. ``{"bam_args": {"reduction": 16}}``).
        repo_id: The Hub repository the folder is for, if known; used in the card's usage example.

    Returns:
        The folder, as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``model`` has no ``pretrained_cfg`` (not built through timm), a metric is not a
            finite number, or ``recipe`` / ``model_args`` is not JSON-serializable.
    """
    from timm.models._hub import generate_readme, save_for_hf

    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise ValueError(
            f"{type(model).__name__} has no timm pretrained_cfg; build it with bam_zoo.create_model or "
            f"timm.create_model so config.json can describe it."
        )
    metrics = {str(k): _finite(k, v) for k, v in (metrics or {}).items()}
    recipe = dict(recipe) if recipe is not None else None
    try:
        json.dumps(recipe)
    except (TypeError, ValueError) as e:
        raise ValueError(f"recipe must be JSON-serializable: {e}") from e

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    bam_meta = {"model_name": model_name, "dataset": dataset, "metrics": metrics, "recipe": recipe}
    model_config: dict[str, Any] = {"bam_zoo": {k: v for k, v in bam_meta.items() if v not in (None, {})}}
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label_names for a model with {model.num_classes} classes.")
        model_config["label_names"] = label_names

    was_training = model.training
    model.eval()
    try:
        save_for_hf(
            model,
            str(save_directory),
            model_config=model_config,
            model_args=dict(model_args) if model_args else None,
            safe_serialization=True,
        )
    finally:
        model.train(was_training)

    config = json.loads((save_directory / CONFIG_NAME).read_text())
    card = _model_card(model, config, model_name=model_name, metrics=metrics, dataset=dataset, recipe=recipe,
                       generate_readme=generate_readme, repo_id=repo_id)
    (save_directory / README_NAME).write_text(card, encoding="utf-8")
    return save_directory


def _finite(key: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r} must be a number, got {value!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"metric {key!r} is {value}; only measured, finite values go on a model card")
    return value


def _model_card(
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    model_name: str,
    metrics: Mapping[str, float],
    dataset: str | None,
    recipe: Mapping[str, Any] | None,
    generate_readme: Any,
    repo_id: str | None = None,
) -> str:
    """timm's ``generate_readme`` card, plus the ``model-index`` metadata and a results table."""
    from huggingface_hub import EvalResult, ModelCard

    pretrained_cfg = config.get("pretrained_cfg", {})
    num_params = sum(p.numel() for p in model.parameters())
    details: dict[str, Any] = {
        "Model Type": "Image classification / feature backbone",
        "Architecture": config["architecture"],
        "Model Stats": {
            "Params (M)": round(num_params / 1e6, 3),
            "Image size": "x".join(str(s) for s in pretrained_cfg.get("input_size", ())[1:]),
            "Input channels": pretrained_cfg.get("input_size", (None,))[0],
            "Classes": config.get("num_classes"),
        },
        "Papers": {"BAM: Bottleneck Attention Module": f"https://arxiv.org/abs/{BAM_PAPER.split(':')[1]}"},
    }
    if dataset:
        details["Dataset"] = dataset
    card_dict = {
        "tags": list(CARD_TAGS),
        "license": pretrained_cfg.get("license") or "mit",
        "details": details,
        "description": (
            f"A {config['architecture']} image classifier"
            + (" with BAM (Bottleneck Attention Module) blocks" if "bam" in config["architecture"] else "")
            + ", exported by bam-zoo" + (f"; trained on {dataset}." if dataset else ".")
        ),
        "usage": _usage_text(repo_id or f"ORG/{model_name}"),
    }
    card = ModelCard(generate_readme(card_dict, model_name, task_name="image-classification"))
    card.data.model_name = model_name
    if metrics:
        card.data.eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset or "unknown",
                dataset_name=dataset or "unknown",
                metric_type=_METRIC_TYPES.get(key, (key, key))[0],
                metric_name=_METRIC_TYPES.get(key, (key, key))[1],
                metric_value=value,
            )
            for key, value in metrics.items()
        ]
    # Results first: they are what a reader of the card looks for; the citation closes it, as in timm's cards.
    card.text = (card.text + _results_table(metrics, dataset) + _recipe_text(recipe)
                 + f"\n## Citation\n```bibtex\n{BAM_CITATION}\n```\n")
    return str(card)


def _usage_text(repo_id: str) -> str:
    return (
        "```python\n"
        "import bam_zoo, timm\n\n"
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)  # or bam_zoo.create_model\n"
        "model.eval()\n"
        "cfg = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**cfg)\n"
        "```\n"
    )


def _results_table(metrics: Mapping[str, float], dataset: str | None) -> str:
    if not metrics:
        return "\n## Results\n\nNo measured results were recorded for these weights.\n"
    rows = "".join(
        f"| {dataset or '-'} | {_METRIC_TYPES.get(k, (k, k))[1]} | {v:.4g} |\n" for k, v in metrics.items()
    )
    return "\n## Results\n\n| Dataset | Metric | Value |\n|---|---|---|\n" + rows


def _recipe_text(recipe: Mapping[str, Any] | None) -> str:
    if not recipe:
        return ""
    return (
        "\n## Training recipe\n\nThe configuration these weights were trained with "
        "(`python cli.py fit --config recipe.yaml`):\n\n```json\n" + json.dumps(recipe, indent=2, default=str) + "\n```\n"
    )


# --------------------------------------------------------------------------------------------------
# Read: safetensors only, strict
# --------------------------------------------------------------------------------------------------


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors, turning parser failures into a clear error.

    Why not ``torch.load``: files from the Hub (or anywhere else we did not write in this process)
    are never unpickled; safetensors cannot run code.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The state dict.

    Raises:
        CorruptCheckpointError: The file is truncated, not safetensors, or holds non-tensor data.
        FileNotFoundError: The file does not exist.
    """
    import safetensors.torch
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CorruptCheckpointError(str(path), str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _check_safetensors(path: str | Path) -> None:
    """Open the header (cheap): a truncated or non-safetensors file fails here, with a clear message."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CorruptCheckpointError(str(path), str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    source: str = "checkpoint",
    allow_adaptation: bool = True,
) -> Mapping[str, torch.Tensor]:
    """Raise if ``state_dict`` does not fit ``model``, listing every missing, unexpected and misshaped key.

    Why: ``load_state_dict(strict=False)`` would give a model that runs but predicts noise, and
    torch's own strict error stops at the first kind of problem. The two mismatches timm adapts on
    purpose are allowed when ``allow_adaptation`` is true: the classifier when the model's
    ``num_classes`` differs from its ``pretrained_cfg['num_classes']`` (timm re-initialises the head),
    and the first conv's input-channel dimension (timm's ``adapt_input_conv``).

    Usable as timm's ``pretrained_filter_fn`` (``filter_fn(state_dict, model)``): it returns
    ``state_dict`` unchanged.

    Args:
        state_dict: The weights to load.
        model: The model they are for (its ``pretrained_cfg`` names ``classifier`` and ``first_conv``).
        source: Where the weights came from, for the message.
        allow_adaptation: Allow timm's deliberate head / ``in_chans`` adaptation (see above).

    Returns:
        ``state_dict``, unchanged.

    Raises:
        StateDictMismatchError: Any other difference.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    expected = model.state_dict()
    head_keys: set[str] = set()
    if allow_adaptation and cfg.get("classifier") and cfg.get("num_classes") is not None \
            and getattr(model, "num_classes", cfg["num_classes"]) != cfg["num_classes"]:
        classifiers = (cfg["classifier"],) if isinstance(cfg["classifier"], str) else tuple(cfg["classifier"])
        head_keys = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    first_convs = cfg.get("first_conv") or ()
    stem_keys = {f"{c}.weight" for c in ((first_convs,) if isinstance(first_convs, str) else first_convs)}

    missing = [k for k in expected if k not in state_dict and k not in head_keys]
    unexpected = [k for k in state_dict if k not in expected and k not in head_keys]
    mismatched = []
    for key, tensor in state_dict.items():
        if key not in expected or key in head_keys or tuple(tensor.shape) == tuple(expected[key].shape):
            continue
        a, b = tuple(tensor.shape), tuple(expected[key].shape)
        if allow_adaptation and key in stem_keys and len(a) == len(b) == 4 and (a[0], *a[2:]) == (b[0], *b[2:]):
            continue  # in_chans adaptation: timm's adapt_input_conv sums / repeats the input channels
        mismatched.append((key, a, b))
    if missing or unexpected or mismatched:
        name = cfg.get("architecture") or type(model).__name__
        raise StateDictMismatchError(missing, unexpected, mismatched, source=source, model_name=name)
    return state_dict


# --------------------------------------------------------------------------------------------------
# Hub errors -> bam-zoo errors
# --------------------------------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _translate(
    e: BaseException, *, name: str, repo_id: str, revision: str | None, filename: str
) -> BamZooError | None:
    """The bam-zoo error for a ``huggingface_hub`` failure, or ``None`` if it is not a Hub failure."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _endpoint()
    if isinstance(e, LocalTokenNotFoundError):
        return HubAuthError(repo_id, endpoint, "no token found")
    if isinstance(e, GatedRepoError):
        return HubAuthError(repo_id, endpoint, "the repository is gated; request access on its page first")
    if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
        return RepoNotFoundError(repo_id, revision, endpoint)
    if isinstance(e, RemoteEntryNotFoundError):
        return PretrainedNotFoundError(name, filename, repo_id=repo_id, revision=revision,
                                       hint="The repository has no such file: check the name and revision.")
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubOfflineError(name, _cache_dir())
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            return HubAuthError(repo_id, endpoint, "invalid or missing token")
        if status == 403:
            return HubAuthError(repo_id, endpoint, "the token has no write access to this namespace")
        return None
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(("httpx", "httpcore")):
        return HubOfflineError(name, _cache_dir())
    return None


def _hub_reachable(repo_id: str, filename: str, revision: str | None) -> bool:
    """One HEAD request without retries: is the Hub there at all?

    Why: when it is not, ``hf_hub_download`` retries with back-off for about 20 s before giving up;
    with a mirrored copy at hand that wait buys nothing.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision, endpoint=_endpoint()))
    except HfHubHTTPError:
        return True  # it answered; hf_hub_download turns the answer into the right error
    except Exception as e:
        return not (isinstance(e, (ConnectionError, TimeoutError))
                    or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2"))
    return True


def _download(repo_id: str, filename: str, revision: str | None, *, name: str, local_only: bool = False) -> str:
    """``hf_hub_download`` (cache, HF_ENDPOINT, HF_HUB_OFFLINE, revisions) with bam-zoo errors."""
    from huggingface_hub import hf_hub_download

    from . import __version__

    try:
        return hf_hub_download(repo_id, filename, revision=revision, library_name="bam-zoo",
                               library_version=__version__, local_files_only=local_only)
    except Exception as e:
        err = _translate(e, name=name, repo_id=repo_id, revision=revision, filename=filename)
        if err is None:
            raise
        raise err from e


# --------------------------------------------------------------------------------------------------
# Pretrained tags: the Hub, else the offline mirror
# --------------------------------------------------------------------------------------------------


def mirror_root() -> Path:
    """The offline mirror: ``$BAM_ZOO_CHECKPOINTS``, else the repository's ``checkpoints/`` folder.

    It holds one folder per tag, ``<arch>.<tag>/``, in the Hub layout (``config.json``,
    ``model.safetensors``, ``README.md``), so a clone of the repository works without network.
    """
    env = os.environ.get("BAM_ZOO_CHECKPOINTS")
    if env:
        return Path(env).expanduser()
    import bam_zoo

    return Path(bam_zoo.__file__).resolve().parents[1] / "checkpoints"


def _weight_metadata(name: str) -> dict[str, Any]:
    """What ``bam_zoo.models.pretrained.WEIGHT_METADATA`` records for ``arch.tag`` (empty if nothing)."""
    try:
        from .models.pretrained import WEIGHT_METADATA
    except ImportError:  # models not importable: the cfg alone still resolves
        return {}
    return dict(WEIGHT_METADATA.get(name, {}))


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: str | Path, sha256: str | None) -> str:
    if sha256:
        actual = _sha256(path)
        if actual != sha256.lower():
            raise ChecksumMismatchError(str(path), sha256.lower(), actual)
    _check_safetensors(path)
    return str(path)


def _local_weights(file: str | Path) -> str:
    """The weights of a user-chosen local file or Hub-layout folder (``local-dir:``, ``pretrained_file``)."""
    path = Path(file).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise PretrainedNotFoundError(str(file), path.name, reason="no such file",
                                      hint="Pass a model.safetensors file or a folder written by save_pretrained.")
    if path.suffix == ".safetensors":
        _check_safetensors(path)
    return str(path)  # other local formats: the user's own file, timm loads it with weights_only=True


def resolve_pretrained_file(pretrained_cfg: Mapping[str, Any] | Any, *, variant: str) -> str:
    """A local ``model.safetensors`` for a pretrained cfg: from the Hub, else from the offline mirror.

    Why here and not in timm: timm would fall back to pickled ``pytorch_model.bin`` files and knows
    nothing of the repository's mirror. The builder hands the returned path to timm as
    ``pretrained_cfg_overlay=dict(file=path)``, so timm's own ``load_pretrained`` still adapts the
    head and ``in_chans``.

    Order:

    0. A ``file`` already in the cfg (``local-dir:`` names, ``pretrained_file=``) is the user's own
       choice: it is returned as is (a folder gives its ``model.safetensors``).
    1. ``hf_hub_download(hf_hub_id, "model.safetensors", revision=...)``: honours ``HF_ENDPOINT``,
       ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (a cached copy is used offline). The
       revision is ``hf_hub_revision`` / ``revision`` from the cfg, else ``hf_hub_revision`` from
       ``WEIGHT_METADATA[arch.tag]``, else the ``@rev`` suffix of ``hf_hub_id``, else ``main``.
    2. If the Hub cannot serve it (unreachable, offline with an empty cache, repo / revision / file
       not found) and the cfg names a tag: ``<mirror_root()>/<arch>.<tag>/model.safetensors``, with a
       warning that says why.

    The file is checked against ``sha256`` (cfg or ``WEIGHT_METADATA``) when one is recorded, and its
    safetensors header is parsed.

    Args:
        pretrained_cfg: A resolved timm pretrained cfg (dict or ``PretrainedCfg``) with ``hf_hub_id``,
            ``architecture`` and ``tag``; for ``hf-hub:`` names (``source='hf-hub'``) no mirror is used.
        variant: The architecture being built (used when the cfg has no ``architecture``).

    Returns:
        Path of a local, verified ``.safetensors`` file.

    Raises:
        HubAuthError: The Hub rejected the token (no fallback: fix the token).
        HubOfflineError: The Hub is unreachable / offline, nothing is cached and nothing is mirrored.
        RepoNotFoundError: No such repo or revision and no mirror for this name.
        PretrainedNotFoundError: Neither the Hub nor the mirror has the file, or the cfg names none.
        ChecksumMismatchError: The file's sha256 differs from the recorded one.
        CorruptCheckpointError: The file is not readable safetensors.
    """
    from timm.models._hub import hf_split

    cfg = dict(pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg)
    if cfg.get("file"):  # a local file or export folder the user chose (local-dir:, pretrained_file=)
        return _local_weights(cfg["file"])
    arch = cfg.get("architecture") or variant
    from_hf_name = cfg.get("source") == "hf-hub"
    tag = None if from_hf_name else cfg.get("tag")
    name = f"{arch}.{tag}" if tag else (cfg.get("hf_hub_id") or arch)
    meta = _weight_metadata(name) if tag else {}
    filename = cfg.get("hf_hub_filename") or WEIGHTS_NAME
    if not filename.endswith(".safetensors"):
        raise PretrainedNotFoundError(name, filename, reason="bam-zoo loads weights from safetensors files only",
                                      hint="Convert the weights to model.safetensors and push them again.")
    sha256 = cfg.get("sha256") or meta.get("sha256")
    mirror_dir = mirror_root() / name if tag else None

    hub_error: BamZooError | None = None
    repo_id = revision = None
    if cfg.get("hf_hub_id"):
        repo_id, id_revision = hf_split(cfg["hf_hub_id"])
        revision = cfg.get("hf_hub_revision") or cfg.get("revision") or meta.get("hf_hub_revision") or id_revision
        # With a mirrored copy, probe once instead of waiting out the client's retries (then: cache, mirror).
        local_only = (mirror_dir is not None and (mirror_dir / filename).is_file()
                      and not _hub_offline() and not _hub_reachable(repo_id, filename, revision))
        try:
            return _verified(_download(repo_id, filename, revision, name=name, local_only=local_only), sha256)
        except (HubOfflineError, RepoNotFoundError, PretrainedNotFoundError) as e:
            if mirror_dir is None:
                raise
            hub_error = e

    if mirror_dir is not None and (mirror_dir / filename).is_file():
        if hub_error is not None:
            _logger.warning("Loading %s from the offline mirror %s (the Hub could not serve it: %s).",
                            name, mirror_dir, str(hub_error).split(". ")[0])
        return _verified(mirror_dir / filename, sha256)
    if isinstance(hub_error, HubOfflineError):
        raise HubOfflineError(name, _cache_dir(), str(mirror_dir)) from hub_error
    raise PretrainedNotFoundError(
        name, filename, repo_id=repo_id, revision=revision, mirror=str(mirror_dir) if mirror_dir else None,
        reason=str(hub_error).split(". ")[0] if hub_error else (None if repo_id else "its pretrained cfg names no hf_hub_id"),
    ) from hub_error


@dataclass(frozen=True)
class PretrainedInfo:
    """One shipped weight (``arch.tag``) with what it measured; an entry of :func:`list_pretrained`.

    Attributes:
        name: ``arch.tag``, what ``create_model(name, pretrained=True)`` takes.
        architecture: The registered architecture.
        tag: The pretrained tag.
        hf_hub_id: The Hub repository (``ORG/NAME``), if any.
        revision: The pinned revision, if any.
        dataset: Dataset trained / evaluated on.
        metrics: Measured results, e.g. ``{"top1": 92.4, "top5": 99.8}`` (percent).
        num_classes: Classifier outputs.
        input_size: ``(C, H, W)``.
        license: License of the weights.
        mirrored: Whether the offline mirror holds the weights.
        extra: Everything else recorded (``num_params``, ``macs``, ``recipe``, ``train_time_s``, ``command``).
    """

    name: str
    architecture: str
    tag: str
    hf_hub_id: str | None
    revision: str | None
    dataset: str | None
    metrics: dict[str, float]
    num_classes: int | None
    input_size: tuple[int, ...] | None
    license: str | None
    mirrored: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_METRIC_KEYS = ("top1", "top5", "loss")


def list_pretrained(pattern: str = "*") -> list[PretrainedInfo]:
    """The pretrained tags bam-zoo registers, with their metrics, sorted by name.

    Why from timm's registry: the tags *are* timm pretrained cfgs (``bam_resnet20.fmnist``), so this
    list and ``timm.list_pretrained()`` cannot disagree. Metrics come from
    ``bam_zoo.models.pretrained.WEIGHT_METADATA`` (keys ``top1``, ``top5`` in percent), else from the
    mirror's ``config.json`` (``bam_zoo.metrics``, written by :func:`save_pretrained`).

    Args:
        pattern: Shell-style wildcard over ``arch.tag``, e.g. ``"bam_resnet20*"``.

    Returns:
        One :class:`PretrainedInfo` per tag that has weights (a Hub id or a mirrored file).
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    import bam_zoo

    own = set(bam_zoo.list_models(include_baselines=True))
    out = []
    for name in timm.list_pretrained(pattern):
        arch, tag = split_model_name_tag(name)
        if arch not in own or not tag:
            continue
        cfg = get_pretrained_cfg(name)
        mirror_dir = mirror_root() / name
        mirrored = (mirror_dir / WEIGHTS_NAME).is_file()
        if not (cfg.hf_hub_id or mirrored):
            continue
        meta = _weight_metadata(name)
        mirror_meta: dict[str, Any] = {}
        if (mirror_dir / CONFIG_NAME).is_file():
            mirror_meta = json.loads((mirror_dir / CONFIG_NAME).read_text()).get("bam_zoo", {})
        metrics = {k: float(meta[k]) for k in _METRIC_KEYS if meta.get(k) is not None}
        metrics = metrics or dict(mirror_meta.get("metrics", {}))
        hub_id, revision = (cfg.hf_hub_id.split("@", 1) + [None])[:2] if cfg.hf_hub_id else (None, None)
        out.append(PretrainedInfo(
            name=name, architecture=arch, tag=tag, hf_hub_id=hub_id,
            revision=meta.get("hf_hub_revision") or revision,
            dataset=meta.get("dataset") or mirror_meta.get("dataset"), metrics=metrics,
            num_classes=cfg.num_classes, input_size=tuple(cfg.input_size) if cfg.input_size else None,
            license=cfg.license, mirrored=mirrored,
            extra={k: v for k, v in meta.items() if k not in _METRIC_KEYS + ("dataset", "hf_hub_revision")},
        ))
    return sorted(out, key=lambda p: p.name)


# --------------------------------------------------------------------------------------------------
# hf-hub:ORG/NAME
# --------------------------------------------------------------------------------------------------


def create_model_from_hub(model_id: str, *, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """Build a model from a Hub repository in timm's layout: ``ORG/NAME`` or ``ORG/NAME@REVISION``.

    Why not just ``timm.create_model("hf-hub:...")`` (which also works after ``import bam_zoo``):
    this path turns every Hub failure into a bam-zoo error with a fix in its message, never falls
    back to a pickled ``pytorch_model.bin``, and reports state-dict mismatches key by key before
    timm's ``load_pretrained`` adapts the head / ``in_chans``.

    Args:
        model_id: ``ORG/NAME``, optionally ``@REVISION`` (branch or commit id); an ``hf-hub:`` prefix
            is accepted.
        pretrained: Load the repository's ``model.safetensors`` (else only its architecture / config).
        **kwargs: Passed to ``timm.create_model`` and override ``config.json``'s ``model_args``
            (e.g. ``num_classes=5`` re-initialises the head, ``in_chans=1`` adapts the stem).

    Returns:
        The model, with ``pretrained_cfg`` from the repository's ``config.json``.

    Raises:
        RepoNotFoundError: No such repository or revision (or it is private to someone else).
        PretrainedNotFoundError: The repository lacks ``config.json`` or ``model.safetensors``.
        HubAuthError: The token was rejected.
        HubOfflineError: Hub unreachable or ``HF_HUB_OFFLINE=1``, and nothing cached.
        UnregisteredArchitectureError: ``config.json`` names an architecture timm does not know.
        CorruptCheckpointError: ``model.safetensors`` is not readable.
        StateDictMismatchError: The weights do not fit the architecture.
    """
    import timm
    from timm.models import load_pretrained
    from timm.models._hub import _parse_model_cfg, hf_split, load_cfg_from_json

    import bam_zoo

    model_id = model_id.removeprefix("hf-hub:").removeprefix("hf_hub:")
    repo_id, revision = hf_split(model_id)
    config_path = _download(repo_id, CONFIG_NAME, revision, name=model_id)
    try:
        raw = load_cfg_from_json(config_path)
        pretrained_cfg, arch, model_args = _parse_model_cfg(raw, {"hf_hub_id": model_id, "source": "hf-hub"})
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(config_path, f"not a timm config.json ({e})", fmt="timm config.json") from e
    if not timm.is_model(arch):
        raise UnregisteredArchitectureError(model_id, arch, bam_zoo.list_models())

    weights = None
    if pretrained:  # fetch before building: a missing or corrupt file fails fast
        weights = load_safetensors(resolve_pretrained_file(pretrained_cfg, variant=arch))

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    build_kwargs = {**model_args, **kwargs}
    if model_args:
        build_kwargs["pretrained_model_args"] = dict(model_args)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **build_kwargs)
    if weights is not None:
        check_state_dict(weights, model, source=f"hf-hub:{model_id}")
        in_chans = build_kwargs.get("in_chans", (pretrained_cfg.get("input_size") or (3,))[0])
        load_cfg = {**model.pretrained_cfg, "state_dict": weights, "source": None, "file": None, "hf_hub_id": None}
        load_pretrained(model, pretrained_cfg=load_cfg, num_classes=model.num_classes, in_chans=in_chans,
                        strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# Push: a Lightning checkpoint or an exported folder, one atomic commit
# --------------------------------------------------------------------------------------------------


@dataclass
class PushSource:
    """A model read from a local checkpoint or folder, ready to export; see :func:`load_checkpoint_for_push`.

    Attributes:
        model: The model, with the checkpoint's weights loaded strictly.
        model_name: The architecture (or ``arch.tag``) it was created with.
        label_names: Class names, if recorded.
        metrics: Metrics recorded with the checkpoint (e.g. the ModelCheckpoint monitor's best score).
        dataset: Dataset name, if recorded.
        recipe: The training hyperparameters, if recorded.
        folder: For an exported folder, the folder itself (its files are pushed byte for byte).
    """

    model: nn.Module
    model_name: str
    label_names: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: str | None = None
    recipe: dict[str, Any] | None = None
    folder: Path | None = None


def _json_safe(obj: Any) -> Any:
    """Hyperparameters as JSON (a Lightning checkpoint may hold callables or tensors)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else repr(o)))


def _torch_load_local(path: Path) -> dict[str, Any]:
    """Load a Lightning checkpoint from the user's own disk (never used for downloaded files)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Hyperparameters may hold Python objects (e.g. callables); the file is the user's own local
        # training output, so a full load is acceptable here. Nothing from the Hub goes this way.
        _logger.info("%s holds Python objects beyond tensors; loading it with weights_only=False", path)
    except Exception as e:
        raise CorruptCheckpointError(str(path), str(e).splitlines()[0], fmt="Lightning checkpoint",
                                     hint="Point --checkpoint at a .ckpt written by `cli.py fit`.") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CorruptCheckpointError(str(path), str(e).splitlines()[0], fmt="Lightning checkpoint",
                                     hint="Point --checkpoint at a .ckpt written by `cli.py fit`.") from e


def _from_lightning(path: Path) -> PushSource:
    import bam_zoo

    ckpt = _torch_load_local(path)
    bad = dict(fmt="Lightning checkpoint", hint="Point --checkpoint at a .ckpt written by `cli.py fit` "
               "(bam_zoo.training.ImageClassifier), or at a folder written by bam_zoo.hub.save_pretrained.")
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CorruptCheckpointError(str(path), "no 'state_dict'", **bad)
    hp = dict(ckpt.get("hyper_parameters") or {})
    model_name = hp.get("model_name")
    if not isinstance(model_name, str):
        raise CorruptCheckpointError(str(path), "no 'hyper_parameters.model_name'", **bad)
    # ImageClassifier evaluates and exports the EMA weights when it keeps them.
    sd = ckpt["state_dict"]
    prefix = "model_ema.module." if any(k.startswith("model_ema.module.") for k in sd) else "model."
    weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not weights:
        raise CorruptCheckpointError(str(path), "no weights under 'model.' in 'state_dict'", **bad)
    kwargs = {"num_classes": hp.get("num_classes"), "in_chans": hp.get("in_chans"), **(hp.get("model_kwargs") or {})}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = bam_zoo.create_model(model_name, pretrained=False, **kwargs)
    check_state_dict(weights, model, source=str(path), allow_adaptation=False)
    model.load_state_dict(weights, strict=True)

    metrics = {}
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping):
            score, monitor = state.get("best_model_score"), state.get("monitor")
            if monitor and score is not None and math.isfinite(float(score)):
                metrics[str(monitor)] = float(score)
    dm_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    dataset = dm_hp.get("dataset") or dm_hp.get("dataset_name")
    recipe = _json_safe({"model": hp, **({"data": dm_hp} if dm_hp else {})})
    return PushSource(model, model_name, label_names=hp.get("label_names"), metrics=metrics,
                      dataset=str(dataset) if dataset else None, recipe=recipe)


def _from_folder(path: Path) -> PushSource:
    import timm
    from timm.models._hub import load_model_config_from_path

    import bam_zoo

    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / needed).is_file():
            raise PretrainedNotFoundError(
                str(path), needed, reason="an exported folder holds config.json and model.safetensors",
                hint="Write it with bam_zoo.hub.save_pretrained, or pass the Lightning .ckpt instead.")
    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(path)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(str(path / CONFIG_NAME), f"not a timm config.json ({e})",
                                     fmt="timm config.json") from e
    if not timm.is_model(arch):
        raise UnregisteredArchitectureError(str(path), arch, bam_zoo.list_models())
    pretrained_cfg = {**pretrained_cfg, "source": None, "file": None}
    model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    weights = load_safetensors(path / WEIGHTS_NAME)
    check_state_dict(weights, model, source=str(path / WEIGHTS_NAME), allow_adaptation=False)
    model.load_state_dict(weights, strict=True)
    meta = json.loads((path / CONFIG_NAME).read_text()).get("bam_zoo", {})
    return PushSource(model, meta.get("model_name", arch), label_names=pretrained_cfg.get("label_names"),
                      metrics=dict(meta.get("metrics", {})), dataset=meta.get("dataset"),
                      recipe=meta.get("recipe"), folder=path)


def load_checkpoint_for_push(path: str | Path) -> PushSource:
    """Read a Lightning ``.ckpt`` or an exported folder into a model, verifying it loads strictly.

    Why verify before pushing: a push is public; what goes up must load with ``hf-hub:`` afterwards.

    A ``.ckpt`` from :class:`bam_zoo.training.ImageClassifier` gives ``hyper_parameters``
    (``model_name``, ``num_classes``, ``in_chans``, ``model_kwargs``, ``label_names``) and the
    ``state_dict`` under ``model.`` (or the EMA weights under ``model_ema.module.``, which the module
    exports when it keeps them). It is a pickle: it is loaded with ``weights_only=True`` first and only
    falls back to a full load because it is the user's own local file.

    Args:
        path: A ``.ckpt`` file, or a folder with ``config.json`` + ``model.safetensors``.

    Returns:
        A :class:`PushSource`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: Not a readable checkpoint / config.
        PretrainedNotFoundError: The folder lacks ``config.json`` or ``model.safetensors``.
        UnregisteredArchitectureError: The architecture is not registered.
        StateDictMismatchError: The weights do not fit the architecture.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    return _from_lightning(path)


def _stage(source: PushSource, staging: Path, *, repo_id: str, metrics: Mapping[str, float] | None,
           dataset: str | None) -> list[Path]:
    """Write the files to upload into ``staging``; return them."""
    if source.folder is not None and not metrics and not dataset:
        for name in (CONFIG_NAME, WEIGHTS_NAME, README_NAME):
            if (source.folder / name).is_file():
                shutil.copy2(source.folder / name, staging / name)
        if not (staging / README_NAME).is_file():
            config = json.loads((staging / CONFIG_NAME).read_text())
            from timm.models._hub import generate_readme

            (staging / README_NAME).write_text(_model_card(
                source.model, config, model_name=repo_id.split("/")[-1], metrics=source.metrics,
                dataset=source.dataset, recipe=source.recipe, generate_readme=generate_readme, repo_id=repo_id))
    else:
        save_pretrained(source.model, staging, model_name=repo_id.split("/")[-1], label_names=source.label_names,
                        metrics={**source.metrics, **(metrics or {})}, dataset=dataset or source.dataset,
                        recipe=source.recipe, repo_id=repo_id)
    return sorted(p for p in staging.iterdir() if p.is_file())


def push(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    token: str | None = None,
) -> Any:
    """Push a Lightning ``.ckpt`` or an exported folder to a Hub repo in one atomic commit.

    Why one commit with a parent check: the repo never shows a half-uploaded model (new weights with
    an old config), and a concurrent push to the same branch makes this one fail rather than
    silently interleave. If anything fails after the repo (or branch) was created for this push, it
    is deleted again, so a failed push leaves the remote as it was.

    Args:
        checkpoint: A ``.ckpt`` from ``cli.py fit`` or a folder from :func:`save_pretrained`.
        repo_id: ``ORG/NAME``.
        private: Create the repo private (ignored if it exists, as on the Hub).
        revision: Branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: Commit summary; default ``"Upload <arch> weights with bam-zoo"``.
        metrics: Measured results to record on the card (override those in the checkpoint).
        dataset: Dataset name for the card.
        token: Hub token; default ``HF_TOKEN`` or the ``hf auth login`` token. Never printed.

    Returns:
        ``huggingface_hub.CommitInfo`` (``commit_url``, ``oid``).

    Raises:
        HubAuthError: No token, or the Hub rejected it / it cannot write to ``ORG``.
        PushError: The Hub refused or failed the push (remote unchanged; the reason is in the message).
        CorruptCheckpointError, StateDictMismatchError, UnregisteredArchitectureError,
        PretrainedNotFoundError: The local checkpoint is unusable (nothing was sent).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from . import __version__

    source = load_checkpoint_for_push(checkpoint)
    branch = revision or "main"
    token = token or get_token()
    if not token:
        raise HubAuthError(repo_id, _endpoint(), "no token found")
    api = HfApi(token=token, library_name="bam-zoo", library_version=__version__)

    with tempfile.TemporaryDirectory(prefix="bam-zoo-push-") as tmp:
        files = _stage(source, Path(tmp), repo_id=repo_id, metrics=metrics, dataset=dataset)
        created_repo = created_branch = False
        try:
            if not api.repo_exists(repo_id):
                api.create_repo(repo_id, private=private)
                created_repo = True
            if branch != "main" and branch not in {b.name for b in api.list_repo_refs(repo_id).branches}:
                api.create_branch(repo_id, branch=branch)
                created_branch = True
            parent = api.repo_info(repo_id, revision=branch).sha
            operations = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files]
            return api.create_commit(
                repo_id, operations, revision=branch, parent_commit=parent,
                commit_message=commit_message or f"Upload {source.model_name} weights with bam-zoo",
                commit_description=f"Pushed by bam-zoo {__version__} from {Path(checkpoint).name}.",
            )
        except Exception as e:
            rollback = _rollback(api, repo_id, branch, created_repo=created_repo, created_branch=created_branch)
            err = _translate(e, name=repo_id, repo_id=repo_id, revision=branch, filename=WEIGHTS_NAME)
            if isinstance(err, HubAuthError):
                raise err from e
            if isinstance(err, HubOfflineError):
                reason = f"the Hub at {_endpoint()} cannot be reached or HF_HUB_OFFLINE=1 ({_first_line(e)})"
            else:
                reason = str(err) if err is not None else _first_line(e)
            if rollback:
                reason += f" ({rollback})"
            raise PushError(str(checkpoint), repo_id, branch, reason) from e


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:2])}" if lines else type(e).__name__


def _rollback(api: Any, repo_id: str, branch: str, *, created_repo: bool, created_branch: bool) -> str:
    """Undo what this push created; return a note if that failed too."""
    try:
        if created_repo:
            api.delete_repo(repo_id, missing_ok=True)
        elif created_branch:
            api.delete_branch(repo_id, branch=branch)
    except Exception as e:  # the original failure matters more; say what is left behind
        what = f"repo {repo_id!r}" if created_repo else f"branch {branch!r}"
        return f"could not delete the {what} created for this push: {_first_line(e)}"
    return ""


def _parse_metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"metric {key!r}: {value!r} is not a number") from None


def push_main(argv: Sequence[str] | None = None) -> int:
    """The ``push`` subcommand: ``python cli.py push --checkpoint PATH --repo-id ORG/NAME ...``.

    Prints the commit URL on success. Errors are printed as one message that says what to fix (no
    traceback, never the token) and give exit status 1; bad arguments give 2, as argparse does.

    Args:
        argv: The arguments after ``push`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="cli.py push",
        description="Push a Lightning checkpoint or an exported folder to the Hugging Face Hub in timm's "
                    "layout (config.json, model.safetensors, README.md), as one atomic commit. The token "
                    "comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .ckpt from `cli.py fit`, or an exported folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit-message", default=None, help="commit summary")
    parser.add_argument("--metric", action="append", type=_parse_metric, default=[], metavar="KEY=VALUE",
                        help="a measured result for the model card, e.g. top1=92.4 (repeatable)")
    parser.add_argument("--dataset", default=None, help="dataset name for the model card")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        print(f"error: --repo-id must be ORG/NAME, got {args.repo_id!r}", file=sys.stderr)
        return 2
    try:
        info = push(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                    commit_message=args.commit_message, metrics=dict(args.metric), dataset=args.dataset)
    except (BamZooError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(info.commit_url)
    return 0
