"""BAM checkpoints of other code bases, converted exactly: pytorchcv's (osmr/imgclsmob) and the official code's.

Both multiply the branches (``fusion="product"``) and give the spatial branch's convolutions a bias before
BatchNorm: ``BN(conv(x) + b)`` with running mean ``m`` is ``BN(conv(x))`` with running mean ``m - b``, so each
bias folds into its BatchNorm. pytorchcv runs BAM at the head of each stride-2 unit, bam-zoo at the end of the
stage before: the same tensor, so only names change. Also the one reader of pickles (:func:`read_checkpoint`)
and the one strict key check (:func:`check_keys`) of every checkpoint bam-zoo reads.
"""
from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn

from ..errors import CheckpointKeysError, UnsafeCheckpointError
from .placement import bam_modules

__all__ = ["SOURCES", "check_keys", "convert_state_dict", "detect_source", "from_official", "from_pytorchcv",
           "read_checkpoint", "unpickle_refusal"]

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]

# source key pattern -> bam-zoo key, applied in order (re.sub) to every key.
_PYTORCHCV: Tuple[Rule, ...] = (
    (r"^features\.init_block\.conv\.conv\.", "conv1."),
    (r"^features\.init_block\.conv\.bn\.", "bn1."),
    (r"^features\.stage(\d+)\.unit1\.bam\.", lambda m: f"layer{int(m[1]) - 1}.bam."),  # the same tensor, see above
    (r"^features\.stage(\d+)\.unit(\d+)\.res_unit\.", lambda m: f"layer{m[1]}.{int(m[2]) - 1}."),
    (r"^(layer\d+\.\d+\.)body\.conv(\d)\.conv\.", r"\1conv\2."),
    (r"^(layer\d+\.\d+\.)body\.conv(\d)\.bn\.", r"\1bn\2."),
    (r"^(layer\d+\.\d+\.)identity_conv\.conv\.", r"\1downsample.0."),
    (r"^(layer\d+\.\d+\.)identity_conv\.bn\.", r"\1downsample.1."),
    (r"^output\.", "fc."),
    (r"\.bam\.ch_att\.init_fc\.fc\.", ".bam.channel_attn.fc1."),
    (r"\.bam\.ch_att\.init_fc\.bn\.", ".bam.channel_attn.bn."),
    (r"\.bam\.ch_att\.final_fc\.", ".bam.channel_attn.fc2."),
    (r"\.bam\.sp_att\.init_conv\.conv\.", ".bam.spatial_attn.body.conv_reduce."),
    (r"\.bam\.sp_att\.init_conv\.bn\.", ".bam.spatial_attn.body.bn_reduce."),
    (r"\.bam\.sp_att\.dil_convs\.conv(\d+)\.conv\.", lambda m: f".bam.spatial_attn.body.conv{int(m[1]) - 1}."),
    (r"\.bam\.sp_att\.dil_convs\.conv(\d+)\.bn\.", lambda m: f".bam.spatial_attn.body.bn{int(m[1]) - 1}."),
    (r"\.bam\.sp_att\.final_conv\.", ".bam.spatial_attn.body.conv_final."),
)
# Jongchan/attention-module: a torchvision ResNet (timm's names) with bam1..bam3 after layer1..layer3.
_OFFICIAL: Tuple[Rule, ...] = (
    (r"^module\.", ""),  # DataParallel
    (r"^bam(\d)\.", r"layer\1.bam."),
    (r"\.channel_att\.gate_c\.gate_c_fc_0\.", ".channel_attn.fc1."),
    (r"\.channel_att\.gate_c\.gate_c_bn_1\.", ".channel_attn.bn."),
    (r"\.channel_att\.gate_c\.gate_c_fc_final\.", ".channel_attn.fc2."),
    (r"\.spatial_att\.gate_s\.gate_s_conv_reduce0\.", ".spatial_attn.body.conv_reduce."),
    (r"\.spatial_att\.gate_s\.gate_s_bn_reduce0\.", ".spatial_attn.body.bn_reduce."),
    (r"\.spatial_att\.gate_s\.gate_s_conv_di_(\d+)\.", r".spatial_attn.body.conv\1."),
    (r"\.spatial_att\.gate_s\.gate_s_bn_di_(\d+)\.", r".spatial_attn.body.bn\1."),
    (r"\.spatial_att\.gate_s\.gate_s_conv_final\.", ".spatial_attn.body.conv_final."),
)
SOURCES: Dict[str, Tuple[Rule, ...]] = {"pytorchcv": _PYTORCHCV, "official": _OFFICIAL}
# a convolution bias bam-zoo does not have, and the running mean it folds into
_FOLDED_BIAS = re.compile(r"(.*\.spatial_attn\.body\.)conv(_reduce|\d+)\.bias")


