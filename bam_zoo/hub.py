"""The Hub boundary: write an export in timm's layout with a card that describes exactly its weights; push it.

Reading needs no code here: ``timm.create_model("hf-hub:ORG/NAME[@REV]", pretrained=True)`` builds the model
and bam-zoo's builders fetch only ``model.safetensors``. Why not ``timm.models.push_to_hf_hub``: it keeps a
README already in the repo (the card would describe the previous weights), commits without ``parent_commit``
and writes a pickle beside the safetensors by default. The layout is its own, written by ``save_for_hf``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from timm.models import save_for_hf

from . import __version__
from .analysis import count_params
from .errors import MetricConflictError
from .models.convert import from_official, from_pytorchcv, read_checkpoint
from .models.pretrained import WEIGHTS_NAME

__all__ = ["CONFIG_NAME", "README_NAME", "RECIPE_NAME", "WEIGHTS_NAME", "Export", "convert", "load_export", "push",
           "render_details", "save_pretrained", "write_card"]

CONFIG_NAME, README_NAME, RECIPE_NAME = "config.json", "README.md", "recipe.yaml"
#: Metric keys a card accepts, all accuracies in percent (one unit on every card).
METRIC_NAMES = {"top1": "Top-1 accuracy (%)", "top5": "Top-5 accuracy (%)",
                "val_top1": "Validation top-1 accuracy (%)", "val_top5": "Validation top-5 accuracy (%)"}
BAM_CITATION = """@inproceedings{park2018bam,
  title={BAM: Bottleneck Attention Module},
  author={Park, Jongchan and Woo, Sanghyun and Lee, Joon-Young and Kweon, In So},
  booktitle={British Machine Vision Conference (BMVC)},
  year={2018}
}"""


def _checked_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        if key not in METRIC_NAMES:
            raise ValueError(f"metric {key!r}: cards take accuracies in percent, keyed {', '.join(METRIC_NAMES)}")
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 100.0):
            raise ValueError(f"metric {key!r} is {value}; only measured, finite percentages go on a model card")
        out[key] = value
    return out


def save_pretrained(model: nn.Module, save_directory: str | Path, *, model_name: str,
                    label_names: Sequence[str] | None = None, metrics: Mapping[str, float] | None = None,
                    dataset: str | None = None, recipe: Mapping[str, Any] | None = None,
                    model_args: Mapping[str, Any] | None = None, repo_id: str | None = None,
                    details: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` in timm's Hub layout, with a card and config that describe these weights only.

    Files: ``config.json`` (timm's, plus a ``bam_zoo`` entry with ``model_name``, ``dataset``, ``metrics``),
    ``model.safetensors``, ``README.md`` (:func:`write_card`) and, given a ``recipe``, ``recipe.yaml``. The
    source weights' ``tag`` and label names are not carried over: a fine-tune is not the weights it started from.

    Args:
        model_name: Name of these weights, e.g. ``"bam_resnet20.fmnist"``; the card's title.
        label_names: Class names in classifier order; default: the cfg's, if they fit ``num_classes``.
        metrics: Measured accuracies in percent, keyed ``top1``, ``top5``, ``val_top1``, ``val_top5``.
        model_args: JSON-serializable ``create_model`` arguments beyond those timm recorded.
        repo_id: The Hub repo the folder is for, if known; the card's usage example names it.
        details: Facts for the card's "Details" section (:func:`render_details`).
    """
    metrics = _checked_metrics(metrics)
    source_cfg = dict(model.pretrained_cfg)
    labels = list(label_names) if label_names is not None else source_cfg.get("label_names")
    if labels is not None and len(labels) != model.num_classes:
        if label_names is not None:
            raise ValueError(f"{len(labels)} label_names for a model with {model.num_classes} classes.")
        labels = None
    insertion = getattr(model, "bam_insertion", {})  # add_bam's record: which plain weights BAM went into
    inserted_into = insertion.get("base_weights") or insertion.get("base_model")
    meta = {k: v for k, v in {"model_name": model_name, "dataset": dataset, "metrics": metrics,
                              "inserted_into": inserted_into, "details": details and dict(details)}.items() if v}
    folder = Path(save_directory)
    model.pretrained_cfg = {k: v for k, v in source_cfg.items()
                            if k not in ("tag", "label_names", "label_descriptions")}
    # safetensors stores contiguous tensors only: a model trained channels_last exports the same weights, NCHW
    contiguous = model.register_state_dict_post_hook(_contiguous_state)
    try:
        save_for_hf(model, str(folder), model_config={"label_names": [str(n) for n in labels or []], "bam_zoo": meta},
                    model_args=dict(model_args) if model_args else None, safe_serialization=True)
    finally:
        model.pretrained_cfg = source_cfg
        contiguous.remove()
    (folder / RECIPE_NAME).unlink(missing_ok=True)
    if recipe:
        (folder / RECIPE_NAME).write_text(yaml.safe_dump(_plain(recipe), sort_keys=False))
    write_card(folder, num_params=count_params(model), repo_id=repo_id)
    return folder


