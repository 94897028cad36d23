"""Every built-in tap's declared contract against a real forward pass (seeded random weights)."""

import pytest
import torch

from featinv.errors import ParamsError, UnknownNameError, WeightsUnavailableError
from featinv.taps import TAPS, build_encoder, list_taps, resolve_tap

EXPECTED = {
    "vgg16/block1": (64, 112, 112),
    "vgg16/block3": (256, 28, 28),
    "resnet34/layer1": (64, 56, 56),
    "resnet34/layer2": (128, 28, 28),
    "vit_small/block1": (384, 14, 14),
    "vit_small/block3": (384, 14, 14),
    "pvt_v2_b2/stage1": (64, 56, 56),
    "pvt_v2_b2/stage2": (128, 28, 28),
}


def test_the_study_taps_are_registered_with_the_published_shapes():
    assert {s.name: s.shape for s in list_taps()} == EXPECTED


@pytest.mark.parametrize("tap", TAPS.names())
def test_forward_matches_declared_shape(tap):
    encoder = build_encoder(tap, "random", weights_seed=0)
    with torch.inference_mode():
        out = encoder(torch.rand(2, 3, 224, 224))
    assert tuple(out.shape) == (2, *resolve_tap(tap).shape)
    assert torch.isfinite(out).all()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training  # stays frozen in eval mode


def test_random_weights_are_seeded():
    x = torch.rand(1, 3, 224, 224)
    a = build_encoder("resnet34/layer1", "random", 0)(x)
    b = build_encoder("resnet34/layer1", "random", 0)(x)
    c = build_encoder("resnet34/layer1", "random", 1)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_networks_are_truncated_at_the_tap():
    vgg = build_encoder("vgg16/block3").network
    assert len(vgg.features) == 17 and not hasattr(vgg, "classifier")
    resnet = build_encoder("resnet34/layer1").network
    assert not hasattr(resnet, "layer2") and not hasattr(resnet, "fc")
    assert len(build_encoder("vit_small/block1").network.blocks) == 1
    assert len(build_encoder("pvt_v2_b2/stage1").network.stages) == 1


def test_timm_tap_shape_is_discovered_and_forward_stops_at_the_module():
    spec = resolve_tap("timm:resnet18/layer1")
    assert spec.shape == (64, 56, 56)
    encoder = build_encoder(spec)
    ran_past = []
    encoder.network.model.layer2.register_forward_hook(lambda *a: ran_past.append(True))
    out = encoder(torch.rand(1, 3, 224, 224))
    assert tuple(out.shape) == (1, 64, 56, 56) and ran_past == []


def test_bad_tap_names_are_clear():
    with pytest.raises(UnknownNameError, match="vgg16/block1"):
        resolve_tap("vgg16/block9")
    with pytest.raises(ParamsError, match="no module"):
        resolve_tap("timm:resnet18/layer9")
    with pytest.raises(ParamsError, match="unknown timm model"):
        resolve_tap("timm:not_a_model/x")


def test_imagenet_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-featinv-test")
    with pytest.raises(WeightsUnavailableError, match="random"):
        build_encoder("vgg16/block1", "imagenet")


def test_weights_file_is_loaded_and_identified(tmp_path):
    import torchvision

    torch.manual_seed(123)
    full = torchvision.models.resnet34(weights=None)
    path = tmp_path / "resnet34.pth"
    torch.save(full.state_dict(), path)
    encoder = build_encoder("resnet34/layer1", str(path))
    assert torch.equal(encoder.network.conv1.weight, full.conv1.weight)
    assert encoder.weights.startswith("file:resnet34.pth:sha256=")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_encoder("resnet34/layer1", str(tmp_path / "missing.pth"))
