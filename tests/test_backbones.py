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
"""The ViT families DToP starts from: ViT, DeiT, DINOv2 (with registers), DINOv3, from transformers
checkpoints (`from_vit_pretrained`) and from timm weights (the converter), each checked against the source model."""

import json
import logging
import os
import textwrap

import numpy as np
import pytest
import torch
from conftest import images_that_prune_differently, pruning_thresholds, run_without_dtop_hf
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    ViTMSNConfig,
    ViTMSNModel,
)

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPModel
from dtop_hf.convert_dtop_original_to_hf import detect_checkpoint_layout, main
from dtop_hf.toolkit.evaluation.flops import count_flops_from_outputs
from dtop_hf.toolkit.presets import default_stage_layout
from dtop_hf.toolkit.vit_weights import dtop_config_from_vit


TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
NATIVE_SIZE, LARGER_SIZE = (32, 32), (48, 40)  # 4x4 grid (stored), 6x5 grid (interpolated / rotated by the source)
MAX_DIFFERENCE = 1e-4  # fp32, on every layer's tokens


def source_model(family: str) -> torch.nn.Module:
    """A tiny transformers model of the family; `_plain` / `_swiglu` variants switch the MLP kind."""
    builders = {
        "vit": lambda: ViTModel(ViTConfig(**TINY, intermediate_size=64, layer_norm_eps=1e-6), add_pooling_layer=False),
        "deit": lambda: DeiTModel(DeiTConfig(**TINY, intermediate_size=64), add_pooling_layer=False),
        "dinov2": lambda: Dinov2Model(Dinov2Config(**TINY, mlp_ratio=2)),
        "dinov2_swiglu": lambda: Dinov2Model(Dinov2Config(**TINY, use_swiglu_ffn=True)),
        "dinov2_with_registers": lambda: Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, num_register_tokens=2)
        ),
        "dinov3": lambda: DINOv3ViTModel(
            DINOv3ViTConfig(**TINY, intermediate_size=48, num_register_tokens=2, use_gated_mlp=True)
        ),
        "dinov3_plain": lambda: DINOv3ViTModel(DINOv3ViTConfig(**TINY, intermediate_size=64, num_register_tokens=0)),
    }
    torch.manual_seed(0)
    return non_trivial_(builders[family]())


FAMILIES = ["vit", "deit", "dinov2", "dinov2_swiglu", "dinov2_with_registers", "dinov3", "dinov3_plain"]
# Prefix tokens of each family: class (+ distillation) (+ registers).
NUM_PREFIX_TOKENS = {
    "vit": 1, "deit": 2, "dinov2": 1, "dinov2_swiglu": 1, "dinov2_with_registers": 3, "dinov3": 3, "dinov3_plain": 1,
}  # fmt: skip


def non_trivial_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every tensor: layer scales, class / distillation / register tokens, norms and biases are
    constants at initialisation, which would let a dropped or mixed-up tensor go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter.ndim == 1) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def saved_sources(tmp_path_factory) -> dict:
    """Every family saved with `save_pretrained` (on-disk names as transformers writes them): `{family: (folder,
    model)}`."""
    sources = {}
    for family in FAMILIES:
        model = source_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        sources[family] = (folder, model)
    return sources


