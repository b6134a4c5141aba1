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
"""Segment image files into an output folder, resumably: plan batches of same-size images, segment and write
them, summarise the run. What `examples/segment.py` does in each of its processes."""

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ...image_processing_dtop import DToPImageProcessor
from .images import open_image, upright_size
from .pictures import describe, exits_summary, output_paths, write_outputs
from .segmentation import segment_images


# What Pillow raises for a file that is not a readable image.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
# One planned image: (index among the inputs, path, output name).
PlannedImage = tuple[int, Path, str]


def unreadable_message(path: Path, error: Exception) -> str:
    return f"{path}: not a readable image ({type(error).__name__}: {error})"


def plan_batches(
    paths: list[Path],
    names: list[str],
    output_dir: Path,
    batch_size: int,
    pictures: bool = True,
    overwrite: bool = False,
) -> tuple[list[list[PlannedImage]], int, list[str]]:
    """The images still to segment, in batches of up to `batch_size` images of the same upright size (in order of
    first appearance), the number already done (all outputs present, unless `overwrite`) and a message per
    unreadable file. The same inputs give the same plan in every process."""
    open_batches: dict[tuple[int, int], list[PlannedImage]] = {}
    batches, num_done, problems = [], 0, []
    for index, (path, name) in enumerate(zip(paths, names, strict=True)):
        if not overwrite and all(file.is_file() for file in output_paths(output_dir, name, pictures).values()):
            num_done += 1
            continue
        try:
            size = upright_size(path)
        except UNREADABLE as error:
            problems.append(unreadable_message(path, error))
            continue
        batch = open_batches.setdefault(size, [])
        if not batch:
            batches.append(batch)  # placed where its first image comes
        batch.append((index, path, name))
        if len(batch) == batch_size:
            del open_batches[size]
    return batches, num_done, problems


def segment_batch(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    batch: list[PlannedImage],
    output_dir: Path,
    stage_names: list[str],
    id2label: dict[int, str],
    exit_settings: dict | None = None,
    **write_options,
) -> list[dict]:
    """Segment and write one batch; one record per image (`index`, then `description` and counts, or `problem`).

    Args:
        exit_settings: per-call `exit_threshold` / `exit_mode` / `exit_capacity` of [`segment_images`].
        write_options: `palette`, `pictures`, `alpha`, `figure_max_side` of [`write_outputs`].
    """
    records, images, kept = [], [], []
    for index, path, name in batch:
        try:
            images.append(open_image(path))
            kept.append((index, path, name))
        except UNREADABLE as error:  # the header read, the pixels did not (a truncated file)
            records.append({"index": index, "problem": unreadable_message(path, error)})
    results = segment_images(model, image_processor, images, **(exit_settings or {})) if images else []
    for (index, path, name), image, result in zip(kept, images, results, strict=True):
        write_outputs(image, result, stage_names=stage_names, output_dir=output_dir, name=name, **write_options)
        records.append(
            {
                "index": index,
                "description": describe(str(path), image.size, result, stage_names, id2label),
                "exits": result.exits,
                "gflops": result.gflops,
                "gflops_all_heads": result.gflops_all_heads,
                "gflops_unpruned": result.gflops_unpruned,
            }
        )
    return records


def run_summary(
    records: list[dict], num_done: int, num_skipped: int, seconds: float, stage_names: list[str], output_dir: str
) -> str:
    """The run's last lines: images, tokens exited per head, GFLOPs per image, images per second."""
    segmented = [record for record in records if "description" in record]
    lines = [
        f"Segmented {len(segmented)} image(s), skipped {num_skipped}, {num_done} already done (--overwrite redoes "
        f"them); outputs in {output_dir}"
    ]
    if segmented:
        exits = [sum(record["exits"][stage] for record in segmented) for stage in range(len(stage_names))]
        count = len(segmented)
        mean = {
            key: sum(record[key] for record in segmented) / count
            for key in ("gflops", "gflops_all_heads", "gflops_unpruned")
        }
        saved = 100 * (1 - mean["gflops"] / mean["gflops_unpruned"]) if mean["gflops_unpruned"] else 0.0
        lines += [
            f"  tokens exited at {exits_summary(exits, stage_names)}",
            f"  GFLOPs per image {mean['gflops']:.4g} (backbone + decode head; all heads "
            f"{mean['gflops_all_heads']:.4g}; unpruned {mean['gflops_unpruned']:.4g}, {saved:.1f}% saved)",
            f"  {count / max(seconds, 1e-9):.2f} images/s ({seconds:.1f} s)",
        ]
    return "\n".join(lines)


__all__ = ["UNREADABLE", "plan_batches", "run_summary", "segment_batch", "unreadable_message"]
