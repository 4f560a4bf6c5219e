#!/usr/bin/env bash
# The Python packages a GPU check machine lacks, fetched here (it can fetch nothing) for benchmarks/gpu_bench.sh.
#
#   benchmarks/device_wheels.sh [base|flash4|all]    (default: all)
#
# base:   .whl/, the wheels `wanserve bench` needs beside the machine's torch/triton/transformers (diffusers, PyAV,
#         pydantic...; tests/test_bench_cli.py runs the bench with the service's own libraries unimportable), and
#         peft for `gpu_bench.sh lora`, nvidia-cudnn-frontend for `fast`'s FP8 attention (1.16: 2 MB, and no
#         dependency on the CuTe DSL compiler, which later versions pull in);
#         gpu_bench.sh installs them into /tmp/site.
# flash4: FlashAttention 4 and its CuTe DSL compiler, installed here into a staging folder, packed as one tar.xz
#         and split in two: .fa4a/ (about 58 MiB) and .fa4b/ (the rest). The compiler library alone is 190 MB
#         unpacked (65 MiB packed), more than one call may carry beside the base wheels (64 MiB in all), so it
#         travels in two calls to the same warm machine:
#           call 1: carry [".fa4a"], command `bash benchmarks/gpu_bench.sh stash`   (keeps the part in /tmp, outside the checkout)
#           call 2: carry [".whl", ".fa4b"], command `bash benchmarks/gpu_bench.sh main "$OUT"`, at once (a machine is
#                   given back 30 s after a call)
# Versions are pinned: the checks' figures name them.
set -euo pipefail
WHAT=${1:-all}
PY="${PYTHON:-.venv/bin/python} -m pip"
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
BASE=(diffusers==0.42.1 av==17.0.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0 peft==0.21.2 accelerate==1.15.0
      psutil==7.2.2 nvidia-cudnn-frontend==1.16.0
      pydantic==2.14.4 pydantic_core==2.50.5 pydantic_settings==2.16.3 python_dotenv==1.2.4 annotated_types==0.8.0
      typing_extensions==4.16.0 typing_inspection==0.4.5)
# flash-attn-4's dependencies the machine lacks (it has cuda-bindings, protobuf, einops); the cu13 compiler only,
# as the machine's driver is CUDA 13 (the DSL loads the newest flavour the driver supports).
FLASH4=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
        apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)

for dir in /.whl/ /.fa4a/ /.fa4b/; do
  grep -qxF "$dir" .git/info/exclude 2>/dev/null || echo "$dir" >> .git/info/exclude
done

if [ "$WHAT" = base ] || [ "$WHAT" = all ]; then
  mkdir -p .whl
  $PY download -q --no-deps "${PLATFORM[@]}" -d .whl "${BASE[@]}"
  du -sh .whl
fi
if [ "$WHAT" = flash4 ] || [ "$WHAT" = all ]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  $PY download -q --no-deps "${PLATFORM[@]}" -d "$stage/wheels" "${FLASH4[@]}"
  $PY install -q --no-deps --no-compile "${PLATFORM[@]}" --target "$stage/site" "$stage"/wheels/*.whl
  rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
  tar -C "$stage/site" -cf - . | xz -T2 -9e | split -b 58M -a 2 - "$stage/fa4site.tar.xz."
  mv "$stage/fa4site.tar.xz.aa" .fa4a/
  mv "$stage"/fa4site.tar.xz.a[b-z] .fa4b/
  du -sh .fa4a .fa4b
fi
