#!/usr/bin/env bash
# The prepared GPU check, one call on a lent GPU (about 6 minutes on an H100/H200): the fast path's equality with the
# eager path on CUDA (tests/test_accel.py), then benchmarks/bench_gpu.py, which prints and writes
# benchmarks/results/gpu-DATE.json (base_s, diffusers_s, diffusers_compiled_s, I_x, P_x, S_x, batch 4, per call, FLUX).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python -c "import diffusers, peft" 2>/dev/null || pip install -q -r requirements-dev.txt
export HF_HUB_OFFLINE=1
python -m pytest -q tests/test_accel.py
timeout 420 python benchmarks/bench_gpu.py --runs 3 "$@"
