"""The trainable part of a run — optional fusion + decoder — and self-describing checkpoints.

A checkpoint (nanoGPT-style) holds everything needed to rebuild and use the
model without repeating any setting: state dict, decoder/fusion names, the tap
specs and their store fingerprints, weights id, preprocessing, epoch, best
validation loss and the full run config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featinv.config import with_added_settings
from featinv.decoders import build_decoder, count_parameters
from featinv.errors import CheckpointError, ParamsError
from featinv.mismatch import setting_differences
from featinv.encoders.taps import TapSpec

__all__ = ["Reconstructor", "build_reconstructor", "save_checkpoint", "load_checkpoint", "check_checkpoint",
           "RUN_SETTINGS", "ENSEMBLE"]

ENSEMBLE = "ensemble"
CHECKPOINT_FORMAT = 1
# The params that decide what a checkpoint is: a run is only the run params describe when all agree.
RUN_SETTINGS = ("encoder", "fusion", "decoder", "train", "extract", "data", "seed")


class Reconstructor(nn.Module):
    """Feature maps of one or more taps → RGB pixels in [0, 1].

    Args:
        decoder: maps (N, C, h, w) → (N, 3, 224, 224).
        fusion: for ensembles, maps a list of feature maps to one (N, 256, H, W) map.
    """

    def __init__(self, decoder: nn.Module, fusion: nn.Module | None = None) -> None:
        super().__init__()
        self.fusion = fusion
        self.decoder = decoder

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.fusion is None:
            (single,) = feats
            return self.decoder(single)
        return self.decoder(self.fusion(feats))


def build_reconstructor(
    specs: list[TapSpec], decoder: str, fusion: str | None, out_size: int = 224
) -> Reconstructor:
    """Build the fusion (for several taps) and decoder for the given tap specs.

    Raises:
        ParamsError: several taps without a fusion, or a fusion with one tap.
        UnknownNameError: unknown decoder or fusion name.
    """
    if len(specs) > 1:
        if not fusion:
            raise ParamsError("`encoder: ensemble` needs `fusion` (weighted | concat | attention)")
        from featinv.training.fusion import build_fusion, fused_shape

        shapes = [s.shape for s in specs]
        fuse = build_fusion(fusion, shapes)
        return Reconstructor(build_decoder(decoder, fused_shape(shapes), out_size), fuse)
    if fusion:
        raise ParamsError(f"`fusion: {fusion}` is only valid with `encoder: ensemble`; set `fusion: null`")
    return Reconstructor(build_decoder(decoder, specs[0].shape, out_size))


def save_checkpoint(path: str | Path, model: Reconstructor, meta: dict[str, Any], **extra: Any) -> None:
    """Write a checkpoint atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": model.state_dict(),
        "decoder_params": count_parameters(model),
        **meta,
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Reconstructor, dict]:
    """Rebuild the model stored in a checkpoint.

    Returns:
        ``(model in eval mode, checkpoint dict without the state dict)``.

    Raises:
        CheckpointError: missing or unreadable file, or not a featinv checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train first (`dvc repro train`)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a featinv checkpoint (format {CHECKPOINT_FORMAT})")
    specs = [TapSpec(**s) for s in payload["taps"]]
    model = build_reconstructor(specs, payload["decoder"], payload.get("fusion"), payload["crop"])
    model.load_state_dict(payload.pop("state_dict"))
    payload.pop("optimizer", None)
    return model.eval(), payload


def check_checkpoint(path: str | Path, meta: dict, expected_config: dict | None = None) -> list[str]:
    """What is wrong with using this checkpoint as the run ``expected_config`` describes.

    Args:
        path: the checkpoint (for messages).
        meta: :func:`load_checkpoint`'s dict.
        expected_config: ``dataclasses.asdict`` of the current params; None skips that comparison.

    Returns:
        One line per problem: the run did not finish (killed, or still running), or a setting in
        :data:`RUN_SETTINGS` differs (``decoder: checkpoint has 'transposed_conv', params say 'wavelet'``).
        Empty when the checkpoint is the finished run the params describe.
    """
    problems = []
    if not meta.get("finished", "train_result" in meta):  # checkpoints before `finished` had train_result at the end
        problems.append(f"{path} is from a training run that did not finish (it stopped after epoch "
                        f"{meta.get('epoch', '?')}: killed, or still running)")
    if expected_config is not None:
        trained = meta.get("config") or {}
        differences = setting_differences({k: with_added_settings(k, trained[k]) if isinstance(trained.get(k), dict)
                                           else trained.get(k) for k in RUN_SETTINGS},
                                          {k: expected_config.get(k) for k in RUN_SETTINGS},
                                          has="checkpoint has", wants="params say")
        if differences:
            problems.append(f"{path} was trained with other params: {'; '.join(differences[:4])}"
                            f"{f' (+{len(differences) - 4} more)' if len(differences) > 4 else ''}")
    return problems


def spec_dicts(specs: list[TapSpec]) -> list[dict]:
    return [dataclasses.asdict(s) for s in specs]
