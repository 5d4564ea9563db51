"""Loading the checkpoints users have into the canonical form: an open_clip visual state dict + Architecture.

Accepted inputs (detected from the content, not the file name):

- open_clip state dicts, whole CLIP or visual tower only, as ``.safetensors`` or torch files
  (``.pt``/``.pth``/``.bin``), with any prefix before the visual keys (``visual.``, ``model.visual.``,
  ``image_encoder.model.visual.``, DDP's ``module.``), optionally wrapped in ``{"state_dict": ...}``;
- files written by :func:`save_encoder` (safetensors whose metadata carries the architecture);
- Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` weights, as a
  directory (``config.json`` + ``model.safetensors`` [sharded or not] or ``pytorch_model.bin``) or a single
  file with HF key names;
- open_clip hub directories (``open_clip_config.json`` + ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``);
- whole pickled models such as the task_vectors / TALL-masks ``ImageEncoder`` files, only with
  ``allow_pickle=True`` (see :mod:`esmpp.legacy_pickle`).

Safetensors files are opened lazily and only the visual keys are read. Floating tensors are returned as
float32, the precision the merging math runs in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.model import CLIPVisionCfg
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from esmpp.architecture import Architecture, block_index, build_visual, linear_key, weight_shapes
from esmpp.errors import ArchitectureError, CheckpointError
from esmpp.hf_convert import HF_MARKER_KEY, HF_PROJECTION_KEY, apply_hf_config, hf_to_open_clip
from esmpp.legacy_pickle import load_pickled, module_hints

# One metadata entry: safetensors stores metadata in a hash map, so with two entries their order in the
# file header (and the file's bytes) could change from one save to the next.
ENCODER_METADATA_KEY = "esmpp.encoder"
FORMAT_VERSION = "1"

# The key that marks an open_clip visual tower; what precedes it is the prefix to strip.
_OPEN_CLIP_MARKER_KEY = "conv1.weight"
_TORCH_ZIP_MAGIC = b"PK\x03\x04"
# torch's pre-1.6 format starts with a pickled magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_OPEN_CLIP_DEFAULT_HEAD_WIDTH = 64
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# How users name a checkpoint's architecture: a build config key or a Python keyword (no command takes it).
_ARCHITECTURE_SETTING = "`architecture: ViT-B-16` in the build config, arch='ViT-B-16' in Python"
_SUPPORTED = (
    "Expected an open_clip or Hugging Face CLIP checkpoint: a .safetensors or torch (.pt/.pth/.bin) file, "
    "or a Hugging Face model directory"
)


@dataclass
class Encoder:
    """A visual encoder in canonical form. ``source`` is where it came from, for messages."""

    arch: Architecture
    state: dict[str, Tensor]
    source: str

    def to_module(self, share: bool = False) -> nn.Module:
        """The open_clip vision tower with these weights (eval mode): its own copies, or with ``share`` this
        encoder's tensors themselves, which saves a model's worth of memory for read-only uses such as
        capturing activations (writes to the module's weights would then change the encoder)."""
        with torch.device("meta"):  # skip the random initialisation the weights replace anyway
            module = build_visual(self.arch)
        state = self.state if share else {key: value.clone() for key, value in self.state.items()}
        module.load_state_dict(state, assign=True)
        return module.eval()


@dataclass
class _Found:
    """What a reader found: the canonical state, and the architecture or hints the file carries."""

    state: dict[str, Tensor]
    hf: bool = False  # converted from Hugging Face names
    arch: Architecture | None = None
    hints: dict[str, Any] = field(default_factory=dict)  # infer_architecture keywords
    # Why the architecture the file names is unusable: raised only if the caller names none (naming one is the fix).
    arch_error: CheckpointError | None = None


@dataclass(frozen=True)
class _Layout:
    """Where the visual tower sits among a checkpoint's keys."""

    hf: bool  # Hugging Face key names (else open_clip)
    prefix: str  # stripped from every visual key
    keys: tuple[str, ...]  # the full keys to read
    projection_key: str | None = None  # HF visual_projection.weight, if present


def load_encoder(
    path: str | os.PathLike[str],
    arch: Architecture | str | None = None,
    allow_pickle: bool = False,
    fix: str | None = None,
) -> Encoder:
    """Load a visual encoder from ``path`` (any input listed in the module docstring).

    ``arch`` (an :class:`Architecture` or an open_clip model name such as ``ViT-B-32``) is checked against
    the tensor shapes; without it the architecture comes from the file (esmpp metadata, a Hugging Face or
    open_clip config, a pickled model) or is inferred from the shapes (:func:`infer_architecture`).
    ``allow_pickle`` permits unpickling whole models, which can run arbitrary code: trusted files only.
    ``fix``: what a key or shape mismatch tells to do (default: name the architecture; see :func:`check_state`).
    Raises :class:`CheckpointError` naming the file, the key and the fix for anything unusable.
    """
    path = Path(path)
    source = str(path)
    found = _read(path, allow_pickle)
    if isinstance(arch, str):
        arch = Architecture.from_name(arch)
    if arch is None:
        if found.arch_error is not None:
            raise found.arch_error
        arch = found.arch or infer_architecture(found.state, source=source, **found.hints)
    check_state(found.state, arch, source, fix=fix)
    return Encoder(arch=arch, state=found.state, source=source)


def save_encoder(encoder: Encoder, path: str | os.PathLike[str]) -> Path:
    """Write ``encoder`` as safetensors with its architecture in the metadata, so that
    :func:`load_encoder` reloads it without ``arch``. Written atomically (temporary file, then rename); on
    failure the temporary file is removed and the error raised as it is, for callers to explain."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    metadata = {
        ENCODER_METADATA_KEY: json.dumps(
            {"format": FORMAT_VERSION, "architecture": encoder.arch.to_dict()}, sort_keys=True
        ),
    }
    try:
        save_file({key: value.contiguous() for key, value in encoder.state.items()}, temporary, metadata)
        os.replace(temporary, path)
    except BaseException:  # a full disk, Ctrl-C: no partial file left beside the checkpoints
        temporary.unlink(missing_ok=True)
        raise
    return path


def check_compatible(pretrained: Encoder, finetuned: Encoder) -> None:
    """Raise :class:`CheckpointError` naming both files unless ``finetuned`` has the architecture, keys and
    shapes of ``pretrained`` (task vectors are differences of the two, so they must line up exactly)."""
    problems = []
    if _structure(pretrained.arch) != _structure(finetuned.arch):
        problems.append(f"architectures differ ({_describe(pretrained.arch)} vs {_describe(finetuned.arch)})")
    missing = sorted(pretrained.state.keys() - finetuned.state.keys())
    extra = sorted(finetuned.state.keys() - pretrained.state.keys())
    if missing:
        problems.append(f"{len(missing)} keys missing from the fine-tuned one, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} keys only in the fine-tuned one, e.g. {extra[:3]}")
    reshaped = [
        f"{key} {tuple(pretrained.state[key].shape)} vs {tuple(finetuned.state[key].shape)}"
        for key in sorted(pretrained.state.keys() & finetuned.state.keys())
        if pretrained.state[key].shape != finetuned.state[key].shape
    ]
    if reshaped:
        problems.append(f"{len(reshaped)} shapes differ, e.g. {reshaped[:3]}")
    if problems:
        raise CheckpointError(
            f"The fine-tuned checkpoint {finetuned.source} does not match the pretrained checkpoint "
            f"{pretrained.source}: {'; '.join(problems)}. Fine-tuned encoders must be fine-tuned from that "
            "pretrained encoder: pick checkpoints of the same model, or pass the same architecture for all."
        )


def check_state(
    state: dict[str, Tensor], arch: Architecture, source: str, values: bool = True, fix: str | None = None
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the keys and shapes of ``arch``'s
    vision tower and (unless not ``values``, e.g. for shapes read from a header) only finite values.
    ``fix``: what the messages tell to do about a key or shape mismatch (default: name the architecture)."""
    expected = weight_shapes(arch)
    fix = fix or (
        f"Name the architecture the checkpoint was trained with ({_ARCHITECTURE_SETTING}), "
        "or leave it out to infer it from the weights"
    )
    # Shapes first: a wrong architecture shows as a different width before it shows as missing layers.
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, architecture {arch.name!r} expects "
                f"{shape}. {fix}."
            )
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} keys of architecture {arch.name!r} are missing, e.g. {missing[:4]}. "
            f"{fix}; or check that the file is a complete visual encoder."
        )
    extra = sorted(state.keys() - expected.keys())
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} keys are not part of architecture {arch.name!r}, e.g. {extra[:4]}. "
            f"{fix}. Only open_clip ViT vision towers are supported."
        )
    if not values:  # shapes read from a header: there are no values to check
        return
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(
                f"{source}: {key} holds {value.dtype} values, expected floating-point weights. The checkpoint "
                "is corrupted or not a model's weights: re-export it as a state dict of float tensors."
            )
        if not torch.isfinite(value).all():
            raise CheckpointError(
                f"{source}: {key} contains NaN or infinite values. The checkpoint is corrupted (diverged "
                "training or a broken download): re-export or re-download it."
            )


