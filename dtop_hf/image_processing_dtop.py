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
"""Image processor for DToP: Segformer's (PIL backend) with DToP defaults, slide-mode windows and exit maps."""

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature, get_size_dict
from transformers.image_utils import SizeDict
from transformers.models.segformer.image_processing_pil_segformer import (
    SegformerImageProcessorKwargs,
    SegformerImageProcessorPil,
)
from transformers.utils import logging


logger = logging.get_logger(__name__)


class DToPImageProcessorKwargs(SegformerImageProcessorKwargs, total=False):
    r"""
    do_split_image (`bool`, *optional*, defaults to `self.do_split_image`):
        Slide mode (the official test mode): resize keeping the aspect ratio as `size={"shortest_edge": S_short,
        "longest_edge": S_long}` says, then cut `crop_size` windows every `stride` pixels; the output holds the
        windows as `pixel_values` and their places as `patch_offsets`.
    stride (`dict[str, int]`, *optional*, defaults to `self.stride`):
        Distance between the starts of neighbouring windows in slide mode.
    patch_size (`int`, *optional*, defaults to `self.patch_size`):
        The model's patch size, used by the post-processing to crop the padding the model adds to inputs whose size
        is not a patch multiple; `None` infers it from the token grid and the input size.
    """

    do_split_image: bool
    stride: dict[str, int]
    patch_size: int | None


