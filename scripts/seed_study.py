"""Run the Fashion-MNIST seed study: BAM against its plain twin (and sum against product fusion), same recipe.

    python scripts/seed_study.py run --study bam_vs_plain --seeds 1 2 3 4 5
    python scripts/seed_study.py run --study fusion --seeds 1 2 3
    python scripts/seed_study.py run --study insertion --seeds 1 2 3 4 5     # add_bam onto resnet20.fmnist
    python scripts/seed_study.py run --study insertion56 --seeds 1 2 3       # ... onto resnet56.fmnist_long
    python scripts/seed_study.py run --study finetune95 --seeds 1            # the _ft pair: 15 epochs, long recipe
    python scripts/seed_study.py run --study finetune95_20 --seeds 1 --parallel 1   # the same for 20 epochs
    python scripts/seed_study.py run --study restart95 --seeds 1 --parallel 1  # a second 30-epoch cosine cycle
    python scripts/seed_study.py run --study restart95_3 --seeds 2 --parallel 2  # a third, from the second's ends

Each run is ``python cli.py fit --config configs/fashion_mnist/<arch>.yaml --seed_everything S`` (finetune95:
``configs/fashion_mnist_long/resnet56.yaml``) with
:class:`~bam_zoo.training.callbacks.EpochTestAccuracy` added, so test top-1 is recorded after every epoch
(only recorded: nothing in training reads it). Two runs go at once with ``OMP_NUM_THREADS=1`` each, which
on 2 cores finishes a pair sooner than two 2-thread runs in turn (resnet56's long recipe too, by about a tenth:
docs/results.md); ``--parallel 1`` gives a run all the cores, for one arm alone. A run whose results are
already under ``results/seed_study/`` is skipped, and a run cut short goes on from its ``last.ckpt``
(``--ckpt_path last``), so the same command resumes a study. ``kill -TERM`` to the runner stops its runs at
their current step; ``python scripts/seed_study.py park`` then copies their state under ``results/`` to commit,
and ``run`` goes on from it on another machine. A run may start on a rented GPU machine, from a copy of the tree
(``BAM_ZOO_COMMIT=<hash sent>`` names its code there), be parked, and go on here: ``machine.txt`` lists each start's.

Each finished run leaves ``results/seed_study/<variant>/seed<S>/`` (``metrics.csv`` with the per-epoch
curves, ``metrics.json`` with the final test numbers and wall time, ``command.txt``): small files meant to
be committed. ``python scripts/seed_study.py report`` turns them into the tables (mean ± std, differences
with Welch 95% confidence intervals) and the plot ``docs/figures/seed_study.png``, and writes them to
``results/seed_study/report.md`` (MODEL_CARD.md includes it) and README.md's seed-study block; ``report --study insertion`` does the same for the
insertion study (``insertion.md``, ``insertion_study.png``, the insertion-study block), with the accuracy at
insertion and what BAM's scale gamma learned per stage.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "seed_study"
RUNS = ROOT / "runs" / "seed_study"
RUNNER_PID = "runner.pid"  # under RUNS while ``run`` runs
UNFINISHED = "unfinished"  # results/seed_study/<variant>/seed<S>/unfinished/: a stopped run's state, parked


def finetune(lr: float, epochs: int, warmup: int = 0) -> list[str]:
    """A fine-tune from the named pretrained weights: cosine from ``lr`` after ``warmup`` epochs, for ``epochs``."""
    return ["--model.pretrained", "true", "--model.lr", str(lr), "--model.warmup_epochs", str(warmup),
            "--trainer.max_epochs", str(epochs)]


# the insertion study's fine-tune: 5 epochs, cosine from a tenth of the recipe's LR, no warm-up (fixed beforehand,
# not tuned: the test set is never looked at, and validation selects the checkpoint as in every run)
FINETUNE = finetune(0.01, 5)
# variant name -> (config architecture, extra CLI arguments)
VARIANTS = {
    "bam_resnet20": ("bam_resnet20", []),
    "resnet20": ("resnet20", []),
    "bam_resnet20_product": ("bam_resnet20", ["--model.model_kwargs", '{"bam_args": {"fusion": "product"}}']),
}
# the insertion studies: a shipped plain weight fine-tuned with BAM added (identity start, variant "<tag>+bam") and
# without (variant "<tag>"), on its architecture's 15-epoch config; study -> (config, tag, seeds, note on the recipe)
INSERTION_STUDIES = {
    "insertion": ("resnet20", "resnet20.fmnist", "1 2 3 4 5", ""),
    "insertion56": ("resnet56", "resnet56.fmnist_long", "1 2 3", ", the 15-epoch config's augmentation"),
}
for _arch, _tag, _, _ in INSERTION_STUDIES.values():
    VARIANTS[f"{_tag}+bam"] = (_arch, [*FINETUNE, "--model.model_name", _tag, "--model.add_bam", "true"])
    VARIANTS[_tag] = (_arch, [*FINETUNE, "--model.model_name", _tag])
# the 95% attempt (issue 22, part 3): resnet56.fmnist_long fine-tuned on its own 55-epoch recipe (erasing, EMA),
# with BAM added (variant "...+bam_<suffix>") and without (the twin, "..._<suffix>"); each fixed beforehand, one
# seed, validation selects the checkpoint and the test set is never looked at.
# study -> (variant suffix, lr, warm-up epochs, epochs, start of the BAM arm, start of the twin): cosine from 0.02
# for 15 epochs first; then 20, because validation still rose at epoch 15; both ended near 94.7, so then a second
# cosine cycle (a warm restart, Loshchilov & Hutter) of 30 epochs from half the first cycle's peak LR, 85 epochs of
# training in all instead of 55. A start "<tag>+bam" is add_bam onto <tag>.
_FIRST = ("resnet56.fmnist_long+bam", "resnet56.fmnist_long")
# A start "<variant>@seed" is that variant's export kept under results/ for the same seed: a third cycle goes on
# from where each arm's second cycle ended (the BAM arm as the bam_inserted network it became), at half its LR.
_SECOND = ("resnet56.fmnist_long+bam_cycle2@seed", "resnet56.fmnist_long_cycle2@seed")
LONG_FINETUNE_STUDIES = {
    "finetune95": ("ft15", 0.02, 0, 15, _FIRST), "finetune95_20": ("ft20", 0.02, 0, 20, _FIRST),
    "restart95": ("cycle2", 0.05, 1, 30, _FIRST), "restart95_3": ("cycle3", 0.025, 1, 30, _SECOND),
}
INSERTED_56 = {"base_model": "resnet56", "bam_stages": ["layer1", "layer2"]}  # what add_bam made of resnet56


def start_args(start: str) -> list[str]:
    """The CLI arguments that begin a run from ``start``: a shipped tag, ``<tag>+bam`` or ``<variant>@seed``."""
    if not start.endswith("@seed"):
        return ["--model.model_name", start.removesuffix("+bam"),
                *(["--model.add_bam", "true"] if start.endswith("+bam") else [])]
    variant = start.removesuffix("@seed")
    network = (["--model.model_name", "bam_inserted", "--model.model_kwargs", json.dumps(INSERTED_56)]
               if "+bam" in variant else ["--model.model_name", "resnet56"])
    return [*network, "--model.pretrained_file", f"results/seed_study/{variant}/seed{{seed}}/export"]


for _suffix, _lr, _warmup, _epochs, _starts in LONG_FINETUNE_STUDIES.values():
    for _variant, _start in zip((f"resnet56.fmnist_long+bam_{_suffix}", f"resnet56.fmnist_long_{_suffix}"), _starts):
        VARIANTS[_variant] = ("fashion_mnist_long/resnet56", [*finetune(_lr, _epochs, _warmup), *start_args(_start)])
LONG_FINETUNE_VARIANTS = {f"resnet56.fmnist_long{arm}_{suffix}" for suffix, *_ in LONG_FINETUNE_STUDIES.values()
                          for arm in ("+bam", "")}
# README.md's copy of the report sits between these markers
def readme_block(marker: str) -> re.Pattern:
    return re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)

STUDIES = {"bam_vs_plain": ["bam_resnet20", "resnet20"], "fusion": ["bam_resnet20_product"],
           **{study: [f"{tag}+bam", tag] for study, (_, tag, _, _) in INSERTION_STUDIES.items()},
           **{study: [f"resnet56.fmnist_long+bam_{suffix}", f"resnet56.fmnist_long_{suffix}"]
              for study, (suffix, *_) in LONG_FINETUNE_STUDIES.items()}}


def command(variant: str, seed: int) -> list[str]:
    arch, extra = VARIANTS[variant]
    extra = [arg.replace("{seed}", str(seed)) for arg in extra]
    starts = [extra[i + 1] for i, arg in enumerate(extra[:-1]) if arg == "--model.pretrained_file"]
    if starts and not (ROOT / starts[0]).is_dir():
        raise SystemExit(f"{variant} seed {seed} starts from {starts[0]}, which is not here: finish that run first "
                         f"(its study with --seeds {seed}) and keep its export.")
    return [
        sys.executable, "cli.py", "fit", "--config", f"configs/{arch if '/' in arch else 'fashion_mnist/' + arch}.yaml",
        "--seed_everything", str(seed), "--trainer.default_root_dir", f"runs/seed_study/{variant}/seed{seed}",
        "--trainer.callbacks+=bam_zoo.training.callbacks.EpochTestAccuracy", "--trainer.enable_progress_bar",
        "false", *extra,
    ]


def collect(variant: str, seed: int, cmd: list[str], threads: int = 1) -> Path:
    """Copy a finished run's small result files into results/ (the run folder itself is not committed)."""
    run = RUNS / variant / f"seed{seed}"
    out = RESULTS / variant / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    csvs = sorted(run.glob("csv/version_*/metrics.csv"), key=lambda path: int(path.parent.name[len("version_"):]))
    if not csvs or not (run / "export" / "metrics.json").is_file():
        raise RuntimeError(f"{run} has no csv/version_*/metrics.csv or export/metrics.json: the run failed; "
                           f"see {run}.log")
    fields, rows = merge_logs(csvs)
    final = json.loads((run / "export" / "metrics.json").read_text())
    if final.get("best_checkpoint"):
        check_selection(rows, Path(final["best_checkpoint"]).name, run)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    shutil.copy(run / "export" / "metrics.json", out / "metrics.json")
    gammas = gamma_stats(run / "export" / "model.safetensors")
    if gammas:
        (out / "gamma.json").write_text(json.dumps(gammas, indent=2) + "\n")
    if variant in LONG_FINETUNE_VARIANTS:  # a candidate to ship: its weights must outlive the machine it trained on
        shutil.copytree(run / "export", out / "export", dirs_exist_ok=True)
    machines = (run / "machines.txt").read_text().splitlines() if (run / "machines.txt").is_file() else [machine()]
    (out / "machine.txt").write_text("".join(f"{m}\n" for m in dict.fromkeys(machines)))  # each start's, once each
    if (run / "commits.txt").is_file():  # the commit each start of the run trained on, in order, once each
        started = dict.fromkeys((run / "commits.txt").read_text().split())
        (out / "commit.txt").write_text("".join(f"{commit}\n" for commit in started))
    printable = ["python" if part == sys.executable else part for part in cmd]
    (out / "command.txt").write_text(f"OMP_NUM_THREADS={threads} " + " ".join(
        f"'{p}'" if "{" in p else p for p in printable) + "\n")
    return out


