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

"""Deterministic synthetic outdoor scenes with context classes: a built-in, download-free stand-in for ADE20K.

The generator draws small outdoor "scenes" with numpy only and returns them as a
:class:`datasets.Dataset` with the schema of the Hub's ``scene_parse_150``:

* ``image``: PIL RGB image,
* ``annotation``: PIL mode ``"L"`` label map, ADE20K convention: ``0`` = other /
  unlabelled, ``1..C`` = classes, so image processors with ``do_reduce_labels=True``
  map ``0 -> 255`` (ignored) and ``k -> k - 1`` (the model's label ids, see
  :data:`SYNTHETIC_ID2LABEL`),
* ``difficulty``: the per-sample clutter level drawn uniformly in ``[0, 1)``
  (an extra column, like ``scene_category`` is in ``scene_parse_150``).

Why these scenes: DToP (Dynamic Token Pruning) rests on the premise that most tokens of a
segmentation image are easy and can leave the network after a few layers, while some need more.
If every class can be read off a token's own patch (a colour, a texture), nothing but boundaries
and small things is hard. These scenes therefore carry three kinds of tokens:

* **context classes**: two pairs of classes drawn with the very same colour and texture, so a
  token's own patch cannot tell them apart (a per-patch colour / texture classifier is at chance, see
  the table below); what lies around the region decides:

  * ``sky`` / ``water``: the same hazy blue. Sky is above the horizon; water lies below it: open sea
    under a band of shore (beach, meadow or tree line), the sea band of an estuary scene and the
    meandering channels that cross its land (some reach the sea, some end a strip of land short of
    it: water all the same), and ponds inside the land. A channel token far from the sea and the
    horizon is told from the sky only by the land around it;
  * ``cloud`` / ``snow``: the same white blotches. Clouds float in the sky; snow lies on the land,
    or floats on the sea as ice floes, where deciding it takes two looks (white on blue: is that blue
    sky or water?);
* **easy classes**: large regions with their own colour and texture (``grass``, ``sand``,
  ``road``, ``tree``), decidable from the patch alone: most of their tokens can exit early;
* **small things**: ``pole`` (4-6 px wide bars at 128 px) and ``person`` (body and head blobs in saturated
  clothing), a token or two wide, and the wavy region boundaries: hard tokens at any depth.

Look-alike regions never touch (water is kept from the sky by land, clouds float clear of anything,
snow never meets the sky): the boundary between them would otherwise be invisible.

An earlier version had an eleventh class, ``lake``: a channel cut off from the sea, told from
``water`` only by following the channel back to where it misses the sea. No head of the quick
start learned that chain of looks in its few minutes of training (IoU 2-12 after 500-1500 steps):
every channel came out as water, and the few right lake tokens exited wrong at the first head,
which broke the quick start's class floor and most of what its calibration could save. The channels
stayed (they make the sky / water decision harder far from the horizon); their class is water.
What a few CPU minutes of training make of them (the quick start's default run: 96 px scenes, an 8-layer
width-128 ViT with heads after layers 1, 4 and 8, 1000 base steps at learning rate 1e-3; each head's own mIoU over
all tokens of 200 validation scenes): 50.5 / 59.7 / 60.5 from the head after layer 1 to the decode head, the gain
coming from the context classes (sky 59 -> 73, water 34 -> 69, cloud 53 -> 60, snow 12 -> 35) and roads
(52 -> 66), while the other easy classes and the small things move by 3 points or less. Sea scenes with ice floes
are what makes the first head weak: a third of the scenes, each with one to four floes, where white on blue and
blue under a shore band must be told from cloud and sky. ``docs/builtin_benchmark.md`` records what was tried.

Layout: 35% estuary scenes (horizon at 5-20% of the height, one ground class, sea band from 78-90% of
the height down, 2-4 channels a token and a half wide keeping a token of land from the sky, the border
and each other); otherwise a wavy horizon at 10-85% of the height splits the sky from the ground: 35% sea
scenes (sky | shore band | water, sometimes a beach in the foreground, 1-4 ice floes) and 30% land scenes
(one ground class, patches of other ground, roads in perspective, ponds and snow fields). Trees stand on
the horizon, clouds in the sky, poles and people on the ground, and a few unlabelled (label 0) clutter
blobs go on top. Each sample draws a difficulty ``d ~ U(0, 1)``: higher ``d`` adds regions, floes,
clouds, trees, objects, horizon waviness and sensor noise. A global brightness / contrast jitter and
per-pixel noise are applied last.

Every sample is generated from its own ``np.random.default_rng([seed, split_id, index])``, so any
sample can be regenerated alone (:func:`render_synthetic_scene`), lazily or in parallel, and the
dataset is bit-for-bit reproducible. :data:`SYNTHETIC_SCENES_VERSION` changes whenever the
generator draws different scenes for the same arguments (a key for caches).

Classes (model label id = annotation value - 1):

| id | name | kind | cue |
| --- | --- | --- | --- |
| 0 | sky | context | hazy blue, above the horizon |
| 1 | water | context | the same blue, below the horizon: the sea, the channels, ponds |
| 2 | cloud | context | white blotches floating in the sky |
| 3 | snow | context | the same white, on land or as ice floes on water |
| 4 | grass | easy | green, vertical high-frequency blade noise |
| 5 | sand | easy | beige, fine dark / bright speckle |
| 6 | road | easy | gray, fine per-pixel grain, perspective trapezoids |
| 7 | tree | easy | dark green blotchy foliage, on the horizon |
| 8 | pole | small | dark brown bar standing on the ground |
| 9 | person | small | body and head blobs, saturated clothing colour, standing on the ground |

Statistics of ``make_synthetic_scenes(200, 128, seed=0)`` measured with :func:`dataset_statistics` (class and
small-object shares are of labelled pixels, unlabelled and boundary shares of all pixels):

| statistic | value |
| --- | --- |
| samples | 200 |
| mean classes per image | 6.55 |
| images with N classes (N: images) | 4: 4, 5: 37, 6: 52, 7: 64, 8: 37, 9: 6 |
| unlabelled (label 0) pixel share | 0.22% |
| small-object pixel share | 6.77% |
| boundary pixel share | 9.56% |
| difficulty histogram | [0.0, 0.2): 40, [0.2, 0.4): 32, [0.4, 0.6): 46, [0.6, 0.8): 42, [0.8, 1.0): 40 |

| class | pixel share |
| --- | --- |
| sky | 24.20% |
| water | 25.14% |
| cloud | 4.24% |
| snow | 2.54% |
| grass | 20.18% |
| sand | 10.98% |
| road | 2.31% |
| tree | 3.64% |
| pole | 2.74% |
| person | 4.02% |

How well a token's own patch tells two classes apart, on the same 200 scenes: held-out accuracy of
:func:`patch_classifier_accuracy` (a logistic regression on colour and texture statistics of 8 x 8 patches lying
wholly in one class, trained on the first 100 scenes, tested on the others; ``examples/preview_scenes.py --stats``
prints this table). The context pairs are at chance, the controls are not:

| pair | kind | accuracy of a 8 px patch classifier (0.5 = chance) |
| --- | --- | --- |
| sky / water | context | 0.50 |
| cloud / snow | context | 0.46 |
| sky / cloud | control | 1.00 |
| grass / tree | control | 1.00 |
| sand / road | control | 1.00 |

A token's row alone is a weak cue: the horizon lies anywhere between 10% and 85% of the height.

Generation costs a few ms of CPU per 96 px sample: the quick start's 1000 + 100 scenes take about 15 s on a loaded
machine, once (the data set is cached).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image


if TYPE_CHECKING:
    # `datasets` is an optional dependency (the `train` extra): imported only where a Dataset is built.
    import datasets

# ---------------------------------------------------------------------------
# Class registry
# ---------------------------------------------------------------------------

SKY, WATER, CLOUD, SNOW, GRASS, SAND, ROAD, TREE, POLE, PERSON = range(10)

SYNTHETIC_ID2LABEL: dict[int, str] = {
    SKY: "sky",
    WATER: "water",
    CLOUD: "cloud",
    SNOW: "snow",
    GRASS: "grass",
    SAND: "sand",
    ROAD: "road",
    TREE: "tree",
    POLE: "pole",
    PERSON: "person",
}
SYNTHETIC_LABEL2ID: dict[str, int] = {name: idx for idx, name in SYNTHETIC_ID2LABEL.items()}
NUM_SYNTHETIC_CLASSES: int = len(SYNTHETIC_ID2LABEL)
SMALL_OBJECT_CLASS_IDS: tuple[int, ...] = (POLE, PERSON)
# Pairs drawn with the very same texture and colour: only what lies around a region tells them apart.
CONTEXT_CLASS_PAIRS: tuple[tuple[int, int], ...] = ((SKY, WATER), (CLOUD, SNOW))
# Annotation value of unlabelled pixels ("other" in ADE20K); reduced to 255 by processors.
UNLABELLED_VALUE: int = 0
# Changes whenever the same arguments give other scenes: data sets cached on disk should carry it in their key.
SYNTHETIC_SCENES_VERSION: int = 5

_BLUE = (100.0, 150.0, 205.0)
_WHITE = (222.0, 226.0, 232.0)
_CLASS_BASE_COLOURS: dict[int, tuple[float, float, float]] = {
    SKY: _BLUE,
    WATER: _BLUE,
    CLOUD: _WHITE,
    SNOW: _WHITE,
    GRASS: (80.0, 140.0, 55.0),
    SAND: (205.0, 185.0, 140.0),
    ROAD: (120.0, 118.0, 115.0),
    TREE: (45.0, 95.0, 45.0),
    POLE: (60.0, 45.0, 40.0),
}

# Colours used to visualise label maps (CLI); index 0 = unlabelled.
SYNTHETIC_LABEL_PALETTE: np.ndarray = np.array(
    [
        (0, 0, 0),
        (135, 206, 250),
        (0, 60, 180),
        (255, 255, 255),
        (200, 120, 255),
        (60, 200, 60),
        (240, 220, 130),
        (128, 64, 128),
        (0, 100, 0),
        (255, 255, 0),
        (255, 60, 0),
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


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation by shifts: the margins that keep look-alike regions from touching."""
    out = mask.copy()
    size = mask.shape[0]
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            if dr == 0 and dc == 0:
                continue
            src_r, dst_r = slice(max(-dr, 0), size - max(dr, 0)), slice(max(dr, 0), size - max(-dr, 0))
            src_c, dst_c = slice(max(-dc, 0), size - max(dc, 0)), slice(max(dc, 0), size - max(-dc, 0))
            out[dst_r, dst_c] |= mask[src_r, src_c]
    return out


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


