"""Latency of one routed ESM++ model in onnxruntime (CPU) and in PyTorch, at batch 1 and 32.

    python benchmarks/onnx_latency.py ARTIFACT_DIR [--out onnx_latency.json]
    python benchmarks/onnx_latency.py --random ViT-B-32 --tasks 8 --rank 32   # random weights, real shapes

Exports the artifact with `esmpp.onnx.export_onnx` (parity checked), then times both runtimes on the same
random batch with the same thread count: median of --runs after --warmup runs. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from esmpp.architecture import Architecture, build_visual, linear_keys
from esmpp.artifact import Artifact, TaskInfo, load_artifact
from esmpp.onnx import export_onnx
from esmpp.runtime.model import Experts


def random_artifact(arch: Architecture, num_tasks: int, rank: int, classes: int = 10, seed: int = 0) -> Artifact:
    """An artifact with the shapes of a real build (experts on qkv and fc) and random weights."""
    torch.manual_seed(seed)
    backbone = build_visual(arch).state_dict()
    experts = {}
    for key in linear_keys(arch, ("qkv", "fc")):
        d_out, d_in = backbone[key].shape
        experts[key] = Experts(
            up=torch.randn(num_tasks, d_out, rank) * 0.02,
            down=torch.randn(num_tasks, rank, d_in) * 0.02,
            prototypes=torch.randn(num_tasks, 1, d_in),
        )
    tasks = [TaskInfo(f"task{t}", [f"class{c}" for c in range(classes)]) for t in range(num_tasks)]
    heads = [torch.nn.functional.normalize(torch.randn(classes, arch.embed_dim), dim=-1) for _ in tasks]
    return Artifact(arch, tasks, backbone, experts, heads, {"method": "random"})


def median_seconds(run, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, nargs="?", help="artifact directory (or use --random)")
    parser.add_argument("--random", metavar="ARCH", help="random artifact of this open_clip architecture")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("onnx_latency.json"))
    args = parser.parse_args()
    if (args.artifact is None) == (args.random is None):
        parser.error("give an ARTIFACT directory or --random ARCH")
    artifact = (
        load_artifact(args.artifact)
        if args.artifact
        else random_artifact(Architecture.from_name(args.random), args.tasks, args.rank)
    )
    torch.set_num_threads(args.threads)
    model = artifact.to_model()
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(artifact, Path(tmp) / "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
        size = artifact.arch.image_size
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            pixels = torch.randn(batch, 3, size, size)
            feeds = {"pixel_values": pixels.numpy()}

            def torch_run(pixels=pixels):
                with torch.inference_mode():
                    model(pixels)

            def onnx_run(feeds=feeds):
                session.run(None, feeds)

            torch_s = median_seconds(torch_run, args.warmup, args.runs)
            onnx_s = median_seconds(onnx_run, args.warmup, args.runs)
            rows.append({"batch": batch, "torch_ms": torch_s * 1e3, "onnxruntime_ms": onnx_s * 1e3})
    result = {
        "model": str(args.artifact) if args.artifact else f"random {args.random}, {args.tasks} tasks, rank {args.rank}",
        "routed_layers": len(artifact.experts),
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "parity": report.parity.__dict__,
        "rows": rows,
    }
    print(f"{result['model']}: {result['routed_layers']} routed layers, {args.threads} threads, median of {args.runs}")
    print(f"{'batch':>6} {'torch ms':>10} {'onnxruntime ms':>15} {'speed-up':>9}")
    for row in rows:
        speedup = row["torch_ms"] / row["onnxruntime_ms"]
        print(f"{row['batch']:>6} {row['torch_ms']:>10.1f} {row['onnxruntime_ms']:>15.1f} {speedup:>8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
