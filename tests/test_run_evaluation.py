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
"""Tests for examples/run_evaluation.py: the sweep as a subprocess (table, JSON, plot, pictures), one process against
two, calibration through the script (per-head thresholds, on calibration images only, a model that never exits),
capacity mode (capacity sweeps beside thresholds, `--calibrate capacity`), and clear errors on bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dtop_hf import DToPConfig, DToPImageProcessor
from dtop_hf.toolkit.arguments import ExitArguments
from dtop_hf.toolkit.data.synthetic_scenes import SYNTHETIC_ID2LABEL, make_synthetic_scenes
from dtop_hf.toolkit.evaluation import sweep as sweep_module
from dtop_hf.toolkit.evaluation.calibration import format_threshold, per_head, setting_of
from dtop_hf.toolkit.evaluation.flops import flops_from_capacities


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "run_evaluation.py"
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
    "--exit_threshold",
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


def evaluate(argv: list[str]) -> dict:
    """The script's `main(argv)`, in this process."""
    from conftest import run_example

    return run_example("run_evaluation", argv)


def save_tiny_model(model_tester, folder: Path, id2label: dict[int, str], **config) -> Path:
    # initializer_range 2.0: random heads with confident, varied predictions, so that thresholds prune at both
    # auxiliary heads (with the official initialisation of the class queries, 0.5 leaves the first head unsure).
    config = {"initializer_range": 2.0, **config}
    model = model_tester(num_labels=len(id2label), id2label=id2label, **config).create_model()
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
        # On CPU, only --multi_gpu with ACCELERATE_USE_CPU (or cpu=True) gives real ranks over gloo.
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
            "--device",
            "cpu",
        ]
    completed = subprocess.run(
        command + arguments, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("one_process")
    completed = run_script(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output_dir)] + SWEEP_ARGS)
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


def per_head_miou_at_threshold_one(model_dir: Path, **data_settings) -> list[float]:
    """Each head's own pixel mIoU over the evaluated images at threshold 1.0, computed here from the model's
    `stage_logits` with the processor's post-processing (what the depth profile must equal)."""
    from accelerate import Accelerator

    from dtop_hf.toolkit.arguments import DataArguments
    from dtop_hf.toolkit.evaluation.data import evaluation_dataloader, load_evaluation_split
    from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU
    from dtop_hf.toolkit.inference.loading import load_model_and_processor

    model, processor = load_model_and_processor(str(model_dir), "cpu")
    data_args = DataArguments(**data_settings)
    accelerator = Accelerator(cpu=True)
    split, _ = load_evaluation_split(data_args, "validation", model.config, processor.do_reduce_labels, accelerator)
    _, loader = evaluation_dataloader(split, processor, model.config, accelerator, batch_size=2)
    metrics = [StreamingMeanIoU(model.config.num_labels) for _ in model.config.out_indices]
    for batch in loader:
        sizes = [tuple(size) for size in batch["label_sizes"].tolist()]
        with torch.no_grad():
            outputs = model(batch["pixel_values"], exit_threshold=1.0)
        for metric, logits in zip(metrics, outputs.stage_logits, strict=True):
            maps = processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=sizes)
            for prediction, labels, (height, width) in zip(maps, batch["labels"], sizes, strict=True):
                metric.update(prediction, labels[:height, :width])
    return [metric.compute()["mean_iou"] for metric in metrics]