def detect_source(state_dict: Mapping[str, Any]) -> Optional[str]:
    """``"pytorchcv"`` or ``"official"`` when the keys are in that layout; ``None`` for anything else (bam-zoo's)."""
    if any(k.startswith("features.init_block.") for k in state_dict):
        return "pytorchcv"
    if any(re.match(r"(module\.)?bam\d\.(channel|spatial)_att\.", k) for k in state_dict):
        return "official"
    return None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: Optional[str] = None,
                       check_shapes: bool = True) -> Mapping[str, torch.Tensor]:
    """``state_dict`` in ``model``'s names, biases folded; returned as is when it is in no foreign layout.

    ``source`` (``"pytorchcv"`` or ``"official"``) is detected from the keys if ``None``; ``check_shapes`` is off
    for timm's loader, which adapts head and stem afterwards.

    Raises:
        CheckpointKeysError: Unknown, missing or misshaped keys (listed): another architecture or layout.
        ValueError: ``model`` sums the branches, which these weights were not trained for.
    """
    source = source or detect_source(state_dict)
    if source is None:
        return state_dict
    if any(bam.fusion != "product" for _, bam in bam_modules(model)):
        raise ValueError(f"{source} BAM weights multiply the branches, but this model sums them: build it with "
                         "bam_args=dict(fusion='product') (the tag bam_resnet50.imgclsmob_in1k does).")
    origin, out = {}, {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in SOURCES[source]:
            new = re.sub(pattern, repl, new)
        origin[new], out[new] = key, value
    for key in [k for k in out if _FOLDED_BIAS.fullmatch(k)]:
        mean = _FOLDED_BIAS.sub(r"\1bn\2.running_mean", key)
        if mean in out:
            out[mean] = out[mean] - out.pop(key)
    expected = model.state_dict()
    for key in expected:  # checkpoints from before torch 0.4.1 have no BatchNorm counters
        if key.endswith(".num_batches_tracked"):
            out.setdefault(key, torch.zeros((), dtype=torch.long))
    check_keys(out, model, f"This {source} checkpoint", "Pass the architecture it was trained as (--model) and its "
               "layout (--source pytorchcv or official).", expected if check_shapes else expected.keys(), origin)
    return out


def check_keys(state_dict: Mapping[str, Any], model: nn.Module, what: str, fix: str,
               expected: Union[Mapping[str, Any], Collection[str], None] = None,
               origin: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`CheckpointKeysError` (counts and a few keys of each kind) where ``state_dict`` does not fit.

    Why not torch's strict error: it lists every key, hundreds for a checkpoint of another depth, on one line.
    ``expected`` is a state dict (shapes compared too) or keys only; ``origin`` maps keys to the checkpoint's names.
    """
    expected = model.state_dict() if expected is None else expected
    origin = origin or {}
    unexpected = [origin.get(k, k) for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    misshaped = ([f"{origin.get(k, k)} {_shape(v)} (bam-zoo {k} {_shape(expected[k])})" for k, v in state_dict.items()
                  if k in expected and _shape(v) != _shape(expected[k])] if isinstance(expected, Mapping) else [])
    if unexpected or missing or misshaped:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise CheckpointKeysError(what, arch, unexpected, missing, misshaped, fix)


def _shape(value: Any) -> Tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _build(state_dict: Mapping[str, torch.Tensor], source: str, arch: str) -> nn.Module:
    if not arch.startswith("bam_resnet"):
        raise ValueError(f"{source} BAM checkpoints are ResNets: pass the bam-zoo model they were trained as, "
                         f"bam_resnet18, 34, 50, 101 or 152 (got {arch!r}).")
    heads = [v for k, v in state_dict.items() if re.fullmatch(r"(module\.)?(output|fc)\.weight", k)]
    num_classes = heads[0].shape[0] if heads else 1000
    model = timm.create_model(arch, bam_args=dict(fusion="product"), num_classes=num_classes)
    model.load_state_dict(convert_state_dict(state_dict, model, source), strict=True)
    return model


def from_pytorchcv(state_dict: Mapping[str, torch.Tensor], arch: str = "bam_resnet50") -> nn.Module:
    """The bam-zoo ``arch`` (``fusion="product"``) holding the weights of pytorchcv's model of that name."""
    return _build(state_dict, "pytorchcv", arch)


def from_official(checkpoint: Mapping[str, Any], arch: str = "bam_resnet50") -> nn.Module:
    """The bam-zoo ``arch`` holding a Jongchan/attention-module checkpoint (``{"state_dict": ...}`` or bare)."""
    return _build(checkpoint.get("state_dict", checkpoint), "official", arch)


def read_checkpoint(path: Union[str, Path], trust_checkpoint_code: bool = False) -> Any:
    """``torch.load`` of a file, or of the one file inside a ``.zip`` (pytorchcv's ``.pth.zip``), on the CPU.

    Why: a pickle can run any code when it is read, so only torch's ``weights_only`` loader reads it, unless the
    user trusts the file; else :class:`UnsafeCheckpointError` says which globals it needs and how to allow them.
    """
    path = Path(path).expanduser()
    if path.suffix != ".zip":
        return _load(path, path, trust_checkpoint_code)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} files; a checkpoint .zip holds exactly one. Unzip it and "
                             "pass the .pth.")
        return _load(io.BytesIO(archive.read(names[0])), path, trust_checkpoint_code)


