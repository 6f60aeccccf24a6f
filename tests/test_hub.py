"""bam-zoo's Hub boundary against a Hub-compatible server on 127.0.0.1, with the real huggingface_hub client.

Round trip (push with the CLI, fetch with ``hf-hub:`` through bam_zoo and timm, identical tensors), LFS
uploads, revisions, one guarded commit per push, the offline mirror, and every error case of the README's
table. See ``hf_server.py`` for the server and the fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError

import bam_zoo
from bam_zoo import hub
from bam_zoo.cli import main
from bam_zoo.errors import (
    ChecksumMismatchError, CorruptCheckpointError, MetricConflictError, UnknownPretrainedTagError, WeightsNotFoundError,
)
from bam_zoo.models import pretrained as shipped

try:
    from tests.hf_server import OTHER_TOKEN, WRITE_TOKEN, hub_env, hub_server  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from hf_server import OTHER_TOKEN, WRITE_TOKEN, hub_env, hub_server  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
FMNIST_LABELS = list(shipped.FASHION_MNIST_LABELS)


@pytest.fixture(autouse=True)
def _hub(hub_env):
    """Every test here talks to the test server with a fresh cache (see ``hf_server.hub_env``)."""
    return hub_env


# ------------------------------------------------------------------------------------------ helpers


def fmnist_model(seed: int = 0) -> torch.nn.Module:
    """The 1-channel Fashion-MNIST BAM-ResNet-20, with seed-dependent weights (and BN statistics)."""
    torch.manual_seed(seed)
    model = bam_zoo.create_model("bam_resnet20", in_chans=1, num_classes=10)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return model.eval()


def export(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    kwargs.setdefault("model_name", "bam_resnet20.fmnist")
    return hub.save_pretrained(model, folder, **kwargs)


def fetch(repo_id: str, **kwargs) -> torch.nn.Module:
    return bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True, **kwargs)


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def commit_oid(url: str) -> str:
    return url.strip().rstrip("/").split("/")[-1]


def push_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``python cli.py push ARGS`` in this process: exit status, stdout, stderr."""
    try:
        main(["push", *args])
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def raw_repo(hub_env, files: dict[str, bytes], org: str = "alice") -> str:
    """A repo holding exactly ``files``, committed with the plain client (to craft broken repos)."""
    api = HfApi(token=WRITE_TOKEN)
    repo_id = hub_env.repo_id(org)
    api.create_repo(repo_id)
    api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in files.items()],
                      commit_message="crafted")
    return repo_id


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real ``.ckpt`` from one training step of ``ImageClassifier`` (bam_resnet20, 1 x 28 x 28, 10 classes)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from bam_zoo.training import ImageClassifier

    torch.manual_seed(0)
    module = ImageClassifier(model_name="bam_resnet20", num_classes=10, in_chans=1, label_names=FMNIST_LABELS,
                             lr=0.05, scheduler="constant")
    data = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=8)
    root = tmp_path_factory.mktemp("fit")
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, train_dataloaders=data)
    path = root / "last.ckpt"
    trainer.save_checkpoint(path)
    expected = {k: v.clone() for k, v in module.model.state_dict().items()}
    return path, expected


# ------------------------------------------------------------------------------- timm's layout, the card


