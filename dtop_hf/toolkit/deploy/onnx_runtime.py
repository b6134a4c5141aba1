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
"""Run exported DToP files in ONNX Runtime: sessions, segmentation with the image processor's pre- and
post-processing (the settings recorded in the file), and timing for the benchmark.

    session = create_session("model.onnx")
    result = segment_with_onnx(session, [Image.open("photo.jpg")])
    result.segmentation[0]  # (height, width) class ids at the photo's size
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers.image_utils import get_image_size, to_numpy_array

from ...image_processing_dtop import DToPImageProcessor
from ...modeling_dtop import DToPModelOutput
from ..benchmarking.probes import DEFAULT_TURN_S, time_alternating
from .onnx_export import INPUT_NAME, INSTALL_HINT, OUTPUT_NAMES, read_onnx_metadata


try:
    import onnxruntime
except ImportError:  # the `onnx` extra is optional
    onnxruntime = None


# ONNX Runtime's fused SkipLayerNormalization CPU kernel (onnxruntime 1.32) is several times slower than the plain
# Add + LayerNormalization it replaces at the ATM heads' width of 64 (0.39 against 0.08 ms per (8, 150, 64) call,
# measured), which made the heads' fixed cost a third of a small model's time. Sessions skip that one fusion.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def create_session(
    model_file: str | Path,
    intra_op_num_threads: int | None = None,
    providers: Sequence[str] | None = None,
    disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS,
) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session of an exported file, with all graph optimisations but `disabled_optimizers`.

    Args:
        model_file: the `.onnx` file.
        intra_op_num_threads: threads inside one operation (`None`: ONNX Runtime's default, one per core); 1 gives
            the steadiest timings on a shared machine.
        providers: execution providers, best first (default: CPU).
        disabled_optimizers: ONNX Runtime graph optimisers to leave out (default: the SkipLayerNormalization
            fusion, slower than what it fuses at small widths; see `DISABLED_OPTIMIZERS`).
    """
    if onnxruntime is None:
        raise ImportError(INSTALL_HINT)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        str(model_file),
        options,
        providers=list(providers or ["CPUExecutionProvider"]),
        disabled_optimizers=list(disabled_optimizers),
    )


def run_session(session: "onnxruntime.InferenceSession", pixel_values: torch.Tensor | np.ndarray) -> DToPModelOutput:
    """One forward of the exported graph: `pixel_values` `(batch, channels, height, width)` at the exported size ->
    a [`DToPModelOutput`] with `logits` and `exit_stage`, as the PyTorch model returns them."""
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    logits, exit_stage = session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixel_values})
    return DToPModelOutput(logits=torch.from_numpy(logits), exit_stage=torch.from_numpy(exit_stage))


def onnx_image_processor(session: "onnxruntime.InferenceSession") -> DToPImageProcessor:
    """The image processor recorded in an exported file (resizing to the exported size, or its windows)."""
    settings = read_onnx_metadata(session)["image_processor"]
    if settings is None:
        raise ValueError(
            "The ONNX file records no image processor: pass `image_processor`, or export with one "
            "(`export_onnx(..., image_processor=...)`; examples/export_onnx.py records the model folder's)."
        )
    return DToPImageProcessor.from_dict(settings)


@dataclass
class OnnxSegmentation:
    """What [`segment_with_onnx`] returns, one entry per image, each at its target size.

    Attributes:
        segmentation: `(height, width)` int64 class-id maps.
        exit_maps: `(height, width)` int64 maps of the head that finalised each pixel.
    """

    segmentation: list[torch.Tensor]
    exit_maps: list[torch.Tensor]


def segment_with_onnx(
    session: "onnxruntime.InferenceSession",
    images: Sequence,
    image_processor: DToPImageProcessor | None = None,
    target_sizes: Sequence[tuple[int, int]] | None = None,
) -> OnnxSegmentation:
    """Segment images with an exported file: the image processor's pre-processing, one run of the session for the
    whole batch (the windows of every image, in slide mode), the processor's post-processing.

    Args:
        session: from [`create_session`].
        images: PIL images or arrays.
        image_processor: default: the one recorded in the file ([`onnx_image_processor`]).
        target_sizes: `(height, width)` of each output map; default: each image's own size.
    """
    image_processor = image_processor or onnx_image_processor(session)
    inputs = image_processor(images, return_tensors="pt")
    pixel_values = inputs["pixel_values"]
    exported_size = tuple(read_onnx_metadata(session)["image_size"])
    if tuple(pixel_values.shape[-2:]) != exported_size:
        raise ValueError(
            f"The image processor gives {tuple(pixel_values.shape[-2:])} inputs but the file was exported for "
            f"{exported_size}: use the processor recorded in the file, or one that resizes to the exported size."
        )
    outputs = run_session(session, pixel_values)
    outputs["patch_offsets"] = inputs.get("patch_offsets")
    if target_sizes is None:
        target_sizes = [get_image_size(to_numpy_array(image)) for image in images]
    return OnnxSegmentation(
        segmentation=image_processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
        exit_maps=image_processor.post_process_exit_map(outputs, target_sizes=target_sizes),
    )


