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
"""Tests for the streaming mIoU metric: hand-computed confusion matrix, ignore index, absent classes, torchmetrics;
and for the same metric as an `evaluate` module (the Hub's `mean_iou` interface, loaded offline from the package)."""

import math

import numpy as np
import pytest
import torch

from dtop_hf.toolkit.evaluation.metrics import MEAN_IOU_EVALUATE_PATH, StreamingMeanIoU, load_mean_iou_metric


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


def random_segmentations(num_labels: int, sizes: list[tuple[int, int]], seed: int = 0, ignore_share: float = 0.1):
    """Predictions and labels of several sizes: mostly right, some pixels ignored (255), every class present."""
    generator = np.random.default_rng(seed)
    predictions, labels = [], []
    for height, width in sizes:
        label = generator.integers(0, num_labels, (height, width))
        label[generator.random((height, width)) < ignore_share] = 255
        noise = generator.integers(0, num_labels, (height, width))
        prediction = np.where(generator.random((height, width)) < 0.6, np.minimum(label, num_labels - 1), noise)
        predictions.append(prediction)
        labels.append(label)
    return predictions, labels


def test_evaluate_module_loads_from_the_package_offline_and_matches_the_hub_example():
    assert (MEAN_IOU_EVALUATE_PATH / "mean_iou.py").is_file()
    metric = load_mean_iou_metric()
    # The example of the Hub's `mean_iou` card, with the values it documents.
    predictions = [
        np.array([[1, 2], [3, 4], [5, 255]]),
        np.array([[2, 7], [9, 2], [3, 6]]),
        np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
    ]
    references = [
        np.array([[0, 3], [5, 4], [6, 255]]),
        np.array([[1, 7], [9, 2], [3, 6]]),
        np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
    ]
    result = metric.compute(
        predictions=predictions, references=references, num_labels=10, ignore_index=255, reduce_labels=False
    )
    assert set(result) == {
        "mean_iou",
        "mean_accuracy",
        "overall_accuracy",
        "per_category_iou",
        "per_category_accuracy",
    }
    assert result["mean_iou"] == pytest.approx(0.4775)
    assert result["mean_accuracy"] == pytest.approx(0.5916666666666666)
    assert result["overall_accuracy"] == pytest.approx(0.5263157894736842)
    assert isinstance(result["per_category_iou"], np.ndarray)
    np.testing.assert_allclose(result["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])


def test_evaluate_module_equals_the_streaming_metric_and_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics", reason="torchmetrics is an optional reference")
    num_labels = 7
    predictions, labels = random_segmentations(num_labels, [(16, 24), (20, 20), (9, 31), (32, 8)], seed=3)
    module = load_mean_iou_metric()
    module.add_batch(predictions=predictions[:2], references=labels[:2])  # streamed in two batches
    module.add_batch(predictions=[torch.from_numpy(p) for p in predictions[2:]], references=labels[2:])
    result = module.compute(num_labels=num_labels, ignore_index=255)

    streaming = StreamingMeanIoU(num_labels)
    reference = torchmetrics.classification.MulticlassJaccardIndex(
        num_classes=num_labels, average="none", ignore_index=255
    )
    for prediction, label in zip(predictions, labels, strict=True):
        streaming.update(torch.from_numpy(prediction), torch.from_numpy(label))
        reference.update(torch.from_numpy(prediction)[None], torch.from_numpy(label)[None])
    expected = streaming.compute()
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert result[key] == expected[key], key
    assert result["per_category_iou"].tolist() == expected["per_category_iou"]
    assert result["per_category_accuracy"].tolist() == expected["per_category_accuracy"]
    np.testing.assert_allclose(result["per_category_iou"], reference.compute().numpy(), atol=1e-6)
    assert result["mean_iou"] == pytest.approx(float(reference.compute().mean()), abs=1e-6)


def test_evaluate_module_reduce_labels_label_map_nan_to_num_and_many_classes():
    num_labels = 300  # more than 255 classes: maps are stored as 16-bit images
    predictions, labels = random_segmentations(num_labels, [(12, 12), (10, 14)], seed=4, ignore_share=0.0)
    labels = [label + 1 for label in labels]  # ADE20K style: 0 = unlabelled, classes 1..num_labels
    labels[0][:2] = 0
    result = load_mean_iou_metric().compute(
        predictions=predictions, references=labels, num_labels=num_labels, ignore_index=255, reduce_labels=True
    )
    streaming = StreamingMeanIoU(num_labels)
    for prediction, label in zip(predictions, labels, strict=True):
        streaming.update(prediction, np.where(label == 0, 255, label - 1))  # 0 -> ignored, k -> k - 1
    assert result["mean_iou"] == streaming.compute()["mean_iou"]

    # label_map (applied first, on the original ids) and nan_to_num (absent classes 3 and 4 become 0, not NaN).
    result = load_mean_iou_metric().compute(
        predictions=[np.array([[0, 1], [2, 2]])],
        references=[np.array([[7, 1], [2, 2]])],
        num_labels=5,
        ignore_index=255,
        label_map={7: 0},
        nan_to_num=0,
    )
    assert result["mean_iou"] == pytest.approx(3 / 3)
    assert result["per_category_iou"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
