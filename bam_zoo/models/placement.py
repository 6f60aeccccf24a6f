"""Where BAM goes, and putting it there: one mechanism for the registered ``bam_*`` networks and any timm CNN.

The paper puts one BAM at each *bottleneck*: the end of every stage whose output is downsampled next
(:func:`bottleneck_stages`). :func:`insert_bam` gives each such stage a child ``bam`` that refines its output,
so ``forward_features``, ``features_only`` maps and the state dict (``layer1.bam.*``) carry it and every other
key keeps its name. :func:`add_bam`, the public entry, starts every BAM as the identity and records how the
model was built, so an export rebuilds it through the registered name ``bam_inserted``.
"""
from __future__ import annotations

import inspect
import itertools
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers import BAM

__all__ = ["BamPlacement", "BAM_PLACEMENT", "INSERTED_ARCH", "TESTED_FAMILIES", "add_bam", "bam_modules",
           "bottleneck_stages", "insert_bam"]

#: The registered architecture an exported model with inserted BAM is rebuilt as (its ``config.json``).
INSERTED_ARCH = "bam_inserted"


@dataclass(frozen=True)
class BamPlacement:
    """Where BAM goes in one registered family: the stage modules followed by a BAM (they equal the family's
    :func:`bottleneck_stages`), and the timm ``feature_cfg`` it needs for ``features_only``."""
    stages: Tuple[str, ...]
    feature_cfg: Dict[str, Any] = field(default_factory=dict)


BAM_PLACEMENT: Dict[str, BamPlacement] = {
    # timm ResNet / Wide ResNet / ResNeXt: stages at stride 4, 8, 16 (paper, Fig. 1).
    "resnet": BamPlacement(stages=("layer1", "layer2", "layer3")),
    # CIFAR-style ResNet (three stages at stride 1, 2, 4): after stages 1 and 2.
    "cifar_resnet": BamPlacement(stages=("layer1", "layer2"), feature_cfg=dict(out_indices=(0, 1, 2, 3))),
    # timm EfficientNet-family (MobileNetV2, EfficientNet): the stages ending at stride 4, 8, 16;
    # ``blocks`` is nested, so features_only flattens it.
    "efficientnet": BamPlacement(
        stages=("blocks.1", "blocks.2", "blocks.4"), feature_cfg=dict(flatten_sequential=True)),
}


#: The timm families add_bam is tested on (identity start, strict plain weights, gradients, exports, timm's own
#: battery), each with the small network the tests use.
TESTED_FAMILIES: Dict[str, str] = {
    "resnet-d": "resnet18d", "resnet-t": "resnet10t", "seresnet": "seresnet18", "ecaresnet": "ecaresnet26t",
    "resnetv2": "resnetv2_18", "regnet": "regnetx_002", "convnext": "convnext_atto", "efficientnet": "efficientnet_b0",
    "mobilenetv2": "mobilenetv2_050", "mobilenetv3": "mobilenetv3_small_050", "mnasnet": "mnasnet_small",
    "ghostnet": "ghostnet_050", "cspnet": "cs3darknet_focus_s", "dla": "dla34", "densenet": "densenet121",
    "vovnet": "ese_vovnet19b_dw", "rexnet": "rexnet_100", "byobnet (RepVGG)": "repvgg_a0", "nfnet": "nf_regnet_b0",
    "res2net": "res2net50_14w_8s", "resnest": "resnest14d", "tresnet": "tresnet_m", "hgnet": "hgnetv2_b0",
}


def _feature_info(model: nn.Module) -> List[Dict[str, Any]]:
    """The model's ``feature_info`` as dicts, or a one-line refusal for models BAM cannot refine."""
    name = type(model).__name__
    fmt = getattr(model, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)
    if fmt not in (None, "NCHW"):
        raise ValueError(f"add_bam: {name} produces {fmt} feature maps; BAM refines N x C x H x W maps, so it "
                         "only goes into convolutional networks (ResNet, ConvNeXt, EfficientNet, RegNet ...).")
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)  # a features_only wrapper's FeatureInfo
    if not info:
        raise ValueError(f"add_bam: {name} has no feature_info, so its stages are unknown; build it with "
                         "timm.create_model (timm models list their stages there).")
    if len({f["reduction"] for f in info}) < 2:
        raise ValueError(f"add_bam: {name} never downsamples (all its feature maps are at reduction "
                         f"{info[0]['reduction']}): a token model such as a ViT has no bottleneck for BAM.")
    return list(info)


def bottleneck_stages(model: nn.Module) -> List[str]:
    """The paper's placement: the stage ends at reductions final/8, final/4 and final/2 of ``feature_info``
    (4, 8 and 16 in an ImageNet network of stride 32; 1 and 2 in the CIFAR ResNets)."""
    info = _feature_info(model)
    last_at = {f["reduction"]: f["module"] for f in info}  # the last entry at each reduction ends that stage
    final = info[-1]["reduction"]
    return [last_at[r] for r in (final / 8, final / 4, final / 2) if r in last_at]


