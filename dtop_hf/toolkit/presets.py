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
"""DToP presets: the official configurations (data sets, models, schedules), the small sizes of the quick start, tests
and benchmark, and the default stage layout for a backbone of any depth and width.

Every value of the four official configurations (zbwxp/Dynamic-Token-Pruning `config/prune/*.py`, mmsegmentation 1.x)
lives here once; the converter, `from_vit_pretrained`, `examples/finetune.py --preset`, the benchmark and the quick
start read it.
Class names are data of the toolkit (`dtop_hf.toolkit.data.label_maps`), keyed by `DToPDatasetPreset.name`.
"""

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any


# The official stage layouts (docs/official_recipes.md): ViT-B (12 layers) has its auxiliary heads after 6 and 8 of
# 12 layers, ViT-L (24 layers) after 8 and 16 of 24; the decode head follows the last layer. Backbones as deep as
# ViT-L or deeper use ViT-L's fractions.
SHALLOW_AUXILIARY_FRACTIONS = (Fraction(1, 2), Fraction(2, 3))
DEEP_AUXILIARY_FRACTIONS = (Fraction(1, 3), Fraction(2, 3))
DEEP_BACKBONE_LAYERS = 24
# Both official head widths are half the backbone width with 64-dimensional attention heads (ViT-B: 384 and 6,
# ViT-L: 512 and 8), and the exit thresholds are ViT-B's 0.9 and ViT-L's 0.95.
HEAD_ATTENTION_DIM = 64
SHALLOW_EXIT_THRESHOLD, DEEP_EXIT_THRESHOLD = 0.9, 0.95


def default_stage_layout(num_hidden_layers: int, hidden_size: int) -> dict:
    """The stage layout and head sizes DToP uses for a backbone when none are given.

    Heads sit after the same fractions of the depth as in the official models: after 1/2 and 2/3 of the layers
    for backbones shallower than 24 layers (ViT-B: layers 5, 7, 11), after 1/3 and 2/3 from 24 layers on (ViT-L:
    7, 15, 23), the decode head after the last layer. Each auxiliary head follows layer `round(fraction * depth) - 1`
    (halves round up); heads that would fall on the same layer, or on the decode head's, are merged, so very shallow
    backbones get fewer auxiliary heads. Heads are half the backbone width with 64-dimensional attention heads (the
    largest count up to `width // 2 // 64` that divides the width, at least 1). The result is the official setting
    exactly for ViT-B (12 layers, 768) and ViT-L (24 layers, 1024; the ADE20K head count).

    Args:
        num_hidden_layers: depth of the backbone (>= 1).
        hidden_size: width of the backbone tokens (>= 2).

    Returns:
        `DToPConfig` keyword arguments: `out_indices`, `head_hidden_size`, `head_num_attention_heads` and
        `exit_threshold`. Explicit values given to the config override them.

    Example:

    ```python
    >>> default_stage_layout(12, 384)  # ViT-S, DINOv2-S
    {'out_indices': (5, 7, 11), 'head_hidden_size': 192, 'head_num_attention_heads': 3, 'exit_threshold': 0.9}
    ```
    """
    if num_hidden_layers < 1 or hidden_size < 2:
        raise ValueError(
            f"`num_hidden_layers` must be >= 1 and `hidden_size` >= 2, got {num_hidden_layers} and {hidden_size}."
        )
    is_deep = num_hidden_layers >= DEEP_BACKBONE_LAYERS
    fractions = DEEP_AUXILIARY_FRACTIONS if is_deep else SHALLOW_AUXILIARY_FRACTIONS
    last_layer = num_hidden_layers - 1
    # round half up in exact arithmetic: floor(fraction * depth + 1/2) layers, i.e. after that layer's 0-based index
    auxiliary = {int(fraction * num_hidden_layers + Fraction(1, 2)) - 1 for fraction in fractions}
    out_indices = tuple(sorted(index for index in auxiliary if 0 <= index < last_layer)) + (last_layer,)
    head_hidden_size = hidden_size // 2
    head_num_attention_heads = max(head_hidden_size // HEAD_ATTENTION_DIM, 1)
    while head_hidden_size % head_num_attention_heads:
        head_num_attention_heads -= 1
    return {
        "out_indices": out_indices,
        "head_hidden_size": head_hidden_size,
        "head_num_attention_heads": head_num_attention_heads,
        "exit_threshold": DEEP_EXIT_THRESHOLD if is_deep else SHALLOW_EXIT_THRESHOLD,
    }


# ---------------------------------------------------------------------------------------------------------------
# Backbones (docs/method.md): plain ViTs with 16x16 patches, LayerNorm eps 1e-6.

VIT_BASE_PATCH16: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "patch_size": 16, "layer_norm_eps": 1e-6,
}  # fmt: skip
VIT_LARGE_PATCH16: dict[str, Any] = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "patch_size": 16, "layer_norm_eps": 1e-6,
}  # fmt: skip