def _shade(colour: np.ndarray, luminance: np.ndarray) -> np.ndarray:
    """Add a (zero-mean) luminance pattern to a colour; keeps the region's mean colour."""
    return colour[None, None, :] + luminance[:, :, None]


def _open_water_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Sky AND water: soft haze plus grain, isotropic and independent of the horizon, so that no patch of either
    # says which one it is (no gradient towards the horizon, no ripples).
    haze = _value_noise(rng, canvas.size, 10 * canvas.unit)
    return _shade(colour, 9.0 * haze + 4.0 * _white_noise(rng, canvas.size))


def _fluffy_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Cloud AND snow: the same bright blotches; only the surroundings (sky or land) set the class.
    blotches = _value_noise(rng, canvas.size, 5 * canvas.unit)
    return _shade(colour, 12.0 * blotches + 4.0 * _white_noise(rng, canvas.size))


def _grass_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # High-frequency noise, slightly elongated vertically like blades.
    noise = _white_noise(rng, canvas.size)
    blades = (noise + np.roll(noise, 1, axis=0) + np.roll(noise, 2, axis=0)) / np.sqrt(3.0)
    return _shade(colour, 24.0 * blades)


def _speckle_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Sand: sparse dark and bright grains on a soft background.
    u = rng.random((canvas.size, canvas.size), dtype=np.float32)
    grains = np.where(u < 0.08, np.float32(-45.0), np.where(u > 0.93, np.float32(30.0), np.float32(0.0)))
    return _shade(colour, grains + 5.0 * _white_noise(rng, canvas.size) + 3.5)


