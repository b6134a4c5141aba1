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
"""The image-segmentation pipeline with DToP's per-call arguments: `exit_threshold`, `exit_mode` and `exit_capacity`
reach the model."""

import inspect

from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.utils import logging


logger = logging.get_logger(__name__)

# How a saved DToP folder declares this pipeline in its config (`config.custom_pipelines`): where dtop_hf is not
# installed, `pipeline("image-segmentation", model=folder, trust_remote_code=True)` loads this file from the folder.
# With dtop_hf imported, the package serves the task itself and drops this declaration on load (`dtop_hf/__init__.py`).
DTOP_CUSTOM_PIPELINES = {
    "image-segmentation": {
        "impl": "pipeline_dtop.DToPImageSegmentationPipeline",
        "pt": ["AutoModelForSemanticSegmentation"],
        "type": "image",
    }
}

# The model's own call arguments that the pipeline passes on, each only when the caller gives it, so that a model
# whose forward lacks one still runs as the stock pipeline runs it.
MODEL_CALL_ARGUMENTS = ("exit_threshold", "exit_mode", "exit_capacity")


class DToPImageSegmentationPipeline(ImageSegmentationPipeline):
    """transformers' image-segmentation pipeline plus the model's own call arguments, given per call (or once, when
    the pipeline is built) and passed to the model's forward: `exit_threshold` (a float, or one value per auxiliary
    head; 1.0 = unpruned), `exit_mode` and `exit_capacity`. Without them it is the stock pipeline, for any model:
    slide mode included, when the saved processor has `do_split_image=True`.

    ```python
    >>> import dtop_hf  # registers DToP; without it, pass `trust_remote_code=True`
    >>> segmenter = pipeline("image-segmentation", model="outputs/quickstart/model")
    >>> segmenter("photo.jpg", exit_threshold=0.8)
    ```
    """

    # Segmentation needs no video processor. The stock pipeline leaves this flag unset ("try"), and trying derives a
    # video processor class from the folder's image processor entry, which asks "run the custom code? [y/N]" and
    # waits 15 s in a terminal unless `trust_remote_code` was given.
    _load_video_processor = False

    def _sanitize_parameters(self, **kwargs):
        call_kwargs = {name: kwargs.pop(name, None) for name in MODEL_CALL_ARGUMENTS}
        preprocess_kwargs, forward_kwargs, postprocess_kwargs = super()._sanitize_parameters(**kwargs)
        given = {name: value for name, value in call_kwargs.items() if value is not None}
        accepted = inspect.signature(self.model.forward).parameters
        unsupported = [name for name in given if name not in accepted]
        if unsupported:
            raise ValueError(
                f"{type(self.model).__name__} takes no {', '.join(f'`{name}`' for name in unsupported)}: these "
                "arguments are for DToP models."
            )
        forward_kwargs.update(given)
        return preprocess_kwargs, forward_kwargs, postprocess_kwargs

    def _forward(self, model_inputs, **model_call_kwargs):
        target_size = model_inputs.pop("target_size")
        model_outputs = self.model(**model_inputs, **model_call_kwargs)
        model_outputs["target_size"] = target_size
        return model_outputs


__all__ = ["DTOP_CUSTOM_PIPELINES", "MODEL_CALL_ARGUMENTS", "DToPImageSegmentationPipeline"]
