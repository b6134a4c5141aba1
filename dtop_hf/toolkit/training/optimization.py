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
"""The official optimiser and schedule of DToP (and SegViT): AdamW, heads at 10x, linear warm-up, poly decay."""

import math

import torch
from torch import nn


TRAIN_SCOPES = ("all", "heads")


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
    """AdamW with the official DToP/SegViT groups: backbone at `learning_rate`, heads at
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
    """The official schedule as a `LambdaLR`, every parameter group scaled by [`poly_schedule_factor`].

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


def num_update_steps(num_batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimiser steps per epoch (a last partial accumulation still steps, as Accelerate does at the epoch end)."""
    return max(math.ceil(num_batches_per_epoch / gradient_accumulation_steps), 1)


__all__ = [
    "TRAIN_SCOPES",
    "backbone_and_head_parameters",
    "build_optimizer",
    "build_poly_scheduler",
    "num_update_steps",
    "poly_schedule_factor",
    "set_train_scope",
]
