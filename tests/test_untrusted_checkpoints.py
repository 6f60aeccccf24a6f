"""No entry point runs the code a checkpoint's pickle carries, unless the user says they trust the file.

Each entry point gets a real malicious pickle: unpickled fully, it creates a marker file (the payload is
checked to work first). The entry point must refuse it in one line that names what was refused and the
option that allows it, and the marker must not exist afterwards. With ``--trust_checkpoint_code true`` a
file holding a harmless object beyond torch's allowlist (``pathlib.PurePosixPath``) loads.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bam_zoo
from bam_zoo import hub
from bam_zoo.cli import main
from bam_zoo.errors import UnsafeCheckpointError
from bam_zoo.models.convert import read_checkpoint, unpickle_refusal
from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, write_fashion_mnist

try:
    from tests.hf_server import hub_env, hub_server  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from hf_server import hub_env, hub_server  # noqa: F401

CONFIG = str(REPO / "configs" / "fashion_mnist" / "resnet20.yaml")
TRUST = "--trust_checkpoint_code"


class Payload:
    """Unpickled fully, runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def fit_ckpt(tmp_path_factory) -> Path:
    """``last.ckpt`` of a real one-step ``cli.py fit`` (resnet20, tiny Fashion-MNIST), with dict-valued options."""
    from bam_zoo.training.cli import cli_main

    root = tmp_path_factory.mktemp("fit")
    data = write_fashion_mnist(root / "data", n_train=40, n_test=8)
    cli_main(["fit", "--config", CONFIG, "--data.root", str(data), "--data.val_size", "8", "--data.batch_size", "16",
              "--trainer.max_steps", "1", "--test_after_fit", "false", "--export.enabled", "false",
              "--trainer.default_root_dir", str(root / "run"), "--trainer.enable_progress_bar", "false",
              "--model.model_kwargs", '{"drop_rate": 0.1}', "--model.opt_kwargs", '{"dampening": 0.0}'])
    return root / "run" / "checkpoints" / "last.ckpt"


