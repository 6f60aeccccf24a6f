"""Run the Fashion-MNIST seed study: BAM against its plain twin (and sum against product fusion), same recipe.

    python scripts/seed_study.py run --study bam_vs_plain --seeds 1 2 3 4 5
    python scripts/seed_study.py run --study fusion --seeds 1 2 3

Each run is ``python cli.py fit --config configs/fashion_mnist/<arch>.yaml --seed_everything S`` with
:class:`~bam_zoo.training.callbacks.EpochTestAccuracy` added, so test top-1 is recorded after every epoch
(only recorded: nothing in training reads it). Two runs go at once with ``OMP_NUM_THREADS=1`` each, which
on 2 cores finishes a pair sooner than two 2-thread runs in turn. A run whose results are already under
``results/seed_study/`` is skipped, so the same command resumes a study cut short.

Each finished run leaves ``results/seed_study/<variant>/seed<S>/`` (``metrics.csv`` with the per-epoch
curves, ``metrics.json`` with the final test numbers and wall time, ``command.txt``): small files meant to
be committed. ``python scripts/seed_study.py report`` turns them into the tables and the plot.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "seed_study"
RUNS = ROOT / "runs" / "seed_study"

# variant name -> (config architecture, extra CLI arguments)
VARIANTS = {
    "bam_resnet20": ("bam_resnet20", []),
    "resnet20": ("resnet20", []),
    "bam_resnet20_product": ("bam_resnet20", ["--model.model_kwargs", '{"bam_args": {"fusion": "product"}}']),
}
STUDIES = {"bam_vs_plain": ["bam_resnet20", "resnet20"], "fusion": ["bam_resnet20_product"]}


def command(variant: str, seed: int) -> list[str]:
    arch, extra = VARIANTS[variant]
    return [
        sys.executable, "cli.py", "fit", "--config", f"configs/fashion_mnist/{arch}.yaml",
        "--seed_everything", str(seed), "--trainer.default_root_dir", f"runs/seed_study/{variant}/seed{seed}",
        "--trainer.callbacks+=bam_zoo.training.callbacks.EpochTestAccuracy", "--trainer.enable_progress_bar",
        "false", *extra,
    ]


def collect(variant: str, seed: int, cmd: list[str]) -> Path:
    """Copy a finished run's small result files into results/ (the run folder itself is not committed)."""
    run = RUNS / variant / f"seed{seed}"
    out = RESULTS / variant / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    csvs = sorted(run.glob("csv/version_*/metrics.csv"))
    if not csvs or not (run / "export" / "metrics.json").is_file():
        raise RuntimeError(f"{run} has no csv/version_*/metrics.csv or export/metrics.json: the run failed; "
                           f"see {run}.log")
    shutil.copy(csvs[-1], out / "metrics.csv")
    shutil.copy(run / "export" / "metrics.json", out / "metrics.json")
    printable = ["python" if part == sys.executable else part for part in cmd]
    (out / "command.txt").write_text("OMP_NUM_THREADS=1 " + " ".join(
        f"'{p}'" if "{" in p else p for p in printable) + "\n")
    return out


def run_study(variants: list[str], seeds: list[int], parallel: int) -> None:
    queue = [(v, s) for s in seeds for v in variants if not (RESULTS / v / f"seed{s}" / "metrics.json").is_file()]
    print(f"{len(queue)} runs to go: {queue}", flush=True)
    running: list[tuple[str, int, list[str], subprocess.Popen, float]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = []
    while queue or running:
        while queue and len(running) < parallel:
            variant, seed = queue.pop(0)
            cmd = command(variant, seed)
            (RUNS / variant).mkdir(parents=True, exist_ok=True)
            log = open(RUNS / variant / f"seed{seed}.log", "w")
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
            print(f"done {variant} seed {seed} in {minutes:.1f} min -> {collect(variant, seed, cmd)}", flush=True)
    if failed:
        raise SystemExit(f"failed runs: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="train the missing runs of a study")
    run.add_argument("--study", choices=sorted(STUDIES), required=True)
    run.add_argument("--seeds", type=int, nargs="+", required=True)
    run.add_argument("--parallel", type=int, default=2, help="runs at once (each gets OMP_NUM_THREADS=1)")
    args = parser.parse_args()
    if args.action == "run":
        run_study(STUDIES[args.study], args.seeds, args.parallel)


if __name__ == "__main__":
    main()
