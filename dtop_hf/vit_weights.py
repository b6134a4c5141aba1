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
"""Start a DToP model from a transformers ViT checkpoint: its backbone weights, resized positions, new heads."""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTModel
from transformers.utils import logging

from .configuration_dtop import DToPConfig


logger = logging.get_logger(__name__)

# DToPConfig fields that describe the backbone and are therefore read from the ViT checkpoint's config.
VIT_BACKBONE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "image_size",
)

# The official stage layout and head sizes for the two backbones of the paper (SPEC §2-3), used when the caller
# does not choose them: the DToPConfig defaults only fit a 12-layer ViT-B.
OFFICIAL_STAGE_DEFAULTS = {
    (768, 12): {
        "out_indices": (5, 7, 11), "head_hidden_size": 384, "head_num_attention_heads": 6, "exit_threshold": 0.9,
    },
    (1024, 24): {
        "out_indices": (7, 15, 23), "head_hidden_size": 512, "head_num_attention_heads": 8, "exit_threshold": 0.95,
    },
}

# Keyword arguments of `from_vit_pretrained` that go to `ViTModel.from_pretrained`, not to the DToP config.
VIT_LOADING_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# Keyword arguments that go to the DToP model's construction.
MODEL_INIT_KWARGS = ("attn_implementation", "dtype")


