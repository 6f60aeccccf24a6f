"""The one place that knows the ``cli.py fit`` checkpoint format: reads the network and its facts without Lightning.
``hyper_parameters`` rebuild the network, ``state_dict`` holds it under ``model.`` (EMA: ``model_ema.module.``)."""

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

    Raises CorruptCheckpointError (not a bam-zoo Lightning checkpoint), UnsafeCheckpointError (an untrusted pickle
    that needs more than ``weights_only``) or CheckpointKeysError (the weights do not fit their hyperparameters).
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

    ``ema=False`` loads the weights SGD reached, else the EMA weights where the run kept them (as it tested them).
    Raises CorruptCheckpointError (no ``state_dict`` or ``hyper_parameters.model_name``) or CheckpointKeysError.
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
    metrics = {}  # ModelCheckpoint's best monitored accuracy, in percent like every card metric
    for key, cb in (ckpt.get("callbacks") or {}).items():
        monitor, score = (cb.get("monitor"), cb.get("best_model_score")) if isinstance(cb, Mapping) else (None, None)
        if str(key).startswith("ModelCheckpoint") and monitor in MONITORED and score is not None:
            metrics[MONITORED[monitor]] = round(100.0 * float(score), 4)
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    return FitCheckpoint(model, hp["model_name"], ema, hp.get("label_names"), metrics,
                         data.get("dataset") or data.get("name"), {"model": hp, **({"data": data} if data else {})})
