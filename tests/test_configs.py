"""Every YAML config is up to date with configs/generate.py, parses, and trains 2 steps (fast_dev_run).

The runs shrink only what a CPU test cannot afford (data size, batch, image size, devices, precision);
the recipe (model, optimizer, schedule, loss, augmentation) is the config's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import bam_zoo
from bam_zoo.hub import save_pretrained
from _helpers import load_script
from bam_zoo.training.cli import cli_main
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, write_cifar, write_fashion_mnist, write_imagefolder

CONFIGS = REPO / "configs"
ALL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
# Two CPU steps of these cost more than the default test budget allows; `pytest -m slow` runs them.
HEAVY = {"imagenet/bam_resnet101.yaml", "imagenet/bam_resnet152.yaml", "imagenet/bam_wide_resnet50_2.yaml",
         "imagenet/bam_wide_resnet101_2.yaml", "imagenet/bam_resnext101_32x8d.yaml"}


def load_generator():
    return load_script(CONFIGS / "generate.py", "configs_generate")


def test_configs_are_generated_and_up_to_date(capsys: pytest.CaptureFixture) -> None:
    generator = load_generator()
    assert generator.main(["--check"]) == 0, capsys.readouterr().out + "\nrun: python configs/generate.py"
    assert set(ALL) == set(generator.all_configs()), "YAML files not written by configs/generate.py"


def test_every_architecture_has_its_configs() -> None:
    for arch, family in bam_zoo.BAM_ARCHS.items():
        if family == "cifar_resnet":  # BAM model and its baseline twin, on both small-image recipes
            for recipe in ("fashion_mnist", "cifar100"):
                assert {f"{recipe}/{arch}.yaml", f"{recipe}/{arch[len('bam_'):]}.yaml"} <= set(ALL)
        else:
            assert f"imagenet/{arch}.yaml" in ALL


def test_baseline_recipe_is_identical_to_bam() -> None:
    for recipe in ("fashion_mnist", "cifar100"):
        for depth in (20, 32, 44, 56, 110):
            bam = (CONFIGS / recipe / f"bam_resnet{depth}.yaml").read_text()
            base = (CONFIGS / recipe / f"resnet{depth}.yaml").read_text()
            assert bam.replace(f"bam_resnet{depth}", f"resnet{depth}") == base


@pytest.mark.parametrize("config", ALL)
def test_config_parses(config: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "class_path: bam_zoo.training.data." in printed


def test_limit_batches_one_means_one_batch(tmp_path: Path) -> None:
    """Lightning reads int 1 as one batch and float 1.0 as all of them; the CLI keeps what the user wrote.

    A fresh process, as users run it: whether typing hands jsonargparse ``Union[float, int]`` or
    ``Union[int, float]`` depends on what was imported before (in pytest's process the bug hid).
    """
    extra = tmp_path / "limits.yaml"
    extra.write_text("trainer:\n  limit_val_batches: 1\n  limit_test_batches: 1.0\n")
    printed = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(CONFIGS / "fashion_mnist" / "resnet20.yaml"),
         "--config", str(extra), "--trainer.limit_train_batches", "1", "--trainer.limit_predict_batches", "0.25",
         "--trainer.overfit_batches", "1", "--print_config"],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    for line in ("limit_train_batches: 1\n", "limit_val_batches: 1\n", "limit_test_batches: 1.0\n",
                 "limit_predict_batches: 0.25\n", "overfit_batches: 1\n"):
        assert f"  {line}" in printed, (line, printed)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as monkeypatch:  # torchvision accepts the CIFAR files while the module runs
        for classes in (10, 100):
            write_cifar(monkeypatch, root / "cifar", classes=classes, n_train=60, n_test=20)
        yield {
            "fmnist": write_fashion_mnist(root / "fmnist", n_train=60, n_test=20),
            "cifar": root / "cifar",
            "images": write_imagefolder(root / "images", per_class=2, size=36),
        }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exports to fine-tune from: a Fashion-MNIST bam_resnet20 (1 channel) and an ImageNet-shaped bam_resnet50."""
    root = tmp_path_factory.mktemp("pretrained")
    fm = bam_zoo.create_model("bam_resnet20", num_classes=10, in_chans=1)
    fm.pretrained_cfg = {**fm.pretrained_cfg, "input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,)}
    save_pretrained(fm, root / "fm", model_name="bam_resnet20.fmnist")
    save_pretrained(bam_zoo.create_model("bam_resnet50"), root / "in1k", model_name="bam_resnet50.in1k")
    return {"bam_resnet20": root / "fm", "bam_resnet50": root / "in1k"}


def small_overrides(config: str, data: dict[str, Path], pretrained: dict[str, Path]) -> list[str]:
    recipe = config.split("/")[0]
    text = (CONFIGS / config).read_text()
    args = ["--trainer.fast_dev_run", "2", "--test_after_fit", "false", "--export.enabled", "false"]
    if "ImageFolderDataModule" in text:
        args += ["--data.root", str(data["images"]), "--data.img_size", "32", "--data.batch_size", "2",
                 "--data.num_workers", "0"]
    elif "FashionMNISTDataModule" in text:
        args += ["--data.root", str(data["fmnist"]), "--data.val_size", "20", "--data.batch_size", "4"]
    else:
        args += ["--data.root", str(data["cifar"]), "--data.val_size", "20", "--data.batch_size", "4"]
    if recipe in ("imagenet", "finetune"):
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.precision", "32-true"]
    if recipe == "finetune":  # published tags need the network; start from a local export instead
        arch = "bam_resnet20" if "bam_resnet20" in config else "bam_resnet50"
        args += ["--model.model_name", arch, "--model.pretrained_file", str(pretrained[arch])]
    return args


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c in HEAVY else c for c in ALL])
def test_config_trains_two_steps(config: str, data: dict[str, Path], pretrained: dict[str, Path],
                                 tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    *small_overrides(config, data, pretrained)])
    assert cli.trainer.global_step == 2 and "val/acc1" in cli.trainer.callback_metrics
    # the recipe's optimizer and peak LR reached the Trainer, and its schedule moved once per step
    recipe, optimizer = yaml.safe_load((CONFIGS / config).read_text())["model"], cli.trainer.optimizers[0]
    kind = {"sgd": ("SGD", True), "momentum": ("SGD", False), "adamw": ("AdamW", None)}[recipe["optimizer"]]
    assert (type(optimizer).__name__, optimizer.defaults.get("nesterov")) == kind
    assert max(g["initial_lr"] for g in optimizer.param_groups) == recipe["lr"]
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
