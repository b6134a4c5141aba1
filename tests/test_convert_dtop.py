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
"""Tests of the checkpoint converter: parity with the official DToP code, layouts, presets, Hub-ready folders."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.convert_dtop_original_to_hf import (
    PRESETS,
    convert_backbone_state_dict,
    convert_original_state_dict,
    detect_checkpoint_layout,
    load_conversion_config,
    load_original_checkpoint,
    main,
    official_stage_outputs,
    split_packed_qkv,
)
from dtop_hf.toolkit.model_card import reference_model_card, render_model_card, write_model_card


# What the official DToP code computed for a small random model (how they were made: the README beside them).
VECTORS_DIR = Path(__file__).resolve().parent / "fixtures" / "official_vectors"
ATOL, RTOL = 1e-5, 1e-4
ARGMAX_GAP = 1e-5  # one pixel of the reference has its top-2 classes within 8e-6 of each other


class CustomMeta:
    """Stands for the arbitrary objects of an mmengine checkpoint's `meta` / `message_hub`."""

    def __init__(self):
        self.iteration = 40000


def tiny_config(**overrides) -> DToPConfig:
    fields = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, out_indices=(1, 2, 3), head_hidden_size=16, head_num_attention_heads=2, head_num_layers=2,
        num_labels=5,
    )  # fmt: skip
    fields.update(overrides)
    return DToPConfig(**fields)


# DToP name fragments -> official (mmseg) / timm ones, replaced in order: the converter's inverse, written by hand.
OFFICIAL_BACKBONE_NAMES = [
    ("embeddings.position_embeddings", "pos_embed"), ("embeddings.cls_token", "cls_token"),
    ("embeddings.patch_embeddings.projection", "patch_embed.projection"), ("layernorm_before", "ln1"),
    ("layernorm_after", "ln2"), ("attention.o_proj", "attn.attn.out_proj"), ("attention.", "attn.attn."),
    ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1"),
]  # fmt: skip
OFFICIAL_HEAD_NAMES = [
    ("queries.", "q."), ("layers.", "decoder.layers."), ("cross_attn.o_proj.", "multihead_attn.proj."),
    ("cross_attn.q_proj.", "multihead_attn.q."), ("cross_attn.k_proj.", "multihead_attn.k."),
    ("cross_attn.v_proj.", "multihead_attn.v."), (".o_proj.", ".out_proj."),
]  # fmt: skip
TIMM_BACKBONE_NAMES = [
    ("embeddings.position_embeddings", "pos_embed"), ("embeddings.cls_token", "cls_token"),
    ("embeddings.patch_embeddings.projection", "patch_embed.proj"), ("layers.", "blocks."),
    ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.o_proj", "attn.proj"),
    ("attention.", "attn."),
]  # fmt: skip


def rename(key: str, name_pairs: list[tuple[str, str]]) -> str:
    for old, new in name_pairs:
        key = key.replace(old, new)
    return key


def pack_qkv(state_dict: dict[str, torch.Tensor], packed_name: str) -> dict[str, torch.Tensor]:
    """Concatenate every `q_proj`/`k_proj`/`v_proj` triple (rows q, k, v) into `<module>.<packed_name>`, where
    `packed_name` is a format string of the suffix (`weight`/`bias`)."""
    packed = dict(state_dict)
    for key in [key for key in state_dict if ".q_proj." in key]:
        module, suffix = key.split(".q_proj.")
        parts = [packed.pop(f"{module}.{name}.{suffix}") for name in ("q_proj", "k_proj", "v_proj")]
        packed[f"{module}.{packed_name.format(suffix)}"] = torch.cat(parts)
    return packed


def to_official_layout(state_dict: dict[str, torch.Tensor], config: DToPConfig) -> dict[str, torch.Tensor]:
    """A DToP state dict in the official mmseg layout (docs/conversion.md), with a class token and the `empty_weight`
    loss buffers the official checkpoints carry."""
    last_head = config.num_stages - 1
    official = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dtop.")
        if key.startswith("heads."):
            _, index, rest = key.split(".", 2)
            prefix = "decode_head." if int(index) == last_head else f"auxiliary_head.{index}."
            official[prefix + rename(rest, OFFICIAL_HEAD_NAMES)] = value
        else:
            official["backbone." + rename(key, OFFICIAL_BACKBONE_NAMES)] = value
    official = pack_qkv(official, "in_proj_{}")  # nn.MultiheadAttention's packed parameters
    official.setdefault("backbone.cls_token", torch.randn(1, 1, config.hidden_size))
    for prefix in [f"auxiliary_head.{index}." for index in range(last_head)] + ["decode_head."]:
        official[prefix + "loss_decode.criterion.empty_weight"] = torch.tensor([1.0, 0.1])
    return official


