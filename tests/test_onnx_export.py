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
"""Tests of the ONNX export: one capacity-mode file runs at every batch size in ONNX Runtime and equals PyTorch (ATM
and FCN heads); the settings recorded in the file; segmentation with the recorded processor; timing; threshold mode
(each batch padded to its image with the most tokens); `examples/export_onnx.py`."""

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image


pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")
pytest.importorskip("onnxscript", reason="the `onnx` extra is not installed")

from conftest import run_example  # noqa: E402

from dtop_hf import DToPImageProcessor  # noqa: E402
from dtop_hf.toolkit.deploy.onnx_export import (  # noqa: E402
    export_onnx,
    read_onnx_metadata,
)
from dtop_hf.toolkit.deploy.onnx_runtime import (  # noqa: E402
    compare_with_pytorch,
    create_session,
    run_session,
    segment_with_onnx,
    time_onnx_models,
)


CAPACITIES = (0.55, 0.3)
IMAGE_SIZE = (32, 24)  # non-square: an 8 x 6 token grid


def assert_matches_pytorch(session, model, pixel_values, **exit_rule):
    exported = run_session(session, pixel_values)
    with torch.no_grad():
        expected = model(pixel_values, **exit_rule)
    assert exported.logits.shape == expected.logits.shape
    assert (exported.logits - expected.logits).abs().max().item() <= 1e-4
    assert torch.equal(exported.exit_stage, expected.exit_stage)
    return exported


@pytest.fixture(scope="module")
def atm_export(tmp_path_factory):
    """An ATM model folder with its processor, exported by the script in capacity mode."""
    from conftest import DToPModelTester

    folder = tmp_path_factory.mktemp("atm")
    model = DToPModelTester(head_num_layers=1).create_model()
    processor = DToPImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    model_file = run_example("export_onnx",
        [
            "--model_name_or_path", str(folder / "model"), "--output", str(folder / "model.onnx"),
            "--image_size", *map(str, IMAGE_SIZE), "--exit_mode", "capacity",
            "--exit_capacity", ",".join(map(str, CAPACITIES)), "--check_batch_sizes", "0",
        ]
    )  # fmt: skip
    return model, model_file


def test_script_export_runs_at_every_batch_size_and_equals_pytorch(atm_export, varied_images):
    model, model_file = atm_export
    session = create_session(model_file, intra_op_num_threads=1)
    assert [item.name for item in session.get_inputs()] == ["pixel_values"]
    assert [item.name for item in session.get_outputs()] == ["logits", "exit_stage"]
    for batch_size in (1, 4):
        pixel_values = varied_images(batch_size)[..., : IMAGE_SIZE[1]]  # mixed images, 32 x 24
        exported = assert_matches_pytorch(session, model, pixel_values, exit_capacity=CAPACITIES)
        # Capacity mode really pruned: 27 of 48 tokens after head 0, 15 after head 1.
        assert (exported.exit_stage == 2).flatten(1).sum(1).tolist() == [15] * batch_size


def test_the_file_records_its_rule_size_and_processor(atm_export):
    model, model_file = atm_export
    metadata = read_onnx_metadata(model_file)
    assert metadata["exit_mode"] == "capacity" and metadata["exit_capacity"] == list(CAPACITIES)
    assert metadata["image_size"] == list(IMAGE_SIZE) and metadata["keep_top_k"] == model.config.keep_top_k
    assert metadata["id2label"] == {str(key): value for key, value in model.config.id2label.items()}
    # The folder's processor, resizing to the exported size.
    assert metadata["image_processor"]["size"] == {"height": 32, "width": 24}
    assert metadata["image_processor"]["image_mean"] == [0.485, 0.456, 0.406]
    assert read_onnx_metadata(create_session(model_file)) == metadata


def test_the_exit_rule_exports_without_scatter_reductions(atm_export):
    """Every scatter of the graph writes each place once: no `reduction` attribute, which TensorRT's ONNX parser only
    serves through a plugin (and not at all with more indices than outputs)."""
    import onnx

    model, model_file = atm_export
    assert model.config.keep_top_k > 0  # the context tokens are part of the exported rule
    graph = onnx.load(model_file, load_external_data=False).graph
    scatters = [node for node in graph.node if node.op_type.startswith("Scatter")]
    assert any(node.op_type == "ScatterElements" for node in scatters)
    reductions = {
        attribute.s.decode() for node in scatters for attribute in node.attribute if attribute.name == "reduction"
    }
    assert reductions <= {"none"}
    assert any(node.op_type == "CumSum" for node in graph.node)  # the rank of a token in its class


def test_segment_with_onnx_uses_the_recorded_processor(atm_export):
    model, model_file = atm_export
    session = create_session(model_file)
    generator = np.random.default_rng(0)
    images = [
        Image.fromarray(generator.integers(0, 255, (40 + 9 * index, 50, 3), dtype=np.uint8)) for index in range(3)
    ]
    result = segment_with_onnx(session, images)
    # The same pipeline in PyTorch: the processor resizing to the exported size, the model, the post-processing.
    processor = DToPImageProcessor(size={"height": 32, "width": 24})
    with torch.no_grad():
        outputs = model(processor(images, return_tensors="pt")["pixel_values"], exit_capacity=CAPACITIES)
    sizes = [(image.height, image.width) for image in images]
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    expected_exits = processor.post_process_exit_map(outputs, target_sizes=sizes)
    for segmentation, exit_map, reference, reference_exits, size in zip(
        result.segmentation, result.exit_maps, expected, expected_exits, sizes
    ):
        assert segmentation.shape == size and torch.equal(segmentation, reference)
        assert torch.equal(exit_map, reference_exits)