def _asphalt_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    # Road: fine i.i.d. grain and a dashed centre-free surface, no structure at larger scales.
    return _shade(colour, 14.0 * _white_noise(rng, canvas.size))


def _foliage_texture(rng: np.random.Generator, canvas: _Canvas, colour: np.ndarray) -> np.ndarray:
    clumps = _value_noise(rng, canvas.size, 4 * canvas.unit)
    return _shade(colour, 22.0 * clumps + 6.0 * _white_noise(rng, canvas.size))


_TextureFn = Callable[[np.random.Generator, _Canvas, np.ndarray], np.ndarray]
_STUFF_TEXTURES: dict[int, _TextureFn] = {
    SKY: _open_water_texture,
    WATER: _open_water_texture,
    CLOUD: _fluffy_texture,
    SNOW: _fluffy_texture,
    GRASS: _grass_texture,
    SAND: _speckle_texture,
    ROAD: _asphalt_texture,
    TREE: _foliage_texture,
}
# What people and poles stand on, and what ponds and snow lie in.
_GROUND_CLASSES: tuple[int, ...] = (GRASS, SAND, ROAD)


def _paint_stuff(rng: np.random.Generator, canvas: _Canvas, mask: np.ndarray, class_id: int) -> None:
    if mask.any():
        canvas.paint(mask, _STUFF_TEXTURES[class_id](rng, canvas, _jittered_colour(rng, class_id)), class_id)


