# Copyright 2026 The dtop-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""PyTorch DToP: a plain ViT segmenter whose confident tokens exit early (Dynamic Token Pruning, ICCV 2023).

The active tokens of all images of a batch are *packed* into one sequence `(total, dim)`: linear layers and
MLPs only ever touch tokens that are still in the network, whatever the other images of the batch prune.
Attention, which must stay inside an image, runs on a CUDA GPU in half precision directly on the packed sequence
with each image's cumulative length (`varlen_attn`); elsewhere on a per-image padded view of it with a key mask
(no copy at all while every image has the same number of active tokens).

A forward pass in threshold mode reads the device once per auxiliary head that can prune (the new token counts size
the packed sequence), never per layer, and not at all when no head prunes (threshold 1.0). In capacity mode every
image keeps the same number of tokens after each head: the active tokens are a dense `(batch, kept, dim)` tensor,
attention needs no key mask and nothing is read from the device, so the whole forward is one static-shape graph
(`torch.compile(fullgraph=True)`, ONNX export). Threshold mode exports too: under `torch.export` every image of the
batch is padded to the token count of the image that keeps the most, one size read from the data per pruning head.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .configuration_dtop import DToPConfig
from .loss_dtop import atm_stage_loss, check_labels, fcn_stage_loss
from .pipeline_dtop import DTOP_CUSTOM_PIPELINES
from .pruning import (
    ActiveTokens,
    TokenPacking,
    atm_class_scores,
    num_tokens_kept,
    select_exiting_tokens,
    select_kept_tokens,
    token_confidence,
    tokens_to_grid,
    update_canvas,
)


try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


logger = logging.get_logger(__name__)


@dataclass
class DToPModelOutput(ModelOutput):
    """
    Output of [`DToPModel`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`):
            The final DToP map on the token grid (`height = ceil(H / patch_size)`): early-exit predictions joined
            with the decode head's. ATM heads: class probabilities (final presence x sigmoid(canvas));
            FCN heads: class logits. Float32 whatever the compute dtype (see `stage_logits`). Upsample, then
            argmax, to get a segmentation (the image processor does).
        exit_stage (`torch.LongTensor` of shape `(batch_size, height, width)`):
            Index into `config.out_indices` of the head that finalised each token; tokens that never exited have
            the decode head's index, `len(out_indices) - 1`.
        tokens_per_layer (`torch.LongTensor` of shape `(batch_size, num_hidden_layers)`):
            Tokens that entered each ViT layer, per image (the prefix tokens included, see `num_prefix_tokens`).
        stage_logits (`tuple(torch.FloatTensor)`, one per head, each `(batch_size, num_labels, height, width)`):
            Each head's prediction over the whole grid, same kind of values as `logits`: for ATM, head k's presence
            x sigmoid(canvas after head k); for FCN, the canvas after head k. Computed in float32 from the head's
            logits whatever the compute dtype, as they are what the exit rules rank.
        stage_class_logits (`tuple(torch.FloatTensor)`, one per head, each `(batch_size, num_labels, 2)`):
            ATM heads only: each head's present / no-object logits per class query.
        stage_mask_logits (`tuple(torch.FloatTensor)`, one per head, each `(batch_size, num_labels, height, width)`):
            The canvas after each head: that head's mask logits (FCN: class logits) for the tokens it saw, the
            earlier values for tokens that had exited.
        hidden_states (`tuple(torch.FloatTensor)`, returned when `output_hidden_states=True`):
            The embeddings and the output of every layer, each `(batch_size, sequence_length, hidden_size)` on the
            full token grid (prefix tokens first); rows of exited tokens are zero.
        attentions (`tuple(torch.FloatTensor)`, returned when `output_attentions=True`, eager attention only):
            Attention weights of every layer, each `(batch_size, num_heads, sequence_length, sequence_length)` on
            the full token grid whatever has exited; zero for exited tokens.
        patch_offsets (`list[torch.Tensor]`, *optional*):
            The `patch_offsets` given to the forward, passed through (EoMT's convention): for inputs split into
            windows by [`DToPImageProcessor`] (`do_split_image=True`), each window's `(image index, start, end)`
            along its image's long side, which the post-processing uses to merge the windows.
    """

    logits: torch.FloatTensor | None = None
    exit_stage: torch.LongTensor | None = None
    tokens_per_layer: torch.LongTensor | None = None
    stage_logits: tuple[torch.FloatTensor, ...] | None = None
    stage_class_logits: tuple[torch.FloatTensor, ...] | None = None
    stage_mask_logits: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    patch_offsets: list[torch.Tensor] | None = None


