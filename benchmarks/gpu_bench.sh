#!/usr/bin/env bash
# Issue 4's GPU figures on a CUDA machine: the attention kernel bench, then `wanserve bench` on the full-size
# A14B architecture with random bf16 weights. Usage: benchmarks/gpu_bench.sh main|video|cap24|cap80|lora|vae|diagnose|stash [OUT_DIR]
# (OUT_DIR defaults to $OUT, the folder the device tool brings back; pass "$OUT", never a literal OUT).
#   main:     one 720p expert forward each: diffusers eager, exact, fast (the forward targets; about 4 minutes).
#             LOWBIT=on runs fast with a low-bit attention (by default it keeps cuDNN attention on Hopper),
#             LOWBIT_KERNEL=int8 (our Triton kernel, the default) or fp8 (cuDNN's FP8 attention, needs
#             nvidia-cudnn-frontend from .whl/); KERNEL=1 first times the attention kernels alone (all of them, with
#             their error); VIDEOS=720p:4:1 adds a video per preset.
#   video:    exact's 720p 4-step guidance-1 video (the distilled-LoRA target), VIDEOS to change it.
#   cap24:    the 24 GB policy: block offload, process capped at 24 GiB, a 480p video.
#   cap80:    an 80 GB card (an H100's ~79 GiB usable): both experts resident, the text encoder visiting, a 720p
#             4-step video with CFG (the largest activations: cond and uncond batched); about 3 minutes.
#   lora:     LoRAs under each memory policy, compiled but offload (benchmarks/lora_gpu.py, the tiny model; a minute);
#             PRESET=fast puts the adapters on FP8 layers.
#   diagnose: `fast`'s low-bit parts block by block on one expert (wanserve/engine/diagnose.py), SIZE=720p.
#   vae:      the VAE decode with cuDNN's default against cudnn.benchmark, and decode+encode streamed or not, SIZE=720p.
#   stash:    keep FlashAttention 4's first part (.fa4a/) on this machine for the next call (device_wheels.sh), in
#             $FA4_STASH (default $TMPDIR/wanserve-fa4a): outside the checkout, which the device tool copies afresh
#             for each call (a folder kept inside it, .fa4keep/, was gone by the next call on 2026-11-27).
# Python packages the machine lacks come from benchmarks/device_wheels.sh: wheels in .whl/ (installed to /tmp/site),
# and FlashAttention 4's packed site: the stashed first part plus .fa4b/ (unpacked to $TMPDIR/fa4site).
set -u
MODE=${1:-main}
OUT=${2:-${OUT:-gpu-out}}
case "$MODE" in
  main|video|cap24|cap80|lora|vae|diagnose|stash) ;;
  *) echo "unknown mode: $MODE (main|video|cap24|cap80|lora|vae|diagnose|stash)" >&2; exit 2 ;;