def merge_logs(csvs: list[Path]) -> tuple[list[str], list[dict[str, str]]]:
    """One run's CSV logs, one per start (``version_0``, ``version_1``, ... in order), as one log.

    A resumed start repeats the steps after the checkpoint it resumed from, so an earlier log keeps only the rows
    before the next log's first step."""
    fields: dict[str, None] = {}
    logs = []
    for path in csvs:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            logs.append(list(reader))
            fields.update(dict.fromkeys(reader.fieldnames or []))
    rows: list[dict[str, str]] = []
    for log in logs:
        if log:
            first = int(log[0]["step"])
            rows = [row for row in rows if int(row["step"]) < first] + log
    return list(fields), rows


def check_selection(rows: list[dict[str, str]], best: str, run: Path) -> None:
    """The tested checkpoint (``best-<epoch>.ckpt``) must be the first epoch of highest validation top-1 in the
    whole log; a resume that lost the selection's state (a run moved to another folder) would break that."""
    val = {int(row["epoch"]): float(row["val/acc1"]) for row in rows if row.get("val/acc1")}
    chosen = int(re.fullmatch(r"best-(\d+)\.ckpt", best)[1])
    want = max(val, key=lambda epoch: (val[epoch], -epoch))
    if chosen != want:
        raise RuntimeError(f"{run}: the run tested {best}, but validation top-1 peaked at epoch {want} "
                           f"({val[want]:.4f} against {val.get(chosen)}): its checkpoint selection did not see "
                           "the whole run. Do not report it; rerun it in the folder where it started.")