def test_save_pretrained_writes_timm_layout_with_model_card(tmp_path):
    model = fmnist_model()
    recipe = {"trainer": {"max_epochs": 30}, "model": {"model_name": "bam_resnet20"}, "data": {"class_path": "x"}}
    folder = export(model, tmp_path / "out", label_names=FMNIST_LABELS, metrics={"top1": 92.41, "top5": 99.83},
                    dataset="fashion_mnist", recipe=recipe)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "recipe.yaml"]

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "bam_resnet20"
    assert config["num_classes"] == 10 and config["num_features"] == model.num_features
    assert config["label_names"] == FMNIST_LABELS and config["model_args"]["in_chans"] == 1
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct", "first_conv", "classifier"):
        assert key in config["pretrained_cfg"], key
    assert config["bam_zoo"]["metrics"] == {"top1": 92.41, "top5": 99.83}
    assert yaml.safe_load((folder / "recipe.yaml").read_text()) == recipe
    assert_same_weights(safetensors.torch.load_file(folder / "model.safetensors"), model)

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and {"bam", "image-classification", "timm"} <= set(card.data.tags)
    assert card.data.license == "mit" and card.data.datasets == ["fashion_mnist"]
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"Top-1 accuracy (%)": 92.41, "Top-5 accuracy (%)": 99.83}
    assert "| fashion_mnist | Top-1 accuracy (%) | 92.41 |" in card.text
    assert "python cli.py fit --config recipe.yaml" in card.text  # and recipe.yaml is there (asserted above)
    assert f"local-dir:{folder.resolve()}" in card.text  # not pushed yet: the card names this folder


def test_channels_last_model_exports_contiguous_weights_and_reloads_into_either_format(tmp_path):
    """A run trained channels_last (the configs' default) exports; safetensors stores NCHW weights."""
    model = fmnist_model().to(memory_format=torch.channels_last)
    def channels_last_params() -> int:
        return sum(not p.is_contiguous() for p in model.parameters())

    before = channels_last_params()
    assert before > 0
    folder = export(model, tmp_path / "out")
    assert channels_last_params() == before  # the model itself keeps its format
    saved = safetensors.torch.load_file(folder / "model.safetensors")
    assert all(t.is_contiguous() for t in saved.values())
    assert_same_weights(saved, model)
    x = torch.randn(2, 1, 28, 28)
    for fmt in (torch.contiguous_format, torch.channels_last):
        again = bam_zoo.create_model(f"local-dir:{folder}", pretrained=True).eval().to(memory_format=fmt)
        torch.testing.assert_close(again(x.contiguous(memory_format=fmt)), model(x))


