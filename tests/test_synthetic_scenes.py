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
from conftest import load_example
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature

from dtop_hf.toolkit.data.synthetic_scenes import (
    CONTEXT_CLASS_PAIRS,
    NUM_SYNTHETIC_CLASSES,
    SMALL_OBJECT_CLASS_IDS,
    SYNTHETIC_ID2LABEL,
    SYNTHETIC_LABEL2ID,
    dataset_statistics,
    make_synthetic_scenes,
    patch_classifier_accuracy,
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
    assert NUM_SYNTHETIC_CLASSES == len(SYNTHETIC_ID2LABEL) == 10
    assert sorted(SYNTHETIC_ID2LABEL) == list(range(NUM_SYNTHETIC_CLASSES))
    assert {name: idx for idx, name in SYNTHETIC_ID2LABEL.items()} == SYNTHETIC_LABEL2ID
    assert set(SMALL_OBJECT_CLASS_IDS) < set(SYNTHETIC_ID2LABEL)
    paired = {class_id for pair in CONTEXT_CLASS_PAIRS for class_id in pair}
    assert len(set(CONTEXT_CLASS_PAIRS)) == len(CONTEXT_CLASS_PAIRS) and paired.isdisjoint(SMALL_OBJECT_CLASS_IDS)


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
    assert min(classes_per_image) <= 4
    assert max(classes_per_image) >= 8
    assert np.std(classes_per_image) > 1.0
    # Clutter follows the drawn difficulty.
    assert np.corrcoef(reference_dataset["difficulty"], classes_per_image)[0, 1] > 0.4
    counts = reference_statistics["difficulty_histogram"]["counts"]
    assert sum(counts) == NUM_REFERENCE_SAMPLES and min(counts) > 0
    assert 0.005 < reference_statistics["small_object_pixel_share"] < 0.1


def class_ids(*names: str) -> list[int]:
    return [SYNTHETIC_LABEL2ID[name] for name in names]


@pytest.mark.parametrize("pair", CONTEXT_CLASS_PAIRS, ids=lambda pair: "-".join(SYNTHETIC_ID2LABEL[c] for c in pair))
def test_context_pairs_cannot_be_told_apart_from_a_patch(reference_arrays, pair):
    # What a token sees of itself (8 x 8 pixels of a 128 px scene, like the quick start's 8 px patches): colour and
    # texture statistics. A classifier on them is at chance: only the surroundings decide.
    accuracy = patch_classifier_accuracy(reference_arrays, *pair, patch_size=8)
    assert 0.35 < accuracy < 0.65, accuracy


@pytest.mark.parametrize(("first", "second"), [("sky", "cloud"), ("grass", "tree"), ("sand", "road")])
def test_the_same_patch_classifier_tells_other_classes_apart(reference_arrays, first, second):
    # The control: the classifier is strong enough that chance on the context pairs means something.
    assert patch_classifier_accuracy(reference_arrays, *class_ids(first, second), patch_size=8) > 0.95


def touching_pairs(annotation: np.ndarray) -> set[tuple[int, int]]:
    """(class, class) model-id pairs of 4-neighbour pixels with different labels (unlabelled left out)."""
    pairs = set()
    for a, b in ((annotation[:, 1:], annotation[:, :-1]), (annotation[1:], annotation[:-1])):
        change = (a != b) & (a > 0) & (b > 0)
        pairs |= {(int(x) - 1, int(y) - 1) for x, y in zip(a[change], b[change])}
    return pairs | {(y, x) for x, y in pairs}


def test_look_alike_regions_never_touch(reference_arrays):
    # Sky and water look the same, so do cloud and snow: where they touched, the boundary would be invisible. Water is
    # kept from the sky by land, clouds float in the sky, snow lies on land or water (ice).
    forbidden = {
        pair
        for first, others in (("water", ("sky", "cloud")), ("cloud", ("grass", "sand", "road", "snow")),
                              ("snow", ("sky",)))
        for other in others
        for pair in ((SYNTHETIC_LABEL2ID[first], SYNTHETIC_LABEL2ID[other]),)
    }  # fmt: skip
    for index, (_, annotation) in enumerate(reference_arrays):
        assert not touching_pairs(annotation) & forbidden, index


def test_blue_below_the_horizon_is_water_connected_to_the_sea_or_not(reference_arrays):
    # Channels that end short of the sea and ponds inside the land are water like the sea: the class never depends
    # on following a channel (the connectivity class tried earlier was learned by no head in a quick start).
    from scipy import ndimage

    water = class_ids("water")[0] + 1
    scenes_with_cut_off_water = 0
    for _, annotation in reference_arrays:
        _, pieces = ndimage.label(annotation == water)
        scenes_with_cut_off_water += pieces >= 2
    assert scenes_with_cut_off_water >= 20


def test_water_lies_below_the_horizon_and_clouds_above_land(reference_arrays):
    # Context the model can use: in every column, water is below the sky and snow below the clouds.
    sky, water, cloud, snow = (value + 1 for value in class_ids("sky", "water", "cloud", "snow"))
    for _, annotation in reference_arrays:
        rows = np.arange(annotation.shape[0])[:, None]
        for upper, lower in ((sky, water), (cloud, snow), (sky, snow)):
            lowest_upper = np.where(annotation == upper, rows, -1).max(axis=0)
            highest_lower = np.where(annotation == lower, rows, annotation.shape[0]).min(axis=0)
            assert (lowest_upper < highest_lower).all()


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
