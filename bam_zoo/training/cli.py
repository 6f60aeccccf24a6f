"""``BamZooCLI``: LightningCLI with bam-zoo's defaults (fit / validate / test / predict); docs/training.md.
It refuses in one line, before anything runs, what would fail deep inside a run."""

from __future__ import annotations

import difflib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Union

import torch
from jsonargparse import ArgumentParser
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

import pytorch_lightning as pl

from bam_zoo.training import data as _data  # noqa: F401  (imports every DataModule for short class_path names)
from bam_zoo.training.callbacks import HubExport, LastCheckpoint, PredictionWriter
from bam_zoo.errors import TRUST_OPTION, CheckpointNotFoundError, TrainingError, UnsafeCheckpointError
from bam_zoo.models.convert import unpickle_refusal
from bam_zoo.training.module import ImageClassifier

__all__ = [
    "BamZooArgumentParser", "BamZooCLI", "BatchCountTrainer", "cli_main", "sync_batchnorm_problem",
]

_SPECIAL_CKPT = {"last", "best", "hpc", "registry"}
_UNKNOWN_OPTION = (re.compile(r"unrecognized arguments: (--[^\s=]+)"), re.compile(r"does not accept option '([^']+)'"))
_UNKNOWN_INIT_ARG = re.compile(r"Parser key \"(\w+)\".*?class_path '([\w.]+)'.*?Option '(\w+)' is not accepted", re.S)
_ONE_OPTIMIZER = (
    "bam-zoo has one way to choose the optimizer and the schedule: --model.optimizer (a timm name: sgd, "
    "momentum, adamw ...) with --model.lr, --model.weight_decay, --model.opt_kwargs, and --model.scheduler "
    "(cosine, step, multistep, onecycle, constant); LightningCLI's --optimizer / --lr_scheduler are not available"
)


def explain_parse_error(message: str, parser: ArgumentParser) -> str:
    """One line for a command-line or config error: the unknown key and the closest valid one, if any.
    jsonargparse reports an unknown key in three shapes: a flag, a config key, a DataModule argument."""
    prog = parser.prog.replace(" [options]", "")
    more = f" (`{prog} --help` lists every option)"
    key, candidates = None, [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for pattern in _UNKNOWN_OPTION:
        if match := pattern.search(message):
            key = match.group(1) if match.group(1).startswith("--") else f"--{match.group(1)}"
            break
    if match := _UNKNOWN_INIT_ARG.search(message):
        group, class_path, name = match.groups()
        key = f"--{group}.{name}"
        init = pkgutil.resolve_name(class_path).__init__
        candidates = [f"--{group}.{p}" for p in inspect.signature(init).parameters if p != "self"]
    if key is None:
        return " ".join(line.strip() for line in message.strip().splitlines()) + more
    if key.split(".")[0] in ("--optimizer", "--lr_scheduler"):
        return _ONE_OPTIMIZER
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"unknown option {key}" + (f"; did you mean {close[0]}?" if close else ".") + more


class BamZooArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line with the closest valid key instead of the usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or callable(getattr(self, "_error_handler", None)):
            super().error(message, ex)  # a caller that handles parse errors itself gets them unchanged
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"{parser.prog.replace(' [options]', '')}: error: {explain_parse_error(message, parser)}\n")
        self.exit(2)


def sync_batchnorm_problem(sync_batchnorm: bool, accelerator: Any) -> str | None:
    """Why ``sync_batchnorm`` cannot work with this accelerator (on CPU it fails mid-training), or ``None``."""
    name = str(getattr(accelerator, "value", accelerator) or "auto").lower()
    if sync_batchnorm and (name == "cpu" or (name == "auto" and not torch.cuda.is_available())):
        return (
            "--trainer.sync_batchnorm true needs GPUs: PyTorch's SyncBatchNorm only works on GPU modules "
            "(BAM's BatchNorm1d included). On CPU leave it off (each process keeps its own BatchNorm "
            "statistics), or train on GPUs with --trainer.accelerator gpu."
        )
    return None


BatchCount = Union[int, float, None]  # int first: spelled flat, so typing's cache cannot hand back Union[float, int]


class BatchCountTrainer(pl.Trainer):
    """Lightning's Trainer whose ``limit_*_batches`` and ``overfit_batches`` read ``1`` as one batch, not all.
    Lightning's annotation reaches jsonargparse as ``Union[float, int, None]``, which parses ``1`` as ``1.0``."""

    def __init__(self, *, limit_train_batches: BatchCount = None, limit_val_batches: BatchCount = None,
                 limit_test_batches: BatchCount = None, limit_predict_batches: BatchCount = None,
                 overfit_batches: Union[int, float] = 0.0, **kwargs: Any) -> None:
        super().__init__(limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches, limit_predict_batches=limit_predict_batches,
                         overfit_batches=overfit_batches, **kwargs)