def convert(source: Literal["pytorchcv", "official"], checkpoint: str | Path, out: str | Path,
            model: str = "bam_resnet50", trust_checkpoint_code: bool = False) -> Path:
    """Write a pytorchcv or official-code BAM checkpoint as an export folder (Hub layout), ready for ``push``.

    The export computes what the source model computed (:mod:`bam_zoo.models.convert`); nothing is measured.

    Args:
        source: ``pytorchcv`` (osmr/imgclsmob's ``.pth``, or its ``.pth.zip``) or ``official``
            (Jongchan/attention-module's ``{"state_dict": ...}``, ``module.`` prefixes allowed).
        checkpoint: The checkpoint file (read with ``torch.load(weights_only=True)``).
        out: Folder to write.
        model: The bam-zoo architecture the checkpoint was trained as, e.g. ``bam_resnet50``.
        trust_checkpoint_code: Unpickle ``checkpoint`` fully, which runs any code its pickle holds. Only for a
            file you trust that torch's ``weights_only`` loader refuses.
    """
    state = read_checkpoint(checkpoint, trust_checkpoint_code=trust_checkpoint_code)
    net = (from_pytorchcv if source == "pytorchcv" else from_official)(state, model)
    return save_pretrained(net, out, model_name=f"{model}.{source}")


def _contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def write_card(folder: Path, *, num_params: int, repo_id: str | None = None) -> None:
    """Write ``README.md`` from the folder's own ``config.json`` and files, so the card cannot disagree with them."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    meta, cfg = config.get("bam_zoo", {}), config.get("pretrained_cfg", {})
    name, arch, dataset = meta.get("model_name") or config["architecture"], config["architecture"], meta.get("dataset")
    metrics, labels = meta.get("metrics", {}), config.get("label_names") or []
    data = ModelCardData(
        library_name="timm", license=cfg.get("license") or "mit", pipeline_tag="image-classification",
        tags=["image-classification", "timm", "bam", "attention"], datasets=[dataset] if dataset else None,
        model_name=name, eval_results=[
            EvalResult(task_type="image-classification", dataset_type=dataset or "unknown",
                       dataset_name=dataset or "unknown", metric_type="accuracy", metric_name=METRIC_NAMES[k],
                       metric_value=v) for k, v in metrics.items()] or None)
    load = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder.resolve()}"
    rows = "".join(f"| {dataset or '-'} | {METRIC_NAMES[k]} | {v:.2f} |\n" for k, v in metrics.items())
    results = "| Dataset | Metric | Value |\n|---|---|---|\n" + rows if rows else "No measured results were recorded.\n"
    recipe = (f"`{RECIPE_NAME}` (in this repository) holds the configuration these weights were trained with"
              + (": `python cli.py fit --config recipe.yaml` reruns it.\n" if _runnable(folder) else ".\n")
              if (folder / RECIPE_NAME).is_file() else "No training configuration was recorded.\n")
    details = f"## Details\n\n{render_details(meta['details'])}\n" if meta.get("details") else ""
    text = f"""
# {name}

{_describe(arch, meta.get("inserted_into"))}, exported by bam-zoo{f'; trained on {dataset}' if dataset else ''}.

