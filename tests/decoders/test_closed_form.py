"""The closed-form warm start: a ridge fit of "k×k feature window → the pixel block it covers"."""

import pytest
import torch
import torch.nn.functional as F

from featinv.decoders import closed_form
from featinv.decoders.closed_form import fit_window_ridge


@pytest.mark.parametrize("kernel, padding, chunk_rows", [(3, "replicate", 8192), (3, "zeros", 8192), (1, "zeros", 8192),
                                                        (3, "replicate", 40)])  # 40: products over 2 batches at a time
def test_the_ridge_fit_solves_the_normal_equations_of_the_sampled_windows(kernel, padding, chunk_rows, monkeypatch):
    monkeypatch.setattr(closed_form, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    factor = 2
    batches = [(torch.randn(2, 4, 6, 5), torch.rand(2, 3, 12, 10)) for _ in range(3)]
    solution, rows = fit_window_ridge(batches, lambda f: f, kernel=kernel, factor=factor, keep=0.5, ridge=1e-4,
                                      seed=3, padding=padding)
    # Reference: unfold every window, take the same seeded sample of positions per batch, solve.
    generator = torch.Generator().manual_seed(3)
    xs, ys = [], []
    for feats, pixels in batches:
        z = F.pad(feats, [kernel // 2] * 4, mode="constant" if padding == "zeros" else padding)
        x = F.unfold(z, kernel).transpose(1, 2).reshape(-1, 4 * kernel * kernel)
        y = F.pixel_unshuffle(pixels, factor).flatten(2).transpose(1, 2).reshape(x.shape[0], -1)
        pick = torch.randperm(x.shape[0], generator=generator)[: int(x.shape[0] * 0.5)]
        xs.append(x[pick]), ys.append(y[pick])
    design = torch.cat([torch.cat(xs), torch.ones(rows, 1)], 1).double()
    xtx = design.T @ design
    expected = torch.linalg.solve(xtx + 1e-4 * xtx.diagonal().mean() * torch.eye(len(xtx), dtype=torch.float64),
                                  design.T @ torch.cat(ys).double())
    assert rows == 3 * 30 and solution.shape == (4 * kernel * kernel + 1, 3 * factor**2)
    torch.testing.assert_close(solution, expected.float(), rtol=1e-4, atol=1e-5)


def test_the_ridge_fit_recovers_pixels_that_are_a_linear_function_of_the_window():
    torch.manual_seed(0)
    weight = torch.randn(12, 4, 3, 3) * 0.1  # window (4 channels, 3×3) → 3 colours × 2×2 block
    feats = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    batches = [(f, F.pixel_shuffle(F.conv2d(f, weight, torch.full((12,), 0.5), padding=1), 2)) for f in feats]
    solution, _ = fit_window_ridge(batches, lambda f: f, kernel=3, factor=2, keep=1.0, ridge=1e-8)
    torch.testing.assert_close(solution[:-1].T.reshape_as(weight), weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(solution[-1], torch.full((12,), 0.5), atol=1e-4, rtol=0)

