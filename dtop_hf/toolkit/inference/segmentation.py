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
GFLOPs per image.

[`segment_images`] is the one entry point for images as people have them (the pipeline aside); the evaluation loop,
which holds processed and padded batches with their labels, uses the lower-level [`predict_batch`].
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import SizeDict

from ...image_processing_dtop import DToPImageProcessor
from ...pruning import tokens_seen_per_stage
from ..evaluation.flops import DToPFlops, count_flops_from_outputs, sum_windows_per_image


ExitThreshold = float | Sequence[float]


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


def exit_kwargs(
    exit_threshold: ExitThreshold | None = None,
    exit_mode: str | None = None,
    exit_capacity: float | Sequence[float] | None = None,
) -> dict[str, Any]:
    """The per-call exit settings that are set, as keyword arguments of the model's forward: an unset one leaves
    the config's (and a model without capacity mode never sees `exit_mode` unless asked for it)."""
    settings = {"exit_threshold": exit_threshold, "exit_mode": exit_mode, "exit_capacity": exit_capacity}
    return {name: value for name, value in settings.items() if value is not None}


def _forward(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    pixel_values: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]] | None,
    forward_kwargs: dict[str, Any],
) -> list[tuple[list[int], object]]:
    """Run the model on processed images, whole or (processor in slide mode) cut into windows.

    Returns:
        `(image indices, model output)` pairs: one for the whole batch, or in slide mode one per window shape (an
        image side shorter than the crop gives smaller windows, which cannot share a batch with full ones); the
        `patch_offsets` of each output count images from 0 within its pair.
    """
    if not image_processor.do_split_image:
        return [(list(range(len(pixel_values))), model(pixel_values, **forward_kwargs))]
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
        (indices, model(torch.stack(windows), patch_offsets=offsets, **forward_kwargs))
        for indices, windows, offsets in groups.values()
    ]