def keep_ratio_size(image_size: tuple[int, int], shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """`(height, width)` of mmseg's `Resize(scale=(longest_edge, shortest_edge), keep_ratio=True)`: the image is
    scaled by `min(longest_edge / long side, shortest_edge / short side)`, each side rounded half up (mmcv's
    `rescale_size`)."""
    height, width = image_size
    scale = min(longest_edge / max(height, width), shortest_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (mmseg's `slide_inference`): `max(length - crop + stride - 1, 0)
    // stride + 1` windows every `stride` pixels, the last one flush with the end; a side shorter than the crop
    gets one window of its own length."""
    num_windows = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride, length - crop), 0) for index in range(num_windows)]


def patch_size_of_grid(input_size: tuple[int, int], grid_size: tuple[int, int]) -> int | None:
    """The patch size `p` with `grid = ceil(input / p)` on both sides, or `None` when there is none (a grid that
    does not come from this input size). The smallest such `p`, which is the only one as soon as one side has more
    tokens than `p` pixels per token."""
    patch_size = max(math.ceil(length / tokens) for length, tokens in zip(input_size, grid_size, strict=True))
    fits = all(math.ceil(length / patch_size) == tokens for length, tokens in zip(input_size, grid_size, strict=True))
    return patch_size if fits else None


def classes_that_can_win(grid_scores: torch.Tensor) -> torch.Tensor:
    """Ids of the classes that can hold the maximum somewhere once `grid_scores` `(num_labels, grid_h, grid_w)` are
    resized bilinearly, once or twice (grid -> input -> target, any sizes).

    Every resized value is a convex combination of 2 x 2 neighbouring values, so after two resizes a target pixel's
    score lies between the minimum and the maximum of its class over a 3 x 3 block of grid tokens (up to a few ulps
    of rounding). In a block, the class with the highest minimum bounds every pixel from below; a class whose
    maximum stays under that bound by a margin is strictly below it at every pixel of the block. A class is kept if
    it is not below in some block. The margin (relative to the largest score) is 16 ulps of the scores' dtype, at
    least 1e-5: far above the rounding error of two resizes. Real maps keep a handful of classes.

    Returns:
        `torch.LongTensor` of the kept class ids, ascending.
    """
    maxima = F.max_pool2d(grid_scores[None], 3, stride=1, padding=1)[0]  # (num_labels, grid_h, grid_w)
    minima = -F.max_pool2d(-grid_scores[None], 3, stride=1, padding=1)[0]
    tolerance = max(1e-5, 16 * torch.finfo(grid_scores.dtype).eps) * (1 + float(grid_scores.abs().amax()))
    bound = minima.amax(dim=0) - tolerance  # (grid_h, grid_w)
    kept = (maxima >= bound).flatten(1).any(dim=1).nonzero()[:, 0]
    return kept if len(kept) else torch.arange(len(grid_scores), device=grid_scores.device)  # NaN scores


def argmax_among(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=0)` for `(num_labels, height, width)` scores whose maxima all lie in `candidates` (see
    [`classes_that_can_win`]): the same map, bit for bit (the first class holding the maximum). torch's argmax over
    the leading dimension of a large tensor is a strided, unvectorised reduction (~300 ms for 150 classes at
    1200 x 800 on one CPU thread); the maximum is a vectorised one, and only the candidates are compared with it."""
    maximum = scores.amax(dim=0)
    index = torch.zeros(maximum.shape, dtype=torch.long, device=scores.device)
    for class_id in reversed(candidates.tolist()):  # the lowest class holding the maximum is written last
        index.masked_fill_(scores[class_id] == maximum, class_id)
    return index


def output_field(outputs, name: str):
    """`outputs[name]` for a model output or a plain dict, `None` when absent."""
    return outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)


class DToPImageProcessor(SegformerImageProcessorPil):
    r"""
    Constructs a DToP image processor: resize, rescale, ImageNet normalisation and, for training data, label maps
    (`segmentation_maps`, resized NEAREST, optionally `do_reduce_labels` for data sets such as ADE20K where 0 means
    "unlabelled"). It is Segformer's PIL-backend processor with DToP's defaults, plus the official test mode and exit
    maps:

    - whole-image mode (default): every image resized to `size` (512x512), one forward pass per image;
    - slide mode (`do_split_image=True`, the official test mode, EoMT's convention): each image resized keeping its
      aspect ratio as mmseg's `Resize(scale=(longest_edge, shortest_edge), keep_ratio=True)` (`size` then holds
      `{"shortest_edge", "longest_edge"}`, e.g. ADE20K's `{"shortest_edge": 512, "longest_edge": 2048}`), cut into
      `crop_size` windows every `stride` pixels with mmseg's geometry; `pixel_values` holds the windows of every
      image, `patch_offsets` one `[image_index, top, bottom, left, right]` int64 tensor per window (pixels of the
      resized image). Pass both to the model, which returns `patch_offsets` with its output;
    - `post_process_semantic_segmentation(outputs, target_sizes)`: class-id maps at each target size. In slide
      mode the windows are merged as mmseg's `slide_inference`: each window's scores upsampled to its size, summed,
      divided by the overlap count at the resized size, then resized once to the target size;
    - `post_process_exit_map(outputs, target_sizes)`: which head finalised each pixel.

    The processor never runs the model.

    Args:
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 512, "width": 512}`): slide-mode window.
        stride (`dict[str, int]`, *optional*, defaults to `{"height": 341, "width": 341}`): slide-mode stride.
        do_split_image (`bool`, *optional*, defaults to `False`): slide mode. Without an explicit `size`, slide mode
            resizes the shorter side to the crop height and the longer to at most 4 times that.
        patch_size (`int`, *optional*): the model's patch size (see the post-processing); inferred when `None`.
    """

    valid_kwargs = DToPImageProcessorKwargs
    model_input_names = ["pixel_values"]
    crop_size = {"height": 512, "width": 512}
    stride = {"height": 341, "width": 341}
    do_split_image = False
    patch_size = None

    def __init__(self, **kwargs):
        if kwargs.get("do_split_image") and kwargs.get("size") is None:
            crop = SizeDict(**get_size_dict(kwargs.get("crop_size") or self.crop_size, param_name="crop_size"))
            kwargs["size"] = {"shortest_edge": crop.height, "longest_edge": 4 * crop.height}
        super().__init__(**kwargs)

    def _standardize_kwargs(self, stride: dict | SizeDict | None = None, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        if stride is not None and not isinstance(stride, SizeDict):
            stride = SizeDict(**get_size_dict(stride, param_name="stride"))
        kwargs["stride"] = stride
        return kwargs

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """Resize to `size`; `{"shortest_edge", "longest_edge"}` keeps the aspect ratio with the official rule and
        rounding ([`keep_ratio_size`])."""
        if size.shortest_edge and size.longest_edge:
            height, width = keep_ratio_size(image.shape[-2:], size.shortest_edge, size.longest_edge)
            size = SizeDict(height=height, width=width)
        return super().resize(image, size, resample, **kwargs)

    def split_image(
        self, image, image_index: int = 0, crop_size: SizeDict | None = None, stride: SizeDict | None = None
    ) -> tuple[list, list[list[int]]]:
        """Cut one image into slide-mode windows (mmseg's geometry, see [`window_starts`]).

        Args:
            image (`np.ndarray` or `torch.Tensor` of shape `(num_channels, height, width)`): a resized image.
            image_index (`int`): written first in each window's offsets.
            crop_size, stride (`SizeDict`, *optional*): default to the processor's.

        Returns:
            The windows (views of `image`), row by row, and one `[image_index, top, bottom, left, right]` per window.
        """
        crop_size, stride = crop_size or self.crop_size, stride or self.stride
        for side in ("height", "width"):
            if not 0 < stride[side] <= crop_size[side]:
                raise ValueError(
                    f"`stride` must be in (0, crop size] on each side, got stride {dict(stride)} for crop "
                    f"{dict(crop_size)}."
                )
        height, width = image.shape[-2:]
        windows, offsets = [], []
        for top in window_starts(height, crop_size["height"], stride["height"]):
            for left in window_starts(width, crop_size["width"], stride["width"]):
                bottom, right = min(top + crop_size["height"], height), min(left + crop_size["width"], width)
                windows.append(image[:, top:bottom, left:right])
                offsets.append([image_index, top, bottom, left, right])
        return windows, offsets

    def _preprocess_image_like_inputs(
        self, images, segmentation_maps, do_convert_rgb, input_data_format, return_tensors, **kwargs
    ) -> BatchFeature:
        if not kwargs.get("do_split_image"):
            return super()._preprocess_image_like_inputs(
                images, segmentation_maps, do_convert_rgb, input_data_format, return_tensors, **kwargs
            )
        if segmentation_maps is not None:
            raise ValueError(
                "`segmentation_maps` are not split into windows: evaluation compares predictions with label maps at "
                "the original image size, and training uses whole crops (`do_split_image=False`)."
            )
        size = kwargs["size"]
        if not (size.shortest_edge and size.longest_edge):
            raise ValueError(
                "`do_split_image=True` resizes keeping the aspect ratio: pass `size={'shortest_edge': ..., "
                f"'longest_edge': ...}}` (mmseg's Resize scale (long, short), e.g. 512 and 2048), got {dict(size)}."
            )
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format
        )
        # Resize, rescale and normalise whole images, then cut: the windows share the normalised pixels.
        resized = self._preprocess(images, **{**kwargs, "do_reduce_labels": False})
        windows, patch_offsets = [], []
        for image_index, image in enumerate(resized):
            image_windows, image_offsets = self.split_image(image, image_index, kwargs["crop_size"], kwargs["stride"])
            windows += image_windows
            patch_offsets += image_offsets
        window_sizes = {window.shape[-2:] for window in windows}
        if return_tensors is not None and len(window_sizes) > 1:
            raise ValueError(
                f"The windows of these images differ in size ({sorted(window_sizes)}: an image side shorter than the "
                "crop gets a window of its own length) and cannot be stacked: process such images one at a time."
            )
        data = {"pixel_values": windows, "patch_offsets": [torch.tensor(offsets) for offsets in patch_offsets]}
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["patch_offsets"])

    def input_size(self, target_size: tuple[int, int]) -> tuple[int, int]:
        """Size of the input the model saw for an image of `target_size` in whole-image mode (after `resize`)."""
        size = self.size if isinstance(self.size, SizeDict) else SizeDict(**self.size)
        if self.do_resize and size.shortest_edge and size.longest_edge:
            return keep_ratio_size(target_size, size.shortest_edge, size.longest_edge)
        if self.do_resize and size.height and size.width:
            return size.height, size.width
        return tuple(int(length) for length in target_size)

    def padded_size(self, input_size: tuple[int, int], grid_size: tuple[int, int]) -> tuple[int, int] | None:
        """Pixels the token grid covers for an input of `input_size`: the model pads inputs whose size is not a
        patch multiple (bottom / right) before cutting patches. `None` when the grid cannot come from `input_size`
        (no patch size fits, e.g. target sizes that are not the input's)."""
        patch_size = self.patch_size or patch_size_of_grid(input_size, grid_size)
        if patch_size is None or any(
            math.ceil(length / patch_size) != tokens for length, tokens in zip(input_size, grid_size, strict=True)
        ):
            return None
        return grid_size[0] * patch_size, grid_size[1] * patch_size

    def scores_at_input_size(self, scores: torch.Tensor, input_size: tuple[int, int], mode: str) -> torch.Tensor:
        """Token-grid values `(batch, channels, grid_h, grid_w)` -> `(batch, channels, *input_size)`: upsampled to
        the padded size the grid covers, then the padded border cropped, rather than the whole grid stretched over
        the input. A grid that cannot come from `input_size` is stretched as it is.

        Args:
            mode (`str`): `"bilinear"` (scores, `align_corners=False`) or `"nearest"` (exit stages).
        """
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        padded_size = self.padded_size(input_size, tuple(scores.shape[-2:]))
        if padded_size is None:
            return F.interpolate(scores, size=input_size, mode=mode, **kwargs)
        return F.interpolate(scores, size=padded_size, mode=mode, **kwargs)[..., : input_size[0], : input_size[1]]

    def merge_windows(
        self, window_values: torch.Tensor, patch_offsets: list[torch.Tensor], mode: str = "bilinear"
    ) -> list[torch.Tensor]:
        """Slide-mode windows -> one map per image at its resized size, as mmseg's `slide_inference`.

        Args:
            window_values (`torch.Tensor` of shape `(num_windows, channels, grid_h, grid_w)`): token-grid values.
            patch_offsets (`list[torch.Tensor]`): `[image_index, top, bottom, left, right]` per window.
            mode (`str`): `"bilinear"`: each window upsampled to its size, summed, divided by the overlap count;
                `"nearest"` (exit stages): each pixel keeps the value of the last window covering it.

        Returns:
            `list[torch.Tensor]` of `(channels, height, width)`, one per image (the resized image's size).
        """
        offsets = [[int(value) for value in offset] for offset in patch_offsets]
        if len(offsets) != len(window_values):
            raise ValueError(
                f"Got {len(offsets)} `patch_offsets` for {len(window_values)} windows: pass one per window."
            )
        num_images = max(offset[0] for offset in offsets) + 1
        sizes = [(0, 0)] * num_images
        for image_index, _, bottom, _, right in offsets:  # the last windows are flush with the image's ends
            sizes[image_index] = (max(sizes[image_index][0], bottom), max(sizes[image_index][1], right))
        channels = window_values.shape[1]
        merged = [window_values.new_zeros(channels, *size) for size in sizes]
        counts = [window_values.new_zeros(1, *size) for size in sizes]
        for window, (image_index, top, bottom, left, right) in enumerate(offsets):
            # One window at a time: ADE20K's 150 classes at 512 x 512 are 157 MB per window.
            values = self.scores_at_input_size(window_values[window : window + 1], (bottom - top, right - left), mode)
            if mode == "nearest":
                merged[image_index][:, top:bottom, left:right] = values[0]
            else:
                merged[image_index][:, top:bottom, left:right] += values[0]
                counts[image_index][:, top:bottom, left:right] += 1
        if mode == "nearest":
            return merged
        return [total / count for total, count in zip(merged, counts, strict=True)]

    def maps_at_target_size(
        self,
        values: torch.Tensor,
        patch_offsets: list[torch.Tensor] | None,
        target_sizes: list[tuple[int, int]] | None,
        mode: str,
    ) -> list[torch.Tensor]:
        """Token-grid values `(batch, channels, grid_h, grid_w)` -> one `(channels, height, width)` map per image at
        its target size, resized once from the input size (windows merged first in slide mode). Without
        `target_sizes`: the merged maps in slide mode, the grid otherwise."""
        if patch_offsets is not None:
            maps = self.merge_windows(values, patch_offsets, mode)
        elif target_sizes is None:
            return list(values)
        else:
            if len(target_sizes) != len(values):
                raise ValueError(
                    f"Got {len(target_sizes)} target sizes for a batch of {len(values)}: pass one per image."
                )
            maps = []
            for item, target_size in zip(values, target_sizes, strict=True):
                input_size = self.input_size(target_size)
                padded_size = self.padded_size(input_size, tuple(item.shape[-2:]))
                if mode == "nearest" and padded_size in (None, input_size):
                    maps.append(item)  # nothing to crop: one nearest step, every pixel shows its own token
                else:
                    maps.append(self.scores_at_input_size(item[None], input_size, mode)[0])
        if target_sizes is None:
            return maps
        if len(target_sizes) != len(maps):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(maps)}: pass one per image.")
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        return [
            F.interpolate(item[None], size=tuple(int(length) for length in size), mode=mode, **kwargs)[0]
            for item, size in zip(maps, target_sizes, strict=True)
        ]

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None, return_segmentation_scores: bool = False
    ):
        """
        Class-id maps from a DToP output (the transformers contract, see Segformer's processor). As the official
        code: the grid scores are upsampled bilinearly to the network input (cropping any padding the model added)
        and only then to the target size; split inputs (`outputs.patch_offsets`) are merged first (see the class
        docstring). `logits` are averaged as the model returns them: probabilities for ATM heads, logits for FCN
        heads (mmseg averages what the decode head returns).

        Args:
            outputs: a DToP output (or any mapping with `logits` of shape `(batch_size, num_labels, h, w)` and, for
                split inputs, `patch_offsets`).
            target_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` per image (the original size).
            return_segmentation_scores (`bool`, *optional*, defaults to `False`): also return the resized scores.

        Returns:
            `list[torch.LongTensor]` of `(height, width)` maps (or `SemanticSegmentationPostProcessorOutput`s).
        """
        logits, patch_offsets = output_field(outputs, "logits"), output_field(outputs, "patch_offsets")
        if target_sizes is not None and len(target_sizes) != len(logits) and patch_offsets is None:
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)}: pass one per image.")
        scores = self.maps_at_target_size(logits, patch_offsets, target_sizes, "bilinear")
        if target_sizes is None or patch_offsets is not None:
            segmentations = [item.argmax(dim=0) for item in scores]
        else:
            # A 1200 x 800 image with ADE20K's 150 classes is 576 MB of resized scores: reduce them over the few
            # classes that can win, found on the token grid.
            segmentations = [
                argmax_among(item, classes_that_can_win(grid)) for item, grid in zip(scores, logits, strict=True)
            ]
        if not return_segmentation_scores:
            return segmentations
        return [
            SemanticSegmentationPostProcessorOutput(data={"segmentation": segmentation, "segmentation_scores": item})
            for segmentation, item in zip(segmentations, scores, strict=True)
        ]

    def post_process_exit_map(self, outputs, target_sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """
        Which head finalised each pixel (0 = first auxiliary head, ..., `len(out_indices) - 1` = decode head), by
        nearest resizing; in slide mode a pixel shows the last window covering it.

        Args:
            outputs: a DToP model output (or any mapping with `exit_stage` of shape `(batch_size, h, w)` and, for
                split inputs, `patch_offsets`).
            target_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` per image.

        Returns:
            `list[torch.LongTensor]` of `(height, width)` maps.
        """
        exit_stage = output_field(outputs, "exit_stage")[:, None].float()  # (batch, 1, grid_h, grid_w)
        maps = self.maps_at_target_size(exit_stage, output_field(outputs, "patch_offsets"), target_sizes, "nearest")
        return [item[0].long() for item in maps]


__all__ = ["DToPImageProcessor", "DToPImageProcessorKwargs"]
