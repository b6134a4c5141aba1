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
"""The training pipeline against written statements of mmseg 1.x's transforms (docs/official_recipes.md, "Data
pipelines").

Each test states the rule it checks, with expected values worked out by hand from that rule, not from the code.
"""

import numpy as np
import pytest
from PIL import Image

from dtop_hf import DToPImageProcessor
from dtop_hf.toolkit.data.transforms import (
    PhotoMetricDistortion,
    PhotoMetricDistortionDraw,
    SegmentationTrainTransform,
    hsv_to_rgb,
    pad_to_crop,
    random_crop_box,
    random_resize_scale,
    rescale_size,
    resize_image,
    resize_label,
    rgb_to_hsv,
)


def draw(brightness=None, contrast_first=True, contrast=None, saturation=None, hue=None) -> PhotoMetricDistortionDraw:
    return PhotoMetricDistortionDraw(brightness, contrast_first, contrast, saturation, hue)


def pixel(*rgb: int) -> np.ndarray:
    """A 1x1 uint8 RGB image."""
    return np.array([[rgb]], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)


def test_random_resize_scales_both_sides_by_one_ratio_in_range():
    """mmcv: ratio ~ U[0.5, 2.0); target (int(2048 * ratio), int(512 * ratio))."""
    rng = np.random.default_rng(0)
    targets = np.array([random_resize_scale((2048, 512), (0.5, 2.0), rng) for _ in range(4000)])
    long_ratio, short_ratio = targets[:, 0] / 2048, targets[:, 1] / 512
    assert long_ratio.min() >= 0.5 - 1 / 2048 and short_ratio.max() < 2.0
    # One ratio for both sides: int() truncation differs by less than one pixel of each side.
    assert np.all(np.abs(long_ratio - short_ratio) < 1 / 512 + 1 / 2048)
    # Uniform over the range: both ends are reached, the mean is the middle.
    assert short_ratio.min() < 0.51 and short_ratio.max() > 1.99
    assert short_ratio.mean() == pytest.approx(1.25, abs=0.03)


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (683, 512, (683, 512)),  # factor min(2048 / 683, 512 / 512) = 1
        (4000, 1000, (2048, 512)),  # min(0.512, 0.512)
        (200, 1000, (410, 2048)),  # portrait: min(2048 / 1000, 512 / 200) = 2.048; 200 * 2.048 = 409.6 -> 410
        (500, 375, (683, 512)),  # min(4.096, 1.3653); 500 * 1.3653 = 682.67 -> 683
    ],
)
def test_keep_ratio_rescale_fits_inside_long_and_short_side(width, height, expected):
    """mmcv `rescale_size`: factor = min(long / max(h, w), short / min(h, w)); sides int(side * factor + 0.5)."""
    assert rescale_size(width, height, (2048, 512)) == expected


def test_image_resize_is_bilinear_with_half_pixel_centres_and_no_antialiasing():
    """OpenCV INTER_LINEAR: output x samples input (x + 0.5) * in / out - 0.5, clamped at the borders."""
    row = np.array([[0, 100]], dtype=np.uint8)[..., None].repeat(3, axis=2)
    # 2 -> 4: samples at -0.25, 0.25, 0.75, 1.25 -> 0, 25, 75, 100.
    assert resize_image(row, (4, 1))[0, :, 0].tolist() == [0, 25, 75, 100]
    # 4 -> 2: samples at 0.5 and 2.5 of [0, 0, 100, 0] -> 0 and 50 (an antialiasing filter would spread the 100).
    row = np.array([[0, 0, 100, 0]], dtype=np.uint8)[..., None].repeat(3, axis=2)
    assert resize_image(row, (2, 1))[0, :, 0].tolist() == [0, 50]


def test_label_resize_is_nearest_with_floor_rule():
    """OpenCV INTER_NEAREST: output x takes input floor(x * in / out) (PIL's NEAREST would take pixel centres)."""
    labels = np.array([[10, 20]])
    assert resize_label(labels, (5, 1)).tolist() == [[10, 10, 10, 20, 20]]  # floor(x * 0.4): 0, 0, 0, 1, 1
    labels = np.array([[0, 1, 2, 3, 4, 5]])
    assert resize_label(labels, (4, 1)).tolist() == [[0, 1, 3, 4]]  # floor(x * 1.5): 0, 1, 3, 4


# ---------------------------------------------------------------------------------------------------------------
# RandomCrop(crop_size, cat_max_ratio=0.75)