def to_timm_layout(backbone_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DToP backbone tensors (base-model names) in timm's ViT layout, with a final norm and a classifier."""
    timm = pack_qkv({rename(key, TIMM_BACKBONE_NAMES): value for key, value in backbone_state_dict.items()}, "qkv.{}")
    dim = backbone_state_dict["embeddings.position_embeddings"].shape[-1]
    timm.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)})
    timm.update({"head.weight": torch.randn(10, dim), "head.bias": torch.zeros(10)})
    return timm


def backbone_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The DToP base model's embeddings and layers, by base-model name."""
    return {
        key.removeprefix("dtop."): value
        for key, value in model.state_dict().items()
        if key.removeprefix("dtop.").startswith(("embeddings.", "layers."))
    }


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official implementation (tests/fixtures/official_vectors)


@pytest.fixture(scope="module")
def reference_vectors():
    return load_file(VECTORS_DIR / "inputs.safetensors"), load_file(VECTORS_DIR / "outputs.safetensors")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def converted_model(request):
    config, image_processor_kwargs, _ = load_conversion_config(str(VECTORS_DIR / "config.json"))
    model = DToPForSemanticSegmentation._from_config(config, attn_implementation=request.param)
    converted = convert_original_state_dict(load_file(VECTORS_DIR / "weights.safetensors"), config)
    model.load_state_dict(converted, strict=True)
    return model.eval(), image_processor_kwargs


