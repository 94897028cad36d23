"""featinv.precision: bf16 autocast on CUDA only, float32 metrics; the loader's CUDA path and read threads."""

import numpy as np
import pytest
import torch
from torch import nn

from featinv import precision
from featinv.store import loader
from featinv.config import LossConfig
from featinv.store.feature_store import FeatureStore, store_path
from featinv.data.image_store import ImageStore
from featinv.store.loader import FeatureBatches, FeatureCrop
from featinv.store.prefetch import prefetched
from featinv.training.losses import ReconstructionLoss


@pytest.fixture
def autocast_calls(monkeypatch):
    """Every torch.autocast that featinv.precision opens: (device_type, dtype)."""
    calls = []
    real = torch.autocast

    def recording(device_type, dtype=None, **kwargs):
        calls.append((device_type, dtype))
        return real("cpu", dtype=dtype, **kwargs)  # emulated where CUDA is absent

    monkeypatch.setattr(precision.torch, "autocast", recording)
    return calls


def test_autocast_is_taken_on_cuda_only(autocast_calls):
    conv = nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    for device in ("cpu", torch.device("cpu"), "mps", "meta"):
        assert not precision.amp_enabled(device)
        with precision.autocast(device):
            assert not torch.is_autocast_enabled("cpu")
            assert conv(x).dtype == torch.float32
    assert autocast_calls == []

    assert precision.amp_enabled("cuda") and precision.amp_enabled("cuda:1")
    with precision.autocast("cuda"):
        pass
    with precision.autocast("cuda", enabled=False):
        pass
    with precision.autocast("cuda", dtype=torch.float16):
        pass
    with precision.autocast("cpu", dtype=torch.float16):
        pass
    assert autocast_calls == [("cuda", torch.bfloat16), ("cuda", torch.float16)]


def test_metrics_are_computed_in_float32_on_the_autocast_path(autocast_calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sigmoid())
    target01 = torch.rand(2, 3, 16, 16)
    with precision.autocast("cuda"):  # the CUDA path, emulated on the CPU
        raw = model[0](target01)
    assert autocast_calls and raw.dtype == torch.bfloat16  # what autocast hands back
    pred01 = precision.float32(torch.sigmoid(raw))
    assert pred01.dtype == torch.float32
    loss, _ = ReconstructionLoss(LossConfig(mse=1.0))(pred01, target01)
    assert loss.dtype == torch.float32
    mse = ((pred01 - target01) ** 2).flatten(1).mean(1)
    assert mse.dtype == torch.float32


def test_helpers_change_nothing_off_cuda():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 8, 8)
    assert precision.channels_last(conv, "cpu") is conv
    assert precision.channels_last(x, "cpu") is x
    before = torch.backends.cudnn.benchmark
    precision.setup("cpu")
    assert torch.backends.cudnn.benchmark == before


def test_adam_is_fused_on_cuda_and_cpu():
    """Adam's fused kernel where it was measured to pay (a GPU's launch-bound step; the CPU's
    per-parameter loop), and it trains a decoder's parameter groups on the CPU as the default does."""
    assert precision.adam_options("cpu") == {"fused": True} == precision.adam_options(torch.device("cpu"))
    assert precision.adam_options("cuda") == {"fused": True} == precision.adam_options("cuda:1")
    assert precision.adam_options("meta") == {}
    steps = []
    for options in ({}, precision.adam_options("cpu")):
        torch.manual_seed(0)
        w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(4))
        opt = torch.optim.Adam([{"params": [w], "lr": 0.1, "weight_decay": 0.01}, {"params": [b], "lr": 0.001}],
                               **options)
        assert bool(opt.defaults.get("fused")) == bool(options)
        for _ in range(3):
            loss = (torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) @ w.T + b).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps.append(torch.cat([w.detach().flatten(), b.detach()]))
    torch.testing.assert_close(steps[1], steps[0])


def test_the_loss_uses_an_lpips_network_it_is_given():
    """ReconstructionLoss(cfg, lpips_net=…): that network's score, weighted, beside the MSE."""

    class Constant(nn.Module):
        def forward(self, a, b):
            return torch.full((a.shape[0], 1, 1, 1), 0.25)

    pred01, target01 = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    loss, parts = ReconstructionLoss(LossConfig(mse=0.5, lpips=0.5), lpips_net=Constant())(pred01, target01)
    assert parts == {"mse": 0.25, "lpips": 0.25} and float(loss) == pytest.approx(0.25)
    assert ReconstructionLoss(LossConfig(mse=1.0), lpips_net=Constant()).lpips is None  # weight 0: not used


def _batches(store, pixels, **kwargs):
    return FeatureBatches([store.split("train")], pixels, 4, shuffle=True, seed=3, drop_last=True, **kwargs)


def _same(a, b):
    (fa, pa), (fb, pb) = a, b
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)
    assert pa.dtype == pb.dtype == torch.float32 and torch.equal(pa, pb)


@pytest.mark.parametrize("ram_cache_gb", [0.0, 4.0])
def test_cpu_batches_are_unchanged_by_read_threads(tiny_images, tiny_features, ram_cache_gb):
    store = FeatureStore(store_path(tiny_features, "vgg16/block1"))
    pixels = ImageStore(tiny_images).pixels("train")
    default = list(_batches(store, pixels, ram_cache_gb=ram_cache_gb))
    threaded = list(_batches(store, pixels, ram_cache_gb=ram_cache_gb, device="cpu", read_threads=3))
    assert len(default) == len(threaded) > 1
    for a, b in zip(default, threaded):
        _same(a, b)


