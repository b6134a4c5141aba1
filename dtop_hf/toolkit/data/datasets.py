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
"""Segmentation data for training and evaluation: loading (built-in, local folder, Hub), checks, batches.

Every source gives one result: a `datasets.DatasetDict` with `train` and `validation` splits whose columns are
`image` (RGB) and `annotation` (a single-channel label map), plus an `id2label` dict.

* `None` or `"builtin"`: the synthetic scenes of [`dtop_hf.toolkit.data.synthetic_scenes`] (ADE20K conventions:
  0 = unlabelled, use `do_reduce_labels=True`).
* A local folder in one of the layouts of [`dtop_hf.toolkit.data.layouts`]: the ADE20K, Pascal Context 59 and
  COCO-Stuff-10K releases as the official configs read them, a Hub parquet snapshot, a `save_to_disk` folder, or
  plain `images/` + `annotations/` folders (class names in an optional `id2label.json`).
* A Hub data set name such as `scene_parse_150`, read with `datasets.load_dataset`. Columns named `pixel_values`,
  `label`, ... are renamed to `image` / `annotation`; a missing validation split is drawn from `train`.

Bad input never reaches a batch silently: [`check_segmentation_split`] skips (and counts, with a warning) corrupt
files and images without a label map, and raises a `ValueError` naming the samples whose label values are out of
range or whose label map does not match the image size. [`SegmentationDataset`] repeats the label checks per sample
for data sets that were not checked. The training augmentation is in [`dtop_hf.toolkit.data.transforms`].
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.utils import logging

from ...image_processing_dtop import DToPImageProcessor
from .label_maps import dataset_id2label
from .layouts import load_folder_dataset, read_id2label
from .transforms import SampleTransform, SegmentationEvalTransform


logger = logging.get_logger(__name__)

# Column names other data sets use for the image and the label map, tried in this order.
IMAGE_COLUMN_CANDIDATES = ("image", "pixel_values", "img")
ANNOTATION_COLUMN_CANDIDATES = ("annotation", "label", "labels", "segmentation_map", "semantic_map", "mask")
# Hub data sets that ship no `id2label.json`, and the data-set preset whose class names they use.
KNOWN_HUB_DATASETS = {"scene_parse_150": "ade20k", "zhoubolei/scene_parse_150": "ade20k"}
BUILTIN_NAMES = (None, "", "builtin")


def reduce_labels(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K-style reduction (mmseg `reduce_zero_label`): 0 ("unlabelled") -> `ignore_index`, k -> k - 1."""
    label = label.astype(np.int64)
    reduced = label - 1
    reduced[(label == 0) | (label == ignore_index)] = ignore_index
    return reduced


def labels_out_of_range(label: np.ndarray, num_labels: int, ignore_index: int = 255) -> list[int]:
    """The distinct label values (at most 10) that are neither class ids in `[0, num_labels)` nor `ignore_index`."""
    invalid = (label != ignore_index) & ((label < 0) | (label >= num_labels))
    return np.unique(label[invalid])[:10].tolist()


def find_column(column_names: Sequence[str], requested: str | None, candidates: Sequence[str], role: str) -> str:
    """The column holding the `role` ("image" or "annotation") data: `requested`, else the first candidate present."""
    if requested is not None:
        if requested not in column_names:
            raise ValueError(
                f"The {role} column {requested!r} is not in the data set; its columns are {list(column_names)}."
            )
        return requested
    for name in candidates:
        if name in column_names:
            return name
    raise ValueError(
        f"Found no {role} column: the data set has columns {list(column_names)}, expected one of {list(candidates)}. "
        f"Name it with `--{'image' if role == 'image' else 'label'}_column_name`."
    )


def standardize_columns(
    dataset: datasets.DatasetDict, image_column: str | None = None, annotation_column: str | None = None
) -> datasets.DatasetDict:
    """Rename the image and label-map columns of every split to `image` / `annotation` (other columns are kept)."""
    for split_name, split in dataset.items():
        image_name = find_column(split.column_names, image_column, IMAGE_COLUMN_CANDIDATES, "image")
        annotation_name = find_column(
            split.column_names, annotation_column, ANNOTATION_COLUMN_CANDIDATES, "annotation"
        )
        if image_name == annotation_name:
            raise ValueError(f"Split {split_name!r}: the image and annotation columns are both {image_name!r}.")
        for name in ("image", "annotation"):
            if name in split.column_names and name not in (image_name, annotation_name):
                split = split.remove_columns(name)  # a differently used column would clash with the renaming
        split = split.rename_columns(
            {old: new for old, new in ((image_name, "image"), (annotation_name, "annotation")) if old != new}
        )
        for name in ("image", "annotation"):
            if isinstance(split.features[name], dict) and "bytes" in split.features[name]:
                # An image stored as {bytes, path} without the `datasets` metadata (e.g. parquet written by pandas).
                split = split.cast_column(name, datasets.Image())
        dataset[split_name] = split
    return dataset


