"""The reconstruction loss: ``mse``·MSE + ``l1``·L1 + ``log_mse``·mean ln(1 + MSE/floor) +
``lpips``·LPIPS(AlexNet), on pixels in [0, 1].

LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018) needs torchvision's pretrained AlexNet; when it
cannot be loaded (offline) a positive LPIPS weight is an error, never a silent
fallback to random AlexNet weights.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from featinv.config import LossConfig
from featinv.errors import WeightsUnavailableError

__all__ = ["ReconstructionLoss", "load_lpips", "lpips_available"]

log = logging.getLogger(__name__)

# torchvision's AlexNet weights, the ones lpips.LPIPS(net="alex") loads (file name = torchvision's,
# with its sha256 prefix).
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def _fetch_alexnet_weights() -> None:
    """Put AlexNet's weights in the torch hub cache, downloading them if missing.

    Done before ``import lpips`` and building AlexNet so that, offline, the failure costs one
    failed download (~0.03 s) instead of ~0.5 s of building a network that cannot be loaded —
    every study cell's evaluation asks for LPIPS.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_URL.rsplit("/", 1)[1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(ALEXNET_URL, str(path), hash_prefix="7be5be79", progress=False)


@functools.lru_cache(maxsize=1)
def load_lpips() -> nn.Module:
    """The frozen LPIPS(AlexNet) network (cached per process).

    Raises:
        WeightsUnavailableError: the pretrained AlexNet (or LPIPS' linear layers)
            cannot be loaded, e.g. offline without a torch hub cache.
    """
    try:
        _fetch_alexnet_weights()
        import lpips

        # lpips prints a banner on construction; the library never prints.
        import contextlib
        import io
        import warnings

        # lpips calls torchvision with the deprecated `pretrained=` argument; that noise is not ours.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", pretrained=True, verbose=False)
    except Exception as exc:
        raise WeightsUnavailableError(
            "LPIPS needs torchvision's pretrained AlexNet (alexnet-owt-7be5be79.pth), which "
            f"could not be loaded ({type(exc).__name__}: {str(exc)[:160]}). Put it in the torch hub "
            "cache (~/.cache/torch/hub/checkpoints/) by running once with internet, or set "
            "`train.loss.lpips: 0` (the LPIPS metric is then recorded as null)."
        ) from exc
    model.eval().requires_grad_(False)
    return model


def lpips_available() -> bool:
    """Whether LPIPS(AlexNet) can be loaded here."""
    try:
        load_lpips()
        return True
    except WeightsUnavailableError:
        return False


class ReconstructionLoss(nn.Module):
    """Weighted sum of pixel losses; ``forward`` returns the total and its named parts.

    Args:
        cfg: the terms' weights.
        lpips_net: the LPIPS network to use instead of :func:`load_lpips`'s (the GPU benchmark
            times the loss with a random-weight AlexNet of the same cost where the trained one
            cannot be loaded; training never passes one).

    Raises (on construction):
        WeightsUnavailableError: ``lpips`` > 0 but LPIPS cannot be loaded.
    """

    def __init__(self, cfg: LossConfig, lpips_net: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.lpips = (lpips_net if lpips_net is not None else load_lpips()) if cfg.lpips > 0 else None

    def forward(self, pred01: torch.Tensor, target01: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, torch.Tensor] = {}
        if self.cfg.mse > 0:
            parts["mse"] = F.mse_loss(pred01, target01)
        if self.cfg.l1 > 0:
            parts["l1"] = F.l1_loss(pred01, target01)
        if self.cfg.log_mse > 0:
            per_sample = (pred01 - target01).pow(2).flatten(1).mean(1)
            parts["log_mse"] = torch.log1p(per_sample / self.cfg.log_mse_floor).mean()
        if self.lpips is not None:
            self.lpips.to(pred01.device)
            parts["lpips"] = self.lpips(pred01 * 2 - 1, target01 * 2 - 1).mean()
        total = sum(getattr(self.cfg, k) * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}
