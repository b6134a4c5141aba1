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
"""Run a benchmark: build the models once, then for every run time the unpruned and the pruned model on the same
images, taking turns, and record R, the speed-up, throughput, memory and (on request) device syncs.

A backend turns a run into the calls to time: `torch` (eager or `torch.compile`) here; another backend (an exported
model in another runtime, such as `onnx_backend`'s `onnxruntime`) registers a class with the same `name`, `modes`,
`exit_sources`, `compared_with` and `prepare` in `BACKENDS`.
"""

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers

from dtop_hf import DToPConfig, DToPForSemanticSegmentation

from ..data.synthetic_scenes import NUM_SYNTHETIC_CLASSES
from ..evaluation.flops import (
    capacity_flops_ratio,
    capacity_token_counts,
    count_flops_from_outputs,
    flops_from_capacities,
)
from ..presets import model_size_kwargs
from .allocator import allocator_regime, steady_allocator
from .cases import (
    ALLOWED_UNPRUNED_SYNCS,
    COMPILED_MODES,
    TORCH_MODES,
    VIT_REFERENCE_TARGET,
    BenchmarkRun,
    speedup_target,
)
from .exits import EXIT_SOURCES, UNPRUNED, ExitSource, SimulatedExitsSegmenter, prepare_exits, unpruned_rule
from .memory import cpu_peak_memory_mb
from .probes import (
    DEFAULT_TURN_S,
    allow_recompiles,
    autocast_context,
    compiled_graph_count,
    count_device_syncs,
    cuda_peak_memory_mb,
    inference_call,
    synchronize,
    time_rounds,
)


# Random-weight models have ADE20K's 150 classes, except the sizes made for other data: the quick-start size has the
# built-in scenes' classes (the model the quick start trains), the tiny smoke-test size 5.
DEFAULT_NUM_LABELS = 150
MODEL_SIZE_NUM_LABELS = {"quickstart": NUM_SYNTHETIC_CLASSES, "tiny": 5}
DEFAULT_EXIT_RATE = 0.4
# Solved capacities keep a multiple of 16 tokens per image: one AVX-512 register of float32 lanes, and a whole
# tensor-core tile on a GPU. At the quick-start size on this project's CPU, 128 / 96 kept tokens instead of the exact
# 122 / 103 took eager capacity mode from 0.94-0.95 R to 0.96-0.97 at batch 8, side by side (docs/benchmarks.md).
CAPACITY_TOKEN_MULTIPLE = 16


def print_line(text: str) -> None:
    """The default progress report: stdout, at once (a long GPU run is followed in its log)."""
    print(text, flush=True)


