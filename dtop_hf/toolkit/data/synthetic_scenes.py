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

"""Deterministic synthetic outdoor scenes: a built-in, download-free stand-in for ADE20K.

The generator draws small outdoor "scenes" with numpy only and returns them as a
:class:`datasets.Dataset` with the schema of the Hub's ``scene_parse_150``:

* ``image``: PIL RGB image,
* ``annotation``: PIL mode ``"L"`` label map, ADE20K convention: ``0`` = other /
  unlabelled, ``1..C`` = classes, so image processors with ``do_reduce_labels=True``
  map ``0 -> 255`` (ignored) and ``k -> k - 1`` (the model's label ids, see
  :data:`SYNTHETIC_ID2LABEL`),
* ``difficulty``: the per-sample clutter level drawn uniformly in ``[0, 1)``
  (an extra column, like ``scene_category`` is in ``scene_parse_150``).

Why synthetic scenes and not random noise: DToP (Dynamic Token Pruning) rests on
the premise that most tokens of a segmentation image are easy (inside large,
homogeneous regions) and can leave the network early, while a few (small or thin
objects, boundaries) need the deep layers. The scenes are built so that this
holds and so that the problem cannot be solved from colour alone:

* large "stuff" regions carry class-specific *textures*, not flat colours, and two
  pairs of classes share the same mean colour and differ only by texture or
  context: ``road`` (fine per-pixel noise) vs ``stone`` (blotchy low-frequency
  texture), and ``sky`` (smooth vertical gradient, always above the horizon) vs
  ``water`` (horizontal ripples, always below the horizon);
* small or thin "things" (``pole``, ``wire``, ``person``, ``sign``, ``flower``) and
  wavy, bumpy region boundaries are the hard tokens;
* each sample draws a difficulty ``d ~ U(0, 1)``: ``d ~ 0`` gives two big regions
  (sky above a ground class), ``d ~ 1`` adds up to eight extra regions, about a
  dozen small objects, a wavier horizon, unlabelled clutter and stronger noise;
* a global brightness / contrast jitter and per-pixel noise are applied last.

Layout: a (wavy) horizon splits sky from one ground class; extra regions (trees
and buildings standing on the horizon, lakes, roads in perspective, patches of
sand / grass / stone, brick walls, wooden boards) are painted next, then small
objects (poles with wires and signs, people scaled by perspective, flower clusters
mostly on grass) and a few unlabelled (label 0) clutter blobs on top.

Every sample is generated from its own ``np.random.default_rng([seed, split_id,
index])``, so any sample can be regenerated alone (:func:`render_synthetic_scene`),
lazily or in parallel, and the dataset is bit-for-bit reproducible.

Classes (model label id = annotation value - 1):

| id | name | kind | cue |
| --- | --- | --- | --- |
| 0 | sky | stuff | blue, smooth vertical gradient, above the horizon |
| 1 | water | stuff | same blue as sky, horizontal ripples, below horizon |
| 2 | grass | stuff | green, vertical high-frequency blade noise |
| 3 | tree | stuff | dark green, blotchy foliage, on the horizon |
| 4 | road | stuff | gray, fine per-pixel noise, perspective trapezoid |
| 5 | stone | stuff | same gray as road, blotchy low-frequency texture |
| 6 | sand | stuff | beige, fine dark/bright speckle |
| 7 | brick | stuff | red, periodic mortar lines |
| 8 | wood | stuff | brown, wavy stripes |
| 9 | building | stuff | light facade with a grid of dark windows |
| 10 | pole | thing | dark, 1-2 px wide vertical lines |
| 11 | wire | thing | near-black 1 px curves (catenaries) in the sky |
| 12 | person | thing | small body + head blob, random clothing colour |
| 13 | sign | thing | small bright rectangle with a border, often on a pole |
| 14 | flower | thing | clusters of 1-2 px bright dots, mostly on grass |

Statistics of the default configuration ``make_synthetic_scenes(200, 128, seed=0)``
measured with :func:`dataset_statistics` (class and small-object shares are of labelled
pixels, unlabelled and boundary shares of all pixels):

| statistic | value |
| --- | --- |
| samples | 200 |
| mean classes per image | 6.67 |
| images with N classes (N: images) | 2: 4, 3: 24, 4: 21, 5: 21, 6: 24, 7: 28, 8: 25, 9: 23, 10: 16, 11: 11, 12: 2, 14: 1 |
| unlabelled (label 0) pixel share | 0.33% |
| small-object pixel share | 2.75% |
| boundary pixel share | 9.02% |
| difficulty histogram | [0.0, 0.2): 40, [0.2, 0.4): 32, [0.4, 0.6): 46, [0.6, 0.8): 42, [0.8, 1.0): 40 |

| class | pixel share |
| --- | --- |
| sky | 36.58% |
| water | 12.70% |
| grass | 10.52% |
| tree | 2.76% |
| road | 10.53% |
| stone | 10.56% |
| sand | 8.05% |
| brick | 1.39% |
| wood | 1.82% |
| building | 2.34% |
| pole | 0.68% |
| wire | 1.01% |
| person | 0.40% |
| sign | 0.38% |
| flower | 0.28% |

Texture-only pairs in the same 200 samples (mean RGB of the class's pixels; high-frequency
energy = mean absolute difference between neighbouring pixels of the class, along x for
road / stone and along y for sky / water):

| class | mean RGB | high-frequency energy |
| --- | --- | --- |
| road | (125, 124, 121) | 18.7 |
| stone | (124, 121, 119) | 8.0 |
| sky | (102, 148, 202) | 4.5 |
| water | (103, 148, 203) | 19.6 |

Generation costs about 6 ms of CPU per 128 x 128 sample (about 8 ms with PNG encoding into
the dataset), so 1000 samples take well under 30 s on one core.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    # `datasets` is an optional dependency (the `train` extra): imported only where a Dataset is built.
    import datasets

# ---------------------------------------------------------------------------
# Class registry
# ---------------------------------------------------------------------------

SKY, WATER, GRASS, TREE, ROAD, STONE, SAND, BRICK, WOOD, BUILDING = range(10)
POLE, WIRE, PERSON, SIGN, FLOWER = range(10, 15)

SYNTHETIC_ID2LABEL: dict[int, str] = {
    SKY: "sky",
    WATER: "water",
    GRASS: "grass",
    TREE: "tree",
    ROAD: "road",
    STONE: "stone",
    SAND: "sand",
    BRICK: "brick",
    WOOD: "wood",
    BUILDING: "building",
    POLE: "pole",
    WIRE: "wire",
    PERSON: "person",
    SIGN: "sign",
    FLOWER: "flower",
}
SYNTHETIC_LABEL2ID: dict[str, int] = {name: idx for idx, name in SYNTHETIC_ID2LABEL.items()}
NUM_SYNTHETIC_CLASSES: int = len(SYNTHETIC_ID2LABEL)
SMALL_OBJECT_CLASS_IDS: tuple[int, ...] = (POLE, WIRE, PERSON, SIGN, FLOWER)
# Annotation value of unlabelled pixels ("other" in ADE20K); reduced to 255 by processors.
UNLABELLED_VALUE: int = 0

# Mean colours. Pairs that must only be told apart by texture / context share a colour.
_BLUE = (105.0, 150.0, 205.0)
_GRAY = (128.0, 126.0, 122.0)
_CLASS_BASE_COLOURS: dict[int, tuple[float, float, float]] = {
    SKY: _BLUE,
    WATER: _BLUE,
    GRASS: (80.0, 140.0, 55.0),
    TREE: (45.0, 95.0, 45.0),
    ROAD: _GRAY,
    STONE: _GRAY,
    SAND: (205.0, 185.0, 140.0),
    BRICK: (160.0, 70.0, 50.0),
    WOOD: (135.0, 90.0, 50.0),
    BUILDING: (195.0, 185.0, 170.0),
    POLE: (70.0, 68.0, 66.0),
    WIRE: (35.0, 35.0, 38.0),
}

# Colours used to visualise label maps (CLI); index 0 = unlabelled.
SYNTHETIC_LABEL_PALETTE: np.ndarray = np.array(
    [
        (0, 0, 0),
        (135, 206, 250),
        (0, 60, 180),
        (60, 200, 60),
        (0, 100, 0),
        (128, 64, 128),
        (170, 170, 170),
        (240, 220, 130),
        (200, 40, 40),
        (140, 80, 20),
        (250, 170, 160),
        (255, 255, 0),
        (255, 0, 255),
        (255, 60, 0),
        (0, 255, 255),
        (255, 255, 255),
    ],
    dtype=np.uint8,
)

_SPLIT_IDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

# Image size the pixel scales below were designed for; other sizes scale shapes and textures.
_REFERENCE_SIZE = 128


def _split_id(split: str) -> int:
    """Stable integer for a split name (crc32, not hash(), so it survives interpreter restarts)."""
    if split in _SPLIT_IDS:
        return _SPLIT_IDS[split]
    return 1000 + zlib.crc32(split.encode("utf-8"))


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _split_id(split), index])


# ---------------------------------------------------------------------------
# Canvas and geometry
# ---------------------------------------------------------------------------


@dataclass
class _Canvas:
    """Image (float RGB) and annotation being painted, with pixel-centre coordinate grids."""

    image: np.ndarray
    annotation: np.ndarray
    rows: np.ndarray  # (S, 1) pixel-centre y
    cols: np.ndarray  # (1, S) pixel-centre x
    unit: float  # pixels per reference pixel, to keep looks independent of image size
    horizon: np.ndarray  # (S,) horizon row per column

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def below_horizon(self) -> np.ndarray:
        return self.rows >= self.horizon[None, :]

    def paint(self, mask: np.ndarray, pixels: np.ndarray, class_id: int | None) -> None:
        """Paint ``pixels`` (full (S, S, 3) texture or one colour) and the label where ``mask``."""
        value = np.uint8(UNLABELLED_VALUE if class_id is None else class_id + 1)
        if pixels.ndim == 3:
            # Large textured regions: copyto(where=) beats boolean fancy indexing on (S, S, 3).
            np.copyto(self.image, pixels, where=mask[:, :, None])
            np.copyto(self.annotation, value, where=mask)
        else:
            # Small flat-coloured objects: touch only their few pixels.
            rows, cols = np.nonzero(mask)
            self.image[rows, cols] = pixels
            self.annotation[rows, cols] = value


def _ellipse_mask(canvas: _Canvas, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Axis-aligned ellipse; evaluated only inside its bounding box since most are a few pixels wide."""
    mask = np.zeros((canvas.size, canvas.size), dtype=bool)
    r0, r1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, canvas.size)
    c0, c1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, canvas.size)
    if r0 < r1 and c0 < c1:
        dy = (canvas.rows[r0:r1] - cy) / ry
        dx = (canvas.cols[:, c0:c1] - cx) / rx
        mask[r0:r1, c0:c1] = dx * dx + dy * dy <= 1.0
    return mask


