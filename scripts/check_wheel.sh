#!/usr/bin/env bash
# The package as pip installs it, without the repository: build the wheel, install it into a fresh venv
# (--system-site-packages, so torch is not reinstalled), then, from another folder, load a tag from a mirror
# folder named by BAM_ZOO_CHECKPOINTS, and expect one line of error with neither the Hub nor a mirror.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Built from a copy: pip builds in the source folder (build/, *.egg-info) and the checkout may be shared.
mkdir "$work/src"
tar -C "$repo" --exclude=__pycache__ --exclude='*.so' -cf - pyproject.toml setup.py README.md bam_zoo \
    | tar -C "$work/src" -xf -
python -m pip wheel -q --no-deps --no-build-isolation "$work/src" -w "$work/dist"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --ignore-installed "$work"/dist/bam_zoo-*.whl

mkdir "$work/mirror" "$work/run"
for folder in "$repo"/checkpoints/*/; do
    mkdir "$work/mirror/$(basename "$folder")"
    cp "$folder/config.json" "$folder/model.safetensors" "$work/mirror/$(basename "$folder")/"
done
cd "$work/run"  # not the checkout: its bam_zoo/ must not be importable from here
export HF_HOME="$work/hf" HF_HUB_OFFLINE=1
unset PYTHONPATH BAM_ZOO_CHECKPOINTS

BAM_ZOO_CHECKPOINTS="$work/mirror" "$work/venv/bin/python" - "$work" <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import bam_zoo
from bam_zoo.models.pretrained import mirror_root

work = Path(sys.argv[1]).resolve()
assert Path(bam_zoo.__file__).resolve().is_relative_to(work / "venv"), f"imported {bam_zoo.__file__}, not the wheel"
assert mirror_root() == work / "mirror", mirror_root()
model = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True).eval()
shipped = load_file(work / "mirror" / "bam_resnet20.fmnist" / "model.safetensors")
assert all(torch.equal(value, shipped[key]) for key, value in model.state_dict().items()), "not the mirror's weights"
assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
listed = {p.name: p for p in bam_zoo.list_pretrained()}
assert listed["bam_resnet20.fmnist"].mirrored and listed["bam_resnet20.fmnist"].metrics["top1"] > 90
print(f"wheel: {bam_zoo.__file__} loads bam_resnet20.fmnist from BAM_ZOO_CHECKPOINTS")
EOF

# Neither Hub nor mirror: the installed package has no repository to fall back on, and says so in one line.
if "$work/venv/bin/python" -c 'import bam_zoo; bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True)' \
        2> "$work/error.txt"; then
    echo "check_wheel: loading without Hub or mirror succeeded; expected WeightsNotFoundError" >&2
    exit 1
fi
last="$(tail -n 1 "$work/error.txt")"
if [[ "$last" != "bam_zoo.errors.WeightsNotFoundError: No weights for bam_resnet20.fmnist:"*"set BAM_ZOO_CHECKPOINTS"* ]] \
        || grep -q "huggingface_hub\|During handling" "$work/error.txt"; then
    echo "check_wheel: expected one WeightsNotFoundError line and no huggingface_hub traceback, got:" >&2
    cat "$work/error.txt" >&2
    exit 1
fi
echo "wheel: without Hub or mirror -> $last"
