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
"""Probes of one benchmarked call: its time, its peak CUDA memory, its device-to-host syncs, and the compiler's
graph count. Each takes a zero-argument callable, so that any backend's forward can be measured alike."""

import collections
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# torch's sync debug mode warns "called a synchronizing CUDA operation" at every device-to-host sync.
SYNC_WARNING_TEXT = "synchronizing"
# A median of fewer timed rounds is hardly a median: a time budget never cuts a run below this.
MIN_BUDGET_REPEATS = 3
# Seconds of back-to-back calls per function and round in the benchmarks (see `time_rounds`): a few dozen calls of a
# 3 ms model, one call of a ViT-B/16.
DEFAULT_TURN_S = 0.1


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast_context(device: str, dtype: str) -> torch.autocast:
    """bf16 autocast for "bf16" (weights stay fp32), a disabled one for "fp32"."""
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)


def inference_call(function: Callable[[], object], device: str, dtype: str) -> Callable[[], object]:
    """`function()` as inference, under the dtype's autocast: in `torch.inference_mode`, PyTorch's context for code
    that never meets autograd (no version counters, no view tracking), as a deployed model runs."""

    def call():
        with torch.inference_mode(), autocast_context(device, dtype):
            return function()

    return call


def time_call(function: Callable[[], object], device: str) -> float:
    """Seconds of one call. CUDA: events recorded around it on an idle stream, so the time includes every gap in
    which the GPU waited for the host (host syncs, launches); CPU: the wall clock."""
    if not device.startswith("cuda"):
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_rounds(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: str,
    time_budget_s: float | None = None,
    turn_s: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, in rounds so that machine noise hits all of them alike:
    `warmup` untimed rounds, then `repeats` timed ones, or fewer once the timed calls took `time_budget_s` in all
    (never fewer than `MIN_BUDGET_REPEATS` rounds), so that one setting serves calls of milliseconds and of seconds.

    In a round every function takes a turn. With `turn_s` 0 a turn is one call. Otherwise a call shorter than
    `turn_s` is not counted and the turn goes on with back-to-back timed calls until they took `turn_s`: the other
    functions' calls have just pushed this one's weights and buffers out of the caches, a cost that a deployed model,
    calling the same graph again and again, does not pay (on a 3 ms model it is 10-15% of a call). A call of `turn_s`
    or longer is a turn by itself, and timed: its own warm-up is a small share of it.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for done in range(1, repeats + 1):
        for name, function in functions.items():
            times[name].extend(time_turn(function, device, turn_s))
        spent = sum(sum(values) for values in times.values())
        if time_budget_s is not None and done >= MIN_BUDGET_REPEATS and spent >= time_budget_s:
            break
    return times


def time_turn(function: Callable[[], object], device: str, turn_s: float) -> list[float]:
    """The timed calls of one turn of `function` (see [`time_rounds`])."""
    first = time_call(function, device)
    if first >= turn_s:
        return [first]
    timed, spent = [], 0.0
    while not timed or spent < turn_s:
        timed.append(time_call(function, device))
        spent += timed[-1]
    return timed


def time_alternating(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: str,
    time_budget_s: float | None = None,
    turn_s: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each function, timed by [`time_rounds`]."""
    times = time_rounds(functions, repeats, warmup, device, time_budget_s, turn_s)
    return {name: statistics.median(values) for name, values in times.items()}


def count_device_syncs(function: Callable[[], object]) -> dict:
    """Device-to-host syncs during one call, from torch's sync debug mode (every synchronizing CUDA operation warns);
    `where` counts them by the Python line that caused them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [warning for warning in caught if SYNC_WARNING_TEXT in str(warning.message)]
    where = collections.Counter(f"{Path(warning.filename).name}:{warning.lineno}" for warning in syncs)
    return {"count": len(syncs), "where": dict(sorted(where.items()))}


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def allow_recompiles() -> None:
    """Every (model, dtype, threshold 1.0 or not, batch 1 or more) is a graph of its own: raise dynamo's limit of
    graphs per function (8) so that no case silently falls back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.6, now an alias
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))


def cuda_peak_memory_mb(function: Callable[[], object]) -> tuple[float, float]:
    """Peak CUDA memory of one call: (MB allocated on top of what was resident before it, total MB at the peak)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return (peak - resident) / 2**20, peak / 2**20
