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
"""The `onnxruntime` backend: the benchmarked model exported to ONNX twice, at the run's exit rule and unpruned
(threshold 1.0), and both files run in ONNX Runtime on the CPU, timed like the PyTorch model on the same images.

The exit rule is capacity mode (`capacity` exits, the default) or thresholds (`rate` exits, a trained model's own:
`model`); the drawn `paper` exits cannot run, as an exported graph computes its heads' scores itself. A
threshold-mode file pads every batch to the tokens of its image that keeps the most, while R counts each image's own
tokens: at batch > 1 its speed-up / R counts that padding against it.

An export has a dynamic batch dimension, so the two files of a model size, input size and exit rule are exported
once per benchmark and serve every batch size; their agreement with the PyTorch model is checked once, on the first
images they run, and recorded with every run. ONNX Runtime's intra-op threads follow the benchmark's `threads`.
"""

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import ONNX_RUNTIME_MODES, Case
from .exits import UNPRUNED
from .runner import BACKENDS, BenchmarkModels, BenchmarkRun, BenchmarkSettings, TimedCalls


# Images of the parity check: more than one, since the exported batch dimension is symbolic, and few, since the
# PyTorch side runs eagerly (seconds per ViT-B image on one CPU thread).
PARITY_IMAGES = 2
EXPORT_FOLDER_KEY = ("onnxruntime", "folder")


@dataclass
class OnnxExports:
    """The two exported files of one model size, input size and exit rule, their sessions, and what making and
    checking them measured."""

    files: dict[str, Path]
    sessions: dict[str, object]
    record: dict


def export_folder(settings: BenchmarkSettings, models: BenchmarkModels) -> Path:
    """`settings.onnx_dir`, or a temporary folder that lives as long as the benchmark's models."""
    if settings.onnx_dir is not None:
        return Path(settings.onnx_dir)
    if EXPORT_FOLDER_KEY not in models.artifacts:
        models.artifacts[EXPORT_FOLDER_KEY] = tempfile.TemporaryDirectory(prefix="dtop_onnx_")
    return Path(models.artifacts[EXPORT_FOLDER_KEY].name)


def make_exports(
    settings: BenchmarkSettings, models: BenchmarkModels, case: Case, exit_rule: dict, pixel_values: torch.Tensor
) -> OnnxExports:
    """Export the case's model unpruned and at `exit_rule` at the case's input size, open a session of each, and
    check both against the PyTorch model on the first `PARITY_IMAGES` images."""
    # Imported here: the deploy modules import the benchmark's timing probes, so importing them at the top of a
    # benchmarking module would import them half-initialised whenever deploy is imported first.
    from ..deploy.onnx_export import export_onnx
    from ..deploy.onnx_runtime import create_session, onnxruntime, parity_with_pytorch

    model = models.model(case.model_size)
    stem = f"{case.model_size or 'model'}-{case.image_size}"  # a trained model's cases name no model size
    rules = {
        "baseline": (UNPRUNED, f"{stem}-unpruned.onnx"),
        "pruned": (exit_rule, f"{stem}-{rule_file_tag(exit_rule)}.onnx"),
    }
    folder, image_size = export_folder(settings, models), (case.image_size, case.image_size)
    files, seconds = {}, {}
    for name, (rule, file_name) in rules.items():
        start = time.perf_counter()
        files[name] = export_onnx(model, folder / file_name, image_size, **rule)
        seconds[name] = time.perf_counter() - start
    sessions = {name: create_session(file, settings.threads) for name, file in files.items()}
    parity = {name: parity_with_pytorch(sessions[name], model, pixel_values[:PARITY_IMAGES]) for name in sessions}
    models.progress(
        f"exported {case.model_size} at {case.image_size}: "
        + ", ".join(f"{name} {seconds[name]:.0f} s, parity {parity[name]}" for name in files)
    )
    record = {
        "onnx_files": {name: file.name for name, file in files.items()},
        "onnx_export_seconds": seconds,
        "onnx_parity": parity,
        "onnx_parity_images": min(PARITY_IMAGES, len(pixel_values)),
        "onnxruntime_version": onnxruntime.__version__,
        "intra_op_num_threads": settings.threads,
    }
    return OnnxExports(files, sessions, record)


def rule_file_tag(exit_rule: dict) -> str:
    """An exit rule in a file name: `capacity-0.7380-0.5450`, `threshold-0.4156-0.4460`, or `threshold-config` for
    the model's own thresholds."""
    knob = "capacity" if "exit_capacity" in exit_rule else "threshold"
    values = exit_rule.get(f"exit_{knob}")
    if values is None:
        return f"{knob}-config"
    values = values if isinstance(values, (list, tuple)) else [values]
    return f"{knob}-" + "-".join(f"{value:.4f}" for value in values)


class OnnxRuntimeBackend:
    """Exported files in ONNX Runtime (CPU, `create_session`'s graph optimisations): the export at the run's exit
    rule (capacity mode, or thresholds) against the unpruned export of the same model; a suite with this backend
    also runs PyTorch (`compared_with`) on the same cases and exits."""

    name = "onnxruntime"
    modes = ONNX_RUNTIME_MODES
    exit_sources = ("capacity", "rate", "model")
    compared_with = ("torch",)

    def prepare(
        self,
        settings: BenchmarkSettings,
        models: BenchmarkModels,
        run: BenchmarkRun,
        pixel_values: torch.Tensor,
        exit_rule: dict,
    ) -> TimedCalls:
        from ..deploy.onnx_runtime import session_call  # imported here: see `make_exports`

        if run.dtype != "fp32":
            raise ValueError(f"The onnxruntime backend runs the fp32 exports, got dtype {run.dtype!r}.")
        key = ("onnxruntime", run.case.model_size, run.case.image_size, json.dumps(exit_rule, sort_keys=True))
        if key not in models.artifacts:
            models.artifacts[key] = make_exports(settings, models, run.case, exit_rule, pixel_values)
        exports = models.artifacts[key]
        calls = {name: session_call(session, pixel_values.cpu()) for name, session in exports.sessions.items()}
        return TimedCalls(calls, dict(exports.record))


BACKENDS[OnnxRuntimeBackend.name] = OnnxRuntimeBackend
