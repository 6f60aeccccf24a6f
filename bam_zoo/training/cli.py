"""``BamZooCLI``: LightningCLI with bam-zoo's defaults (fit / validate / test / predict).

What it adds to LightningCLI, and why:

* ``data.num_classes``, ``data.in_chans`` and ``data.classes`` are linked into the model, so one
  config key (the data) decides the classifier size, the stem and the label names.
* ``ModelCheckpoint``s for the best epoch by ``val/acc1`` (``--checkpoint.*``) and ``last.ckpt`` after
  every epoch (``--last_checkpoint.*``), a ``LearningRateMonitor``
  and :class:`~bam_zoo.training.callbacks.HubExport` (``--export.*``) are always present.
  Checkpoints default to ``<trainer.default_root_dir>/checkpoints`` (a fixed folder, so
  ``--ckpt_path last`` finds the previous run's ``last.ckpt``) and logs to CSV + TensorBoard under
  ``<trainer.default_root_dir>``.
* After ``fit`` the best checkpoint is tested (``--test_after_fit``), which triggers the export.
* ``--trainer.sync_batchnorm true`` without GPUs and remote ``--ckpt_path`` URLs are refused with
  a one-line explanation instead of a stack trace deep inside PyTorch; local checkpoints are read with
  ``--weights_only true`` (PyTorch's restricted unpickler) unless the user says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

import pytorch_lightning as pl

from bam_zoo.training import data as _data  # noqa: F401  (imports every DataModule for short class_path names)
from bam_zoo.training.callbacks import HubExport
from bam_zoo.errors import UnsafeCheckpointError
from bam_zoo.training.module import ImageClassifier

__all__ = ["BamZooCLI", "cli_main", "sync_batchnorm_problem"]

_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}


def sync_batchnorm_problem(sync_batchnorm: bool, accelerator: Any) -> str | None:
    """Why ``sync_batchnorm`` cannot work with this accelerator, or ``None`` when it can.

    PyTorch's SyncBatchNorm only runs on GPU modules; on CPU it fails mid-training with
    "SyncBatchNorm expected input tensor to be on GPU".
    """
    if not sync_batchnorm:
        return None
    name = str(getattr(accelerator, "value", accelerator) or "auto").lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return (
            "--trainer.sync_batchnorm true needs GPUs: PyTorch's SyncBatchNorm only works on GPU modules "
            "(BAM's BatchNorm1d included). On CPU leave it off (each process keeps its own BatchNorm "
            "statistics), or train on GPUs with --trainer.accelerator gpu."
        )
    return None


class BamZooCLI(LightningCLI):
    """LightningCLI for ``ImageClassifier`` with any bam-zoo DataModule (``--data.class_path``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_kwargs", {"description": (
            "Train and evaluate bam-zoo models (fit / validate / test / predict). "
            "`bam-zoo push --help` uploads exported weights to the Hugging Face Hub."
        )})
        super().__init__(ImageClassifier, pl.LightningDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1", "checkpoint.mode": "max", "checkpoint.save_last": False,
            "checkpoint.filename": "best-{epoch:03d}", "checkpoint.auto_insert_metric_name": False,
        })
        # A separate, unmonitored callback writes last.ckpt every epoch: Lightning 2.6's save_last only
        # saves when the monitored checkpoint was saved too, which would leave last.ckpt stale after
        # epochs that did not improve val/acc1, and --ckpt_path last would redo them.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "last_checkpoint.filename": "last", "last_checkpoint.monitor": None, "last_checkpoint.save_top_k": 1,
            "last_checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(HubExport, "export")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="test the best checkpoint after fit (this also writes the export)")
        for source, target in (("num_classes", "num_classes"), ("in_chans", "in_chans"), ("classes", "label_names")):
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT and "://" in str(ckpt_path):
            raise UnsafeCheckpointError(str(ckpt_path))
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True  # unpickle checkpoints with torch's restricted loader unless told otherwise
        trainer = config.get("trainer") or {}
        problem = sync_batchnorm_problem(trainer.get("sync_batchnorm", False), trainer.get("accelerator", "auto"))
        if problem:
            parser.error(problem)
        root = Path(trainer.get("default_root_dir") or ".")
        for key in ("checkpoint", "last_checkpoint"):
            if config.get(key) is not None and config[key].get("dirpath") is None:
                config[key].dirpath = str(root / "checkpoints")
        if config.get("export") is not None and config.export.get("dirpath") is None:
            config.export.dirpath = str(root / "export")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Log to CSV and TensorBoard under ``default_root_dir`` unless the config names loggers."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            root = trainer_config.get("default_root_dir") or "."
            kwargs["logger"] = [TensorBoardLogger(root, name="tensorboard"), CSVLogger(root, name="csv")]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Test the best checkpoint (or the final weights when none was saved); this writes the export."""
        if not self._get(self.config, "test_after_fit", True) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)


def cli_main(args: list[str] | None = None) -> BamZooCLI:
    """Run the training CLI; ``args`` replaces ``sys.argv[1:]`` so tests and notebooks can call it."""
    return BamZooCLI(args=args)