@dataclass
class DToPLossOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given):
            The sum over heads of each head's loss, weighted by `config.stage_loss_weights`.
    """

    loss: torch.FloatTensor | None = None


@dataclass
class DToPSemanticSegmenterOutput(DToPModelOutput, DToPLossOutput):
    """
    Output of [`DToPForSemanticSegmentation`]: `loss` (see [`DToPLossOutput`]), then the fields of
    [`DToPModelOutput`]. Dataclasses collect fields from the most basic class up, so `loss` comes first without
    the other fields being written twice.
    """


@dataclass
class DToPHeadOutput(ModelOutput):
    """
    Output of a stage head.

    Args:
        mask_logits (`torch.FloatTensor` of shape `(total, num_labels)`):
            Per active token (packed order) mask logits (ATM) or class logits (FCN).
        class_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, 2)`, ATM only):
            Present / no-object logits of each class query.
    """

    mask_logits: torch.FloatTensor | None = None
    class_logits: torch.FloatTensor | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on `(batch, heads, seq, head_dim)` inputs; returns `(batch, seq, heads, head_dim)`."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def build_attention_mask(
    packing: TokenPacking, attn_implementation: str | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Key mask `(batch, 1, 1, max_count)` for per-image attention on the padded layout; `None` when nothing is
    padded. sdpa takes it boolean (True = attend), eager and the mask attention additive (0 or the dtype's min).

    An image with no active token left attends to its padding slot 0 (its outputs are never read) so that no row
    is fully masked: fully masked rows give NaN, and NaN would leak into the gradients.
    """
    if packing.is_uniform:
        return None
    key_mask = packing.key_padding_mask
    if packing.has_empty_image:
        key_mask = key_mask.clone()
        key_mask[:, 0] |= packing.counts == 0
    key_mask = key_mask[:, None, None, :]
    if attn_implementation == "sdpa":
        return key_mask
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, torch.finfo(dtype).min
    )


def use_varlen_attention(query: torch.Tensor, attn_implementation: str | None, dropout: float) -> bool:
    """Whether the ViT attention runs the flash kernel for packed variable-length sequences (`varlen_attn`):
    with sdpa (eager stays for the attention weights) on a CUDA GPU the flash kernel supports (Ampere or newer),
    in half precision (the kernel has no float32), without attention dropout (the kernel has none)."""
    return (
        varlen_attn is not None
        and attn_implementation == "sdpa"
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and torch.cuda.get_device_capability(query.device) >= (8, 0)
    )


def resize_position_grid(
    grid_position: torch.Tensor, grid_size: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Resize the position embeddings of a square patch grid to another grid, bicubic, as the official code does.

    Args:
        grid_position: `(1, side * side, dim)`, row-major.
        grid_size: the new `(height, width)`.
        antialias: resize with antialiasing (DINOv2 with registers; it also changes the kernel when enlarging).

    Returns:
        `(1, height * width, dim)`, computed in float32 (bicubic resizing in half precision shifts the embeddings)
        and returned in the input's dtype.
    """
    num_positions, dim = grid_position.shape[1], grid_position.shape[-1]
    side = math.isqrt(num_positions)
    # (1, side * side, dim) -> (1, dim, side, side)
    grid = grid_position.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bicubic", align_corners=False, antialias=antialias)
    # (1, dim, height, width) -> (1, height * width, dim)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(grid_position.dtype)


class DToPEmbeddings(nn.Module):
    """Patch embedding, the kept prefix tokens (class, distillation, registers) and the positions: absolute position
    embeddings resized to the input grid the way the source family resizes them, or DINOv3's rotary embedding
    (computed here per token, applied to queries and keys in the attention)."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.stored_grid = config.image_size // config.patch_size
        dim = config.hidden_size
        # Extra tokens that are not kept could not influence anything (and would get no gradient): not created.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_cls_token else None
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_distillation_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim)) if config.num_register_tokens else None
        )
        self.patch_embeddings = DToPPatchEmbeddings(config)
        # The stored positions start with a slot for the class token (and DeiT's distillation token), kept when the
        # class token is dropped so that every checkpoint keeps its layout; registers have no position.
        self.num_position_prefixes = 1 + int(config.use_distillation_token)
        self.position_embeddings = None
        if config.position_embedding_type == "absolute":
            num_positions = self.num_position_prefixes + self.stored_grid**2
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, dim))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def grid_position_embeddings(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of the patch tokens for a `(h, w)` grid: `(1, h * w, dim)`."""
        patch_position = self.position_embeddings[:, self.num_position_prefixes :]
        if grid_size == (self.stored_grid, self.stored_grid):
            return patch_position
        return resize_position_grid(patch_position, grid_size, antialias=self.config.position_embedding_antialias)

    def prefix_tokens(self) -> torch.Tensor | None:
        """The kept class, distillation and register tokens with their positions: `(1, num_prefix_tokens, dim)`."""
        tokens = [token for token in (self.cls_token, self.distillation_token) if token is not None]
        if self.position_embeddings is not None:
            tokens = [token + self.position_embeddings[:, index : index + 1] for index, token in enumerate(tokens)]
        if self.register_tokens is not None:
            tokens.append(self.register_tokens)
        return torch.cat(tokens, dim=1) if tokens else None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """`(batch, channels, H, W)` -> tokens `(batch, num_prefix_tokens + h * w, dim)` and the grid size `(h, w)`."""
        height, width = pixel_values.shape[-2:]
        pad_bottom, pad_right = -height % self.patch_size, -width % self.patch_size
        if pad_bottom or pad_right:
            # Sizes that are not multiples of the patch size: pad bottom / right with zeros (the normalised mean
            # colour); the loss and the post-processing crop the padding away again.
            pixel_values = F.pad(pixel_values, (0, pad_right, 0, pad_bottom))
        patch_tokens = self.patch_embeddings(pixel_values)  # (batch, dim, h, w)
        grid_size = tuple(patch_tokens.shape[-2:])
        embeddings = patch_tokens.flatten(2).transpose(1, 2)  # (batch, h * w, dim)
        if self.position_embeddings is not None:
            # Official code: the cls token gets pos slot 0 and is then dropped, i.e. tokens + pos[:, 1:].
            embeddings = embeddings + self.grid_position_embeddings(grid_size)
        prefix_tokens = self.prefix_tokens()
        if prefix_tokens is not None:
            embeddings = torch.cat([prefix_tokens.expand(embeddings.shape[0], -1, -1), embeddings], dim=1)
        return self.dropout(embeddings), grid_size

    def rotary_position_embeddings(
        self, grid_size: tuple[int, int], batch_size: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """DINOv3's 2-D rotary embedding of every backbone token; `None` with absolute position embeddings.

        Each patch's angles come from its own grid position, normalised to [-1, 1] over the current grid (so other
        input sizes need no resizing); the prefix tokens are not rotated (DINOv3 rotates patch tokens only). The
        rows travel with their tokens through the packing, so a token keeps its position while others exit.

        Returns:
            `(cos, sin)`, each `(batch, num_prefix_tokens + h * w, head_dim)` in backbone token order.
        """
        config = self.config
        if config.position_embedding_type != "rope":
            return None
        head_dim = config.hidden_size // config.num_attention_heads
        device = self.patch_embeddings.projection.weight.device
        coordinates = patch_center_coordinates(grid_size, device)  # (h * w, 2), (y, x)
        if self.training:
            coordinates = augment_coordinates(coordinates, config.rope_shift, config.rope_jitter, config.rope_rescale)
        quarter_steps = torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)  # (head_dim / 4,)
        inverse_frequency = 1 / config.rope_theta**quarter_steps
        # (h * w, 2, head_dim / 4) -> (h * w, head_dim / 2): y frequencies, then x; tiled over both rotated halves.
        angles = 2 * math.pi * coordinates[:, :, None] * inverse_frequency[None, None, :]
        angles = angles.flatten(1, 2).tile(2)  # (h * w, head_dim)
        cos, sin = angles.cos(), angles.sin()
        if config.num_prefix_tokens:
            cos = torch.cat([cos.new_ones(config.num_prefix_tokens, head_dim), cos])
            sin = torch.cat([sin.new_zeros(config.num_prefix_tokens, head_dim), sin])
        return cos.to(dtype)[None].expand(batch_size, -1, -1), sin.to(dtype)[None].expand(batch_size, -1, -1)


def patch_center_coordinates(grid_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """`(h * w, 2)` float32 (y, x) centres of the patches of a grid, row-major, normalised to [-1, 1] (DINOv3)."""
    height, width = grid_size
    coordinates_y = torch.arange(0.5, height, dtype=torch.float32, device=device) / height
    coordinates_x = torch.arange(0.5, width, dtype=torch.float32, device=device) / width
    coordinates = torch.stack(torch.meshgrid(coordinates_y, coordinates_x, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coordinates - 1.0


def augment_coordinates(
    coordinates: torch.Tensor, shift: float | None, jitter: float | None, rescale: float | None
) -> torch.Tensor:
    """DINOv3's training-time augmentation of the rotary coordinates: one random shift, per-axis jitter and global
    rescale per forward pass, shared by the batch (each `None` = off)."""
    if shift is not None:
        coordinates = coordinates + coordinates.new_empty(1, 2).uniform_(-shift, shift)
    if jitter is not None:
        coordinates = coordinates * coordinates.new_empty(1, 2).uniform_(-math.log(jitter), math.log(jitter)).exp()
    if rescale is not None:
        coordinates = coordinates * coordinates.new_empty(1).uniform_(-math.log(rescale), math.log(rescale)).exp()
    return coordinates


def rotate_half(hidden_states: torch.Tensor) -> torch.Tensor:
    """`(..., d)` -> `(..., d)`: the halves swapped, the new first half negated."""
    first_half, second_half = hidden_states.chunk(2, dim=-1)
    return torch.cat((-second_half, first_half), dim=-1)


def apply_rotary_position_embeddings(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate packed queries and keys `(total, heads, head_dim)` by each token's angles `(total, head_dim)`."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class DToPPatchEmbeddings(nn.Module):
    """Non-overlapping patches to tokens: Conv2d with kernel = stride = patch size."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values)  # (batch, dim, h, w)


class DToPAttention(nn.Module):
    """ViT multi-head self-attention over packed tokens; attention stays inside each image. With DINOv3's rotary
    embedding, queries and keys are rotated per token before the padded per-image layout is built."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        key_bias = config.qkv_bias if config.key_bias is None else config.key_bias
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=key_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        packing: TokenPacking,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(total, dim)` packed tokens -> `(total, dim)`, and the padded attention weights (eager only).

        `position_embeddings`: `None`, or the packed rotary `(cos, sin)`, each `(total, head_dim)`.
        """
        head_shape = (-1, self.num_attention_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape)  # (total, heads, head_dim)
        key = self.k_proj(hidden_states).view(head_shape)
        if position_embeddings is not None:
            query, key = apply_rotary_position_embeddings(query, key, *position_embeddings)
        # (total, heads, head_dim) -> (batch, max_count, heads, head_dim) -> (batch, heads, max_count, head_dim)
        value = self.v_proj(hidden_states).view(head_shape)
        dropout = self.attention_dropout if self.training else 0.0
        if not packing.padding_rows and use_varlen_attention(query, self.config._attn_implementation, dropout):
            # The packed tokens go straight into the kernel with each image's cumulative length: no padded copy,
            # no key mask. (total, heads, head_dim) -> (total, dim)
            cu_seqlens, max_count = packing.cu_seqlens, packing.max_count
            attn_output = varlen_attn(
                query, key, value, cu_seqlens, cu_seqlens, max_count, max_count, scale=self.scaling
            )
            return self.o_proj(attn_output.reshape(hidden_states.shape)), None
        query = packing.to_padded(query).transpose(1, 2)
        key = packing.to_padded(key).transpose(1, 2)
        value = packing.to_padded(value).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(packing.batch_size, packing.max_count, -1)  # (batch, max_count, dim)
        return self.o_proj(packing.from_padded(attn_output)), attn_weights


class DToPMLP(nn.Module):
    """ViT feed-forward block: fc2(act(fc1(x)))."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class DToPGatedMLP(nn.Module):
    """Gated feed-forward block (DINOv2's SwiGLU, DINOv3's gated MLP): down(act(gate(x)) * up(x))."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class DToPLayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (DINOv2, DINOv3)."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class DToPDropPath(nn.Module):
    """Stochastic depth on packed rows: in training, a residual branch is dropped for a whole image with
    probability `drop_prob` and kept branches are scaled by 1 / (1 - drop_prob) (mmcv's `DropPath`, per sample);
    the identity in eval mode or at rate 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, branch: torch.Tensor, packing: TokenPacking) -> torch.Tensor:
        """`(total, dim)` -> `(total, dim)`."""
        if self.drop_prob == 0.0 or not self.training:
            return branch
        keep_prob = 1.0 - self.drop_prob
        keep = (keep_prob + torch.rand(packing.batch_size, dtype=branch.dtype, device=branch.device)).floor()
        row_scale = (keep / keep_prob).index_select(0, packing.row_image_index)  # (total,): its image's factor
        return branch * row_scale[:, None]

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DToPLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block on packed tokens: x += LS1(MHSA(LN1(x))); x += DropPath(LS2(MLP(LN2(x)))), the layer
    scales LS only for the families that have them."""

    def __init__(self, config: DToPConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.attention = DToPAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DToPGatedMLP(config) if config.use_gated_mlp else DToPMLP(config)
        has_layer_scale = config.layerscale_value is not None
        self.layer_scale1 = DToPLayerScale(config) if has_layer_scale else nn.Identity()
        self.layer_scale2 = DToPLayerScale(config) if has_layer_scale else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # mmseg 1.x's ViT layer (the official backbone) gives stochastic depth to the MLP branch only.
        self.drop_path = DToPDropPath(drop_path_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        packing: TokenPacking,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(
            self.layernorm_before(hidden_states), packing, attention_mask, position_embeddings
        )
        hidden_states = hidden_states + self.dropout(self.layer_scale1(attn_output))
        mlp_output = self.layer_scale2(self.mlp(self.layernorm_after(hidden_states)))
        hidden_states = hidden_states + self.drop_path(self.dropout(mlp_output), packing)
        return hidden_states, attn_weights


class DToPQueryInputProjection(nn.Linear):
    """The query, key or value projection of the query self-attention: one third of `nn.MultiheadAttention`'s
    packed (3 dim, dim) `in_proj_weight` in the official code, and initialised as a part of that matrix."""


class DToPQuerySelfAttention(nn.Module):
    """Self-attention among the class queries of an ATM decoder layer (`nn.MultiheadAttention` in the official
    code; its packed q|k|v projection is split into `q_proj`, `k_proj`, `v_proj` by the converter)."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        dim = config.head_hidden_size
        self.num_attention_heads = config.head_num_attention_heads
        self.head_dim = dim // self.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.head_dropout
        self.is_causal = False
        self.q_proj = DToPQueryInputProjection(dim, dim)
        self.k_proj = DToPQueryInputProjection(dim, dim)
        self.v_proj = DToPQueryInputProjection(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """`(batch, num_labels, dim)` -> `(batch, num_labels, dim)`."""
        batch_size, num_queries, _ = queries.shape
        head_shape = (batch_size, num_queries, self.num_attention_heads, self.head_dim)
        query = self.q_proj(queries).view(head_shape).transpose(1, 2)  # (batch, heads, num_labels, head_dim)
        key = self.k_proj(queries).view(head_shape).transpose(1, 2)
        value = self.v_proj(queries).view(head_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(attn_output.reshape(batch_size, num_queries, -1))


class DToPMaskAttention(nn.Module):
    """Cross-attention from the class queries to an image's active tokens whose pre-softmax scores, averaged
    over heads, are the mask logits (the "attention to mask" of SegViT).

    The scores must be returned, so this is always computed explicitly (never through sdpa).
    """

    def __init__(self, config: DToPConfig):
        super().__init__()
        dim = config.head_hidden_size
        self.num_attention_heads = config.head_num_attention_heads
        self.head_dim = dim // self.num_attention_heads
        self.scaling = self.head_dim**-0.5
        # Official names: `q`, `k`, `v`, `proj` (the converter of official checkpoints renames them).
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        # Official code: attention dropout 0.1 is fixed inside SegViT's cross-attention; here it is config-driven.
        self.attention_dropout = nn.Dropout(config.head_dropout)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, packing: TokenPacking, key_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: `(batch, num_labels, dim)`.
            memory: `(batch, max_count, dim)`, the image's active tokens, padded.
            packing: where the tokens are; `key_bias`: its additive key mask `(batch, 1, 1, max_count)` or `None`.

        Returns:
            The updated queries `(batch, num_labels, dim)` and the mask logits `(batch, num_labels, max_count)`.
        """
        batch_size, num_queries, dim = queries.shape
        num_keys = memory.shape[1]
        query_shape = (batch_size, num_queries, self.num_attention_heads, self.head_dim)
        key_shape = (batch_size, num_keys, self.num_attention_heads, self.head_dim)
        query = self.q_proj(queries).view(query_shape).transpose(1, 2)  # (batch, heads, num_labels, head_dim)
        key = self.k_proj(memory).view(key_shape).transpose(1, 2)  # (batch, heads, max_count, head_dim)
        value = self.v_proj(memory).view(key_shape).transpose(1, 2)
        # The scores are the mask logits that the exit rule ranks: float32 whatever the compute dtype, or bf16 would
        # round most of a class's candidates into ties. (batch, heads, num_labels, max_count)
        with torch.autocast(query.device.type, enabled=False):
            scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * self.scaling
        mask_logits = scores.mean(dim=1)  # (batch, num_labels, max_count)
        weights = (scores if key_bias is None else scores + key_bias).softmax(dim=-1)
        if packing.has_empty_image:
            # An image with no active token left has nothing to attend to: its queries get a zero update.
            weights = weights * (packing.counts > 0).to(weights.dtype)[:, None, None, None]
        weights = self.attention_dropout(weights).to(value.dtype)
        attended = torch.matmul(weights, value).transpose(1, 2).reshape(batch_size, num_queries, dim)
        return self.o_proj(attended), mask_logits


class DToPATMDecoderLayer(nn.Module):
    """Post-norm ATM decoder layer, as in the official code:
    q = norm1(q + SelfAttn(q)); q = norm2(q + CrossAttn(q, memory)); q = norm3(q + FFN(q))."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        dim, eps = config.head_hidden_size, config.head_layer_norm_eps
        self.self_attn = DToPQuerySelfAttention(config)
        # Official name: `multihead_attn` (the converter renames it).
        self.cross_attn = DToPMaskAttention(config)
        self.linear1 = nn.Linear(dim, config.head_intermediate_size)
        self.linear2 = nn.Linear(config.head_intermediate_size, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.head_dropout)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, packing: TokenPacking, key_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.norm1(queries + self.dropout(self.self_attn(queries)))
        attended, mask_logits = self.cross_attn(queries, memory, packing, key_bias)
        queries = self.norm2(queries + self.dropout(attended))
        feed_forward = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        queries = self.norm3(queries + self.dropout(feed_forward))
        return queries, mask_logits


class DToPATMHead(nn.Module):
    """SegViT ATM head (the official DToP `PruneHead`): one learned query per class attends to the image's
    active tokens; the last layer's attention scores are the mask logits, a linear layer on each query gives
    its class-present logits.

    Every head class has the same interface: `forward(tokens, packing) -> DToPHeadOutput`; `class_scores` (what
    the stage predicts, from its class logits and the canvas of mask logits); `scores_to_probabilities` (what the
    exit rule reads); `loss` (the head's training loss); `multiply_accumulates` (its cost).
    """

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        dim = config.head_hidden_size
        self.input_proj = nn.Linear(config.hidden_size, dim)
        self.proj_norm = nn.LayerNorm(dim, eps=config.head_layer_norm_eps)
        self.queries = nn.Embedding(config.num_labels, dim)
        self.layers = nn.ModuleList([DToPATMDecoderLayer(config) for _ in range(config.head_num_layers)])
        self.class_embed = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor, packing: TokenPacking) -> DToPHeadOutput:
        """`(total, hidden_size)` packed active tokens -> mask logits `(total, num_labels)` and class logits."""
        memory = packing.to_padded(self.proj_norm(self.input_proj(tokens)))  # (batch, max_count, dim)
        queries = self.queries.weight[None].expand(packing.batch_size, -1, -1)  # (batch, num_labels, dim)
        if not torch.is_grad_enabled():
            # An expanded parameter keeps requires_grad under no_grad; detach so inference graphs hold no autograd
            # state (FlopCounterMode's module tracker trips on it otherwise).
            queries = queries.detach()
        key_bias = build_attention_mask(packing, "eager", memory.dtype)  # additive, as the scores are explicit
        mask_logits = None
        for layer in self.layers:
            queries, mask_logits = layer(queries, memory, packing, key_bias)
        # Only the last layer's mask logits are used, as in the official code.
        # (batch, num_labels, max_count) -> (total, num_labels)
        packed_mask_logits = packing.from_padded(mask_logits.transpose(1, 2))
        return DToPHeadOutput(mask_logits=packed_mask_logits, class_logits=self.class_embed(queries))

    @staticmethod
    def class_scores(class_logits: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """Presence probability x sigmoid(mask logit): `(batch, num_labels, tokens)` probabilities."""
        return atm_class_scores(class_logits, canvas)

    @staticmethod
    def scores_to_probabilities(class_scores: torch.Tensor) -> torch.Tensor:
        """ATM scores already are per-class probabilities."""
        return class_scores

    def loss(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        labels: torch.Tensor,
        input_size: tuple[int, int],
        padded_size: tuple[int, int],
    ) -> torch.Tensor:
        """Presence cross-entropy + focal and dice mask losses of this head; see `atm_stage_loss`."""
        config = self.config
        return atm_stage_loss(
            class_logits,
            mask_logits,
            labels,
            input_size,
            padded_size,
            ignore_index=config.semantic_loss_ignore_index,
            no_object_weight=config.no_object_weight,
            focal_weight=config.mask_focal_weight,
            dice_weight=config.mask_dice_weight,
            focal_alpha=config.focal_alpha,
            focal_gamma=config.focal_gamma,
            ignore_pixels_as_negatives=config.ignore_pixels_as_negatives,
        )

    @staticmethod
    def multiply_accumulates(config: DToPConfig) -> tuple[int, int]:
        """Multiply-accumulates of one head call: `(per active token, per call)`, one MAC counted as one FLOP."""
        dim, head_dim = config.hidden_size, config.head_hidden_size
        num_queries, feed_forward = config.num_labels, config.head_intermediate_size
        # Per token: input projection C D; per decoder layer the memory's key and value projections 2 D^2, the
        # scores Q D and the weighted values Q D.
        per_token = dim * head_dim + config.head_num_layers * (2 * head_dim**2 + 2 * num_queries * head_dim)
        # Per call, independent of the tokens: per decoder layer the query self-attention (q, k, v, o projections
        # 4 Q D^2, QK^T and AV 2 Q^2 D), the cross-attention's query and output projections 2 Q D^2 and the FFN
        # 2 Q D F; then the class embedding Q D 2.
        per_layer = 4 * num_queries * head_dim**2 + 2 * num_queries**2 * head_dim
        per_layer += 2 * num_queries * head_dim**2 + 2 * num_queries * head_dim * feed_forward
        return per_token, config.head_num_layers * per_layer + 2 * num_queries * head_dim

    @staticmethod
    def describe(config: DToPConfig) -> str:
        """One line for model cards."""
        return (
            f"ATM, width {config.head_hidden_size}, {config.head_num_attention_heads} attention heads, "
            f"{config.head_num_layers} decoder layers"
        )


class DToPFCNHead(nn.Module):
    """SETR-naive head: a per-token classifier (LayerNorm instead of BatchNorm, so that an image's prediction
    does not depend on its batch-mates). Same interface as [`DToPATMHead`]; it has no class logits."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.hidden_size, config.head_hidden_size)
        self.proj_norm = nn.LayerNorm(config.head_hidden_size, eps=config.head_layer_norm_eps)
        self.dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(config.head_hidden_size, config.num_labels)

    def forward(self, tokens: torch.Tensor, packing: TokenPacking) -> DToPHeadOutput:
        hidden = F.relu(self.proj_norm(self.input_proj(tokens)))
        return DToPHeadOutput(mask_logits=self.classifier(self.dropout(hidden)))

    @staticmethod
    def class_scores(class_logits: None, canvas: torch.Tensor) -> torch.Tensor:
        """The canvas of class logits is the prediction: an exited token keeps its exit head's logits."""
        return canvas

    @staticmethod
    def scores_to_probabilities(class_scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes."""
        return class_scores.softmax(dim=1)

    def loss(
        self,
        class_logits: None,
        mask_logits: torch.Tensor,
        labels: torch.Tensor,
        input_size: tuple[int, int],
        padded_size: tuple[int, int],
    ) -> torch.Tensor:
        """Cross-entropy of the canvas of class logits upsampled to the labels; see `fcn_stage_loss`."""
        return fcn_stage_loss(mask_logits, labels, input_size, padded_size, self.config.semantic_loss_ignore_index)

    @staticmethod
    def multiply_accumulates(config: DToPConfig) -> tuple[int, int]:
        """Multiply-accumulates of one head call: `(per active token, per call)`: input projection C D and
        classifier D num_labels per token, nothing per call."""
        return config.hidden_size * config.head_hidden_size + config.head_hidden_size * config.num_labels, 0

    @staticmethod
    def describe(config: DToPConfig) -> str:
        """One line for model cards."""
        return f"FCN (per-token classifier), width {config.head_hidden_size}"


# `config.head_type` -> head class: the one place that reads `head_type`, besides the config's own validation.
DTOP_HEAD_CLASSES = {"atm": DToPATMHead, "fcn": DToPFCNHead}


class DToPPreTrainedModel(PreTrainedModel):
    config: DToPConfig
    base_model_prefix = "dtop"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DToPEmbeddings", "DToPLayer", "DToPATMHead", "DToPFCNHead"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"classifier\.", r"pooler\.", r"layernorm\.", r"empty_weight"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One class holds one Auto class: seed the other so that a saved folder serves both AutoModel (DToPModel)
        # and AutoModelForSemanticSegmentation with remote code.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", "modeling_dtop.DToPModel")
        auto_map.setdefault("AutoModelForSemanticSegmentation", "modeling_dtop.DToPForSemanticSegmentation")
        self.config.auto_map = auto_map
        # The pipeline class that passes `exit_threshold` to the model travels with the folder (remote code).
        custom_pipelines = getattr(self.config, "custom_pipelines", None) or {}
        self.config.custom_pipelines = {**DTOP_CUSTOM_PIPELINES, **custom_pipelines}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_vit_pretrained(cls, vit_name_or_path: str, **kwargs) -> "DToPPreTrainedModel | tuple":
        """Start from a transformers ViT, DeiT, DINOv2 (with registers) or DINOv3 checkpoint, or a task model of one
        (folder or Hub id; the family is read from its config): the backbone reproduces the family, its weights are
        loaded strictly, positions resized once to `image_size`, new heads after the default stage layout.
        Keyword arguments override DToPConfig fields (e.g. `num_labels=150, image_size=512`); `use_cls_token=True`
        keeps the class, distillation and register tokens; `output_image_processor=True` also returns a processor
        with the checkpoint's normalisation. See [`~toolkit.vit_weights.from_vit_pretrained`]."""
        # Weight conversion lives in the toolkit: a saved model folder carries only what running the model needs.
        # (In a try block, so that transformers' remote-code import check does not require dtop_hf.)
        try:
            from dtop_hf.toolkit.vit_weights import from_vit_pretrained
        except ImportError as error:
            raise ImportError("`from_vit_pretrained` needs the dtop-hf package: `pip install dtop-hf`.") from error
        return from_vit_pretrained(cls, vit_name_or_path, **kwargs)

    def class_probabilities(self, class_scores: torch.Tensor) -> torch.Tensor:
        """`logits` or one of `stage_logits` `(batch, num_labels, height, width)` as per-class probabilities, the
        values the exit rule reads: ATM scores already are probabilities, FCN logits get a softmax over classes."""
        return DTOP_HEAD_CLASSES[self.config.head_type].scores_to_probabilities(class_scores)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, DToPQueryInputProjection):
            # Official: nn.MultiheadAttention's packed q|k|v projection keeps its xavier-uniform initialisation,
            # whose bound comes from the packed (3 dim, dim) shape, and a zero bias.
            bound = math.sqrt(6.0 / (module.in_features + 3 * module.out_features))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # The ATM heads' class queries, the only embedding table: official, nn.Embedding's default N(0, 1).
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, DToPEmbeddings):
            tokens = (module.position_embeddings, module.cls_token, module.distillation_token, module.register_tokens)
            for parameter in tokens:
                if parameter is not None:
                    init.trunc_normal_(parameter, mean=0.0, std=std)
        elif isinstance(module, DToPLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)


def check_pixel_values(pixel_values: torch.Tensor, config: DToPConfig) -> None:
    """Clear errors for inputs the model cannot segment, instead of a wrong answer or an error deep inside."""
    if pixel_values.ndim != 4:
        raise ValueError(
            "`pixel_values` must have shape (batch_size, num_channels, height, width), "
            f"got {tuple(pixel_values.shape)}."
        )
    batch_size, num_channels, height, width = pixel_values.shape
    if batch_size == 0:
        raise ValueError("`pixel_values` is an empty batch (batch_size 0).")
    if num_channels != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {num_channels} channels but the model expects {config.num_channels}. "
            "Convert grey or RGBA images to RGB first (the image processor does)."
        )
    if height < config.patch_size or width < config.patch_size:
        raise ValueError(
            f"Images must be at least one patch ({config.patch_size}x{config.patch_size}) large, got {height}x{width}."
        )
    if not torch.compiler.is_compiling():
        # An asynchronous assertion costs no device-to-host sync: on CPU it fails right here; on an accelerator it
        # fails the device's stream later, as an out-of-range index does (`bool(...)` would sync every forward).
        message = "`pixel_values` contains NaN or infinite values."
        # The smallest and largest values carry any NaN (propagated) or infinity: one pass and no boolean copy of
        # the input (about 10x faster on CPU than `isfinite(pixel_values).all()`).
        extremes = torch.stack(pixel_values.aminmax())
        try:
            torch._assert_async(torch.isfinite(extremes).all(), message)
        except RuntimeError as error:
            raise ValueError(message) from error