def random_pixel_values(session: "onnxruntime.InferenceSession", batch_size: int, seed: int = 0) -> np.ndarray:
    """`(batch_size, channels, height, width)` float32 normal noise at the exported size of a session's file."""
    metadata = read_onnx_metadata(session)
    shape = (batch_size, metadata["num_channels"], *metadata["image_size"])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@torch.no_grad()
def run_both(
    session: "onnxruntime.InferenceSession", model: torch.nn.Module, pixel_values: torch.Tensor
) -> tuple[DToPModelOutput, DToPModelOutput]:
    """The exported file and the PyTorch model (with the exit rule recorded in the file) on the same batch: their
    outputs, the model's on the CPU in float32."""
    metadata = read_onnx_metadata(session)
    knob = "exit_capacity" if metadata["exit_mode"] == "capacity" else "exit_threshold"
    exit_rule = {"exit_mode": metadata["exit_mode"], knob: metadata[knob]}
    parameter = next(model.parameters())
    exported = run_session(session, pixel_values.cpu())
    expected = model(pixel_values.to(parameter.device, parameter.dtype), **exit_rule)
    return exported, DToPModelOutput(logits=expected.logits.float().cpu(), exit_stage=expected.exit_stage.cpu())


def parity_with_pytorch(
    session: "onnxruntime.InferenceSession", model: torch.nn.Module, pixel_values: torch.Tensor
) -> dict[str, float]:
    """How closely an exported file follows the PyTorch model on one batch, without raising (for reports): the
    largest absolute logits difference and the share of `exit_stage` entries on which the two agree (1.0: the same
    tokens exited at the same heads)."""
    exported, expected = run_both(session, model, pixel_values)
    return {
        "max_abs_logits_difference": (exported.logits - expected.logits).abs().max().item(),
        "exit_stage_agreement": (exported.exit_stage == expected.exit_stage).float().mean().item(),
    }


def compare_with_pytorch(
    session: "onnxruntime.InferenceSession", model: torch.nn.Module, batch_sizes: Sequence[int] = (1, 2), seed: int = 0
) -> float:
    """Run the exported file and the PyTorch model (with the exit rule recorded in the file) on the same random
    batches, one per batch size, and compare.

    Returns:
        The largest absolute difference of the logits over every batch.

    Raises:
        ValueError: the two disagree on which head finalised some token (`exit_stage`).
    """
    largest_difference = 0.0
    for batch_size in batch_sizes:
        pixel_values = torch.from_numpy(random_pixel_values(session, batch_size, seed))
        exported, expected = run_both(session, model, pixel_values)
        if not torch.equal(exported.exit_stage, expected.exit_stage):
            raise ValueError(f"The exported file and the model disagree on `exit_stage` at batch size {batch_size}.")
        difference = (exported.logits - expected.logits).abs().max().item()
        largest_difference = max(largest_difference, difference)
    return largest_difference


def session_call(
    session: "onnxruntime.InferenceSession", pixel_values: torch.Tensor | np.ndarray
) -> Callable[[], list[np.ndarray]]:
    """One forward of the exported graph on these images as a zero-argument call, the input converted once, for
    timing: it returns ONNX Runtime's raw outputs (`logits`, `exit_stage`)."""
    feed = {INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)}
    return partial(session.run, list(OUTPUT_NAMES), feed)


def time_onnx_models(
    model_files: Mapping[str, str | Path],
    batch_size: int,
    repeats: int = 10,
    warmup: int = 2,
    intra_op_num_threads: int | None = 1,
    seed: int = 0,
    turn_s: float = DEFAULT_TURN_S,
) -> dict[str, float]:
    """Median seconds of one ONNX Runtime call per exported file, on the same random batch at each file's size.

    The files take turns (after `warmup` untimed rounds), so that machine noise hits them alike: compare a
    capacity-mode export with the unpruned one (threshold or capacity 1.0) at the same batch size.

    Args:
        model_files: name -> exported file.
        batch_size: images per call.
        repeats: timed rounds; the median is reported.
        warmup: untimed rounds first.
        intra_op_num_threads: threads per session (1: steady numbers on a shared machine; `None`: one per core).
        seed: seed of the random images.
        turn_s: seconds of back-to-back calls per file and round, the first call untimed (see `time_rounds`).

    Returns:
        name -> median seconds per call.
    """
    calls = {}
    for name, model_file in model_files.items():
        session = create_session(model_file, intra_op_num_threads)
        calls[name] = session_call(session, random_pixel_values(session, batch_size, seed))
    return time_alternating(calls, repeats=repeats, warmup=warmup, device="cpu", turn_s=turn_s)


__all__ = [
    "DISABLED_OPTIMIZERS",
    "OnnxSegmentation",
    "compare_with_pytorch",
    "create_session",
    "onnx_image_processor",
    "parity_with_pytorch",
    "random_pixel_values",
    "run_both",
    "run_session",
    "segment_with_onnx",
    "session_call",
    "time_onnx_models",
]
