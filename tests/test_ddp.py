"""CPU DDP (gloo) through ``cli.py fit`` in a subprocess: disjoint shards, identical weights, synced metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bam_zoo.training import FashionMNISTDataModule
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, TESTS, checkpoint, write_fashion_mnist

CONFIG = str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml")


def test_cli_fit_with_two_cpu_processes(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "data", n_train=160, n_test=40)  # image i has pixel value i
    run, probe = tmp_path / "run", tmp_path / "probe"
    cmd = [sys.executable, "cli.py", "fit", "--config", CONFIG, "--data.root", str(data), "--data.val_size", "32",
           "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(run),
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.callbacks+=test_training_utils.ShardRecorder", "--trainer.callbacks.out_dir", str(probe)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # the config trains channels_last; every BAM gradient keeps its parameter's strides, so DDP copies none
    assert "Grad strides do not match bucket view strides" not in result.stderr

    dm = FashionMNISTDataModule(root=str(data), val_size=32)
    dm.setup()
    train_ids = set(dm.train_set.tensors[0][:, 0, 0, 0].tolist())
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    per_epoch = len(train_ids) // 2  # 128 images, 16 per batch and rank: 4 steps per rank and epoch
    assert [r["global_step"] for r in ranks] == [2 * per_epoch // 16] * 2
    for epoch in range(2):
        shard0, shard1 = (r["seen"][epoch * per_epoch:(epoch + 1) * per_epoch] for r in ranks)
        assert len(set(shard0)) == len(shard0) == per_epoch
        assert set(shard0).isdisjoint(shard1) and set(shard0) | set(shard1) == train_ids
    assert ranks[0]["seen"][:per_epoch] != ranks[0]["seen"][per_epoch:]  # reshuffled each epoch

    params = [torch.load(probe / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    saved = checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(saved[k], params[0][k]) for k in params[0])
    # validation accuracy is synced: both ranks report the same number
    assert ranks[0]["val_acc1"] == ranks[1]["val_acc1"]

    # rank zero exported once, with test metrics gathered from both ranks' halves of the test set
    record = json.loads((run / "export" / "metrics.json").read_text())
    assert record["world_size"] == 2 and int(torch.tensor(record["confusion_matrix"]).sum()) == 40
