"""Routed layers that keep open_clip's state-dict keys.

``Attention`` replaces ``nn.MultiheadAttention`` in a block (MHA reads ``in_proj_weight`` and
``out_proj.weight`` directly, so wrapping them does nothing): it owns the same parameters under the same
names, computes attention explicitly, and calls ``out_proj`` as a module, so forward hooks on every linear
layer of a block see its input. ``RoutedLinear`` replaces ``nn.Linear`` (MLP and ``out_proj``).
Each may carry an ``ExpertBank``: low-rank task experts ``A_t B_t`` and task prototypes, applied as
``y = W x + b + A_t (B_t x)`` — never a materialised d_out × d_in delta per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esmpp.runtime.routing import RoutingControl


class ExpertBank(nn.Module):
    """The experts and prototypes of one routed linear layer (buffers, saved with the model).

    Takes the artifact's layout ``up`` [T, d_out, r] (A_t), ``down`` [T, r, d_in] (B_t), ``prototypes``
    [T, m, d_in] and ``prototype_bias`` [T, m]; keeps ``up_rows`` = A_tᵀ [T, r, d_out] (so that a gathered
    expert is the right operand of a batched matmul as it is, with no transposing copy per call). The router's
    scores are ``f · prototype + bias`` (see ``task_scores``); without a bias the router is the paper's cosine
    router: prototypes are normalised and the bias is zero.
    """

    def __init__(
        self, up: torch.Tensor, down: torch.Tensor, prototypes: torch.Tensor, prototype_bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("up_rows", up.transpose(1, 2).contiguous())
        self.register_buffer("down", down)
        if prototype_bias is None:
            prototypes, prototype_bias = F.normalize(prototypes, dim=-1), prototypes.new_zeros(prototypes.shape[:2])
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("prototype_bias", prototype_bias)

    @property
    def num_tasks(self) -> int:
        return int(self.down.shape[0])

    def forward(self, x: torch.Tensor, dense: torch.Tensor, control: RoutingControl) -> torch.Tensor:
        """``dense`` [B, N, d_out] (the layer's ``W x + b``, overwritten) plus the experts' contribution for
        ``x`` [B, N, d_in]."""
        ids, weights = control.route(x, self.prototypes, self.prototype_bias)
        task = shared_task(ids, weights)
        if task is not None:
            return add_shared_expert(dense, x, self.up_rows[task], self.down[task])
        return add_experts(dense, x, self.up_rows, self.down, ids, weights)


def shared_task(ids: torch.Tensor, weights: torch.Tensor | None) -> int | None:
    """The one task that every image of the batch uses, alone and at weight 1, when that can be known
    for free: in eager runs on the CPU. A traced graph (ONNX export, ``torch.compile``) must not branch on
    the routing decisions, and on a GPU reading them would wait for the device. ``ids`` [B, k]."""
    if weights is not None or ids.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    first = ids[0, 0]
    return int(first) if bool((ids == first).all()) else None


def add_shared_expert(dense: torch.Tensor, x: torch.Tensor, up_rows: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``dense`` + A (B x) for one expert used by the whole batch: ``dense`` [B, N, d_out] (contiguous,
    accumulated into in place), ``x`` [B, N, d_in], ``up_rows`` = Aᵀ [r, d_out], ``down`` = B [r, d_in].

    Two GEMMs over all B·N tokens, without gathering a copy of the expert per image: on ViT-B/32's c_fc at
    batch 32 (CPU, one thread) the expert added 2 % to the layer's time, against 8 % through
    :func:`add_experts`' per-image batched matmuls."""
    hidden = torch.matmul(x, down.T)  # [B, N, r]
    dense.view(-1, dense.shape[-1]).addmm_(hidden.reshape(-1, down.shape[0]), up_rows)
    return dense


def add_experts(
    dense: torch.Tensor,
    x: torch.Tensor,
    up_rows: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """``dense`` + Σ_j w_bj · A_{ids_bj} (B_{ids_bj} x_b), batched by gathering each image's experts.

    ``dense`` [B, N, d_out] (accumulated into, in place: callers pass the fresh output of their dense layer),
    ``x`` [B, N, d_in], ``up_rows`` [T, r, d_out] (A_tᵀ), ``down`` [T, r, d_in], ``ids`` [B, k], ``weights``
    [B, k] or None (k = 1 at weight 1: hard or forced routing) → [B, N, d_out].

    The k chosen experts of an image act as one expert of rank k·r, [A_1 … A_k] diag(w) [B_1; …; B_k], so
    the whole call is two batched matmuls (Gather, MatMul in ONNX); the weights scale the small [B, N, k·r]
    hidden tensor. The second matmul accumulates into ``dense`` (in-place baddbmm): a separate
    ``dense + experts`` cost an allocation and another pass over the [B, N, d_out] output. A three-operand
    einsum here fell back to broadcast multiply-and-sum and cost several times the experts' FLOPs.
    """
    batch, k = ids.shape
    rank = down.shape[1]
    # Advanced indexing, not index_select: index_select is 2–3× faster on one CPU thread, but it starts one
    # parallel region per image, and with two threads on a busy machine each region waits for a time slice
    # (258 ms instead of 8 ms for batch 32 at load 9).
    down_stacked = down[ids].reshape(batch, k * rank, down.shape[2])  # [B, k·r, d_in]
    up_stacked = up_rows[ids].reshape(batch, k * rank, up_rows.shape[2])  # [B, k·r, d_out]
    hidden = torch.bmm(x, down_stacked.transpose(1, 2))  # [B, N, k·r]
    if weights is not None:
        hidden = (hidden.unflatten(2, (k, rank)) * weights[:, None, :, None]).flatten(2)
    return dense.baddbmm_(hidden, up_stacked)


class RoutedLinear(nn.Linear):
    """``nn.Linear`` with optional routed experts; keys ``weight``/``bias`` (+ ``experts.*``)."""

    def __init__(self, linear: nn.Linear, control: RoutingControl) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight, self.bias = linear.weight, linear.bias
        self.control = control
        self.experts: ExpertBank | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.experts is not None:
            y = self.experts(x, y, self.control)
        return y


def image_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``images`` [B, C, H, W] → flattened non-overlapping patches [B, (H/p)·(W/p), C·p·p], in the order in
    which a stride-p convolution's output is flattened and with each patch laid out as its weight is."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid_h * grid_w, channels * patch_size * patch_size)


class RoutedPatchEmbedding(nn.Conv2d):
    """open_clip's patch embedding (``conv1``: kernel = stride = patch size, no bias) as a linear layer on
    flattened patches, with optional routed experts; key ``weight`` (+ ``experts.*``). Same output layout
    as the convolution, [B, width, grid, grid]; the router sees the patches' mean."""

    def __init__(self, conv: nn.Conv2d, control: RoutingControl) -> None:
        if conv.bias is not None or conv.kernel_size != conv.stride or conv.padding != (0, 0):
            raise ValueError("only a bias-free patch embedding with kernel = stride and no padding is supported")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=False)
        self.weight = conv.weight
        self.control = control
        self.experts: ExpertBank | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.experts is None:
            return super().forward(images)
        patches = image_patches(images, self.kernel_size[0])  # [B, L, C·p·p]
        tokens = self.experts(patches, F.linear(patches, self.weight.flatten(1)), self.control)  # [B, L, width]
        grid_h, grid_w = images.shape[2] // self.kernel_size[0], images.shape[3] // self.kernel_size[1]
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, grid_h, grid_w)


class Attention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names and call signature.

    The fused in-projection (``in_proj_weight``, [3d, d]) can carry routed experts (``qkv_experts``);
    ``out_proj`` is a ``RoutedLinear``.
    """

    def __init__(self, mha: nn.MultiheadAttention, control: RoutingControl) -> None:
        super().__init__()
        if mha.in_proj_weight is None or mha.dropout:
            raise ValueError("only fused-projection self-attention without dropout is supported")
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = RoutedLinear(mha.out_proj, control)
        self.control = control
        self.qkv_experts: ExpertBank | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        # Self-attention only: open_clip's vision blocks pass the same tensor as query, key and value.
        x = query if self.batch_first else query.transpose(0, 1)  # [B, N, d]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.qkv_experts is not None:
            qkv = self.qkv_experts(x, qkv, self.control)
        batch, tokens, width = x.shape
        heads = qkv.reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], attn_mask=attn_mask)
        out = self.out_proj(context.transpose(1, 2).reshape(batch, tokens, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def explicit_attention(visual: nn.Module, control: RoutingControl | None = None) -> RoutingControl:
    """Swap every block's ``nn.MultiheadAttention`` for ``Attention`` and its MLP linears for
    ``RoutedLinear``, and the patch embedding for ``RoutedPatchEmbedding`` (in place; same state-dict keys,
    same outputs). Returns the shared control."""
    control = control or RoutingControl()
    if not isinstance(visual.conv1, RoutedPatchEmbedding):
        visual.conv1 = RoutedPatchEmbedding(visual.conv1, control)
    for block in visual.transformer.resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = Attention(block.attn, control)
        for name in ("c_fc", "c_proj"):
            layer = getattr(block.mlp, name)
            if not isinstance(layer, RoutedLinear):
                setattr(block.mlp, name, RoutedLinear(layer, control))
    return control


def routed_slot(visual: nn.Module, block: int | None, kind: str) -> tuple[nn.Module, str]:
    """The module and attribute name that hold the expert bank of routed ``kind`` in ``block`` (None for
    the patch embedding)."""
    if kind == "patch":
        return visual.conv1, "experts"
    layer = visual.transformer.resblocks[block]
    slots = {
        "qkv": (layer.attn, "qkv_experts"),
        "out": (layer.attn.out_proj, "experts"),
        "fc": (layer.mlp.c_fc, "experts"),
        "proj": (layer.mlp.c_proj, "experts"),
    }
    return slots[kind]
