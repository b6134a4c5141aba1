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
"""The data of an evaluation: the evaluated split and the calibration images, checked, and their data loaders.

The calibration images are never the evaluated ones: a separate split, the built-in data set's own calibration
scenes, or images drawn from `train`.
"""

from functools import partial

import datasets
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from ...image_processing_dtop import DToPImageProcessor
from ..arguments import DataArguments
from ..data.datasets import (
    BUILTIN_NAMES,
    SegmentationDataset,
    build_eval_dataset,
    check_segmentation_split,
    collate_segmentation_batch,
    load_segmentation_dataset,
)
from ..data.synthetic_scenes import make_synthetic_scenes


logger = get_logger(__name__)


def check_label_spaces(model_config, id2label: dict[int, str], dataset_name: str) -> None:
    """The model must predict the data set's classes: same number (else a ValueError), and a warning when the names
    differ."""
    if len(id2label) != model_config.num_labels:
        raise ValueError(
            f"The model predicts {model_config.num_labels} classes but the data set {dataset_name!r} has "
            f"{len(id2label)} ({list(id2label.values())[:5]}...). Evaluate on the data set the model was trained "
            "for, pass `--id2label` with the model's classes, or fine-tune the model on this data set first."
        )
    model_names = [str(model_config.id2label.get(index, "")) for index in range(model_config.num_labels)]
    data_names = [str(id2label[index]) for index in sorted(id2label)]
    if model_names != data_names:
        logger.warning(
            f"The model's class names differ from the data set's (e.g. {model_names[:3]} vs {data_names[:3]}): "
            "evaluating by class id."
        )


def usable_samples(
    split: datasets.Dataset,
    split_name: str,
    data_args: DataArguments,
    num_labels: int,
    do_reduce_labels: bool,
    show_progress: bool = False,
) -> datasets.Dataset:
    """`split` checked (unless `data_args.skip_data_check`): unreadable or unlabelled samples skipped; a ValueError
    when none is left."""
    if not data_args.skip_data_check and len(split):
        split, _ = check_segmentation_split(
            split, split_name, num_labels, do_reduce_labels, show_progress=show_progress
        )
    if len(split) == 0:
        raise ValueError(
            f"The {split_name!r} split of {data_args.dataset_name!r} has no usable sample (empty, or every sample "
            "was skipped as unreadable or unlabelled): nothing to evaluate."
        )
    return split


def load_evaluation_split(
    data_args: DataArguments, split_name: str, model_config, do_reduce_labels: bool, accelerator: Accelerator
) -> tuple[datasets.Dataset, dict[int, str]]:
    """The split to evaluate (limited to `data_args.max_eval_samples`, checked) and the data set's `id2label`."""
    num_validation = data_args.synthetic_validation_samples
    if data_args.max_eval_samples is not None:
        num_validation = min(num_validation, data_args.max_eval_samples)
    with accelerator.main_process_first():  # the built-in data set is generated (and cached) once
        dataset, id2label = load_segmentation_dataset(
            num_train_samples=1 if split_name == "validation" else num_validation,
            num_validation_samples=num_validation,
            **data_args.load_kwargs(),
        )
    check_label_spaces(model_config, id2label, data_args.dataset_name)
    split = dataset[split_name]
    if data_args.max_eval_samples is not None:
        split = split.select(range(min(data_args.max_eval_samples, len(split))))
    show_progress = accelerator.is_local_main_process
    return usable_samples(split, split_name, data_args, len(id2label), do_reduce_labels, show_progress), id2label


def load_calibration_split(
    data_args: DataArguments,
    split_name: str | None,
    num_samples: int,
    num_labels: int,
    do_reduce_labels: bool,
    accelerator: Accelerator,
) -> tuple[datasets.Dataset, str]:
    """The images the exit settings are calibrated on (never the evaluated split) and a description of them.

    `split_name` when given; else, for the built-in data set, `num_samples` scenes generated for calibration (the
    generator's own stream, apart from its train and validation scenes); else that many images drawn at random
    (seeded by `data_args.data_seed`) from `train`.
    """
    show_progress = accelerator.is_local_main_process
    if split_name is None and data_args.dataset_name in BUILTIN_NAMES:
        split = make_synthetic_scenes(
            num_samples, image_size=data_args.synthetic_image_size, seed=data_args.data_seed, split="calibration"
        )
        description = f"{len(split)} generated calibration scenes (none of them in the train or validation split)"
        return usable_samples(
            split, "calibration", data_args, num_labels, do_reduce_labels, show_progress
        ), description
    drawn_from = split_name or "train"
    with accelerator.main_process_first():
        dataset, _ = load_segmentation_dataset(
            num_train_samples=num_samples,
            num_validation_samples=data_args.synthetic_validation_samples,
            **data_args.load_kwargs(),
        )
    if drawn_from not in dataset:
        raise ValueError(
            f"`--calibration_split` {drawn_from!r} is not a split of {data_args.dataset_name!r} (it has "
            f"{list(dataset)})."
        )
    split = dataset[drawn_from]
    if split_name is None:
        split = split.shuffle(seed=data_args.data_seed)
        logger.warning(
            f"Calibrating on {min(num_samples, len(split))} images drawn from 'train': if the model was trained on "
            "them, its exit settings fit them better than new images. Pass `--calibration_split` with images the "
            "model has not seen when the data set has some."
        )
    split = split.select(range(min(num_samples, len(split))))
    description = f"{len(split)} images of the {drawn_from!r} split of {data_args.dataset_name!r}"
    return usable_samples(split, drawn_from, data_args, num_labels, do_reduce_labels, show_progress), description


def evaluation_dataloader(
    split: datasets.Dataset,
    image_processor: DToPImageProcessor,
    config,
    accelerator: Accelerator,
    batch_size: int,
    num_workers: int = 0,
    split_name: str = "eval",
) -> tuple[SegmentationDataset, DataLoader]:
    """The evaluation transform of `split` (slide mode when the processor is in it) and its data loader, prepared
    (sharded between the processes) by `accelerator`."""
    dataset = build_eval_dataset(split, image_processor, config.num_labels, False, split_name=split_name)
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=partial(collate_segmentation_batch, ignore_index=config.semantic_loss_ignore_index),
        num_workers=num_workers,
    )
    return dataset, accelerator.prepare(dataloader)


__all__ = [
    "check_label_spaces",
    "evaluation_dataloader",
    "load_calibration_split",
    "load_evaluation_split",
    "usable_samples",
]