# mmseg's `SegDataPreProcessor` statistics (RGB, 0-255): ImageNet's for the ViT-B config, 127.5 for the ViT-L ones.
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
HALF_RANGE_MEAN, HALF_RANGE_STD = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class DToPDatasetPreset:
    """One data set as an official configuration trains and tests on it (docs/official_recipes.md, "Data pipelines").

    Args:
        name: key of the data set (also the key of its class names in `toolkit.data.label_maps.DATASET_LABELS`).
        display_name: how papers and model cards name it.
        num_labels: classes after label reduction.
        crop_size: side of the training crop, of the model's stored position grid and of the test windows.
        scale: `S = (long, short)`: training `RandomResize(scale=S, ratio_range, keep_ratio=True)` and test
            `Resize(scale=S, keep_ratio=True)` (the image scaled by `min(long / long_side, short / short_side)`).
        slide_stride: stride of the test windows (mmseg `test_cfg=dict(mode="slide", stride=...)`).
        image_mean, image_std: RGB normalisation in 0-255 units.
        do_reduce_labels: mmseg `reduce_zero_label` (0 = unlabelled -> 255, k -> k - 1).
        ratio_range: training `RandomResize` ratio range.
        cat_max_ratio: training `RandomCrop` retry rule (see `toolkit.data.transforms.random_crop_box`).
        train_split, validation_split: the official training and evaluation splits.
        card_datasets: data-set ids of a model card's metadata.
    """

    name: str
    display_name: str
    num_labels: int
    crop_size: int
    scale: tuple[int, int]
    slide_stride: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_reduce_labels: bool = True
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    train_split: str = "train"
    validation_split: str = "validation"
    card_datasets: tuple[str, ...] = ()

    def image_processor_kwargs(self) -> dict[str, Any]:
        """`DToPImageProcessor` keyword arguments of the official test mode: keep-ratio resize to `scale`, then
        `crop_size` windows at `slide_stride`, this normalisation (in 0-1 units) and label reduction."""
        long_side, short_side = self.scale
        return {
            "do_split_image": True,
            "size": {"shortest_edge": short_side, "longest_edge": long_side},
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "stride": {"height": self.slide_stride, "width": self.slide_stride},
            # Rounded so that 57.12 / 255 is 0.224, not 0.22399999999999998 (the official values have 3 decimals).
            "image_mean": tuple(round(value / 255, 10) for value in self.image_mean),
            "image_std": tuple(round(value / 255, 10) for value in self.image_std),
            "do_reduce_labels": self.do_reduce_labels,
        }