def _class_mask(canvas: _Canvas, class_ids: Sequence[int]) -> np.ndarray:
    return np.isin(canvas.annotation, np.asarray(class_ids, dtype=np.uint8) + 1)


# ---------------------------------------------------------------------------
# Layout: horizon, shore, large regions (one placer per region type)
# ---------------------------------------------------------------------------


def _wavy_line(rng: np.random.Generator, size: int, level: float, amplitude: float) -> np.ndarray:
    cols = np.arange(size, dtype=np.float32) + 0.5
    wavelength = rng.uniform(0.3, 1.0) * size
    return level + amplitude * np.sin(2 * np.pi * cols / wavelength + rng.uniform(0, 2 * np.pi))


def _horizon_at(canvas: _Canvas, x: float) -> float:
    return float(canvas.horizon[min(max(int(x), 0), canvas.size - 1)])


def _random_point_in(rng: np.random.Generator, canvas: _Canvas, mask: np.ndarray) -> tuple[float, float] | None:
    """A random pixel centre ``(x, y)`` inside ``mask``, ``None`` when it is empty."""
    candidates = np.flatnonzero(mask)
    if not candidates.size:
        return None
    y, x = np.divmod(int(candidates[rng.integers(candidates.size)]), canvas.size)
    return x + 0.5, y + 0.5


