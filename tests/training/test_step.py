"""The one training step the loop and the benchmarks share."""

import torch
from torch import nn

from featinv import precision
from featinv.config import LossConfig
from featinv.decoders import build_decoder
from featinv.training.losses import ReconstructionLoss
from featinv.training.model import Reconstructor
from featinv.training.step import build_optimizer, param_groups, training_step


class _Spy(nn.Module):
    """A loss that records what it was handed, then takes MSE."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, pred01, target01):
        self.seen.append(pred01.dtype)
        loss = (pred01 - target01).pow(2).mean()
        return loss, {"mse": float(loss.detach())}


def test_a_window_step_trains_forward_valid_and_takes_the_loss_in_float32():
    torch.manual_seed(0)
    model = Reconstructor(build_decoder("local_mlp", (8, 14, 14), 28))
    nn.init.normal_(model.decoder.mlp[-1].weight, std=0.1)  # not the zero start: every layer gets a gradient
    windows = torch.randn(32, 8, 3, 3)  # one position with a margin of 1 each: a 2×2 pixel block apiece
    target01 = torch.rand(32, 3, 2, 2)
    spy = _Spy()
    optimizer = build_optimizer(model, 1e-2, "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    loss = training_step(model, optimizer, spy, [windows], target01, amp_dtype=torch.bfloat16, windows=True)
    assert not loss.requires_grad and loss.dtype == torch.float32
    assert spy.seen == [torch.float32]  # the bf16 forward's output is lifted before the loss
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_whole_map_step_lowers_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = Reconstructor(build_decoder("transposed_conv", (8, 14, 14), 28))
    feats, target01 = [torch.randn(2, 8, 14, 14)], torch.rand(2, 3, 28, 28)
    criterion = ReconstructionLoss(LossConfig(mse=1.0))
    optimizer = build_optimizer(model, 1e-2, "cpu")
    losses = [float(training_step(model, optimizer, criterion, feats, target01)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]  # 0.094 → 0.054 here


def test_the_optimizer_keeps_the_decoders_learning_rate_groups_and_devices_kernel():
    model = Reconstructor(build_decoder("local_mlp", (8, 14, 14), 28))
    optimizer = build_optimizer(model, 1e-3, "cpu", weight_decay=1e-5)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == \
        [(g["lr"], g["weight_decay"]) for g in param_groups(model, 1e-3, 1e-5)]
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-5, 1e-3]  # the ridge path moves at 1 %
    assert bool(optimizer.defaults.get("fused")) == bool(precision.adam_options("cpu").get("fused"))