def test_save_pretrained_refuses_what_was_not_measured_in_percent(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        export(fmnist_model(), tmp_path, metrics={"top1": float("nan")})
    with pytest.raises(ValueError, match="percent"):
        export(fmnist_model(), tmp_path, metrics={"val/acc1": 0.1133})
    with pytest.raises(ValueError, match="label_names"):
        export(fmnist_model(), tmp_path, label_names=["a", "b"])


def test_finetuned_export_describes_its_own_weights(tmp_path):
    """A 3-class fine-tune of a shipped tag carries neither the tag nor its 10 label names (issue 11, 4)."""
    model = bam_zoo.create_model("bam_resnet20.fmnist", num_classes=3)
    assert model.pretrained_cfg["tag"] == "fmnist" and len(model.pretrained_cfg["label_names"]) == 10
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": 3}  # as HubExport records the new head
    folder = export(model, tmp_path / "ft", model_name="bam_resnet20.fmnist_ft_subset", label_names=["a", "b", "c"],
                    dataset="fashion_mnist", metrics={"top1": 97.5})
    config = json.loads((folder / "config.json").read_text())
    assert "tag" not in config["pretrained_cfg"] and config["pretrained_cfg"]["num_classes"] == 3
    assert config["label_names"] == ["a", "b", "c"]
    assert config["pretrained_cfg"].get("label_names", ["a", "b", "c"]) == ["a", "b", "c"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "bam_resnet20.fmnist_ft_subset" and "# bam_resnet20.fmnist_ft_subset" in card.text
    assert "Classes (3): a, b, c" in card.text and "Training recipe" in card.text
    assert "recipe.yaml" not in card.text  # no recipe was recorded, so the card names none
    reloaded = bam_zoo.create_model(f"local-dir:{folder}", pretrained=True)
    assert reloaded.pretrained_cfg["label_names"] == ["a", "b", "c"]


# ------------------------------------------------------------------------------- round trips


def test_push_lightning_ckpt_with_cli_then_fetch_through_bam_zoo_and_timm(hub_env, lightning_ckpt, capsys):
    ckpt, expected = lightning_ckpt
    repo_id = hub_env.repo_id()
    rc, out, err = push_cli(["--checkpoint", str(ckpt), "--repo-id", repo_id, "--metrics", '{"top1": 91.5}',
                             "--dataset", "fashion_mnist"], capsys)
    assert rc == 0, err
    assert out.strip() == f"{hub_env.endpoint}/{repo_id}/commit/{hub_env.server.head(repo_id)}"
    assert WRITE_TOKEN not in out + err

    remote = hub_env.server.files(repo_id)
    assert {"config.json", "model.safetensors", "README.md", "recipe.yaml"} <= remote.keys()
    config = json.loads(remote["config.json"])
    assert config["architecture"] == "bam_resnet20" and config["label_names"] == FMNIST_LABELS
    card = remote["README.md"].decode()
    assert "model-index" in card and "| fashion_mnist | Top-1 accuracy (%) | 91.50 |" in card
    assert f"hf-hub:{repo_id}" in card and f"# {repo_id.split('/')[1]}" in card
    # every metric on the card is a percentage (the checkpoint's val/acc1 is a fraction)
    assert all(1.0 <= r.metric_value <= 100.0 or r.metric_value == 0.0
               for r in ModelCard(card).data.eval_results)

    via_bam_zoo, via_timm = fetch(repo_id), timm.create_model(f"hf-hub:{repo_id}", pretrained=True)
    for model in (via_bam_zoo, via_timm):
        assert_same_weights(model, expected)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(via_bam_zoo.eval()(x), via_timm.eval()(x))
    assert via_bam_zoo.pretrained_cfg["label_names"] == FMNIST_LABELS


def test_ckpt_metrics_become_percent(lightning_ckpt, tmp_path):
    path, _ = lightning_ckpt
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["callbacks"] = {"ModelCheckpoint{'monitor': 'val/acc1'}": {"monitor": "val/acc1", "best_model_score":
                                                                   torch.tensor(0.1133)}}
    torch.save(ckpt, tmp_path / "best.ckpt")
    assert hub.load_export(tmp_path / "best.ckpt").metrics == pytest.approx({"val_top1": 11.33})


def test_push_with_python_cli_py_in_a_subprocess_goes_through_lfs(hub_env, tmp_path):
    """The real command line: env vars select the Hub, cache and token; the weights travel by LFS."""
    model = fmnist_model(seed=3)
    folder = export(model, tmp_path / "export", metrics={"top1": 90.0})
    repo_id = hub_env.repo_id()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "cli.py", "push", "--checkpoint", str(folder), "--repo-id", repo_id,
                           "--commit-message", "first weights"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"/{repo_id}/commit/{hub_env.server.head(repo_id)}")
    assert WRITE_TOKEN not in proc.stdout + proc.stderr
    weights = (folder / "model.safetensors").read_bytes()
    assert hub_env.server.files(repo_id)["model.safetensors"] == weights  # byte for byte
    assert hub_env.server.lfs_objects[hashlib.sha256(weights).hexdigest()] == weights  # sent through LFS
    assert ("PUT", f"/lfs-upload/{hashlib.sha256(weights).hexdigest()}") in hub_env.server.requests
    assert hub_env.server.repos[repo_id].commits[hub_env.server.head(repo_id)].message == "first weights"
    card = hub_env.server.files(repo_id)["README.md"].decode()
    assert f"hf-hub:{repo_id}" in card and "local-dir:" not in card  # the card names where it was pushed
    assert_same_weights(fetch(repo_id), model)


def test_bam_model_pushed_with_timms_own_push_to_hf_hub_loads_with_bam_zoo(hub_env):
    from timm.models import push_to_hf_hub

    model = fmnist_model(seed=5)
    repo_id = hub_env.repo_id()
    push_to_hf_hub(model, repo_id, model_config={"label_names": FMNIST_LABELS})  # safetensors + pickle
    assert {"model.safetensors", "pytorch_model.bin"} <= hub_env.server.files(repo_id).keys()
    assert_same_weights(fetch(repo_id), model)
    assert_same_weights(timm.create_model(f"hf-hub:{repo_id}", pretrained=True), model)


def test_second_push_serves_new_revision_old_one_by_commit_hash(hub_env, tmp_path):
    repo_id = hub_env.repo_id()
    v1, v2 = fmnist_model(seed=1), fmnist_model(seed=2)
    oid1 = hub.push(export(v1, tmp_path / "v1"), repo_id).oid
    fetch(repo_id)  # fill the cache with v1: a later fetch must not serve it stale
    oid2 = hub.push(export(v2, tmp_path / "v2"), repo_id, commit_message="better weights").oid
    assert oid1 != oid2 and hub_env.server.head(repo_id) == oid2
    assert_same_weights(fetch(repo_id), v2)
    assert_same_weights(fetch(f"{repo_id}@{oid1}"), v1)
    assert_same_weights(timm.create_model(f"hf-hub:{repo_id}@{oid1}", pretrained=True), v1)
    assert_same_weights(fetch(f"{repo_id}@{oid2}"), v2)


def test_push_to_a_branch_leaves_main_alone(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    main_model, branch_model = fmnist_model(seed=1), fmnist_model(seed=4)
    hub.push(export(main_model, tmp_path / "a"), repo_id)
    rc, out, _ = push_cli(["--checkpoint", str(export(branch_model, tmp_path / "b")), "--repo_id", repo_id,
                           "--revision", "experiment"], capsys)
    assert rc == 0 and hub_env.server.head(repo_id, "experiment") == commit_oid(out)
    assert_same_weights(fetch(f"{repo_id}@experiment"), branch_model)
    assert_same_weights(fetch(repo_id), main_model)


def test_fetched_model_adapts_head_and_in_chans_on_request(hub_env, tmp_path):
    model = fmnist_model(seed=6)
    repo_id = hub_env.repo_id()
    hub.push(export(model, tmp_path / "x"), repo_id)
    five = fetch(repo_id, num_classes=5)
    assert five.get_classifier().out_features == 5
    assert torch.equal(five.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    rgb = fetch(repo_id, in_chans=3)
    assert rgb.conv1.weight.shape[1] == 3
    assert torch.equal(rgb.layer1[0].conv1.weight, model.layer1[0].conv1.weight)


# ------------------------------------------------------------------------------- one guarded commit


def test_failed_commit_leaves_existing_repo_unchanged(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    v1 = fmnist_model(seed=1)
    hub.push(export(v1, tmp_path / "v1"), repo_id)
    head, files = hub_env.server.head(repo_id), hub_env.server.files(repo_id)

    hub_env.server.fail_next("commit", 500, "storage backend unavailable")
    rc, out, err = push_cli(["--checkpoint", str(export(fmnist_model(seed=2), tmp_path / "v2")),
                             "--repo-id", repo_id], capsys)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert "HfHubHTTPError" in err and "500" in err and "remote repository is unchanged" in err
    assert hub_env.server.head(repo_id) == head and hub_env.server.files(repo_id) == files
    assert_same_weights(fetch(repo_id), v1)


def test_failed_first_push_removes_the_repo_it_created(hub_env, tmp_path):
    repo_id = hub_env.repo_id()
    hub_env.server.fail_next("commit", 500)
    with pytest.raises(HfHubHTTPError) as info:
        hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    assert "was deleted" in info.value.__notes__[0]
    assert repo_id not in hub_env.server.repos


def test_concurrent_push_is_rejected_not_interleaved(hub_env, tmp_path):
    """bam-zoo's push names its parent: another commit landing first makes it fail (412), not interleave."""
    repo_id = hub_env.repo_id()
    v1 = fmnist_model(seed=1)
    hub.push(export(v1, tmp_path / "a"), repo_id)
    race = lambda: hub_env.server.commit(repo_id, {"notes.txt": b"other push"}, "someone else")  # noqa: E731
    hub_env.server.fail_next("commit", before=race)
    with pytest.raises(HfHubHTTPError) as info:
        hub.push(export(fmnist_model(seed=2), tmp_path / "b"), repo_id)
    assert info.value.response.status_code == 412
    remote = hub_env.server.files(repo_id)
    assert remote["notes.txt"] == b"other push"
    assert remote["model.safetensors"] == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_private_push_is_invisible_to_others(hub_env, tmp_path):
    repo_id = hub_env.repo_id()
    hub.push(export(fmnist_model(seed=7), tmp_path / "p"), repo_id, private=True)
    assert hub_env.server.repos[repo_id].private
    for token in (OTHER_TOKEN, None):
        hub_env.set_token(token)
        with pytest.raises(RepositoryNotFoundError, match=repo_id):
            fetch(repo_id)


def test_bad_token_is_reported_not_printed(hub_env, tmp_path, capsys, caplog):
    bad = "hf_this_is_not_a_valid_token_0123456789"
    hub_env.set_token(bad)
    repo_id = hub_env.repo_id()
    rc, out, err = push_cli(["--checkpoint", str(export(fmnist_model(), tmp_path / "m")), "--repo-id", repo_id],
                            capsys)
    assert rc == 1 and "401" in err and "Traceback" not in err
    assert bad not in out + err + caplog.text
    assert repo_id not in hub_env.server.repos
    with pytest.raises(HfHubHTTPError) as info:
        fetch(repo_id)
    assert info.value.response.status_code == 401 and bad not in str(info.value)


def test_push_without_token_or_write_access(hub_env, tmp_path):
    hub_env.set_token(None)
    repo_id = hub_env.repo_id("alice")
    with pytest.raises(HfHubHTTPError) as info:
        hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    assert info.value.response.status_code == 401
    hub_env.set_token(OTHER_TOKEN)
    with pytest.raises(HfHubHTTPError) as info:
        hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    assert info.value.response.status_code == 403 and OTHER_TOKEN not in str(info.value)
    assert repo_id not in hub_env.server.repos


def test_push_to_an_unreachable_hub(hub_env, tmp_path, capsys):
    hub_env.unreachable()
    rc, out, err = push_cli(["--checkpoint", str(export(fmnist_model(), tmp_path / "m")),
                             "--repo-id", hub_env.repo_id()], capsys)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert "remote repository is unchanged" in err


def test_push_refuses_unusable_local_checkpoints(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    rc, out, err = push_cli(["--checkpoint", str(garbage), "--repo-id", repo_id], capsys)
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "garbage.ckpt is not a Lightning checkpoint" in err and "cli.py fit" in err

    not_ours = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, not_ours)
    with pytest.raises(CorruptCheckpointError, match="model_name"):
        hub.push(not_ours, repo_id)

    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    rc, _, err = push_cli(["--checkpoint", str(half), "--repo-id", repo_id], capsys)
    assert rc == 1 and "not an export folder" in err and "model.safetensors" in err

    mismatched = export(fmnist_model(), tmp_path / "mm")
    weights = safetensors.torch.load_file(mismatched / "model.safetensors")
    weights.pop("fc.bias")
    weights["extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(weights, mismatched / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"1 missing \(fc\.bias\); 1 unexpected \(extra\.weight\)"):
        hub.push(mismatched, repo_id)
    assert repo_id not in hub_env.server.repos  # nothing was sent


def test_metric_option_never_overwrites_a_measured_metric(hub_env, tmp_path, capsys):
    folder = export(fmnist_model(), tmp_path / "m", metrics={"top1": 44.79})
    repo_id = hub_env.repo_id()
    rc, _, err = push_cli(["--checkpoint", str(folder), "--repo-id", repo_id, "--metrics", '{"top1": 99.9}'], capsys)
    assert rc == 1 and "44.79" in err and "99.9" in err and repo_id not in hub_env.server.repos
    with pytest.raises(MetricConflictError):
        hub.push(folder, repo_id, metrics={"top1": 99.9})
    hub.push(folder, repo_id, metrics={"top5": 99.1})  # a metric the export lacks is added
    assert json.loads(hub_env.server.files(repo_id)["config.json"])["bam_zoo"]["metrics"] == {"top1": 44.79,
                                                                                            "top5": 99.1}


def test_push_prefers_the_ema_weights_the_module_exports(hub_env, lightning_ckpt, tmp_path):
    """ImageClassifier validates and exports its EMA copy when it keeps one; push does the same."""
    path, trained = lightning_ckpt
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in trained.items()}
    ckpt["state_dict"].update({f"model_ema.module.{k}": v for k, v in ema.items()})
    torch.save(ckpt, tmp_path / "ema.ckpt")
    repo_id = hub_env.repo_id()
    hub.push(tmp_path / "ema.ckpt", repo_id)
    assert_same_weights(fetch(repo_id), ema)


def test_usage_line_and_help_list_the_tools(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    usage = "".join(capsys.readouterr().out.split("\n\n")[0].split())  # the usage paragraph, however wrapped
    assert "{fit,validate,test,predict,push,explain,convert}" in usage
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert "--repo_id" in capsys.readouterr().out


# ------------------------------------------------------------------------------- fetch errors


def test_unknown_repo_and_revision(hub_env, tmp_path):
    with pytest.raises(RepositoryNotFoundError, match="alice/does-not-exist"):
        fetch("alice/does-not-exist")
    repo_id = hub_env.repo_id()
    hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    with pytest.raises(RevisionNotFoundError, match="no-such-branch"):
        fetch(f"{repo_id}@no-such-branch")


def test_missing_files(hub_env, tmp_path):
    folder = export(fmnist_model(), tmp_path / "m")
    only_config = raw_repo(hub_env, {"config.json": (folder / "config.json").read_bytes()})
    with pytest.raises(EntryNotFoundError, match="model.safetensors"):
        fetch(only_config)
    no_config = raw_repo(hub_env, {"model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(EntryNotFoundError, match="config.json"):
        fetch(no_config)


def test_pickle_only_repo_is_never_unpickled(hub_env):
    """A repo with only pytorch_model.bin (timm's safe_serialization=False) is refused, not loaded."""
    from timm.models import push_to_hf_hub

    repo_id = hub_env.repo_id()
    push_to_hf_hub(fmnist_model(), repo_id, safe_serialization=False)
    assert "model.safetensors" not in hub_env.server.files(repo_id)
    for create in (bam_zoo.create_model, timm.create_model):  # bam archs refuse it through timm too
        with pytest.raises(EntryNotFoundError) as info:
            create(f"hf-hub:{repo_id}", pretrained=True)
        assert "never unpickled" in info.value.__notes__[0]
    assert not any(path.endswith("pytorch_model.bin") for _, path in hub_env.server.requests)


def test_corrupt_safetensors(hub_env, tmp_path):
    folder = export(fmnist_model(), tmp_path / "m")
    truncated = (folder / "model.safetensors").read_bytes()[:-100]
    repo_id = raw_repo(hub_env, {"config.json": (folder / "config.json").read_bytes(), "model.safetensors": truncated})
    with pytest.raises(SafetensorError):
        fetch(repo_id)


def test_unregistered_architecture_in_config(hub_env, tmp_path):
    folder = export(fmnist_model(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "bam_resnet9000"
    repo_id = raw_repo(hub_env, {"config.json": json.dumps(config).encode(),
                                 "model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(RuntimeError, match="Unknown model.*bam_resnet9000"):
        fetch(repo_id)


def test_weights_of_another_architecture_are_listed_key_by_key(hub_env, tmp_path):
    """Plain resnet20 weights under a bam_resnet20 config: the error counts the BAM keys they lack."""
    plain = bam_zoo.create_model("resnet20", in_chans=1, num_classes=10)
    folder = export(fmnist_model(), tmp_path / "m")
    buffer = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(plain.state_dict(), buffer)
    repo_id = raw_repo(hub_env, {"config.json": (folder / "config.json").read_bytes(),
                                 "model.safetensors": buffer.read_bytes()})
    with pytest.raises(RuntimeError, match=r"does not fit bam_resnet20: \d+ missing \([^)]*bam") as info:
        fetch(repo_id, num_classes=4)  # even with the head adapted, as timm then loads with strict=False
    assert "unexpected" not in str(info.value)


def test_strict_keys_allows_only_the_deliberate_head_and_stem_adaptation():
    model = bam_zoo.create_model("bam_resnet20", in_chans=1, num_classes=10)
    sd = dict(model.state_dict())
    assert shipped.strict_keys(sd, model) is sd
    wrong = {**sd, "extra.weight": torch.zeros(1)}
    del wrong["fc.bias"]
    with pytest.raises(RuntimeError, match=r"1 missing \(fc\.bias\); 1 unexpected \(extra\.weight\)"):
        shipped.strict_keys(wrong, model)


def test_offline_uses_cache_and_fails_clearly_without_one(hub_env, tmp_path):
    model = fmnist_model(seed=8)
    repo_id = hub_env.repo_id()
    hub.push(export(model, tmp_path / "m"), repo_id)
    fetch(repo_id)  # fills the cache
    hub_env.offline()
    requests = len(hub_env.server.requests)
    assert_same_weights(fetch(repo_id), model)
    assert len(hub_env.server.requests) == requests  # served from the cache, nothing sent
    with pytest.raises(LocalEntryNotFoundError):
        fetch(hub_env.repo_id())


# ------------------------------------------------------------------------------- tags and the mirror


@pytest.fixture
def test_tag(hub_env, monkeypatch):
    """Register ``bam_resnet20.hubtest<random>`` (Hub id ``bam-zoo/<that name>``) in timm for one test.

    The shipped tags are registered by ``bam_zoo.models``; this adds one whose weights the test controls,
    through the same registry timm's ``register_model`` fills.
    """
    from timm.models import PretrainedCfg
    from timm.models import _registry as reg

    tag = "hubtest" + uuid.uuid4().hex[:8]
    arch = "bam_resnet20"
    name = f"{arch}.{tag}"
    cfg = PretrainedCfg(hf_hub_id=f"bam-zoo/{name}", architecture=arch, tag=tag, num_classes=10,
                        input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), first_conv="conv1", classifier="fc",
                        license="mit", crop_pct=1.0)
    monkeypatch.setitem(reg._model_pretrained_cfgs, name, cfg)
    monkeypatch.setitem(reg._model_with_tags, arch, [*reg._model_with_tags.get(arch, []), name])
    monkeypatch.setattr(reg, "_model_has_pretrained", reg._model_has_pretrained | {name})
    monkeypatch.setitem(shipped.WEIGHT_METADATA, name, {"dataset": "fashion_mnist", "top1": 91.0, "top5": 99.7})
    monkeypatch.setattr(shipped, "_mirror_notice_given", False)
    return name


def test_tag_loads_from_hub_by_name_in_bam_zoo_and_timm(hub_env, test_tag, tmp_path):
    model = fmnist_model(seed=9)
    hub.push(export(model, tmp_path / "m"), f"bam-zoo/{test_tag}")
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), model)
    assert_same_weights(timm.create_model(test_tag, pretrained=True), model)
    fine_tune = bam_zoo.create_model(test_tag, pretrained=True, num_classes=4)
    assert fine_tune.get_classifier().out_features == 4
    assert torch.equal(fine_tune.conv1.weight, model.conv1.weight)


def test_tag_revision_pin_and_sha256(hub_env, test_tag, tmp_path, monkeypatch):
    v1, v2 = fmnist_model(seed=1), fmnist_model(seed=2)
    oid1 = hub.push(export(v1, tmp_path / "v1"), f"bam-zoo/{test_tag}").oid
    hub.push(export(v2, tmp_path / "v2"), f"bam-zoo/{test_tag}")
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), v2)

    sha1 = shipped.sha256sum(tmp_path / "v1" / "model.safetensors")
    monkeypatch.setitem(shipped.WEIGHT_METADATA, test_tag, {"hf_hub_revision": oid1, "sha256": sha1})
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), v1)

    monkeypatch.setitem(shipped.WEIGHT_METADATA, test_tag, {"sha256": sha1})  # main now holds v2
    with pytest.raises(ChecksumMismatchError, match=f"{sha1}.*Pin the recorded hf_hub_revision") as info:
        bam_zoo.create_model(test_tag, pretrained=True)
    assert info.value.expected == sha1 and isinstance(info.value, ValueError)


def test_tag_falls_back_to_mirror_when_hub_unreachable(hub_env, test_tag, caplog):
    mirrored = fmnist_model(seed=10)
    export(mirrored, hub_env.mirror / test_tag, metrics={"top1": 88.8})
    hub_env.unreachable()
    with caplog.at_level("WARNING", logger="bam_zoo.models.pretrained"):
        assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), mirrored)
        assert_same_weights(timm.create_model(test_tag, pretrained=True), mirrored)
    assert caplog.text.count("offline copies") == 1 and "cannot be reached" in caplog.text

    hub_env.set_endpoint(hub_env.endpoint)  # reachable again, but nothing pushed: the mirror still serves
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), mirrored)


