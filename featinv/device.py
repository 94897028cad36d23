"""Device selection: ``auto`` picks cuda → mps → cpu, and says so when it falls back."""

from __future__ import annotations

import logging

import torch

from featinv.errors import ParamsError

__all__ = ["resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(name: str, param: str = "device") -> tuple[torch.device, list[str]]:
    """Turn a device param into a ``torch.device`` and a list of fallback notes.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        param: the params key, for error messages.

    Returns:
        The device and the fallbacks taken (e.g. ``["no GPU (cuda/mps) available: using cpu"]``),
        which callers record in their outputs.

    Raises:
        ParamsError: an explicit device that is not available or not a device name.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), []
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps"), []
        note = "no GPU (cuda/mps) available: running on cpu"
        log.warning("%s (param `%s: auto`)", note, param)
        return torch.device("cpu"), [note]
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParamsError(f"`{param}` = {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"`{param}` = {name!r} but CUDA is not available here; use `auto` or `cpu`")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"`{param}` = {name!r} but MPS is not available here; use `auto` or `cpu`")
    return device, []
