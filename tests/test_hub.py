"""bam_zoo.hub against a Hub-compatible server on 127.0.0.1, with the real huggingface_hub client.

Round trip (push with the CLI, fetch with ``hf-hub:`` through bam_zoo and timm, identical tensors),
revisions (a second push serves the new weights, the old stay fetchable by commit id), the offline
mirror, and every error case of the issue. See ``hf_server.py`` for the server and the fixtures.
"""

from __future__ import annotations

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
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

import bam_zoo
from bam_zoo import hub
from bam_zoo.errors import (
    BamZooError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    HubAuthError,
    HubOfflineError,
    PretrainedNotFoundError,
    PushError,
    RepoNotFoundError,
    StateDictMismatchError,
    UnknownPretrainedTagError,
    UnregisteredArchitectureError,
)

try:
    from tests.hf_server import OTHER_TOKEN, WRITE_TOKEN, hub_env, hub_server  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from hf_server import OTHER_TOKEN, WRITE_TOKEN, hub_env, hub_server  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
FMNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


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


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def commit_oid(url: str) -> str:
    return url.strip().rstrip("/").split("/")[-1]


def push_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = hub.push_main(args)
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


# ------------------------------------------------------------------------------- 1. timm's layout


def test_save_pretrained_writes_timm_layout_with_model_card(tmp_path):
    model = fmnist_model()
    folder = export(model, tmp_path / "out", label_names=FMNIST_LABELS, metrics={"top1": 92.41, "top5": 99.83},
                    dataset="fashion_mnist", recipe={"trainer": {"max_epochs": 30}})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "bam_resnet20"
    assert config["num_classes"] == 10 and config["num_features"] == model.num_features
    assert config["global_pool"] == "avg"
    assert config["label_names"] == FMNIST_LABELS
    assert config["model_args"]["in_chans"] == 1
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct", "first_conv", "classifier"):
        assert key in config["pretrained_cfg"], key
    assert config["pretrained_cfg"]["input_size"][0] == 1
    assert config["bam_zoo"]["metrics"] == {"top1": 92.41, "top5": 99.83}

    assert_same_weights(safetensors.torch.load_file(folder / "model.safetensors"), model)

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm"
    assert {"bam", "image-classification", "timm"} <= set(card.data.tags)
    assert card.data.license == "mit"
    assert card.data.datasets == ["fashion_mnist"]
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"Top-1 accuracy (%)": 92.41, "Top-5 accuracy (%)": 99.83}
    assert "| fashion_mnist | Top-1 accuracy (%) | 92.41 |" in card.text
    assert '"max_epochs": 30' in card.text


