"""One training step and its optimizer: the training loop's, and every benchmark's that times a step.

A benchmark that writes its own step times a program featinv does not run: a step that
differs in autocast, in the forward it calls or in Adam's kernel measures something else
(on the 2-core CPU bf16 autocast halves local_mlp's step, and the fused Adam kernel saves 7 %
of what is left: BENCHMARKS.md).  So :func:`featinv.training.train.train_decoder` and the
benchmarks (``benchmarks.run``, ``.gpu``, ``.host_memory``, ``.memory_format``) build their
optimizer with :func:`build_optimizer` and step with :func:`training_step`.
"""

from __future__ import annotations

import torch
from torch import nn

from featinv import precision

__all__ = ["build_optimizer", "param_groups", "training_step"]


def build_optimizer(model: nn.Module, lr: float, device: torch.device | str,
                    weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam over ``model``'s :func:`param_groups`, with the kernel that pays on ``device``.

    Args:
        model: a :class:`~featinv.training.model.Reconstructor` (its ``decoder`` may ask for
            learning-rate multipliers and weight-decay exemptions).
        lr: the base learning rate.
        device: where the parameters live (:func:`featinv.precision.adam_options`).
        weight_decay: L2 weight, as Adam adds it to the gradient.
    """
    return torch.optim.Adam(param_groups(model, lr, weight_decay), lr=lr, **precision.adam_options(device))


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Adam's parameter groups: one per learning-rate multiplier a decoder asks for
    (``lr_multipliers``) and per weight-decay treatment.

    ``weight_decay`` (L2, as Adam adds it to the gradient) applies to every parameter except
    those under the prefixes the decoder lists in ``weight_decay_exempt``: a closed-form ridge
    path sits at its least-squares optimum, and decaying it would pull it off that for nothing.
    Each group keeps its ``lr_scale`` so a schedule can set the base rate for all of them.
    """
    multipliers: dict[str, float] = getattr(model.decoder, "lr_multipliers", {})
    exempt: tuple[str, ...] = getattr(model.decoder, "weight_decay_exempt", ())
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        under = [prefix for prefix in (*multipliers, *exempt) if name.startswith(f"decoder.{prefix}.")]
        scale = next((multipliers[prefix] for prefix in under if prefix in multipliers), 1.0)
        decay = 0.0 if any(prefix in exempt for prefix in under) else weight_decay
        groups.setdefault((scale, decay), []).append(param)
    return [{"params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": decay}
            for (scale, decay), params in groups.items()]


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                  feats: list[torch.Tensor], target01: torch.Tensor, *, amp_dtype: torch.dtype | None = None,
                  windows: bool = False) -> torch.Tensor:
    """Forward, loss, backward and one optimizer step; returns the loss, detached.

    Args:
        model: a :class:`~featinv.training.model.Reconstructor` (or a module that takes its
            list of feature maps).
        optimizer: from :func:`build_optimizer`.
        criterion: ``(pred01, target01) -> (loss, parts)``, e.g.
            :class:`~featinv.training.losses.ReconstructionLoss`.
        feats: the decoder's inputs, one (N, C, h, w) map per tap, on the target's device.
        target01: (N, 3, H, W) pixels in [0, 1].
        amp_dtype: autocast dtype of the forward (None: float32); the loss is always computed
            in float32, where a 40 dB error (~1 % of the range) still shows.
        windows: ``feats`` are feature windows carrying the decoder's context margin: train on
            ``model.decoder.forward_valid``, the outputs whose window saw real context.
    """
    with precision.autocast_to(target01.device, amp_dtype):
        pred = model.decoder.forward_valid(feats[0]) if windows else model(feats)
    loss, _ = criterion(precision.float32(pred), target01)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