def infer_architecture(
    state: dict[str, Tensor],
    *,
    head_width: int | None = None,
    quick_gelu: bool = False,
    source: str = "the state dict",
) -> Architecture:
    """The open_clip ViT architecture of a visual ``state`` dict, from its tensor shapes.

    width and patch size from ``conv1.weight`` [width, 3, patch, patch]; image size from
    ``positional_embedding`` [(image/patch)² + 1, width]; layers from the block indices; ``mlp_ratio``
    from ``c_fc``; ``embed_dim`` from ``proj`` [width, embed_dim]; layer scale and ``no_ln_pre`` from the
    presence of their keys.

    Shapes cannot tell the number of heads nor the activation. When the shapes equal those of an open_clip
    model config (with the same ``quick_gelu``), that config's head width and name are used (ViT-H-14's
    head width is 80, for instance). Otherwise ``head_width`` is 64 (open_clip's default) when it divides
    the width, else the largest divisor of the width below 64 — pass ``head_width`` or a full architecture
    when that guess is wrong. ``quick_gelu`` defaults to open_clip's default (GELU); OpenAI-pretrained
    weights use QuickGELU (e.g. ``ViT-B-32-quickgelu``).
    """
    conv1 = _tensor(state, "conv1.weight", 4, source)
    width, _, patch, patch_width = conv1.shape
    positions = _tensor(state, "positional_embedding", 2, source).shape[0] - 1
    grid = math.isqrt(positions)
    if patch != patch_width or grid * grid != positions:
        raise CheckpointError(
            f"{source}: conv1.weight {tuple(conv1.shape)} and positional_embedding with {positions} patches "
            "do not describe a square ViT. Only square open_clip ViTs are supported: pass the architecture."
        )
    blocks = {index for index in map(block_index, state) if index is not None}
    if not blocks:
        raise CheckpointError(f"{source}: no transformer.resblocks.* keys; not an open_clip ViT tower.")
    mlp_width = _tensor(state, linear_key(0, "fc"), 2, source).shape[0]
    # open_clip sizes the MLP as int(width * mlp_ratio): make sure that lands on mlp_width exactly.
    mlp_ratio = mlp_width / width
    if int(width * mlp_ratio) != mlp_width:
        mlp_ratio = (mlp_width + 0.5) / width
    vision: dict[str, Any] = {
        "width": width,
        "layers": max(blocks) + 1,
        "patch_size": patch,
        "image_size": grid * patch,
        "mlp_ratio": mlp_ratio,
        "head_width": head_width or _default_head_width(width),
    }
    if "transformer.resblocks.0.ls_1.gamma" in state:
        vision["ls_init_value"] = 1e-5  # any value: the loaded gammas replace it
    if "ln_pre.weight" not in state:
        vision["no_ln_pre"] = True
    embed_dim = _tensor(state, "proj", 2, source).shape[1]
    arch = Architecture(embed_dim=embed_dim, vision=vision, quick_gelu=quick_gelu)
    return _known_name(arch, keep_head_width=head_width is not None)


