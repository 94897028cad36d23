"""The feature store: one encoder tap's activations for every sample of every split.

Layout of ``data/features/<tap>.zarr``::

    train  (N_train, C, h, w) float16    one sample per chunk, blosc-compressed
    val    (N_val,   C, h, w) float16
    test   (N_test,  C, h, w) float16
    attrs: fingerprint (+ its parts), tap spec, weights, device, fallbacks, complete

The fingerprint covers the tap, the weights id, the image store's fingerprint
(preprocessing, ids, pixel content) and the package versions that change the
numerics; readers compare it with what their params ask for and refuse a
mismatch, saying what differs.

Extraction writes under ``<store>.partial`` and moves it into place only when
every split is written; killed half-way, a re-run resumes from the recorded
progress (fixed batch boundaries, so the result is identical).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from featinv.config import ExtractConfig
from featinv import precision
from featinv.device import resolve_device
from featinv.errors import FeatinvError, StorageError, StoreIncompleteError, StoreMismatchError
from featinv.mismatch import setting_differences, short_repr
from featinv.data.image_store import ImageStore
from featinv.data.sources import SPLITS
from featinv.encoders.taps import Normalisation, TapSpec, build_encoder, resolve_normalisation, resolve_tap, weights_for_tap, weights_id
from featinv.store.prefetch import prefetched
from featinv.zarr_utils import commit_dir, compressors_for, digest, open_group, partial_path, remove_tree

__all__ = ["FeatureStore", "ExtractReport", "extract_features", "expected_fingerprint", "decoder_input_differences",
           "encoder_normalisation", "store_path"]

log = logging.getLogger(__name__)

# 2: random VGG-16 weights come from the convolutional trunk alone (different seeded values).
# 3: each encoder's own input normalisation; the image preprocessing in the fingerprint.
FORMAT_VERSION = 3
NUMERIC_PACKAGES = ("torch", "torchvision", "timm")
# What a decoder's input depends on: a run may be evaluated on any store that agrees on these,
# whatever images it holds (the fingerprint's "images" and "versions" may differ).
DECODER_INPUT_PARTS = ("format", "tap", "shape", "weights", "normalisation", "preprocessing")
PREPROCESSING_KEYS = ("resize", "crop", "interpolation")


@dataclasses.dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract_features` did."""

    path: Path
    tap: str
    counts: dict[str, int]
    computed: int  # samples run through the encoder in this call (0 when reused)
    reused: bool
    device: str
    seconds: float
    forward_seconds: float  # time inside the encoder alone (for the overhead benchmark; on CUDA: queuing it)


def store_path(features_dir: str | Path, tap: str) -> Path:
    """``<features_dir>/<tap>.zarr`` (a tap ``vgg16/block1`` nests one folder).

    The tap name is used as it is — ``timm:convnext_tiny/stages.0`` keeps its colon — because
    dvc.yaml's extract stages write ``data/features/${item}.zarr`` and DVC cannot rewrite names.
    """
    return Path(features_dir) / f"{tap}.zarr"


def expected_fingerprint(spec: TapSpec, cfg: ExtractConfig, images: ImageStore) -> dict:
    """The fingerprint parts a store of ``spec`` for these params and images must carry (no encoder is built).

    The image store enters twice: its fingerprint (which images, which pixels) and its
    preprocessing, so a mismatch names the setting (``preprocessing.resize``) and not only a hash.

    Raises:
        ParamsError / WeightsUnavailableError: a bad ``extract.weights`` or ``extract.normalisation``.
    """
    return {
        "format": FORMAT_VERSION,
        "tap": spec.name,
        "shape": list(spec.shape),
        "weights": weights_id(spec, cfg.weights, cfg.weights_seed),
        "normalisation": resolve_normalisation(spec, cfg.normalisation).to_dict(),
        "images": images.fingerprint,
        "preprocessing": {k: images.attrs["preprocessing"].get(k) for k in PREPROCESSING_KEYS},
        "versions": {p: importlib.metadata.version(p) for p in NUMERIC_PACKAGES},
    }


