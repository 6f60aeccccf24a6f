"""Checks of what a model is built with and fed, so a wrong value fails with its fix, not deep inside timm.

Both errors are bam-zoo's own (timm accepts ``num_classes=-1`` and builds a model without a head; a
convolution reports a channel mismatch as ``expected input[2, 1, 28, 28] to have 3 channels``).
They live here, beside the checks that raise them, until they join :mod:`bam_zoo.errors`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from bam_zoo.errors import BamZooError

__all__ = ["InputChannelsError", "InvalidModelArgumentError", "check_input_channels", "check_model_args"]


class InvalidModelArgumentError(BamZooError, ValueError):
    """``num_classes`` or ``in_chans`` is not a usable whole number.

    Message::

        num_classes must be a whole number >= 0 (0: no classifier, features only), got '5' (str); pass num_classes=5.

    Attributes:
        name: the argument.
        value: what was passed.
    """

    def __init__(self, name: str, value: Any, minimum: int, meaning: str) -> None:
        self.name, self.value = name, value
        fix = ""
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if number.is_integer() and number >= minimum:
                fix = f"; pass {name}={int(number)}"
        except (TypeError, ValueError):
            pass
        super().__init__(f"{name} must be a whole number >= {minimum} ({meaning}), got {value!r} "
                         f"({type(value).__name__}){fix}.")


class InputChannelsError(BamZooError, ValueError):
    """An image batch whose channel count differs from the model's ``in_chans``.

    Message::

        bam_resnet20.fmnist takes 1-channel images, got a batch of shape (2, 3, 28, 28). Convert the images
        (PIL: image.convert('L'); tensor: x.mean(1, keepdim=True)), or build the model with in_chans=3
        (pretrained stems are adapted by timm).

    Attributes:
        expected: the model's input channels.
        shape: the shape of the batch that was passed.
    """

    def __init__(self, model_name: str, expected: int, shape: tuple[int, ...]) -> None:
        self.expected, self.shape = expected, tuple(shape)
        convert = "image.convert('L'); tensor: x.mean(1, keepdim=True)" if expected == 1 else (
            "image.convert('RGB'); tensor: x.expand(-1, 3, -1, -1)" if expected == 3 else "match the channel count")
        got = shape[1] if len(shape) == 4 else "?"
        super().__init__(
            f"{model_name} takes {expected}-channel images, got a batch of shape {tuple(shape)}. Convert the images "
            f"(PIL: {convert}), or build the model with in_chans={got} (pretrained stems are adapted by timm)."
        )


def check_model_args(kwargs: dict[str, Any]) -> None:
    """Raise :class:`InvalidModelArgumentError` for a ``num_classes`` / ``in_chans`` that is not a whole number."""
    for name, minimum, meaning in (("num_classes", 0, "0: no classifier, features only"),
                                   ("in_chans", 1, "image channels")):
        value = kwargs.get(name)
        if value is None:
            continue
        try:
            number = None if isinstance(value, bool) else operator.index(value)  # ints, numpy ints; not 5.0 or '5'
        except TypeError:
            number = None
        if number is None or number < minimum:
            raise InvalidModelArgumentError(name, value, minimum, meaning)


def check_input_channels(x: torch.Tensor, in_chans: int, model_name: str) -> None:
    """Raise :class:`InputChannelsError` when a 4-d batch ``x`` does not have ``in_chans`` channels."""
    if x.ndim == 4 and x.shape[1] != in_chans:
        raise InputChannelsError(model_name, in_chans, tuple(x.shape))
