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
"""The image-segmentation pipeline with DToP's knob: `exit_threshold` reaches the model."""

from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.utils import logging


logger = logging.get_logger(__name__)

# How a saved DToP folder declares this pipeline in its config (`config.custom_pipelines`): with
# `trust_remote_code=True`, `pipeline("image-segmentation", model=folder)` loads this file from the folder.
DTOP_CUSTOM_PIPELINES = {
    "image-segmentation": {
        "impl": "pipeline_dtop.DToPImageSegmentationPipeline",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "image",
    }
}


class DToPImageSegmentationPipeline(ImageSegmentationPipeline):
    """transformers' image-segmentation pipeline plus the model's own call arguments: `exit_threshold` (a float,
    or one value per auxiliary head; 1.0 = unpruned) overrides the config's for this call, as in the model's
    forward. Everything else (slide mode included, when the saved processor has `do_split_image=True`) is the
    stock pipeline's.

    ```python
    >>> segmenter = pipeline("image-segmentation", model="outputs/quickstart/model", trust_remote_code=True)
    >>> segmenter("photo.jpg", exit_threshold=0.8)
    ```
    """

    def _sanitize_parameters(self, exit_threshold=None, **kwargs):
        preprocess_kwargs, forward_kwargs, postprocess_kwargs = super()._sanitize_parameters(**kwargs)
        if exit_threshold is not None:
            forward_kwargs["exit_threshold"] = exit_threshold
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def _forward(self, model_inputs, exit_threshold=None):
        target_size = model_inputs.pop("target_size")
        model_outputs = self.model(**model_inputs, exit_threshold=exit_threshold)
        model_outputs["target_size"] = target_size
        return model_outputs


__all__ = ["DTOP_CUSTOM_PIPELINES", "DToPImageSegmentationPipeline"]
