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
"""Tests of `from_vit_pretrained`: a DToP model started from transformers ViT checkpoints saved locally."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from dtop_hf import DToPForSemanticSegmentation, DToPModel
from dtop_hf.toolkit.vit_weights import dtop_config_from_vit, resize_position_embeddings


HEAD_FIELDS = {"out_indices": (1, 2, 3), "head_hidden_size": 16, "head_num_attention_heads": 2, "head_num_layers": 2}


def tiny_vit_config(**overrides) -> ViTConfig:
    fields = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
    )  # fmt: skip
    fields.update(overrides)
    return ViTConfig(**fields)


def non_trivial_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every tensor (ViT initialises position embeddings, biases and norms to constants, which
    would hide a mix-up)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter.ndim == 1) * 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=["ViTModel", "ViTForImageClassification"])
def vit_checkpoint(request, tmp_path_factory):
    """A tiny random ViT saved in both on-disk key layouts: `(folder_v4_names, folder_v5_names, ViTModel)`."""
    config = tiny_vit_config()
    torch.manual_seed(0)
    if request.param == "ViTModel":
        model = non_trivial_(ViTModel(config, add_pooling_layer=False))
    else:
        model = non_trivial_(ViTForImageClassification(config))
    folders = []
    for original_format in (True, False):
        folder = tmp_path_factory.mktemp(f"{request.param}-{'v4' if original_format else 'v5'}")
        model.save_pretrained(folder, save_original_format=original_format)
        folders.append(folder)
    vit = model if request.param == "ViTModel" else model.vit
    return folders[0], folders[1], vit


def saved_keys(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as file:
        return set(file.keys())


def test_checkpoints_use_both_key_layouts(vit_checkpoint):
    v4_folder, v5_folder, _ = vit_checkpoint
    v4_keys, v5_keys = saved_keys(v4_folder), saved_keys(v5_folder)
    assert any(key.endswith("encoder.layer.0.attention.attention.query.weight") for key in v4_keys)
    assert not any("q_proj" in key for key in v4_keys)
    assert any(key.endswith("layers.0.attention.q_proj.weight") for key in v5_keys)
    assert not any("attention.attention.query" in key for key in v5_keys)


@pytest.mark.parametrize("layout", ["v4", "v5"])
@pytest.mark.parametrize("model_class", [DToPForSemanticSegmentation, DToPModel])
def test_backbone_tensors_equal_the_vit_ones(vit_checkpoint, layout, model_class):
    v4_folder, v5_folder, vit = vit_checkpoint
    model = model_class.from_vit_pretrained(v4_folder if layout == "v4" else v5_folder, num_labels=3, **HEAD_FIELDS)
    base = model.dtop if model_class is DToPForSemanticSegmentation else model
    vit_tensors = vit.state_dict()
    ours = {f"embeddings.{key}": value for key, value in base.embeddings.state_dict().items()}
    ours.update({f"layers.{key}": value for key, value in base.layers.state_dict().items()})
    # Same names (DToP mirrors ViT's v5 names), minus the class token (dropped by default) and the final norm.
    assert set(ours) == set(vit_tensors) - {"embeddings.cls_token", "layernorm.weight", "layernorm.bias"}
    for key, value in ours.items():
        assert torch.equal(value, vit_tensors[key]), key
    assert base.embeddings.cls_token is None
    # Backbone fields from the ViT config, heads from the keyword arguments.
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.layer_norm_eps) == (32, 4, 8, 1e-6)
    assert config.num_labels == 3 and config.head_hidden_size == 16 and len(base.heads) == 3


def test_heads_are_new_and_random(vit_checkpoint):
    v4_folder, _, _ = vit_checkpoint
    torch.manual_seed(1)
    first = DToPForSemanticSegmentation.from_vit_pretrained(v4_folder, num_labels=3, **HEAD_FIELDS)
    torch.manual_seed(2)
    second = DToPForSemanticSegmentation.from_vit_pretrained(v4_folder, num_labels=3, **HEAD_FIELDS)
    queries = first.dtop.heads[0].queries.weight
    assert queries.shape == (3, 16) and queries.std() > 0
    assert not torch.equal(queries, second.dtop.heads[0].queries.weight)
    assert torch.equal(first.dtop.layers[0].mlp.fc1.weight, second.dtop.layers[0].mlp.fc1.weight)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hidden_states_equal_vit_with_the_class_token(vit_checkpoint, attn_implementation):
    """With the class token kept and no exit, the DToP backbone is exactly the ViT."""
    v4_folder, _, vit = vit_checkpoint
    model = DToPForSemanticSegmentation.from_vit_pretrained(
        v4_folder, num_labels=3, use_cls_token=True, attn_implementation=attn_implementation, **HEAD_FIELDS
    )
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values, exit_threshold=1.0, output_hidden_states=True).hidden_states
        reference = vit(pixel_values, output_hidden_states=True).hidden_states
    assert len(ours) == len(reference) == 5
    for layer, (our_state, vit_state) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(our_state, vit_state, atol=1e-5, rtol=1e-5, msg=f"hidden state {layer}")


def test_position_embeddings_are_resized_once_not_reinitialised(vit_checkpoint, tmp_path):
    v4_folder, _, vit = vit_checkpoint
    model = DToPForSemanticSegmentation.from_vit_pretrained(
        v4_folder, num_labels=3, image_size=48, use_cls_token=True, **HEAD_FIELDS
    )
    stored = vit.embeddings.position_embeddings  # (1, 1 + 4 * 4, 32)
    resized = model.dtop.embeddings.position_embeddings
    assert model.config.image_size == 48 and resized.shape == (1, 1 + 6 * 6, 32)
    grid = stored[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)  # (1, 32, 6, 6)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 32)
    torch.testing.assert_close(resized[:, 1:], expected)
    assert torch.equal(resized[:, :1], stored[:, :1])

    # The model at 48 px is ViT run at 48 px with its own (identical) bicubic position interpolation.
    pixel_values = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(pixel_values, exit_threshold=1.0, output_hidden_states=True).hidden_states
        reference = vit(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    for our_state, vit_state in zip(ours, reference):
        torch.testing.assert_close(our_state, vit_state, atol=1e-5, rtol=1e-5)

    # Saved and reloaded, the resized embeddings stay as they are.
    model.save_pretrained(tmp_path)
    reloaded = DToPForSemanticSegmentation.from_pretrained(tmp_path)
    assert torch.equal(reloaded.dtop.embeddings.position_embeddings, resized)


def test_resize_position_embeddings_keeps_same_grid_and_checks_shape():
    position = torch.randn(1, 1 + 9, 4)
    assert resize_position_embeddings(position, (3, 3)) is position
    assert resize_position_embeddings(position, (2, 5)).shape == (1, 1 + 10, 4)
    with pytest.raises(ValueError, match="square grid"):
        resize_position_embeddings(torch.randn(1, 1 + 8, 4), (3, 3))


def test_keyword_arguments_override_and_are_checked():
    vit_config = tiny_vit_config()
    config = dtop_config_from_vit(vit_config, layer_norm_eps=1e-5, exit_threshold=0.8, num_labels=4, **HEAD_FIELDS)
    assert config.layer_norm_eps == 1e-5 and config.exit_threshold == 0.8 and config.num_labels == 4
    with pytest.raises(ValueError, match="Unknown keyword arguments \\['exit_treshold'\\]"):
        dtop_config_from_vit(vit_config, exit_treshold=0.8, **HEAD_FIELDS)
    # Without stage arguments, the default layout for the depth and width: any depth loads.
    default = dtop_config_from_vit(vit_config, num_labels=4)
    assert default.out_indices == (1, 2, 3) and default.head_hidden_size == 16
    assert default.head_num_attention_heads == 1 and default.exit_threshold == 0.9


def test_official_stage_layout_for_vit_base_and_large():
    base = dtop_config_from_vit(ViTConfig(image_size=384, patch_size=16), num_labels=150, image_size=512)
    assert base.out_indices == (5, 7, 11) and base.head_hidden_size == 384 and base.exit_threshold == 0.9
    assert base.image_size == 512 and base.layer_norm_eps == 1e-12  # google/vit-* checkpoints use 1e-12
    large = dtop_config_from_vit(
        ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        num_labels=150,
    )
    assert large.out_indices == (7, 15, 23) and large.head_hidden_size == 512 and large.exit_threshold == 0.95
