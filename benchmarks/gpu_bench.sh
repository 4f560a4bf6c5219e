#!/usr/bin/env bash
# Issue 4's GPU figures on a CUDA machine: the attention kernel bench, then `wanserve bench` on the full-size
# A14B architecture with random bf16 weights. Usage: benchmarks/gpu_bench.sh main|cap24|vae|diagnose|stash [OUT_DIR]
#   main:     one 720p expert forward (diffusers eager, exact, fast), a 720p 4-step guidance-1 video per preset;
#             LOWBIT=on runs fast with the INT8 attention kernel (by default it keeps cuDNN attention on Hopper).
#   cap24:    the 24 GB policy: block offload, process capped at 24 GiB, a 480p video.
#   diagnose: `fast`'s low-bit parts block by block on one expert (wanserve/engine/diagnose.py), SIZE=720p.
#   vae:      the VAE decode with cuDNN's default against cudnn.benchmark, and decode+encode streamed or not, SIZE=720p.
#   stash:    keep FlashAttention 4's first part (.fa4a/) on this machine for the next call (device_wheels.sh).
# Python packages the machine lacks come from benchmarks/device_wheels.sh: wheels in .whl/ (installed to /tmp/site),
# and FlashAttention 4's packed site in .fa4keep/ (stashed by an earlier call) plus .fa4b/ (unpacked to /tmp/fa4site).
set -u
MODE=${1:-main}
OUT=${2:-${OUT:-gpu-out}}
case "$MODE" in
  main|cap24|vae|diagnose|stash) ;;
  *) echo "unknown mode: $MODE (main|cap24|vae|diagnose|stash)" >&2; exit 2 ;;
esac
if [ "$MODE" = stash ]; then
  mkdir -p .fa4keep && cp .fa4a/* .fa4keep/ && ls -la .fa4keep && exit 0
  exit 1
fi
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -d .fa4b ] && [ -d .fa4keep ]; then
  # xz may be missing from the machine's image: Python's lzma unpacks the same stream.
  UNXZ=(python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)")
  command -v xz >/dev/null && UNXZ=(xz -d)
  mkdir -p /tmp/fa4site && cat .fa4keep/* .fa4b/* | "${UNXZ[@]}" | tar -C /tmp/fa4site -x || exit 1
  # The DSL's own .pth file (which adds its packages folder to sys.path) is not read from PYTHONPATH: named here.
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-$PWD}
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
  python3 -c "import flash_attn.cute, cutlass; print('flash-attn-4 importable')" 2>&1 | tail -3 | tee "$OUT/flash4-import.txt"
fi
export PYTHONUNBUFFERED=1 WANSERVE_CACHE_DIR=/tmp/wanserve-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device-$MODE.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/device-$MODE.txt"
if [ "$MODE" = main ]; then
  [ -n "${SKIP_KERNEL:-}" ] || timeout "${KERNEL_TIMEOUT:-160}" python3 benchmarks/lowbit_attention.py --json "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.log"
  timeout "${BENCH_TIMEOUT:-380}" python3 -m wanserve bench --model a14b --device cuda --sizes 720p --presets exact,fast \
    --videos "${VIDEOS-720p:4:1}" --no-baseline-videos --deadline-s "${DEADLINE:-290}" --out-dir /tmp/bench-main \
    --lowbit-attention "${LOWBIT:-auto}" 2>&1 | tee "$OUT/bench.log"
  cp /tmp/bench-main/bench.json "$OUT/bench-main.json" 2>/dev/null
elif [ "$MODE" = vae ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/vae_gpu.py --size "${SIZE:-720p}" 2>&1 | tee "$OUT/vae.log"
elif [ "$MODE" = diagnose ]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 -m wanserve.engine.diagnose --model a14b --device cuda --size "${SIZE:-720p}" \
    --cache-dir /tmp/wanserve-cache --json "$OUT/diagnose.json" 2>&1 | tee "$OUT/diagnose.log"
elif [ "$MODE" = cap24 ]; then
  # POLICY=auto shows the policy chosen for a 24 GiB card (the cap is set before the engine plans its memory).
  timeout "${BENCH_TIMEOUT:-200}" python3 -m wanserve bench --model a14b --device cuda --sizes '' --presets exact \
    --videos 480p:2:5 --no-baseline-videos --memory-policy "${POLICY:-auto}" --memory-cap-gib 24 \
    --out-dir /tmp/bench-cap 2>&1 | tee "$OUT/cap24.log"
  cp /tmp/bench-cap/bench.json "$OUT/bench-cap24.json" 2>/dev/null
fi
exit 0
