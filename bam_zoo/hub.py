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

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CorruptCheckpointError

_logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "README_NAME",
    "save_pretrained",
    "load_safetensors",
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
                       generate_readme=generate_readme)
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
        "usage": _usage_text(model_name),
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


def _usage_text(model_name: str) -> str:
    return (
        "```python\n"
        "import bam_zoo, timm\n\n"
        f"model = timm.create_model('hf-hub:ORG/{model_name}', pretrained=True)  # or bam_zoo.create_model\n"
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