@dataclass
class BenchmarkSettings:
    """How every run of a benchmark is measured.

    Args:
        device: `cpu`, `cuda` or `cuda:N`.
        seed: seed of the random weights, the images and the drawn exits.
        model_name_or_path: a trained DToP folder or Hub id, benchmarked at its own thresholds; `None`: random
            weights of each case's model size.
        num_labels: classes of the random-weight models (default 150; `quickstart`: the built-in scenes' classes;
            `tiny`: 5).
        exits: where exits come from (`paper`, `rate`, `model`, `capacity`; see `exits.py`); default: `model` for a
            trained model, `rate` when `exit_rate` is given, `capacity` when `exit_capacity` or `target_flops_ratio`
            is, else `paper`.
        exit_rate: the share of active tokens that `rate` exits let go at each head (default 0.4).
        exit_capacity: `capacity` exits: the share of an image's patch tokens still active after each auxiliary
            head; default: the capacities that reach `target_flops_ratio`.
        target_flops_ratio: `capacity` exits: the R (all heads) the solved capacities reach in every case (default:
            the paper's, `exits.paper_flops_ratio`).
        capacity_token_multiple: `capacity` exits: the solved capacities keep a multiple of this many tokens per
            image after every head (a whole number of the matrix kernels' row tiles; see
            `exits.aligned_capacities`); 1: the exact shared share. Given capacities are used as they are.
        repeats: rounds per run; in each, every variant takes a turn of timed calls (see `turn_s`).
        repeat_budget_s: per run, stop repeating once the timed calls took this long (never below three rounds);
            `None`: always `repeats`.
        turn_s: seconds of back-to-back calls of a variant per round, the first (re-warming the caches that the
            other variants' calls evicted) untimed; a call this long or longer is a turn by itself. 0: one call per
            variant and round (see `probes.time_rounds`).
        warmup: untimed calls per variant first.
        measure_memory: measure the peak memory of a forward (CPU: in a fresh process).
        vit_reference: time transformers' `ViTModel` with the same heads next to the unpruned model (eager).
        sync_debug: count the device-to-host syncs of one eager forward (CUDA).
        threads: torch's CPU threads and ONNX Runtime's intra-op threads (`None`: each library's choice).
        steady_allocator: on a CPU with glibc, pin the C allocator's mmap and trim thresholds before timing, so that
            times do not depend on which runs came before (see `allocator.py`); False: glibc's own rule.
        onnx_dir: where the `onnxruntime` backend writes its exports (`None`: a temporary folder).
    """

    device: str = "cpu"
    seed: int = 0
    model_name_or_path: str | None = None
    num_labels: int | None = None
    exits: ExitSource | None = None
    exit_rate: float | None = None
    exit_capacity: list[float] | None = None
    target_flops_ratio: float | None = None
    capacity_token_multiple: int = CAPACITY_TOKEN_MULTIPLE
    repeats: int = 3
    warmup: int = 1
    repeat_budget_s: float | None = None
    turn_s: float = DEFAULT_TURN_S
    measure_memory: bool = True
    vit_reference: bool = True
    sync_debug: bool = False
    threads: int | None = None
    steady_allocator: bool = True
    onnx_dir: str | None = None

    def __post_init__(self):
        trained = self.model_name_or_path is not None
        capacity_given = self.exit_capacity is not None or self.target_flops_ratio is not None
        if self.exits is None and capacity_given:
            self.exits = "capacity"
        elif self.exits is None:
            self.exits = "model" if trained else "rate" if self.exit_rate is not None else "paper"
        if self.exits not in EXIT_SOURCES:
            raise ValueError(f"`exits` must be one of {EXIT_SOURCES}, got {self.exits!r}.")
        if self.exits != "capacity" and trained != (self.exits == "model"):
            raise ValueError(
                "A trained model (`model_name_or_path`) runs at its own thresholds, `exits='model'` (or in capacity "
                "mode, `exits='capacity'`), and random weights cannot (their thresholds mean nothing): got exits "
                f"{self.exits!r}, model {self.model_name_or_path!r}."
            )
        if capacity_given and self.exits != "capacity":
            raise ValueError(
                f"`exit_capacity` and `target_flops_ratio` apply to `exits='capacity'`, got {self.exits!r}."
            )
        if self.exit_capacity is not None and self.target_flops_ratio is not None:
            raise ValueError(
                "Give `exit_capacity` or `target_flops_ratio` (the capacities are solved for it), not both."
            )
        if self.capacity_token_multiple < 1:
            raise ValueError(f"`capacity_token_multiple` must be >= 1, got {self.capacity_token_multiple}.")
        if self.exits == "rate" and self.exit_rate is None:
            self.exit_rate = DEFAULT_EXIT_RATE
        if self.exit_rate is not None and not 0.0 <= self.exit_rate < 1.0:
            raise ValueError(f"`exit_rate` must be in [0, 1), got {self.exit_rate}.")
        if self.sync_debug and torch.device(self.device).type != "cuda":
            raise ValueError("`sync_debug` counts CUDA syncs (torch.cuda.set_sync_debug_mode): it needs device cuda.")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"`repeats` must be >= 1 and `warmup` >= 0, got {self.repeats} and {self.warmup}.")
        if self.turn_s < 0:
            raise ValueError(f"`turn_s` must be >= 0, got {self.turn_s}.")
        if self.repeat_budget_s is not None and self.repeat_budget_s <= 0:
            raise ValueError(f"`repeat_budget_s` must be > 0, got {self.repeat_budget_s}.")


def build_benchmark_model(settings: BenchmarkSettings, model_size: str | None) -> DToPForSemanticSegmentation:
    """The trained model of `settings`, or a random-weight [`SimulatedExitsSegmenter`] of `model_size`, on the
    device, in eval mode."""
    torch.manual_seed(settings.seed)
    if settings.model_name_or_path:
        return DToPForSemanticSegmentation.from_pretrained(settings.model_name_or_path).eval().to(settings.device)
    num_labels = settings.num_labels or MODEL_SIZE_NUM_LABELS.get(model_size, DEFAULT_NUM_LABELS)
    with torch.device(settings.device):  # initialised in place: ViT-L's 300M weights are slow to draw on a CPU
        model = SimulatedExitsSegmenter(DToPConfig(**model_size_kwargs(model_size), num_labels=num_labels))
    return model.eval()


