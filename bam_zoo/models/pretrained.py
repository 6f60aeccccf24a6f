"""Shipped pretrained weights: one timm tag per weight, its metadata beside it.

Each entry is a timm pretrained cfg (``arch.tag``) carrying where the weights live (``hf_hub_id`` on the
Hub, mirrored in the repository's ``checkpoints/<arch>.<tag>/``), what they were trained on and what they
measured. ``list_pretrained()``, MODEL_CARD.md and the Hub model cards are generated from this table.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from timm.models import resolve_pretrained_cfg

__all__ = ["FASHION_MNIST_TAGS", "WEIGHT_METADATA", "HF_HUB_ORG", "prepare_pretrained", "pretrained_overlay"]

HF_HUB_ORG = "bam-zoo"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _fmnist_cfg(arch: str, tag: str) -> Dict[str, Any]:
    """A Fashion-MNIST weight entry (timm cfg fields only): 1 x 28 x 28 inputs, 10 classes, its Hub repo."""
    return {
        "hf_hub_id": f"{HF_HUB_ORG}/{arch}.{tag}",
        "num_classes": 10, "input_size": (1, 28, 28), "pool_size": (7, 7), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "mit",
        "label_names": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    }


# arch.tag -> timm cfg. Only weights that exist in checkpoints/ are listed. Each BAM weight ships with its
# plain twin, trained with the identical recipe and seed.
FASHION_MNIST_TAGS: Dict[str, Dict[str, Any]] = {
    "bam_resnet20.fmnist": _fmnist_cfg("bam_resnet20", "fmnist"),
    "resnet20.fmnist": _fmnist_cfg("resnet20", "fmnist"),
}

# arch.tag -> what the weights measured and how they were made (timm's cfg has no fields for these).
# Keys: dataset, top1, top5 (percent, official test split), num_params, macs (per image at input_size),
# recipe (config path), epochs, train_time_s (wall clock of fit on a shared 2-core CPU), command, sha256
# (of model.safetensors, checked on every load). Entries are printed by scripts/ship_weights.py.
WEIGHT_METADATA: Dict[str, Dict[str, Any]] = {
    "bam_resnet20.fmnist": {
        "dataset": "fashion_mnist", "top1": 92.24, "top5": 99.85, "num_params": 269844, "macs": 30875896,
        "epochs": 8, "train_time_s": 3159, "recipe": "configs/fashion_mnist/bam_resnet20.yaml",
        "command": "OMP_NUM_THREADS=1 python cli.py fit --config configs/fashion_mnist/bam_resnet20.yaml "
                   "--trainer.max_epochs 8",
        "sha256": "d9031fea5858e60cb1c9c87ff6dfff908d047693a5291cbd08c1e38d1ed0a166",
    },
    "resnet20.fmnist": {
        "dataset": "fashion_mnist", "top1": 92.34, "top5": 99.83, "num_params": 269434, "macs": 30821248,
        "epochs": 8, "train_time_s": 2999, "recipe": "configs/fashion_mnist/resnet20.yaml",
        "command": "OMP_NUM_THREADS=1 python cli.py fit --config configs/fashion_mnist/resnet20.yaml "
                   "--trainer.max_epochs 8",
        "sha256": "308b55ce7fa9cb5ade8de206b337cea66cf255117bb80f3bf5e50e35b1802b7e",
    },
}


def prepare_pretrained(variant: str, kwargs: Dict[str, Any]) -> None:
    """Builder hook for ``pretrained=True``: fetch the weights, and load them strictly with a clear error.

    ``check_state_dict`` lists missing, unexpected and misshaped keys (timm's deliberate head / ``in_chans``
    adaptation aside). It is set here, not through ``create_model`` kwargs, which would end up in
    ``model._model_args`` and break ``save_for_hf``.
    """
    from ..hub import check_state_dict

    kwargs["pretrained_cfg_overlay"] = pretrained_overlay(
        variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    kwargs.setdefault("pretrained_filter_fn", check_state_dict)


def pretrained_overlay(
        variant: str,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Resolve where the weights of ``variant`` come from, as a timm ``pretrained_cfg_overlay``.

    The weights file is fetched by :func:`bam_zoo.hub.resolve_pretrained_file` (the Hub, else the
    repository's offline mirror; safetensors only), then handed to timm as a local ``file`` so timm's own
    loader still adapts the classifier and ``in_chans``.
    """
    from ..hub import resolve_pretrained_file  # the Hub boundary; imported only when weights are asked for

    if (pretrained_cfg_overlay or {}).get("state_dict") is not None:  # in-memory weights: nothing to fetch
        return dict(pretrained_cfg_overlay)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    path = resolve_pretrained_file(cfg.to_dict(), variant=variant)
    return {**(pretrained_cfg_overlay or {}), "file": str(path), "source": ""}
