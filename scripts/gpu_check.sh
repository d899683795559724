#!/usr/bin/env bash
# What to run when a CUDA device is lent: the gpu-marked fp16 parity tests against diffusers, then
# SD 1.5-shaped 512x512 fp16 U-Net it/s against diffusers, eager and torch.compile. Record the
# printed figures in docs/benchmarks.md with the device name it prints first.
#
#   scripts/gpu_check.sh                  # everything
#   scripts/gpu_check.sh --no-compile     # extra arguments go to scripts/bench_gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA device; nothing to check")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
echo "== fp16 parity with diffusers (pytest -m gpu)"
"$PY" -m pytest -q -m gpu -rs tests/test_gpu.py
echo "== SD 1.5-shaped U-Net, 512x512, fp16: it/s"
"$PY" scripts/bench_gpu.py --device cuda --dtype fp16 "$@"
