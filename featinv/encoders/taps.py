"""Encoder taps: a frozen pre-trained network truncated at one layer.

A *tap* names an encoder and a cut point (``vgg16/block1``).  Like timm's
``feature_info``, every built-in tap declares its contract in a :class:`TapSpec`
(channels × height × width of the activation for a 224×224 input);
``tests/encoders/test_taps.py`` checks each declaration against a real forward pass on
seeded random weights.  Networks are *truncated* at the tap — layers past it
are never built into the forward path, let alone run (the published code ran
the whole PVT to catch one hook).

Beyond the built-ins, any timm model and named module is a tap:
``timm:convnext_tiny/stages.0``; its shape is discovered by a dry forward and
the forward stops at that module.

Inputs are pixels in [0, 1]; :class:`TapEncoder` normalises them before the
truncated network.  Each family declares the :class:`Normalisation` its weights
were trained with (torchvision and PVT: ImageNet mean/std; ViT-S augreg and
e.g. EfficientNet-Lite: mean = std = 0.5, "inception"; ``timm:`` taps: the
model's ``pretrained_cfg``); ``extract.normalisation`` may override it.

Weights are ``random`` (seeded), ``imagenet`` or the path of a state dict in the
*full* network's key names, either one setting for all taps or a mapping
resolved per tap by :func:`weights_for_tap`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from featinv.errors import ParamsError, UnknownNameError, WeightsUnavailableError
from featinv.encoders.packaged_weights import load_packaged_state_dict, packaged_weights_for
from featinv.registry import Registry

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "IMAGENET",
    "INCEPTION",
    "NORMALISATION_SETTINGS",
    "WeightsSetting",
    "Normalisation",
    "TapSpec",
    "TapEncoder",
    "TAPS",
    "FAMILIES",
    "resolve_tap",
    "resolve_normalisation",
    "weights_for_tap",
    "build_encoder",
    "weights_id",
    "list_taps",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # timm's name for mean = std = 0.5 (augreg ViTs, EfficientNet-Lite)
INCEPTION_STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 224
TIMM_PREFIX = "timm:"
TIMM_FAMILY = "timm"  # TapSpec.family of every `timm:` tap; also a key of an `extract.weights` mapping
WEIGHTS_DEFAULT_KEY = "default"
# "auto" = the normalisation the tap's weights were trained with; the others force one for every tap.
NORMALISATION_SETTINGS: tuple[str, ...] = ("auto", "imagenet", "inception")
# State-dict key prefixes a weights file may carry on top of the full network's names: none, the
# `_HookPrefix` wrapper's (`encoder.network.state_dict()` of a timm tap), DataParallel's.
_KEY_PREFIXES = ("", "model.", "module.")

TokenLayout = Literal["nchw", "tokens", "nhwc"]
# "random" | "imagenet" | a path, or a mapping from tap / `timm:<model>` / family / `default` to one.
WeightsSetting = str | Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Per-channel input normalisation ``(pixels01 - mean) / std`` applied before the network.

    Attributes:
        name: ``imagenet``, ``inception`` (mean = std = 0.5) or ``custom`` (any other values).
        mean, std: RGB values.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


IMAGENET = Normalisation("imagenet", IMAGENET_MEAN, IMAGENET_STD)
INCEPTION = Normalisation("inception", INCEPTION_MEAN, INCEPTION_STD)
_NAMED_NORMALISATIONS = {n.name: n for n in (IMAGENET, INCEPTION)}


@dataclasses.dataclass(frozen=True)
class TapSpec:
    """What a tap is and what it produces for a 224×224 input.

    Attributes:
        name: registry key, ``family/layer`` (or ``timm:model/module.path``).
        family: key of :data:`FAMILIES` that builds the truncated network.
        cut: where the network is cut, in the family's terms (``features[:5]``,
            ``layer1``, ``blocks[:1]``, ``stages[:1]``, a module path).
        channels, height, width: the activation's shape per image.
        layout: how the network emits it (``tokens`` are reshaped to a grid, prefix
            tokens such as CLS dropped; ``nhwc`` is permuted).
        depth: order of the tap within its family (shallow → deep), for reports.
    """

    name: str
    family: str
    cut: str
    channels: int
    height: int
    width: int
    layout: TokenLayout = "nchw"
    depth: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one encoder family truncated at a cut point.

    ``build(cut, pretrained)`` returns the truncated module; ``imagenet_tag`` names
    the pretrained weights the published study used (recorded in outputs);
    ``normalisation`` is the input normalisation those weights were trained with.
    """

    build: Callable[[str, bool], nn.Module]
    imagenet_tag: str
    normalisation: Normalisation


