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
"""Image processor for DToP: Segformer's (PIL backend) with DToP defaults, exit maps and sliding-window inference."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.segformer.image_processing_pil_segformer import (
    SegformerImageProcessorKwargs,
    SegformerImageProcessorPil,
)
from transformers.utils import ModelOutput, logging

from .pruning import tokens_seen_per_stage


logger = logging.get_logger(__name__)


class DToPImageProcessorKwargs(SegformerImageProcessorKwargs, total=False):
    """Same keyword arguments as Segformer's processor (`do_reduce_labels`, `segmentation_maps`, ...)."""


@dataclass
class DToPSlidingWindowOutput(ModelOutput):
    """
    Output of [`DToPImageProcessor.sliding_window_inference`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`):
            Class scores at pixel resolution, averaged over the overlapping windows (probabilities; FCN logits
            are turned into probabilities first, so that windows average like the official test mode).
        exit_stage (`torch.LongTensor` of shape `(batch_size, height, width)`):
            Per pixel, the head that finalised it, taken from the last window covering it.
        tokens_per_layer (`torch.LongTensor` of shape `(batch_size, num_hidden_layers)`):
            Tokens that entered each layer, summed over the windows of each image (for FLOPs accounting).
        tokens_per_stage (`torch.LongTensor` of shape `(batch_size, num_stages)`):
            Tokens each head saw, summed over the windows of each image.
        num_windows (`int`): windows per image.
    """

    logits: torch.FloatTensor | None = None
    exit_stage: torch.LongTensor | None = None
    tokens_per_layer: torch.LongTensor | None = None
    tokens_per_stage: torch.LongTensor | None = None
    num_windows: int | None = None


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one axis, the last one flush with the end (mmseg's rule)."""
    num_windows = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride, length - crop), 0) for index in range(num_windows)]