def _blob_mask(
    rng: np.random.Generator, canvas: _Canvas, cx: float, cy: float, rx: float, ry: float, bumpiness: float
) -> np.ndarray:
    """Ellipse whose radius is modulated by a few random harmonics: irregular, hard boundaries."""
    harmonics = range(2, 6)
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    # Evaluate inside the bounding box of the largest possible radius only.
    reach = 1.0 + bumpiness * sum(1.0 / h for h in harmonics)
    mask = np.zeros((canvas.size, canvas.size), dtype=bool)
    r0, r1 = max(int(cy - reach * ry) - 1, 0), min(int(cy + reach * ry) + 2, canvas.size)
    c0, c1 = max(int(cx - reach * rx) - 1, 0), min(int(cx + reach * rx) + 2, canvas.size)
    if r0 >= r1 or c0 >= c1:
        return mask
    dx, dy = (canvas.cols[:, c0:c1] - cx) / rx, (canvas.rows[r0:r1] - cy) / ry
    theta = np.arctan2(dy, dx)
    radius = np.ones_like(theta)
    for harmonic, phase in zip(harmonics, phases):
        radius += bumpiness / harmonic * np.sin(harmonic * theta + phase)
    mask[r0:r1, c0:c1] = dx * dx + dy * dy <= radius * radius
    return mask


