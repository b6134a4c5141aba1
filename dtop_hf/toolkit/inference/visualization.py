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
"""Pictures of segmentations and exit maps (which head finalised each token, the paper's Figures 3-4), PIL only."""

import colorsys
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


Colour = tuple[int, int, int]
IGNORE_COLOUR: Colour = (0, 0, 0)
# Exit maps run from "left early" (green: cheap, easy tokens) through yellow to "went all the way" (red).
EXIT_ANCHOR_COLOURS = ((46, 160, 67), (242, 201, 76), (214, 39, 40))
BACKGROUND: Colour = (255, 255, 255)
TEXT_COLOUR: Colour = (20, 20, 20)
MAX_LEGEND_CLASSES = 24


def make_palette(num_colours: int) -> np.ndarray:
    """`(num_colours, 3)` uint8 colours, well apart: hues stepped by the golden angle, three saturation/brightness
    levels in turn. The same number of colours always gives the same palette."""
    if num_colours < 1:
        raise ValueError(f"`num_colours` must be >= 1, got {num_colours}.")
    golden_fraction = (math.sqrt(5) - 1) / 2
    levels = ((0.80, 0.95), (0.55, 0.75), (0.95, 0.55))  # (saturation, value)
    colours = []
    for index in range(num_colours):
        saturation, value = levels[index % len(levels)]
        red, green, blue = colorsys.hsv_to_rgb((index * golden_fraction) % 1.0, saturation, value)
        colours.append((round(red * 255), round(green * 255), round(blue * 255)))
    return np.array(colours, dtype=np.uint8)