def _default_head_width(width: int) -> int:
    if width % _OPEN_CLIP_DEFAULT_HEAD_WIDTH == 0:
        return _OPEN_CLIP_DEFAULT_HEAD_WIDTH
    return max(d for d in range(1, _OPEN_CLIP_DEFAULT_HEAD_WIDTH + 1) if width % d == 0)


def _known_name(arch: Architecture, keep_head_width: bool) -> Architecture:
    """``arch`` named (and given the head width of) the open_clip config with the same structure."""
    matches = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name) or {}
        vision = config.get("vision_cfg", {})
        candidate = Architecture(
            embed_dim=int(config.get("embed_dim", 0)),
            vision=vision,
            quick_gelu=bool(config.get("quick_gelu", False)),
        )
        head_width = (
            arch.vision["head_width"] if keep_head_width else vision.get("head_width", CLIPVisionCfg.head_width)
        )
        adopted = dataclasses.replace(arch, vision={**arch.vision, "head_width": head_width})
        if _structure(candidate, strict=False) == _structure(adopted):
            # Prefer the plain ViT names over variants sharing the tower (e.g. roberta-ViT-B-32).
            matches.append((not name.startswith("ViT-"), len(name), name, adopted))
    if not matches:
        return arch
    *_, name, adopted = min(matches, key=lambda match: match[:3])
    return dataclasses.replace(adopted, name=name)