def _in_image_order(pieces: list[tuple[list[int], DToPFlops]], num_images: int) -> DToPFlops:
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
        tokens_per_stage: `(batch, num_stages)` int64 patch tokens each head saw (summed over windows).
        flops: [`DToPFlops`] per image, exact (windows summed).
        flops_unpruned: [`DToPFlops`] of the same inputs with no token exiting.
        outputs: the model's output of the whole batch (token-grid `exit_stage`, `stage_logits`), for callers that
            measure more than the maps (the evaluation's exit diagnostics); `None` in slide mode, whose windows
            have no batch-wide output.
    """

    segmentation: list[torch.Tensor]
    exit_map: list[torch.Tensor] | None
    tokens_per_stage: torch.Tensor
    flops: DToPFlops
    flops_unpruned: DToPFlops
    outputs: Any = None


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    pixel_values: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    exit_maps: bool = False,
    **forward_kwargs,
) -> DToPPrediction:
    """Segment a batch of processed images: class maps (and exit maps) at `target_sizes`, tokens each head saw,
    exact GFLOPs per image. The lower level of [`segment_images`], for callers that hold processed batches.

    Args:
        pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): images resized by the
            processor (in slide mode: with `do_split_image=False`, at the keep-ratio size), padded bottom / right to
            a common size.
        target_sizes: the original `(height, width)` of each image, where the maps are returned.
        image_sizes: `(height, width)` of each image without the padding; `None` when there is none.
        exit_maps: also return the exit maps.
        forward_kwargs: per-call exit settings of the model's forward ([`exit_kwargs`]).
    """
    config = model.config
    num_images, num_stages = len(pixel_values), len(config.out_indices)
    segmentation, exit_map = [None] * num_images, [None] * num_images
    seen = torch.zeros(num_images, num_stages, dtype=torch.long)
    flops, flops_unpruned = [], []  # (image indices, DToPFlops) per forward
    forwards = _forward(model, image_processor, pixel_values, image_sizes, forward_kwargs)
    for indices, outputs in forwards:
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
        flops=_in_image_order(flops, num_images),
        flops_unpruned=_in_image_order(flops_unpruned, num_images),
        outputs=None if image_processor.do_split_image else forwards[0][1],
    )


@dataclass
class DToPSegmentationResult:
    """What one image gave: maps at the image size, token exits and cost (GFLOPs = multiply-accumulates / 1e9)."""

    segmentation: np.ndarray  # (height, width) int64 class ids
    exit_map: np.ndarray  # (height, width) int64 head index that finalised the pixel's token
    exits: list[int]  # tokens finalised by each head, decode head last (summed over windows)
    gflops: float  # backbone + decode head (the paper's figure)
    gflops_all_heads: float
    gflops_unpruned: float  # backbone + decode head with no token exiting, from the same inputs
    gflops_unpruned_all_heads: float


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image or a `(height, width[, channels])` uint8 array."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return image if image.mode == "RGB" else image.convert("RGB")


@torch.no_grad()
def segment_images(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
    exit_threshold: ExitThreshold | None = None,
    exit_mode: str | None = None,
    exit_capacity: float | Sequence[float] | None = None,
    batch_size: int | None = None,
) -> list[DToPSegmentationResult]:
    """Segment images of any sizes: class map and exit map at each image's size, tokens finalised per head, GFLOPs.

    A processor in slide mode (`do_split_image=True`, see [`sliding_window_processor`]) resizes keeping the aspect
    ratio and runs overlapping windows, as the official test mode; otherwise each image is resized to the
    processor's `size`. Images of the same size run together, up to `batch_size` per forward; each image's result is
    the same as alone (the model prunes every image, and every window, on its own).

    Args:
        model: a DToP segmentation model in eval mode.
        image_processor: the model's processor; its `do_split_image` picks slide mode.
        images: PIL images or `(height, width[, 3])` uint8 arrays (one, or a list).
        exit_threshold: per-call threshold, one value or one per auxiliary head; `None`: the model's.
        exit_mode: per-call exit mode (`"threshold"` or `"capacity"`); `None`: the model's.
        exit_capacity: per-call capacity (capacity mode); `None`: the model's.
        batch_size: most images per forward; `None`: all images of a size at once.

    Returns:
        One [`DToPSegmentationResult`] per image, in order.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    images = [_as_rgb(image) for image in images]
    forward_kwargs = exit_kwargs(exit_threshold, exit_mode, exit_capacity)
    device = next(model.parameters()).device
    batches: dict[tuple[int, int], list[list[int]]] = {}
    for index, image in enumerate(images):
        size_batches = batches.setdefault((image.height, image.width), [[]])
        if batch_size is not None and len(size_batches[-1]) == batch_size:
            size_batches.append([])
        size_batches[-1].append(index)
    results: list[DToPSegmentationResult | None] = [None] * len(images)
    for size, size_batches in batches.items():
        for indices in size_batches:
            inputs = image_processor(
                images=[images[index] for index in indices], do_split_image=False, return_tensors="pt"
            )
            prediction = predict_batch(
                model, image_processor, inputs["pixel_values"].to(device), [size] * len(indices), exit_maps=True,
                **forward_kwargs,
            )  # fmt: skip
            for position, index in enumerate(indices):
                results[index] = _image_result(prediction, position)
    return results


def _image_result(prediction: DToPPrediction, position: int) -> DToPSegmentationResult:
    """The result of image `position` of a batch's prediction, on CPU as plain numbers."""
    exits = exits_per_stage(prediction.tokens_per_stage[position : position + 1])[0]
    return DToPSegmentationResult(
        segmentation=prediction.segmentation[position].cpu().numpy(),
        exit_map=prediction.exit_map[position].cpu().numpy(),
        exits=exits.tolist(),
        gflops=float(prediction.flops.backbone_and_final_head[position]),
        gflops_all_heads=float(prediction.flops.total[position]),
        gflops_unpruned=float(prediction.flops_unpruned.backbone_and_final_head[position]),
        gflops_unpruned_all_heads=float(prediction.flops_unpruned.total[position]),
    )


__all__ = [
    "DToPPrediction",
    "DToPSegmentationResult",
    "exit_kwargs",
    "exits_per_stage",
    "predict_batch",
    "segment_images",
    "sliding_window_processor",
]
