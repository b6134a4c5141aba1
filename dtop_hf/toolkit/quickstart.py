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
"""The quick start's run sizes (`RUN_SIZES`: every default of a run, in one place), sample pictures and what its
final table shows of the exit diagnostics: `examples/quickstart.py` trains, prunes, evaluates and draws a
small DToP on the built-in scenes at one of these sizes.

"default": the "quickstart" model size of [`~toolkit.presets.MODEL_SIZES`] (an 8-layer width-128 ViT, patch 8, ATM
heads of width 64 after layers 1, 4 and 8; 2.3M parameters) on 96 px scenes, a 12x12 token grid: about 0.16 s per
training step on two CPU cores. Learning rate 1e-3: at 3e-4 the deep layers are still behind the first head after
1000 steps, and the depth profile comes out flat or inverted. "tiny": the "tiny" size (a 4-layer width-32 ViT) on
32 px scenes, for CI.
"""

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image

from ..image_processing_dtop import DToPImageProcessor
from .arguments import DataArguments
from .data.synthetic_scenes import make_synthetic_scenes
from .evaluation.calibration import THRESHOLD, format_threshold, setting_key, setting_of
from .evaluation.report import (
    boundary_table,
    calibrated,
    evaluated_settings,
    format_depth_profiles,
    format_percent,
)
from .evaluation.sweep import evaluate_model_on_data
from .inference.images import open_image
from .inference.loading import load_model_and_processor
from .inference.visualization import head_names


TINY_ENVIRONMENT_VARIABLE = "DTOP_QUICKSTART_TINY"
# The pruning fine-tune's exit threshold, kept in the pruned model. Lower than ViT-B's 0.9: a model trained for
# minutes is less sure of itself, and its calibrated thresholds land near 0.7-0.8; fine-tuned at 0.9, its later
# layers never learn to work without the context those thresholds remove, and calibrated settings lose 2-3x more
# mIoU on new scenes than on the calibration scenes (docs/builtin_benchmark.md).
PRUNING_THRESHOLD = 0.7
RUN_SIZES = {
    "default": {
        "image_size": 96,
        "train_samples": 1000,
        "validation_samples": 200,
        "base_steps": 1000,
        "prune_steps": 200,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
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


def where_exits_land(
    summary: dict,
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    accelerator: Accelerator,
    data_args: DataArguments,
    run: Mapping[str, Any],
) -> dict:
    """What the quick start's final table shows of the exit diagnostics: the results at the model's threshold and
    the calibrated ones (measured again only when the sweep has not: the tiny sweep has no 0.7), the share of
    boundary tokens among all tokens, and the depth profiles of the pruned model and of the base model (one
    unpruned pass of `<output_dir>/base`).

    Args:
        summary: the pruned model's evaluation ([`~toolkit.evaluation.sweep.evaluate_model_on_data`], with its
            diagnostics) on `data_args`' validation scenes.
        run: the run's settings (`exit_threshold`, `output_dir`, `per_device_eval_batch_size`).
    """
    num_heads = len(model.config.out_indices) - 1
    shown = {f"{format_threshold(run['exit_threshold'])} (the model's)": THRESHOLD.rule(run["exit_threshold"])}
    if calibrated(summary):
        chosen = setting_of(summary["calibration"]["chosen"])
        shown[f"{format_threshold(chosen)} (calibrated)"] = THRESHOLD.rule(chosen)
    measured = {setting_key(result, num_heads): result for result in evaluated_settings(summary, num_heads)}
    evaluate = partial(
        evaluate_model_on_data, accelerator=accelerator, data_args=data_args,
        batch_size=run["per_device_eval_batch_size"],
    )  # fmt: skip
    missing = [rule for rule in shown.values() if setting_key(rule, num_heads) not in measured]
    if missing:
        extra = evaluate(model, image_processor, sweep=missing, model_name=summary["model"])[0]
        measured.update((setting_key(result, num_heads), result) for result in extra["results"])
    base_dir = Path(run["output_dir"]) / "base"
    base_model, base_processor = load_model_and_processor(str(base_dir), accelerator.device)
    base = evaluate(base_model, base_processor, sweep=[1.0], model_name=str(base_dir))[0]
    depth = {"base model": base["diagnostics"]["depth_mean_iou"]}
    depth["pruned model"] = summary["diagnostics"]["depth_mean_iou"]
    return {
        "rows": [(label, measured[setting_key(rule, num_heads)]) for label, rule in shown.items()],
        "depth_profiles": depth,
        "boundary_share": summary["diagnostics"]["boundary_share"],
        "stage_names": head_names(model.config.out_indices),
    }


def format_exit_landing(landing: dict) -> str:
    """[`where_exits_land`] as the final table's lines: boundary tokens per head, then the depth profiles."""
    names = landing["stage_names"]
    return (
        "Where exits land on the validation scenes: the share of boundary tokens (%) among the tokens each head "
        f"finalised, against {format_percent(landing['boundary_share'])}% among all tokens (easy tokens should "
        "exit early, boundary tokens late):\n\n"
        f"{boundary_table(landing['rows'], names)}\n\n"
        f"Depth profile, each head's own mIoU (%) over all tokens, unpruned: "
        f"{format_depth_profiles(landing['depth_profiles'], names)}"
    )


__all__ = [
    "RUN_SIZES",
    "TINY_ENVIRONMENT_VARIABLE",
    "format_exit_landing",
    "run_size",
    "sample_images",
    "tiny_from_environment",
    "where_exits_land",
]
