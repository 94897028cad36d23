"""The decoder registry: maps a name to a factory ``(in_shape) -> nn.Module``.

Every decoder takes a feature map ``feats_nchw`` of shape (N, C, h, w) — the
``in_shape`` (C, h, w) it was built for — and returns ``pixels01`` of shape
(N, 3, out_size, out_size) with values in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from featinv.registry import Registry

__all__ = ["DECODERS", "DecoderFactory", "build_decoder", "count_parameters"]

DecoderFactory = Callable[..., nn.Module]

DECODERS: Registry[DecoderFactory] = Registry("decoder", param="decoder")


def build_decoder(name: str, in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    """Build the decoder ``name`` for features of shape ``in_shape`` = (C, h, w).

    Args:
        name: a key of :data:`DECODERS` ("transposed_conv", ...).
        in_shape: channels, height, width of one feature map.
        out_size: side of the square RGB output.

    Returns:
        An ``nn.Module`` mapping (N, C, h, w) → (N, 3, out_size, out_size) in [0, 1].

    Raises:
        UnknownNameError: ``name`` is not registered; lists the valid names.
    """
    factory = DECODERS.get(name)
    c, h, w = (int(v) for v in in_shape)
    return factory(in_shape=(c, h, w), out_size=out_size)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
