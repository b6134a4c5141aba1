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
"""Segmentation data for training and evaluation: loading (built-in, local folder, Hub), checks, transforms, batches.

Three sources, one result: a `datasets.DatasetDict` with `train` and `validation` splits whose columns are
`image` (RGB) and `annotation` (a single-channel label map), plus an `id2label` dict.

* `None` or `"builtin"`: the synthetic scenes of [`dtop_hf.synthetic_scenes`] (ADE20K conventions: 0 = unlabelled,
  use `do_reduce_labels=True`).
* A local folder, in one of these layouts (images `.jpg`/`.jpeg`/`.png`/`.bmp`, label maps `.png`, paired by file
  stem; class names in an optional `id2label.json`, `{"0": "wall", ...}` or `["wall", ...]`)::

      folder/images/*.jpg  folder/annotations/*.png                     (validation split drawn at random)
      folder/train/images/  folder/train/annotations/  folder/validation/images/  folder/validation/annotations/

  or a folder written by `DatasetDict.save_to_disk`.
* A Hub data set name such as `scene_parse_150`, read with `datasets.load_dataset`. Columns named `pixel_values`,
  `label`, ... are renamed to `image` / `annotation`; a missing validation split is drawn from `train`.

Bad input never reaches a batch silently: [`check_segmentation_split`] skips (and counts, with a warning) corrupt
files and images without a label map, and raises a `ValueError` naming the samples whose label values are out of
range or whose label map does not match the image size. [`SegmentationDataset`] repeats the label checks per sample
for data sets that were not checked.
"""

import argparse
import json
from collections.abc import Callable, Sequence
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
from .label_maps import ADE20K_LABELS


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Column names other data sets use for the image and the label map, tried in this order.
IMAGE_COLUMN_CANDIDATES = ("image", "pixel_values", "img")
ANNOTATION_COLUMN_CANDIDATES = ("annotation", "label", "labels", "segmentation_map", "semantic_map", "mask")
# Class names of Hub data sets that ship no `id2label.json`.
KNOWN_ID2LABEL = {"scene_parse_150": ADE20K_LABELS, "zhoubolei/scene_parse_150": ADE20K_LABELS}
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


def read_id2label(path: str | Path) -> dict[int, str]:
    """Class names from a json file: `{"0": "wall", "1": "building"}` or `["wall", "building"]`."""
    with open(path, encoding="utf-8") as file:
        content = json.load(file)
    if isinstance(content, list):
        return dict(enumerate(str(name) for name in content))
    if isinstance(content, dict):
        return {int(index): str(name) for index, name in sorted(content.items(), key=lambda item: int(item[0]))}
    raise ValueError(f"{path} must hold a json object {{'0': 'name', ...}} or a list of names, got {type(content)}.")


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


def folder_split(folder: Path) -> tuple[datasets.Dataset, int]:
    """Pair `folder/images/*` with `folder/annotations/<stem>.png`; images without a label map are skipped.

    Returns:
        The split (columns `image`, `annotation` as lazily decoded image features) and the number of skipped images.
    """
    images_dir, annotations_dir = folder / "images", folder / "annotations"
    if not images_dir.is_dir() or not annotations_dir.is_dir():
        raise ValueError(
            f"Expected `images/` and `annotations/` folders in {folder}, "
            f"found {sorted(path.name for path in folder.iterdir())}."
        )
    images = {path.stem: path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS}
    annotations = {path.stem: path for path in sorted(annotations_dir.iterdir()) if path.suffix.lower() == ".png"}
    unlabelled = sorted(set(images) - set(annotations))
    if unlabelled:
        logger.warning(
            f"{folder}: skipping {len(unlabelled)} image(s) without a label map `annotations/<stem>.png`, e.g. "
            f"{[images[stem].name for stem in unlabelled[:5]]}."
        )
    paired = sorted(set(images) & set(annotations))
    if not paired:
        raise ValueError(f"{folder}: no image has a label map with the same file stem in `annotations/`.")
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    split = datasets.Dataset.from_dict(
        {"image": [str(images[stem]) for stem in paired], "annotation": [str(annotations[stem]) for stem in paired]},
        features=features,
    )
    return split, len(unlabelled)


def load_folder_dataset(folder: Path, validation_split_percentage: float, seed: int) -> datasets.DatasetDict:
    """A local folder in one of the layouts of the module docstring, or a `save_to_disk` folder."""
    if (folder / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(folder))
    if (folder / "train").is_dir():
        splits = {"train": folder_split(folder / "train")[0]}
        for name in ("validation", "val"):
            if (folder / name).is_dir():
                splits["validation"] = folder_split(folder / name)[0]
        return ensure_validation_split(datasets.DatasetDict(splits), validation_split_percentage, seed)
    return ensure_validation_split(
        datasets.DatasetDict({"train": folder_split(folder)[0]}), validation_split_percentage, seed
    )


