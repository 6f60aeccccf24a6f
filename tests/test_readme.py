"""The README and the docs pages work as written: every Python block runs, each on its own, offline; every
`python cli.py fit|validate|test|predict` command of a bash block parses; every relative link resolves.

A Python block may be left out only by an HTML comment on the line before it that starts with
``<!-- tests/test_readme.py: not run`` and says why; the test counts them per page so none slips in unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from test_training_utils import one_torch_thread  # noqa: F401  (autouse)
from test_training_utils import REPO, write_fashion_mnist

# the pages whose Python blocks run, with how many blocks each leaves out (each marked and explained)
PAGES = {"README.md": 1, "docs/models.md": 1, "docs/attention.md": 0, "docs/training.md": 0, "docs/hub.md": 2}
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```python\n(.*?)^```", re.M | re.S)
SKIP = "<!-- tests/test_readme.py: not run"
TRAINING_SUBCOMMANDS = {"fit", "validate", "test", "predict"}


def _blocks(page: str) -> list[tuple[str, str, str, int]]:
    text = REPO.joinpath(page).read_text()
    return [(page, m.group(2), m.group(1) or "", text.count("\n", 0, m.start(2)) + 1) for m in BLOCK.finditer(text)]


def _cli_commands(page: str) -> list[tuple[str, list[str]]]:
    """The arguments after `cli.py` of every command in the page's bash blocks, continuation lines joined."""
    commands = []
    for m in FENCE.finditer(REPO.joinpath(page).read_text()):
        if m.group(1) == "bash":
            for line in m.group(2).replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "cli.py" in words:
                    commands.append((page, words[words.index("cli.py") + 1:]))
    return commands


BLOCKS = [block for page in PAGES for block in _blocks(page)]
COMMANDS = [c for page in PAGES for c in _cli_commands(page) if c[1] and c[1][0] in TRAINING_SUBCOMMANDS]


def test_readme_is_short() -> None:
    lines = REPO.joinpath("README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_blocks_are_found_and_few_are_skipped() -> None:
    assert len([b for b in BLOCKS if b[0] == "README.md"]) >= 3
    for page, expected in PAGES.items():
        skipped = [line for p, _, marker, line in BLOCKS if p == page and marker.startswith(SKIP)]
        assert len(skipped) == expected, f"{page} blocks not run (lines {skipped}): each needs a reason and a review"
    assert len(COMMANDS) >= 10 and any(page == "README.md" for page, _ in COMMANDS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding what the blocks read: the checkpoint a quick-start run writes."""
    from bam_zoo.training.cli import cli_main

    root = tmp_path_factory.mktemp("readme")
    data = write_fashion_mnist(root / "data", n_train=40, n_test=8)
    cli_main(["fit", "--config", str(REPO / "configs" / "fashion_mnist" / "bam_resnet20.yaml"), "--data.root",
              str(data), "--data.val_size", "8", "--data.batch_size", "16", "--trainer.max_steps", "1",
              "--test_after_fit", "false", "--trainer.default_root_dir", str(root / "runs/fashion_mnist/bam_resnet20"),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    return root


@pytest.mark.parametrize("page,code,marker,line", BLOCKS, ids=[f"{p}:{line}" for p, _, _, line in BLOCKS])
def test_block_runs(page: str, code: str, marker: str, line: int, workspace: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    if marker.startswith(SKIP):
        pytest.skip(marker)
    monkeypatch.chdir(workspace)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("page,args", [pytest.param(page, args, marks=() if page == "README.md" else pytest.mark.slow)
                                       for page, args in COMMANDS],
                         ids=[f"{page}:{' '.join(args)[:60]}" for page, args in COMMANDS])
def test_cli_command_parses(page: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command parses with its config and every override (`--print_config` stops before anything runs)."""
    from bam_zoo.training.cli import cli_main

    monkeypatch.chdir(REPO)
    err = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        cli_main([*args, "--print_config"])
    assert stop.value.code in (0, None), f"{page}: python cli.py {' '.join(args)}\n{err.getvalue()[-1000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(REPO).as_posix()
                                                       for p in REPO.joinpath("docs").glob("*.md"))])
def test_relative_links_resolve(page: str) -> None:
    path = REPO / page
    prose = FENCE.sub("", path.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", FENCE.sub("", linked.read_text()), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page}: links to nothing: {broken}"