def to_numpy(array: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def colorize_segmentation(
    segmentation: np.ndarray | torch.Tensor, palette: np.ndarray, ignore_colour: Colour = IGNORE_COLOUR
) -> np.ndarray:
    """Class-id map `(height, width)` -> `(height, width, 3)` uint8; ids outside the palette (e.g. the ignore
    index 255) get `ignore_colour`."""
    segmentation = to_numpy(segmentation).astype(np.int64)
    if segmentation.ndim != 2:
        raise ValueError(f"`segmentation` must be a (height, width) map of class ids, got shape {segmentation.shape}.")
    lookup = np.concatenate([np.asarray(palette, dtype=np.uint8), np.array([ignore_colour], dtype=np.uint8)])
    outside = (segmentation < 0) | (segmentation >= len(palette))
    return lookup[np.where(outside, len(palette), segmentation)]


def exit_stage_colours(num_stages: int) -> np.ndarray:
    """`(num_stages, 3)` uint8: green for the first auxiliary head, red for the decode head, evenly in between."""
    if num_stages < 1:
        raise ValueError(f"`num_stages` must be >= 1, got {num_stages}.")
    anchors = np.array(EXIT_ANCHOR_COLOURS, dtype=np.float64)
    positions = np.linspace(0, len(anchors) - 1, num_stages) if num_stages > 1 else np.array([len(anchors) - 1.0])
    channels = [np.interp(positions, np.arange(len(anchors)), anchors[:, channel]) for channel in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


def colorize_exit_map(exit_stage: np.ndarray | torch.Tensor, num_stages: int) -> np.ndarray:
    """Exit-stage map `(height, width)` (0 = first auxiliary head, `num_stages - 1` = decode head) ->
    `(height, width, 3)` uint8, colours from [`exit_stage_colours`]."""
    exit_stage = to_numpy(exit_stage).astype(np.int64)
    if exit_stage.ndim != 2:
        raise ValueError(f"`exit_stage` must be a (height, width) map, got shape {exit_stage.shape}.")
    if exit_stage.size and (exit_stage.min() < 0 or exit_stage.max() >= num_stages):
        raise ValueError(
            f"`exit_stage` values must lie in [0, {num_stages}) for {num_stages} stages, got "
            f"[{exit_stage.min()}, {exit_stage.max()}]."
        )
    return exit_stage_colours(num_stages)[exit_stage]


def resize_nearest(colour_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(h, w, 3)` uint8 -> `(height, width, 3)` with nearest-neighbour resizing (maps keep crisp class edges)."""
    height, width = size
    if colour_map.shape[:2] == (height, width):
        return colour_map
    return np.asarray(Image.fromarray(colour_map).resize((width, height), Image.NEAREST))


def overlay(image: np.ndarray | Image.Image, colour_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour map onto an RGB image: `(1 - alpha) * image + alpha * colour_map`, map resized to the image.

    Returns:
        `(height, width, 3)` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
    image = to_numpy(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    colour_map = resize_nearest(np.asarray(colour_map, dtype=np.uint8), image.shape[:2]).astype(np.float32)
    return np.clip((1.0 - alpha) * image + alpha * colour_map + 0.5, 0, 255).astype(np.uint8)


def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def legend_rows(
    entries: Sequence[tuple[str, Colour]], width: int, font: ImageFont.ImageFont, swatch: int
) -> list[list[tuple[str, Colour]]]:
    """Split legend entries into rows that fit `width` pixels."""
    rows, row, used = [], [], 0
    for label, colour in entries:
        entry_width = swatch + 6 + int(font.getlength(label)) + 16
        if row and used + entry_width > width:
            rows.append(row)
            row, used = [], 0
        row.append((label, colour))
        used += entry_width
    if row:
        rows.append(row)
    return rows


def compose_panels(
    panels: Sequence[tuple[str, np.ndarray]],
    legends: Sequence[Sequence[tuple[str, Colour]]] = (),
    min_panel_size: int = 256,
    padding: int = 8,
) -> Image.Image:
    """Panels of the same size in one row, each with its title above, and legend rows of colour swatches below.

    Args:
        panels: `(title, (height, width, 3) uint8)` pairs; small panels are enlarged (nearest, integer factor) so
            that their shorter side reaches `min_panel_size`.
        legends: lists of `(label, colour)`; each list starts on a new line.
        min_panel_size: smallest shown side of a panel, in pixels.
        padding: space around and between panels.
    """
    if not panels:
        raise ValueError("`panels` is empty: give at least one (title, image) pair.")
    height, width = panels[0][1].shape[:2]
    scale = max(1, math.ceil(min_panel_size / max(min(height, width), 1)))
    panel_height, panel_width = height * scale, width * scale
    font_size = max(12, min(20, panel_width // 16))
    font = load_font(font_size)
    title_height = font_size + 2 * padding
    swatch = font_size
    canvas_width = len(panels) * (panel_width + padding) + padding
    rows = [row for legend in legends for row in legend_rows(legend, canvas_width - 2 * padding, font, swatch)]
    legend_height = len(rows) * (swatch + padding) + (padding if rows else 0)
    canvas = Image.new("RGB", (canvas_width, title_height + panel_height + padding + legend_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, (title, pixels) in enumerate(panels):
        left = padding + index * (panel_width + padding)
        pixels = resize_nearest(np.asarray(pixels, dtype=np.uint8), (height, width))
        canvas.paste(Image.fromarray(pixels).resize((panel_width, panel_height), Image.NEAREST), (left, title_height))
        draw.text((left, padding), title, fill=TEXT_COLOUR, font=font)
    top = title_height + panel_height + padding
    for row in rows:
        left = padding
        for label, colour in row:
            draw.rectangle(
                [left, top, left + swatch, top + swatch], fill=tuple(int(c) for c in colour), outline=TEXT_COLOUR
            )
            draw.text((left + swatch + 6, top), label, fill=TEXT_COLOUR, font=font)
            left += swatch + 6 + int(font.getlength(label)) + 16
        top += swatch + padding
    return canvas


def stack_vertically(images: Sequence[Image.Image]) -> Image.Image:
    """Stack pictures top to bottom on a white background (left-aligned)."""
    if not images:
        raise ValueError("`images` is empty.")
    canvas = Image.new(
        "RGB", (max(image.width for image in images), sum(image.height for image in images)), BACKGROUND
    )
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas


def head_names(out_indices: Sequence[int] | int) -> list[str]:
    """`head 1 (layer 3)`, ..., `decode head (layer 12)`: how legends, summaries and tables name the heads (1-based
    layers). Given only the number of heads, the names leave the layers out."""
    layers = [None] * out_indices if isinstance(out_indices, int) else list(out_indices)
    last = len(layers) - 1
    return [
        ("decode head" if stage == last else f"head {stage + 1}") + ("" if layer is None else f" (layer {layer + 1})")
        for stage, layer in enumerate(layers)
    ]


def side_by_side(
    image: np.ndarray | Image.Image,
    prediction: np.ndarray | torch.Tensor,
    exit_map: np.ndarray | torch.Tensor,
    num_stages: int,
    ground_truth: np.ndarray | torch.Tensor | None = None,
    palette: np.ndarray | None = None,
    id2label: dict[int, str] | None = None,
    stage_names: Sequence[str] | None = None,
    titles: dict[str, str] | None = None,
    alpha: float = 0.6,
    min_panel_size: int = 256,
) -> Image.Image:
    """Image | prediction | [ground truth |] exit map (blended on the image), titled, with class and stage legends.

    Args:
        image: RGB image `(height, width, 3)`.
        prediction: class ids `(height, width)`; ground_truth: the same, ignore index drawn black.
        exit_map: exit stage per pixel `(height, width)` (the image processor's `post_process_exit_map`).
        num_stages: number of heads.
        palette: class colours (default `make_palette(max class id + 1)`; pass one palette for a whole data set).
        id2label: class names for the legend (classes present in prediction or ground truth; ids otherwise).
        stage_names: legend of the exit colours (default [`head_names`] without layers).
        titles: override panel titles, keys `image`, `prediction`, `ground_truth`, `exit_map`.
        alpha: opacity of the exit colours over the image.
        min_panel_size: smallest shown side of a panel.
    """
    image = to_numpy(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.uint8)
    prediction = to_numpy(prediction).astype(np.int64)
    maps = [prediction] + ([to_numpy(ground_truth).astype(np.int64)] if ground_truth is not None else [])
    if palette is None:
        palette = make_palette(max(int(class_map[class_map < 255].max(initial=0)) for class_map in maps) + 1)
    titles = {
        "image": "image",
        "prediction": "prediction",
        "ground_truth": "ground truth",
        "exit_map": "exit map",
        **(titles or {}),
    }
    size = image.shape[:2]
    panels = [
        (titles["image"], image),
        (titles["prediction"], resize_nearest(colorize_segmentation(prediction, palette), size)),
    ]
    if ground_truth is not None:
        panels.append((titles["ground_truth"], resize_nearest(colorize_segmentation(maps[1], palette), size)))
    panels.append((titles["exit_map"], overlay(image, colorize_exit_map(exit_map, num_stages), alpha)))

    present = sorted(set(np.unique(np.concatenate([class_map.ravel() for class_map in maps])).tolist()))
    present = [class_id for class_id in present if 0 <= class_id < len(palette)][:MAX_LEGEND_CLASSES]
    class_legend = [((id2label or {}).get(class_id, str(class_id)), tuple(palette[class_id])) for class_id in present]
    if any(bool(((class_map < 0) | (class_map >= len(palette))).any()) for class_map in maps):
        class_legend.append(("unlabelled", IGNORE_COLOUR))
    stage_names = stage_names or head_names(num_stages)
    stage_legend = list(zip(stage_names, map(tuple, exit_stage_colours(num_stages)), strict=True))
    return compose_panels(panels, [class_legend, stage_legend], min_panel_size=min_panel_size)


__all__ = [
    "colorize_exit_map",
    "colorize_segmentation",
    "compose_panels",
    "exit_stage_colours",
    "head_names",
    "make_palette",
    "overlay",
    "side_by_side",
    "stack_vertically",
]