def _load(source: Union[Path, io.BytesIO], path: Path, trust_checkpoint_code: bool) -> Any:
    if trust_checkpoint_code:
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        return _restricted_load(source)
    except pickle.UnpicklingError as e:  # raised before the restricted loader ran anything it refused
        raise _refusal(source, path, e) from None


def _restricted_load(source: Union[Path, io.BytesIO]) -> Any:
    with warnings.catch_warnings():  # torch warns before it refuses a newer pickle protocol; the refusal says it
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(source, map_location="cpu", weights_only=True)


def unpickle_refusal(path: Union[str, Path]) -> Optional[UnsafeCheckpointError]:
    """Why torch's ``weights_only`` loader refuses the checkpoint at ``path``, found without running it; ``None``
    when it would load or is no checkpoint. For loaders bam-zoo does not call (``--ckpt_path``), before a run."""
    path = Path(path).expanduser()
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the pickle, runs nothing
    except Exception:  # noqa: BLE001  not a zip checkpoint, or opcodes the scanner skips: ask the loader itself
        try:
            _restricted_load(path)
        except Exception as e:  # noqa: BLE001  refused, or not a checkpoint at all (its reader says so)
            return _refusal(path, path, e) if isinstance(e, pickle.UnpicklingError) else None
        return None
    return UnsafeCheckpointError(str(path), sorted(unsafe)) if unsafe else None


def _refusal(source: Union[Path, io.BytesIO], path: Path, error: Exception) -> UnsafeCheckpointError:
    """The one-line refusal: every global the pickle names beyond the allowlist, else the loader's own reason."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        named = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except Exception:  # noqa: BLE001  a legacy (non-zip) file, or opcodes the scanner does not know
        named = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines)
                   if not line.startswith(("Check the documentation", "Weights only"))), "no reason given")
    return UnsafeCheckpointError(str(path), named, reason)