# docs/official_recipes.md, "Per configuration" and "Data pipelines" (config/_base_/datasets/*.py).
DATASET_PRESETS: dict[str, DToPDatasetPreset] = {
    preset.name: preset
    for preset in (
        DToPDatasetPreset(
            "ade20k", "ADE20K", 150, 512, (2048, 512), 341, IMAGENET_MEAN, IMAGENET_STD,
            train_split="training", validation_split="validation", card_datasets=("scene_parse_150",),
        ),
        DToPDatasetPreset(
            "ade20k-640", "ADE20K", 150, 640, (2560, 640), 320, HALF_RANGE_MEAN, HALF_RANGE_STD,
            train_split="training", validation_split="validation", card_datasets=("scene_parse_150",),
        ),
        DToPDatasetPreset(
            "pascal-context-59", "Pascal Context (59 classes)", 59, 480, (2048, 520), 320, HALF_RANGE_MEAN,
            HALF_RANGE_STD, train_split="train", validation_split="val", card_datasets=("pascal_context",),
        ),
        DToPDatasetPreset(
            "coco-stuff-10k", "COCO-Stuff-10K", 171, 512, (2048, 512), 341, HALF_RANGE_MEAN, HALF_RANGE_STD,
            train_split="train", validation_split="test", card_datasets=("coco_stuff_10k",),
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class DToPSchedulePreset:
    """One training phase of the official recipe (docs/official_recipes.md, "Optimiser and schedule").

    Args:
        max_steps: optimiser steps (mmseg `train_cfg.max_iters`).
        decay_steps: step at which the polynomial decay reaches 0 (`PolyLR(end=...)`); `None` = `max_steps`.
        learning_rate: AdamW learning rate of the backbone.
        head_lr_multiplier: every parameter whose name contains "head" trains at this multiple.
        weight_decay, adam_betas: AdamW's.
        warmup_steps, warmup_start_factor: linear warm-up (`LinearLR(start_factor, end)`).
        poly_power: power of the polynomial decay.
        per_device_batch_size, num_devices: batch 4 per GPU on 4 GPUs.
    """

    max_steps: int
    decay_steps: int | None = None
    learning_rate: float = 2e-5
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1500
    warmup_start_factor: float = 1e-6
    poly_power: float = 0.9
    per_device_batch_size: int = 4
    num_devices: int = 4

    @property
    def total_batch_size(self) -> int:
        return self.per_device_batch_size * self.num_devices


@dataclass(frozen=True)
class DToPPaperPreset:
    """One configuration of the paper: phase 1 (`BASE_segvit_*.py`, thresholds 1.0) and phase 2 (`prune_segvit_*.py`).

    Args:
        name: preset name (also the converter's `--config` and the model folder's suggested name).
        dataset: the data set and its pipelines.
        backbone: `DToPConfig` backbone fields.
        head_num_attention_heads: attention heads of the ATM heads (ViT-L: 8 on ADE20K, 16 on Pascal Context and
            COCO-Stuff); the rest of the stage layout is `default_stage_layout`'s official one.
        drop_path_rate: stochastic depth of the backbone's FFN branch, rising linearly to this value.
        exit_threshold: threshold of the auxiliary heads in phase 2 (the decode head's is always 1.0).
        base_schedule, prune_schedule: phases 1 and 2.
        backbone_checkpoint: the ImageNet ViT weights phase 1 starts from (mmseg layout; the converter reads it).
    """

    name: str
    dataset: DToPDatasetPreset
    backbone: dict[str, Any]
    head_num_attention_heads: int
    drop_path_rate: float
    exit_threshold: float
    base_schedule: DToPSchedulePreset
    prune_schedule: DToPSchedulePreset
    backbone_checkpoint: str
    head_num_layers: int = 3
    keep_top_k: int = 5
    extra_config: dict[str, Any] = field(default_factory=dict)

    def config_kwargs(self) -> dict[str, Any]:
        """`DToPConfig` keyword arguments of the phase-2 model (class names are added by the caller)."""
        layout = default_stage_layout(self.backbone["num_hidden_layers"], self.backbone["hidden_size"])
        return {
            **self.backbone,
            **layout,
            "image_size": self.dataset.crop_size,
            "num_labels": self.dataset.num_labels,
            "head_num_attention_heads": self.head_num_attention_heads,
            "head_num_layers": self.head_num_layers,
            "keep_top_k": self.keep_top_k,
            "drop_path_rate": self.drop_path_rate,
            "exit_threshold": self.exit_threshold,
            **self.extra_config,
        }


SEGMENTER_CHECKPOINTS = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segmenter"
VIT_BASE_CHECKPOINT = f"{SEGMENTER_CHECKPOINTS}/vit_base_p16_384_20220308-96dfe169.pth"
VIT_LARGE_CHECKPOINT = f"{SEGMENTER_CHECKPOINTS}/vit_large_p16_384_20220308-d4efb41d.pth"

# Phase 1 of ViT-B inherits `schedule_40k.py` (40k iterations) but sets `PolyLR(end=160000)`: the rate has decayed to
# 0.79x of its peak when training stops. The ViT-L phase-1 files inherit `schedule_160k.py` and decay over 160k.
VIT_BASE_BASE_SCHEDULE = DToPSchedulePreset(max_steps=40000, decay_steps=160000)
VIT_LARGE_BASE_SCHEDULE = DToPSchedulePreset(max_steps=160000)

# Phase-1 weights and schedule per backbone (config/prune/BASE_segvit_*.py).
BACKBONE_SETTINGS = {
    "vit-base": (VIT_BASE_PATCH16, VIT_BASE_CHECKPOINT, VIT_BASE_BASE_SCHEDULE),
    "vit-large": (VIT_LARGE_PATCH16, VIT_LARGE_CHECKPOINT, VIT_LARGE_BASE_SCHEDULE),
}
# docs/official_recipes.md, "Per configuration" (config/prune/prune_segvit_*.py): name -> data set, backbone, ATM
# attention heads, drop_path_rate, auxiliary exit threshold, phase-2 iterations.
PAPER_CONFIGURATIONS = {
    "dtop-vit-base-ade20k": ("ade20k", "vit-base", 6, 0.1, 0.9, 40000),
    "dtop-vit-large-ade20k": ("ade20k-640", "vit-large", 8, 0.3, 0.95, 40000),
    "dtop-vit-large-pascal-context": ("pascal-context-59", "vit-large", 16, 0.3, 0.95, 40000),
    "dtop-vit-large-coco-stuff-10k": ("coco-stuff-10k", "vit-large", 16, 0.3, 0.95, 20000),
}
PAPER_PRESETS: dict[str, DToPPaperPreset] = {
    name: DToPPaperPreset(
        name=name,
        dataset=DATASET_PRESETS[dataset],
        backbone=BACKBONE_SETTINGS[backbone][0],
        head_num_attention_heads=head_heads,
        drop_path_rate=drop_path_rate,
        exit_threshold=exit_threshold,
        base_schedule=BACKBONE_SETTINGS[backbone][2],
        prune_schedule=DToPSchedulePreset(max_steps=prune_steps),
        backbone_checkpoint=BACKBONE_SETTINGS[backbone][1],
    )
    for name, (dataset, backbone, head_heads, drop_path_rate, exit_threshold, prune_steps) in (
        PAPER_CONFIGURATIONS.items()
    )
}


# ---------------------------------------------------------------------------------------------------------------
# Model sizes: architecture only (no classes, no data), for fresh models. "vit-base" equals the `DToPConfig`
# defaults; "small" is what `examples/finetune.py` builds by default on the built-in 128 px scenes (a 6-layer ViT,
# patch 8, 16x16 tokens, about 5.2M parameters); "quickstart" is narrower and deeper, width 128 and 8 layers with
# the first auxiliary head after layer 1 (2.3M parameters, about 0.16 s per training step on two CPU cores at 96 px),
# so that the built-in scenes show what depth adds; "tiny" is the 4-layer width-32 model of the tests, CI and the
# benchmark.

SMALL_SIZE: dict[str, Any] = {
    "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
    "image_size": 128, "patch_size": 8, "out_indices": (2, 3, 5), "head_hidden_size": 128,
    "head_num_attention_heads": 4, "head_num_layers": 3, "exit_threshold": 0.9,
}  # fmt: skip

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "vit-base": {**VIT_BASE_PATCH16, **default_stage_layout(12, 768), "image_size": 512},
    "vit-large": {**VIT_LARGE_PATCH16, **default_stage_layout(24, 1024), "image_size": 640},
    "vit-small": {
        **VIT_BASE_PATCH16, "hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536,
        **default_stage_layout(12, 768), "head_hidden_size": 192, "head_num_attention_heads": 6, "image_size": 512,
    },
    "small": SMALL_SIZE,
    "quickstart": {
        **SMALL_SIZE, "hidden_size": 128, "num_hidden_layers": 8, "num_attention_heads": 2, "intermediate_size": 512,
        "out_indices": (0, 3, 7), "head_hidden_size": 64, "head_num_attention_heads": 2, "image_size": 96,
    },
    "tiny": {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 4, "out_indices": (1, 2, 3), "head_hidden_size": 16,
        "head_num_attention_heads": 2, "head_num_layers": 1, "exit_threshold": 0.9,
    },
}  # fmt: skip


def model_size_kwargs(name: str) -> dict[str, Any]:
    """`DToPConfig` keyword arguments of a model size of [`MODEL_SIZES`] (a copy, safe to change)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {name!r}: expected one of {sorted(MODEL_SIZES)}.")
    return dict(MODEL_SIZES[name])


__all__ = [
    "DATASET_PRESETS",
    "MODEL_SIZES",
    "PAPER_PRESETS",
    "DToPDatasetPreset",
    "DToPPaperPreset",
    "DToPSchedulePreset",
    "default_stage_layout",
    "model_size_kwargs",
]
