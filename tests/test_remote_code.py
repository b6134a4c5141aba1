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
"""The two ways a saved folder runs: with dtop_hf imported, through the installed classes and pipeline without
`trust_remote_code`; where dtop_hf is not installed, with `trust_remote_code=True` from the folder's own code. Both
give the same results, and other models' image-segmentation pipelines are unchanged by the import."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_without_dtop_hf
from PIL import Image
from safetensors.torch import save_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil, pipeline
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

from dtop_hf import DToPImageProcessor, DToPImageSegmentationPipeline
from dtop_hf.pipeline_dtop import DTOP_CUSTOM_PIPELINES


# Runs in a fresh interpreter, outside the repository, with dtop_hf made unimportable; writes a JSON report.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys

    # An editable install stays importable even under `python -I`: block the package explicitly.
    sys.modules["dtop_hf"] = None
    try:
        import dtop_hf  # noqa: F401
        hidden = False
    except ImportError:
        hidden = True

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

    torch.set_num_threads(1)
    folder, reference_path, image_path, report_path = sys.argv[1:5]
    reference = load_file(reference_path)
    report = {"dtop_hf_hidden": hidden}

    try:
        AutoModelForSemanticSegmentation.from_pretrained(folder)
        report["refused_without_trust"] = False
    except ValueError as error:
        report["refused_without_trust"] = "trust_remote_code" in str(error)

    segmenter = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    report["classes"] = [type(item).__name__ for item in (segmenter, base, processor)]
    report["modules"] = [type(item).__module__ for item in (segmenter, base, processor)]

    pixel_values = processor(images=Image.open(image_path), return_tensors="pt")["pixel_values"]
    report["pixel_values_equal"] = torch.equal(pixel_values, reference["pixel_values"][:1])
    with torch.no_grad():
        outputs = segmenter(reference["pixel_values"])
        base_outputs = base(reference["pixel_values"])
        loss = segmenter(reference["pixel_values"], labels=reference["labels"]).loss
        segmenter.set_attn_implementation("eager")
        eager_logits = segmenter(reference["pixel_values"]).logits
    report["logits_equal"] = torch.equal(outputs.logits, reference["logits"])
    report["exit_stage_equal"] = torch.equal(outputs.exit_stage, reference["exit_stage"])
    report["tokens_per_layer_equal"] = torch.equal(outputs.tokens_per_layer, reference["tokens_per_layer"])
    report["base_logits_equal"] = torch.equal(base_outputs.logits, reference["logits"])
    report["loss_difference"] = float((loss - reference["loss"]).abs())
    report["eager_difference"] = float((eager_logits - reference["logits"]).abs().max())

    try:
        pipeline("image-segmentation", model=folder)
        report["pipeline_refused_without_trust"] = False
    except ValueError as error:
        report["pipeline_refused_without_trust"] = "trust_remote_code" in str(error)
    segmentation = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    results = segmentation(Image.open(image_path))
    report["pipeline_labels"] = [result["label"] for result in results]
    report["pipeline_masks"] = [np.array(result["mask"]).tolist() for result in results]
    # The pipeline's knob: `exit_threshold` reaches the model (the saved config's threshold prunes, 1.0 does not).
    report["pipeline_class"] = type(segmentation).__name__
    exit_stages = []
    record = lambda module, inputs, outputs: exit_stages.append(outputs.exit_stage.tolist())
    segmentation.model.register_forward_hook(record)
    segmentation(Image.open(image_path))
    segmentation(Image.open(image_path), exit_threshold=1.0)
    report["pipeline_exit_stages"] = exit_stages
    with open(report_path, "w") as report_file:
        json.dump(report, report_file)
    """
)


def tiny_model_and_processor(model_tester) -> tuple:
    """A tiny DToP model whose map holds several classes, and its processor."""
    model = model_tester(id2label={index: f"class_{index}" for index in range(5)}).create_model()
    with torch.no_grad():  # equal presence for all classes, so that the mask logits decide
        model.dtop.heads[-1].class_embed.weight.zero_()
        model.dtop.heads[-1].class_embed.bias.zero_()
    return model, DToPImageProcessor(size={"height": 32, "width": 32})