def hub_id2label(dataset_name: str) -> dict[int, str] | None:
    """Class names of a Hub data set: a known table, else an `id2label.json` in the data set repository."""
    if dataset_name in KNOWN_ID2LABEL:
        return dict(enumerate(KNOWN_ID2LABEL[dataset_name]))
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
        dataset_name: `None` / `"builtin"` (synthetic scenes), a local folder, or a Hub data set name.
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
        ValueError: missing columns or splits, or no class names found (pass `id2label_file`).
    """
    if dataset_name in BUILTIN_NAMES:
        dataset, id2label = builtin_dataset(num_train_samples, num_validation_samples, image_size, seed, cache_dir)
    elif Path(dataset_name).is_dir():
        folder = Path(dataset_name)
        dataset = load_folder_dataset(folder, validation_split_percentage, seed)
        id2label = read_id2label(folder / "id2label.json") if (folder / "id2label.json").is_file() else None
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        dataset = ensure_validation_split(dataset, validation_split_percentage, seed)
        id2label = hub_id2label(dataset_name)
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
        help="Hub data set, local folder, or none / 'builtin' for the synthetic scenes.",
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
        help="Label 0 = unlabelled (ADE20K and the built-in set): 0 -> 255, k -> k-1" + reduce_default,
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
    """[`load_segmentation_dataset`] with the flags of [`add_dataset_arguments`]; the sample counts (of the
    built-in data set) are the caller's, as each script caps them by its own limits."""
    return load_segmentation_dataset(
        args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        id2label_file=args.id2label,
        image_column=args.image_column_name,
        annotation_column=args.label_column_name,
        validation_split_percentage=args.validation_split_percentage,
        num_train_samples=num_train_samples,
        num_validation_samples=num_validation_samples,
        image_size=args.synthetic_image_size,
        seed=args.data_seed,
        cache_dir=args.cache_dir,
    )


def builtin_dataset(
    num_train_samples: int, num_validation_samples: int, image_size: int, seed: int, cache_dir: str | Path | None
) -> tuple[datasets.DatasetDict, dict[int, str]]:
    """The synthetic scenes; generated once per size and seed, then read back from `cache_dir` when given."""
    from .synthetic_scenes import SYNTHETIC_ID2LABEL, synthetic_dataset_dict

    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"synthetic_scenes_{num_train_samples}_{num_validation_samples}_{image_size}_{seed}"
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


def random_resize_factor(
    height: int, width: int, crop_size: tuple[int, int], ratio: float, long_side_factor: int = 4
) -> float:
    """mmseg `RandomResize(scale=(4 * crop, crop), ratio_range, keep_ratio=True)`: the image is scaled to fit inside
    `(long_side_factor * crop * ratio, crop * ratio)` (long side, short side), as ADE20K's (2048, 512) for crop 512."""
    short_target = min(crop_size) * ratio
    long_target = long_side_factor * short_target
    return min(long_target / max(height, width), short_target / min(height, width))