def ensure_validation_split(
    dataset: datasets.DatasetDict, validation_split_percentage: float = 15.0, seed: int = 0
) -> datasets.DatasetDict:
    """Keep `train` and `validation`; `val` is renamed, and without either, `validation` is drawn from `train`."""
    if "train" not in dataset:
        raise ValueError(f"The data set has no `train` split; its splits are {list(dataset)}.")
    if "validation" not in dataset and "val" in dataset:
        dataset["validation"] = dataset.pop("val")
    if "validation" not in dataset:
        if not 0 < validation_split_percentage < 100:
            raise ValueError(f"`validation_split_percentage` must be in (0, 100), got {validation_split_percentage}.")
        parts = dataset["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        logger.info(
            f"No validation split: drew {len(parts['test'])} samples from `train` ({validation_split_percentage}%)."
        )
        dataset = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})
    return datasets.DatasetDict({"train": dataset["train"], "validation": dataset["validation"]})


def hub_id2label(dataset_name: str) -> dict[int, str] | None:
    """Class names of a Hub data set: a known table, else an `id2label.json` in the data set repository."""
    if dataset_name in KNOWN_HUB_DATASETS:
        return dataset_id2label(KNOWN_HUB_DATASETS[dataset_name])
    try:
        from huggingface_hub import hf_hub_download

        return read_id2label(hf_hub_download(repo_id=dataset_name, filename="id2label.json", repo_type="dataset"))
    except Exception as error:  # offline, no such file, private repository: fall back to the features
        logger.info(f"No id2label.json in the Hub repository {dataset_name!r} ({type(error).__name__}).")
        return None


def features_id2label(dataset: datasets.DatasetDict) -> dict[int, str] | None:
    """Class names from a `ClassLabel` feature of the annotation column, when the data set declares one."""
    feature = dataset["train"].features.get("annotation")
    inner = getattr(feature, "feature", feature)
    names = getattr(inner, "names", None)
    return dict(enumerate(names)) if names else None


def load_segmentation_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    id2label_file: str | None = None,
    image_column: str | None = None,
    annotation_column: str | None = None,
    validation_split_percentage: float = 15.0,
    num_train_samples: int = 1000,
    num_validation_samples: int = 200,
    image_size: int = 128,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """Load a segmentation data set as `train` / `validation` splits with `image` and `annotation` columns.

    Args:
        dataset_name: `None` / `"builtin"` (synthetic scenes), a local folder (any layout of
            `toolkit.data.layouts.ACCEPTED_FOLDER_LAYOUTS`), or a Hub data set name.
        dataset_config_name: configuration of a Hub data set (`load_dataset(name, config)`).
        id2label_file: a json file of class names; overrides every other source of names.
        image_column, annotation_column: column names when they are not among the usual ones.
        validation_split_percentage: share of `train` held out when the data set has no validation split.
        num_train_samples, num_validation_samples, image_size: size of the built-in data set.
        seed: seed of the built-in data set and of a drawn validation split.
        cache_dir: where the built-in data set is cached (`save_to_disk`) after its first generation, and the
            `cache_dir` of `datasets.load_dataset`.

    Returns:
        The `DatasetDict` and `id2label` (class ids as the model sees them, after any label reduction).

    Raises:
        ValueError: a folder in no known layout, missing columns or splits, or no class names found (pass
            `id2label_file`).
    """
    if dataset_name in BUILTIN_NAMES:
        dataset, id2label = builtin_dataset(num_train_samples, num_validation_samples, image_size, seed, cache_dir)
    elif Path(dataset_name).is_dir():
        dataset, id2label, _ = load_folder_dataset(dataset_name, cache_dir)
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        id2label = hub_id2label(dataset_name)
    dataset = ensure_validation_split(dataset, validation_split_percentage, seed)
    dataset = standardize_columns(dataset, image_column, annotation_column)
    if id2label_file is not None:
        id2label = read_id2label(id2label_file)
    id2label = id2label or features_id2label(dataset)
    if not id2label:
        raise ValueError(
            f"Found no class names for {dataset_name!r}: pass a json file of names with `--id2label` "
            '(`{"0": "wall", ...}`, ids after label reduction), or put `id2label.json` in the data folder.'
        )
    return dataset, id2label