def save_tiny_folder(model_tester, folder) -> tuple:
    """`tiny_model_and_processor`, saved in `folder`."""
    model, processor = tiny_model_and_processor(model_tester)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_saved_folder_runs_as_remote_code_without_the_package(model_tester, exit_thresholds, varied_images, tmp_path):
    model, processor = tiny_model_and_processor(model_tester)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    pixel_values = torch.cat([processor(images=image, return_tensors="pt")["pixel_values"], varied_images(2)])
    model.config.exit_threshold = exit_thresholds(model, pixel_values)  # the saved model prunes
    labels = torch.randint(0, 5, (3, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(pixel_values)
        loss = model(pixel_values, labels=labels).loss
    assert (outputs.exit_stage < 2).any()

    folder, image_path = tmp_path / "dtop-tiny", tmp_path / "image.png"
    reference_path, report_path = tmp_path / "reference.safetensors", tmp_path / "report.json"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image.save(image_path)
    reference = {
        "pixel_values": pixel_values,
        "labels": labels,
        "logits": outputs.logits,
        "exit_stage": outputs.exit_stage,
        "tokens_per_layer": outputs.tokens_per_layer,
        "loss": loss,
    }
    save_file({name: value.contiguous() for name, value in reference.items()}, reference_path)
    saved_files = set(os.listdir(folder))
    assert {"configuration_dtop.py", "modeling_dtop.py", "pruning.py", "image_processing_dtop.py"} <= saved_files
    assert "pipeline_dtop.py" in saved_files
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == DTOP_CUSTOM_PIPELINES
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_dtop.DToPConfig",
        "AutoModel": "modeling_dtop.DToPModel",
        "AutoModelForSemanticSegmentation": "modeling_dtop.DToPForSemanticSegmentation",
    }

    run_without_dtop_hf(REMOTE_SCRIPT, [folder, reference_path, image_path, report_path], tmp_path)
    report = json.loads(report_path.read_text())

    assert report["dtop_hf_hidden"], "the subprocess could import dtop_hf: the test would prove nothing"
    assert report["refused_without_trust"] and report["pipeline_refused_without_trust"]
    assert report["classes"] == ["DToPForSemanticSegmentation", "DToPModel", "DToPImageProcessor"]
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    assert report["pixel_values_equal"]
    assert report["logits_equal"] and report["exit_stage_equal"] and report["tokens_per_layer_equal"]
    assert report["base_logits_equal"]
    assert report["loss_difference"] < 1e-6
    assert report["eager_difference"] < 1e-5

    expected_map = processor.post_process_semantic_segmentation(
        type(outputs)(logits=outputs.logits[:1]), target_sizes=[(45, 70)]
    )[0]
    present = sorted(expected_map.unique().tolist())
    assert len(present) >= 2
    assert report["pipeline_labels"] == [f"class_{index}" for index in present]
    assert report["pipeline_class"] == "DToPImageSegmentationPipeline"
    unpruned = torch.full_like(outputs.exit_stage[:1], 2)
    assert report["pipeline_exit_stages"] == [outputs.exit_stage[:1].tolist(), unpruned.tolist()]
    for mask, class_index in zip(report["pipeline_masks"], present, strict=True):
        assert np.array_equal(np.array(mask) > 0, (expected_map == class_index).numpy())


def test_pipeline_exit_threshold_reaches_the_model(model_tester, exit_thresholds, tmp_path):
    model, processor = save_tiny_folder(model_tester, tmp_path)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    thresholds = exit_thresholds(model, pixel_values)

    # With the package imported, transformers takes the installed classes even when remote code is allowed.
    installed = pipeline("image-segmentation", model=str(tmp_path))
    trusted = pipeline("image-segmentation", model=str(tmp_path), trust_remote_code=True)
    in_memory = pipeline("image-segmentation", model=model, image_processor=processor)
    for candidate in (installed, trusted, in_memory):
        assert type(candidate) is DToPImageSegmentationPipeline
        exit_stages = []
        handle = candidate.model.register_forward_hook(
            lambda module, inputs, outputs: exit_stages.append(outputs.exit_stage)
        )
        candidate(image)  # the config's 0.9: nothing this random model predicts is that sure
        candidate(image, exit_threshold=thresholds)
        candidate(image, exit_threshold=thresholds[0])
        handle.remove()
        with torch.no_grad():
            expected = [
                model(pixel_values, exit_threshold=value).exit_stage for value in (None, thresholds, thresholds[0])
            ]
        assert (expected[0] == 2).all() and (expected[1] < 2).any()
        assert all(torch.equal(got, want) for got, want in zip(exit_stages, expected, strict=True))


def test_pipeline_needs_no_remote_code_with_the_package_imported(model_tester, tmp_path):
    model, processor = save_tiny_folder(model_tester, tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))

    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    # The installed classes, not the folder's copies; the folder keeps declaring its pipeline for remote loading.
    assert type(segmenter) is DToPImageSegmentationPipeline
    assert type(segmenter.model).__module__ == "dtop_hf.modeling_dtop"
    assert type(segmenter.image_processor).__module__ == "dtop_hf.image_processing_dtop"
    assert getattr(segmenter.model.config, "custom_pipelines", None) is None
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"] == DTOP_CUSTOM_PIPELINES

    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    expected_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(45, 70)])[0]
    present = sorted(expected_map.unique().tolist())
    results = segmenter(image)
    assert len(present) >= 2
    assert [result["label"] for result in results] == [f"class_{index}" for index in present]
    for result, class_index in zip(results, present, strict=True):
        assert np.array_equal(np.array(result["mask"]) > 0, (expected_map == class_index).numpy())

    # Saved again, the folder declares its pipeline again and loads the same way.
    segmenter.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["custom_pipelines"] == DTOP_CUSTOM_PIPELINES
    assert type(pipeline("image-segmentation", model=str(tmp_path / "again"))) is DToPImageSegmentationPipeline


