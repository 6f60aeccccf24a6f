"""pytest plugin that points timm's own ``tests/test_models.py`` (unchanged) at bam-zoo's models.

Loaded by ``scripts/timm_battery.sh`` with ``-p bam_zoo_battery``. It imports bam_zoo (which registers the
``bam_*`` architectures, the CIFAR ResNets and the shipped tags), registers one small network per supported
family with BAM inserted by ``add_bam`` (``<timm name>_bam``, a name timm's own filters treat like its base, so
``densenet121_bam`` skips TorchScript as ``densenet121`` does), and deselects every test of another model.
"""
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import timm
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

import bam_zoo

from bam_zoo.models.placement import TESTED_FAMILIES

INSERTED_BASES = list(TESTED_FAMILIES.values())

_SOURCE_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source")


def _entrypoint(base: str):
    def create(pretrained: bool = False, **kwargs):
        return bam_zoo.create_model(base, pretrained=pretrained, add_bam=True, **kwargs)
    create.__name__ = create.__qualname__ = f"{base}_bam"
    create.__module__ = __name__
    return create


default_cfgs = generate_default_cfgs({  # the base's cfg without its weights: nothing here is pretrained
    f"{base}_bam": {k: v for k, v in get_pretrained_cfg(base).to_dict().items() if k not in _SOURCE_KEYS}
    for base in INSERTED_BASES
})
for _base in INSERTED_BASES:
    setattr(sys.modules[__name__], f"{_base}_bam", register_model(_entrypoint(_base)))

OURS = set(bam_zoo.list_models(include_baselines=True)) | {f"{b}_bam" for b in INSERTED_BASES} | {"bam_inserted"}
OURS |= {name for name in timm.list_pretrained() if name.split(".")[0] in OURS}


def _unreachable_weights(name: str):
    """Why a tag's weights cannot load here, or None: a ``url`` weight (the converted pytorchcv ResNet-50) neither in
    torch.hub's cache nor reachable. Those tests are skipped with that reason, not failed and not hidden."""
    url = get_pretrained_cfg(name).url if "." in name else None
    if not url or (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file():
        return None
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
    except OSError:
        return f"{name}: its weights download from {urlparse(url).hostname}, which this machine cannot reach"
    return None


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if getattr(item, "callspec", None) is not None
            and item.callspec.params.get("model_name") in OURS]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
    for item in keep:
        reason = "pretrained" in item.name and _unreachable_weights(item.callspec.params["model_name"])
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
