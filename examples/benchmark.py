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
"""Does DToP's FLOPs saving turn into wall-clock time? Baseline and pruned, side by side, in one process.

For every case (model size, image size, batch size), dtype (fp32, or bf16 under autocast) and mode (eager,
`torch.compile`), the same model runs the same images unpruned (exit threshold 1.0; capacity 1.0 beside capacity
exits, one compiled graph like the pruned run's) and pruned, taking turns, several rounds (a turn: about `--turn_s` of
back-to-back calls, the first untimed, or one call when a call is longer; on CUDA each call is timed with CUDA events
on an idle stream). Per case it prints R = GFLOPs unpruned / GFLOPs pruned (MACs / 1e9, all heads included), the
speed-up (median baseline time / median pruned time), the speed-up as a share of R next to its target, images per
second, the peak memory of both (CUDA: `torch.cuda.max_memory_allocated` over what was allocated before the call; CPU:
resident-memory growth, measured in a fresh process) and, in eager mode, the unpruned model against transformers'
`ViTModel` (sdpa attention) plus the same heads. On a CPU with glibc the C allocator's thresholds are pinned first, so
that times do not depend on the cases before (`--no_steady_allocator` leaves them). Results go to `--output_json`
(default `outputs/benchmark_<device>.json`, outside the tracked files; the records in `docs/` name their files).

    python examples/benchmark.py                        # CPU: ViT-B/16 dims, 512x512 batch 1, 256x256 batch 1 and 8
    python examples/benchmark.py --model_size vit-large # any size of dtop_hf.toolkit.presets.MODEL_SIZES
    python examples/benchmark.py --cases 512x1 512x8 --repeats 7 --output_json bench.json
    python examples/benchmark.py --device cuda --sync_debug   # the GPU suite -> outputs/benchmark_cuda.json
    python examples/benchmark.py --device cuda --dry_run      # what would run, measuring nothing
    bash examples/gpu_benchmark.sh                      # the prepared GPU run: install, tests, benchmark (~9 min)

A case is `[SIZE:]IMAGExBATCH` (`512x8`, or `vit-large:640x8` for another model size than `--model_size`). On CUDA
the default suite is ViT-B/16 at 512 (batch 1, 8, 32) and ViT-L/16 at 640 (batch 1, 8), fp32 and bf16, eager and
compiled. Targets, printed next to every row: speed-up >= 0.9 R at batch 8 and more, >= 0.8 R at batch 1; unpruned
DToP <= 1.05 x (ViTModel + heads). `--sync_debug` (CUDA) counts the device-to-host syncs of one eager forward with
`torch.cuda.set_sync_debug_mode("warn")`, unpruned (allowed: none) and pruned (allowed: one per auxiliary head).

Random-weight models' heads mean nothing, so by default (`--exits paper`) which tokens exit is drawn from a
distribution fitted to the paper's GFLOPs reductions and handed to the model's exit decision (see
`dtop_hf/toolkit/benchmarking/exits.py`); `--exits rate` sets each head's threshold so that `--exit_rate` of the
active tokens exit; `--model_name_or_path FOLDER` benchmarks a trained model at its own thresholds.

Capacity mode, exported: `--backend onnxruntime` (CPU) exports each case's model to ONNX twice, in capacity mode and
unpruned (threshold 1.0), times both files in ONNX Runtime (`--threads` intra-op threads; files in a temporary
folder or `--onnx_dir`), and runs PyTorch eager and compiled in capacity mode on the same cases, so that one table
holds them side by side. Its default cases are ViT-B/16 at 512 and the quick-start size at 96, batch 1 and 8
(compiled: batch 8), its exits `--exits capacity`: the capacities at which every auxiliary head keeps the same
share of the active tokens and R (all heads) is the paper's 1.27 (`--target_flops_ratio`), each kept count then
moved onto a multiple of 16 tokens (`--capacity_token_multiple`, what a deployment would pick), or `--exit_capacity
0.74,0.54`. Targets: speed-up >= 0.9 R in ONNX Runtime at every batch size, >= 0.95 R in eager PyTorch capacity
mode at batch 8. `--repeat_budget_s` lets the quick cases repeat many times and the slow ones three. With `--exits
rate` (or a trained model's own thresholds) the pruned file is the threshold-mode export, which pads every batch to
the tokens of its image that keeps the most.

    python examples/benchmark.py --backend onnxruntime --threads 1 --repeats 21 --repeat_budget_s 60
"""

import json
import sys
from dataclasses import asdict, dataclass, field

import torch

