"""Smoke test of ``python scripts/benchmark.py``: it runs at tiny sizes and prints ratios (no timing asserted)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import load_script
from bam_zoo.layers import bam_cpu

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
benchmark = load_script(SCRIPT, "benchmark")


def test_quick_run_prints_ratios(capsys):
    results = benchmark.main(["--quick", "--threads", str(torch.get_num_threads()), "--case", "block-train",
                              "--case", "infer-resnet20"])
    out = capsys.readouterr().out
    assert [r.case for r in results] == ["block-train", "block-train/cl", "infer-resnet20", "infer-resnet20/cl"]
    for r in results:
        assert r.time_ratio > 0 and r.mem_ratio > 0 and r.baseline_mib > 0
        assert re.search(rf"^{re.escape(r.case)}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s", out, re.M)
    assert "ratio = BAM / plain" in out


def test_quick_ablation_prints_each_component(capsys):
    rows = benchmark.main(["--quick", "--ablate", "--threads", str(torch.get_num_threads()), "--case", "train-resnet20",
                           "--case", "ship-resnet20-b32", "--memory-format", "channels_last"])
    out = capsys.readouterr().out
    assert [r.case for r in rows] == ["train-resnet20/cl", "ship-resnet20-b32/cl"]
    assert list(rows[0].gains) == ["layer", "gate", "node", "chain", "pool_reduce", "conv"]
    assert all(g is not None for g in rows[0].gains.values())  # every component acts on a channels_last step
    assert rows[1].gains["node"] is None and rows[1].gains["gate"] is not None  # inference: no training node
    assert re.search(r"^ship-resnet20-b32/cl\s+[\d.]+\s+[+-][\d.]+%\s+[+-][\d.]+%\s+-\s", out, re.M), out
    assert all(bam_cpu.component_enabled(c) for c in bam_cpu.COMPONENTS)  # every switch back on


def test_peak_memory_sees_allocations():
    """The profiler-based peak integrates allocations and frees in time order."""
    n = 1 << 18  # 1 MiB of float32

    def step():
        a = torch.empty(n)
        b = torch.empty(n)
        del a, b
        torch.empty(n)

    peak = benchmark.peak_memory(step)
    assert 2 * 4 * n <= peak < 3 * 4 * n


def test_reference_block_is_the_same_function():
    from bam_zoo.layers import BAM

    torch.manual_seed(0)
    bam = BAM(16).eval()
    x = torch.randn(2, 16, 8, 8)
    reference = benchmark.reference_bam(bam)
    assert reference._cpu_fast_path_disabled and not bam._cpu_fast_path_disabled  # the copy only
    torch.testing.assert_close(reference(x), bam(x))


def test_cli_rejects_too_few_runs():
    with pytest.raises(SystemExit):
        benchmark.main(["--case", "block-infer", "--runs", "2"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Fashion-MNIST not installed")
def test_pipeline_case_runs_as_script():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--case", "pipeline"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for model in ("bam_resnet20", "resnet20"):  # both twins, with the absolute epoch time of the zoo recipe
        assert re.search(rf"pipeline \({model},.*data pipeline cost -?[\d.]+%; one training epoch .* ~ \d+ s",
                         proc.stdout), proc.stdout
