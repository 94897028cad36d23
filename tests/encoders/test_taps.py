"""Every built-in tap's declared contract against a real forward pass (seeded random weights),
input normalisations, per-tap weights and loading state dicts (the shared ImageNet files when present)."""

from pathlib import Path

import pytest
import torch

from featinv.errors import ParamsError, UnknownNameError, WeightsUnavailableError
from featinv.encoders.taps import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALISATION_SETTINGS,
    TAPS,
    Normalisation,
    build_encoder,
    list_taps,
    resolve_normalisation,
    resolve_tap,
    weights_for_tap,
    weights_id,
)

from conftest import SHARED_WEIGHTS

VGG_FILE = SHARED_WEIGHTS / "vgg16_imagenet_oxford_features.pth"
LITE0_FILE = SHARED_WEIGHTS / "tf_efficientnet_lite0_imagenet.pth"
LITE0_TAP = "timm:tf_efficientnet_lite0/blocks.3"
TINY_TIMM = "test_efficientnet"  # timm's test model: builds and runs in milliseconds


def _needs(path: Path):
    return pytest.mark.skipif(not path.is_file(), reason=f"shared ImageNet weights not found at {path}")


EXPECTED = {
    "vgg16/block1": (64, 112, 112),
    "vgg16/block2": (128, 56, 56),
    "vgg16/block3": (256, 28, 28),
    "vgg16/block4": (512, 14, 14),
    "vgg16/block5": (512, 7, 7),
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


def test_vgg_blocks_end_after_their_max_pool():
    # The published tables cut each block after its pool: block1 = features[:5] … block5 = features[:31].
    for k, end in enumerate((5, 10, 17, 24, 31), start=1):
        spec = resolve_tap(f"vgg16/block{k}")
        assert spec.cut == f"features[:{end}]" and spec.depth == k
        assert isinstance(build_encoder(spec).network.features[-1], torch.nn.MaxPool2d)
    assert [s.name for s in list_taps() if s.family == "vgg16"] == [f"vgg16/block{k}" for k in range(1, 6)]


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


# ----------------------------------------------------------------------------- normalisation


def test_each_family_declares_the_normalisation_its_weights_were_trained_with():
    assert NORMALISATION_SETTINGS == ("auto", "imagenet", "inception")
    for tap in ("vgg16/block1", "resnet34/layer1", "pvt_v2_b2/stage1", "timm:resnet18/layer1"):
        norm = resolve_normalisation(tap, "auto")
        assert (norm.name, norm.mean, norm.std) == ("imagenet", IMAGENET_MEAN, IMAGENET_STD), tap
    for tap in ("vit_small/block1", LITE0_TAP):  # augreg ViT and EfficientNet-Lite: mean = std = 0.5
        norm = resolve_normalisation(tap, "auto")
        assert (norm.name, norm.mean, norm.std) == ("inception", (0.5,) * 3, (0.5,) * 3), tap
    assert resolve_normalisation("vit_small/block1", "imagenet").mean == IMAGENET_MEAN
    assert resolve_normalisation("vgg16/block1", "inception").std == (0.5,) * 3


def test_timm_normalisation_other_than_the_two_named_ones_is_custom():
    norm = resolve_normalisation("timm:vit_base_patch16_clip_224/blocks.0", "auto")  # OpenAI CLIP statistics
    assert norm.name == "custom" and norm.mean != IMAGENET_MEAN and len(norm.std) == 3


def test_encoder_applies_and_exposes_its_normalisation():
    x = torch.rand(1, 3, 224, 224)
    enc = build_encoder("vgg16/block1")  # default "auto"
    assert enc.normalisation.name == "imagenet"
    forced = build_encoder("vgg16/block1", normalisation="inception")
    assert forced.normalisation.name == "inception"
    with torch.inference_mode():
        assert torch.allclose(forced(x), forced.network((x - 0.5) / 0.5))
        assert not torch.allclose(forced(x), enc(x))
    custom = Normalisation("custom", (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert build_encoder("vgg16/block1", normalisation=custom).normalisation is custom


def test_unknown_normalisation_is_a_one_line_params_error():
    with pytest.raises(ParamsError, match=r"`extract.normalisation`.*auto, imagenet, inception") as info:
        resolve_normalisation("vgg16/block1", "caffe")
    assert "\n" not in str(info.value)
    with pytest.raises(ParamsError, match="extract.normalisation"):
        build_encoder("vgg16/block1", normalisation="caffe")


# ----------------------------------------------------------------------------- weights per tap


def test_weights_for_tap_looks_up_tap_then_timm_model_then_family_then_default():
    setting = {
        "vgg16/block3": "b3.pth",
        "vgg16": "vgg.pth",
        f"timm:{TINY_TIMM}": "tiny.pth",
        "timm": "any_timm.pth",
        "default": "random",
    }
    assert weights_for_tap(setting, "vgg16/block3") == "b3.pth"
    assert weights_for_tap(setting, "vgg16/block1") == "vgg.pth"
    assert weights_for_tap(setting, f"timm:{TINY_TIMM}/blocks.1") == "tiny.pth"
    assert weights_for_tap(setting, "timm:resnet18/layer1") == "any_timm.pth"
    assert weights_for_tap(setting, "resnet34/layer1") == "random"
    assert weights_for_tap("imagenet", "vgg16/block1") == "imagenet"


@pytest.mark.parametrize(
    ("setting", "pattern"),
    [
        ({"vgg16": "random"}, r"`extract.weights`.*`default`.*keys are: vgg16"),
        ({"vgg16": 3, "default": "random"}, r"`extract.weights.vgg16` is 3 .*keys are: vgg16, default"),
        ({"vgg_16": "random", "default": "random"}, r"`extract.weights`: key 'vgg_16' names no tap"),
        (7, r"`extract.weights` is 7"),
    ],
)
def test_bad_weights_mappings_are_one_line_params_errors(setting, pattern):
    with pytest.raises(ParamsError, match=pattern) as info:
        weights_for_tap(setting, "vgg16/block1")
    assert "\n" not in str(info.value)


def test_weights_id_and_build_encoder_take_the_raw_mapping(tmp_path):
    import torchvision

    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    setting = {"resnet34": str(path), "default": "random"}
    assert weights_id(resolve_tap("resnet34/layer1"), setting, 0).startswith("file:resnet34.pth:sha256=")
    assert weights_id(resolve_tap("vgg16/block1"), setting, 3) == "random:seed=3"
    assert build_encoder("resnet34/layer1", setting).weights.startswith("file:resnet34.pth")
    assert build_encoder("vgg16/block1", setting, weights_seed=3).weights == "random:seed=3"


# ------------------------------------------------------------------------ loading state dicts


def _tiny_timm_file(tmp_path, prefix=""):
    import timm

    torch.manual_seed(7)
    model = timm.create_model(TINY_TIMM)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / f"tiny{prefix.strip('.')}.pth"
    torch.save(state, path)
    return model, path


@pytest.mark.parametrize("prefix", ["", "model."])
def test_timm_tap_loads_plain_or_wrapper_prefixed_timm_keys(tmp_path, prefix):
    model, path = _tiny_timm_file(tmp_path, prefix)
    encoder = build_encoder(f"timm:{TINY_TIMM}/blocks.1", str(path), weights_seed=0)
    loaded = encoder.network.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    x = torch.rand(1, 3, 224, 224)
    assert not torch.equal(encoder(x), build_encoder(f"timm:{TINY_TIMM}/blocks.1", "random", 0)(x))


def test_timm_tap_needs_only_the_weights_before_the_tap(tmp_path):
    model, _ = _tiny_timm_file(tmp_path)
    head_free = {k: v for k, v in model.state_dict().items() if not k.startswith(("conv_head", "bn2", "classifier"))}
    path = tmp_path / "features_only.pth"
    torch.save(head_free, path)
    encoder = build_encoder(f"timm:{TINY_TIMM}/blocks.1", str(path))
    assert torch.equal(encoder.network.model.conv_stem.weight, model.conv_stem.weight)


def test_weights_missing_on_the_tap_path_fail_with_one_clear_line(tmp_path):
    model, _ = _tiny_timm_file(tmp_path)
    path = tmp_path / "no_stem.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("conv_stem")}, path)
    with pytest.raises(WeightsUnavailableError, match=r"do not fit tap .*missing conv_stem.weight") as info:
        build_encoder(f"timm:{TINY_TIMM}/blocks.1", str(path))
    assert "\n" not in str(info.value)
    wrong = tmp_path / "wrong_shape.pth"
    torch.save(model.state_dict() | {"conv_stem.weight": torch.zeros(1, 3, 3, 3)}, wrong)
    with pytest.raises(WeightsUnavailableError, match=r"conv_stem.weight has shape \(1, 3, 3, 3\) in the file"):
        build_encoder(f"timm:{TINY_TIMM}/blocks.1", str(wrong))


def test_imagenet_weights_offline_is_a_clear_error_for_timm_models(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import; without it each file retries for ~25 s.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match=r"cannot load ImageNet weights.*`extract.weights: random`"):
        build_encoder(f"timm:{TINY_TIMM}/blocks.1", "imagenet")


@_needs(LITE0_FILE)
def test_shared_efficientnet_lite0_file_loads_into_a_timm_tap():
    encoder = build_encoder(LITE0_TAP, str(LITE0_FILE))
    state = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    inner = encoder.network.model.state_dict()
    assert set(state) == set(inner)  # a complete timm state dict, plain key names
    for key, value in state.items():
        assert torch.equal(inner[key], value.to(inner[key].dtype)), key
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        out, rand = encoder(x), build_encoder(LITE0_TAP, "random")(x)
    assert tuple(out.shape) == (2, *resolve_tap(LITE0_TAP).shape) and not torch.allclose(out, rand)
    assert encoder.weights.startswith("file:tf_efficientnet_lite0_imagenet.pth:sha256=df30078b0d48cc55")


@_needs(VGG_FILE)
def test_shared_vgg16_file_loads_into_the_vgg_taps():
    state = torch.load(VGG_FILE, map_location="cpu", weights_only=True)
    encoder = build_encoder("vgg16/block3", str(VGG_FILE))
    own = encoder.network.state_dict()
    assert set(own) == {f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14) for p in ("weight", "bias")}
    for key, value in own.items():
        assert torch.equal(value, state[key].to(value.dtype)), key
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert not torch.allclose(encoder(x), build_encoder("vgg16/block3", "random")(x))
    assert encoder.weights.startswith("file:vgg16_imagenet_oxford_features.pth:sha256=cb0e06cf44e9d922")