TAPS: Registry[TapSpec] = Registry("tap", param="encoder / taps")
FAMILIES: Registry[Family] = Registry("encoder family")


class TapEncoder(nn.Module):
    """Frozen, eval-mode encoder: pixels in [0,1] (N,3,224,224) → tap activation (N,C,h,w).

    Args:
        spec: the tap's declared contract.
        network: the truncated network, fed normalised pixels.
        weights: the weights id recorded in outputs (see :func:`weights_id`).
        normalisation: applied to the pixels before ``network`` (see :func:`resolve_normalisation`);
            exposed as ``encoder.normalisation`` so callers can record it.
    """

    def __init__(self, spec: TapSpec, network: nn.Module, weights: str, normalisation: Normalisation) -> None:
        super().__init__()
        self.spec = spec
        self.network = network
        self.weights = weights
        self.normalisation = normalisation
        self.register_buffer("mean", torch.tensor(normalisation.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalisation.std).view(1, 3, 1, 1), persistent=False)
        self.eval()
        self.requires_grad_(False)

    def forward(self, pixels01_nchw: torch.Tensor) -> torch.Tensor:
        return self.network((pixels01_nchw - self.mean) / self.std)

    def train(self, mode: bool = True) -> TapEncoder:  # frozen: BatchNorm/dropout stay in eval
        return super().train(False)


def resolve_tap(name: str) -> TapSpec:
    """The :class:`TapSpec` for a built-in tap or a ``timm:model/module`` tap.

    Raises:
        UnknownNameError: not a built-in tap and not of the ``timm:`` form.
        ParamsError: a ``timm:`` tap whose model or module does not exist.
    """
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    return TAPS.get(name)


def list_taps() -> list[TapSpec]:
    """Built-in taps, grouped by family and ordered shallow → deep."""
    return [TAPS.get(n) for n in TAPS.names()]


def resolve_normalisation(spec: TapSpec | str, setting: str = "auto") -> Normalisation:
    """The input normalisation an encoder for ``spec`` applies under ``extract.normalisation``.

    Args:
        spec: a tap spec or name.
        setting: ``auto`` (what the tap's weights were trained with: its family's declaration, or
            a ``timm:`` model's ``pretrained_cfg``), ``imagenet`` or ``inception`` (mean = std = 0.5).

    Returns:
        The :class:`Normalisation`.

    Raises:
        ParamsError: ``setting`` is not one of :data:`NORMALISATION_SETTINGS`.
        UnknownNameError / ParamsError: see :func:`resolve_tap`.
    """
    if setting not in NORMALISATION_SETTINGS:
        raise ParamsError(
            f"unknown normalisation {setting!r} (param `extract.normalisation`); "
            f"valid choices: {', '.join(NORMALISATION_SETTINGS)}"
        )
    if setting != "auto":
        return _NAMED_NORMALISATIONS[setting]
    name = spec.name if isinstance(spec, TapSpec) else spec
    if name.startswith(TIMM_PREFIX):  # from the model's config: no dry forward to discover the tap's shape
        return _timm_normalisation(_parse_timm_tap(name)[0])
    spec = spec if isinstance(spec, TapSpec) else resolve_tap(spec)
    return FAMILIES.get(spec.family).normalisation


