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
`torch.compile`), the same model runs the same images at exit threshold 1.0 (the unpruned baseline) and pruned,
alternating, several times (on CUDA each call is timed with CUDA events on an idle stream). Per case the script
prints R = GFLOPs unpruned / GFLOPs pruned (SPEC §5, all heads included), the speed-up (median baseline time /
median pruned time), the speed-up as a share of R next to its target, images per second, the peak memory of both
(CUDA: `torch.cuda.max_memory_allocated` over what was allocated before the call; CPU: resident-memory growth,
measured in a fresh process) and, in eager mode, the unpruned model against transformers' `ViTModel` (sdpa
attention) plus the same heads. Results go to `--output_json` (default `docs/benchmark_<device>.json`).

    python examples/benchmark.py                        # CPU: ViT-B/16 dims, 512x512 batch 1, 256x256 batch 1 and 8
    python examples/benchmark.py --preset vit-large     # any size of dtop_hf.toolkit.presets.MODEL_SIZES
    python examples/benchmark.py --cases 512x1 512x8 --repeats 7 --output_json bench.json
    python examples/benchmark.py --device cuda --sync_debug   # issue 13's GPU suite -> docs/benchmark_cuda.json
    bash examples/gpu_benchmark.sh                      # the prepared GPU run: install, tests, benchmark (~9 min)

A case is `[SIZE:]IMAGExBATCH` (`512x8`, or `vit-large:640x8` for another model size than `--preset`). On CUDA
the defaults are issue 13's suite: ViT-B/16 at 512 (batch 1, 8, 32) and ViT-L/16 at 640 (batch 1, 8), fp32 and
bf16, eager and compiled. Targets (issue 13), printed next to every row: speed-up >= 0.9 R at batch 8 and more,
>= 0.8 R at batch 1; unpruned DToP <= 1.05 x (ViTModel + heads). `--sync_debug` (CUDA) counts the device-to-host
syncs of one eager forward with `torch.cuda.set_sync_debug_mode("warn")`, unpruned (threshold 1.0, allowed: none)
and pruned (allowed: one per auxiliary head).

