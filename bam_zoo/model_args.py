"""Checks of what a model is built with and fed, so a wrong value fails with its fix, not deep inside timm.

timm accepts ``num_classes=-1`` and builds a model without a head; a convolution reports a channel mismatch
as ``expected input[2, 1, 28, 28] to have 3 channels``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from bam_zoo.errors import InputChannelsError, InvalidModelArgumentError

__all__ = ["check_input_channels", "check_model_args"]


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
