"""ImageClassifier, optimizer/schedule helpers, the CLI's outputs, and its refusals."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import bam_zoo
from bam_zoo.cli import main
from bam_zoo.training import FashionMNISTDataModule, ImageClassifier, NonFiniteLossError
from bam_zoo.training.cli import cli_main, sync_batchnorm_problem
from bam_zoo.training.optim import create_lr_scheduler, param_groups
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, NaNDataModule, checkpoint, write_fashion_mnist

CONFIG = str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml")


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=96, n_test=40)


def tiny_args(root: Path, data_root: Path, *extra: str, config: str = CONFIG) -> list[str]:
    return ["fit", "--config", config, "--data.root", str(data_root), "--data.val_size", "32",
            "--data.batch_size", "16", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]


# --- optimizer groups and schedules -------------------------------------------------------------------------

def test_no_weight_decay_on_norms_and_biases_bam_included() -> None:
    model = bam_zoo.create_model("bam_resnet20", num_classes=10, in_chans=1)
    groups = param_groups(model, weight_decay=5e-4)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())
    bn1d = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert by_id[id(bn1d.weight)] == 0.0 and by_id[id(bn1d.bias)] == 0.0
    for name, p in model.named_parameters():
        assert by_id[id(p)] == (0.0 if p.ndim <= 1 else 5e-4), name


def test_separate_backbone_lr() -> None:
    model = bam_zoo.create_model("resnet20", num_classes=5, in_chans=3)
    groups = param_groups(model, 1e-4, head=model.get_classifier(), head_lr=0.1, backbone_lr=0.01)
    head = {id(p) for p in model.get_classifier().parameters()}
    for g in groups:
        assert {id(p) in head for p in g["params"]} == {g["lr"] == 0.1}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


class OptimizerProbe(pl.Callback):
    """Keep the optimizer the Trainer got from ``configure_optimizers``."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer = trainer.optimizers[0]


@pytest.mark.parametrize("backbone_lr_scale", [1.0, 0.1])
def test_configure_optimizers_uses_the_no_decay_groups(fmnist: Path, tmp_path: Path, backbone_lr_scale: float) -> None:
    model = ImageClassifier("bam_resnet20", num_classes=10, in_chans=1, weight_decay=5e-4,
                            backbone_lr_scale=backbone_lr_scale)
    probe = OptimizerProbe()
    pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[probe], default_root_dir=tmp_path).fit(
        model, datamodule=FashionMNISTDataModule(root=str(fmnist), val_size=32, batch_size=16))
    decay = {id(p): g["weight_decay"] for g in probe.optimizer.param_groups for p in g["params"]}
    assert len(decay) == sum(1 for _ in model.model.parameters())
    for name, p in model.model.named_parameters():
        assert decay[id(p)] == (0.0 if p.ndim <= 1 else 5e-4), name


def lrs(name: str, steps: int = 100, per_epoch: int = 10, peaks: tuple[float, ...] = (0.1,),
        **kwargs: float) -> list[list[float]]:
    """Each param group's LR at every step (one list per group) of a run whose groups peak at ``peaks``."""
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in peaks], momentum=0.9)
    sched = create_lr_scheduler(opt, name, total_steps=steps, steps_per_epoch=per_epoch, **kwargs)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return [list(group) for group in zip(*out)]


def test_warmup_then_cosine() -> None:
    (lr,) = lrs("cosine", warmup_epochs=1, warmup_start_factor=0.01)
    assert lr[0] == pytest.approx(0.001) and lr[5] == pytest.approx(0.0505) and lr[10] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))  # linear ramp up
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # then monotone decay
    assert lr[55] == pytest.approx(0.05) and lr[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 89 / 90)))


def test_each_group_decays_from_its_own_peak_to_min_lr_ratio_of_it() -> None:
    """Fine-tuning's 0.1x backbone LR ramps, peaks and ends at its own scale, not the head's."""
    head, body = lrs("cosine", peaks=(0.1, 0.01), warmup_epochs=1, min_lr_ratio=0.1)
    end = 0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90))  # 89 of the 90 steps after the warm-up
    for peak, lr in ((0.1, head), (0.01, body)):
        assert lr[0] == pytest.approx(0.01 * peak) and lr[10] == pytest.approx(peak)
        assert lr[55] == pytest.approx(0.55 * peak) and lr[-1] == pytest.approx(end * peak)


