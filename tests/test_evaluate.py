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
"""Tests for examples/evaluate.py: the sweep as a subprocess (table, JSON, plot, pictures), one process against two,
calibration through the script, and clear errors on bad input."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dtop_hf import DToPConfig, DToPImageProcessor
from dtop_hf.toolkit.data.synthetic_scenes import SYNTHETIC_ID2LABEL, make_synthetic_scenes


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "evaluate.py"
# 5 images (odd: two processes get uneven shards) of 48 px, 3 thresholds; pictures of 2 images.
SWEEP_ARGS = [
    "--dataset_name",
    "builtin",
    "--synthetic_image_size",
    "48",
    "--max_eval_samples",
    "5",
    "--per_device_eval_batch_size",
    "2",
    "--thresholds",
    "1.0",
    "0.7",
    "0.5",
    "--num_pictures",
    "2",
]
# Fields that must not depend on the number of processes (the model time per image does).
DETERMINISTIC_FIELDS = (
    "mean_iou",
    "mean_accuracy",
    "overall_accuracy",
    "per_category_iou",
    "exit_share",
    "num_images",
    "exit_threshold",
)


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(model_tester, folder: Path, id2label: dict[int, str]) -> Path:
    # initializer_range 0.5: random heads with confident, varied predictions, so that thresholds prune.
    model = model_tester(num_labels=len(id2label), id2label=id2label, initializer_range=0.5).create_model()
    model.save_pretrained(folder)
    DToPImageProcessor(size={"height": 32, "width": 32}, do_reduce_labels=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from conftest import DToPModelTester

    return save_tiny_model(DToPModelTester, tmp_path_factory.mktemp("model"), dict(SYNTHETIC_ID2LABEL))


def run_script(arguments: list[str], num_processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if num_processes == 1:
        command = [sys.executable, str(SCRIPT)]
    else:
        # hf-notes §7.3: on CPU, only --multi_gpu with ACCELERATE_USE_CPU (or cpu=True) gives real ranks over gloo.
        env["ACCELERATE_USE_CPU"] = "true"
        with socket.socket() as probe:  # a free port: other test runs may hold accelerate's default 29500
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(SCRIPT),
            "--cpu",
        ]
    completed = subprocess.run(
        command + arguments, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_process")
    completed = run_script(["--model", str(tiny_model_dir), "--output_dir", str(output_dir)] + SWEEP_ARGS)
    return completed, output_dir


def test_sweep_writes_table_json_plot_and_pictures(one_process_run):
    completed, output_dir = one_process_run
    assert "| threshold | mIoU (%) |" in completed.stdout
    summary = json.loads((output_dir / "results.json").read_text())
    results = summary["results"]
    assert [result["exit_threshold"] for result in results] == [1.0, 0.7, 0.5]
    assert summary["num_images"] == 5 and summary["mode"] == "whole_image"
    baseline = results[0]
    assert baseline["exit_share"] == [0.0, 0.0, 1.0]  # threshold 1.0: every token goes to the decode head
    for result in results:
        assert set(result["per_category_iou"]) == set(SYNTHETIC_ID2LABEL.values())
        assert sum(result["exit_share"]) == pytest.approx(1.0)
        assert result["gflops"] > result["gflops_backbone_and_final_head"] > 0
        assert result["seconds_per_image"] > 0
        assert 0.0 <= result["mean_iou"] <= 1.0
    # Lower thresholds let tokens exit, and exited tokens cost nothing more.
    assert results[2]["exit_share"][0] > 0
    assert (
        results[2]["gflops_backbone_and_final_head"]
        < results[1]["gflops_backbone_and_final_head"]
        <= baseline["gflops_backbone_and_final_head"]
    )
    assert (output_dir / "table.md").read_text().startswith("| threshold |")
    with Image.open(output_dir / "gflops_vs_miou.png") as plot:
        assert plot.width > 300 and plot.height > 200
    pictures = sorted((output_dir / "pictures").glob("*.png"))
    assert [path.name for path in pictures] == ["image_0.png", "image_1.png"]
    with Image.open(pictures[0]) as picture:
        assert picture.width > 4 * 256 > picture.height / 3  # 4 panels side by side, 3 threshold rows


def test_two_processes_give_the_same_results(one_process_run, tiny_model_dir, tmp_path):
    _, one_process_dir = one_process_run
    run_script(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path)] + SWEEP_ARGS, num_processes=2)
    one = json.loads((one_process_dir / "results.json").read_text())
    two = json.loads((tmp_path / "results.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for one_result, two_result in zip(one["results"], two["results"], strict=True):
        for field in DETERMINISTIC_FIELDS:
            assert one_result[field] == two_result[field], (field, one, two)
        for field in ("gflops", "gflops_backbone_and_final_head"):  # float sums in another order
            assert one_result[field] == pytest.approx(two_result[field], rel=1e-12)


def test_calibration_writes_a_model_tuned_to_the_budget(tiny_model_dir, tmp_path):
    module = load_script()
    common = ["--model", str(tiny_model_dir), "--num_pictures", "1"] + SWEEP_ARGS[:-2]
    sweep = module.main(common + ["--output_dir", str(tmp_path / "sweep")])["results"]
    target = (sweep[0]["gflops"] + sweep[-1]["gflops"]) / 2
    summary = module.main(
        common + ["--output_dir", str(tmp_path), "--target_gflops", str(target), "--num_refinements", "2"]
    )
    chosen = summary["calibration"]["chosen"]
    assert chosen["gflops"] <= target
    assert len(summary["results"]) > 3  # the sweep plus bisection points
    config = DToPConfig.from_pretrained(tmp_path / "calibrated")
    assert config.exit_threshold == chosen["exit_threshold"] < 1.0
    assert (
        json.loads((tmp_path / "results.json").read_text())["calibration"]["chosen"]["exit_threshold"]
        == chosen["exit_threshold"]
    )


def test_thresholds_outside_the_unit_interval_are_rejected(capsys):
    module = load_script()
    for bad in ("1.5", "0", "-0.2"):
        with pytest.raises(SystemExit):
            module.parse_args(["--model", "unused", "--thresholds", "1.0", bad])
        assert "(0, 1]" in capsys.readouterr().err


def test_model_and_data_with_different_classes_are_rejected(model_tester, tmp_path):
    module = load_script()
    five_classes = save_tiny_model(model_tester, tmp_path / "model", {index: f"class {index}" for index in range(5)})
    with pytest.raises(ValueError, match="predicts 5 classes but the data set 'builtin' has 15"):
        module.main(["--model", str(five_classes), "--output_dir", str(tmp_path / "out")] + SWEEP_ARGS)


def test_data_set_without_usable_samples_is_rejected(tiny_model_dir, tmp_path):
    module = load_script()
    folder = tmp_path / "data"
    scene = make_synthetic_scenes(1, image_size=32, seed=0, split="train")[0]
    for split, image_bytes in (("train", None), ("validation", b"not a png")):
        (folder / split / "images").mkdir(parents=True)
        (folder / split / "annotations").mkdir()
        if image_bytes is None:
            scene["image"].save(folder / split / "images" / "scene.png")
        else:
            (folder / split / "images" / "scene.png").write_bytes(image_bytes)  # unreadable: skipped by the check
        scene["annotation"].save(folder / split / "annotations" / "scene.png")
    (folder / "id2label.json").write_text(json.dumps(list(SYNTHETIC_ID2LABEL.values())))
    with pytest.raises(ValueError, match="no usable sample"):
        module.main(
            ["--model", str(tiny_model_dir), "--dataset_name", str(folder), "--output_dir", str(tmp_path / "out")]
        )
