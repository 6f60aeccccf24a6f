"""``ImageClassifier``: the one LightningModule for every bam-zoo (and timm) model.
BAM and baseline runs differ only in ``model_name``; its hyperparameters rebuild the network (``model_args``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from bam_zoo import create_model  # the one registry every network comes from; bam_zoo never imports training
from bam_zoo.errors import NonFiniteLossError, TrainingError
from bam_zoo.layers import BAM
from bam_zoo.model_args import check_input_channels
from bam_zoo.runtime import to_channels_last
from bam_zoo.training.optim import SchedulerName, create_lr_scheduler, param_groups

__all__ = ["ImageClassifier", "create_model"]


def _pretrained_overlay(pretrained_file: str) -> dict[str, Any]:
    """timm ``pretrained_cfg_overlay`` that loads weights from a local file or an export folder.
    An export's ``config.json`` gives the weights' input size and classes, for timm to adapt the stem and head."""
    path = Path(pretrained_file).expanduser()
    overlay: dict[str, Any] = {}
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            saved = json.loads(config_file.read_text()).get("pretrained_cfg", {})
            overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                       if k in ("input_size", "num_classes", "mean", "std")}
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--model.pretrained_file {pretrained_file!r}: no such file; pass a model.safetensors "
                                "file or the folder an export wrote (config.json + model.safetensors)")
    return {**overlay, "file": str(path)}


def _input_channels(model: nn.Module) -> int:
    """Input channels of a timm network: those of its ``first_conv`` (else of its first convolution)."""
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) else first
    try:
        return int(model.get_submodule(first).in_channels)
    except (AttributeError, TypeError):
        return next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))


class ImageClassifier(pl.LightningModule):
    """Image classification with any bam-zoo or timm network.

    Args:
        model_name: architecture for ``create_model`` (``bam_resnet20``, ``resnet20`` ...); ``name.tag`` picks weights.
        num_classes: classifier outputs, linked from the DataModule; ``None``: the network's own (a tag's head).
        in_chans: input channels, linked from the DataModule; ``None``: the network's own.
        pretrained: load the registry's weights; timm re-initialises a head and adapts a stem of another size.
        pretrained_file: load pretrained weights from a local ``model.safetensors`` or export folder instead.
        add_bam: insert BAM, starting as the identity, after the weights are loaded (:func:`bam_zoo.add_bam`).
        model_kwargs: extra ``create_model`` arguments (``drop_rate``, ``drop_path_rate`` ...).
        label_names: class names stored with the weights, linked from the DataModule; ``None`` with
            ``num_classes=None``: the pretrained weights' names.
        label_smoothing: label smoothing of the cross-entropy (also applied to mixed targets).
        mixup_alpha: timm Mixup alpha; 0 disables mixup.
        cutmix_alpha: timm CutMix alpha; 0 disables cutmix.
        mixup_prob: probability of mixing a batch when mixup or cutmix is on.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        optimizer: timm optimizer name: ``sgd`` (Nesterov), ``momentum`` (plain momentum SGD), ``adamw`` ...
        lr: peak learning rate.
        weight_decay: weight decay of weights (norms and biases get none).
        momentum: SGD momentum.
        opt_kwargs: extra optimizer arguments (e.g. ``betas`` for AdamW).
        scheduler: ``cosine``, ``step``, ``multistep``, ``onecycle`` or ``constant``, stepped every optimizer step.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        warmup_start_factor: LR multiplier at the start of the warm-up.
        min_lr_ratio: final LR of the cosine schedule as a fraction of ``lr``.
        decay_epochs: period of the ``step`` schedule.
        decay_rate: multiplier of the ``step`` and ``multistep`` schedules.
        decay_milestones: epochs at which ``multistep`` decays the LR.
        freeze_backbone: train only :attr:`new_parts` (head, inserted BAM); the frozen norms keep their statistics.
        backbone_lr_scale: learning-rate multiplier of everything but :attr:`new_parts` (fine-tuning).
        ema_decay: decay of a weights EMA (timm ModelEmaV3) that validation, test and export use; ``None``: none.
        channels_last: use the channels-last memory format (faster on CPUs and recent GPUs).
        check_finite: stop with :class:`NonFiniteLossError` when the loss becomes NaN or infinite.
    """

    def __init__(
        self, model_name: str = "bam_resnet20", num_classes: int | None = None, in_chans: int | None = None,
        pretrained: bool = False, pretrained_file: str | None = None, add_bam: bool = False,
        model_kwargs: dict[str, Any] | None = None, label_names: list[str] | None = None,
        label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5, optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 5e-4,
        momentum: float = 0.9, opt_kwargs: dict[str, Any] | None = None, scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 0.0, warmup_start_factor: float = 0.01, min_lr_ratio: float = 0.0,
        decay_epochs: float = 30.0, decay_rate: float = 0.1, decay_milestones: list[float] | None = None,
        freeze_backbone: bool = False, backbone_lr_scale: float = 1.0, ema_decay: float | None = None,
        channels_last: bool = True, check_finite: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        if pretrained_file:
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = _pretrained_overlay(pretrained_file)
        kwargs.update({k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None})
        self.model = create_model(model_name, pretrained=pretrained, add_bam=add_bam, **kwargs)
        # record what None resolved to, so checkpoints and exports rebuild this exact network
        if label_names is None and num_classes is None:
            names = self.model.pretrained_cfg.get("label_names")
            if names and len(names) == self.model.num_classes:
                self.hparams.label_names = list(names)
        self.hparams.num_classes = num_classes = self.model.num_classes
        self.hparams.in_chans = in_chans if in_chans is not None else _input_channels(self.model)
        new = {id(p) for p in self.new_parts.parameters()}
        for p in self.model.parameters() if freeze_backbone else ():
            p.requires_grad_(id(p) in new)
        if channels_last:
            to_channels_last(self.model)
        # no gradients: DDP would otherwise wait for the EMA copy's and fail ("parameters that were not used")
        self.model_ema = ModelEmaV3(self.model, decay=ema_decay).requires_grad_(False) if ema_decay else None

        mixing = mixup_alpha > 0 or cutmix_alpha > 0
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                           switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                           num_classes=num_classes) if mixing else None
        self.train_criterion = (SoftTargetCrossEntropy() if mixing
                                else nn.CrossEntropyLoss(label_smoothing=label_smoothing))
        self.eval_criterion = nn.CrossEntropyLoss()

        accuracy = MetricCollection({f"acc{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes),
                                                                   average="micro") for k in (1, 5)})
        self.train_metrics, self.val_metrics, self.test_metrics = (accuracy.clone(prefix=f"{stage}/")
                                                                   for stage in ("train", "val", "test"))
        self.test_per_class = MulticlassAccuracy(num_classes, average=None)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_report: dict[str, Any] = {}

    @property
    def model_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild ``self.model`` with ``create_model(model_name, **model_args)``."""
        return {"num_classes": self.hparams.num_classes, "in_chans": self.hparams.in_chans,
                **({"add_bam": True} if self.hparams.get("add_bam") else {}), **(self.hparams.model_kwargs or {})}

    @property
    def new_parts(self) -> nn.Module:
        """What a fine-tune adds to the pretrained network: its classifier, and each BAM that ``add_bam`` inserted."""
        return nn.ModuleList([self.model.get_classifier(), *(m for m in self.model.modules()
                                                             if self.hparams.add_bam and isinstance(m, BAM))])

    @property
    def eval_model(self) -> nn.Module:
        """The network evaluated and exported: the EMA copy when EMA is on, else the trained one."""
        return self.model_ema.module if self.model_ema is not None else self.model

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, *args: Any, **kwargs: Any
    ) -> ImageClassifier:
        """Rebuild from a local Lightning checkpoint without fetching the original pretrained weights again."""
        kwargs.setdefault("pretrained", False)
        kwargs.setdefault("pretrained_file", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, x: torch.Tensor, network: nn.Module | None = None) -> torch.Tensor:
        """Logits of ``network`` (default: the trained one), with ``x`` checked and in its memory format."""
        check_input_channels(x, self.hparams.in_chans, self.hparams.model_name)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (network or self.model)(x)

    def on_train_epoch_start(self) -> None:
        """Keep a frozen backbone's norm layers in eval mode (pretrained statistics) as each epoch starts: Lightning
        restores the modes it found after validation, and never calls ``train()`` itself."""
        for module in self.model.modules() if self.hparams.freeze_backbone else ():
            params = list(module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._NormBase) and params and not params[0].requires_grad:
                module.eval()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        x, target = self.mixup(x, y) if self.mixup is not None else (x, y)
        logits = self(x)
        loss = self.train_criterion(logits, target)
        if self.hparams.check_finite and not torch.isfinite(loss):
            lr = self.trainer.optimizers[0].param_groups[-1]["lr"] if self.trainer.optimizers else float("nan")
            raise NonFiniteLossError(loss.item(), self.current_epoch, self.global_step, lr)
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.global_step)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: MetricCollection
    ) -> torch.Tensor:
        x, y = batch
        logits = self.forward(x, self.eval_model)
        loss = self.eval_criterion(logits, y)
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "test", self.test_metrics)
        self.test_per_class.update(logits, batch[1])
        self.test_confusion.update(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        """Log per-class accuracy and keep it, with the confusion matrix, in ``test_report`` for the export."""
        per_class = self.test_per_class.compute().tolist()
        names = self.hparams.label_names or [str(i) for i in range(self.hparams.num_classes)]
        for name, acc in zip(names, per_class):
            self.log(f"test/acc_class/{name}", acc, sync_dist=False)
        self.test_report = {
            "per_class_acc1": dict(zip(names, per_class)),
            "confusion_matrix": self.test_confusion.compute().tolist(),
        }
        self.test_per_class.reset()
        self.test_confusion.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities of a batch (``(x, y)`` or bare ``x``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.forward(x, self.eval_model).softmax(dim=-1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume an older bam-zoo's ``SequentialLR`` schedule state, which fails deep in torch otherwise."""
        trainer = self._trainer
        if self.hparams.scheduler == "onecycle" or trainer is None or trainer.state.fn != "fit":
            return  # validate/test/predict restore no schedule
        if any("lr_lambdas" not in state for state in checkpoint.get("lr_schedulers", [])):
            raise TrainingError(
                "this checkpoint's LR schedule was saved by an older bam-zoo (a SequentialLR chain), which this "
                "version cannot resume; resume it with the bam-zoo version that wrote it, or start a new run from its "
                "weights (--model.pretrained_file with the run's export folder)")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        scaled = hp.backbone_lr_scale != 1.0 and not hp.freeze_backbone
        groups = param_groups(self.model, hp.weight_decay, head=self.new_parts if scaled else None,
                              head_lr=hp.lr, backbone_lr=hp.lr * hp.backbone_lr_scale)
        optimizer = create_optimizer_v2(groups, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                                        momentum=hp.momentum, **(hp.opt_kwargs or {}))
        total_steps = self.trainer.estimated_stepping_batches
        if total_steps == float("inf"):
            raise ValueError("set --trainer.max_epochs or --trainer.max_steps: the LR schedule needs the run length")
        steps_per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        scheduler = create_lr_scheduler(
            optimizer, hp.scheduler, total_steps=int(total_steps), steps_per_epoch=steps_per_epoch,
            warmup_epochs=hp.warmup_epochs, warmup_start_factor=hp.warmup_start_factor,
            min_lr_ratio=hp.min_lr_ratio, decay_epochs=hp.decay_epochs, decay_rate=hp.decay_rate,
            decay_milestones=hp.decay_milestones or ())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