def test_step_and_multistep_and_onecycle() -> None:
    (step,) = lrs("step", decay_epochs=3, decay_rate=0.1)
    assert step[29] == pytest.approx(0.1) and step[30] == pytest.approx(0.01) and step[60] == pytest.approx(1e-3)
    (step,) = lrs("step", decay_epochs=3, decay_rate=0.1, warmup_epochs=1)  # periods count from the warm-up's end
    assert step[39] == pytest.approx(0.1) and step[40] == pytest.approx(0.01) and step[70] == pytest.approx(1e-3)
    for warmup in (0, 1):  # milestones are epochs of the whole run, warm-up or not
        (multi,) = lrs("multistep", decay_milestones=[2, 7], decay_rate=0.1, warmup_epochs=warmup)
        assert multi[19] == pytest.approx(0.1) and multi[20] == pytest.approx(0.01)
        assert multi[69] == pytest.approx(0.01) and multi[70] == pytest.approx(1e-3)
    (one,) = lrs("onecycle", warmup_epochs=2)
    assert max(one) == pytest.approx(0.1) and one.index(max(one)) in (19, 20) and one[0] < 0.01 and one[-1] < 1e-3
    assert set(lrs("constant")[0]) == {0.1}
    assert lrs("constant", warmup_epochs=1)[0][10:] == [0.1] * 90


# --- the LightningModule ----------------------------------------------------------------------------------

def test_module_options_mixup_ema_channels_last_adamw(fmnist: Path, tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = FashionMNISTDataModule(root=str(fmnist), val_size=32, batch_size=8)
    model = ImageClassifier("bam_resnet20", num_classes=10, in_chans=1, mixup_alpha=0.8, cutmix_alpha=1.0,
                            ema_decay=0.5, channels_last=True, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                            scheduler="onecycle", label_smoothing=0.1)
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    mixed, mix = [], model.mixup
    model.mixup = lambda x, y: (lambda before, out: mixed.append((before, out[0].clone(), y, out[1])) or out)(
        x.clone(), mix(x, y))
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, gradient_clip_val=1.0)
    trainer.fit(model, datamodule=dm)
    assert type(trainer.optimizers[0]).__name__ == "AdamW"
    assert model.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    trained, ema = model.model.conv1.weight, model.model_ema.module.conv1.weight
    assert not torch.equal(ema, start["conv1.weight"]) and not torch.equal(ema, trained)
    assert model.eval_model is model.model_ema.module

    # every training batch was mixed with its reverse, by mixup or by cutmix, and its targets mixed as much
    kinds = []
    for before, after, y, target in mixed:
        flipped = before.flip(0)
        box = (after != before).any(0).any(0)  # cutmix pastes one box of the reversed batch into every image
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        inside = torch.zeros_like(box)
        inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        if torch.equal(after, torch.where(inside, flipped, before)):
            kinds.append("cutmix")
            lam = 1 - inside.float().mean()
        else:
            kinds.append("mixup")
            lam = ((after - flipped) * (before - flipped)).sum() / (before - flipped).square().sum()
            assert torch.allclose(after, lam * before + (1 - lam) * flipped, atol=1e-5)
        assert 0.01 < lam < 0.99
        smooth = nn.functional.one_hot(y, 10) * 0.9 + 0.01  # label_smoothing 0.1 over 10 classes
        assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5)
    assert len(kinds) == 8 and set(kinds) == {"mixup", "cutmix"}, kinds  # 64 training images, batches of 8