def _structure(arch: Architecture, strict: bool = True) -> tuple[Any, ...] | None:
    """Everything about ``arch`` that decides the weights' meaning: the full vision config (defaults
    filled in, MLP ratio as the MLP width it yields, training-only settings dropped), embed_dim and the
    activation. None for configs that are not plain ViTs (with ``strict=False``)."""
    try:
        vision = dataclasses.asdict(CLIPVisionCfg(**arch.vision))
    except TypeError as exc:
        if not strict:
            return None
        raise CheckpointError(f"Invalid open_clip vision config {arch.vision!r}: {exc}") from exc
    if vision["timm_model_name"] or isinstance(vision["layers"], (list, tuple)):
        return None
    size = vision["image_size"]
    vision["image_size"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    vision["mlp_ratio"] = int(vision["width"] * vision["mlp_ratio"])
    del vision["patch_dropout"]
    return (arch.embed_dim, arch.quick_gelu, json.dumps(vision, sort_keys=True, default=str))


def _describe(arch: Architecture) -> str:
    vision = arch.vision
    return (
        f"{arch.name}: width {vision.get('width')}, {vision.get('layers')} layers, "
        f"patch {vision.get('patch_size')}, image {vision.get('image_size')}, embed_dim {arch.embed_dim}, "
        f"head_width {vision.get('head_width', CLIPVisionCfg.head_width)}, quick_gelu {arch.quick_gelu}"
    )


def _tensor(state: dict[str, Tensor], key: str, ndim: int, source: str) -> Tensor:
    value = state.get(key)
    # An empty dimension describes no model (and would divide by zero when the architecture is inferred).
    if value is None or value.ndim != ndim or 0 in value.shape:
        found = "missing" if value is None else f"of shape {tuple(value.shape)}"
        raise CheckpointError(
            f"{source}: {key} is {found}; an open_clip ViT visual tower has a {ndim}-D {key} with no empty "
            "dimension. "
            "Check that the file is a CLIP ViT checkpoint, or pass its architecture."
        )
    return value


# ---------------------------------------------------------------------------------------------- readers


def probe_checkpoint(
    path: str | os.PathLike[str],
    arch: Architecture | None = None,
    fix: str | None = None,
    allow_pickle: bool = False,
) -> None:
    """Check now, without reading any weights, that ``path`` is something :func:`load_encoder` reads: an
    existing file in a checkpoint format, or a folder with model weights; with ``arch``, the checkpoint's
    keys and shapes too, from a safetensors header or a memory-mapped torch file. Raises the
    :class:`CheckpointError` that loading it would (``fix``, if given, replaces its advice on a mismatch with
    ``arch``); the values are checked when it loads. A build probes every task first, so that a wrong path or
    model fails before the long work, not after the tasks before it.

    Checked only when they load: sharded folders, torch files in the legacy (non-zip) format, which cannot
    be mapped, and, with ``allow_pickle``, whole pickled models, which are not unpickled twice."""
    path = Path(path)
    weights = _directory_weights(path) if path.is_dir() else path
    if weights.name.endswith(".index.json"):
        return
    file_format = _file_format(weights)
    if arch is None:
        return
    if file_format == "safetensors":
        found = _read_safetensors([weights], str(path), shapes_only=True)
    elif _is_zipped(weights):
        try:
            found = _read_torch(weights, allow_pickle=False, shapes_only=True)
        except CheckpointError as exc:
            if allow_pickle and isinstance(exc.__cause__, pickle.UnpicklingError):
                return
            raise
    else:
        return
    check_state(found.state, arch, str(path), values=False, fix=fix)


def _read(path: Path, allow_pickle: bool) -> _Found:
    if path.is_dir():
        return _read_directory(path, allow_pickle)
    if _file_format(path) == "torch":
        return _read_torch(path, allow_pickle)
    return _read_safetensors([path], str(path))


def _file_format(path: Path) -> Literal["torch", "safetensors"]:
    """The format of the file ``path``, from its first bytes."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. {_SUPPORTED}.")
    with path.open("rb") as file:
        head = file.read(len(_TORCH_LEGACY_MAGIC))
    if head.startswith((_TORCH_ZIP_MAGIC, _TORCH_LEGACY_MAGIC)):
        return "torch"
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return "safetensors"
    raise CheckpointError(f"{path} is not a checkpoint (it starts with {head[:8]!r}). {_SUPPORTED}.")


def _directory_weights(path: Path) -> Path:
    """The weights file of the model folder ``path`` (the first of the known names present)."""
    names = (*_HF_WEIGHT_FILES, *_OPEN_CLIP_WEIGHT_FILES)
    weights = [path / name for name in names if (path / name).is_file()]
    if not weights:
        raise CheckpointError(
            f"{path} is a directory without model weights: expected one of "
            f"{', '.join(_HF_WEIGHT_FILES + _OPEN_CLIP_WEIGHT_FILES)}. {_SUPPORTED}."
        )
    return weights[0]


def _read_directory(path: Path, allow_pickle: bool) -> _Found:
    weights_file = _directory_weights(path)
    if weights_file.name.endswith(".index.json"):
        shards = sorted(set(_read_json(weights_file).get("weight_map", {}).values()))
        found = _read_safetensors([path / shard for shard in shards], str(path))
    else:
        found = _read(weights_file, allow_pickle)
    hf_config, open_clip_config = path / "config.json", path / "open_clip_config.json"
    if found.hf and hf_config.is_file():
        preprocessor = path / "preprocessor_config.json"
        inferred = infer_architecture(found.state, source=str(weights_file), quick_gelu=True)
        found.arch = apply_hf_config(
            inferred,
            _read_json(hf_config),
            _read_json(preprocessor) if preprocessor.is_file() else None,
            str(hf_config),
        )
    elif open_clip_config.is_file():
        found.arch = _open_clip_hub_architecture(_read_json(open_clip_config), str(open_clip_config))
    return found


def _open_clip_hub_architecture(config: dict[str, Any], source: str) -> Architecture:
    model = config.get("model_cfg")
    if not isinstance(model, dict) or "vision_cfg" not in model or "embed_dim" not in model:
        raise CheckpointError(
            f"{source}: expected a 'model_cfg' with 'embed_dim' and 'vision_cfg' (open_clip hub format). "
            "Remove the file to infer the architecture from the weights, or pass it explicitly."
        )
    preprocess = config.get("preprocess_cfg", {})
    return Architecture(
        embed_dim=int(model["embed_dim"]),
        vision=dict(model["vision_cfg"]),
        name=Path(source).parent.name,
        quick_gelu=bool(model.get("quick_gelu", False)),
        mean=tuple(preprocess.get("mean", Architecture.mean)),
        std=tuple(preprocess.get("std", Architecture.std)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}). Restore or re-export the file.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds JSON {type(data).__name__}, expected an object.")
    return data


def _read_safetensors(paths: list[Path], source: str, shapes_only: bool = False) -> _Found:
    """Read only the visual keys of one safetensors file or of the shards of one checkpoint; with
    ``shapes_only``, only their shapes from the header (as tensors on the meta device)."""
    with ExitStack() as stack:
        try:
            handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{source} is not a valid safetensors file ({exc}). {_SUPPORTED}.") from exc
        owner = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 (not a dict)
        layout = _locate_visual(owner, source)
        if shapes_only:
            tensors = {key: torch.empty(owner[key].get_slice(key).get_shape(), device="meta") for key in layout.keys}
        else:
            tensors = {key: owner[key].get_tensor(key) for key in layout.keys}
        metadata = handles[0].metadata() or {}
    found = _canonical(layout, tensors, source)
    if ENCODER_METADATA_KEY in metadata:
        try:
            found.arch = _metadata_architecture(metadata, source)
        except CheckpointError as exc:
            found.arch_error = exc
    return found


def _metadata_architecture(metadata: dict[str, str], source: str) -> Architecture:
    try:
        entry = json.loads(metadata[ENCODER_METADATA_KEY])
        version = entry.get("format") if isinstance(entry, dict) else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{source}: metadata key {ENCODER_METADATA_KEY} is not valid JSON ({exc}). "
            f"Name the architecture ({_ARCHITECTURE_SETTING}) or re-save the encoder."
        ) from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: metadata {ENCODER_METADATA_KEY} has format {version!r}, this esmpp "
            f"reads format {FORMAT_VERSION}. Upgrade esmpp or re-save the encoder with this version."
        )
    try:
        return Architecture.from_dict(entry["architecture"])
    except (ArchitectureError, KeyError, TypeError, ValueError) as exc:  # from_dict says which key, not which file
        raise CheckpointError(
            f"{source}: metadata key {ENCODER_METADATA_KEY} holds no valid architecture ({exc}). "
            f"Name the architecture ({_ARCHITECTURE_SETTING}) or re-save the encoder."
        ) from exc


def _is_zipped(path: Path) -> bool:
    """Whether the torch file ``path`` is in the zip format (torch ≥ 1.6), which torch can memory-map."""
    with path.open("rb") as file:
        return file.read(len(_TORCH_ZIP_MAGIC)) == _TORCH_ZIP_MAGIC


def _read_torch(path: Path, allow_pickle: bool, shapes_only: bool = False) -> _Found:
    """Read the visual tensors of a torch file; with ``shapes_only`` (a zip file, memory-mapped), only their
    shapes, as tensors on the meta device, so that no weight is read."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zipped(path))
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects (such as a whole model), not just tensors. Unpickling "
                "can run arbitrary code, so it is off by default. If you trust the file, set `allow_pickle: true` "
                "in the build config (allow_pickle=True in Python); or re-save it as a state dict."
            ) from exc
        content = _unpickle(path)
    # torch's parsers fail on damaged bytes in many ways (RuntimeError, EOFError, IndexError from the
    # weights-only unpickler's stack, ...): any failure to parse the file means it is unreadable.
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc}). {_SUPPORTED}."
        ) from exc
    return _from_object(content, str(path), shapes_only)


