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
"""A training stage's data: checked train / validation splits, and their loaders (the official augmentation for
training, full-size labels for evaluation)."""

from dataclasses import dataclass
from functools import partial

import datasets
import torch
from torch.utils.data import DataLoader
from transformers.utils import logging

from dtop_hf import DToPImageProcessor

from ..data.datasets import (
    SegmentationDataset,
    build_eval_dataset,
    check_segmentation_split,
    collate_segmentation_batch,
    load_segmentation_dataset,
)
from ..data.transforms import SegmentationTrainTransform


logger = logging.get_logger(__name__)

IGNORE_INDEX = 255


@dataclass
class TrainAugmentation:
    """The official training augmentation (mmseg's): random resize around `scale` by a ratio in `ratio_range`,
    random crop (redrawn while one class covers more than `cat_max_ratio`), flip, photometric distortion.

    Args:
        scale: RandomResize base scale (long, short); default: 4 x crop, crop.
        ratio_range: RandomResize ratio range.
        cat_max_ratio: in (0, 1]; 1.0 = plain random crops.
        photometric_distortion: mmseg's PhotoMetricDistortion.
    """

    scale: tuple[int, int] | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric_distortion: bool = True

    def __post_init__(self):
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ValueError(
                f"`cat_max_ratio` must lie in (0, 1] (1.0 = plain random crops), got {self.cat_max_ratio}."
            )


def load_training_splits(
    dataset_kwargs: dict,
    num_train_samples: int,
    num_validation_samples: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    do_reduce_labels: bool = True,
    check: bool = True,
    show_progress: bool = True,
) -> tuple[dict[str, datasets.Dataset], dict[int, str]]:
    """Train and validation splits, limited to the first `max_*_samples` and (with `check`) decoded and checked
    (unreadable, unlabelled or out-of-range samples skipped and counted), and the classes.

    Args:
        dataset_kwargs: `load_segmentation_dataset` keywords (`DataArguments.load_kwargs()`): the data set and how to
            read it.
        num_train_samples, num_validation_samples: images of the built-in data set (capped by the limits, so that
            what is not used is not generated).
        max_train_samples, max_eval_samples: use only the first N samples of each split.
        do_reduce_labels: whether label 0 means unlabelled (checked against the classes accordingly).
        check: decode and check every sample first.
        show_progress: a progress bar for the check (the main process's).
    """
    if max_train_samples is not None:
        num_train_samples = min(num_train_samples, max_train_samples)
    if max_eval_samples is not None:
        num_validation_samples = min(num_validation_samples, max_eval_samples)
    dataset, id2label = load_segmentation_dataset(
        num_train_samples=num_train_samples, num_validation_samples=num_validation_samples, **dataset_kwargs
    )
    splits = {}
    for split_name, max_samples in (("train", max_train_samples), ("validation", max_eval_samples)):
        split = dataset[split_name]
        if max_samples is not None:
            split = split.select(range(min(max_samples, len(split))))
        if check:
            split, report = check_segmentation_split(
                split, split_name, len(id2label), do_reduce_labels, show_progress=show_progress
            )
            logger.info(f"Checked {report.num_checked} {split_name} samples, skipped {report.num_skipped}.")
        splits[split_name] = split
    return splits, id2label


def build_training_dataloaders(
    splits: dict[str, datasets.Dataset],
    image_processor: DToPImageProcessor,
    num_labels: int,
    crop_size: int,
    per_device_train_batch_size: int,
    per_device_eval_batch_size: int,
    seed: int,
    do_reduce_labels: bool = True,
    augmentation: TrainAugmentation | None = None,
    sliding_window: bool = False,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Training batches (the augmentation, crops of `crop_size`) and evaluation batches (labels at full size; the
    processor's crop and label reduction, slide windows with `sliding_window`).

    Both loaders get their own generator seeded with `seed`, so that creating them never draws from the global torch
    generator: a resumed run then sees the same dropout draws as an uninterrupted one.
    """
    augmentation = augmentation or TrainAugmentation()
    train_dataset = SegmentationDataset(
        splits["train"],
        SegmentationTrainTransform(
            image_processor,
            crop_size,
            scale=augmentation.scale,
            ratio_range=tuple(augmentation.ratio_range),
            cat_max_ratio=augmentation.cat_max_ratio,
            photometric_distortion=augmentation.photometric_distortion,
            ignore_index=IGNORE_INDEX,
        ),
        num_labels,
        do_reduce_labels,
        split_name="train",
        seed=seed,
    )
    eval_dataset = build_eval_dataset(splits["validation"], image_processor, num_labels, sliding_window)
    common = {"collate_fn": partial(collate_segmentation_batch, ignore_index=IGNORE_INDEX), "num_workers": num_workers}
    train_dataloader = DataLoader(
        train_dataset,
        shuffle=True,
        batch_size=per_device_train_batch_size,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    eval_dataloader = DataLoader(
        eval_dataset, batch_size=per_device_eval_batch_size, generator=torch.Generator().manual_seed(seed), **common
    )
    return train_dataloader, eval_dataloader
