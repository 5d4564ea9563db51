"""Fuzzing checkpoint loading (`load_encoder`, `check_compatible`) with truncated, corrupted and random files
and with state dicts of wrong shapes, dtypes, values and keys, in every container esmpp reads."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from esmpp.architecture import build_visual
from esmpp.checkpoints import Encoder, check_compatible, load_encoder, probe_checkpoint, save_encoder
from esmpp.errors import CheckpointError, EsmppError
from tests.conftest import TINY_ARCH
from tests.reliability.cases import attempt

_ZIP, _LEGACY = b"PK\x03\x04", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool])


def _state(arch=TINY_ARCH, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_visual(arch).state_dict()


STATE = _state()
KEYS = sorted(STATE)


def _load(path: Path, arch) -> Encoder | EsmppError:
    """The contract: an encoder of the right architecture with finite float32 weights, or a CheckpointError;
    and the build's up-front probe refuses nothing that loads."""
    probed = attempt("probe_checkpoint", probe_checkpoint, path, arch)
    result = attempt("load_encoder", load_encoder, path, arch)
    for outcome in (probed, result):
        if isinstance(outcome, EsmppError):
            assert isinstance(outcome, CheckpointError), outcome
            assert str(path) in str(outcome)  # the message names the file
    if isinstance(result, EsmppError):
        return result
    assert not isinstance(probed, EsmppError), probed
    assert set(result.state) == set(STATE)
    for key, value in result.state.items():
        assert value.dtype == torch.float32 and value.shape == STATE[key].shape and torch.isfinite(value).all()
    return result


def _write(state: dict, container: str, path: Path) -> None:
    if container == "safetensors":
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    elif container == "torch":
        torch.save(state, path)
    else:  # torch, wrapped the way training scripts do
        torch.save({"state_dict": state, "epoch": 3}, path)


@given(
    data=st.binary(max_size=400),
    magic=st.sampled_from([b"", _ZIP, _LEGACY, b"\x10\x00\x00\x00\x00\x00\x00\x00{"]),
    arch=st.sampled_from([None, TINY_ARCH]),
)
def test_random_bytes(data, magic, arch):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "model.pt"
        path.write_bytes(magic + data)
        _load(path, arch)


@given(
    container=st.sampled_from(["safetensors", "torch", "wrapped"]),
    damage=st.sampled_from(["truncate", "flip", "splice"]),
    where=st.floats(0, 1),
    noise=st.binary(min_size=1, max_size=16),
)
def test_truncated_or_corrupted_files(container, damage, where, noise):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "model.bin"
        _write(STATE, container, path)
        data = path.read_bytes()
        cut = int(where * len(data))
        if damage == "truncate":
            data = data[:cut]
        elif damage == "flip":
            data = data[:cut] + bytes(b ^ 0xFF for b in data[cut : cut + 8]) + data[cut + 8 :]
        else:
            data = data[:cut] + noise + data[cut + len(noise) :]
        path.write_bytes(data)
        _load(path, TINY_ARCH)


@given(
    container=st.sampled_from(["safetensors", "torch", "wrapped"]),
    edit=st.sampled_from(["shape", "dtype", "nonfinite", "missing", "extra", "prefix", "non-tensor", "int key"]),
    pick=st.integers(0, 10**6),
    shape=st.lists(st.integers(0, 5), max_size=4),
    dtype=dtypes,
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    prefix=st.sampled_from(["visual.", "module.visual.", "model.visual.trunk.", "conv1.weight.", ""]),
    arch=st.sampled_from([None, TINY_ARCH]),
)
def test_state_dict_contents(container, edit, pick, shape, dtype, value, prefix, arch):
    state = dict(STATE)
    key = KEYS[pick % len(KEYS)]
    if edit == "shape":
        state[key] = torch.zeros(shape)
    elif edit == "dtype":
        state[key] = state[key].to(dtype)
    elif edit == "nonfinite":
        state[key] = state[key].clone().view(-1).index_fill(0, torch.tensor([0]), value).view_as(state[key])
    elif edit == "missing":
        del state[key]
    elif edit == "extra":
        state[f"{key}.extra"] = torch.zeros(shape)
    elif edit == "prefix":
        state = {prefix + name: tensor for name, tensor in state.items()}
    elif container == "safetensors":  # only torch files can hold non-tensors and non-string keys
        return
    elif edit == "non-tensor":
        state[key] = [1, 2, 3]
    else:
        state[pick] = torch.zeros(2)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "model.pt"
        _write(state, container, path)
        _load(path, arch)


def _variant(change: dict) -> Encoder:
    arch = dataclasses.replace(TINY_ARCH, vision={**TINY_ARCH.vision, **change.get("vision", {})})
    arch = dataclasses.replace(arch, **{k: v for k, v in change.items() if k != "vision"})
    return Encoder(arch, _state(arch, seed=1), f"finetuned{change}")


VARIANTS = [
    {},
    {"vision": {"width": 48, "head_width": 16}},
    {"vision": {"layers": 3}},
    {"vision": {"patch_size": 4}},
    {"vision": {"image_size": 24}},
    {"vision": {"head_width": 8}},
    {"vision": {"mlp_ratio": 2.0}},
    {"embed_dim": 8},
    {"quick_gelu": True},
]


@pytest.mark.parametrize("change", VARIANTS, ids=[str(v) for v in VARIANTS])
@pytest.mark.parametrize("through_files", [False, True])
def test_mixture_of_architectures(tmp_path, change, through_files):
    pretrained = Encoder(TINY_ARCH, STATE, "pretrained")
    finetuned = _variant(change)
    if through_files:  # save_encoder keeps the architecture; load it back without and with the pretrained one
        path = save_encoder(finetuned, tmp_path / "finetuned.safetensors")
        finetuned = _load_any(path, None)
        _load_any(path, TINY_ARCH)
    result = attempt("check_compatible", check_compatible, pretrained, finetuned)
    assert (result is None) == (change == {}), result
    if result is not None:
        assert isinstance(result, CheckpointError) and "pretrained" in str(result)


def _load_any(path: Path, arch):
    result = attempt("load_encoder", load_encoder, path, arch)
    assert isinstance(result, (Encoder, CheckpointError)), result
    return result
