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
"""The model a training stage starts from: fresh (a model size or a paper configuration), a DToP checkpoint, or a ViT
checkpoint with new heads; set up for the stage, with its image processor."""

from collections.abc import Callable
from typing import Any

from transformers import AutoConfig
from transformers.utils import logging

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor

from ..data.label_maps import DATASET_LABELS
from ..inference.loading import check_model_folder, load_dtop_config
from ..inference.loading import load_image_processor as load_saved_image_processor
from ..presets import PAPER_PRESETS, VIT_BASE_PATCH16, DToPPaperPreset
from ..vit_weights import SUPPORTED_MODEL_TYPES, from_vit_pretrained
from .config_overrides import build_preset_config, check_config_fields, parse_config_overrides
from .recipe import Stage, stage_exit_threshold


logger = logging.get_logger(__name__)

# A fresh model without a size or paper configuration.
DEFAULT_MODEL_SIZE = "small"


def label_fields(id2label: dict[int, str]) -> dict:
    return {"id2label": dict(id2label), "label2id": {name: index for index, name in id2label.items()}}


def check_preset_labels(preset: DToPPaperPreset, id2label: dict[int, str]) -> None:
    """A paper configuration trains on its own data set: the classes must be that data set's."""
    expected = DATASET_LABELS[preset.dataset.name]
    if len(id2label) != len(expected):
        raise ValueError(
            f"Paper configuration {preset.name} trains on {preset.dataset.display_name} ({len(expected)} classes), "
            f"but the data set has {len(id2label)} classes. Pass the {preset.dataset.display_name} folder as the "
            "data set."
        )


