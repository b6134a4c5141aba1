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
"""DToP training losses, as in the official recipe: per-head ATM presence + mask losses, or FCN cross-entropy,
summed over heads."""

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    mask_logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss of each mask, averaged over its valid pixels.

    Args:
        mask_logits: `(num_masks, pixels)` float.
        targets: `(num_masks, pixels)` float in {0, 1}.
        valid: `(num_masks, pixels)` float in {0, 1}; 0 at ignored pixels.

    Returns:
        `(num_masks,)` loss per mask.
    """
    probabilities = mask_logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return (loss * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dice loss of each mask over its valid pixels (smoothing 1, as SegViT's ATMLoss).

    Args:
        mask_logits: `(num_masks, pixels)` float.
        targets: `(num_masks, pixels)` float in {0, 1}.
        valid: `(num_masks, pixels)` float in {0, 1}.

    Returns:
        `(num_masks,)` loss per mask.
    """
    probabilities = mask_logits.sigmoid() * valid
    targets = targets * valid
    numerator = 2 * (probabilities * targets).sum(dim=1)
    denominator = probabilities.sum(dim=1) + targets.sum(dim=1)
    return 1 - (numerator + 1) / (denominator + 1)


def presence_targets(labels: torch.Tensor, num_labels: int, ignore_index: int) -> torch.Tensor:
    """`(batch, num_labels)` bool: does class c occur in image b (ignored pixels do not count)."""
    valid = labels != ignore_index
    one_hot_index = torch.where(valid, labels, torch.full_like(labels, num_labels)).flatten(1)  # (batch, pixels)
    present = torch.zeros(labels.shape[0], num_labels + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, one_hot_index, True)
    return present[:, :num_labels]


def count_masks_across_processes(num_masks: torch.Tensor) -> torch.Tensor:
    """Mean number of present masks per process, at least 1 (so every process divides by the same number)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        num_masks = num_masks.clone()
        torch.distributed.all_reduce(num_masks)
        num_masks = num_masks / torch.distributed.get_world_size()
    return num_masks.clamp(min=1)


def resize_to_labels(
    grid_values: torch.Tensor, labels: torch.Tensor, input_size: tuple[int, int], padded_size: tuple[int, int]
) -> torch.Tensor:
    """Upsample `(batch, channels, h, w)` grid values bilinearly to the label map.

    The grid covers `padded_size` pixels (the input of `input_size` padded to a multiple of the patch size).
    Labels of the input's size are its top-left corner: upsample to the padded size and crop, so that every
    pixel keeps its own patch. Labels of any other size get a plain resize.
    """
    label_size = tuple(labels.shape[-2:])
    if label_size == tuple(input_size):
        upsampled = F.interpolate(grid_values, size=padded_size, mode="bilinear", align_corners=False)
        return upsampled[..., : label_size[0], : label_size[1]]
    return F.interpolate(grid_values, size=label_size, mode="bilinear", align_corners=False)


def atm_stage_loss(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    ignore_index: int,
    no_object_weight: float,
    focal_weight: float,
    dice_weight: float,
    focal_alpha: float,
    focal_gamma: float,
    ignore_pixels_as_negatives: bool,
) -> torch.Tensor:
    """Loss of one ATM head. Query c is matched to class c: no Hungarian matching.

    Args:
        class_logits: `(batch, num_labels, 2)` presence / no-object logits.
        mask_logits: `(batch, num_labels, h, w)` the canvas after this head (grid resolution).
        labels: `(batch, height, width)` int64 class ids, `ignore_index` where unlabelled.
        input_size: pixel size of the model input; padded_size: pixel size the grid covers.
    """
    num_labels = class_logits.shape[1]
    present = presence_targets(labels, num_labels, ignore_index)  # (batch, num_labels)
    presence_target = (~present).long()  # 0 = present, 1 = no object
    class_weight = class_logits.new_tensor([1.0, no_object_weight])
    presence_loss = F.cross_entropy(class_logits.transpose(1, 2), presence_target, weight=class_weight)

    image_index, class_index = present.nonzero(as_tuple=True)  # one entry per present mask
    num_masks = count_masks_across_processes(present.sum().to(mask_logits.dtype))
    if image_index.numel() == 0:
        # Keep every parameter in the graph (DDP needs it) with a zero mask loss.
        return presence_loss + 0.0 * mask_logits.sum()
    selected_logits = mask_logits[image_index, class_index][:, None]  # (num_masks, 1, h, w)
    selected_logits = resize_to_labels(selected_logits, labels, input_size, padded_size)
    selected_logits = selected_logits.flatten(1)  # (num_masks, pixels)
    selected_labels = labels[image_index].flatten(1)
    targets = (selected_labels == class_index[:, None]).to(selected_logits.dtype)
    if ignore_pixels_as_negatives:
        valid = torch.ones_like(targets)  # Official code: ignored pixels are negatives of every mask.
    else:
        valid = (selected_labels != ignore_index).to(selected_logits.dtype)
    focal = sigmoid_focal_loss(selected_logits, targets, valid, focal_alpha, focal_gamma).sum() / num_masks
    dice = dice_loss(selected_logits, targets, valid).sum() / num_masks
    return presence_loss + focal_weight * focal + dice_weight * dice


def fcn_stage_loss(
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    ignore_index: int,
) -> torch.Tensor:
    """Cross-entropy of one FCN head: `(batch, num_labels, h, w)` logits upsampled to the labels."""
    upsampled = resize_to_labels(class_logits, labels, input_size, padded_size)
    if bool((labels == ignore_index).all()):
        return 0.0 * upsampled.sum()
    return F.cross_entropy(upsampled, labels, ignore_index=ignore_index)


def check_labels(labels: torch.Tensor, num_labels: int, ignore_index: int) -> torch.Tensor:
    """Validate segmentation labels and return them as `(batch, height, width)` int64.

    Raises a clear error for floating-point labels (they would be truncated silently), for shapes other than
    `(batch, height, width)` or `(batch, 1, height, width)`, and for values outside [0, num_labels) that are not
    the ignore index.
    """
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"`labels` must hold integer class ids, got dtype {labels.dtype}.")
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3:
        raise ValueError(f"`labels` must have shape (batch_size, height, width), got {tuple(labels.shape)}.")
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= num_labels))
    if bool(invalid.any()):
        bad_values = torch.unique(labels[invalid]).tolist()[:10]
        raise ValueError(
            f"`labels` must hold class ids in [0, {num_labels}) or the ignore index {ignore_index}, got {bad_values}. "
            "If your data set uses 0 for 'unlabelled' (as ADE20K does), reduce the labels (`do_reduce_labels=True`)."
        )
    return labels.long()


__all__ = [
    "atm_stage_loss",
    "check_labels",
    "dice_loss",
    "fcn_stage_loss",
    "presence_targets",
    "sigmoid_focal_loss",
]
