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
