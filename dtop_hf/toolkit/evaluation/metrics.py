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
"""Streaming semantic-segmentation metrics from a confusion matrix (evaluate's `mean_iou` semantics, offline).

`evaluate.load("mean_iou")` needs the Hub. A confusion matrix is all mIoU needs, it is exact, it adds up across
batches and processes (sum the matrices), and it costs one `bincount` per batch. The same metric ships as an
`evaluate` module inside the package ([`load_mean_iou_metric`]), for `transformers.Trainer`'s `compute_metrics`.
"""

from pathlib import Path

import numpy as np
import torch


# `evaluate.load` takes a folder that holds a script of the same name: `mean_iou/mean_iou.py` beside this file.
MEAN_IOU_EVALUATE_PATH = Path(__file__).resolve().parent / "mean_iou"


def as_class_map(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor of class ids from a tensor, an array or anything `np.asarray` reads (a PIL image, nested lists)."""
    return values if torch.is_tensor(values) else torch.from_numpy(np.array(values))


def class_areas(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class pixel counts of confusion matrices: `(..., num_labels, num_labels)` (rows = ground truth) ->
    `(..., num_labels, 3)` float64: intersection, label area, prediction area. Sums of these over images are the
    data set's, so they are all an image contributes to the mIoU (what a bootstrap over images resamples)."""
    confusion = confusion.double()
    return torch.stack([confusion.diagonal(dim1=-2, dim2=-1), confusion.sum(dim=-1), confusion.sum(dim=-2)], dim=-1)


def per_class_iou(areas: torch.Tensor) -> torch.Tensor:
    """IoU per class from [`class_areas`] `(..., num_labels, 3)` -> `(..., num_labels)`, NaN where the union is
    empty (the class is in neither labels nor predictions)."""
    intersection, label_area, prediction_area = areas.unbind(dim=-1)
    union = label_area + prediction_area - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou_of_areas(areas: torch.Tensor) -> torch.Tensor:
    """mIoU from summed class areas `(..., num_labels, 3)` -> `(...)`: the mean over the classes with a non-empty
    union (NaN when there is none)."""
    return per_class_iou(areas).nanmean(dim=-1)


class StreamingMeanIoU:
    """Accumulates a `(num_labels, num_labels)` confusion matrix (rows = ground truth, columns = prediction).

    Matches `evaluate`'s `mean_iou`: pixels labelled `ignore_index` are dropped; per-class IoU = I / U over the
    whole data set; classes with an empty union (absent from labels and predictions) are NaN and left out of
    the mean.

    Example:
        >>> metric = StreamingMeanIoU(num_labels=3)
        >>> metric.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
        >>> metric.compute()["mean_iou"]
        1.0
    """

    def __init__(self, num_labels: int, ignore_index: int = 255):
        if num_labels < 1:
            raise ValueError(f"`num_labels` must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)

    def update(self, predictions: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add a batch: `predictions` and `labels` of the same shape, int class ids (tensors or arrays)."""
        predictions, labels = as_class_map(predictions), as_class_map(labels)
        if predictions.shape != labels.shape:
            raise ValueError(
                f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape."
            )
        predictions, labels = predictions.flatten().long().cpu(), labels.flatten().long().cpu()
        valid = labels != self.ignore_index
        predictions, labels = predictions[valid], labels[valid]
        out_of_range = (labels < 0) | (labels >= self.num_labels)
        if bool(out_of_range.any()):
            raise ValueError(
                f"Label values {torch.unique(labels[out_of_range]).tolist()[:10]} are outside [0, {self.num_labels}) "
                f"and are not the ignore index {self.ignore_index}."
            )
        if bool(((predictions < 0) | (predictions >= self.num_labels)).any()):
            raise ValueError(f"Predictions must lie in [0, {self.num_labels}).")
        self.confusion += torch.bincount(labels * self.num_labels + predictions, minlength=self.num_labels**2).reshape(
            self.num_labels, self.num_labels
        )

    def merge(self, confusion: torch.Tensor) -> None:
        """Add another process's (or shard's) confusion matrix."""
        self.confusion += confusion.to(self.confusion)

    def reset(self) -> None:
        self.confusion.zero_()

    def compute(self) -> dict:
        """`mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`,
        `per_category_accuracy` (lists, NaN for classes without pixels)."""
        areas = class_areas(self.confusion)
        intersection, label_area = areas[:, 0], areas[:, 1]
        iou = per_class_iou(areas)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        accuracy = torch.where(label_area > 0, intersection / label_area.clamp(min=1), nan)
        total = label_area.sum()
        return {
            "mean_iou": float(mean_iou_of_areas(areas)),
            "mean_accuracy": float(accuracy.nanmean()) if bool((label_area > 0).any()) else float("nan"),
            "overall_accuracy": float(intersection.sum() / total) if total > 0 else float("nan"),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
        }


def load_mean_iou_metric(**kwargs):
    """The package's mIoU as an `evaluate` module, offline: `evaluate.load` on the script shipped in the package.

    Same arguments, inputs and outputs as the Hub's `mean_iou` (`compute(predictions=..., references=...,
    num_labels=..., ignore_index=..., reduce_labels=...)` -> `mean_iou`, `mean_accuracy`, `overall_accuracy`,
    `per_category_iou`, `per_category_accuracy`), computed by [`StreamingMeanIoU`].

    Args:
        kwargs: passed to `evaluate.load` (e.g. `experiment_id`, `num_process` / `process_id` for distributed use).
    """
    import evaluate

    return evaluate.load(str(MEAN_IOU_EVALUATE_PATH), **kwargs)


__all__ = [
    "MEAN_IOU_EVALUATE_PATH",
    "StreamingMeanIoU",
    "as_class_map",
    "class_areas",
    "load_mean_iou_metric",
    "mean_iou_of_areas",
    "per_class_iou",
]
