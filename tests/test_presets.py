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
"""The presets against the official configurations: every value of official-configs.md's tables, read from the
tables' text (copied below verbatim; compared with the reference file itself when it is present)."""

import re
from pathlib import Path

import pytest
import torch
from conftest import load_example

from dtop_hf import DToPConfig, DToPForSemanticSegmentation
from dtop_hf.toolkit.presets import DATASET_PRESETS, MODEL_SIZES, PAPER_PRESETS
from dtop_hf.toolkit.data.label_maps import DATASET_LABELS
from dtop_hf.toolkit.data.transforms import SegmentationTrainTransform
from dtop_hf.toolkit.training.optimization import build_optimizer, poly_schedule_factor


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official-configs.md"

PER_CONFIGURATION = """
| `prune_segvit_ade20k` | ViT-B/16 | 512 | 150 | 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 | 0.1 | 512 / 341 | 0.9 / 1.0 | 40k |
| `prune_segvit_ade20k_large` | ViT-L/16 | 640 | 150 | 127.5 / 127.5 | 0.3 | 640 / 320 | 0.95 / 1.0 | 40k |
| `prune_segvit_pc` | ViT-L/16 | 480 | 59 | 127.5 / 127.5 | 0.3 | 480 / 320 | 0.95 / 1.0 | 40k |
| `prune_segvit_cocostuff10k` | ViT-L/16 | 512 | 171 | 127.5 / 127.5 | 0.3 | 512 / 341 | 0.95 / 1.0 | 20k |
"""  # noqa: E501

DATA_PIPELINES = """
| ADE20K, 512 crop | (2048, 512) | `images/training`, `annotations/training`; `images/validation`, `annotations/validation` (the `ADEChallengeData2016` release) | training / validation |
| ADE20K, 640 crop | (2560, 640) | same | same |
| Pascal Context 59 | (2048, 520) | `JPEGImages`, `SegmentationClassContext`; image lists `ImageSets/SegmentationContext/{train,val}.txt` (VOC2010) | train / val |
| COCO-Stuff-10K | (2048, 512) | `images/train2014`, `annotations/train2014`; `images/test2014`, `annotations/test2014` | train / test |
"""  # noqa: E501

SCHEDULE = """
AdamW lr 2e-5, betas (0.9, 0.999), weight decay 0.01; every parameter whose name contains "head" at 10x lr;
no gradient clipping in effect; linear warm-up from 1e-6x over 1500 iterations, then polynomial decay (power 0.9)
to 0 at the phase's end; batch 4 per GPU on 4 GPUs = 16.
"""

CONFIG_TO_PRESET = {
    "prune_segvit_ade20k": "dtop-vit-base-ade20k",
    "prune_segvit_ade20k_large": "dtop-vit-large-ade20k",
    "prune_segvit_pc": "dtop-vit-large-pascal-context",
    "prune_segvit_cocostuff10k": "dtop-vit-large-coco-stuff-10k",
}
PIPELINE_TO_DATASET = {
    "ADE20K, 512 crop": "ade20k",
    "ADE20K, 640 crop": "ade20k-640",
    "Pascal Context 59": "pascal-context-59",
    "COCO-Stuff-10K": "coco-stuff-10k",
}
BACKBONES = {"ViT-B/16": (768, 12, 12, 3072, 16), "ViT-L/16": (1024, 24, 16, 4096, 16)}


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.strip().splitlines()]


def numbers(text: str) -> list[float]:
    return [float(value) for value in re.findall(r"\d+(?:\.\d+)?", text)]


def rgb(text: str) -> tuple[float, float, float]:
    values = numbers(text)
    return tuple(values * 3) if len(values) == 1 else tuple(values)


@pytest.mark.skipif(not REFERENCE.is_file(), reason="official-configs.md is not beside the repository")
def test_tables_here_are_the_reference_text():
    reference = REFERENCE.read_text()
    for block in (PER_CONFIGURATION, DATA_PIPELINES):
        for line in block.strip().splitlines():
            assert line in reference, line
    assert " ".join(SCHEDULE.split()) in " ".join(reference.split())


