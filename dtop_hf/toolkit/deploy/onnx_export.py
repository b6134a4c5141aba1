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
"""Export a DToP model to ONNX: one graph that serves every batch size, in capacity or threshold mode.

Capacity mode keeps the same number of tokens in every image after each auxiliary head, so the size of every tensor
follows from the input size and the capacities alone: `torch.export` traces the whole forward once with a symbolic
batch dimension, and the one exported file runs at any batch size with static shapes. Threshold mode exports too:
how many tokens each image keeps is only known at run time, so under `torch.export` the model pads every image to the
token count of the batch's image that keeps the most (`ActiveTokens.after_exit_padded`), one size per auxiliary head
read from the data (an unbacked size, bounded with `torch._check`), where eager PyTorch packs each image's own count
read on the host. Each image's result is threshold mode's; at batch 1 the file runs exactly the tokens PyTorch runs.

The file records what using it needs as JSON in its ONNX metadata (`metadata_props["dtop"]`): the exit rule, the
input size, the labels and the image processor's settings, read back by [`read_onnx_metadata`].

The exporter is torch's own (`torch.onnx.export(..., dynamo=True)`): it goes through `torch.export`, which handles
the model's per-call arguments and the symbolic batch dimension, and maps every operation of the forward to
standard ONNX but one (a stable sort, mapped to ONNX `TopK` below). Not Optimum's exporter: optimum-onnx 0.1.0, the
newest that pip finds, requires transformers < 4.58 and exports through torch's TorchScript exporter, where that
mapping does not apply (docs/deploy.md).
"""

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import __version__
from ...configuration_dtop import DToPConfig
from ...image_processing_dtop import DToPImageProcessor


try:
    import onnx
    from onnxscript import opset18 as onnx_op
except ImportError:  # the `onnx` extra is optional
    onnx = onnx_op = None


ONNX_METADATA_KEY = "dtop"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "exit_stage")
DEFAULT_OPSET = 18
# Images in the tracing example: not 0 or 1, which torch.export would specialise the batch dimension to.
EXAMPLE_BATCH_SIZE = 2
INSTALL_HINT = 'ONNX export needs the `onnx` extra: pip install "dtop-hf[onnx]" (onnx, onnxruntime, onnxscript).'
# What torch's exporter (torch 2.13) says on every export that has nothing to do with a DToP model: its operator
# registry cannot load torchvision's detection operators when torchvision is absent (the model uses none), and torch's
# own tracing code builds a pytree spec class that torch deprecates. Hidden during the export, every other message
# shows.
EXPORTER_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
TORCHVISION_ABSENT_MESSAGE = "torchvision is not installed"
PYTREE_DEPRECATION_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class DToPExportError(ValueError):
    """A model or setting that cannot be exported; the message is one line that says what to do instead."""


class DToPOnnxGraph(nn.Module):
    """What the exported graph computes: `pixel_values` `(batch, channels, height, width)` -> `logits`
    `(batch, num_labels, h, w)` and `exit_stage` `(batch, h, w)`, the exit rule fixed at export."""

    def __init__(self, model: nn.Module, exit_kwargs: dict[str, Any]):
        super().__init__()
        self.model = model
        self.exit_kwargs = exit_kwargs

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values, **self.exit_kwargs, return_dict=True)
        return outputs.logits, outputs.exit_stage


def onnx_stable_sort(self, stable: bool = True, dim: int = -1, descending: bool = False):
    """`aten.sort.stable` in ONNX: `TopK` over the whole axis. ONNX `TopK` breaks ties by the lower index, which is
    exactly a stable sort, the order the exit rules rank tokens in (torch's ONNX library maps only the unstable
    overload)."""
    length = self.shape[dim] if self.shape is not None else None
    if isinstance(length, int):  # the token axis has a static size: no shape arithmetic in the graph
        size = onnx_op.Constant(value_ints=[length])
    else:
        size = onnx_op.Reshape(onnx_op.Gather(onnx_op.Shape(self), dim, axis=0), onnx_op.Constant(value_ints=[1]))
    values, indices = onnx_op.TopK(self, size, axis=dim, largest=descending, sorted=True)
    return values, indices


