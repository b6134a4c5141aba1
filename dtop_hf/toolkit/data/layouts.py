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
"""Data-set folders as users have them: the official releases, Hub parquet snapshots and plain image folders.

Each reader returns a `datasets.DatasetDict` whose splits have `image` and `annotation` columns (lazily decoded
`datasets.Image` features over the files), and the class names when the layout implies them. The official folders
are read as the official configs read them (docs/official_recipes.md, "Data pipelines"): same sub-folders, same image
lists, same splits; their label maps are used with `reduce_zero_label` (0 = unlabelled).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers.utils import logging

from .label_maps import dataset_id2label


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# What the error for an unknown folder lists: every layout `load_folder_dataset` accepts.
ACCEPTED_FOLDER_LAYOUTS = (
    "ADE20K release (`ADEChallengeData2016/`): images/{training,validation}/*.jpg + "
    "annotations/{training,validation}/*.png",
    "Pascal Context 59 (`VOCdevkit/VOC2010/`): JPEGImages/*.jpg + SegmentationClassContext/*.png + "
    "ImageSets/SegmentationContext/{train,val}.txt",
    "COCO-Stuff-10K: images/{train2014,test2014}/*.jpg + annotations/{train2014,test2014}/<stem>_labelTrainIds.png "
    "(or <stem>.png)",
    "a Hub data set snapshot: data/{train,validation}-*.parquet (columns image + label map)",
    "a `DatasetDict.save_to_disk` folder (dataset_dict.json)",
    "train/{images,annotations}/ + validation/{images,annotations}/ (label maps <stem>.png)",
    "images/ + annotations/ (label maps <stem>.png; a validation split is drawn from them)",
)
# Split names of parquet exports, tried in this order for our `train` / `validation`.
PARQUET_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid")}


@dataclass(frozen=True)
class FolderLayout:
    """A recognised folder: its layout name, the folder that holds the data, and the class names it implies."""

    name: str
    root: Path
    preset: str | None = None  # data-set preset of `dtop_hf.toolkit.presets.DATASET_PRESETS` (class names)


def paired_split(
    images_dir: Path,
    annotations_dir: Path,
    annotation_suffixes: Sequence[str] = ("",),
    stems: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Pair `images_dir/<stem>.<ext>` with `annotations_dir/<stem><suffix>.png` (the first suffix that exists).

    Args:
        images_dir, annotations_dir: the two folders.
        annotation_suffixes: label-map name endings tried in order, e.g. COCO-Stuff's `("_labelTrainIds", "")`.
        stems: only these samples, in this order (an official image list); default: every image of the folder.

    Returns:
        The split, columns `image` and `annotation` as lazily decoded image features. Images without a label map
        are skipped with a warning that names the first ones.

    Raises:
        ValueError: when the folders are missing or no image has a label map.
    """
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise ValueError(f"Expected the folder {folder}, which does not exist.")
    images = {path.stem: path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS}
    annotations = {path.stem: path for path in sorted(annotations_dir.iterdir()) if path.suffix.lower() == ".png"}
    wanted = list(stems) if stems is not None else sorted(images)
    pairs, missing = [], []
    for stem in wanted:
        names = (stem + suffix for suffix in annotation_suffixes)
        label = next((annotations[name] for name in names if name in annotations), None)
        if stem in images and label is not None:
            pairs.append((images[stem], label))
        else:
            missing.append(stem)
    if missing:
        logger.warning(
            f"{images_dir}: skipping {len(missing)} sample(s) without an image or a label map "
            f"`{annotations_dir.name}/<stem>{annotation_suffixes[0]}.png`, e.g. {missing[:5]}."
        )
    if not pairs:
        raise ValueError(
            f"{images_dir}: no image has a label map in {annotations_dir} (tried the name endings "
            f"{[suffix + '.png' for suffix in annotation_suffixes]})."
        )
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"image": [str(image) for image, _ in pairs], "annotation": [str(label) for _, label in pairs]},
        features=features,
    )