def test_save_pretrained_refuses_unmeasured_metrics(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        export(fmnist_model(), tmp_path, metrics={"top1": float("nan")})
    with pytest.raises(ValueError, match="label_names"):
        export(fmnist_model(), tmp_path, label_names=["a", "b"])


# ------------------------------------------------------------------------------- 2./6. round trip


def test_push_lightning_ckpt_with_cli_then_fetch_through_bam_zoo_and_timm(hub_env, lightning_ckpt, capsys):
    ckpt, expected = lightning_ckpt
    repo_id = hub_env.repo_id()
    rc, out, err = push_cli(["--checkpoint", str(ckpt), "--repo-id", repo_id, "--metric", "top1=91.5",
                             "--dataset", "fashion_mnist"], capsys)
    assert rc == 0, err
    url = out.strip().splitlines()[-1]
    assert url == f"{hub_env.endpoint}/{repo_id}/commit/{hub_env.server.head(repo_id)}"
    assert WRITE_TOKEN not in out + err

    remote = hub_env.server.files(repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= remote.keys()
    config = json.loads(remote["config.json"])
    assert config["architecture"] == "bam_resnet20" and config["label_names"] == FMNIST_LABELS
    assert "model-index" in remote["README.md"].decode() and "91.5" in remote["README.md"].decode()

    via_bam_zoo = bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True)
    via_timm = timm.create_model(f"hf-hub:{repo_id}", pretrained=True)
    via_hub = hub.create_model_from_hub(repo_id)
    for model in (via_bam_zoo, via_timm, via_hub):
        assert_same_weights(model, expected)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(via_bam_zoo.eval()(x), via_timm.eval()(x))
    assert via_hub.pretrained_cfg["label_names"] == FMNIST_LABELS


def test_push_with_python_cli_py_in_a_subprocess(hub_env, tmp_path):
    """The real command line: env vars (not patched constants) select the Hub, cache and token."""
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
    # exported folders go up byte for byte
    assert hub_env.server.files(repo_id)["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert hub_env.server.repos[repo_id].commits[hub_env.server.head(repo_id)].message == "first weights"
    assert_same_weights(hub.create_model_from_hub(repo_id), model)


def test_bam_model_pushed_with_timms_own_push_to_hf_hub_loads_with_bam_zoo(hub_env):
    from timm.models import push_to_hf_hub

    model = fmnist_model(seed=5)
    repo_id = hub_env.repo_id()
    push_to_hf_hub(model, repo_id, model_config={"label_names": FMNIST_LABELS})  # safetensors + pickle
    assert {"model.safetensors", "pytorch_model.bin"} <= hub_env.server.files(repo_id).keys()
    assert_same_weights(bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True), model)
    assert_same_weights(hub.create_model_from_hub(repo_id), model)
    assert_same_weights(timm.create_model(f"hf-hub:{repo_id}", pretrained=True), model)


def test_second_push_serves_new_revision_old_one_by_commit_hash(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    v1, v2 = fmnist_model(seed=1), fmnist_model(seed=2)
    rc, out1, _ = push_cli(["--checkpoint", str(export(v1, tmp_path / "v1")), "--repo-id", repo_id], capsys)
    assert rc == 0
    hub.create_model_from_hub(repo_id)  # fill the cache with v1: a later fetch must not serve it stale
    rc, out2, _ = push_cli(["--checkpoint", str(export(v2, tmp_path / "v2")), "--repo-id", repo_id,
                            "--commit-message", "better weights"], capsys)
    assert rc == 0
    oid1, oid2 = commit_oid(out1), commit_oid(out2)
    assert oid1 != oid2 and hub_env.server.head(repo_id) == oid2

    assert_same_weights(hub.create_model_from_hub(repo_id), v2)
    assert_same_weights(bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True), v2)
    assert_same_weights(hub.create_model_from_hub(f"{repo_id}@{oid1}"), v1)
    assert_same_weights(timm.create_model(f"hf-hub:{repo_id}@{oid1}", pretrained=True), v1)
    assert_same_weights(hub.create_model_from_hub(f"{repo_id}@{oid2}"), v2)


def test_push_to_a_branch_leaves_main_alone(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    main_model, branch_model = fmnist_model(seed=1), fmnist_model(seed=4)
    assert push_cli(["--checkpoint", str(export(main_model, tmp_path / "a")), "--repo-id", repo_id], capsys)[0] == 0
    rc, out, _ = push_cli(["--checkpoint", str(export(branch_model, tmp_path / "b")), "--repo-id", repo_id,
                           "--revision", "experiment"], capsys)
    assert rc == 0
    assert hub_env.server.head(repo_id, "experiment") == commit_oid(out)
    assert_same_weights(hub.create_model_from_hub(f"{repo_id}@experiment"), branch_model)
    assert_same_weights(hub.create_model_from_hub(repo_id), main_model)


def test_fetched_model_adapts_head_and_in_chans_on_request(hub_env, tmp_path, capsys):
    model = fmnist_model(seed=6)
    repo_id = hub_env.repo_id()
    assert push_cli(["--checkpoint", str(export(model, tmp_path / "x")), "--repo-id", repo_id], capsys)[0] == 0
    five = hub.create_model_from_hub(repo_id, num_classes=5)
    assert five.get_classifier().out_features == 5
    assert torch.equal(five.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    rgb = bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True, in_chans=3)
    assert rgb.conv1.weight.shape[1] == 3
    assert torch.equal(rgb.layer1[0].conv1.weight, model.layer1[0].conv1.weight)


# ------------------------------------------------------------------------------- atomic pushes


def test_failed_commit_leaves_existing_repo_unchanged(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    v1 = fmnist_model(seed=1)
    assert push_cli(["--checkpoint", str(export(v1, tmp_path / "v1")), "--repo-id", repo_id], capsys)[0] == 0
    head, files = hub_env.server.head(repo_id), hub_env.server.files(repo_id)

    hub_env.server.fail_next("commit", 500, "storage backend unavailable")
    rc, out, err = push_cli(["--checkpoint", str(export(fmnist_model(seed=2), tmp_path / "v2")),
                             "--repo-id", repo_id], capsys)
    assert rc == 1 and out == ""
    assert "remote repository is unchanged" in err and "500" in err
    assert hub_env.server.head(repo_id) == head and hub_env.server.files(repo_id) == files
    assert_same_weights(hub.create_model_from_hub(repo_id), v1)


def test_failed_first_push_removes_the_repo_it_created(hub_env, tmp_path):
    repo_id = hub_env.repo_id()
    hub_env.server.fail_next("commit", 500)
    with pytest.raises(PushError, match="remote repository is unchanged") as info:
        hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    assert info.value.repo_id == repo_id and isinstance(info.value, RuntimeError)
    assert repo_id not in hub_env.server.repos


def test_concurrent_push_is_rejected_not_interleaved(hub_env, tmp_path):
    """The commit names its parent: if the branch moved meanwhile, the Hub refuses (412)."""
    repo_id = hub_env.repo_id()
    hub.push(export(fmnist_model(seed=1), tmp_path / "a"), repo_id)
    api = HfApi(token=WRITE_TOKEN)
    stale_parent = api.repo_info(repo_id).sha
    api.create_commit(repo_id, [CommitOperationAdd(path_in_repo="notes.txt", path_or_fileobj=b"other push")],
                      commit_message="someone else")
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as info:
        api.create_commit(repo_id, [CommitOperationAdd(path_in_repo="x", path_or_fileobj=b"x")],
                          commit_message="late", parent_commit=stale_parent)
    assert info.value.response.status_code == 412


def test_private_push_is_invisible_to_others(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    model = fmnist_model(seed=7)
    assert push_cli(["--checkpoint", str(export(model, tmp_path / "p")), "--repo-id", repo_id, "--private"],
                    capsys)[0] == 0
    assert hub_env.server.repos[repo_id].private
    hub_env.set_token(OTHER_TOKEN)
    with pytest.raises(RepoNotFoundError, match=repo_id):
        hub.create_model_from_hub(repo_id)
    hub_env.set_token(None)
    with pytest.raises(RepoNotFoundError, match=repo_id):
        hub.create_model_from_hub(repo_id)
    # (checked before the owner's fetch: like the real client, hf_hub_download serves what is cached)
    hub_env.set_token(WRITE_TOKEN)
    assert_same_weights(hub.create_model_from_hub(repo_id), model)


# ------------------------------------------------------------------------------- 5. push errors


def test_push_with_bad_token_fails_without_printing_it(hub_env, tmp_path, capsys, caplog):
    bad = "hf_definitely_not_valid_0123456789"
    hub_env.set_token(bad)
    repo_id = hub_env.repo_id()
    rc, out, err = push_cli(["--checkpoint", str(export(fmnist_model(), tmp_path / "m")), "--repo-id", repo_id],
                            capsys)
    assert rc == 1
    assert "rejected" in err and "HF_TOKEN" in err
    assert bad not in out + err + caplog.text
    assert repo_id not in hub_env.server.repos


def test_push_without_token_says_how_to_log_in(hub_env, tmp_path):
    hub_env.set_token(None)
    with pytest.raises(HubAuthError, match="no token found.*hf auth login"):
        hub.push(export(fmnist_model(), tmp_path / "m"), hub_env.repo_id())


def test_push_to_a_namespace_the_token_cannot_write(hub_env, tmp_path):
    hub_env.set_token(OTHER_TOKEN)
    repo_id = hub_env.repo_id("alice")
    with pytest.raises(HubAuthError, match="no write access to this namespace") as info:
        hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    assert isinstance(info.value, PermissionError) and OTHER_TOKEN not in str(info.value)
    assert repo_id not in hub_env.server.repos


def test_push_to_an_unreachable_hub(hub_env, tmp_path, capsys):
    hub_env.unreachable()
    rc, out, err = push_cli(["--checkpoint", str(export(fmnist_model(), tmp_path / "m")),
                             "--repo-id", hub_env.repo_id()], capsys)
    assert rc == 1 and out == ""
    assert "cannot be reached" in err and "remote repository is unchanged" in err


def test_push_refuses_unusable_local_checkpoints(hub_env, tmp_path, capsys):
    repo_id = hub_env.repo_id()
    garbage = tmp_path / "broken.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="broken.ckpt"):
        hub.push(garbage, repo_id)

    not_ours = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, not_ours)
    with pytest.raises(CorruptCheckpointError, match="model_name"):
        hub.push(not_ours, repo_id)

    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    rc, _, err = push_cli(["--checkpoint", str(half), "--repo-id", repo_id], capsys)
    assert rc == 1 and "model.safetensors" in err

    mismatched = export(fmnist_model(), tmp_path / "mm")
    weights = safetensors.torch.load_file(mismatched / "model.safetensors")
    weights.pop("fc.bias")
    safetensors.torch.save_file(weights, mismatched / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match="missing keys.*fc.bias"):
        hub.push(mismatched, repo_id)

    assert push_cli(["--repo-id", "no-slash", "--checkpoint", str(half)], capsys)[0] == 2
    assert repo_id not in hub_env.server.repos  # nothing was sent


# ------------------------------------------------------------------------------- 5. fetch errors


def test_unknown_repo_and_revision(hub_env, tmp_path):
    with pytest.raises(RepoNotFoundError, match="alice/does-not-exist") as info:
        hub.create_model_from_hub("alice/does-not-exist")
    assert isinstance(info.value, FileNotFoundError) and info.value.endpoint == hub_env.endpoint

    repo_id = hub_env.repo_id()
    hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    with pytest.raises(RepoNotFoundError, match="revision 'no-such-branch'"):
        hub.create_model_from_hub(f"{repo_id}@no-such-branch")


def test_missing_files(hub_env, tmp_path):
    folder = export(fmnist_model(), tmp_path / "m")
    only_config = raw_repo(hub_env, {"config.json": (folder / "config.json").read_bytes()})
    with pytest.raises(PretrainedNotFoundError, match="'model.safetensors'.*" + only_config):
        hub.create_model_from_hub(only_config)
    no_config = raw_repo(hub_env, {"model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(PretrainedNotFoundError, match="'config.json'"):
        hub.create_model_from_hub(no_config)


def test_pickle_only_repo_is_never_unpickled(hub_env):
    """A repo with only pytorch_model.bin (timm's safe_serialization=False) is refused, not loaded."""
    from timm.models import push_to_hf_hub

    repo_id = hub_env.repo_id()
    push_to_hf_hub(fmnist_model(), repo_id, safe_serialization=False)
    assert "model.safetensors" not in hub_env.server.files(repo_id)
    with pytest.raises(PretrainedNotFoundError, match="model.safetensors"):
        hub.create_model_from_hub(repo_id)
    with pytest.raises(PretrainedNotFoundError, match="model.safetensors"):  # bam archs via timm too
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)


def test_corrupt_safetensors_gives_clear_error(hub_env, tmp_path):
    folder = export(fmnist_model(), tmp_path / "m")
    truncated = (folder / "model.safetensors").read_bytes()[:-100]
    repo_id = raw_repo(hub_env, {"config.json": (folder / "config.json").read_bytes(), "model.safetensors": truncated})
    with pytest.raises(CorruptCheckpointError, match="as safetensors.*download it again"):
        hub.create_model_from_hub(repo_id)
    with pytest.raises(CorruptCheckpointError):
        bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True)


def test_unregistered_architecture_in_config(hub_env, tmp_path):
    folder = export(fmnist_model(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "bam_resnet9000"
    repo_id = raw_repo(hub_env, {"config.json": json.dumps(config).encode(),
                                 "model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(UnregisteredArchitectureError, match="'bam_resnet9000'.*import bam_zoo") as info:
        hub.create_model_from_hub(repo_id)
    assert info.value.architecture == "bam_resnet9000" and isinstance(info.value, ValueError)


def test_weights_of_another_architecture_are_listed_key_by_key(hub_env, tmp_path):
    """Plain resnet20 weights under a bam_resnet20 config: every BAM key is reported missing."""
    plain = bam_zoo.create_model("resnet20", in_chans=1, num_classes=10)
    folder = export(fmnist_model(), tmp_path / "m")
    buffer = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(plain.state_dict(), buffer)
    repo_id = raw_repo(hub_env, {"config.json": (folder / "config.json").read_bytes(),
                                 "model.safetensors": buffer.read_bytes()})
    with pytest.raises(StateDictMismatchError, match="missing keys") as info:
        hub.create_model_from_hub(repo_id)
    assert info.value.missing and all("bam" in k for k in info.value.missing)
    assert not info.value.unexpected


def test_bad_token_on_fetch(hub_env, tmp_path):
    repo_id = hub_env.repo_id()
    hub.push(export(fmnist_model(), tmp_path / "m"), repo_id)
    hub_env.set_token("hf_wrong_token_1234567890")
    with pytest.raises(HubAuthError, match="rejected") as info:
        hub.create_model_from_hub(repo_id)
    assert "hf_wrong_token" not in str(info.value)


def test_offline_uses_cache_and_fails_clearly_without_one(hub_env, tmp_path):
    model = fmnist_model(seed=8)
    repo_id = hub_env.repo_id()
    hub.push(export(model, tmp_path / "m"), repo_id)
    hub.create_model_from_hub(repo_id)  # fills the cache
    hub_env.offline()
    requests = len(hub_env.server.requests)
    assert_same_weights(hub.create_model_from_hub(repo_id), model)
    assert len(hub_env.server.requests) == requests  # served from the cache, nothing sent
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE") as info:
        hub.create_model_from_hub(hub_env.repo_id())
    assert isinstance(info.value, ConnectionError) and str(hub_env.cache) in str(info.value)


# ------------------------------------------------------------------------------- 3. tags and mirror


@pytest.fixture
def test_tag(hub_env, monkeypatch):
    """Register ``bam_resnet20.hubtest<random>`` (Hub id ``bam-zoo/<that name>``) in timm for one test.

    The shipped tags are registered by ``bam_zoo.models``; this adds one whose weights the test
    controls, through the same registry timm's ``register_model`` fills. The name is unique because
    the server lives for the whole session.
    """
    from timm.models import PretrainedCfg
    from timm.models import _registry as reg

    from bam_zoo.models import pretrained as shipped

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
    from bam_zoo.models import pretrained as shipped

    v1, v2 = fmnist_model(seed=1), fmnist_model(seed=2)
    oid1 = hub.push(export(v1, tmp_path / "v1"), f"bam-zoo/{test_tag}").oid
    hub.push(export(v2, tmp_path / "v2"), f"bam-zoo/{test_tag}")
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), v2)

    sha1 = hub._sha256(tmp_path / "v1" / "model.safetensors")
    monkeypatch.setitem(shipped.WEIGHT_METADATA, test_tag, {"hf_hub_revision": oid1, "sha256": sha1})
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), v1)

    monkeypatch.setitem(shipped.WEIGHT_METADATA, test_tag, {"sha256": sha1})  # main now holds v2
    with pytest.raises(ChecksumMismatchError, match=sha1) as info:
        bam_zoo.create_model(test_tag, pretrained=True)
    assert info.value.expected == sha1


def test_tag_falls_back_to_mirror_when_hub_unreachable(hub_env, test_tag, tmp_path, caplog):
    mirrored = fmnist_model(seed=10)
    export(mirrored, hub_env.mirror / test_tag, metrics={"top1": 88.8})
    hub_env.unreachable()
    with caplog.at_level("WARNING", logger="bam_zoo.hub"):
        assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), mirrored)
    assert "offline mirror" in caplog.text
    assert_same_weights(timm.create_model(test_tag, pretrained=True), mirrored)

    hub_env.set_endpoint(hub_env.endpoint)  # reachable again, but nothing pushed: the mirror still serves
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), mirrored)


