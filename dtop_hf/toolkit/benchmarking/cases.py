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
"""What a benchmark runs: its cases (model size, image size, batch size), the default suites, the run order, and
the targets each result is held to."""

from dataclasses import dataclass

import torch

from ..presets import MODEL_SIZES


CPU_CASES, CPU_COMPILED_CASES = ("512x1", "256x1", "256x8"), ("256x8",)
# The GPU suite: ViT-B/16 at 512 (batch 1, 8, 32) and ViT-L/16 at 640 (batch 1, 8).
CUDA_CASES = ("vit-base:512x1", "vit-base:512x8", "vit-base:512x32", "vit-large:640x1", "vit-large:640x8")
# The ONNX Runtime suite (capacity exits, CPU): ViT-B/16 at 512 and the quick-start size at 96, batch 1 and 8, each
# case also in eager PyTorch, the batched ones compiled too (on a 2-core CPU every model, batch size and variant
# compiles for one to three minutes).
ONNX_RUNTIME_CASES = ("vit-base:512x1", "vit-base:512x8", "quickstart:96x1", "quickstart:96x8")
ONNX_RUNTIME_COMPILED_CASES = ("vit-base:512x8", "quickstart:96x8")
# Speed-up / R, where R = GFLOPs unpruned / pruned, must reach 0.8 at batch 1 and 0.9 at larger batches, where the
# pruned model's repacking is amortised over more images; the unpruned model must stay within 5% of a plain
# transformers ViTModel carrying the same heads.
BATCH_ONE_SPEEDUP_TARGET, BATCH_SPEEDUP_TARGET, VIT_REFERENCE_TARGET = 0.8, 0.9, 1.05
# Capacity mode keeps the same tokens in every image (no padding, nothing read back from the tokens' scores), so more
# of R must survive: an exported graph in ONNX Runtime 0.9 R at every batch size, eager PyTorch 0.95 R in batches.
ONNX_RUNTIME_SPEEDUP_TARGET, CAPACITY_EAGER_BATCH_SPEEDUP_TARGET = 0.9, 0.95
# Allowed device-to-host syncs per eager forward: none unpruned, one per auxiliary head pruned (the token counts).
ALLOWED_UNPRUNED_SYNCS = 0


@dataclass(frozen=True)
class Case:
    """One input of the benchmark: a model size of `MODEL_SIZES` (None: a trained model's folder), image side,
    batch."""

    model_size: str | None
    image_size: int
    batch_size: int

    @property
    def label(self) -> str:
        size = f"{self.image_size}x{self.batch_size}"
        return f"{self.model_size}:{size}" if self.model_size else size


@dataclass(frozen=True)
class BenchmarkRun:
    """One measured variant: a case on a backend (`torch`, ...) in one of its modes (`eager`, `compiled`) and a
    dtype (`fp32`, or `bf16` autocast)."""

    case: Case
    backend: str
    mode: str
    dtype: str

    @property
    def label(self) -> str:
        backend = "" if self.backend == "torch" else f"{self.backend} "
        return f"{self.case.label} {backend}{self.mode} {self.dtype}"


def parse_case(case: str, default_model_size: str | None = None, trained_model: bool = False) -> Case:
    """'512x8' -> Case(default_model_size, 512, 8); 'vit-large:640x8' -> Case('vit-large', 640, 8).

    Args:
        case: `[SIZE:]IMAGExBATCH`.
        default_model_size: the model size of a case that names none.
        trained_model: the benchmark runs one trained model: a case may not name a model size.
    """
    model_size, _, sizes = case.rpartition(":")
    try:
        image_size, batch_size = (int(part) for part in sizes.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"A case is [SIZE:]IMAGE_SIZExBATCH_SIZE such as 512x8 or vit-large:640x8, got {case!r}."
        ) from None
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"A case's image and batch sizes must be >= 1, got {case!r}.")
    if model_size and trained_model:
        raise ValueError(f"A trained model is benchmarked alone: give its cases without a model size, got {case!r}.")
    if model_size and model_size not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {model_size!r} in case {case!r}: expected one of {sorted(MODEL_SIZES)}.")
    return Case(model_size or default_model_size, image_size, batch_size)


# `reduce-overhead`: torch.compile(mode="reduce-overhead", fullgraph=True) of capacity mode, CUDA graphs on a GPU.
TORCH_MODES = ("eager", "compiled", "reduce-overhead")
COMPILED_MODES = ("compiled", "reduce-overhead")  # run on `compiled_cases`, after every other run
ONNX_RUNTIME_MODES = ("session",)  # one ONNX Runtime session per exported file (`create_session`)
MODES = TORCH_MODES + ONNX_RUNTIME_MODES
DEFAULT_MODES = ("eager", "compiled", *ONNX_RUNTIME_MODES)  # CUDA graphs only on request (capacity exits)