def _polygon_mask(canvas: _Canvas, xs: Sequence[float], ys: Sequence[float]) -> np.ndarray:
    """Even-odd rule fill of a polygon, vectorised over pixels, looping over its few edges."""
    inside = np.zeros((canvas.size, canvas.size), dtype=bool)
    n = len(xs)
    for i in range(n):
        x1, y1, x2, y2 = xs[i], ys[i], xs[(i + 1) % n], ys[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > canvas.rows) != (y2 > canvas.rows)
        x_cross = x1 + (canvas.rows - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (canvas.cols < x_cross)
    return inside


def _star_polygon_mask(
    rng: np.random.Generator, canvas: _Canvas, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    """Random simple polygon: sorted angles with random radii around a centre."""
    n_vertices = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n_vertices))
    radii = rng.uniform(0.55, 1.0, n_vertices)
    return _polygon_mask(canvas, cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles))


def _rectangle_mask(canvas: _Canvas, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return (canvas.cols >= x0) & (canvas.cols < x1) & (canvas.rows >= y0) & (canvas.rows < y1)


def _polyline_mask(canvas: _Canvas, xs: np.ndarray, ys: np.ndarray, thickness: int) -> np.ndarray:
    """Rasterise a densely sampled centre line with a square pen of ``thickness`` pixels.

    Dense sampling (not a distance test) keeps 1-pixel lines unbroken at any slope.
    """
    mask = np.zeros((canvas.size, canvas.size), dtype=bool)
    offsets = np.arange(thickness) - (thickness - 1) // 2
    base_r, base_c = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    for dr in offsets:
        for dc in offsets:
            r, c = base_r + dr, base_c + dc
            keep = (r >= 0) & (r < canvas.size) & (c >= 0) & (c < canvas.size)
            mask[r[keep], c[keep]] = True
    return mask


def _segment_points(x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, np.ndarray]:
    n = int(3 * max(abs(x1 - x0), abs(y1 - y0))) + 2
    t = np.linspace(0.0, 1.0, n)
    return x0 + t * (x1 - x0), y0 + t * (y1 - y0)


# ---------------------------------------------------------------------------
# Textures: one function per texture family, each returning a full (S, S, 3) float image.
# ---------------------------------------------------------------------------


def _jittered_colour(rng: np.random.Generator, class_id: int) -> np.ndarray:
    # Small per-region colour jitter: colour stays a cue, but not a sufficient one.
    return np.asarray(_CLASS_BASE_COLOURS[class_id], dtype=np.float32) + rng.normal(0, 6, 3).astype(np.float32)


def _value_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth (low-frequency) noise with unit std: random lattice, bicubic-ish interpolation."""
    n = int(np.ceil(size / cell)) + 3
    lattice = rng.standard_normal((n, n)).astype(np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / cell + rng.uniform(0, 1)
    i0 = np.floor(coords).astype(np.int64)
    f = coords - i0
    f = f * f * (3 - 2 * f)  # smoothstep hides the lattice
    rows = lattice[i0] * (1 - f)[:, None] + lattice[i0 + 1] * f[:, None]
    noise = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _white_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.standard_normal((size, size), dtype=np.float32)


def _shade(colour: np.ndarray, luminance: np.ndarray) -> np.ndarray:
    """Add a (zero-mean) luminance pattern to a colour; keeps the region's mean colour."""
    return colour[None, None, :] + luminance[:, :, None]


def _sky_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Darker at the top, lighter at the horizon: a smooth gradient with almost no high frequencies.
    t = np.clip(canvas.rows / np.maximum(canvas.horizon[None, :], 1.0), 0.0, 1.0)
    gradient = (t - 0.5) * rng.uniform(40, 70)
    haze = 4.0 * _value_noise(rng, canvas.size, 24 * canvas.unit)
    return _shade(colour, gradient + haze)


def _water_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Horizontal ripples (intensity varies along y) with slow sideways wobble.
    period = rng.uniform(3.0, 5.5) * canvas.unit
    wobble = 1.2 * _value_noise(rng, canvas.size, 16 * canvas.unit)
    ripples = np.sin(2 * np.pi * canvas.rows / period + wobble + rng.uniform(0, 2 * np.pi))
    return _shade(colour, rng.uniform(18, 26) * ripples + 3.0 * _white_noise(rng, canvas.size))


def _grass_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # High-frequency noise, slightly elongated vertically like blades.
    noise = _white_noise(rng, canvas.size)
    blades = (noise + np.roll(noise, 1, axis=0) + np.roll(noise, 2, axis=0)) / np.sqrt(3.0)
    return _shade(colour, 24.0 * blades)


def _foliage_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    clumps = _value_noise(rng, canvas.size, 5 * canvas.unit)
    return _shade(colour, 22.0 * clumps + 6.0 * _white_noise(rng, canvas.size))


def _fine_noise_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Asphalt: fine i.i.d. grain, no structure at larger scales.
    return _shade(colour, 16.0 * _white_noise(rng, canvas.size))


def _blotchy_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Stone: same mean as road, but energy at low frequencies (cobble-sized blotches).
    blotches = _value_noise(rng, canvas.size, 6 * canvas.unit)
    return _shade(colour, 26.0 * blotches + 3.0 * _white_noise(rng, canvas.size))


def _speckle_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Sand: sparse dark and bright grains on a soft background.
    u = rng.random((canvas.size, canvas.size), dtype=np.float32)
    grains = np.where(u < 0.08, np.float32(-45.0), np.where(u > 0.93, np.float32(30.0), np.float32(0.0)))
    return _shade(colour, grains + 5.0 * _white_noise(rng, canvas.size) + 3.5)


def _brick_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    course = rng.uniform(5, 7) * canvas.unit
    brick_length = 2.2 * course
    y = canvas.rows + rng.uniform(0, course)
    row_index = np.floor(y / course)
    x = canvas.cols + rng.uniform(0, brick_length) + 0.5 * brick_length * (row_index % 2)
    mortar = ((y % course) < canvas.unit) | ((x % brick_length) < canvas.unit)
    mortar_colour = np.array([200.0, 195.0, 185.0], dtype=np.float32) - colour
    per_brick = 8.0 * _value_noise(rng, canvas.size, 3 * canvas.unit)
    return _shade(colour, per_brick + 5.0 * _white_noise(rng, canvas.size)) + mortar[:, :, None] * mortar_colour


def _wood_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Wavy grain stripes, mostly horizontal like boards.
    angle = rng.uniform(-0.3, 0.3)
    period = rng.uniform(3.5, 6.0) * canvas.unit
    along = canvas.rows * np.cos(angle) - canvas.cols * np.sin(angle)
    warp = 1.5 * _value_noise(rng, canvas.size, 12 * canvas.unit)
    stripes = np.sin(2 * np.pi * along / period + warp)
    return _shade(colour, 24.0 * stripes + 4.0 * _white_noise(rng, canvas.size))


def _facade_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Light wall with a regular grid of dark windows.
    pitch_x, pitch_y = rng.uniform(7, 10) * canvas.unit, rng.uniform(8, 11) * canvas.unit
    x = canvas.cols + rng.uniform(0, pitch_x)
    y = canvas.rows + rng.uniform(0, pitch_y)
    windows = ((x % pitch_x) < 0.5 * pitch_x) & ((y % pitch_y) < 0.55 * pitch_y)
    window_colour = np.array([60.0, 70.0, 90.0], dtype=np.float32) - colour
    wall = _shade(colour, 4.0 * _white_noise(rng, canvas.size))
    return wall + windows[:, :, None] * window_colour


_TextureFn = Callable[[np.random.Generator, _Canvas, np.ndarray], np.ndarray]
_STUFF_TEXTURES: dict[int, _TextureFn] = {
    SKY: _sky_texture,
    WATER: _water_texture,
    GRASS: _grass_texture,
    TREE: _foliage_texture,
    ROAD: _fine_noise_texture,
    STONE: _blotchy_texture,
    SAND: _speckle_texture,
    BRICK: _brick_texture,
    WOOD: _wood_texture,
    BUILDING: _facade_texture,
}


def _paint_stuff(rng: np.random.Generator, canvas: _Canvas, mask: np.ndarray, class_id: int) -> None:
    if mask.any():
        canvas.paint(mask, _STUFF_TEXTURES[class_id](rng, canvas, _jittered_colour(rng, class_id)), class_id)


# ---------------------------------------------------------------------------
# Layout: horizon and large regions (one placer per region type)
# ---------------------------------------------------------------------------


def _wavy_horizon(rng: np.random.Generator, size: int, difficulty: float) -> np.ndarray:
    level = rng.uniform(0.3, 0.55) * size
    cols = np.arange(size, dtype=np.float32) + 0.5
    amplitude = difficulty * 0.06 * size
    wavelength = rng.uniform(0.3, 1.0) * size
    return level + amplitude * np.sin(2 * np.pi * cols / wavelength + rng.uniform(0, 2 * np.pi))


def _horizon_at(canvas: _Canvas, x: float) -> float:
    return float(canvas.horizon[min(max(int(x), 0), canvas.size - 1)])


def _random_ground_point(rng: np.random.Generator, canvas: _Canvas, near: float = 0.0) -> tuple[float, float]:
    """A point below the horizon; ``near`` in [0, 1) biases it towards the bottom (the viewer)."""
    x = rng.uniform(0, canvas.size)
    top = _horizon_at(canvas, x)
    y = top + (canvas.size - top) * rng.uniform(near, 1.0)
    return x, y


def _place_tree(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    s = canvas.size
    cx = rng.uniform(0, s)
    cy = _horizon_at(canvas, cx) - rng.uniform(0.0, 0.12) * s
    r = rng.uniform(0.1, 0.25) * s
    return _blob_mask(rng, canvas, cx, cy, r, r * rng.uniform(0.8, 1.3), rng.uniform(0.15, 0.3))


def _place_building(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    s = canvas.size
    x0 = rng.uniform(-0.1, 0.9) * s
    x1 = x0 + rng.uniform(0.12, 0.35) * s
    bottom = _horizon_at(canvas, 0.5 * (x0 + x1)) + rng.uniform(0.0, 0.06) * s
    top = bottom - rng.uniform(0.15, 0.45) * s
    return _rectangle_mask(canvas, x0, top, x1, bottom)


def _place_wall(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    s = canvas.size
    x0 = rng.uniform(-0.1, 0.8) * s
    x1 = x0 + rng.uniform(0.15, 0.5) * s
    bottom = rng.uniform(_horizon_at(canvas, x0) + 0.1 * s, 1.05 * s)
    top = bottom - rng.uniform(0.1, 0.3) * s
    # A slanted top edge (a quadrilateral) makes the wall look in perspective.
    slant = rng.uniform(-0.05, 0.05) * s
    return _polygon_mask(canvas, [x0, x1, x1, x0], [top, top + slant, bottom, bottom])


def _place_lake(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    cx, cy = _random_ground_point(rng, canvas, near=0.2)
    rx = rng.uniform(0.12, 0.3) * canvas.size
    mask = _blob_mask(rng, canvas, cx, cy, rx, rx * rng.uniform(0.3, 0.55), rng.uniform(0.05, 0.2))
    return mask & canvas.below_horizon()  # water only ever below the horizon (context cue vs sky)


def _place_road(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    s = canvas.size
    vanishing_x = rng.uniform(0.2, 0.8) * s
    top = _horizon_at(canvas, vanishing_x) + rng.uniform(0.0, 0.08) * s
    half_top = rng.uniform(0.005, 0.04) * s
    centre_bottom = vanishing_x + rng.uniform(-0.4, 0.4) * s
    half_bottom = rng.uniform(0.15, 0.4) * s
    xs = [vanishing_x - half_top, vanishing_x + half_top, centre_bottom + half_bottom, centre_bottom - half_bottom]
    ys = [top, top, s + 1.0, s + 1.0]
    return _polygon_mask(canvas, xs, ys) & canvas.below_horizon()


def _place_ground_patch(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    cx, cy = _random_ground_point(rng, canvas, near=0.1)
    rx = rng.uniform(0.1, 0.3) * canvas.size
    return _star_polygon_mask(rng, canvas, cx, cy, rx, rx * rng.uniform(0.35, 0.8)) & canvas.below_horizon()


def _place_boards(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    # A wooden deck / fence: an elongated quadrilateral on the ground.
    s = canvas.size
    cx, cy = _random_ground_point(rng, canvas, near=0.2)
    half_w, half_h = rng.uniform(0.12, 0.35) * s, rng.uniform(0.05, 0.12) * s
    skew = rng.uniform(-0.08, 0.08) * s
    xs = [cx - half_w + skew, cx + half_w + skew, cx + half_w - skew, cx - half_w - skew]
    return _polygon_mask(canvas, xs, [cy - half_h, cy - half_h, cy + half_h, cy + half_h])


_RegionPlacer = Callable[[np.random.Generator, _Canvas], np.ndarray]
# (class, placer, weight): classes that never fill the background get more draws, to balance pixel shares.
_REGION_PLACERS: tuple[tuple[int, _RegionPlacer, float], ...] = (
    (TREE, _place_tree, 2.0),
    (BUILDING, _place_building, 2.0),
    (BRICK, _place_wall, 1.5),
    (WATER, _place_lake, 0.5),
    (ROAD, _place_road, 1.0),
    (SAND, _place_ground_patch, 0.7),
    (GRASS, _place_ground_patch, 0.7),
    (STONE, _place_ground_patch, 0.7),
    (WOOD, _place_boards, 1.5),
)
_REGION_WEIGHTS = np.array([weight for _, _, weight in _REGION_PLACERS]) / sum(w for _, _, w in _REGION_PLACERS)
_GROUND_CLASSES: tuple[int, ...] = (GRASS, ROAD, SAND, STONE, WATER)


# ---------------------------------------------------------------------------
# Small objects: one drawer per object type. They paint directly and return nothing.
# ---------------------------------------------------------------------------


def _flat(rng: np.random.Generator, colour: Sequence[float], spread: float = 8.0) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) + rng.normal(0, spread, 3).astype(np.float32)


def _draw_pole(rng: np.random.Generator, canvas: _Canvas) -> tuple[float, float]:
    """Thin, nearly vertical line standing on the ground; returns its top (x, y) for wires / signs."""
    s = canvas.size
    x, base = _random_ground_point(rng, canvas, near=0.05)
    top = base - rng.uniform(0.3, 0.75) * s
    top_x = x + rng.uniform(-0.03, 0.03) * s
    thickness = max(1, int(round(rng.choice([1, 1, 2]) * canvas.unit)))
    mask = _polyline_mask(canvas, *_segment_points(x, base, top_x, top), thickness)
    canvas.paint(mask, _flat(rng, _CLASS_BASE_COLOURS[POLE], 10.0), POLE)
    return top_x, max(top, 0.0)


def _draw_wire(
    rng: np.random.Generator, canvas: _Canvas, anchors: list[tuple[float, float]]
) -> None:
    """Thin catenary-like curve across the sky, between two pole tops when there are some."""
    s = canvas.size
    if len(anchors) >= 2 and rng.uniform() < 0.7:
        (x0, y0), (x1, y1) = (anchors[i] for i in rng.choice(len(anchors), 2, replace=False))
    else:
        x0, x1 = -1.0, s + 1.0
        y0, y1 = (rng.uniform(0.05, 0.8) * _horizon_at(canvas, x) for x in (0, s - 1))
    sag = rng.uniform(0.02, 0.12) * s
    t = np.linspace(0.0, 1.0, int(4 * s))
    xs = x0 + t * (x1 - x0)
    ys = y0 + t * (y1 - y0) + 4 * sag * t * (1 - t)
    thickness = max(1, int(round(canvas.unit)))
    canvas.paint(_polyline_mask(canvas, xs, ys, thickness), _flat(rng, _CLASS_BASE_COLOURS[WIRE], 6.0), WIRE)


def _draw_person(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Body ellipse + head disk; the size follows perspective (smaller near the horizon)."""
    s = canvas.size
    x, foot = _random_ground_point(rng, canvas, near=0.05)
    depth = (foot - _horizon_at(canvas, x)) / max(s - _horizon_at(canvas, x), 1.0)
    height = (4.0 + 16.0 * depth) * canvas.unit * rng.uniform(0.8, 1.2)
    body_h, body_w = 0.75 * height, 0.22 * height
    head_r = max(0.5, 0.13 * height)
    body = _ellipse_mask(canvas, x, foot - 0.5 * body_h, max(0.6, body_w), max(0.6, 0.5 * body_h))
    head = _ellipse_mask(canvas, x, foot - body_h - 0.8 * head_r, head_r + 0.3, head_r + 0.3)
    clothing = rng.uniform(20, 235, 3).astype(np.float32)  # any colour: only the shape is a cue
    canvas.paint(body, clothing, PERSON)
    canvas.paint(head, _flat(rng, (200.0, 160.0, 130.0), 20.0), PERSON)


def _draw_sign(rng: np.random.Generator, canvas: _Canvas, anchor: tuple[float, float] | None) -> None:
    """Small bright rectangle with a contrasting border, on a pole top when one is given."""
    s = canvas.size
    w, h = rng.uniform(4, 11) * canvas.unit, rng.uniform(4, 9) * canvas.unit
    if anchor is not None:
        cx, cy = anchor[0], anchor[1] + 0.5 * h
    else:
        cx, cy = rng.uniform(0, s), rng.uniform(0.2, 0.95) * s
    x0, y0 = cx - 0.5 * w, cy - 0.5 * h
    outer = _rectangle_mask(canvas, x0, y0, x0 + w, y0 + h)
    inner = _rectangle_mask(canvas, x0 + canvas.unit, y0 + canvas.unit, x0 + w - canvas.unit, y0 + h - canvas.unit)
    palette = ((220, 30, 30), (240, 200, 20), (30, 80, 200), (240, 240, 240), (20, 140, 60))
    face = np.asarray(palette[rng.integers(len(palette))], dtype=np.float32)
    border = np.float32(255.0) - face * np.float32(0.6)
    canvas.paint(outer, border, SIGN)
    canvas.paint(inner, face, SIGN)


def _draw_flowers(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Cluster of 1-2 px dots; placed on grass when there is grass (a context cue)."""
    grass = np.flatnonzero(canvas.annotation == GRASS + 1)
    if grass.size and rng.uniform() < 0.8:
        cy, cx = np.divmod(float(grass[rng.integers(grass.size)]), canvas.size)
        cx, cy = cx + 0.5, cy + 0.5
    else:
        cx, cy = _random_ground_point(rng, canvas)
    spread = rng.uniform(3, 8) * canvas.unit
    palette = ((250, 120, 190), (250, 230, 60), (250, 250, 250), (170, 90, 220), (255, 140, 40))
    colour = _flat(rng, palette[rng.integers(len(palette))], 10.0)
    mask = np.zeros((canvas.size, canvas.size), dtype=bool)
    for _ in range(int(rng.integers(4, 13))):
        dx, dy = rng.normal(0, spread, 2)
        radius = rng.uniform(0.7, 1.8) * canvas.unit
        mask |= _ellipse_mask(canvas, cx + dx, cy + 0.6 * dy, radius, radius)
    canvas.paint(mask, colour, FLOWER)


def _draw_small_objects(rng: np.random.Generator, canvas: _Canvas, count: int) -> None:
    pole_tops: list[tuple[float, float]] = []
    for kind in rng.choice(np.array(SMALL_OBJECT_CLASS_IDS), count):
        if kind == POLE:
            pole_tops.append(_draw_pole(rng, canvas))
        elif kind == WIRE:
            _draw_wire(rng, canvas, pole_tops)
        elif kind == PERSON:
            _draw_person(rng, canvas)
        elif kind == SIGN:
            on_pole = pole_tops and rng.uniform() < 0.6
            _draw_sign(rng, canvas, pole_tops[rng.integers(len(pole_tops))] if on_pole else None)
        else:
            _draw_flowers(rng, canvas)


def _draw_unlabelled_clutter(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Odd-coloured textured blob left unlabelled, like ADE20K's "other" pixels (ignored in the loss)."""
    cx, cy = rng.uniform(0, canvas.size, 2)
    r = rng.uniform(3, 9) * canvas.unit
    mask = _blob_mask(rng, canvas, cx, cy, r, r * rng.uniform(0.5, 1.5), 0.3)
    texture = _shade(rng.uniform(30, 225, 3).astype(np.float32), 20.0 * _white_noise(rng, canvas.size))
    canvas.paint(mask, texture, None)


# ---------------------------------------------------------------------------
# Scene assembly
# ---------------------------------------------------------------------------


def _apply_camera(rng: np.random.Generator, image: np.ndarray, difficulty: float) -> np.ndarray:
    """Global brightness / contrast jitter and sensor noise, so absolute colour is unreliable."""
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-20, 20)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(2.0 + 4.0 * difficulty)
    image = (image - np.float32(128.0)) * np.float32(contrast) + np.float32(128.0 + brightness) + noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def scene_difficulty(index: int, seed: int = 0, split: str = "train") -> float:
    """Difficulty in ``[0, 1)`` of one sample (the first draw of its generator), without rendering it."""
    return float(_sample_rng(seed, split, index).uniform())


def render_synthetic_scene_arrays(
    index: int, image_size: int = 128, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, float]:
    """Render one sample as ``(image uint8 (S, S, 3), annotation uint8 (S, S), difficulty)``."""
    rng = _sample_rng(seed, split, index)
    difficulty = float(rng.uniform())  # first draw: scene_difficulty() relies on it
    s = image_size
    canvas = _Canvas(
        image=np.zeros((s, s, 3), dtype=np.float32),
        annotation=np.zeros((s, s), dtype=np.uint8),
        rows=(np.arange(s, dtype=np.float32) + 0.5)[:, None],
        cols=(np.arange(s, dtype=np.float32) + 0.5)[None, :],
        unit=s / _REFERENCE_SIZE,
        horizon=_wavy_horizon(rng, s, difficulty),
    )
    below = canvas.below_horizon()
    _paint_stuff(rng, canvas, ~below, SKY)
    _paint_stuff(rng, canvas, below, int(rng.choice(_GROUND_CLASSES)))

    for _ in range(int(rng.integers(0, int(round(8 * difficulty)) + 1))):
        class_id, placer, _ = _REGION_PLACERS[rng.choice(len(_REGION_PLACERS), p=_REGION_WEIGHTS)]
        _paint_stuff(rng, canvas, placer(rng, canvas), class_id)

    _draw_small_objects(rng, canvas, int(rng.poisson(0.3 + 12.0 * difficulty)))
    if rng.uniform() < 0.1 + 0.4 * difficulty:
        for _ in range(int(rng.integers(1, 3))):
            _draw_unlabelled_clutter(rng, canvas)
    return _apply_camera(rng, canvas.image, difficulty), canvas.annotation, difficulty


def render_synthetic_scene(
    index: int, image_size: int = 128, seed: int = 0, split: str = "train"
) -> dict[str, Any]:
    """Render one sample as a dataset row: ``{"image": PIL RGB, "annotation": PIL L, "difficulty": float}``."""
    image, annotation, difficulty = render_synthetic_scene_arrays(index, image_size, seed, split)
    return {
        "image": Image.fromarray(image),
        "annotation": Image.fromarray(annotation),
        "difficulty": difficulty,
    }


def synthetic_scene_features() -> datasets.Features:
    import datasets

    return datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "difficulty": datasets.Value("float32")}
    )


def make_synthetic_scenes(
    num_samples: int, image_size: int = 128, seed: int = 0, split: str = "train"
) -> datasets.Dataset:
    """Build ``num_samples`` synthetic scenes as an in-memory ``datasets.Dataset`` (``scene_parse_150`` schema)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    import datasets

    rows = [render_synthetic_scene(i, image_size, seed, split) for i in range(num_samples)]
    columns = {name: [row[name] for row in rows] for name in ("image", "annotation", "difficulty")}
    # datasets only accepts identifier-like split names; other names simply leave ``ds.split`` unset.
    named_split = datasets.NamedSplit(split) if re.fullmatch(r"\w+(\.\w+)*", split) else None
    return datasets.Dataset.from_dict(columns, features=synthetic_scene_features(), split=named_split)


def synthetic_dataset_dict(
    num_train: int = 1000, num_validation: int = 200, image_size: int = 128, seed: int = 0
) -> datasets.DatasetDict:
    """``DatasetDict`` with ``train`` and ``validation`` splits (independent derived seeds)."""
    import datasets

    return datasets.DatasetDict(
        {
            "train": make_synthetic_scenes(num_train, image_size, seed, "train"),
            "validation": make_synthetic_scenes(num_validation, image_size, seed, "validation"),
        }
    )


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def _boundary_mask(annotation: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (both sides get marked)."""
    edge = np.zeros(annotation.shape, dtype=bool)
    horizontal = annotation[:, 1:] != annotation[:, :-1]
    vertical = annotation[1:, :] != annotation[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def dataset_statistics(ds: datasets.Dataset, difficulty_bins: int = 5) -> dict[str, Any]:
    """Label statistics of a synthetic (or any ADE20K-convention) segmentation dataset.

    Returns ``num_samples``, ``class_pixel_frequency`` (share of labelled pixels per class
    name), ``unlabelled_pixel_share``, ``mean_classes_per_image`` and
    ``classes_per_image_histogram``, ``small_object_pixel_share`` (share of labelled pixels
    in pole / wire / person / sign / flower), ``boundary_pixel_share`` (pixels next to a
    label change) and ``difficulty_histogram`` (``None`` without a ``difficulty`` column).
    """
    counts = np.zeros(256, dtype=np.int64)
    classes_per_image: list[int] = []
    boundary_pixels = 0
    for annotation in ds.select_columns(["annotation"])["annotation"]:
        labels = np.asarray(annotation, dtype=np.uint8)
        per_image = np.bincount(labels.ravel(), minlength=256)
        counts += per_image
        classes_per_image.append(int(np.count_nonzero(per_image[1 : NUM_SYNTHETIC_CLASSES + 1])))
        boundary_pixels += int(_boundary_mask(labels).sum())

    total = int(counts.sum())
    labelled = max(int(counts[1 : NUM_SYNTHETIC_CLASSES + 1].sum()), 1)
    small = sum(int(counts[class_id + 1]) for class_id in SMALL_OBJECT_CLASS_IDS)
    per_image_counts = np.bincount(classes_per_image, minlength=NUM_SYNTHETIC_CLASSES + 1) if classes_per_image else []

    difficulty_histogram = None
    if "difficulty" in ds.column_names:
        hist, edges = np.histogram(np.asarray(ds["difficulty"], dtype=np.float64), bins=difficulty_bins, range=(0, 1))
        difficulty_histogram = {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in hist]}

    return {
        "num_samples": len(ds),
        "class_pixel_frequency": {
            name: int(counts[class_id + 1]) / labelled for class_id, name in SYNTHETIC_ID2LABEL.items()
        },
        "unlabelled_pixel_share": int(counts[UNLABELLED_VALUE]) / max(total, 1),
        "mean_classes_per_image": float(np.mean(classes_per_image)) if classes_per_image else 0.0,
        "classes_per_image_histogram": {k: int(c) for k, c in enumerate(per_image_counts) if c},
        "small_object_pixel_share": small / labelled,
        "boundary_pixel_share": boundary_pixels / max(total, 1),
        "difficulty_histogram": difficulty_histogram,
    }


def format_statistics_markdown(stats: dict[str, Any]) -> str:
    """Render :func:`dataset_statistics` output as markdown tables (used for the module docstring)."""
    lines = [
        "| statistic | value |",
        "| --- | --- |",
        f"| samples | {stats['num_samples']} |",
        f"| mean classes per image | {stats['mean_classes_per_image']:.2f} |",
        "| images with N classes (N: images) | "
        + ", ".join(f"{k}: {v}" for k, v in stats["classes_per_image_histogram"].items())
        + " |",
        f"| unlabelled (label 0) pixel share | {stats['unlabelled_pixel_share']:.2%} |",
        f"| small-object pixel share | {stats['small_object_pixel_share']:.2%} |",
        f"| boundary pixel share | {stats['boundary_pixel_share']:.2%} |",
    ]
    if stats["difficulty_histogram"] is not None:
        edges, counts = stats["difficulty_histogram"]["bin_edges"], stats["difficulty_histogram"]["counts"]
        bins = ", ".join(f"[{lo:.1f}, {hi:.1f}): {c}" for lo, hi, c in zip(edges[:-1], edges[1:], counts))
        lines.append(f"| difficulty histogram | {bins} |")
    lines += ["", "| class | pixel share |", "| --- | --- |"]
    lines += [f"| {name} | {share:.2%} |" for name, share in stats["class_pixel_frequency"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line: write side-by-side previews for a human to look at
# ---------------------------------------------------------------------------


def colourise_annotation(annotation: np.ndarray) -> np.ndarray:
    """Map an annotation (0 = unlabelled, k = class k - 1) to RGB with :data:`SYNTHETIC_LABEL_PALETTE`."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(SYNTHETIC_LABEL_PALETTE)] = SYNTHETIC_LABEL_PALETTE
    return palette[annotation]


def scene_preview(image: np.ndarray, annotation: np.ndarray, zoom: int) -> Image.Image:
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    side_by_side = np.concatenate([image, gap, colourise_annotation(annotation)], axis=1)
    preview = Image.fromarray(side_by_side)
    return preview.resize((preview.width * zoom, preview.height * zoom), Image.NEAREST)


def legend_image(zoom: int) -> Image.Image:
    swatch = 12
    rows = [np.full((swatch, swatch, 3), SYNTHETIC_LABEL_PALETTE[class_id + 1], dtype=np.uint8)
            for class_id in SYNTHETIC_ID2LABEL]
    strip = np.concatenate(rows, axis=0)
    legend = Image.fromarray(strip)
    return legend.resize((legend.width * zoom, legend.height * zoom), Image.NEAREST)


__all__ = [
    "NUM_SYNTHETIC_CLASSES",
    "SMALL_OBJECT_CLASS_IDS",
    "SYNTHETIC_ID2LABEL",
    "SYNTHETIC_LABEL2ID",
    "SYNTHETIC_LABEL_PALETTE",
    "UNLABELLED_VALUE",
    "colourise_annotation",
    "dataset_statistics",
    "format_statistics_markdown",
    "make_synthetic_scenes",
    "render_synthetic_scene",
    "legend_image",
    "render_synthetic_scene_arrays",
    "scene_preview",
    "scene_difficulty",
    "synthetic_dataset_dict",
    "synthetic_scene_features",
]