def test_pipeline_passes_only_the_call_arguments_given(model_tester, tmp_path):
    save_tiny_folder(model_tester, tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    forward, calls = segmenter.model.forward, []

    def recording_forward(pixel_values, exit_threshold=None, exit_mode=None, exit_capacity=None, **kwargs):
        given = {"exit_threshold": exit_threshold, "exit_mode": exit_mode, "exit_capacity": exit_capacity}
        calls.append({name: value for name, value in given.items() if value is not None})
        return forward(pixel_values, exit_threshold=exit_threshold, **kwargs)

    # A forward that takes the capacity arguments and records what it receives, whether or not the model's own
    # forward takes them yet: the pipeline's part is to pass exactly what the caller gave.
    segmenter.model.forward = recording_forward
    segmenter(image)
    segmenter(image, exit_threshold=0.5)
    segmenter(image, exit_mode="capacity", exit_capacity=0.25)
    segmenter(image, exit_threshold=(0.5, 0.6), exit_mode="capacity", exit_capacity=(0.1, 0.2))
    assert calls == [
        {},
        {"exit_threshold": 0.5},
        {"exit_mode": "capacity", "exit_capacity": 0.25},
        {"exit_threshold": (0.5, 0.6), "exit_mode": "capacity", "exit_capacity": (0.1, 0.2)},
    ]
    # Given when the pipeline is built, an argument applies to every call.
    calls.clear()
    pipeline(
        "image-segmentation", model=segmenter.model, image_processor=segmenter.image_processor, exit_threshold=0.7
    )(image)
    assert calls == [{"exit_threshold": 0.7}]


def test_other_models_segmentation_pipeline_is_unchanged(tmp_path):
    """With dtop_hf imported, a Segformer folder's pipeline gives what the stock pipeline gives, refuses DToP's
    arguments by name, and saves without any trace of this package."""
    torch.manual_seed(0)
    id2label = {0: "sky", 1: "tree", 2: "road"}
    config = SegformerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
        id2label=id2label, label2id={name: index for index, name in id2label.items()},
    )  # fmt: skip
    folder = tmp_path / "segformer"
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8))

    segmenter = pipeline("image-segmentation", model=str(folder))
    stock = pipeline("image-segmentation", model=str(folder), pipeline_class=ImageSegmentationPipeline)
    results, expected = segmenter(image), stock(image)
    assert [result["label"] for result in results] == [result["label"] for result in expected]
    assert len(expected) >= 2
    for result, reference in zip(results, expected, strict=True):
        assert result["score"] == reference["score"]
        assert np.array_equal(np.array(result["mask"]), np.array(reference["mask"]))

    with pytest.raises(ValueError, match="takes no `exit_threshold`"):
        segmenter(image, exit_threshold=0.5)

    segmenter.save_pretrained(tmp_path / "saved")
    assert "custom_pipelines" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "saved"))
