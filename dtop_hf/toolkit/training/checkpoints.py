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
"""Training checkpoints that survive a kill at any moment: written aside, completed by a manifest, then renamed.

A checkpoint folder `step_N` (N = optimiser steps done) only ever appears by an atomic rename of a folder whose
files are all written, flushed to disk and listed in its manifest (`checkpoint.json`: each file's size). So a run
killed (or out of disk) while saving leaves at most a hidden `.incomplete-step_N` folder, never a `step_N` that looks
complete. [`find_latest_checkpoint`] also re-checks the manifest, and skips with a warning any `step_N` whose files
are missing or cut short (copied in part, truncated by a full disk, written by an older version without manifest).
"""

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from transformers.utils import logging


logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
MANIFEST_NAME = "checkpoint.json"
# Folders being written, and old copies being replaced: hidden, and never matched by `CHECKPOINT_PATTERN`.
INCOMPLETE_PREFIX = ".incomplete-"
REPLACED_PREFIX = ".replaced-"


def checkpoint_step(path: str | Path) -> int:
    """The step of a `step_N` checkpoint folder.

    Raises:
        ValueError: when the folder name is not `step_N`.
    """
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"Checkpoint folders are named `step_N` (N = optimiser steps done), got {str(path)!r}.")
    return int(match.group(1))


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is: its manifest is present and every file it
    lists exists with the listed size."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME} (the save did not finish, or the folder was not written by this version)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_NAME} ({type(error).__name__}: {error})"
    for name, size in files.items():
        file_path = path / name
        if not file_path.is_file():
            return f"{name} is missing"
        if file_path.stat().st_size != size:
            return f"{name} has {file_path.stat().st_size} bytes, the manifest says {size}"
    return None


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so that a rename never outlives the data it names."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(folder: Path, step: int) -> None:
    """Flush every file of `folder` to disk, then write (and flush) the manifest listing them with their sizes."""
    files = {}
    for file_path in sorted(path for path in folder.rglob("*") if path.is_file()):
        fsync_path(file_path)
        files[file_path.relative_to(folder).as_posix()] = file_path.stat().st_size
    manifest_path = folder / MANIFEST_NAME
    manifest_path.write_text(json.dumps({"step": step, "files": files}, indent=1))
    fsync_path(manifest_path)
    fsync_path(folder)


def replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target` atomically; an existing `target` (a checkpoint of a run being redone) is moved
    aside first and deleted after, so that a kill in between leaves one of the two complete."""
    replaced = None
    if target.exists():
        replaced = target.with_name(REPLACED_PREFIX + target.name)
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(target, replaced)
    os.replace(source, target)
    fsync_path(target.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int) -> Path:
    """`accelerator.save_state` into `output_dir/step_<step>`, crash-safe (see the module docstring).

    Every process writes its part into `.incomplete-step_<step>`; once all have, the main process writes the
    manifest and renames the folder. Call it on every process.

    Returns:
        The checkpoint folder.
    """
    output_dir = Path(output_dir)
    target = output_dir / f"step_{step}"
    incomplete = output_dir / f"{INCOMPLETE_PREFIX}{target.name}"
    if accelerator.is_main_process and incomplete.exists():
        shutil.rmtree(incomplete)  # left by a run killed while saving this step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(incomplete))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(incomplete, step)
        replace_folder(incomplete, target)
    accelerator.wait_for_everyone()
    return target


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete `step_N` folder with the largest N in `output_dir`, or None when there is none.

    Incomplete ones (see [`checkpoint_problem`]) are skipped with a warning that says what is wrong.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = [path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    for path in sorted(candidates, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(f"Skipping the incomplete checkpoint {path}: {problem}.")
    return None


def prune_checkpoints(output_dir: str | Path, total_limit: int) -> list[Path]:
    """Keep the `total_limit` most recent complete checkpoints of `output_dir`, delete the older complete ones and
    the leftovers of interrupted saves. Incomplete `step_N` folders are neither counted nor deleted (they are
    replaced when training saves that step again), so the newest complete checkpoint always survives.

    Call it on the main process only, after a save has finished. Returns the deleted folders.
    """
    if total_limit < 1:
        raise ValueError(
            f"`total_limit` must be >= 1 (the last complete checkpoint is always kept), got {total_limit}."
        )
    output_dir = Path(output_dir)
    complete = sorted(
        (
            path
            for path in output_dir.iterdir()
            if path.is_dir() and CHECKPOINT_PATTERN.match(path.name) and checkpoint_problem(path) is None
        ),
        key=checkpoint_step,
    )
    leftovers = [path for path in output_dir.iterdir() if path.name.startswith((INCOMPLETE_PREFIX, REPLACED_PREFIX))]
    deleted = complete[:-total_limit] + leftovers
    for path in deleted:
        shutil.rmtree(path)
    if deleted:
        logger.info(f"Deleted {[path.name for path in deleted]} (keeping the {total_limit} newest checkpoints).")
    return deleted


__all__ = [
    "CHECKPOINT_PATTERN",
    "MANIFEST_NAME",
    "checkpoint_problem",
    "checkpoint_step",
    "find_latest_checkpoint",
    "prune_checkpoints",
    "replace_folder",
    "save_checkpoint",
    "write_manifest",
]