def weights_for_tap(weights: WeightsSetting, tap_name: str) -> str:
    """The weights setting (``random`` | ``imagenet`` | a path) that applies to one tap.

    A string applies to every tap and is returned as is.  A mapping is looked up by the exact tap
    name, then ``timm:<model>`` (``timm:`` taps), then the family (``vgg16``; ``timm`` for every
    ``timm:`` tap), then its required ``default`` key, e.g.
    ``{"vgg16": "../shared/weights/vgg16.pth", "default": "random"}``.

    Args:
        weights: the ``extract.weights`` setting.
        tap_name: a tap name (built-in or ``timm:model/module``).

    Returns:
        The setting for that tap.

    Raises:
        ParamsError: ``weights`` is neither a string nor a mapping, or the mapping lacks ``default``,
            has a non-string value or a key that names no tap, family or ``timm:`` model.
    """
    if isinstance(weights, str):
        return weights
    if not isinstance(weights, Mapping):
        raise ParamsError(
            f"param `extract.weights` is {weights!r} ({type(weights).__name__}); expected `random`, `imagenet`, "
            f"a path, or a mapping from tap / `timm:<model>` / family to one of those with a `{WEIGHTS_DEFAULT_KEY}`"
        )
    _check_weights_mapping(weights)
    for key in _weights_lookup_keys(tap_name):
        if key in weights:
            return weights[key]
    raise AssertionError("unreachable: the mapping was checked to have a default")


def build_encoder(
    tap: str | TapSpec,
    weights: WeightsSetting = "random",
    weights_seed: int = 0,
    device: str | torch.device = "cpu",
    normalisation: str | Normalisation = "auto",
) -> TapEncoder:
    """Build the frozen encoder truncated at ``tap``.

    Args:
        tap: a tap name or spec.
        weights: ``random`` (seeded, deterministic), ``imagenet`` (hub or local cache), the path
            of a state dict for the *full* network (plain key names; extra keys such as a
            classifier are ignored), or a per-tap mapping of those (see :func:`weights_for_tap`).
        weights_seed: seed of the random initialisation (also used before loading a state dict,
            so parameters the file does not hold, which the tap never uses, are deterministic).
        device: where to put the encoder.
        normalisation: an ``extract.normalisation`` setting (see :func:`resolve_normalisation`)
            or a :class:`Normalisation` (e.g. one recorded in a checkpoint).

    Returns:
        The :class:`TapEncoder`, frozen and in eval mode.

    Raises:
        WeightsUnavailableError: ``imagenet`` weights cannot be loaded (offline, no cache), or
            the weights file is missing/incompatible.
        ParamsError: a bad ``weights`` mapping or ``normalisation`` setting.
        UnknownNameError / ParamsError: see :func:`resolve_tap`.
    """
    spec = tap if isinstance(tap, TapSpec) else resolve_tap(tap)
    weights = weights_for_tap(weights, spec.name)
    if not isinstance(normalisation, Normalisation):
        normalisation = resolve_normalisation(spec, normalisation)
    ident = weights_id(spec, weights, weights_seed)  # first: a missing file fails before any build
    network = _build_network(spec, weights, weights_seed)
    return TapEncoder(spec, network, ident, normalisation).to(device)


def weights_id(spec: TapSpec, weights: WeightsSetting, weights_seed: int) -> str:
    """A stable identifier of the tap's weights, recorded in stores, checkpoints and metrics.

    Args:
        spec: the tap.
        weights: the ``extract.weights`` setting, a string or a per-tap mapping.
        weights_seed: seed of the random initialisation.

    Returns:
        ``random:seed=<n>``, ``imagenet:<tag>`` or ``file:<name>:sha256=<16 hex>``.

    Raises:
        WeightsUnavailableError: the weights file does not exist.
        ParamsError: a bad ``weights`` mapping (see :func:`weights_for_tap`).
    """
    weights = weights_for_tap(weights, spec.name)
    if weights == "random":
        return f"random:seed={weights_seed}"
    if weights == "imagenet":
        return f"imagenet:{_imagenet_tag(spec)}"
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} does not exist (param `extract.weights`, tap {spec.name!r}); "
            "use `random`, `imagenet`, or the path of a state dict"
        )
    return f"file:{path.name}:sha256={_sha256(path)[:16]}"


# --------------------------------------------------------------------------- private helpers


