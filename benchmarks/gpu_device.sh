#!/usr/bin/env bash
# The one prepared device call for the GPU benchmark (issue 15), for a session lent a GPU.
#
#   bash benchmarks/gpu_device.sh wheels   # here, once: the pure-Python deps the device image lacks → .whl/
#   # then, with the device tool: carry [".whl"], timeout_s 600, command:
#   bash benchmarks/gpu_device.sh run [ARGS]  # there: installs them beside its torch, runs benchmarks/gpu.py ARGS
#
# The device image has its own torch/torchvision/timm/scikit-image, but not zarr, numcodecs, donfig,
# google-crc32c or lpips; they are pure Python (or manylinux) wheels for its Python (3.12).
# benchmarks/gpu.py caps itself at --budget-seconds (default 450) and writes its JSON after every
# section, so a timeout still leaves figures under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
      -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c lpips==0.1.4
    ;;
  run)
    python3 -m pip install -q --no-index --no-deps --target /tmp/featinv-site .whl/*.whl
    export PYTHONPATH="/tmp/featinv-site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -m benchmarks.gpu --out "$OUT/gpu.json" "${@:2}" 2>&1 | tee "$OUT/log.txt"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_device.sh wheels|run" >&2
    exit 2
    ;;
esac
