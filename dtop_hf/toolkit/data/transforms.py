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
"""The official training pipeline (mmseg 1.x, docs/official_recipes.md "Data pipelines"), transform by transform.

    RandomResize(scale=S, ratio_range=(0.5, 2.0), keep_ratio=True)   -> random_resize_scale + rescale_size
    RandomCrop(crop_size, cat_max_ratio=0.75)                        -> random_crop_box
    RandomFlip(prob=0.5)                                             -> horizontal flip
    PhotoMetricDistortion()                                          -> PhotoMetricDistortion
    SegDataPreProcessor(mean, std, pad_val=0, seg_pad_val=255)       -> normalise, then pad_to_crop

Each function states the rule it implements; the tests check them against those statements. Randomness comes from
a `numpy.random.Generator` passed in, so a sample's augmentation depends on its own seed only.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...image_processing_dtop import DToPImageProcessor, keep_ratio_size


# mmseg's RandomCrop draws a new box at most this many times when `cat_max_ratio` rejects one.
CROP_RETRIES = 10


def random_resize_scale(
    scale: tuple[int, int], ratio_range: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int]:
    """mmcv `RandomResize._random_sample_ratio`: `ratio ~ U[low, high)`, target
    `(int(long * ratio), int(short * ratio))`."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    return int(scale[0] * ratio), int(scale[1] * ratio)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale_size` (keep ratio): the largest size inside `scale` = (long, short) in either orientation.

    The factor is `min(max(scale) / max(height, width), min(scale) / min(height, width))`; each side becomes
    `int(side * factor + 0.5)`: the image processor's [`keep_ratio_size`], in PIL's `(width, height)` order.
    Returns `(new_width, new_height)`.
    """
    new_height, new_width = keep_ratio_size((height, width), shortest_edge=min(scale), longest_edge=max(scale))
    return new_width, new_height


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(height, width, 3)` uint8 -> `(new_height, new_width, 3)` uint8 at `size = (new_width, new_height)`, bilinear
    with half-pixel centres and no antialiasing, as OpenCV's `INTER_LINEAR` (mmcv's default backend) resizes."""
    width, height = size
    # (height, width, 3) -> (1, 3, height, width)
    tensor = torch.tensor(pixels).permute(2, 0, 1)[None].float()  # a copy: PIL's arrays are read-only
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(height, width)` label map resized NEAREST to `size = (new_width, new_height)`: output pixel `(y, x)` takes
    input `(floor(y * height / new_height), floor(x * width / new_width))`, OpenCV's `INTER_NEAREST` rule."""
    width, height = size
    rows = np.minimum((np.arange(height) * label.shape[0] / height).astype(np.int64), label.shape[0] - 1)
    columns = np.minimum((np.arange(width) * label.shape[1] / width).astype(np.int64), label.shape[1] - 1)
    return label[rows[:, None], columns[None, :]]


def random_crop_box(
    label: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
) -> tuple[int, int, int, int]:
    """mmseg `RandomCrop.crop_bbox`: a random `crop_size = (height, width)` box, redrawn while one class dominates.

    A box is drawn uniformly: top in `[0, max(height - crop_height, 0)]`, left likewise. When `cat_max_ratio < 1`,
    the box is checked up to `CROP_RETRIES` (10) times: the labels inside it are counted, `ignore_index` left out;
    the box is accepted when the crop holds **more than one** class and the largest class covers **less than**
    `cat_max_ratio` of the counted pixels (`max(count) / sum(count) < cat_max_ratio`). A rejected box is replaced by
    a new draw; after the 10th rejection the 11th draw is used without a check.

    Returns:
        `(top, bottom, left, right)`, to slice `[top:bottom, left:right]` (the slice stops at the image border).
    """
    crop_height, crop_width = crop_size

    def draw() -> tuple[int, int, int, int]:
        top = int(rng.integers(0, max(label.shape[0] - crop_height, 0) + 1))
        left = int(rng.integers(0, max(label.shape[1] - crop_width, 0) + 1))
        return top, top + crop_height, left, left + crop_width

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_RETRIES):
            top, bottom, left, right = box
            values, counts = np.unique(label[top:bottom, left:right], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def rgb_to_hsv(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV in OpenCV's 8-bit convention (mmcv `bgr2hsv` on the BGR image): `V = max`,
    `S = round(255 * (V - min) / V)` (0 when V = 0), `H = round(hue_degrees / 2) mod 180`."""
    rgb = pixels.astype(np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value, minimum = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = value - minimum
    safe_chroma = np.where(chroma > 0, chroma, 1.0)
    # OpenCV's order of tests: red is the maximum first, then green, then blue.
    hue_if_green = 120.0 + 60.0 * (blue - red) / safe_chroma
    hue_if_blue = 240.0 + 60.0 * (red - green) / safe_chroma
    hue_if_red = 60.0 * (green - blue) / safe_chroma
    hue = np.where(value == red, hue_if_red, np.where(value == green, hue_if_green, hue_if_blue))
    hue = np.where(chroma > 0, hue % 360.0, 0.0)
    saturation = np.where(value > 0, 255.0 * chroma / np.where(value > 0, value, 1.0), 0.0)
    hsv = np.stack([np.round(hue / 2.0) % 180, np.round(saturation), value], axis=-1)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV's 8-bit convention, `H` in [0, 180)) -> uint8 RGB, the inverse of [`rgb_to_hsv`]."""
    hue = hsv[..., 0].astype(np.float64) * 2.0 / 60.0  # sector position in [0, 6)
    saturation = hsv[..., 1].astype(np.float64) / 255.0
    value = hsv[..., 2].astype(np.float64)
    sector = np.floor(hue).astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    # Per sector, which of (value, t, p, q) goes to red, green and blue.
    choices = {
        "red": (value, q, p, p, t, value),
        "green": (t, value, value, q, p, p),
        "blue": (p, p, t, value, value, q),
    }
    channels = [np.choose(sector, choices[name]) for name in ("red", "green", "blue")]
    return np.clip(np.round(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


@dataclass
class PhotoMetricDistortionDraw:
    """The random choices of one [`PhotoMetricDistortion`] call; `None` = that step is skipped."""

    brightness_delta: float | None
    contrast_first: bool
    contrast_factor: float | None
    saturation_factor: float | None
    hue_delta: int | None


class PhotoMetricDistortion:
    """mmseg 1.x `PhotoMetricDistortion` with its defaults, in its order, each step with probability 1/2:

    1. brightness: add `delta ~ U(-32, 32)`;
    2. contrast, when drawn to come first (probability 1/2): multiply by `alpha ~ U(0.5, 1.5)`;
    3. saturation: in HSV, multiply S by `alpha ~ U(0.5, 1.5)`;
    4. hue: in HSV, `H = (H + delta) mod 180` with an integer `delta` in `[-18, 18)` (numpy's `randint(-18, 18)`);
    5. contrast, when drawn to come last.

    Every step clips to [0, 255] and truncates to uint8 (mmseg's `convert`); HSV is OpenCV's 8-bit convention
    ([`rgb_to_hsv`]), converted to and back for the saturation and the hue steps separately. mmseg works on BGR
    images; the steps treat the three channels alike (HSV is the same colour either way), so RGB gives the same.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def sample(self, rng: np.random.Generator) -> PhotoMetricDistortionDraw:
        """Draw the random choices in mmseg's order (brightness, mode, contrast, saturation, hue)."""
        brightness = rng.uniform(-self.brightness_delta, self.brightness_delta) if rng.integers(2) else None
        contrast_first = bool(rng.integers(2))
        contrast = rng.uniform(*self.contrast_range) if rng.integers(2) else None
        saturation = rng.uniform(*self.saturation_range) if rng.integers(2) else None
        hue = int(rng.integers(-self.hue_delta, self.hue_delta)) if rng.integers(2) else None
        return PhotoMetricDistortionDraw(brightness, contrast_first, contrast, saturation, hue)

    @staticmethod
    def convert(pixels: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        """mmseg's `convert`: `uint8(clip(pixels * alpha + beta, 0, 255))` (truncation, not rounding)."""
        return np.clip(pixels.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def apply(self, pixels: np.ndarray, draw: PhotoMetricDistortionDraw) -> np.ndarray:
        """`(height, width, 3)` uint8 RGB -> the same, distorted as `draw` says."""
        if draw.brightness_delta is not None:
            pixels = self.convert(pixels, beta=draw.brightness_delta)
        if draw.contrast_first and draw.contrast_factor is not None:
            pixels = self.convert(pixels, alpha=draw.contrast_factor)
        if draw.saturation_factor is not None:
            hsv = rgb_to_hsv(pixels)
            hsv[..., 1] = self.convert(hsv[..., 1], alpha=draw.saturation_factor)
            pixels = hsv_to_rgb(hsv)
        if draw.hue_delta is not None:
            hsv = rgb_to_hsv(pixels)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + draw.hue_delta) % 180
            pixels = hsv_to_rgb(hsv)
        if not draw.contrast_first and draw.contrast_factor is not None:
            pixels = self.convert(pixels, alpha=draw.contrast_factor)
        return pixels

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(pixels, self.sample(rng))


def normalize_image(pixels: np.ndarray, image_processor: DToPImageProcessor) -> np.ndarray:
    """`(height, width, 3)` uint8 -> `(3, height, width)` float32, rescaled and normalised by the processor."""
    return image_processor(images=pixels, do_resize=False, return_tensors="np")["pixel_values"][0]


def pad_to_crop(
    pixel_values: np.ndarray, label: np.ndarray, crop_size: tuple[int, int], ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg `SegDataPreProcessor` padding: bottom/right up to `crop_size = (height, width)`, image with 0 *after*
    normalisation (the mean colour), labels with `ignore_index`. `pixel_values` is `(3, height, width)`."""
    pad_height, pad_width = crop_size[0] - label.shape[0], crop_size[1] - label.shape[1]
    pixel_values = np.pad(pixel_values, ((0, 0), (0, pad_height), (0, pad_width)))
    label = np.pad(label, ((0, pad_height), (0, pad_width)), constant_values=ignore_index)
    return pixel_values, label


class SegmentationTrainTransform:
    """The official training pipeline (docs/official_recipes.md) on an image and its (already reduced) label map:
    `RandomResize` to the data set's scale (ratio 0.5-2.0), `RandomCrop` with `cat_max_ratio`, horizontal flip,
    `PhotoMetricDistortion`, normalisation, padding to the crop.

    Args:
        image_processor: normalisation (mean, std) of the model.
        crop_size: crop side, or `(height, width)`.
        scale: `RandomResize` base scale `(long, short)`; default `(4 * crop, crop)`, the ADE20K and COCO-Stuff rule
            (2048, 512) for crop 512. Pascal Context's official scale is (2048, 520) for crop 480.
        ratio_range: `RandomResize` ratio range.
        cat_max_ratio: `RandomCrop` rule (1.0 = a plain uniform crop).
        flip_probability: `RandomFlip(prob)`.
        photometric_distortion: apply `PhotoMetricDistortion`.
        ignore_index: label of ignored and padded pixels.
    """

    def __init__(
        self,
        image_processor: DToPImageProcessor,
        crop_size: int | tuple[int, int],
        scale: tuple[int, int] | None = None,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_probability: float = 0.5,
        photometric_distortion: bool = True,
        ignore_index: int = 255,
    ):
        self.image_processor = image_processor
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale = tuple(scale) if scale is not None else (4 * min(self.crop_size), min(self.crop_size))
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.flip_probability = flip_probability
        self.photometric_distortion = PhotoMetricDistortion() if photometric_distortion else None
        self.ignore_index = ignore_index

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """RGB image, `(height, width)` int64 labels -> `(3, crop_h, crop_w)` float32, `(crop_h, crop_w)` int64."""
        new_size = rescale_size(image.width, image.height, random_resize_scale(self.scale, self.ratio_range, rng))
        pixels = resize_image(np.asarray(image.convert("RGB")), new_size)
        label = resize_label(label, new_size)

        top, bottom, left, right = random_crop_box(label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        pixels, label = pixels[top:bottom, left:right], label[top:bottom, left:right]
        if rng.random() < self.flip_probability:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric_distortion is not None:
            pixels = self.photometric_distortion(np.ascontiguousarray(pixels), rng)
        pixel_values = normalize_image(np.ascontiguousarray(pixels), self.image_processor)
        return pad_to_crop(pixel_values, np.ascontiguousarray(label), self.crop_size, self.ignore_index)


class SegmentationEvalTransform:
    """Evaluation preprocessing: the image processor's resize and normalisation; the label map keeps its original
    size (metrics are computed there). `size` is the processor's `size` argument: `{"height", "width"}` for whole
    image inference, `{"shortest_edge", "longest_edge"}` (keep ratio) for sliding-window inference."""

    def __init__(self, image_processor: DToPImageProcessor, size: dict | None = None):
        self.image_processor = image_processor
        self.size = size

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        kwargs = {"size": self.size} if self.size is not None else {}
        # Whole resized images, also for a processor in slide mode: the evaluation loop cuts the windows.
        pixel_values = self.image_processor(images=image, do_split_image=False, return_tensors="np", **kwargs)[
            "pixel_values"
        ][0]
        return pixel_values, label


SampleTransform = Callable[[Image.Image, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


__all__ = [
    "CROP_RETRIES",
    "PhotoMetricDistortion",
    "PhotoMetricDistortionDraw",
    "SampleTransform",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "hsv_to_rgb",
    "normalize_image",
    "pad_to_crop",
    "random_crop_box",
    "random_resize_scale",
    "rescale_size",
    "resize_image",
    "resize_label",
    "rgb_to_hsv",
]
