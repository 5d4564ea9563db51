"""Latency of one routed ESM++ model and of its plain merged tower, in PyTorch and onnxruntime, at batch 1 and 32.

    python benchmarks/onnx_latency.py ARTIFACT_DIR [--out onnx_latency.json]
    python benchmarks/onnx_latency.py --random ViT-B-32 --tasks 8 --rank 32   # random weights, real shapes

The runtime half of `esmpp bench` (``esmpp.bench.measure_runtime``) on an artifact of your own: exports both
models with `esmpp.onnx` (parity checked), then times each runtime's pair interleaved with the same thread
count: median of --runs after --warmup runs. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from esmpp.architecture import Architecture
from esmpp.artifact import load_artifact
from esmpp.bench import BenchConfig, environment, format_runtime, measure_runtime, runtime_artifact


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
    config = BenchConfig(
        rank=args.rank,
        runtime_repeats=args.runs,
        warmup=args.warmup,
        batch_sizes=tuple(int(b) for b in args.batches.split(",")),
        threads=args.threads,
    )
    torch.set_num_threads(args.threads)
    if args.artifact:
        artifact, name = load_artifact(args.artifact), str(args.artifact)
    else:
        artifact = runtime_artifact(Architecture.from_name(args.random), args.tasks, config)
        name = f"random {args.random}, {args.tasks} tasks, rank {args.rank}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "model": name,
        "routed_layers": len(artifact.experts),
        "config": {"threads": args.threads, "runs": args.runs, "warmup": args.warmup},
        "environment": environment(),
        "device": str(device),
        "runtime": measure_runtime(artifact, config, device),
    }
    print(f"load average {result['environment']['load_average']}, median of {args.runs}")
    print("\n".join(format_runtime(f"{name}: {result['routed_layers']} routed layers", result["runtime"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
