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
"""The one loader of a DToP model and its image processor, from a folder or a Hub id, with errors that say how to
fix what is wrong."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from ...image_processing_dtop import DToPImageProcessor


def check_model_folder(model_name_or_path: str, argument: str = "model_name_or_path") -> None:
    """Raise `ValueError` when `model_name_or_path` is a file, or a folder without `config.json` (listing the model
    folders inside it); anything else (a model folder, a Hub id) passes."""
    folder = Path(model_name_or_path)
    if folder.is_file():
        raise ValueError(
            f"`{argument}` {model_name_or_path!r} is a file: pass the model folder (the one holding config.json and "
            "model.safetensors) or a Hub id; the images to segment come before `--model_name_or_path`."
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        candidates = sorted(str(path.parent) for path in folder.glob("*/config.json"))
        hint = f" Model folders inside it: {candidates}." if candidates else ""
        raise ValueError(
            f"`{argument}` {model_name_or_path!r} is a folder without config.json: pass the folder that holds "
            f"config.json and model.safetensors (e.g. outputs/quickstart/model).{hint}"
        )


def load_dtop_config(model_name_or_path: str, argument: str = "model_name_or_path"):
    """The folder's or Hub id's config, which must be a DToP one (`model_type` "dtop")."""
    check_model_folder(model_name_or_path, argument)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a model from `{argument}` {model_name_or_path!r}: it is neither a local folder nor a "
            "reachable Hub id. Pass a folder written by examples/finetune.py or examples/quickstart.py, or a Hub id "
            f"(with network access). ({error})"
        ) from error
    if config.model_type != "dtop":
        raise ValueError(
            f"`{argument}` {model_name_or_path!r} is a {config.model_type!r} model; a DToP model (model_type "
            "'dtop') is needed here. Convert or fine-tune one first (see the README)."
        )
    return config


def load_image_processor(model_name_or_path: str, config, argument: str = "model_name_or_path") -> DToPImageProcessor:
    """The processor saved next to the model; a missing one is an error whose last line is a command that saves
    dtop-hf's defaults at the model's input size (no silent fallback: the normalisation must be the trained one)."""
    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path, trust_remote_code=True)
    except OSError as error:
        size, stride = config.image_size, 2 * config.image_size // 3  # stride 341 for 512, the official test stride
        raise ValueError(
            f"`{argument}` {model_name_or_path!r} has no preprocessor_config.json (the image processor: resize and "
            "normalisation). Save the one the model was trained with next to it, e.g. with the defaults of "
            f"dtop-hf at the model's input size:\n  python -c \"from dtop_hf import DToPImageProcessor; "
            f"DToPImageProcessor(size={{'height': {size}, 'width': {size}}}, crop_size={{'height': {size}, "
            f"'width': {size}}}, stride={{'height': {stride}, 'width': {stride}}}).save_pretrained("
            f"'{model_name_or_path}')\""
        ) from error


def load_model_and_processor(
    model_name_or_path: str, device: str | torch.device = "cpu", argument: str = "model_name_or_path"
) -> tuple[torch.nn.Module, DToPImageProcessor]:
    """A DToP segmentation model (eval mode, on `device`) and its image processor, from a folder or a Hub id.

    `trust_remote_code=True` lets a Hub checkpoint's own code load; with `dtop_hf` imported the local classes are
    used anyway. For slide mode, pass the processor through
    [`~toolkit.inference.segmentation.sliding_window_processor`].

    Args:
        model_name_or_path: a folder written by `save_pretrained` (config.json, weights, preprocessor_config.json)
            or a Hub id.
        device: where the model goes.
        argument: how the caller names the value in its errors (a script passes its flag).

    Raises:
        ValueError: the path is a file or a folder without config.json, cannot be loaded, is not a DToP model, or
            has no image processor; each message says how to fix it.
    """
    config = load_dtop_config(model_name_or_path, argument)
    image_processor = load_image_processor(model_name_or_path, config, argument)
    model = AutoModelForSemanticSegmentation.from_pretrained(model_name_or_path, trust_remote_code=True)
    return model.to(device).eval(), image_processor


__all__ = ["check_model_folder", "load_dtop_config", "load_image_processor", "load_model_and_processor"]
