"""CPU DDP (gloo) through ``cli.py`` in a subprocess: disjoint shards, identical weights, synced metrics, and
every prediction written once, in the data's order."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import bam_zoo
from bam_zoo.training import FashionMNISTDataModule
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, TESTS, checkpoint, write_fashion_mnist, write_idx

CONFIG = str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}


def test_cli_fit_with_two_cpu_processes(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "data", n_train=160, n_test=40)  # image i has pixel value i
    run, probe = tmp_path / "run", tmp_path / "probe"
    cmd = [sys.executable, "cli.py", "fit", "--config", CONFIG, "--data.root", str(data), "--data.val_size", "32",
           "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(run),
           "--model.ema_decay", "0.9",  # an EMA copy gets no gradients: DDP must not wait for them
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.callbacks+=test_training_utils.ShardRecorder", "--trainer.callbacks.out_dir", str(probe)]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
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
    assert params[0].keys() == params[1].keys() and any(k.startswith("model_ema.") for k in params[0])
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    saved = checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(saved[k], params[0][k]) for k in params[0])
    # validation accuracy is synced: both ranks report the same number
    assert ranks[0]["val_acc1"] == ranks[1]["val_acc1"]

    # rank zero exported once, with test metrics gathered from both ranks' halves of the test set
    record = json.loads((run / "export" / "metrics.json").read_text())
    assert record["world_size"] == 2 and int(torch.tensor(record["confusion_matrix"]).sum()) == 40


def test_predict_with_two_cpu_processes_writes_every_image_once_in_order(tmp_path: Path) -> None:
    """41 test images (an uneven split: 21 and 20): rank zero gathers both shares into one file in data order."""
    n = 41
    images = torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_fashion_mnist(tmp_path / "data", n_train=20, n_test=n)
    write_idx(tmp_path / "data" / "t10k-images-idx3-ubyte", images)  # distinct images, so rows cannot be swapped
    out = tmp_path / "predictions.csv"
    cmd = [sys.executable, "cli.py", "predict", "--model.model_name", "resnet20.fmnist", "--model.pretrained", "true",
           "--data", "FashionMNISTDataModule", "--data.root", str(tmp_path / "data"), "--data.batch_size", "4",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.enable_progress_bar", "false", "--predictions.file", str(out), "--predictions.topk", "2"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [f"#{i}" for i in range(n)]  # every image exactly once, in order

    model = bam_zoo.create_model("resnet20.fmnist", pretrained=True).eval()
    with torch.no_grad():
        probs = model(FashionMNISTDataModule(root=str(tmp_path / "data")).eval_augment(images[:, None])).softmax(1)
    top, labels = probs.topk(2, dim=1)
    names = model.pretrained_cfg["label_names"]
    assert [[r["label_1"], r["label_2"]] for r in rows] == [[names[j] for j in row] for row in labels.tolist()]
    assert torch.allclose(torch.tensor([[float(r["prob_1"]), float(r["prob_2"])] for r in rows]), top, atol=1e-5)


def test_main_destroys_the_process_group_it_leaves_behind(tmp_path: Path, monkeypatch) -> None:
    """Lightning leaves the group initialized; gloo's threads destroyed at interpreter exit can abort the
    process (SIGABRT after all the work was done, pytorch#190489), so the command line destroys it on success."""
    import bam_zoo.cli

    def command_that_runs_distributed(args: list[str] | None = None) -> None:
        store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)

    monkeypatch.setattr(bam_zoo.cli, "ZooCLI", command_that_runs_distributed)
    bam_zoo.cli.main(["fit"])
    assert not torch.distributed.is_initialized()