def code_version() -> str:
    """The short hash of HEAD, with ``-dirty`` when tracked files outside ``results/`` differ from it (the run trains
    on those; results/ is data, which a finished run changes); on a copy of the tree (a rented GPU machine),
    ``$BAM_ZOO_COMMIT`` as the caller states it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if os.environ.get("BAM_ZOO_COMMIT") or not (ROOT / ".git").exists():  # a copy's .git may be stale
        return os.environ.get("BAM_ZOO_COMMIT", "unknown-no-git")
    dirty = "-dirty" if git("status", "--porcelain", "-uno", "--", ".", ":(exclude)results") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def machine() -> str:
    """What a run trained on: the GPU if one was used, else the CPU, and torch's version."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{os.cpu_count()} CPU cores ({name}), torch {torch.__version__}"


def gamma_stats(weights: Path) -> dict[str, dict[str, float]]:
    """What each inserted BAM's scale ``gamma`` (zero at insertion) learned: mean, mean |gamma| and max |gamma|."""
    from safetensors.torch import load_file

    out = {}
    for key, gamma in sorted(load_file(str(weights)).items()):
        if key.endswith(".bam.gamma"):
            out[key[: -len(".bam.gamma")]] = {"mean": gamma.mean().item(), "mean_abs": gamma.abs().mean().item(),
                                              "max_abs": gamma.abs().max().item()}
    return out


