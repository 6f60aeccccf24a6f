"""The checkpoint format of ``cli.py fit``, read back without Lightning: the network and what describes it.

A ``.ckpt`` is Lightning's dict: :class:`~bam_zoo.training.ImageClassifier`'s ``hyper_parameters`` rebuild the
network, its ``state_dict`` holds the weights under ``model.`` (and the EMA copy under ``model_ema.module.``),
and each ``ModelCheckpoint`` callback's state holds its best monitored score. This module is the one place
that knows it; ``bam_zoo.hub.push`` and the scripts read checkpoints through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import bam_zoo
from bam_zoo.errors import CorruptCheckpointError, UnsafeCheckpointError
from bam_zoo.models.convert import check_keys, read_checkpoint

__all__ = ["FitCheckpoint", "decode_fit_checkpoint", "read_fit_checkpoint"]

MODEL_PREFIX, EMA_PREFIX = "model.", "model_ema.module."
#: ModelCheckpoint monitors whose best score is a card metric, and its key there
MONITORED = {"val/acc1": "val_top1", "val/acc5": "val_top5"}


@dataclass
class FitCheckpoint:
    """A decoded ``cli.py fit`` checkpoint: its strictly loaded network and what describes it."""

    model: nn.Module
    model_name: str
    ema: bool  #: whether ``model`` holds the EMA weights
    label_names: list[str] | None
    metrics: dict[str, float]  #: the best monitored validation accuracies in percent (``val_top1``, ``val_top5``)
    dataset: str | None
    recipe: dict[str, Any]  #: the model's and the DataModule's hyperparameters (``{"model": ..., "data": ...}``)


def read_fit_checkpoint(path: str | Path, trust_checkpoint_code: bool = False) -> FitCheckpoint:
    """Read a ``.ckpt`` of ``cli.py fit`` with torch's ``weights_only`` loader (unless trusted) and decode it.

    Raises:
        CorruptCheckpointError: The file is not a Lightning checkpoint of bam-zoo.
        UnsafeCheckpointError: The pickle needs more than ``weights_only`` allows, and it is not trusted.
        CheckpointKeysError: The weights do not fit the network its hyperparameters describe.
    """
    try:
        ckpt = read_checkpoint(path, trust_checkpoint_code=trust_checkpoint_code)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  pickle raises anything for a file that is not one
        raise CorruptCheckpointError(str(path), f"torch.load could not read it: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(str(path), f"it holds a {type(ckpt).__name__}, not a checkpoint dict")
    return decode_fit_checkpoint(ckpt, str(path))


def decode_fit_checkpoint(ckpt: Mapping[str, Any], source: str, ema: bool | None = None) -> FitCheckpoint:
    """The network and facts of a loaded ``cli.py fit`` checkpoint; ``source`` names its file in errors.

    ``ema=False`` loads the weights SGD reached; otherwise the EMA weights where the run kept them, as the run
    validated, tested and exported them.

    Raises:
        CorruptCheckpointError: It has no ``state_dict`` or no ``hyper_parameters.model_name``.
        CheckpointKeysError: The weights do not fit the network its hyperparameters describe.
    """
    hp, state = dict(ckpt.get("hyper_parameters") or {}), ckpt.get("state_dict")
    if not isinstance(state, Mapping) or not isinstance(hp.get("model_name"), str):
        raise CorruptCheckpointError(source, "it has no 'state_dict' and 'hyper_parameters.model_name'")
    ema = ema is not False and any(k.startswith(EMA_PREFIX) for k in state)
    prefix = EMA_PREFIX if ema else MODEL_PREFIX
    kwargs = {"num_classes": hp.get("num_classes"), "in_chans": hp.get("in_chans"), **(hp.get("model_kwargs") or {})}
    model = bam_zoo.create_model(hp["model_name"], add_bam=bool(hp.get("add_bam")),
                                 **{k: v for k, v in kwargs.items() if v is not None})
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_keys(weights, model, f"This checkpoint (its {prefix}* weights)", f"Its hyper_parameters (model_name "
               f"{hp['model_name']}, num_classes, in_chans, model_kwargs) describe another network: pass a checkpoint "
               "`cli.py fit` wrote, unchanged, or the export folder of its run.")
    model.load_state_dict(weights, strict=True)
    metrics = {}  # the best checkpoint's monitored accuracy, as a percentage like every other card metric
    for key, cb in (ckpt.get("callbacks") or {}).items():
        monitor, score = (cb.get("monitor"), cb.get("best_model_score")) if isinstance(cb, Mapping) else (None, None)
        if str(key).startswith("ModelCheckpoint") and monitor in MONITORED and score is not None:
            metrics[MONITORED[monitor]] = round(100.0 * float(score), 4)
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    return FitCheckpoint(model, hp["model_name"], ema, hp.get("label_names"), metrics,
                         data.get("dataset") or data.get("name"), {"model": hp, **({"data": data} if data else {})})