def bam_modules(model: nn.Module) -> List[Tuple[str, BAM]]:
    """All BAM modules of a model with their qualified names, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BAM)]


class _HidesBam:
    """For containers whose forward iterates over their own children: ``bam`` is not one of them."""

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys()) if isinstance(self, nn.ModuleDict) else iter(self.values())

    def __len__(self) -> int:
        return len(self._modules) - ("bam" in self._modules)

    def keys(self) -> List[str]:
        return [k for k in self._modules if k != "bam"]

    def items(self) -> List[Tuple[str, nn.Module]]:
        return [(k, m) for k, m in self._modules.items() if k != "bam"]

    def values(self) -> List[nn.Module]:
        return [m for k, m in self._modules.items() if k != "bam"]


def _refined_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.bam(self._stage_forward(x))


_REFINED_CLASSES: Dict[type, type] = {}


def _chains_children(stage: nn.Module) -> bool:
    """Whether the stage's forward runs its children in order (``nn.Sequential``, timm's ``RegStage``): then a
    ``bam`` child registered last runs last by itself, and a refined forward would run it twice."""
    if isinstance(stage, (nn.ModuleDict, nn.ModuleList)):
        return False
    if type(stage).forward is nn.Sequential.forward:
        return True
    try:
        source = inspect.getsource(type(stage).forward)
    except (OSError, TypeError):
        return False
    return "in self.children()" in source or (isinstance(stage, nn.Sequential) and "in self:" in source)


def _refined_class(cls: type) -> type:
    """``cls`` with a forward that runs BAM on the original forward's output; one class per ``cls``.

    Why a subclass rather than a forward hook: FX, TorchScript and ``torch.compile`` see a plain forward, and
    the stage keeps its state-dict keys. The class lives in this module under a unique name, so pickling works.
    """
    if cls not in _REFINED_CLASSES:
        hides = (_HidesBam,) if issubclass(cls, (nn.ModuleDict, nn.ModuleList)) else ()
        name = f"{cls.__name__}WithBAM"
        while name in globals():
            name += "_"
        # the original forward under its own name (TorchScript compiles a called method by its __name__)
        original = cls.forward
        stage_forward = types.FunctionType(original.__code__, original.__globals__, "_stage_forward",
                                           original.__defaults__, original.__closure__)
        stage_forward.__annotations__ = dict(original.__annotations__)
        new = type(name, (*hides, cls), {"forward": _refined_forward, "_stage_forward": stage_forward,
                                          "__module__": __name__, "__qualname__": name})
        globals()[name] = _REFINED_CLASSES[cls] = new
    return _REFINED_CLASSES[cls]


def insert_bam(model: nn.Module, stages: Sequence[str], identity_init: bool = False,
               bam_args: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Give each stage in ``stages`` a ``bam`` child that refines its output, sized from ``feature_info``; in place.

    A stage that runs its children in order runs ``bam`` last by itself; any other gets :func:`_refined_class`.
    """
    channels_of = {f["module"]: f["num_chs"] for f in _feature_info(model)}
    for name in stages:
        if name not in channels_of:
            raise ValueError(f"add_bam: {type(model).__name__} has no stage {name!r}; its feature_info lists "
                             f"{[n for n in channels_of if n]}.")
        stage = model.get_submodule(name)
        if hasattr(stage, "bam"):
            raise ValueError(f"add_bam: stage {name!r} already has a BAM (is the model a bam_* one already?).")
        tensor = next(itertools.chain(stage.parameters(), model.parameters()))
        stage.add_module("bam", BAM(channels_of[name], identity_init=identity_init, **(bam_args or {}),
                                    device=tensor.device, dtype=tensor.dtype))
        if not _chains_children(stage):
            stage.__class__ = _refined_class(type(stage))
    return model


def add_bam(model: nn.Module, stages: Union[str, Sequence[str]] = "auto", identity_init: bool = True,
            **bam_args: Any) -> nn.Module:
    """Put BAM into any timm CNN, in place; with ``identity_init`` it still computes the plain model's function.

    Args:
        model: A timm CNN (N x C x H x W stage outputs listed in ``feature_info``); pretrained or not.
        stages: ``"auto"``, the paper's bottlenecks (:func:`bottleneck_stages`), or stage names from
            ``feature_info`` (e.g. ``["layer2", "layer3"]``).
        identity_init: Each BAM starts as the identity, ``x + gamma * x * sigmoid(Mc + Ms)`` with ``gamma = 0``,
            so the logits equal the plain model's and its accuracy is kept; ``False``: the paper's block.
        **bam_args: :class:`~bam_zoo.layers.BAM` arguments (``rd_ratio``, ``dilation``, ``fusion`` ...).

    Returns:
        ``model`` with BAM added. Its ``pretrained_cfg`` names the architecture ``bam_inserted`` and its
        ``bam_insertion`` how it was built, so exports (``bam_zoo.hub.save_pretrained``) rebuild it by name.

    Raises:
        ValueError: A transformer / channels-last-output model, an unknown stage, or a stage with BAM already.
    """
    if isinstance(stages, str) and stages != "auto":
        raise ValueError(f"add_bam: stages must be 'auto' or a list of stage names, got {stages!r}.")
    names = bottleneck_stages(model) if stages == "auto" else list(stages)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream (data order, augmentation) stays as it was
        insert_bam(model, names, identity_init=identity_init, bam_args=bam_args)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    base = cfg.get("architecture")
    if base and base != INSERTED_ARCH:
        model.bam_insertion = {"base_model": base, "bam_stages": names, "identity_init": identity_init,
                               "bam_args": dict(bam_args)}
        model._model_args = {**getattr(model, "_model_args", {}), **model.bam_insertion}
        model.pretrained_cfg = model.default_cfg = {**cfg, "architecture": INSERTED_ARCH}
    return model