def measure_insertion_start(tag: str) -> dict[str, float]:
    """Test top-1 of a shipped plain weight, and of the same weights with BAM inserted before any training; added to
    ``insertion_start.json`` (one file for every insertion study)."""
    sys.path.insert(0, str(ROOT))
    import bam_zoo
    from bam_zoo.evaluate import measure

    path = RESULTS / "insertion_start.json"
    start = json.loads(path.read_text()) if path.is_file() else {}
    for name, add in ((tag, False), (f"{tag}+bam", True)):
        start[name] = measure(bam_zoo.create_model(tag, pretrained=True, add_bam=add))["top1"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(start, indent=2) + "\n")
    return start


def run_study(variants: list[str], seeds: list[int], parallel: int) -> None:
    queue = [(v, s) for s in seeds for v in variants if not (RESULTS / v / f"seed{s}" / "metrics.json").is_file()]
    print(f"{len(queue)} runs to go: {queue}", flush=True)
    running: list[tuple[str, int, list[str], subprocess.Popen, float]] = []
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    failed = []
    start_file = RESULTS / "insertion_start.json"
    for tag in (v[: -len("+bam")] for v in variants if v.endswith("+bam")):
        if tag not in (json.loads(start_file.read_text()) if start_file.is_file() else {}):
            print(f"accuracy at insertion: {measure_insertion_start(tag)}", flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / RUNNER_PID).write_text(str(os.getpid()))
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        _run_queue(queue, running, parallel, env, threads, failed)
    except StudyStopped:
        for *_, proc, _ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # each run saves its current step to last.ckpt and exits
        for *_, proc, _ in running:
            proc.wait()
        raise SystemExit("stopped: every run saved its last.ckpt; the same command goes on here, or "
                         "`python scripts/seed_study.py park` carries the runs to another machine through git")
    finally:
        signal.signal(signal.SIGTERM, previous)
        (RUNS / RUNNER_PID).unlink(missing_ok=True)
    if failed:
        raise SystemExit(f"failed runs: {failed}")


