"""LoRAs on a GPU under each memory policy, compiled where the policy compiles: what the CPU tests can only model.

For resident, swap and offload on the tiny model (the bugs in question do not depend on the model's size), with a
random LoRA on both experts: a video without it, then with it at scales 1.0, 0.8, 0.9 and 0.8 again, then without
it. Checks (each a row of the JSON written to --json, and a failure makes the exit status 1):

- every video is finite, and each policy's videos equal the resident policy's (relative error of the frames; offload
  runs uncompiled, as it always does);
- the scales change the video, and a scale seen before gives the same video again;
- a new scale compiles no new graph (dynamo's unique graph count does not grow after the first LoRA video).

    python benchmarks/lora_gpu.py --device cuda --json lora.json     (gpu_bench.sh lora)
    python benchmarks/lora_gpu.py --device cpu                       (CI runs this, tests/test_gpu_scripts.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lora_files import random_factors, write_wan

from wanserve.config import Settings
from wanserve.engine import speed
from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import EngineOptions, GenerationSpec, WanEngine
from wanserve.lora.cache import file_sha256
from wanserve.lora.sources import EXPERTS, LoraFile, LoraUse, SourceKind

SCALES = (1.0, 0.8, 0.9, 0.8)
SAME = 1e-4  # relative error of two videos taken as the same


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    a, b = got.astype(np.float64), want.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def videos(
    policy: str, device: torch.device, cache: Path, work: Path, lora: Path, compile_: bool, preset: str
) -> dict[str, Any]:
    """The five videos of one policy, with the graph counts between them."""
    pipe = load_pipeline("tiny", cache, torch.bfloat16 if device.type == "cuda" else torch.float32)
    options = EngineOptions(preset=preset, memory_policy=policy, compile=compile_, compile_cache_dir=work / "compile")
    engine = WanEngine(pipe, device, options)
    file = LoraFile(lora, file_sha256(lora), lora.stat().st_size, SourceKind.LOCAL, False, 0.0)
    spec = GenerationSpec(prompt="a red fox in snow", negative_prompt="blurred", width=128, height=96,
                          num_frames=9, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0, shift=5.0,
                          seed=7)  # fmt: skip
    frames: dict[str, np.ndarray] = {"none": engine.generate(spec).frames}
    graphs: list[int] = []
    for i, scale in enumerate(SCALES):
        use = LoraUse(file, scale, EXPERTS["both"], "check")
        frames[f"{scale}#{i}"] = engine.generate(replace(spec, loras=(use,))).frames
        graphs.append(unique_graphs())
    frames["none again"] = engine.generate(spec).frames
    return {"policy": engine.memory_plan.policy.value, "speed": engine.speed.describe(), "frames": frames,
            "graphs_after_each_scale": graphs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--policies", default="resident,swap,offload")
    parser.add_argument("--cache-dir", type=Path, help="where the tiny model is built (WANSERVE_CACHE_DIR)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the blocks (default: on a GPU)")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor", help="eager: dynamo's graphs alone (CI)")
    parser.add_argument("--preset", choices=["exact", "fast"], default="exact",
                        help="fast: the adapters sit on FP8 layers (where the GPU runs fast)")  # fmt: skip
    args = parser.parse_args(argv)
    speed.COMPILE_BACKEND = args.compile_backend
    device = torch.device(args.device)
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    rows: list[dict[str, Any]] = []
    failed = False
    cache = args.cache_dir or Settings().cache_dir
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        expert = load_pipeline("tiny", cache, torch.float32).transformer
        lora = write_wan(work / "check.safetensors", random_factors(expert))
        reference: dict[str, np.ndarray] | None = None
        for policy in args.policies.split(","):
            started = time.perf_counter()
            try:
                got = videos(policy, device, cache, work, lora, compile_, args.preset)
            except Exception as exc:  # a row saying why, then the next policy
                rows.append({"policy": policy, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                failed = True
                continue
            frames = got.pop("frames")
            reference = reference or frames
            graphs = got["graphs_after_each_scale"]
            checks = {
                "finite": all(np.isfinite(f.astype(np.float64)).all() for f in frames.values()),
                # GPU kernels need not repeat to the bit: "the same" is far closer than a change of scale makes.
                "scale_changes_video": rel_error(frames["0.8#1"], frames["0.9#2"]) > 10 * SAME,
                "same_scale_same_video": rel_error(frames["0.8#1"], frames["0.8#3"]) <= SAME,
                "lora_changes_video": rel_error(frames["1.0#0"], frames["none"]) > 10 * SAME,
                "no_graph_per_scale": len(set(graphs)) == 1,
            }
            row = {**got, **checks, "seconds": round(time.perf_counter() - started, 1),
                   "error_vs_resident": {k: rel_error(frames[k], reference[k]) for k in frames}}  # fmt: skip
            failed = failed or not all(checks.values())
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "compile": compile_, "preset": args.preset, "rows": rows,
              "ok": not failed}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print("OK" if not failed else "FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
