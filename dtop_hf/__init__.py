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
"""dtop-hf: DToP (Dynamic Token Pruning for plain ViT segmenters) as a Hugging Face transformers model.

Importing the package registers the DToP classes with the Auto classes and its pipeline with the image-segmentation
task, so `AutoModel.from_pretrained(folder)` and `pipeline("image-segmentation", model=folder)` work without
`trust_remote_code`; folders saved by `save_pretrained` also carry the code for loading where dtop-hf is not
installed. The package root holds the model files only: the toolkit (data, training, evaluation, FLOPs, inference)
is imported from `dtop_hf.toolkit` where it is used.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_dtop import DToPConfig
from .image_processing_dtop import DToPImageProcessor
from .modeling_dtop import (
    DToPForSemanticSegmentation,
    DToPModel,
    DToPModelOutput,
    DToPPreTrainedModel,
    DToPSemanticSegmenterOutput,
)
from .pipeline_dtop import DTOP_CUSTOM_PIPELINES, DToPImageSegmentationPipeline


AutoConfig.register(DToPConfig.model_type, DToPConfig, exist_ok=True)
AutoModel.register(DToPConfig, DToPModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(DToPConfig, DToPForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(DToPConfig, image_processor_classes={"pil": DToPImageProcessor}, exist_ok=True)
# The image-segmentation pipeline checks model types against this static table and logs an error for registered
# models that are missing from it; adding ours there silences it and changes nothing else.
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(DToPConfig.model_type, "DToPForSemanticSegmentation")

# save_pretrained() then copies the defining files next to the weights and writes `auto_map` (remote code).
DToPConfig.register_for_auto_class()
DToPModel.register_for_auto_class("AutoModel")
DToPForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
DToPImageProcessor.register_for_auto_class()


# `pipeline("image-segmentation")` builds the class that the task registry names. The DToP pipeline is the stock one
# plus the model's call arguments, passed only when given, so it serves every model the same; with it registered,
# a DToP folder gets its `exit_threshold` without remote code. The entry is replaced rather than registered with
# `register_pipeline`, which warns on every import and marks the class as a custom pipeline: saving *any*
# segmentation pipeline would then write `custom_pipelines` and copy this package's pipeline file.
PIPELINE_REGISTRY.supported_tasks["image-segmentation"] = {
    **PIPELINE_REGISTRY.supported_tasks["image-segmentation"],
    "impl": DToPImageSegmentationPipeline,
}


def without_packaged_pipelines(custom_pipelines: dict) -> dict:
    """A config's `custom_pipelines` without the entries that declare this package's own pipeline classes."""
    return {
        task: declaration
        for task, declaration in custom_pipelines.items()
        if declaration.get("impl") != DTOP_CUSTOM_PIPELINES.get(task, {}).get("impl")
    }


_config_from_dict = DToPConfig.from_dict.__func__


def _config_from_dict_serving_pipelines_locally(cls, config_dict: dict, **kwargs):
    # A saved folder declares its pipeline in `custom_pipelines` for loading where dtop-hf is not installed, and
    # `pipeline()` refuses any declared pipeline without `trust_remote_code=True`, even when the class is installed.
    # The installed config drops the declaration on load (the registry above serves the task); the model's
    # `save_pretrained` writes it again. A folder's own copy of the config, loaded as remote code, keeps it.
    if "custom_pipelines" in config_dict:
        config_dict = dict(config_dict)
        remaining = without_packaged_pipelines(config_dict.pop("custom_pipelines") or {})
        if remaining:
            config_dict["custom_pipelines"] = remaining
    return _config_from_dict(cls, config_dict, **kwargs)


DToPConfig.from_dict = classmethod(_config_from_dict_serving_pipelines_locally)

__version__ = "0.1.0"

__all__ = [
    "DToPConfig",
    "DToPForSemanticSegmentation",
    "DToPImageProcessor",
    "DToPImageSegmentationPipeline",
    "DToPModel",
    "DToPModelOutput",
    "DToPPreTrainedModel",
    "DToPSemanticSegmenterOutput",
]
