"""featinv — how much of an image do a network's features give away?

Reconstructs RGB images from the activations of frozen, pre-trained encoders
(feature inversion) with learned decoders trained from a Zarr feature cache,
and compares encoders, layers, decoders and fusions on PSNR / SSIM / LPIPS.
"""

__version__ = "0.1.0"