def make_images(batch_size: int, image_size: int, seed: int, device: str) -> torch.Tensor:
    """Mixed batch, normalised: even images smooth (large easy regions), odd images textured (hard)."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for index in range(batch_size):
        coarse = torch.randn(1, 3, 4 + 4 * (index % 3), 4 + 4 * (index % 3), generator=generator)
        image = torch.nn.functional.interpolate(
            coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
        )
        if index % 2:
            image = image + 0.8 * torch.randn(1, 3, image_size, image_size, generator=generator)
        images.append(image)
    return torch.cat(images).to(device)


def vit_reference(model: DToPForSemanticSegmentation, device: str) -> Callable[[torch.Tensor], None]:
    """transformers' ViTModel (sdpa attention) at the same dims, plus our stage heads run on all of its tokens."""
    from transformers import ViTConfig, ViTModel

    from dtop_hf.pruning import pack_tokens

    config = model.config
    vit_config = ViTConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        image_size=config.image_size, patch_size=config.patch_size, layer_norm_eps=config.layer_norm_eps,
        attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):
        vit = ViTModel(vit_config, add_pooling_layer=False).eval()
    heads = model.dtop.heads

    @torch.no_grad()
    def run(pixel_values: torch.Tensor) -> None:
        hidden_states = vit(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        batch_size, num_tokens = hidden_states[0].shape[0], hidden_states[0].shape[1] - 1
        packing = pack_tokens(torch.ones(batch_size, num_tokens, dtype=torch.bool, device=pixel_values.device))
        for head, layer_index in zip(heads, config.out_indices):
            head(hidden_states[layer_index + 1][:, 1:].reshape(batch_size * num_tokens, -1), packing)

    return run


def cuda_graph_step(function: Callable[..., object]) -> Callable[..., object]:
    """`function` called as a new step of torch.compile's CUDA graphs, so that a replay may overwrite the outputs of
    earlier calls (never read again here) instead of refusing to."""

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return function(*args, **kwargs)

    return call


class BenchmarkModels:
    """The models of a benchmark, each built once: the DToP model per size, its compiled form, the ViTModel
    reference, and what other backends build from them (`artifacts`, such as exported files and their sessions, by
    a key of the backend's choosing). `progress` receives a line per model built."""

    def __init__(self, settings: BenchmarkSettings, progress: Callable[[str], None] = print_line):
        self.settings, self.progress = settings, progress
        self.models, self.compiled_models, self.references, self.artifacts = {}, {}, {}, {}

    def model(self, model_size: str | None) -> DToPForSemanticSegmentation:
        if model_size not in self.models:
            model = self.models[model_size] = build_benchmark_model(self.settings, model_size)
            self.progress(
                f"model {self.settings.model_name_or_path or model_size}: "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, attention "
                f"{model.config._attn_implementation}, exit thresholds "
                f"{list(model.config.exit_thresholds_per_head(None)[:-1])}"
            )
        return self.models[model_size]

    def compiled(self, model_size: str | None, mode: str = "compiled") -> Callable:
        """`compiled`: one dynamic-shape compile that serves every token count (threshold exits included);
        `reduce-overhead`: capacity mode's single static graph, replayed as a CUDA graph on a GPU."""
        if (model_size, mode) not in self.compiled_models:
            model = self.model(model_size)
            self.compiled_models[model_size, mode] = (
                torch.compile(model, dynamic=True)
                if mode == "compiled"
                else torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
            )
        return self.compiled_models[model_size, mode]

    def vit_reference(self, model_size: str | None) -> Callable[[torch.Tensor], None]:
        if model_size not in self.references:
            self.references[model_size] = vit_reference(self.model(model_size), self.settings.device)
        return self.references[model_size]


@dataclass
class TimedCalls:
    """What a backend hands the benchmark for one run: zero-argument calls by name (`baseline`: unpruned, `pruned`,
    and any reference such as `vit_plus_heads`), what preparing them measured, and what to add after timing."""

    calls: dict[str, Callable[[], object]]
    record: dict = field(default_factory=dict)
    after_timing: Callable[[], dict] = dict


class TorchBackend:
    """The PyTorch model itself, eager or through `torch.compile` (`compiled`, or `reduce-overhead`: CUDA graphs on a
    GPU; both variants compiled before timing).

    Attributes:
        name: the backend's name in `BACKENDS` and on the command line.
        modes: the ways it runs a model, in run order.
        exit_sources: the exit sources (`exits.EXIT_SOURCES`) it can run.
        compared_with: backends a suite with this one also runs, on the same cases and exits.
    """

    name = "torch"
    modes = TORCH_MODES
    exit_sources = EXIT_SOURCES
    compared_with = ()

    def prepare(
        self,
        settings: BenchmarkSettings,
        models: BenchmarkModels,
        run: BenchmarkRun,
        pixel_values: torch.Tensor,
        exit_rule: dict,
    ) -> TimedCalls:
        """The calls to time: `exit_rule` is the pruned calls' keyword arguments of the forward (from
        `prepare_exits`); the baseline's are `unpruned_rule`'s (capacity 1.0 beside capacity exits, else threshold
        1.0)."""
        model_size, device, dtype = run.case.model_size, settings.device, run.dtype
        runner = models.model(model_size) if run.mode == "eager" else models.compiled(model_size, run.mode)
        if run.mode == "reduce-overhead":
            runner = cuda_graph_step(runner)
        baseline_rule = unpruned_rule(settings.exits)
        calls = {
            "baseline": inference_call(lambda: runner(pixel_values, **baseline_rule), device, dtype),
            "pruned": inference_call(lambda: runner(pixel_values, **exit_rule), device, dtype),
        }
        if run.mode == "eager" and settings.vit_reference:
            reference = models.vit_reference(model_size)
            calls["vit_plus_heads"] = inference_call(lambda: reference(pixel_values), device, dtype)
        if run.mode == "eager":
            return TimedCalls(calls)
        graphs_before, compile_start = compiled_graph_count(), time.perf_counter()
        # Compile both variants before timing; CUDA graphs are recorded on a variant's second call.
        for _ in range(2 if run.mode == "reduce-overhead" else 1):
            calls["baseline"](), calls["pruned"]()
        synchronize(device)
        record = {
            "compile_seconds": time.perf_counter() - compile_start,
            "graphs_compiled": compiled_graph_count() - graphs_before,
        }
        graphs_before = compiled_graph_count()
        # 0: the token counts of the timed calls reused the graphs compiled above.
        return TimedCalls(
            calls, record, lambda: {"graphs_compiled_while_timing": compiled_graph_count() - graphs_before}
        )

    @staticmethod
    def cpu_peak_memory_mb(settings: BenchmarkSettings, run: BenchmarkRun, unpruned: bool) -> float:
        return cpu_peak_memory_mb(settings, run.case, run.dtype, unpruned)


BACKENDS = {TorchBackend.name: TorchBackend}


def environment(device: str) -> dict:
    on_cuda = device.startswith("cuda")
    host = {} if on_cuda else allocator_regime()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "load_average_1_5_15_min": list(os.getloadavg()),  # a shared machine's other work, as each run ended
        **host,
    }


