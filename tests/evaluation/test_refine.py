"""Feature-matching refinement and the quick overfit check for featinv's decoder."""

import torch
import torch.nn.functional as F

import pytest

from featinv.decoders.local_mlp import LocalMLPDecoder
from featinv.decoders.residual_shuffle import ResidualShuffleDecoder
from featinv.evaluation.metrics import image_metrics
from featinv.evaluation.refine import choose_refinement, refine_images, total_variation
from featinv.encoders.taps import build_encoder

from conftest import photo


def _image(size=64, seed=0):
    return torch.from_numpy(photo(size, seed).copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_refinement_lowers_feature_error_by_a_clear_margin():
    encoder = build_encoder("vgg16/block1")
    target = _image()
    with torch.no_grad():
        feats = encoder(target)
    start = F.avg_pool2d(target, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # a blurry guess
    refined, report = refine_images(start, [encoder], [feats], steps=40, lr=0.01)
    assert report["feature_loss_final"] < 0.3 * report["feature_loss_initial"]
    assert image_metrics(target, refined)[0]["psnr"] > image_metrics(target, start)[0]["psnr"]
    assert refined.min() >= 0 and refined.max() <= 1


def test_refinement_stops_early_on_a_plateau():
    encoder = build_encoder("resnet34/layer1")
    target = _image(seed=1)
    with torch.no_grad():
        feats = encoder(target)
    _, report = refine_images(target, [encoder], [feats], steps=200, lr=1e-6)
    assert report["steps"] < 200


def test_selection_turns_refinement_off_when_it_cannot_help():
    encoder = build_encoder("vgg16/block1")
    target = _image(seed=2)
    with torch.no_grad():
        feats = encoder(target)
    chosen, scores = choose_refinement(target, target, [encoder], [feats], [{"lr": 0.05, "tv": 0.0}], steps=3)
    assert chosen is None and len(scores) == 1  # the decoder output is already exact


def test_total_variation_of_a_flat_image_is_zero():
    assert float(total_variation(torch.full((1, 3, 8, 8), 0.3))) == 0.0


# Small heads keep this quick; the test is about the trainable network on top of the warm start.
FEATINV_DECODERS = {
    "residual_shuffle": lambda shape: ResidualShuffleDecoder(shape, out_size=64, random_features=64),
    "local_mlp": lambda shape: LocalMLPDecoder(shape, out_size=64, hidden=128),
}


@pytest.mark.parametrize("name", list(FEATINV_DECODERS))
def test_featinv_decoder_overfits_two_images_above_30_db(name):
    torch.manual_seed(0)
    encoder = build_encoder("vgg16/block1")
    images = torch.cat([_image(64, 3), _image(64, 4)])
    with torch.no_grad():
        feats = encoder(images).half().float()
    decoder = FEATINV_DECODERS[name](tuple(feats.shape[1:]))
    decoder.warm_start([(feats, images)], keep=1.0)  # its closed-form start, as in training
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    for _ in range(100):
        loss = F.mse_loss(decoder(feats), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    with torch.no_grad():
        psnr = [r["psnr"] for r in image_metrics(images, decoder(feats))]
    assert min(psnr) > 30, psnr


def _top_octave_share(correction):
    coarse = F.interpolate(F.avg_pool2d(correction, 2), scale_factor=2, mode="bilinear", align_corners=False)
    return float((correction - coarse).pow(2).sum() / correction.pow(2).sum())


def test_lbfgs_refinement_lowers_feature_error_and_smooth_leaves_the_finest_octave_alone():
    encoder = build_encoder("vgg16/block1")
    target = _image(seed=5)
    with torch.no_grad():
        feats = encoder(target)
    start = F.avg_pool2d(target, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    share = {}
    for smooth in (1, 2):
        refined, report = refine_images(start, [encoder], [feats], steps=10, optimizer="lbfgs", smooth=smooth)
        assert report["optimizer"] == "lbfgs" and report["smooth"] == smooth
        assert report["feature_loss_final"] < 0.5 * report["feature_loss_initial"]
        assert refined.min() >= 0 and refined.max() <= 1
        share[smooth] = _top_octave_share(refined - start)
    # A bilinear upsampling still leaks some pixel-scale energy (measured 0.19 vs 0.34 here); a per-pixel
    # correction ignoring `smooth` would give the same share twice.
    assert share[2] < 0.7 * share[1], share


def test_lbfgs_refines_each_image_as_if_it_were_alone():
    """A reconstruction must not depend on which other images share its batch."""
    encoder = build_encoder("vgg16/block1")
    targets = torch.cat([_image(seed=1), _image(seed=2)])
    with torch.no_grad():
        feats = encoder(targets)
    start = F.avg_pool2d(targets, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    together, report = refine_images(start, [encoder], [feats], steps=5, optimizer="lbfgs")
    alone, _ = refine_images(start[:1], [encoder], [feats[:1]], steps=5, optimizer="lbfgs")
    assert torch.allclose(together[:1], alone, atol=1e-6)
    assert len(report["steps_per_sample"]) == 2  # one L-BFGS run per image


class _Cube(torch.nn.Module):
    """A toy encoder whose curvature grows away from mid-grey, so a quasi-Newton step can overshoot."""

    def forward(self, pixels01):
        return (2 * pixels01 - 1) ** 3


def test_lbfgs_shortens_an_overshooting_step_instead_of_stalling():
    truth = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    encoder = _Cube()
    start = 0.5 + 0.1 * (truth - 0.5)  # flat near the start: the first curvature estimate is far too low
    _, report = refine_images(start, [encoder], [encoder(truth)], steps=20, optimizer="lbfgs", early_stop=False)
    # Without a line search the first rejected step repeats forever and the loss does not fall.
    assert report["feature_loss_final"] < 0.2 * report["feature_loss_initial"]


def test_decoder_back_projection_restores_what_the_decoder_reads_as_missing():
    # A linear toy: the "tap" is 4× average pooling, the "decoder" upsamples it at half contrast.
    # Each back-projection step x ← x + D(f) − D(E(x)) moves x toward up(f), the best the tap allows.
    truth = _image(seed=4)
    encoder = torch.nn.AvgPool2d(4)

    def decoder(feats):
        return 0.25 + 0.5 * F.interpolate(feats[0], scale_factor=4, mode="nearest")

    feats = encoder(truth)
    start = decoder([feats])
    best = F.interpolate(feats, scale_factor=4, mode="nearest")
    settings = {"steps": 1, "lr": 1e-9, "decoder": decoder}
    plain, _ = refine_images(start, [encoder], [feats], **settings)
    back, report = refine_images(start, [encoder], [feats], backproject=8, **settings)
    assert report["backproject"] == 8 and report["backproject_step"] == 1.0
    assert image_metrics(best, back)[0]["psnr"] > image_metrics(best, plain)[0]["psnr"] + 20
    assert image_metrics(truth, back)[0]["psnr"] > image_metrics(truth, plain)[0]["psnr"] + 3
    with pytest.raises(ValueError, match="needs decoder="):
        refine_images(start, [encoder], [feats], steps=1, backproject=1)


def test_refinement_rejects_an_unknown_optimizer():
    encoder = build_encoder("vgg16/block1")
    with pytest.raises(ValueError, match="choices: adam, lbfgs"):
        refine_images(_image(), [encoder], [encoder(_image())], steps=1, optimizer="sgd")


def test_averaging_noisy_refinements_cancels_detail_the_features_do_not_determine():
    # On vgg16/block3 (three max-pools deep) the start noise largely survives refinement;
    # each sample's noise is different, so the mean of four is clearly closer to the truth.
    encoder = build_encoder("vgg16/block3")
    target = _image(seed=3)
    with torch.no_grad():
        feats = encoder(target)
    settings = {"steps": 3, "optimizer": "lbfgs", "noise": 0.1, "seed": 7}
    single, _ = refine_images(target, [encoder], [feats], samples=1, **settings)
    mean, report = refine_images(target, [encoder], [feats], samples=4, **settings)
    assert report["samples"] == 4 and len(report["steps_per_sample"]) == 4
    assert image_metrics(target, mean)[0]["psnr"] > image_metrics(target, single)[0]["psnr"] + 3
    again, _ = refine_images(target, [encoder], [feats], samples=4, **settings)
    assert torch.equal(mean, again)  # the seed fixes the start noise


def test_an_image_gets_the_same_noisy_starts_alone_and_in_a_batch():
    """Averaged refinements: an image's start noise is its own, whatever the batch around it."""
    encoder = build_encoder("vgg16/block1")
    targets = torch.cat([_image(seed=1), _image(seed=2), _image(seed=4)])
    with torch.no_grad():
        feats = encoder(targets)
    settings = {"steps": 1, "samples": 4, "noise": 0.1, "seed": 7}  # two antithetic pairs: two draws
    together, _ = refine_images(targets, [encoder], [feats], **settings)  # Adam: per pixel, no coupling
    first_two, _ = refine_images(targets[:2], [encoder], [feats[:2]], **settings)
    assert torch.allclose(together[:2], first_two, atol=1e-3)  # Adam's eps couples only at ~1e-4


def test_several_samples_without_noise_are_refused():
    encoder = build_encoder("vgg16/block1")
    with pytest.raises(ValueError, match="refine_noise"):
        refine_images(_image(), [encoder], [encoder(_image())], steps=1, samples=3)
