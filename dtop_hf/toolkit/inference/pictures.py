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
"""The files and summary lines of a segmented image: class-map PNG (palette), colour pictures, exit-map figure."""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...image_processing_dtop import DToPImageProcessor
from ..evaluation.calibration import ExitRule, as_exit_rule, format_exit_rule, format_threshold
from .segmentation import DToPSegmentationResult, ExitThreshold, segment_images
from .visualization import (
    colorize_exit_map,
    colorize_segmentation,
    compose_panels,
    exit_stage_colours,
    head_names,
    make_palette,
    overlay,
    side_by_side,
    stack_vertically,
)


# Classes named in the summary line of an image, largest first.
MAX_SUMMARY_CLASSES = 5
PICTURE_KINDS = ("segmentation", "overlay", "exit_map")
CLASS_MAP_KIND = "classes"


def output_paths(output_dir: Path, name: str, pictures: bool = True) -> dict[str, Path]:
    """The files written for image `name`: `<name>_classes.png` always, the pictures unless `pictures=False`."""
    kinds = (CLASS_MAP_KIND, *PICTURE_KINDS) if pictures else (CLASS_MAP_KIND,)
    return {kind: output_dir / f"{name}_{kind}.png" for kind in kinds}


def save_atomically(picture: Image.Image, path: Path) -> None:
    """Write `path` through a temporary file renamed into place: a run killed while writing leaves no truncated
    PNG behind, so that "the file exists" can mean "the image is done"."""
    temporary = path.with_name(f".{path.name}.tmp")
    picture.save(temporary, format="PNG")
    os.replace(temporary, path)


def class_map_picture(segmentation: np.ndarray, palette: np.ndarray) -> Image.Image:
    """The class ids as a PNG that viewers show in colour: a palette image (mode "P", pixel value = class id) for up
    to 256 classes, 16-bit grey (mode "I;16") beyond."""
    if len(palette) > 256:
        return Image.fromarray(segmentation.astype(np.uint16))
    picture = Image.fromarray(segmentation.astype(np.uint8), mode="P")
    picture.putpalette(np.asarray(palette, dtype=np.uint8).ravel().tolist())
    return picture


def figure_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """`(width, height)` scaled down so that the longer side is at most `max_side` (never scaled up)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def saved_percent(result: DToPSegmentationResult) -> float:
    return 100 * (1 - result.gflops / result.gflops_unpruned) if result.gflops_unpruned else 0.0


def exit_map_figure(
    image: Image.Image, result: DToPSegmentationResult, stage_names: list[str], alpha: float, max_side: int
) -> Image.Image:
    """The image beside its exit map (exit colours blended on it), with a legend of tokens finalised per head."""
    num_stages = len(stage_names)
    small = image.resize(figure_size(image.width, image.height, max_side), Image.BILINEAR)
    exit_colours = np.asarray(
        Image.fromarray(colorize_exit_map(result.exit_map, num_stages)).resize(small.size, Image.NEAREST)
    )
    total = max(sum(result.exits), 1)
    legend = [
        (f"{name}: {count} tokens ({100 * count / total:.0f}%)", tuple(int(value) for value in colour))
        for name, count, colour in zip(stage_names, result.exits, exit_stage_colours(num_stages))
    ]
    title = f"exit map: {result.gflops:.3g} GFLOPs ({saved_percent(result):.0f}% saved)"
    panels = [("image", np.asarray(small)), (title, overlay(small, exit_colours, alpha))]
    return compose_panels(panels, [legend], min_panel_size=min(256, max_side))


def write_outputs(
    image: Image.Image,
    result: DToPSegmentationResult,
    palette: np.ndarray,
    stage_names: list[str],
    output_dir: Path,
    name: str,
    pictures: bool = True,
    alpha: float = 0.5,
    figure_max_side: int = 512,
) -> dict[str, Path]:
    """Write `<name>_classes.png` (class ids, palette) and, with `pictures`, `<name>_segmentation.png`,
    `<name>_overlay.png` (both at the image size) and `<name>_exit_map.png`. Returns the paths by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(output_dir, name, pictures)
    save_atomically(class_map_picture(result.segmentation, palette), paths[CLASS_MAP_KIND])
    if pictures:
        class_colours = colorize_segmentation(result.segmentation, palette)  # (height, width, 3)
        drawn = {
            "segmentation": Image.fromarray(class_colours),
            "overlay": Image.fromarray(overlay(image, class_colours, alpha)),
            "exit_map": exit_map_figure(image, result, stage_names, alpha, figure_max_side),
        }
        for kind, picture in drawn.items():
            save_atomically(picture, paths[kind])
    return paths


