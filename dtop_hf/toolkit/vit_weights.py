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
"""Start a DToP model from a transformers checkpoint of a plain-ViT family (ViT, DeiT, DINOv2, DINOv2 with registers,
DINOv3): its backbone weights, its family's extras (layer scale, distillation and register tokens, rotary positions,
gated MLP), positions resized once, new heads."""

import contextlib
import dataclasses
import json
import logging as stdlib_logging
import math
import re
from collections.abc import Callable, Iterator

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.utils import cached_file, logging

from ..configuration_dtop import DToPConfig
from ..image_processing_dtop import DToPImageProcessor
from ..modeling_dtop import resize_position_grid
from .presets import default_stage_layout


logger = logging.get_logger(__name__)

IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# fmt: off
# The source base model's parameter names (transformers v5 names: `from_pretrained` converts older checkpoints) ->
# DToP base model names. DToP mirrors ViT's names; the families with layer scale keep transformers' `layer_scale*`.
VIT_KEY_MAPPING = {  # ViTModel, DeiTModel
    r"^embeddings\.(cls_token|distillation_token|position_embeddings)$": r"embeddings.\1",
    r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$":        r"embeddings.patch_embeddings.projection.\1",
    r"^layers\.(\d+)\.(layernorm_before|layernorm_after)\.(weight|bias)$": r"layers.\1.\2.\3",
    r"^layers\.(\d+)\.attention\.([qkvo]_proj)\.(weight|bias)$":         r"layers.\1.attention.\2.\3",
    r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$":                   r"layers.\1.mlp.\2.\3",
}
DINOV2_KEY_MAPPING = {  # Dinov2Model, Dinov2WithRegistersModel
    r"^embeddings\.(cls_token|register_tokens|position_embeddings)$":    r"embeddings.\1",
    r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$":        r"embeddings.patch_embeddings.projection.\1",
    r"^encoder\.layer\.(\d+)\.norm1\.(weight|bias)$":                    r"layers.\1.layernorm_before.\2",
    r"^encoder\.layer\.(\d+)\.norm2\.(weight|bias)$":                    r"layers.\1.layernorm_after.\2",
    r"^encoder\.layer\.(\d+)\.attention\.([qkvo]_proj)\.(weight|bias)$": r"layers.\1.attention.\2.\3",
    r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$":              r"layers.\1.layer_scale\2.lambda1",
    r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2|gate_proj|up_proj|down_proj)\.(weight|bias)$": r"layers.\1.mlp.\2.\3",
}
DINOV3_KEY_MAPPING = {  # DINOv3ViTModel; its plain MLP's up/down projections become fc1/fc2 (see `rename_plain_mlp`)
    r"^embeddings\.(cls_token|register_tokens)$":                        r"embeddings.\1",
    r"^embeddings\.patch_embeddings\.(weight|bias)$":                    r"embeddings.patch_embeddings.projection.\1",
    r"^model\.layer\.(\d+)\.norm1\.(weight|bias)$":                      r"layers.\1.layernorm_before.\2",
    r"^model\.layer\.(\d+)\.norm2\.(weight|bias)$":                      r"layers.\1.layernorm_after.\2",
    r"^model\.layer\.(\d+)\.attention\.([qkvo]_proj)\.(weight|bias)$":   r"layers.\1.attention.\2.\3",
    r"^model\.layer\.(\d+)\.layer_scale([12])\.lambda1$":                r"layers.\1.layer_scale\2.lambda1",
    r"^model\.layer\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$": r"layers.\1.mlp.\2.\3",
}
# Source tensors with no DToP counterpart, dropped on purpose: the final norm (DToP's heads read the raw layer
# outputs, docs/method.md), ViT's pooler and the mask token (masked-image pre-training only).
SOURCE_KEYS_TO_DROP = [r"^(layernorm|norm)\.(weight|bias)$", r"^pooler\.", r"^embeddings\.mask_token$"]
# fmt: on


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
    """How one transformers ViT family maps onto DToP's backbone.

    Attributes:
        model_class_name: the transformers base model the checkpoint is read with (any task model of the family,
            e.g. a classifier, loads into it; its head is dropped).
        backbone_fields: the DToP backbone fields from the source config.
        key_mapping: regex rules from the base model's parameter names to DToP's.
        backbone_prefixes: name prefixes of the base model's own modules: an unexpected checkpoint tensor under
            them is a backbone weight the family does not have (an error), one elsewhere a task head (dropped).
        image_mean, image_std: the family's normalisation when the checkpoint has no `preprocessor_config.json`.
        model_kwargs: extra arguments of the base model's `from_pretrained`.
    """

    model_class_name: str
    backbone_fields: Callable[[PreTrainedConfig, bool], dict]
    key_mapping: dict[str, str]
    backbone_prefixes: tuple[str, ...]
    image_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    model_kwargs: dict = dataclasses.field(default_factory=dict)