def test_epoch_test_accuracy_sees_the_test_set_as_test_does(fmnist: Path, tmp_path: Path) -> None:
    """The per-epoch curve evaluates exactly what `test` evaluates: same inputs (normalised once), same number."""
    from bam_zoo.training.callbacks import EpochTestAccuracy

    pl.seed_everything(0)
    dm = FashionMNISTDataModule(root=str(fmnist), val_size=32, batch_size=16)
    model = ImageClassifier("bam_resnet20", num_classes=10, in_chans=1, channels_last=True)
    seen = []
    predict = model.predict_step
    model.predict_step = lambda x, i: (seen.append(x.clone()), predict(x, i))[1]
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[EpochTestAccuracy()], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    curve = float(trainer.callback_metrics["test_curve/acc1"])
    raw = torch.cat([batch[0] for batch in dm.test_dataloader()])
    assert torch.allclose(torch.cat(seen), dm.eval_augment(raw))
    assert curve == pytest.approx(trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc1"], abs=1e-6)


def test_frozen_backbone_trains_only_the_head(fmnist: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(root=str(fmnist), val_size=32, batch_size=16)
    model = ImageClassifier("bam_resnet20", num_classes=10, in_chans=1, freeze_backbone=True, lr=0.1)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(model, datamodule=dm)
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fc.") for k in changed), changed  # BN running stats frozen too


def test_frozen_backbone_trains_the_bam_that_add_bam_inserted_and_scales_only_the_rest(fmnist: Path,
                                                                                        tmp_path: Path) -> None:
    """Inserted BAM is new, like the head: frozen-backbone fine-tunes train it, and it gets the head's LR."""
    dm = FashionMNISTDataModule(root=str(fmnist), val_size=32, batch_size=16)
    model = ImageClassifier("resnet20", num_classes=10, in_chans=1, add_bam=True, freeze_backbone=True, lr=0.1)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(model, datamodule=dm)
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bam = {k for k in before if ".bam." in k or k.startswith("bam")}
    assert bam and changed - bam and all(k.startswith("fc.") for k in changed - bam), changed
    assert {k for k in bam if k.endswith("gamma")} <= changed and any(k.endswith("running_mean") for k in changed)

    scaled = ImageClassifier("resnet20", num_classes=10, in_chans=1, add_bam=True, backbone_lr_scale=0.1, lr=0.1)
    probe = OptimizerProbe()
    pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[probe], default_root_dir=tmp_path).fit(scaled, datamodule=dm)
    lr = {id(p): g["initial_lr"] for g in probe.optimizer.param_groups for p in g["params"]}
    names = dict(scaled.model.named_parameters())
    assert {n for n, p in names.items() if lr[id(p)] > 0.05} == {n for n in names if n.startswith("fc.") or n in bam}


def test_nan_loss_raises(tmp_path: Path) -> None:
    model = ImageClassifier("resnet20", num_classes=3, in_chans=1)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteLossError, match="Training loss is nan at epoch 0, step 0"):
        trainer.fit(model, datamodule=NaNDataModule())


# --- the CLI: outputs ---------------------------------------------------------------------------------------

def test_fit_writes_checkpoints_logs_and_export(fmnist: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    cli = cli_main(tiny_args(tmp_path, fmnist, "--trainer.max_epochs", "2"))
    elapsed = time.monotonic() - started
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list((tmp_path / "csv").glob("version_*/metrics.csv"))
    assert list((tmp_path / "tensorboard").glob("version_*/events.out.tfevents.*"))

    # checkpoint hyperparameters rebuild the network without the LightningModule
    ckpt = checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 8)  # written after every epoch, improved or not
    hp = ckpt["hyper_parameters"]
    assert (hp["model_name"], hp["num_classes"], hp["in_chans"]) == ("bam_resnet20", 10, 1)
    assert hp["label_names"][0] == "T-shirt/top" and hp["model_kwargs"] is None
    net = bam_zoo.create_model(hp["model_name"], num_classes=hp["num_classes"], in_chans=hp["in_chans"])
    net.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(net.eval()(x), restored.eval()(x))

    # export: Hub layout + metrics.json consistent with itself and with the logged test metrics
    export = tmp_path / "export"
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= {p.name for p in export.iterdir()}
    record = json.loads((export / "metrics.json").read_text())
    cm = torch.tensor(record["confusion_matrix"])
    assert cm.shape == (10, 10) and int(cm.sum()) == 40
    assert record["test"]["acc1"] == pytest.approx(float(cm.trace() / cm.sum()), abs=1e-6)
    assert record["test"]["acc1"] == pytest.approx(float(cli.trainer.callback_metrics["test/acc1"]))
    per_class = torch.tensor(list(record["per_class_acc1"].values()))
    assert torch.allclose(per_class, (cm.diag() / cm.sum(1)).float().nan_to_num(0.0), atol=1e-6)
    assert record["epochs"] == 2 and record["world_size"] == 1
    assert record["best_checkpoint"].startswith(str(tmp_path / "checkpoints" / "best-"))
    # training time, as last.ckpt carries it; testing the best checkpoint afterwards neither resets nor adds to it
    seconds = {name: checkpoint(path)["callbacks"]["HubExport"]["fit_seconds"]
               for name, path in (("last", tmp_path / "checkpoints" / "last.ckpt"), ("best", record["best_checkpoint"]))}
    assert seconds["last"] - 0.01 <= record["train_wall_time_s"] < min(seconds["last"] + seconds["best"], elapsed)
    assert record["recipe"]["model"]["model_name"] == "bam_resnet20"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "bam_resnet20" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["mean"] == [0.286] and config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert config["label_names"][9] == "Ankle boot"

    # the exported weights are the tested (best) ones and load through timm's local-dir source
    best = ImageClassifier.load_from_checkpoint(record["best_checkpoint"])
    loaded = bam_zoo.create_model(f"local-dir:{export}", pretrained=True)
    assert torch.allclose(loaded.eval()(x), best.eval()(x), atol=1e-6)