class DToPLayerRecord:
    """What the layers of one forward pass leave for its output: the tokens each layer saw and, on request, every
    layer's hidden states and attention weights, moved from the packed layout to the full token grid."""

    def __init__(
        self,
        config: DToPConfig,
        embeddings: torch.Tensor,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
    ):
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        if output_attentions and config._attn_implementation != "eager":
            logger.warning_once(
                "`output_attentions=True` needs eager attention; attention weights will be None. "
                "Call `model.set_attn_implementation('eager')` first."
            )
        self.tokens_per_layer: list[torch.Tensor] = []
        self.hidden_states = [embeddings] if output_hidden_states else None
        self.attentions = [] if output_attentions else None

    def add(self, packing: TokenPacking, hidden_states: torch.Tensor, attn_weights: torch.Tensor | None) -> None:
        """Record one layer's output `(total, dim)` and padded weights `(batch, heads, max_count, max_count)`."""
        self.tokens_per_layer.append(packing.counts)
        if self.hidden_states is not None:
            self.hidden_states.append(packing.to_grid(hidden_states))  # (batch, sequence_length, dim)
        if self.attentions is not None:
            self.attentions.append(None if attn_weights is None else packing.attention_to_grid(attn_weights))


class DToPModel(DToPPreTrainedModel):
    """The ViT backbone with its stage heads: runs the stages, lets confident tokens exit after each auxiliary
    head and assembles the final map from the early predictions and the decode head's."""

    def __init__(self, config: DToPConfig):
        super().__init__(config)
        self.embeddings = DToPEmbeddings(config)
        # Stochastic depth rising linearly from 0 at the first layer to `drop_path_rate` at the last (mmseg's dpr).
        num_layers = config.num_hidden_layers
        drop_path_rates = [config.drop_path_rate * index / max(num_layers - 1, 1) for index in range(num_layers)]
        self.layers = nn.ModuleList([DToPLayer(config, rate) for rate in drop_path_rates])
        self.heads = nn.ModuleList([DTOP_HEAD_CLASSES[config.head_type](config) for _ in config.out_indices])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        exit_threshold: float | list[float] | tuple[float, ...] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        exit_mode: str | None = None,
        exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    ) -> DToPModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; any size of at least one patch (other sizes are padded to a patch multiple).
            exit_threshold (`float` or `tuple[float]`, *optional*):
                Overrides `config.exit_threshold` for this call (threshold mode); 1.0 runs the unpruned baseline. In
                training mode exits happen only when `config.prune_during_training` is True.
            exit_mode (`str`, *optional*):
                Overrides `config.exit_mode` for this call: `"threshold"` or `"capacity"`. When it is not given, a
                per-call `exit_threshold` selects threshold mode and a per-call `exit_capacity` capacity mode.
            exit_capacity (`float` or `tuple[float]`, *optional*):
                Overrides `config.exit_capacity` for this call (capacity mode): the fraction of an image's patch
                tokens still active after each auxiliary head; 1.0 runs the unpruned baseline.
            output_hidden_states (`bool`, *optional*): return the embeddings and every layer's output.
            output_attentions (`bool`, *optional*): return every layer's attention weights (eager attention).
            patch_offsets (`list[torch.Tensor]`, *optional*): the windows' offsets from the image processor;
                returned unchanged in the output for the post-processing.
        """
        check_pixel_values(pixel_values, self.config)
        exit_mode, exit_values = self.stage_exit_rule(exit_mode, exit_threshold, exit_capacity)
        embeddings, grid_size = self.embeddings(pixel_values.to(self.dtype))  # (batch, prefix + tokens, dim)
        tokens = ActiveTokens.all_active(
            embeddings.shape[0], grid_size, self.config.num_prefix_tokens, len(self.heads), embeddings.device
        )
        hidden_states = tokens.sequence.from_grid(embeddings)  # (total, dim): the active tokens, packed
        # DINOv3's rotary (cos, sin), each (total, head_dim), packed like `hidden_states`: rows travel with their
        # tokens, so a token keeps its own position while others exit. None with absolute position embeddings.
        rotary = self.embeddings.rotary_position_embeddings(grid_size, embeddings.shape[0], embeddings.dtype)
        position_embeddings = None if rotary is None else tuple(tokens.sequence.from_grid(part) for part in rotary)
        record = DToPLayerRecord(self.config, embeddings, output_hidden_states, output_attentions)
        canvas, stages = None, []
        for stage, (layers, head, exit_value) in enumerate(zip(self.stage_layers(), self.heads, exit_values)):
            hidden_states = self.run_layers(layers, hidden_states, tokens.sequence, position_embeddings, record)
            head_output = head(tokens.patch_rows(hidden_states), tokens.patches)
            # The active tokens' values (total, num_labels) written into the canvas (batch, tokens, num_labels).
            canvas = update_canvas(canvas, head_output.mask_logits, tokens.patches)
            stage_values = canvas.transpose(1, 2)  # (batch, num_labels, tokens)
            stage_scores = self.stage_scores(head, head_output.class_logits, stage_values)
            stages.append((stage_scores, stage_values, head_output.class_logits))
            if exit_mode == "capacity":
                kept_rows = self.select_kept(head, stage_scores, tokens, exit_value)
                tokens, hidden_states, position_embeddings = tokens.keep(
                    kept_rows, stage, hidden_states, position_embeddings
                )
            else:
                exit_mask = self.select_exits(head, stage_scores, tokens.active_mask, exit_value)
                # An exported graph has no per-image token counts on the host: it pads to the batch's largest.
                after_exit = tokens.after_exit_padded if torch.compiler.is_exporting() else tokens.after_exit
                tokens, hidden_states, position_embeddings = after_exit(
                    exit_mask, stage, hidden_states, position_embeddings
                )

        stage_logits, stage_mask_logits, stage_class_logits = zip(*stages)
        return DToPModelOutput(
            logits=tokens_to_grid(stage_logits[-1], grid_size),
            exit_stage=tokens.exit_stage.reshape(-1, *grid_size),
            tokens_per_layer=torch.stack(record.tokens_per_layer, dim=1),
            stage_logits=tuple(tokens_to_grid(values, grid_size) for values in stage_logits),
            stage_class_logits=None if stage_class_logits[0] is None else stage_class_logits,
            stage_mask_logits=tuple(tokens_to_grid(values, grid_size) for values in stage_mask_logits),
            hidden_states=None if record.hidden_states is None else tuple(record.hidden_states),
            attentions=None if record.attentions is None else tuple(record.attentions),
            patch_offsets=patch_offsets,
        )

    def stage_exit_rule(
        self,
        exit_mode: str | None,
        exit_threshold: float | list[float] | tuple[float, ...] | None,
        exit_capacity: float | list[float] | tuple[float, ...] | None,
    ) -> tuple[str, tuple[float, ...]]:
        """The exit mode of this call and one value per head: thresholds or capacities, the decode head's 1.0.

        Exits happen in eval mode always, in training mode only when `config.prune_during_training` is True:
        otherwise training a fresh model would start pruning by surprise once its heads grow confident.
        """
        exit_mode, values = self.config.exit_rule(exit_mode, exit_threshold, exit_capacity)  # validates overrides
        if not self.training or self.config.prune_during_training:
            return exit_mode, values
        knob = "exit_capacity" if exit_mode == "capacity" else "exit_threshold"
        if (exit_threshold is not None or exit_capacity is not None) and min(values) < 1.0:
            logger.warning_once(
                f"`{knob}` is ignored in training mode unless `config.prune_during_training=True`: no token exits."
            )
        return exit_mode, (1.0,) * len(values)

    def stage_layers(self) -> list[nn.ModuleList]:
        """The layers of each stage: those after the previous head, up to and including this head's layer."""
        stops = [index + 1 for index in self.config.out_indices]
        return [self.layers[start:stop] for start, stop in zip([0] + stops[:-1], stops)]

    def run_layers(
        self,
        layers: nn.ModuleList,
        hidden_states: torch.Tensor,
        packing: TokenPacking,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        record: DToPLayerRecord,
    ) -> torch.Tensor:
        """Run one stage's layers on the packed active tokens `(total, dim)`; the packing does not change inside a
        stage, so the attention mask is built once."""
        attention_mask = build_attention_mask(packing, self.config._attn_implementation, hidden_states.dtype)
        for layer in layers:
            # With keep_top_k=0 every token of every image can exit: an empty sequence has nothing to run.
            hidden_states, attn_weights = (
                layer(hidden_states, packing, attention_mask, position_embeddings)
                if packing.total
                else (hidden_states, None)
            )
            record.add(packing, hidden_states, attn_weights)
        return hidden_states

    @staticmethod
    def stage_scores(head: nn.Module, class_logits: torch.Tensor | None, canvas: torch.Tensor) -> torch.Tensor:
        """What the stage predicts over the whole grid, `(batch, num_labels, tokens)`, from the head's class logits
        and the canvas of mask logits `(batch, num_labels, tokens)`: the stage's output, and what its exit rule ranks.

        Computed in float32 whatever the compute dtype: in bf16, scores near 0.9 are quantised to steps of 2^-8 and
        their ties would make the exit rule's top-k fall back to token order.
        """
        with torch.autocast(canvas.device.type, enabled=False):
            class_logits = None if class_logits is None else class_logits.float()
            return head.class_scores(class_logits, canvas.float())

    def select_exits(
        self, head: nn.Module, stage_scores: torch.Tensor, active_mask: torch.Tensor, threshold: float
    ) -> torch.Tensor | None:
        """Threshold mode: the tokens that exit after `head` `(batch, tokens)` bool, from the stage's scores (see
        `stage_scores`), or `None` when none can (threshold 1.0)."""
        if threshold >= 1.0:
            return None  # Confidence never exceeds 1 and the test is strict: skip the work.
        confidence, predicted_class = token_confidence(head.scores_to_probabilities(stage_scores))
        return select_exiting_tokens(confidence, predicted_class, active_mask, threshold, self.config.keep_top_k)

    def select_kept(
        self, head: nn.Module, stage_scores: torch.Tensor, tokens: ActiveTokens, capacity: float
    ) -> torch.Tensor | None:
        """Capacity mode: the tokens that go on after `head`, from the stage's scores (see `stage_scores`), as rows
        `(batch, kept)` of the heads' packing in increasing order, or `None` when every active token goes on
        (capacity 1.0, or not below the tokens still active)."""
        num_kept = num_tokens_kept(capacity, tokens.patches.num_tokens)
        if num_kept >= tokens.patches.max_count:  # every image has `max_count` active tokens in capacity mode
            return None
        confidence, predicted_class = token_confidence(head.scores_to_probabilities(stage_scores))  # (batch, tokens)
        if not tokens.patches.is_complete:
            # The packing is dense and its rows hold the active tokens in token order: ranking the rows ranks the
            # active tokens (ties by the lower row are ties by the lower token), with no inactive token to mask out.
            row_token = tokens.patches.padded_token_index()  # (batch, count)
            confidence, predicted_class = confidence.gather(1, row_token), predicted_class.gather(1, row_token)
        keep_top_k, num_classes = self.config.keep_top_k, stage_scores.shape[1]
        return select_kept_tokens(confidence, predicted_class, None, num_kept, keep_top_k, num_classes)


