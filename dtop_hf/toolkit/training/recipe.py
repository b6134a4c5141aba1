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
"""The official two-phase recipe as defaults: what a paper configuration sets for each stage, and the thresholds
and warm-up of runs without one.

Phase 1 (`base`) trains the segmenter without pruning; phase 2 (`prune`) fine-tunes it with the auxiliary exit
thresholds on, tokens exiting in training too.
"""

from typing import Literal

from transformers.utils import logging

from dtop_hf import DToPConfig

from ..presets import PAPER_PRESETS


logger = logging.get_logger(__name__)

Stage = Literal["base", "prune"]
STAGES: tuple[Stage, ...] = ("base", "prune")
# The official ViT-B threshold, for the prune stage when neither the caller, the preset nor the config sets one.
DEFAULT_PRUNE_THRESHOLD = 0.9
# The official warm-up, 1500 of 40k iterations, as a share of the run for runs without a preset.
WARMUP_FRACTION = 1500 / 40000


def preset_defaults(paper_preset: str, stage: Stage) -> dict:
    """The settings a paper configuration gives `stage`, by the example scripts' field names: the data set's crop,
    train scale, crop rule and slide test mode, and the phase's schedule (AdamW, heads 10x, warm-up, poly decay,
    batch per process, iterations) and exit threshold."""
    preset = PAPER_PRESETS[paper_preset]
    dataset, schedule = preset.dataset, preset.base_schedule if stage == "base" else preset.prune_schedule
    return {
        "crop_size": dataset.crop_size,
        "train_scale": list(dataset.scale),
        "resize_ratio_range": list(dataset.ratio_range),
        "cat_max_ratio": dataset.cat_max_ratio,
        "do_reduce_labels": dataset.do_reduce_labels,
        "sliding_window": True,
        "learning_rate": schedule.learning_rate,
        "head_lr_multiplier": schedule.head_lr_multiplier,
        "weight_decay": schedule.weight_decay,
        "num_warmup_steps": schedule.warmup_steps,
        "max_train_steps": schedule.max_steps,
        "lr_decay_steps": schedule.decay_steps,
        "per_device_train_batch_size": schedule.per_device_batch_size,
        "per_device_eval_batch_size": 1,  # the official `val_dataloader` batch
        "exit_threshold": [preset.exit_threshold] if stage == "prune" else None,
    }


def stage_exit_threshold(
    stage: Stage, exit_threshold: float | tuple[float, ...] | None, config: DToPConfig
) -> float | tuple[float, ...]:
    """The thresholds a stage trains with. base: 1.0 (phase 1 trains without pruning). prune: `exit_threshold`,
    else the config's when it prunes, else `DEFAULT_PRUNE_THRESHOLD`."""
    if stage == "base":
        return 1.0
    if exit_threshold is not None:
        return exit_threshold
    if any(value < 1.0 for value in config.exit_thresholds_per_head()[:-1]):
        return config.exit_threshold
    return DEFAULT_PRUNE_THRESHOLD


def warn_unless_official_batch(paper_preset: str | None, total_batch_size: int) -> None:
    """A paper configuration's schedule assumes its batch; say so when this run's differs."""
    if paper_preset not in PAPER_PRESETS:
        return
    official_batch = PAPER_PRESETS[paper_preset].prune_schedule.total_batch_size
    if total_batch_size != official_batch:
        logger.warning(
            f"Paper configuration {paper_preset}: the official batch is {official_batch} images per step, this run's "
            f"is {total_batch_size}; launch 4 processes or set the gradient accumulation steps to match."
        )
