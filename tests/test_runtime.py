"""bam_zoo.runtime: freed tensors are reused without new page faults; channels-last training computes the gradients
NCHW does."""
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
    # times only, no ratio asserted (a loaded machine shrinks it); the fault counts are asserted above
    assert first > 0 and again > 0 and "median of 8" in out.stdout, out.stdout


CHANNELS_LAST_PROBE = """
import copy, torch, timm
from bam_zoo.runtime import to_channels_last
torch.manual_seed(0)
plain = timm.create_model("repvgg_a0", num_classes=7).train()
fast = to_channels_last(copy.deepcopy(plain))
x = torch.randn(4, 3, 64, 64)
plain(x).square().sum().backward()
fast(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
print(max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
          for p, q in zip(fast.parameters(), plain.parameters())))
"""


def test_channels_last_keeps_strided_1x1_convs_on_few_channels_in_nchw():
    """RepVGG's stem has a 1x1 stride-2 conv on 3 channels: in channels-last, oneDNN's AVX2 weight gradient for it
    crashes, hangs or is wrong. Run in a subprocess, so a crash fails this test instead of ending the test run."""
    import timm
    import torch

    from bam_zoo.runtime import to_channels_last

    model = to_channels_last(timm.create_model("repvgg_a0", num_classes=7))
    assert model.stem.conv_1x1.conv.weight.stride() == (3, 1, 1, 1)  # NCHW (channels-last would be (3, 1, 3, 3))
    assert model.stem.conv_kxk.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.stages[0][0].conv_1x1.conv.weight.stride() == (48, 1, 48, 48)  # 48 channels: channels-last
    out = subprocess.run([sys.executable, "-c", CHANNELS_LAST_PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) < 2e-2  # float32 round-off in this deep net: about 3e-3 relative to the largest gradient
