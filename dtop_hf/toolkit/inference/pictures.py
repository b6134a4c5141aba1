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
from pathlib import Path

import numpy as np
from PIL import Image

from .segmentation import DToPSegmentationResult
from .visualization import colorize_exit_map, colorize_segmentation, compose_panels, exit_stage_colours, overlay


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


def exits_summary(exits: list[int], labels: list[str]) -> str:
    """`"head 1 (layer 3): 49 tokens, head 2 (layer 4): 10 tokens, decode head (layer 5): 5 tokens"`."""
    return ", ".join(f"{label}: {count} tokens" for label, count in zip(labels, exits, strict=True))


def describe(
    title: str, image_size: tuple[int, int], result: DToPSegmentationResult, labels: list[str], id2label: dict
) -> str:
    """Three summary lines of a segmented image: tokens exited per head, GFLOPs, main classes.

    Args:
        title: how the image is named (its path).
        image_size: `(width, height)`.
        labels: the heads' names ([`~toolkit.inference.segmentation.stage_labels`]).
    """
    width, height = image_size
    return (
        f"{title} ({width}x{height}): {sum(result.exits)} tokens; exited at {exits_summary(result.exits, labels)}\n"
        f"  GFLOPs {result.gflops:.4g} (backbone + decode head; all heads {result.gflops_all_heads:.4g}; unpruned "
        f"{result.gflops_unpruned:.4g}, {saved_percent(result):.1f}% saved)\n"
        f"  classes: {class_summary(result.segmentation, id2label)}"
    )


__all__ = [
    "class_map_picture",
    "class_summary",
    "describe",
    "exit_map_figure",
    "exits_summary",
    "output_paths",
    "write_outputs",
]