def _check_weights_mapping(weights: Mapping) -> None:
    keys = ", ".join(map(str, weights)) or "none"
    if WEIGHTS_DEFAULT_KEY not in weights:
        raise ParamsError(
            f"param `extract.weights`: a per-tap mapping needs a `{WEIGHTS_DEFAULT_KEY}` key for the other taps "
            f"(e.g. `{WEIGHTS_DEFAULT_KEY}: random`); its keys are: {keys}"
        )
    for key, value in weights.items():
        if not isinstance(value, str):
            raise ParamsError(
                f"param `extract.weights.{key}` is {value!r} ({type(value).__name__}); expected `random`, "
                f"`imagenet` or a path (the mapping's keys are: {keys})"
            )
        if not (key == WEIGHTS_DEFAULT_KEY or key == TIMM_FAMILY or key in TAPS or key in FAMILIES
                or (isinstance(key, str) and key.startswith(TIMM_PREFIX))):
            # A misspelt key would otherwise silently fall back to `default`.
            raise ParamsError(
                f"param `extract.weights`: key {key!r} names no tap, family or timm model; valid keys: a tap "
                f"({', '.join(TAPS.names())}), `timm:<model>[/<module>]`, a family "
                f"({', '.join(FAMILIES.names())}, {TIMM_FAMILY}) or `{WEIGHTS_DEFAULT_KEY}`"
            )


def _weights_lookup_keys(tap_name: str) -> list[str]:
    """Keys of an ``extract.weights`` mapping that may hold a tap's weights, most specific first."""
    if tap_name.startswith(TIMM_PREFIX):
        model_name = tap_name[len(TIMM_PREFIX):].split("/", 1)[0]
        return [tap_name, f"{TIMM_PREFIX}{model_name}", TIMM_FAMILY, WEIGHTS_DEFAULT_KEY]
    family = TAPS.get(tap_name).family if tap_name in TAPS else tap_name.split("/", 1)[0]
    return [tap_name, family, WEIGHTS_DEFAULT_KEY]


def _build_network(spec: TapSpec, weights: str, weights_seed: int) -> nn.Module:
    family = FAMILIES.get(spec.family) if not spec.name.startswith(TIMM_PREFIX) else None
    pretrained = weights == "imagenet"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights_seed)
        try:
            if family is not None:
                network = family.build(spec.cut, pretrained)
            else:
                network = _build_timm_hook_network(spec, pretrained)
        except WeightsUnavailableError:
            raise
        except Exception as exc:
            if not pretrained or not _looks_like_download_failure(exc):
                raise
            raise WeightsUnavailableError(
                f"cannot load ImageNet weights for tap {spec.name!r} "
                f"({_imagenet_tag(spec)}): {type(exc).__name__}: {_one_line(str(exc))[:200]}. "
                "No model hub is reachable and no cached copy was found. Either run once "
                "with internet (torch hub cache ~/.cache/torch, HF cache ~/.cache/huggingface), "
                "set `extract.weights` to the path of a downloaded state dict, or use "
                "`extract.weights: random`."
            ) from exc
    if weights not in ("random", "imagenet"):
        _load_state_dict_file(network, Path(weights), spec)
    return network


def _looks_like_download_failure(exc: BaseException) -> bool:
    # torchvision raises URLError (an OSError), huggingface_hub LocalEntryNotFoundError
    # (also an OSError); anything else is a genuine bug and must propagate.
    return isinstance(exc, (OSError, RuntimeError)) or "hub" in type(exc).__module__