def test_diagnostics_in_the_json_the_report_and_a_plot(one_process_run, tiny_model_dir):
    completed, output_dir = one_process_run
    summary = json.loads((output_dir / "results.json").read_text())
    diagnostics = summary["diagnostics"]
    # The depth profile: each head's own mIoU at threshold 1.0, scored here on SWEEP_ARGS' images; the decode head's
    # is the unpruned row.
    expected = per_head_miou_at_threshold_one(
        tiny_model_dir, synthetic_image_size=48, max_eval_samples=5
    )  # SWEEP_ARGS
    assert diagnostics["depth_mean_iou"] == pytest.approx(expected)
    assert diagnostics["depth_mean_iou"][-1] == pytest.approx(summary["results"][0]["mean_iou"])
    assert len(diagnostics["depth_per_category_iou"]) == 3
    assert set(diagnostics["depth_per_category_iou"][0]) == set(SYNTHETIC_ID2LABEL.values())
    assert 0.0 < diagnostics["boundary_share"] < 1.0 and diagnostics["num_tokens"] == 5 * 8 * 8
    # Exit precision per setting and head: shares in [0, 1], null where nothing exited.
    for result in summary["results"]:
        exits = result["exit_diagnostics"]
        assert set(exits) == {"exit_agreement", "exit_accuracy", "reference_accuracy", "exit_boundary_share"}
        for key, values in exits.items():
            assert len(values) == 3
            for stage, value in enumerate(values):
                assert (value is None) == (result["exit_share"][stage] == 0.0), (key, result)
                assert value is None or 0.0 <= value <= 1.0
    # Threshold 1.0: every token stays to the decode head, whose label is the unpruned one by definition.
    unpruned = summary["results"][0]["exit_diagnostics"]
    assert unpruned["exit_agreement"] == [None, None, 1.0]
    assert unpruned["exit_accuracy"][-1] == unpruned["reference_accuracy"][-1]
    assert unpruned["exit_boundary_share"][-1] == pytest.approx(diagnostics["boundary_share"])
    # At 0.5 tokens exit at head 1; whether they agree is the model's business, but the decode head's keep theirs.
    assert summary["results"][2]["exit_diagnostics"]["exit_agreement"][0] is not None
    report = (output_dir / "table.md").read_text()
    assert "Depth profile: each head's own mIoU" in report and "| own mIoU (%) |" in report
    assert "Exit precision per head (evaluated split):" in report
    assert "| 0.5 | head 1 (layer 2) |" in report and "among all tokens" in report
    assert report.index("Depth profile") < report.index("Exit precision") < report.index("IoU per class")
    assert "Exit precision per head" in completed.stdout and "depth_profile.png" in completed.stdout
    with Image.open(output_dir / "depth_profile.png") as plot:
        assert plot.width > 600 and plot.height > 200


def test_diagnostics_can_be_skipped_and_are_skipped_in_slide_mode(tiny_model_dir, tmp_path):
    common = ["--model_name_or_path", str(tiny_model_dir), "--num_pictures", "0"] + SWEEP_ARGS[:-2]
    skipped = evaluate(common + ["--output_dir", str(tmp_path / "off"), "--no_diagnostics"])
    assert "diagnostics" not in skipped and all("exit_diagnostics" not in result for result in skipped["results"])
    assert not (tmp_path / "off" / "depth_profile.png").exists()
    assert "Depth profile" not in (tmp_path / "off" / "table.md").read_text()
    slide = evaluate(common + ["--output_dir", str(tmp_path / "slide"), "--sliding_window"])
    assert "sliding-window" in slide["diagnostics"]["skipped"]
    assert "Exit precision" not in (tmp_path / "slide" / "table.md").read_text()


def test_a_sweep_without_the_unpruned_setting_still_gets_its_diagnostics(tiny_model_dir, tmp_path):
    arguments = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--num_pictures", "0"]
    summary = evaluate(arguments + SWEEP_ARGS[:-5] + ["0.5"])
    # One more unpruned pass gives the reference and the depth profile; the results stay the sweep's.
    assert [result["exit_threshold"] for result in summary["results"]] == [0.5]
    assert len(summary["diagnostics"]["depth_mean_iou"]) == 3
    assert summary["results"][0]["exit_diagnostics"]["exit_agreement"][0] is not None


