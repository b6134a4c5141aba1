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
"""The bound on an mIoU drop: per-image class areas, the paired bootstrap, and the calibration choice it limits."""

import pytest
import torch

from dtop_hf.toolkit.evaluation.bootstrap import miou_drop_upper_bound, resample_counts
from dtop_hf.toolkit.evaluation.calibration import choose_threshold
from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU, class_areas, mean_iou_of_areas


def one_class_areas(intersection: float, label: float, prediction: float) -> torch.Tensor:
    """One image's areas for a single class: `(1, 3)`."""
    return torch.tensor([[intersection, label, prediction]], dtype=torch.float64)


def test_summed_image_areas_give_the_data_set_miou():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randint(0, 4, (5, 6, 6), generator=generator)
    labels = torch.randint(0, 4, (5, 6, 6), generator=generator)
    labels[0, 0, 0] = 255  # ignored pixels count nowhere
    metric, per_image = StreamingMeanIoU(num_labels=5), []
    for prediction, label in zip(predictions, labels):
        image = StreamingMeanIoU(num_labels=5)  # class 4 appears nowhere: NaN, left out of the mean
        image.update(prediction, label)
        per_image.append(class_areas(image.confusion))
        metric.update(prediction, label)
    areas = torch.stack(per_image)  # (images, labels, 3)
    assert areas.shape == (5, 5, 3)
    assert float(mean_iou_of_areas(areas.sum(dim=0))) == pytest.approx(metric.compute()["mean_iou"], abs=1e-12)


def test_resamples_draw_every_image_count_times_in_total():
    counts = resample_counts(num_images=7, num_resamples=50, seed=3)
    assert counts.shape == (50, 7) and torch.equal(counts.sum(dim=1), torch.full((50,), 7.0, dtype=torch.float64))
    assert torch.equal(counts, resample_counts(7, 50, seed=3))  # seeded: every setting is judged on the same draws


def test_no_difference_bounds_to_zero_and_identical_images_to_the_measured_drop():
    generator = torch.Generator().manual_seed(1)
    baseline = torch.randint(1, 50, (6, 3, 3), generator=generator).double()
    assert miou_drop_upper_bound(baseline, baseline.clone(), confidence=0.9) == 0.0
    # Every image alike: every resample sums to the same areas, so the bound is the measured drop itself.
    image_baseline, image_setting = one_class_areas(10, 10, 10), one_class_areas(6, 10, 8)
    baseline, setting = image_baseline.expand(4, 1, 3), image_setting.expand(4, 1, 3)
    measured = float(mean_iou_of_areas(baseline.sum(0)) - mean_iou_of_areas(setting.sum(0)))
    assert measured == pytest.approx(1 - 6 / 12)
    assert miou_drop_upper_bound(baseline, setting, confidence=0.9) == pytest.approx(measured, abs=1e-12)


def test_a_loss_in_one_image_of_two_bounds_at_the_worst_resample():
    # Hand-computed: one class, baseline perfect on both images (IoU 1 in every resample). The setting halves image
    # A's intersection and leaves image B alone. Resamples of two images: (A, A) 1/4 of the draws, IoU 10 / 20, drop
    # 0.5; (A, B) 1/2, IoU 15 / 20, drop 0.25 (the measured drop); (B, B) 1/4, drop 0.
    baseline = torch.stack([one_class_areas(10, 10, 10), one_class_areas(10, 10, 10)])
    setting = torch.stack([one_class_areas(5, 10, 5), one_class_areas(10, 10, 10)])
    assert float(mean_iou_of_areas(baseline.sum(0)) - mean_iou_of_areas(setting.sum(0))) == pytest.approx(0.25)
    assert miou_drop_upper_bound(baseline, setting, confidence=0.5) == pytest.approx(0.25)
    assert miou_drop_upper_bound(baseline, setting, confidence=0.9) == pytest.approx(0.5)
    assert miou_drop_upper_bound(baseline, setting, confidence=0.1) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("baseline_shape", "setting_shape", "confidence", "message"),
    [((2, 3, 3), (2, 3, 3), 1.0, "must lie in"), ((2, 3, 3), (3, 3, 3), 0.9, "of one shape")],
)
def test_bad_bound_arguments_raise(baseline_shape, setting_shape, confidence, message):
    with pytest.raises(ValueError, match=message):
        miou_drop_upper_bound(torch.ones(baseline_shape), torch.ones(setting_shape), confidence)


def test_the_budget_limits_the_bound_instead_of_the_measured_drop():
    results = [
        {"exit_threshold": 1.0, "mean_iou": 0.600, "gflops": 10.0},
        {"exit_threshold": 0.8, "mean_iou": 0.598, "gflops": 8.0},
        {"exit_threshold": 0.6, "mean_iou": 0.5975, "gflops": 6.0},  # measured drop 0.25 points: fits 0.3
    ]
    assert choose_threshold(results, max_miou_drop=0.003)["exit_threshold"] == 0.6
    bounds = {1.0: 0.0, 0.8: 0.0028, 0.6: 0.0041}  # but its bound does not

    def drop_bound(result: dict, baseline: dict) -> float:
        assert baseline is results[0]  # measured against the unpruned run
        return bounds[result["exit_threshold"]]

    assert choose_threshold(results, max_miou_drop=0.003, drop_bound=drop_bound)["exit_threshold"] == 0.8
    # A GFLOPs budget reads no drop: the bound changes nothing there.
    assert choose_threshold(results, target_gflops=7.0, drop_bound=drop_bound)["exit_threshold"] == 0.6
