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
"""Analytic per-image GFLOPs of a DToP forward pass, from the tokens each layer and head actually processed.

Convention: one multiply-accumulate (MAC) = one FLOP, as fvcore counts and as the paper reports;
`torch.utils.flop_counter.FlopCounterMode` counts 2 per MAC. Only matrix products and the patch convolution are
counted; norms, softmax, activations, biases and resizing are left out, as both of those counters do.

The count is what each image *needs*: per image, the tokens it kept. When the images of a batch prune different
numbers of tokens, the model runs attention on a per-image padded layout (`max_count` tokens per image), so the
MACs the hardware executes for a batch exceed the sum of these per-image counts by the padding: in every ViT layer
`2 * (max_count^2 - count^2) * hidden_size` per image, and in every ATM head the key/value projections, scores and
weighted values of the padded memory slots. At batch size 1 the two agree exactly. In capacity mode every image
keeps the same number of tokens, so there is no padding: the executed MACs are the per-image count times the batch,
and [`flops_from_capacities`] gives that count from the capacities and the input size alone, without the model.
"""

import math
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ...configuration_dtop import DToPConfig
from ...modeling_dtop import DTOP_HEAD_CLASSES
from ...pruning import num_tokens_kept, tokens_seen_per_stage


GIGA = 1e9


@dataclass
class DToPFlops(ModelOutput):
    """
    Per-image cost of a DToP forward pass in GFLOPs (MACs / 1e9), float64.

    Args:
        total (`torch.DoubleTensor` of shape `(batch_size,)`):
            Everything that ran: patch embedding, every ViT layer, every head (auxiliary heads included).
        backbone_and_final_head (`torch.DoubleTensor` of shape `(batch_size,)`):
            The paper's convention: patch embedding, ViT layers and the decode head only.
        patch_embedding (`torch.DoubleTensor` of shape `(batch_size,)`): the patch convolution.
        layers (`torch.DoubleTensor` of shape `(batch_size, num_hidden_layers)`): each ViT layer.
        heads (`torch.DoubleTensor` of shape `(batch_size, num_stages)`): each head, the decode head last.
    """

    total: torch.DoubleTensor | None = None
    backbone_and_final_head: torch.DoubleTensor | None = None
    patch_embedding: torch.DoubleTensor | None = None
    layers: torch.DoubleTensor | None = None
    heads: torch.DoubleTensor | None = None


def flops_from_token_counts(
    config: DToPConfig, tokens_per_layer: torch.Tensor, tokens_per_stage: torch.Tensor
) -> DToPFlops:
    """The analytic count of forward passes from their token counts; no model needed.

    Args:
        config: the model's [`DToPConfig`].
        tokens_per_layer: `(batch, num_hidden_layers)` int, tokens entering each ViT layer (class token included
            when `config.use_cls_token`), one row per forward pass (an image, or a window of a split image).
        tokens_per_stage: `(batch, num_stages)` int, patch tokens each head processed.

    Returns:
        [`DToPFlops`] per row, on the device of `tokens_per_layer`.
    """
    num_stages = len(config.out_indices)
    if tokens_per_layer.ndim != 2 or tokens_per_layer.shape[1] != config.num_hidden_layers:
        raise ValueError(
            f"`tokens_per_layer` must have shape (batch_size, {config.num_hidden_layers}), "
            f"got {tuple(tokens_per_layer.shape)}."
        )
    if tokens_per_stage.shape != (tokens_per_layer.shape[0], num_stages):
        raise ValueError(
            f"`tokens_per_stage` must have shape ({tokens_per_layer.shape[0]}, {num_stages}), "
            f"got {tuple(tokens_per_stage.shape)}."
        )
    # Exact integer arithmetic: ViT-L at 2048 px reaches ~1e13 MACs, far inside int64.
    tokens_per_layer, tokens_per_stage = tokens_per_layer.long(), tokens_per_stage.long()
    dim, intermediate = config.hidden_size, config.intermediate_size

    # Patch embedding: Conv2d(channels -> dim, kernel = stride = patch) over every patch of the grid; the first
    # head saw every patch token, so its count is the grid size.
    patch_embedding = tokens_per_stage[:, 0] * dim * config.num_channels * config.patch_size**2

    # ViT layer on n tokens: q, k, v, o projections 4 n C^2; QK^T and weights @ V 2 n^2 C; MLP 2 n C I (a gated
    # MLP has three matrices: 3 n C I).
    mlp_matrices = 3 if config.use_gated_mlp else 2
    linear_macs = tokens_per_layer * (4 * dim * dim + mlp_matrices * dim * intermediate)
    attention_macs = 2 * dim * tokens_per_layer**2
    layers = linear_macs + attention_macs  # (batch, num_hidden_layers)

    # Each head class states its own cost: per active token, and per call (ATM's class queries).
    per_token, per_call = DTOP_HEAD_CLASSES[config.head_type].multiply_accumulates(config)
    heads = tokens_per_stage * per_token + per_call

    patch_embedding, layers, heads = (value.double() / GIGA for value in (patch_embedding, layers, heads))
    backbone = patch_embedding + layers.sum(dim=1)
    return DToPFlops(
        total=backbone + heads.sum(dim=1),
        backbone_and_final_head=backbone + heads[:, -1],
        patch_embedding=patch_embedding,
        layers=layers,
        heads=heads,
    )