class DToPImageProcessor(SegformerImageProcessorPil):
    r"""
    Constructs a DToP image processor: resize, rescale, ImageNet normalisation and, for training data, label maps
    (`segmentation_maps`, resized NEAREST, optionally `do_reduce_labels` for data sets such as ADE20K where 0 means
    "unlabelled"). It is Segformer's PIL-backend processor with DToP's defaults, plus:

    - `post_process_semantic_segmentation(outputs, target_sizes)`: the transformers 5.23 contract (a list of
      `(height, width)` class-id maps, the scores bilinearly resized to each target size);
    - `post_process_exit_map(outputs, target_sizes)`: which stage finalised each pixel, for pictures;
    - `sliding_window_inference(model, pixel_values)`: the official test mode for large images (512 crops,
      stride 341, probabilities averaged over the overlaps).

    Images of any size are resized to `size` (default 512x512), so the model always sees a multiple of the patch
    size; post-processing maps the result back to the original size. For the official test mode, resize the
    shorter side instead (`size={"shortest_edge": 512, "longest_edge": 2048}`) and use `sliding_window_inference`.

    Args:
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 512, "width": 512}`): window of
            `sliding_window_inference`.
        stride (`dict[str, int]`, *optional*, defaults to `{"height": 341, "width": 341}`): stride of its windows.
    """

    valid_kwargs = DToPImageProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, crop_size: dict | None = None, stride: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.crop_size = crop_size or {"height": 512, "width": 512}
        self.stride = stride or {"height": 341, "width": 341}

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None, return_segmentation_scores: bool = False
    ):
        """
        Class-id maps from a DToP output: the 5.23 contract (see Segformer's processor), with the official
        resizing order. The official code upsamples the grid scores bilinearly to the network input size first and
        only then to the original image size; two bilinear steps differ from one, so when `target_sizes` are given
        and the processor resizes to a fixed `size`, the scores go through that size first.

        Args:
            outputs: a DToP output (or any mapping with `logits` of shape `(batch_size, num_labels, h, w)`).
            target_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` per image.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`): also return the resized scores.

        Returns:
            `list[torch.LongTensor]` of `(height, width)` maps (or `SemanticSegmentationPostProcessorOutput`s).
        """
        logits = outputs["logits"]
        input_size = (self.size.height, self.size.width) if self.do_resize and self.size.height else None
        if target_sizes is not None and input_size is not None and tuple(logits.shape[-2:]) != input_size:
            logits = F.interpolate(logits, size=input_size, mode="bilinear", align_corners=False)
        return super().post_process_semantic_segmentation(
            ModelOutput(logits=logits), target_sizes=target_sizes, return_segmentation_scores=return_segmentation_scores
        )

    def post_process_exit_map(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None
    ) -> list[torch.Tensor]:
        """
        Which head finalised each pixel (0 = first auxiliary head, ..., `len(out_indices) - 1` = decode head).

        Args:
            outputs: a DToP model output (or any mapping with `exit_stage` of shape `(batch_size, h, w)`).
            target_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` per image; nearest resize.

        Returns:
            `list[torch.LongTensor]` of `(height, width)` maps.
        """
        exit_stage = outputs["exit_stage"]
        if target_sizes is not None and len(target_sizes) != len(exit_stage):
            raise ValueError(
                f"Got {len(target_sizes)} target sizes for a batch of {len(exit_stage)}: pass one per image."
            )
        maps = []
        for index, stage_map in enumerate(exit_stage):
            if target_sizes is not None:
                size = tuple(int(value) for value in target_sizes[index])
                stage_map = F.interpolate(stage_map[None, None].float(), size=size, mode="nearest")[0, 0].long()
            maps.append(stage_map)
        return maps

    @torch.no_grad()
    def sliding_window_inference(
        self,
        model: torch.nn.Module,
        pixel_values: torch.Tensor,
        crop_size: dict | None = None,
        stride: dict | None = None,
        exit_threshold: float | list[float] | None = None,
        batch_size: int = 8,
    ) -> DToPSlidingWindowOutput:
        """
        Official DToP test mode (SPEC §4): overlapping crops, each segmented by `model`, class probabilities
        averaged where windows overlap. Images smaller than the window are padded (bottom/right), and the padding
        is cropped from the result. The windows of all images are batched together (`batch_size` at a time): each
        window prunes on its own, as if it were alone.

        Args:
            model: a [`DToPForSemanticSegmentation`] or [`DToPModel`] (in eval mode).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): processed images.
            crop_size, stride (`dict`, *optional*): override the processor's `crop_size` / `stride`.
            exit_threshold: per-call exit threshold override passed to the model.
            batch_size: windows per forward pass.

        Returns:
            [`DToPSlidingWindowOutput`] at the resolution of `pixel_values`.
        """
        crop_size, stride = crop_size or self.crop_size, stride or self.stride
        crop_h, crop_w = crop_size["height"], crop_size["width"]
        stride_h, stride_w = stride["height"], stride["width"]
        if stride_h <= 0 or stride_w <= 0 or stride_h > crop_h or stride_w > crop_w:
            raise ValueError(f"`stride` must be in (0, crop size], got stride {stride} for crop {crop_size}.")
        num_images, _, height, width = pixel_values.shape
        padded = F.pad(pixel_values, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
        padded_h, padded_w = padded.shape[-2:]
        boxes = [(top, left) for top in window_starts(padded_h, crop_h, stride_h) for left in window_starts(padded_w, crop_w, stride_w)]
        windows = torch.stack(
            [padded[image, :, top : top + crop_h, left : left + crop_w] for image in range(num_images) for top, left in boxes]
        )  # (num_images * num_windows, channels, crop_h, crop_w)

        config = model.config
        scores = padded.new_zeros(num_images, config.num_labels, padded_h, padded_w)
        exit_stage = torch.zeros(num_images, padded_h, padded_w, dtype=torch.long, device=padded.device)
        counts = padded.new_zeros(1, 1, padded_h, padded_w)
        tokens_per_layer = torch.zeros(num_images, config.num_hidden_layers, dtype=torch.long, device=padded.device)
        tokens_per_stage = torch.zeros(num_images, len(config.out_indices), dtype=torch.long, device=padded.device)
        for start in range(0, len(windows), batch_size):
            outputs = model(windows[start : start + batch_size], exit_threshold=exit_threshold)
            window_scores = outputs.logits if config.head_type == "atm" else outputs.logits.softmax(dim=1)
            window_scores = F.interpolate(window_scores, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
            window_exit = F.interpolate(outputs.exit_stage[:, None].float(), size=(crop_h, crop_w), mode="nearest")
            window_image = torch.arange(start, start + window_scores.shape[0], device=padded.device) // len(boxes)
            tokens_per_layer.index_add_(0, window_image, outputs.tokens_per_layer)
            tokens_per_stage.index_add_(
                0, window_image, tokens_seen_per_stage(outputs.exit_stage, len(config.out_indices))
            )
            for offset in range(window_scores.shape[0]):
                image, box = divmod(start + offset, len(boxes))
                top, left = boxes[box]
                scores[image, :, top : top + crop_h, left : left + crop_w] += window_scores[offset]
                exit_stage[image, top : top + crop_h, left : left + crop_w] = window_exit[offset, 0].long()
        for top, left in boxes:
            counts[..., top : top + crop_h, left : left + crop_w] += 1
        return DToPSlidingWindowOutput(
            logits=(scores / counts)[..., :height, :width],
            exit_stage=exit_stage[..., :height, :width],
            tokens_per_layer=tokens_per_layer,
            tokens_per_stage=tokens_per_stage,
            num_windows=len(boxes),
        )


__all__ = ["DToPImageProcessor", "DToPImageProcessorKwargs", "DToPSlidingWindowOutput"]