def read_image_list(path: Path) -> list[str]:
    """File stems of an official image list (`ImageSets/.../train.txt`: one name per line)."""
    if not path.is_file():
        raise ValueError(f"Expected the image list {path}, which does not exist.")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_ade20k_folder(root: Path) -> datasets.DatasetDict:
    """`ADEChallengeData2016/`: `images/training` + `annotations/training` (train), `images/validation` +
    `annotations/validation` (validation)."""
    return datasets.DatasetDict(
        {
            split: paired_split(root / "images" / folder, root / "annotations" / folder)
            for split, folder in (("train", "training"), ("validation", "validation"))
        }
    )


def load_pascal_context_folder(root: Path) -> datasets.DatasetDict:
    """`VOC2010/`: the images of `ImageSets/SegmentationContext/{train,val}.txt` in `JPEGImages`, their label maps
    in `SegmentationClassContext` (0 = background, ignored; 1-59 the classes), mmseg's `PascalContextDataset59`."""
    lists = root / "ImageSets" / "SegmentationContext"
    return datasets.DatasetDict(
        {
            split: paired_split(
                root / "JPEGImages", root / "SegmentationClassContext", stems=read_image_list(lists / f"{name}.txt")
            )
            for split, name in (("train", "train"), ("validation", "val"))
        }
    )


def load_coco_stuff_10k_folder(root: Path) -> datasets.DatasetDict:
    """`images/{train2014,test2014}` + `annotations/{train2014,test2014}` as mmseg's converter writes them
    (`<stem>_labelTrainIds.png`: 0 = unlabelled, 1-171 the classes); plain `<stem>.png` label maps are accepted too.
    The official configs train on train2014 and evaluate on test2014."""
    return datasets.DatasetDict(
        {
            split: paired_split(
                root / "images" / folder, root / "annotations" / folder, annotation_suffixes=("_labelTrainIds", "")
            )
            for split, folder in (("train", "train2014"), ("validation", "test2014"))
        }
    )


def parquet_split_files(root: Path) -> dict[str, list[str]]:
    """Parquet files of a Hub snapshot per split: `<split>-*.parquet`, `<split>/*.parquet` or `<split>.parquet`
    anywhere under `root` (`data/train-00000-of-00002.parquet`, ...); `val` / `valid` count as `validation`."""
    files = {}
    for split, aliases in PARQUET_SPLIT_ALIASES.items():
        for alias in aliases:
            patterns = (f"**/{alias}-*.parquet", f"**/{alias}/*.parquet", f"**/{alias}.parquet")
            found = sorted({path for pattern in patterns for path in root.glob(pattern)})
            if found:
                files[split] = [str(path) for path in found]
                break
    return files


def is_ade20k_snapshot(root: Path) -> bool:
    """A snapshot of `scene_parse_150` (or another ADE20K export): said by its path or its dataset card."""
    markers = ("scene_parse_150", "ade20k", "adechallenge")
    if any(marker in part.lower() for part in root.resolve().parts for marker in markers):
        return True
    card = root / "README.md"
    return card.is_file() and any(marker in card.read_text(errors="ignore")[:8000].lower() for marker in markers)


def load_parquet_folder(root: Path, cache_dir: str | Path | None = None) -> datasets.DatasetDict:
    """A local snapshot of a Hub data set in its parquet export (`data/{train,validation}-*.parquet`)."""
    files = parquet_split_files(root)
    if "train" not in files:
        raise ValueError(f"{root}: found parquet files but none of a `train` split (`train-*.parquet`).")
    return datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache_dir) if cache_dir else None)


def find_root(folder: Path, marker: str, nested: Sequence[str]) -> Path | None:
    """`folder` or one of its `nested` sub-folders, the first that contains `marker` (a relative path)."""
    for candidate in (folder, *(folder / name for name in nested)):
        if (candidate / marker).exists():
            return candidate
    return None


