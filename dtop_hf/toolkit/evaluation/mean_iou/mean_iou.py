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
"""Mean IoU as an `evaluate` module that loads offline, computed by dtop-hf's streaming confusion matrix.

`evaluate.load(<this folder>)` (or `dtop_hf.toolkit.evaluation.metrics.load_mean_iou_metric()`) gives a metric with
the Hub's `mean_iou` interface: `add_batch` / `compute` with `predictions` and `references` (class-id maps, one
per image, any size), `num_labels`, `ignore_index`, `nan_to_num`, `label_map`, `reduce_labels`, and the same
output keys. The numbers come from `StreamingMeanIoU`, the metric the example scripts use, so Trainer runs and
`examples/run_evaluation.py` agree exactly.

`evaluate` copies this script into its module cache and imports it from there: only absolute imports of
installed packages work here (no relative import).
"""

import datasets
import evaluate
import numpy as np

from dtop_hf.toolkit.data.datasets import reduce_labels as reduce_zero_label
from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU


_DESCRIPTION = """\
IoU is the area of overlap between the predicted segmentation and the ground truth divided by their area of union.
Per class, intersections and unions are summed over the whole data set; the mean IoU averages the classes that
appear in the labels or the predictions. The same as the Hub's `mean_iou`, computed from a confusion matrix.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[ndarray]`): predicted class-id maps, each of shape (height, width); sizes may differ.
    references (`list[ndarray]`): ground-truth class-id maps, each the size of its prediction.
    num_labels (`int`): number of classes.
    ignore_index (`int`): label value left out of the evaluation (255 for ADE20K-style data).
    nan_to_num (`int`, *optional*): replaces NaN (classes absent from labels and predictions) in every output.
    label_map (`dict`, *optional*): old label id -> new label id, applied to the references first.
    reduce_labels (`bool`, *optional*, defaults to `False`): references' 0 becomes 255 and every other id k
        becomes k - 1 (ADE20K's "0 = unlabelled"), as in the Hub's `mean_iou`.

Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats), `per_category_iou` and `per_category_accuracy`
    (`ndarray` of shape `(num_labels,)`, NaN for classes without pixels).

Example:
    >>> metric = evaluate.load("path/to/dtop_hf/toolkit/evaluation/mean_iou")
    >>> metric.compute(predictions=[np.array([[0, 1], [2, 2]])], references=[np.array([[0, 1], [2, 255]])],
    ...                num_labels=3, ignore_index=255)["mean_iou"]
    1.0
"""

# Label values stored as 8-bit (or 16-bit) images: `evaluate` keeps its inputs in an Arrow file until `compute`,
# and PNG-encoded maps are small; int64 maps would be downcast by `datasets` with a warning anyway.
_UINT8_MAX, _UINT16_MAX = 255, 65535


def _compact_map(class_map) -> np.ndarray:
    """A class-id map in the smallest unsigned type that holds it (values are kept as they are)."""
    class_map = np.asarray(class_map)
    if class_map.size == 0 or class_map.dtype.kind not in "iub" or class_map.min() < 0:
        return class_map
    largest = class_map.max()
    if largest <= _UINT8_MAX:
        return class_map.astype(np.uint8)
    return class_map.astype(np.uint16) if largest <= _UINT16_MAX else class_map


def _compact_maps(class_maps):
    return None if class_maps is None else [_compact_map(class_map) for class_map in class_maps]


def _map_references(reference: np.ndarray, label_map: dict | None, reduce_labels: bool) -> np.ndarray:
    """The Hub's order: `label_map` first (on the original ids), then `reduce_labels` (0 -> 255, k -> k - 1)."""
    reference = np.asarray(reference).astype(np.int64)
    if label_map is not None:
        original = reference.copy()
        for old_id, new_id in label_map.items():
            reference[original == int(old_id)] = new_id
    if reduce_labels:
        reference = reduce_zero_label(reference, ignore_index=255)
    return reference


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of class-id maps (stored compactly until `compute`)."""
        super().add_batch(predictions=_compact_maps(predictions), references=_compact_maps(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one class-id map and its reference (stored compactly until `compute`)."""
        prediction = None if prediction is None else _compact_map(prediction)
        reference = None if reference is None else _compact_map(reference)
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: int | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        metric = StreamingMeanIoU(num_labels, ignore_index=ignore_index)
        for prediction, reference in zip(predictions, references, strict=True):
            metric.update(np.asarray(prediction), _map_references(reference, label_map, reduce_labels))
        scores = metric.compute()
        result = {
            "mean_iou": scores["mean_iou"],
            "mean_accuracy": scores["mean_accuracy"],
            "overall_accuracy": scores["overall_accuracy"],
            "per_category_iou": np.array(scores["per_category_iou"], dtype=np.float64),
            "per_category_accuracy": np.array(scores["per_category_accuracy"], dtype=np.float64),
        }
        if nan_to_num is not None:
            result = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in result.items()}
        return result
