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
"""Tests for the streaming mIoU metric: hand-computed confusion matrix, ignore index, absent classes, torchmetrics."""

import math

import pytest
import torch

from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU


def test_hand_computed_confusion_matrix():
    # 4 classes; class 3 appears in neither labels nor predictions; two pixels are ignored.
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    metric = StreamingMeanIoU(num_labels=4)
    metric.update(predictions, labels)
    # rows = ground truth, columns = prediction; the ignored pixels (predicted 3 and 0) are dropped.
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(metric.confusion, expected)
    result = metric.compute()
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 1/2.
    expected_iou = [1 / 3, 2 / 3, 1 / 2]
    assert result["per_category_iou"][:3] == pytest.approx(expected_iou)
    assert math.isnan(result["per_category_iou"][3])  # absent: NaN, left out of the mean
    assert result["mean_iou"] == pytest.approx(sum(expected_iou) / 3)
    assert result["per_category_accuracy"][:3] == pytest.approx([1 / 2, 2 / 2, 1 / 2])
    assert result["overall_accuracy"] == pytest.approx(4 / 6)
    assert result["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_class_only_predicted_counts_as_zero_iou():
    # Class 2 is never in the labels but predicted: its union is not empty, so IoU 0 enters the mean.
    metric = StreamingMeanIoU(num_labels=3)
    metric.update(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1]))
    result = metric.compute()
    assert result["per_category_iou"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert result["mean_iou"] == pytest.approx(0.5)
    assert math.isnan(result["per_category_accuracy"][2])


def test_everything_ignored_gives_nan():
    metric = StreamingMeanIoU(num_labels=3)
    metric.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(metric.compute()["mean_iou"])


def test_matches_torchmetrics_with_all_classes_present():
    torchmetrics = pytest.importorskip("torchmetrics", reason="torchmetrics is an optional reference")
    generator = torch.Generator().manual_seed(0)
    num_labels = 6
    labels = torch.randint(0, num_labels, (4, 16, 16), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = 255
    # Mostly right predictions, so IoUs are spread out rather than all near 1 / num_labels.
    predictions = torch.where(
        torch.rand(labels.shape, generator=generator) < 0.6,
        labels.clamp(max=num_labels - 1),
        torch.randint(0, num_labels, labels.shape, generator=generator),
    )
    metric = StreamingMeanIoU(num_labels=num_labels)
    reference = torchmetrics.classification.MulticlassJaccardIndex(
        num_classes=num_labels, average="macro", ignore_index=255
    )
    for batch_predictions, batch_labels in zip(predictions, labels, strict=True):
        metric.update(batch_predictions, batch_labels)
        reference.update(batch_predictions, batch_labels)
    assert metric.compute()["mean_iou"] == pytest.approx(float(reference.compute()), abs=1e-6)


def test_merge_of_two_halves_equals_whole():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (6, 8, 8), generator=generator)
    labels[:, 0] = 255
    predictions = torch.randint(0, 5, (6, 8, 8), generator=generator)
    whole, first, second = StreamingMeanIoU(5), StreamingMeanIoU(5), StreamingMeanIoU(5)
    whole.update(predictions, labels)
    first.update(predictions[:2], labels[:2])
    second.update(predictions[2:], labels[2:])
    first.merge(second.confusion)
    assert torch.equal(first.confusion, whole.confusion)
    merged_result, whole_result = first.compute(), whole.compute()
    assert merged_result["mean_iou"] == whole_result["mean_iou"]
    assert merged_result["per_category_iou"] == whole_result["per_category_iou"]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_labels"):
        StreamingMeanIoU(num_labels=0)
    metric = StreamingMeanIoU(num_labels=3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="Predictions"):
        metric.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