class StudyStopped(Exception):
    """SIGTERM reached the study runner."""


def _stop(signum: int, frame: object) -> None:
    raise StudyStopped


def _run_queue(queue: list[tuple[str, int]], running: list, parallel: int, env: dict[str, str], threads: int,
               failed: list[tuple[str, int]]) -> None:
    while queue or running:
        while queue and len(running) < parallel:
            variant, seed = queue.pop(0)
            cmd = [*command(variant, seed), "--ckpt_path", "last"]  # a run cut short goes on from its last.ckpt
            run = RUNS / variant / f"seed{seed}"
            run.mkdir(parents=True, exist_ok=True)
            if unpark(run, RESULTS / variant / f"seed{seed}"):
                print(f"{variant} seed {seed}: going on from the state parked in results/", flush=True)
            with open(run / "commits.txt", "a") as commits:  # one line per start: a resumed run may span commits
                commits.write(code_version() + "\n")
            with open(run / "machines.txt", "a") as machines:
                machines.write(machine() + "\n")
            log = open(RUNS / variant / f"seed{seed}.log", "a")
            running.append((variant, seed, cmd, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                                                  stderr=subprocess.STDOUT), time.time()))
            print(f"started {variant} seed {seed}", flush=True)
        time.sleep(5)
        for item in list(running):
            variant, seed, cmd, proc, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            minutes = (time.time() - start) / 60
            if proc.returncode != 0:
                failed.append((variant, seed))
                print(f"FAILED {variant} seed {seed} (exit {proc.returncode}) after {minutes:.1f} min", flush=True)
                continue
            out = collect(variant, seed, cmd, threads)
            shutil.rmtree(out / UNFINISHED, ignore_errors=True)  # its parked state, if any, is spent
            print(f"done {variant} seed {seed} in {minutes:.1f} min -> {out}", flush=True)


def park() -> list[Path]:
    """Copy each stopped, unfinished run's state (its checkpoints, CSV logs and commits) to
    ``results/seed_study/<variant>/seed<S>/unfinished/``, to commit, so that ``run`` goes on from it on another
    machine (a session's machine does not outlive it). Refuses while the runner runs: checkpoints may be half written.
    """
    pid_file = RUNS / RUNNER_PID
    pid = int(pid_file.read_text()) if pid_file.is_file() else None
    if pid is not None and _alive(pid):
        raise SystemExit(f"a study runner (pid {pid}, {pid_file}) is running: stop it first with `kill -TERM {pid}` "
                         "(its runs save their current step), then park. If that process is no study runner (one "
                         f"killed outright leaves the file behind), delete {pid_file}")
    parked = []
    for last in sorted(RUNS.glob("*/seed*/checkpoints/last.ckpt")):
        run = last.parents[1]
        out = RESULTS / run.parent.name / run.name
        if (out / "metrics.json").is_file():
            continue  # finished and collected
        shutil.rmtree(out / UNFINISHED, ignore_errors=True)
        for path in [*run.glob("checkpoints/*.ckpt"), *run.glob("csv/version_*/metrics.csv"), run / "commits.txt",
                     run / "machines.txt"]:
            if path.is_file():
                (out / UNFINISHED / path.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out / UNFINISHED / path.relative_to(run))
        parked.append(out / UNFINISHED)
    return parked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def unpark(run: Path, out: Path) -> bool:
    """Put a parked state back into the run folder, unless the folder has a ``last.ckpt`` of its own."""
    if (run / "checkpoints" / "last.ckpt").is_file() or not (out / UNFINISHED / "checkpoints" / "last.ckpt").is_file():
        return False
    shutil.copytree(out / UNFINISHED, run, dirs_exist_ok=True)
    return True