def capacity_flops_record(
    config: DToPConfig, image_size: tuple[int, int], capacities: list[float], batch_size: int
) -> dict:
    """What [`flops_record`] counts, for capacity mode from the capacities and the input size alone: every image
    keeps the same tokens, so no forward is needed (R from `capacity_flops_ratio`)."""
    tokens_per_layer = capacity_token_counts(config, image_size, capacities)[0][0]
    baseline, pruned = (flops_from_capacities(config, image_size, capacity) for capacity in (1.0, capacities))
    return {
        "tokens_per_layer_mean": tokens_per_layer.float().tolist(),
        "tokens_last_layer_per_image": [int(tokens_per_layer[-1])] * batch_size,
        "gflops_baseline_per_image": float(baseline.total),
        "gflops_pruned_per_image": float(pruned.total),
        "flops_ratio": capacity_flops_ratio(config, image_size, capacities),
        "flops_ratio_backbone_and_final_head": capacity_flops_ratio(
            config, image_size, capacities, "backbone_and_final_head"
        ),
    }


def flops_record(model: DToPForSemanticSegmentation, pixel_values: torch.Tensor, exit_rule: dict, dtype: str) -> dict:
    """GFLOPs and token counts of one eager forward, unpruned and pruned: R = GFLOPs unpruned / pruned."""
    if exit_rule.get("exit_mode") == "capacity":
        image_size, batch_size = tuple(pixel_values.shape[-2:]), pixel_values.shape[0]
        return capacity_flops_record(model.config, image_size, exit_rule["exit_capacity"], batch_size)
    device = str(pixel_values.device)
    with torch.no_grad(), autocast_context(device, dtype):
        baseline_outputs = model(pixel_values, **UNPRUNED)
        pruned_outputs = model(pixel_values, **exit_rule)
    baseline_flops = count_flops_from_outputs(model.config, baseline_outputs)
    pruned_flops = count_flops_from_outputs(model.config, pruned_outputs)
    return {
        "tokens_per_layer_mean": pruned_outputs.tokens_per_layer.float().mean(dim=0).tolist(),
        "tokens_last_layer_per_image": pruned_outputs.tokens_per_layer[:, -1].tolist(),
        "gflops_baseline_per_image": float(baseline_flops.total.mean()),
        "gflops_pruned_per_image": float(pruned_flops.total.mean()),
        "flops_ratio": float(baseline_flops.total.sum() / pruned_flops.total.sum()),
        "flops_ratio_backbone_and_final_head": float(
            baseline_flops.backbone_and_final_head.sum() / pruned_flops.backbone_and_final_head.sum()
        ),
    }


