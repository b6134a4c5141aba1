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

Convention (SPEC §5): one multiply-accumulate (MAC) = one FLOP, as fvcore counts and as the paper reports;
`torch.utils.flop_counter.FlopCounterMode` counts 2 per MAC. Only matrix products and the patch convolution are
counted; norms, softmax, activations, biases and resizing are left out, as both of those counters do.

The count is what each image *needs*: per image, the tokens it kept. When the images of a batch prune different
numbers of tokens, the model runs attention on a per-image padded layout (`max_count` tokens per image), so the
MACs the hardware executes for a batch exceed the sum of these per-image counts by the padding: in every ViT layer
`2 * (max_count^2 - count^2) * hidden_size` per image, and in every ATM head the key/value projections, scores and
weighted values of the padded memory slots. At batch size 1 the two agree exactly.
"""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ...configuration_dtop import DToPConfig
from ...pruning import tokens_seen_per_stage


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
    config: DToPConfig,
    tokens_per_layer: torch.Tensor,
    tokens_per_stage: torch.Tensor,
    num_windows: int = 1,
) -> DToPFlops:
    """The analytic count (SPEC §5) from token counts; no model needed.

    For an image that ran as `num_windows` forward passes (sliding-window inference), pass the counts summed over
    its windows. Every term is linear in the token counts except the attention products of the ViT layers,
    `2 * n^2 * hidden_size` per window; from sums these are computed as if every window had kept the same number of
    tokens, which is exact when pruning is off and otherwise a lower bound (windows that prune unevenly cost a
    little more). Count windows one at a time (`num_windows=1`) and add them up when exactness matters.

    Args:
        config: the model's [`DToPConfig`].
        tokens_per_layer: `(batch, num_hidden_layers)` int, tokens entering each ViT layer (class token included
            when `config.use_cls_token`).
        tokens_per_stage: `(batch, num_stages)` int, patch tokens each head processed.
        num_windows: forward passes the counts add up over (1 for whole-image inference).

    Returns:
        [`DToPFlops`] on the device of `tokens_per_layer`.
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
    if num_windows < 1:
        raise ValueError(f"`num_windows` must be >= 1, got {num_windows}.")
    # Exact integer arithmetic: ViT-L at 2048 px reaches ~1e13 MACs, far inside int64.
    tokens_per_layer, tokens_per_stage = tokens_per_layer.long(), tokens_per_stage.long()
    dim, intermediate = config.hidden_size, config.intermediate_size

    # Patch embedding: Conv2d(channels -> dim, kernel = stride = patch) over every patch of the grid; the first
    # head saw every patch token, so its count is the grid size (summed over windows).
    patch_embedding = tokens_per_stage[:, 0] * dim * config.num_channels * config.patch_size**2

    # ViT layer on n tokens: q, k, v, o projections 4 n C^2; QK^T and weights @ V 2 n^2 C; MLP 2 n C I.
    linear_macs = tokens_per_layer * (4 * dim * dim + 2 * dim * intermediate)
    attention_macs = 2 * dim * tokens_per_layer**2 // num_windows
    layers = linear_macs + attention_macs  # (batch, num_hidden_layers)

    head_dim = config.head_hidden_size
    if config.head_type == "atm":
        num_queries, feed_forward = config.num_labels, config.head_intermediate_size
        # Per head call, independent of the tokens: per decoder layer the query self-attention (q, k, v, o
        # projections 4 Q D^2, QK^T and AV 2 Q^2 D), the cross-attention's query and output projections 2 Q D^2
        # and the FFN 2 Q D F; then the class embedding Q D 2.
        per_layer_fixed = 4 * num_queries * head_dim**2 + 2 * num_queries**2 * head_dim
        per_layer_fixed += 2 * num_queries * head_dim**2 + 2 * num_queries * head_dim * feed_forward
        fixed = config.head_num_layers * per_layer_fixed + 2 * num_queries * head_dim
        # Per token: input projection C D; per decoder layer the memory's key and value projections 2 D^2, the
        # scores Q D and the weighted values Q D.
        per_token = dim * head_dim + config.head_num_layers * (2 * head_dim**2 + 2 * num_queries * head_dim)
        heads = tokens_per_stage * per_token + num_windows * fixed
    else:
        # FCN: input projection C D and classifier D num_labels per token.
        heads = tokens_per_stage * (dim * head_dim + head_dim * config.num_labels)

    patch_embedding, layers, heads = (value.double() / GIGA for value in (patch_embedding, layers, heads))
    backbone = patch_embedding + layers.sum(dim=1)
    return DToPFlops(
        total=backbone + heads.sum(dim=1),
        backbone_and_final_head=backbone + heads[:, -1],
        patch_embedding=patch_embedding,
        layers=layers,
        heads=heads,
    )