def load(variant: str) -> dict[int, dict]:
    """seed -> {"top1": final test top-1 (best-by-val checkpoint), "curve": [test top-1 after each epoch]}."""
    runs = {}
    for folder in sorted((RESULTS / variant).glob("seed*")):
        if not (folder / "metrics.json").is_file():
            continue
        final = json.loads((folder / "metrics.json").read_text())
        with open(folder / "metrics.csv") as f:
            curve = {int(row["epoch"]): 100 * float(row["test_curve/acc1"])
                     for row in csv.DictReader(f) if row.get("test_curve/acc1")}
        if (folder / "CURVE_INVALID").is_file():  # the file says why; the final numbers still count
            curve = {}
        runs[int(folder.name[4:])] = {"top1": 100 * final["test"]["acc1"], "curve": [curve[e] for e in sorted(curve)],
                                      "minutes": final["train_wall_time_s"] / 60}
    return runs


def mean_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% confidence interval (Welch's t, unequal variances)."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff, half = statistics.mean(a) - statistics.mean(b), stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def _verdict(a: str, b: str, diff: float, low: float, high: float) -> str:
    """In plain words: ``a`` helps, hurts, or does not measurably help, against ``b``, with the interval."""
    ci = f"95% CI {low:+.2f} to {high:+.2f}"
    if low > 0:
        return f"`{a}` helps: {diff:.2f} points better than `{b}` ({ci})."
    if high < 0:
        return f"`{a}` hurts: {-diff:.2f} points worse than `{b}` ({ci})."
    return f"`{a}` does not measurably help against `{b}`: {diff:+.2f} points, {ci}, which contains 0."


# report -> its variants, comparisons, opening line, how it is run, README marker and plot
REPORTS = {
    "from_scratch": dict(
        variants=["bam_resnet20", "resnet20", "bam_resnet20_product"],
        comparisons=[("bam_resnet20", "resnet20"), ("bam_resnet20_product", "bam_resnet20")],
        intro="Fashion-MNIST, the 15-epoch recipe; each seed is one run of (two runs at a time, one thread each):",
        how="`python scripts/seed_study.py run --study bam_vs_plain --seeds 1 2 3 4 5`; `--study fusion` for the "
            "product fusion", marker="seed-study", plot="seed_study.png", out="report.md"),
    **{study: dict(
        variants=[f"{tag}+bam", tag], comparisons=[(f"{tag}+bam", tag)],
        intro=f"Fashion-MNIST: the shipped `{tag}` fine-tuned for 5 epochs (cosine from lr 0.01, no warm-up{note}), "
              "with BAM inserted by `--model.add_bam true` (identity start) and without; each seed is one run of (two "
              "runs at a time, one thread each):",
        how=f"`python scripts/seed_study.py run --study {study} --seeds {seeds}`; both arms of a seed see the same "
            "data order and augmentation", marker=f"{study}-study", plot=f"{study}_study.png", out=f"{study}.md")
       for study, (_, tag, seeds, note) in INSERTION_STUDIES.items()},
    "restart95": dict(
        variants=["resnet56.fmnist_long+bam_cycle2", "resnet56.fmnist_long_cycle2"],
        comparisons=[("resnet56.fmnist_long+bam_cycle2", "resnet56.fmnist_long_cycle2")],
        intro="Fashion-MNIST: the shipped `resnet56.fmnist_long` given a second cosine cycle on its own 55-epoch "
              "recipe (30 epochs from lr 0.05 after 1 warm-up epoch; erasing, EMA), with BAM inserted by "
              "`--model.add_bam true` (identity start) and without; each seed is one run of:",
        how="`python scripts/seed_study.py run --study restart95 --seeds 1 2 3 --parallel 1`; seeds 2 and 3 began on "
            "a rented GPU and went on on the CPU, as each run's `machine.txt` says", marker="restart95-study",
        plot="restart95_study.png", out="restart95.md",
        times="Fit times are wall clock of each run's starts added up, on the machines its `machine.txt` lists;"),
}


SHARED_CORES = "Fit times are wall clock with two runs sharing the 2 cores, and other work on the machine;"


def report(plot: Path, which: str = "from_scratch") -> str:
    """A study in markdown: commands, tables, a plain verdict per comparison, the plot (written to ``plot``).

    Variants with fewer than 2 finished runs are left out.
    """
    spec = REPORTS[which]
    data = {v: load(v) for v in spec["variants"]}
    data = {v: runs for v, runs in data.items() if len(runs) >= 2}
    lines = [spec["intro"], ""]
    for variant in data:
        lines.append(f"    {(RESULTS / variant / f'seed{min(data[variant])}' / 'command.txt').read_text().strip()}")
    commits = sorted({commit for v in data for s in data[v] if (RESULTS / v / f"seed{s}" / "commit.txt").is_file()
                      for commit in (RESULTS / v / f"seed{s}" / "commit.txt").read_text().split()})
    lines += ["", f"with `--seed_everything` 1, 2, ... ({spec['how']}). Test top-1 is of the best-validation "
              "checkpoint on the official 10,000 test images; the seed decides initialisation and batch order, "
              "never the validation split." + (f" Code: commit {', '.join(commits)}." if commits else ""), "",
              "| variant | runs (seeds) | test top-1, mean ± std | per seed | fit time, mean |", "|---|---|---|---|---|"]
    for variant, runs in data.items():
        top1 = [r["top1"] for r in runs.values()]
        lines.append(f"| `{variant}` | {len(runs)} ({', '.join(map(str, runs))}) | {statistics.mean(top1):.2f} ± "
                     f"{statistics.stdev(top1):.2f} | {', '.join(f'{t:.2f}' for t in top1)} | "
                     f"{statistics.mean(r['minutes'] for r in runs.values()):.0f} min |")
    lines += ["", "| comparison | difference in mean top-1 | 95% CI (Welch) |", "|---|---|---|"]
    verdicts = []
    for a, b in spec["comparisons"]:
        if a in data and b in data:
            diff, low, high = mean_ci([r["top1"] for r in data[a].values()], [r["top1"] for r in data[b].values()])
            lines.append(f"| `{a}` − `{b}` | {diff:+.2f} points | [{low:+.2f}, {high:+.2f}] |")
            verdicts.append(_verdict(a, b, diff, low, high))
    lines += [""] + verdicts
    start_file, tag = RESULTS / "insertion_start.json", spec["variants"][-1]
    measured = json.loads(start_file.read_text()) if which in INSERTION_STUDIES and start_file.is_file() else {}
    start = measured if tag in measured else {}
    if start:
        lines += ["", f"Test top-1 at insertion, before any training (`bam_zoo.evaluate.measure` of "
                  f"`create_model('{tag}', pretrained=True, add_bam=...)`): {start[tag]:.2f} "
                  f"without BAM, {start[tag + '+bam']:.2f} with it."]
        for variant in data:
            for runs in data[variant].values():
                runs["curve"] = [start[variant], *runs["curve"]] if runs["curve"] else []
    lines += _gamma_table(data)
    if data:
        _plot(data, plot, first_epoch=0 if start else 1)
        lines += ["", f"![Test top-1 per epoch, mean and min-max over seeds]({plot.relative_to(ROOT)})"]
    lines += ["", f"{spec.get('times', SHARED_CORES)} they are not speed measurements. Runs whose per-epoch curve was "
              "recorded wrongly are left out of the plot, not the table (their folder holds `CURVE_INVALID`, which "
              "says why)."]
    return "\n".join(lines) + "\n"


def summary(text: str, out: str) -> str:
    """README's copy of a report: from its table of runs through the verdicts, and a link to the rest."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| variant"))
    last = next((i for i, line in enumerate(lines) if line.startswith(("What `", "![", "Fit times"))), len(lines))
    body = "\n".join(lines[first:last]).strip()
    return f"{body}\n\nCommands, curves and the plot: [results/seed_study/{out}](results/seed_study/{out}).\n"


def _gamma_table(data: dict[str, dict[int, dict]]) -> list[str]:
    """What BAM's scale learned per stage, over the seeds of each variant that has one (gamma.json)."""
    lines = []
    for variant in data:
        per_seed = [json.loads(f.read_text()) for s in data[variant]
                    if (f := RESULTS / variant / f"seed{s}" / "gamma.json").is_file()]
        if not per_seed:
            continue
        lines += ["", f"What `{variant}` learned in BAM's scale gamma (zero at insertion), per stage, mean over "
                  f"{len(per_seed)} seeds (min-max):", "", "| stage | mean gamma | mean abs(gamma) | max abs(gamma) |",
                  "|---|---|---|---|"]
        for stage in per_seed[0]:
            cells = []
            for key in ("mean", "mean_abs", "max_abs"):
                values = [g[stage][key] for g in per_seed]
                cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f} to {max(values):.3f})")
            lines.append(f"| `{stage}` | " + " | ".join(cells) + " |")
        largest = max(g[stage]["max_abs"] for g in per_seed for stage in g)
        lines += ["", f"BAM's output is `x + gamma * x * sigmoid(...)` with the sigmoid in (0, 1), so a scale of at most "
                  f"{largest:.3f} changes any activation by less than {100 * largest:.1f}%: after this fine-tune the "
                  "inserted BAM is still close to the identity it started as."
                  if largest < 0.1 else f"The largest learned scale is {largest:.3f}."]
    return lines