def run_case(model, inputs, case: str) -> dict[str, torch.Tensor]:
    pixel_values = inputs[f"{case}.pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    return official_stage_outputs(outputs, model.config, tuple(pixel_values.shape[-2:]))


def test_vectors_config_is_read_from_official_json():
    config, image_processor_kwargs, _ = load_conversion_config(str(VECTORS_DIR / "config.json"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 8, 4)
    assert (config.patch_size, config.image_size, config.intermediate_size) == (4, 64, 128)
    assert config.out_indices == (3, 5, 7) and config.num_labels == 7
    assert (config.head_hidden_size, config.head_num_attention_heads, config.head_num_layers) == (24, 3, 3)
    assert config.exit_thresholds_per_head() == (0.5768, 0.5768, 1.0) and config.keep_top_k == 5
    assert (config.layer_norm_eps, config.head_layer_norm_eps, config.use_cls_token) == (1e-6, 1e-5, False)
    assert image_processor_kwargs["image_mean"] == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("case", ["b1", "b2"])
def test_parity_with_official_outputs(converted_model, reference_vectors, case):
    """Every stage tensor and exit mask of the official code, reproduced from the converted weights."""
    model, _ = converted_model
    inputs, expected = reference_vectors
    ours = run_case(model, inputs, case)
    reference_names = sorted(
        key[len(case) + 1 :] for key in expected if key.startswith(f"{case}.") and "_ori" not in key
    )
    compared, mask_agreement = [], []
    for name in reference_names:
        if name == "seg_map":
            continue
        assert name in ours, f"no counterpart for reference tensor {case}.{name}"
        value, reference = ours[name], expected[f"{case}.{name}"]
        assert value.shape == reference.shape, name
        if reference.dtype == torch.bool or not reference.is_floating_point():
            assert torch.equal(value, reference.to(value.dtype)), f"{case}.{name} differs"
            if reference.dtype == torch.bool:
                mask_agreement.append(float((value == reference).float().mean()))
            continue
        assert torch.equal(torch.isnan(value), torch.isnan(reference)), f"{case}.{name}: NaNs at other places"
        finite = ~torch.isnan(reference)
        torch.testing.assert_close(value[finite], reference[finite], atol=ATOL, rtol=RTOL, msg=f"{case}.{name}")
        compared.append((name, float((value[finite] - reference[finite]).abs().max())))
    # Reported in the test log (pytest -s): the parity figures.
    worst = max(compared, key=lambda item: item[1])
    print(
        f"\n[{model.config._attn_implementation}] {case}: {len(compared)} float tensors, max abs difference "
        f"{worst[1]:.2e} ({worst[0]}); {len(mask_agreement)} exit masks agree {100 * min(mask_agreement):.1f}%"
    )
    assert {"stage0.candidates", "stage1.exited_after", "stage2.active_tokens", "seg_logits"} <= set(reference_names)

    # Argmax map, except where the official top-2 classes are within float noise of each other.
    seg_logits = expected[f"{case}.seg_logits"]
    top2 = seg_logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > ARGMAX_GAP
    ours_map = ours["seg_logits"].argmax(dim=1)
    assert torch.equal(ours_map[clear], expected[f"{case}.seg_map"].long()[clear])
    assert int((~clear).sum()) <= 1


def test_batch_of_two_gives_image_zero_the_same_decisions(converted_model, reference_vectors):
    model, _ = converted_model
    inputs, _ = reference_vectors
    alone, batched = run_case(model, inputs, "b1"), run_case(model, inputs, "b2")
    for stage in range(3):
        assert torch.equal(alone[f"stage{stage}.exited_after"][0], batched[f"stage{stage}.exited_after"][0])
    torch.testing.assert_close(alone["seg_probs_tokens"][0], batched["seg_probs_tokens"][0], atol=ATOL, rtol=RTOL)


def test_post_processing_to_original_size(converted_model, reference_vectors):
    """`b1.seg_logits_ori`: mmseg upsamples the grid to the 64x64 input, then resizes to the original 48x80.

    The image processor resizes in the same two steps (input `size` first), so it reproduces the official tensor.
    """
    model, image_processor_kwargs = converted_model
    inputs, expected = reference_vectors
    with torch.no_grad():
        outputs = model(inputs["b1.pixel_values"])
    reference, reference_map = expected["b1.seg_logits_ori"][0], expected["b1.seg_map_ori"][0].long()

    processor = DToPImageProcessor(**image_processor_kwargs)
    processed = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[(48, 80)], return_segmentation_scores=True
    )[0]
    torch.testing.assert_close(processed.segmentation_scores, reference, atol=ATOL, rtol=RTOL)
    assert torch.equal(processed.segmentation, reference_map)
    difference = float((processed.segmentation_scores - reference).abs().max())
    print(f"\nseg_logits_ori: processor vs official: max abs difference {difference:.3e}")


def test_cli_converts_verifies_and_writes_a_hub_ready_folder(tmp_path, reference_vectors):
    output_dir = tmp_path / "dtop-official-tiny"
    main([
        "--checkpoint", str(VECTORS_DIR / "weights.safetensors"),
        "--config", str(VECTORS_DIR / "config.json"),
        "--output_dir", str(output_dir),
        "--verify_inputs", str(VECTORS_DIR / "inputs.safetensors"),
        "--verify_outputs", str(VECTORS_DIR / "outputs.safetensors"),
    ])  # fmt: skip
    check_hub_ready_folder(output_dir, num_labels=7)

    from transformers import AutoModelForSemanticSegmentation

    inputs, expected = reference_vectors
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(output_dir).eval()
    with torch.no_grad():
        logits = reloaded(inputs["b2.pixel_values"]).logits
    torch.testing.assert_close(logits, expected["b2.seg_probs_tokens"], atol=ATOL, rtol=RTOL)


def test_cli_verification_fails_on_wrong_weights(tmp_path):
    weights = load_file(VECTORS_DIR / "weights.safetensors")
    weights["decode_head.class_embed.bias"] = weights["decode_head.class_embed.bias"] + 0.5
    save_file(weights, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="does not match the reference outputs"):
        main([
            "--checkpoint", str(tmp_path / "wrong.safetensors"),
            "--config", str(VECTORS_DIR / "config.json"),
            "--output_dir", str(tmp_path / "out"),
            "--verify_inputs", str(VECTORS_DIR / "inputs.safetensors"),
            "--verify_outputs", str(VECTORS_DIR / "outputs.safetensors"),
        ])  # fmt: skip
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# The mapping itself, on tiny random models


def test_split_packed_qkv_returns_rows_in_q_k_v_order():
    packed = torch.arange(12.0).reshape(6, 2)
    query, key, value = split_packed_qkv(packed)
    assert torch.equal(query, packed[:2]) and torch.equal(key, packed[2:4]) and torch.equal(value, packed[4:])
    with pytest.raises(ValueError, match="3 \\* dim"):
        split_packed_qkv(torch.zeros(4, 2))


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_round_trip_through_the_official_layout(use_cls_token):
    config = tiny_config(use_cls_token=use_cls_token)
    torch.manual_seed(0)
    model = DToPForSemanticSegmentation(config).eval()
    official = to_official_layout(model.state_dict(), config)
    assert "backbone.layers.0.attn.attn.in_proj_weight" in official and "decode_head.q.weight" in official
    assert detect_checkpoint_layout(official) == "dtop"

    converted = convert_original_state_dict(official, config)
    fresh = DToPForSemanticSegmentation(config).eval()
    fresh.load_state_dict(converted, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert ("dtop.embeddings.cls_token" in converted) == use_cls_token


def test_unknown_missing_and_misshapen_keys_are_reported():
    config = tiny_config()
    official = to_official_layout(DToPForSemanticSegmentation(config).state_dict(), config)
    with pytest.raises(ValueError, match="backbone.layers.0.attn.attn.gamma"):
        convert_original_state_dict({**official, "backbone.layers.0.attn.attn.gamma": torch.ones(32)}, config)
    with pytest.raises(ValueError, match="neck.weight"):
        convert_original_state_dict({**official, "neck.weight": torch.ones(1)}, config)
    incomplete = {key: value for key, value in official.items() if key != "auxiliary_head.1.class_embed.bias"}
    with pytest.raises(ValueError, match="missing \\['dtop.heads.1.class_embed.bias'\\]"):
        convert_original_state_dict(incomplete, config)
    with pytest.raises(ValueError, match="wrong shapes .*dtop.heads.2.queries.weight"):
        convert_original_state_dict(official, tiny_config(num_labels=6))
    with pytest.raises(ValueError, match="auxiliary heads"):
        convert_original_state_dict(official, tiny_config(out_indices=(2, 3)))


def test_position_embeddings_of_another_grid_are_resized_once():
    config = tiny_config()
    official = to_official_layout(DToPForSemanticSegmentation(config).state_dict(), config)
    larger = tiny_config(image_size=48)
    converted = convert_original_state_dict(official, larger)
    stored = official["backbone.pos_embed"]
    grid = stored[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)  # (1, 32, 6, 6)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(converted["dtop.embeddings.position_embeddings"][:, 1:], expected)
    assert torch.equal(converted["dtop.embeddings.position_embeddings"][:, :1], stored[:, :1])


def test_pth_checkpoints_load_with_weights_only(tmp_path):
    config = tiny_config()
    official = to_official_layout(DToPForSemanticSegmentation(config).state_dict(), config)
    torch.save({"meta": {"iter": 40000, "classes": ("a", "b")}, "state_dict": official}, tmp_path / "mmengine.pth")
    torch.save(official, tmp_path / "raw.pth")
    for name in ("mmengine.pth", "raw.pth"):
        loaded = load_original_checkpoint(tmp_path / name)
        assert loaded.keys() == official.keys()
        assert all(torch.equal(loaded[key], official[key]) for key in official)


def test_pickles_that_need_arbitrary_objects_are_refused(tmp_path):
    config = tiny_config()
    official = to_official_layout(DToPForSemanticSegmentation(config).state_dict(), config)
    torch.save({"state_dict": official, "message_hub": CustomMeta()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only=True.*Refused object: .*CustomMeta"):
        load_original_checkpoint(tmp_path / "unsafe.pth")


@pytest.mark.parametrize("layout", ["timm", "mmseg"])
def test_backbone_only_checkpoints_initialise_the_backbone(tmp_path, layout):
    """ImageNet ViT weights in the timm or mmseg layout: backbone in, classifier and final norm out, new heads,
    position embeddings resized to the config's image size."""
    source_config = tiny_config(use_cls_token=True)
    torch.manual_seed(1)
    source = backbone_tensors(DToPForSemanticSegmentation(source_config))
    if layout == "timm":
        checkpoint = to_timm_layout(source)
    else:
        official = to_official_layout({f"dtop.{key}": value for key, value in source.items()}, source_config)
        checkpoint = {key[len("backbone.") :]: value for key, value in official.items() if key.startswith("backbone.")}
        checkpoint.update({"ln1.weight": torch.ones(32), "ln1.bias": torch.zeros(32)})  # mmseg's final norm
    assert detect_checkpoint_layout(checkpoint) == layout
    converted, dropped = convert_backbone_state_dict(checkpoint, layout)
    assert converted.keys() == source.keys() and all(torch.equal(converted[key], source[key]) for key in source)
    expected_dropped = {
        "timm": ["head.bias", "head.weight", "norm.bias", "norm.weight"],
        "mmseg": ["ln1.bias", "ln1.weight"],
    }
    assert dropped == expected_dropped[layout]

    target_config = tiny_config(image_size=48)
    target_config.save_pretrained(tmp_path)
    torch.save({"state_dict": checkpoint}, tmp_path / "vit.pth")
    main(["--checkpoint", str(tmp_path / "vit.pth"), "--config", str(tmp_path / "config.json"),
          "--output_dir", str(tmp_path / "out")])  # fmt: skip
    model = DToPForSemanticSegmentation.from_pretrained(tmp_path / "out")
    loaded = backbone_tensors(model)
    assert model.dtop.embeddings.cls_token is None
    assert loaded["embeddings.position_embeddings"].shape == (1, 1 + 6 * 6, 32)
    for key, value in source.items():
        if key not in ("embeddings.position_embeddings", "embeddings.cls_token"):
            assert torch.equal(loaded[key], value), key
    assert "newly initialised" in (tmp_path / "out" / "README.md").read_text()
    # The written processor serves the model's own input size, not the default 512 windows.
    processor = DToPImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.crop_size == {"height": 48, "width": 48} and processor.size.height == 48


def test_unknown_backbone_layout_is_refused():
    with pytest.raises(ValueError, match="from_vit_pretrained"):
        detect_checkpoint_layout({"vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(1)})
    # Layer scale is reproduced now (DINOv2); timm's query/key norms (not in any supported family) are refused.
    with pytest.raises(ValueError, match="blocks.0.attn.q_norm.weight"):
        qk_normed = {"blocks.0.attn.qkv.weight": torch.zeros(6, 2), "blocks.0.attn.q_norm.weight": torch.ones(2)}
        convert_backbone_state_dict(qk_normed, "timm")


# ----------------------------------------------------------------------------------------------------------------
# Presets, model card, Hub-ready folders


PRESET_EXPECTATIONS = [
    ("dtop-vit-base-ade20k", 150, 512, (5, 7, 11), 6, 0.9, (0.485, 0.456, 0.406)),
    ("dtop-vit-large-ade20k", 150, 640, (7, 15, 23), 8, 0.95, (0.5, 0.5, 0.5)),
    ("dtop-vit-large-pascal-context", 59, 480, (7, 15, 23), 16, 0.95, (0.5, 0.5, 0.5)),
    ("dtop-vit-large-coco-stuff-10k", 171, 512, (7, 15, 23), 16, 0.95, (0.5, 0.5, 0.5)),
]


def test_every_preset_is_checked():
    assert {expectation[0] for expectation in PRESET_EXPECTATIONS} == set(PRESETS)


@pytest.mark.parametrize("name, num_labels, image_size, layers, head_heads, threshold, mean", PRESET_EXPECTATIONS)
def test_presets_have_the_official_settings(name, num_labels, image_size, layers, head_heads, threshold, mean):
    config, image_processor_kwargs, card_fields = load_conversion_config(name)
    assert (config.num_labels, config.image_size, config.out_indices) == (num_labels, image_size, layers)
    is_base = layers[-1] == 11
    assert (config.hidden_size, config.num_attention_heads) == ((768, 12) if is_base else (1024, 16))
    assert config.patch_size == 16 and config.num_hidden_layers == layers[-1] + 1
    assert config.head_num_attention_heads == head_heads and config.exit_thresholds_per_head()[0] == threshold
    assert config.head_hidden_size == (384 if is_base else 512) and config.keep_top_k == 5
    assert len(set(config.id2label.values())) == num_labels
    assert image_processor_kwargs["image_mean"] == mean and image_processor_kwargs["do_reduce_labels"] is True
    assert card_fields["datasets"]
    # The official layout of a model of that size converts to exactly this config's parameters (meta tensors).
    with torch.device("meta"):
        official = to_official_layout(DToPForSemanticSegmentation(config).state_dict(), config)
        expected_shapes = {key: value.shape for key, value in DToPForSemanticSegmentation(config).state_dict().items()}
    converted = convert_original_state_dict(official, config)
    assert {key: value.shape for key, value in converted.items()} == expected_shapes


def check_hub_ready_folder(folder: Path, num_labels: int) -> None:
    """What `push_to_hub` needs: weights, config with auto_map, image processor, code and a model card."""
    files = {path.name for path in folder.iterdir()}
    expected_files = {
        "config.json", "model.safetensors", "preprocessor_config.json", "README.md",
        "configuration_dtop.py", "modeling_dtop.py", "image_processing_dtop.py", "pruning.py",
    }  # fmt: skip
    assert expected_files <= files, expected_files - files
    # Weight conversion and presets are toolkit code: a saved folder carries only what running the model needs.
    assert not {"vit_weights.py", "presets.py", "presets_dtop.py"} & files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dtop" and len(config["id2label"]) == num_labels
    assert {"AutoConfig", "AutoModel", "AutoModelForSemanticSegmentation"} <= set(config["auto_map"])
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_dtop.DToPImageProcessor"

    card_text = (folder / "README.md").read_text()
    assert "{{" not in card_text
    metadata = ModelCard(card_text).data
    assert metadata.library_name == "transformers" and metadata.pipeline_tag == "image-segmentation"
    assert {"dtop", "semantic-segmentation", "vision", "token-pruning"} <= set(metadata.tags)
    assert metadata.metrics == ["mean_iou"] and isinstance(metadata.datasets, list)
    for section in ("## Intended use", "## How to use", "## Training recipe", "## Evaluation", "## Limitations",
                    "## Citation", "trust_remote_code=True", "109.9 -> 86.8", "| ours: "):  # fmt: skip
        assert section in card_text, section


def test_save_pretrained_folder_with_model_card_is_hub_ready(tmp_path):
    _, image_processor_kwargs, card_fields = load_conversion_config("dtop-vit-base-ade20k")
    model = DToPForSemanticSegmentation(tiny_config(num_labels=150))
    model.save_pretrained(tmp_path)
    DToPImageProcessor(**image_processor_kwargs).save_pretrained(tmp_path)
    write_model_card(tmp_path, model.config, model_name="dtop-tiny", repo_id="someone/dtop-tiny",
                     mean_iou=0.4321, gflops=1.34, **card_fields)  # fmt: skip
    check_hub_ready_folder(tmp_path, num_labels=150)
    card = (tmp_path / "README.md").read_text()
    assert ModelCard(card).data.datasets == ["scene_parse_150"]
    assert "| ours: dtop-tiny | ADE20K | 1.3 | 43.2 |" in card
    assert 'from_pretrained("someone/dtop-tiny", trust_remote_code=True)' in card
    assert "after layers [1, 2, 3]" in card


def test_repository_model_card_is_the_rendered_reference_card():
    """The repository's MODEL_CARD.md is the template rendered for the official ViT-B/16 ADE20K configuration: what a
    folder of it carries. Generated, never edited by hand, so that it cannot drift from the template."""
    card = (Path(__file__).resolve().parents[1] / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert card == reference_model_card(), "out of date: run `python -m dtop_hf.toolkit.model_card MODEL_CARD.md`"
    assert "{{" not in card and ModelCard(card).data.datasets == ["scene_parse_150"]
    assert "after layers [5, 7, 11]" in card and "| ours: dtop-vit-base-ade20k | ADE20K |" in card


def test_model_card_placeholders_must_all_be_filled():
    with pytest.raises(ValueError, match="without a value \\['b'\\]"):
        render_model_card("{{a}} and {{ b }}", {"a": "x"})
    with pytest.raises(ValueError, match="without a placeholder \\['c'\\]"):
        render_model_card("{{a}}", {"a": "x", "c": "y"})
    assert render_model_card("{{a}} and {{ a }}", {"a": "x"}) == "x and x"


def test_saved_folder_loads_as_remote_code_in_a_fresh_process(tmp_path):
    """The copied code runs without dtop-hf."""
    model = DToPForSemanticSegmentation(tiny_config()).eval()
    model.save_pretrained(tmp_path / "model")
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values).logits
    save_file({"pixel_values": pixel_values, "logits": expected}, tmp_path / "io.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dtop_hf"] = None  # make the installed package unimportable
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        assert hasattr(model, "from_vit_pretrained")
        data = load_file({str(tmp_path / "io.safetensors")!r})
        with torch.no_grad():
            logits = model.eval()(data["pixel_values"]).logits
        torch.testing.assert_close(logits, data["logits"])
        print("remote ok")
        """
    )
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout
