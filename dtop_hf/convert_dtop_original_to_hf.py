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
r"""Convert official DToP checkpoints (mmsegmentation) and timm / mmseg ViT weights into a Hub-ready DToP folder.

Official DToP checkpoint (all weights; the layout: docs/conversion.md):

    python -m dtop_hf.convert_dtop_original_to_hf --checkpoint iter_40000.pth --config dtop-vit-base-ade20k \
        --output_dir dtop-vit-base-ade20k

ImageNet ViT weights in the timm or mmseg layout (backbone only; the heads are newly initialised, ready for the
official two-phase training):

    python -m dtop_hf.convert_dtop_original_to_hf --checkpoint vit_base_p16_384_mmseg.pth \
        --config dtop-vit-base-ade20k --output_dir dtop-vit-base-ade20k-init

`--config` is a preset name (`--help` lists them), a DToPConfig `config.json`, or a `config.json` in the format of
the official reference vectors (`backbone` / `heads` sections). `.pth` files are read with
`torch.load(weights_only=True)` only; `.safetensors` files are read directly.
"""

import argparse
import json
import logging as stdlib_logging
import math
import pickle
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.utils import logging

from .configuration_dtop import DToPConfig
from .image_processing_dtop import DToPImageProcessor
from .modeling_dtop import DToPForSemanticSegmentation, DToPModelOutput
from .toolkit.data.label_maps import dataset_id2label
from .toolkit.model_card import write_model_card
from .toolkit.presets import PAPER_PRESETS, DToPPaperPreset, default_stage_layout
from .toolkit.vit_weights import (
    drop_keys,
    load_backbone_state_dict,
    rename_state_dict_keys,
    resize_position_embeddings,
    state_dict_mismatches,
)


logger = logging.get_logger(__name__)

# fmt: off
# Official DToP `ViT_prune` backbone = mmseg `VisionTransformer` layout (docs/conversion.md) -> DToP base model.
# Packed q|k|v tensors go to a temporary `qkv` name and are split by `split_packed_qkv`.
MMSEG_BACKBONE_KEY_MAPPING = {
    r"^cls_token$":                                          r"embeddings.cls_token",
    r"^pos_embed$":                                          r"embeddings.position_embeddings",
    r"^patch_embed\.projection\.(weight|bias)$":             r"embeddings.patch_embeddings.projection.\1",
    r"^layers\.(\d+)\.ln1\.(weight|bias)$":                  r"layers.\1.layernorm_before.\2",
    r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$":   r"layers.\1.attention.qkv.\2",
    r"^layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)$": r"layers.\1.attention.o_proj.\2",
    r"^layers\.(\d+)\.ln2\.(weight|bias)$":                  r"layers.\1.layernorm_after.\2",
    r"^layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)$":    r"layers.\1.mlp.fc1.\2",
    r"^layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)$":       r"layers.\1.mlp.fc2.\2",
}

# timm `VisionTransformer` (`vit_*`, `deit_*`, `vit_*_dinov2`, `vit_*_reg4_dinov2`) -> DToP base model. Layer scales
# (`ls1/ls2.gamma`), the distillation token (`deit_*_distilled`) and register tokens (`reg_token`) have their DToP
# counterparts; a packed SwiGLU `mlp.fc1` (gate rows, then up rows: DINOv2-g) is split by `split_packed_gated_mlp`.
TIMM_BACKBONE_KEY_MAPPING = {
    r"^cls_token$":                                  r"embeddings.cls_token",
    r"^dist_token$":                                 r"embeddings.distillation_token",
    r"^reg_token$":                                  r"embeddings.register_tokens",
    r"^pos_embed$":                                  r"embeddings.position_embeddings",
    r"^patch_embed\.proj\.(weight|bias)$":           r"embeddings.patch_embeddings.projection.\1",
    r"^blocks\.(\d+)\.norm1\.(weight|bias)$":        r"layers.\1.layernorm_before.\2",
    r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$":    r"layers.\1.attention.qkv.\2",
    r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$":   r"layers.\1.attention.o_proj.\2",
    r"^blocks\.(\d+)\.norm2\.(weight|bias)$":        r"layers.\1.layernorm_after.\2",
    r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$": r"layers.\1.mlp.\2.\3",
    r"^blocks\.(\d+)\.ls([12])\.gamma$":            r"layers.\1.layer_scale\2.lambda1",
}