class _FakeCopy:
    """Stands in for precision.DeviceCopy where there is no CUDA: records what would travel."""

    def __init__(self):
        self.sent = []

    def send(self, tensors):
        self.sent.append([t.dtype for t in tensors])
        return list(tensors), None

    def receive(self, moved, done):
        return moved


@pytest.mark.parametrize("crop", [None, FeatureCrop(8, 2, 1)], ids=["whole maps", "windows (channels-last RAM copy)"])
def test_cuda_path_ships_float16_and_uint8_and_converts_on_arrival(tiny_images, tiny_features, monkeypatch, crop):
    store = FeatureStore(store_path(tiny_features, "vgg16/block1"))
    pixels = ImageStore(tiny_images).pixels("train")
    expected = list(_batches(store, pixels, crop=crop))
    monkeypatch.setattr(loader.precision, "pinned", lambda array: torch.from_numpy(np.ascontiguousarray(array)))
    cuda = _batches(store, pixels, read_threads=2, crop=crop)
    cuda.device, cuda._copy = torch.device("cuda"), _FakeCopy()
    got = list(cuda)
    assert cuda._copy.sent and all(s == [torch.float16, torch.uint8] for s in cuda._copy.sent)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        _same(a, b)
    assert cuda.whole_maps().device.type == "cpu"  # closed-form warm starts stay on the CPU


def test_prefetched_keeps_order_raises_in_the_consumer_and_stops_when_closed():
    assert list(prefetched(lambda x: x * x, list(range(20)), threads=4)) == [x * x for x in range(20)]

    def read(x):
        if x == 5:
            raise ValueError("bad batch 5")
        return x

    with pytest.raises(ValueError, match="bad batch 5"):
        list(prefetched(read, list(range(10)), threads=2))

    seen = []
    stream = prefetched(lambda x: seen.append(x) or x, list(range(1000)), threads=2)
    assert next(stream) == 0
    stream.close()
    assert len(seen) < 20  # a few batches ahead, not the whole list


def test_cpu_feature_maps_arrive_channels_last(tiny_images, tiny_features):
    """One conversion pass: decoder_inputs then has nothing left to copy."""
    from featinv.training.train import decoder_inputs

    store = FeatureStore(store_path(tiny_features, "vgg16/block1"))
    feats, pixels01 = next(iter(FeatureBatches([store.split("train")], ImageStore(tiny_images).pixels("train"), 2)))
    (f,) = feats
    assert f.dtype == torch.float32 and f.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(f, torch.from_numpy(store.split("train")[:2]).float())
    assert decoder_inputs(feats, torch.device("cpu"))[0].data_ptr() == f.data_ptr()
    assert pixels01.shape[1] == 3 and float(pixels01.max()) <= 1.0


def test_training_precision_policy(monkeypatch):
    # auto: bf16 on CUDA only; float32 never autocasts; bfloat16 where the hardware computes it.
    assert precision.training_dtype("cuda", "auto") == (torch.bfloat16, [])
    assert precision.training_dtype("cpu", "auto") == (None, [])
    assert precision.training_dtype("cuda", "float32") == (None, [])
    assert precision.training_dtype("cuda", "bfloat16") == (torch.bfloat16, [])
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: True)
    assert precision.training_dtype("cpu", "bfloat16") == (torch.bfloat16, [])
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: False)
    dtype, notes = precision.training_dtype("cpu", "bfloat16")
    assert dtype is None and len(notes) == 1 and "no native bf16" in notes[0] and "float32" in notes[0]
    dtype, notes = precision.training_dtype("mps", "bfloat16")
    assert dtype is None and "mps" in notes[0]


def test_autocast_to_uses_the_devices_own_autocast(autocast_calls):
    with precision.autocast_to("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
    with precision.autocast_to("cpu", torch.bfloat16):
        pass
    assert autocast_calls == [("cpu", torch.bfloat16)]


def test_local_mlp_keeps_its_linear_path_in_float32_under_bf16():
    from featinv.decoders.local_mlp import LocalMLPDecoder

    torch.manual_seed(0)
    decoder = LocalMLPDecoder((8, 4, 4), out_size=8, hidden=16)
    nn.init.normal_(decoder.mlp[-1].weight, std=0.1)
    windows = torch.randn(5, 8, 3, 3)
    exact = decoder.forward_valid(windows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = decoder.forward_valid(windows)
        linear = decoder._linear_path(windows)
    assert linear.dtype == torch.float32 and mixed.dtype == torch.float32
    assert torch.allclose(linear, decoder.linear(windows))  # bit-for-bit the float32 path
    assert (mixed - exact).abs().max() < 0.02 and not torch.equal(mixed, exact)  # only the MLP is bf16


def test_cpu_setup_keeps_freed_host_memory_and_cuda_setup_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(precision.host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    precision.setup("cpu")
    assert calls == [1]
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        precision.setup("cuda")  # sets backend flags only; needs no GPU
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags
    assert calls == [1]
