"""Helpers shared by several test files (pytest puts this folder on sys.path)."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn


def load_script(path: Path, name: str) -> ModuleType:
    """Import a maintainer script that lives outside the package (scripts/, configs/generate.py) as module ``name``,
    registered in ``sys.modules`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def randomise_bn(module: nn.Module) -> None:
    """Non-trivial running stats and affine params, so eval-mode checks exercise every BatchNorm term."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