@pytest.mark.parametrize("row", table_rows(PER_CONFIGURATION), ids=lambda row: row[0].strip("`"))
def test_paper_presets_match_the_per_configuration_table(row):
    config_file, backbone, crop, classes, mean_std, drop_path, slide, thresholds, iterations = row
    preset = PAPER_PRESETS[CONFIG_TO_PRESET[config_file.strip("`")]]
    config = DToPConfig(**preset.config_kwargs())
    hidden, layers, heads, intermediate, patch = BACKBONES[backbone]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert (config.intermediate_size, config.patch_size) == (intermediate, patch)
    assert config.image_size == preset.dataset.crop_size == int(crop)
    assert config.num_labels == preset.dataset.num_labels == len(DATASET_LABELS[preset.dataset.name]) == int(classes)
    mean, std = mean_std.split(" / ")
    assert preset.dataset.image_mean == rgb(mean) and preset.dataset.image_std == rgb(std)
    assert config.drop_path_rate == float(drop_path)
    slide_crop, slide_stride = numbers(slide)
    assert (preset.dataset.crop_size, preset.dataset.slide_stride) == (slide_crop, slide_stride)
    auxiliary, final = numbers(thresholds)
    assert config.exit_thresholds_per_head() == (auxiliary, auxiliary, final)
    assert preset.prune_schedule.max_steps == int(iterations.rstrip("k")) * 1000
    # The processor of the converted / fine-tuned model: the same windows and normalisation, in 0-1 units.
    processor = preset.dataset.image_processor_kwargs()
    assert processor["crop_size"] == {"height": slide_crop, "width": slide_crop}
    assert processor["stride"] == {"height": slide_stride, "width": slide_stride}
    assert processor["image_mean"] == pytest.approx([value / 255 for value in rgb(mean)], abs=1e-12)
    assert processor["image_std"] == pytest.approx([value / 255 for value in rgb(std)], abs=1e-12)
    assert processor["do_split_image"] is True


@pytest.mark.parametrize("row", table_rows(DATA_PIPELINES), ids=lambda row: row[0])
def test_dataset_presets_match_the_data_pipelines_table(row):
    name, scale, _, splits = row
    dataset = DATASET_PRESETS[PIPELINE_TO_DATASET[name]]
    long_side, short_side = numbers(scale)
    assert dataset.scale == (long_side, short_side)
    processor = dataset.image_processor_kwargs()
    assert processor["size"] == {"shortest_edge": short_side, "longest_edge": long_side}  # test Resize(scale=S)
    if splits != "same":
        train, validation = splits.split(" / ")
        assert (dataset.train_split, dataset.validation_split) == (train, validation)
    # Training pipeline of every data set: RandomResize ratio 0.5-2.0, RandomCrop cat_max_ratio 0.75, RandomFlip 0.5,
    # reduce_zero_label.
    assert dataset.ratio_range == (0.5, 2.0) and dataset.cat_max_ratio == 0.75 and dataset.do_reduce_labels


def test_pipeline_defaults_are_the_official_ones():
    transform = SegmentationTrainTransform(None, 512)
    assert transform.scale == (2048, 512) and transform.ratio_range == (0.5, 2.0)
    assert transform.cat_max_ratio == 0.75 and transform.flip_probability == 0.5
    assert transform.photometric_distortion is not None and transform.ignore_index == 255


def schedule_value(pattern: str) -> float:
    return float(re.search(pattern, " ".join(SCHEDULE.split())).group(1))


