"""What a user who mistypes gets: one line that names the problem and the fix, nothing created first."""

from __future__ import annotations

from pathlib import Path

import pytest

from bam_zoo.cli import main
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO

CONFIG = str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml")


def error_of(capsys: pytest.CaptureFixture, *args: str, code: int = 2) -> str:
    """Run the CLI, expect it to stop with ``code``, and return stderr (which must not hold the usage)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err and "[--" not in err, err
    return err


@pytest.mark.parametrize("flag", ["--optimizer", "--lr_scheduler"])
def test_lightning_optimizer_flags_point_to_the_model_keys(flag: str, capsys: pytest.CaptureFixture) -> None:
    err = error_of(capsys, "fit", "--config", CONFIG, flag, "Adam")
    assert "--model.optimizer" in err and "--model.scheduler" in err and len(err.strip().splitlines()) == 1


def test_optimizer_key_in_a_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("optimizer:\n  class_path: torch.optim.Adam\n")
    assert "--model.optimizer" in error_of(capsys, "fit", "--config", CONFIG, "--config", str(extra))


@pytest.mark.parametrize(("typo", "closest"), [
    (["--model.lrr", "0.1"], "--model.lr"),
    (["--data.rooot", "x"], "--data.root"),
    (["--trainer.max_epohcs", "1"], "--trainer.max_epochs"),
])
def test_typo_gives_the_closest_key_in_one_line(typo: list[str], closest: str, capsys: pytest.CaptureFixture) -> None:
    err = error_of(capsys, "fit", "--config", CONFIG, *typo)
    assert f"unknown option {typo[0]}; did you mean {closest}?" in err and len(err.strip().splitlines()) == 1


def test_typo_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  weight_decai: 0.1\n")
    assert "did you mean --model.weight_decay?" in error_of(capsys, "fit", "--config", CONFIG, "--config", str(extra))


# --- bad input: one line, nothing created -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["5", 5.0, -1])
def test_num_classes_must_be_a_whole_number(value: object) -> None:
    import bam_zoo
    from bam_zoo.errors import InvalidModelArgumentError
    from bam_zoo.training import ImageClassifier

    for build in (lambda: bam_zoo.create_model("resnet20", num_classes=value),
                  lambda: ImageClassifier("resnet20", num_classes=value)):
        with pytest.raises(InvalidModelArgumentError, match=r"num_classes must be a whole number >= 0"):
            build()


def test_three_channel_batch_into_a_one_channel_model() -> None:
    import torch

    from bam_zoo.errors import InputChannelsError
    from bam_zoo.training import ImageClassifier

    module = ImageClassifier("bam_resnet20", num_classes=10, in_chans=1).eval()
    with pytest.raises(InputChannelsError, match=r"bam_resnet20 takes 1-channel images, got a batch of shape "
                                                 r"\(2, 3, 28, 28\).*convert\('L'\)"):
        module(torch.rand(2, 3, 28, 28))


def fit_args(run: Path, *extra: str) -> list[str]:
    return ["fit", "--model.model_name", "resnet20", "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", *extra]


def test_imagefolder_class_without_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_training_utils import write_imagefolder

    root = write_imagefolder(tmp_path / "data", per_class=1, size=8)
    (root / "train" / "emu").mkdir()
    err = error_of(capsys, *fit_args(tmp_path / "run", "--data", "ImageFolderDataModule", "--data.root", str(root)),
                   code=1)
    assert "class folder(s) emu in" in err and "hold no images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_empty_imagefolder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    err = error_of(capsys, *fit_args(tmp_path / "run", "--data", "ImageFolderDataModule", "--data.root",
                                     str(tmp_path / "data")), code=1)
    assert "holds no class folders" in err and not (tmp_path / "run").exists()


def test_download_without_network(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    err = error_of(capsys, *fit_args(tmp_path / "run", "--data", "CIFAR10DataModule", "--data.root",
                                     str(tmp_path / "data"), "--data.download", "true"), code=1)
    assert "Could not download CIFAR-10 into" in err and "Temporary failure in name resolution" in err
    assert "drop --data.download" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "csv").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_missing_checkpoint_before_anything_is_created(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = error_of(capsys, "fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path / "run"),
                   "--ckpt_path", str(tmp_path / "nope.ckpt"), code=1)
    assert "nope.ckpt: no such file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_ckpt_path_last_with_nothing_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = error_of(capsys, "test", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path / "run"),
                   "--ckpt_path", "last", code=1)
    assert "--ckpt_path last:" in err and "holds no last.ckpt" in err and "save_last" not in err
    assert not (tmp_path / "run").exists()


def test_fit_ckpt_path_last_with_nothing_starts_from_scratch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bam_zoo.training.cli import cli_main
    from test_training_utils import write_fashion_mnist

    data = write_fashion_mnist(tmp_path / "data", n_train=40, n_test=8)
    cli = cli_main(["fit", "--config", CONFIG, "--data.root", str(data), "--data.val_size", "8",
                    "--data.batch_size", "16", "--trainer.max_steps", "1", "--test_after_fit", "false",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
                    "--ckpt_path", "last"])
    assert cli.trainer.global_step == 1
    err = capsys.readouterr().err
    assert "no last.ckpt in" in err and "starts from scratch" in err and "save_last" not in err


def test_push_of_weights_that_do_not_fit_counts_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint whose hyperparameters name another network: counts and a few keys, not every name."""
    import torch

    import bam_zoo
    from bam_zoo.errors import CheckpointKeysError

    plain = bam_zoo.create_model("resnet20", in_chans=1, num_classes=10).state_dict()
    bam = bam_zoo.create_model("bam_resnet20", in_chans=1, num_classes=10).state_dict()
    lacking = [k for k in bam if k not in plain]
    path = tmp_path / "renamed.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in plain.items()},
                "hyper_parameters": {"model_name": "bam_resnet20", "num_classes": 10, "in_chans": 1}}, path)
    err = error_of(capsys, "push", "--checkpoint", str(path), "--repo-id", "alice/x", code=1)
    assert len(lacking) > 20 and len(err.strip().splitlines()) == 1
    assert (f"This checkpoint (its model.* weights) does not fit bam_resnet20: {len(lacking)} missing "
            f"({', '.join(lacking[:3])}, ... {len(lacking) - 3} more). Its hyper_parameters") in err
    assert lacking[3] not in err and "unexpected" not in err

    from bam_zoo.hub import load_export
    with pytest.raises(RuntimeError) as info:  # torch's strict load raises RuntimeError; so does this
        load_export(path)
    assert isinstance(info.value, CheckpointKeysError) and info.value.missing == lacking