def count_flops_from_outputs(config: DToPConfig, outputs) -> DToPFlops:
    """Per-image GFLOPs from a DToP output, so that an evaluation loop needs no second forward pass.

    Args:
        config: the model's [`DToPConfig`].
        outputs: a [`DToPModelOutput`] / [`DToPSemanticSegmenterOutput`] (uses `tokens_per_layer` and the
            token-grid `exit_stage`), or a [`DToPSlidingWindowOutput`] (uses `tokens_per_layer`,
            `tokens_per_stage` and `num_windows`: see [`flops_from_token_counts`] for the one approximation).

    Returns:
        [`DToPFlops`]: `.total` and `.backbone_and_final_head` of shape `(batch_size,)`.
    """
    tokens_per_layer = outputs.get("tokens_per_layer")
    if tokens_per_layer is None:
        raise ValueError("`outputs.tokens_per_layer` is None: pass the output of a DToP model forward.")
    tokens_per_stage = outputs.get("tokens_per_stage")
    num_windows = outputs.get("num_windows") or 1
    if tokens_per_stage is None:
        tokens_per_stage = tokens_seen_per_stage(outputs["exit_stage"], len(config.out_indices))
    return flops_from_token_counts(config, tokens_per_layer, tokens_per_stage, num_windows)


@torch.no_grad()
def count_flops(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    exit_threshold: float | list[float] | tuple[float, ...] | None = None,
) -> DToPFlops:
    """Run a DToP model on a batch and count, per image, the GFLOPs (MACs / 1e9) it spent (SPEC §5).

    Args:
        model: a [`DToPForSemanticSegmentation`] or [`DToPModel`].
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): normalised images.
        exit_threshold: per-call threshold override, as in the model's forward (1.0 = unpruned).

    Returns:
        [`DToPFlops`]; `.total` counts the auxiliary heads too, `.backbone_and_final_head` is the paper's figure.

    Example:
        >>> flops = count_flops(model, pixel_values)  # ViT-B/16 at 512x512, threshold 1.0: ~109.4 GFLOPs
        >>> flops.backbone_and_final_head, flops.total
    """
    outputs = model(pixel_values, exit_threshold=exit_threshold)
    return count_flops_from_outputs(model.config, outputs)


class DToPFlopsRecorder:
    """Stands in for a DToP model where a caller runs it several times per image (sliding-window inference):
    forwards every call to the model and keeps each window's exact count."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        self.window_flops: list[DToPFlops] = []

    def __call__(self, pixel_values: torch.Tensor, **kwargs):
        outputs = self.model(pixel_values, **kwargs)
        self.window_flops.append(count_flops_from_outputs(self.config, outputs))
        return outputs

    def per_image(self, num_images: int) -> DToPFlops:
        """Sum the recorded windows per image; windows must have run image by image (all of image 0's first)."""
        per_window = {
            name: torch.cat([flops[name] for flops in self.window_flops]) for name in DToPFlops.__dataclass_fields__
        }
        return DToPFlops(
            **{name: value.reshape(num_images, -1, *value.shape[1:]).sum(dim=1) for name, value in per_window.items()}
        )


def sliding_window_inference_with_flops(image_processor, model: torch.nn.Module, pixel_values: torch.Tensor, **kwargs):
    """[`DToPImageProcessor.sliding_window_inference`] plus each image's exact GFLOPs, summed over its windows.

    Unlike [`count_flops_from_outputs`] on the summed token counts, the attention cost is counted window by window.

    Args:
        image_processor: a [`DToPImageProcessor`].
        model: a [`DToPForSemanticSegmentation`] or [`DToPModel`].
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): processed images.
        kwargs: passed to `sliding_window_inference` (`crop_size`, `stride`, `exit_threshold`, `batch_size`).

    Returns:
        The [`DToPSlidingWindowOutput`] and the [`DToPFlops`] per image.
    """
    recorder = DToPFlopsRecorder(model)
    outputs = image_processor.sliding_window_inference(recorder, pixel_values, **kwargs)
    return outputs, recorder.per_image(pixel_values.shape[0])


__all__ = [
    "DToPFlops",
    "DToPFlopsRecorder",
    "count_flops",
    "count_flops_from_outputs",
    "flops_from_token_counts",
    "sliding_window_inference_with_flops",
    "tokens_seen_per_stage",
]
