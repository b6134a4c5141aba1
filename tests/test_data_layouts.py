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
"""Every data-set layout `--dataset_name` accepts, built from made-up files in the exact layout: it loads with the
right splits and class names, and `examples/finetune.py` trains 2 steps on it with a tiny model."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import run_example
from PIL import Image

from dtop_hf import DToPForSemanticSegmentation
from dtop_hf.toolkit.data.datasets import check_segmentation_split, load_segmentation_dataset
from dtop_hf.toolkit.data.label_maps import ADE20K_LABELS, COCO_STUFF_LABELS, PASCAL_CONTEXT_59_LABELS
from dtop_hf.toolkit.data.layouts import ACCEPTED_FOLDER_LAYOUTS, detect_folder_layout
from dtop_hf.toolkit.data.synthetic_scenes import SYNTHETIC_ID2LABEL


RNG = np.random.default_rng(0)


def write_pair(image_path: Path, label_path: Path, max_label: int, size: tuple[int, int] = (40, 30)) -> None:
    """A random JPEG/PNG image and a label PNG with values in [0, max_label] (0 = unlabelled)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    Image.fromarray(RNG.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(RNG.integers(0, max_label + 1, (height, width), dtype=np.uint8)).save(label_path)


def write_ade20k(root: Path) -> Path:
    """ADEChallengeData2016/images/{training,validation}/ADE_*.jpg + annotations/.../ADE_*.png (values 0-150)."""
    release = root / "ADEChallengeData2016"
    for split, prefix, count in (("training", "ADE_train", 4), ("validation", "ADE_val", 2)):
        for index in range(count):
            stem = f"{prefix}_{index + 1:08d}"
            image, label = release / "images" / split / f"{stem}.jpg", release / "annotations" / split / f"{stem}.png"
            write_pair(image, label, 150)
    (release / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    return release


def write_pascal_context(root: Path) -> Path:
    """VOCdevkit/VOC2010: JPEGImages, SegmentationClassContext (values 0-59), ImageSets/SegmentationContext lists.
    JPEGImages holds more images than the lists name (as the real VOC2010 does): only the listed ones are read."""
    voc = root / "VOCdevkit" / "VOC2010"
    stems = [f"2008_{index:06d}" for index in range(8)]
    for stem in stems:
        write_pair(voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClassContext" / f"{stem}.png", 59)
    lists = voc / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (lists / "val.txt").write_text("\n".join(stems[4:6]) + "\n")
    return root / "VOCdevkit"


def write_coco_stuff_10k(root: Path) -> Path:
    """images/{train2014,test2014}/COCO_*.jpg + annotations/.../COCO_*_labelTrainIds.png (mmseg's converter;
    values 0-171, 0 = unlabelled)."""
    data = root / "coco_stuff10k"
    for split, count in (("train2014", 4), ("test2014", 2)):
        for index in range(count):
            stem = f"COCO_{split}_{index:012d}"
            label = data / "annotations" / split / f"{stem}_labelTrainIds.png"
            write_pair(data / "images" / split / f"{stem}.jpg", label, 171)
    return data


def image_split(
    count: int, max_label: int, extra_column: bool = True, names: tuple[str, str] = ("image", "annotation")
) -> datasets.Dataset:
    images = [Image.fromarray(RNG.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(count)]
    labels = [Image.fromarray(RNG.integers(0, max_label + 1, (30, 40), dtype=np.uint8)) for _ in range(count)]
    columns = {names[0]: images, names[1]: labels}
    features = {names[0]: datasets.Image(), names[1]: datasets.Image()}
    if extra_column:
        columns["scene_category"], features["scene_category"] = list(range(count)), datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def write_parquet_snapshot(root: Path) -> Path:
    """A local snapshot of the Hub's `scene_parse_150` parquet export: data/{train,validation}-*.parquet."""
    snapshot = root / "datasets--zhoubolei--scene_parse_150" / "snapshots" / "0123abc"
    (snapshot / "data").mkdir(parents=True)
    image_split(4, 150).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    image_split(2, 150).to_parquet(str(snapshot / "data" / "validation-00000-of-00001.parquet"))
    (snapshot / "README.md").write_text("---\npretty_name: MIT Scene Parsing Benchmark\n---\n")
    return snapshot


def write_images_annotations(root: Path) -> Path:
    folder = root / "my_data"
    for index in range(6):
        write_pair(folder / "images" / f"img_{index}.png", folder / "annotations" / f"img_{index}.png", 3)
    (folder / "id2label.json").write_text(json.dumps(["road", "sky", "tree"]))
    return folder


# layout name, writer, class names, (train, validation) sizes
LAYOUTS = {
    "ade20k": (write_ade20k, ADE20K_LABELS, (4, 2)),
    "pascal-context-59": (write_pascal_context, PASCAL_CONTEXT_59_LABELS, (4, 2)),
    "coco-stuff-10k": (write_coco_stuff_10k, COCO_STUFF_LABELS, (4, 2)),
    "parquet": (write_parquet_snapshot, ADE20K_LABELS, (4, 2)),
    "images-annotations": (write_images_annotations, ("road", "sky", "tree"), (4, 2)),  # 20% of 6, rounded up
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_is_recognised_with_its_splits_and_class_names(layout, tmp_path):
    writer, names, sizes = LAYOUTS[layout]
    folder = writer(tmp_path)
    assert detect_folder_layout(folder).name == layout
    dataset, id2label = load_segmentation_dataset(str(folder), validation_split_percentage=20)
    assert id2label == dict(enumerate(names))
    assert (len(dataset["train"]), len(dataset["validation"])) == sizes
    assert {"image", "annotation"} <= set(dataset["train"].column_names)
    for split_name, split in dataset.items():  # every label value is a class after reduce_zero_label, or ignored
        checked, report = check_segmentation_split(split, split_name, len(id2label), do_reduce_labels=True)
        assert report.num_skipped == 0


def test_official_lists_and_label_names_are_followed(tmp_path):
    """Pascal Context reads the images its lists name, in list order; COCO-Stuff pairs `<stem>.jpg` with
    `<stem>_labelTrainIds.png`."""
    dataset, _ = load_segmentation_dataset(str(write_pascal_context(tmp_path)))
    assert [Path(dataset["train"][index]["image"].filename).stem for index in range(4)] == [
        f"2008_{index:06d}" for index in range(4)
    ]
    dataset, _ = load_segmentation_dataset(str(write_coco_stuff_10k(tmp_path)))
    sample = dataset["validation"][0]
    assert Path(sample["annotation"].filename).name == Path(sample["image"].filename).stem + "_labelTrainIds.png"


def test_hub_columns_are_found_or_named_by_flag(tmp_path):
    snapshot = tmp_path / "other_snapshot"
    (snapshot / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        image_split(3, 4, extra_column=False, names=("pixel_values", "seg")).to_parquet(
            str(snapshot / "data" / f"{split}-00000-of-00001.parquet")
        )
    (snapshot / "id2label.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c", "3": "d"}))
    with pytest.raises(ValueError, match=r"annotation column.*--label_column_name"):
        load_segmentation_dataset(str(snapshot))
    dataset, id2label = load_segmentation_dataset(str(snapshot), annotation_column="seg")
    assert dataset["train"].column_names[:2] == ["image", "annotation"] and len(id2label) == 4


def test_unknown_folder_names_the_accepted_layouts(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="Accepted layouts") as error:
        load_segmentation_dataset(str(tmp_path / "photos"))
    for layout in ACCEPTED_FOLDER_LAYOUTS:
        assert layout in str(error.value)


@pytest.mark.parametrize("layout", sorted(LAYOUTS) + ["builtin"])
def test_finetune_trains_two_steps_on_each_layout(layout, tmp_path):
    dataset_name = "builtin" if layout == "builtin" else str(LAYOUTS[layout][0](tmp_path / "data"))
    output_dir = tmp_path / "run"
    run_example("finetune", [
        "--device", "cpu", "--dataset_name", dataset_name, "--model_size", "tiny", "--crop_size", "32",
        "--output_dir", str(output_dir), "--synthetic_image_size", "32", "--synthetic_train_samples", "4",
        "--synthetic_validation_samples", "2", "--validation_split_percentage", "20",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--max_train_steps", "2", "--num_warmup_steps", "1", "--learning_rate", "1e-3",
    ])  # fmt: skip
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_steps"] == 2 and results["eval_num_images"] >= 1
    losses = [json.loads(line)["loss"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    model = DToPForSemanticSegmentation.from_pretrained(output_dir)
    expected = len(SYNTHETIC_ID2LABEL) if layout == "builtin" else len(LAYOUTS[layout][1])
    assert model.config.num_labels == expected
