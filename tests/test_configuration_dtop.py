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
"""Tests of DToPConfig: official defaults, threshold handling, validation at construction and at save, round trips."""

import json
import os

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig

from dtop_hf import DToPConfig


TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=4,
    num_labels=5,
    out_indices=[1, 2, 3],
    head_hidden_size=16,
    head_num_attention_heads=2,
    head_num_layers=2,
)

# Config validators run inside huggingface_hub's strict dataclass machinery, which wraps our ValueError in a
# StrictDataclassClassValidationError (not a ValueError subclass): the message is the contract, so match on it.
INVALID_CONFIGS = [
    (dict(exit_threshold=0.0), r"`exit_threshold` must lie in \(0, 1\]"),
    (dict(exit_threshold=-0.5), r"`exit_threshold` must lie in \(0, 1\]"),
    (dict(exit_threshold=1.5), r"`exit_threshold` must lie in \(0, 1\].*1\.5"),
    (dict(exit_threshold=[0.9, 1.01]), r"`exit_threshold` must lie in \(0, 1\]"),
    (dict(exit_threshold=[0.9]), r"one `exit_threshold` value per auxiliary head \(2\)"),
    (dict(exit_threshold=[0.9, 0.9, 0.9]), r"one `exit_threshold` value per auxiliary head \(2\)"),
    (dict(out_indices=[2, 1, 3]), r"`out_indices` must be strictly increasing.*\[2, 1, 3\]"),
    (dict(out_indices=[1, 1, 3]), r"`out_indices` must be strictly increasing"),
    (dict(out_indices=[1, 2, 4]), r"`out_indices` must be strictly increasing layer indices in \[0, 4\)"),
    (dict(out_indices=[-1, 2, 3]), r"`out_indices` must be strictly increasing"),
    (dict(out_indices=[]), r"`out_indices` must be strictly increasing"),
    (dict(out_indices=[0, 1, 2]), r"decode head and must be the last layer \(3\)"),
    (dict(keep_top_k=-1), r"`keep_top_k` must be >= 0, got -1"),
    (dict(head_type="segformer"), r"`head_type` must be 'atm' or 'fcn'"),
    (dict(hidden_size=30), r"`hidden_size` \(30\) must be divisible by `num_attention_heads` \(4\)"),
    (dict(head_hidden_size=18, head_num_attention_heads=4), r"`head_hidden_size` \(18\) must be divisible"),
    (dict(stage_loss_weights=[1.0, 1.0]), r"`stage_loss_weights` needs one weight per head \(3\)"),
    (dict(patch_size=0), r"`patch_size` must be >= 1"),
]


def test_defaults_are_the_official_vit_b_model():
    config = DToPConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.intermediate_size, config.patch_size, config.image_size) == (3072, 16, 512)
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu" and config.qkv_bias
    assert config.out_indices == (5, 7, 11) and config.num_stages == 3
    assert (config.head_type, config.head_hidden_size, config.head_num_attention_heads) == ("atm", 384, 6)
    assert config.head_num_layers == 3 and config.head_intermediate_size == 4 * 384
    assert config.head_layer_norm_eps == 1e-5
    assert config.exit_threshold == 0.9 and config.keep_top_k == 5
    assert config.exit_thresholds_per_head() == (0.9, 0.9, 1.0)
    assert (config.no_object_weight, config.mask_focal_weight, config.mask_dice_weight) == (0.1, 20.0, 1.0)
    assert config.semantic_loss_ignore_index == 255 and not config.use_cls_token


def test_sequences_and_numbers_are_normalised():
    config = DToPConfig(**{**TINY, "exit_threshold": [1, 0.5], "stage_loss_weights": [1, 2, 3]})
    assert config.out_indices == (1, 2, 3)
    assert config.exit_threshold == (1.0, 0.5) and all(isinstance(value, float) for value in config.exit_threshold)
    assert config.stage_loss_weights == (1.0, 2.0, 3.0)
    assert DToPConfig(**{**TINY, "exit_threshold": 1}).exit_threshold == 1.0
    assert DToPConfig(**{**TINY, "head_intermediate_size": 40}).head_intermediate_size == 40
    assert DToPConfig(**TINY).head_intermediate_size == 64


