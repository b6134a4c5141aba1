#!/usr/bin/env bash
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
#
# The GPU benchmark in one shot, from the repository root of a machine with one CUDA GPU:
#
#     bash examples/gpu_benchmark.sh [--wheels DIR] [--copy_to DIR] [--budget_s SECONDS] [--capacity_budget_s SECONDS]
#                                    [--dry_run]
#
# 1. Installs this package without its dependencies (the machine's torch stays as it is) and, when the installed
#    transformers is not $TRANSFORMERS_VERSION, that version: offline from the wheels in DIR (--wheels), else from
#    PyPI. Nothing else is installed.
# 2. Runs the CPU tests of the GPU path (-k "sync or compile or varlen" in the model, pruning and benchmark tests;
#    CUDA-only tests run there too), within a time limit; a failure is reported and the benchmark still runs.
# 3. Runs capacity mode (the capacities of the paper's R, ViT-B/16 512, batch 1 and 8, bf16) eager and under CUDA
#    graphs (torch.compile(mode="reduce-overhead", fullgraph=True)), with --sync_debug, within --capacity_budget_s
#    (default 150 s, part of --budget_s; 0 skips this step): docs/benchmark_cuda_capacity.json and .md.
# 4. Runs examples/benchmark.py --device cuda --sync_debug on the GPU suite (ViT-B/16 512 batch 1, 8, 32;
#    ViT-L/16 640 batch 1, 8; bf16 and fp32; eager, then compiled), writing docs/benchmark_cuda.json, the tables in
#    docs/benchmark_cuda.md and the whole log in docs/benchmark_cuda.log; --copy_to DIR copies them all there.
# Everything ends within --budget_s (default 550 s, inside a 10-minute slot on an H200): eager runs first, then the
# compiled ones; a case that would start after the budget is listed as skipped, and the JSON and Markdown are
# rewritten after every case, so a run cut short keeps what it measured.
set -uo pipefail

TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.24.0}"  # the version the CPU tests pass with (setup.cfg: >=5.23,<6)
PYTHON="${PYTHON:-python3}"
WHEELS="" COPY_TO="" BUDGET_S=550 CAPACITY_BUDGET_S=150 DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --copy_to) COPY_TO="$2"; shift 2 ;;
        --budget_s) BUDGET_S="$2"; shift 2 ;;
        --capacity_budget_s) CAPACITY_BUDGET_S="$2"; shift 2 ;;
        --dry_run) DRY_RUN=1; shift ;;
        *) echo "unknown argument: $1 (expected --wheels DIR, --copy_to DIR, --budget_s SECONDS," \
                "--capacity_budget_s SECONDS, --dry_run)" >&2
           exit 2 ;;
    esac
done
TESTS_LIMIT_S=150      # the CPU tests' share of the budget
REPORT_MARGIN_S=45     # left after the last case starts for it to finish and for the tables

run() {  # print a command, then run it unless --dry_run
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}

mkdir -p docs
LOG=docs/benchmark_cuda.log
[ "$DRY_RUN" = 1 ] || exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1

echo "== 1. install"
run "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . \
    || { echo "editable install failed: using PYTHONPATH"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
installed="$("$PYTHON" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo none)"
if [ "$installed" != "$TRANSFORMERS_VERSION" ]; then
    echo "transformers $installed installed, $TRANSFORMERS_VERSION wanted"
    if [ -n "$WHEELS" ]; then
        run "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
            "transformers==$TRANSFORMERS_VERSION"
    else
        run "$PYTHON" -m pip install --quiet "transformers==$TRANSFORMERS_VERSION"  # its requirements hold no torch
    fi
fi
[ "$DRY_RUN" = 1 ] || "$PYTHON" -c 'import torch, transformers, dtop_hf
gpu = torch.cuda.is_available() and torch.cuda.get_device_name()
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", gpu)
print("transformers", transformers.__version__, "dtop_hf", dtop_hf.__version__, "from", dtop_hf.__file__)' \
    || { echo "the package does not import: stopping"; exit 1; }

echo "== 2. tests of the GPU path"
run timeout "$TESTS_LIMIT_S" "$PYTHON" -m pytest -q -p no:cacheprovider -k "sync or compile or varlen" \
    tests/test_modeling_dtop.py tests/test_pruning.py tests/test_benchmark.py
echo "tests: exit status $? (0 passed, 5 none selected, 124 cut at ${TESTS_LIMIT_S} s)"

echo "== 3. capacity mode, eager and under CUDA graphs"
if [ "$CAPACITY_BUDGET_S" -gt 0 ]; then  # its last case may finish up to 90 s after its budget
    run timeout "$((CAPACITY_BUDGET_S + 90))" "$PYTHON" examples/benchmark.py --device cuda --sync_debug \
        --exits capacity --cases vit-base:512x8 vit-base:512x1 --dtypes bf16 --modes eager reduce-overhead \
        --compiled_cases vit-base:512x8 vit-base:512x1 --repeats 15 --warmup 3 --no_vit_reference \
        --time_budget_s "$CAPACITY_BUDGET_S" \
        --output_json docs/benchmark_cuda_capacity.json --output_markdown docs/benchmark_cuda_capacity.md
    echo "capacity benchmark: exit status $? (124: cut at its budget)"
else
    echo "skipped (--capacity_budget_s 0)"
fi

echo "== 4. benchmark"
left=$((BUDGET_S - SECONDS))
run timeout "$((left > 60 ? left : 60))" "$PYTHON" examples/benchmark.py --device cuda --sync_debug \
    --cases vit-base:512x1 vit-base:512x8 vit-base:512x32 vit-large:640x1 vit-large:640x8 \
    --dtypes bf16 fp32 --modes eager compiled \
    --compiled_cases vit-base:512x8 vit-base:512x32 vit-large:640x8 vit-base:512x1 vit-large:640x1 \
    --repeats 15 --warmup 3 --time_budget_s "$((left - REPORT_MARGIN_S > 30 ? left - REPORT_MARGIN_S : 30))" \
    --output_json docs/benchmark_cuda.json --output_markdown docs/benchmark_cuda.md
status=$?
echo "benchmark: exit status $status (124: cut at the budget; the JSON holds every case finished before)"
echo "total: $SECONDS s"

if [ -n "$COPY_TO" ] && [ "$DRY_RUN" = 0 ]; then
    mkdir -p "$COPY_TO"
    cp docs/benchmark_cuda.json docs/benchmark_cuda.md docs/benchmark_cuda_capacity.json \
        docs/benchmark_cuda_capacity.md "$COPY_TO"/ 2>/dev/null
    sleep 1  # let tee write the log's last lines
    cp "$LOG" "$COPY_TO"/
fi
exit "$status"
