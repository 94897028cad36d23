"""Fusion of an encoder ensemble's feature maps into one map, keyed by the ``fusion`` param.

Every fusion first projects each encoder's map to ``out_channels`` with a 1×1
conv (at its own grid, where it is cheapest) and resizes it bilinearly
(``align_corners=False``) to the largest grid among the inputs, then combines
the K aligned maps:

* ``weighted``: one learned softmax weight per encoder, weighted sum (ELMo's
  scalar mix, Peters et al., NAACL 2018);
* ``concat``: channel concatenation → 1×1 conv to ``out_channels``
  (hypercolumns, Hariharan et al., CVPR 2015);
* ``attention``: a shared 1×1 conv scores each projected map, a softmax across
  the encoders at every pixel gives weights, weighted sum ("Attention to Scale",
  Chen et al., CVPR 2016).

Data flow: K × (N, C_k, h_k, w_k) → K × (N, out_channels, H, W) → (N, out_channels, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featinv.errors import ParamsError
from featinv.registry import Registry

__all__ = [
    "FUSIONS",
    "FusionFactory",
    "build_fusion",
    "fused_shape",
    "ProjectedFusion",
    "WeightedFusion",
    "ConcatFusion",
    "AttentionFusion",
]

Shape3 = tuple[int, int, int]
FusionFactory = Callable[..., nn.Module]

FUSIONS: Registry[FusionFactory] = Registry("fusion", param="fusion")


def build_fusion(name: str, in_shapes: Sequence[Shape3], out_channels: int = 256) -> nn.Module:
    """Build the fusion ``name`` for encoders whose maps have shapes ``in_shapes``.

    Args:
        name: a key of :data:`FUSIONS` ("weighted", "concat", "attention").
        in_shapes: (C, h, w) of each encoder's feature map, in the order the
            forward pass receives them.
        out_channels: channels of the fused map.

    Returns:
        An ``nn.Module`` whose forward takes a list of (N, C_k, h_k, w_k) tensors
        and returns (N, out_channels, H, W), (H, W) the largest input grid.

    Raises:
        UnknownNameError: ``name`` is not registered; lists the valid names.
        ParamsError: ``in_shapes`` is empty or holds a non-positive size.
    """
    factory = FUSIONS.get(name)
    return factory(in_shapes=_check_shapes(in_shapes, out_channels), out_channels=out_channels)


def fused_shape(in_shapes: Sequence[Shape3], out_channels: int = 256) -> Shape3:
    """Shape (out_channels, H, W) of the fused map for inputs of shapes ``in_shapes``.

    Raises:
        ParamsError: ``in_shapes`` is empty or holds a non-positive size.
    """
    _, height, width = _largest_grid(_check_shapes(in_shapes, out_channels))
    return (int(out_channels), height, width)


class ProjectedFusion(nn.Module):
    """Base class: project each input to ``out_channels``, resize to the largest grid, combine.

    Subclasses implement :meth:`combine` on the aligned maps.

    Args:
        in_shapes: (C, h, w) of each input.
        out_channels: channels of the projected and fused maps.
    """

    def __init__(self, in_shapes: Sequence[Shape3], out_channels: int = 256) -> None:
        super().__init__()
        self.in_shapes = _check_shapes(in_shapes, out_channels)
        self.out_channels = int(out_channels)
        _, height, width = _largest_grid(self.in_shapes)
        self.grid_hw = (height, width)
        self.projections = nn.ModuleList(
            nn.Conv2d(c, self.out_channels, kernel_size=1) for c, _, _ in self.in_shapes
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse one feature tensor per encoder.

        Args:
            feats: K tensors, the k-th of shape (N, *in_shapes[k]).

        Returns:
            (N, out_channels, H, W).

        Raises:
            ParamsError: wrong number of tensors, or a tensor of the wrong shape.
        """
        if len(feats) != len(self.in_shapes):
            raise ParamsError(
                f"fusion was built for {len(self.in_shapes)} encoders; "
                f"got {len(feats)} feature maps"
            )
        aligned = []
        for k, (feats_nchw, shape, proj) in enumerate(zip(feats, self.in_shapes, self.projections)):
            if tuple(feats_nchw.shape[1:]) != shape:
                raise ParamsError(
                    f"fusion input {k} has shape {tuple(feats_nchw.shape[1:])}; "
                    f"it was built for {shape}"
                )
            projected = proj(feats_nchw)
            if tuple(projected.shape[-2:]) != self.grid_hw:
                projected = F.interpolate(
                    projected, size=self.grid_hw, mode="bilinear", align_corners=False
                )
            aligned.append(projected)
        return self.combine(aligned)

    def combine(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        """Combine K aligned (N, out_channels, H, W) maps into one."""
        raise NotImplementedError


class WeightedFusion(ProjectedFusion):
    """Weighted sum with one learned softmax weight per encoder (equal at init)."""

    def __init__(self, in_shapes: Sequence[Shape3], out_channels: int = 256) -> None:
        super().__init__(in_shapes, out_channels)
        self.logits = nn.Parameter(torch.zeros(len(self.in_shapes)))

    def encoder_weights(self) -> torch.Tensor:
        """The K mixing weights, positive and summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def combine(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        weights_k = self.encoder_weights().view(-1, 1, 1, 1, 1)
        return (weights_k * torch.stack(aligned, dim=0)).sum(dim=0)


class ConcatFusion(ProjectedFusion):
    """Channel concatenation of the aligned maps, then a 1×1 conv to ``out_channels``."""

    def __init__(self, in_shapes: Sequence[Shape3], out_channels: int = 256) -> None:
        super().__init__(in_shapes, out_channels)
        self.mix = nn.Conv2d(len(self.in_shapes) * self.out_channels, self.out_channels, 1)

    def combine(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        return self.mix(torch.cat(aligned, dim=1))


class AttentionFusion(ProjectedFusion):
    """Per-pixel softmax over encoders of a shared 1×1-conv score, weighted sum."""

    def __init__(self, in_shapes: Sequence[Shape3], out_channels: int = 256) -> None:
        super().__init__(in_shapes, out_channels)
        # Shared across encoders: the projections already map every encoder
        # into one space, so one scorer compares them on equal terms.
        self.scorer = nn.Conv2d(self.out_channels, 1, kernel_size=1)

    def pixel_weights(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        """(N, K, H, W) weights, summing to 1 over K at every pixel."""
        scores = torch.cat([self.scorer(m) for m in aligned], dim=1)
        return torch.softmax(scores, dim=1)

    def combine(self, aligned: list[torch.Tensor]) -> torch.Tensor:
        weights = self.pixel_weights(aligned)
        return (weights.unsqueeze(2) * torch.stack(aligned, dim=1)).sum(dim=1)


def _check_shapes(in_shapes: Sequence[Shape3], out_channels: int) -> list[Shape3]:
    """Validate and normalise ``in_shapes`` to a list of int triples."""
    shapes = [tuple(int(v) for v in s) for s in in_shapes]
    if not shapes:
        raise ParamsError("fusion needs at least one input shape; got in_shapes []")
    for shape in shapes:
        if len(shape) != 3 or min(shape) < 1:
            raise ParamsError(
                f"fusion in_shapes must be positive (C, h, w) triples; got {shape} in {shapes}"
            )
    if int(out_channels) < 1:
        raise ParamsError(f"fusion out_channels must be positive; got {out_channels}")
    return shapes  # type: ignore[return-value]


def _largest_grid(in_shapes: Sequence[Shape3]) -> Shape3:
    """The shape with the most grid cells (the first such on ties)."""
    return max(in_shapes, key=lambda s: s[1] * s[2])


@FUSIONS.register("weighted")
def _weighted(in_shapes: Sequence[Shape3], out_channels: int = 256) -> nn.Module:
    return WeightedFusion(in_shapes, out_channels)


@FUSIONS.register("concat")
def _concat(in_shapes: Sequence[Shape3], out_channels: int = 256) -> nn.Module:
    return ConcatFusion(in_shapes, out_channels)


@FUSIONS.register("attention")
def _attention(in_shapes: Sequence[Shape3], out_channels: int = 256) -> nn.Module:
    return AttentionFusion(in_shapes, out_channels)