- Classes ({config.get('num_classes')}): {', '.join(labels) if labels else 'unnamed'}
- Input: {'x'.join(str(s) for s in cfg.get('input_size', ()))}, mean {cfg.get('mean')}, std {cfg.get('std')}
- Parameters: {num_params / 1e6:.3f}M
- Paper: [BAM: Bottleneck Attention Module](https://arxiv.org/abs/1807.06514)

## Usage

```python
import bam_zoo, timm

model = timm.create_model("{load}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```

## Results

{results}
## Training recipe

{recipe}
{details}## Citation

```bibtex
{BAM_CITATION}
```
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(folder / README_NAME)


def _describe(arch: str, inserted_into: str | None) -> str:
    if inserted_into:
        return f"BAM inserted into {inserted_into} (bam_zoo.add_bam, each BAM starting as the identity)"
    return f"A {arch} image classifier" + (" with BAM (Bottleneck Attention Module) blocks" if "bam" in arch else "")


def render_details(details: Mapping[str, Any]) -> str:
    """Markdown of one checkpoint's facts, for MODEL_CARD.md and its Hub README. Keys (each optional):
    ``architecture``, ``num_params``, ``macs`` (per image at ``input_size``), ``data``, ``recipe``, ``command``,
    ``epochs``, ``train_time_s``, ``train_setting``, ``seed``, ``top1``, ``top5``, ``top1_flip``, ``per_class``;
    a fine-tune of a shipped weight adds its lineage: ``fine_tuned_from``, ``base_command``, ``base_epochs``,
    ``base_train_time_s``, ``total_train_time_s`` (and ``base_fine_tuned_from`` when that start was a fine-tune)."""
    d = details
    lines = [f"- Architecture: {d['architecture']}" if "architecture" in d else ""]
    if "num_params" in d:
        size = "x".join(map(str, d.get("input_size", ())))
        macs = f"; {d['macs'] / 1e6:.2f}M MACs per {size} image" if "macs" in d else ""
        lines.append(f"- Parameters: {d['num_params']:,}{macs}")
    lines.append(f"- Data: {d['data']}" if "data" in d else "")
    if "command" in d:
        lines.append(f"- Trained by: `{d['command']}` (config `{d.get('recipe', 'recipe.yaml')}`): "
                     f"{d.get('epochs', '?')} epochs, seed {d.get('seed', '?')}"
                     + (f", {d['train_time_s'] / 60:.0f} min wall clock" if "train_time_s" in d else "")
                     + (f" ({d['train_setting']})" if "train_setting" in d else ""))
    if "fine_tuned_from" in d:
        earlier = f" (itself fine-tuned from `{d['base_fine_tuned_from']}`)" if "base_fine_tuned_from" in d else ""
        lines.append(f"- Fine-tuned from `{d['fine_tuned_from']}`{earlier}, which was trained by "
                     f"`{d['base_command']}`: {d['base_epochs']} epochs, {d['base_train_time_s'] / 60:.0f} min; "
                     f"{'all' if earlier else 'both'} together {d['total_train_time_s'] / 60:.0f} min of training")
    if "top1" in d:
        flip = f"; top-1 {d['top1_flip']:.2f}% with test-time flip" if "top1_flip" in d else ""
        lines.append(f"- Test accuracy: top-1 {d['top1']:.2f}%, top-5 {d.get('top5', float('nan')):.2f}%{flip}")
    text = "\n".join(line for line in lines if line) + "\n"
    if d.get("per_class"):
        names, values = list(d["per_class"]), list(d["per_class"].values())
        text += ("\nTest top-1 per class (%):\n\n| " + " | ".join(names) + " |\n|" + "---|" * len(names)
                 + "\n| " + " | ".join(f"{v:.1f}" for v in values) + " |\n")
    return text


def _runnable(folder: Path) -> bool:
    """Whether recipe.yaml is a full LightningCLI config (trainer, model and data), not only hyperparameters."""
    recipe = yaml.safe_load((folder / RECIPE_NAME).read_text()) or {}
    return isinstance(recipe, dict) and {"trainer", "model", "data"} <= recipe.keys()


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy (hyperparameters may hold tensors or callables)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else repr(o)))


@dataclass
class Export:
    """Weights read back from a local checkpoint or export folder, with what describes them."""

    model: nn.Module
    name: str | None
    label_names: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: str | None = None
    recipe: dict[str, Any] | None = None
    folder: Path | None = None


