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
Attention, which must stay inside an image, runs on a per-image padded view of that sequence with a key mask
(no copy at all while every image has the same number of active tokens).
"""

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
from .pruning import (
    TokenPacking,
    atm_class_scores,
    pack_tokens,
    select_exiting_tokens,
    token_confidence,
    tokens_to_grid,
    update_canvas,
)
from .vit_weights import from_vit_pretrained


logger = logging.get_logger(__name__)


@dataclass
class DToPModelOutput(ModelOutput):
    """
    Output of [`DToPModel`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`):
            The final DToP map on the token grid (`height = ceil(H / patch_size)`): early-exit predictions joined
            with the decode head's. ATM heads: class probabilities (final presence x sigmoid(canvas), SPEC §3);
            FCN heads: class logits. Upsample, then argmax, to get a segmentation (the image processor does).
        exit_stage (`torch.LongTensor` of shape `(batch_size, height, width)`):
            Index into `config.out_indices` of the head that finalised each token; tokens that never exited have
            the decode head's index, `len(out_indices) - 1`.
        tokens_per_layer (`torch.LongTensor` of shape `(batch_size, num_hidden_layers)`):
            Tokens that entered each ViT layer, per image (the class token included when `use_cls_token`).
        stage_logits (`tuple(torch.FloatTensor)`, one per head, each `(batch_size, num_labels, height, width)`):
            Each head's prediction over the whole grid, same kind of values as `logits`: for ATM, head k's presence
            x sigmoid(canvas after head k); for FCN, the canvas after head k.
        stage_class_logits (`tuple(torch.FloatTensor)`, one per head, each `(batch_size, num_labels, 2)`):
            ATM heads only: each head's present / no-object logits per class query.
        stage_mask_logits (`tuple(torch.FloatTensor)`, one per head, each `(batch_size, num_labels, height, width)`):
            The canvas after each head: that head's mask logits (FCN: class logits) for the tokens it saw, the
            earlier values for tokens that had exited.
        hidden_states (`tuple(torch.FloatTensor)`, returned when `output_hidden_states=True`):
            The embeddings and the output of every layer, each `(batch_size, tokens, hidden_size)` on the full
            token grid (class token first when `use_cls_token`); rows of exited tokens are zero.
        attentions (`tuple(torch.FloatTensor)`, returned when `output_attentions=True`, eager attention only):
            Attention weights of every layer, each `(batch_size, num_heads, tokens, tokens)`; zero for exited tokens.
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
class DToPSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`DToPForSemanticSegmentation`]: `loss` (`torch.FloatTensor` of shape `()`, returned when `labels`
    are given: the sum over heads of each head's loss, SPEC §4), then the fields of [`DToPModelOutput`].
    """

    loss: torch.FloatTensor | None = None
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


def build_attention_mask(packing: TokenPacking, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor | None:
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


class DToPEmbeddings(nn.Module):
    """Patch embedding plus absolute position embeddings, resized (bicubic) to the input grid when needed."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.stored_grid = config.image_size // config.patch_size
        # Without `use_cls_token` the class token could not influence anything (and would get no gradient).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_cls_token else None
        self.patch_embeddings = DToPPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.stored_grid**2, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def grid_position_embeddings(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of the patch tokens for a `(h, w)` grid: `(1, h * w, dim)`."""
        patch_position = self.position_embeddings[:, 1:]
        if grid_size == (self.stored_grid, self.stored_grid):
            return patch_position
        dim = patch_position.shape[-1]
        patch_position = patch_position.reshape(1, self.stored_grid, self.stored_grid, dim).permute(0, 3, 1, 2)
        # SPEC §1: plain bicubic, align_corners=False, no antialiasing (unlike timm's default).
        patch_position = F.interpolate(patch_position, size=grid_size, mode="bicubic", align_corners=False)
        return patch_position.permute(0, 2, 3, 1).reshape(1, grid_size[0] * grid_size[1], dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """`(batch, channels, H, W)` -> tokens `(batch, [1 +] h * w, dim)` and the grid size `(h, w)`."""
        height, width = pixel_values.shape[-2:]
        pad_bottom, pad_right = -height % self.patch_size, -width % self.patch_size
        if pad_bottom or pad_right:
            # Sizes that are not multiples of the patch size: pad bottom / right with zeros (the normalised mean
            # colour); the loss and the post-processing crop the padding away again.
            pixel_values = F.pad(pixel_values, (0, pad_right, 0, pad_bottom))
        patch_tokens = self.patch_embeddings(pixel_values)  # (batch, dim, h, w)
        grid_size = tuple(patch_tokens.shape[-2:])
        patch_tokens = patch_tokens.flatten(2).transpose(1, 2)  # (batch, h * w, dim)
        # Official code: the cls token gets pos slot 0 and is then dropped, i.e. tokens + pos[:, 1:] (SPEC §1).
        embeddings = patch_tokens + self.grid_position_embeddings(grid_size)
        if self.config.use_cls_token:
            cls_token = (self.cls_token + self.position_embeddings[:, :1]).expand(embeddings.shape[0], -1, -1)
            embeddings = torch.cat([cls_token, embeddings], dim=1)
        return self.dropout(embeddings), grid_size


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
    """ViT multi-head self-attention over packed tokens; attention stays inside each image."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, packing: TokenPacking, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(total, dim)` packed tokens -> `(total, dim)`, and the padded attention weights (eager only)."""
        head_shape = (-1, self.num_attention_heads, self.head_dim)
        # (total, heads, head_dim) -> (batch, max_count, heads, head_dim) -> (batch, heads, max_count, head_dim)
        query = packing.to_padded(self.q_proj(hidden_states).view(head_shape)).transpose(1, 2)
        key = packing.to_padded(self.k_proj(hidden_states).view(head_shape)).transpose(1, 2)
        value = packing.to_padded(self.v_proj(hidden_states).view(head_shape)).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(packing.batch_size, packing.max_count, -1)  # (batch, max_count, dim)
        return self.o_proj(packing.from_padded(attn_output)), attn_weights


class DToPMLP(nn.Module):
    """ViT feed-forward block."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class DToPLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block on packed tokens: x += MHSA(LN1(x)); x += MLP(LN2(x))."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.attention = DToPAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DToPMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, packing: TokenPacking, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(self.layernorm_before(hidden_states), packing, attention_mask)
        hidden_states = hidden_states + self.dropout(attn_output)
        hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states, attn_weights


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
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
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
    over heads, are the mask logits (the "attention to mask" of SegViT, SPEC §2).

    The scores must be returned, so this is always computed explicitly (never through sdpa).
    """

    def __init__(self, config: DToPConfig):
        super().__init__()
        dim = config.head_hidden_size
        self.num_attention_heads = config.head_num_attention_heads
        self.head_dim = dim // self.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
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
        query = self.q(queries).view(batch_size, num_queries, self.num_attention_heads, self.head_dim).transpose(1, 2)
        key = self.k(memory).view(batch_size, num_keys, self.num_attention_heads, self.head_dim).transpose(1, 2)
        value = self.v(memory).view(batch_size, num_keys, self.num_attention_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling  # (batch, heads, num_labels, max_count)
        mask_logits = scores.mean(dim=1)  # (batch, num_labels, max_count)
        weights = (scores if key_bias is None else scores + key_bias).softmax(dim=-1)
        if packing.has_empty_image:
            # An image with no active token left has nothing to attend to: its queries get a zero update.
            weights = weights * (packing.counts > 0).to(weights.dtype)[:, None, None, None]
        weights = self.attention_dropout(weights)
        attended = torch.matmul(weights, value).transpose(1, 2).reshape(batch_size, num_queries, dim)
        return self.proj(attended), mask_logits


class DToPATMDecoderLayer(nn.Module):
    """Post-norm ATM decoder layer (SPEC §2):
    q = norm1(q + SelfAttn(q)); q = norm2(q + CrossAttn(q, memory)); q = norm3(q + FFN(q))."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        dim, eps = config.head_hidden_size, config.head_layer_norm_eps
        self.self_attn = DToPQuerySelfAttention(config)
        self.multihead_attn = DToPMaskAttention(config)
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
        attended, mask_logits = self.multihead_attn(queries, memory, packing, key_bias)
        queries = self.norm2(queries + self.dropout(attended))
        feed_forward = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        queries = self.norm3(queries + self.dropout(feed_forward))
        return queries, mask_logits


class DToPATMHead(nn.Module):
    """SegViT ATM head (the official DToP `PruneHead`): one learned query per class attends to the image's
    active tokens; the last layer's attention scores are the mask logits, a linear layer on each query gives
    its class-present logits."""

    def __init__(self, config: DToPConfig):
        super().__init__()
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
        # Only the last layer's mask logits are used (SPEC §2). (batch, num_labels, max_count) -> (total, num_labels)
        packed_mask_logits = packing.from_padded(mask_logits.transpose(1, 2))
        return DToPHeadOutput(mask_logits=packed_mask_logits, class_logits=self.class_embed(queries))


class DToPFCNHead(nn.Module):
    """SETR-naive head: a per-token classifier (LayerNorm instead of BatchNorm, so that an image's prediction
    does not depend on its batch-mates)."""

    def __init__(self, config: DToPConfig):
        super().__init__()
        self.input_proj = nn.Linear(config.hidden_size, config.head_hidden_size)
        self.proj_norm = nn.LayerNorm(config.head_hidden_size, eps=config.head_layer_norm_eps)
        self.dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(config.head_hidden_size, config.num_labels)

    def forward(self, tokens: torch.Tensor, packing: TokenPacking) -> DToPHeadOutput:
        hidden = F.relu(self.proj_norm(self.input_proj(tokens)))
        return DToPHeadOutput(mask_logits=self.classifier(self.dropout(hidden)))


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
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_vit_pretrained(cls, vit_name_or_path: str, **kwargs) -> "DToPPreTrainedModel":
        """Start from any transformers ViT checkpoint (folder or Hub id): backbone weights loaded, position
        embeddings resized once (bicubic) to `image_size`, new heads. Keyword arguments override DToPConfig fields
        (e.g. `num_labels=150, image_size=512`); see [`~vit_weights.from_vit_pretrained`]."""
        return from_vit_pretrained(cls, vit_name_or_path, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DToPEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)


def check_pixel_values(pixel_values: torch.Tensor, config: DToPConfig) -> None:
    """Clear errors for inputs the model cannot segment, instead of a wrong answer or an error deep inside."""
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must have shape (batch_size, num_channels, height, width), got {tuple(pixel_values.shape)}."
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
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("`pixel_values` contains NaN or infinite values.")


class DToPModel(DToPPreTrainedModel):
    """The ViT backbone with its stage heads: runs the stages, lets confident tokens exit after each auxiliary
    head and assembles the final map from the early predictions and the decode head's (SPEC §1-3)."""

    def __init__(self, config: DToPConfig):
        super().__init__(config)
        self.embeddings = DToPEmbeddings(config)
        self.layers = nn.ModuleList([DToPLayer(config) for _ in range(config.num_hidden_layers)])
        head_class = DToPATMHead if config.head_type == "atm" else DToPFCNHead
        self.heads = nn.ModuleList([head_class(config) for _ in config.out_indices])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def stage_predictions(
        self, head_output: DToPHeadOutput, canvas: torch.Tensor | None, packing: TokenPacking
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a head's output into the canvas and score every token with it.

        Returns:
            The canvas `(batch, num_labels, tokens)` and the head's class scores over the whole grid, same shape.
        """
        # (total, num_labels) -> (batch, tokens, num_labels) -> (batch, num_labels, tokens)
        stage_values = packing.to_grid(head_output.mask_logits).transpose(1, 2)
        canvas = stage_values if canvas is None else update_canvas(canvas, stage_values, packing.active_mask)
        if self.config.head_type == "atm":
            return canvas, atm_class_scores(head_output.class_logits, canvas)
        return canvas, canvas

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        exit_threshold: float | list[float] | tuple[float, ...] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
    ) -> DToPModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; any size of at least one patch (other sizes are padded to a patch multiple).
            exit_threshold (`float` or `tuple[float]`, *optional*):
                Overrides `config.exit_threshold` for this call; 1.0 runs the unpruned baseline.
            output_hidden_states (`bool`, *optional*): return the embeddings and every layer's output.
            output_attentions (`bool`, *optional*): return every layer's attention weights (eager attention).
            patch_offsets (`list[torch.Tensor]`, *optional*): the windows' offsets from the image processor;
                returned unchanged in the output for the post-processing.
        """
        config = self.config
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        check_pixel_values(pixel_values, config)
        if output_attentions and config._attn_implementation != "eager":
            logger.warning_once(
                "`output_attentions=True` needs eager attention; attention weights will be None. "
                "Call `model.set_attn_implementation('eager')` first."
            )
        thresholds = config.exit_thresholds_per_head(exit_threshold)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        embeddings, grid_size = self.embeddings(pixel_values)  # (batch, [1 +] tokens, dim)
        batch_size, num_tokens = embeddings.shape[0], grid_size[0] * grid_size[1]
        device = embeddings.device
        num_stages, last_stage = len(config.out_indices), len(config.out_indices) - 1

        active_mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)  # patch tokens
        exit_stage = torch.full((batch_size, num_tokens), last_stage, dtype=torch.long, device=device)
        backbone_packing, head_packing = self.pack(active_mask)
        hidden_states = backbone_packing.from_grid(embeddings)  # (total, dim)
        attention_mask = build_attention_mask(backbone_packing, config._attn_implementation, hidden_states.dtype)

        tokens_per_layer = []
        all_hidden_states = (embeddings,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        canvas = None
        stage_logits, stage_class_logits, stage_mask_logits = [], [], []
        stage = 0
        for layer_index, layer in enumerate(self.layers):
            tokens_per_layer.append(backbone_packing.counts)
            if backbone_packing.total == 0:
                # Every token of every image has exited (possible only with keep_top_k=0): nothing left to run.
                attn_weights = None
            else:
                hidden_states, attn_weights = layer(hidden_states, backbone_packing, attention_mask)
            if output_hidden_states:
                all_hidden_states += (backbone_packing.to_grid(hidden_states),)
            if output_attentions:
                all_attentions += (self.attention_on_grid(attn_weights, backbone_packing),)
            if layer_index != config.out_indices[stage]:
                continue

            head_output = self.heads[stage](self.patch_rows(hidden_states, backbone_packing), head_packing)
            canvas, class_scores = self.stage_predictions(head_output, canvas, head_packing)
            stage_logits.append(tokens_to_grid(class_scores, grid_size))
            stage_mask_logits.append(tokens_to_grid(canvas, grid_size))
            if head_output.class_logits is not None:
                stage_class_logits.append(head_output.class_logits)

            # Confidence never exceeds 1 and the test is strict, so threshold 1.0 cannot prune: skip the work.
            if stage < last_stage and thresholds[stage] < 1.0:
                scores = class_scores if config.head_type == "atm" else class_scores.softmax(dim=1)
                confidence, predicted_class = token_confidence(scores)
                exit_mask = select_exiting_tokens(
                    confidence, predicted_class, active_mask, thresholds[stage], config.keep_top_k
                )
                exit_stage = exit_stage.masked_fill(exit_mask, stage)
                active_mask = active_mask & ~exit_mask
                new_backbone_packing, head_packing = self.pack(active_mask)
                hidden_states = repack(hidden_states, backbone_packing, new_backbone_packing)
                backbone_packing = new_backbone_packing
                attention_mask = build_attention_mask(
                    backbone_packing, config._attn_implementation, hidden_states.dtype
                )
            stage += 1
            if stage == num_stages:
                break

        return DToPModelOutput(
            logits=stage_logits[-1],
            exit_stage=exit_stage.reshape(batch_size, *grid_size),
            tokens_per_layer=torch.stack(tokens_per_layer, dim=1),
            stage_logits=tuple(stage_logits),
            stage_class_logits=tuple(stage_class_logits) if stage_class_logits else None,
            stage_mask_logits=tuple(stage_mask_logits),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            patch_offsets=patch_offsets,
        )

    def pack(self, active_mask: torch.Tensor) -> tuple[TokenPacking, TokenPacking]:
        """Packings of the backbone's tokens and of the heads' (patch tokens only): the same one without a class
        token, so each stage packs (and syncs with the host) once."""
        head_packing = pack_tokens(active_mask)
        if not self.config.use_cls_token:
            return head_packing, head_packing
        return pack_tokens(self.backbone_active_mask(active_mask)), head_packing

    def backbone_active_mask(self, active_mask: torch.Tensor) -> torch.Tensor:
        """The class token, when kept, is always active (it never exits)."""
        if not self.config.use_cls_token:
            return active_mask
        return torch.cat([active_mask.new_ones(active_mask.shape[0], 1), active_mask], dim=1)

    def patch_rows(self, hidden_states: torch.Tensor, backbone_packing: TokenPacking) -> torch.Tensor:
        """The packed patch tokens, without the class token (heads never see it)."""
        if not self.config.use_cls_token:
            return hidden_states
        is_patch = backbone_packing.flat_index % backbone_packing.num_tokens != 0
        return hidden_states[is_patch]

    @staticmethod
    def attention_on_grid(attn_weights: torch.Tensor | None, packing: TokenPacking) -> torch.Tensor | None:
        """Padded weights `(batch, heads, max_count, max_count)` -> `(batch, heads, tokens, tokens)`."""
        if attn_weights is None or packing.is_uniform:
            return attn_weights
        batch_size, num_heads = attn_weights.shape[:2]
        slot_token = packing.padded_token_index()  # (batch, max_count), `tokens` at padding
        grid = attn_weights.new_zeros(batch_size, packing.num_tokens + 1, packing.num_tokens + 1, num_heads)
        batch_index = torch.arange(batch_size, device=grid.device)[:, None, None]
        grid[batch_index, slot_token[:, :, None], slot_token[:, None, :]] = attn_weights.permute(0, 2, 3, 1)
        return grid[:, :-1, :-1].permute(0, 3, 1, 2)


def repack(hidden_states: torch.Tensor, old_packing: TokenPacking, new_packing: TokenPacking) -> torch.Tensor:
    """Drop the rows of exited tokens from a packed sequence: `(old_total, dim)` -> `(new_total, dim)`."""
    still_active = new_packing.active_mask.reshape(-1).index_select(0, old_packing.flat_index)  # (old_total,)
    return hidden_states[still_active]


class DToPForSemanticSegmentation(DToPPreTrainedModel):
    """DToP for semantic segmentation: [`DToPModel`] plus the training loss of every head (SPEC §4)."""

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
    ) -> DToPSemanticSegmenterOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Class ids in `[0, num_labels)`, `config.semantic_loss_ignore_index` for unlabelled pixels. When
                given, the loss of every head is computed and summed.
            exit_threshold (`float` or `tuple[float]`, *optional*):
                Overrides `config.exit_threshold` for this call; 1.0 runs the unpruned baseline.

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
        config = self.config
        if labels is not None:
            labels = check_labels(labels, config.num_labels, config.semantic_loss_ignore_index)
        outputs = self.dtop(
            pixel_values,
            exit_threshold=exit_threshold,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            patch_offsets=patch_offsets,
            return_dict=True,
        )
        loss = None
        if labels is not None:
            loss = self.compute_loss(outputs, labels, tuple(pixel_values.shape[-2:]))
        return DToPSemanticSegmenterOutput(loss=loss, **outputs)

    def compute_loss(
        self, outputs: DToPModelOutput, labels: torch.Tensor, input_size: tuple[int, int]
    ) -> torch.Tensor:
        """Weighted sum over heads of each head's loss (weight 1 each by default, SPEC §4)."""
        config = self.config
        grid_size = outputs.stage_mask_logits[0].shape[-2:]
        padded_size = (grid_size[0] * config.patch_size, grid_size[1] * config.patch_size)
        weights = config.stage_loss_weights or (1.0,) * len(config.out_indices)
        labels = labels.long()
        total = 0.0
        for stage, weight in enumerate(weights):
            if config.head_type == "atm":
                stage_loss = atm_stage_loss(
                    outputs.stage_class_logits[stage],
                    outputs.stage_mask_logits[stage],
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
            else:
                stage_loss = fcn_stage_loss(
                    outputs.stage_mask_logits[stage], labels, input_size, padded_size, config.semantic_loss_ignore_index
                )
            total = total + weight * stage_loss
        return total


__all__ = ["DToPForSemanticSegmentation", "DToPModel", "DToPPreTrainedModel"]