@dataclass(frozen=True)
class BenchmarkSuite:
    """What a benchmark runs: its cases, dtypes, modes, the cases also run compiled, and the backends."""

    cases: tuple[Case, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...] = DEFAULT_MODES
    compiled_cases: tuple[Case, ...] = ()
    backends: tuple[str, ...] = ("torch",)

    def plan(self) -> list[BenchmarkRun]:
        """The runs in order: every eager run first (cheap; the ViTModel comparison and the sync counts), then the
        compiled ones in `compiled_cases` order, dtype by dtype, so that a time budget cuts compiles last. Each
        backend runs those of `modes` it has, in its own order (`BACKENDS[name].modes`), backend after backend,
        every compiled run after all the others."""
        from .runner import BACKENDS

        plan = []
        for backend in self.backends:
            for mode in (mode for mode in BACKENDS[backend].modes if mode in self.modes):
                if mode in COMPILED_MODES:
                    compiled = [case for case in dict.fromkeys(self.compiled_cases) if case in self.cases]
                    plan += [BenchmarkRun(case, backend, mode, dtype) for dtype in self.dtypes for case in compiled]
                else:
                    plan += [BenchmarkRun(case, backend, mode, dtype) for case in self.cases for dtype in self.dtypes]
        return sorted(plan, key=lambda run: run.mode in COMPILED_MODES)  # stable: the order above otherwise


def resolve_suite(
    device: str = "cpu",
    cases: list[str] | None = None,
    compiled_cases: list[str] | None = None,
    dtypes: list[str] | None = None,
    modes: tuple[str, ...] | list[str] = DEFAULT_MODES,
    backends: tuple[str, ...] | list[str] = ("torch",),
    model_size: str = "vit-base",
    trained_model: bool = False,
) -> BenchmarkSuite:
    """A suite with the device's defaults where nothing is given.

    CUDA: the GPU suite (`CUDA_CASES`), fp32 and bf16, every case also compiled. CPU: `CPU_CASES` of `model_size`,
    fp32, only `CPU_COMPILED_CASES` compiled (compiling takes minutes there). A trained model (`trained_model`)
    runs the suite's image and batch sizes without the model sizes. A backend that runs an export (`onnxruntime`)
    brings the backends it is compared with (`BACKENDS[name].compared_with`: PyTorch) into the suite, and on a CPU
    its own cases (`ONNX_RUNTIME_CASES`, `ONNX_RUNTIME_COMPILED_CASES` also compiled).
    """
    from .runner import BACKENDS

    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"A benchmark runs on cpu or cuda[:N], got device {device!r}.")
    on_cuda = device_type == "cuda"
    backends = tuple(
        dict.fromkeys(name for backend in backends for name in (*BACKENDS[backend].compared_with, backend))
    )
    exported = "onnxruntime" in backends
    if exported and on_cuda:
        raise ValueError("The onnxruntime backend runs on the CPU (CPUExecutionProvider): use `--device cpu`.")
    default_size = None if trained_model else model_size
    if cases is None:
        cases = CUDA_CASES if on_cuda else ONNX_RUNTIME_CASES if exported else CPU_CASES
        if trained_model:
            cases = tuple(dict.fromkeys(case.rpartition(":")[2] for case in cases))
    parsed = tuple(parse_case(case, default_size, trained_model) for case in cases)
    if compiled_cases is None:
        if on_cuda:
            compiled_cases = [case.label for case in parsed]
        else:
            compiled_cases = ONNX_RUNTIME_COMPILED_CASES if exported else CPU_COMPILED_CASES
    return BenchmarkSuite(
        cases=parsed,
        dtypes=tuple(dict.fromkeys(dtypes or (["fp32", "bf16"] if on_cuda else ["fp32"]))),
        modes=tuple(modes),
        compiled_cases=tuple(parse_case(case, default_size, trained_model) for case in compiled_cases),
        backends=backends,
    )


def speedup_target(batch_size: int, backend: str = "torch", mode: str = "eager", exits: str | None = None) -> float:
    """Speed-up / R to reach: `BATCH_ONE_SPEEDUP_TARGET` at batch 1, `BATCH_SPEEDUP_TARGET` at larger batches;
    ONNX Runtime `ONNX_RUNTIME_SPEEDUP_TARGET` at every batch size, eager PyTorch in capacity mode
    `CAPACITY_EAGER_BATCH_SPEEDUP_TARGET` at larger batches."""
    if backend == "onnxruntime":
        return ONNX_RUNTIME_SPEEDUP_TARGET
    if batch_size == 1:
        return BATCH_ONE_SPEEDUP_TARGET
    return CAPACITY_EAGER_BATCH_SPEEDUP_TARGET if exits == "capacity" and mode == "eager" else BATCH_SPEEDUP_TARGET