esac
FA4_STASH=${FA4_STASH:-${TMPDIR:-/tmp}/wanserve-fa4a}
if [ "$MODE" = stash ]; then
  mkdir -p "$FA4_STASH" && cp .fa4a/* "$FA4_STASH"/ && ls -la "$FA4_STASH" && exit 0
  exit 1
fi
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -d .fa4b ] && [ -n "$(ls -A "$FA4_STASH" 2>/dev/null)" ]; then
  # xz may be missing from the machine's image: Python's lzma unpacks the same stream.
  UNXZ=(python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)")
  command -v xz >/dev/null && UNXZ=(xz -d)
  site=${TMPDIR:-/tmp}/fa4site
  mkdir -p "$site" && cat "$FA4_STASH"/* .fa4b/* | "${UNXZ[@]}" | tar -C "$site" -x || exit 1
  # The DSL's own .pth file (which adds its packages folder to sys.path) is not read from PYTHONPATH: named here.
  export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-$PWD}
  export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
  python3 -c "import flash_attn.cute, cutlass; print('flash-attn-4 importable')" 2>&1 | tail -3 | tee "$OUT/flash4-import.txt"
elif [ -d .fa4b ]; then
  # The second part came but the first did not stay: say so rather than bench without FlashAttention 4 unnoticed.
  echo "FlashAttention 4 not unpacked: $FA4_STASH is empty (run 'gpu_bench.sh stash' carrying .fa4a first, on this" \
       "machine); benching without it" | tee "$OUT/flash4-import.txt" >&2
fi
export PYTHONUNBUFFERED=1 WANSERVE_CACHE_DIR=/tmp/wanserve-cache
# Without the carried wheels nothing below can run: say so at once rather than spend the machine's time.
python3 -c "import diffusers, av, pydantic_settings, peft" 2>"$OUT/import-error.txt" || {
  echo "diffusers/av/pydantic_settings/peft not importable: carry .whl (benchmarks/device_wheels.sh base)" >&2
  cat "$OUT/import-error.txt" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device-$MODE.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/device-$MODE.txt"
# `wanserve bench` writing into $TMPDIR/bench-NAME (its videos are random noise, too big to bring back), with its
# bench.json (rewritten after each row) copied to $OUT every few seconds: a run cut short still returns its rows.
bench() {
  local name=$1 timeout_s=$2; shift 2
  (while sleep 5; do cp -f "${TMPDIR:-/tmp}/bench-$name/bench.json" "$OUT/bench-$name.json"; done) >/dev/null 2>&1 &
  local copier=$!
  timeout "$timeout_s" python3 -m wanserve bench --model a14b --device cuda --out-dir "${TMPDIR:-/tmp}/bench-$name" "$@" 2>&1 \
    | tee "$OUT/bench-$name.log"
  status=${PIPESTATUS[0]}
  kill "$copier" 2>/dev/null
  cp -f "${TMPDIR:-/tmp}/bench-$name/bench.json" "$OUT/bench-$name.json" 2>/dev/null
}
status=0
if [ "$MODE" = main ]; then
  [ -z "${KERNEL:-}" ] || timeout "${KERNEL_TIMEOUT:-160}" python3 benchmarks/lowbit_attention.py --json "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.log"
  bench main "${BENCH_TIMEOUT:-330}" --sizes 720p --presets exact,fast --videos "${VIDEOS-}" --no-baseline-videos \
    --deadline-s "${DEADLINE:-270}" --lowbit-attention "${LOWBIT:-auto}" --lowbit-kernel "${LOWBIT_KERNEL:-auto}"
elif [ "$MODE" = video ]; then
  bench video "${BENCH_TIMEOUT:-330}" --sizes '' --presets exact --videos "${VIDEOS-720p:4:1}" --no-baseline-videos
elif [ "$MODE" = lora ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/lora_gpu.py --device cuda --preset "${PRESET:-exact}" \
    --json "$OUT/lora.json" 2>&1 | tee "$OUT/lora.log"
  status=${PIPESTATUS[0]}
elif [ "$MODE" = vae ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/vae_gpu.py --size "${SIZE:-720p}" 2>&1 | tee "$OUT/vae.log"
elif [ "$MODE" = diagnose ]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 -m wanserve.engine.diagnose --model a14b --device cuda --size "${SIZE:-720p}" \
    --cache-dir /tmp/wanserve-cache --json "$OUT/diagnose.json" 2>&1 | tee "$OUT/diagnose.log"
elif [ "$MODE" = cap80 ]; then
  bench cap80 "${BENCH_TIMEOUT:-300}" --sizes '' --presets exact --videos 720p:4:5 --no-baseline-videos \
    --memory-policy "${POLICY:-auto}" --memory-cap-gib 79
elif [ "$MODE" = cap24 ]; then
  # POLICY=auto shows the policy chosen for a 24 GiB card (the cap is set before the engine plans its memory).
  bench cap24 "${BENCH_TIMEOUT:-200}" --sizes '' --presets exact --videos 480p:2:5 --no-baseline-videos \
    --memory-policy "${POLICY:-auto}" --memory-cap-gib 24
fi
exit "$status"
