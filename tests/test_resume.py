"""A training process killed mid-run resumes with ``--ckpt_path last`` at the right epoch, step and state."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bam_zoo.training.cli import cli_main
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, checkpoint, write_fashion_mnist

CONFIG = str(REPO / "configs" / "fashion_mnist" / "resnet20.yaml")
STEPS_PER_EPOCH, EPOCHS = 8, 4  # 128 training images, batch 16


def common(data: Path, run: Path) -> list[str]:
    return ["fit", "--config", CONFIG, "--data.root", str(data), "--data.val_size", "32", "--data.batch_size", "16",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.default_root_dir", str(run), "--test_after_fit", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_killed_run_resumes_from_last(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "data", n_train=160, n_test=20)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "cli.py", *common(data, run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 400
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a crash: no chance to save anything more
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr[-3000:]}"
    saved = checkpoint(last)
    assert saved["epoch"] < EPOCHS - 1 and saved["global_step"] == (saved["epoch"] + 1) * STEPS_PER_EPOCH

    probe = tmp_path / "resume.pt"
    cli = cli_main([*common(data, run), "--ckpt_path", "last",
                    "--trainer.callbacks+=test_training_utils.ResumeRecorder", "--trainer.callbacks.out_file", str(probe)])
    assert cli.config_init["fit"]["weights_only"] is True  # resumed through the restricted unpickler
    start = torch.load(probe, weights_only=True)
    assert start["epoch"] == saved["epoch"] + 1 and start["global_step"] == saved["global_step"]
    opt_saved, opt_start = saved["optimizer_states"][0], start["optimizer"]
    assert opt_saved["param_groups"] == opt_start["param_groups"]
    assert opt_saved["state"].keys() == opt_start["state"].keys()
    assert all(torch.equal(opt_saved["state"][k]["momentum_buffer"], opt_start["state"][k]["momentum_buffer"])
               for k in opt_saved["state"])
    assert saved["lr_schedulers"][0] == start["scheduler"]
    assert start["lr"] == saved["lr_schedulers"][0]["_last_lr"][0]

    end = torch.load(tmp_path / "resume_end.pt", weights_only=True)
    assert end["global_step"] == EPOCHS * STEPS_PER_EPOCH == end["scheduler_last_epoch"]
    assert checkpoint(last)["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # wall time up to the killed run's last checkpoint is carried into the total
    before = saved["callbacks"]["HubExport"]["fit_seconds"]
    assert checkpoint(last)["callbacks"]["HubExport"]["fit_seconds"] > before > 0


def test_sigterm_saves_the_current_step_exits_nonzero_and_resumes_there(tmp_path: Path) -> None:
    from bam_zoo.cli import SIGTERM_EXIT

    data = write_fashion_mnist(tmp_path / "data", n_train=160, n_test=20)
    run, marker = tmp_path / "run", tmp_path / "step.txt"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    args = common(data, run)[:-2] + ["--trainer.max_epochs", "2", "--trainer.enable_model_summary", "false"]
    proc = subprocess.Popen([sys.executable, "cli.py", *args, "--trainer.callbacks+=test_training_utils.StepMarker",
                             "--trainer.callbacks.out_file", str(marker)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and int(marker.read_text() if marker.exists()
                                                                            and marker.read_text() else 0) < 3:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # mid-epoch 0: its 8 steps take >= 1.6 s with the marker's sleeps
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == SIGTERM_EXIT == 143, stderr[-3000:]
    assert "--ckpt_path last" in stderr and "Traceback" not in stderr
    saved = checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 0 and 3 <= saved["global_step"] < STEPS_PER_EPOCH, saved["global_step"]

    probe = tmp_path / "resume.pt"
    cli_main([*args, "--ckpt_path", "last", "--trainer.callbacks+=test_training_utils.ResumeRecorder",
              "--trainer.callbacks.out_file", str(probe)])
    start, end = torch.load(probe, weights_only=True), torch.load(tmp_path / "resume_end.pt", weights_only=True)
    assert start["global_step"] == saved["global_step"] and start["epoch"] == 0
    assert end["global_step"] == 2 * STEPS_PER_EPOCH  # the interrupted epoch finished, no step redone or lost
    assert start["lr"] == saved["lr_schedulers"][0]["_last_lr"][0]
    # and was validated: a checkpoint saved on SIGTERM must not read to Lightning as one saved after validation
    with open(run / "csv" / "version_1" / "metrics.csv") as f:
        validated = sorted(int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/acc1"))
    assert validated == [0, 1], validated


def test_sigterm_during_validation_resumes_with_that_validation_whole(tmp_path: Path) -> None:
    """Cut while validating epoch 0, the run resumes by validating epoch 0 on all its batches (Lightning would skip
    it: the epoch's training is complete), so selection and the curves miss no epoch."""
    data = write_fashion_mnist(tmp_path / "data", n_train=176, n_test=20)
    run, marker = tmp_path / "run", tmp_path / "step.txt"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    args = common(data, run)[:-2] + ["--trainer.max_epochs", "2", "--data.val_size", "48"]  # 2 val batches: 32 + 16
    proc = subprocess.Popen([sys.executable, "cli.py", *args, "--trainer.callbacks+=test_training_utils.StepMarker",
                             "--trainer.callbacks.out_file", str(marker), "--trainer.callbacks.in_validation", "true"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not marker.exists():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # after validation batch 0 of epoch 0: its batches sleep 0.2 s each
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    saved = checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["epoch"] == 0 and saved["global_step"] == STEPS_PER_EPOCH, saved["global_step"]
    assert not list((run / "checkpoints").glob("best-*.ckpt"))  # epoch 0's validation never finished
    batches = tmp_path / "validated.txt"
    cli_main([*args, "--ckpt_path", "last", "--trainer.callbacks+=test_training_utils.StepMarker",
              "--trainer.callbacks.out_file", str(batches), "--trainer.callbacks.seconds", "0",
              "--trainer.callbacks.in_validation", "true"])
    assert batches.read_text().split() == ["8"] * 2 + ["16"] * 2  # epoch 0's validation again, both batches
    with open(run / "csv" / "version_1" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/acc1")]
    assert [int(row["epoch"]) for row in rows] == [0, 1], rows
    best = max(rows, key=lambda row: float(row["val/acc1"]))["epoch"]  # first of equals, as ModelCheckpoint keeps
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == [f"best-{int(best):03d}.ckpt"]


def test_checkpoint_of_the_older_schedules_is_refused_in_one_line(tmp_path: Path) -> None:
    """A fit checkpoint whose scheduler state is an older bam-zoo's SequentialLR chain cannot resume; the error says
    so (not torch's KeyError on lr_lambdas), and the same checkpoint still tests."""
    import pytest

    from bam_zoo.errors import TrainingError

    data = write_fashion_mnist(tmp_path / "data", n_train=64, n_test=16)
    run = tmp_path / "run"
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    cli_main([*common(data, run), *short])
    saved = checkpoint(run / "checkpoints" / "last.ckpt")
    assert "lr_lambdas" in saved["lr_schedulers"][0]  # what this version writes
    saved["lr_schedulers"] = [{"_schedulers": [{"last_epoch": 2}], "_milestones": [8], "last_epoch": 2,
                               "_last_lr": [0.1]}]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    with pytest.raises(TrainingError, match="older bam-zoo .* cannot resume"):
        cli_main([*common(data, tmp_path / "again"), *short, "--trainer.max_epochs", "2", "--ckpt_path", str(old)])
    cli_main(["test", "--config", CONFIG, "--data.root", str(data), "--data.val_size", "32", "--data.batch_size", "16",
              "--trainer.default_root_dir", str(tmp_path / "tested"), "--trainer.enable_progress_bar", "false",
              "--ckpt_path", str(old)])  # testing restores no schedule: the old checkpoint still serves
