"""Tests for featinv.evaluation.baselines: the non-learned reference reconstructions and their scores."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featinv.evaluation.baselines import (
    baseline_metrics,
    baseline_reconstructions,
    dataset_mean_image,
    mean_colour,
    thumbnail,
)
from featinv.errors import DataSourceError, ParamsError
from featinv.evaluation.metrics import PSNR_CAP_DB


@pytest.fixture(scope="module")
def astronaut01() -> torch.Tensor:
    """scikit-image's astronaut photograph, area-resized to (1, 3, 224, 224) in [0, 1]."""
    from skimage.data import astronaut

    pixels = torch.from_numpy(astronaut()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return F.interpolate(pixels, size=(224, 224), mode="area")


def test_thumbnail_at_full_resolution_reproduces_the_image(astronaut01):
    assert torch.allclose(thumbnail(astronaut01, (224, 224)), astronaut01, atol=1e-5)


def test_thumbnail_at_a_coarser_grid_scores_lower(astronaut01):
    psnr = {g: baseline_metrics(astronaut01, (g, g), astronaut01[0])[f"thumbnail_{g}x{g}"]["psnr"]["mean"]
            for g in (7, 28, 56)}
    assert psnr[7] < psnr[28] < psnr[56]
    out = thumbnail(astronaut01, (7, 7))
    assert out.shape == astronaut01.shape and out.min() >= 0 and out.max() <= 1


def test_mean_colour_of_a_constant_image_is_exact():
    constant = torch.empty(2, 3, 32, 32)
    constant[:, 0], constant[:, 1], constant[:, 2] = 0.2, 0.5, 0.9
    assert torch.allclose(mean_colour(constant), constant)
    scores = baseline_metrics(constant, (4, 4), torch.zeros(3, 32, 32))["mean_colour"]
    assert scores["psnr"]["min"] > 60 or math.isinf(scores["psnr"]["min"])


def test_mean_colour_is_each_images_own_mean(astronaut01):
    pair = torch.cat([astronaut01, 1 - astronaut01])
    out = mean_colour(pair)
    assert torch.allclose(out[:, :, 0, 0], pair.mean(dim=(2, 3)))
    assert torch.equal(out[:, :, 5, 7], out[:, :, 100, 3])


@pytest.mark.parametrize("chunk_images", [1, 3, 64])
def test_dataset_mean_in_chunks_equals_numpy_mean(tmp_path, chunk_images):
    import zarr

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 16, 12, 3), dtype=np.uint8)
    store = zarr.create_array(tmp_path / "train.zarr", shape=pixels.shape, chunks=(3, 16, 12, 3), dtype="uint8")
    store[:] = pixels
    expected = pixels.astype(np.float64).mean(axis=0).transpose(2, 0, 1) / 255
    for source in (pixels, store):
        mean = dataset_mean_image(source, chunk_images=chunk_images)
        assert mean.shape == (3, 16, 12) and mean.dtype == torch.float32
        np.testing.assert_allclose(mean.numpy(), expected, atol=1e-6)


def test_baselines_schema_matches_the_run_metrics(astronaut01):
    targets = torch.cat([astronaut01, astronaut01.flip(-1)])
    train_mean = targets.mean(0)
    recons = baseline_reconstructions(targets, (14, 14), train_mean)
    assert set(recons) == {"dataset_mean", "mean_colour", "thumbnail_14x14"}
    assert all(r.shape == targets.shape for r in recons.values())
    assert torch.equal(recons["dataset_mean"][0], train_mean)
    metrics = baseline_metrics(targets, (14, 14), train_mean)
    assert set(metrics) == set(recons)
    for scores in metrics.values():
        assert set(scores) == {"psnr", "ssim", "grid"} and scores["grid"] == [14, 14]
        for name in ("psnr", "ssim"):
            assert set(scores[name]) == {"mean", "std", "min", "max"}
            assert scores[name]["max"] <= PSNR_CAP_DB
    # The thumbnail at the tap's grid keeps far more than any constant image.
    assert metrics["thumbnail_14x14"]["psnr"]["mean"] > metrics["mean_colour"]["psnr"]["mean"]


def test_bad_inputs_are_clear_errors(astronaut01):
    with pytest.raises(ParamsError, match=r"grid_hw is \(300, 300\)"):
        thumbnail(astronaut01, (300, 300))
    with pytest.raises(ParamsError, match="targets01 has shape"):
        mean_colour(astronaut01[0])
    with pytest.raises(ParamsError, match="train_mean has shape"):
        baseline_reconstructions(astronaut01, (7, 7), torch.zeros(3, 8, 8))
    with pytest.raises(DataSourceError, match="no images"):
        dataset_mean_image(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(DataSourceError, match="uint8"):
        dataset_mean_image(np.zeros((2, 8, 8, 3), np.float32))
