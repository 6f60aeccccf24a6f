"""bam_zoo.runtime.keep_freed_memory: freed tensors are reused without new page faults."""
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import resource, sys, torch
from bam_zoo.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = torch.ones(10_000_000); del a  # first touch of the memory
before = faults()
for _ in range(10):
    a = torch.ones(10_000_000); del a  # 40 MB, then freed: glibc's default maps and unmaps it every time
print(applied, faults() - before)
"""


def _probe(mode: str):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, new_faults = out.stdout.split()
    return applied == "True", int(new_faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_stops_refaulting_freed_tensors():
    applied, kept_faults = _probe("keep")
    assert applied
    default_faults = _probe("default")[1]
    # ten 40 MB tensors are ~98,000 pages to fault in with glibc's defaults; with freed memory kept the heap
    # pages are reused (a tensor's worth or three of new pages, ~10-30k, while the heap settles)
    assert default_faults > 80_000, default_faults  # the probe does see glibc's default behaviour
    assert kept_faults < default_faults / 2, (kept_faults, default_faults)


def test_opt_out_by_environment(monkeypatch):
    from bam_zoo.runtime import keep_freed_memory

    monkeypatch.setenv("BAM_ZOO_MALLOC", "default")
    assert keep_freed_memory() is False


def test_first_touch_diagnostic_reports_both_costs():
    """`python scripts/malloc_faults.py --first-touch` prints what a first touch costs against a reuse here."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "malloc_faults.py"
    out = subprocess.run([sys.executable, str(script), "--first-touch"], capture_output=True, text=True, check=True)
    import re
    first, again = (float(v) for v in re.findall(r"([0-9.]+) ms", out.stdout))
    assert first > 2 * again, out.stdout  # ~10x here: a fresh tensor's pages fault in, a reused one's do not
