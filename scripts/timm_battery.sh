#!/usr/bin/env bash
# timm's own model battery (tests/test_models.py from timm's source release on PyPI, unchanged) on bam-zoo's
# models: every registered bam_* architecture and CIFAR ResNet, every shipped tag, and one small network per
# family with BAM inserted by add_bam (tests/timm_battery/bam_zoo_battery.py). Extra pytest arguments pass on,
# e.g. `bash scripts/timm_battery.sh -k forward_fx`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python -c "import timm; print(timm.__version__)")
tests=${BAM_ZOO_TIMM_TESTS:-${XDG_CACHE_HOME:-$HOME/.cache}/bam-zoo/timm-$version-tests}
if [ ! -f "$tests/test_models.py" ]; then
  download=$(mktemp -d)
  python -m pip download -q --no-deps --no-binary :all: "timm==$version" -d "$download"
  mkdir -p "$tests"
  tar xzf "$download/timm-$version.tar.gz" -C "$tests" --strip-components=2 "timm-$version/tests/test_models.py"
  rm -rf "$download"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_XET=1  # shipped tags load from the offline mirror
PYTHONPATH="tests/timm_battery${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -p bam_zoo_battery -p no:cacheprovider \
  --rootdir "$tests" -c /dev/null -q "$tests/test_models.py" "$@"