def builtin_dataset(
    num_train_samples: int, num_validation_samples: int, image_size: int, seed: int, cache_dir: str | Path | None
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """The synthetic scenes; generated once per size and seed, then read back from `cache_dir` when given."""
    from .synthetic_scenes import SYNTHETIC_ID2LABEL, SYNTHETIC_SCENES_VERSION, synthetic_dataset_dict

    cached = None
    if cache_dir is not None:
        # The generator version is part of the key: scenes cached by an older generator are not reused.
        sizes = f"{num_train_samples}_{num_validation_samples}_{image_size}_{seed}"
        cached = Path(cache_dir) / f"synthetic_scenes_v{SYNTHETIC_SCENES_VERSION}_{sizes}"
        if (cached / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(cached)), dict(SYNTHETIC_ID2LABEL)
    dataset = synthetic_dataset_dict(num_train_samples, num_validation_samples, image_size, seed)
    if cached is not None:
        dataset.save_to_disk(str(cached))
        dataset = datasets.load_from_disk(str(cached))  # memory-mapped, like a Hub data set
    return dataset, dict(SYNTHETIC_ID2LABEL)


@dataclass
class SplitCheckReport:
    """What [`check_segmentation_split`] found: samples checked and the names of those it skipped."""

    num_checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.corrupt) + len(self.unlabelled)


def open_image_cell(cell: dict | None) -> Image.Image | None:
    """Decode an undecoded `datasets.Image` cell (`{"bytes", "path"}`) completely; None when the cell is empty."""
    if cell is None or (cell.get("bytes") is None and cell.get("path") is None):
        return None
    source = BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
    image = Image.open(source)
    image.load()  # `open` reads the header only; truncated or corrupt pixel data fails here
    return image


def cell_name(split_name: str, index: int, cell: dict | None) -> str:
    """`train[12]`, with the file name when the sample came from a file."""
    path = (cell or {}).get("path")
    return f"{split_name}[{index}]" + (f" ({path})" if path else "")


def check_segmentation_split(
    dataset: datasets.Dataset,
    split_name: str,
    num_labels: int,
    do_reduce_labels: bool,
    ignore_index: int = 255,
    show_progress: bool = False,
) -> tuple[datasets.Dataset, SplitCheckReport]:
    """Decode every sample once and check it before training.

    Skipped (counted, with a warning naming the first ones): images or label maps that cannot be decoded, and
    images without a label map. Errors (`ValueError` naming up to 10 samples): label values outside
    `[0, num_labels)` (after reduction) that are not `ignore_index`, label maps that are not single-channel, and
    label maps whose size differs from the image's.

    Returns:
        The split without the skipped samples, and the [`SplitCheckReport`].
    """
    from tqdm.auto import tqdm

    raw = dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
        "annotation", datasets.Image(decode=False)
    )
    report, kept, errors = SplitCheckReport(), [], []
    rows = raw.select_columns(["image", "annotation"])
    for index, row in enumerate(tqdm(rows, desc=f"checking {split_name}", disable=not show_progress)):
        report.num_checked += 1
        name = cell_name(split_name, index, row["image"])
        try:
            image, annotation = open_image_cell(row["image"]), open_image_cell(row["annotation"])
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            report.corrupt.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if image is None:
            report.corrupt.append(f"{name}: no image")
            continue
        if annotation is None:
            report.unlabelled.append(name)
            continue
        problem = label_map_problem(image.size, np.asarray(annotation), num_labels, do_reduce_labels, ignore_index)
        if problem:
            errors.append(f"{name}: {problem}")
        kept.append(index)
    if errors:
        raise ValueError(
            f"{len(errors)} sample(s) of split {split_name!r} have unusable label maps (first ones below). Check "
            f"`num_labels` ({num_labels}) and `do_reduce_labels` ({do_reduce_labels}), or fix the files:\n  "
            + "\n  ".join(errors[:10])
        )
    for kind, names in (("corrupt or unreadable", report.corrupt), ("without a label map", report.unlabelled)):
        if names:
            logger.warning(f"Split {split_name!r}: skipping {len(names)} sample(s) {kind}, e.g. {names[:5]}.")
    if report.num_skipped:
        dataset = dataset.select(kept)
    return dataset, report


def label_map_problem(
    image_size: tuple[int, int], label: np.ndarray, num_labels: int, do_reduce_labels: bool, ignore_index: int
) -> str | None:
    """Why a label map cannot train the model (None when it can). `image_size` is PIL's `(width, height)`."""
    if label.ndim != 2:
        return f"the label map must be single-channel (class ids), got an array of shape {label.shape}"
    if label.shape[::-1] != tuple(image_size):
        return f"label map {label.shape[1]}x{label.shape[0]} differs from the image {image_size[0]}x{image_size[1]}"
    if do_reduce_labels:
        label = reduce_labels(label, ignore_index)
    bad_values = labels_out_of_range(label, num_labels, ignore_index)
    if bad_values:
        reduced = " after label reduction" if do_reduce_labels else ""
        return f"label values {bad_values}{reduced} outside [0, {num_labels}) and not {ignore_index}"
    return None