def test_two_processes_give_the_same_results(one_process_run, tiny_model_dir, tmp_path):
    _, one_process_dir = one_process_run
    run_script(
        ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path)] + SWEEP_ARGS, num_processes=2
    )
    one = json.loads((one_process_dir / "results.json").read_text())
    two = json.loads((tmp_path / "results.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for one_result, two_result in zip(one["results"], two["results"], strict=True):
        for field in DETERMINISTIC_FIELDS:
            assert one_result[field] == two_result[field], (field, one, two)
        for field in ("gflops", "gflops_backbone_and_final_head"):  # float sums in another order
            assert one_result[field] == pytest.approx(two_result[field], rel=1e-12)
        assert one_result["exit_diagnostics"] == two_result["exit_diagnostics"]  # integer counts, gathered
    assert one["diagnostics"] == two["diagnostics"]


def test_calibration_writes_a_model_tuned_to_the_budget(tiny_model_dir, tmp_path):
    common = ["--model_name_or_path", str(tiny_model_dir), "--num_pictures", "1"] + SWEEP_ARGS[:-2]
    search = ["--num_refinements", "2", "--calibration_samples", "4", "--num_grid_refinements", "1"]
    # A budget halfway between the unpruned cost and the cheapest setting on the calibration images themselves (an
    # unlimited mIoU budget finds it), so that it is reachable whatever the scenes look like.
    unlimited = ["--output_dir", str(tmp_path / "free"), "--max_miou_drop", "100"]
    free = evaluate(common + search + unlimited)["calibration"]
    target = (free["baseline"]["gflops"] + min(result["gflops"] for result in free["results"])) / 2
    assert target < free["baseline"]["gflops"]
    summary = evaluate(common + search + ["--output_dir", str(tmp_path), "--target_gflops", str(target)])
    calibration = summary["calibration"]
    chosen = calibration["chosen"]
    assert chosen["gflops"] <= target  # on the calibration images, where it was chosen
    assert len(calibration["results"]) > 3  # the sweep plus bisection points and the per-head search
    assert [result["exit_threshold"] for result in summary["results"]] == [1.0, 0.7, 0.5]  # the report's sweep
    config = DToPConfig.from_pretrained(tmp_path / "calibrated")
    assert config.exit_thresholds_per_head()[:-1] == per_head(chosen["exit_threshold"], 2)
    assert min(per_head(chosen["exit_threshold"], 2)) < 1.0
    saved = json.loads((tmp_path / "results.json").read_text())["calibration"]["chosen"]["exit_threshold"]
    assert per_head(saved, 2) == per_head(chosen["exit_threshold"], 2)
    # Both numbers of the chosen thresholds are reported: on the calibration images and on the evaluated split.
    reported = calibration["on_evaluation_split"]["chosen"]
    assert per_head(reported["exit_threshold"], 2) == per_head(chosen["exit_threshold"], 2)
    assert reported["num_images"] == 5 and chosen["num_images"] == 4


def test_thresholds_outside_the_unit_interval_are_rejected(capsys):
    for bad in ("1.5", "0", "-0.2"):
        with pytest.raises(SystemExit):
            evaluate(["--model_name_or_path", "unused", "--exit_threshold", "1.0", bad])
        assert "(0, 1]" in capsys.readouterr().err


def test_model_and_data_with_different_classes_are_rejected(model_tester, tmp_path):
    five_classes = save_tiny_model(model_tester, tmp_path / "model", {index: f"class {index}" for index in range(5)})
    with pytest.raises(
        ValueError, match=f"predicts 5 classes but the data set 'builtin' has {len(SYNTHETIC_ID2LABEL)}"
    ):
        evaluate(["--model_name_or_path", str(five_classes), "--output_dir", str(tmp_path / "out")] + SWEEP_ARGS)


def test_data_set_without_usable_samples_is_rejected(tiny_model_dir, tmp_path):
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
        evaluate(
            [
                "--model_name_or_path",
                str(tiny_model_dir),
                "--dataset_name",
                str(folder),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )


def test_per_head_thresholds_round_trip_through_the_cli_and_the_table(tiny_model_dir, tmp_path, capsys):
    arguments = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--num_pictures", "1"]
    arguments += SWEEP_ARGS[:-5] + ["1.0", "0.5", "0.5,0.7", "0.7,0.7"]
    assert ExitArguments(exit_threshold=["1.0", "0.5", "0.5,0.7", "0.7,0.7"]).exit_threshold == [
        1.0,
        0.5,
        (0.5, 0.7),
        (0.7, 0.7),
    ]
    summary = evaluate(arguments)
    # (0.7, 0.7) is one threshold for every head: it runs and shows as 0.7.
    assert [result["exit_threshold"] for result in summary["results"]] == [1.0, 0.7, 0.5, (0.5, 0.7)]
    table = capsys.readouterr().out
    assert "| 0.5 / 0.7 |" in table and "| 0.7 |" in table
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert saved[3]["exit_threshold"] == [0.5, 0.7]
    # The per-head point lies between its two shared neighbours in cost.
    costs = {per_head(result["exit_threshold"], 2): result["gflops"] for result in summary["results"]}
    assert costs[(0.5, 0.5)] <= costs[(0.5, 0.7)] <= costs[(0.7, 0.7)]


def test_per_head_thresholds_of_the_wrong_length_are_rejected(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(
        ValueError, match="`--exit_threshold` 0.5,0.6,0.7 gives 3 values, but the model has 2 auxiliary"
    ):
        evaluate(
            [
                "--model_name_or_path",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path),
                "--exit_threshold",
                "1.0",
                "0.5,0.6,0.7",
            ]
        )
    with pytest.raises(SystemExit):
        evaluate(["--model_name_or_path", "unused", "--exit_threshold", "0.5,high"])
    assert "one per auxiliary head" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(["--model_name_or_path", "unused", "--max_miou_drop", "1", "--calibration_split", "validation"])
    assert "--calibration_split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(
            ["--model_name_or_path", "unused", "--calibration_search", "single", "--exit_threshold", "1.0", "0.5,0.7"]
        )
    assert "calibration_search single" in capsys.readouterr().err


def test_calibration_never_reads_the_evaluated_split(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    original = sweep_module.evaluate_model

    def spy(model, dataloader, accelerator, **kwargs):
        calls.append((dataloader.dataset.split_name, kwargs["exit_threshold"]))
        return original(model, dataloader, accelerator, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_model", spy)
    common = ["--model_name_or_path", str(tiny_model_dir), "--num_pictures", "0", "--max_miou_drop", "5"]
    common += SWEEP_ARGS[:-2] + ["--calibration_samples", "3", "--num_grid_refinements", "1"]
    summary = evaluate(common + ["--output_dir", str(tmp_path / "five")])
    calibration = summary["calibration"]
    splits = [split for split, _ in calls]
    assert set(splits) == {"calibration", "eval"}
    # The search ran on the calibration images only, all of it before the report looked at the evaluated split.
    first_report = splits.index("eval")
    assert set(splits[:first_report]) == {"calibration"} and "calibration" not in splits[first_report:]
    assert first_report == calibration["num_evaluations"] > 5
    # The evaluated split saw the sweep and the three reported settings, nothing the search tried besides.
    reported = {per_head(threshold, 2) for split, threshold in calls if split == "eval"}
    expected = {per_head(threshold, 2) for threshold in (1.0, 0.7, 0.5)}
    expected |= {per_head(calibration[role]["exit_threshold"], 2) for role in ("baseline", "best_single", "chosen")}
    assert reported == expected
    # Another evaluated split (3 images instead of 5): the same thresholds, measured on the same calibration images.
    other = evaluate(common + ["--output_dir", str(tmp_path / "three"), "--max_eval_samples", "3"])["calibration"]
    assert other["chosen"]["exit_threshold"] == calibration["chosen"]["exit_threshold"]
    assert other["chosen"]["mean_iou"] == calibration["chosen"]["mean_iou"]
    assert other["on_evaluation_split"]["chosen"]["num_images"] == 3


def test_a_confidence_bound_holds_the_budget_with_a_margin(tiny_model_dir, tmp_path, capsys):
    common = ["--model_name_or_path", str(tiny_model_dir), "--num_pictures", "0", "--max_miou_drop", "5"]
    common += SWEEP_ARGS[:-2] + ["--calibration_samples", "4", "--num_grid_refinements", "1"]
    measured = evaluate(common + ["--output_dir", str(tmp_path / "measured")])["calibration"]
    summary = evaluate(common + ["--output_dir", str(tmp_path / "bounded"), "--miou_drop_confidence", "0.9"])
    calibration = summary["calibration"]
    assert calibration["miou_drop_confidence"] == 0.9 and measured["miou_drop_confidence"] is None
    # Every setting tried carries its bound (none for the plain calibration); the unpruned run's is 0.
    assert all("miou_drop_upper_bound" not in result for result in measured["results"])
    results = calibration["results"]
    bounds = {per_head(result["exit_threshold"], 2): result["miou_drop_upper_bound"] for result in results}
    assert bounds[(1.0, 1.0)] == 0.0 and len(bounds) == len(results)
    # The chosen setting's bound fits the budget (5 points), and no cheaper setting tried has a bound that does.
    chosen = calibration["chosen"]
    assert chosen["miou_drop_upper_bound"] <= 0.05
    cheaper = [result for result in results if result["gflops"] < chosen["gflops"]]
    assert all(result["miou_drop_upper_bound"] > 0.05 for result in cheaper)
    # A bound is at least as strict as the measured drop: the bounded choice saves no more than the plain one.
    assert chosen["gflops"] >= measured["chosen"]["gflops"]
    table = (tmp_path / "bounded" / "table.md").read_text()
    assert "| calibration mIoU (%) | Δ mIoU | Δ bound (90%) | GFLOPs |" in table
    assert "the budget holding each setting's mIoU drop at 90% confidence" in table
    saved = json.loads((tmp_path / "bounded" / "results.json").read_text())["calibration"]
    assert saved["chosen"]["miou_drop_upper_bound"] == chosen["miou_drop_upper_bound"]
    for bad, message in (
        (["--miou_drop_confidence", "0.9"], "needs `--max_miou_drop`"),
        (["--max_miou_drop", "1", "--miou_drop_confidence", "1.5"], "must lie in (0, 1)"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            evaluate(["--model_name_or_path", "unused"] + bad)
        assert message in capsys.readouterr().err


def test_calibrating_a_model_that_never_exits_in_the_sweep_extends_it_downward(model_tester, tmp_path):
    # Default initialisation: the auxiliary heads' confidences stay near 0.27, below every swept threshold.
    folder = save_tiny_model(model_tester, tmp_path / "unsure", dict(SYNTHETIC_ID2LABEL), initializer_range=0.02)
    arguments = [
        "--model_name_or_path",
        str(folder),
        "--num_pictures",
        "0",
        "--max_miou_drop",
        "50",
        "--calibration_samples",
        "2",
    ]
    arguments += SWEEP_ARGS[:-5] + ["1.0", "0.9", "0.7", "0.5", "--calibration_search", "single"]
    summary = evaluate(arguments + ["--output_dir", str(tmp_path / "out")])
    sweep = {result["exit_threshold"]: result["gflops"] for result in summary["results"]}
    assert len(set(sweep.values())) == 1  # nothing exits anywhere in the sweep's range
    calibration = summary["calibration"]
    searched = [result["exit_threshold"] for result in calibration["results"]]
    assert min(searched) < 0.5  # tried lower thresholds
    chosen = calibration["chosen"]
    assert chosen["exit_threshold"] < 0.5 and chosen["gflops"] < calibration["baseline"]["gflops"]
    assert DToPConfig.from_pretrained(tmp_path / "out" / "calibrated").exit_threshold == chosen["exit_threshold"]


def test_a_model_that_never_exits_is_reported_plainly_and_not_saved(model_tester, tmp_path):
    # keep_top_k 64 keeps every token of the 8x8 grid: no threshold, however low, lets one exit.
    folder = save_tiny_model(model_tester, tmp_path / "never", dict(SYNTHETIC_ID2LABEL), keep_top_k=64)
    output_dir = tmp_path / "out"
    arguments = ["--model_name_or_path", str(folder), "--output_dir", str(output_dir), "--num_pictures", "0"]
    arguments += SWEEP_ARGS[:-2] + ["--max_miou_drop", "1", "--calibration_samples", "2"]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT)] + arguments, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Cannot calibrate: no exit threshold from 1.0 down to 0.01 lets a single token exit" in completed.stdout
    assert "No calibrated model written" in completed.stdout
    assert not (output_dir / "calibrated").exists()
    summary = json.loads((output_dir / "results.json").read_text())
    assert "Cannot calibrate" in summary["calibration"]["error"]
    assert [result["exit_threshold"] for result in summary["results"]] == [1.0, 0.7, 0.5]  # the report is written


# --- capacity mode --------------------------------------------------------------------------------------------------


def capacity_gflops(model_dir: Path, capacity) -> float:
    """Capacity mode's GFLOPs per image (all heads) at the processor's 32 px, from the capacities alone."""
    return flops_from_capacities(DToPConfig.from_pretrained(model_dir), (32, 32), capacity).total.item()


def test_capacities_sweep_beside_thresholds(tiny_model_dir, tmp_path, capsys):
    arguments = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--num_pictures", "1"]
    arguments += SWEEP_ARGS[:-5] + ["1.0", "0.5", "--exit_capacity", "1.0", "0.7", "0.5,0.3"]
    results = evaluate(arguments)["results"]
    # Thresholds first, then capacities; capacity 1.0 is the unpruned model too, measured once.
    assert [(result["exit_mode"], setting_of(result)) for result in results] == [
        ("threshold", 1.0), ("threshold", 0.5), ("capacity", 0.7), ("capacity", (0.5, 0.3)),
    ]  # fmt: skip
    for result in results[2:]:  # every image keeps the same tokens: the GFLOPs follow from the capacities
        assert result["gflops"] == pytest.approx(capacity_gflops(tiny_model_dir, result["exit_capacity"]), rel=1e-12)
    assert results[3]["gflops"] < results[2]["gflops"] < results[0]["gflops"]
    table = capsys.readouterr().out
    assert "| capacity 0.7 |" in table and "| capacity 0.5 / 0.3 |" in table and "| 0.5 |" in table
    assert "capacity a / b: capacity mode, the share of an image's tokens still active" in table
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert saved[3]["exit_mode"] == "capacity" and saved[3]["exit_capacity"] == [0.5, 0.3]
    assert "| class | t=1 | t=0.5 | capacity 0.7 | capacity 0.5 / 0.3 |" in (tmp_path / "table.md").read_text()
    with Image.open(tmp_path / "gflops_vs_miou.png") as plot:
        assert plot.width > 300
    # `--exit_mode capacity` sweeps capacities only; a knob of the other mode, or increasing capacities, is refused.
    only = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "only"), "--num_pictures", "0"]
    only += SWEEP_ARGS[:-6] + ["--exit_mode", "capacity", "--exit_capacity", "1.0", "0.6"]  # no --exit_threshold
    assert [result["exit_mode"] for result in evaluate(only)["results"]] == ["capacity"] * 2
    for bad, message in (
        (["--exit_mode", "threshold", "--exit_capacity", "0.5"], "`--exit_capacity` applies in capacity mode"),
        (["--exit_mode", "capacity", "--exit_threshold", "0.5"], "`--exit_threshold` applies in threshold mode"),
        (["--exit_capacity", "0.3,0.5"], "must not increase"),
    ):
        with pytest.raises(SystemExit):
            evaluate(["--model_name_or_path", "unused"] + bad)
        assert message in capsys.readouterr().err


def test_capacity_calibration_finds_non_increasing_capacities_within_the_budget(tiny_model_dir, tmp_path, capsys):
    target = (capacity_gflops(tiny_model_dir, 1.0) + capacity_gflops(tiny_model_dir, 0.4)) / 2
    arguments = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--num_pictures", "1"]
    arguments += SWEEP_ARGS[:-2] + ["--calibrate", "capacity", "--target_gflops", str(target)]
    arguments += ["--calibration_samples", "3", "--num_refinements", "1", "--num_grid_refinements", "1"]
    summary = evaluate(arguments)
    assert "calibration" not in summary  # thresholds were not asked for
    calibration = summary["capacity_calibration"]
    assert calibration["method"] == "capacity" and len(calibration["results"]) > 5
    chosen = calibration["chosen"]
    capacities = per_head(chosen["exit_capacity"], 2)
    assert chosen["exit_mode"] == "capacity" and capacities[1] <= capacities[0] <= 1.0 and min(capacities) < 1.0
    assert all(per_head(result["exit_capacity"], 2)[1] <= per_head(result["exit_capacity"], 2)[0]
               for result in calibration["results"])  # fmt: skip
    # Within the budget on both splits alike: capacity mode's GFLOPs depend on the capacities alone.
    measured = calibration["on_evaluation_split"]["chosen"]
    assert chosen["gflops"] == pytest.approx(measured["gflops"], rel=1e-12) and measured["gflops"] <= target
    assert measured["gflops"] == pytest.approx(capacity_gflops(tiny_model_dir, chosen["exit_capacity"]), rel=1e-12)
    assert [result["exit_threshold"] for result in summary["results"]] == [1.0, 0.7, 0.5]  # the sweep is unchanged
    # The JSON, the tables and the saved model carry them.
    saved = json.loads((tmp_path / "results.json").read_text())["capacity_calibration"]
    assert per_head(saved["chosen"]["exit_capacity"], 2) == capacities
    assert saved["saved_to"] == str(tmp_path / "calibrated_capacity")
    table = (tmp_path / "table.md").read_text()
    assert "| exit capacity | chosen as | calibration mIoU (%) |" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| capacity {format_threshold(capacities)} |"))
    assert row.endswith("calibrated (saved) |")
    assert f"Calibrated exit capacities {format_threshold(capacities)}" in capsys.readouterr().out
    config = DToPConfig.from_pretrained(tmp_path / "calibrated_capacity")
    assert config.exit_mode == "capacity" and config.exit_capacities_per_head()[:-1] == capacities
    assert not (tmp_path / "calibrated").exists()
    with Image.open(tmp_path / "gflops_vs_miou.png") as plot:  # the calibration images' panel beside the sweep's
        assert plot.width > 2 * 640
    with Image.open(tmp_path / "pictures" / "image_0.png") as picture:
        assert picture.height > 2 * 150  # unpruned and calibrated capacities
