"""Fine-tuning from a saved (exported) model onto a 5-class subset with 3 input channels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models import adapt_input_conv

from bam_zoo.training import ImageClassifier
from bam_zoo.training.cli import cli_main
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, write_cifar, write_fashion_mnist

FINETUNE = str(REPO / "configs" / "finetune" / "bam_resnet20_fmnist_to_cifar10.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_finetune_saved_fmnist_model_onto_five_rgb_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1. a real saved model: one short Fashion-MNIST run (1 channel, 10 classes) and its export
    fmnist = write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=20)
    cli_main(["fit", "--config", str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml"), "--data.root",
              str(fmnist), "--data.val_size", "16", "--data.batch_size", "16", "--trainer.max_epochs", "1",
              "--trainer.default_root_dir", str(tmp_path / "pre"), *QUIET])
    export = tmp_path / "pre" / "export"
    saved = load_file(export / "model.safetensors")
    assert saved["conv1.weight"].shape[1] == 1 and saved["fc.weight"].shape[0] == 10

    # 2. what fine-tuning starts from: adapted stem, same backbone, fresh 5-way head
    module = ImageClassifier("bam_resnet20", num_classes=5, in_chans=3, pretrained_file=str(export))
    start = module.model.state_dict()
    assert torch.allclose(start["conv1.weight"], adapt_input_conv(3, saved["conv1.weight"].clone(), base_chans=1))
    backbone = [k for k in saved if not k.startswith(("conv1.", "fc."))]
    assert backbone and all(torch.equal(start[k], saved[k]) for k in backbone)
    assert start["fc.weight"].shape == (5, 64)

    # 3. the fine-tune config on CIFAR-10 classes 0-4 (3 channels), with a 0.1x backbone learning rate
    cifar = write_cifar(monkeypatch, tmp_path / "cifar", classes=10, n_train=100, n_test=40)
    cli = cli_main(["fit", "--config", FINETUNE, "--model.model_name", "bam_resnet20", "--model.pretrained_file",
                    str(export), "--data.root", str(cifar), "--data.class_subset", "[0, 1, 2, 3, 4]",
                    "--data.val_size", "10", "--data.batch_size", "8", "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path / "ft"), *QUIET])
    groups = cli.trainer.optimizers[0].param_groups
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([0.005, 0.05])
    head = {id(p) for p in cli.model.model.get_classifier().parameters()}
    assert all((g["initial_lr"] == 0.05) == (id(g["params"][0]) in head) for g in groups)
    config = json.loads((tmp_path / "ft" / "export" / "config.json").read_text())
    assert config["num_classes"] == 5 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["label_names"] == ["airplane", "automobile", "bird", "cat", "deer"]
    record = json.loads((tmp_path / "ft" / "export" / "metrics.json").read_text())
    assert torch.tensor(record["confusion_matrix"]).shape == (5, 5)
    assert int(torch.tensor(record["confusion_matrix"]).sum()) == 20  # the test images of classes 0-4
    assert record["model_args"] == {"num_classes": 5, "in_chans": 3}