class SegmentationDataset(torch.utils.data.Dataset):
    """A `train` / `validation` split as model inputs: decodes a sample, reduces and checks its labels, transforms
    it. The random augmentation of sample `index` in epoch `epoch` is drawn from its own generator seeded with
    `(seed, epoch, index)`, so it is the same whatever the process count, worker count or resume point."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: SampleTransform,
        num_labels: int,
        do_reduce_labels: bool,
        split_name: str = "train",
        seed: int = 0,
        ignore_index: int = 255,
    ):
        self.dataset = dataset
        self.transform = transform
        self.num_labels = num_labels
        self.do_reduce_labels = do_reduce_labels
        self.split_name = split_name
        self.seed = seed
        self.ignore_index = ignore_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Accelerate's data loader at every epoch start; changes the augmentation draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        image, annotation = sample["image"], sample["annotation"]
        name = f"{self.split_name}[{index}]" + (f" ({image.filename})" if getattr(image, "filename", "") else "")
        if annotation is None:
            raise ValueError(f"Sample {name} has no label map: run `check_segmentation_split` to skip such samples.")
        label = np.asarray(annotation)
        problem = label_map_problem(image.size, label, self.num_labels, self.do_reduce_labels, self.ignore_index)
        if problem:
            raise ValueError(f"Sample {name}: {problem}.")
        if self.do_reduce_labels:
            label = reduce_labels(label, self.ignore_index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pixel_values, label = self.transform(image.convert("RGB"), label.astype(np.int64), rng)
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values)),
            "labels": torch.from_numpy(np.ascontiguousarray(label)),
        }


def build_eval_dataset(
    split: datasets.Dataset,
    image_processor: DToPImageProcessor,
    num_labels: int,
    sliding_window: bool,
    split_name: str = "validation",
) -> SegmentationDataset:
    """Evaluation samples: images resized as the processor's `size` says (whole image), or for sliding windows (the
    official test mode) keeping their ratio, to the processor's `size` when it is `{"shortest_edge", "longest_edge"}`
    (the official `Resize(scale=(long, short))`, e.g. (2048, 520) for Pascal Context) and otherwise with the shorter
    side at its `crop_size` and the longer at most 4x that; label maps at their original size, reduced when the
    processor's `do_reduce_labels` is set."""
    crop = image_processor.crop_size["height"]
    shortest, longest = (getattr(image_processor.size, name, None) for name in ("shortest_edge", "longest_edge"))
    if shortest and longest:
        test_size = {"shortest_edge": shortest, "longest_edge": longest}
    else:
        test_size = {"shortest_edge": crop, "longest_edge": 4 * crop}
    eval_size = test_size if sliding_window or image_processor.do_split_image else None
    transform = SegmentationEvalTransform(image_processor, eval_size)
    return SegmentationDataset(split, transform, num_labels, image_processor.do_reduce_labels, split_name=split_name)


def collate_segmentation_batch(
    samples: list[dict[str, torch.Tensor]], ignore_index: int = 255
) -> dict[str, torch.Tensor]:
    """Stack samples, padding images (with 0) and label maps (with `ignore_index`) bottom/right to the largest.

    Returns:
        `pixel_values` `(batch, 3, H, W)`, `labels` `(batch, H_label, W_label)`, and the unpadded sizes
        `image_sizes` / `label_sizes` `(batch, 2)` int64 `(height, width)`.
    """
    image_sizes = torch.tensor([sample["pixel_values"].shape[-2:] for sample in samples], dtype=torch.long)
    label_sizes = torch.tensor([sample["labels"].shape[-2:] for sample in samples], dtype=torch.long)
    max_image, max_label = image_sizes.amax(dim=0).tolist(), label_sizes.amax(dim=0).tolist()

    def pad(tensor: torch.Tensor, size: list[int], value: float) -> torch.Tensor:
        return F.pad(tensor, (0, size[1] - tensor.shape[-1], 0, size[0] - tensor.shape[-2]), value=value)

    return {
        "pixel_values": torch.stack([pad(sample["pixel_values"], max_image, 0.0) for sample in samples]),
        "labels": torch.stack([pad(sample["labels"], max_label, ignore_index) for sample in samples]).long(),
        "image_sizes": image_sizes,
        "label_sizes": label_sizes,
    }


__all__ = [
    "ANNOTATION_COLUMN_CANDIDATES",
    "BUILTIN_NAMES",
    "IMAGE_COLUMN_CANDIDATES",
    "SegmentationDataset",
    "SplitCheckReport",
    "build_eval_dataset",
    "check_segmentation_split",
    "collate_segmentation_batch",
    "ensure_validation_split",
    "label_map_problem",
    "labels_out_of_range",
    "load_segmentation_dataset",
    "reduce_labels",
    "standardize_columns",
]