def test_tag_order_is_hub_then_cache_then_mirror(hub_env, test_tag, tmp_path):
    on_hub, mirrored = fmnist_model(seed=11), fmnist_model(seed=12)
    hub.push(export(on_hub, tmp_path / "hub"), f"bam-zoo/{test_tag}")
    export(mirrored, hub_env.mirror / test_tag)
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), on_hub)  # Hub first (and cached)
    hub_env.unreachable()
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), on_hub)  # then the cache


def test_tag_neither_on_hub_nor_mirrored(hub_env, test_tag):
    hub_env.offline()
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set") as info:
        bam_zoo.create_model(test_tag, pretrained=True)
    assert str(hub_env.mirror / test_tag) in str(info.value) and info.value.__suppress_context__
    hub_env.offline(False)
    with pytest.raises(WeightsNotFoundError, match=f"bam-zoo/{test_tag} does not hold them") as info:
        bam_zoo.create_model(test_tag, pretrained=True)
    assert "set BAM_ZOO_CHECKPOINTS" in str(info.value) and "\n" not in str(info.value)


def test_mirror_checksum_mismatch_says_how_to_restore_it(hub_env, test_tag, monkeypatch):
    folder = export(fmnist_model(), hub_env.mirror / test_tag)
    monkeypatch.setitem(shipped.WEIGHT_METADATA, test_tag, {"sha256": "0" * 64})
    hub_env.unreachable()
    with pytest.raises(ChecksumMismatchError, match=str(folder / "model.safetensors")) as info:
        bam_zoo.create_model(test_tag, pretrained=True)
    assert "not on the Hub" in str(info.value) and "git checkout" in str(info.value)
    assert "download it again" not in str(info.value)


def test_offline_mirror_notice_is_said_once_per_process(hub_env):
    """Loading both shipped weights offline (as ``python -m bam_zoo.evaluate`` does) prints one plain note."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("BAM_ZOO_CHECKPOINTS")
    code = "import bam_zoo\nfor n in ('bam_resnet20.fmnist', 'resnet20.fmnist'): bam_zoo.create_model(n, pretrained=True)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("offline copies") == 1 and "HF_HUB_OFFLINE is set" in proc.stderr


def test_unknown_tag(test_tag):
    with pytest.raises(UnknownPretrainedTagError, match="hubtest"):
        bam_zoo.create_model("bam_resnet20.nope", pretrained=True)


def test_list_pretrained_reports_tags_with_metrics(hub_env, test_tag):
    listed = {p.name: p for p in bam_zoo.list_pretrained("bam_resnet20*")}
    info = listed[test_tag]
    assert info.hf_hub_id == f"bam-zoo/{test_tag}" and info.metrics == {"top1": 91.0, "top5": 99.7}
    assert info.dataset == "fashion_mnist" and info.input_size == (1, 28, 28) and not info.mirrored
    assert bam_zoo.list_pretrained("nothing*") == []
