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
"""Command-line flags the example scripts share, and their translation into the toolkit's keyword arguments.

The scripts import this module as `from arguments import ...` (it sits next to them, so it is on `sys.path` when a
script runs). The library itself parses no command line: these helpers only turn flags into keyword arguments.
"""

import argparse
from collections.abc import Iterable

import datasets

from dtop_hf.toolkit.data.datasets import load_segmentation_dataset
from dtop_hf.toolkit.data.layouts import ACCEPTED_FOLDER_LAYOUTS


# `load_segmentation_dataset` keyword -> the flag of `add_dataset_arguments` (attribute of `args`) that sets it.
DATASET_KEYWORD_FLAGS = {
    "dataset_config_name": "dataset_config_name",
    "id2label_file": "id2label",
    "image_column": "image_column_name",
    "annotation_column": "label_column_name",
    "validation_split_percentage": "validation_split_percentage",
    "image_size": "synthetic_image_size",
    "seed": "data_seed",
    "cache_dir": "cache_dir",
}


def add_dataset_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    dataset_name_default: str | None = None,
    do_reduce_labels_default: bool | None = True,
    seed_flag: str = "--data_seed",
) -> None:
    """Add the data-set flags the example scripts share to `parser` (or an argument group).

    Args:
        parser: where the flags go.
        dataset_name_default: `--dataset_name` when not given (`None` and `"builtin"` both mean the synthetic scenes).
        do_reduce_labels_default: `--do_reduce_labels` when not given; `None` leaves the choice to the caller (for
            instance the image processor's setting).
        seed_flag: the flag of the data seed (built-in data set, drawn validation split); whatever its name, the
            value lands in `args.data_seed`, which [`load_dataset_from_arguments`] reads.
    """
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=dataset_name_default,
        help="Hub data set, local folder, or none / 'builtin' for the synthetic scenes. Folders: "
        + "; ".join(ACCEPTED_FOLDER_LAYOUTS).replace("%", "%%"),
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of the Hub data set.")
    parser.add_argument(
        "--id2label", type=str, default=None, help="Json file of class names (ids after label reduction)."
    )
    parser.add_argument(
        "--image_column_name", type=str, default=None, help="Image column, when not image/pixel_values/img."
    )
    parser.add_argument(
        "--label_column_name", type=str, default=None, help="Label-map column, when not annotation/label/..."
    )
    parser.add_argument(
        "--validation_split_percentage",
        type=float,
        default=15.0,
        help="Share of train held out when there is no validation split.",
    )
    reduce_default = "; default: the image processor's setting." if do_reduce_labels_default is None else "."
    parser.add_argument(
        "--do_reduce_labels",
        action=argparse.BooleanOptionalAction,
        default=do_reduce_labels_default,
        help="Label 0 = unlabelled (ADE20K, Pascal Context, COCO-Stuff, built-in): 0 -> 255, k -> k-1"
        + reduce_default,
    )
    parser.add_argument("--skip_data_check", action="store_true", help="Do not decode and check every sample first.")
    parser.add_argument(
        "--synthetic_validation_samples", type=int, default=200, help="Validation images of the built-in data set."
    )
    parser.add_argument(
        "--synthetic_image_size", type=int, default=128, help="Side of the built-in data set's images."
    )
    parser.add_argument(
        seed_flag,
        dest="data_seed",
        metavar=seed_flag.lstrip("-").upper(),
        type=int,
        default=0,
        help="Seed of the built-in data set and of a validation split drawn from train.",
    )
    parser.add_argument(
        "--cache_dir", type=str, default=None, help="Cache of Hub data sets and of the generated built-in data set."
    )
    parser.add_argument(
        "--max_eval_samples", type=int, default=None, help="Use only the first N samples of the evaluated split."
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loader worker processes.")


def load_dataset_from_arguments(
    args: argparse.Namespace, num_train_samples: int, num_validation_samples: int
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """`load_segmentation_dataset` with the flags of [`add_dataset_arguments`]; the sample counts (of the
    built-in data set) are the caller's, as each script caps them by its own limits."""
    flags = {keyword: getattr(args, flag) for keyword, flag in DATASET_KEYWORD_FLAGS.items()}
    return load_segmentation_dataset(
        args.dataset_name, num_train_samples=num_train_samples, num_validation_samples=num_validation_samples, **flags
    )


def add_cpu_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--cpu`: run on CPU; Accelerate then starts one process unless told otherwise (hf-notes §7.3)."""
    parser.add_argument(
        "--cpu", action="store_true", help="Run on CPU (needed for several CPU processes, see the module docstring)."
    )


def parse_exit_threshold(text: str) -> float | tuple[float, ...]:
    """`"0.9"` -> 0.9, `"0.9,0.95"` -> one value per auxiliary head, each in (0, 1]."""
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an exit threshold is a number or 'a,b' (one per head), got {text!r}.")
    if not all(0.0 < value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"exit thresholds must lie in (0, 1] (1.0 = no pruning), got {text}.")
    return values[0] if len(values) == 1 else values


def require_positive(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Raise a ValueError naming the first flag of `names` whose value is below 1 (unset flags, None, pass)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {value}.")


__all__ = [
    "add_cpu_argument",
    "add_dataset_arguments",
    "load_dataset_from_arguments",
    "parse_exit_threshold",
    "require_positive",
]
