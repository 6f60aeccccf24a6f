"""Callbacks: the Hub-layout export of the tested weights, the ``last.ckpt`` writer, predictions, test curves."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint, Timer
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassAccuracy

from bam_zoo.hub import save_pretrained

__all__ = ["EpochTestAccuracy", "HubExport", "LastCheckpoint", "PredictionWriter"]


class EpochTestAccuracy(pl.Callback):
    """Log test top-1 (``test_curve/acc1``) after every validation, for learning curves over seeds.
    Only recorded, nothing selects on it, so the test set stays held out; every rank evaluates all of it."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("EpochTestAccuracy needs a LightningDataModule (the CLI's --data) to find the test set.")
        datamodule.setup("test")
        accuracy = MulticlassAccuracy(pl_module.hparams.num_classes, average="micro").to(pl_module.device)
        with torch.no_grad():
            for batch in datamodule.test_dataloader():
                x, y = trainer.strategy.batch_to_device(batch)  # runs the DataModule's transfer hooks too
                accuracy.update(pl_module.predict_step(x, 0), y)
        pl_module.log("test_curve/acc1", accuracy.compute(), rank_zero_only=True)


class PredictionWriter(BasePredictionWriter):
    """Write ``predict``'s top-k labels and probabilities per image, in the data's order; rank zero gathers them.

    CSV (``path, label_1, prob_1, ...``) or, for ``.json``, a list of ``{"path", "labels", "probs"}`` (timm's
    ``inference.py`` formats). Images without file names (in-memory data) are named ``#0``, ``#1`` ...

    Args:
        file: output file (``.csv`` or ``.json``); ``None`` writes ``<trainer.default_root_dir>/predictions.csv``.
        topk: labels kept per image (at most the number of classes).
    """

    def __init__(self, file: str | None = None, topk: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.file, self.topk = file, topk
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}  # (dataloader, index in its data set) -> row

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = {}

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        names = pl_module.hparams.label_names or [str(i) for i in range(prediction.shape[-1])]
        probs, indices = prediction.float().topk(min(self.topk, prediction.shape[-1]), dim=-1)
        named = isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], (tuple, list))
        positions = batch_indices or range(len(self.rows), len(self.rows) + len(prediction))
        for n, (position, p, i) in enumerate(zip(positions, probs.tolist(), indices.tolist())):
            self.rows[dataloader_idx, position] = {"path": batch[1][n] if named else f"#{position}",
                                                   "labels": [names[j] for j in i], "probs": [round(v, 6) for v in p]}

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shares = [self.rows]
        if trainer.world_size > 1:
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, self.rows)
        if not trainer.is_global_zero:
            return
        rows = [row for _, row in sorted({k: r for share in shares for k, r in share.items()}.items())]
        out = Path(self.file) if self.file else Path(trainer.default_root_dir) / "predictions.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".json":
            out.write_text(json.dumps(rows, indent=1) + "\n")
        else:
            k = max((len(r["labels"]) for r in rows), default=0)
            with open(out, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path"] + [c for n in range(1, k + 1) for c in (f"label_{n}", f"prob_{n}")])
                writer.writerows([r["path"]] + [v for pair in zip(r["labels"], r["probs"]) for v in pair] for r in rows)
        rank_zero_info(f"Wrote {len(rows)} predictions to {out}")


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``last.ckpt`` that also saves the current step on SIGTERM (mid-validation, with that
    validation to redo). Other exceptions save nothing: after a NaN loss, ``last.ckpt`` stays the last good state."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.validating:  # saved as started, none processed: Lightning reruns it whole (else it skips it)
            progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
            progress.reset(), progress.increment_ready(), progress.increment_started()
        if self._last_global_step_saved != trainer.global_step:
            path = self.format_checkpoint_name(self._monitor_candidates(trainer))
            self._save_checkpoint(trainer, path)
            rank_zero_info(f"SIGTERM: saved epoch {trainer.current_epoch}, step {trainer.global_step} to {path}")


class HubExport(Timer):
    """After ``trainer.test``, export the evaluated weights, model card and ``metrics.json`` (rank zero only).
    A ``Timer`` of the training time, which checkpoints carry, so a resumed run adds the earlier runs' time.

    Args:
        dirpath: output folder; ``None``: ``<trainer.default_root_dir>/export``.
        weights_name: name of the weights on the model card, e.g. ``bam_resnet20.fmnist``;
            ``None`` uses ``<model_name>.<dataset>``.
        enabled: set to false to skip the export (metrics are still logged).
    """

    def __init__(self, dirpath: str | None = None, weights_name: str | None = None, enabled: bool = True) -> None:
        super().__init__()
        self.dirpath, self.weights_name, self.enabled = dirpath, weights_name, enabled

    def state_dict(self) -> dict[str, Any]:
        return {"fit_seconds": self.time_elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.start_time() is None:  # testing "best" right after fit keeps this run's total
            super().load_state_dict({"time_elapsed": {"train": float(state_dict.get("fit_seconds", 0.0))}})

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "name", None) or None
        hp = pl_module.hparams
        record = self.record(trainer, pl_module)
        model = pl_module.eval_model
        # this data set's normalisation and input size travel with the weights
        data_cfg = {k: tuple(getattr(datamodule, k)) for k in ("mean", "std", "input_size") if hasattr(datamodule, k)}
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **data_cfg, "num_classes": hp.num_classes}
        out = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "export"
        # a fine-tune of a shipped tag gets a name of its own (bam_resnet20.fmnist -> bam_resnet20.fmnist_ft_cifar10)
        weights_name = self.weights_name or (
            f"{hp.model_name}_ft_{dataset}" if "." in hp.model_name and dataset else
            f"{hp.model_name}.{dataset}" if dataset else hp.model_name)
        card_metrics = {k: 100.0 * record["test"][f"acc{k[-1]}"] for k in ("top1", "top5")
                        if math.isfinite(record["test"].get(f"acc{k[-1]}", math.nan))}
        save_pretrained(model, out, model_name=weights_name, label_names=hp.label_names, metrics=card_metrics,
                        dataset=dataset, recipe=record["recipe"], model_args=dict(hp.model_kwargs or {}) or None)
        (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Everything measured about this run, as plain JSON-able values."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, (torch.Tensor, float))}
        checkpoint = trainer.checkpoint_callback
        best_score = getattr(checkpoint, "best_model_score", None)
        return {
            "model_name": pl_module.hparams.model_name,
            "model_args": pl_module.model_args,
            "dataset": getattr(trainer.datamodule, "name", None),
            "test": {k.split("/", 1)[1]: v for k, v in metrics.items()
                     if k.startswith("test/") and "acc_class" not in k},
            "per_class_acc1": pl_module.test_report.get("per_class_acc1", {}),
            "confusion_matrix": pl_module.test_report.get("confusion_matrix", []),
            "best_val_acc1": float(best_score) if best_score is not None else None,
            "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
            "train_wall_time_s": round(self.time_elapsed(), 2),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "num_params": sum(p.numel() for p in pl_module.eval_model.parameters()),
            "ema": pl_module.model_ema is not None,
            "recipe": _recipe(trainer),
        }


def _recipe(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The resolved CLI config of this run (from LightningCLI's SaveConfigCallback), if any."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            return yaml.safe_load(callback.parser.dump(callback.config, skip_none=False))
    return None