def encoder_normalisation(recorded: dict | None) -> Normalisation:
    """The normalisation a store or checkpoint recorded (before format 3, always ImageNet's)."""
    if recorded is None:
        return resolve_normalisation(resolve_tap("vgg16/block1"), "imagenet")
    return Normalisation(recorded["name"], tuple(recorded["mean"]), tuple(recorded["std"]))


def decoder_input_differences(store_parts: dict, trained_parts: dict) -> list[str]:
    """How a store's features differ from those a run was trained on, in what a decoder depends on."""
    pick = (lambda parts: {k: parts.get(k) for k in DECODER_INPUT_PARTS})
    return setting_differences(pick(store_parts), pick(trained_parts), has="store has",
                               wants="the run was trained on", show=short_repr)


class FeatureStore:
    """Read access to a complete feature store, checked against an expected fingerprint.

    Args:
        path: the store.
        expected: fingerprint parts from :func:`expected_fingerprint`; None skips the check.

    Raises:
        StoreIncompleteError: missing, partial, or not a featinv feature store.
        StoreMismatchError: the fingerprint differs; the message lists each differing part.
    """

    def __init__(self, path: str | Path, expected: dict | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            hint = " (an interrupted extraction? re-run it to resume)" if partial_path(self.path).exists() else ""
            raise StoreIncompleteError(
                f"{self.path}: no feature store here{hint}; run `dvc repro` (or `featinv extract`)"
            )
        self.group = open_group(self.path)
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("featinv") != "features" or not self.attrs.get("complete"):
            raise StoreIncompleteError(f"{self.path}: not a complete featinv feature store")
        short = _short_splits(self.group, self.attrs)
        if short:
            raise StoreIncompleteError(
                f"{self.path}: {'; '.join(short)}, so the store is incomplete; re-extract it "
                "(delete it, then `dvc repro extract@<tap>` or `featinv extract`)"
            )
        if expected is not None:
            differences = setting_differences(self.attrs["fingerprint_parts"], expected, has="store has",
                                              wants="params want", show=short_repr)
            if differences:
                raise StoreMismatchError(
                    f"{self.path} was extracted with different settings: {'; '.join(differences)}. "
                    "Re-extract it (`dvc repro extract@<tap>` or `featinv extract`)."
                )

    @property
    def spec(self) -> TapSpec:
        return TapSpec(**self.attrs["tap"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.attrs["tap"][k] for k in ("channels", "height", "width"))

    def build_encoder(self, device: str | torch.device = "cpu"):
        """The frozen encoder that wrote this store (same tap, weights and normalisation)."""
        weights = self.attrs.get("weights_setting")
        if weights is None:
            raise StoreIncompleteError(f"{self.path}: made before stores recorded their weights setting; "
                                       "re-extract it (`featinv extract`)")
        return build_encoder(self.spec, weights, self.attrs["weights_seed"], device,
                             normalisation=encoder_normalisation(self.attrs.get("normalisation")))

    def split(self, name: str):
        """The (N, C, h, w) float16 Zarr array of split ``name``."""
        return self.group[name]

    def count(self, name: str) -> int:
        return int(self.group[name].shape[0])


def extract_features(
    images: str | Path,
    tap: str,
    out: str | Path,
    cfg: ExtractConfig,
    progress: Callable[[int, int], None] | None = None,
    splits: Sequence[str] = SPLITS,
) -> ExtractReport:
    """Run the encoder truncated at ``tap`` once over every sample; write the store.

    Args:
        images: the prepared image store.
        tap: tap name.
        out: the feature store to write.
        cfg: the ``extract`` params.
        progress: called as ``progress(done, total)`` after each batch.
        splits: which splits to extract.

    Returns:
        An :class:`ExtractReport`; ``reused`` is True when ``out`` already matched.

    Raises:
        StoreIncompleteError: the image store is missing.
        WeightsUnavailableError / UnknownNameError / ParamsError: bad tap or weights.
    """
    start = time.perf_counter()
    out = Path(out)
    image_store = ImageStore(images)
    spec = resolve_tap(tap)
    parts = expected_fingerprint(spec, cfg, image_store)
    counts = {s: image_store.count(s) for s in splits}

    if _matches(out, parts):
        log.info("%s is up to date (fingerprint matches): nothing to extract", out)
        return ExtractReport(out, tap, counts, 0, True, "none", time.perf_counter() - start, 0.0)

    device, fallbacks = resolve_device(cfg.device, "extract.device")
    precision.setup(device)
    partial = partial_path(out)
    group = _open_or_reset_partial(partial, parts)
    progress_done = dict(group.attrs.get("written", {}))
    for split in splits:
        if split not in group:
            group.create_array(
                split,
                shape=(counts[split], *spec.shape),
                chunks=(min(cfg.chunk_samples, max(counts[split], 1)), *spec.shape),
                dtype="float16",
                compressors=compressors_for(cfg.codec, cfg.clevel),
                fill_value=0,
            )
        progress_done.setdefault(split, 0)

    encoder = precision.channels_last(
        build_encoder(spec, cfg.weights, cfg.weights_seed, device, normalisation=cfg.normalisation), device)
    total = sum(counts.values())
    done = sum(progress_done[s] for s in splits)
    computed = 0
    forward_seconds = 0.0
    writer = _Writer(group, progress_done)
    try:
        for split in splits:
            # Every chunk is written, none first compared with the fill value: features are never one
            # whole all-zero map, and that float16 comparison slowed the writes 1.6× (zstd) to 4.2×
            # (uncompressed) on a 2-core box (benchmarks/store_write.py).
            array = group[split].with_config({"write_empty_chunks": True})
            ranges = [(b, min(b + cfg.batch_size, counts[split]))
                      for b in range(progress_done[split], counts[split], cfg.batch_size)]
            # closing(): an error mid-split stops the read-ahead thread here, not at garbage collection
            with contextlib.closing(_read_ahead(image_store.pixels(split), ranges, device)) as pixel_batches:
                for (begin, end), pixels in zip(ranges, pixel_batches):
                    batch = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
                    t0 = time.perf_counter()
                    feats = _forward(encoder, batch, device)
                    forward_seconds += time.perf_counter() - t0
                    writer.put(split, array, begin, end, feats)
                    computed += end - begin
                    done += end - begin
                    if progress:
                        progress(done, total)
        writer.close()
    except OSError as exc:  # disk full, permission denied, read-only filesystem
        writer.close(raise_errors=False)
        raise StorageError(
            f"{partial}: cannot write the feature store ({exc.strerror or exc}); free space there or point "
            "--out elsewhere, then re-run: the samples already written are kept and resumed"
        ) from None
    except BaseException:
        writer.close(raise_errors=False)
        raise
    # Commit only what is verifiably whole: every split written up to its sample count.
    short = _short_splits(group, {"written": progress_done, "image_ids": {s: image_store.ids(s) for s in splits}})
    if short:
        raise StoreIncompleteError(f"{partial}: {'; '.join(short)}; not committing it (internal error: "
                                   "extraction ended early)")
    group.attrs.update(
        {
            "featinv": "features",
            "format": FORMAT_VERSION,
            "tap": spec.to_dict(),
            "weights": parts["weights"],
            # What rebuilds this encoder (refinement, `featinv reconstruct`): the setting for this tap.
            "weights_setting": weights_for_tap(cfg.weights, spec.name),
            "weights_seed": cfg.weights_seed,
            "normalisation": parts["normalisation"],
            "fingerprint_parts": parts,
            "fingerprint": digest(parts),
            "image_ids": {s: image_store.ids(s) for s in splits},
            "device": str(device),
            "fallbacks": fallbacks,
            "codec": {"name": cfg.codec, "clevel": cfg.clevel, "chunk_samples": cfg.chunk_samples},
            "complete": True,
        }
    )
    commit_dir(partial, out)
    seconds = time.perf_counter() - start
    log.info("extracted %s: %d samples in %.1fs on %s", out, computed, seconds, device)
    return ExtractReport(out, tap, counts, computed, False, str(device), seconds, forward_seconds)


# ------------------------------------------------------------------------------------ helpers


def _forward(encoder: torch.nn.Module, batch_uint8: torch.Tensor, device: torch.device) -> _HostFeatures:
    with torch.inference_mode():
        pixels01 = precision.channels_last(batch_uint8.float().div_(255.0), device)
        # float16 autocast here, not training's bfloat16: the features are stored as float16
        # anyway, and bf16's 8-bit mantissa would put ~8x the rounding error into the cache
        # (0.3-0.5 % vs 0.04-0.07 % relative on vgg16/block1, `python -m benchmarks.gpu`).
        with precision.autocast(device, dtype=torch.float16):
            feats = encoder(pixels01)
        stored = feats.half().contiguous()  # float16 storage: anything beyond ±65504 becomes inf
        return _HostFeatures.of(stored, torch.isfinite(stored).all(), encoder.spec.name)


@dataclasses.dataclass
class _HostFeatures:
    """One batch's float16 features on their way to the host, looked at only when they are written.

    On CUDA the copy goes to page-locked memory without the host waiting for it, so the GPU
    computes the next batch while this one is copied and written (a plain ``.cpu()`` waited
    for every batch, at pageable-copy speed). The overflow check travels with the batch.
    """

    feats: torch.Tensor
    finite: torch.Tensor  # 0-d bool
    done: torch.cuda.Event | None
    tap: str

    @classmethod
    def of(cls, stored: torch.Tensor, finite: torch.Tensor, tap: str) -> _HostFeatures:
        if stored.device.type != "cuda":
            return cls(stored.cpu(), finite.cpu(), None, tap)
        host = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True).copy_(stored, non_blocking=True)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(host, flag, done, tap)

    def numpy(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        if not bool(self.finite):
            raise FeatinvError(f"tap {self.tap}: activations overflow float16 storage")
        return self.feats.numpy()


def _read_ahead(pixels, ranges: list[tuple[int, int]], device: torch.device) -> Iterator[torch.Tensor]:
    """``pixels[begin:end]`` of each range as a tensor, in order, each read while the one before is used.

    For CUDA in page-locked memory, so the copy to the device does not wait for the GPU.
    """
    def read(bounds: tuple[int, int]) -> torch.Tensor:
        array = np.asarray(pixels[bounds[0] : bounds[1]])
        return precision.pinned(array) if device.type == "cuda" else torch.from_numpy(array)

    return prefetched(read, ranges, ahead=1, name="featinv-pixels")


class _Writer:
    """Writes batches to Zarr on a background thread, so compression overlaps compute.

    Progress (samples written per split) is recorded in the partial store's attrs
    only after a batch is on disk, which is what makes resuming exact.
    """

    def __init__(self, group, written: dict[str, int]) -> None:
        self.group = group
        self.written = written
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featinv-zarr-writer", daemon=True)
        self.thread.start()

    def put(self, split: str, array, begin: int, end: int, feats: _HostFeatures) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((split, array, begin, end, feats))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            split, array, begin, end, feats = item
            try:
                array[begin:end] = feats.numpy()
                self.written[split] = end
                self.group.attrs.update({"written": dict(self.written)})
            except BaseException as exc:  # surfaced on the main thread
                self.error = exc

    def close(self, raise_errors: bool = True) -> None:
        self.queue.put(None)
        self.thread.join()
        if raise_errors and self.error is not None:
            raise self.error


def _short_splits(group, attrs: dict) -> list[str]:
    """``split 'train' has 12 samples written of 96`` for every split not fully written."""
    written = attrs.get("written")
    problems = []
    for split, ids in (attrs.get("image_ids") or {}).items():
        n_stored = int(group[split].shape[0]) if split in group else 0
        n_written = n_stored if written is None else int(written.get(split, 0))
        if n_stored != len(ids) or n_written != len(ids):
            problems.append(f"split {split!r} has {n_written} samples written of {len(ids)}")
    return problems


def _matches(path: Path, parts: dict) -> bool:
    try:
        FeatureStore(path, expected=parts)
        return True
    except FeatinvError:
        return False


def _open_or_reset_partial(partial: Path, parts: dict):
    if (partial / "zarr.json").is_file():
        group = open_group(partial, mode="r+")
        if group.attrs.get("resume_fingerprint") == digest(parts):
            log.info("resuming interrupted extraction in %s: %s", partial, dict(group.attrs.get("written", {})))
            return group
        log.info("discarding %s: it was started with different settings", partial)
    remove_tree(partial)
    group = open_group(partial, mode="w")
    group.attrs.update({"resume_fingerprint": digest(parts), "written": {}})
    return group