def _unpickle(path: Path) -> Any:
    try:
        return load_pickled(path)
    except Exception as exc:  # the file's own classes can fail in any way
        raise CheckpointError(
            f"{path} could not be unpickled ({type(exc).__name__}: {exc}). Load it in the code that wrote "
            "it and save model.state_dict() instead."
        ) from exc


def _from_object(content: Any, source: str, shapes_only: bool = False) -> _Found:
    """The visual state inside whatever a torch file held: a state dict (maybe under 'state_dict') or,
    when unpickled, a whole model; with ``shapes_only``, as tensors on the meta device (so that mapping
    Hugging Face keys, which concatenates q, k and v, reads nothing)."""
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    module = content if isinstance(content, nn.Module) else None
    if module is not None:
        content = module.state_dict()
    if not isinstance(content, dict):
        raise CheckpointError(
            f"{source} holds a {type(content).__name__}, not a state dict or a model. "
            f"{_SUPPORTED}, holding a dict of tensors."
        )
    # Visual keys are strings: other keys (a pickled dict may hold any) are not part of a state dict.
    tensors = {key: value for key, value in content.items() if isinstance(key, str) and isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{source} holds a dict without tensors (keys {list(content)[:5]}). "
            f"{_SUPPORTED}, holding a dict of tensors."
        )
    layout = _locate_visual(tensors, source)
    selected = {key: tensors[key] for key in layout.keys}
    if shapes_only:
        selected = {key: torch.empty_like(value, device="meta") for key, value in selected.items()}
    found = _canonical(layout, selected, source)
    if module is not None and not layout.hf:
        found.hints.update(module_hints(module.get_submodule(layout.prefix.rstrip("."))))
    return found