class DToPForSemanticSegmentation(DToPPreTrainedModel):
    """DToP for semantic segmentation: [`DToPModel`] plus the training loss of every head."""

    def __init__(self, config: DToPConfig):
        super().__init__(config)
        self.dtop = DToPModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.dtop.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        exit_threshold: float | list[float] | tuple[float, ...] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        exit_mode: str | None = None,
        exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    ) -> DToPSemanticSegmenterOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Class ids in `[0, num_labels)`, `config.semantic_loss_ignore_index` for unlabelled pixels. When
                given, the loss of every head is computed and summed.
            pixel_values, exit_threshold, output_hidden_states, output_attentions, patch_offsets, exit_mode,
            exit_capacity:
                As in [`DToPModel.forward`].

        Example:

        ```python
        >>> import torch
        >>> from dtop_hf import DToPConfig, DToPForSemanticSegmentation

        >>> config = DToPConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        ...                     image_size=64, patch_size=8, num_labels=5, out_indices=[1, 2, 3],
        ...                     head_hidden_size=32, head_num_attention_heads=4)
        >>> model = DToPForSemanticSegmentation(config).eval()
        >>> outputs = model(torch.randn(2, 3, 64, 64))
        >>> outputs.logits.shape, outputs.exit_stage.shape
        (torch.Size([2, 5, 8, 8]), torch.Size([2, 8, 8]))
        ```
        """
        if labels is not None:
            labels = check_labels(labels, self.config.num_labels, self.config.semantic_loss_ignore_index)
        outputs = self.dtop(
            pixel_values,
            exit_threshold=exit_threshold,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            patch_offsets=patch_offsets,
            exit_mode=exit_mode,
            exit_capacity=exit_capacity,
            return_dict=True,
        )
        loss = None
        if labels is not None:
            loss = self.compute_loss(outputs, labels, tuple(pixel_values.shape[-2:]))
        return DToPSemanticSegmenterOutput(loss=loss, **outputs)

    def compute_loss(
        self, outputs: DToPModelOutput, labels: torch.Tensor, input_size: tuple[int, int]
    ) -> torch.Tensor:
        """Weighted sum over heads of each head's loss (weight 1 each by default, as in the official recipe)."""
        config = self.config
        grid_size = outputs.stage_mask_logits[0].shape[-2:]
        padded_size = (grid_size[0] * config.patch_size, grid_size[1] * config.patch_size)
        weights = config.stage_loss_weights or (1.0,) * config.num_stages
        class_logits = outputs.stage_class_logits or (None,) * config.num_stages
        head_losses = [
            weight * head.loss(stage_class_logits, mask_logits, labels, input_size, padded_size)
            for head, weight, stage_class_logits, mask_logits in zip(
                self.dtop.heads, weights, class_logits, outputs.stage_mask_logits
            )
        ]
        return sum(head_losses)


__all__ = ["DToPForSemanticSegmentation", "DToPModel", "DToPPreTrainedModel"]
