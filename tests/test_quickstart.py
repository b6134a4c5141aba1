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
"""The README's two set-up commands: the main job (examples/quickstart.py, run end to end at its tiny CI size) and
the test command (the one `.ci/run` runs)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from dtop_hf import DToPConfig
from dtop_hf.toolkit.evaluation.calibration import format_threshold, per_head, setting_of, speedup
from dtop_hf.toolkit.evaluation.flops import capacity_flops_ratio
from dtop_hf.toolkit.quickstart import PRUNING_THRESHOLD, RUN_SIZES, run_size, tiny_from_environment


MODEL_THRESHOLD = format_threshold(PRUNING_THRESHOLD)  # the pruned model's, '0.7'


REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
INSTALL_PREFIX = "pip install torch==2.13.0 && "


def run_example(name: str, argv: list[str]):
    from conftest import run_example

    return run_example(name, argv)


def readme_setup_commands() -> list[str]:
    """The README's set-up commands: the lines that install the pinned torch first, in order of appearance."""
    return [
        line.strip() for line in README.read_text(encoding="utf-8").splitlines() if line.startswith(INSTALL_PREFIX)
    ]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    main_job, tests = (command.split(" && ") for command in commands)
    assert main_job[1] == 'pip install -e ".[train]"' and main_job[-1].startswith("python examples/quickstart.py")
    assert tests[1] == 'pip install -e ".[dev]"'
    ci_commands = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_commands[-1] == tests[-1], "the README's test command must be the one .ci/run runs"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The README's main-job command (its last part: the installs are the environment's) at the tiny CI size."""
    output_dir = tmp_path_factory.mktemp("quickstart")
    command = shlex.split(readme_setup_commands()[0].split(" && ")[-1])
    assert command[0] == "python"
    env = {**os.environ, "DTOP_QUICKSTART_TINY": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    completed = subprocess.run(
        [sys.executable, *command[1:], "--output_dir", str(output_dir)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-5000:]
    return output_dir, completed.stdout


def test_quickstart_prints_the_sweep_table_and_where_everything_went(quickstart_run):
    output_dir, stdout = quickstart_run
    assert "DToP quick start (tiny size)" in stdout
    results = json.loads((output_dir / "evaluation" / "results.json").read_text())
    thresholds = [result["exit_threshold"] for result in results["results"]]
    assert sorted(thresholds, reverse=True) == [1.0, 0.5]
    # The final table (after the "done" line) has one row per threshold with the measured mIoU and GFLOPs.
    final_part = stdout.split("DToP quick start done in")[1]
    assert "| threshold | mIoU (%) |" in final_part
    for result in results["results"]:
        row = re.search(
            rf"^\| {result['exit_threshold']:.4g} \| ([\d.]+) \| [\d.]+ \| ([\d.e-]+) \|", final_part, re.M
        )
        assert row, (result["exit_threshold"], final_part)
        assert float(row.group(1)) == pytest.approx(100 * result["mean_iou"], abs=0.006)
        assert float(row.group(2)) == pytest.approx(result["gflops_backbone_and_final_head"], rel=1e-3)
    for folder in ("model", "evaluation", "pictures"):
        assert str(output_dir / folder) in final_part


def test_quickstart_calibrates_per_head_thresholds_on_calibration_scenes(quickstart_run):
    output_dir, stdout = quickstart_run
    calibration = json.loads((output_dir / "evaluation" / "results.json").read_text())["calibration"]
    assert calibration["max_miou_drop_points"] == 0.3 and calibration["search"] == "per_head"
    assert "calibration scenes" in calibration["data"] and calibration["num_images"] == 6
    # The budget holds the drop's 90% bound (a bootstrap over the 6 scenes), not the measured drop alone.
    assert calibration["miou_drop_confidence"] == 0.9
    assert calibration["chosen"]["miou_drop_upper_bound"] <= 0.003
    # The calibrated copy carries the chosen thresholds, one per auxiliary head.
    chosen = calibration["chosen"]["exit_threshold"]
    chosen = tuple(chosen) if isinstance(chosen, list) else (chosen, chosen)
    assert DToPConfig.from_pretrained(output_dir / "calibrated").exit_thresholds_per_head()[:-1] == chosen
    # The final table shows the sweep and the calibrated point side by side, with both splits' numbers.
    final_part = stdout.split("DToP quick start done in")[1]
    assert "calibrated (saved)" in final_part
    header = (
        "| exit threshold | chosen as | calibration mIoU (%) | Δ mIoU | Δ bound (90%) | GFLOPs | R | evaluation mIoU"
    )
    assert header in final_part
    assert "On the validation scenes, within 0.3 mIoU points: calibrated thresholds" in final_part
    assert str(output_dir / "calibrated") in final_part


def test_quickstart_calibrates_capacities_with_the_same_budget(quickstart_run):
    output_dir, stdout = quickstart_run
    summary = json.loads((output_dir / "evaluation" / "results.json").read_text())
    calibration = summary["capacity_calibration"]
    assert calibration["method"] == "capacity" and calibration["max_miou_drop_points"] == 0.3
    assert calibration["data"] == summary["calibration"]["data"]  # the thresholds' calibration scenes
    chosen = calibration["chosen"]
    capacities = per_head(chosen["exit_capacity"], 2)
    assert chosen["exit_mode"] == "capacity" and capacities[1] <= capacities[0] < 1.0
    # The copy in capacity mode, its measurements beside it.
    config = DToPConfig.from_pretrained(output_dir / "calibrated_capacity")
    assert config.exit_mode == "capacity" and config.exit_capacities_per_head()[:-1] == capacities
    assert (output_dir / "calibrated_capacity" / "calibration.json").is_file()
    # One row of the final table, marked as the calibrated capacities.
    final_part = stdout.split("DToP quick start done in")[1]
    rows = [
        line for line in final_part.splitlines() if line.startswith(f"| capacity {format_threshold(capacities)} |")
    ]
    assert len(rows) == 1 and rows[0].endswith("calibrated (saved) |")
    # Capacity mode's R is known before running, and the measured R is that number.
    measured = calibration["on_evaluation_split"]
    known = capacity_flops_ratio(config, (32, 32), chosen["exit_capacity"])
    assert known == pytest.approx(speedup(measured["chosen"], measured["baseline"]), rel=1e-9)
    pattern = (
        r"^Calibrated capacities (.+) \(capacity mode, the same budget\): R = ([\d.]+) from the capacities and the "
        r"32x32 input alone .*, ([\d.]+) measured on the validation scenes"
    )
    line = re.search(pattern, final_part, re.M)
    assert line and line.group(1) == format_threshold(capacities), final_part
    assert line.group(2) == line.group(3) == f"{known:.3f}"
    written = final_part.split("Written:")[1]
    assert f"{output_dir / 'calibrated_capacity'}   the pruned model in capacity mode" in written


def test_quickstart_shows_where_exits_land_and_the_depth_profiles(quickstart_run):
    output_dir, stdout = quickstart_run
    summary = json.loads((output_dir / "evaluation" / "results.json").read_text())
    diagnostics = summary["diagnostics"]
    final_part = stdout.split("DToP quick start done in")[1]
    boundary = f"{100 * diagnostics['boundary_share']:.2f}% among all tokens"
    assert "Where exits land on the validation scenes: the share of boundary tokens" in final_part
    assert boundary in final_part
    # One row at the model's threshold (not in the tiny sweep, measured for this table) and one at the
    # calibrated thresholds, whose numbers are the evaluation's.
    rows = {line.split(" | ")[0][2:]: line for line in final_part.splitlines() if " exited) |" in line}
    chosen = summary["calibration"]["on_evaluation_split"]["chosen"]
    calibrated_label = f"{format_threshold(setting_of(chosen))} (calibrated)"
    assert set(rows) == {f"{MODEL_THRESHOLD} (the model's)", calibrated_label}, rows
    cells = rows[calibrated_label].strip("| ").split(" | ")[1:]
    for cell, share, exited in zip(cells, chosen["exit_diagnostics"]["exit_boundary_share"], chosen["exit_share"]):
        expected_share = "n/a" if share is None else f"{100 * share:.2f}"
        assert cell == f"{expected_share} ({100 * exited:.1f}% exited)"
    # The depth profiles: the base model's (its own pass) and the pruned model's (the evaluation's), head by head.
    line = next(line for line in final_part.splitlines() if line.startswith("Depth profile, each head's own mIoU"))
    match = re.search(r"base model ([\d. /]+); pruned model ([\d. /]+) \(head 1", line)
    assert match, line
    pruned = [float(value) for value in match.group(2).split(" / ")]
    assert pruned == pytest.approx([100 * value for value in diagnostics["depth_mean_iou"]], abs=0.006)
    assert len(match.group(1).split(" / ")) == 3
    # The report's full diagnostics are in table.md, not in the printed summary.
    assert "Exit precision per head" in (output_dir / "evaluation" / "table.md").read_text()
    assert "Exit precision per head" not in final_part
    assert (output_dir / "evaluation" / "depth_profile.png").is_file()


def test_quickstart_writes_models_and_pictures(quickstart_run):
    output_dir, _ = quickstart_run
    model_dir = output_dir / "model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_dtop.py"):
        assert (model_dir / name).is_file(), name
    assert DToPConfig.from_pretrained(model_dir).exit_thresholds_per_head()[:-1] == (PRUNING_THRESHOLD,) * 2
    assert DToPConfig.from_pretrained(output_dir / "base").exit_thresholds_per_head()[:-1] == (1.0, 1.0)
    evaluation_dir = output_dir / "evaluation"
    for path in ("table.md", "gflops_vs_miou.png", "pictures/image_0.png", "pictures/image_1.png"):
        assert (evaluation_dir / path).is_file(), path
    # segment.py's pictures at the model's threshold and at the sweep's lowest (0.5 at the tiny size).
    pictures = {path.name for path in (output_dir / "pictures").glob("*.png")}
    for image in ("astronaut", "validation_scene"):
        for name in (f"{image}_t{MODEL_THRESHOLD}", f"{image}_t0.5"):
            assert {f"{name}_segmentation.png", f"{name}_exit_map.png", f"{name}_overlay.png"} <= pictures
    with Image.open(output_dir / "pictures" / f"astronaut_t{MODEL_THRESHOLD}_segmentation.png") as segmentation:
        assert segmentation.size == (512, 512)  # skimage's astronaut, at its own size


def test_quickstart_model_loads_in_the_pipeline_and_in_segment_py(quickstart_run, tmp_path):
    output_dir, _ = quickstart_run
    model_dir = output_dir / "model"
    segmenter = pipeline("image-segmentation", model=str(model_dir), trust_remote_code=True)
    overlay = output_dir / "pictures" / f"astronaut_t{MODEL_THRESHOLD}_overlay.png"
    photo = Image.fromarray(np.asarray(Image.open(overlay))[:200, :300])
    segments = segmenter(photo)
    id2label = DToPConfig.from_pretrained(model_dir).id2label
    assert segments and all(segment["label"] in id2label.values() for segment in segments)
    assert all(segment["mask"].size == (300, 200) for segment in segments)
    coverage = sum(np.asarray(segment["mask"]) > 0 for segment in segments)
    assert (coverage == 1).all()  # every pixel in exactly one class mask

    photo_path = tmp_path / "photo.jpg"
    photo.save(photo_path)
    arguments = [str(photo_path), "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out")]
    assert run_example("segment", arguments) == 0
    with Image.open(tmp_path / "out" / "photo_overlay.png") as overlay:
        assert overlay.size == (300, 200)


def test_quickstart_size_flags(monkeypatch, capsys):
    monkeypatch.delenv("DTOP_QUICKSTART_TINY", raising=False)
    default = run_size(tiny_from_environment())
    assert not tiny_from_environment() and default["base_steps"] == RUN_SIZES["default"]["base_steps"]
    monkeypatch.setenv("DTOP_QUICKSTART_TINY", "1")
    tiny = run_size(tiny_from_environment(), {"base_steps": 5, "train_samples": None})
    assert tiny_from_environment() and tiny["base_steps"] == 5
    assert tiny["train_samples"] == RUN_SIZES["tiny"]["train_samples"]
    with pytest.raises(SystemExit):
        run_example("quickstart", ["--exit_threshold", "1.0"])
    assert "--exit_threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_example("quickstart", ["--help"])
    assert exit_info.value.code == 0 and "DTOP_QUICKSTART_TINY" in capsys.readouterr().out
