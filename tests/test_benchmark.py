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
"""examples/benchmark.py runs and reports what it promises (no timing is asserted: machines are noisy), and the
model compiles with torch.compile, pruned and unpruned, to the eager results."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dtop_hf import DToPConfig
from dtop_hf.toolkit.presets import model_size_kwargs


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("dtop_benchmark", EXAMPLES / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_one_record_per_case_and_mode(tmp_path, capsys):
    benchmark = load_benchmark()
    output_json = tmp_path / "bench.json"
    benchmark.main([
        "--preset", "tiny", "--cases", "32x1", "32x4", "--modes", "eager", "--repeats", "1", "--warmup", "0",
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
    # Mixed batch: the images keep different numbers of tokens.
    assert len(set(records[1]["tokens_last_layer_per_image"])) > 1
    assert "speed-up" in capsys.readouterr().out


def test_seeded_thresholds_hit_the_exit_rate():
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--preset", "tiny", "--cases", "32x4"])
    model = benchmark.build_model(args)
    pixel_values = benchmark.make_images(4, 32, 0, "cpu")
    thresholds = benchmark.seeded_thresholds(model, pixel_values, exit_rate=0.5)
    with torch.no_grad():
        exit_stage = model(pixel_values, exit_threshold=thresholds).exit_stage
    # keep-top-k holds a few candidates back, so slightly fewer than half exit at the first head
    first_head_share = float((exit_stage == 0).float().mean())
    assert 0.3 < first_head_share <= 0.5


def test_bad_case_is_refused():
    benchmark = load_benchmark()
    with pytest.raises(ValueError, match="IMAGE_SIZExBATCH_SIZE"):
        benchmark.parse_args(["--cases", "512-8"])


def test_torch_compile_matches_eager_pruned_and_unpruned():
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--preset", "tiny", "--cases", "32x2"])
    model = benchmark.build_model(args)
    pixel_values = benchmark.make_images(2, 32, 0, "cpu")
    thresholds = benchmark.seeded_thresholds(model, pixel_values, exit_rate=0.4)
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for threshold in (1.0, thresholds):
            eager_outputs = model(pixel_values, exit_threshold=threshold)
            compiled_outputs = compiled(pixel_values, exit_threshold=threshold)
            assert torch.equal(compiled_outputs.exit_stage, eager_outputs.exit_stage)
            assert torch.equal(compiled_outputs.tokens_per_layer, eager_outputs.tokens_per_layer)
            torch.testing.assert_close(compiled_outputs.logits, eager_outputs.logits, atol=1e-5, rtol=1e-4)


def test_cuda_defaults_are_the_issue_13_suite():
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--device", "cuda"])  # parsing only: runs without a GPU
    suite = [
        ("vit-base", 512, 1), ("vit-base", 512, 8), ("vit-base", 512, 32), ("vit-large", 640, 1), ("vit-large", 640, 8)
    ]  # fmt: skip
    assert [(case.preset, case.image_size, case.batch_size) for case in args.cases] == suite
    assert args.dtypes == ["fp32", "bf16"] and args.compiled_cases == args.cases and args.exits == "paper"
    assert args.output_json == "docs/benchmark_cuda.json"
    plan = benchmark.benchmark_plan(args)
    assert len(plan) == 5 * 2 * 2
    assert [mode for _, mode, _ in plan] == ["eager"] * 10 + ["compiled"] * 10  # compiles last: a budget cuts them
    # The CPU keeps its defaults; --sync_debug needs CUDA.
    cpu_args = benchmark.parse_args([])
    assert [case.label for case in cpu_args.cases] == ["vit-base:512x1", "vit-base:256x1", "vit-base:256x8"]
    assert cpu_args.dtypes == ["fp32"] and cpu_args.output_json == "docs/benchmark_cpu.json"
    with pytest.raises(ValueError, match="device cuda"):
        benchmark.parse_args(["--sync_debug"])
    with pytest.raises(ValueError, match="Unknown model size"):
        benchmark.parse_args(["--cases", "vit-huge:512x8"])


def test_gpu_script_runs_the_benchmark_with_flags_it_accepts():
    """examples/gpu_benchmark.sh --dry_run prints its commands; the benchmark's flags parse (no GPU needed)."""
    script = EXAMPLES / "gpu_benchmark.sh"
    completed = subprocess.run(
        ["bash", str(script), "--dry_run"], cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    command = next(line for line in completed.stdout.splitlines() if "examples/benchmark.py" in line).split()
    flags = command[command.index("examples/benchmark.py") + 1 :]
    args = load_benchmark().parse_args(flags)
    assert args.device == "cuda" and args.sync_debug and set(args.dtypes) == {"fp32", "bf16"}
    assert args.output_json == "docs/benchmark_cuda.json" and args.output_markdown == "docs/benchmark_cuda.md"
    assert {(case.preset, case.image_size) for case in args.cases} == {("vit-base", 512), ("vit-large", 640)}
    assert {mode for _, mode, _ in load_benchmark().benchmark_plan(args)} == {"eager", "compiled"}
    assert 'pytest -q -p no:cacheprovider -k sync or compile or varlen' in completed.stdout


def test_dtypes_and_compiled_mode_write_their_records(tmp_path, monkeypatch):
    """The new options end to end on the tiny model; torch.compile is replaced by the eager model (compiling takes
    minutes on a CPU), so this checks the plumbing of compiled records, not the compiler."""
    benchmark = load_benchmark()
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    output_json, output_markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    benchmark.main([
        "--preset", "tiny", "--cases", "32x2", "--dtypes", "fp32", "bf16", "--modes", "eager", "compiled",
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


def test_paper_exits_take_the_drawn_share_of_each_image():
    """`--exits paper`: after the first head exactly the drawn share of every image's tokens has exited (keep-top-k
    off), and the expected GFLOPs ratio of the fitted distribution is the paper's."""
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--preset", "tiny", "--cases", "32x4"])
    model = benchmark.build_model(args)
    model.config.keep_top_k = 0
    pixel_values = benchmark.make_images(4, 32, 0, "cpu")
    threshold, exit_record = benchmark.prepare_exits(args, model, pixel_values)
    with torch.no_grad():
        outputs = model(pixel_values, exit_threshold=threshold)
        unpruned = model(pixel_values, exit_threshold=1.0)
    num_tokens = 8 * 8
    rates = torch.tensor(exit_record["exit_rates_per_image"])
    assert len(set(rates.tolist())) == 4  # every image its own rate
    expected = (torch.arange(num_tokens) / num_tokens < 1.0 - (1.0 - rates[:, None])).sum(dim=1)
    assert torch.equal((outputs.exit_stage == 0).flatten(1).sum(dim=1), expected)
    assert (unpruned.exit_stage == 2).all()  # threshold 1.0: the drawn scores exit nothing
    # The fitted mean reproduces the paper's ViT-B reduction, 109.9 -> 86.8 GFLOPs, in expectation.
    config = DToPConfig(**model_size_kwargs("vit-base"), num_labels=150)
    mean = benchmark.paper_exit_rate_mean(config, 32 * 32)
    grid = benchmark.exit_rate_grid()
    ratios = benchmark.gflops_at_exit_rates(config, 1024, grid) / benchmark.gflops_at_exit_rates(
        config, 1024, torch.zeros(1, dtype=torch.float64)
    )
    assert float((benchmark.exit_rate_weights(mean, grid) * ratios).sum()) == pytest.approx(86.8 / 109.9, abs=1e-4)
    assert 0.25 < mean < 0.35


def test_time_budget_lists_what_it_skipped(tmp_path, capsys):
    benchmark = load_benchmark()
    output_json = tmp_path / "bench.json"
    records = benchmark.main([
        "--preset", "tiny", "--cases", "32x1", "--modes", "eager", "--time_budget_s", "1e-9",
        "--output_json", str(output_json),
    ])  # fmt: skip
    assert records == [] and json.loads(output_json.read_text()) == []
    assert "Skipped (time budget): tiny:32x1 eager fp32" in capsys.readouterr().out


def test_sync_counter_counts_the_sync_warnings(monkeypatch):
    """`--sync_debug`'s counter on CPU: torch's sync debug mode is faked, its warnings are real Python warnings."""
    benchmark = load_benchmark()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def forward_with_two_syncs():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)

    counted = benchmark.count_device_syncs(forward_with_two_syncs)
    assert counted["count"] == 2 and sum(counted["where"].values()) == 2
    assert all(where.startswith("test_benchmark.py:") for where in counted["where"])
    assert modes == ["warn", "default"]  # switched back off after the call