Exits of the random-weight models (`--exits paper`, the default). Random heads' confidence means nothing, so the
benchmark draws which tokens exit from a distribution fitted to the paper and hands it to the model as the
auxiliary heads' class scores (the heads themselves still run in full); everything after that, the threshold test
at the preset's thresholds, keep-top-k, the repacking and the layers on fewer tokens, is the path a trained model
takes.
  * Rate: each image loses a share p of its still-active tokens at every auxiliary head (p N after the first head,
    (1 - p)^2 N tokens reach the last stage), less the tokens keep-top-k holds back. The mean of p is solved so that
    the expected GFLOPs (backbone + decode head, the paper's convention, counted by `flops_from_token_counts`)
    shrink as much as the paper reports for SegViT + DToP@Finetune on ADE20K: ViT-B/16 at 512, 109.9 -> 86.8
    GFLOPs (Table 1; mean p = 0.30) and ViT-L/16 at 640, 617.0 -> 412.8 (Table 7, threshold 0.95; mean p = 0.38).
    Backbones of 24 layers or more use ViT-L's figures, shallower ones ViT-B's. Realised ratios at batch 8 and
    32 (all heads counted, as R below): 1.26 for ViT-B (paper 1.27), 1.49 for ViT-L (paper 1.49).
  * Spread: the paper reports dataset averages and shows (its Fig. 4) that simple scenes lose most tokens at the
    first head while complex scenes keep most of them to the end; it gives no per-image distribution, so we assume
    p ~ Beta(4 m, 4 (1 - m)) (mean m, standard deviation about 0.2). A batch of n images gets the distribution's
    n stratified quantiles, (i + 0.5) / n, in random order (batch 1: its median, p = 0.27 for ViT-B, 0.36 ViT-L).
  * Where: the paper sees the middles of objects exit and their boundaries stay; each image gets six smooth random
    regions, and tokens exit in order of their margin between their region's field and the next one's.
`--exits rate` instead sets each head's threshold to the confidence quantile at which `--exit_rate` of the active
tokens exit (mixed batches alternate smooth and textured images); `--model FOLDER` benchmarks a trained model at its
own thresholds (`--exits model`).
"""

import argparse
import collections
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from arguments import require_positive
from torch import nn

from dtop_hf import DToPConfig, DToPForSemanticSegmentation
from dtop_hf.toolkit.presets import DEEP_BACKBONE_LAYERS, MODEL_SIZES, model_size_kwargs
from dtop_hf.toolkit.evaluation.flops import count_flops_from_outputs, flops_from_token_counts


# Random-weight models have ADE20K's 150 classes, except the tiny smoke-test size (5).
DEFAULT_NUM_LABELS, TINY_NUM_LABELS = 150, 5
CPU_CASES, CPU_COMPILED_CASES = ("512x1", "256x1", "256x8"), ("256x8",)
# Issue 13 §5: ViT-B/16 at 512 (batch 1, 8, 32) and ViT-L/16 at 640 (batch 1, 8).
CUDA_CASES = ("vit-base:512x1", "vit-base:512x8", "vit-base:512x32", "vit-large:640x1", "vit-large:640x8")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# Issue 13's targets: speed-up / R at batch 1 and at larger batches; unpruned DToP / (ViTModel + heads).
BATCH_ONE_SPEEDUP_TARGET, BATCH_SPEEDUP_TARGET, VIT_REFERENCE_TARGET = 0.8, 0.9, 1.05
# SegViT + DToP@Finetune on ADE20K, GFLOPs unpruned -> pruned (backbone + decode head): the paper's Table 1
# (ViT-B/16, 512 crop, 160k + finetune) and Table 7 (ViT-L/16, 640 crop, threshold 0.95).
PAPER_GFLOPS = {"vit-base": (109.9, 86.8), "vit-large": (617.0, 412.8)}
# Per-image exit rate p ~ Beta(c m, c (1 - m)): the concentration c sets the spread (std ~0.2 at c = 4).
EXIT_RATE_CONCENTRATION = 4.0
EXIT_RATE_GRID_POINTS = 2000  # midpoint grid over (0, 1) for the Beta's expectation and quantiles
REGIONS_PER_IMAGE = 6
# torch's sync debug mode warns "called a synchronizing CUDA operation" at every device-to-host sync.
SYNC_WARNING_TEXT = "synchronizing"


@dataclass(frozen=True)
class Case:
    """One input of the benchmark: a model size of `MODEL_SIZES` (None: the `--model` folder), image side, batch."""

    preset: str | None
    image_size: int
    batch_size: int

    @property
    def label(self) -> str:
        size = f"{self.image_size}x{self.batch_size}"
        return f"{self.preset}:{size}" if self.preset else size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = parser.add_argument_group("model and inputs")
    inputs.add_argument("--preset", type=str, default="vit-base", choices=sorted(MODEL_SIZES), help="Model size.")
    inputs.add_argument("--num_labels", type=int, default=None, help="Classes (default 150; tiny: 5).")
    inputs.add_argument("--model", type=str, default=None, help="A trained DToP folder / Hub id (its thresholds).")
    inputs.add_argument(
        "--cases", type=str, nargs="+", default=None,
        help="[SIZE:]IMAGExBATCH such as 512x8 vit-large:640x8; default: 512x1 256x1 256x8 (cpu), issue 13's (cuda).",
    )  # fmt: skip
    inputs.add_argument(
        "--exits", type=str, default=None, choices=["paper", "rate", "model"],
        help="Where exits come from (see above); default: model with --model, rate with --exit_rate, else paper.",
    )  # fmt: skip
    inputs.add_argument("--exit_rate", type=float, default=None, help="--exits rate: share exiting per head (0.4).")
    inputs.add_argument("--seed", type=int, default=0, help="Seed of the weights, images and drawn exits.")
    run = parser.add_argument_group("what to run")
    run.add_argument("--device", type=str, default="cpu", help="cpu or cuda (cuda:N).")
    run.add_argument(
        "--dtypes", type=str, nargs="+", default=None, choices=sorted(AUTOCAST_DTYPES),
        help="fp32 and/or bf16 (torch.autocast; weights stay fp32); default: fp32 on cpu, both on cuda.",
    )  # fmt: skip
    run.add_argument(
        "--modes", type=str, nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
        help="Plain eager PyTorch and/or torch.compile.",
    )  # fmt: skip
    run.add_argument(
        "--compiled_cases", type=str, nargs="*", default=None,
        help="Cases also run compiled, in this order; default: 256x8 on cpu (compiling takes minutes), all on cuda.",
    )  # fmt: skip
    run.add_argument("--repeats", type=int, default=3, help="Timed runs per variant (alternating).")
    run.add_argument("--warmup", type=int, default=1, help="Untimed runs per variant first.")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    run.add_argument("--time_budget_s", type=float, default=None, help="Start no case after this; list the rest.")
    run.add_argument("--no_memory", action="store_true", help="Skip the peak-memory probes (CPU: subprocesses).")
    run.add_argument("--no_vit_reference", action="store_true", help="Skip the transformers ViTModel comparison.")
    run.add_argument("--sync_debug", action="store_true", help="CUDA: count device-to-host syncs per forward.")
    output = parser.add_argument_group("output")
    output.add_argument("--output_json", type=str, default=None, help="Default docs/benchmark_<device>.json.")
    output.add_argument("--output_markdown", type=str, default=None, help="Also write the tables as Markdown.")
    parser.add_argument("--memory_probe", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolve_defaults(args)
    return args


def resolve_defaults(args: argparse.Namespace) -> None:
    """Device-dependent defaults, case parsing and the checks argparse cannot make."""
    device_type = torch.device(args.device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"`--device` must be cpu or cuda[:N], got {args.device!r}.")
    on_cuda = device_type == "cuda"
    if args.sync_debug and not on_cuda:
        raise ValueError("`--sync_debug` counts CUDA syncs (torch.cuda.set_sync_debug_mode): use `--device cuda`.")
    default_preset = None if args.model else args.preset
    default_cases = CUDA_CASES if on_cuda else CPU_CASES
    if args.model:  # one model: the suite's image and batch sizes without the model sizes
        default_cases = tuple(dict.fromkeys(case.rpartition(":")[2] for case in default_cases))
    args.cases = [parse_case(case, default_preset, args.model) for case in args.cases or default_cases]
    compiled_cases = args.compiled_cases
    if compiled_cases is None:
        compiled_cases = [case.label for case in args.cases] if on_cuda else CPU_COMPILED_CASES
    args.compiled_cases = [parse_case(case, default_preset, args.model) for case in compiled_cases]
    args.dtypes = list(dict.fromkeys(args.dtypes or (["fp32", "bf16"] if on_cuda else ["fp32"])))
    if args.exits is None:
        args.exits = "model" if args.model else "rate" if args.exit_rate is not None else "paper"
    if args.exits != "model" and args.model:
        raise ValueError(f"`--model` runs at the model's own thresholds: `--exits` must be model, got {args.exits!r}.")
    if args.exits == "model" and not args.model:
        raise ValueError("`--exits model` needs `--model FOLDER` (random weights have no meaningful thresholds).")
    if args.exits == "rate" and args.exit_rate is None:
        args.exit_rate = 0.4
    if args.exit_rate is not None and not 0.0 <= args.exit_rate < 1.0:
        raise ValueError(f"`--exit_rate` must be in [0, 1), got {args.exit_rate}.")
    require_positive(args, ["repeats"])
    if args.warmup < 0:
        raise ValueError(f"`--warmup` must be >= 0, got {args.warmup}.")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        raise ValueError(f"`--time_budget_s` must be > 0, got {args.time_budget_s}.")
    if args.output_json is None:
        args.output_json = f"docs/benchmark_{device_type}.json"


def parse_case(case: str, default_preset: str | None = None, model: str | None = None) -> Case:
    """'512x8' -> Case(default_preset, 512, 8); 'vit-large:640x8' -> Case('vit-large', 640, 8)."""
    preset, _, sizes = case.rpartition(":")
    try:
        image_size, batch_size = (int(part) for part in sizes.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"A case is [SIZE:]IMAGE_SIZExBATCH_SIZE such as 512x8 or vit-large:640x8, got {case!r}."
        ) from None
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"A case's image and batch sizes must be >= 1, got {case!r}.")
    if preset and model:
        raise ValueError(f"`--model` benchmarks one model: give its cases without a model size, got {case!r}.")
    if preset and preset not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {preset!r} in case {case!r}: expected one of {sorted(MODEL_SIZES)}.")
    return Case(preset or default_preset, image_size, batch_size)


def benchmark_plan(args: argparse.Namespace) -> list[tuple[Case, str, str]]:
    """(case, mode, dtype) in run order: every eager run first (cheap; the ViTModel comparison and the sync counts),
    then the compiled ones in `--compiled_cases` order, dtype by dtype, so that a time budget cuts compiles last."""
    plan = []
    if "eager" in args.modes:
        plan += [(case, "eager", dtype) for case in args.cases for dtype in args.dtypes]
    if "compiled" in args.modes:
        compiled = [case for case in args.compiled_cases if case in args.cases]
        plan += [(case, "compiled", dtype) for dtype in args.dtypes for case in dict.fromkeys(compiled)]
    return plan


def build_model(args: argparse.Namespace, preset: str | None = None) -> DToPForSemanticSegmentation:
    """The `--model` folder, or a random-weight model of size `preset` (default `--preset`), on `--device`."""
    torch.manual_seed(args.seed)
    if args.model:
        return DToPForSemanticSegmentation.from_pretrained(args.model).eval().to(args.device)
    preset = preset or args.preset
    num_labels = args.num_labels or (TINY_NUM_LABELS if preset == "tiny" else DEFAULT_NUM_LABELS)
    with torch.device(args.device):  # initialised in place: ViT-L's 300M weights are slow to draw on a CPU
        model = DToPForSemanticSegmentation(DToPConfig(**model_size_kwargs(preset), num_labels=num_labels))
    return model.eval()


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
        confidence = model.class_probabilities(outputs.stage_logits[stage]).amax(dim=1).flatten()
        active = (outputs.exit_stage >= stage).flatten()
        thresholds[stage] = min(float(confidence[active].float().quantile(1.0 - exit_rate)), 1.0)
    return thresholds


# ---------------------------------------------------------------------------------------------------------------
# Exits drawn from the paper's GFLOPs reductions (`--exits paper`, see the module docstring).


def paper_gflops(config: DToPConfig) -> tuple[float, float]:
    """The paper's GFLOPs unpruned -> pruned of the official model closest to `config` (by depth)."""
    return PAPER_GFLOPS["vit-large" if config.num_hidden_layers >= DEEP_BACKBONE_LAYERS else "vit-base"]


def exit_rate_grid() -> torch.Tensor:
    """Midpoints of `EXIT_RATE_GRID_POINTS` equal steps of (0, 1), float64."""
    return (torch.arange(EXIT_RATE_GRID_POINTS, dtype=torch.float64) + 0.5) / EXIT_RATE_GRID_POINTS


def exit_rate_weights(mean: float, rates: torch.Tensor) -> torch.Tensor:
    """Beta(c mean, c (1 - mean)) probability of each grid point, normalised to sum to 1."""
    concentration = torch.tensor(EXIT_RATE_CONCENTRATION, dtype=torch.float64)
    distribution = torch.distributions.Beta(concentration * mean, concentration * (1.0 - mean))
    weights = distribution.log_prob(rates).exp()
    return weights / weights.sum()


def gflops_at_exit_rates(config: DToPConfig, num_patches: int, rates: torch.Tensor) -> torch.Tensor:
    """Paper-convention GFLOPs (backbone + decode head) of an image whose heads each let `rate` of the active
    tokens exit, one value per rate `(points,)`; rate 0 is the unpruned model. Keep-top-k holds back the most
    confident `keep_top_k` tokens of each region's class at every head: they never exit."""
    num_stages = len(config.out_indices)
    exited_share = 1.0 - (1.0 - rates)[:, None] ** torch.arange(num_stages)  # (points, stages)
    held_back = config.keep_top_k * min(REGIONS_PER_IMAGE, config.num_labels)
    tokens_per_stage = num_patches - ((num_patches * exited_share).round() - held_back).clamp(min=0).long()
    stage_of_layer = [sum(layer > index for index in config.out_indices) for layer in range(config.num_hidden_layers)]
    tokens_per_layer = tokens_per_stage[:, stage_of_layer] + config.num_prefix_tokens
    return flops_from_token_counts(config, tokens_per_layer, tokens_per_stage).backbone_and_final_head


def paper_exit_rate_mean(config: DToPConfig, num_patches: int) -> float:
    """Mean per-head exit rate m at which the expected GFLOPs ratio, over p ~ Beta(c m, c (1 - m)), is the paper's."""
    unpruned, pruned = paper_gflops(config)
    rates = exit_rate_grid()
    unpruned_gflops = gflops_at_exit_rates(config, num_patches, torch.zeros(1, dtype=torch.float64))
    ratios = gflops_at_exit_rates(config, num_patches, rates) / unpruned_gflops
    low, high = 1e-3, 1.0 - 1e-3
    for _ in range(50):  # bisection: a larger mean exits more tokens, so the expected ratio falls
        mean = (low + high) / 2
        if float((exit_rate_weights(mean, rates) * ratios).sum()) > pruned / unpruned:
            low = mean
        else:
            high = mean
    return (low + high) / 2


def paper_exit_rates(config: DToPConfig, num_patches: int, batch_size: int, generator: torch.Generator):
    """Per-image exit rates `(batch,)`: the Beta's `batch_size` stratified quantiles in random order, and its mean."""
    mean = paper_exit_rate_mean(config, num_patches)
    rates = exit_rate_grid()
    cumulative = exit_rate_weights(mean, rates).cumsum(dim=0)
    quantiles = (torch.arange(batch_size, dtype=torch.float64) + 0.5) / batch_size
    drawn = rates[torch.searchsorted(cumulative, quantiles).clamp(max=len(rates) - 1)]
    return drawn[torch.randperm(batch_size, generator=generator)].float(), mean


def paper_exit_scores(
    config: DToPConfig, rates: torch.Tensor, grid_size: tuple[int, int], generator: torch.Generator
) -> list[torch.Tensor]:
    """Per auxiliary head, class scores `(batch, num_labels, tokens)` under which exactly the drawn tokens clear the
    head's threshold: after head k, a share 1 - (1 - p)^(k + 1) of every image's tokens, middles of regions first.

    The confidence (top score) of the exiting tokens lies in (threshold + (1 - threshold) / 2, 1], highest in the
    middle of a region, so keep-top-k holds back each region's most central tokens; the others score below the
    threshold. The top score is the token's region's class; the rest share what is left.
    """
    batch_size, num_labels = len(rates), config.num_labels
    num_tokens = grid_size[0] * grid_size[1]
    num_regions = min(REGIONS_PER_IMAGE, num_labels)
    coarse = torch.randn(batch_size, num_regions, 4, 4, generator=generator)
    fields = nn.functional.interpolate(coarse, size=grid_size, mode="bicubic", align_corners=False).flatten(2)
    top_fields = fields.topk(min(2, num_regions), dim=1).values  # (batch, 2, tokens)
    margin = top_fields[:, 0] - top_fields[:, -1] if num_regions > 1 else top_fields[:, 0]
    labels = torch.stack([torch.randperm(num_labels, generator=generator)[:num_regions] for _ in range(batch_size)])
    predicted_class = labels.gather(1, fields.argmax(dim=1))  # (batch, tokens)
    # Rank in [0, 1) by margin, 0 for the token deepest inside its region: the order in which an image's tokens exit.
    order = margin.argsort(dim=1, descending=True)
    positions = (torch.arange(num_tokens, dtype=torch.float32) / num_tokens).expand(batch_size, -1)
    rank = torch.empty_like(margin).scatter_(1, order, positions)
    scores = []
    for head_index, threshold in enumerate(config.exit_thresholds_per_head(None)[:-1]):
        exited_share = 1.0 - (1.0 - rates[:, None]) ** (head_index + 1)  # (batch, 1)
        exits = rank < exited_share
        exit_confidence = threshold + (1.0 - threshold) * (1.0 - 0.5 * rank / exited_share.clamp(min=1e-6))
        confidence = torch.where(exits, exit_confidence, 0.9 * threshold * (1.0 - rank))  # (batch, tokens)
        class_scores = ((1.0 - confidence) / max(num_labels - 1, 1)).unsqueeze(1).repeat(1, num_labels, 1)
        scores.append(class_scores.scatter_(1, predicted_class.unsqueeze(1), confidence.unsqueeze(1)))
    return scores


class DrawnConfidenceHead(nn.Module):
    """An auxiliary head whose class scores, so the tokens' confidence, were drawn in advance (`--exits paper`).

    The wrapped head still does all of its work (its forward, and its own class scores, computed and dropped):
    baseline and pruned runs pay for the real head; only the numbers that the exit decision reads are replaced.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.register_buffer("drawn_scores", torch.zeros(0), persistent=False)

    def forward(self, *args, **kwargs):
        return self.head(*args, **kwargs)

    def class_scores(self, class_logits: torch.Tensor | None, canvas: torch.Tensor) -> torch.Tensor:
        self.head.class_scores(class_logits, canvas)
        return self.drawn_scores  # (batch, num_labels, tokens) probabilities

    @staticmethod
    def scores_to_probabilities(class_scores: torch.Tensor) -> torch.Tensor:
        return class_scores


def use_drawn_exits(model: DToPForSemanticSegmentation, scores: list[torch.Tensor] | None) -> None:
    """Give the auxiliary heads these class scores (one per head), or their own back (`None`)."""
    heads = model.dtop.heads
    for index in range(len(heads) - 1):
        if scores is None:
            if isinstance(heads[index], DrawnConfidenceHead):
                heads[index] = heads[index].head
            continue
        if not isinstance(heads[index], DrawnConfidenceHead):
            heads[index] = DrawnConfidenceHead(heads[index])
        heads[index].drawn_scores = scores[index]  # a buffer: a compiled model reads it as an input


def prepare_exits(args: argparse.Namespace, model, pixel_values: torch.Tensor) -> tuple[list[float] | None, dict]:
    """Set up the pruned runs' exits; returns the `exit_threshold` to pass them and what to record about the exits."""
    if args.exits != "paper":
        use_drawn_exits(model, None)
        if args.exits == "rate":
            thresholds = seeded_thresholds(model, pixel_values, args.exit_rate)
            return thresholds, {"exits": "rate", "exit_rate": args.exit_rate}
        return None, {"exits": "model"}
    config, generator = model.config, torch.Generator().manual_seed(args.seed)
    grid_size = tuple(math.ceil(side / config.patch_size) for side in pixel_values.shape[-2:])
    rates, mean = paper_exit_rates(config, grid_size[0] * grid_size[1], pixel_values.shape[0], generator)
    scores = paper_exit_scores(config, rates, grid_size, generator)
    use_drawn_exits(model, [score.to(pixel_values.device) for score in scores])
    return None, {
        "exits": "paper",
        "paper_gflops_unpruned_pruned": list(paper_gflops(config)),
        "exit_rate_mean": mean,
        "exit_rates_per_image": rates.tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Timing, memory, syncs.


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast_context(device: str, dtype: str) -> torch.autocast:
    """bf16 autocast for "bf16" (weights stay fp32), a disabled one for "fp32"."""
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)


def inference_call(function, device: str, dtype: str):
    """`function()` as inference: no autograd, under the dtype's autocast."""

    def call():
        with torch.no_grad(), autocast_context(device, dtype):
            return function()

    return call


def time_call(function, device: str) -> float:
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


def time_alternating(functions: dict, repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, run in turn so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(time_call(function, device))
    return {name: statistics.median(values) for name, values in times.items()}


def count_device_syncs(function) -> dict:
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


def cuda_peak_memory_mb(function) -> tuple[float, float]:
    """Peak CUDA memory of one call: (MB allocated on top of what was resident before it, total MB at the peak)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return (peak - resident) / 2**20, peak / 2**20


def cpu_peak_memory_mb(args: argparse.Namespace, case: Case, dtype: str, unpruned: bool) -> float:
    """Peak resident-memory growth (MB) of one eager forward, measured in a fresh process (`run_memory_probe`)."""
    probe = {"preset": case.preset, "image_size": case.image_size, "batch_size": case.batch_size, "dtype": dtype,
             "unpruned": unpruned}  # fmt: skip
    command = [sys.executable, os.path.abspath(__file__), "--memory_probe", json.dumps(probe), "--seed",
               str(args.seed), "--exits", args.exits, "--cases", f"{case.image_size}x{case.batch_size}"]  # fmt: skip
    for flag, value in (("--model", args.model), ("--num_labels", args.num_labels), ("--threads", args.threads),
                        ("--exit_rate", args.exit_rate)):  # fmt: skip
        command += [flag, str(value)] if value is not None else []
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
    model = build_model(args, probe["preset"])
    pixel_values = make_images(probe["batch_size"], probe["image_size"], args.seed, args.device)
    threshold, _ = prepare_exits(args, model, pixel_values)
    threshold = 1.0 if probe["unpruned"] else threshold
    forward = inference_call(lambda: model(pixel_values, exit_threshold=threshold), args.device, probe["dtype"])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start_rss, peak_rss, running = current_rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak_rss[0] = max(peak_rss[0], current_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    forward()
    running[0] = False
    sampler.join()
    print(max(peak_rss[0] - start_rss, 0) / 2**20)


# ---------------------------------------------------------------------------------------------------------------
# The cases.


def vit_reference(model: DToPForSemanticSegmentation, device: str):
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


class BenchmarkModels:
    """The models of a run, each built once: the DToP model per size, its compiled form, the ViTModel reference."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.models, self.compiled_models, self.references = {}, {}, {}

    def model(self, preset: str | None) -> DToPForSemanticSegmentation:
        if preset not in self.models:
            model = self.models[preset] = build_model(self.args, preset)
            print(
                f"model {self.args.model or preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                f"parameters, attention {model.config._attn_implementation}, exit thresholds "
                f"{list(model.config.exit_thresholds_per_head(None)[:-1])}",
                flush=True,
            )
        return self.models[preset]

    def compiled(self, preset: str | None):
        if preset not in self.compiled_models:
            self.compiled_models[preset] = torch.compile(self.model(preset), dynamic=True)
        return self.compiled_models[preset]

    def vit_reference(self, preset: str | None):
        if preset not in self.references:
            self.references[preset] = vit_reference(self.model(preset), self.args.device)
        return self.references[preset]


def speedup_target(batch_size: int) -> float:
    """Issue 13: speed-up >= 0.8 R at batch 1, >= 0.9 R at larger batches."""
    return BATCH_ONE_SPEEDUP_TARGET if batch_size == 1 else BATCH_SPEEDUP_TARGET


def environment(device: str) -> dict:
    on_cuda = device.startswith("cuda")
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def benchmark_case(args: argparse.Namespace, models: BenchmarkModels, case: Case, mode: str, dtype: str) -> dict:
    model = models.model(case.preset)
    pixel_values = make_images(case.batch_size, case.image_size, args.seed, args.device)
    threshold, exit_record = prepare_exits(args, model, pixel_values)
    with torch.no_grad(), autocast_context(args.device, dtype):
        baseline_outputs = model(pixel_values, exit_threshold=1.0)
        pruned_outputs = model(pixel_values, exit_threshold=threshold)
    baseline_flops = count_flops_from_outputs(model.config, baseline_outputs)
    pruned_flops = count_flops_from_outputs(model.config, pruned_outputs)
    runner = models.compiled(case.preset) if mode == "compiled" else model
    functions = {
        "baseline": inference_call(lambda: runner(pixel_values, exit_threshold=1.0), args.device, dtype),
        "pruned": inference_call(lambda: runner(pixel_values, exit_threshold=threshold), args.device, dtype),
    }
    if mode == "eager" and not args.no_vit_reference:
        reference = models.vit_reference(case.preset)
        functions["vit_plus_heads"] = inference_call(lambda: reference(pixel_values), args.device, dtype)
    record = {
        "model": args.model or case.preset,
        "image_size": case.image_size,
        "batch_size": case.batch_size,
        "mode": mode,
        "dtype": dtype,
        "device": args.device,
        "exit_threshold": list(model.config.exit_thresholds_per_head(threshold)[:-1]),
        **exit_record,
    }
    if mode == "compiled":
        graphs_before, compile_start = compiled_graph_count(), time.perf_counter()
        functions["baseline"](), functions["pruned"]()  # compile both variants before timing
        synchronize(args.device)
        record["compile_seconds"] = time.perf_counter() - compile_start
        record["graphs_compiled"] = compiled_graph_count() - graphs_before
        graphs_before = compiled_graph_count()
    medians = time_alternating(functions, args.repeats, args.warmup, args.device)
    if mode == "compiled":  # 0: the token counts of the timed calls reused the graphs compiled above
        record["graphs_compiled_while_timing"] = compiled_graph_count() - graphs_before
    flops_ratio = float(baseline_flops.total.sum() / pruned_flops.total.sum())
    record.update({
        "tokens_per_layer_mean": pruned_outputs.tokens_per_layer.float().mean(dim=0).tolist(),
        "tokens_last_layer_per_image": pruned_outputs.tokens_per_layer[:, -1].tolist(),
        "gflops_baseline_per_image": float(baseline_flops.total.mean()),
        "gflops_pruned_per_image": float(pruned_flops.total.mean()),
        "flops_ratio": flops_ratio,
        "flops_ratio_backbone_and_final_head": float(
            baseline_flops.backbone_and_final_head.sum() / pruned_flops.backbone_and_final_head.sum()
        ),
        "baseline_seconds": medians["baseline"],
        "pruned_seconds": medians["pruned"],
        "speedup": medians["baseline"] / medians["pruned"],
        "images_per_second": {name: case.batch_size / medians[name] for name in ("baseline", "pruned")},
        "speedup_target": speedup_target(case.batch_size),
    })  # fmt: skip
    record["speedup_over_flops_ratio"] = record["speedup"] / flops_ratio
    record["meets_speedup_target"] = record["speedup_over_flops_ratio"] >= record["speedup_target"]
    if "vit_plus_heads" in medians:
        record["vit_plus_heads_seconds"] = medians["vit_plus_heads"]
        record["baseline_over_vit_plus_heads"] = medians["baseline"] / medians["vit_plus_heads"]
        record["meets_vit_reference_target"] = record["baseline_over_vit_plus_heads"] <= VIT_REFERENCE_TARGET
    if args.sync_debug and mode == "eager":
        record["device_syncs_per_forward"] = {
            "unpruned": count_device_syncs(functions["baseline"]),
            "pruned": count_device_syncs(functions["pruned"]),
            "allowed_unpruned": 0,
            "allowed_pruned": len(model.config.out_indices) - 1,
        }
        syncs = record["device_syncs_per_forward"]
        within = [syncs[name]["count"] <= syncs[f"allowed_{name}"] for name in ("unpruned", "pruned")]
        record["meets_sync_target"] = all(within)
    if not args.no_memory:
        if args.device.startswith("cuda"):
            peaks = {name: cuda_peak_memory_mb(functions[name]) for name in ("baseline", "pruned")}
            record["peak_memory_mb"] = {name: peak[0] for name, peak in peaks.items()}
            record["peak_memory_total_mb"] = {name: peak[1] for name, peak in peaks.items()}
        else:
            record["peak_memory_mb"] = {
                name: cpu_peak_memory_mb(args, case, dtype, unpruned=name == "baseline")
                for name in ("baseline", "pruned")
            }
    record["environment"] = environment(args.device)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Reports.

RESULT_COLUMNS = ("case", "mode", "dtype", "GFLOPs base->pruned", "R", "base ms", "pruned ms", "speed-up", "/R",
                  "/R target", "img/s base->pruned", "base/ViT", "peak MB base->pruned", "targets")  # fmt: skip
SYNC_COLUMNS = ("case", "dtype", "syncs unpruned (allowed)", "syncs pruned (allowed)", "where (pruned)")


def format_number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def result_row(record: dict) -> tuple[str, ...]:
    memory = record.get("peak_memory_mb", {})
    images = record["images_per_second"]
    checks = (("/R", "meets_speedup_target"), ("ViT", "meets_vit_reference_target"), ("syncs", "meets_sync_target"))
    missed = [name for name, key in checks if record.get(key) is False]
    return (
        f"{record['model']} {record['image_size']}x{record['batch_size']}",
        record["mode"],
        record["dtype"],
        f"{record['gflops_baseline_per_image']:.4g}->{record['gflops_pruned_per_image']:.4g}",
        format_number(record["flops_ratio"]),
        format_number(1e3 * record["baseline_seconds"], 1),
        format_number(1e3 * record["pruned_seconds"], 1),
        format_number(record["speedup"]),
        format_number(record["speedup_over_flops_ratio"]),
        f">={record['speedup_target']}",
        f"{images['baseline']:.1f}->{images['pruned']:.1f}",
        format_number(record.get("baseline_over_vit_plus_heads")),
        f"{memory['baseline']:.0f}->{memory['pruned']:.0f}" if memory else "-",
        "met" if not missed else "MISSED " + ", ".join(missed),
    )


def sync_row(record: dict) -> tuple[str, ...]:
    syncs = record["device_syncs_per_forward"]
    where = ", ".join(f"{line} x{count}" for line, count in syncs["pruned"]["where"].items())
    return (
        f"{record['model']} {record['image_size']}x{record['batch_size']}",
        record["dtype"],
        f"{syncs['unpruned']['count']} ({syncs['allowed_unpruned']})",
        f"{syncs['pruned']['count']} ({syncs['allowed_pruned']})",
        where or "-",
    )


NOTES = (
    "R = GFLOPs unpruned / pruned (all heads, SPEC §5); speed-up = median baseline time / median pruned time; "
    f"/R = speed-up / R (targets: >= {BATCH_ONE_SPEEDUP_TARGET} at batch 1, >= {BATCH_SPEEDUP_TARGET} at larger "
    f"batches); base/ViT = unpruned DToP / (transformers ViTModel, sdpa, + the same heads), eager only (target <= "
    f"{VIT_REFERENCE_TARGET}); peak MB = memory one forward adds (CUDA: max_memory_allocated over the resident "
    "weights and inputs; CPU: resident-memory growth in a fresh process)."
)


def text_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(text) for text in column) for column in zip(columns, *rows)]
    lines = [" ".join(text.rjust(width) for text, width in zip(row, widths)) for row in (columns, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in (columns, *rows)]
    lines.insert(1, "|" + "---|" * len(columns))
    return "\n".join(lines)


def report_sections(records: list[dict], skipped: list[str], table) -> list[str]:
    """The result table, the sync table (when counted), the notes and the skipped runs, each formatted by `table`."""
    sections = [table(RESULT_COLUMNS, [result_row(record) for record in records]), NOTES]
    synced = [record for record in records if "device_syncs_per_forward" in record]
    if synced:
        sections.append("Device-to-host syncs per eager forward (torch.cuda.set_sync_debug_mode):")
        sections.append(table(SYNC_COLUMNS, [sync_row(record) for record in synced]))
    if skipped:
        sections.append("Skipped (time budget): " + ", ".join(skipped))
    return sections


def write_reports(args: argparse.Namespace, records: list[dict], skipped: list[str]) -> None:
    """JSON (and Markdown) after every case, so that a run cut short keeps what it measured."""
    output_json = Path(args.output_json)
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(records, indent=2))
    if args.output_markdown:
        setting = environment(args.device)
        header = (
            f"`python examples/benchmark.py {' '.join(sys.argv[1:])}` on {setting['device_name']} (torch "
            f"{setting['torch']}, transformers {setting['transformers']}); exits: {args.exits}."
        )
        sections = [header, *report_sections(records, skipped, markdown_table)]
        Path(args.output_markdown).write_text("\n\n".join(sections) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`--device {args.device}` needs a CUDA build of torch and a GPU; none is available here.")
    if args.memory_probe:
        run_memory_probe(args)
        return []
    if "compiled" in args.modes:
        allow_recompiles()
    setting = environment(args.device)
    print(
        f"device {setting['device_name']}, torch {setting['torch']}, transformers {setting['transformers']}, "
        f"{setting['threads']} threads, fp32 matmul precision {setting['float32_matmul_precision']}, exits "
        f"{args.exits}",
        flush=True,
    )
    models, records, skipped, start = BenchmarkModels(args), [], [], time.perf_counter()
    for case, mode, dtype in benchmark_plan(args):
        if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
            skipped.append(f"{case.label} {mode} {dtype}")
            continue
        record = benchmark_case(args, models, case, mode, dtype)
        records.append(record)
        write_reports(args, records, skipped)
        print(
            f"[{case.label} {mode} {dtype}] R {record['flops_ratio']:.2f}, speed-up {record['speedup']:.2f} "
            f"({record['speedup_over_flops_ratio']:.2f} R, target {record['speedup_target']}), "
            f"{time.perf_counter() - start:.0f} s so far",
            flush=True,
        )
    write_reports(args, records, skipped)
    print("\n\n".join(report_sections(records, skipped, text_table)))
    return records


if __name__ == "__main__":
    main()
