"""A complete `esmpp build` project on disk, made of tiny synthetic files: a pretrained tiny ViT and perturbed
fine-tunes (``save_encoder``), one head file and one folder of proxy PNGs per task, and the YAML config."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from esmpp.architecture import build_visual
from esmpp.checkpoints import Encoder, save_encoder
from tests.conftest import TINY_ARCH

REPO = Path(__file__).resolve().parents[2]


def write_project(root: Path, num_tasks: int = 2, images_per_task: int = 3, options: dict | None = None) -> Path:
    """Write the project under ``root`` and return its config path (relative paths inside, as users write)."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pretrained = build_visual(TINY_ARCH).state_dict()
    save_encoder(Encoder(TINY_ARCH, pretrained, "pretrained"), root / "pretrained.safetensors")
    tasks = []
    for t in range(num_tasks):
        generator = torch.Generator().manual_seed(100 + t)
        finetuned = {
            key: value + 0.02 * torch.randn(value.shape, generator=generator) for key, value in pretrained.items()
        }
        save_encoder(Encoder(TINY_ARCH, finetuned, f"task{t}"), root / f"task{t}.safetensors")
        save_file({"head": torch.randn(3, TINY_ARCH.embed_dim, generator=generator)}, root / f"head{t}.safetensors")
        proxy = root / f"proxy{t}"
        proxy.mkdir(exist_ok=True)
        rng = np.random.default_rng(t)
        template = rng.integers(0, 256, (16, 16, 3))
        for i in range(images_per_task):
            noisy = np.clip(template + rng.integers(-20, 21, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(proxy / f"{i}.png")
        tasks.append(
            {
                "name": f"task{t}",
                "checkpoint": f"task{t}.safetensors",
                "head": f"head{t}.safetensors",
                "proxy": f"proxy{t}",
            }
        )
    config = {
        "pretrained": "pretrained.safetensors",
        "tasks": tasks,
        "options": {"alpha": 1.0, "rank": 2, **(options or {})},
    }
    path = root / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def esmpp_command(*args: str | Path) -> list[str]:
    """The `esmpp` command line as a subprocess runs it from the checkout."""
    return [sys.executable, "-m", "esmpp.cli", *map(str, args)]


def esmpp_environment() -> dict[str, str]:
    """The environment of an `esmpp` subprocess: this process's as it is now (a test may point TMPDIR at its
    own folder), on one thread, as in tests/conftest.py: torch's thread pool is slow on tiny matrices on a busy
    machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_esmpp(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        esmpp_command(*args), cwd=REPO, env=esmpp_environment(), capture_output=True, text=True, timeout=300
    )


def directory_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name."""
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }
