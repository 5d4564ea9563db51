"""Activation statistics at the input of every linear layer, streamed over batches of images.

For each requested layer the accumulator keeps the uncentred Gram ``XᵀX`` (d_in × d_in, float64), the
token sum and count, and one mean token feature per image (what the router compares to prototypes).
Memory is independent of the number of images: nothing per token is kept. :func:`capture_blockwise`
goes further and holds one block's statistics at a time (a ViT-L/14 keeps 3.8 GB of Grams for all blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from esmpp.architecture import PATCH_KEY, block_index, linear_kind
from esmpp.decompose import gram_matrix
from esmpp.runtime.layers import explicit_attention, image_patches, routed_slot


@dataclass
class ActivationStats:
    """Statistics of the tokens X [N, d_in] entering one linear layer over a proxy set.

    ``gram`` is XᵀX, or, for a layer captured with a projection ΔW (``d_out × d_in``), the second moment
    of the projected tokens ΔYᵀΔY = ΔW XᵀX ΔWᵀ (``d_out × d_out``): ``projected`` says which.
    """

    gram: torch.Tensor  # [d_in, d_in] float64, XᵀX (or [d_out, d_out], ΔYᵀΔY, when projected)
    mean: torch.Tensor  # [d_in] float64, mean token
    num_tokens: int  # N
    image_means: torch.Tensor  # [num_images, d_in] float32, mean token of each image
    projected: bool = False


class _Accumulator:
    def __init__(self, with_gram: bool, projection: torch.Tensor | None = None) -> None:
        self.with_gram = with_gram
        self.projection = projection  # [d_out, d_in] float64: the Gram is then that of X projectionᵀ
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0
        self.image_means: list[torch.Tensor] = []

    def add(self, tokens: torch.Tensor) -> None:
        """``tokens`` [B, N, d] (batch first)."""
        flat = tokens.detach().reshape(-1, tokens.shape[-1]).double()
        if self.with_gram:
            seen = flat if self.projection is None else flat @ self.projection.T
            gram = gram_matrix(seen)
            self.gram = gram if self.gram is None else self.gram + gram
        total = flat.sum(dim=0)
        self.total = total if self.total is None else self.total + total
        self.count += flat.shape[0]
        self.image_means.append(tokens.detach().float().mean(dim=1))

    def finish(self) -> ActivationStats:
        width = self.total.shape[0]
        return ActivationStats(
            gram=self.gram if self.gram is not None else torch.zeros(0, 0, dtype=torch.float64),
            mean=self.total / self.count,
            num_tokens=self.count,
            image_means=torch.cat(self.image_means).reshape(-1, width),
            projected=self.projection is not None,
        )


Projection = Callable[[str], torch.Tensor | None]  # key → a matrix to project its tokens by, or None


def _hook_layers(
    visual: nn.Module, keys: Iterable[str], with_gram: bool, projection: Projection | None = None
) -> tuple[dict[str, _Accumulator], list]:
    """Forward pre-hooks feeding an accumulator per weight key (``visual`` has explicit attention); keys
    that ``projection`` gives a matrix accumulate the Gram of their tokens projected by it."""
    accumulators: dict[str, _Accumulator] = {}
    handles = []
    for key in keys:
        if key == PATCH_KEY:  # the patch embedding's input: the images, as flattened patches
            accumulator = accumulators[key] = _Accumulator(with_gram)

            def patch_hook(mod: nn.Module, args: tuple, acc: _Accumulator = accumulator) -> None:
                acc.add(image_patches(args[0], mod.kernel_size[0]))

            handles.append(visual.conv1.register_forward_pre_hook(patch_hook))
            continue
        kind, block = linear_kind(key), block_index(key)
        if kind is None or block is None:
            raise ValueError(f"{key!r} is not the weight of a block's linear layer")
        accumulator = accumulators[key] = _Accumulator(with_gram, projection(key) if projection else None)
        module, _ = routed_slot(visual, block, kind)
        if kind == "qkv":  # the attention module's first argument is the in-projection's input
            module = visual.transformer.resblocks[block].attn

        def hook(mod: nn.Module, args: tuple, acc: _Accumulator = accumulator) -> None:
            tokens = args[0]
            acc.add(tokens if getattr(mod, "batch_first", True) else tokens.transpose(0, 1))

        handles.append(module.register_forward_pre_hook(hook))
    return accumulators, handles


def _finish(accumulators: dict[str, _Accumulator]) -> dict[str, ActivationStats]:
    if any(acc.count == 0 for acc in accumulators.values()):
        raise ValueError("no images were forwarded: the proxy set is empty")
    return {key: acc.finish() for key, acc in accumulators.items()}


def capture_statistics(
    visual: nn.Module,
    batches: Iterable[torch.Tensor],
    keys: Iterable[str],
    with_gram: bool = True,
    run: Callable[[torch.Tensor], object] | None = None,
) -> dict[str, ActivationStats]:
    """Forward ``batches`` of normalised images [B, 3, H, W] through ``visual`` and return, for each
    linear weight key in ``keys`` (e.g. ``transformer.resblocks.0.attn.in_proj_weight``), the statistics
    of its input tokens. ``visual`` gets explicit attention modules (same keys and outputs) so that the
    attention in- and out-projections can be observed. ``run(images)`` replaces ``visual(images)`` when
    the forward needs more (e.g. a routed model with a forced task). The patch embedding's key
    (``conv1.weight``) gives the statistics of the flattened patches."""
    explicit_attention(visual)
    accumulators, handles = _hook_layers(visual, keys, with_gram)
    try:
        with torch.no_grad():
            for images in batches:
                (run or visual)(images)
    finally:
        for handle in handles:
            handle.remove()
    return _finish(accumulators)


class _FirstBlockReachedError(Exception):
    """Raised by the hook that catches the tokens entering the first block (nothing after it runs)."""


def _block_inputs(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tokens ``visual`` feeds its first transformer block for ``images`` [B, 3, H, W], in the
    blocks' own layout: open_clip's stem (patches, class and position embeddings, ln_pre) runs, the
    blocks do not."""
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple) -> None:
        caught.append(args[0])
        raise _FirstBlockReachedError

    handle = visual.transformer.resblocks[0].register_forward_pre_hook(catch)
    try:
        visual(images)
    except _FirstBlockReachedError:
        pass
    finally:
        handle.remove()
    return caught[0]


def capture_blockwise(
    visual: nn.Module,
    batches: Iterable[torch.Tensor],
    keys: Iterable[str],
    projection: Projection | None = None,
) -> Iterator[dict[str, ActivationStats]]:
    """The statistics of :func:`capture_statistics` (with Grams), one transformer block at a time.

    All ``batches`` of images go through block 0, then block 1, ...; between blocks only the residual
    stream of every proxy token is kept ([n, tokens, width] in all), so the Grams alive are those of one
    block (its ``keys``), yielded as ``{key: ActivationStats}`` before the next block runs. Blocks without
    a key in ``keys`` are run but not yielded; blocks after the last such block are not run.

    ``projection(key)``: a matrix ΔW (``d_out × d_in``, float64) for keys whose statistic should be the
    second moment of the projected tokens, ΔW XᵀX ΔWᵀ, instead of XᵀX (``projected`` stats; the smaller
    one when d_out < d_in, and all that ESD needs of that layer), None for the others. It is asked when
    the key's block runs, so that only that block's matrices are alive.
    """
    explicit_attention(visual)
    by_block: dict[int, list[str]] = {}
    for key in keys:
        by_block.setdefault(block_index(key) if linear_kind(key) else None, []).append(key)
    if None in by_block:
        raise ValueError(f"{by_block[None][0]!r} is not the weight of a block's linear layer")
    if not by_block:
        return
    with torch.no_grad():
        stream = [_block_inputs(visual, images) for images in batches]
    if not stream:
        raise ValueError("no images were forwarded: the proxy set is empty")
    for block in range(max(by_block) + 1):
        accumulators, handles = _hook_layers(visual, by_block.get(block, []), with_gram=True, projection=projection)
        try:
            with torch.no_grad():
                stream = [visual.transformer.resblocks[block](tokens) for tokens in stream]
        finally:
            for handle in handles:
                handle.remove()
        if accumulators:
            yield _finish(accumulators)