def timing_record(
    medians: dict[str, float],
    batch_size: int,
    flops_ratio: float,
    run: BenchmarkRun | None = None,
    exits: ExitSource | None = None,
) -> dict:
    """Times, speed-up and throughput from the median seconds per call, held to the targets of the run's backend,
    mode and exits."""
    backend, mode = (run.backend, run.mode) if run is not None else ("torch", "eager")
    record = {
        "baseline_seconds": medians["baseline"],
        "pruned_seconds": medians["pruned"],
        "speedup": medians["baseline"] / medians["pruned"],
        "images_per_second": {name: batch_size / medians[name] for name in ("baseline", "pruned")},
        "speedup_target": speedup_target(batch_size, backend, mode, exits),
    }
    record["speedup_over_flops_ratio"] = record["speedup"] / flops_ratio
    record["meets_speedup_target"] = record["speedup_over_flops_ratio"] >= record["speedup_target"]
    if "vit_plus_heads" in medians:
        record["vit_plus_heads_seconds"] = medians["vit_plus_heads"]
        record["baseline_over_vit_plus_heads"] = medians["baseline"] / medians["vit_plus_heads"]
        record["meets_vit_reference_target"] = record["baseline_over_vit_plus_heads"] <= VIT_REFERENCE_TARGET
    return record


def sync_record(calls: dict[str, Callable[[], object]], num_heads: int) -> dict:
    """Device-to-host syncs of one unpruned and one pruned call, against what is allowed."""
    syncs = {
        "unpruned": count_device_syncs(calls["baseline"]),
        "pruned": count_device_syncs(calls["pruned"]),
        "allowed_unpruned": ALLOWED_UNPRUNED_SYNCS,
        "allowed_pruned": num_heads - 1,
    }
    within = [syncs[name]["count"] <= syncs[f"allowed_{name}"] for name in ("unpruned", "pruned")]
    return {"device_syncs_per_forward": syncs, "meets_sync_target": all(within)}


def memory_record(settings: BenchmarkSettings, run: BenchmarkRun, calls: dict[str, Callable[[], object]]) -> dict:
    """Peak memory of one unpruned and one pruned call (CUDA: on top of what was resident; CPU: resident-memory
    growth in a fresh process)."""
    names = ("baseline", "pruned")
    if settings.device.startswith("cuda"):
        peaks = {name: cuda_peak_memory_mb(calls[name]) for name in names}
        return {
            "peak_memory_mb": {name: peak[0] for name, peak in peaks.items()},
            "peak_memory_total_mb": {name: peak[1] for name, peak in peaks.items()},
        }
    probe = getattr(BACKENDS[run.backend], "cpu_peak_memory_mb", None)
    if probe is None:  # the backend has no CPU memory probe
        return {}
    return {"peak_memory_mb": {name: probe(settings, run, name == "baseline") for name in names}}


