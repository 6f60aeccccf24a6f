"""``predict`` writes one row per image; grey image folders train 1-channel models with a matching transform."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from bam_zoo.cli import main
from bam_zoo.training import ImageFolderDataModule
from bam_zoo.training.cli import cli_main
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, write_imagefolder

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture()
def fmnist_pngs(tmp_path: Path) -> tuple[Path, list[int]]:
    """Four Fashion-MNIST test images saved as RGB PNGs in a flat folder, and their labels."""
    from PIL import Image

    from bam_zoo.training.data import read_idx

    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:4]
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:4].tolist()
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.numpy()).convert("RGB").save(folder / f"{i}.png")
    return folder, labels


def test_predict_a_published_tag_without_config(fmnist_pngs: tuple[Path, list[int]], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from bam_zoo.training.data import FashionMNISTDataModule

    folder, labels = fmnist_pngs
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "preds.csv"
    main(["predict", "--model.model_name", "bam_resnet20.fmnist", "--model.pretrained", "true",
          "--data", "ImageFilesDataModule", "--data.paths", f"[{folder}, {folder / '0.png'}]",
          "--predictions.file", str(out), "--predictions.topk", "3", "--trainer.enable_progress_bar", "false"])
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(folder / f"{i}.png") for i in range(4)] + [str(folder / "0.png")]
    names = FashionMNISTDataModule.class_names
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    for row in rows:
        probs = [float(row[f"prob_{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {row[f"label_{k}"] for k in (1, 2, 3)} <= set(names)
    # RGB files went through the model's own transform (grey, 28 x 28, its mean/std): it recognises them
    assert sum(row["label_1"] == names[y] for row, y in zip(rows, labels)) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no logs, no config.yaml


def test_predict_writes_json(fmnist_pngs: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder, _ = fmnist_pngs
    out = tmp_path / "preds.json"
    main(["predict", "--model.model_name", "resnet20.fmnist", "--model.pretrained", "true",
          "--data", "ImageFilesDataModule", "--data.paths", str(folder / "1.png"), "--predictions.file", str(out),
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    (row,) = json.loads(out.read_text())
    assert row["path"] == str(folder / "1.png") and len(row["labels"]) == len(row["probs"]) == 5


def test_grey_imagefolder_trains_a_one_channel_model(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", per_class=2, size=12, channels=1)
    dm = ImageFolderDataModule(str(root), img_size=16, batch_size=2, num_workers=0)
    assert (dm.in_chans, dm.mean, dm.std, dm.input_size) == (1, (0.449,), (0.226,), (1, 16, 16))
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 1, 16, 16)
    cli = cli_main(["fit", "--model.model_name", "resnet20", "--data", "ImageFolderDataModule",
                    "--data.root", str(root), "--data.img_size", "16", "--data.batch_size", "2",
                    "--data.num_workers", "0", "--trainer.max_steps", "1", "--trainer.default_root_dir",
                    str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"])
    assert cli.model.hparams.in_chans == 1 and cli.model.model.conv1.in_channels == 1
    assert cli.trainer.global_step == 1


def test_rgb_imagefolder_still_three_channels(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", per_class=1, size=8)
    dm = ImageFolderDataModule(str(root), img_size=8, num_workers=0)
    assert dm.in_chans == 3 and dm.mean == (0.485, 0.456, 0.406)
    assert ImageFolderDataModule(str(root), in_chans=1).input_size[0] == 1


def test_predict_with_a_checkpoint(tmp_path: Path) -> None:
    """A fine-tuned 3-class checkpoint predicts its own classes on plain files; the checkpoint is all it needs."""
    from test_training_utils import write_fashion_mnist

    data, run = write_fashion_mnist(tmp_path / "data", n_train=40, n_test=8), tmp_path / "run"
    config = str(REPO / "configs" / "fashion_mnist" / "resnet20.yaml")
    cli_main(["fit", "--config", config, "--data.root", str(data), "--data.val_size", "8", "--data.batch_size", "8",
              "--data.class_subset", "[7, 8, 9]", "--trainer.max_steps", "1", "--test_after_fit", "false",
              "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false"])
    from PIL import Image

    Image.new("L", (28, 28), 90).save(tmp_path / "x.png")
    out = tmp_path / "p.csv"
    main(["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--data", "ImageFilesDataModule", "--data.paths", str(tmp_path / "x.png"), "--predictions.file", str(out),
          "--trainer.enable_progress_bar", "false"])
    (row,) = list(csv.DictReader(out.open()))
    assert {row[f"label_{k}"] for k in (1, 2, 3)} == {"Sneaker", "Bag", "Ankle boot"} and "label_4" not in row
