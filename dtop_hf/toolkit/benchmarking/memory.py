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
"""Peak resident memory of one forward pass on a CPU, measured in a fresh process.

A process that has built models and run others keeps their freed memory with the C allocator, which would hide a
forward's growth in reused pages: each measurement runs `python -m dtop_hf.toolkit.benchmarking.memory <json>` and
reads the number it prints.
"""

import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .allocator import release_free_memory


if TYPE_CHECKING:
    from .cases import Case
    from .runner import BenchmarkSettings


SAMPLE_INTERVAL_S = 0.001


def cpu_peak_memory_mb(settings: "BenchmarkSettings", case: "Case", dtype: str, unpruned: bool) -> float:
    """Peak resident-memory growth (MB) of one eager forward of `case`, unpruned or pruned, in a fresh process."""
    spec = {"settings": asdict(settings), "case": asdict(case), "dtype": dtype, "unpruned": unpruned}
    # The child imports this package from where the parent did, whether installed or on a path.
    package_root = str(Path(__file__).resolve().parents[3])
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", __name__, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"The memory probe of {case.label} failed:\n{completed.stderr[-2000:]}")
    return float(completed.stdout.strip().splitlines()[-1])


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_forward_memory(spec: dict) -> float:
    """In the fresh process: peak resident-memory growth (MB) over one forward pass, sampled every millisecond.

    Model construction leaves freed memory with the C allocator; it is handed back first so that the forward pass's
    growth is measured, not hidden in reused pages.
    """
    from .cases import Case
    from .exits import prepare_exits, unpruned_rule
    from .probes import inference_call
    from .runner import BenchmarkSettings, build_benchmark_model, make_images

    settings, case = BenchmarkSettings(**spec["settings"]), Case(**spec["case"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = build_benchmark_model(settings, case.model_size)
    pixel_values = make_images(case.batch_size, case.image_size, settings.seed, settings.device)
    exit_rule, _ = prepare_exits(
        model, pixel_values, settings.exits, settings.exit_rate, settings.seed, settings.exit_capacity,
        settings.target_flops_ratio, settings.capacity_token_multiple,
    )  # fmt: skip
    exit_rule = unpruned_rule(settings.exits) if spec["unpruned"] else exit_rule
    forward = inference_call(lambda: model(pixel_values, **exit_rule), settings.device, spec["dtype"])
    gc.collect()
    release_free_memory()
    start_rss, peak_rss, running = current_rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak_rss[0] = max(peak_rss[0], current_rss_bytes())
            time.sleep(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        forward()
    finally:
        running[0] = False
        sampler.join()
    return max(peak_rss[0] - start_rss, 0) / 2**20


if __name__ == "__main__":
    print(measure_forward_memory(json.loads(sys.argv[1])))
