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

For every case (image size x batch size) and mode (eager, `torch.compile`), the same model runs the same images
at exit threshold 1.0 (the unpruned baseline) and pruned, alternating, several times; the script prints median
times, the speed-up, R = GFLOPs unpruned / GFLOPs pruned (SPEC §5, all heads included), the speed-up as a share
of R, the unpruned model against transformers' `ViTModel` plus the same heads, and peak memory of both.

    python examples/benchmark.py                       # defaults: ViT-B/16 dims, 512x512 batch 1, 256x256 batch 1 and 8
    python examples/benchmark.py --preset vit-large    # any size of dtop_hf.presets_dtop.MODEL_SIZES
    python examples/benchmark.py --cases 512x1 512x8 --repeats 7 --output_json bench.json
    python examples/benchmark.py --device cuda --cases 512x1 512x8 512x32

Without a trained ViT-B, pruning is made to happen at a realistic rate by *seeding the exit decisions from a fixed
exit rate*: each auxiliary head's threshold is set, on the benchmark images, to the confidence quantile at which
`--exit_rate` of the tokens still active exit (the paper's ViT-B exits ~20-30% of the FLOPs). The pruning code
path is exactly the one a trained model takes; only the thresholds are chosen for the random weights. Mixed
batches alternate smooth and textured images, so every image of a batch prunes differently. `--model FOLDER`
benchmarks a trained model at its own thresholds instead.
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from dtop_hf import DToPConfig, DToPForSemanticSegmentation
from dtop_hf.presets_dtop import MODEL_SIZES, model_size_kwargs
from dtop_hf.toolkit.evaluation.flops import count_flops_from_outputs


# Random-weight models have ADE20K's 150 classes, except the tiny smoke-test size (5).
DEFAULT_NUM_LABELS, TINY_NUM_LABELS = 150, 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=str, default="vit-base", choices=sorted(MODEL_SIZES), help="Model size (random weights).")
    parser.add_argument("--num_labels", type=int, default=None, help=f"Classes (default {DEFAULT_NUM_LABELS}; tiny: {TINY_NUM_LABELS}).")
    parser.add_argument("--model", type=str, default=None, help="A trained DToP folder / Hub id (uses its thresholds).")
    parser.add_argument(
        "--cases", type=str, nargs="+", default=["512x1", "256x1", "256x8"],
        help="Image size x batch size, e.g. 512x1 256x8.",
    )
    parser.add_argument("--modes", type=str, nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="Plain eager PyTorch and/or torch.compile.")
    parser.add_argument("--compiled_cases", type=str, nargs="*", default=["256x8"],
                        help="Cases also run compiled (compilation takes minutes on a small CPU).")
    parser.add_argument("--exit_rate", type=float, default=0.4,
                        help="Share of the active tokens that exit at each auxiliary head (random-weight models).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per variant (alternating).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs per variant first.")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and images.")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory probes (CPU: subprocesses).")
    parser.add_argument("--no_vit_reference", action="store_true", help="Skip the transformers ViTModel comparison.")
    parser.add_argument("--output_json", type=str, default=None, help="Write one record per (case, mode) here.")
    parser.add_argument("--memory_probe", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for case in args.cases + args.compiled_cases:
        parse_case(case)
    if not 0.0 <= args.exit_rate < 1.0:
        raise ValueError(f"`--exit_rate` must be in [0, 1), got {args.exit_rate}.")
    if args.repeats < 1:
        raise ValueError(f"`--repeats` must be >= 1, got {args.repeats}.")
    return args


def parse_case(case: str) -> tuple[int, int]:
    """'512x8' -> (512, 8)."""
    try:
        image_size, batch_size = (int(part) for part in case.lower().split("x"))
    except ValueError:
        raise ValueError(f"A case is IMAGE_SIZExBATCH_SIZE such as 512x8, got {case!r}.") from None
    return image_size, batch_size


def build_model(args: argparse.Namespace) -> DToPForSemanticSegmentation:
    torch.manual_seed(args.seed)
    if args.model:
        model = DToPForSemanticSegmentation.from_pretrained(args.model)
    else:
        num_labels = args.num_labels or (TINY_NUM_LABELS if args.preset == "tiny" else DEFAULT_NUM_LABELS)
        model = DToPForSemanticSegmentation(DToPConfig(**model_size_kwargs(args.preset), num_labels=num_labels))
    return model.eval().to(args.device)


def make_images(batch_size: int, image_size: int, seed: int, device: str) -> torch.Tensor:
    """Mixed batch, normalised: even images smooth (large easy regions), odd images textured (hard)."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for index in range(batch_size):
        coarse = torch.randn(1, 3, 4 + 4 * (index % 3), 4 + 4 * (index % 3), generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
        if index % 2:
            image = image + 0.8 * torch.randn(1, 3, image_size, image_size, generator=generator)
        images.append(image)
    return torch.cat(images).to(device)


@torch.no_grad()
def seeded_thresholds(model: DToPForSemanticSegmentation, pixel_values: torch.Tensor, exit_rate: float) -> list[float]:
    """Per auxiliary head, the confidence quantile at which `exit_rate` of the still-active tokens exit."""
    num_auxiliary = len(model.config.out_indices) - 1
    thresholds = [1.0] * num_auxiliary
    for stage in range(num_auxiliary):
        outputs = model(pixel_values, exit_threshold=thresholds)
        scores = outputs.stage_logits[stage]
        if model.config.head_type == "fcn":
            scores = scores.softmax(dim=1)
        confidence = scores.amax(dim=1).flatten()
        active = (outputs.exit_stage >= stage).flatten()
        thresholds[stage] = min(float(confidence[active].float().quantile(1.0 - exit_rate)), 1.0)
    return thresholds


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(functions: dict, repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, run in turn so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def vit_reference(model: DToPForSemanticSegmentation, device: str):
    """transformers' ViTModel at the same dims, plus our stage heads run on all of its tokens (no pruning)."""
    from transformers import ViTConfig, ViTModel

    from dtop_hf.pruning import pack_tokens

    config = model.config
    vit_config = ViTConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        image_size=config.image_size, patch_size=config.patch_size, layer_norm_eps=config.layer_norm_eps,
    )
    vit = ViTModel(vit_config, add_pooling_layer=False).eval().to(device)
    heads = model.dtop.heads

    @torch.no_grad()
    def run(pixel_values: torch.Tensor) -> None:
        hidden_states = vit(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        batch_size, num_tokens = hidden_states[0].shape[0], hidden_states[0].shape[1] - 1
        packing = pack_tokens(torch.ones(batch_size, num_tokens, dtype=torch.bool, device=pixel_values.device))
        for head, layer_index in zip(heads, config.out_indices):
            head(hidden_states[layer_index + 1][:, 1:].reshape(batch_size * num_tokens, -1), packing)

    return run


def peak_memory_mb(args: argparse.Namespace, image_size: int, batch_size: int, threshold, compiled: bool) -> float:
    """Peak memory of one forward pass: CUDA in process; CPU in a fresh process (peak RSS growth)."""
    if args.device.startswith("cuda"):
        model = build_model(args)
        pixel_values = make_images(batch_size, image_size, args.seed, args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(pixel_values, exit_threshold=threshold)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    probe = json.dumps({"image_size": image_size, "batch_size": batch_size, "threshold": threshold})
    command = [sys.executable, os.path.abspath(__file__), "--memory_probe", probe, "--seed", str(args.seed),
               "--preset", args.preset, "--cases", f"{image_size}x{batch_size}"]
    if args.model:
        command += ["--model", args.model]
    if args.num_labels:
        command += ["--num_labels", str(args.num_labels)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_memory_probe(args: argparse.Namespace) -> None:
    """Child process: peak resident-memory growth (MB) over one forward pass, sampled every millisecond.

    Model construction leaves freed memory with the C allocator; `malloc_trim` hands it back first so that the
    forward pass's growth is measured, not hidden in reused pages.
    """
    probe = json.loads(args.memory_probe)
    model = build_model(args)
    pixel_values = make_images(probe["batch_size"], probe["image_size"], args.seed, args.device)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start_rss, peak_rss, running = current_rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak_rss[0] = max(peak_rss[0], current_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        model(pixel_values, exit_threshold=probe["threshold"])
    running[0] = False
    sampler.join()
    print(max(peak_rss[0] - start_rss, 0) / 2**20)


def benchmark_case(args, model, image_size: int, batch_size: int, mode: str) -> dict:
    pixel_values = make_images(batch_size, image_size, args.seed, args.device)
    threshold = None if args.model else seeded_thresholds(model, pixel_values, args.exit_rate)
    with torch.no_grad():
        baseline_outputs = model(pixel_values, exit_threshold=1.0)
        pruned_outputs = model(pixel_values, exit_threshold=threshold)
    baseline_flops = count_flops_from_outputs(model.config, baseline_outputs).total
    pruned_flops = count_flops_from_outputs(model.config, pruned_outputs).total
    flops_ratio = float(baseline_flops.sum() / pruned_flops.sum())
    runner = torch.compile(model, dynamic=True) if mode == "compiled" else model

    def baseline():
        with torch.no_grad():
            runner(pixel_values, exit_threshold=1.0)

    def pruned():
        with torch.no_grad():
            runner(pixel_values, exit_threshold=threshold)

    functions = {"baseline": baseline, "pruned": pruned}
    if mode == "eager" and not args.no_vit_reference:
        reference = vit_reference(model, args.device)
        functions["vit_plus_heads"] = lambda: reference(pixel_values)
    compile_start = time.perf_counter()
    if mode == "compiled":
        baseline(), pruned()  # compile both variants before timing
    compile_seconds = time.perf_counter() - compile_start
    medians = time_alternating(functions, args.repeats, args.warmup, args.device)
    record = {
        "image_size": image_size,
        "batch_size": batch_size,
        "mode": mode,
        "device": args.device,
        "exit_threshold": threshold if threshold is not None else model.config.exit_threshold,
        "tokens_per_layer_mean": pruned_outputs.tokens_per_layer.float().mean(dim=0).tolist(),
        "tokens_last_layer_per_image": pruned_outputs.tokens_per_layer[:, -1].tolist(),
        "gflops_baseline_per_image": float(baseline_flops.mean()),
        "gflops_pruned_per_image": float(pruned_flops.mean()),
        "flops_ratio": flops_ratio,
        "baseline_seconds": medians["baseline"],
        "pruned_seconds": medians["pruned"],
        "speedup": medians["baseline"] / medians["pruned"],
    }
    record["speedup_over_flops_ratio"] = record["speedup"] / flops_ratio
    if "vit_plus_heads" in medians:
        record["vit_plus_heads_seconds"] = medians["vit_plus_heads"]
        record["baseline_over_vit_plus_heads"] = medians["baseline"] / medians["vit_plus_heads"]
    if mode == "compiled":
        record["compile_seconds"] = compile_seconds
    if not args.no_memory:
        record["peak_memory_mb"] = {
            "baseline": peak_memory_mb(args, image_size, batch_size, 1.0, mode == "compiled"),
            "pruned": peak_memory_mb(args, image_size, batch_size, threshold, mode == "compiled"),
        }
    return record


def print_table(records: list[dict]) -> None:
    header = (
        f"{'case':>8} {'mode':>9} {'GFLOPs base':>11} {'GFLOPs pruned':>13} {'R':>5} {'base s':>8} {'pruned s':>8} "
        f"{'speed-up':>8} {'/R':>5} {'base/ViT':>8} {'mem base':>8} {'mem pruned':>10}"
    )
    print(header)
    print("-" * len(header))
    for record in records:
        memory = record.get("peak_memory_mb", {})
        print(
            f"{record['image_size']:>4}x{record['batch_size']:<3} {record['mode']:>9} "
            f"{record['gflops_baseline_per_image']:>11.2f} {record['gflops_pruned_per_image']:>13.2f} "
            f"{record['flops_ratio']:>5.2f} {record['baseline_seconds']:>8.3f} {record['pruned_seconds']:>8.3f} "
            f"{record['speedup']:>8.2f} {record['speedup_over_flops_ratio']:>5.2f} "
            f"{record.get('baseline_over_vit_plus_heads', float('nan')):>8.2f} "
            f"{memory.get('baseline', float('nan')):>8.0f} {memory.get('pruned', float('nan')):>10.0f}"
        )
    print(
        "R = GFLOPs unpruned / pruned (all heads); speed-up = median baseline time / median pruned time; "
        "/R = speed-up / R (targets: >= 0.85 at batch 1, >= 0.8 at batch 8); base/ViT = unpruned DToP / "
        "(transformers ViTModel + the same heads) (target <= 1.05); mem = peak MB of one forward (CPU: RSS growth)."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        run_memory_probe(args)
        return []
    model = build_model(args)
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"model {args.model or args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
        f"attention {model.config._attn_implementation}"
    )
    records = []
    for mode in args.modes:
        cases = args.cases if mode == "eager" else [case for case in args.cases if case in args.compiled_cases]
        for case in cases:
            image_size, batch_size = parse_case(case)
            record = benchmark_case(args, model, image_size, batch_size, mode)
            records.append(record)
            print(
                f"[{case} {mode}] R {record['flops_ratio']:.2f}, speed-up {record['speedup']:.2f} "
                f"({record['speedup_over_flops_ratio']:.2f} R)",
                flush=True,
            )
    print_table(records)
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(records, file, indent=2)
    return records


if __name__ == "__main__":
    main()
