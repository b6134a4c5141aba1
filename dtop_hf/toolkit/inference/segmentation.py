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
"""Segment images with a DToP model, whole or in slide mode: class maps, exit maps, tokens exited per head and
GFLOPs per image. What the example scripts and the evaluation loop share."""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import SizeDict

from ...image_processing_dtop import DToPImageProcessor
from ...pruning import tokens_seen_per_stage
from ..evaluation.flops import DToPFlops, count_flops_from_outputs, sum_windows_per_image


def sliding_window_processor(image_processor: DToPImageProcessor) -> DToPImageProcessor:
    """`image_processor` in slide mode (the official test mode): itself when it already is, otherwise a copy with
    `do_split_image=True` whose `size` keeps the aspect ratio, the shorter side at the crop height and the longer at
    most 4 times that (mmseg's `Resize(scale=(2048, 512))` for a 512 crop). A processor saved in slide mode keeps
    its own scale (e.g. Pascal Context's 520 / 2048 with a 480 crop)."""
    if image_processor.do_split_image:
        return image_processor
    crop = image_processor.crop_size["height"]
    split = copy.deepcopy(image_processor)
    split.do_split_image = True
    split.size = SizeDict(shortest_edge=crop, longest_edge=4 * crop)
    return split


def exits_per_stage(tokens_per_stage: torch.Tensor) -> torch.Tensor:
    """Tokens finalised by each head from the tokens each head saw: head k finalised `seen[k] - seen[k + 1]`,
    the decode head everything it saw. `(batch, num_stages)` -> `(batch, num_stages)`."""
    later = torch.cat([tokens_per_stage[:, 1:], torch.zeros_like(tokens_per_stage[:, :1])], dim=1)
    return tokens_per_stage - later


def stage_labels(out_indices: Sequence[int]) -> list[str]:
    """`head 1 (layer 3)`, ..., `decode head (layer 12)`: how summaries name the heads (1-based layers)."""
    last = len(out_indices) - 1
    return [
        f"{'decode head' if stage == last else f'head {stage + 1}'} (layer {layer + 1})"
        for stage, layer in enumerate(out_indices)
    ]


@torch.no_grad()
def forward_images(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    pixel_values: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    exit_threshold: float | Sequence[float] | None = None,
    sliding_window: bool = False,
) -> list[tuple[list[int], object]]:
    """Run the model on processed images, whole or cut into slide-mode windows.

    Args:
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images resized by
            the processor (in slide mode: with `do_split_image=False`, at the keep-ratio size), padded bottom /
            right to a common size.
        image_sizes: `(height, width)` of each image without that padding; `None` when there is none.
        sliding_window: cut each image with `image_processor.split_image` (its `crop_size` and `stride`) and run
            the windows; the outputs carry `patch_offsets` for the post-processing.

    Returns:
        `(image indices, model output)` pairs: one for the whole batch, or in slide mode one per window shape (an
        image side shorter than the crop gives smaller windows, which cannot share a batch with full ones); the
        `patch_offsets` of each output count images from 0 within its pair.
    """
    if not sliding_window:
        return [(list(range(len(pixel_values))), model(pixel_values, exit_threshold=exit_threshold))]
    groups: dict[tuple[int, int], tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
    for index, image in enumerate(pixel_values):
        if image_sizes is not None:
            height, width = (int(length) for length in image_sizes[index])
            image = image[:, :height, :width]
        windows, offsets = image_processor.split_image(image)
        indices, group_windows, group_offsets = groups.setdefault(tuple(windows[0].shape[-2:]), ([], [], []))
        group_offsets += [torch.tensor([len(indices), *offset[1:]]) for offset in offsets]
        group_windows += windows
        indices.append(index)
    return [
        (indices, model(torch.stack(windows), exit_threshold=exit_threshold, patch_offsets=offsets))
        for indices, windows, offsets in groups.values()
    ]


def in_image_order(pieces: list[tuple[list[int], DToPFlops]], num_images: int) -> DToPFlops:
    """Per-image counts of several forwards (each `(image indices, DToPFlops)`) as one [`DToPFlops`] on CPU."""
    merged = {}
    for name in DToPFlops.__dataclass_fields__:
        first = pieces[0][1][name]
        merged[name] = torch.zeros(num_images, *first.shape[1:], dtype=first.dtype)
        for indices, piece in pieces:
            merged[name][indices] = piece[name].cpu()
    return DToPFlops(**merged)


@dataclass
class DToPPrediction:
    """Per-image results of [`predict_batch`], in the order of its images.

    Args:
        segmentation: `(height, width)` int64 class maps at the target sizes.
        exit_map: `(height, width)` int64 head index per pixel (`None` unless asked for).
        tokens_per_stage: `(batch_size, num_stages)` int64 patch tokens each head saw (summed over windows).
        flops: [`DToPFlops`] per image, exact (windows summed).
        flops_unpruned: [`DToPFlops`] of the same inputs with no token exiting.
    """

    segmentation: list[torch.Tensor]
    exit_map: list[torch.Tensor] | None
    tokens_per_stage: torch.Tensor
    flops: DToPFlops
    flops_unpruned: DToPFlops


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    pixel_values: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    exit_threshold: float | Sequence[float] | None = None,
    sliding_window: bool = False,
    exit_maps: bool = False,
) -> DToPPrediction:
    """Segment a batch of processed images: class maps (and exit maps) at `target_sizes`, tokens each head saw,
    exact GFLOPs per image. Arguments as in [`forward_images`]; `target_sizes` are the original `(height, width)`."""
    config = model.config
    num_images, num_stages = len(pixel_values), len(config.out_indices)
    segmentation, exit_map = [None] * num_images, [None] * num_images
    seen = torch.zeros(num_images, num_stages, dtype=torch.long)
    flops, flops_unpruned = [], []  # (image indices, DToPFlops) per forward
    for indices, outputs in forward_images(
        model, image_processor, pixel_values, image_sizes, exit_threshold, sliding_window
    ):
        sizes = [tuple(int(length) for length in target_sizes[index]) for index in indices]
        rows_seen = tokens_seen_per_stage(outputs.exit_stage, num_stages)
        seen[indices] = sum_windows_per_image(rows_seen, outputs.patch_offsets).cpu()
        flops.append((indices, count_flops_from_outputs(config, outputs)))
        flops_unpruned.append((indices, count_flops_from_outputs(config, outputs, unpruned=True)))
        maps = image_processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        stages = image_processor.post_process_exit_map(outputs, target_sizes=sizes) if exit_maps else sizes
        for index, class_map, stage_map in zip(indices, maps, stages, strict=True):
            segmentation[index], exit_map[index] = class_map, stage_map
    return DToPPrediction(
        segmentation=segmentation,
        exit_map=exit_map if exit_maps else None,
        tokens_per_stage=seen,
        flops=in_image_order(flops, num_images),
        flops_unpruned=in_image_order(flops_unpruned, num_images),
    )