# One official `PruneHead` (SegViT ATM head) -> one DToP ATM head (`heads.K.` is prepended).
HEAD_KEY_MAPPING = {
    r"^q\.weight$":                                                          r"queries.weight",
    r"^(input_proj|proj_norm|class_embed)\.(weight|bias)$":                  r"\1.\2",
    r"^decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$":           r"layers.\1.self_attn.qkv.\2",
    r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$":         r"layers.\1.self_attn.o_proj.\2",
    r"^decoder\.layers\.(\d+)\.multihead_attn\.(q|k|v)\.(weight|bias)$":    r"layers.\1.cross_attn.\2_proj.\3",
    r"^decoder\.layers\.(\d+)\.multihead_attn\.proj\.(weight|bias)$":       r"layers.\1.cross_attn.o_proj.\2",
    r"^decoder\.layers\.(\d+)\.(linear1|linear2|norm1|norm2|norm3)\.(weight|bias)$": r"layers.\1.\2.\3",
}

# Official DToP keys without a DToP counterpart: the presence-loss class weights (a buffer of the loss, not of
# the model). `backbone.cls_token` is dropped too unless `use_cls_token` (it cannot influence the official output).
KEYS_TO_DROP = [
    r"\.loss_decode\.criterion\.empty_weight$",
]

# What ImageNet classification checkpoints carry beyond DToP's backbone: the final norm (DToP has none: the heads
# read the raw layer outputs) and the classifier.
BACKBONE_KEYS_TO_DROP = {
    "mmseg": [r"^ln1\.(weight|bias)$"],
    "timm": [
        r"^norm\.(weight|bias)$", r"^fc_norm\.(weight|bias)$", r"^head(_dist)?\.(weight|bias)$", r"^pre_logits\.",
    ],
}
# fmt: on

BACKBONE_KEY_MAPPINGS = {"mmseg": MMSEG_BACKBONE_KEY_MAPPING, "timm": TIMM_BACKBONE_KEY_MAPPING}


def official_preset(preset: DToPPaperPreset) -> dict:
    """A paper configuration of `toolkit.presets.PAPER_PRESETS` as conversion settings: `DToPConfig` kwargs (with the
    data set's class names), image processor kwargs (the official test mode) and model card fields."""
    id2label = dataset_id2label(preset.dataset.name)
    config = {**preset.config_kwargs(), "id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    card = {"datasets": list(preset.dataset.card_datasets), "dataset_name": preset.dataset.display_name}
    return {"config": config, "image_processor": preset.dataset.image_processor_kwargs(), "card": card}


# Input sizes follow SegViT's crops; they reproduce the paper's baseline GFLOPs (ViT-L: 617.0 at 640, 315.4 at 480,
# 366.9 at 512; ViT-B: 109.9 at 512).
PRESETS = {name: official_preset(preset) for name, preset in PAPER_PRESETS.items()}


def split_packed_qkv(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed `in_proj_weight` `(3 * dim, dim)` / `in_proj_bias` `(3 * dim,)` into its q, k, v rows."""
    if packed.shape[0] % 3:
        raise ValueError(f"A packed q|k|v tensor needs 3 * dim rows, got shape {tuple(packed.shape)}.")
    query, key, value = packed.chunk(3, dim=0)
    return query, key, value


def rename_keys(
    state_dict: dict[str, torch.Tensor], key_mapping: dict[str, str], source: str, key_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Apply a regex key table and split the packed q|k|v tensors it marks (`.qkv.` -> `q_proj`, `k_proj`, `v_proj`).

    Raises:
        ValueError: listing every key that no pattern matches (nothing is dropped silently), as `key_prefix + key`.
    """
    renamed = rename_state_dict_keys(state_dict, key_mapping, source, key_prefix)
    converted = {}
    for key, value in renamed.items():
        if ".qkv." not in key:
            converted[key] = value
            continue
        prefix, suffix = key.split(".qkv.")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), split_packed_qkv(value)):
            converted[f"{prefix}.{name}.{suffix}"] = part
    return converted


