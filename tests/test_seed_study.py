"""scripts/seed_study.py: the statistics and the report it writes from a study's result files."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
scipy_stats = pytest.importorskip("scipy.stats")
pytest.importorskip("matplotlib")


@pytest.fixture
def seed_study(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("seed_study", REPO / "scripts" / "seed_study.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "seed_study", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def write_run(root: Path, variant: str, seed: int, top1: float, curve: list[float] | None) -> None:
    folder = root / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"test": {"acc1": top1 / 100}, "train_wall_time_s": 600}))
    rows = ["epoch,step,test_curve/acc1,val/acc1"]
    for epoch, value in enumerate(curve or [50.0, 60.0]):
        rows += [f"{epoch},{epoch},{value / 100},0.5", f"{epoch},{epoch},,"]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    (folder / "command.txt").write_text(f"python cli.py fit --config {variant}.yaml --seed_everything {seed}\n")
    if curve is None:
        (folder / "CURVE_INVALID").write_text("recorded wrongly")


def test_difference_and_confidence_interval_are_welchs(seed_study):
    a, b = [93.1, 93.4, 92.9, 93.3, 93.0], [92.8, 93.0, 92.7, 93.1]
    diff, low, high = seed_study.mean_ci(a, b)
    want = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(sum(a) / 5 - sum(b) / 4)
    assert (low, high) == (pytest.approx(want.low), pytest.approx(want.high))


def test_report_tables_verdict_and_plot(seed_study, tmp_path):
    results = tmp_path / "results"
    for seed, (bam, plain) in enumerate([(93.5, 92.9), (93.6, 93.0), (93.4, 92.8)], start=1):
        write_run(results, "bam_resnet20", seed, bam, [80.0, 90.0, bam] if seed > 1 else None)
        write_run(results, "resnet20", seed, plain, [80.0, 89.0, plain])
    write_run(results, "bam_resnet20_product", 1, 93.0, [80.0, 90.0, 93.0])  # one run: left out
    text = seed_study.report(tmp_path / "docs" / "plot.png")
    assert "| `bam_resnet20` | 3 (1, 2, 3) | 93.50 ± 0.10 | 93.50, 93.60, 93.40 | 10 min |" in text
    assert "| `resnet20` | 3 (1, 2, 3) | 92.90 ± 0.10 |" in text
    assert "`bam_resnet20` helps: 0.60 points better than `resnet20`" in text
    assert "product" not in text.split("|---|---|---|")[-1]
    assert "--seed_everything 1" in text and (tmp_path / "docs" / "plot.png").stat().st_size > 10_000
    # the invalid curve is left out of the plot, not the table
    loaded = seed_study.load("bam_resnet20")
    assert loaded[1]["curve"] == [] and loaded[2]["curve"] == [80.0, 90.0, 93.6]


def test_verdict_without_a_measurable_difference(seed_study):
    assert seed_study._verdict("a", "b", -0.13, -1.08, 0.82) == (
        "`a` does not measurably help against `b`: -0.13 points, 95% CI -1.08 to +0.82, which contains 0.")
    assert seed_study._verdict("a", "b", -0.5, -0.8, -0.2).startswith("`a` hurts: 0.50 points worse than `b`")


def test_readme_and_model_card_carry_the_committed_report():
    """The seed-study block of README.md is results/seed_study/report.md's summary (the report writes both)."""
    report = REPO / "results" / "seed_study" / "report.md"
    if not report.is_file():
        pytest.skip("no seed study committed yet")
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- seed-study:start -->\n", 1)[1].split("<!-- seed-study:end -->", 1)[0]
    spec = importlib.util.spec_from_file_location("seed_study_committed", REPO / "scripts" / "seed_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert block == module.summary(report.read_text(), "report.md"), "README.md is stale: seed_study.py report"


def test_insertion_report_start_gamma_and_verdict(seed_study, tmp_path):
    results = tmp_path / "results"
    for seed, (bam, plain) in enumerate([(93.3, 93.2), (93.1, 93.3), (93.2, 93.4)], start=1):
        write_run(results, "resnet20.fmnist+bam", seed, bam, [92.0, 92.8, bam])
        write_run(results, "resnet20.fmnist", seed, plain, [92.1, 92.9, plain])
        (results / "resnet20.fmnist+bam" / f"seed{seed}" / "gamma.json").write_text(json.dumps(
            {"layer1": {"mean": 0.01 * seed, "mean_abs": 0.02 * seed, "max_abs": 0.1},
             "layer2": {"mean": -0.01, "mean_abs": 0.03, "max_abs": 0.2}}))
    (results / "insertion_start.json").write_text(json.dumps({"resnet20.fmnist": 93.08, "resnet20.fmnist+bam": 93.08}))
    text = seed_study.report(tmp_path / "docs" / "insertion.png", "insertion")
    assert text.startswith("Fashion-MNIST: the shipped `resnet20.fmnist` fine-tuned for 5 epochs")
    assert "| `resnet20.fmnist+bam` | 3 (1, 2, 3) | 93.20 ± 0.10 |" in text
    assert "`resnet20.fmnist+bam` does not measurably help against `resnet20.fmnist`: -0.10 points" in text
    assert "93.08 without BAM, 93.08 with it" in text
    assert "| `layer1` | 0.020 (0.010 to 0.030) | 0.040 (0.020 to 0.060) | 0.100 (0.100 to 0.100) |" in text
    assert "--study insertion" in text and (tmp_path / "docs" / "insertion.png").stat().st_size > 10_000


def test_insertion56_report_reads_its_own_start(seed_study, tmp_path):
    """The resnet56 insertion study shares insertion_start.json with resnet20's and reports its own tag's start."""
    results = tmp_path / "results"
    for seed, (bam, plain) in enumerate([(94.9, 94.8), (94.7, 94.9)], start=1):
        write_run(results, "resnet56.fmnist_long+bam", seed, bam, [94.5, bam])
        write_run(results, "resnet56.fmnist_long", seed, plain, [94.6, plain])
    (results / "insertion_start.json").write_text(json.dumps(
        {"resnet20.fmnist": 93.08, "resnet20.fmnist+bam": 93.08, "resnet56.fmnist_long": 94.82,
         "resnet56.fmnist_long+bam": 94.82}))
    text = seed_study.report(tmp_path / "docs" / "insertion56.png", "insertion56")
    assert "`create_model('resnet56.fmnist_long', pretrained=True, add_bam=...)`): 94.82 without BAM, 94.82" in text
    assert "| `resnet56.fmnist_long+bam` | 2 (1, 2) | 94.80 ± 0.14 |" in text
    assert "--study insertion56" in text and "resnet20" not in text


def test_restart95_report_compares_the_second_cycles_and_says_how_their_time_was_spent(seed_study, tmp_path):
    """The 95% attempt's pair has its own report: no insertion start (the runs begin from the first cycle's end), and
    times that add each run's starts on other machines, not two runs sharing the cores."""
    results = tmp_path / "results"
    for seed, (bam, plain) in enumerate([(94.95, 95.03), (94.94, 94.74), (94.97, 94.90)], start=1):
        write_run(results, "resnet56.fmnist_long+bam_cycle2", seed, bam, [94.1, bam])
        write_run(results, "resnet56.fmnist_long_cycle2", seed, plain, [94.0, plain])
    (results / "insertion_start.json").write_text(json.dumps({"resnet56.fmnist_long": 94.82}))
    text = seed_study.report(tmp_path / "docs" / "restart95.png", "restart95")
    assert "| `resnet56.fmnist_long+bam_cycle2` | 3 (1, 2, 3) | 94.95 ± 0.02 | 94.95, 94.94, 94.97 |" in text
    assert "`resnet56.fmnist_long+bam_cycle2` does not measurably help against `resnet56.fmnist_long_cycle2`" in text
    assert "at insertion" not in text and "two runs sharing" not in text and "starts added up" in text
    assert "--study restart95 --seeds 1 2 3" in text and (tmp_path / "docs" / "restart95.png").stat().st_size > 10_000


@pytest.mark.parametrize("variant", ["resnet56.fmnist_long+bam_cycle3", "resnet56.fmnist_long_cycle3"])
def test_a_third_cycle_starts_each_arm_from_its_own_kept_second_cycle_weights(variant):
    """restart95_3's runs build the network their start is (BAM arm: bam_inserted) and load its export exactly:
    nothing re-initialised, no BAM added twice."""
    import torch
    from safetensors.torch import load_file

    import bam_zoo
    from bam_zoo.training.module import ImageClassifier
    spec = importlib.util.spec_from_file_location("seed_study_committed", REPO / "scripts" / "seed_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.command(variant, 2)
    value = {key: args[i + 1] for i, key in enumerate(args[:-1]) if key.startswith("--model.")}
    assert value["--model.pretrained_file"] == f"results/seed_study/{variant.replace('cycle3', 'cycle2')}/seed2/export"
    assert "--model.add_bam" not in value and value["--model.lr"] == "0.025"
    kwargs = json.loads(value.get("--model.model_kwargs", "null"))
    net = ImageClassifier(value["--model.model_name"], model_kwargs=kwargs, pretrained_file=str(
        REPO / value["--model.pretrained_file"]), num_classes=10, in_chans=1).model
    want = load_file(REPO / value["--model.pretrained_file"] / "model.safetensors")
    assert net.state_dict().keys() == want.keys() and bool(bam_zoo.bam_modules(net)) == ("+bam" in variant)
    for key, tensor in want.items():
        torch.testing.assert_close(net.state_dict()[key], tensor, rtol=0, atol=0)


def test_a_run_whose_start_is_not_here_says_which_run_to_finish_first(seed_study):
    with pytest.raises(SystemExit, match=r"starts from results/seed_study/resnet56.fmnist_long_cycle2/seed7/export, "
                                         r"which is not here: finish that run first \(its study with --seeds 7\)"):
        seed_study.command("resnet56.fmnist_long_cycle3", 7)


def write_log(path: Path, rows: list[tuple[int, int, str]]) -> None:
    """A CSVLogger metrics.csv with (epoch, step, val/acc1) rows; an empty value is a step-only row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,step,val/acc1\n" + "".join(f"{e},{s},{v}\n" for e, s, v in rows))


def test_a_resumed_runs_logs_are_merged_without_the_steps_it_repeated(seed_study, tmp_path):
    # killed in epoch 2 after logging step 25; resumed from last.ckpt at the end of epoch 1 (step 20)
    write_log(tmp_path / "csv" / "version_0" / "metrics.csv",
              [(0, 5, ""), (0, 9, "0.5"), (1, 15, ""), (1, 19, "0.6"), (2, 25, "")])
    write_log(tmp_path / "csv" / "version_1" / "metrics.csv", [(2, 25, ""), (2, 29, "0.7"), (3, 39, "0.65")])
    write_log(tmp_path / "csv" / "version_10" / "metrics.csv", [(4, 49, "0.66")])  # version 10 after version 1
    fields, rows = seed_study.merge_logs([tmp_path / "csv" / f"version_{v}" / "metrics.csv" for v in (0, 1, 10)])
    assert fields == ["epoch", "step", "val/acc1"]
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(0, 5), (0, 9), (1, 15), (1, 19), (2, 25), (2, 29),
                                                                  (3, 39), (4, 49)]
    seed_study.check_selection(rows, "best-002.ckpt", tmp_path)
    with pytest.raises(RuntimeError, match="peaked at epoch 2"):
        seed_study.check_selection(rows, "best-004.ckpt", tmp_path)  # what a selection blind to version 0 picks


def fake_run(runs: Path, variant: str, best_epoch: int) -> Path:
    """A stopped run's folder: last and best checkpoints, two logs (it was resumed once), two starts' commits."""
    run = runs / variant / "seed1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"last")
    (run / "checkpoints" / f"best-{best_epoch:03d}.ckpt").write_bytes(b"best")
    write_log(run / "csv" / "version_0" / "metrics.csv", [(0, 9, "0.5"), (1, 19, "0.7")])
    write_log(run / "csv" / "version_1" / "metrics.csv", [(2, 29, "0.6")])
    (run / "commits.txt").write_text("abc1234\nabc1234\ndef5678-dirty\n")
    return run


def test_park_carries_a_stopped_run_through_results_and_unpark_puts_it_back(seed_study, tmp_path, monkeypatch):
    monkeypatch.setattr(seed_study, "RUNS", tmp_path / "runs")
    run = fake_run(tmp_path / "runs", "v", 1)
    done = fake_run(tmp_path / "runs", "finished", 1)
    (tmp_path / "results" / "finished" / "seed1").mkdir(parents=True)
    (tmp_path / "results" / "finished" / "seed1" / "metrics.json").write_text("{}")
    (tmp_path / "runs" / "runner.pid").write_text(str(os.getpid()))  # a live runner: checkpoints may be half written
    with pytest.raises(SystemExit, match=f"kill -TERM {os.getpid()}"):
        seed_study.park()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "runs" / "runner.pid").write_text(dead.stdout.strip())  # left behind by a runner killed outright
    parked = tmp_path / "results" / "v" / "seed1" / "unfinished"
    assert seed_study.park() == [parked]  # the collected run is not parked
    assert sorted(str(p.relative_to(parked)) for p in parked.rglob("*") if p.is_file()) == [
        "checkpoints/best-001.ckpt", "checkpoints/last.ckpt", "commits.txt", "csv/version_0/metrics.csv",
        "csv/version_1/metrics.csv"]
    assert not (tmp_path / "results" / "finished" / "seed1" / "unfinished").exists() and done.exists()
    shutil.rmtree(tmp_path / "runs")  # a fresh machine: only what was committed
    assert seed_study.unpark(run, parked.parent) and (run / "checkpoints" / "last.ckpt").read_bytes() == b"last"
    assert (run / "commits.txt").read_text() == "abc1234\nabc1234\ndef5678-dirty\n"
    (run / "checkpoints" / "last.ckpt").write_bytes(b"newer")
    assert not seed_study.unpark(run, parked.parent)  # the run's own last.ckpt wins over a parked one
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"newer"


def test_collect_merges_a_resumed_runs_logs_and_names_each_commit_once(seed_study, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import torch

    monkeypatch.setattr(seed_study, "RUNS", tmp_path / "runs")
    run = fake_run(tmp_path / "runs", "v", 1)
    (run / "export").mkdir()
    save_file({"layer1.bam.gamma": torch.tensor([0.1, -0.3])}, str(run / "export" / "model.safetensors"))
    metrics = {"test": {"acc1": 0.9}, "best_checkpoint": str(run / "checkpoints" / "best-001.ckpt")}
    (run / "export" / "metrics.json").write_text(json.dumps(metrics))
    out = seed_study.collect("v", 1, ["python", "cli.py", "fit"], threads=2)
    assert (out / "metrics.csv").read_text() == "epoch,step,val/acc1\n0,9,0.5\n1,19,0.7\n2,29,0.6\n"
    assert (out / "commit.txt").read_text() == "abc1234\ndef5678-dirty\n"
    assert (out / "command.txt").read_text() == "OMP_NUM_THREADS=2 python cli.py fit\n"
    assert json.loads((out / "gamma.json").read_text())["layer1"]["max_abs"] == pytest.approx(0.3)
    assert "torch" in (out / "machine.txt").read_text() and not (out / "export").exists()  # not a candidate to ship
    monkeypatch.setattr(seed_study, "LONG_FINETUNE_VARIANTS", {"v"})
    out = seed_study.collect("v", 1, ["python", "cli.py", "fit"])
    assert (out / "export" / "model.safetensors").read_bytes() == (run / "export" / "model.safetensors").read_bytes()
    metrics["best_checkpoint"] = str(run / "checkpoints" / "best-002.ckpt")
    (run / "export" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RuntimeError, match="validation top-1 peaked at epoch 1"):
        seed_study.collect("v", 1, ["python", "cli.py", "fit"])


RUNNER = """
import sys, importlib.util
from pathlib import Path
spec = importlib.util.spec_from_file_location("seed_study", sys.argv[1])
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)
tmp = Path(sys.argv[2])
study.ROOT, study.RUNS, study.RESULTS = tmp, tmp / "runs", tmp / "results"
study.VARIANTS = {"a": None, "b": None}
child = ("import signal, sys, time, pathlib; seed = sys.argv[1]; folder = pathlib.Path(sys.argv[2]); "
         "signal.signal(signal.SIGTERM, lambda *_: (folder.joinpath('saved' + seed).write_text(''), sys.exit(143))); "
         "folder.joinpath('ready' + seed).write_text(''); time.sleep(300)")
study.command = lambda variant, seed: [sys.executable, "-c", child, variant + str(seed), str(tmp)]
study.run_study(["a", "b"], [1], parallel=2)
"""


def test_sigterm_to_the_runner_stops_each_run_so_it_saves_its_state(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(REPO / "scripts" / "seed_study.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{v}1").exists() for v in "ab") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "runs" / "runner.pid").read_text() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "stopped: every run saved its last.ckpt" in err, err
    assert (tmp_path / "saveda1").exists() and (tmp_path / "savedb1").exists()
    assert not (tmp_path / "runs" / "runner.pid").exists()
    assert (tmp_path / "runs" / "a" / "seed1" / "commits.txt").read_text() == "unknown-no-git\n"  # tmp_path is no repo


def test_code_version_on_a_copy_without_git_is_what_the_caller_states(seed_study, tmp_path, monkeypatch):
    monkeypatch.setattr(seed_study, "ROOT", tmp_path)
    monkeypatch.setenv("BAM_ZOO_COMMIT", "abc1234")
    assert seed_study.code_version() == "abc1234"
    monkeypatch.delenv("BAM_ZOO_COMMIT")
    assert seed_study.code_version() == "unknown-no-git"


def test_code_version_is_dirty_for_changed_code_not_for_changed_results(seed_study, tmp_path, monkeypatch):
    """A finished run rewrites results/ while the next one starts: that is no change to the code it trains on."""
    monkeypatch.delenv("BAM_ZOO_COMMIT", raising=False)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.csv").write_text("a\n")
    (tmp_path / "cli.py").write_text("print(1)\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = seed_study.code_version()
    assert len(clean) >= 7 and not clean.endswith("-dirty")
    (tmp_path / "results" / "metrics.csv").unlink()
    assert seed_study.code_version() == clean
    (tmp_path / "cli.py").write_text("print(2)\n")
    assert seed_study.code_version() == clean + "-dirty"
