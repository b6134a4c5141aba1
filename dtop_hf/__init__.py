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

Importing the package registers the DToP classes with the Auto classes, so `AutoModel.from_pretrained(folder)`
works without `trust_remote_code`; folders saved by `save_pretrained` also carry the code for remote loading.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from .configuration_dtop import DToPConfig
from .toolkit.evaluation.flops import DToPFlops, count_flops, count_flops_from_outputs
from .image_processing_dtop import DToPImageProcessor
from .modeling_dtop import (
    DToPForSemanticSegmentation,
    DToPModel,
    DToPModelOutput,
    DToPPreTrainedModel,
    DToPSemanticSegmenterOutput,
)
from .pipeline_dtop import DToPImageSegmentationPipeline


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

__version__ = "0.1.0"

__all__ = [
    "DToPConfig",
    "DToPFlops",
    "DToPForSemanticSegmentation",
    "DToPImageProcessor",
    "DToPImageSegmentationPipeline",
    "DToPModel",
    "DToPModelOutput",
    "DToPPreTrainedModel",
    "DToPSemanticSegmenterOutput",
    "count_flops",
    "count_flops_from_outputs",
]