def square_size(source_config: PreTrainedConfig, name: str) -> int:
    """`image_size` / `patch_size` of a source config as one int (DToP stores a square grid of square patches)."""
    value = getattr(source_config, name)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"Only square `{name}` is supported, got {list(value)} in the checkpoint's config.")
        value = value[0]
    return int(value)


def shared_backbone_fields(source_config: PreTrainedConfig) -> dict:
    """The fields every family names like ViT."""
    fields = {
        name: getattr(source_config, name)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")
    }
    fields.update({name: square_size(source_config, name) for name in ("image_size", "patch_size")})
    fields["num_channels"] = source_config.num_channels
    return fields


def vit_backbone_fields(source_config: PreTrainedConfig, keep_extra_tokens: bool) -> dict:
    """ViT and DeiT: a plain pre-norm ViT; DeiT adds a distillation token (and its position slot)."""
    fields = shared_backbone_fields(source_config)
    fields.update(intermediate_size=source_config.intermediate_size, qkv_bias=source_config.qkv_bias)
    fields.update(use_cls_token=keep_extra_tokens)
    if source_config.model_type == "deit":
        fields["use_distillation_token"] = keep_extra_tokens
    return fields


def dinov2_backbone_fields(source_config: PreTrainedConfig, keep_extra_tokens: bool) -> dict:
    """DINOv2 (with registers): layer scale, optional SwiGLU MLP, MLP width from `mlp_ratio`; with registers the
    position embeddings are resized with antialiasing, as `Dinov2WithRegistersEmbeddings` does."""
    fields = shared_backbone_fields(source_config)
    intermediate_size = int(source_config.hidden_size * source_config.mlp_ratio)
    if source_config.use_swiglu_ffn:
        # Dinov2SwiGLUFFN: two thirds of the MLP width rounded up to a multiple of 8, SiLU gate.
        intermediate_size = (int(intermediate_size * 2 / 3) + 7) // 8 * 8
        fields["hidden_act"] = "silu"
    has_registers = source_config.model_type == "dinov2_with_registers"
    fields.update(
        intermediate_size=intermediate_size,
        qkv_bias=source_config.qkv_bias,
        use_gated_mlp=source_config.use_swiglu_ffn,
        layerscale_value=source_config.layerscale_value,
        use_cls_token=keep_extra_tokens,
        num_register_tokens=source_config.num_register_tokens if has_registers and keep_extra_tokens else 0,
        position_embedding_antialias=has_registers,
    )
    return fields


def dinov3_backbone_fields(source_config: PreTrainedConfig, keep_extra_tokens: bool) -> dict:
    """DINOv3: 2-D rotary positions (no learned positions), no key bias, layer scale, optional gated MLP."""
    unsupported = {
        name: getattr(source_config, name) for name in ("proj_bias", "mlp_bias") if not getattr(source_config, name)
    }
    if source_config.query_bias != source_config.value_bias:
        unsupported.update(query_bias=source_config.query_bias, value_bias=source_config.value_bias)
    if unsupported:
        raise ValueError(
            f"This DINOv3 config has settings DToP does not reproduce: {unsupported} (DToP has biases in the output "
            "and MLP projections, and the same bias setting for queries and values)."
        )
    fields = shared_backbone_fields(source_config)
    fields.update(
        intermediate_size=source_config.intermediate_size,
        qkv_bias=source_config.query_bias,
        key_bias=source_config.key_bias,
        use_gated_mlp=source_config.use_gated_mlp,
        layerscale_value=source_config.layerscale_value,
        use_cls_token=keep_extra_tokens,
        num_register_tokens=source_config.num_register_tokens if keep_extra_tokens else 0,
        position_embedding_type="rope",
        rope_theta=source_config.rope_theta,
        rope_shift=source_config.pos_embed_shift,
        rope_jitter=source_config.pos_embed_jitter,
        rope_rescale=source_config.pos_embed_rescale,
    )
    return fields