def _plot(data: dict[str, dict[int, dict]], path: Path, first_epoch: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(10, 4))
    last: list[float] = []  # every value shown in the zoomed panel, for its y range
    for (variant, runs), colour in zip(data.items(), ["tab:red", "tab:blue", "tab:green"]):
        curves = [r["curve"] for r in runs.values() if r["curve"]]
        if not curves:
            continue
        epochs = min(map(len, curves))
        curves = [c[:epochs] for c in curves]
        x = range(first_epoch, first_epoch + epochs)
        mean = [statistics.mean(c[e] for c in curves) for e in range(epochs)]
        last += [c[e] for c in curves for e in range(max(0, epochs - 6), epochs)]
        for ax in (full, zoom):
            ax.fill_between(x, [min(c[e] for c in curves) for e in range(epochs)],
                            [max(c[e] for c in curves) for e in range(epochs)], color=colour, alpha=0.2, lw=0)
            ax.plot(x, mean, color=colour, label=f"{variant} (mean of {len(curves)} seed(s), band: min-max)")
    for ax in (full, zoom):
        ax.set_xlabel("epoch"), ax.set_ylabel("test top-1 (%)"), ax.grid(alpha=0.3)
    if last:
        zoom.set_xlim(max(first_epoch, first_epoch + epochs - 6), first_epoch + epochs - 1)
        zoom.set_ylim(min(last) - 0.2, max(last) + 0.2)
    zoom.set_title("last epochs")
    full.set_ylim(bottom=80)  # the first epoch or two start far lower; the rest is what differs
    full.set_title("Fashion-MNIST test top-1 after each epoch" + (" (0: at insertion)" if first_epoch == 0 else ""))
    full.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="train the missing runs of a study")
    run.add_argument("--study", choices=sorted(STUDIES), required=True)
    run.add_argument("--seeds", type=int, nargs="+", required=True)
    run.add_argument("--parallel", type=int, default=2,
                     help="runs at once (each gets the cores / parallel as OMP_NUM_THREADS)")
    sub.add_parser("park", help="copy stopped, unfinished runs' state under results/, to commit and go on elsewhere")
    show = sub.add_parser("report", help="print the tables and write the plot")
    show.add_argument("--study", choices=sorted(REPORTS), default="from_scratch",
                      help="from_scratch: bam_vs_plain and fusion; insertion / insertion56: add_bam onto "
                           "resnet20.fmnist / resnet56.fmnist_long; restart95: the 95%% attempt's second cycle")
    args = parser.parse_args()
    if args.action == "run":
        run_study(STUDIES[args.study], args.seeds, args.parallel)
    elif args.action == "park":
        for folder in park():
            size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
            print(f"parked {folder.relative_to(ROOT)} ({size / 2**20:.1f} MiB): commit it")
    else:
        spec = REPORTS[args.study]
        text = report(ROOT / "docs" / "figures" / spec["plot"], args.study)
        (RESULTS / spec["out"]).write_text(text)  # MODEL_CARD.md includes it (python scripts/model_card.py)
        readme, block, short = ROOT / "README.md", readme_block(spec["marker"]), summary(text, spec["out"])
        if readme.is_file() and block.search(readme.read_text()):
            readme.write_text(block.sub(lambda m: m[1] + short + m[2], readme.read_text()))
        print(text, end="")


if __name__ == "__main__":
    main()
