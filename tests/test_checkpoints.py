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
"""Checkpoints that survive faults: written aside then renamed, incomplete ones skipped, pruning that keeps the last
complete one, and resumed runs that end bit-identical to an uninterrupted one after a truncated checkpoint, a kill
at the rename boundary, or a real `kill -9` while training and saving."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import run_example
from safetensors.torch import load_file

from dtop_hf import DToPConfig, DToPForSemanticSegmentation
from dtop_hf.toolkit.presets import MODEL_SIZES
from dtop_hf.toolkit.training import checkpoints
from dtop_hf.toolkit.training.checkpoints import (
    MANIFEST_NAME,
    checkpoint_problem,
    find_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


FINETUNE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
RUN = (
    "--device", "cpu", "--model_size", "tiny", "--synthetic_image_size", "32", "--synthetic_train_samples", "8",
    "--synthetic_validation_samples", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
    "--max_train_steps", "6", "--num_warmup_steps", "1", "--learning_rate", "1e-3", "--seed", "3",
)  # fmt: skip


@pytest.fixture
def accelerator_state(tmp_path):
    """A prepared tiny model and optimiser, to save."""
    torch.manual_seed(0)
    model = DToPForSemanticSegmentation(DToPConfig(**MODEL_SIZES["tiny"], num_labels=3))
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    return accelerator


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_save_writes_aside_then_renames_a_complete_folder(accelerator_state, tmp_path):
    folder = save_checkpoint(accelerator_state, tmp_path, 2)
    assert folder == tmp_path / "step_2" and checkpoint_problem(folder) is None
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["step"] == 2 and "model.safetensors" in manifest["files"]
    for name, size in manifest["files"].items():
        assert (folder / name).stat().st_size == size
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_2"]  # nothing left aside
    # Saving the same step again (a run redone from an earlier checkpoint) replaces it.
    save_checkpoint(accelerator_state, tmp_path, 2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_2"] and checkpoint_problem(folder) is None


def test_truncated_or_missing_files_make_a_checkpoint_incomplete(accelerator_state, tmp_path, caplog):
    for step in (2, 4, 6):
        save_checkpoint(accelerator_state, tmp_path, step)
    truncate(tmp_path / "step_6" / "model.safetensors")
    (tmp_path / "step_4" / "optimizer.bin").unlink()
    assert "model.safetensors has" in checkpoint_problem(tmp_path / "step_6")
    assert "optimizer.bin is missing" in checkpoint_problem(tmp_path / "step_4")
    with caplog.at_level("WARNING"):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert "Skipping the incomplete checkpoint" in caplog.text and "step_6" in caplog.text


def test_a_kill_at_the_rename_boundary_leaves_no_complete_looking_folder(accelerator_state, tmp_path, monkeypatch):
    save_checkpoint(accelerator_state, tmp_path, 2)

    def killed(source, target):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(checkpoints.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator_state, tmp_path, 4)
    assert not (tmp_path / "step_4").exists() and (tmp_path / ".incomplete-step_4" / MANIFEST_NAME).is_file()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_2"
    monkeypatch.undo()
    save_checkpoint(accelerator_state, tmp_path, 4)  # the next save of that step clears the leftover
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_2", "step_4"]


def test_pruning_never_deletes_the_last_complete_checkpoint(accelerator_state, tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(accelerator_state, tmp_path, step)
    truncate(tmp_path / "step_6" / "model.safetensors")  # the newest is incomplete
    (tmp_path / ".incomplete-step_8").mkdir()  # a leftover of a killed save
    deleted = prune_checkpoints(tmp_path, total_limit=1)
    assert sorted(path.name for path in deleted) == [".incomplete-step_8", "step_2"]
    # step_4, the last complete one, stays; the incomplete step_6 is neither counted nor deleted.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_4", "step_6"]
    with pytest.raises(ValueError, match="total_limit"):
        prune_checkpoints(tmp_path, total_limit=0)


# ---------------------------------------------------------------------------------------------------------------
# examples/finetune.py: resumed runs end bit-identical to an uninterrupted one


def run_finetune(output_dir: Path, *extra: str) -> None:
    run_example("finetune", [*RUN, "--output_dir", str(output_dir), *extra])


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def read_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one process, a checkpoint every 2 steps."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_finetune(output_dir, "--checkpointing_steps", "2")
    return output_dir


def test_resume_from_latest_skips_a_truncated_newest_checkpoint(uninterrupted, tmp_path, caplog):
    for step in (2, 4):
        shutil.copytree(uninterrupted / f"step_{step}", tmp_path / f"step_{step}")
    truncate(tmp_path / "step_4" / "model.safetensors")  # cut short: out of disk while saving
    shutil.copy(uninterrupted / "train_log.jsonl", tmp_path / "train_log.jsonl")
    with caplog.at_level("WARNING"):
        run_finetune(tmp_path, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert "Skipping the incomplete checkpoint" in caplog.text
    assert read_losses(tmp_path) == read_losses(uninterrupted)  # steps 3-6 redone exactly
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted))


def test_kill_at_the_rename_of_a_save_then_resume_ends_bit_identical(uninterrupted, tmp_path, monkeypatch):
    """The run dies while saving step 4, after every file is written and before the rename (the last moment a kill
    can hit a save): `latest` is then step 2, and the resumed run ends as the uninterrupted one."""
    real_replace = os.replace

    def replace_or_die(source, target):
        if Path(target).name == "step_4":
            raise KeyboardInterrupt("kill -9 while saving step_4")
        real_replace(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", replace_or_die)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path, "--checkpointing_steps", "2")
    monkeypatch.undo()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_2" and (tmp_path / ".incomplete-step_4").is_dir()
    resume = ("--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1")
    run_finetune(tmp_path, "--checkpointing_steps", "2", *resume)
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted))
    assert sorted(path.name for path in tmp_path.glob("*step_*")) == ["step_6"]  # pruned, leftover cleared


def test_kill_9_while_training_and_saving_loses_at_most_one_interval(uninterrupted, tmp_path):
    """A real SIGKILL of a run that saves after every step, sent as soon as its third save has started (so the kill
    lands inside or right after that save): the resumed run restarts from the newest complete checkpoint, at
    most one step back, and ends bit-identical to the uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(FINETUNE_SCRIPT), *RUN, "--output_dir", str(tmp_path), "--checkpointing_steps", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any((tmp_path / name).exists() for name in (".incomplete-step_3", "step_3")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its third save"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    latest = find_latest_checkpoint(tmp_path)
    assert latest is not None and int(latest.name.split("_")[1]) >= 2  # at most one interval lost
    run_finetune(tmp_path, "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    assert_same_weights(final_weights(tmp_path), final_weights(uninterrupted))
    assert read_losses(tmp_path) == read_losses(uninterrupted)