def _locate_visual(keys: Iterable[str], source: str) -> _Layout:
    """Find the visual tower's prefix: the shallowest one before an open_clip ``conv1.weight`` or an HF
    ``embeddings.patch_embedding.weight``."""
    keys = list(keys)
    candidates = [
        (key[: -len(marker)], hf)
        for key in keys
        for marker, hf in ((_OPEN_CLIP_MARKER_KEY, False), (HF_MARKER_KEY, True))
        if key.endswith(marker) and (len(key) == len(marker) or key[-len(marker) - 1] == ".")
    ]
    if not candidates:
        raise CheckpointError(
            f"{source} has no CLIP visual encoder: no key ends in {_OPEN_CLIP_MARKER_KEY!r} (open_clip) or "
            f"{HF_MARKER_KEY!r} (Hugging Face); keys look like {keys[:5]}. {_SUPPORTED}."
        )
    depth = min(prefix.count(".") for prefix, _ in candidates)
    shallowest = [(prefix, hf) for prefix, hf in candidates if prefix.count(".") == depth]
    if len(shallowest) > 1:
        raise CheckpointError(
            f"{source} holds several visual encoders (prefixes {[p for p, _ in shallowest]}). Save the one "
            "you mean on its own, as a state dict of that encoder."
        )
    prefix, hf = shallowest[0]
    projection_key = None
    if hf:
        outer = prefix.removesuffix("vision_model.")
        projection_key = outer + HF_PROJECTION_KEY if outer + HF_PROJECTION_KEY in keys else None
    selected = tuple(key for key in keys if key.startswith(prefix) and key != projection_key)
    return _Layout(
        hf=hf,
        prefix=prefix,
        keys=selected + ((projection_key,) if projection_key else ()),
        projection_key=projection_key,
    )


def _canonical(layout: _Layout, tensors: dict[str, Tensor], source: str) -> _Found:
    visual = {key[len(layout.prefix) :]: value for key, value in tensors.items() if key != layout.projection_key}
    hints: dict[str, Any] = {}
    if layout.hf:
        projection = tensors[layout.projection_key] if layout.projection_key else None
        visual = hf_to_open_clip(visual, projection, source)
        hints["quick_gelu"] = True  # transformers' CLIP default activation
    state = {key: value.float() if value.is_floating_point() else value for key, value in visual.items()}
    return _Found(state=state, hf=layout.hf, hints=hints)
