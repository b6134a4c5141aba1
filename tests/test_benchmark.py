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
"""examples/benchmark.py and the benchmarking toolkit run and report what they promise (no timing is asserted:
machines are noisy), and the model compiles with torch.compile, pruned and unpruned, to the eager results."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dtop_hf import DToPConfig
from dtop_hf.pruning import num_tokens_kept
from dtop_hf.toolkit.benchmarking import (
    BenchmarkSettings,
    Case,
    build_benchmark_model,
    capacities_for_flops_ratio,
    make_images,
    parse_case,
    prepare_exits,
    resolve_suite,
    seeded_thresholds,
)
from dtop_hf.toolkit.benchmarking.allocator import glibc_version
from dtop_hf.toolkit.benchmarking.exits import (
    exit_rate_grid,
    exit_rate_weights,
    gflops_at_exit_rates,
    paper_exit_rate_mean,
    paper_flops_ratio,
)
from dtop_hf.toolkit.benchmarking.memory import cpu_peak_memory_mb
from dtop_hf.toolkit.benchmarking.probes import DEFAULT_TURN_S, count_device_syncs, inference_call, time_rounds
from dtop_hf.toolkit.evaluation.flops import capacity_flops_ratio
from dtop_hf.toolkit.presets import model_size_kwargs


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def benchmark_main(argv: list[str]) -> list[dict]:
    """`examples/benchmark.py`'s `main(argv)`."""
    spec = importlib.util.spec_from_file_location("dtop_benchmark", EXAMPLES / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def dry_run(argv: list[str], capsys) -> dict:
    """What `examples/benchmark.py argv --dry_run` would run (settings, runs, outputs), measuring nothing."""
    capsys.readouterr()
    assert benchmark_main([*argv, "--dry_run"]) == []
    return json.loads(capsys.readouterr().out)


def tiny_model() -> torch.nn.Module:
    return build_benchmark_model(BenchmarkSettings(), "tiny")


def test_benchmark_writes_one_record_per_case_and_mode(tmp_path, capsys):
    output_json = tmp_path / "bench.json"
    benchmark_main([
        "--model_size", "tiny", "--cases", "32x1", "32x4", "--modes", "eager", "--repeats", "1", "--warmup", "0",
        "--exit_rate", "0.4", "--output_json", str(output_json),
    ])  # fmt: skip
    records = json.loads(output_json.read_text())
    assert [(record["batch_size"], record["mode"]) for record in records] == [(1, "eager"), (4, "eager")]
    for record in records:
        assert record["flops_ratio"] > 1.0  # the seeded exit rate really prunes
        assert record["gflops_pruned_per_image"] < record["gflops_baseline_per_image"]
        assert record["speedup"] == pytest.approx(record["baseline_seconds"] / record["pruned_seconds"])
        assert set(record["peak_memory_mb"]) == {"baseline", "pruned"}
        assert record["baseline_over_vit_plus_heads"] > 0
        # One round, but a turn of back-to-back calls per variant: the tiny model's calls take milliseconds.
        assert record["turn_s"] == DEFAULT_TURN_S and len(record["times_seconds"]["baseline"]) > 1
        if glibc_version():  # the regime the calls were timed in
            assert record["environment"]["cpu_allocator"].endswith("thresholds pinned")
    # Mixed batch: the images keep different numbers of tokens.
    assert len(set(records[1]["tokens_last_layer_per_image"])) > 1
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "s of back-to-back calls" in printed


def test_old_flag_names_still_work_with_a_warning(capsys):
    with pytest.warns(FutureWarning, match="`--preset` is deprecated.*`--model_size`"):
        old = dry_run(["--preset", "tiny", "--cases", "32x1", "--modes", "eager"], capsys)
    assert old == dry_run(["--model_size", "tiny", "--cases", "32x1", "--modes", "eager"], capsys)
    assert old["runs"] == [{"case": {"model_size": "tiny", "image_size": 32, "batch_size": 1}, "backend": "torch",
                            "mode": "eager", "dtype": "fp32"}]  # fmt: skip


# In a fresh process whose C allocator is pinned first, or left to glibc's own rule, the quick-start model at batch 8
# prints, for ten forwards after a warm-up one, how many MiB the process held at its peak but no longer holds once
# the forward has returned (the pages glibc handed back, which the next forward must fault in again), then the
# minor page faults of the ten. Bytes, not faults, carry the claim: with transparent huge pages one fault maps
# 2 MiB, so the fault count of the same work differs from machine to machine. The peak is the kernel's VmHWM, which
# starts afresh at exec; `ru_maxrss` does not (a child of a large pytest process reports its parent's peak).
FORWARD_MEMORY_HANDED_BACK_SCRIPT = """
import resource, sys, torch
from dtop_hf.toolkit.benchmarking import BenchmarkSettings, build_benchmark_model, make_images
from dtop_hf.toolkit.benchmarking.allocator import steady_allocator
if sys.argv[1] == "pinned":
    steady_allocator()
torch.set_num_threads(1)
model = build_benchmark_model(BenchmarkSettings(), "quickstart")
pixel_values = make_images(8, 96, 0, "cpu")
def handed_back_mib():
    status = dict(line.split(":") for line in open("/proc/self/status").read().splitlines())
    return (int(status["VmHWM"].split()[0]) - int(status["VmRSS"].split()[0])) / 1024
with torch.no_grad():
    model(pixel_values)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    handed_back = []
    for _ in range(10):
        model(pixel_values)
        handed_back.append(handed_back_mib())
print(*handed_back, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.skipif(
    glibc_version() is None or not Path("/proc/self/status").exists(), reason="the allocator regime is glibc's"
)
def test_steady_allocator_keeps_the_pages_a_forward_frees(capsys):
    """glibc's own rule hands part of the freed heap back after a forward, and the next forward faults it back in;
    with the pinned thresholds the process keeps its peak. `--no_steady_allocator` leaves the rule."""
    handed_back, faults = {}, {}
    for regime in ("pinned", "default"):
        script = [sys.executable, "-c", FORWARD_MEMORY_HANDED_BACK_SCRIPT, regime]
        printed = [
            float(value) for value in subprocess.run(script, capture_output=True, text=True, check=True).stdout.split()
        ]
        handed_back[regime], faults[regime] = printed[:-1], printed[-1]
    # glibc's rule gives megabytes of a forward's working memory back after some forwards (up to 8-11.5 MiB over five
    # in each of six runs on the development machine, with and without huge pages; 0 after others), the pinned heap
    # nothing beyond rounding (the kernel counts in KiB)
    assert max(handed_back["default"]) > 1.0, handed_back
    assert max(handed_back["pinned"]) < 0.5, handed_back
    assert faults["pinned"] < faults["default"], faults
    assert dry_run(["--cases", "32x1"], capsys)["settings"]["steady_allocator"] is True
    assert dry_run(["--cases", "32x1", "--no_steady_allocator"], capsys)["settings"]["steady_allocator"] is False


def test_seeded_thresholds_hit_the_exit_rate():
    model = tiny_model()
    pixel_values = make_images(4, 32, 0, "cpu")
    thresholds = seeded_thresholds(model, pixel_values, exit_rate=0.5)
    with torch.no_grad():
        exit_stage = model(pixel_values, exit_threshold=thresholds).exit_stage
    # keep-top-k holds a few candidates back, so slightly fewer than half exit at the first head
    first_head_share = float((exit_stage == 0).float().mean())
    assert 0.3 < first_head_share <= 0.5


def test_bad_case_is_refused(capsys):
    with pytest.raises(ValueError, match="IMAGE_SIZExBATCH_SIZE"):
        parse_case("512-8")
    with pytest.raises(ValueError, match="IMAGE_SIZExBATCH_SIZE"):
        dry_run(["--cases", "512-8"], capsys)


def test_torch_compile_matches_eager_pruned_and_unpruned():
    model = tiny_model()
    pixel_values = make_images(2, 32, 0, "cpu")
    thresholds = seeded_thresholds(model, pixel_values, exit_rate=0.4)
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for threshold in (1.0, thresholds):
            eager_outputs = model(pixel_values, exit_threshold=threshold)
            compiled_outputs = compiled(pixel_values, exit_threshold=threshold)
            assert torch.equal(compiled_outputs.exit_stage, eager_outputs.exit_stage)
            assert torch.equal(compiled_outputs.tokens_per_layer, eager_outputs.tokens_per_layer)
            torch.testing.assert_close(compiled_outputs.logits, eager_outputs.logits, atol=1e-5, rtol=1e-4)


def test_cuda_defaults_are_the_gpu_suite(capsys):
    suite = resolve_suite("cuda")  # no GPU needed: the suite is only described
    expected = [
        ("vit-base", 512, 1), ("vit-base", 512, 8), ("vit-base", 512, 32), ("vit-large", 640, 1), ("vit-large", 640, 8)
    ]  # fmt: skip
    assert [(case.model_size, case.image_size, case.batch_size) for case in suite.cases] == expected
    assert suite.dtypes == ("fp32", "bf16") and suite.compiled_cases == suite.cases
    assert BenchmarkSettings(device="cuda").exits == "paper"
    assert dry_run(["--device", "cuda"], capsys)["output_json"] == "outputs/benchmark_cuda.json"
    plan = suite.plan()
    assert len(plan) == 5 * 2 * 2
    assert [run.mode for run in plan] == ["eager"] * 10 + ["compiled"] * 10  # compiles last: a budget cuts them
    # The CPU keeps its defaults; sync counting needs CUDA.
    cpu_suite = resolve_suite("cpu")
    assert [case.label for case in cpu_suite.cases] == ["vit-base:512x1", "vit-base:256x1", "vit-base:256x8"]
    assert cpu_suite.dtypes == ("fp32",) and dry_run([], capsys)["output_json"] == "outputs/benchmark_cpu.json"
    with pytest.raises(ValueError, match="device cuda"):
        BenchmarkSettings(sync_debug=True)
    with pytest.raises(ValueError, match="device cuda"):
        dry_run(["--sync_debug"], capsys)
    with pytest.raises(ValueError, match="Unknown model size"):
        resolve_suite(cases=["vit-huge:512x8"])


def test_gpu_script_runs_the_benchmark_with_flags_it_accepts(capsys):
    """examples/gpu_benchmark.sh --dry_run prints its commands; the benchmark's flags parse (no GPU needed)."""
    script = EXAMPLES / "gpu_benchmark.sh"
    completed = subprocess.run(
        ["bash", str(script), "--dry_run"], cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    commands = [line.split() for line in completed.stdout.splitlines() if "examples/benchmark.py" in line]
    capacity_flags, suite_flags = (command[command.index("examples/benchmark.py") + 1 :] for command in commands)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the script uses today's flag names
        capacity, planned = dry_run(capacity_flags, capsys), dry_run(suite_flags, capsys)
    # Capacity mode first: eager, then under CUDA graphs, ViT-B/16 only, its own files.
    assert capacity["settings"]["exits"] == "capacity" and capacity["settings"]["sync_debug"]
    assert [run["mode"] for run in capacity["runs"]] == ["eager", "eager", "reduce-overhead", "reduce-overhead"]
    assert {(run["case"]["model_size"], run["case"]["image_size"]) for run in capacity["runs"]} == {("vit-base", 512)}
    assert capacity["output_json"] == "docs/benchmark_cuda_capacity.json"
    settings = planned["settings"]
    assert settings["device"] == "cuda" and settings["sync_debug"]
    assert {run["dtype"] for run in planned["runs"]} == {"fp32", "bf16"}
    assert planned["output_json"] == "docs/benchmark_cuda.json"
    assert planned["output_markdown"] == "docs/benchmark_cuda.md"
    cases = {(run["case"]["model_size"], run["case"]["image_size"]) for run in planned["runs"]}
    assert cases == {("vit-base", 512), ("vit-large", 640)}
    assert {run["mode"] for run in planned["runs"]} == {"eager", "compiled"}
    assert "pytest -q -p no:cacheprovider -k sync or compile or varlen" in completed.stdout


def test_dtypes_and_compiled_mode_write_their_records(tmp_path, monkeypatch):
    """The new options end to end on the tiny model; torch.compile is replaced by the eager model (compiling takes
    minutes on a CPU), so this checks the plumbing of compiled records, not the compiler."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    output_json, output_markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    benchmark_main([
        "--model_size", "tiny", "--cases", "32x2", "--dtypes", "fp32", "bf16", "--modes", "eager", "compiled",
        "--compiled_cases", "32x2", "--repeats", "1", "--warmup", "0", "--no_memory",
        "--output_json", str(output_json), "--output_markdown", str(output_markdown),
    ])  # fmt: skip
    records = json.loads(output_json.read_text())
    assert [(record["mode"], record["dtype"]) for record in records] == [
        ("eager", "fp32"), ("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16")
    ]  # fmt: skip
    for record in records:
        assert record["exits"] == "paper" and len(record["exit_rates_per_image"]) == 2
        assert record["flops_ratio"] > 1.0
        assert record["speedup_target"] == 0.9  # batch 2
        assert record["meets_speedup_target"] == (record["speedup_over_flops_ratio"] >= 0.9)
        assert record["images_per_second"]["pruned"] == pytest.approx(2 / record["pruned_seconds"])
    assert all("baseline_over_vit_plus_heads" in record for record in records[:2])
    assert all({"compile_seconds", "graphs_compiled", "graphs_compiled_while_timing"} <= set(r) for r in records[2:])
    markdown = output_markdown.read_text()
    assert "| case | mode | dtype |" in markdown and markdown.count("| tiny 32x2 |") == 4


def test_gpu_script_skips_the_capacity_step_at_a_zero_budget():
    completed = subprocess.run(
        ["bash", str(EXAMPLES / "gpu_benchmark.sh"), "--dry_run", "--capacity_budget_s", "0"], cwd=EXAMPLES.parent,
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    commands = [line for line in completed.stdout.splitlines() if "examples/benchmark.py" in line]
    assert len(commands) == 1 and "--exits capacity" not in commands[0]
    assert "skipped (--capacity_budget_s 0)" in completed.stdout


def test_reduce_overhead_mode_compiles_capacity_mode_whole_against_a_capacity_baseline(tmp_path, monkeypatch):
    """`--modes reduce-overhead` (CUDA graphs on a GPU): one static full graph, a capacity-1.0 baseline that is one
    graph too, and its records beside the eager ones. torch.compile is replaced by a recorder of the model's calls
    (compiling takes minutes on a CPU): this checks the plumbing, `test_capacity_mode.py` the compiler."""
    compiles, forwards = [], []

    def fake_compile(model, **kwargs):
        compiles.append(kwargs)

        def compiled(pixel_values, **forward_kwargs):
            forwards.append(forward_kwargs)
            return model(pixel_values, **forward_kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    output_json = tmp_path / "bench.json"
    benchmark_main([
        "--model_size", "tiny", "--cases", "32x2", "--exits", "capacity", "--exit_capacity", "0.5,0.3",
        "--modes", "eager", "reduce-overhead", "--compiled_cases", "32x2", "--repeats", "1", "--warmup", "0",
        "--turn_s", "0", "--no_memory", "--output_json", str(output_json),
        "--output_markdown", str(tmp_path / "bench.md"),
    ])  # fmt: skip
    records = json.loads(output_json.read_text())
    assert [record["mode"] for record in records] == ["eager", "reduce-overhead"]
    assert compiles == [{"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}]
    baseline = {"exit_mode": "capacity", "exit_capacity": 1.0}
    pruned = {"exit_mode": "capacity", "exit_capacity": [0.5, 0.3]}
    # Two calls per variant before timing (compile, then record the CUDA graph), then the timed round.
    assert forwards == [baseline, pruned, baseline, pruned, baseline, pruned]
    assert {"compile_seconds", "graphs_compiled", "graphs_compiled_while_timing"} <= set(records[1])
    assert records[1]["exit_capacity"] == [0.5, 0.3] and records[1]["speedup"] > 0


def test_reduce_overhead_mode_needs_capacity_exits(tmp_path):
    output_json = tmp_path / "bench.json"
    with pytest.raises(ValueError, match=r"only capacity mode has: pass `--exits capacity`"):
        benchmark_main([
            "--model_size", "tiny", "--cases", "32x2", "--compiled_cases", "32x2", "--modes", "reduce-overhead",
            "--no_memory", "--output_json", str(output_json), "--output_markdown", str(tmp_path / "bench.md"),
        ])  # fmt: skip
    assert not output_json.exists()  # refused before anything ran


def test_paper_exits_take_the_drawn_share_of_each_image():
    """`paper` exits: after the first head exactly the drawn share of every image's tokens has exited (keep-top-k
    off), and the expected GFLOPs ratio of the fitted distribution is the paper's. The model's own heads stay in
    place: only its exit decision reads the drawn scores."""
    model = tiny_model()
    heads = list(model.dtop.heads)
    model.config.keep_top_k = 0
    pixel_values = make_images(4, 32, 0, "cpu")
    exit_rule, exit_record = prepare_exits(model, pixel_values, "paper", seed=0)
    assert exit_rule == {"exit_threshold": None}  # the model's own thresholds, reading the drawn scores
    threshold = exit_rule["exit_threshold"]
    assert list(model.dtop.heads) == heads and all(type(head) is type(heads[-1]) for head in heads)
    with torch.no_grad():
        outputs = model(pixel_values, exit_threshold=threshold)
        unpruned = model(pixel_values, exit_threshold=1.0)
    num_tokens = 8 * 8
    rates = torch.tensor(exit_record["exit_rates_per_image"])
    assert len(set(rates.tolist())) == 4  # every image its own rate
    expected = (torch.arange(num_tokens) / num_tokens < 1.0 - (1.0 - rates[:, None])).sum(dim=1)
    assert torch.equal((outputs.exit_stage == 0).flatten(1).sum(dim=1), expected)
    assert (unpruned.exit_stage == 2).all()  # threshold 1.0: the drawn scores exit nothing
    # Back to the heads' own scores: random heads at threshold 0.9 let (almost) nothing exit, unlike the drawn ones.
    prepare_exits(model, pixel_values, "model")
    with torch.no_grad():
        assert not torch.equal(model(pixel_values, exit_threshold=threshold).exit_stage, outputs.exit_stage)
    # The fitted mean reproduces the paper's ViT-B reduction, 109.9 -> 86.8 GFLOPs, in expectation.
    config = DToPConfig(**model_size_kwargs("vit-base"), num_labels=150)
    mean = paper_exit_rate_mean(config, 32 * 32)
    grid = exit_rate_grid()
    ratios = gflops_at_exit_rates(config, 1024, grid) / gflops_at_exit_rates(
        config, 1024, torch.zeros(1, dtype=torch.float64)
    )
    assert float((exit_rate_weights(mean, grid) * ratios).sum()) == pytest.approx(86.8 / 109.9, abs=1e-4)
    assert 0.25 < mean < 0.35


def test_time_budget_lists_what_it_skipped(tmp_path, capsys):
    output_json = tmp_path / "bench.json"
    records = benchmark_main([
        "--model_size", "tiny", "--cases", "32x1", "--modes", "eager", "--time_budget_s", "1e-9",
        "--output_json", str(output_json),
    ])  # fmt: skip
    assert records == [] and json.loads(output_json.read_text()) == []
    assert "Skipped (time budget): tiny:32x1 eager fp32" in capsys.readouterr().out


def test_sync_counter_counts_the_sync_warnings(monkeypatch):
    """The sync counter on CPU: torch's sync debug mode is faked, its warnings are real Python warnings."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def forward_with_two_syncs():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)

    counted = count_device_syncs(forward_with_two_syncs)
    assert counted["count"] == 2 and sum(counted["where"].values()) == 2
    assert all(where.startswith("test_benchmark.py:") for where in counted["where"])
    assert modes == ["warn", "default"]  # switched back off after the call


# --- capacity mode, exported: the onnxruntime backend ------------------------------------------------------------


def test_onnxruntime_backend_runs_beside_pytorch_in_capacity_mode(tmp_path, monkeypatch):
    """`--backend onnxruntime` end to end on the tiny model: PyTorch runs beside it (torch.compile replaced by the
    eager model: compiling takes minutes on a CPU), all in capacity mode at the solved capacities; the two exports
    are made once for both batch sizes and match the PyTorch model; R comes from the capacities alone."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    output_json, output_markdown, onnx_dir = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "onnx"
    records = benchmark_main([
        "--backend", "onnxruntime", "--model_size", "tiny", "--cases", "32x1", "32x2", "--compiled_cases", "32x2",
        "--repeats", "2", "--turn_s", "0", "--warmup", "0", "--threads", "1", "--no_memory", "--no_vit_reference",
        "--onnx_dir", str(onnx_dir), "--output_json", str(output_json), "--output_markdown", str(output_markdown),
    ])  # fmt: skip
    assert records == json.loads(output_json.read_text())
    runs = [(record["backend"], record["mode"], record["batch_size"]) for record in records]
    assert runs == [("torch", "eager", 1), ("torch", "eager", 2), ("onnxruntime", "session", 1),
                    ("onnxruntime", "session", 2), ("torch", "compiled", 2)]  # fmt: skip
    config = build_benchmark_model(BenchmarkSettings(), "tiny").config
    capacities = records[0]["exit_capacity"]
    solved = capacities_for_flops_ratio(config, (32, 32), paper_flops_ratio(config), token_multiple=16)
    assert capacities == list(solved) == [48 / 64, 32 / 64]  # the 8x8 grid's kept counts on multiples of 16
    for record in records:
        assert record["exits"] == "capacity" and record["exit_capacity"] == capacities
        assert record["capacity_token_multiple"] == 16
        assert record["flops_ratio"] == capacity_flops_ratio(config, (32, 32), capacities)
        assert record["flops_ratio"] == pytest.approx(paper_flops_ratio(config), abs=0.03)
        assert record["speedup"] == pytest.approx(record["baseline_seconds"] / record["pruned_seconds"])
        assert record["speedup_over_flops_ratio"] == pytest.approx(record["speedup"] / record["flops_ratio"])
        assert record["turn_s"] == 0 and all(len(times) == 2 for times in record["times_seconds"].values())
    exported = [record for record in records if record["backend"] == "onnxruntime"]
    assert [record["speedup_target"] for record in records] == [0.8, 0.95, 0.9, 0.9, 0.9]
    assert sorted(path.name for path in onnx_dir.iterdir()) == sorted(exported[0]["onnx_files"].values())
    for record in exported:
        assert record["intra_op_num_threads"] == 1 and "peak_memory_mb" not in record
        for parity in record["onnx_parity"].values():  # baseline and pruned export against the PyTorch model
            assert parity["max_abs_logits_difference"] < 1e-4 and parity["exit_stage_agreement"] == 1.0
    markdown = output_markdown.read_text()
    assert "Side by side" in markdown and "| onnxruntime session speed-up | onnxruntime session /R |" in markdown
    assert "alternate call by call" in markdown  # --turn_s 0
    assert markdown.count("| tiny 32x2 |") == 3 + 1  # eager, session and compiled rows, then one side by side


def test_onnxruntime_backend_times_the_threshold_mode_export_at_rate_exits(tmp_path):
    """`--exits rate` with `--backend onnxruntime`: the pruned file is the threshold-mode export at the thresholds
    the case's images give, checked against the PyTorch model, beside PyTorch eager at the same thresholds."""
    onnx_dir = tmp_path / "onnx"
    records = benchmark_main([
        "--backend", "onnxruntime", "--exits", "rate", "--exit_rate", "0.4", "--model_size", "tiny",
        "--cases", "32x1", "32x3", "--modes", "eager", "session", "--repeats", "2", "--turn_s", "0", "--warmup", "0",
        "--threads", "1", "--no_memory", "--no_vit_reference", "--onnx_dir", str(onnx_dir),
        "--output_json", str(tmp_path / "bench.json"),
    ])  # fmt: skip
    runs = [(record["backend"], record["mode"], record["batch_size"]) for record in records]
    assert runs == [("torch", "eager", 1), ("torch", "eager", 3), ("onnxruntime", "session", 1),
                    ("onnxruntime", "session", 3)]  # fmt: skip
    for torch_record, exported in zip(records[:2], records[2:]):
        assert exported["exits"] == "rate" and exported["exit_threshold"] == torch_record["exit_threshold"]
        assert exported["flops_ratio"] == torch_record["flops_ratio"] > 1.0  # tokens exited
        assert exported["onnx_files"]["pruned"].startswith("tiny-32-threshold-")
        for parity in exported["onnx_parity"].values():
            assert parity["max_abs_logits_difference"] < 1e-4 and parity["exit_stage_agreement"] == 1.0
    assert (onnx_dir / records[3]["onnx_files"]["pruned"]).exists()


def test_onnxruntime_suite_defaults_and_refusals(capsys):
    planned = dry_run(["--backend", "onnxruntime"], capsys)
    assert planned["settings"]["exits"] == "capacity"
    assert planned["output_json"] == "outputs/benchmark_onnxruntime_cpu.json"
    labels = [(run["case"]["model_size"], run["case"]["image_size"], run["case"]["batch_size"], run["backend"],
               run["mode"]) for run in planned["runs"]]  # fmt: skip
    cases = [("vit-base", 512, 1), ("vit-base", 512, 8), ("quickstart", 96, 1), ("quickstart", 96, 8)]
    assert labels == (
        [(*case, "torch", "eager") for case in cases]
        + [(*case, "onnxruntime", "session") for case in cases]
        + [(*case, "torch", "compiled") for case in cases if case[2] == 8]  # compiles last
    )
    # The torch suite is unchanged by the new backend.
    assert dry_run([], capsys)["settings"]["exits"] == "paper"
    with pytest.raises(ValueError, match="runs on the CPU"):
        dry_run(["--backend", "onnxruntime", "--device", "cuda"], capsys)
    with pytest.raises(ValueError, match="cannot run 'paper' exits.*--exits capacity"):
        benchmark_main(["--backend", "onnxruntime", "--exits", "paper", "--model_size", "tiny", "--cases", "32x1"])
    with pytest.raises(ValueError, match="not both"):  # capacities are given or solved for a target R
        dry_run(["--exit_capacity", "0.5", "--target_flops_ratio", "1.3"], capsys)
    with pytest.raises(ValueError, match="`capacity_token_multiple` must be >= 1"):
        dry_run(["--capacity_token_multiple", "0"], capsys)


@pytest.mark.parametrize("model_size, image_size", [("vit-base", 512), ("quickstart", 96), ("tiny", 32)])
def test_capacity_solver_hits_its_target_ratio(model_size, image_size):
    config = DToPConfig(**model_size_kwargs(model_size), num_labels=150)
    size = (image_size, image_size)
    for target in (paper_flops_ratio(config), 1.35):
        capacities = capacities_for_flops_ratio(config, size, target)
        # At least the target and at most a token's step above it (whole tokens: R moves in steps).
        assert target <= capacity_flops_ratio(config, size, capacities) <= target + 0.01
        assert capacities[1] == pytest.approx(capacities[0] ** 2)  # every head keeps the same share of the active
        # The paper's convention is counted too.
        paper = capacities_for_flops_ratio(config, size, target, figure="backbone_and_final_head")
        assert target <= capacity_flops_ratio(config, size, paper, "backbone_and_final_head") <= target + 0.01
    assert paper_flops_ratio(config) == pytest.approx(109.9 / 86.8)
    assert capacities_for_flops_ratio(config, size, 1.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="out of reach"):
        capacities_for_flops_ratio(config, size, 1000.0)


@pytest.mark.parametrize(
    "model_size, image_size, num_labels, expected_counts",
    [("vit-base", 512, 150, (752, 560)), ("quickstart", 96, 10, (128, 96)), ("tiny", 32, 5, (48, 32))],
)
def test_capacity_solver_moves_kept_counts_onto_token_multiples(model_size, image_size, num_labels, expected_counts):
    """With `token_multiple`, every kept count is the exact solution's rounded down or up to a multiple, and of those
    combinations (never increasing from head to head) the one with the smallest R that still reaches the target."""
    config = DToPConfig(**model_size_kwargs(model_size), num_labels=num_labels)
    size, target = (image_size, image_size), paper_flops_ratio(config)
    num_tokens = (image_size // config.patch_size) ** 2
    exact = [num_tokens_kept(c, num_tokens) for c in capacities_for_flops_ratio(config, size, target)]
    aligned = capacities_for_flops_ratio(config, size, target, token_multiple=16)
    counts = tuple(num_tokens_kept(c, num_tokens) for c in aligned)
    assert counts == expected_counts and all(count % 16 == 0 for count in counts)
    assert all(abs(count - exact_count) < 16 for count, exact_count in zip(counts, exact))
    chosen_ratio = capacity_flops_ratio(config, size, aligned)
    assert chosen_ratio >= target
    roundings = [{count // 16 * 16, -(-count // 16) * 16} - {0} for count in exact]  # down and up, at least one
    for other in itertools.product(*roundings):
        if other[0] >= other[1] and other != counts:
            other_ratio = capacity_flops_ratio(config, size, [count / num_tokens for count in other])
            assert other_ratio < target or other_ratio > chosen_ratio
    # Exact counts stay when no rounding reaches the target: after the 8x8 grid's first head only 12 tokens may go
    # on at R 1.8, and 16 would be too many.
    tiny = DToPConfig(**model_size_kwargs("tiny"), num_labels=5)
    exact = capacities_for_flops_ratio(tiny, (32, 32), 1.8)
    assert capacities_for_flops_ratio(tiny, (32, 32), 1.8, token_multiple=16) == exact
    assert capacities_for_flops_ratio(config, size, target, token_multiple=1) == capacities_for_flops_ratio(
        config, size, target
    )


def test_capacity_exits_given_and_measured_in_a_fresh_process():
    """Given capacities are validated and used as they are; the CPU memory probe runs capacity mode too."""
    model = tiny_model()
    pixel_values = make_images(2, 32, 0, "cpu")
    exit_rule, record = prepare_exits(model, pixel_values, "capacity", exit_capacity=[0.5, 0.25])
    assert exit_rule == {"exit_mode": "capacity", "exit_capacity": [0.5, 0.25]}
    assert record == {"exits": "capacity", "target_flops_ratio": None}
    with torch.no_grad():
        tokens = model(pixel_values, **exit_rule).tokens_per_layer
    assert (tokens[:, -1] == 64 // 4 + model.config.num_prefix_tokens).all()  # a quarter of the 8x8 patches
    with pytest.raises(ValueError, match="must not increase"):
        prepare_exits(model, pixel_values, "capacity", exit_capacity=[0.25, 0.5])
    settings = BenchmarkSettings(exit_capacity=[0.5, 0.25], threads=1)
    assert settings.exits == "capacity"
    assert cpu_peak_memory_mb(settings, Case("tiny", 32, 2), "fp32", unpruned=False) >= 0


def test_timed_calls_run_in_inference_mode_under_the_dtypes_autocast():
    """What the benchmark times runs as deployed inference: in `torch.inference_mode` (no version counters, no view
    tracking), bf16 under autocast; the caller's state is back afterwards."""
    seen = []

    def probe():
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return torch.ones(2) * 2

    assert not inference_call(probe, "cpu", "fp32")().requires_grad
    inference_call(probe, "cpu", "bf16")()
    assert seen == [(True, False, False), (True, False, True)]
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_time_budget_per_run_stops_after_three_rounds():
    calls = {"slow": lambda: sum(range(20000)), "other": lambda: None}
    assert [len(times) for times in time_rounds(calls, 50, 0, "cpu", time_budget_s=1e-9).values()] == [3, 3]
    assert [len(times) for times in time_rounds(calls, 5, 1, "cpu").values()] == [5, 5]


def test_short_calls_take_turns_whose_first_call_is_not_timed():
    made = {"short": 0, "long": 0}

    def call(name, seconds):
        made[name] += 1
        time.sleep(seconds)

    calls = {"short": lambda: call("short", 0.001), "long": lambda: call("long", 0.03)}
    times = time_rounds(calls, repeats=3, warmup=0, device="cpu", turn_s=0.02)
    # A short call: one untimed call per round, then timed ones until they fill the turn.
    assert made["short"] == len(times["short"]) + 3
    assert len(times["short"]) >= 3 * 2 and sum(times["short"]) >= 3 * 0.02
    # A call longer than the turn is the turn, timed.
    assert made["long"] == len(times["long"]) == 3