def processor_kwargs_for(
    crop_size: int | None, do_reduce_labels: bool, paper_preset: DToPPaperPreset | None
) -> Callable[[DToPConfig], dict]:
    """`config -> DToPImageProcessor kwargs`: the paper configuration's test mode (normalisation, resize, windows),
    else windows of `crop_size` (default: the model's size) at stride 2/3 of it (341 for 512)."""

    def kwargs(config: DToPConfig) -> dict:
        crop = crop_size or config.image_size
        windows = {
            "crop_size": {"height": crop, "width": crop},
            "stride": {"height": 2 * crop // 3, "width": 2 * crop // 3},
            "do_reduce_labels": do_reduce_labels,
        }
        if paper_preset is None:
            return {"size": {"height": crop, "width": crop}, **windows}
        official = {**paper_preset.dataset.image_processor_kwargs(), "do_reduce_labels": do_reduce_labels}
        # The official windows, unless another crop was asked for (then windows of that crop, stride 2/3).
        return official if crop == paper_preset.dataset.crop_size else {**official, **windows}

    return kwargs


def fresh_model(
    id2label: dict[int, str],
    overrides: dict[str, Any],
    model_size: str | None,
    paper_preset: DToPPaperPreset | None,
    image_size: int | None,
) -> DToPForSemanticSegmentation:
    """A new model: the paper configuration's architecture, or a model size (default `small`), its position
    embeddings stored for `image_size` when given."""
    fields = {"image_size": image_size} if image_size else {}
    if paper_preset is not None:
        return DToPForSemanticSegmentation(
            DToPConfig(**{**paper_preset.config_kwargs(), **fields, **label_fields(id2label), **overrides})
        )
    config = build_preset_config(overrides, id2label, size=model_size or DEFAULT_MODEL_SIZE, **fields)
    return DToPForSemanticSegmentation(config)


def checkpoint_model(
    source: str, id2label: dict[int, str], overrides: dict[str, Any], argument: str
) -> DToPForSemanticSegmentation:
    """A DToP folder or Hub id, through the shared loader's checks and messages (not DToP, no processor saved, ...);
    class-specific head weights are re-initialised when the data's classes differ from the checkpoint's."""
    config = load_dtop_config(source, argument)
    load_saved_image_processor(source, config, argument)
    config = DToPConfig.from_pretrained(source, **overrides)
    relabel = {int(key): value for key, value in config.id2label.items()} != id2label
    if relabel:
        logger.warning(
            f"The checkpoint has {config.num_labels} classes, the data {len(id2label)}: the class-specific head "
            "weights are re-initialised."
        )
        config.update(label_fields(id2label))
    return DToPForSemanticSegmentation.from_pretrained(source, config=config, ignore_mismatched_sizes=relabel)


def load_model_for_stage(
    id2label: dict[int, str],
    stage: Stage = "base",
    model_name_or_path: str | None = None,
    model_size: str | None = None,
    paper_preset: str | None = None,
    config_overrides: str | dict[str, Any] | None = None,
    exit_threshold: float | tuple[float, ...] | None = None,
    crop_size: int | None = None,
    image_size: int | None = None,
    do_reduce_labels: bool = True,
    argument: str = "--model_name_or_path",
) -> tuple[DToPForSemanticSegmentation, DToPImageProcessor]:
    """The model a stage trains, and its image processor.

    Args:
        id2label: the data set's classes.
        stage: `base` turns pruning off (every threshold 1.0); `prune` sets the stage's thresholds (see
            [`stage_exit_threshold`]) and turns on `prune_during_training` (tokens exit in training mode too).
        model_name_or_path: a DToP folder or Hub id (continue from its weights), a ViT checkpoint (its backbone,
            new heads), or `None` (a fresh model).
        model_size: the architecture of a fresh model (`presets.MODEL_SIZES`, default `small`).
        paper_preset: a paper configuration (`presets.PAPER_PRESETS`): architecture, drop path, thresholds and the
            official test mode of its data set; the data set's classes must be its own.
        config_overrides: DToPConfig fields changed on top (`"hidden_size=64,..."` or a dict).
        exit_threshold: the prune stage's threshold(s), one value or one per auxiliary head.
        crop_size: the training crop, and the processor's windows (default: the model's `image_size`).
        image_size: the position-embedding size of a fresh model without `crop_size` (e.g. the built-in images'
            side; default: the size's or configuration's).
        do_reduce_labels: the processor's label reduction (0 -> 255, k -> k - 1).
        argument: how error messages name `model_name_or_path`.
    """
    overrides = config_overrides if isinstance(config_overrides, dict) else parse_config_overrides(config_overrides)
    check_config_fields(overrides)
    preset = PAPER_PRESETS.get(paper_preset) if paper_preset is not None else None
    if preset is not None:
        check_preset_labels(preset, id2label)
    processor_kwargs = processor_kwargs_for(crop_size, do_reduce_labels, preset)
    model_type = None
    if model_name_or_path is not None:  # a clear error for a file or a folder without config.json, before reading it
        check_model_folder(model_name_or_path, argument)
        model_type = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True).model_type
    if model_name_or_path is None:
        model = fresh_model(id2label, overrides, model_size, preset, crop_size or image_size)
        image_processor = DToPImageProcessor(**processor_kwargs(model.config))
    elif model_type in SUPPORTED_MODEL_TYPES:
        # The backbone fields come from the ViT checkpoint; the preset gives the rest (stage layout, drop path, ...).
        preset_fields = {
            key: value
            for key, value in (preset.config_kwargs() if preset else {}).items()
            if key not in VIT_BASE_PATCH16
        }
        fields = {**preset_fields, **label_fields(id2label), **overrides}
        model = from_vit_pretrained(DToPForSemanticSegmentation, model_name_or_path, **fields)
        try:  # the ViT checkpoint's own normalisation, when it has a preprocessor_config.json
            image_processor = DToPImageProcessor.from_pretrained(model_name_or_path, **processor_kwargs(model.config))
        except OSError:
            logger.info(f"{model_name_or_path} has no image processor: using DToP's defaults")
            image_processor = DToPImageProcessor(**processor_kwargs(model.config))
    else:
        model = checkpoint_model(model_name_or_path, id2label, overrides, argument)
        image_processor = DToPImageProcessor.from_pretrained(model_name_or_path, **processor_kwargs(model.config))
    model.config.exit_threshold = stage_exit_threshold(stage, exit_threshold, model.config)
    model.config.prune_during_training = stage == "prune"
    return model, image_processor