def _load_state_dict_file(network: nn.Module, path: Path, spec: TapSpec) -> None:
    """Load a full network's state dict into the truncated ``network``, or fail with one line.

    Built-in families' truncated networks keep the full network's key names; a ``timm:`` tap's
    :class:`_HookPrefix` loads into its inner timm model, so plain timm names fit.  Keys may carry a
    prefix from :data:`_KEY_PREFIXES`; keys the tap has no use for (a classifier) are ignored.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"{path}: cannot read weights ({_one_line(str(exc))[:200]})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(
            f"{path}: not a state dict (a mapping from names to tensors) for tap {spec.name!r}"
        )
    target, required = _weights_target(network)
    own = target.state_dict()
    picked = {}
    for key in own:
        found = next((prefix + key for prefix in _KEY_PREFIXES if prefix + key in state), None)
        if found is not None:
            picked[key] = state[found]
    missing = [k for k in own if k in required and k not in picked]
    if missing:
        sample = ", ".join(list(state)[:3]) or "none"
        raise WeightsUnavailableError(
            f"{path}: weights do not fit tap {spec.name!r}: missing {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(required)} needed; "
            f"the file's keys start: {sample})"
        )
    wrong = [k for k, v in picked.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise WeightsUnavailableError(
            f"{path}: weights do not fit tap {spec.name!r}: {k} has shape {tuple(picked[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the network ({len(wrong)} such keys)"
        )
    unused = len(own) - len(picked)
    if unused:  # never on the tap's forward path (checked above), so the output does not depend on them
        log.debug("%s: %d tensors past tap %s are not in the file; seeded init kept", path, unused, spec.name)
    target.load_state_dict(picked, strict=False)


def _weights_target(network: nn.Module) -> tuple[nn.Module, set[str]]:
    """The module a weights file loads into, and the state-dict keys the tap's output depends on."""
    if isinstance(network, _HookPrefix):
        # The inner timm model is whole (the hook stops its forward), so require only the
        # parameters and buffers of modules that run before the tap.
        return network.model, _keys_before_tap(network)
    return network, set(network.state_dict())


def _keys_before_tap(hook_net: _HookPrefix) -> set[str]:
    ran = {""}  # the root's own tensors (ViT cls_token, pos_embed) are used by forward_features
    handles = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: ran.add(name))
        for name, module in hook_net.model.named_modules()
        if name
    ]
    was_training = hook_net.training
    try:
        hook_net.eval()  # no BatchNorm running-stat updates from the probe
        with torch.no_grad():
            hook_net.raw(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    finally:
        for handle in handles:
            handle.remove()
        hook_net.train(was_training)
    return {key for key in hook_net.model.state_dict() if key.rpartition(".")[0] in ran}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _imagenet_tag(spec: TapSpec) -> str:
    if spec.name.startswith(TIMM_PREFIX):
        model_name = spec.name[len(TIMM_PREFIX):].split("/", 1)[0]
        packaged = packaged_weights_for(model_name)
        return f"timm/{model_name}" if packaged is None else f"{packaged.tag()} ({model_name})"
    return FAMILIES.get(spec.family).imagenet_tag


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the families


class _Sequential(nn.Sequential):
    """nn.Sequential that keeps the full network's child names (for state-dict loading)."""


def _vgg16(cut: str, pretrained: bool) -> nn.Module:
    import torchvision

    end = int(re.fullmatch(r"features\[:(\d+)\]", cut).group(1))
    if pretrained:
        layers = torchvision.models.vgg16(weights="IMAGENET1K_V1").features
    else:
        # Random weights: build only the convolutional trunk (the 102M-parameter classifier would
        # be initialised and thrown away), initialised exactly as torchvision's VGG does.
        from torchvision.models.vgg import cfgs, make_layers

        layers = make_layers(cfgs["D"])
        for module in layers.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(module.bias, 0)
    features = _Sequential()
    for i in range(end):
        features.add_module(str(i), layers[i])
    return _Sequential(_named(features=features))


def _resnet34(cut: str, pretrained: bool) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet34(weights="IMAGENET1K_V1" if pretrained else None)
    n_layers = int(re.fullmatch(r"layer(\d)", cut).group(1))
    parts = {"conv1": model.conv1, "bn1": model.bn1, "relu": model.relu, "maxpool": model.maxpool}
    for i in range(1, n_layers + 1):
        parts[f"layer{i}"] = getattr(model, f"layer{i}")
    return _Sequential(_named(**parts))


class _ViTPrefix(nn.Module):
    """timm ViT run up to ``blocks[:n]``; prefix (CLS) tokens dropped, tokens → (N, C, 14, 14)."""

    def __init__(self, model: nn.Module, n_blocks: int) -> None:
        super().__init__()
        self.patch_embed = model.patch_embed
        self.cls_token = model.cls_token
        self.pos_embed = model.pos_embed
        self.pos_drop = model.pos_drop
        self.patch_drop = model.patch_drop
        self.norm_pre = model.norm_pre
        self.blocks = model.blocks[:n_blocks]
        self._model = [model]  # not a submodule: only its _pos_embed logic is borrowed
        self.num_prefix_tokens = model.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._model[0]._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        return _tokens_to_grid(x, self.num_prefix_tokens)


def _vit_small(cut: str, pretrained: bool) -> nn.Module:
    import timm

    n_blocks = int(re.fullmatch(r"blocks\[:(\d+)\]", cut).group(1))
    model = timm.create_model("vit_small_patch16_224", pretrained=pretrained)
    return _ViTPrefix(model, n_blocks)


class _PVTPrefix(nn.Module):
    """timm PVT-v2 run up to ``stages[:n]`` (stages emit NCHW)."""

    def __init__(self, model: nn.Module, n_stages: int) -> None:
        super().__init__()
        self.patch_embed = model.patch_embed
        self.stages = model.stages[:n_stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))