def resize_position_embeddings(position_embeddings: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resize stored ViT position embeddings to another patch grid, once (SPEC §1).

    Args:
        position_embeddings: `(1, 1 + side * side, dim)`, slot 0 for the class token, then a square grid row-major.
        grid_size: the new `(height, width)` grid.

    Returns:
        `(1, 1 + height * width, dim)`: slot 0 unchanged, the grid part resized bicubic (align_corners=False, no
        antialiasing, as the official code does at run time). The input itself when the grid already matches.
    """
    num_patches, dim = position_embeddings.shape[1] - 1, position_embeddings.shape[-1]
    side = math.isqrt(num_patches)
    if position_embeddings.ndim != 3 or side * side != num_patches:
        raise ValueError(
            "`position_embeddings` must have shape (1, 1 + side * side, dim) (a class-token slot and a square grid), "
            f"got {tuple(position_embeddings.shape)}."
        )
    if (side, side) == tuple(grid_size):
        return position_embeddings
    cls_position, patch_position = position_embeddings[:, :1], position_embeddings[:, 1:]
    # (1, side * side, dim) -> (1, dim, side, side), interpolated in float32 for half-precision checkpoints.
    patch_position = patch_position.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch_position = F.interpolate(patch_position, size=tuple(grid_size), mode="bicubic", align_corners=False)
    # (1, dim, height, width) -> (1, height * width, dim)
    patch_position = patch_position.permute(0, 2, 3, 1).reshape(1, -1, dim).to(position_embeddings.dtype)
    return torch.cat([cls_position, patch_position], dim=1)


def state_dict_mismatches(expected_shapes: dict[str, torch.Size], state_dict: dict[str, torch.Tensor]) -> str:
    """What keeps `state_dict` from loading strictly where `expected_shapes` are expected; "" when nothing.

    Returns:
        A sentence listing the missing, unexpected and wrongly shaped keys, or an empty string.
    """
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    mismatched = sorted(
        f"{key}: expected {tuple(expected_shapes[key])}, got {tuple(state_dict[key].shape)}"
        for key in set(expected_shapes) & set(state_dict)
        if tuple(expected_shapes[key]) != tuple(state_dict[key].shape)
    )
    if not (missing or unexpected or mismatched):
        return ""
    return f"missing {missing}, unexpected {unexpected}, wrong shapes {mismatched}"


def load_backbone_state_dict(model: nn.Module, backbone_state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy ViT weights, already in DToP's backbone names, into a DToP model; the heads are left as they are.

    DToP's backbone modules are named like transformers' ViT (v5 names): `embeddings.patch_embeddings.projection`,
    `embeddings.position_embeddings`, `embeddings.cls_token`, `layers.N.attention.{q,k,v,o}_proj`,
    `layers.N.layernorm_before/after`, `layers.N.mlp.fc1/fc2`. Position embeddings stored for another grid are
    resized once to `config.image_size`; the class token is dropped unless `config.use_cls_token`.

    Args:
        model: a [`DToPModel`] or [`DToPForSemanticSegmentation`].
        backbone_state_dict: tensors named relative to the DToP base model (`embeddings.*`, `layers.*`), with
            `embeddings.position_embeddings` of shape `(1, 1 + side * side, hidden_size)`.
        source: where the weights come from, for the log and the error messages.

    Raises:
        ValueError: when a backbone tensor is missing, unexpected or of the wrong shape.
    """
    base_model = getattr(model, model.base_model_prefix, model)
    config = base_model.config
    state_dict = dict(backbone_state_dict)
    grid = config.image_size // config.patch_size
    stored_position = state_dict.pop("embeddings.position_embeddings", None)
    if stored_position is not None:
        stored_side = math.isqrt(stored_position.shape[1] - 1)
        state_dict["embeddings.position_embeddings"] = resize_position_embeddings(stored_position, (grid, grid))
        if stored_side != grid:
            logger.info(
                f"Position embeddings of {source} resized once (bicubic) from a {stored_side}x{stored_side} to a "
                f"{grid}x{grid} grid (image_size {config.image_size})."
            )
    cls_token = state_dict.pop("embeddings.cls_token", None)
    if config.use_cls_token:
        if cls_token is None:
            raise ValueError(f"`use_cls_token=True` but {source} has no class token: pass `use_cls_token=False`.")
        state_dict["embeddings.cls_token"] = cls_token
    elif cls_token is not None:
        logger.info("Class token dropped: `use_cls_token=False` (the official DToP drops it before the first layer).")

    backbone = {"embeddings": base_model.embeddings, "layers": base_model.layers}
    expected_shapes = {
        f"{name}.{key}": value.shape for name, module in backbone.items() for key, value in module.state_dict().items()
    }
    problems = state_dict_mismatches(expected_shapes, state_dict)
    if problems:
        raise ValueError(
            f"The backbone weights of {source} do not fit the DToP config: {problems}. Check that the config's "
            "backbone fields match the checkpoint."
        )
    for name, module in backbone.items():
        prefix = f"{name}."
        module.load_state_dict(
            {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}, strict=True
        )


def dtop_config_from_vit(vit_config, **config_overrides) -> DToPConfig:
    """A DToP config whose backbone fields come from a ViT config; keyword arguments override any DToPConfig field.

    When the stage layout is not given, the official one is used for ViT-B (12 layers, width 768) and ViT-L
    (24 layers, width 1024); other backbones must pass `out_indices`.
    """
    valid_fields = {field.name for field in dataclasses.fields(DToPConfig)} | {"num_labels"}
    unknown = sorted(set(config_overrides) - valid_fields)
    if unknown:
        raise ValueError(
            f"Unknown keyword arguments {unknown}: expected DToPConfig fields, one of {sorted(VIT_LOADING_KWARGS)} "
            f"(passed to ViTModel.from_pretrained) or one of {list(MODEL_INIT_KWARGS)}."
        )
    fields = {name: getattr(vit_config, name) for name in VIT_BACKBONE_FIELDS}
    if not isinstance(fields["image_size"], int) or not isinstance(fields["patch_size"], int):
        raise ValueError(
            f"Only square ViT images and patches are supported, got image_size {fields['image_size']} and "
            f"patch_size {fields['patch_size']}."
        )
    fields.update(OFFICIAL_STAGE_DEFAULTS.get((fields["hidden_size"], fields["num_hidden_layers"]), {}))
    fields.update(config_overrides)
    if "out_indices" not in fields:
        raise ValueError(
            f"No official stage layout for a ViT with {fields['num_hidden_layers']} layers of width "
            f"{fields['hidden_size']}: pass `out_indices` (0-based layers after which a head runs; the last one "
            f"must be {fields['num_hidden_layers'] - 1})."
        )
    return DToPConfig(**fields)


def from_vit_pretrained(model_class: type, vit_name_or_path: str, **kwargs) -> nn.Module:
    """Build a DToP model whose backbone is a pretrained transformers ViT and whose heads are new.

    Any ViT checkpoint works (a `ViTModel` or `ViTForImageClassification` folder or Hub id, old or v5 key names):
    it is read with `ViTModel.from_pretrained(..., add_pooling_layer=False)`. ViT's final `layernorm` and pooler
    (and the classifier) are dropped: DToP's heads read the layer outputs without a final norm (SPEC §1).

    Args:
        model_class: [`DToPModel`] or [`DToPForSemanticSegmentation`].
        vit_name_or_path: Hub id or local folder of a ViT checkpoint.
        kwargs: DToPConfig fields (e.g. `num_labels=150, image_size=512`; they override the ViT's values),
            `attn_implementation` / `dtype` for the model, and `ViTModel.from_pretrained` loading options
            (`revision`, `cache_dir`, `token`, `local_files_only`, ...).

    Returns:
        The DToP model in eval mode, like `from_pretrained` (call `model.train()` to fine-tune it).
    """
    loading_kwargs = {key: kwargs.pop(key) for key in VIT_LOADING_KWARGS if key in kwargs}
    init_kwargs = {key: kwargs.pop(key) for key in MODEL_INIT_KWARGS if key in kwargs}
    vit = ViTModel.from_pretrained(vit_name_or_path, add_pooling_layer=False, **loading_kwargs)
    config = dtop_config_from_vit(vit.config, **kwargs)
    model = model_class._from_config(config, **init_kwargs)
    vit_state_dict = vit.state_dict()
    # ViT's final norm has no DToP counterpart: the heads read the raw layer outputs (official: final_norm=False).
    dropped = sorted(key for key in vit_state_dict if key.startswith("layernorm."))
    backbone_state_dict = {key: value for key, value in vit_state_dict.items() if key not in dropped}
    load_backbone_state_dict(model, backbone_state_dict, source=f"ViT checkpoint {vit_name_or_path!r}")
    logger.info(
        f"DToP backbone initialised from {vit_name_or_path!r} ({len(backbone_state_dict)} tensors); dropped ViT's "
        f"final layernorm {dropped} (DToP has no final norm) and its pooler/classifier; the "
        f"{len(config.out_indices)} {config.head_type.upper()} heads are newly initialised."
    )
    return model.eval()


__all__ = [
    "OFFICIAL_STAGE_DEFAULTS",
    "VIT_BACKBONE_FIELDS",
    "dtop_config_from_vit",
    "from_vit_pretrained",
    "load_backbone_state_dict",
    "resize_position_embeddings",
    "state_dict_mismatches",
]