def test_same_seed_same_weights(fmnist: Path, tmp_path: Path) -> None:
    def weights(run: str, seed: str) -> dict[str, torch.Tensor]:
        cli_main(tiny_args(tmp_path / run, fmnist, "--seed_everything", seed, "--test_after_fit", "false",
                           "--model.model_name", "resnet20"))
        return checkpoint(tmp_path / run / "checkpoints" / "last.ckpt")["state_dict"]

    a, b, c = weights("a", "7"), weights("b", "7"), weights("c", "8")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- the CLI: refusals and dispatch ---------------------------------------------------------------------

def test_nan_loss_message_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--data", "test_training_utils.NaNDataModule", "--model.model_name", "resnet20",
                          "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
                          "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "bam-zoo: error: Training loss is nan" in err and "--trainer.gradient_clip_val" in err
    assert "Traceback" not in err


def test_sync_batchnorm_on_cpu_is_refused_clearly(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", CONFIG, "--trainer.accelerator", "cpu", "--trainer.sync_batchnorm",
                          "true", "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "sync_batchnorm true needs GPUs" in err and "Traceback" not in err
    assert sync_batchnorm_problem(True, "gpu") is None and sync_batchnorm_problem(False, "cpu") is None


def test_sync_batchnorm_conversion_covers_bam_batchnorm1d() -> None:
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

    model = bam_zoo.create_model("bam_resnet20", num_classes=10, in_chans=1)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_bn1d = sum(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert n_bn1d >= 2
    module = ImageClassifier("bam_resnet20", num_classes=10, in_chans=1)
    converted = TorchSyncBatchNorm().apply(module)  # what Lightning does for --trainer.sync_batchnorm true
    kinds = [type(m) for m in converted.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm] * n_bn
    bam_bn = converted.model.layer1.bam.channel_attn.bn
    assert isinstance(bam_bn, nn.SyncBatchNorm) and bam_bn.num_features == model.layer1.bam.channel_attn.bn.num_features


def test_remote_checkpoint_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", CONFIG, "--ckpt_path", "https://example.com/evil.ckpt"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "only read from local paths" in err and "Traceback" not in err


def test_push_is_dispatched_to_the_hub(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import functools
    import types

    import dataclasses

    from bam_zoo.cli import TOOLS

    calls = []

    @functools.wraps(TOOLS["push"].function)  # the parser is built from push's signature
    def recorded_push(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(commit_url="url")

    monkeypatch.setitem(TOOLS, "push", dataclasses.replace(TOOLS["push"], function=recorded_push))
    main(["push", "--checkpoint", "x.ckpt", "--repo-id", "org/name"])
    assert calls == [{"checkpoint": "x.ckpt", "repo_id": "org/name", "private": False, "revision": None,
                      "commit_message": None, "metrics": None, "dataset": None, "trust_checkpoint_code": False}]
    assert capsys.readouterr().out.strip() == "url"


def test_console_script_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("fit", "validate", "test", "predict", "push"))
