"""Shared fixtures: a tiny open_clip ViT (width 32, 2 layers, 2 heads, patch 8, 16×16 images), random
routed artifacts built from it, and ``tiny_zoo``: the tiny zoo preset built once per test session."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import save_file

from esmpp.architecture import Architecture, as_matrix, build_visual, routed_keys
from esmpp.artifact import Artifact, TaskInfo, save_artifact
from esmpp.runtime.model import Experts
from esmpp.zoo import Zoo, build_zoo

# Hypothesis: a fast profile for CI (the default) and a long one, `HYPOTHESIS_PROFILE=nightly`.
settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread: on the shared 2-core CI machine, torch's default thread pool spins on tiny matrices (an SVD of
# 96×32 takes 0.3 s instead of 0.1 ms under load); results do not depend on it.
torch.set_num_threads(1)

_HOLD_CLAIM = """
import sys
from pathlib import Path
from esmpp.atomic import claimed_destination
with claimed_destination(Path(sys.argv[1])):
    print("claimed", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


@contextlib.contextmanager
def claim_held_elsewhere(destination: Path) -> Iterator[Callable[[], None]]:
    """Another process holds ``destination``'s claim (esmpp.atomic.claimed_destination) until the yielded
    ``release()`` is called; it is killed at the end of the block if it still runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_CLAIM, str(destination)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def release() -> None:
        holder.stdin.write("done\n")
        holder.stdin.flush()

    try:
        assert holder.stdout.readline() == "claimed\n"
        yield release
    finally:
        holder.kill()
        holder.wait()


TINY_ARCH = Architecture(
    embed_dim=16,
    vision={"width": 32, "layers": 2, "patch_size": 8, "image_size": 16, "head_width": 16},
    name="tiny",
)


# A whole CLIP (vision and text towers) as small as open_clip builds one, registered as the open_clip model
# "esmpp-test-clip" by the fixture ``tiny_clip``: for zero-shot heads.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """The open_clip model "esmpp-test-clip" (registered here) with random weights, and the safetensors file
    of its whole state dict (keys prefixed ``model.``, as some trainers save them)."""
    folder = tmp_path_factory.mktemp("configs")
    (folder / "esmpp-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("esmpp-test-clip", pretrained=None).eval()
    path = folder / "clip.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


@pytest.fixture
def tiny_arch() -> Architecture:
    return TINY_ARCH


@pytest.fixture
def tiny_visual(tiny_arch: Architecture) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_visual(tiny_arch)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def random_artifact(
    num_tasks: int = 3,
    rank: int = 4,
    kinds: tuple[str, ...] = ("qkv", "fc"),
    seed: int = 0,
    discriminant: bool = False,
) -> Artifact:
    """A consistent artifact with random backbone, experts, prototypes and heads; ``discriminant`` gives
    its routers biases (the discriminant router's form) instead of the cosine router's unit prototypes."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = build_visual(TINY_ARCH).state_dict()
    experts = {}
    for key in routed_keys(TINY_ARCH, kinds):
        d_out, d_in = as_matrix(backbone[key]).shape
        experts[key] = Experts(
            up=torch.randn(num_tasks, d_out, rank, generator=generator) * 0.1,
            down=torch.randn(num_tasks, rank, d_in, generator=generator) * 0.1,
            prototypes=torch.randn(num_tasks, 1, d_in, generator=generator),
            prototype_bias=-torch.rand(num_tasks, 1, generator=generator) if discriminant else None,
        )
    classes = [[f"c{t}_{i}" for i in range(2 + t)] for t in range(num_tasks)]
    heads = [torch.randn(len(names), TINY_ARCH.embed_dim, generator=generator) for names in classes]
    tasks = [TaskInfo(f"task{t}", names) for t, names in enumerate(classes)]
    return Artifact(TINY_ARCH, tasks, backbone, experts, heads, {"method": "random", "alpha": 1.0})


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask set to the test's indirect parameter (0o022 without one) for the test, then restored."""
    mask = getattr(request, "param", 0o022)
    previous = os.umask(mask)
    yield mask
    os.umask(previous)


@pytest.fixture
def artifact() -> Artifact:
    return random_artifact()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Built under ``<cache>/zoo/tiny`` so that CLI tests find it with ``ESMPP_CACHE=<cache>``."""
    return build_zoo("tiny", root=tmp_path_factory.mktemp("cache") / "zoo" / "tiny", progress=False)


@pytest.fixture(scope="session")
def saved_artifact(tmp_path_factory: pytest.TempPathFactory):
    """A random 3-task artifact on disk, shared by the ONNX and deployment-kit tests: the patch embedding
    routed too, and router biases (the cosine router is the same graph with zero biases)."""
    artifact = random_artifact(num_tasks=3, kinds=("patch", "qkv", "fc"), discriminant=True)
    return save_artifact(artifact, tmp_path_factory.mktemp("artifact") / "art")


@pytest.fixture(scope="session", params=[False, True], ids=["routed", "task_input"])
def exported(request, saved_artifact, tmp_path_factory: pytest.TempPathFactory):
    """(ExportReport, output directory) of ``saved_artifact`` in each mode, exported once per session."""
    from esmpp.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model"
    return export_onnx(saved_artifact, out, task_input=request.param), out
