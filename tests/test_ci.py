"""CI runs what it is meant to guard: the README's test command collects every test, `slow` ones included."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ci_pytest_args() -> list[str]:
    """The arguments `.ci/run` passes to pytest in the README's test command (its first `python -m pytest` call)."""
    calls = [line.split("python -m pytest", 1)[1] for line in (REPO / ".ci" / "run").read_text().splitlines()
             if "python -m pytest" in line and not line.lstrip().startswith("#")]
    assert calls, ".ci/run no longer runs pytest"
    return shlex.split(calls[0])


def test_ci_command_runs_the_slow_tests() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", *ci_pytest_args(), "--collect-only",
                           "tests/test_benchmark.py", "tests/test_configs.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_pipeline_case_runs_as_script" in proc.stdout
    assert "test_config_trains_two_steps[imagenet/bam_resnet152.yaml]" in proc.stdout