def _place_tree(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    # Trees stand on the horizon: part in the sky, part over the land or shore.
    s = canvas.size
    cx = rng.uniform(0, s)
    cy = _horizon_at(canvas, cx) - rng.uniform(0.0, 0.08) * s
    r = rng.uniform(0.07, 0.16) * s
    return _blob_mask(rng, canvas, cx, cy, r, r * rng.uniform(0.8, 1.3), rng.uniform(0.15, 0.3))


def _place_road(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    s = canvas.size
    vanishing_x = rng.uniform(0.2, 0.8) * s
    top = _horizon_at(canvas, vanishing_x) + rng.uniform(0.02, 0.08) * s
    half_top = rng.uniform(0.01, 0.04) * s
    centre_bottom = vanishing_x + rng.uniform(-0.4, 0.4) * s
    half_bottom = rng.uniform(0.12, 0.3) * s
    xs = [vanishing_x - half_top, vanishing_x + half_top, centre_bottom + half_bottom, centre_bottom - half_bottom]
    return _polygon_mask(canvas, xs, [top, top, s + 1.0, s + 1.0]) & canvas.below_horizon()


def _place_ground_patch(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    point = _random_point_in(rng, canvas, canvas.below_horizon())
    if point is None:
        return np.zeros((canvas.size, canvas.size), dtype=bool)
    rx = rng.uniform(0.1, 0.3) * canvas.size
    return _star_polygon_mask(rng, canvas, *point, rx, rx * rng.uniform(0.35, 0.8)) & canvas.below_horizon()


def _enclosed_blob(
    rng: np.random.Generator, canvas: _Canvas, inside: np.ndarray, radius: tuple[float, float], flatness: float
) -> np.ndarray:
    """An irregular blob centred in ``inside`` and clipped to it, kept a margin away from everything else.

    The margin is what makes a context class decidable at all: a pond must never touch the sky nor a cloud the
    land, or the boundary between two look-alike regions would be invisible.
    """
    point = _random_point_in(rng, canvas, inside)
    if point is None:
        return np.zeros((canvas.size, canvas.size), dtype=bool)
    rx = rng.uniform(*radius) * canvas.size
    blob = _blob_mask(rng, canvas, *point, rx, rx * rng.uniform(flatness, 1.0), rng.uniform(0.1, 0.25))
    margin = max(2, int(round(3 * canvas.unit)))
    return blob & ~_dilate(~inside, margin)


def _paint_pond(rng: np.random.Generator, canvas: _Canvas) -> None:
    # Water enclosed by land: looks exactly like the sky above the horizon.
    land = _class_mask(canvas, _GROUND_CLASSES)
    _paint_stuff(rng, canvas, _enclosed_blob(rng, canvas, land, (0.08, 0.2), 0.35), WATER)


def _paint_snow(rng: np.random.Generator, canvas: _Canvas, under: Sequence[int] = _GROUND_CLASSES) -> None:
    # Snow lies on land, or floats on water as ice, never next to the sky: it looks exactly like a cloud.
    _paint_stuff(rng, canvas, _enclosed_blob(rng, canvas, _class_mask(canvas, under), (0.08, 0.18), 0.4), SNOW)


def _paint_cloud(rng: np.random.Generator, canvas: _Canvas) -> None:
    # Clouds float in the open sky, never touching the horizon, a tree or a pole.
    sky = _class_mask(canvas, (SKY,))
    _paint_stuff(rng, canvas, _enclosed_blob(rng, canvas, sky, (0.1, 0.22), 0.3), CLOUD)


def _paint_sea(rng: np.random.Generator, canvas: _Canvas, difficulty: float) -> None:
    """Sea scene: a band of shore (beach, meadow or tree line) along the horizon, open water below it.

    The band is the only thing that says which side of it the blue is on, often several tokens away.
    """
    s = canvas.size
    band = rng.uniform(0.06, 0.13) * s
    shore_bottom = _wavy_line(rng, s, 0.0, 0.015 * s)[None, :] + canvas.horizon[None, :] + band
    below = canvas.below_horizon()
    _paint_stuff(rng, canvas, below & (canvas.rows < shore_bottom), int(rng.choice((SAND, GRASS, TREE))))
    _paint_stuff(rng, canvas, canvas.rows >= shore_bottom, WATER)
    if rng.uniform() < 0.6 * difficulty:
        # A beach in the foreground, far from the horizon, so that water lies between two land bands.
        beach_top = _wavy_line(rng, s, rng.uniform(0.82, 0.95) * s, 0.02 * s)[None, :]
        _paint_stuff(rng, canvas, (canvas.rows >= beach_top) & (canvas.rows >= shore_bottom + band), SAND)
    # Ice floes: white on blue, like clouds; which blue it is (sky or water) decides the class.
    for _ in range(int(rng.integers(1, 3 + int(round(2 * difficulty))))):
        _paint_snow(rng, canvas, under=(WATER,))


def _grow_channel(
    rng: np.random.Generator,
    canvas: _Canvas,
    start: tuple[float, float],
    top: float,
    forbidden: np.ndarray,
    forbidden_first: np.ndarray,
    thickness: int,
) -> np.ndarray | None:
    """A meandering Manhattan channel from ``start`` upwards and sideways, never entering ``forbidden``.

    Long sideways runs make the channel's column say nothing about where it meets the sea.
    """
    s, unit = canvas.size, canvas.unit
    x, y = start
    mask = np.zeros((s, s), dtype=bool)
    # First leg: straight up, out of the sea (or off the gap) into the land, up to ``top``.
    mask |= _polyline_mask(canvas, *_segment_points(x, y, x, top), thickness)
    if (mask & forbidden_first).any():
        return None
    y = top
    legs, direction = 0, int(rng.choice((-1, 1)))
    for leg in range(int(rng.integers(4, 9))):
        for _ in range(4):
            if leg % 2 == 0:
                nx, ny = x + direction * rng.uniform(20, 55) * unit, y
            else:
                nx, ny = x, y - rng.uniform(10, 20) * unit * (1 if rng.uniform() < 0.75 else -1)
            segment = _polyline_mask(canvas, *_segment_points(x, y, nx, ny), thickness)
            # The segment may touch its own channel only where it starts.
            fresh = segment & ~_dilate(mask, 1)
            if 0 < nx < s and 0 < ny < s and not (fresh & forbidden).any():
                mask |= segment
                x, y = nx, ny
                legs += 1
                break
            direction = -direction
        else:
            break
        if leg % 2 == 0:
            direction = int(rng.choice((-1, 1))) if rng.uniform() < 0.5 else direction
    return mask if legs >= 3 else None


def _paint_estuary(rng: np.random.Generator, canvas: _Canvas, difficulty: float) -> None:
    """Estuary scene: land above a sea band, crossed by meandering channels of the very same blue.

    Every channel is ``water``, like the sea: blue below the horizon is water. Some reach the sea, others end a
    strip of land short of it (the same draw once made those a separate class, ``lake``, which no head learned
    in a quick start's budget: following a channel back to the sea is a chain of looks). Their tokens, far from
    the sea and the horizon, are told from the sky only by the land around them.
    """
    s, unit = canvas.size, canvas.unit
    _paint_stuff(rng, canvas, canvas.below_horizon(), int(rng.choice((GRASS, SAND, GRASS))))
    sea_top = _wavy_line(rng, s, rng.uniform(0.78, 0.9) * s, 0.01 * s)
    sea = canvas.rows >= sea_top[None, :]
    _paint_stuff(rng, canvas, sea, WATER)
    thickness = max(3, int(round(rng.uniform(12, 16) * unit)))
    margin = int(round(12 * unit)) + thickness // 2
    # Channels keep a token of land from the sky, the image border, the sea (but where they join it) and each other.
    border = np.zeros((s, s), dtype=bool)
    edge = thickness // 2 + 1
    border[:edge] = border[:, :edge] = border[:, -edge:] = True
    forbidden = _dilate(~canvas.below_horizon(), margin) | _dilate(sea, margin) | border
    others = np.zeros((s, s), dtype=bool)  # margins around channels already drawn
    for _ in range(int(rng.integers(2, 5))):
        x = rng.uniform(0.1, 0.9) * s
        connected = rng.uniform() < 0.5  # reaches the sea, or ends a strip of land short of it
        shore = float(sea_top[min(int(x), s - 1)])
        y = shore + 3 * unit if connected else shore - thickness // 2 - rng.uniform(12, 20) * unit
        top = shore - margin - rng.uniform(3, 12) * unit
        channel = _grow_channel(rng, canvas, (x, y), min(top, y - 4 * unit), forbidden, others, thickness)
        if channel is None:
            continue
        _paint_stuff(rng, canvas, channel & ~sea, WATER)
        forbidden |= _dilate(channel, margin)
        others |= _dilate(channel, margin)


def _paint_land(rng: np.random.Generator, canvas: _Canvas, difficulty: float) -> None:
    """Land scene: one ground class below the horizon, patches of other ground, a road, ponds and snow."""
    _paint_stuff(rng, canvas, canvas.below_horizon(), int(rng.choice((GRASS, SAND, GRASS, ROAD))))
    for _ in range(int(rng.integers(0, int(round(3 * difficulty)) + 1))):
        if rng.uniform() < 0.4:
            _paint_stuff(rng, canvas, _place_road(rng, canvas), ROAD)
        else:
            _paint_stuff(rng, canvas, _place_ground_patch(rng, canvas), int(rng.choice((GRASS, SAND))))
    # Ponds and snow are the point of land scenes: most have one, cluttered ones several.
    for _ in range(int(rng.integers(1, 3 + int(round(2 * difficulty))))):
        (_paint_pond if rng.uniform() < 0.5 else _paint_snow)(rng, canvas)


# ---------------------------------------------------------------------------
# Small objects: they paint directly and return nothing.
# ---------------------------------------------------------------------------


def _flat(rng: np.random.Generator, colour: Sequence[float], spread: float = 8.0) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) + rng.normal(0, spread, 3).astype(np.float32)


def _draw_pole(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Thin, nearly vertical dark bar standing on the land, reaching up into the sky."""
    s = canvas.size
    point = _random_point_in(rng, canvas, _class_mask(canvas, _GROUND_CLASSES))
    if point is None:
        return
    x, base = point
    top = base - rng.uniform(0.25, 0.6) * s
    top_x = x + rng.uniform(-0.03, 0.03) * s
    thickness = max(2, int(round(rng.uniform(4.0, 6.5) * canvas.unit)))
    mask = _polyline_mask(canvas, *_segment_points(x, base, top_x, top), thickness)
    canvas.paint(mask, _flat(rng, _CLASS_BASE_COLOURS[POLE], 10.0), POLE)


_CLOTHING_COLOURS = ((200, 30, 40), (230, 120, 20), (130, 40, 170), (230, 200, 20), (20, 30, 120))


def _draw_person(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Body ellipse + head disk on the land; the size follows perspective (smaller near the horizon)."""
    s = canvas.size
    point = _random_point_in(rng, canvas, _class_mask(canvas, _GROUND_CLASSES))
    if point is None:
        return
    x, foot = point
    depth = (foot - _horizon_at(canvas, x)) / max(s - _horizon_at(canvas, x), 1.0)
    height = (24.0 + 28.0 * depth) * canvas.unit * rng.uniform(0.85, 1.2)
    body_h, body_w = 0.75 * height, 0.4 * height
    head_r = max(1.0, 0.14 * height)
    body = _ellipse_mask(canvas, x, foot - 0.5 * body_h, max(1.0, 0.5 * body_w), max(1.0, 0.5 * body_h))
    head = _ellipse_mask(canvas, x, foot - body_h - 0.8 * head_r, head_r + 0.3, head_r + 0.3)
    # Saturated clothing no stuff class wears: a cue a short training picks up, the shape doing the rest.
    clothing = _flat(rng, _CLOTHING_COLOURS[rng.integers(len(_CLOTHING_COLOURS))], 12.0)
    canvas.paint(body, clothing, PERSON)
    canvas.paint(head, _flat(rng, (200.0, 160.0, 130.0), 20.0), PERSON)


def _draw_unlabelled_clutter(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Odd-coloured textured blob left unlabelled, like ADE20K's "other" pixels (ignored in the loss)."""
    cx, cy = rng.uniform(0, canvas.size, 2)
    r = rng.uniform(3, 7) * canvas.unit
    mask = _blob_mask(rng, canvas, cx, cy, r, r * rng.uniform(0.5, 1.5), 0.3)
    texture = _shade(rng.uniform(30, 225, 3).astype(np.float32), 20.0 * _white_noise(rng, canvas.size))
    canvas.paint(mask, texture, None)


# ---------------------------------------------------------------------------
# Scene assembly
# ---------------------------------------------------------------------------

# Share of sea scenes (sky | shore | water); the others are land scenes with ponds and snow.
_SEA_PROBABILITY = 0.35
_ESTUARY_PROBABILITY = 0.35


def _apply_camera(rng: np.random.Generator, image: np.ndarray, difficulty: float) -> np.ndarray:
    """Global brightness / contrast jitter and sensor noise, so absolute colour is unreliable."""
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-15, 15)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(2.0 + 3.0 * difficulty)
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
    scene_kind = rng.uniform()
    # The horizon wanders over most of the height, so that a row alone does not say sky or water; estuary scenes
    # look down on the land from high above (a high horizon) to leave room for their channels.
    level = rng.uniform(0.05, 0.2) * s if scene_kind < _ESTUARY_PROBABILITY else rng.uniform(0.1, 0.85) * s
    canvas = _Canvas(
        image=np.zeros((s, s, 3), dtype=np.float32),
        annotation=np.zeros((s, s), dtype=np.uint8),
        rows=(np.arange(s, dtype=np.float32) + 0.5)[:, None],
        cols=(np.arange(s, dtype=np.float32) + 0.5)[None, :],
        unit=s / _REFERENCE_SIZE,
        horizon=_wavy_line(rng, s, level, difficulty * 0.05 * s),
    )
    _paint_stuff(rng, canvas, ~canvas.below_horizon(), SKY)
    if scene_kind < _ESTUARY_PROBABILITY:
        _paint_estuary(rng, canvas, difficulty)
    elif scene_kind < _ESTUARY_PROBABILITY + _SEA_PROBABILITY:
        _paint_sea(rng, canvas, difficulty)
    else:
        _paint_land(rng, canvas, difficulty)
    for _ in range(int(rng.integers(0, 1 + int(round(3 * difficulty))))):
        _paint_stuff(rng, canvas, _place_tree(rng, canvas), TREE)
    for _ in range(int(rng.integers(1, 2 + int(round(2 * difficulty))))):
        _paint_cloud(rng, canvas)
    for _ in range(int(rng.poisson(1.5 + 4.0 * difficulty))):
        (_draw_pole if rng.uniform() < 0.5 else _draw_person)(rng, canvas)
    if rng.uniform() < 0.1 + 0.4 * difficulty:
        for _ in range(int(rng.integers(1, 3))):
            _draw_unlabelled_clutter(rng, canvas)
    return _apply_camera(rng, canvas.image, difficulty), canvas.annotation, difficulty


def render_synthetic_scene(index: int, image_size: int = 128, seed: int = 0, split: str = "train") -> dict[str, Any]:
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


def patch_features(image: np.ndarray, annotation: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour and texture statistics of the patches that lie wholly inside one class: what a token sees of itself.

    Returns ``(features (N, 11), class ids (N,))`` for the ``patch_size`` x ``patch_size`` patches of the token grid
    whose pixels all carry one label: per-channel mean and std, mean absolute luminance difference along x and y
    (fine texture), spread of the four quarter means and of the luminance (coarse texture).
    """
    size = (image.shape[0] // patch_size) * patch_size
    grid = size // patch_size

    def tiles(values: np.ndarray) -> np.ndarray:  # (S, S, ...) -> (grid * grid, patch, patch, ...)
        values = values[:size, :size].reshape(grid, patch_size, grid, patch_size, *values.shape[2:])
        return np.swapaxes(values, 1, 2).reshape(grid * grid, patch_size, patch_size, *values.shape[4:])

    labels = tiles(annotation)
    pure = (labels == labels[:, :1, :1]).all(axis=(1, 2)) & (labels[:, 0, 0] != UNLABELLED_VALUE)
    pixels = tiles(image.astype(np.float32))[pure]
    luminance = pixels.mean(axis=-1)
    half = patch_size // 2
    quarters = luminance.reshape(-1, 2, half, 2, half).mean(axis=(2, 4)).reshape(-1, 4)
    features = np.concatenate(
        [
            pixels.mean(axis=(1, 2)),
            pixels.std(axis=(1, 2)),
            np.abs(np.diff(luminance, axis=2)).mean(axis=(1, 2))[:, None],
            np.abs(np.diff(luminance, axis=1)).mean(axis=(1, 2))[:, None],
            quarters.std(axis=1)[:, None],
            luminance.std(axis=(1, 2))[:, None],
        ],
        axis=1,
    )
    return features, labels[pure, 0, 0].astype(np.int64) - 1


def patch_classifier_accuracy(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], class_a: int, class_b: int, patch_size: int = 8, seed: int = 0
) -> float:
    """How well a token's own patch tells ``class_a`` from ``class_b``: held-out balanced accuracy of a logistic
    regression on quadratic features of :func:`patch_features`, trained on the pure patches of the first half of
    ``samples`` (``(image, annotation)`` pairs) and tested on the second half's. Splitting by scene, not by patch,
    keeps the classifier from recognising a region it has already seen by its jittered colour. 0.5 is chance;
    ``nan`` with fewer than 5 patches of a class in a half."""
    halves = []
    for part in (samples[: len(samples) // 2], samples[len(samples) // 2 :]):
        features, labels = zip(*(patch_features(image, annotation, patch_size) for image, annotation in part))
        halves.append((np.concatenate(features), np.concatenate(labels)))
    rng = np.random.default_rng(seed)
    picked = []
    for features, labels in halves:
        indices = [rng.permutation(np.flatnonzero(labels == class_id)) for class_id in (class_a, class_b)]
        count = min(len(index) for index in indices)
        if count < 5:
            return float("nan")
        # As many patches of both classes in each half: 0.5 stays chance.
        picked.append(np.concatenate([index[:count] for index in indices]))
    features = np.concatenate([halves[0][0][picked[0]], halves[1][0][picked[1]]])
    target = (np.concatenate([halves[0][1][picked[0]], halves[1][1][picked[1]]]) == class_b).astype(np.float64)
    train, test = np.arange(len(picked[0])), np.arange(len(picked[0]), len(target))
    x = np.concatenate([features, features**2], axis=1)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    x = (x - mean) / std
    weights, bias = np.zeros(x.shape[1]), 0.0
    for _ in range(500):  # plain gradient descent: the problem is small and convex
        error = 1.0 / (1.0 + np.exp(-(x[train] @ weights + bias))) - target[train]
        weights -= 0.5 * (x[train].T @ error / len(train) + 1e-3 * weights)
        bias -= 0.5 * float(error.mean())
    predicted = (x[test] @ weights + bias) > 0
    return float((predicted == target[test].astype(bool)).mean())


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
    rows = [
        np.full((swatch, swatch, 3), SYNTHETIC_LABEL_PALETTE[class_id + 1], dtype=np.uint8)
        for class_id in SYNTHETIC_ID2LABEL
    ]
    strip = np.concatenate(rows, axis=0)
    legend = Image.fromarray(strip)
    return legend.resize((legend.width * zoom, legend.height * zoom), Image.NEAREST)


__all__ = [
    "CONTEXT_CLASS_PAIRS",
    "NUM_SYNTHETIC_CLASSES",
    "SMALL_OBJECT_CLASS_IDS",
    "SYNTHETIC_ID2LABEL",
    "SYNTHETIC_LABEL2ID",
    "SYNTHETIC_LABEL_PALETTE",
    "SYNTHETIC_SCENES_VERSION",
    "UNLABELLED_VALUE",
    "colourise_annotation",
    "dataset_statistics",
    "format_statistics_markdown",
    "make_synthetic_scenes",
    "patch_classifier_accuracy",
    "patch_features",
    "render_synthetic_scene",
    "legend_image",
    "render_synthetic_scene_arrays",
    "scene_preview",
    "scene_difficulty",
    "synthetic_dataset_dict",
    "synthetic_scene_features",
]
