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
"""Image files as people have them: find them in folders, open any mode upright as RGB, name their outputs."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


# Suffixes looked for inside a folder (explicitly named files are always tried, whatever their suffix).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Background that transparent pixels are composited onto: the models were trained on opaque photos.
TRANSPARENT_BACKGROUND = (255, 255, 255)
# EXIF orientations that turn the stored pixels by 90 degrees (width and height swap once upright).
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
EXIF_ORIENTATION_TAG = 0x0112


def find_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named on the command line (whatever their suffix) and the image files of named folders (sorted).

    Returns:
        The paths to try, and a message for each input that does not exist or is an empty folder.
    """
    paths, problems = [], []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                child for child in path.iterdir() if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append(f"{text}: folder without image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            problems.append(f"{text}: no such file or folder")
    return paths, problems


def upright_size(path: str | Path) -> tuple[int, int]:
    """`(height, width)` of the image once EXIF rotation is applied, read from the file header only.

    Raises:
        OSError (`PIL.UnidentifiedImageError` included): not an image.
    """
    with Image.open(path) as opened:
        width, height = opened.size
        transposed = opened.getexif().get(EXIF_ORIENTATION_TAG) in TRANSPOSING_ORIENTATIONS
    return (width, height) if transposed else (height, width)


def open_image(path: str | Path) -> Image.Image:
    """An upright RGB image: EXIF rotation applied, grey / palette / 16-bit expanded, transparency composited on white.

    Raises:
        OSError (`PIL.UnidentifiedImageError` included): not an image, or a truncated / corrupt one.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # a copy, decoded fully: corrupt data raises here
        image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float grey: stretch to 8 bits (convert("RGB") would clip everything above 255 to white).
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        image = Image.fromarray(np.uint8(np.round(255 * (values - low) / max(high - low, 1e-12))))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, TRANSPARENT_BACKGROUND)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def unique_names(paths: list[Path]) -> list[str]:
    """Each file's stem, made unique among `paths` in order (`photo`, `photo_2`, ...): the same list gives the same
    names in every process of a run."""
    names, used = [], set()
    for path in paths:
        name, index = path.stem, 1
        while name in used:
            index += 1
            name = f"{path.stem}_{index}"
        used.add(name)
        names.append(name)
    return names


__all__ = ["IMAGE_SUFFIXES", "find_images", "open_image", "unique_names", "upright_size"]