def write_evil(fit_ckpt: Path, path: Path, **save_kwargs) -> tuple[Path, Path]:
    """A copy of ``fit_ckpt`` whose pickle creates a marker file when it is unpickled fully; (file, marker)."""
    marker = path.parent / f"{path.name}.pwned"
    ckpt = torch.load(fit_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["note"] = Payload(marker)
    torch.save(ckpt, path, **save_kwargs)
    torch.load(path, map_location="cpu", weights_only=False)  # the payload works ...
    assert marker.exists()
    marker.unlink()  # ... and each test checks it did not run again
    return path, marker


@pytest.fixture
def evil(fit_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    return write_evil(fit_ckpt, tmp_path / "evil.ckpt")


@pytest.fixture
def harmless(fit_ckpt: Path, tmp_path: Path) -> Path:
    """``fit_ckpt`` with a harmless object beyond torch's allowlist (where Lightning's restore ignores it)."""
    ckpt = torch.load(fit_ckpt, map_location="cpu", weights_only=True)
    ckpt["data_root"] = pathlib.PurePosixPath("data/fashion_mnist")
    path = tmp_path / "harmless.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI is called in-process with ``args``: pytest's own arguments are not the command line."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


@pytest.fixture(autouse=True)
def _restore_safe_globals():
    """``--trust_checkpoint_code true`` allowlists a pretrained file's globals for the process: undo it."""
    before = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


def one_line_error(capsys: pytest.CaptureFixture, run, code: int = 1) -> str:
    """Run ``run()``, expect SystemExit(code), return stderr, which must be one line without a traceback."""
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def assert_refused(err: str, name: str = "posix.system") -> None:
    assert "Refused to unpickle" in err and name in err and f"{TRUST} true" in err, err


# ------------------------------------------------------------------------------ our own checkpoints


def test_fit_writes_checkpoints_the_restricted_loader_reads(fit_ckpt: Path) -> None:
    assert unpickle_refusal(fit_ckpt) is None
    hp = torch.load(fit_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["model_kwargs"] == {"drop_rate": 0.1} and hp["opt_kwargs"] == {"dampening": 0.0}
    assert hub.load_export(fit_ckpt).model.drop_rate == 0.1  # push reads it without trust


# ------------------------------------------------------------------------------ push


@pytest.mark.parametrize("layout", ["zip", "legacy", "protocol4"])
def test_push_refuses_a_malicious_pickle(layout: str, fit_ckpt, hub_env, tmp_path: Path, capsys) -> None:
    # torch's pre-1.6 format, and a pickle protocol the restricted loader does not read
    path, marker = write_evil(fit_ckpt, tmp_path / f"{layout}.ckpt", **{
        "zip": {}, "legacy": {"_use_new_zipfile_serialization": False}, "protocol4": {"pickle_protocol": 4}}[layout])
    repo_id = hub_env.repo_id()
    err = one_line_error(capsys, lambda: main(["push", "--checkpoint", str(path), "--repo-id", repo_id]))
    assert f"Refused to unpickle {path}" in err and f"{TRUST} true" in err
    assert "posix.system" in err or "Unsupported operand" in err  # protocol 4: the loader's own reason
    assert not marker.exists()
    assert repo_id not in hub_env.server.repos
    with pytest.raises(UnsafeCheckpointError) as info:
        hub.load_export(path)
    assert not marker.exists() and info.value.path == str(path)


def test_push_with_trust_loads_a_harmless_object(harmless: Path, hub_env, capsys) -> None:
    err = one_line_error(capsys, lambda: main(["push", "--checkpoint", str(harmless), "--repo-id", "alice/x"]))
    assert_refused(err, "pathlib.PurePosixPath")
    repo_id = hub_env.repo_id()
    main(["push", "--checkpoint", str(harmless), "--repo-id", repo_id, TRUST, "true"])
    assert capsys.readouterr().out.strip().endswith(f"/{repo_id}/commit/{hub_env.server.head(repo_id)}")
    pushed = bam_zoo.create_model(f"hf-hub:{repo_id}", pretrained=True)
    expected = hub.load_export(harmless, trust_checkpoint_code=True).model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pushed.state_dict().items())


# ------------------------------------------------------------------------------ fit / validate / test / predict


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_ckpt_path_refuses_a_malicious_pickle_before_anything_runs(subcommand: str, evil, tmp_path: Path,
                                                                     capsys) -> None:
    path, marker = evil
    run = tmp_path / "run"
    err = one_line_error(capsys, lambda: main([subcommand, "--config", CONFIG, "--trainer.default_root_dir", str(run),
                                              "--ckpt_path", str(path)]))
    assert_refused(err)
    assert not marker.exists() and not run.exists()


def test_ckpt_path_last_is_checked_too(evil, tmp_path: Path, capsys) -> None:
    path, marker = evil
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "last.ckpt")
    err = one_line_error(capsys, lambda: main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(run),
                                              "--ckpt_path", "last"]))
    assert_refused(err)
    assert not marker.exists() and sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_weights_only_false_asks_for_the_trust_option(evil, tmp_path: Path, capsys) -> None:
    path, marker = evil
    err = one_line_error(capsys, lambda: main(["validate", "--config", CONFIG, "--weights_only", "false",
                                              "--trainer.default_root_dir", str(tmp_path / "run"),
                                              "--ckpt_path", str(path)]))
    assert "--weights_only false" in err and f"{TRUST} true" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_trust_in_a_config_file_is_not_taken(evil, tmp_path: Path, capsys) -> None:
    """A shared config (a run's recipe.yaml on the Hub) cannot switch the check off."""
    path, marker = evil
    shared = tmp_path / "recipe.yaml"
    shared.write_text(f"{TRUST[2:]}: true\n")
    err = one_line_error(capsys, lambda: main(["validate", "--config", CONFIG, "--config", str(shared),
                                              "--trainer.default_root_dir", str(tmp_path / "run"),
                                              "--ckpt_path", str(path)]))
    assert "taken from the command line only" in err and f"{TRUST} true" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_ckpt_path_with_trust_loads_a_harmless_object(harmless: Path, fit_ckpt: Path, tmp_path: Path, capsys) -> None:
    from bam_zoo.training.cli import cli_main

    args = ["validate", "--config", CONFIG, "--data.root", str(write_fashion_mnist(tmp_path / "data", 40, 8)),
            "--data.val_size", "8", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false", "--ckpt_path", str(harmless)]
    assert_refused(one_line_error(capsys, lambda: main(args)), "pathlib.PurePosixPath")
    cli = cli_main([*args, TRUST, "true"])
    assert cli.config_init["validate"]["weights_only"] is False
    expected = torch.load(fit_ckpt, map_location="cpu", weights_only=True)["state_dict"]  # what harmless carries
    assert all(torch.equal(v, expected[f"model.{k}"]) for k, v in cli.model.model.state_dict().items())


# ------------------------------------------------------------------------------ --model.pretrained_file


def test_pretrained_file_refuses_a_malicious_pickle(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": bam_zoo.create_model("resnet20", in_chans=1, num_classes=10).state_dict(),
                "args": Payload(marker)}, path)
    run = tmp_path / "run"
    err = one_line_error(capsys, lambda: main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(run),
                                              "--model.pretrained_file", str(path)]))
    assert_refused(err)
    assert not marker.exists() and not run.exists()


