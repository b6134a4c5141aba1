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
from pathlib import Path

import pytest
import torch


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