def test_exit_thresholds_per_head():
    config = DToPConfig(**{**TINY, "exit_threshold": 0.8})
    # The decode head never prunes: its threshold is always 1.0.
    assert config.exit_thresholds_per_head() == (0.8, 0.8, 1.0)
    assert config.exit_thresholds_per_head(0.7) == (0.7, 0.7, 1.0)
    assert config.exit_thresholds_per_head([0.6, 1.0]) == (0.6, 1.0, 1.0)
    assert config.exit_thresholds_per_head((1.0, 0.95)) == (1.0, 0.95, 1.0)
    with pytest.raises(ValueError, match=r"one `exit_threshold` value per auxiliary head \(2\), got \[0.5\]"):
        config.exit_thresholds_per_head([0.5])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        config.exit_thresholds_per_head(0.0)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        config.exit_thresholds_per_head([0.5, 2.0])


def test_num_labels_builds_label_maps():
    config = DToPConfig(**TINY)
    assert config.num_labels == 5 and len(config.id2label) == 5
    without_num_labels = {key: value for key, value in TINY.items() if key != "num_labels"}
    config = DToPConfig(**without_num_labels, id2label={0: "sky", 1: "road"}, label2id={"sky": 0, "road": 1})
    assert config.num_labels == 2 and config.id2label == {0: "sky", 1: "road"}


@pytest.mark.parametrize("overrides, message", INVALID_CONFIGS, ids=[str(case[0]) for case in INVALID_CONFIGS])
def test_invalid_values_fail_at_construction(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        DToPConfig(**{**TINY, **overrides})


def test_wrong_types_fail_at_construction():
    with pytest.raises(StrictDataclassFieldValidationError, match="exit_threshold"):
        DToPConfig(**{**TINY, "exit_threshold": "high"})
    with pytest.raises(StrictDataclassFieldValidationError, match="keep_top_k"):
        DToPConfig(**{**TINY, "keep_top_k": 2.5})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("exit_threshold", 2.0, r"`exit_threshold` must lie in \(0, 1\]"),
        ("keep_top_k", -3, r"`keep_top_k` must be >= 0"),
        ("out_indices", (2, 1, 3), r"`out_indices` must be strictly increasing"),
        ("head_num_attention_heads", 3, r"`head_hidden_size` \(16\) must be divisible"),
    ],
)
def test_invalid_values_set_later_fail_at_save(tmp_path, field, value, message):
    config = DToPConfig(**TINY)
    setattr(config, field, value)
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_invalid_config_fails_at_model_save(model_tester, tmp_path):
    model = model_tester().create_model()
    model.config.keep_top_k = -2
    with pytest.raises(StrictDataclassClassValidationError, match=r"`keep_top_k` must be >= 0, got -2"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "model.safetensors").exists()


def test_save_and_load_round_trip(tmp_path):
    config = DToPConfig(**{**TINY, "exit_threshold": [0.8, 0.95], "keep_top_k": 3, "head_type": "fcn"})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dtop" and saved["exit_threshold"] == [0.8, 0.95]
    assert saved["auto_map"]["AutoConfig"] == "configuration_dtop.DToPConfig"
    assert os.path.exists(tmp_path / "configuration_dtop.py")  # remote code is saved next to the config
    for loaded in (DToPConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is DToPConfig
        assert loaded.exit_threshold == (0.8, 0.95) and loaded.out_indices == (1, 2, 3)
        assert loaded.exit_thresholds_per_head() == config.exit_thresholds_per_head()
        loaded_fields = {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"}
        assert loaded_fields == {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
        assert loaded.id2label == config.id2label and all(isinstance(key, int) for key in loaded.id2label)
