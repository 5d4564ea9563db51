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

    ``up`` [T, d_out, r] (A_t), ``down`` [T, r, d_in] (B_t), ``prototypes`` [T, m, d_in] and
    ``prototype_bias`` [T, m]: the router's scores are ``f · prototype + bias`` (see ``task_scores``).
    Without a bias the router is the paper's cosine router: prototypes are normalised and the bias is zero.
    """

    def __init__(
        self, up: torch.Tensor, down: torch.Tensor, prototypes: torch.Tensor, prototype_bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("up", up)
        self.register_buffer("down", down)
        if prototype_bias is None:
            prototypes, prototype_bias = F.normalize(prototypes, dim=-1), prototypes.new_zeros(prototypes.shape[:2])
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("prototype_bias", prototype_bias)

    @property
    def num_tasks(self) -> int:
        return int(self.up.shape[0])

    def forward(self, x: torch.Tensor, control: RoutingControl) -> torch.Tensor:
        """The experts' contribution for ``x`` [B, N, d_in] → [B, N, d_out]."""
        ids, weights = control.route(x, self.prototypes, self.prototype_bias)
        return apply_experts(x, self.up, self.down, ids, weights)


def apply_experts(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Σ_j w_bj · A_{ids_bj} (B_{ids_bj} x_b), batched by gathering each image's experts.

    ``x`` [B, N, d_in], ``up`` [T, d_out, r], ``down`` [T, r, d_in], ``ids``/``weights`` [B, k] → [B, N, d_out].

    The k chosen experts of an image act as one expert of rank k·r, [A_1 … A_k] diag(w) [B_1; …; B_k], so
    the whole call is two batched matmuls (Gather, MatMul, Transpose, Reshape in ONNX); the weights scale
    the small [B, N, k·r] hidden tensor. A three-operand einsum here fell back to broadcast
    multiply-and-sum and cost several times the experts' FLOPs.
    """
    batch, k = ids.shape
    rank = down.shape[1]
    down_stacked = down[ids].reshape(batch, k * rank, down.shape[2])  # [B, k·r, d_in]
    up_stacked = up[ids].permute(0, 2, 1, 3).reshape(batch, up.shape[1], k * rank)  # [B, d_out, k·r]
    hidden = torch.matmul(x, down_stacked.transpose(1, 2))  # [B, N, k·r]
    hidden = hidden * weights.repeat_interleave(rank, dim=1).unsqueeze(1)
    return torch.matmul(hidden, up_stacked.transpose(1, 2))


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
            y = y + self.experts(x, self.control)
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
        tokens = F.linear(patches, self.weight.flatten(1))
        tokens = tokens + self.experts(patches, self.control)  # [B, L, width]
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
            qkv = qkv + self.qkv_experts(x, self.control)
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
