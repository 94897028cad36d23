"""Shared fixtures: a tiny prepared image store and one extracted tap, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featinv.config import Config, DataConfig, ExtractConfig
from featinv.store.feature_store import extract_features, store_path
from featinv.data.image_store import prepare_images

REPO = Path(__file__).resolve().parents[1]
# <repo>/../shared/weights: genuine ImageNet weights, read in place (CI clones the repo next to shared/).
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
TINY_DATA = DataConfig(source="sample", max_images=10, train_views=2)
TINY_EXTRACT = ExtractConfig(device="cpu", batch_size=4)


@pytest.fixture(autouse=True)
def no_model_downloads(monkeypatch):
    """Tests reach no address beyond loopback: torch hub downloads (LPIPS' AlexNet) fail as offline."""
    import torch.hub

    def offline(url, *args, **kwargs):
        raise OSError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """A prepared image store: 10 sample tiles → 12 train views, 2 val, 2 test."""
    path = tmp_path_factory.mktemp("prepared") / "images.zarr"
    prepare_images(TINY_DATA, seed=42, out=path)
    return path


@pytest.fixture(scope="session")
def tiny_features(tiny_images, tmp_path_factory) -> Path:
    """data/features with the vgg16/block1 store of ``tiny_images``."""
    features = tmp_path_factory.mktemp("features")
    extract_features(tiny_images, "vgg16/block1", store_path(features, "vgg16/block1"), TINY_EXTRACT)
    return features


@pytest.fixture
def tiny_config() -> Config:
    return Config.from_params({
        "data": {"source": "sample", "max_images": 10, "train_views": 2},
        "taps": ["vgg16/block1"],
        "extract": {"device": "cpu", "batch_size": 4},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu"},
        "evaluate": {"device": "cpu", "grid_images": 2},
    })


def write_image(path: Path, array: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    """Save ``array`` as an image file (helper for bad-input tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **save_kwargs)
    return path


def photo(size: int = 240, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 image (more natural than white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
