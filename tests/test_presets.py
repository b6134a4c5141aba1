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
"""The presets against the official configurations: every value of the tables of `docs/official_recipes.md`, read
from the page itself, so that the documentation and the code cannot drift apart."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_example

from dtop_hf import DToPConfig, DToPForSemanticSegmentation
from dtop_hf.toolkit.data.label_maps import DATASET_LABELS
from dtop_hf.toolkit.data.transforms import SegmentationTrainTransform
from dtop_hf.toolkit.presets import DATASET_PRESETS, MODEL_SIZES, PAPER_PRESETS
from dtop_hf.toolkit.training.optimization import build_optimizer, poly_schedule_factor


RECIPES = Path(__file__).resolve().parents[1] / "docs" / "official_recipes.md"
BACKBONES = {"ViT-B/16": (768, 12, 12, 3072, 16), "ViT-L/16": (1024, 24, 16, 4096, 16)}


def recipe_table(section: str, index: int = 0) -> list[dict[str, str]]:
    """Table `index` under `## <section>` of the recipes page: one `{header: cell}` dict per row, backticks removed."""
    text = RECIPES.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    tables, lines = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            tables.append(lines)
            lines = []

    def cells(line: str) -> list[str]:
        return [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]

    header, _, *rows = tables[index]  # the second line is the |---| separator
    return [dict(zip(cells(header), cells(row), strict=True)) for row in rows]


def recipe_settings(section: str, index: int = 0, key: str = "setting", value: str = "value") -> dict[str, str]:
    """A two-column table as a dict."""
    return {row[key]: row[value] for row in recipe_table(section, index)}


def numbers(text: str) -> list[float]:
    return [float(value) for value in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def rgb(text: str) -> tuple[float, float, float]:
    values = numbers(text)
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def thousands(text: str) -> int:
    return int(text.rstrip("k")) * 1000


def backbone_name(preset) -> str:
    return next(name for name, sizes in BACKBONES.items() if sizes[0] == preset.backbone["hidden_size"])


def test_recipe_tables_cover_every_preset():
    assert {row["preset"] for row in recipe_table("Per configuration")} == set(PAPER_PRESETS)
    assert {row["preset data set"] for row in recipe_table("Data pipelines")} == set(DATASET_PRESETS)


@pytest.mark.parametrize("row", recipe_table("Per configuration"), ids=lambda row: row["preset"])
def test_paper_presets_match_the_per_configuration_table(row):
    preset = PAPER_PRESETS[row["preset"]]
    config = DToPConfig(**preset.config_kwargs())
    assert backbone_name(preset) == row["backbone"]
    hidden, layers, heads, intermediate, patch = BACKBONES[row["backbone"]]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert (config.intermediate_size, config.patch_size) == (intermediate, patch)
    assert config.image_size == preset.dataset.crop_size == int(row["crop = img_size"])
    num_labels = int(row["classes"])
    assert config.num_labels == preset.dataset.num_labels == len(DATASET_LABELS[preset.dataset.name]) == num_labels
    mean, std = row["pixel mean / std (RGB, 0-255)"].split(" / ")
    assert preset.dataset.image_mean == rgb(mean) and preset.dataset.image_std == rgb(std)
    assert config.drop_path_rate == float(row["drop_path_rate"])
    slide_crop, slide_stride = numbers(row["slide crop / stride"])
    assert (preset.dataset.crop_size, preset.dataset.slide_stride) == (slide_crop, slide_stride)
    auxiliary, final = numbers(row["aux / final threshold"])
    assert config.exit_thresholds_per_head() == (auxiliary, auxiliary, final)
    assert preset.prune_schedule.max_steps == thousands(row["iterations (phase 2)"])
    assert config.out_indices == tuple(int(value) for value in numbers(row["heads after layers"]))
    head_width, head_heads = numbers(row["ATM width / attention heads"])
    assert (config.head_hidden_size, config.head_num_attention_heads) == (head_width, head_heads)
    assert (config.head_type, config.head_num_layers, config.head_intermediate_size) == ("atm", 3, 4 * head_width)
    assert config.keep_top_k == 5 and config.layer_norm_eps == 1e-6 and not config.use_cls_token
    # The processor of the converted / fine-tuned model: the same windows and normalisation, in 0-1 units.
    processor = preset.dataset.image_processor_kwargs()
    assert processor["crop_size"] == {"height": slide_crop, "width": slide_crop}
    assert processor["stride"] == {"height": slide_stride, "width": slide_stride}
    assert processor["image_mean"] == pytest.approx([value / 255 for value in rgb(mean)], abs=1e-12)
    assert processor["image_std"] == pytest.approx([value / 255 for value in rgb(std)], abs=1e-12)
    assert processor["do_split_image"] is True


@pytest.mark.parametrize("row", recipe_table("Data pipelines"), ids=lambda row: row["preset data set"])
def test_dataset_presets_match_the_data_pipelines_table(row):
    dataset = DATASET_PRESETS[row["preset data set"]]
    long_side, short_side = numbers(row["S (long, short)"])
    assert dataset.scale == (long_side, short_side)
    processor = dataset.image_processor_kwargs()
    assert processor["size"] == {"shortest_edge": short_side, "longest_edge": long_side}  # test Resize(scale=S)
    train, validation = row["splits (training / evaluation)"].split(" / ")
    assert (dataset.train_split, dataset.validation_split) == (train, validation)
    # The training pipeline, the same for every data set: the section's second table.
    steps = recipe_settings("Data pipelines", 1, key="step", value="setting")
    assert dataset.ratio_range == tuple(numbers(steps["resize"]))
    assert dataset.cat_max_ratio == numbers(steps["crop"])[0]
    assert dataset.do_reduce_labels and "reduce_zero_label=True" in steps["labels"]


def test_pipeline_defaults_are_the_official_ones():
    steps = recipe_settings("Data pipelines", 1, key="step", value="setting")
    transform = SegmentationTrainTransform(None, 512)
    assert transform.scale == (2048, 512) and transform.ratio_range == tuple(numbers(steps["resize"]))
    assert transform.cat_max_ratio == numbers(steps["crop"])[0]
    assert transform.flip_probability == numbers(steps["flip"])[0]
    assert transform.photometric_distortion is not None and transform.ignore_index == numbers(steps["pad"])[-1] == 255


def test_schedule_presets_and_optimizer_match_the_schedule_table():
    settings = recipe_settings("Optimiser and schedule")
    assert settings["optimiser"] == "AdamW"
    (lr,), (weight_decay,) = numbers(settings["learning rate"]), numbers(settings["weight decay"])
    beta1, beta2 = numbers(settings["betas"])
    multiplier = numbers(settings["head learning rate"])[0]
    start_factor, warmup = numbers(settings["warm-up"])
    power = numbers(settings["decay"])[0]
    per_gpu, gpus, total = numbers(settings["batch"])
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


@pytest.mark.parametrize("row", recipe_table("Phase 1: the baseline"), ids=lambda row: row["backbone"])
def test_phase_one_schedules_and_weights_match_the_baseline_table(row):
    """ViT-B's phase 1 stops at 40k iterations but decays towards 160k; ViT-L's runs and decays over 160k."""
    presets = [preset for preset in PAPER_PRESETS.values() if backbone_name(preset) == row["backbone"]]
    assert presets
    for preset in presets:
        schedule = preset.base_schedule
        assert schedule.max_steps == thousands(row["iterations"])
        assert (schedule.decay_steps or schedule.max_steps) == thousands(row["learning rate reaches 0 at"])
        assert preset.backbone_checkpoint.endswith("/" + row["starts from"])


def test_loss_defaults_match_the_loss_table():
    loss = recipe_settings("Loss", key="term", value="setting")
    config = DToPConfig()
    assert numbers(loss["presence"]) == [1.0, 0.1] and config.no_object_weight == 0.1
    alpha, gamma, focal_weight = numbers(loss["mask, focal"])
    assert (config.focal_alpha, config.focal_gamma, config.mask_focal_weight) == (alpha, gamma, focal_weight)
    assert config.mask_dice_weight == numbers(loss["mask, dice"])[0]
    assert config.stage_loss_weights is None  # weight 1 per head
    assert not config.ignore_pixels_as_negatives and "ignore_pixels_as_negatives=True" in loss["unlabelled pixels"]


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_finetune_preset_sets_every_value_and_flags_override(name):
    preset = PAPER_PRESETS[name]
    args = SimpleNamespace(**run_example("finetune", ["--paper_preset", name, "--stage", "prune", "--dry_run"]))
    dataset, schedule = preset.dataset, preset.prune_schedule
    assert (args.crop_size, tuple(args.train_scale), tuple(args.resize_ratio_range)) == (
        dataset.crop_size, dataset.scale, dataset.ratio_range,
    )  # fmt: skip
    assert args.cat_max_ratio == 0.75 and args.do_reduce_labels and args.sliding_window
    assert (args.learning_rate, args.head_lr_multiplier, args.weight_decay) == (2e-5, 10.0, 0.01)
    assert (args.num_warmup_steps, args.max_train_steps) == (1500, schedule.max_steps)
    assert args.per_device_train_batch_size == 4 and args.exit_threshold == preset.exit_threshold
    base = SimpleNamespace(**run_example("finetune", ["--paper_preset", name, "--stage", "base", "--dry_run"]))
    assert base.exit_threshold is None and base.max_train_steps == preset.base_schedule.max_steps
    assert base.lr_decay_steps == preset.base_schedule.decay_steps
    explicit = SimpleNamespace(
        **run_example(
            "finetune",
            ["--preset", name, "--learning_rate", "1e-4", "--crop_size", "64", "--max_train_steps", "7", "--dry_run"],
        )
    )  # the flag of earlier releases still works
    assert (explicit.learning_rate, explicit.crop_size, explicit.max_train_steps) == (1e-4, 64, 7)
    assert explicit.weight_decay == 0.01  # the rest still from the preset


def test_model_sizes_build_and_vit_base_is_the_config_default():
    for name, size in MODEL_SIZES.items():
        DToPConfig(**size)  # valid
    default = DToPConfig()
    for key, value in MODEL_SIZES["vit-base"].items():
        assert getattr(default, key) == value, key
