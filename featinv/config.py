"""Typed, frozen configuration mirroring ``params.yaml``.

Each section of params.yaml has a frozen dataclass; :func:`load_params` /
``Config.from_params`` reject unknown keys and wrong types, naming the dotted
key path (``train.loss.lpips``) so a typo never silently falls back to a
default (nanoGPT's configurator, without the ``exec``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from featinv.errors import ParamsError

__all__ = [
    "ADDED_SETTINGS",
    "with_added_settings",
    "DataConfig",
    "ExtractConfig",
    "LossConfig",
    "TrainConfig",
    "EvaluateConfig",
    "StudyConfig",
    "Config",
    "from_mapping",
    "load_params",
    "with_overrides",
]

DataSource = Literal["sample", "folder", "div2k"]
RefineOptimizer = Literal["adam", "lbfgs"]
REFINE_OPTIMIZERS: tuple[str, ...] = get_args(RefineOptimizer)
# "random" | "imagenet" | a path to a state dict, or a mapping from tap / `timm:<model>` / family to one
# of those with a `default` (featinv.encoders.taps.weights_for_tap resolves it per tap).
Weights = str | dict[str, str]
Normalisation = Literal["auto", "imagenet", "inception"]
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclasses.dataclass(frozen=True)
class Bound:
    """The valid range of a numeric setting: ``low ≤ value ≤ high`` (open ends with ``*_open``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, key: str, value: float | None) -> None:
        if value is None:
            return
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ParamsError(f"`{key}` = {value!r} must be {self}")

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '≤'} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def bounded(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Any:
    """A dataclass field whose value (when not None) must lie in the given range."""
    return dataclasses.field(default=default, metadata={"bound": Bound(low, high, low_open, high_open)})


def device_field(default: str = "auto") -> Any:
    """A device setting: ``auto | cpu | cuda | cuda:N | mps`` (availability is checked when used)."""
    return dataclasses.field(default=default, metadata={"device": True})


class _Section:
    """Validates every bounded / device field of a params section when it is built.

    Every command and stage builds its config before doing any work, so an invalid setting
    stops it there — whether or not its outputs are already up to date.
    """

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key, value = _join(self.SECTION, f.name), getattr(self, f.name)
            if "bound" in f.metadata:
                f.metadata["bound"].check(key, value)
            if f.metadata.get("device") and not _DEVICE.fullmatch(str(value)):
                raise ParamsError(f"`{key}` = {value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


# Settings added after artefacts (image stores, checkpoints) were first written, with the value
# such artefacts were made with: one that does not record the setting was made that way, so a
# comparison with today's params must not count it as different.
ADDED_SETTINGS: dict[str, dict[str, Any]] = {
    "data": {"train_scale": [1.0, 1.0], "train_orientations": "horizontal", "train_channel_orders": "rgb"},
    "train": {"loss": {"log_mse": 0.0, "log_mse_floor": 1e-4}},
}


def with_added_settings(section: str, recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A section as an artefact recorded it, with the settings it predates at their old values."""
    return _merged(ADDED_SETTINGS.get(section, {}), recorded)


def _merged(added: Mapping[str, Any], recorded: Mapping[str, Any]) -> dict[str, Any]:
    """``recorded`` over ``added``, nested sections merged key by key (``train.loss.log_mse``)."""
    out = dict(added)
    for key, value in recorded.items():
        out[key] = _merged(added[key], value) if isinstance(value, Mapping) and isinstance(added.get(key), Mapping) \
            else value
    return out


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """``data:`` — where images come from and how they are preprocessed (the study's protocol)."""

    SECTION = "data"

    source: DataSource = "sample"  # sample (offline, skimage photos) | folder | div2k
    train_dir: str | None = None  # folder source: training (+ validation) images
    test_dir: str | tuple[str, ...] | None = None  # folder source: optional separate test set(s)
    root: str = "data/raw"  # div2k source: where archives are downloaded and extracted
    base_url: str = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"
    val_fraction: float = bounded(0.2, 0.0, 1.0, high_open=True)  # of the training images (DIV2K: 160 of 800)
    test_fraction: float = bounded(0.15, 0.0, 1.0, high_open=True)  # only when there is no separate test set
    resize: int = bounded(256, 1)  # bicubic resize of the whole image, as published
    crop: int = bounded(224, 1)  # train: random crop + h-flip; val/test: centre crop
    train_views: int = bounded(4, 1)  # cached augmented views per training image
    # Scale augmentation of the training views: each view resizes the image to (resize·s)², s
    # drawn uniformly from [low, high], before its random crop. [1, 1] is the published protocol.
    train_scale: tuple[float, ...] = (1.0, 1.0)
    # horizontal (the published h-flip, p = 0.5) | dihedral (also turned by k·90°: all 8 symmetries
    # of the square) — for local decoders, whose windows have no "up", a source of distinct examples.
    train_orientations: Literal["horizontal", "dihedral"] = "horizontal"
    # rgb (the published colours) | shuffled (half the views get one of the 5 other orders of R, G,
    # B) — colours the training photographs rarely show, for decoders of shallow taps.
    train_channel_orders: Literal["rgb", "shuffled"] = "rgb"
    max_images: int | None = bounded(None, 1)  # cap on source images (quick experiments, tests)
    sample_crops: int = bounded(6, 1)  # sample source: crops taken from each photograph

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop > self.resize:
            raise ParamsError(f"`data.crop` = {self.crop} must not exceed `data.resize` = {self.resize} "
                              "(images are resized to data.resize² before cropping)")
        if len(self.train_scale) != 2 or not 0 < self.train_scale[0] <= self.train_scale[1]:
            raise ParamsError(f"`data.train_scale` = {list(self.train_scale)!r} must be [low, high] with "
                              "0 < low ≤ high (e.g. [1.0, 1.5]; [1, 1] is the published protocol)")
        if round(self.resize * self.train_scale[0]) < self.crop:
            raise ParamsError(f"`data.train_scale` low = {self.train_scale[0]:g} would resize to "
                              f"{round(self.resize * self.train_scale[0])}², below `data.crop` = {self.crop}; "
                              f"use a low ≥ {self.crop / self.resize:.3g}")


@dataclasses.dataclass(frozen=True)
class ExtractConfig(_Section):
    """``extract:`` — how encoder activations are computed and stored."""

    SECTION = "extract"

    weights: Weights = "random"  # random (seeded) | imagenet | path, or {tap|timm:model|family: …, default: …}
    weights_seed: int = bounded(0, 0)  # seed of the random initialisation
    # The input normalisation: auto = the one each encoder's weights were trained with
    # (torchvision: ImageNet mean/std; timm: its pretrained_cfg); imagenet = ImageNet's for every encoder.
    normalisation: Normalisation = "auto"
    device: str = device_field()  # auto (cuda → mps → cpu) | cpu | cuda | cuda:N | mps
    batch_size: int = bounded(16, 1)
    codec: Literal["zstd", "lz4", "none"] = "zstd"  # blosc codec for the feature chunks
    clevel: int = bounded(1, 0, 9)
    chunk_samples: int = bounded(1, 1)  # samples per Zarr chunk

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.weights, dict):
            if "default" not in self.weights:
                raise ParamsError(f"`extract.weights` is a mapping without a `default` (it has "
                                  f"{', '.join(self.weights) or 'no keys'}); add `default: random` (or imagenet, or a path)")
            bad = [k for k, v in self.weights.items() if not isinstance(v, str)]
            if bad:
                raise ParamsError(f"`extract.weights.{bad[0]}` = {self.weights[bad[0]]!r} must be random, imagenet "
                                  "or the path of a state dict")


@dataclasses.dataclass(frozen=True)
class LossConfig(_Section):
    """``train.loss:`` — weights of the reconstruction loss terms."""

    SECTION = "train.loss"

    mse: float = bounded(1.0, 0.0)
    lpips: float = bounded(0.0, 0.0)  # LPIPS(AlexNet); needs torchvision's pretrained AlexNet
    l1: float = bounded(0.0, 0.0)
    # Mean over samples of ln(1 + MSE of the sample / log_mse_floor): on whole images the mean
    # per-image PSNR that evaluation reports (up to scale and an offset), so a badly fitted image
    # cannot outweigh many well fitted ones as it does under MSE. Below the floor a sample's term
    # is MSE-like; 1e-4 is 40 dB.
    log_mse: float = bounded(0.0, 0.0)
    log_mse_floor: float = bounded(1e-4, 0.0, low_open=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mse + self.lpips + self.l1 + self.log_mse <= 0:
            raise ParamsError("`train.loss`: mse, lpips, l1 and log_mse are all 0, so nothing would be trained; "
                              "set at least one > 0 (e.g. mse: 1.0)")

    def in_use(self) -> dict[str, float]:
        """The terms weighted > 0, with log_mse's floor where log_mse is one of them: what a run trains on."""
        used = {k: v for k, v in dataclasses.asdict(self).items() if v and k != "log_mse_floor"}
        if self.log_mse:
            used["log_mse_floor"] = self.log_mse_floor
        return used


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """``train:`` — decoder optimisation (defaults: a correct, fast recipe; see presets for the paper's)."""

    SECTION = "train"

    epochs: int = bounded(30, 1)
    batch_size: int = bounded(4, 1)
    lr: float = bounded(1e-4, 0.0, low_open=True)
    weight_decay: float = bounded(0.0, 0.0)
    scheduler: Literal["plateau", "cosine", "none"] = "plateau"
    plateau_patience: int = bounded(5, 0)  # ReduceLROnPlateau patience (epochs)
    plateau_factor: float = bounded(0.5, 0.0, 1.0, low_open=True, high_open=True)
    early_stop_patience: int = bounded(15, 1)  # epochs without val improvement before stopping
    max_minutes: float | None = bounded(None, 0.0, low_open=True)  # wall-clock budget: stops at the first step past it, validated and checkpointed
    device: str = device_field()
    seed: int = bounded(42, 0)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    ram_cache_gb: float = bounded(8.0, 0.0)  # load a split's features into RAM when it fits (the DIV2K ensemble: 6.1 GiB)
    # CUDA: hold a RAM-cached split on the GPU too when it fits this and half the free memory (batches gathered there)
    device_cache_gb: float = bounded(16.0, 0.0)
    samples_per_epoch: int | None = bounded(None, 1)  # per epoch: a seeded subset, or several passes (None = one pass)
    feature_crop: int | None = bounded(None, 1)  # train on random h×w feature crops (fully convolutional decoders)
    # auto: bf16 autocast on CUDA, float32 elsewhere | float32 | bfloat16 (also on a CPU with native bf16)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(_Section):
    """``evaluate:`` — test-split metrics and figures."""

    SECTION = "evaluate"

    refine: int = 0  # feature-matching refinement steps (0 = decoder only)
    refine_lr: float = bounded(0.01, 0.0, low_open=True)  # Adam's step on pixels (L-BFGS's steps: its line search)
    refine_tv: float = bounded(0.0, 0.0)
    refine_optimizer: RefineOptimizer = "adam"
    refine_smooth: int = 1  # optimise the correction on a grid this many times coarser (1 = per pixel)
    refine_samples: int = 1  # average this many refinements, each from a noisy start (posterior-mean estimate)
    refine_noise: float = 0.0  # std of each sample's start noise (pixels in [0, 1]); > 0 when refine_samples > 1
    refine_seed: int = 0  # seeds the start noise
    refine_backproject: int = 0  # decoder back-projection iterations after matching (0 = none)
    refine_backproject_step: float = 1.0  # each back-projection iteration's step
    grid_images: int = bounded(6, 1)
    device: str = device_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refine < 0:
            raise ParamsError(f"`evaluate.refine` = {self.refine} must be ≥ 0 (0 = decoder only)")
        check_refine_settings(self.refine_optimizer, self.refine_smooth, self.refine_samples, self.refine_noise,
                              self.refine_backproject, self.refine_backproject_step)


def check_refine_settings(optimizer: str, smooth: int, samples: int, noise: float, backproject: int = 0,
                          backproject_step: float = 1.0) -> None:
    """The rules for refinement settings, shared by ``evaluate:`` params and ``refine_images`` callers.

    Raises:
        ParamsError: naming the ``evaluate.refine_*`` key and its CLI flag.
    """
    if optimizer not in REFINE_OPTIMIZERS:
        raise ParamsError(f"`evaluate.refine_optimizer` = {optimizer!r} is not valid; "
                          f"choices: {', '.join(REFINE_OPTIMIZERS)} (flag --refine-optimizer)")
    if smooth < 1:
        raise ParamsError(f"`evaluate.refine_smooth` = {smooth} must be ≥ 1 (1 = every pixel; flag --refine-smooth)")
    if samples < 1:
        raise ParamsError(f"`evaluate.refine_samples` = {samples} must be ≥ 1 (flag --refine-samples)")
    if noise < 0:
        raise ParamsError(f"`evaluate.refine_noise` = {noise} must be ≥ 0 (flag --refine-noise)")
    if samples > 1 and noise == 0:
        raise ParamsError(f"`evaluate.refine_samples` = {samples} needs `evaluate.refine_noise` > 0 (flags --refine-samples, "
                          "--refine-noise): without noise every sample is the same refinement; e.g. 0.05")
    if backproject < 0:
        raise ParamsError(f"`evaluate.refine_backproject` = {backproject} must be ≥ 0 (0 = none; flag --refine-backproject)")
    if not backproject_step > 0:
        raise ParamsError(f"`evaluate.refine_backproject_step` = {backproject_step} must be > 0 "
                          "(flag --refine-backproject-step)")


@dataclasses.dataclass(frozen=True)
class StudyConfig(_Section):
    """``study:`` — the grid the ``featinv study`` command runs."""

    SECTION = "study"

    taps: tuple[str, ...] = ()
    decoders: tuple[str, ...] = ("transposed_conv", "frequency_aware", "wavelet", "attention")
    fusions: tuple[str, ...] = ("weighted", "concat", "attention")
    ensemble_taps: tuple[str, ...] = (
        "resnet34/layer1",
        "vgg16/block1",
        "vit_small/block1",
        "pvt_v2_b2/stage1",
    )
    epochs: int = bounded(3, 1)  # per run: a study trains many runs (16 by default, 44 published), each on a short budget
    samples_per_epoch: int | None = bounded(None, 1)  # per run, a seeded random subset of the training views
    # Every cell the same wall-clock training budget instead of epochs × samples (epochs then only cap it).
    max_minutes: float | None = bounded(None, 0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole of ``params.yaml``."""

    seed: int = 42
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    taps: tuple[str, ...] = ("vgg16/block1",)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    encoder: str = "vgg16/block1"  # a tap, or "ensemble"
    fusion: str | None = None  # with encoder: ensemble — weighted | concat | attention
    decoder: str = "transposed_conv"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Config:
        """Build from a parsed params.yaml mapping; see :func:`from_mapping`."""
        return from_mapping(cls, params)


C = TypeVar("C")


def from_mapping(cls: type[C], mapping: Mapping[str, Any] | None, path: str = "") -> C:
    """Build dataclass ``cls`` from ``mapping``, validating every key and type.

    Args:
        cls: a (frozen) dataclass type whose fields may themselves be dataclasses.
        mapping: parsed YAML; missing keys take the field default.
        path: dotted prefix of this section, for error messages.

    Raises:
        ParamsError: unknown key, wrong type, or a value outside a Literal's choices;
            the message names the full key path.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ParamsError(f"`{path or 'params'}` must be a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        where = f"`{path}`" if path else "params.yaml"
        raise ParamsError(
            f"unknown key(s) {', '.join(_join(path, k) for k in unknown)} in {where}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {name: _coerce(hints[name], mapping[name], _join(path, name)) for name in mapping}
    return cls(**kwargs)


def load_params(path: str | Path = "params.yaml") -> Config:
    """Read and validate a params.yaml file.

    Raises:
        ParamsError: the file is missing, not YAML, or has invalid keys/values.
    """
    path = Path(path)
    try:
        with path.open() as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    try:
        return Config.from_params(raw or {})
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``hint``; convert lists to tuples and ints to floats."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, path)
            except ParamsError as exc:
                errors.append(str(exc))
        # The option of the value's own kind explains best (a mapping with a bad entry: that entry).
        specific = [e for e in errors if not e.startswith(f"`{path}` must be a")]
        if len(errors) == 1 or len(specific) == 1:
            raise ParamsError(errors[0] if len(errors) == 1 else specific[0])
        raise ParamsError(f"`{path}`: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ParamsError(
                f"`{path}` = {value!r} is not valid; choices: {', '.join(map(str, choices))}"
            )
        return value
    if origin is dict:
        key_hint, value_hint = get_args(hint)
        if not isinstance(value, Mapping):
            raise ParamsError(f"`{path}` must be a mapping, got {value!r}")
        return {_coerce(key_hint, k, path): _coerce(value_hint, v, _join(path, str(k))) for k, v in value.items()}
    if origin is tuple:
        (item_hint, _ellipsis) = get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"`{path}` must be a list, got {value!r}")
        return tuple(_coerce(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"`{path}` must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"`{path}` must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"`{path}` must be a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"`{path}` must be true or false, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {path}")  # internal: a new field type


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``KEY=VALUE`` overrides (dotted keys, YAML values) and re-validate.

    Raises:
        ParamsError: malformed override, unknown key, or invalid value.
    """
    raw = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected KEY=VALUE, e.g. decoder=wavelet")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {item!r}: `{key}` is not a param")
            node = node[part]
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ParamsError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return Config.from_params(raw)
