"""Where a study cell's GPU step goes: the probe behind "GPU figures, run 4" in BENCHMARKS.md.

One cell's training step as the study trains it (batch 4, bf16 autocast, channels_last input,
Adam as ``featinv.precision`` sets it up, the loss's per-step host sync), on synthetic features
of vgg16/block1 and block3, for the four published decoders.

    python -m benchmarks.gpu_probe      # rates with MSE alone vs the published 0.5·MSE + 0.5·LPIPS,
                                        # variants of the ×2 upsampling, profiles → $OUT (or /tmp)
    python -m benchmarks.gpu_probe ab   # the shipped step vs foreach Adam and the old
                                        # adaptive_max_pool2d channel gate, two interleaved rounds

The loss is ``benchmarks.gpu.protocol_loss``'s: on the GPU machine LPIPS runs with a random-weight
AlexNet (the trained one cannot be downloaded there, and the weights do not change the cost). On a CPU it runs at toy
step counts (a smoke run, not a measurement).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.gpu import protocol_loss
from featinv import precision
from featinv.config import LossConfig
from featinv.decoders import frequency_aware as fa
from featinv.encoders.taps import TAPS
from featinv.training.model import build_reconstructor

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# "mse": what runs 1-3 timed the study with; "paper": the published 0.5·MSE + 0.5·LPIPS(AlexNet)
LOSSES = {"mse": LossConfig(mse=1.0), "paper": LossConfig(mse=0.5, lpips=0.5)}
QUICK = DEV.type != "cuda"


def up2_separable(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False), as slices (no atomics)."""
    for dim in (2, 3):
        n = x.shape[dim]
        lo = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)  # x[i-1], clamped
        hi = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)  # x[i+1], clamped
        even = 0.75 * x + 0.25 * lo
        odd = 0.75 * x + 0.25 * hi
        x = torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)
    return x


class Up2(nn.Module):
    def forward(self, x):
        return up2_separable(x)


def build(tap: str, decoder: str, variant: str):
    torch.manual_seed(0)
    model = build_reconstructor([TAPS.get(tap)], decoder, None, 224).to(DEV)
    if variant == "sep":
        if decoder == "attention":
            for i, m in enumerate(model.decoder.upsample):
                if isinstance(m, nn.Upsample):
                    model.decoder.upsample[i] = Up2()
    return model


def step_fn(tap, decoder, loss, variant):
    model = build(tap, decoder, variant).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4,
                           **({} if variant == "foreach" else precision.adam_options(DEV)))
    criterion, _ = protocol_loss(LOSSES[loss], DEV)
    c, h, w = TAPS.get(tap).shape
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(4, c, h, w, generator=g).to(DEV)
    if variant != "nchw":
        feats = feats.contiguous(memory_format=torch.channels_last)
    target = torch.rand(4, 3, 224, 224, generator=g).to(DEV)

    def step():
        with precision.autocast(DEV):
            pred = model([feats])
        total, _ = criterion(pred.float(), target)  # with its per-step sync, as training has it
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return step


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(step, warm, steps):
    for _ in range(warm):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return 4 * steps / (time.perf_counter() - t0)


def old_channel_attention(self, feats_nchw):
    avg = self.mlp(F.adaptive_avg_pool2d(feats_nchw, 1))
    peak = self.mlp(F.adaptive_max_pool2d(feats_nchw, 1))
    return feats_nchw * torch.sigmoid(avg + peak)


def ab():
    """Shipped (amax, fused Adam) vs the code before (adaptive_max_pool2d; foreach Adam), paper loss."""
    out = os.environ.get("OUT", "/tmp")
    precision.setup(DEV)
    warm, steps = (2, 2) if QUICK else (20, 100)
    rows = []
    new_forward = fa.ChannelAttention.forward
    for rnd in range(2):  # two rounds, interleaved: drift hits every variant alike
        for tap in ("vgg16/block1",):
            for decoder in ("transposed_conv", "frequency_aware", "wavelet", "attention"):
                for variant in ("shipped", "foreach") + (("old_maxpool",) if decoder == "frequency_aware" else ()):
                    fa.ChannelAttention.forward = old_channel_attention if variant == "old_maxpool" else new_forward
                    try:
                        rate = timed(step_fn(tap, decoder, "paper", variant), warm, steps)
                    finally:
                        fa.ChannelAttention.forward = new_forward
                    rows.append({"round": rnd, "tap": tap, "decoder": decoder, "variant": variant,
                                 "samples_per_s": round(rate, 1)})
                    print(json.dumps(rows[-1]), flush=True)
                    with open(f"{out}/ab.json", "w") as f:
                        json.dump({"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
                                   "torch": torch.__version__, "loss": "0.5 MSE + 0.5 LPIPS(AlexNet, random)",
                                   "variants": {"shipped": "amax channel gate, fused Adam on CUDA",
                                                "foreach": "amax, torch's default Adam",
                                                "old_maxpool": "adaptive_max_pool2d gate, fused Adam"},
                                   "rows": rows}, f, indent=1)


def main():
    """Rates per (tap, decoder, loss, variant), then three profiles (20 steps each)."""
    out = os.environ.get("OUT", "/tmp")
    precision.setup(DEV)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    err = (up2_separable(x) - F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)).abs().max()
    print("separable up2 max |diff| vs F.interpolate (float64):", float(err), flush=True)
    assert err < 1e-12
    warm, steps = (2, 2) if QUICK else (25, 150)
    rows = []
    cases = []
    for tap in ("vgg16/block1", "vgg16/block3"):
        for decoder in ("transposed_conv", "frequency_aware", "wavelet", "attention"):
            for loss in ("mse", "paper"):
                cases.append((tap, decoder, loss, "shipped"))
        for decoder in ("frequency_aware", "attention"):
            cases.append((tap, decoder, "paper", "sep"))
    cases.append(("vgg16/block1", "frequency_aware", "paper", "nchw"))
    if QUICK:
        cases = cases[:3] + [c for c in cases if c[3] != "shipped"][:2]
    for tap, decoder, loss, variant in cases:
        if variant == "sep" and decoder == "frequency_aware":
            fa._up2 = up2_separable
        try:
            rate = timed(step_fn(tap, decoder, loss, variant), warm, steps)
        finally:
            fa._up2 = ORIG_UP2
        rows.append({"tap": tap, "decoder": decoder, "loss": loss, "variant": variant, "samples_per_s": round(rate, 1)})
        print(json.dumps(rows[-1]), flush=True)
        with open(f"{out}/probe.json", "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    key = "self_cuda_time_total" if DEV.type == "cuda" else "self_cpu_time_total"
    for tap, decoder in (("vgg16/block1", "frequency_aware"), ("vgg16/block1", "attention"),
                         ("vgg16/block1", "transposed_conv")):
        step = step_fn(tap, decoder, "paper", "shipped")
        for _ in range(warm):
            step()
        sync()
        with profile(activities=acts) as prof:
            for _ in range(2 if QUICK else 20):
                step()
            sync()
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
        print(f"\n### {tap} + {decoder} (paper loss), 20 steps\n{table}", flush=True)
        with open(f"{out}/profile_{decoder}.txt", "w") as f:
            f.write(table)


ORIG_UP2 = fa._up2

if __name__ == "__main__":
    sys.exit(ab() if sys.argv[1:] == ["ab"] else main())