@dataclass
class DToPSegmentationResult:
    """What one image gave: maps at the image size, token exits and cost."""

    segmentation: np.ndarray  # (height, width) int64 class ids
    exit_map: np.ndarray  # (height, width) int64 head index that finalised the pixel's token
    exits: list[int]  # tokens finalised by each head, decode head last (summed over windows)
    gflops: float  # backbone + decode head (the paper's figure)
    gflops_all_heads: float
    gflops_unpruned: float  # backbone + decode head at threshold 1.0, from the same inputs


@torch.no_grad()
def segment_images(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    images: Sequence[Image.Image],
    exit_threshold: float | Sequence[float] | None = None,
    sliding_window: bool = False,
) -> list[DToPSegmentationResult]:
    """Segment RGB images: class map and exit map at each image's size, tokens finalised per head, GFLOPs.

    Whole-image mode resizes to the processor's `size`; slide mode (`sliding_window`, or a processor saved with
    `do_split_image=True`) resizes keeping the aspect ratio and runs overlapping windows, as the official test
    mode (see [`sliding_window_processor`]). Images of the same size run as one batch; each image's result is
    the same as alone (the model prunes every image, and every window, on its own).
    """
    sliding_window = sliding_window or image_processor.do_split_image
    processor = sliding_window_processor(image_processor) if sliding_window else image_processor
    device = next(model.parameters()).device
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault((image.height, image.width), []).append(index)
    results: list[DToPSegmentationResult | None] = [None] * len(images)
    for size, indices in by_size.items():
        inputs = processor(images=[images[index] for index in indices], do_split_image=False, return_tensors="pt")
        prediction = predict_batch(
            model,
            processor,
            inputs["pixel_values"].to(device),
            target_sizes=[size] * len(indices),
            exit_threshold=exit_threshold,
            sliding_window=sliding_window,
            exit_maps=True,
        )
        exits = exits_per_stage(prediction.tokens_per_stage)
        for position, index in enumerate(indices):
            results[index] = DToPSegmentationResult(
                segmentation=prediction.segmentation[position].cpu().numpy(),
                exit_map=prediction.exit_map[position].cpu().numpy(),
                exits=exits[position].tolist(),
                gflops=float(prediction.flops.backbone_and_final_head[position]),
                gflops_all_heads=float(prediction.flops.total[position]),
                gflops_unpruned=float(prediction.flops_unpruned.backbone_and_final_head[position]),
            )
    return results


def segment_image(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    image: Image.Image,
    exit_threshold: float | Sequence[float] | None = None,
    sliding_window: bool = False,
) -> DToPSegmentationResult:
    """[`segment_images`] for one image."""
    return segment_images(model, image_processor, [image], exit_threshold, sliding_window)[0]


__all__ = [
    "DToPPrediction",
    "DToPSegmentationResult",
    "exits_per_stage",
    "forward_images",
    "predict_batch",
    "segment_image",
    "segment_images",
    "sliding_window_processor",
    "stage_labels",
]