from dtop_hf.configuration_dtop import normalize_exit_capacity
from dtop_hf.toolkit.arguments import ModelArguments, build_parser, parse_arguments
from dtop_hf.toolkit.benchmarking import (
    BACKENDS,
    BenchmarkSettings,
    BenchmarkSuite,
    report_sections,
    resolve_suite,
    run_benchmark,
    write_reports,
)
from dtop_hf.toolkit.benchmarking.cases import DEFAULT_MODES, MODES
from dtop_hf.toolkit.benchmarking.exits import EXIT_SOURCES
from dtop_hf.toolkit.benchmarking.probes import AUTOCAST_DTYPES, DEFAULT_TURN_S
from dtop_hf.toolkit.benchmarking.runner import CAPACITY_TOKEN_MULTIPLE, environment
from dtop_hf.toolkit.presets import MODEL_SIZES


@dataclass
class BenchmarkArguments:
    """What to run and how to measure it."""

    model_size: str = field(
        default="vit-base", metadata={"help": "Model size of cases that name none.", "choices": sorted(MODEL_SIZES)}
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Classes (default 150; quickstart: the built-in scenes'; tiny: 5)."}
    )
    cases: list[str] | None = field(
        default=None,
        metadata={
            "help": "[SIZE:]IMAGExBATCH such as 512x8 vit-large:640x8; default: 512x1 256x1 256x8 (cpu), the GPU "
            "suite (cuda)."
        },
    )
    exits: str | None = field(
        default=None,
        metadata={
            "help": "Where exits come from (see above); default: model for a trained model, rate with --exit_rate, "
            "capacity with --exit_capacity, --target_flops_ratio or --backend onnxruntime, else paper.",
            "choices": EXIT_SOURCES,
        },
    )
    exit_rate: float | None = field(default=None, metadata={"help": "--exits rate: share exiting per head (0.4)."})
    exit_capacity: str | None = field(
        default=None,
        metadata={
            "help": "--exits capacity: fraction of an image's patch tokens still active after each auxiliary head, "
            "'0.5' or one per head '0.74,0.54'; default: solved for --target_flops_ratio."
        },
    )
    target_flops_ratio: float | None = field(
        default=None,
        metadata={"help": "--exits capacity: the R (all heads) the solved capacities reach; default: the paper's."},
    )
    capacity_token_multiple: int = field(
        default=CAPACITY_TOKEN_MULTIPLE,
        metadata={
            "help": "--exits capacity: solved capacities keep a multiple of this many tokens per image (whole tiles "
            "of the matrix kernels); 1: the exact shared share."
        },
    )
    seed: int = field(default=0, metadata={"help": "The run's randomness: random weights, images, drawn exits."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N, or auto (CUDA when available)."})
    backend: list[str] = field(
        default_factory=lambda: ["torch"],
        metadata={
            "help": "What runs the model; onnxruntime (CPU; capacity, rate or model exits) runs torch on the same "
            "cases too.",
            "choices": sorted(BACKENDS),
        },
    )
    dtypes: list[str] | None = field(
        default=None,
        metadata={
            "help": "fp32 and/or bf16 (torch.autocast; weights stay fp32); default: fp32 on cpu, both on cuda.",
            "choices": sorted(AUTOCAST_DTYPES),
        },
    )
    modes: list[str] = field(
        default_factory=lambda: list(DEFAULT_MODES),
        metadata={
            "help": "Plain eager PyTorch and/or torch.compile; reduce-overhead: torch.compile(mode='reduce-overhead', "
            "fullgraph=True), CUDA graphs on a GPU, with --exits capacity (not run by default); session: ONNX Runtime "
            "(--backend onnxruntime).",
            "choices": list(MODES),
        },
    )
    compiled_cases: list[str] | None = field(
        default=None,
        metadata={
            "help": "Cases also run compiled (and reduce-overhead), in this order; default: 256x8 on cpu (compiling "
            "takes minutes), the batch-8 cases with --backend onnxruntime, all on cuda."
        },
    )
    repeats: int = field(default=3, metadata={"help": "Rounds; in each, every variant takes a turn of timed calls."})
    repeat_budget_s: float | None = field(
        default=None,
        metadata={"help": "Per run, stop repeating once the timed calls took this long (at least 3 rounds)."},
    )
    turn_s: float = field(
        default=DEFAULT_TURN_S,
        metadata={
            "help": "Seconds of back-to-back calls per variant and round, the first untimed (it re-warms the caches "
            "the other variants evicted); a longer call is a turn by itself; 0: one call per variant and round."
        },
    )
    warmup: int = field(default=1, metadata={"help": "Untimed runs per variant first."})
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads and ONNX Runtime intra-op threads (default: theirs)."}
    )
    onnx_dir: str | None = field(
        default=None, metadata={"help": "--backend onnxruntime: where the exports go (default: a temporary folder)."}
    )
    time_budget_s: float | None = field(default=None, metadata={"help": "Start no case after this; list the rest."})
    no_memory: bool = field(default=False, metadata={"help": "Skip the peak-memory probes (CPU: subprocesses)."})
    no_vit_reference: bool = field(default=False, metadata={"help": "Skip the transformers ViTModel comparison."})
    sync_debug: bool = field(default=False, metadata={"help": "CUDA: count device-to-host syncs per forward."})
    no_steady_allocator: bool = field(
        default=False,
        metadata={
            "help": "CPU: leave glibc's malloc thresholds to its own rule (times then depend on the runs before; "
            "by default they are pinned, see dtop_hf/toolkit/benchmarking/allocator.py)."
        },
    )
    output_json: str | None = field(default=None, metadata={"help": "Default outputs/benchmark_<device>.json."})
    output_markdown: str | None = field(default=None, metadata={"help": "Also write the tables as Markdown."})
    dry_run: bool = field(default=False, metadata={"help": "Print the settings and runs as JSON; measure nothing."})

    def __post_init__(self):
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"`--time_budget_s` must be > 0, got {self.time_budget_s}.")
        if self.output_json is None:
            exported = "" if self.backend == ["torch"] else "_".join(sorted(set(self.backend) - {"torch"})) + "_"
            self.output_json = f"outputs/benchmark_{exported}{torch.device(self.device).type}.json"
        if self.exit_capacity is not None:
            capacity = normalize_exit_capacity(self.exit_capacity)
            self.exit_capacity = list(capacity) if isinstance(capacity, tuple) else [capacity]

    def settings(self, model_name_or_path: str | None) -> BenchmarkSettings:
        # A backend that cannot run the drawn paper exits (an export) makes capacity mode the suite's default exits.
        no_paper_exits = any("paper" not in BACKENDS[name].exit_sources for name in self.backend)
        return BenchmarkSettings(
            device=self.device, seed=self.seed, model_name_or_path=model_name_or_path, num_labels=self.num_labels,
            exits=self.exits or ("capacity" if no_paper_exits else None), exit_rate=self.exit_rate,
            exit_capacity=self.exit_capacity, target_flops_ratio=self.target_flops_ratio,
            capacity_token_multiple=self.capacity_token_multiple, repeats=self.repeats,
            warmup=self.warmup, repeat_budget_s=self.repeat_budget_s, turn_s=self.turn_s,
            measure_memory=not self.no_memory, vit_reference=not self.no_vit_reference, sync_debug=self.sync_debug,
            threads=self.threads, steady_allocator=not self.no_steady_allocator, onnx_dir=self.onnx_dir,
        )  # fmt: skip

    def suite(self, model_name_or_path: str | None) -> BenchmarkSuite:
        return resolve_suite(
            self.device, self.cases, self.compiled_cases, self.dtypes, self.modes, self.backend, self.model_size,
            trained_model=model_name_or_path is not None,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns its records (none with `--dry_run`)."""
    parser = build_parser((ModelArguments, BenchmarkArguments), description=__doc__.split("\n\n")[0])
    model_args, arguments = parse_arguments(parser, argv)  # old `--preset SIZE`, `--model`: with a warning
    settings = arguments.settings(model_args.model_name_or_path)
    plan = arguments.suite(model_args.model_name_or_path).plan()
    if arguments.dry_run:
        outputs = {"output_json": arguments.output_json, "output_markdown": arguments.output_markdown}
        print(json.dumps({"settings": asdict(settings), "runs": [asdict(run) for run in plan], **outputs}, indent=1))
        return []
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"`--device {settings.device}` needs a CUDA build of torch and a GPU; none is available here."
        )

    setting = environment(settings.device)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"`python examples/benchmark.py {command}` on {setting['device_name']} (torch {setting['torch']}, "
        f"transformers {setting['transformers']}); exits: {settings.exits}."
    )

    def write(records: list[dict], skipped: list[str]) -> None:  # after every case: a run cut short keeps its data
        write_reports(records, skipped, arguments.output_json, arguments.output_markdown, header)

    records, skipped = run_benchmark(settings, plan, arguments.time_budget_s, on_record=write)
    write(records, skipped)
    print("\n\n".join(report_sections(records, skipped)))
    return records


if __name__ == "__main__":
    main()
