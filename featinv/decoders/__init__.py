"""Decoders: feature maps (N, C, h, w) → RGB pixels in [0, 1], keyed by the ``decoder`` param.

Importing this package registers every built-in decoder.
"""

from featinv.decoders.registry import DECODERS, build_decoder, count_parameters

# Registration side effects only: each module adds its decoder(s) to DECODERS.
from featinv.decoders import transposed_conv  # noqa: F401,E402  isort: skip
from featinv.decoders import frequency_aware  # noqa: F401,E402  isort: skip
from featinv.decoders import wavelet  # noqa: F401,E402  isort: skip
from featinv.decoders import attention  # noqa: F401,E402  isort: skip
from featinv.decoders import residual_shuffle  # noqa: F401,E402  isort: skip
from featinv.decoders import local_mlp  # noqa: F401,E402  isort: skip

__all__ = ["DECODERS", "build_decoder", "count_parameters"]