def test_tag_order_is_hub_then_cache_then_mirror(hub_env, test_tag, tmp_path):
    on_hub, mirrored = fmnist_model(seed=11), fmnist_model(seed=12)
    hub.push(export(on_hub, tmp_path / "hub"), f"bam-zoo/{test_tag}")
    export(mirrored, hub_env.mirror / test_tag)
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), on_hub)  # Hub first (and cached)
    hub_env.unreachable()
    assert_same_weights(bam_zoo.create_model(test_tag, pretrained=True), on_hub)  # then the cache


def test_tag_offline_with_empty_cache_and_no_mirror(hub_env, test_tag):
    hub_env.offline()
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE") as info:
        bam_zoo.create_model(test_tag, pretrained=True)
    assert info.value.mirror == str(hub_env.mirror / test_tag)
    hub_env.offline(False)
    with pytest.raises(PretrainedNotFoundError, match=f"not in Hub repo 'bam-zoo/{test_tag}'.*mirror"):
        bam_zoo.create_model(test_tag, pretrained=True)


def test_mirror_checked_against_sha256(hub_env, test_tag, monkeypatch):
    from bam_zoo.models import pretrained as shipped

    folder = export(fmnist_model(), hub_env.mirror / test_tag)
    monkeypatch.setitem(shipped.WEIGHT_METADATA, test_tag, {"sha256": "0" * 64})
    hub_env.unreachable()
    with pytest.raises(ChecksumMismatchError, match=str(folder / "model.safetensors")):
        bam_zoo.create_model(test_tag, pretrained=True)