BACKBONE_FAMILIES = {
    "vit": BackboneFamily(
        "ViTModel", vit_backbone_fields, VIT_KEY_MAPPING, ("embeddings.", "layers.", "layernorm.", "pooler."),
        IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, {"add_pooling_layer": False},
    ),
    "deit": BackboneFamily(
        "DeiTModel", vit_backbone_fields, VIT_KEY_MAPPING, ("embeddings.", "layers.", "layernorm.", "pooler."),
        model_kwargs={"add_pooling_layer": False},
    ),
    "dinov2": BackboneFamily(
        "Dinov2Model", dinov2_backbone_fields, DINOV2_KEY_MAPPING, ("embeddings.", "encoder.", "layernorm.")
    ),
    "dinov2_with_registers": BackboneFamily(
        "Dinov2WithRegistersModel", dinov2_backbone_fields, DINOV2_KEY_MAPPING,
        ("embeddings.", "encoder.", "layernorm."),
    ),
    "dinov3_vit": BackboneFamily(
        "DINOv3ViTModel", dinov3_backbone_fields, DINOV3_KEY_MAPPING, ("embeddings.", "model.", "norm.")
    ),
}  # fmt: skip
SUPPORTED_MODEL_TYPES = tuple(BACKBONE_FAMILIES)

# Keyword arguments of `from_vit_pretrained` that go to the source model's `from_pretrained`, not to the DToP config.
VIT_LOADING_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# Keyword arguments that go to the DToP model's construction.
MODEL_INIT_KWARGS = ("attn_implementation", "dtype")


def resize_position_embeddings(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int], num_prefixes: int = 1, antialias: bool = False
) -> torch.Tensor:
    """Resize stored ViT position embeddings to another patch grid, once (bicubic; docs/method.md).

    Args:
        position_embeddings: `(1, num_prefixes + side * side, dim)`: the class (and distillation) token slots, then
            a square grid row-major.
        grid_size: the new `(height, width)` grid.
        num_prefixes: slots before the grid (1; DeiT: 2).
        antialias: see [`resize_position_grid`].

    Returns:
        `(1, num_prefixes + height * width, dim)`: the prefix slots unchanged, the grid part resized. The input itself
        when the grid already matches.
    """
    num_patches = position_embeddings.shape[1] - num_prefixes
    side = math.isqrt(max(num_patches, 0))
    if position_embeddings.ndim != 3 or num_patches < 1 or side * side != num_patches:
        raise ValueError(
            f"`position_embeddings` must have shape (1, {num_prefixes} + side * side, dim) ({num_prefixes} prefix "
            f"slots and a square grid), got {tuple(position_embeddings.shape)}."
        )
    if (side, side) == tuple(grid_size):
        return position_embeddings
    prefix_position, grid_position = position_embeddings[:, :num_prefixes], position_embeddings[:, num_prefixes:]
    return torch.cat([prefix_position, resize_position_grid(grid_position, grid_size, antialias)], dim=1)