def strip_common_prefix(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` of DDP, `backbone.` of a segmentor) shared by every key."""
    for prefix in prefixes:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def detect_checkpoint_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """`"dtop"` (an official DToP segmentor), `"mmseg"` or `"timm"` (ViT backbone weights), from the key names."""
    keys = list(strip_common_prefix(state_dict, ("module.",)))
    if any(key.startswith("decode_head.") for key in keys):
        return "dtop"
    backbone_keys = list(strip_common_prefix(dict.fromkeys(keys), ("backbone.",)))
    if any(re.match(r"blocks\.\d+\.attn\.qkv\.", key) for key in backbone_keys):
        return "timm"
    if any(re.match(r"layers\.\d+\.attn\.attn\.in_proj_weight", key) for key in backbone_keys):
        return "mmseg"
    raise ValueError(
        "Cannot tell the checkpoint layout: expected an official DToP segmentor (`decode_head.*` keys), mmseg ViT "
        "weights (`layers.N.attn.attn.in_proj_weight`) or timm ViT weights (`blocks.N.attn.qkv.weight`); got keys "
        f"such as {keys[:5]}. For transformers ViT checkpoints use `DToPForSemanticSegmentation.from_vit_pretrained`."
    )


def convert_backbone_state_dict(
    backbone_state_dict: dict[str, torch.Tensor], layout: str, source: str = "the checkpoint", key_prefix: str = ""
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ViT backbone weights in the mmseg or timm layout -> DToP backbone names (relative to the base model).

    Position embeddings stay at their stored grid (see `load_backbone_state_dict` / `convert_original_state_dict`
    for the resize); a timm grid without a class-token slot gets a zero slot 0 (the same embeddings).

    Args:
        backbone_state_dict: the backbone's tensors, without a `backbone.` prefix.
        layout: `"mmseg"` or `"timm"`.
        source: where the weights come from, for the error messages.
        key_prefix: the prefix the keys had in the checkpoint (e.g. `backbone.`), for the error messages.

    Returns:
        The converted tensors and the sorted list of keys dropped as classification leftovers (final norm,
        classifier).
    """
    if layout not in BACKBONE_KEY_MAPPINGS:
        raise ValueError(f"`layout` must be one of {sorted(BACKBONE_KEY_MAPPINGS)}, got {layout!r}.")
    state_dict, dropped = drop_keys(backbone_state_dict, BACKBONE_KEYS_TO_DROP[layout])
    converted = split_packed_gated_mlp(rename_keys(state_dict, BACKBONE_KEY_MAPPINGS[layout], source, key_prefix))
    position = converted.get("embeddings.position_embeddings")
    if position is not None and math.isqrt(position.shape[1]) ** 2 == position.shape[1]:
        # timm `no_embed_class` models (the registers ones among them) store the grid only, the class token having
        # its position folded in: give it a zero position slot (the same embeddings).
        converted["embeddings.position_embeddings"] = F.pad(position, (0, 0, 1, 0))
    return converted, dropped


def split_packed_gated_mlp(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's packed SwiGLU (`SwiGLUPacked`: `mlp.fc1` holds the gate rows, then the up rows; the activation goes on
    the gate) -> DToP's `gate_proj`, `up_proj`, `down_proj`. A plain MLP (`fc1` rows = `fc2` columns) is kept."""
    converted = dict(state_dict)
    for key in [key for key in state_dict if key.endswith(".mlp.fc1.weight")]:
        prefix = key[: -len("fc1.weight")]
        if state_dict[key].shape[0] != 2 * state_dict[f"{prefix}fc2.weight"].shape[1]:
            continue
        for suffix in ("weight", "bias"):
            packed = converted.pop(f"{prefix}fc1.{suffix}", None)
            if packed is not None:
                converted[f"{prefix}gate_proj.{suffix}"], converted[f"{prefix}up_proj.{suffix}"] = packed.chunk(2)
            if f"{prefix}fc2.{suffix}" in converted:
                converted[f"{prefix}down_proj.{suffix}"] = converted.pop(f"{prefix}fc2.{suffix}")
    return converted


def backbone_fields_from_state_dict(backbone_state_dict: dict[str, torch.Tensor]) -> dict:
    """The backbone's structure read off converted weights (DToP names): width, depth, patch, MLP kind and width,
    layer scale, extra tokens, q|k|v bias and the stored grid (as `image_size`).

    Attention heads cannot be read off weights: every timm / mmseg ViT, DeiT and DINOv2 uses 64-dimensional heads.
    """
    projection = backbone_state_dict["embeddings.patch_embeddings.projection.weight"]  # (dim, channels, P, P)
    hidden_size, num_channels, patch_size = projection.shape[0], projection.shape[1], projection.shape[-1]
    layer_indices = {int(key.split(".")[1]) for key in backbone_state_dict if key.startswith("layers.")}
    use_gated_mlp = "layers.0.mlp.gate_proj.weight" in backbone_state_dict
    mlp_input = "layers.0.mlp.gate_proj.weight" if use_gated_mlp else "layers.0.mlp.fc1.weight"
    has_distillation_token = "embeddings.distillation_token" in backbone_state_dict
    register_tokens = backbone_state_dict.get("embeddings.register_tokens")
    num_positions = backbone_state_dict["embeddings.position_embeddings"].shape[1] - 1 - int(has_distillation_token)
    fields = {
        "hidden_size": hidden_size,
        "num_hidden_layers": len(layer_indices),
        "num_attention_heads": max(hidden_size // 64, 1),
        "intermediate_size": backbone_state_dict[mlp_input].shape[0],
        "patch_size": patch_size,
        "num_channels": num_channels,
        "image_size": math.isqrt(num_positions) * patch_size,
        "qkv_bias": "layers.0.attention.q_proj.bias" in backbone_state_dict,
        "use_gated_mlp": use_gated_mlp,
        "layerscale_value": 1.0 if "layers.0.layer_scale1.lambda1" in backbone_state_dict else None,
        "has_distillation_token": has_distillation_token,
        "num_register_tokens": 0 if register_tokens is None else register_tokens.shape[1],
    }
    if use_gated_mlp:
        fields["hidden_act"] = "silu"  # timm's SwiGLUPacked, DINOv2's SwiGLU
    return fields


def fit_config_to_backbone(config: DToPConfig, backbone_fields: dict) -> tuple[DToPConfig, dict]:
    """The config with the backbone structure of the weights it is to load; its heads, labels, input size and
    pruning settings stay. Extra tokens follow `config.use_cls_token` (True keeps all of them, as in
    `from_vit_pretrained`); a backbone of another depth or width gets the default stage layout for it.

    Returns:
        The fitted config and the fields that changed, `{name: (old, new)}`.
    """
    fields = dict(backbone_fields)
    keep_extra_tokens = config.use_cls_token
    fields["use_distillation_token"] = fields.pop("has_distillation_token") and keep_extra_tokens
    fields["num_register_tokens"] = fields["num_register_tokens"] if keep_extra_tokens else 0
    # DINOv2 with registers resizes its positions with antialiasing (see `Dinov2WithRegistersEmbeddings`).
    fields["position_embedding_antialias"] = backbone_fields["num_register_tokens"] > 0
    fields.pop("image_size")  # the config's input size is the resize target
    if fields["hidden_size"] == config.hidden_size:
        fields.pop("num_attention_heads")
    if (fields["num_hidden_layers"], fields["hidden_size"]) != (config.num_hidden_layers, config.hidden_size):
        layout = default_stage_layout(fields["num_hidden_layers"], fields["hidden_size"])
        fields.update({name: value for name, value in layout.items() if name != "exit_threshold"})
    changes = {name: (getattr(config, name), new) for name, new in fields.items() if getattr(config, name) != new}
    if not changes:
        return config, {}
    return DToPConfig.from_dict({**config.to_dict(), **{name: new for name, (_, new) in changes.items()}}), changes


def expected_state_dict_shapes(config: DToPConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of `DToPForSemanticSegmentation(config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = DToPForSemanticSegmentation(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def head_prefixes(original_keys: list[str], num_stages: int) -> dict[str, str]:
    """Official head prefixes -> DToP ones: `auxiliary_head.N.` -> `heads.N.`, `decode_head.` -> `heads.<last>.`."""
    matches = (re.match(r"auxiliary_head\.(\d+\.)?", key) for key in original_keys)
    auxiliary = sorted({match.group(0) for match in matches if match})
    if auxiliary == ["auxiliary_head."]:  # mmseg names a single auxiliary head without an index
        prefixes = {"auxiliary_head.": "dtop.heads.0."}
    else:
        prefixes = {prefix: f"dtop.heads.{int(prefix.split('.')[1])}." for prefix in auxiliary}
    if len(prefixes) != num_stages - 1:
        raise ValueError(
            f"The checkpoint has {len(prefixes)} auxiliary heads ({sorted(prefixes)}) but the config has "
            f"{num_stages - 1} (`out_indices` {num_stages} entries): use the config the checkpoint was trained with."
        )
    prefixes["decode_head."] = f"dtop.heads.{num_stages - 1}."
    return prefixes


def convert_original_state_dict(
    original_state_dict: dict[str, torch.Tensor], config: DToPConfig
) -> dict[str, torch.Tensor]:
    """Official DToP (mmsegmentation) state dict -> a state dict for `DToPForSemanticSegmentation(config)`.

    Backbone keys follow docs/conversion.md (packed q|k|v split), each official `PruneHead` becomes one ATM head
    (`auxiliary_head.N` -> `heads.N`, `decode_head` -> the last head). Only the loss buffers `empty_weight` and,
    without `config.use_cls_token`, `backbone.cls_token` are dropped. Position embeddings stored for another grid
    than `config.image_size` are resized once (bicubic).

    Returns:
        A state dict that `DToPForSemanticSegmentation(config).load_state_dict(..., strict=True)` accepts.

    Raises:
        ValueError: listing unknown, missing or wrongly shaped keys.
    """
    if config.head_type != "atm":
        raise ValueError(
            f"Official DToP checkpoints have ATM heads (`head_type='atm'`), got `head_type={config.head_type!r}`."
        )
    state_dict = strip_common_prefix(dict(original_state_dict), ("module.",))
    state_dict, dropped = drop_keys(state_dict, KEYS_TO_DROP)
    if not config.use_cls_token and "backbone.cls_token" in state_dict:
        # Official: the class token is prepended and dropped again before layer 0, so it cannot matter.
        del state_dict["backbone.cls_token"]
        dropped.append("backbone.cls_token")

    prefixes = {"backbone.": None, **head_prefixes(list(state_dict), config.num_stages)}
    groups = {prefix: {} for prefix in prefixes}
    unknown = []
    for key, value in state_dict.items():
        prefix = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
        if prefix is None:
            unknown.append(key)
        else:
            groups[prefix][key[len(prefix) :]] = value
    if unknown:
        raise ValueError(f"Unknown keys in the official checkpoint (no conversion rule): {sorted(unknown)}.")

    backbone, _ = convert_backbone_state_dict(groups.pop("backbone."), "mmseg", "the official checkpoint", "backbone.")
    if "embeddings.position_embeddings" in backbone:
        grid = config.image_size // config.patch_size
        backbone["embeddings.position_embeddings"] = resize_position_embeddings(
            backbone["embeddings.position_embeddings"], (grid, grid)
        )
    converted = {f"dtop.{key}": value for key, value in backbone.items()}
    for prefix, head_state_dict in groups.items():
        head = rename_keys(head_state_dict, HEAD_KEY_MAPPING, "the official checkpoint", prefix)
        converted.update({f"{prefixes[prefix]}{key}": value for key, value in head.items()})

    problems = state_dict_mismatches(expected_state_dict_shapes(config), converted)
    if problems:
        raise ValueError(
            f"The converted checkpoint does not fit the config: {problems}. Check the config (dims, layers, "
            "out_indices, num_labels) against the checkpoint."
        )
    num_split = sum(1 for key in original_state_dict if key.endswith(("in_proj_weight", "in_proj_bias")))
    logger.info(
        f"Converted {len(original_state_dict)} official tensors into {len(converted)} DToP tensors: {num_split} "
        f"packed q|k|v tensors split in three, dropped {dropped}."
    )
    return converted


def load_original_checkpoint(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict: `.safetensors`, or a torch pickle loaded with `weights_only=True` only.

    An mmengine checkpoint (`{"state_dict": ..., "meta": ...}`), a `{"model": ...}` wrapper or a raw state dict.
    """
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.suffix == ".safetensors":
        return load_file(checkpoint_path)
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long; its "Unsupported global: ..." part names the object that was refused.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise ValueError(
            f"Refusing to load {checkpoint_path}: it needs more than plain tensors to unpickle (arbitrary objects, "
            "e.g. mmengine's `message_hub` or a custom class), and only `torch.load(weights_only=True)` is used. If "
            "you trust the file, re-save its state dict alone, e.g. `torch.save(torch.load(path, weights_only=False)"
            "['state_dict'], 'state_dict.pth')`, or save it as .safetensors. Refused object: "
            f"{refused.group(1) if refused else 'see the error above'}."
        ) from error
    if isinstance(checkpoint, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(checkpoint.get(wrapper), dict):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise ValueError(
            f"{checkpoint_path} holds no state dict (a mapping of names to tensors, possibly under `state_dict`)."
        )
    return dict(checkpoint)


def config_from_official_json(data: dict) -> tuple[DToPConfig, dict]:
    """DToPConfig and image processor kwargs from a `config.json` in the official reference vectors' format."""
    backbone, heads = data["backbone"], data["heads"]
    thresholds = [float(value) for value in heads["thresholds"][:-1]]
    config = DToPConfig(
        hidden_size=backbone["embed_dims"],
        num_hidden_layers=backbone["num_layers"],
        num_attention_heads=backbone["num_heads"],
        intermediate_size=backbone.get("ffn_hidden", backbone["embed_dims"] * backbone.get("mlp_ratio", 4)),
        layer_norm_eps=backbone.get("layer_norm_eps", 1e-6),
        image_size=backbone["img_size"],
        patch_size=backbone["patch_size"],
        num_channels=backbone.get("in_channels", 3),
        qkv_bias=backbone.get("qkv_bias", True),
        use_cls_token=backbone.get("with_cls_token", False),
        out_indices=tuple(backbone["out_indices"]),
        num_labels=heads.get("num_classes", backbone.get("num_classes")),
        head_hidden_size=heads["channels"],
        head_num_attention_heads=heads["num_heads"],
        head_num_layers=heads["layers_per_decoder"],
        head_intermediate_size=heads.get("dim_feedforward", 4 * heads["channels"]),
        head_layer_norm_eps=heads.get("layer_norm_eps", 1e-5),
        # The official configs share one threshold between the auxiliary heads.
        exit_threshold=thresholds[0] if len(set(thresholds)) == 1 else tuple(thresholds),
        keep_top_k=heads.get("top_k", 5),
    )
    preprocessing = data.get("preprocessing", {})
    image_processor = {
        "size": {"height": config.image_size, "width": config.image_size},
        "image_mean": tuple(value / 255 for value in preprocessing.get("mean", (123.675, 116.28, 103.53))),
        "image_std": tuple(value / 255 for value in preprocessing.get("std", (58.395, 57.12, 57.375))),
    }
    return config, image_processor


def load_conversion_config(name_or_path: str) -> tuple[DToPConfig, dict, dict]:
    """A preset name or a JSON path -> (DToPConfig, image processor kwargs, model card fields)."""
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        return DToPConfig(**preset["config"]), dict(preset["image_processor"]), dict(preset["card"])
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"`--config` must be one of the presets {sorted(PRESETS)} or a config.json path, got {name_or_path!r}."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if "backbone" in data and "heads" in data:
        config, image_processor = config_from_official_json(data)
    else:
        config = DToPConfig.from_dict(data)
        image_processor = {"size": {"height": config.image_size, "width": config.image_size}}
    return config, image_processor, {"datasets": [], "dataset_name": "the data set of the original checkpoint"}


def official_stage_outputs(
    outputs: DToPModelOutput,
    config: DToPConfig,
    input_size: tuple[int, int],
    exit_threshold: float | tuple[float, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Our outputs under the names and shapes of the official reference vectors
    (`tests/fixtures/official_vectors/README.md`).

    Per stage k: `stage<k>.active_tokens` / `exited_after` / `candidates` (bool, `(batch, tokens)`), `confidence`
    (NaN where exited) and `confidence_class` (-1 where exited), `class_logits`, `mask_logits` (the canvas) and
    `probs` (`(batch, num_labels, tokens)`), `hidden_states` when the outputs carry them; then `seg_probs_tokens`
    and `seg_logits` (the probabilities upsampled bilinearly to `input_size`, as the official segmentor returns).
    """
    thresholds = config.exit_thresholds_per_head(exit_threshold)
    last_stage = len(config.out_indices) - 1
    exit_stage = outputs.exit_stage.flatten(1)  # (batch, tokens)
    offset = 1 if config.use_cls_token else 0
    named = {}
    for stage in range(last_stage + 1):
        probs = outputs.stage_logits[stage].flatten(2)  # (batch, num_labels, tokens)
        active = exit_stage >= stage
        confidence, confidence_class = probs.max(dim=1)
        named[f"stage{stage}.active_tokens"] = active
        named[f"stage{stage}.exited_after"] = exit_stage <= stage if stage < last_stage else exit_stage < last_stage
        if stage < last_stage:
            named[f"stage{stage}.candidates"] = active & (confidence > thresholds[stage])
        named[f"stage{stage}.confidence"] = confidence.masked_fill(~active, float("nan"))
        named[f"stage{stage}.confidence_class"] = confidence_class.masked_fill(~active, -1)
        if outputs.stage_class_logits is not None:
            named[f"stage{stage}.class_logits"] = outputs.stage_class_logits[stage]
        named[f"stage{stage}.mask_logits"] = outputs.stage_mask_logits[stage].flatten(2)
        named[f"stage{stage}.probs"] = probs
        if outputs.hidden_states is not None:
            # hidden_states[0] is the embedding output, so layer i's output is entry i + 1.
            named[f"stage{stage}.hidden_states"] = outputs.hidden_states[config.out_indices[stage] + 1][:, offset:]
    named["seg_probs_tokens"] = outputs.logits
    named["seg_logits"] = F.interpolate(outputs.logits, size=input_size, mode="bilinear", align_corners=False)
    return named


def verify_against_vectors(
    model: DToPForSemanticSegmentation, inputs_path: str | Path, outputs_path: str | Path, atol: float = 1e-4
) -> dict[str, dict[str, float]]:
    """Run every `<case>.pixel_values` of `inputs_path` and compare with `<case>.*` of `outputs_path`.

    Returns:
        Per case: the largest absolute difference over the float tensors both sides have, and the fraction of
        exit-mask entries (`active_tokens`, `exited_after`, `candidates`) that agree.

    Raises:
        ValueError: when a float tensor differs by more than `atol` or an exit decision differs.
    """
    inputs, expected = load_file(inputs_path), load_file(outputs_path)
    report = {}
    for input_key in sorted(key for key in inputs if key.endswith(".pixel_values")):
        case = input_key[: -len(".pixel_values")]
        pixel_values = inputs[input_key]
        with torch.no_grad():
            outputs = model(pixel_values, output_hidden_states=True)
        ours = official_stage_outputs(outputs, model.config, tuple(pixel_values.shape[-2:]))
        max_difference, agreeing, total = 0.0, 0, 0
        for name, value in ours.items():
            reference = expected.get(f"{case}.{name}")
            if reference is None:
                continue
            if reference.dtype == torch.bool:
                agreeing += int((value == reference).sum())
                total += reference.numel()
            elif reference.is_floating_point():
                finite = ~torch.isnan(reference)
                max_difference = max(max_difference, float((value[finite] - reference[finite]).abs().max()))
        report[case] = {"max_abs_difference": max_difference, "exit_agreement": agreeing / max(total, 1)}
        if max_difference > atol or agreeing != total:
            raise ValueError(f"Case {case!r} does not match the reference outputs: {report[case]} (atol {atol}).")
    return report


def convert_checkpoint(
    checkpoint_path: str | Path,
    config_name_or_path: str,
    output_dir: str | Path,
    model_name: str | None = None,
    verify_inputs: str | Path | None = None,
    verify_outputs: str | Path | None = None,
) -> DToPForSemanticSegmentation:
    """Convert a checkpoint (official DToP, or mmseg / timm ViT backbone weights) and save a Hub-ready folder:
    `model.safetensors`, `config.json`, `preprocessor_config.json`, the modeling code and `README.md`.

    For backbone weights, the backbone's structure (width, depth, patch, MLP, layer scale, distillation and register
    tokens) is read off the weights and replaces the config's (see `fit_config_to_backbone`); the image processor's
    input and window sizes are the model's own input size."""
    config, image_processor_kwargs, card_fields = load_conversion_config(config_name_or_path)
    original_state_dict = load_original_checkpoint(checkpoint_path)
    layout = detect_checkpoint_layout(original_state_dict)
    if layout == "dtop":
        model = DToPForSemanticSegmentation(config)
        model.load_state_dict(convert_original_state_dict(original_state_dict, config), strict=True)
        description = f"Weights converted from the official DToP checkpoint `{Path(checkpoint_path).name}`."
        training_recipe = "These weights were trained by the DToP authors' code; they were converted, not retrained."
    else:
        backbone_state_dict = strip_common_prefix(original_state_dict, ("module.", "backbone."))
        converted, dropped = convert_backbone_state_dict(backbone_state_dict, layout, str(checkpoint_path))
        config, changes = fit_config_to_backbone(config, backbone_fields_from_state_dict(converted))
        if changes:
            logger.info(f"Backbone structure read off the weights, replacing the config's (old, new): {changes}.")
        model = DToPForSemanticSegmentation(config)
        load_backbone_state_dict(model, converted, source=str(checkpoint_path))
        logger.info(
            f"Backbone loaded from {layout} ViT weights ({len(converted)} tensors); dropped {dropped} (final norm "
            "and classifier: DToP has no final norm); the heads are newly initialised and need training."
        )
        description = (
            f"Backbone from the {layout} ViT checkpoint `{Path(checkpoint_path).name}`; the heads are newly "
            "initialised: this is a starting point for training, not a trained segmenter."
        )
        training_recipe = "Not trained yet: train it with the recipe above (e.g. `examples/finetune.py`)."
    model.eval()

    if verify_inputs is not None:
        if verify_outputs is None:
            raise ValueError("`--verify_inputs` needs `--verify_outputs` (the expected outputs) too.")
        for case, figures in verify_against_vectors(model, verify_inputs, verify_outputs).items():
            logger.info(
                f"Verified case {case}: max abs difference {figures['max_abs_difference']:.2e}, exit decisions "
                f"agree {100 * figures['exit_agreement']:.2f}%."
            )

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    # A preset already carries the official test mode (keep-ratio resize, slide crop = the model's input, official
    # stride). A config.json does not: use the model's own input size (a multiple of its patch) for resizing and for
    # the windows, with the stride 2/3 of the window, as mmseg's 341 for 512.
    if "crop_size" not in image_processor_kwargs:
        side = config.image_size // config.patch_size * config.patch_size
        image_processor_kwargs.update(
            size={"height": side, "width": side},
            crop_size={"height": side, "width": side},
            stride={"height": 2 * side // 3, "width": 2 * side // 3},
        )
    DToPImageProcessor(**image_processor_kwargs).save_pretrained(output_dir)
    card_path = write_model_card(
        output_dir, config, model_name=model_name, description=description, training_recipe=training_recipe,
        **card_fields,
    )  # fmt: skip

    # Round trip: the saved folder must hold exactly the converted weights.
    reloaded = DToPForSemanticSegmentation.from_pretrained(output_dir).state_dict()
    changed = sorted(key for key, value in model.state_dict().items() if not torch.equal(reloaded[key], value))
    if changed:
        raise ValueError(f"The saved model does not hold the converted weights: {changed} differ after reloading.")
    logger.info(f"Saved to {output_dir} (weights, config, image processor, code, {card_path.name}); reloaded: equal.")
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=str, required=True,
        help="Official DToP checkpoint (.pth mmengine checkpoint or raw state dict, or .safetensors), or timm / "
        "mmseg ViT backbone weights.",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=str, required=True,
        help=f"A preset ({', '.join(sorted(PRESETS))}), a DToPConfig config.json, or a config.json in the format "
        "of the official reference vectors (tests/fixtures/official_vectors).",
    )  # fmt: skip
    parser.add_argument("--output_dir", type=str, required=True, help="Folder to write the Hub-ready model into.")
    parser.add_argument("--model_name", type=str, default=None, help="Title of the model card (default: folder name).")
    parser.add_argument(
        "--verify_inputs", type=str, default=None,
        help="Optional safetensors file with `<case>.pixel_values` to run before saving (the format of the official "
        "reference vectors).",
    )  # fmt: skip
    parser.add_argument(
        "--verify_outputs", type=str, default=None,
        help="Safetensors file with the expected `<case>.*` outputs for `--verify_inputs`.",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The conversion report is logged at INFO level by this package's loggers (and by `__main__` under `python -m`).
    for report_logger in {stdlib_logging.getLogger("dtop_hf"), stdlib_logging.getLogger(logger.name.split(".")[0])}:
        report_logger.setLevel(stdlib_logging.INFO)
        if not any(getattr(handler, "dtop_report", False) for handler in report_logger.handlers):
            handler = stdlib_logging.StreamHandler(sys.stdout)
            handler.dtop_report = True
            report_logger.addHandler(handler)
    convert_checkpoint(
        args.checkpoint, args.config, args.output_dir, args.model_name, args.verify_inputs, args.verify_outputs
    )


__all__ = [
    "HEAD_KEY_MAPPING",
    "KEYS_TO_DROP",
    "MMSEG_BACKBONE_KEY_MAPPING",
    "PRESETS",
    "TIMM_BACKBONE_KEY_MAPPING",
    "convert_backbone_state_dict",
    "convert_checkpoint",
    "convert_original_state_dict",
    "detect_checkpoint_layout",
    "load_conversion_config",
    "load_original_checkpoint",
    "official_stage_outputs",
    "split_packed_qkv",
    "verify_against_vectors",
]


if __name__ == "__main__":
    main()