def benchmark_run(settings: BenchmarkSettings, models: BenchmarkModels, run: BenchmarkRun) -> dict:
    """Measure one run: the record written to the results."""
    case = run.case
    model = models.model(case.model_size)
    pixel_values = make_images(case.batch_size, case.image_size, settings.seed, settings.device)
    exit_rule, exit_record = prepare_exits(
        model, pixel_values, settings.exits, settings.exit_rate, settings.seed, settings.exit_capacity,
        settings.target_flops_ratio, settings.capacity_token_multiple,
    )  # fmt: skip
    flops = flops_record(model, pixel_values, exit_rule, run.dtype)
    timed = BACKENDS[run.backend]().prepare(settings, models, run, pixel_values, exit_rule)
    exit_mode, exit_values = model.config.exit_rule(**exit_rule)
    record = {
        "model": settings.model_name_or_path or case.model_size,
        "image_size": case.image_size,
        "batch_size": case.batch_size,
        "backend": run.backend,
        "mode": run.mode,
        "dtype": run.dtype,
        "device": settings.device,
        "exit_capacity" if exit_mode == "capacity" else "exit_threshold": list(exit_values[:-1]),
        **exit_record,
        **timed.record,
    }
    times = time_rounds(
        timed.calls, settings.repeats, settings.warmup, settings.device, settings.repeat_budget_s, settings.turn_s
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    record["times_seconds"] = times
    record["turn_s"] = settings.turn_s
    record.update(timed.after_timing())
    record.update(flops)
    record.update(timing_record(medians, case.batch_size, flops["flops_ratio"], run, settings.exits))
    if settings.sync_debug and run.mode == "eager":
        record.update(sync_record(timed.calls, len(model.config.out_indices)))
    if settings.measure_memory:
        record.update(memory_record(settings, run, timed.calls))
    record["environment"] = environment(settings.device)
    return record


def run_benchmark(
    settings: BenchmarkSettings,
    plan: list[BenchmarkRun],
    time_budget_s: float | None = None,
    on_record: Callable[[list[dict], list[str]], None] | None = None,
    progress: Callable[[str], None] = print_line,
) -> tuple[list[dict], list[str]]:
    """Measure the runs of `plan` in order; returns the records and the labels of the runs skipped because they
    would have started after `time_budget_s`.

    Args:
        settings: how to measure.
        plan: from [`benchmark_plan`].
        time_budget_s: start no run after this many seconds.
        on_record: called with (records, skipped) after every run, e.g. to write the reports so that a run cut
            short keeps what it measured.
        progress: receives a line on the machine, one per model built and one per run.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.steady_allocator and torch.device(settings.device).type == "cpu":
        steady_allocator()
    setting = environment(settings.device)
    progress(
        f"device {setting['device_name']}, torch {setting['torch']}, transformers {setting['transformers']}, "
        f"{setting['threads']} threads, fp32 matmul precision {setting['float32_matmul_precision']}, exits "
        f"{settings.exits}" + (f", C allocator: {setting['cpu_allocator']}" if "cpu_allocator" in setting else "")
    )
    if any(run.mode in COMPILED_MODES for run in plan):
        allow_recompiles()
    if settings.exits != "capacity" and any(run.mode == "reduce-overhead" for run in plan):
        raise ValueError(
            "The reduce-overhead mode compiles the whole model into one static graph (CUDA graphs on a GPU), which "
            "only capacity mode has: pass `--exits capacity`."
        )
    for name in dict.fromkeys(run.backend for run in plan):  # before any model is built
        sources = BACKENDS[name].exit_sources
        if settings.exits not in sources:
            raise ValueError(
                f"The {name} backend cannot run {settings.exits!r} exits, only {', '.join(sources)} "
                f"(`--exits {sources[0]}`)."
            )
    models, records, skipped, start = BenchmarkModels(settings, progress), [], [], time.perf_counter()
    for run in plan:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            skipped.append(run.label)
            continue
        record = benchmark_run(settings, models, run)
        records.append(record)
        if on_record is not None:
            on_record(records, skipped)
        progress(
            f"[{run.label}] R {record['flops_ratio']:.2f}, speed-up {record['speedup']:.2f} "
            f"({record['speedup_over_flops_ratio']:.2f} R, target {record['speedup_target']}), "
            f"{time.perf_counter() - start:.0f} s so far"
        )
    return records, skipped
