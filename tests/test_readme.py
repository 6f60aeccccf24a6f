"""Every Python block in README.md runs as written, each on its own, offline.

A block may be left out only by an HTML comment on the line before it that starts with
``<!-- tests/test_readme.py: not run`` and says why; the test counts them so none slips in unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, write_fashion_mnist

BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```python\n(.*?)^```", re.M | re.S)
SKIP = "<!-- tests/test_readme.py: not run"
BLOCKS = [(m.group(2), m.group(1) or "", REPO.joinpath("README.md").read_text().count("\n", 0, m.start(2)) + 1)
          for m in BLOCK.finditer(REPO.joinpath("README.md").read_text())]


def test_readme_blocks_are_found_and_few_are_skipped() -> None:
    assert len(BLOCKS) >= 5
    skipped = [line for _, marker, line in BLOCKS if marker.startswith(SKIP)]
    assert len(skipped) == 3, f"README blocks not run (lines {skipped}): each needs a reason and a review"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding what the README's blocks read: the checkpoint a quick-start run writes."""
    from bam_zoo.training.cli import cli_main

    root = tmp_path_factory.mktemp("readme")
    data = write_fashion_mnist(root / "data", n_train=40, n_test=8)
    cli_main(["fit", "--config", str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml"), "--data.root",
              str(data), "--data.val_size", "8", "--data.batch_size", "16", "--trainer.max_steps", "1",
              "--test_after_fit", "false", "--trainer.default_root_dir", str(root / "runs/fashion_mnist/bam_resnet20"),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    return root


@pytest.mark.parametrize("code,marker,line", BLOCKS, ids=[f"line{line}" for _, _, line in BLOCKS])
def test_readme_block_runs(code: str, marker: str, line: int, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if marker.startswith(SKIP):
        pytest.skip(marker)
    monkeypatch.chdir(workspace)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
