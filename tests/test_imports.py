"""Imports run one way, layers <- models <- (hub, training) <- cli; no private name crosses modules; training owns .ckpt."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bam_zoo"
# module (or package) -> layer; a module may import from its own layer and the ones below it
LAYERS = {
    "bam_zoo.errors": 0, "bam_zoo.runtime": 0, "bam_zoo._native": 0,
    "bam_zoo.layers": 1,
    "bam_zoo.models": 2,
    "bam_zoo.analysis": 3, "bam_zoo.fuse": 3, "bam_zoo.model_args": 3,
    "bam_zoo": 4,  # the package's own __init__: the public API over the layers above
    "bam_zoo.hub": 5, "bam_zoo.training": 5,
    "bam_zoo.evaluate": 6, "bam_zoo.explain": 6,
    "bam_zoo.cli": 7,
}


def layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def bam_zoo_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every ``bam_zoo`` import of one file, in functions too."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return [(target, names) for target, names in found if target.split(".")[0] == "bam_zoo"]


def test_imports_go_down_the_layers_only() -> None:
    upward, private = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for target, names in bam_zoo_imports(path):
            for name in names or [""]:
                full = f"{target}.{name}" if name and f"{target}.{name}" in LAYERS else target
                if layer(full) > layer(module):
                    upward.append(f"{module} imports {full}")
                if name.startswith("_") and not name.startswith("__") and name != "_native":
                    private.append(f"{module} imports {target}.{name}")
    assert not upward, upward
    assert not private, private


def test_hub_leaves_the_checkpoint_format_to_training() -> None:
    """The training package owns what a ``cli.py fit`` checkpoint holds; hub reads .ckpt files through it."""
    source = (PACKAGE / "hub.py").read_text()
    named = [key for key in ("hyper_parameters", "model_ema", "val/acc", "ModelCheckpoint", "callbacks")
             if key in source]
    assert not named, f"hub.py decodes Lightning's checkpoint ({', '.join(named)}): use bam_zoo.training.checkpoint"


PACKAGE_MAX_LINES = 4800  # issue 23: the library holds what users import, and no more


def test_package_stays_small() -> None:
    lines = {p.relative_to(PACKAGE).as_posix(): p.read_text().count("\n") for p in PACKAGE.rglob("*.py")}
    total = sum(lines.values())
    largest = ", ".join(f"{name} {n}" for name, n in sorted(lines.items(), key=lambda kv: -kv[1])[:3])
    assert total <= PACKAGE_MAX_LINES, f"bam_zoo/ has {total} lines of Python (at most {PACKAGE_MAX_LINES}; " \
                                       f"largest: {largest}): simplify before adding"