def test_pretrained_file_with_trust_loads_a_harmless_object(tmp_path: Path, capsys) -> None:
    from bam_zoo.training.cli import BamZooCLI

    weights = bam_zoo.create_model("resnet20", in_chans=1, num_classes=10).state_dict()
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": weights, "data_root": pathlib.PurePosixPath("data")}, path)
    args = ["fit", "--config", CONFIG, "--data.root", str(write_fashion_mnist(tmp_path / "data", 40, 8)),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--model.pretrained_file", str(path)]
    assert_refused(one_line_error(capsys, lambda: main(args)), "pathlib.PurePosixPath")
    cli = BamZooCLI(args=[*args[1:], TRUST, "true"], run=False)  # builds the model, runs nothing
    assert all(torch.equal(v, weights[k]) for k, v in cli.model.model.state_dict().items())


# ------------------------------------------------------------------------------ convert, read_checkpoint


def test_convert_refuses_a_malicious_pickle_also_inside_a_zip(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "bam_resnet18.pth"
    torch.save({"features.init_block.conv.conv.weight": torch.zeros(1), "x": Payload(marker)}, path)
    with zipfile.ZipFile(tmp_path / "bam_resnet18.pth.zip", "w") as archive:
        archive.write(path, path.name)
    for checkpoint in (path, tmp_path / "bam_resnet18.pth.zip"):
        err = one_line_error(capsys, lambda: main(["convert", "--source", "pytorchcv", "--checkpoint", str(checkpoint),
                                                  "--model", "bam_resnet18", "--out", str(tmp_path / "out")]))
        assert_refused(err)
        assert f"Refused to unpickle {checkpoint}" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_read_checkpoint_trusts_only_when_told(tmp_path: Path) -> None:
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(2), "root": pathlib.PurePosixPath("data")}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert info.value.refused == ["pathlib.PurePosixPath"]
    assert read_checkpoint(path, trust_checkpoint_code=True)["root"] == pathlib.PurePosixPath("data")


# ------------------------------------------------------------------------------ scripts/


def ema_effect_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    spec = importlib.util.spec_from_file_location("ema_effect", REPO / "scripts" / "ema_effect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["ema_effect.py", *args])
    module.main()


def test_ema_effect_refuses_a_malicious_pickle(evil, monkeypatch: pytest.MonkeyPatch) -> None:
    path, marker = evil
    with pytest.raises(SystemExit) as info:
        ema_effect_main(monkeypatch, str(path))
    message = str(info.value.code)
    assert_refused(message)
    assert len(message.splitlines()) == 1 and not marker.exists()


def test_ema_effect_with_trust_reads_a_harmless_object(harmless: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as info:
        ema_effect_main(monkeypatch, str(harmless))
    assert_refused(str(info.value.code), "pathlib.PurePosixPath")
    with pytest.raises(SystemExit) as info:  # read: the run kept no EMA, which is the next thing it checks
        ema_effect_main(monkeypatch, str(harmless), TRUST, "true")
    assert "holds no EMA weights" in str(info.value.code)