def load_export(path: str | Path, trust_checkpoint_code: bool = False) -> Export:
    """Read an export folder or a Lightning ``.ckpt`` of ``cli.py fit`` into a strictly loaded model.

    Why strictly and before any upload: a push is public, and what goes up must load with ``hf-hub:``. A
    ``.ckpt`` is read with torch's ``weights_only`` loader unless ``trust_checkpoint_code``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not an export folder: it has no {' or '.join(missing)}. Write one "
                                    "with bam_zoo.hub.save_pretrained (`cli.py fit` does), or pass the .ckpt.")
        meta = json.loads((path / CONFIG_NAME).read_text()).get("bam_zoo", {})
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
        recipe = yaml.safe_load((path / RECIPE_NAME).read_text()) if (path / RECIPE_NAME).is_file() else None
        return Export(model, meta.get("model_name"), model.pretrained_cfg.get("label_names"), meta.get("metrics", {}),
                      meta.get("dataset"), recipe, path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    # the training package owns its checkpoint format; imported here, as it imports hub to export
    from .training.checkpoint import read_fit_checkpoint

    fit = read_fit_checkpoint(path, trust_checkpoint_code)
    return Export(fit.model, None, fit.label_names, fit.metrics, fit.dataset, _plain(fit.recipe))


def push(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, metrics: dict[str, float] | None = None, dataset: str | None = None,
         token: str | None = None, trust_checkpoint_code: bool = False) -> CommitInfo:
    """Push a Lightning ``.ckpt`` or an export folder to a Hub repo as one commit that names its parent.

    Why ``parent_commit``: a concurrent push to the same branch fails (HTTP 412) instead of interleaving. If the
    commit fails, a repo or branch this push created is deleted again. An export's weights go up byte for byte.

    Args:
        checkpoint: A ``.ckpt`` written by ``cli.py fit``, or an export folder (``save_pretrained``).
        repo_id: ``ORG/NAME`` (created if missing).
        private: Create the repo private.
        revision: Branch to commit to (created from ``main`` if missing).
        commit_message: Commit summary.
        metrics: Measured accuracies in percent the export lacks, e.g. ``{"top1": 92.4}``; a metric the
            export already holds is never replaced.
        dataset: Dataset name for the card, when the export records none.
        token: Hub token; default ``HF_TOKEN`` or the ``hf auth login`` one.
        trust_checkpoint_code: Unpickle a ``.ckpt`` fully, which runs any code its pickle holds. Only for a
            file you trust that torch's ``weights_only`` loader refuses.

    Raises:
        MetricConflictError: ``metrics`` would replace a measured value.
        huggingface_hub.errors.HfHubHTTPError: The Hub refused the push; a note says the remote is unchanged.
    """
    export = load_export(checkpoint, trust_checkpoint_code)
    for key, value in _checked_metrics(metrics).items():
        if key in export.metrics and export.metrics[key] != value:
            raise MetricConflictError(key, export.metrics[key], value, str(checkpoint))
        export.metrics[key] = value
    export.dataset = export.dataset or dataset
    branch = revision or "main"
    name = export.name or repo_id.split("/")[-1]
    api = HfApi(token=token, library_name="bam-zoo", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="bam-zoo-push-") as tmp:
        staging = Path(tmp)
        if export.folder is not None:
            for file in (CONFIG_NAME, WEIGHTS_NAME, RECIPE_NAME):
                if (export.folder / file).is_file():
                    shutil.copy2(export.folder / file, staging / file)
            config = json.loads((staging / CONFIG_NAME).read_text())
            config["bam_zoo"] = {**config.get("bam_zoo", {}), "metrics": export.metrics, "dataset": export.dataset}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            write_card(staging, num_params=count_params(export.model), repo_id=repo_id)
        else:
            save_pretrained(export.model, staging, model_name=name, label_names=export.label_names,
                            metrics=export.metrics, dataset=export.dataset, recipe=export.recipe, repo_id=repo_id)
        created_repo = created_branch = False
        try:
            if not api.repo_exists(repo_id):
                created_repo = bool(api.create_repo(repo_id, private=private))
            if branch != "main" and not api.revision_exists(repo_id, branch):
                api.create_branch(repo_id, branch=branch)
                created_branch = True
            parent = api.repo_info(repo_id, revision=branch).sha
            return api.upload_folder(
                repo_id=repo_id, folder_path=staging, revision=branch, parent_commit=parent,
                commit_message=commit_message or f"Upload {name} with bam-zoo",
                commit_description=f"Pushed by bam-zoo {__version__} from {Path(checkpoint).name}.")
        except Exception as e:
            undone = _undo(api, repo_id, branch, created_repo, created_branch)
            e.add_note(f"bam-zoo: nothing was pushed; the remote repository is unchanged{undone}.")
            raise


def _undo(api: HfApi, repo_id: str, branch: str, created_repo: bool, created_branch: bool) -> str:
    """Delete what this push created; say what was undone (or could not be)."""
    what = f"repo {repo_id}" if created_repo else f"branch {branch}" if created_branch else ""
    try:
        if created_repo:
            api.delete_repo(repo_id, missing_ok=True)
        elif created_branch:
            api.delete_branch(repo_id, branch=branch)
    except Exception as e:  # noqa: BLE001  the push's own failure is the one to raise
        return f", except that the {what} it created could not be deleted ({type(e).__name__})"
    return f" (the {what} created for it was deleted)" if what else ""
