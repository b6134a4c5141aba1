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
"""Benchmarking: does DToP's FLOPs saving turn into wall-clock time?

`cases` (what runs, the default suites, the targets), `exits` (where the tokens of random-weight models exit),
`probes` (time, CUDA memory, syncs of one call), `memory` (CPU peak memory in a fresh process), `allocator` (the C
allocator's regime under CPU timings), `runner` (the models, the PyTorch backend and the loop), `onnx_backend`
(exports in ONNX Runtime), `reports` (tables and JSON).
`examples/benchmark.py` is their command line; another backend (an exported model in another runtime) joins through
`runner.BACKENDS`, as `onnx_backend` does.
"""

from .cases import BenchmarkRun, BenchmarkSuite, Case, parse_case, resolve_suite
from .exits import SimulatedExitsSegmenter, capacities_for_flops_ratio, prepare_exits, seeded_thresholds
from .onnx_backend import OnnxRuntimeBackend  # registers the `onnxruntime` backend in BACKENDS
from .reports import report_sections, write_reports
from .runner import BACKENDS, BenchmarkSettings, build_benchmark_model, make_images, run_benchmark


__all__ = [
    "BACKENDS",
    "BenchmarkRun",
    "BenchmarkSettings",
    "BenchmarkSuite",
    "Case",
    "OnnxRuntimeBackend",
    "SimulatedExitsSegmenter",
    "build_benchmark_model",
    "capacities_for_flops_ratio",
    "make_images",
    "parse_case",
    "prepare_exits",
    "report_sections",
    "resolve_suite",
    "run_benchmark",
    "seeded_thresholds",
    "write_reports",
]