class PhotometricDistortion:
    """mmseg's `PhotoMetricDistortion` (SPEC §4): each with probability 1/2, brightness +-32, contrast x[0.5, 1.5]
    (before or after the colour changes, at random), saturation x[0.5, 1.5] and hue +-18 (of 180) in HSV."""

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`(height, width, 3)` uint8 RGB -> the same, distorted."""
        image = image.astype(np.float32)
        if rng.random() < 0.5:
            image = np.clip(image + rng.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            image = np.clip(image * rng.uniform(*self.contrast_range), 0, 255)
        change_saturation, change_hue = rng.random() < 0.5, rng.random() < 0.5
        if change_saturation or change_hue:
            hsv = np.asarray(Image.fromarray(image.astype(np.uint8)).convert("HSV")).astype(np.float32)
            if change_saturation:
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*self.saturation_range), 0, 255)
            if change_hue:
                # OpenCV's hue runs over [0, 180), PIL's over [0, 256): rescale the official +-18.
                hsv[..., 0] = (hsv[..., 0] + rng.uniform(-self.hue_delta, self.hue_delta) * 256 / 180) % 256
            image = np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")).astype(np.float32)
        if not contrast_first and rng.random() < 0.5:
            image = np.clip(image * rng.uniform(*self.contrast_range), 0, 255)
        return image.astype(np.uint8)


def normalize_image(image: np.ndarray, image_processor: DToPImageProcessor) -> np.ndarray:
    """`(height, width, 3)` uint8 -> `(3, height, width)` float32, rescaled and normalised by the processor."""
    return image_processor(images=image, do_resize=False, return_tensors="np")["pixel_values"][0]


class SegmentationTrainTransform:
    """The official training augmentation (SPEC §4, mmseg's ADE20K pipeline) on an image and its label map:
    random resize (ratio 0.5-2.0 of the crop scale), random crop, horizontal flip, photometric distortion,
    normalisation, then padding to the crop size (image 0, labels `ignore_index`). mmseg's `cat_max_ratio`
    crop retries are not done: the crop is a plain uniform one."""

    def __init__(
        self,
        image_processor: DToPImageProcessor,
        crop_size: int | tuple[int, int],
        ratio_range: tuple[float, float] = (0.5, 2.0),
        flip_probability: float = 0.5,
        photometric_distortion: bool = True,
        ignore_index: int = 255,
    ):
        self.image_processor = image_processor
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.ratio_range = ratio_range
        self.flip_probability = flip_probability
        self.photometric_distortion = PhotometricDistortion() if photometric_distortion else None
        self.ignore_index = ignore_index

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """RGB image, `(height, width)` int64 labels -> `(3, crop_h, crop_w)` float32, `(crop_h, crop_w)` int64."""
        crop_height, crop_width = self.crop_size
        factor = random_resize_factor(image.height, image.width, self.crop_size, rng.uniform(*self.ratio_range))
        new_size = (max(int(image.width * factor + 0.5), 1), max(int(image.height * factor + 0.5), 1))
        image = image.resize(new_size, Image.BILINEAR)
        label_image = Image.fromarray(label.astype(np.int32)).resize(new_size, Image.NEAREST)
        pixels, label = np.asarray(image), np.asarray(label_image).astype(np.int64)

        top = int(rng.integers(0, max(pixels.shape[0] - crop_height, 0) + 1))
        left = int(rng.integers(0, max(pixels.shape[1] - crop_width, 0) + 1))
        pixels = pixels[top : top + crop_height, left : left + crop_width]
        label = label[top : top + crop_height, left : left + crop_width]
        if rng.random() < self.flip_probability:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric_distortion is not None:
            pixels = self.photometric_distortion(np.ascontiguousarray(pixels), rng)
        pixel_values = normalize_image(np.ascontiguousarray(pixels), self.image_processor)

        # Pad after normalisation, as mmseg's data preprocessor does: 0 is then the mean colour.
        pad_height, pad_width = crop_height - label.shape[0], crop_width - label.shape[1]
        pixel_values = np.pad(pixel_values, ((0, 0), (0, pad_height), (0, pad_width)))
        label = np.pad(label, ((0, pad_height), (0, pad_width)), constant_values=self.ignore_index)
        return pixel_values, label


class SegmentationEvalTransform:
    """Evaluation preprocessing: the image processor's resize and normalisation; the label map keeps its original
    size (metrics are computed there). `size` is the processor's `size` argument: `{"height", "width"}` for whole
    image inference, `{"shortest_edge", "longest_edge"}` (keep ratio) for sliding-window inference."""

    def __init__(self, image_processor: DToPImageProcessor, size: dict | None = None):
        self.image_processor = image_processor
        self.size = size

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        kwargs = {"size": self.size} if self.size is not None else {}
        pixel_values = self.image_processor(images=image, return_tensors="np", **kwargs)["pixel_values"][0]
        return pixel_values, label


class SegmentationDataset(torch.utils.data.Dataset):
    """A `train` / `validation` split as model inputs: decodes a sample, reduces and checks its labels, transforms
    it. The random augmentation of sample `index` in epoch `epoch` is drawn from its own generator seeded with
    `(seed, epoch, index)`, so it is the same whatever the process count, worker count or resume point."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: Callable[[Image.Image, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]],
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
    """Evaluation samples: images resized as the processor's `size` says (whole image) or with the shorter side at
    its `crop_size` and the longer at most 4x that (sliding window, the official test mode); label maps at their
    original size, reduced when the processor's `do_reduce_labels` is set."""
    crop = image_processor.crop_size["height"]
    eval_size = {"shortest_edge": crop, "longest_edge": 4 * crop} if sliding_window else None
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
    "PhotometricDistortion",
    "SegmentationDataset",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "SplitCheckReport",
    "add_dataset_arguments",
    "build_eval_dataset",
    "check_segmentation_split",
    "collate_segmentation_batch",
    "ensure_validation_split",
    "label_map_problem",
    "labels_out_of_range",
    "load_dataset_from_arguments",
    "load_segmentation_dataset",
    "read_id2label",
    "reduce_labels",
    "standardize_columns",
]