def exportable_exit_rule(
    config: DToPConfig,
    exit_mode: str | None = None,
    exit_threshold: float | list[float] | tuple[float, ...] | None = None,
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """The exit rule of an export, as keyword arguments of the model's forward: `exit_mode` and its knob, one value
    per auxiliary head. Arguments override the config, as in the forward.

    Raises:
        ValueError: values the config rejects.
    """
    exit_mode, values = config.exit_rule(exit_mode, exit_threshold, exit_capacity)
    auxiliary = list(values[:-1])
    knob = "exit_capacity" if exit_mode == "capacity" else "exit_threshold"
    return {"exit_mode": exit_mode, knob: auxiliary}


def export_image_size(config: DToPConfig, image_processor: DToPImageProcessor | None) -> tuple[int, int]:
    """The input size an export is traced at when none is given: the processor's window in slide mode, its `size`
    when that is a fixed height and width, else the model's stored grid size."""
    if image_processor is not None:
        size = image_processor.crop_size if image_processor.do_split_image else image_processor.size
        if size is not None and size.height is not None and size.width is not None:
            return int(size.height), int(size.width)
    return config.image_size, config.image_size


def processor_settings(image_processor: DToPImageProcessor | None, image_size: tuple[int, int]) -> dict | None:
    """The processor's settings as the exported file records them: images resized to the exported size (whole-image
    mode), or windows of that size (slide mode, where the window must be the exported size)."""
    if image_processor is None:
        return None
    settings = json.loads(image_processor.to_json_string())
    height, width = image_size
    if not image_processor.do_split_image:
        return {**settings, "size": {"height": height, "width": width}}
    crop = (image_processor.crop_size.height, image_processor.crop_size.width)
    if crop != (height, width):
        raise DToPExportError(
            f"The image processor is in slide mode with {crop[0]}x{crop[1]} windows, but the export's input size is "
            f"{height}x{width}: export at the window size (image_size={crop})."
        )
    return settings


def export_metadata(
    config: DToPConfig, exit_kwargs: dict[str, Any], image_size: tuple[int, int], settings: dict | None
) -> dict[str, Any]:
    """What an exported file records about itself (JSON in its `metadata_props`)."""
    return {
        "exit_mode": exit_kwargs["exit_mode"],
        "exit_threshold": exit_kwargs.get("exit_threshold"),
        "exit_capacity": exit_kwargs.get("exit_capacity"),
        "keep_top_k": config.keep_top_k,
        "image_size": list(image_size),
        "num_channels": config.num_channels,
        "patch_size": config.patch_size,
        "head_type": config.head_type,
        "out_indices": list(config.out_indices),
        "id2label": {str(index): label for index, label in config.id2label.items()},
        "image_processor": settings,
        "inputs": [INPUT_NAME],
        "outputs": list(OUTPUT_NAMES),
        "dtop_hf_version": __version__,
        "torch_version": torch.__version__,
    }


class DropMessage(logging.Filter):
    """Drops the log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def exporter_noise_hidden() -> Iterator[None]:
    """Hide torch's exporter messages that do not concern a DToP export (see `TORCHVISION_ABSENT_MESSAGE`)."""
    registry_logger = logging.getLogger(EXPORTER_REGISTRY_LOGGER)
    torchvision_absent = DropMessage(TORCHVISION_ABSENT_MESSAGE)
    registry_logger.addFilter(torchvision_absent)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION_MESSAGE, category=FutureWarning)
            yield
    finally:
        registry_logger.removeFilter(torchvision_absent)


def export_onnx(
    model: nn.Module,
    output_path: str | Path,
    image_size: tuple[int, int] | None = None,
    exit_mode: str | None = None,
    exit_threshold: float | list[float] | tuple[float, ...] | None = None,
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    image_processor: DToPImageProcessor | None = None,
    opset_version: int = DEFAULT_OPSET,
) -> Path:
    """Export a DToP model to one ONNX file: input `pixel_values` `(batch, channels, height, width)` with a dynamic
    batch dimension, outputs `logits` `(batch, num_labels, h, w)` and `exit_stage` `(batch, h, w)` int64.

    Args:
        model: a [`DToPForSemanticSegmentation`] or [`DToPModel`] (exported in eval mode, in its dtype).
        output_path: the `.onnx` file to write (its folder is created).
        image_size: `(height, width)` of the inputs; the graph is traced at this size (default: see
            [`export_image_size`]).
        exit_mode, exit_threshold, exit_capacity: the exit rule baked into the graph, overriding the config as in
            the forward: capacity or threshold mode (threshold 1.0: the unpruned model).
        image_processor: its settings are recorded in the file, for [`segment_with_onnx`](onnx_runtime).
        opset_version: the ONNX opset.

    Returns:
        The path written.

    Raises:
        DToPExportError: a slide-mode processor whose window is not the exported size.
        ImportError: the `onnx` extra is not installed.
    """
    if onnx_op is None:
        raise ImportError(INSTALL_HINT)
    config = model.config
    exit_kwargs = exportable_exit_rule(config, exit_mode, exit_threshold, exit_capacity)
    image_size = tuple(image_size) if image_size is not None else export_image_size(config, image_processor)
    metadata = export_metadata(config, exit_kwargs, image_size, processor_settings(image_processor, image_size))
    parameter = next(model.parameters())
    example = torch.zeros(EXAMPLE_BATCH_SIZE, config.num_channels, *image_size, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with exporter_noise_hidden():
            program = torch.onnx.export(
                DToPOnnxGraph(model, exit_kwargs).eval(),
                (example.to(parameter.device),),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                custom_translation_table={torch.ops.aten.sort.stable: onnx_stable_sort},
                opset_version=opset_version,
                verbose=False,
            )
    finally:
        model.train(was_training)
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(metadata)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(output_path))
    return output_path


def read_onnx_metadata(source) -> dict[str, Any]:
    """What [`export_onnx`] recorded in a file: from an `onnxruntime.InferenceSession`, or from the file's path.

    Raises:
        ValueError: the file was not written by [`export_onnx`].
    """
    if hasattr(source, "get_modelmeta"):
        properties = source.get_modelmeta().custom_metadata_map
    else:
        if onnx is None:
            raise ImportError(INSTALL_HINT)
        model_proto = onnx.load(str(source), load_external_data=False)
        properties = {entry.key: entry.value for entry in model_proto.metadata_props}
    if ONNX_METADATA_KEY not in properties:
        raise ValueError(
            f"The ONNX file has no `{ONNX_METADATA_KEY}` metadata: export it with "
            "`dtop_hf.toolkit.deploy.onnx_export.export_onnx` (or examples/export_onnx.py)."
        )
    return json.loads(properties[ONNX_METADATA_KEY])


__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "ONNX_METADATA_KEY",
    "OUTPUT_NAMES",
    "DToPExportError",
    "DToPOnnxGraph",
    "export_image_size",
    "export_metadata",
    "export_onnx",
    "exportable_exit_rule",
    "onnx_stable_sort",
    "processor_settings",
    "read_onnx_metadata",
]