def rename_state_dict_keys(
    state_dict: dict[str, torch.Tensor], key_mapping: dict[str, str], source: str, key_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Rename every key by the first regex of `key_mapping` that matches it.

    Raises:
        ValueError: listing every key that no pattern matches (nothing is dropped silently), as `key_prefix + key`.
    """
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, replacement in key_mapping.items():
            if re.search(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key_prefix + key)
    if unknown:
        raise ValueError(f"Unknown keys in {source} (no DToP counterpart): {sorted(unknown)}.")
    return renamed


def rename_plain_mlp(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain (not gated) MLP stored under gated names (DINOv3's `up_proj` / `down_proj`) -> DToP's `fc1` / `fc2`."""
    if any(".mlp.gate_proj." in key for key in state_dict):
        return state_dict
    renames = {".mlp.up_proj.": ".mlp.fc1.", ".mlp.down_proj.": ".mlp.fc2."}
    renamed = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def drop_keys(state_dict: dict[str, torch.Tensor], patterns: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove the keys matching any of `patterns`; returns the rest and the sorted dropped keys."""
    dropped = sorted(key for key in state_dict if any(re.search(pattern, key) for pattern in patterns))
    return {key: value for key, value in state_dict.items() if key not in dropped}, dropped


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


def select_extra_tokens(state_dict: dict[str, torch.Tensor], config: DToPConfig, source: str) -> list[str]:
    """Keep the class, distillation and register tokens the config keeps, drop the others (in place).

    Returns:
        The dropped token names.

    Raises:
        ValueError: when the config keeps a token the source does not have.
    """
    kept = {
        "embeddings.cls_token": (config.use_cls_token, "use_cls_token"),
        "embeddings.distillation_token": (config.use_distillation_token, "use_distillation_token"),
        "embeddings.register_tokens": (config.num_register_tokens > 0, "num_register_tokens"),
    }
    dropped = []
    for key, (is_kept, field) in kept.items():
        if is_kept and key not in state_dict:
            raise ValueError(
                f"`{field}={getattr(config, field)}` but {source} has no `{key}`: pass `{field}` "
                f"{'=0' if field == 'num_register_tokens' else '=False'}."
            )
        if not is_kept and key in state_dict:
            del state_dict[key]
            dropped.append(key)
    return dropped


def load_backbone_state_dict(model: nn.Module, backbone_state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy backbone weights, already in DToP's names, into a DToP model strictly; the heads are left as they are.

    DToP's backbone modules are named like transformers' ViT (v5 names): `embeddings.patch_embeddings.projection`,
    `embeddings.position_embeddings`, `embeddings.cls_token` (`distillation_token`, `register_tokens`),
    `layers.N.attention.{q,k,v,o}_proj`, `layers.N.layernorm_before/after`, `layers.N.mlp.fc1/fc2` (gated:
    `gate_proj/up_proj/down_proj`), `layers.N.layer_scale1/2.lambda1`. Position embeddings stored for another grid
    are resized once to `config.image_size` (with the family's antialiasing setting); a distillation slot is
    dropped with its token; extra tokens the config does not keep are dropped.

    Args:
        model: a [`DToPModel`] or [`DToPForSemanticSegmentation`].
        backbone_state_dict: tensors named relative to the DToP base model (`embeddings.*`, `layers.*`); the
            position embeddings `(1, prefix slots + side * side, hidden_size)` with one prefix slot, two when the
            dict has a distillation token.
        source: where the weights come from, for the log and the error messages.

    Raises:
        ValueError: when a backbone tensor is missing, unexpected or of the wrong shape, naming it.
    """
    base_model = getattr(model, model.base_model_prefix, model)
    config = base_model.config
    state_dict = dict(backbone_state_dict)
    stored_position = state_dict.pop("embeddings.position_embeddings", None)
    if stored_position is not None:
        num_source_prefixes = 2 if "embeddings.distillation_token" in state_dict else 1
        grid = config.image_size // config.patch_size
        position = resize_position_embeddings(
            stored_position, (grid, grid), num_source_prefixes, config.position_embedding_antialias
        )
        if position is not stored_position:
            stored_side = math.isqrt(stored_position.shape[1] - num_source_prefixes)
            logger.info(
                f"Position embeddings of {source} resized once (bicubic) from a {stored_side}x{stored_side} to a "
                f"{grid}x{grid} grid (image_size {config.image_size})."
            )
        # The slots of the class (and distillation) token: DeiT's second one goes when its token is not kept.
        num_prefixes = base_model.embeddings.num_position_prefixes
        state_dict["embeddings.position_embeddings"] = torch.cat(
            [position[:, :num_prefixes], position[:, num_source_prefixes:]], dim=1
        )
    dropped = select_extra_tokens(state_dict, config, source)
    if dropped:
        logger.info(
            f"Extra tokens {dropped} dropped: the config does not keep them (the official DToP drops the class token "
            "before the first layer; `use_cls_token=True` in `from_vit_pretrained` keeps them all)."
        )

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


def backbone_family(source_config: PreTrainedConfig, source: str) -> BackboneFamily:
    """The family of a transformers config, or a clear error for the families DToP cannot reproduce."""
    family = BACKBONE_FAMILIES.get(source_config.model_type)
    if family is None:
        raise ValueError(
            f"{source} is a {source_config.model_type!r} checkpoint; `from_vit_pretrained` reproduces the "
            f"backbones of {list(SUPPORTED_MODEL_TYPES)} (and their task models, e.g. classifiers). For a saved DToP "
            "model use `from_pretrained`; for timm / mmseg weights use `convert_dtop_original_to_hf`."
        )
    return family


def dtop_config_from_vit(
    source_config: PreTrainedConfig, keep_extra_tokens: bool = False, **config_overrides
) -> DToPConfig:
    """A DToP config whose backbone fields come from a ViT-family config; keyword arguments override any field.

    The stage layout and head sizes default to [`~presets_dtop.default_stage_layout`] for the backbone's depth and
    width (the official ones for ViT-B and ViT-L).

    Args:
        source_config: a `ViTConfig`, `DeiTConfig`, `Dinov2Config`, `Dinov2WithRegistersConfig` or
            `DINOv3ViTConfig`.
        keep_extra_tokens: keep the source's class, distillation and register tokens in the backbone.
        config_overrides: DToPConfig fields (and `num_labels`).
    """
    valid_fields = {field.name for field in dataclasses.fields(DToPConfig)} | {"num_labels"}
    unknown = sorted(set(config_overrides) - valid_fields)
    if unknown:
        raise ValueError(
            f"Unknown keyword arguments {unknown}: expected DToPConfig fields, one of {sorted(VIT_LOADING_KWARGS)} "
            f"(passed to the source model's from_pretrained) or one of {list(MODEL_INIT_KWARGS)}."
        )
    family = backbone_family(source_config, f"The {type(source_config).__name__}")
    fields = family.backbone_fields(source_config, keep_extra_tokens)
    fields.update(default_stage_layout(fields["num_hidden_layers"], fields["hidden_size"]))
    fields.update(config_overrides)
    return DToPConfig(**fields)


@contextlib.contextmanager
def captured_load_report() -> Iterator[list[str]]:
    """Keep transformers' LOAD REPORT out of the log while a source model loads; yields the captured reports.

    `from_vit_pretrained` drops the final norm, pooler and task heads on purpose and checks every backbone tensor
    itself, so the generic table would only warn about what is intended.
    """
    reports = []

    def keep_out(record: stdlib_logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            reports.append(record.getMessage())
            return False
        return True

    report_logger = stdlib_logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(keep_out)
    try:
        yield reports
    finally:
        report_logger.removeFilter(keep_out)


def load_source_backbone(
    vit_name_or_path: str, loading_kwargs: dict
) -> tuple[PreTrainedConfig, BackboneFamily, dict[str, torch.Tensor], list[str]]:
    """Read a ViT-family checkpoint with its transformers base model and check every backbone tensor.

    Returns:
        The source config, its family, the base model's state dict and the checkpoint keys it left out on purpose
        (task heads, a pooler the base model is built without).

    Raises:
        ValueError: for an unsupported family, or a backbone tensor that is missing, unexpected or of the wrong
            shape (named as in the base model).
    """
    source = f"{vit_name_or_path!r}"
    source_config = AutoConfig.from_pretrained(vit_name_or_path, **loading_kwargs)
    family = backbone_family(source_config, source)
    model_class = getattr(transformers, family.model_class_name)
    with captured_load_report() as reports:
        try:
            source_model, info = model_class.from_pretrained(
                vit_name_or_path, config=source_config, output_loading_info=True, ignore_mismatched_sizes=True,
                **family.model_kwargs, **loading_kwargs,
            )  # fmt: skip
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{''.join(reports)}") from error
    unexpected = sorted(info["unexpected_keys"])
    task_head_keys = [key for key in unexpected if not key.startswith(family.backbone_prefixes)]
    dropped_on_purpose = [key for key in unexpected if any(re.search(pattern, key) for pattern in SOURCE_KEYS_TO_DROP)]
    unexpected_backbone_keys = [key for key in unexpected if key not in task_head_keys + dropped_on_purpose]
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": unexpected_backbone_keys,
        "wrong shapes": sorted(
            f"{key}: expected {tuple(model)}, got {tuple(stored)}" for key, stored, model in info["mismatched_keys"]
        ),
    }
    if any(problems.values()):
        raise ValueError(
            f"The {family.model_class_name} backbone of {source} does not load exactly: "
            + ", ".join(f"{kind} {keys}" for kind, keys in problems.items())
            + ". A checkpoint that does not match its own config cannot start a DToP model."
        )
    return source_config, family, source_model.state_dict(), task_head_keys + dropped_on_purpose


def source_image_processor(
    vit_name_or_path: str, family: BackboneFamily, config: DToPConfig, loading_kwargs: dict
) -> DToPImageProcessor:
    """A DToP image processor for a model started from a ViT-family checkpoint: the checkpoint's own mean/std (its
    `preprocessor_config.json`, else the family's), and input, window and stride sizes that are multiples of the
    patch size, the input being the stored grid."""
    mean, std = family.image_mean, family.image_std
    processor_file = cached_file(
        vit_name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **loading_kwargs
    )
    if processor_file is not None:
        with open(processor_file, encoding="utf-8") as file:
            processor_config = json.load(file)
        mean, std = processor_config.get("image_mean", mean), processor_config.get("image_std", std)
    side = config.image_size // config.patch_size * config.patch_size
    stride = max(2 * side // 3 // config.patch_size, 1) * config.patch_size  # 2/3 of the window, as mmseg's 341/512
    return DToPImageProcessor(
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        stride={"height": stride, "width": stride},
        image_mean=list(mean),
        image_std=list(std),
    )


def from_vit_pretrained(
    model_class: type, vit_name_or_path: str, output_image_processor: bool = False, **kwargs
) -> nn.Module | tuple[nn.Module, DToPImageProcessor]:
    """Build a DToP model whose backbone is a pretrained transformers ViT-family model and whose heads are new.

    The family is read from the checkpoint's config (`model_type`): `ViTModel`, `DeiTModel`, `Dinov2Model`,
    `Dinov2WithRegistersModel` or `DINOv3ViTModel` checkpoints, or any task model of theirs (e.g. a classifier),
    folder or Hub id, old or v5 key names. The DToP backbone reproduces the family (layer scale, distillation and
    register tokens, DINOv3's rotary positions, gated MLPs, each family's position resizing). The final norm, the
    pooler, the mask token and any task head are dropped on purpose: DToP's heads read the raw layer outputs
    (docs/method.md). Every other tensor must load exactly: a missing, unexpected or misshapen backbone tensor is an
    error.

    Args:
        model_class: [`DToPModel`] or [`DToPForSemanticSegmentation`].
        vit_name_or_path: Hub id or local folder of the checkpoint.
        output_image_processor: also return a [`DToPImageProcessor`] with the checkpoint's normalisation and sizes
            that are multiples of its patch size.
        kwargs: DToPConfig fields (e.g. `num_labels=150, image_size=512`; they override the checkpoint's values and
            the default stage layout); `use_cls_token=True` (or `keep_extra_tokens=True`) keeps *all* the source's
            extra tokens (class, distillation, registers), needed to reproduce its hidden states; `attn_implementation`
            / `dtype` for the model; the source model's loading options (`revision`, `cache_dir`, `token`,
            `local_files_only`, ...).

    Returns:
        The DToP model in eval mode, like `from_pretrained` (call `model.train()` to fine-tune it), and its image
        processor when `output_image_processor=True`.
    """
    loading_kwargs = {key: kwargs.pop(key) for key in VIT_LOADING_KWARGS if key in kwargs}
    init_kwargs = {key: kwargs.pop(key) for key in MODEL_INIT_KWARGS if key in kwargs}
    keep_extra_tokens = bool(kwargs.pop("keep_extra_tokens", kwargs.get("use_cls_token", False)))
    source_config, family, source_state_dict, left_out = load_source_backbone(vit_name_or_path, loading_kwargs)
    config = dtop_config_from_vit(source_config, keep_extra_tokens, **kwargs)
    model = model_class._from_config(config, **init_kwargs)
    state_dict, dropped = drop_keys(source_state_dict, SOURCE_KEYS_TO_DROP)
    source = f"{family.model_class_name} checkpoint {vit_name_or_path!r}"
    backbone_state_dict = rename_plain_mlp(rename_state_dict_keys(state_dict, family.key_mapping, source))
    load_backbone_state_dict(model, backbone_state_dict, source=source)
    logger.info(
        f"DToP backbone initialised from {source} ({len(backbone_state_dict)} tensors); dropped on purpose: "
        f"{sorted(dropped + left_out)} (final norm, pooler, mask token, task head); the {len(config.out_indices)} "
        f"{config.head_type.upper()} heads after layers {list(config.out_indices)} are newly initialised."
    )
    model.eval()
    if output_image_processor:
        return model, source_image_processor(vit_name_or_path, family, config, loading_kwargs)
    return model


__all__ = [
    "BACKBONE_FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "dtop_config_from_vit",
    "from_vit_pretrained",
    "load_backbone_state_dict",
    "rename_state_dict_keys",
    "resize_position_embeddings",
    "state_dict_mismatches",
]
