"""Tests for featinv.training.fusion: every fusion on the study's four shallow taps."""

from __future__ import annotations

import pytest
import torch

from featinv.errors import ParamsError, UnknownNameError
from featinv.training.fusion import FUSIONS, WeightedFusion, build_fusion, fused_shape

# resnet34/layer1, vgg16/block1, vit_small/block1, pvt_v2_b2/stage1.
SHALLOW_SHAPES = [(64, 56, 56), (64, 112, 112), (384, 14, 14), (64, 56, 56)]


def _random_feats(batch: int = 1) -> list[torch.Tensor]:
    return [torch.randn(batch, *shape, requires_grad=True) for shape in SHALLOW_SHAPES]


def test_registry_has_the_three_fusions() -> None:
    assert FUSIONS.names() == ["weighted", "concat", "attention"]


def test_fused_shape_is_largest_grid() -> None:
    assert fused_shape(SHALLOW_SHAPES) == (256, 112, 112)
    assert fused_shape(SHALLOW_SHAPES, out_channels=32) == (32, 112, 112)


@pytest.mark.parametrize("name", FUSIONS.names())
def test_fusion_shape_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    fusion = build_fusion(name, SHALLOW_SHAPES)
    feats = _random_feats(batch=2)

    fused_nchw = fusion(feats)

    assert fused_nchw.shape == (2, *fused_shape(SHALLOW_SHAPES))
    assert torch.isfinite(fused_nchw).all()
    (fused_nchw * torch.randn_like(fused_nchw)).sum().backward()
    for k, feats_nchw in enumerate(feats):
        assert feats_nchw.grad is not None, f"{name}: no gradient reached input {k}"
        assert feats_nchw.grad.abs().sum().item() > 0.0, f"{name}: zero gradient at input {k}"


def test_weighted_fusion_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    fusion = build_fusion("weighted", SHALLOW_SHAPES)
    assert isinstance(fusion, WeightedFusion)
    with torch.no_grad():
        fusion.logits.copy_(torch.randn(len(SHALLOW_SHAPES)))
    weights = fusion.encoder_weights()
    assert weights.shape == (len(SHALLOW_SHAPES),)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_attention_fusion_pixel_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    fusion = build_fusion("attention", SHALLOW_SHAPES, out_channels=8)
    aligned = [torch.randn(1, 8, 112, 112) for _ in SHALLOW_SHAPES]
    weights = fusion.pixel_weights(aligned)
    assert weights.shape == (1, len(SHALLOW_SHAPES), 112, 112)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 112, 112))


def test_unknown_fusion_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as excinfo:
        build_fusion("no_such_fusion", SHALLOW_SHAPES)
    message = str(excinfo.value)
    assert "no_such_fusion" in message
    for name in FUSIONS.names():
        assert name in message


def test_fusion_rejects_mismatched_inputs() -> None:
    fusion = build_fusion("weighted", SHALLOW_SHAPES, out_channels=8)
    with pytest.raises(ParamsError, match="4 encoders"):
        fusion(_random_feats()[:3])
    wrong = _random_feats()
    wrong[2] = torch.randn(1, 384, 28, 28)
    with pytest.raises(ParamsError, match="input 2"):
        fusion(wrong)
    with pytest.raises(ParamsError):
        build_fusion("concat", [])
