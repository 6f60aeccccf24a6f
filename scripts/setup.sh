#!/usr/bin/env bash
# Everything bam-zoo needs on a fresh Debian machine with Python 3.11, run as root:
# the Fashion-MNIST data set from Debian, the torch build that matches torchvision, and the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq dataset-fashion-mnist
python -m pip install -q torch==2.14.1 torchvision==0.29.1
# --no-build-isolation: the fused CPU kernels (setup.py) compile against the torch installed above
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import bam_zoo.layers.bam_cpu as n; print('bam_zoo fused CPU kernels:', 'built' if n.native_kernels_available() else 'NOT built (ATen fallback)')"