def sum_windows_per_image(values: torch.Tensor, patch_offsets: list[torch.Tensor] | None) -> torch.Tensor:
    """Per-window rows `(num_windows, ...)` -> per-image sums `(num_images, ...)`, grouped by the image index that
    leads each window's `patch_offsets`; rows are returned as they are when `patch_offsets` is `None`."""
    if patch_offsets is None:
        return values
    image_index = torch.tensor([int(offsets[0]) for offsets in patch_offsets], device=values.device)
    if len(image_index) != len(values):
        raise ValueError(
            f"Got {len(image_index)} `patch_offsets` for {len(values)} forward rows: pass one per window."
        )
    summed = values.new_zeros(int(image_index.max()) + 1, *values.shape[1:])
    return summed.index_add_(0, image_index, values)


def count_flops_from_outputs(config: DToPConfig, outputs, unpruned: bool = False) -> DToPFlops:
    """Per-image GFLOPs from a DToP output, so that an evaluation loop needs no second forward pass.

    Each forward row (an image, or a window) is counted from its own `tokens_per_layer` and token-grid
    `exit_stage`; for split inputs (`outputs.patch_offsets`, slide mode) the windows of an image are summed: the
    exact cost of the image, attention included.

    Args:
        config: the model's [`DToPConfig`].
        outputs: a [`DToPModelOutput`] / [`DToPSemanticSegmenterOutput`].
        unpruned: count the same inputs as if no token had exited (every layer and head sees what the first saw).

    Returns:
        [`DToPFlops`]: `.total` and `.backbone_and_final_head` of shape `(num_images,)`.
    """
    tokens_per_layer = outputs.get("tokens_per_layer")
    if tokens_per_layer is None:
        raise ValueError("`outputs.tokens_per_layer` is None: pass the output of a DToP model forward.")
    tokens_per_stage = tokens_seen_per_stage(outputs["exit_stage"], len(config.out_indices))
    if unpruned:
        tokens_per_layer = tokens_per_layer[:, :1].expand_as(tokens_per_layer)
        tokens_per_stage = tokens_per_stage[:, :1].expand_as(tokens_per_stage)
    per_row = flops_from_token_counts(config, tokens_per_layer, tokens_per_stage)
    patch_offsets = outputs.get("patch_offsets")
    return DToPFlops(**{name: sum_windows_per_image(value, patch_offsets) for name, value in per_row.items()})