class BamZooCLI(LightningCLI):
    """LightningCLI for ``ImageClassifier`` with any bam-zoo DataModule (``--data.class_path``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        defaults = dict(parser_class=BamZooArgumentParser, trainer_class=BatchCountTrainer, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,  # --model.optimizer's
                        parser_kwargs={"description": "Train and evaluate bam-zoo models (fit / validate / test / "
                                       "predict). The other subcommands are tools (push: weights to the Hugging Face "
                                       "Hub); `bam-zoo TOOL --help`."})
        super().__init__(ImageClassifier, pl.LightningDataModule, args=args, run=run, **{**defaults, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max", "checkpoint.save_last": False,
                             "checkpoint.filename": "best-{epoch:03d}", "checkpoint.auto_insert_metric_name": False})
        # last.ckpt every epoch (and on SIGTERM): save_last only saves with the monitored checkpoint
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.filename": "last", "last_checkpoint.monitor": None,
                             "last_checkpoint.save_top_k": 1, "last_checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(HubExport, "export")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="test the best checkpoint after fit (this also writes the export)")
        parser.add_argument(f"--{TRUST_OPTION}", type=bool, default=False,
                            help="let --ckpt_path and --model.pretrained_file unpickle what torch's weights_only "
                                 "loader refuses, which can run any code they hold: only for files you trust "
                                 "(command line only, not from a config file)")
        for source, target in (("num_classes", "num_classes"), ("in_chans", "in_chans"), ("classes", "label_names")):
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT and "://" in str(ckpt_path):
            raise UnsafeCheckpointError(str(ckpt_path))
        trainer = config.get("trainer") or {}
        problem = sync_batchnorm_problem(trainer.get("sync_batchnorm", False), trainer.get("accelerator", "auto"))
        if problem:
            parser.error(problem)
        root = Path(trainer.get("default_root_dir") or ".")
        for key, folder in (("checkpoint", "checkpoints"), ("last_checkpoint", "checkpoints"), ("export", "export")):
            if config.get(key) is not None and config[key].get("dirpath") is None:
                config[key].dirpath = str(root / folder)
        if ckpt_path == "last" and config.get("last_checkpoint") is not None:
            folder = Path(config.last_checkpoint.dirpath)
            if not (folder.is_dir() and any(folder.glob("last*.ckpt"))):
                if subcommand != "fit":
                    raise CheckpointNotFoundError(f"--ckpt_path last: {folder} holds no last.ckpt. Pass the --trainer."
                                                  "default_root_dir of the run that wrote it, or a .ckpt path.")
                print(f"bam-zoo: --ckpt_path last: no last.ckpt in {folder} yet, so training starts from scratch",
                      file=sys.stderr)
                config.ckpt_path = None
        elif ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT and not Path(ckpt_path).expanduser().is_file():
            raise CheckpointNotFoundError(
                f"--ckpt_path {ckpt_path}: no such file. Pass a .ckpt a run wrote (<default_root_dir>/checkpoints/"
                "last.ckpt or best-*.ckpt), or --ckpt_path last to continue the run in --trainer.default_root_dir.")
        argv = sys.argv[1:] if args is None else args
        self._refuse_untrusted_pickles(config, not isinstance(argv, (list, tuple)) or any(
            str(a).split("=")[0] == f"--{TRUST_OPTION}" for a in argv))

    @staticmethod
    def _refuse_untrusted_pickles(config: Any, on_command_line: bool) -> None:
        """Refuse up front, in one line, the checkpoints torch's ``weights_only`` loader would refuse mid-run.
        ``--trust_checkpoint_code true`` lets their globals through; command line only, as config files get shared."""
        trusted = bool(config.get(TRUST_OPTION))
        if trusted and not on_command_line:
            raise TrainingError(f"A config file sets {TRUST_OPTION}: true, which is taken from the command line only "
                                f"(configs get shared): pass --{TRUST_OPTION} true yourself, for checkpoints you "
                                "trust.")
        if "weights_only" in config:
            if config.weights_only is False and not trusted:
                raise TrainingError(f"--weights_only false unpickles checkpoints fully, which runs any code they hold: "
                                    f"pass --{TRUST_OPTION} true instead, for checkpoints you trust.")
            if config.weights_only is None:
                config.weights_only = not trusted
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" and config.get("last_checkpoint") is not None:
            files = sorted(Path(config.last_checkpoint.dirpath).glob("last*.ckpt"))
        else:
            files = [Path(ckpt_path).expanduser()] if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT else []
        pretrained_file = (config.get("model") or {}).get("pretrained_file")
        weights = Path(pretrained_file).expanduser() if pretrained_file else None
        if weights is not None and weights.is_file() and weights.suffix != ".safetensors":
            files.append(weights)
        for refusal in filter(None, map(unpickle_refusal, files)):
            if not trusted:
                raise refusal
            # Lightning and timm load with weights_only=True whatever the config says: allow this file's globals
            torch.serialization.add_safe_globals([pkgutil.resolve_name(name) for name in refusal.refused])

    def after_instantiate_classes(self) -> None:
        """Predict with the checkpoint's own network when the data names no classes (``ImageFilesDataModule``)."""
        ckpt_path = self._get(self.config, "ckpt_path")
        if getattr(self.datamodule, "num_classes", 0) is None and ckpt_path and Path(ckpt_path).is_file():
            weights_only = self._get(self.config, "weights_only", True)
            self.model = ImageClassifier.load_from_checkpoint(ckpt_path, weights_only=weights_only)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Log to CSV and TensorBoard under ``default_root_dir`` unless the config names loggers."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.subcommand == "predict" and trainer_config.get("logger") in (None, True):
            kwargs.setdefault("logger", False)  # predict logs nothing: no empty csv/ and tensorboard/ folders
            self.save_config_callback = None  # nor a config.yaml in the working directory
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            root = trainer_config.get("default_root_dir") or "."
            kwargs["logger"] = [TensorBoardLogger(root, name="tensorboard"), CSVLogger(root, name="csv")]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Test the best checkpoint (or the final weights when none was saved); this writes the export."""
        if not self._get(self.config, "test_after_fit", True) or self.trainer.interrupted:
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", None) or None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)


def cli_main(args: list[str] | None = None) -> BamZooCLI:
    """Run the training CLI; ``args`` replaces ``sys.argv[1:]`` so tests and notebooks can call it."""
    return BamZooCLI(args=args)
