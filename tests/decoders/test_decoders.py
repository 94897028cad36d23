"""Tests for featinv.decoders: every registered decoder on every study input shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featinv.decoders import DECODERS, build_decoder
from featinv.decoders.wavelet import haar_dwt, haar_idwt
from featinv.errors import ParamsError, UnknownNameError

# (C, h, w) of the study's taps, plus the ensemble's fused map.
IN_SHAPES = {
    "c64_112": (64, 112, 112),
    "c256_28": (256, 28, 28),
    "c64_56": (64, 56, 56),
    "c128_28": (128, 28, 28),
    "c384_14": (384, 14, 14),
    "fused_c256_112": (256, 112, 112),
}
# Decoders that accept any feature height (bilinear resize when 224 / h is not 2^k).
ANY_HEIGHT_DECODERS = ["frequency_aware", "wavelet", "attention"]


@pytest.mark.parametrize("in_shape", list(IN_SHAPES.values()), ids=list(IN_SHAPES))
@pytest.mark.parametrize("name", DECODERS.names())
def test_decoder_contract(name: str, in_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    decoder = build_decoder(name, in_shape)
    feats_nchw = torch.randn(2, *in_shape, requires_grad=True)

    pixels01 = decoder(feats_nchw)

    assert pixels01.shape == (2, 3, 224, 224)
    assert torch.isfinite(pixels01).all()
    assert pixels01.min().item() >= 0.0 and pixels01.max().item() <= 1.0
    # A random projection as the loss, so no symmetry can cancel the gradient.
    (pixels01 * torch.randn_like(pixels01)).sum().backward()
    assert feats_nchw.grad is not None
    assert torch.isfinite(feats_nchw.grad).all()
    assert feats_nchw.grad.abs().sum().item() > 0.0
    unused = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not unused, f"{name}: parameters without gradient: {unused}"


@pytest.mark.parametrize("name", ANY_HEIGHT_DECODERS)
def test_decoder_handles_non_power_of_two_height(name: str) -> None:
    torch.manual_seed(0)
    decoder = build_decoder(name, (32, 24, 24))
    pixels01 = decoder(torch.randn(1, 32, 24, 24))
    assert pixels01.shape == (1, 3, 224, 224)
    assert pixels01.min().item() >= 0.0 and pixels01.max().item() <= 1.0


def test_haar_idwt_inverts_dwt() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16)
    bands = haar_dwt(pixels)

    assert all(b.shape == (2, 3, 8, 8) for b in bands)
    torch.testing.assert_close(haar_idwt(*bands), pixels, atol=1e-5, rtol=0)
    # Orthonormal: the transform preserves energy, and DWT(IDWT(bands)) == bands.
    energy = sum(b.square().sum() for b in bands)
    torch.testing.assert_close(energy, pixels.square().sum(), atol=1e-3, rtol=1e-5)
    for got, want in zip(haar_dwt(haar_idwt(*bands)), bands):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_haar_dwt_rejects_odd_size() -> None:
    with pytest.raises(ParamsError, match="even"):
        haar_dwt(torch.rand(1, 3, 7, 8))


def test_frequency_aware_channel_gate_is_cbams() -> None:
    """The gate takes each channel's global max (a reduction, not adaptive_max_pool2d): CBAM's avg+max gate."""
    from featinv.decoders.frequency_aware import ChannelAttention

    torch.manual_seed(0)
    gate = ChannelAttention(32)
    x = torch.randn(2, 32, 9, 7).contiguous(memory_format=torch.channels_last)
    cbam = x * torch.sigmoid(gate.mlp(F.adaptive_avg_pool2d(x, 1)) + gate.mlp(F.adaptive_max_pool2d(x, 1)))
    torch.testing.assert_close(gate(x), cbam)


def test_unknown_decoder_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as excinfo:
        build_decoder("no_such_decoder", (64, 56, 56))
    message = str(excinfo.value)
    assert "no_such_decoder" in message
    for name in DECODERS.names():
        assert name in message


def test_transposed_conv_overfits_tiny_batch() -> None:
    # Small shapes (28 → 56) keep 100 steps at well under a second.
    torch.manual_seed(0)
    decoder = build_decoder("transposed_conv", (64, 28, 28), out_size=56)
    feats_nchw = torch.randn(2, 64, 28, 28)
    smooth = F.interpolate(torch.rand(2, 3, 8, 8), size=(56, 56), mode="bilinear",
                           align_corners=False)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)

    first_loss = F.mse_loss(decoder(feats_nchw), smooth).item()
    for _ in range(100):
        loss = F.mse_loss(decoder(feats_nchw), smooth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final_loss = F.mse_loss(decoder(feats_nchw), smooth).item()

    assert final_loss < first_loss / 5


def test_local_mlp_trains_as_it_infers_at_every_position_borders_included() -> None:
    # Training sees one edge-replicated 3×3 window per position through forward_valid; inference
    # runs forward on the whole map. Any mismatch (e.g. zero padding at the border) costs dB.
    from featinv.decoders.local_mlp import LocalMLPDecoder

    torch.manual_seed(0)
    decoder = LocalMLPDecoder((8, 6, 6), out_size=12, hidden=16)
    decoder.feat_mean.normal_()
    decoder.feat_std.uniform_(0.5, 2.0)
    torch.nn.init.normal_(decoder.mlp[-1].weight, std=0.1)
    feats = torch.randn(2, 8, 6, 6)
    whole = decoder(feats)  # (2, 3, 12, 12)
    padded = F.pad(feats, (1, 1, 1, 1), mode="replicate")
    windows = F.unfold(padded, 3).transpose(1, 2).reshape(2 * 36, 8, 3, 3)  # one per position
    blocks = decoder.forward_valid(windows).reshape(2, 6, 6, 3, 2, 2)  # (n, y, x, c, dy, dx)
    assert torch.allclose(blocks.permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 12, 12), whole, atol=1e-5)
