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
"""Training helpers for DToP fine-tuning: config overrides and presets, optimiser groups, schedule, checkpoints."""

import ast
import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...configuration_dtop import DToPConfig


logger = logging.get_logger(__name__)

# A small ViT for the built-in 128 px data set: patch 8 gives a 16x16 token grid; about 5.2M parameters
# (backbone 2.7M, three ATM heads 2.5M) that train at a few images per second on two CPU cores.
SMALL_PRESET: dict[str, Any] = {
    "hidden_size": 192,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "image_size": 128,
    "patch_size": 8,
    "out_indices": (2, 3, 5),
    "head_hidden_size": 128,
    "head_num_attention_heads": 4,
    "head_num_layers": 3,
    "exit_threshold": 0.9,
}

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAIN_SCOPES = ("all", "heads")


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split `text` at `separator`s that are not inside brackets or quotes: "a=[1,2],b=3" -> ["a=[1,2]", "b=3"]."""
    parts, depth, quote, start = [], 0, None, 0
    for position, character in enumerate(text):
        if quote:
            quote = None if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character in "[(":
            depth += 1
        elif character in "])":
            depth -= 1
        elif character == separator and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_override_value(text: str) -> Any:
    """One override value: `[1,2,3]` / `(0.9,0.95)` -> list, `true`/`false` -> bool, `none`/`null` -> None,
    numbers -> int or float, anything else -> the string itself (quotes optional)."""
    text = text.strip()
    if text[:1] in "[(" and text[-1:] in "])":
        return [parse_override_value(item) for item in split_top_level(text[1:-1])]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, str)) else text


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """Parse `--config_overrides` ("hidden_size=64,out_indices=[1,2,3],exit_threshold=[0.9,0.95]") into a dict.

    Unlike transformers' `PreTrainedConfig.update_from_string`, list values (and bools, None, quoted strings)
    are accepted.

    Raises:
        ValueError: for an item without `=` or a key given twice.
    """
    if not overrides:
        return {}
    parsed = {}
    for item in split_top_level(overrides):
        key, separator, value = item.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ValueError(f"`--config_overrides` items must look like `name=value`, got {item!r} in {overrides!r}.")
        if key in parsed:
            raise ValueError(f"`--config_overrides` sets {key!r} twice in {overrides!r}.")
        parsed[key] = parse_override_value(value)
    return parsed


def check_config_fields(overrides: dict[str, Any]) -> None:
    """Raise a ValueError naming every override that is not a DToPConfig field, with the closest field names."""
    fields = {field.name for field in dataclasses.fields(DToPConfig)} | {"num_labels"}
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        hints = {key: difflib.get_close_matches(key, sorted(fields), n=3) for key in unknown}
        raise ValueError(f"Unknown DToPConfig fields in `--config_overrides`: {hints} (name: closest fields).")


def default_out_indices(num_hidden_layers: int) -> tuple[int, ...]:
    """Heads at 1/2 and 2/3 of the depth and after the last layer: ViT-B's (5, 7, 11) for 12 layers."""
    indices = {num_hidden_layers // 2 - 1, (2 * num_hidden_layers) // 3 - 1, num_hidden_layers - 1}
    return tuple(sorted(index for index in indices if index >= 0))


def build_preset_config(
    overrides: dict[str, Any] | None = None, id2label: dict[int, str] | None = None, **fields: Any
) -> DToPConfig:
    """A fresh [`DToPConfig`] from [`SMALL_PRESET`], then `fields`, then `overrides` (`--config_overrides`).

    When the overrides change `num_hidden_layers` but not `out_indices`, the heads are placed with
    [`default_out_indices`] so that the last head stays after the last layer.
    """
    overrides = dict(overrides or {})
    check_config_fields(overrides)
    values = {**SMALL_PRESET, **fields, **overrides}
    if "num_hidden_layers" in overrides and "out_indices" not in overrides:
        values["out_indices"] = default_out_indices(values["num_hidden_layers"])
    if id2label is not None:
        values["id2label"] = {int(index): name for index, name in id2label.items()}
        values["label2id"] = {name: int(index) for index, name in id2label.items()}
    return DToPConfig(**values)


def backbone_and_head_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a DToP model's parameters into backbone (patch/position embeddings, ViT layers) and heads."""
    base_model = getattr(model, "dtop", model)
    head_ids = {id(parameter) for parameter in base_model.heads.parameters()}
    backbone = [parameter for parameter in model.parameters() if id(parameter) not in head_ids]
    heads = [parameter for parameter in model.parameters() if id(parameter) in head_ids]
    return backbone, heads


def set_train_scope(model: nn.Module, train_scope: str) -> None:
    """`"all"` trains every parameter (official code); `"heads"` freezes the backbone (the paper's @Finetune)."""
    if train_scope not in TRAIN_SCOPES:
        raise ValueError(f"`train_scope` must be one of {TRAIN_SCOPES}, got {train_scope!r}.")
    backbone, heads = backbone_and_head_parameters(model)
    for parameter in backbone:
        parameter.requires_grad_(train_scope == "all")
    for parameter in heads:
        parameter.requires_grad_(True)


def build_optimizer(
    model: nn.Module,
    learning_rate: float = 2e-5,
    head_lr_multiplier: float = 10.0,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW with the official DToP/SegViT groups (SPEC §4): backbone at `learning_rate`, heads at
    `learning_rate * head_lr_multiplier`, weight decay on every parameter (mmseg `custom_keys={"head": lr_mult 10}`).
    Frozen parameters (`requires_grad=False`, see [`set_train_scope`]) are left out."""
    backbone, heads = backbone_and_head_parameters(model)
    groups = [
        {"params": [p for p in backbone if p.requires_grad], "lr": learning_rate, "name": "backbone"},
        {"params": [p for p in heads if p.requires_grad], "lr": learning_rate * head_lr_multiplier, "name": "heads"},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("The model has no trainable parameter: check `train_scope` and `requires_grad`.")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, weight_decay=weight_decay)


def poly_schedule_factor(
    step: int, num_warmup_steps: int, num_training_steps: int, power: float = 0.9, warmup_start_factor: float = 1e-6
) -> float:
    """Learning-rate factor at `step`: linear warm-up from `warmup_start_factor` to 1 over `num_warmup_steps`
    (mmseg `LinearLR`), then polynomial decay `(1 - progress) ** power` to 0 at `num_training_steps` (`PolyLR`)."""
    if step < num_warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / num_warmup_steps
    decay_steps = max(num_training_steps - num_warmup_steps, 1)
    progress = min((step - num_warmup_steps) / decay_steps, 1.0)
    return (1.0 - progress) ** power


def build_poly_scheduler(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    power: float = 0.9,
    warmup_start_factor: float = 1e-6,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The official schedule (SPEC §4) as a `LambdaLR`, every parameter group scaled by [`poly_schedule_factor`].

    The factor is a plain closure on purpose: `LambdaLR.state_dict` stores the attributes of callable objects,
    and a resumed run must keep the schedule of its own arguments.
    """
    if num_training_steps < 1 or num_warmup_steps < 0:
        raise ValueError(
            f"Expected `num_training_steps` >= 1 and `num_warmup_steps` >= 0, got {num_training_steps} and "
            f"{num_warmup_steps}."
        )

    def factor(step: int) -> float:
        return poly_schedule_factor(step, num_warmup_steps, num_training_steps, power, warmup_start_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def checkpoint_step(path: str | Path) -> int:
    """The step of a `step_N` checkpoint folder.

    Raises:
        ValueError: when the folder name is not `step_N`.
    """
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"Checkpoint folders are named `step_N` (N = optimiser steps done), got {str(path)!r}.")
    return int(match.group(1))


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The `step_N` folder with the largest N in `output_dir`, or None when there is none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    checkpoints = [path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    return max(checkpoints, key=checkpoint_step, default=None)


def num_update_steps(num_batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimiser steps per epoch (a last partial accumulation still steps, as Accelerate does at the epoch end)."""
    return max(math.ceil(num_batches_per_epoch / gradient_accumulation_steps), 1)


__all__ = [
    "SMALL_PRESET",
    "TRAIN_SCOPES",
    "backbone_and_head_parameters",
    "build_optimizer",
    "build_poly_scheduler",
    "build_preset_config",
    "check_config_fields",
    "checkpoint_step",
    "default_out_indices",
    "find_latest_checkpoint",
    "num_update_steps",
    "parse_config_overrides",
    "parse_override_value",
    "poly_schedule_factor",
    "set_train_scope",
    "split_top_level",
]