def class_summary(segmentation: np.ndarray, id2label: dict[int, str]) -> str:
    """`"sky 41%, tree 22%, ..."`: the largest classes by share of pixels."""
    counts = np.bincount(segmentation.ravel())
    order = np.argsort(-counts)[:MAX_SUMMARY_CLASSES]
    return ", ".join(
        f"{id2label.get(int(class_id), str(class_id))} {100 * counts[class_id] / segmentation.size:.0f}%"
        for class_id in order
        if counts[class_id] > 0
    )


def exits_summary(exits: list[int], stage_names: list[str]) -> str:
    """`"head 1 (layer 3): 49 tokens, head 2 (layer 4): 10 tokens, decode head (layer 5): 5 tokens"`."""
    return ", ".join(f"{name}: {count} tokens" for name, count in zip(stage_names, exits, strict=True))


def describe(
    title: str, image_size: tuple[int, int], result: DToPSegmentationResult, stage_names: list[str], id2label: dict
) -> str:
    """Three summary lines of a segmented image: tokens exited per head, GFLOPs, main classes.

    Args:
        title: how the image is named (its path).
        image_size: `(width, height)`.
        stage_names: the heads' names ([`~toolkit.inference.visualization.head_names`]).
    """
    width, height = image_size
    exits = exits_summary(result.exits, stage_names)
    return (
        f"{title} ({width}x{height}): {sum(result.exits)} tokens; exited at {exits}\n"
        f"  GFLOPs {result.gflops:.4g} (backbone + decode head; all heads {result.gflops_all_heads:.4g}; unpruned "
        f"{result.gflops_unpruned:.4g}, {saved_percent(result):.1f}% saved)\n"
        f"  classes: {class_summary(result.segmentation, id2label)}"
    )


def write_pictures_per_threshold(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    images: dict[str, Image.Image],
    thresholds: Sequence[ExitThreshold],
    output_dir: Path,
) -> list[str]:
    """Segment each image once per exit threshold and write its files as [`write_outputs`] does, named
    `<image>_t<threshold>_<kind>.png` (`t0.6-0.9` for one threshold per auxiliary head); returns the summaries
    [`describe`] gives."""
    config = model.config
    palette, stage_names = make_palette(config.num_labels), head_names(config.out_indices)
    id2label = {int(key): value for key, value in config.id2label.items()}
    summaries = []
    for name, image in images.items():
        for exit_threshold in thresholds:
            result = segment_images(model, image_processor, image, exit_threshold=exit_threshold)[0]
            label = f"{name}_t{format_threshold(exit_threshold).replace(' / ', '-')}"
            write_outputs(image, result, palette, stage_names, output_dir, label)
            summaries.append(describe(label, image.size, result, stage_names, id2label))
    return summaries


def write_comparison_pictures(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    samples: Sequence[tuple[Image.Image, np.ndarray | torch.Tensor]],
    exit_rules: Sequence[ExitRule | ExitThreshold],
    id2label: dict[int, str],
    folder: Path,
) -> list[Path]:
    """One PNG per `(image, ground truth)` sample, one row per exit rule (a bare threshold setting is threshold
    mode's): image | prediction | ground truth | exit map. The ground truth is at the image's size (ids after label
    reduction, 255 = unlabelled)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    num_stages = len(config.out_indices)
    palette, stage_names = make_palette(config.num_labels), head_names(config.out_indices)
    paths = []
    for index, (image, ground_truth) in enumerate(samples):
        rows = []
        for rule in map(as_exit_rule, exit_rules):
            result = segment_images(model, image_processor, image, **rule)[0]
            titles = {
                "prediction": f"prediction ({format_exit_rule(rule, threshold_prefix='t=')})",
                "exit_map": f"exit map ({100 * float((result.exit_map < num_stages - 1).mean()):.0f}% early)",
            }
            rows.append(
                side_by_side(
                    image,
                    result.segmentation,
                    result.exit_map,
                    num_stages,
                    ground_truth=ground_truth,
                    palette=palette,
                    id2label=id2label,
                    stage_names=stage_names,
                    titles=titles,
                )  # fmt: skip
            )
        paths.append(folder / f"image_{index}.png")
        stack_vertically(rows).save(paths[-1])
    return paths


__all__ = [
    "class_map_picture",
    "class_summary",
    "describe",
    "exit_map_figure",
    "exits_summary",
    "output_paths",
    "write_comparison_pictures",
    "write_outputs",
    "write_pictures_per_threshold",
]
