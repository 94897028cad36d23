import pytest

from featinv.errors import UnknownNameError
from featinv.registry import Registry


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a
    assert "a" in reg and len(reg) == 1 and reg.names() == ["a"]


def test_duplicate_raises():
    reg = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)


def test_unknown_lists_valid_names():
    reg = Registry("widget", param="widget_param")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    with pytest.raises(UnknownNameError) as info:
        reg.get("gamma")
    message = str(info.value)
    assert "gamma" in message and "alpha, beta" in message and "widget_param" in message


def test_wildcard_names():
    reg = Registry("tap")
    for name in ("vgg16/block1", "vgg16/block3", "resnet34/layer1"):
        reg.add(name, name)
    assert reg.names("vgg16/*") == ["vgg16/block1", "vgg16/block3"]
