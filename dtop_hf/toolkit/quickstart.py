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
"""The quick start's run sizes and sample pictures: `examples/quickstart.py` trains, prunes, evaluates and draws a
small DToP on the built-in scenes at one of these sizes.

"default": the "quickstart" model size of [`~toolkit.presets.MODEL_SIZES`] (a 6-layer width-128 ViT, patch 8, ATM
heads of width 64 after layers 3, 4 and 6; 1.9M parameters) on 96 px scenes, a 12x12 token grid: about 0.16 s per
training step on two CPU cores. "tiny": the "tiny" size (a 4-layer width-32 ViT) on 32 px scenes, for CI.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from .data.synthetic_scenes import make_synthetic_scenes
from .inference.images import open_image


TINY_ENVIRONMENT_VARIABLE = "DTOP_QUICKSTART_TINY"
RUN_SIZES = {
    "default": {
        "image_size": 96,
        "train_samples": 1000,
        "validation_samples": 100,
        "base_steps": 1000,
        "prune_steps": 200,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-4,
        "head_lr_multiplier": 3.0,
        "model_size": "quickstart",
        "sweep_thresholds": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
    },
    "tiny": {
        "image_size": 32,
        "train_samples": 16,
        "validation_samples": 6,
        "base_steps": 3,
        "prune_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "head_lr_multiplier": 1.0,
        "model_size": "tiny",
        "sweep_thresholds": (1.0, 0.5),
    },
}


def tiny_from_environment() -> bool:
    """Whether `DTOP_QUICKSTART_TINY` asks for the tiny size (1, true, yes, on)."""
    return os.environ.get(TINY_ENVIRONMENT_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def run_size(tiny: bool, given: Mapping[str, Any] | None = None) -> dict:
    """The run's settings: the values `given` (None = not given; other keys ignored) over the tiny or the default
    size's."""
    size, given = RUN_SIZES["tiny" if tiny else "default"], given or {}
    return {name: default if given.get(name) is None else given[name] for name, default in size.items()}


def sample_images(photo: str | None, image_size: int) -> dict[str, Image.Image]:
    """Pictures to segment at the end, by name: `photo`, else scikit-image's astronaut (a real photo, when
    scikit-image is installed), and always one validation scene of the built-in data set."""
    images = {}
    if photo is not None:
        images[Path(photo).stem] = open_image(photo)
    else:
        try:
            from skimage import data as skimage_data

            images["astronaut"] = Image.fromarray(skimage_data.astronaut())
        except ImportError:
            print("scikit-image is not installed: no photo to segment (pass --photo, or pip install scikit-image)")
    scene = make_synthetic_scenes(1, image_size=image_size, seed=0, split="validation")[0]["image"]
    images["validation_scene"] = scene.convert("RGB")
    return images


__all__ = ["RUN_SIZES", "TINY_ENVIRONMENT_VARIABLE", "run_size", "sample_images", "tiny_from_environment"]