def test_unknown_tag(test_tag):
    with pytest.raises(UnknownPretrainedTagError, match="hubtest"):
        bam_zoo.create_model("bam_resnet20.nope", pretrained=True)


def test_list_pretrained_reports_tags_with_metrics(hub_env, test_tag):
    listed = {p.name: p for p in hub.list_pretrained("bam_resnet20*")}
    info = listed[test_tag]
    assert info.hf_hub_id == f"bam-zoo/{test_tag}" and info.metrics == {"top1": 91.0, "top5": 99.7}
    assert info.dataset == "fashion_mnist" and info.input_size == (1, 28, 28) and not info.mirrored
    assert test_tag in {p.name for p in bam_zoo.list_pretrained()}
    assert hub.list_pretrained("nothing*") == []


# ------------------------------------------------------------------------------- 4. strict loading


def test_check_state_dict_allows_only_deliberate_adaptation():
    model = bam_zoo.create_model("bam_resnet20", in_chans=1, num_classes=10)
    sd = dict(model.state_dict())
    assert hub.check_state_dict(sd, model) is sd

    rgb_stem = {**sd, "conv1.weight": sd["conv1.weight"].repeat(1, 3, 1, 1)}
    hub.check_state_dict(rgb_stem, model)  # in_chans adaptation: allowed
    with pytest.raises(StateDictMismatchError, match=r"conv1.weight: checkpoint \(16, 3, 3, 3\)"):
        hub.check_state_dict(rgb_stem, model, allow_adaptation=False)

    wrong = {**sd, "layer1.0.conv1.weight": torch.zeros(3, 3, 3, 3), "extra.weight": torch.zeros(1)}
    del wrong["fc.bias"]
    with pytest.raises(StateDictMismatchError) as info:
        hub.check_state_dict(wrong, model)
    assert info.value.missing == ["fc.bias"] and info.value.unexpected == ["extra.weight"]
    assert [k for k, _, _ in info.value.mismatched] == ["layer1.0.conv1.weight"]
    assert isinstance(info.value, BamZooError)


def test_push_prefers_the_ema_weights_the_module_exports(hub_env, lightning_ckpt, tmp_path):
    """ImageClassifier validates and exports its EMA copy when it keeps one; push does the same."""
    path, trained = lightning_ckpt
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in trained.items()}
    ckpt["state_dict"].update({f"model_ema.module.{k}": v for k, v in ema.items()})
    with_ema = tmp_path / "ema.ckpt"
    torch.save(ckpt, with_ema)
    repo_id = hub_env.repo_id()
    hub.push(with_ema, repo_id)
    assert_same_weights(hub.create_model_from_hub(repo_id), ema)