def test_schedule_presets_and_optimizer_match_the_schedule_text():
    lr, weight_decay = schedule_value(r"AdamW lr ([0-9.e-]+),"), schedule_value(r"weight decay ([0-9.]+);")
    beta1, beta2 = (float(value) for value in re.search(r"betas \(([0-9.]+), ([0-9.]+)\)", SCHEDULE).groups())
    multiplier, start_factor = schedule_value(r'at (\d+)x lr'), schedule_value(r"from ([0-9.e-]+)x")
    warmup, power = schedule_value(r"over (\d+) iterations"), schedule_value(r"power ([0-9.]+)")
    batch = re.search(r"batch (\d+) per GPU on (\d+) GPUs = (\d+)", SCHEDULE)
    per_gpu, gpus, total = (float(value) for value in batch.groups())
    for preset in PAPER_PRESETS.values():
        for schedule in (preset.base_schedule, preset.prune_schedule):
            assert (schedule.learning_rate, schedule.weight_decay) == (lr, weight_decay)
            assert schedule.adam_betas == (beta1, beta2)
            assert (schedule.head_lr_multiplier, schedule.warmup_start_factor) == (multiplier, start_factor)
            assert (schedule.warmup_steps, schedule.poly_power) == (warmup, power)
            assert (schedule.per_device_batch_size, schedule.num_devices) == (per_gpu, gpus)
            assert schedule.total_batch_size == total
    # The library defaults are the same recipe: AdamW groups and the warm-up / poly factor.
    torch.manual_seed(0)
    model = DToPForSemanticSegmentation(DToPConfig(**MODEL_SIZES["tiny"], num_labels=3))
    optimizer = build_optimizer(model)
    groups = optimizer.param_groups
    assert {group["name"]: group["lr"] for group in groups} == {"backbone": lr, "heads": lr * multiplier}
    assert all(group["betas"] == (beta1, beta2) and group["weight_decay"] == weight_decay for group in groups)
    assert poly_schedule_factor(0, 1500, 40000) == start_factor and poly_schedule_factor(1500, 1500, 40000) == 1.0
    assert poly_schedule_factor(40000, 1500, 40000) == 0.0
    assert poly_schedule_factor(20750, 1500, 40000) == pytest.approx(0.5**power)


def test_phase_one_schedules_follow_the_base_configs():
    """BASE_segvit_ade20k.py: schedule_40k (40k iterations) with PolyLR(end=160000); the ViT-L BASE files:
    schedule_160k (160k iterations, decay to 160k)."""
    base = PAPER_PRESETS["dtop-vit-base-ade20k"].base_schedule
    assert (base.max_steps, base.decay_steps) == (40000, 160000)
    for name in ("dtop-vit-large-ade20k", "dtop-vit-large-pascal-context", "dtop-vit-large-coco-stuff-10k"):
        schedule = PAPER_PRESETS[name].base_schedule
        assert schedule.max_steps == 160000 and schedule.decay_steps is None


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_finetune_preset_sets_every_value_and_flags_override(name):
    finetune = load_example("finetune")
    preset = PAPER_PRESETS[name]
    args = finetune.parse_args(["--preset", name, "--stage", "prune"])
    dataset, schedule = preset.dataset, preset.prune_schedule
    assert (args.crop_size, tuple(args.train_scale), tuple(args.resize_ratio_range)) == (
        dataset.crop_size, dataset.scale, dataset.ratio_range,
    )  # fmt: skip
    assert args.cat_max_ratio == 0.75 and args.do_reduce_labels and args.sliding_window
    assert (args.learning_rate, args.head_lr_multiplier, args.weight_decay) == (2e-5, 10.0, 0.01)
    assert (args.num_warmup_steps, args.max_train_steps) == (1500, schedule.max_steps)
    assert args.per_device_train_batch_size == 4 and args.exit_threshold == preset.exit_threshold
    base = finetune.parse_args(["--preset", name, "--stage", "base"])
    assert base.exit_threshold is None and base.max_train_steps == preset.base_schedule.max_steps
    assert base.lr_decay_steps == preset.base_schedule.decay_steps
    explicit = finetune.parse_args(
        ["--preset", name, "--learning_rate", "1e-4", "--crop_size", "64", "--max_train_steps", "7"]
    )
    assert (explicit.learning_rate, explicit.crop_size, explicit.max_train_steps) == (1e-4, 64, 7)
    assert explicit.weight_decay == 0.01  # the rest still from the preset


def test_model_sizes_build_and_vit_base_is_the_config_default():
    for name, size in MODEL_SIZES.items():
        DToPConfig(**size)  # valid
    default = DToPConfig()
    for key, value in MODEL_SIZES["vit-base"].items():
        assert getattr(default, key) == value, key