def source_hidden_states(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The source's embeddings and every layer's output; ViT and DeiT interpolate positions only when asked."""
    kwargs = {"interpolate_pos_encoding": True} if isinstance(model, (ViTModel, DeiTModel)) else {}
    with torch.no_grad():
        return model(pixel_values, output_hidden_states=True, **kwargs).hidden_states


def load_dtop(folder, model_class=DToPForSemanticSegmentation, **kwargs) -> torch.nn.Module:
    """The source's extra tokens kept, no stage arguments: the default layout for 4 layers of width 32. The new
    heads are seeded, so that thresholds chosen for them are reproducible."""
    torch.manual_seed(0)
    return model_class.from_vit_pretrained(folder, num_labels=3, use_cls_token=True, **kwargs)


def images(size: tuple[int, int], batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed))


def pruning_inputs(model: torch.nn.Module, make_images) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Images from the first of a few seeds whose token confidences leave a safe gap for exit thresholds (conftest's
    `pruning_thresholds`; random heads on 12-32 tokens sometimes give only near-equal confidences), and those
    thresholds."""
    for seed in range(8):
        pixel_values = make_images(seed)
        try:
            return pixel_values, pruning_thresholds(model, pixel_values)
        except RuntimeError:
            continue
    raise RuntimeError("No image seed gives confidences with a safe gap for a threshold.")


# ----------------------------------------------------------------------------------------------------------------
# The source model's hidden states, reproduced


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_equal_the_source_at_two_sizes(saved_sources, family, attn_implementation):
    folder, source = saved_sources[family]
    model = load_dtop(folder, attn_implementation=attn_implementation)
    assert model.config.num_prefix_tokens == NUM_PREFIX_TOKENS[family]
    for size in (NATIVE_SIZE, LARGER_SIZE):
        pixel_values = images(size)
        with torch.no_grad():
            ours = model(pixel_values, exit_threshold=1.0, output_hidden_states=True).hidden_states
        reference = source_hidden_states(source, pixel_values)
        assert len(ours) == len(reference) == 5
        for layer, (our_state, source_state) in enumerate(zip(ours, reference)):
            assert our_state.shape == source_state.shape, (size, layer)
            difference = float((our_state - source_state).abs().max())
            assert difference < MAX_DIFFERENCE, f"{family} at {size}, hidden state {layer}: {difference:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_what_each_family_brings_is_loaded_not_initialised(saved_sources, family):
    folder, source = saved_sources[family]
    model = load_dtop(folder, model_class=DToPModel)
    config, source_tensors = model.config, source.state_dict()
    has_layer_scale = family.startswith("dino")
    assert (config.layerscale_value is not None) == has_layer_scale
    if has_layer_scale:
        source_scale = next(value for key, value in source_tensors.items() if key.endswith("0.layer_scale2.lambda1"))
        assert torch.equal(model.layers[0].layer_scale2.lambda1, source_scale)
    assert config.use_gated_mlp == (family in ("dinov2_swiglu", "dinov3"))
    assert config.use_distillation_token == (family == "deit")
    if family == "deit":
        assert torch.equal(model.embeddings.distillation_token, source_tensors["embeddings.distillation_token"])
    assert config.num_register_tokens == NUM_PREFIX_TOKENS[family] - 1 - int(family == "deit")
    if config.num_register_tokens:
        assert torch.equal(model.embeddings.register_tokens, source_tensors["embeddings.register_tokens"])
    assert config.position_embedding_type == ("rope" if family.startswith("dinov3") else "absolute")
    assert (model.embeddings.position_embeddings is None) == family.startswith("dinov3")
    if family == "dinov3":
        assert config.key_bias is False and model.layers[0].attention.k_proj.bias is None


@pytest.mark.parametrize("family", ["dinov2_with_registers", "dinov3"])
def test_extra_tokens_are_dropped_unless_kept(saved_sources, family):
    """By default, as in the official DToP, the backbone starts from the patch tokens alone."""
    folder, _ = saved_sources[family]
    model = DToPModel.from_vit_pretrained(folder, num_labels=3)
    assert model.config.num_prefix_tokens == 0
    assert model.embeddings.cls_token is None and model.embeddings.register_tokens is None
    with torch.no_grad():
        outputs = model(images(NATIVE_SIZE), output_hidden_states=True)
    assert outputs.hidden_states[0].shape == (2, 16, 32)
    # The clearer name keeps them all, like `use_cls_token=True`.
    kept = DToPModel.from_vit_pretrained(folder, num_labels=3, keep_extra_tokens=True)
    assert kept.config.num_prefix_tokens == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_remaining_tokens_keep_their_positions_while_others_exit(saved_sources, family):
    """After head 0 some tokens exit; the others must go on exactly as in the source model run on them alone with
    their own grid positions (DINOv3: their own rotary angles; the others: their position embeddings, added once)."""
    folder, source = saved_sources[family]
    model = load_dtop(folder, keep_top_k=1)
    pixel_values, thresholds = pruning_inputs(model, lambda seed: images(NATIVE_SIZE, batch_size=1, seed=seed))
    thresholds = (thresholds[0], 1.0)  # only head 0 prunes
    with torch.no_grad():
        outputs = model(pixel_values, exit_threshold=thresholds, output_hidden_states=True)
    num_prefix = model.config.num_prefix_tokens
    active_patches = (outputs.exit_stage.flatten() > 0).nonzero().squeeze(1)  # (active,)
    assert 0 < active_patches.numel() < 16, "head 0 must let some but not all tokens exit"
    rows = torch.cat([torch.arange(num_prefix), num_prefix + active_patches])
    first_layer_after_exit = model.config.out_indices[0] + 1

    reference = source_hidden_states(source, pixel_values)[first_layer_after_exit][:, rows]
    if isinstance(source, DINOv3ViTModel):
        cos, sin = source.rope_embeddings(pixel_values)  # (16, head_dim): patch rows only
        layers, layer_kwargs = source.model.layer, {"position_embeddings": (cos[active_patches], sin[active_patches])}
    else:
        layers = source.layers if isinstance(source, (ViTModel, DeiTModel)) else source.encoder.layer
        layer_kwargs = {}
    with torch.no_grad():
        for index in range(first_layer_after_exit, model.config.num_hidden_layers):
            reference = layers[index](reference, **layer_kwargs)
            reference = reference[0] if isinstance(reference, tuple) else reference
            ours = outputs.hidden_states[index + 1][:, rows]
            difference = float((ours - reference).abs().max())
            assert difference < MAX_DIFFERENCE, f"{family} layer {index}: {difference:.2e}"
    # Exited rows are zero from the exit on; the prefix tokens never exit.
    assert torch.all(outputs.tokens_per_layer[0, first_layer_after_exit:] == rows.numel())


@pytest.mark.parametrize("family", ["deit", "dinov2_with_registers", "dinov3"])
def test_pruning_is_per_image_with_prefix_tokens(saved_sources, family):
    folder, _ = saved_sources[family]
    model = load_dtop(folder, keep_top_k=1)
    pixel_values, thresholds = pruning_inputs(model, lambda seed: images_that_prune_differently(2, 32, seed))
    with torch.no_grad():
        batch = model(pixel_values, exit_threshold=thresholds)
        alone = [model(pixel_values[index : index + 1], exit_threshold=thresholds) for index in range(2)]
    num_prefix = model.config.num_prefix_tokens
    assert batch.exit_stage.shape == (2, 4, 4)  # the exit map covers the patch grid only
    assert torch.all(batch.tokens_per_layer[:, 0] == num_prefix + 16)
    assert (batch.tokens_per_layer[:, -1] < batch.tokens_per_layer[:, 0]).all()
    assert not torch.equal(batch.tokens_per_layer[0], batch.tokens_per_layer[1]), "images should prune differently"
    for index, single in enumerate(alone):
        assert torch.equal(single.exit_stage[0], batch.exit_stage[index])
        assert torch.equal(single.tokens_per_layer[0], batch.tokens_per_layer[index])
        torch.testing.assert_close(single.logits[0], batch.logits[index], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_counter_equals_flop_counter_mode(saved_sources, family):
    """Registers and the distillation token are tokens of every layer; the gated MLP has three matrices; rotary
    embeddings and layer scales are elementwise (not counted by either)."""
    folder, _ = saved_sources[family]
    model = load_dtop(folder, attn_implementation="eager", keep_top_k=1).requires_grad_(False)
    # Non-square: a 4 x 3 grid.
    pixel_values, pruned = pruning_inputs(model, lambda seed: images((32, 24), batch_size=1, seed=seed))
    for exit_threshold in (1.0, pruned):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            outputs = model(pixel_values, exit_threshold=exit_threshold)
        flops = count_flops_from_outputs(model.config, outputs)
        assert flops.total.item() * 1e9 == pytest.approx(counter.get_total_flops() // 2, rel=1e-12, abs=0.5)
    assert outputs.tokens_per_layer[0, -1] < outputs.tokens_per_layer[0, 0]


BACKBONE_OPTIONS = {
    "deit-like": {"use_cls_token": True, "use_distillation_token": True},
    "dinov3-like": {
        "use_cls_token": True, "num_register_tokens": 2, "layerscale_value": 0.5, "use_gated_mlp": True,
        "key_bias": False, "position_embedding_type": "rope", "rope_rescale": 2.0,
    },
}  # fmt: skip


@pytest.mark.parametrize("options", sorted(BACKBONE_OPTIONS))
def test_backbone_options_initialise_save_and_reload(options, tmp_path):
    config = DToPConfig(
        **TINY, intermediate_size=48, out_indices=(1, 2, 3), head_hidden_size=16, head_num_attention_heads=2,
        num_labels=3, **BACKBONE_OPTIONS[options],
    )  # fmt: skip
    torch.manual_seed(0)
    model = DToPForSemanticSegmentation(config).eval()
    embeddings = model.dtop.embeddings
    for token in (embeddings.cls_token, embeddings.distillation_token, embeddings.register_tokens):
        assert token is None or token.std() > 0  # initialised, not left at zero
    if options == "deit-like":
        assert embeddings.position_embeddings.shape == (1, 2 + 16, 32)
    else:
        assert torch.all(model.dtop.layers[0].layer_scale1.lambda1 == 0.5)
        assert embeddings.position_embeddings is None and model.dtop.layers[0].attention.k_proj.bias is None
    model.save_pretrained(tmp_path)
    reloaded = DToPForSemanticSegmentation.from_pretrained(tmp_path).eval()
    pixel_values = images(LARGER_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
    if options == "dinov3-like":
        # DINOv3's coordinate augmentation (`rope_rescale`) draws new coordinates in training mode only.
        model.train()
        with torch.no_grad():
            first, second = (model(pixel_values, output_hidden_states=True).hidden_states[-1] for _ in range(2))
        assert not torch.allclose(first, second)


# ----------------------------------------------------------------------------------------------------------------
# Task-model folders, errors, loading reports


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def recorded_logs():
    """Every message of the transformers and dtop_hf loggers while the test runs (INFO and up)."""
    handler = RecordingHandler()
    loggers = [logging.getLogger(name) for name in ("transformers", "dtop_hf")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    yield handler.messages
    for log, level in zip(loggers, levels):
        log.removeHandler(handler)
        log.setLevel(level)


TASK_MODELS = {
    "ViTForImageClassification": lambda: ViTForImageClassification(ViTConfig(**TINY, intermediate_size=64)),
    "DeiTForImageClassificationWithTeacher": lambda: DeiTForImageClassificationWithTeacher(
        DeiTConfig(**TINY, intermediate_size=64)
    ),
    "Dinov2ForImageClassification": lambda: Dinov2ForImageClassification(Dinov2Config(**TINY)),
}


@pytest.mark.parametrize("task_model", sorted(TASK_MODELS))
def test_task_model_folders_load_without_a_load_report(task_model, tmp_path, recorded_logs, capfd):
    """Classifier heads, poolers and the final norm are dropped on purpose: no transformers LOAD REPORT about them;
    the drop is logged at INFO by dtop_hf; the backbone equals the classifier's."""
    classifier = non_trivial_(TASK_MODELS[task_model]())
    classifier.save_pretrained(tmp_path)
    model = DToPModel.from_vit_pretrained(tmp_path, num_labels=3, use_cls_token=True)
    backbone = getattr(classifier, classifier.base_model_prefix)
    pixel_values = images(NATIVE_SIZE)
    with torch.no_grad():
        ours = model(pixel_values, exit_threshold=1.0, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, source_hidden_states(backbone, pixel_values)[-1], atol=1e-5, rtol=1e-5)
    captured = capfd.readouterr()
    assert not any("LOAD REPORT" in message for message in recorded_logs)
    assert "LOAD REPORT" not in captured.out + captured.err
    dropped = next(message for message in recorded_logs if "dropped on purpose" in message)
    assert "classifier.weight" in dropped


def test_unsupported_families_are_refused(tmp_path):
    ViTMSNModel(ViTMSNConfig(**TINY, intermediate_size=64)).save_pretrained(tmp_path / "msn")
    with pytest.raises(ValueError, match="'vit_msn' checkpoint.*\\['vit', 'deit', 'dinov2'"):
        DToPForSemanticSegmentation.from_vit_pretrained(tmp_path / "msn", num_labels=3)
    DToPForSemanticSegmentation(DToPConfig(**TINY, intermediate_size=64, out_indices=(3,))).save_pretrained(
        tmp_path / "dtop"
    )
    with pytest.raises(ValueError, match="'dtop' checkpoint.*use `from_pretrained`"):
        DToPForSemanticSegmentation.from_vit_pretrained(tmp_path / "dtop", num_labels=3)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda tensors: tensors.pop("encoder.layer.1.layer_scale2.lambda1"),
         "missing \\['encoder.layer.1.layer_scale2"),
        (lambda tensors: tensors.update({"encoder.layer.0.attention.gamma": torch.ones(32)}),
         "unexpected \\['encoder.layer.0.attention.gamma'\\]"),
        (lambda tensors: tensors.update({"encoder.layer.2.norm1.weight": torch.ones(31)}),
         "wrong shapes \\['encoder.layer.2.norm1.weight: expected \\(32,\\), got \\(31,\\)"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)  # fmt: skip
def test_tampered_checkpoints_fail_naming_the_key(saved_sources, tmp_path, tamper, message):
    """A DINOv2 checkpoint that lacks a layer scale, carries a foreign tensor or a misshapen norm does not load
    half-initialised: the error names the tensor."""
    folder, _ = saved_sources["dinov2"]
    tensors = load_file(folder / "model.safetensors")
    tamper(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        DToPForSemanticSegmentation.from_vit_pretrained(tmp_path, num_labels=3)


def test_config_that_does_not_fit_the_weights_fails_naming_the_key(saved_sources):
    folder, _ = saved_sources["dinov2_with_registers"]
    with pytest.raises(ValueError, match="wrong shapes .*embeddings.register_tokens: expected \\(1, 3, 32\\)"):
        DToPModel.from_vit_pretrained(folder, num_labels=3, use_cls_token=True, num_register_tokens=3)
    with pytest.raises(ValueError, match="has no `embeddings.distillation_token`"):
        DToPModel.from_vit_pretrained(folder, num_labels=3, use_cls_token=True, use_distillation_token=True)


# ----------------------------------------------------------------------------------------------------------------
# Default stage layout, image processors


@pytest.mark.parametrize(
    "num_layers, width, out_indices, head_width, head_heads, threshold",
    [
        (4, 32, (1, 2, 3), 16, 1, 0.9),
        (6, 384, (2, 3, 5), 192, 3, 0.9),
        (12, 384, (5, 7, 11), 192, 3, 0.9),  # ViT-S, DINOv2-S
        (12, 768, (5, 7, 11), 384, 6, 0.9),  # ViT-B: the official layout
        (24, 1024, (7, 15, 23), 512, 8, 0.95),  # ViT-L: the official layout (ADE20K heads)
        (40, 1536, (12, 26, 39), 768, 12, 0.95),  # DINOv2-g
        (2, 32, (0, 1), 16, 1, 0.9),  # both auxiliary heads would fall on layer 0: merged
    ],
)  # fmt: skip
def test_default_stage_layout(num_layers, width, out_indices, head_width, head_heads, threshold):
    layout = default_stage_layout(num_layers, width)
    assert layout == {
        "out_indices": out_indices, "head_hidden_size": head_width, "head_num_attention_heads": head_heads,
        "exit_threshold": threshold,
    }  # fmt: skip
    DToPConfig(num_hidden_layers=num_layers, hidden_size=width, num_attention_heads=1, **layout)  # valid


def test_small_backbones_load_with_no_stage_arguments_and_explicit_values_override():
    vit_small = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    dinov2_small = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14
    )
    for source_config in (vit_small, dinov2_small):
        config = dtop_config_from_vit(source_config, num_labels=150)
        assert config.out_indices == (5, 7, 11) and config.head_hidden_size == 192
        with torch.device("meta"):
            DToPForSemanticSegmentation(config)
    assert dtop_config_from_vit(dinov2_small, num_labels=150).intermediate_size == 1536
    overridden = dtop_config_from_vit(dinov2_small, num_labels=150, out_indices=(3, 11), head_hidden_size=96)
    assert overridden.out_indices == (3, 11) and overridden.head_hidden_size == 96
    assert overridden.head_num_attention_heads == 3  # still the default for the width


@pytest.mark.parametrize(
    "family, mean", [("vit", (0.5, 0.5, 0.5)), ("deit", (0.485, 0.456, 0.406)), ("dinov3", (0.485, 0.456, 0.406))]
)
def test_image_processor_follows_the_family(saved_sources, family, mean, tmp_path):
    folder, _ = saved_sources[family]
    model, processor = DToPForSemanticSegmentation.from_vit_pretrained(
        folder, num_labels=3, image_size=44, output_image_processor=True
    )
    assert tuple(processor.image_mean) == pytest.approx(mean)
    # image_size 44 with 8 px patches: a 5x5 grid, served at 40 px, a multiple of the patch size.
    assert (processor.size.height, processor.crop_size["height"], processor.stride["height"]) == (40, 40, 24)
    with torch.no_grad():
        outputs = model(processor(images=Image.new("RGB", (50, 30)), return_tensors="pt")["pixel_values"])
    assert outputs.logits.shape == (1, 3, 5, 5)
    # The checkpoint's own normalisation wins over the family's.
    own = tmp_path / "own"
    own.mkdir()
    for name in ("config.json", "model.safetensors"):
        (own / name).write_bytes((folder / name).read_bytes())
    (own / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}))
    _, processor = DToPModel.from_vit_pretrained(own, num_labels=3, output_image_processor=True)
    assert list(processor.image_mean) == [0.1, 0.2, 0.3] and list(processor.image_std) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Remote code and the pipeline, DINOv3-based


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["dtop_hf"] = None  # make the package unimportable
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForSemanticSegmentation, pipeline

    torch.set_num_threads(1)
    folder, reference_path, image_path, report_path = sys.argv[1:5]
    reference = load_file(reference_path)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(reference["pixel_values"])
    segmentation = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    results = segmentation(Image.open(image_path))
    report = {
        "module": type(model).__module__,
        "logits_difference": float((outputs.logits - reference["logits"]).abs().max()),
        "exit_stage_equal": torch.equal(outputs.exit_stage, reference["exit_stage"]),
        "labels": [result["label"] for result in results],
        "masks": [np.array(result["mask"]).tolist() for result in results],
    }
    with open(report_path, "w") as report_file:
        json.dump(report, report_file)
    """
)


def test_dinov3_based_folder_runs_in_the_pipeline_as_remote_code(saved_sources, exit_thresholds, tmp_path):
    folder, _ = saved_sources["dinov3"]
    labels = {index: f"class_{index}" for index in range(3)}
    model, processor = DToPForSemanticSegmentation.from_vit_pretrained(
        folder, num_labels=3, id2label=labels, label2id={name: index for index, name in labels.items()},
        use_cls_token=True, keep_top_k=1, output_image_processor=True,
    )  # fmt: skip
    with torch.no_grad():  # equal presence for all classes, so that the map holds several classes
        model.dtop.heads[-1].class_embed.weight.zero_()
        model.dtop.heads[-1].class_embed.bias.zero_()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    model.config.exit_threshold = exit_thresholds(model, pixel_values)  # the saved model prunes
    with torch.no_grad():
        outputs = model(pixel_values)
    assert (outputs.exit_stage < 2).any()
    exit_map = processor.post_process_exit_map(outputs, target_sizes=[(45, 70)])[0]  # patch grid only, to pixels
    assert exit_map.shape == (45, 70) and set(exit_map.unique().tolist()) <= {0, 1, 2} and (exit_map < 2).any()
    saved, image_path = tmp_path / "dtop-dinov3", tmp_path / "image.png"
    reference_path, report_path = tmp_path / "reference.safetensors", tmp_path / "report.json"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    image.save(image_path)
    reference = {"pixel_values": pixel_values, "logits": outputs.logits, "exit_stage": outputs.exit_stage}
    save_file({name: value.contiguous() for name, value in reference.items()}, reference_path)
    assert "modeling_dtop.py" in os.listdir(saved) and "vit_weights.py" not in os.listdir(saved)
    run_without_dtop_hf(REMOTE_SCRIPT, [saved, reference_path, image_path, report_path], tmp_path)
    report = json.loads(report_path.read_text())
    assert report["module"].startswith("transformers_modules.")
    assert report["logits_difference"] < 1e-6 and report["exit_stage_equal"]
    expected_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(45, 70)])[0]
    present = sorted(expected_map.unique().tolist())
    assert len(present) >= 2 and report["labels"] == [f"class_{index}" for index in present]
    for mask, class_index in zip(report["masks"], present, strict=True):
        assert np.array_equal(np.array(mask) > 0, (expected_map == class_index).numpy())


# ----------------------------------------------------------------------------------------------------------------
# timm weights through the converter


def pack_timm_qkv(tensors: dict[str, torch.Tensor], block: str, attention: str) -> dict[str, torch.Tensor]:
    """`{attention}.{q,k,v}_proj.*` -> timm's packed `{block}.attn.qkv.*` (rows q, k, v)."""
    return {
        f"{block}.attn.qkv.{suffix}": torch.cat([tensors[f"{attention}.{name}_proj.{suffix}"] for name in "qkv"])
        for suffix in ("weight", "bias")
    }


def to_timm_state_dict(source: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ViT / DeiT / DINOv2 (with registers) state dict in timm's exact naming and shapes (the test's
    own inverse of the converter's table): packed qkv, `ls1.gamma`, `dist_token`, `reg_token` (timm folds the class
    token's position into it and stores the grid positions only), packed SwiGLU `fc1`, final `norm`, `head`."""
    tensors = source.state_dict()
    dim = tensors["embeddings.cls_token"].shape[-1]
    timm = {"cls_token": tensors["embeddings.cls_token"], "pos_embed": tensors["embeddings.position_embeddings"]}
    timm["patch_embed.proj.weight"] = tensors["embeddings.patch_embeddings.projection.weight"]
    timm["patch_embed.proj.bias"] = tensors["embeddings.patch_embeddings.projection.bias"]
    if "embeddings.distillation_token" in tensors:
        timm["dist_token"] = tensors["embeddings.distillation_token"]
        timm["head_dist.weight"], timm["head_dist.bias"] = torch.randn(10, dim), torch.zeros(10)
    if "embeddings.register_tokens" in tensors:
        timm["reg_token"] = tensors["embeddings.register_tokens"]
        timm["cls_token"] = tensors["embeddings.cls_token"] + tensors["embeddings.position_embeddings"][:, :1]
        timm["pos_embed"] = tensors["embeddings.position_embeddings"][:, 1:]
    is_vit = isinstance(source, (ViTModel, DeiTModel))
    layer_prefix = "layers" if is_vit else "encoder.layer"
    for index in range(source.config.num_hidden_layers):
        layer, block = f"{layer_prefix}.{index}", f"blocks.{index}"
        timm.update(pack_timm_qkv(tensors, block, f"{layer}.attention"))
        for suffix in ("weight", "bias"):
            timm[f"{block}.attn.proj.{suffix}"] = tensors[f"{layer}.attention.o_proj.{suffix}"]
            timm[f"{block}.norm1.{suffix}"] = tensors[f"{layer}.{'layernorm_before' if is_vit else 'norm1'}.{suffix}"]
            timm[f"{block}.norm2.{suffix}"] = tensors[f"{layer}.{'layernorm_after' if is_vit else 'norm2'}.{suffix}"]
            if f"{layer}.mlp.gate_proj.{suffix}" in tensors:  # timm's SwiGLUPacked: gate rows, then up rows
                gate_up = (tensors[f"{layer}.mlp.gate_proj.{suffix}"], tensors[f"{layer}.mlp.up_proj.{suffix}"])
                timm[f"{block}.mlp.fc1.{suffix}"] = torch.cat(gate_up)
                timm[f"{block}.mlp.fc2.{suffix}"] = tensors[f"{layer}.mlp.down_proj.{suffix}"]
            else:
                timm[f"{block}.mlp.fc1.{suffix}"] = tensors[f"{layer}.mlp.fc1.{suffix}"]
                timm[f"{block}.mlp.fc2.{suffix}"] = tensors[f"{layer}.mlp.fc2.{suffix}"]
        if not is_vit:
            timm[f"{block}.ls1.gamma"] = tensors[f"{layer}.layer_scale1.lambda1"]
            timm[f"{block}.ls2.gamma"] = tensors[f"{layer}.layer_scale2.lambda1"]
    timm["norm.weight"], timm["norm.bias"] = tensors["layernorm.weight"], tensors["layernorm.bias"]
    timm["head.weight"], timm["head.bias"] = torch.randn(10, dim), torch.zeros(10)
    return timm


def convert_with_cli(checkpoint: dict[str, torch.Tensor], folder) -> DToPForSemanticSegmentation:
    """Write the weights as a timm `.pth`, convert with the CLI (heads for 3 classes, extra tokens kept)."""
    folder.mkdir(exist_ok=True)
    torch.save(checkpoint, folder / "timm.pth")
    DToPConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8, out_indices=(1, 2, 3),
        head_hidden_size=16, head_num_attention_heads=2, num_labels=3, use_cls_token=True,
    ).save_pretrained(folder)  # fmt: skip
    main(["--checkpoint", str(folder / "timm.pth"), "--config", str(folder / "config.json"),
          "--output_dir", str(folder / "out")])  # fmt: skip
    return DToPForSemanticSegmentation.from_pretrained(folder / "out").eval()


TIMM_FAMILIES = ["vit", "deit", "dinov2", "dinov2_swiglu", "dinov2_with_registers"]


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_weights_convert_and_reproduce_the_model(saved_sources, family, tmp_path, recorded_logs, capfd):
    """timm names (`vit_*`, `deit_*_distilled`, `vit_*_dinov2`, `vit_*_reg4_dinov2`) -> the same backbone as the
    transformers model the weights came from, at the stored and at a larger size; no LOAD REPORT."""
    _, source = saved_sources[family]
    checkpoint = to_timm_state_dict(source)
    assert detect_checkpoint_layout(checkpoint) == "timm"
    model = convert_with_cli(checkpoint, tmp_path)
    config = model.config
    assert (
        config.intermediate_size
        == source.state_dict()[
            next(key for key in source.state_dict() if key.endswith(("0.mlp.fc1.weight", "0.mlp.gate_proj.weight")))
        ].shape[0]
    )
    assert config.num_prefix_tokens == NUM_PREFIX_TOKENS[family]
    for size in (NATIVE_SIZE, LARGER_SIZE):
        pixel_values = images(size)
        with torch.no_grad():
            ours = model(pixel_values, exit_threshold=1.0, output_hidden_states=True).hidden_states
        for layer, (our_state, source_state) in enumerate(zip(ours, source_hidden_states(source, pixel_values))):
            difference = float((our_state - source_state).abs().max())
            assert difference < MAX_DIFFERENCE, f"{family} at {size}, hidden state {layer}: {difference:.2e}"
    preprocessor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {"height": 32, "width": 32}  # the model's own size
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err
    assert not any("LOAD REPORT" in message for message in recorded_logs)


def test_timm_backbone_structure_replaces_the_preset_one(saved_sources, tmp_path):
    """A DINOv2 (with registers) timm checkpoint converted with the ViT-B preset: the backbone's structure comes from
    the weights (width, depth, patch, layer scale, registers dropped as the preset drops the class token), the stage
    layout is the default for that depth and width, the rest (labels, input size, threshold) stays the preset's."""
    _, source = saved_sources["dinov2_with_registers"]
    torch.save(to_timm_state_dict(source), tmp_path / "timm.pth")
    main(["--checkpoint", str(tmp_path / "timm.pth"), "--config", "dtop-vit-base-ade20k",
          "--output_dir", str(tmp_path / "out")])  # fmt: skip
    model = DToPForSemanticSegmentation.from_pretrained(tmp_path / "out")
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (32, 4, 8)
    assert config.intermediate_size == 64
    assert config.num_attention_heads == 1  # 64-dimensional heads, the timm / DINOv2 convention
    assert config.layerscale_value is not None and config.num_prefix_tokens == 0
    assert config.position_embedding_antialias
    assert config.out_indices == (1, 2, 3) and config.head_hidden_size == 16
    assert (config.num_labels, config.image_size, config.exit_threshold) == (150, 512, 0.9)
    assert model.dtop.embeddings.position_embeddings.shape == (1, 1 + 64 * 64, 32)
    assert torch.equal(model.dtop.layers[3].layer_scale1.lambda1, source.encoder.layer[3].layer_scale1.lambda1)


TIMM_VARIANTS = ["vit", "deit_distilled", "dinov2", "dinov2_swiglu", "reg4_dinov2"]


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_parity_with_timm_forward(variant, tmp_path):
    """Against timm's own blocks (runs only where timm is installed; it needs torchvision)."""
    timm = pytest.importorskip("timm")
    from timm.layers import SwiGLUPacked
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    common = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 4, "num_classes": 10}
    kwargs = {
        "vit": {},
        "deit_distilled": {},
        "dinov2": {"init_values": 1e-5},
        "dinov2_swiglu": {
            "init_values": 1e-5,
            "mlp_layer": SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
            "mlp_ratio": 5.5,
        },
        "reg4_dinov2": {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True},
    }[variant]
    model_class = VisionTransformerDistilled if variant == "deit_distilled" else VisionTransformer
    timm_model = non_trivial_(model_class(**common, **kwargs))
    model = convert_with_cli(dict(timm_model.state_dict()), tmp_path)
    pixel_values = images(NATIVE_SIZE)
    with torch.no_grad():
        hidden = timm_model._pos_embed(timm_model.patch_embed(pixel_values))
        reference = [timm_model.norm_pre(timm_model.patch_drop(hidden))]
        for block in timm_model.blocks:
            reference.append(block(reference[-1]))
        ours = model(pixel_values, exit_threshold=1.0, output_hidden_states=True).hidden_states
    assert len(ours) == len(reference) == 5, timm.__version__
    for our_state, timm_state in zip(ours, reference):
        torch.testing.assert_close(our_state, timm_state, atol=MAX_DIFFERENCE, rtol=0)
