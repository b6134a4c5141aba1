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

"""Tests of the built-in synthetic segmentation scenes."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature

from conftest import load_example
from dtop_hf.toolkit.data.synthetic_scenes import (
    NUM_SYNTHETIC_CLASSES,
    SMALL_OBJECT_CLASS_IDS,
    SYNTHETIC_ID2LABEL,
    SYNTHETIC_LABEL2ID,
    dataset_statistics,
    make_synthetic_scenes,
    render_synthetic_scene,
    render_synthetic_scene_arrays,
    scene_difficulty,
    synthetic_dataset_dict,
)

NUM_REFERENCE_SAMPLES = 200


@pytest.fixture(scope="module")
def reference_dataset() -> Dataset:
    return make_synthetic_scenes(NUM_REFERENCE_SAMPLES, image_size=128, seed=0)


@pytest.fixture(scope="module")
def reference_arrays(reference_dataset: Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (np.asarray(row["image"]), np.asarray(row["annotation"]))
        for row in reference_dataset.select_columns(["image", "annotation"])
    ]


@pytest.fixture(scope="module")
def reference_statistics(reference_dataset: Dataset) -> dict:
    return dataset_statistics(reference_dataset)


def _encoded_bytes(ds: Dataset) -> list[bytes]:
    raw = ds.cast_column("image", ImageFeature(decode=False)).cast_column("annotation", ImageFeature(decode=False))
    return [row["image"]["bytes"] + row["annotation"]["bytes"] for row in raw]


def test_label_maps_are_consistent():
    assert NUM_SYNTHETIC_CLASSES == len(SYNTHETIC_ID2LABEL) >= 14
    assert sorted(SYNTHETIC_ID2LABEL) == list(range(NUM_SYNTHETIC_CLASSES))
    assert {name: idx for idx, name in SYNTHETIC_ID2LABEL.items()} == SYNTHETIC_LABEL2ID
    assert set(SMALL_OBJECT_CLASS_IDS) < set(SYNTHETIC_ID2LABEL)


def test_same_seed_gives_identical_bytes():
    assert _encoded_bytes(make_synthetic_scenes(4, 64, seed=7)) == _encoded_bytes(make_synthetic_scenes(4, 64, seed=7))


def test_seed_and_split_change_the_samples():
    reference = _encoded_bytes(make_synthetic_scenes(3, 64, seed=0))
    other_seed = _encoded_bytes(make_synthetic_scenes(3, 64, seed=1))
    other_split = _encoded_bytes(make_synthetic_scenes(3, 64, seed=0, split="validation"))
    assert all(a != b for a, b in zip(reference, other_seed))
    assert all(a != b for a, b in zip(reference, other_split))


def test_any_sample_can_be_regenerated_alone(reference_dataset: Dataset, reference_arrays):
    index = 17
    image, annotation, difficulty = render_synthetic_scene_arrays(index, 128, seed=0, split="train")
    np.testing.assert_array_equal(image, reference_arrays[index][0])
    np.testing.assert_array_equal(annotation, reference_arrays[index][1])
    assert difficulty == pytest.approx(reference_dataset[index]["difficulty"], abs=1e-6)
    assert scene_difficulty(index, seed=0, split="train") == difficulty


def test_schema_matches_scene_parse_150(reference_dataset: Dataset):
    assert {"image", "annotation"} <= set(reference_dataset.column_names)
    assert isinstance(reference_dataset.features["image"], ImageFeature)
    assert isinstance(reference_dataset.features["annotation"], ImageFeature)
    row = reference_dataset[0]
    assert row["image"].mode == "RGB"
    assert row["annotation"].mode == "L"
    assert row["image"].size == row["annotation"].size == (128, 128)
    small = render_synthetic_scene(0, image_size=48)
    assert small["image"].size == small["annotation"].size == (48, 48)


def test_labels_are_in_range_and_mostly_labelled(reference_arrays, reference_statistics: dict):
    for _, annotation in reference_arrays:
        assert annotation.dtype == np.uint8
        assert annotation.max() <= NUM_SYNTHETIC_CLASSES
    # 0 is "other" (ignored after reduce_labels); it must stay rare.
    assert 0.0 < reference_statistics["unlabelled_pixel_share"] < 0.02


def test_every_class_appears(reference_statistics: dict):
    frequencies = reference_statistics["class_pixel_frequency"]
    assert set(frequencies) == set(SYNTHETIC_ID2LABEL.values())
    assert all(share > 0 for share in frequencies.values()), frequencies
    assert sum(frequencies.values()) == pytest.approx(1.0)


def test_difficulty_varies_from_simple_to_cluttered(reference_dataset: Dataset, reference_statistics: dict):
    classes_per_image = [
        int(np.count_nonzero(np.bincount(np.asarray(a).ravel(), minlength=256)[1:]))
        for a in reference_dataset["annotation"]
    ]
    assert min(classes_per_image) <= 3
    assert max(classes_per_image) >= 10
    assert np.std(classes_per_image) > 1.5
    # Clutter follows the drawn difficulty.
    assert np.corrcoef(reference_dataset["difficulty"], classes_per_image)[0, 1] > 0.5
    counts = reference_statistics["difficulty_histogram"]["counts"]
    assert sum(counts) == NUM_REFERENCE_SAMPLES and min(counts) > 0
    assert 0.005 < reference_statistics["small_object_pixel_share"] < 0.1


TEXTURE_PAIR_CLASSES = ("road", "stone", "sky", "water")


@pytest.fixture(scope="module")
def texture_measurements(reference_arrays) -> dict[str, tuple[np.ndarray, tuple[float, float], float]]:
    """Per class: mean colour, high-frequency energy (mean |neighbour difference| inside the class,
    along x and y) and low-frequency energy (within-image variance of 8x8 block means)."""
    collected = {name: ([], [], [], []) for name in TEXTURE_PAIR_CLASSES}
    for image, annotation in reference_arrays:
        image = image.astype(np.float32)
        diff_x = np.abs(image[:, 1:] - image[:, :-1]).mean(-1)
        diff_y = np.abs(image[1:] - image[:-1]).mean(-1)
        block_means = image.mean(-1).reshape(16, 8, 16, 8).mean((1, 3))
        for name, (colours, diffs_x, diffs_y, block_variances) in collected.items():
            inside = annotation == SYNTHETIC_LABEL2ID[name] + 1
            colours.append(image[inside])
            diffs_x.append(diff_x[inside[:, 1:] & inside[:, :-1]])
            diffs_y.append(diff_y[inside[1:] & inside[:-1]])
            full_blocks = inside.reshape(16, 8, 16, 8).all((1, 3))
            if full_blocks.sum() >= 4:
                block_variances.append(block_means[full_blocks].var())
    return {
        name: (
            np.concatenate(colours).mean(0),
            (float(np.concatenate(diffs_x).mean()), float(np.concatenate(diffs_y).mean())),
            float(np.mean(block_variances)),
        )
        for name, (colours, diffs_x, diffs_y, block_variances) in collected.items()
    }


@pytest.mark.parametrize(
    ("fine_name", "coarse_name", "axis"),
    [("road", "stone", 0), ("water", "sky", 1)],  # axis of the difference that carries the texture
)
def test_texture_only_classes_share_colour_but_not_texture(texture_measurements, fine_name, coarse_name, axis):
    fine_colour, fine_hf, _ = texture_measurements[fine_name]
    coarse_colour, coarse_hf, _ = texture_measurements[coarse_name]
    assert np.abs(fine_colour - coarse_colour).max() < 8.0, (fine_colour, coarse_colour)
    assert fine_hf[axis] > 1.6 * coarse_hf[axis], (fine_hf, coarse_hf)


def test_stone_is_blotchy_at_low_frequency(texture_measurements):
    road_blocks, stone_blocks = texture_measurements["road"][2], texture_measurements["stone"][2]
    assert stone_blocks > 3.0 * road_blocks, (stone_blocks, road_blocks)


def test_dataset_dict_has_independent_splits():
    splits = synthetic_dataset_dict(num_train=3, num_validation=2, image_size=32, seed=0)
    assert isinstance(splits, DatasetDict)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 3, "validation": 2}
    assert _encoded_bytes(splits["train"].select(range(2))) != _encoded_bytes(splits["validation"])


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError):
        make_synthetic_scenes(-1)
    with pytest.raises(ValueError):
        make_synthetic_scenes(1, image_size=8)


def test_cli_writes_previews(tmp_path):
    main = load_example("preview_scenes").main
    main(["--num_samples", "2", "--output_dir", str(tmp_path), "--image_size", "32", "--zoom", "1"])
    previews = sorted(tmp_path.glob("train_*.png"))
    assert len(previews) == 2
    assert (tmp_path / "legend.png").exists()


def test_cli_help(capsys):
    main = load_example("preview_scenes").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--num_samples" in capsys.readouterr().out