def crop_draws(seed: int, margins: tuple[int, int], count: int) -> list[tuple[int, int]]:
    """The (top, left) boxes a generator seeded `seed` draws, top then left, each uniform in [0, margin]."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, margins[0] + 1)), int(rng.integers(0, margins[1] + 1))) for _ in range(count)]


def test_crop_box_is_uniform_and_inside_the_image():
    label = np.arange(20 * 30).reshape(20, 30)  # every pixel its own class: every box is accepted
    boxes = [random_crop_box(label, (8, 12), np.random.default_rng(seed)) for seed in range(500)]
    tops, lefts = {box[0] for box in boxes}, {box[2] for box in boxes}
    assert tops == set(range(0, 13)) and lefts == set(range(0, 19))  # margins 12 and 18, both ends included
    assert all(bottom - top == 8 and right - left == 12 for top, bottom, left, right in boxes)
    # A crop larger than the image starts at 0 and is cut by the image border when sliced.
    assert random_crop_box(np.zeros((5, 6)), (8, 8), np.random.default_rng(0))[::2] == (0, 0)


def test_crop_without_cat_max_ratio_is_the_first_draw():
    label = np.zeros((20, 30), dtype=np.int64)  # one class: would always be rejected
    for seed in range(20):
        top, _, left, _ = random_crop_box(label, (8, 12), np.random.default_rng(seed), cat_max_ratio=1.0)
        assert (top, left) == crop_draws(seed, (12, 18), 1)[0]


def test_crop_with_one_class_is_redrawn_ten_times_then_the_eleventh_draw_is_kept():
    """mmseg: a box is checked at most 10 times; after the 10th rejection a new box is drawn and used unchecked.
    Class 0 plus ignored pixels is one class (255 is not counted), so every check rejects."""
    label = np.zeros((20, 30), dtype=np.int64)
    label[::2] = 255
    for seed in range(20):
        top, _, left, _ = random_crop_box(label, (8, 12), np.random.default_rng(seed), cat_max_ratio=0.75)
        assert (top, left) == crop_draws(seed, (12, 18), 11)[10]


@pytest.mark.parametrize("largest_share, num_checks", [(0.70, 1), (0.75, 11)])
def test_crop_acceptance_is_a_strict_share_below_cat_max_ratio(largest_share, num_checks):
    """Accepted when more than one class is in the crop and max(count) / sum(count) < 0.75 (strict): a crop whose
    largest class covers exactly 75% is rejected. The crop is the whole image, so only the draw count tells."""
    label = np.ones(100, dtype=np.int64)
    label[: int(largest_share * 100)] = 0
    label = label.reshape(10, 10)
    rng = np.random.default_rng(3)
    random_crop_box(label, (10, 10), rng, cat_max_ratio=0.75)
    reference = np.random.default_rng(3)
    reference.integers(0, 1, size=2 * num_checks)  # each box is two draws (top, left)
    assert rng.random() == reference.random()


def test_crop_retry_rule_frequency():
    """With a share p of acceptable positions, the returned box is acceptable with probability 1 - (1 - p)^11
    (10 checked draws, then one unchecked draw that is acceptable with probability p)."""
    label = np.zeros((8, 40), dtype=np.int64)
    label[:, 36:] = 1  # crops 8x8: left in [0, 32]; acceptable iff they hold >= 3 columns of class 1 (left >= 31)
    acceptable_lefts = {left for left in range(33) if min(max(left + 8 - 36, 0), 4) / 8 > 0.25}
    p = len(acceptable_lefts) / 33
    boxes = [random_crop_box(label, (8, 8), np.random.default_rng(seed)) for seed in range(3000)]
    share = np.mean([box[2] in acceptable_lefts for box in boxes])
    assert share == pytest.approx(1 - (1 - p) ** 11, abs=0.03)


# ---------------------------------------------------------------------------------------------------------------
# PhotoMetricDistortion (mmseg defaults)


def test_distortion_draws_each_step_with_probability_one_half_in_mmseg_ranges():
    distortion, rng = PhotoMetricDistortion(), np.random.default_rng(0)
    draws = [distortion.sample(rng) for _ in range(4000)]
    for name in ("brightness_delta", "contrast_factor", "saturation_factor", "hue_delta"):
        assert np.mean([getattr(d, name) is not None for d in draws]) == pytest.approx(0.5, abs=0.03), name
    assert np.mean([d.contrast_first for d in draws]) == pytest.approx(0.5, abs=0.03)
    brightness = [d.brightness_delta for d in draws if d.brightness_delta is not None]
    assert -32 <= min(brightness) < -31 and 31 < max(brightness) <= 32
    for name in ("contrast_factor", "saturation_factor"):
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert 0.5 <= min(values) < 0.51 and 1.49 < max(values) < 1.5
    # numpy's randint(-18, 18): integers from -18 to 17.
    assert {d.hue_delta for d in draws if d.hue_delta is not None} == set(range(-18, 18))


def test_brightness_and_contrast_clip_and_truncate_to_uint8():
    """`convert`: uint8(clip(x * alpha + beta, 0, 255)): truncation, not rounding."""
    distortion = PhotoMetricDistortion()
    image = np.array([[[250, 100, 5]]], dtype=np.uint8)
    assert distortion.apply(image, draw(brightness=10.7)).tolist() == [[[255, 110, 15]]]
    assert distortion.apply(image, draw(brightness=-10.7)).tolist() == [[[239, 89, 0]]]
    assert distortion.apply(image, draw(contrast=1.26)).tolist() == [[[255, 126, 6]]]


def test_brightness_comes_before_contrast():
    """200 + 100 clips to 255, then x0.5 -> 127 (contrast first would give 200 * 0.5 + 100 = 200)."""
    distortion = PhotoMetricDistortion()
    for contrast_first in (True, False):
        steps = draw(brightness=100.0, contrast_first=contrast_first, contrast=0.5)
        result = distortion.apply(pixel(200, 200, 200), steps)
        assert result.tolist() == [[[127, 127, 127]]]


def test_contrast_comes_before_or_after_the_colour_steps_as_drawn():
    """(250, 125, 125), contrast x2, saturation x0.5.
    First: (255, 250, 250), S = round(255 * 5 / 255) = 5 -> 2, back: 255 * (1 - 2/255) = 253 -> (255, 253, 253).
    Last: S = round(255 * 125 / 250) = 128 -> 64, back: 250 * (1 - 64/255) = 187.3 -> (250, 187, 187), then x2 clips
    to (255, 255, 255)."""
    distortion = PhotoMetricDistortion()
    first = distortion.apply(pixel(250, 125, 125), draw(contrast_first=True, contrast=2.0, saturation=0.5))
    last = distortion.apply(pixel(250, 125, 125), draw(contrast_first=False, contrast=2.0, saturation=0.5))
    assert np.abs(first.astype(int) - [255, 253, 253]).max() <= 1
    assert last.tolist() == [[[255, 255, 255]]]


def test_saturation_scales_s_in_opencv_hsv():
    """(200, 100, 100): V = 200, S = round(255 * 100 / 200) = 128; x1.5 -> 192; min = 200 * (1 - 192/255) = 49.4."""
    result = PhotoMetricDistortion().apply(pixel(200, 100, 100), draw(saturation=1.5))
    assert np.abs(result.astype(int) - [200, 49, 49]).max() <= 1


@pytest.mark.parametrize("delta, expected", [(10, (255, 85, 0)), (-10, (255, 0, 85)), (0, (255, 0, 0))])
def test_hue_shifts_h_modulo_180(delta, expected):
    """Pure red has H = 0 (OpenCV's 8-bit H = degrees / 2): +10 is 20 degrees -> (255, 85, 0); -10 wraps to H = 170,
    340 degrees -> (255, 0, 85)."""
    result = PhotoMetricDistortion().apply(pixel(255, 0, 0), draw(hue=delta))
    assert np.abs(result.astype(int) - expected).max() <= 1


def test_hsv_follows_opencv_8bit_convention():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0], [128, 128, 128]]], np.uint8)
    expected = [[0, 255, 255], [60, 255, 255], [120, 255, 255], [30, 255, 255], [0, 0, 0], [0, 0, 128]]
    assert rgb_to_hsv(colours)[0].tolist() == expected
    random_colours = np.random.default_rng(0).integers(0, 256, (1, 500, 3)).astype(np.uint8)
    round_trip = hsv_to_rgb(rgb_to_hsv(random_colours)).astype(int)
    # 8-bit H steps of 2 degrees move a colour by at most 255 * 2 / 60 / 2 = 4.25 levels.
    assert np.abs(round_trip - random_colours.astype(int)).max() <= 5


# ---------------------------------------------------------------------------------------------------------------
# Padding (SegDataPreProcessor pad_val=0, seg_pad_val=255) and the whole pipeline


def test_padding_is_bottom_right_with_zero_image_and_ignored_labels():
    pixel_values, label = pad_to_crop(np.ones((3, 2, 3), np.float32), np.zeros((2, 3), np.int64), (4, 5))
    assert pixel_values.shape == (3, 4, 5) and label.shape == (4, 5)
    assert (pixel_values[:, :2, :3] == 1).all()
    assert pixel_values[:, 2:].sum() == 0 and pixel_values[:, :, 3:].sum() == 0
    assert (label[:2, :3] == 0).all() and (label[2:] == 255).all() and (label[:, 3:] == 255).all()


def test_train_transform_resizes_into_the_official_scale_before_cropping():
    """A 300x100 image with scale (128, 32) and crop 32: after RandomResize the short side lies in [16, 64) and the
    long side within 128 * ratio, so a 32 crop is padded exactly when the resized short side is under 32."""
    processor = DToPImageProcessor()
    transform = SegmentationTrainTransform(processor, 32, scale=(128, 32), photometric_distortion=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 300, 3), dtype=np.uint8))
    labels = np.tile(np.arange(6).repeat(50), (100, 1))
    padded_counts = []
    for seed in range(40):
        pixel_values, label = transform(image, labels, np.random.default_rng(seed))
        assert pixel_values.shape == (3, 32, 32) and label.shape == (32, 32)
        padded_rows = int((label == 255).all(axis=1).sum())
        padded_counts.append(padded_rows)
        # Reproduce the resize from the same seed: the first draw of the generator is the ratio.
        ratio = np.random.default_rng(seed).random() * 1.5 + 0.5
        new_width, new_height = rescale_size(300, 100, (int(128 * ratio), int(32 * ratio)))
        assert padded_rows == max(32 - new_height, 0)
    assert min(padded_counts) == 0 and max(padded_counts) > 0