def detect_folder_layout(folder: Path) -> FolderLayout | None:
    """Which layout of [`ACCEPTED_FOLDER_LAYOUTS`] `folder` is in (None when none)."""
    root = find_root(folder, "images/training", ("ADEChallengeData2016",))
    if root is not None and (root / "annotations" / "training").is_dir():
        return FolderLayout("ade20k", root, "ade20k")
    root = find_root(folder, "SegmentationClassContext", ("VOC2010", "VOCdevkit/VOC2010"))
    if root is not None and (root / "ImageSets" / "SegmentationContext").is_dir():
        return FolderLayout("pascal-context-59", root, "pascal-context-59")
    root = find_root(folder, "images/train2014", ())
    if root is not None and (root / "annotations" / "train2014").is_dir():
        return FolderLayout("coco-stuff-10k", root, "coco-stuff-10k")
    if (folder / "dataset_dict.json").is_file():
        return FolderLayout("save-to-disk", folder)
    if parquet_split_files(folder):
        return FolderLayout("parquet", folder, "ade20k" if is_ade20k_snapshot(folder) else None)
    if (folder / "train" / "images").is_dir():
        return FolderLayout("split-folders", folder)
    if (folder / "images").is_dir() and (folder / "annotations").is_dir():
        return FolderLayout("images-annotations", folder)
    return None


def read_id2label(path: str | Path) -> dict[int, str]:
    """Class names from a json file: `{"0": "wall", "1": "building"}` or `["wall", "building"]`."""
    with open(path, encoding="utf-8") as file:
        content = json.load(file)
    if isinstance(content, list):
        return dict(enumerate(str(name) for name in content))
    if isinstance(content, dict):
        return {int(index): str(name) for index, name in sorted(content.items(), key=lambda item: int(item[0]))}
    raise ValueError(f"{path} must hold a json object {{'0': 'name', ...}} or a list of names, got {type(content)}.")


def load_folder_dataset(
    folder: str | Path, cache_dir: str | Path | None = None
) -> tuple[datasets.DatasetDict, dict[int, str] | None, FolderLayout]:
    """Read a local data-set folder in any layout of [`ACCEPTED_FOLDER_LAYOUTS`].

    Returns:
        The splits it has (`train`, and `validation` unless the layout has none), the class names it implies (an
        official layout's, or `id2label.json` in the folder; None otherwise) and the recognised layout.

    Raises:
        ValueError: naming the accepted layouts, when the folder is in none of them.
    """
    folder = Path(folder)
    layout = detect_folder_layout(folder)
    if layout is None:
        found = sorted(path.name for path in folder.iterdir())[:20]
        raise ValueError(
            f"`dataset_name` {str(folder)!r} is a folder in no layout this toolkit reads (it holds {found}). "
            "Accepted layouts:\n  - " + "\n  - ".join(ACCEPTED_FOLDER_LAYOUTS)
        )
    readers = {
        "ade20k": load_ade20k_folder,
        "pascal-context-59": load_pascal_context_folder,
        "coco-stuff-10k": load_coco_stuff_10k_folder,
        "save-to-disk": lambda root: datasets.load_from_disk(str(root)),
        "parquet": lambda root: load_parquet_folder(root, cache_dir),
        "split-folders": lambda root: datasets.DatasetDict(
            {
                split: paired_split(root / name / "images", root / name / "annotations")
                for split, name in (("train", "train"), ("validation", "validation"), ("validation", "val"))
                if (root / name / "images").is_dir()
            }
        ),
        "images-annotations": lambda root: datasets.DatasetDict(
            {"train": paired_split(root / "images", root / "annotations")}
        ),
    }
    dataset = readers[layout.name](layout.root)
    logger.info(f"{folder}: {layout.name} layout, splits { {name: len(split) for name, split in dataset.items()} }")
    id2label = dataset_id2label(layout.preset) if layout.preset is not None else None
    if (folder / "id2label.json").is_file():
        id2label = read_id2label(folder / "id2label.json")
    return dataset, id2label, layout


__all__ = [
    "ACCEPTED_FOLDER_LAYOUTS",
    "IMAGE_EXTENSIONS",
    "FolderLayout",
    "detect_folder_layout",
    "is_ade20k_snapshot",
    "load_ade20k_folder",
    "load_coco_stuff_10k_folder",
    "load_folder_dataset",
    "load_parquet_folder",
    "load_pascal_context_folder",
    "paired_split",
    "parquet_split_files",
    "read_id2label",
    "read_image_list",
]
