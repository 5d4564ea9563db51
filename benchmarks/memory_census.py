"""Where the bytes of a build go: a census of the live tensors at every stage boundary.

python benchmarks/memory_census.py --arch ViT-B-32 --tasks 2 --workdir esmpp-bench-work
(``PYTHONPATH=.`` first when the installed esmpp is another checkout: the script imports ``esmpp``.)

Runs one ESM++ build of ``esmpp bench``'s synthetic workload (written under ``--workdir`` if missing) and,
at every stage boundary, sums the bytes of the tensors alive, grouped by what holds them (the nearest
known owner among their referrers: an ``Encoder``, ESM's ``EssentialSummary``, TSV's ``SingularTriplets``,
captured ``ActivationStats``, ...). For each stage it prints the census taken at the boundary where the
live tensors were largest, next to the resident set size then. Stage boundaries miss the transients
inside a stage; the bench's VmHWM per stage shows those.
"""

from __future__ import annotations

import argparse
import gc
from collections import defaultdict
from pathlib import Path

import torch

from esmpp import profiling
from esmpp.bench import BenchConfig, run_build, write_workload

_MAX_HOPS = 4
_CONTAINERS = (dict, list, tuple, set)


def _referrers(targets: set[int], objects: list[object], skip: set[int]) -> dict[int, list[object]]:
    """For each id in ``targets``, the objects among ``objects`` that refer to it (one pass over them all)."""
    found: dict[int, list[object]] = defaultdict(list)
    for obj in objects:
        if id(obj) in skip:
            continue
        for referent in gc.get_referents(obj):
            if id(referent) in targets:
                found[id(referent)].append(obj)
    return found


def census() -> dict[str, int]:
    """Bytes of the live CPU tensors (each storage counted once) by owner: the class of the nearest
    referrer that is not a container (dict, list, tuple, set), found breadth-first over a few hops."""
    gc.collect()
    objects = gc.get_objects()
    tensors: dict[int, torch.Tensor] = {}
    storages: set[int] = set()
    for obj in objects:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                tensors[id(obj)] = obj
    skip = {id(objects), id(tensors)}
    owners: dict[int, str] = {}
    # frontier: tensor id -> ids of the containers reached so far on its way up
    frontier: dict[int, set[int]] = {key: {key} for key in tensors}
    for _ in range(_MAX_HOPS):
        targets = set().union(*frontier.values()) if frontier else set()
        referrers = _referrers(targets, objects, skip)
        next_frontier: dict[int, set[int]] = {}
        for key, ids in frontier.items():
            parents = [parent for target in ids for parent in referrers.get(target, [])]
            owner = next((p for p in parents if not isinstance(p, _CONTAINERS) and type(p).__name__ != "frame"), None)
            if owner is not None:
                owners[key] = type(owner).__qualname__
            else:
                containers = {id(p) for p in parents if isinstance(p, _CONTAINERS)}
                if containers:
                    next_frontier[key] = containers
        frontier = next_frontier
    by_owner: dict[str, int] = defaultdict(int)
    for key, tensor in tensors.items():
        by_owner[owners.get(key, "locals / containers only")] += tensor.untyped_storage().nbytes()
    return dict(by_owner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--proxy-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("esmpp-bench-work"))
    args = parser.parse_args()

    largest: dict[str, tuple[int, int, dict[str, int]]] = {}
    original = profiling.StageProfile._close_interval

    def close_with_census(self: profiling.StageProfile) -> None:
        name = self._open[-1] if self._open else None
        rss = profiling.resident_bytes()
        original(self)  # closes the interval first, so that the census's own memory is not in its peak
        if name is not None:
            counted = census()
            total = sum(counted.values())
            if total >= largest.get(name, (-1, 0, {}))[0]:
                largest[name] = (total, rss, counted)
            profiling._reset_peak()

    profiling.StageProfile._close_interval = close_with_census  # type: ignore[method-assign]
    workload = write_workload(args.arch, args.tasks, args.workdir / args.arch)
    config = BenchConfig(proxy_images=args.proxy_images, threads=args.threads, runtime=False)
    out = args.workdir / "census-out"
    out.mkdir(parents=True, exist_ok=True)
    run = run_build(workload, "esm++", args.tasks, config, out)
    mib = 2**20
    print(
        f"{args.arch} T={args.tasks}: peak {run.peak_bytes / mib:.0f} MiB, baseline {run.baseline_bytes / mib:.0f} MiB"
    )
    for name, (total, rss, counted) in largest.items():
        peak = run.stage_peak_bytes.get(name, 0) / mib
        print(f"\n{name}: live tensors {total / mib:.0f} MiB, RSS then {rss / mib:.0f} MiB, stage peak {peak:.0f} MiB")
        for owner, size in sorted(counted.items(), key=lambda item: -item[1]):
            print(f"  {size / mib:8.1f} MiB  {owner}")


if __name__ == "__main__":
    main()
