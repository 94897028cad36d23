"""What changes with the device: bf16 autocast, channels_last, pinned host→device copies.

On CUDA, featinv computes in bfloat16 under autocast — the encoder's forward at extraction,
the decoder's forward and backward in training — while weights, optimizer state, losses and
metrics stay float32 and the feature stores stay float16.  bfloat16 rather than float16:
float32's exponent range, so no loss scaling and no overflow inside deep encoders (the
features are still rounded to float16 for the store, which ``feature_store`` checks).

On every other device these helpers change nothing by default: the CPU keeps float32.
Training can ask for bf16 there (``train.precision: bfloat16``) on a CPU that computes it
natively (AVX512-BF16 or AMX): measured on such a CPU it halves the local_mlp decoder's step
at no loss of quality (BENCHMARKS.md, "Trained encoders"), while on a CPU without it torch
emulates bf16 slowly, so there the run stays float32 and says so.  What :func:`setup` does
change on the CPU is the host allocator's policy (:mod:`featinv.host_memory`): the same
numbers, fewer page faults.

A batch for CUDA travels as float16 features and uint8 pixels (half and a quarter of the
float32 bytes) in page-locked host memory, copied on a side stream (:class:`DeviceCopy`) so
the copy overlaps the GPU's work, and converted to float32 on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from featinv import host_memory

__all__ = ["AMP_DTYPE", "amp_enabled", "autocast", "cpu_computes_bf16", "training_dtype", "autocast_to", "float32",
           "setup", "adam_options", "channels_last", "pinned", "DeviceCopy"]

AMP_DTYPE = torch.bfloat16


def amp_enabled(device: torch.device | str) -> bool:
    """Whether featinv computes under bf16 autocast on ``device``: on CUDA only."""
    return torch.device(device).type == "cuda"


def autocast(device: torch.device | str, enabled: bool = True,
             dtype: torch.dtype = AMP_DTYPE) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on any other device (or with ``enabled=False``) a context that does nothing.

    Wrap the forward pass only; compute losses and metrics on :func:`float32` outputs,
    outside it.  ``dtype=torch.float16`` is for extraction, whose output is rounded to float16
    anyway: bf16's 8-bit mantissa leaves ~8× the error in the stored features (0.32 % vs
    0.04 % relative on vgg16/block1, ``python -m benchmarks.gpu`` section ``extract``).
    """
    return autocast_to(device, dtype if enabled and amp_enabled(device) else None)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), which oneDNN uses under autocast."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def training_dtype(device: torch.device | str, setting: str = "auto") -> tuple[torch.dtype | None, list[str]]:
    """The autocast dtype a training run computes in (None: float32), and the fallback it took.

    ``setting`` is ``train.precision``: ``auto`` (bf16 on CUDA, float32 elsewhere),
    ``float32``, or ``bfloat16`` (CUDA, or a CPU with native bf16; float32 anywhere else,
    with a note the run records).
    """
    device = torch.device(device)
    if setting == "float32" or (setting == "auto" and not amp_enabled(device)):
        return None, []
    if setting == "auto" or device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16()):
        return AMP_DTYPE, []
    where = "this CPU has no native bf16 (AVX512-BF16 or AMX)" if device.type == "cpu" else \
        f"bf16 autocast is not used on {device.type}"
    return None, [f"train.precision: bfloat16 asked for, but {where}: training in float32"]


def autocast_to(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, as :func:`training_dtype` chose it.

    ``dtype`` None (float32): a context that does nothing.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float32 (a no-op when it is already): what losses and metrics are computed on.

    An output made under autocast is bfloat16, whose 8-bit mantissa would show in PSNR at
    high quality (a 40 dB reconstruction's error is ~1 % of the pixel range).
    """
    return tensor.float()


def setup(device: torch.device | str) -> None:
    """Per-process backend settings for ``device``.

    CUDA: cuDNN autotuning (every step has the same shapes, so the search pays once) and
    TF32 matrix maths for whatever still runs in float32.  CPU: the host allocator keeps
    freed blocks for the next step (:func:`featinv.host_memory.keep_freed_memory`; the
    numbers computed are the same, only page faults go).
    """
    if torch.device(device).type == "cpu":
        host_memory.keep_freed_memory()
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_FUSED_ADAM_DEVICES = ("cuda", "cpu")  # where Adam's fused kernel was measured to pay


def adam_options(device: torch.device | str) -> dict[str, bool]:
    """Keyword arguments for ``torch.optim.Adam`` on ``device``: the fused kernel where it was measured to pay.

    CUDA: a study cell's step at the published batch of 4 is launch-bound, and the fused Adam
    updates every parameter in one kernel where the default (foreach) launches one per
    operation and tensor group: on an H200 it trained the attention decoder 10 % faster and the
    others within ±5 % (BENCHMARKS.md, "GPU figures, run 4").
    CPU: torch's default there is a Python loop over the parameters, five element-wise passes
    each; the fused kernel makes one. On the 2-core CPU it took local_mlp's Adam step from
    1.75 to 0.79 ms and its whole training step (2,048 windows, bf16) from 19.5 to 18.1 ms;
    the conv decoders' batch-4 steps stayed within ±3 % (BENCHMARKS.md, "Fused Adam on the CPU").
    Other devices: torch's default.
    """
    return {"fused": True} if torch.device(device).type in _FUSED_ADAM_DEVICES else {}


def channels_last(obj, device: torch.device | str):
    """A module or 4-D tensor in channels_last memory format on CUDA (convolutions' fast layout there).

    Anything else, on any other device, comes back unchanged: on the CPU the training step
    already hands decoders channels_last maps where that was measured to pay
    (``featinv.training.train.decoder_inputs``), and encoders are left as built.
    """
    if torch.device(device).type != "cuda":
        return obj
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    return obj.contiguous(memory_format=torch.channels_last) if obj.dim() == 4 else obj


def pinned(array: np.ndarray) -> torch.Tensor:
    """A page-locked CPU copy of ``array``, so that a ``non_blocking`` copy to CUDA is really asynchronous.

    Gathering a batch's rows straight into page-locked memory (``index_select`` with ``out=``)
    was tried and taken out again: twice as fast on a CPU alone, but the H200 run made with it
    timed every study cell 25–35 % slower and block3's RAM delivery at half the earlier run's
    (BENCHMARKS.md, "GPU"). Only a GPU run that shows it pays brings it back.
    """
    source = torch.from_numpy(np.ascontiguousarray(array))
    return torch.empty(source.shape, dtype=source.dtype, pin_memory=True).copy_(source)


class DeviceCopy:
    """Host→CUDA copies on a side stream, handed over to the computing stream when they are used.

    ``send`` may run on a loader thread: it queues the copies and returns at once.
    ``receive`` (on the thread that computes) makes the current stream wait for them and
    tells the allocator that stream now uses the memory.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def send(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Queue a ``non_blocking`` copy of each (pinned) tensor; returns the device tensors and a done-event."""
        with torch.cuda.stream(self.stream):
            moved = [t.to(self.device, non_blocking=True) for t in tensors]
            done = torch.cuda.Event()
            done.record(self.stream)
        return moved, done

    def receive(self, moved: list[torch.Tensor], done: torch.cuda.Event) -> list[torch.Tensor]:
        """The tensors of one ``send``, safe to use on the current stream."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for t in moved:
            t.record_stream(stream)
        return moved