def test_fcn_export_runs_at_every_batch_size_and_equals_pytorch(model_tester, varied_images, tmp_path):
    model = model_tester(head_type="fcn").create_model()
    model_file = export_onnx(model, tmp_path / "fcn.onnx", IMAGE_SIZE, exit_capacity=CAPACITIES)
    assert read_onnx_metadata(model_file)["image_processor"] is None  # none given
    session = create_session(model_file, intra_op_num_threads=1)
    for batch_size in (1, 3):
        assert_matches_pytorch(session, model, varied_images(batch_size)[..., :24], exit_capacity=CAPACITIES)
    assert compare_with_pytorch(session, model, batch_sizes=(2,)) <= 1e-4


def test_unpruned_export_and_timing(atm_export, model_tester, tmp_path):
    model = model_tester(head_type="fcn").create_model()
    unpruned_file = export_onnx(model, tmp_path / "unpruned.onnx", IMAGE_SIZE, exit_threshold=1.0)
    assert read_onnx_metadata(unpruned_file)["exit_threshold"] == [1.0, 1.0]
    assert compare_with_pytorch(create_session(unpruned_file), model, batch_sizes=(1, 2)) <= 1e-4
    medians = time_onnx_models(
        {"capacity": atm_export[1], "unpruned": unpruned_file}, batch_size=2, repeats=2, warmup=1
    )
    assert set(medians) == {"capacity", "unpruned"} and all(seconds > 0 for seconds in medians.values())


def test_export_prints_none_of_the_exporters_messages_about_other_libraries(model_tester, tmp_path, capfd):
    """torch's exporter warns on every export that torchvision's detection operators cannot be registered and that a
    pytree class of its own is deprecated; neither concerns a DToP model, so an export shows neither (each export:
    the exporter builds its registry again every time)."""
    model = model_tester(head_type="fcn").create_model()
    for index in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(model, tmp_path / f"model{index}.onnx", IMAGE_SIZE, exit_capacity=CAPACITIES)
        printed = capfd.readouterr()
        assert "torchvision" not in printed.err + printed.out
        assert not [warning for warning in caught if "LeafSpec" in str(warning.message)]
    # The filters live only as long as the export: the exporter's logger drops nothing afterwards.
    assert not logging.getLogger("torch.onnx._internal.exporter._registration").filters


def test_threshold_mode_exports_and_equals_pytorch_at_every_batch_size(
    model_tester, exit_thresholds, varied_images, head_type, tmp_path
):
    """Threshold mode exports too: the file pads every batch to the token count of its image with the most tokens
    left, and each image gets threshold mode's exits and logits, at batch sizes 1, 3 and 5 from one file (the FCN
    model is DINOv3-like: class and register tokens through the layers, rotary position embeddings)."""
    dinov3_like = {"use_cls_token": True, "num_register_tokens": 2, "position_embedding_type": "rope"}
    model = model_tester(head_type=head_type, **(dinov3_like if head_type == "fcn" else {})).create_model()
    images = varied_images(5)[..., : IMAGE_SIZE[1]]
    thresholds = exit_thresholds(model, images[:3])
    model_file = export_onnx(model, tmp_path / "threshold.onnx", IMAGE_SIZE, exit_threshold=thresholds)
    assert read_onnx_metadata(model_file)["exit_threshold"] == pytest.approx(thresholds)
    session = create_session(model_file, intra_op_num_threads=1)
    for batch_size in (1, 3, 5):
        exported = assert_matches_pytorch(session, model, images[:batch_size], exit_threshold=thresholds)
    # Control: tokens exited at both auxiliary heads, and the images kept different numbers of them.
    exit_stage = exported.exit_stage.flatten(1)
    assert ((exit_stage == 0).any(dim=1) & (exit_stage == 1).any(dim=1)).all()
    assert len(set((exit_stage == 2).sum(dim=1).tolist())) > 1


def test_script_exports_threshold_mode(atm_export, exit_thresholds, varied_images, tmp_path, capsys):
    model, model_file = atm_export
    thresholds = exit_thresholds(model, varied_images(3)[..., : IMAGE_SIZE[1]])
    output = tmp_path / "threshold.onnx"
    run_example("export_onnx",
        [
            "--model_name_or_path", str(model_file.parent / "model"), "--output", str(output),
            "--image_size", *map(str, IMAGE_SIZE), "--exit_threshold", ",".join(map(str, thresholds)),
            "--check_batch_sizes", "1", "3",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "threshold mode" in printed and "padded" in printed and "same exit_stage" in printed
    assert read_onnx_metadata(output)["exit_threshold"] == pytest.approx(thresholds)


def test_script_refuses_a_slide_mode_window_other_than_the_export_size_in_one_line(atm_export, tmp_path, capsys):
    model, _ = atm_export
    folder = tmp_path / "slide"
    model.save_pretrained(folder)
    DToPImageProcessor(do_split_image=True, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    arguments = ["--model_name_or_path", str(folder), "--output", str(tmp_path / "slide.onnx")]
    with pytest.raises(SystemExit) as exit_info:
        run_example("export_onnx", [*arguments, "--image_size", *map(str, IMAGE_SIZE), "--exit_capacity", "0.5"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()  # progress bars of the saving and loading, then the error
    last_line = stderr.splitlines()[-1]
    assert "Traceback" not in stderr and ": error: The image processor is in slide mode" in last_line
    assert "32x32 windows" in last_line and "32x24" in last_line
    assert not (tmp_path / "slide.onnx").exists()