def capacity_token_counts(
    config: DToPConfig,
    image_size: tuple[int, int],
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of a capacity-mode forward pass, from the capacities and the input size alone.

    The grid is `ceil(height / patch) x ceil(width / patch)` (the model pads other sizes); after auxiliary head i,
    `ceil(exit_capacity[i] * tokens)` tokens go on (never more than were active), in every image alike.

    Args:
        config: the model's [`DToPConfig`].
        image_size: `(height, width)` of the input.
        exit_capacity: as the forward's per-call argument; `None` uses `config.exit_capacity`.

    Returns:
        `tokens_per_layer` `(1, num_hidden_layers)` (prefix tokens included) and `tokens_per_stage`
        `(1, num_stages)`, as [`flops_from_token_counts`] takes them.
    """
    capacities = config.exit_capacities_per_head(exit_capacity)  # validates; the decode head's 1.0 last
    num_tokens = math.prod(math.ceil(side / config.patch_size) for side in image_size)
    tokens_per_stage, active = [], num_tokens
    for capacity in capacities:
        tokens_per_stage.append(active)  # what this head (and its stage's layers) see
        active = min(active, num_tokens_kept(capacity, num_tokens))
    out_indices = config.out_indices
    layers_per_stage = [index - previous for previous, index in zip((-1,) + out_indices[:-1], out_indices)]
    tokens_per_layer = [
        count + config.num_prefix_tokens
        for count, num_layers in zip(tokens_per_stage, layers_per_stage)
        for _ in range(num_layers)
    ]
    return torch.tensor([tokens_per_layer]), torch.tensor([tokens_per_stage])


def flops_from_capacities(
    config: DToPConfig,
    image_size: tuple[int, int],
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
) -> DToPFlops:
    """Per-image GFLOPs of capacity mode from the capacities and the input size alone, no model run: exactly what
    a capacity-mode forward executes per image, at any batch size (see [`capacity_token_counts`])."""
    return flops_from_token_counts(config, *capacity_token_counts(config, image_size, exit_capacity))


def capacity_flops_ratio(
    config: DToPConfig,
    image_size: tuple[int, int],
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    figure: str = "total",
) -> float:
    """R = GFLOPs unpruned / GFLOPs in capacity mode, from the capacities and the input size alone.

    Args:
        figure: `"total"` (every head) or `"backbone_and_final_head"` (the paper's convention).
    """
    pruned = flops_from_capacities(config, image_size, exit_capacity)
    unpruned = flops_from_capacities(config, image_size, 1.0)
    return float(unpruned[figure] / pruned[figure])


@torch.no_grad()
def count_flops(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    exit_threshold: float | list[float] | tuple[float, ...] | None = None,
    exit_mode: str | None = None,
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
) -> DToPFlops:
    """Run a DToP model on a batch and count, per image, the GFLOPs (MACs / 1e9) it spent.

    Args:
        model: a [`DToPForSemanticSegmentation`] or [`DToPModel`].
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): normalised images.
        exit_threshold, exit_mode, exit_capacity: the per-call exit rule, as in the model's forward (threshold or
            capacity 1.0 = unpruned).

    Returns:
        [`DToPFlops`]; `.total` counts the auxiliary heads too, `.backbone_and_final_head` is the paper's figure.

    Example:
        >>> flops = count_flops(model, pixel_values)  # ViT-B/16 at 512x512, threshold 1.0: ~109.4 GFLOPs
        >>> flops.backbone_and_final_head, flops.total
    """
    outputs = model(pixel_values, exit_threshold=exit_threshold, exit_mode=exit_mode, exit_capacity=exit_capacity)
    return count_flops_from_outputs(model.config, outputs)


__all__ = [
    "DToPFlops",
    "capacity_flops_ratio",
    "capacity_token_counts",
    "count_flops",
    "count_flops_from_outputs",
    "flops_from_capacities",
    "flops_from_token_counts",
    "sum_windows_per_image",
    "tokens_seen_per_stage",
]