def _pvt_v2_b2(cut: str, pretrained: bool) -> nn.Module:
    import timm

    n_stages = int(re.fullmatch(r"stages\[:(\d+)\]", cut).group(1))
    model = timm.create_model("pvt_v2_b2", pretrained=pretrained)
    return _PVTPrefix(model, n_stages)


def _named(**modules: nn.Module) -> dict:
    from collections import OrderedDict

    return OrderedDict(modules)


def _tokens_to_grid(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(N, prefix + h·w, C) tokens → (N, C, h, w), dropping prefix (CLS/register) tokens."""
    patches = tokens[:, num_prefix_tokens:, :]
    n, length, channels = patches.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ParamsError(f"cannot reshape {length} tokens into a square grid")
    return patches.transpose(1, 2).reshape(n, channels, side, side)


# ----------------------------------------------------------------- generic timm:model/module


class _StopForward(Exception):
    """Raised by the tap hook so nothing past the tap runs."""


class _HookPrefix(nn.Module):
    """Any timm model run until ``module_path`` produces its output, then stopped."""

    def __init__(self, model: nn.Module, module_path: str, layout: TokenLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self._captured: list[torch.Tensor] = []
        model.get_submodule(module_path).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _StopForward

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        self._captured.clear()
        try:
            self.model.forward_features(x)
        except _StopForward:
            return self._captured.pop()
        raise ParamsError("the tap's module was never reached by forward_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.raw(x)
        if self.layout == "tokens":
            return _tokens_to_grid(out, self.num_prefix_tokens)
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        return out


def _parse_timm_tap(name: str) -> tuple[str, str]:
    body = name[len(TIMM_PREFIX):]
    if "/" not in body:
        raise ParamsError(
            f"tap {name!r}: a timm tap is written `timm:<model>/<module.path>`, "
            "e.g. `timm:convnext_tiny/stages.0`"
        )
    model_name, module_path = body.split("/", 1)
    return model_name, module_path


def _create_timm(model_name: str, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(model_name):
        raise ParamsError(f"unknown timm model {model_name!r}; see `timm.list_models()`")
    packaged = packaged_weights_for(model_name) if pretrained else None
    if packaged is None:
        return timm.create_model(model_name, pretrained=pretrained)
    # ImageNet weights from an installed package: no hub, no network.
    model = timm.create_model(model_name, pretrained=False)
    model.load_state_dict(load_packaged_state_dict(packaged, model.state_dict()), strict=True)
    return model


def _build_timm_hook_network(spec: TapSpec, pretrained: bool) -> nn.Module:
    model_name, module_path = _parse_timm_tap(spec.name)
    return _HookPrefix(_create_timm(model_name, pretrained), module_path, spec.layout)


@functools.lru_cache(maxsize=32)
def _timm_spec(name: str) -> TapSpec:
    """Discover a ``timm:`` tap's layout and shape with one dry forward on random weights."""
    model_name, module_path = _parse_timm_tap(name)
    model = _create_timm(model_name, pretrained=False).eval()
    try:
        model.get_submodule(module_path)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ParamsError(
            f"tap {name!r}: timm model {model_name!r} has no module {module_path!r}; "
            f"its top-level modules are: {', '.join(children)}"
        ) from None
    probe = _HookPrefix(model, module_path, "nchw")
    with torch.inference_mode():
        out = probe.raw(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    if out.ndim == 3:
        grid = _tokens_to_grid(out, probe.num_prefix_tokens)
        layout: TokenLayout = "tokens"
        channels, height, width = grid.shape[1:]
    elif out.ndim == 4:
        layout = _infer_4d_layout(model, module_path, out)
        shape = out.shape[1:] if layout == "nchw" else out.permute(0, 3, 1, 2).shape[1:]
        channels, height, width = shape
    else:
        raise ParamsError(f"tap {name!r}: module output has shape {tuple(out.shape)}, not a map")
    return TapSpec(name, "timm", module_path, int(channels), int(height), int(width), layout)


@functools.lru_cache(maxsize=32)
def _timm_normalisation(model_name: str) -> Normalisation:
    """A timm model's training normalisation, from its ``pretrained_cfg`` (local, no download)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    values = cfg.to_dict() if cfg is not None else _create_timm(model_name, pretrained=False).pretrained_cfg
    mean, std = values.get("mean"), values.get("std")
    if mean is None or std is None:
        log.warning("timm model %s declares no input normalisation; using ImageNet mean/std", model_name)
        return IMAGENET
    return _named_by_value(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _named_by_value(mean: tuple[float, ...], std: tuple[float, ...]) -> Normalisation:
    for known in _NAMED_NORMALISATIONS.values():
        if all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(mean + std, known.mean + known.std)):
            return known
    return Normalisation("custom", mean, std)


def _infer_4d_layout(model: nn.Module, module_path: str, out: torch.Tensor) -> TokenLayout:
    # Swin-style timm models emit NHWC; feature_info's declared channels disambiguate.
    for info in getattr(model, "feature_info", []) or []:
        if isinstance(info, dict) and info.get("module") == module_path:
            chs = info.get("num_chs")
            if out.shape[-1] == chs and out.shape[1] != chs:
                return "nhwc"
    return "nchw"


# ------------------------------------------------------------------------------ registrations

FAMILIES.add("vgg16", Family(_vgg16, "torchvision/VGG16_Weights.IMAGENET1K_V1", IMAGENET))
FAMILIES.add("resnet34", Family(_resnet34, "torchvision/ResNet34_Weights.IMAGENET1K_V1", IMAGENET))
# augreg ViTs were trained on mean = std = 0.5 (timm pretrained_cfg), not ImageNet's statistics.
FAMILIES.add("vit_small", Family(_vit_small, "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", INCEPTION))
FAMILIES.add("pvt_v2_b2", Family(_pvt_v2_b2, "timm/pvt_v2_b2.in1k", IMAGENET))

# VGG-16 blocks end after their max-pool (features = 13 × conv+ReLU, a pool after convs 2, 4, 7, 10, 13),
# as the published tables use: block k = features[:5], [:10], [:17], [:24], [:31].
for _spec in (
    TapSpec("vgg16/block1", "vgg16", "features[:5]", 64, 112, 112, depth=1),
    TapSpec("vgg16/block2", "vgg16", "features[:10]", 128, 56, 56, depth=2),
    TapSpec("vgg16/block3", "vgg16", "features[:17]", 256, 28, 28, depth=3),
    TapSpec("vgg16/block4", "vgg16", "features[:24]", 512, 14, 14, depth=4),
    TapSpec("vgg16/block5", "vgg16", "features[:31]", 512, 7, 7, depth=5),
    TapSpec("resnet34/layer1", "resnet34", "layer1", 64, 56, 56, depth=1),
    TapSpec("resnet34/layer2", "resnet34", "layer2", 128, 28, 28, depth=2),
    TapSpec("vit_small/block1", "vit_small", "blocks[:1]", 384, 14, 14, "tokens", depth=1),
    TapSpec("vit_small/block3", "vit_small", "blocks[:3]", 384, 14, 14, "tokens", depth=3),
    TapSpec("pvt_v2_b2/stage1", "pvt_v2_b2", "stages[:1]", 64, 56, 56, depth=1),
    TapSpec("pvt_v2_b2/stage2", "pvt_v2_b2", "stages[:2]", 128, 28, 28, depth=2),
):
    TAPS.add(_spec.name, _spec)
