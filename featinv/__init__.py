"""featinv — how much of an image do a network's features give away?

Reconstructs RGB images from the activations of frozen, pre-trained encoders
(feature inversion) with learned decoders trained from a Zarr feature cache,
and compares encoders, layers, decoders and fusions on PSNR / SSIM / LPIPS.

The subpackages follow the data's way through the product:
``data`` (images in) → ``encoders`` (frozen taps) → ``store`` (the feature cache) →
``decoders`` + ``training`` → ``evaluation`` (metrics, baselines, refinement) → ``study``
(grid, leaderboard, executors). ``config``, ``errors``, ``registry``, ``console``, ``device``,
``precision``, ``host_memory``, ``presets`` and ``zarr_utils`` serve them all; ``cli`` is the command.
"""

__version__ = "0.1.0"
