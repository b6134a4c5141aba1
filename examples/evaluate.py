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
"""Measure what DToP buys: sweep exit thresholds on a data set and report, per threshold, mIoU (also per class),
pixel accuracy, GFLOPs per image (backbone + final head, the paper's figure, and with every head), R = GFLOPs
unpruned / pruned, the share of tokens finalised by each head and the model time per image; optionally calibrate
the thresholds, one per auxiliary head, to a budget.

Writes to `--output_dir`: `results.json`, `table.md` (the table printed, like the paper's Table 2),
`gflops_vs_miou.png`, `pictures/image_N.png` (image | prediction | ground truth | exit map, one row per
threshold) and, with `--target_gflops` or `--max_miou_drop`, `calibrated/` (or `--calibrated_output_dir`): a copy
of the model whose config carries the chosen `exit_threshold`.

    python examples/evaluate.py --model outputs/prune --dataset_name builtin --thresholds 1.0 0.98 0.95 0.9 0.8
    python examples/evaluate.py --model outputs/prune --thresholds 1.0 0.8 0.6,0.9   # 0.6,0.9: one per aux. head
    python examples/evaluate.py --model outputs/prune --dataset_name scene_parse_150 --sliding_window
    python examples/evaluate.py --model outputs/prune --max_miou_drop 0.5      # at most 0.5 mIoU points lost
    python examples/evaluate.py --model outputs/prune --target_gflops 80       # at most 80 GFLOPs per image

Calibration searches one threshold per auxiliary head (`--calibration_search single`: one for all heads, the
paper's setting) on calibration data, never on the evaluated split: `--calibration_split` (a split of the data
set), else the built-in data set's own calibration scenes, else `--calibration_samples` images drawn from `train`.
The chosen thresholds are then reported on the evaluated split too: the gap between the two shows how much the
choice overfits the calibration images. When no swept threshold lets a token exit, lower ones are tried; a model
that never exits is reported as such, and no calibrated copy is written.

Several processes split the data; the results are the same as with one (model time per image aside):

    accelerate launch examples/evaluate.py --model ...
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/evaluate.py --cpu --model ...
"""

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from arguments import (
    add_cpu_argument,
    add_dataset_arguments,
    load_dataset_from_arguments,
    parse_exit_threshold,
    require_positive,
)
from torch.utils.data import DataLoader

from dtop_hf import DToPConfig, DToPImageProcessor
from dtop_hf.toolkit.evaluation.calibration import (
    CalibrationOutcome,
    NothingToCalibrateError,
    calibrate_per_head_thresholds,
    calibrate_threshold,
    check_thresholds,
    compact_threshold,
    format_threshold,
    is_uniform,
    is_unpruned,
    json_ready,
    per_head,
    save_calibrated_model,
    speedup,
)
from dtop_hf.toolkit.data.datasets import (
    BUILTIN_NAMES,
    SegmentationDataset,
    build_eval_dataset,
    check_segmentation_split,
    collate_segmentation_batch,
)
from dtop_hf.toolkit.data.synthetic_scenes import make_synthetic_scenes
from dtop_hf.toolkit.evaluation.loop import evaluate_model
from dtop_hf.toolkit.inference.loading import load_model_and_processor as load_dtop_model_and_processor
from dtop_hf.toolkit.inference.segmentation import forward_images, sliding_window_processor
from dtop_hf.toolkit.inference.visualization import default_stage_names, make_palette, side_by_side, stack_vertically


logger = get_logger(__name__)

DEFAULT_THRESHOLDS = (1.0, 0.98, 0.95, 0.9, 0.8)
# The per-class table is printed up to this many classes (ADE20K's 150 go to the JSON only).
MAX_PRINTED_CLASSES = 30
GFLOPS_KEYS = {"all_heads": "gflops", "paper": "gflops_backbone_and_final_head"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sweep DToP exit thresholds: mIoU, GFLOPs, exits, time; calibrate.")
    parser.add_argument("--model", type=str, required=True, help="DToP model folder or Hub id.")
    data = parser.add_argument_group("data")
    add_dataset_arguments(data, dataset_name_default="builtin", do_reduce_labels_default=None, seed_flag="--seed")
    data.add_argument(
        "--split",
        type=str,
        default="validation",
        choices=["validation", "train"],
        help="Split to evaluate (and calibrate on).",
    )
    data.add_argument("--per_device_eval_batch_size", type=int, default=8, help="Images per forward pass and process.")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--thresholds",
        type=parse_exit_threshold,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="Exit thresholds in (0, 1]; 1.0 = unpruned baseline; 0.6,0.9 = one per auxiliary head.",
    )
    sweep.add_argument(
        "--sliding_window",
        action="store_true",
        help="Official test mode: shorter side resized to the crop, overlapping windows.",
    )
    sweep.add_argument(
        "--crop_size", type=int, default=None, help="Sliding-window crop side; default: the image processor's."
    )
    sweep.add_argument(
        "--stride", type=int, default=None, help="Sliding-window stride; default: the image processor's."
    )
    add_cpu_argument(sweep)

    calibration = parser.add_argument_group("calibration (one of)")
    budget = calibration.add_mutually_exclusive_group()
    budget.add_argument(
        "--target_gflops", type=float, default=None, help="Best mIoU within this many GFLOPs per image."
    )
    budget.add_argument(
        "--max_miou_drop",
        type=float,
        default=None,
        help="Fewest GFLOPs losing at most this many mIoU points (0.5 = half a point) against threshold 1.0.",
    )
    calibration.add_argument(
        "--gflops_convention",
        type=str,
        default="all_heads",
        choices=sorted(GFLOPS_KEYS),
        help="Cost that --target_gflops limits: every head, or the paper's backbone + final head.",
    )
    calibration.add_argument(
        "--num_refinements", type=int, default=4, help="Bisection steps between sweep thresholds."
    )
    calibration.add_argument(
        "--calibration_search",
        type=str,
        default="per_head",
        choices=["per_head", "single"],
        help="One threshold per auxiliary head (local search on per-head grids), or one for every head.",
    )
    calibration.add_argument(
        "--num_grid_refinements",
        type=int,
        default=2,
        help="Per-head search: levels of finer grids around the best thresholds found on the sweep's grid.",
    )
    calibration.add_argument(
        "--calibration_split",
        type=str,
        default=None,
        help="Split to calibrate on (not --split); default: the built-in data set's calibration scenes, or "
        "--calibration_samples images drawn from train.",
    )
    calibration.add_argument(
        "--calibration_samples",
        type=int,
        default=100,
        help="Images calibrated on: generated calibration scenes, or the first N of the calibration split.",
    )
    calibration.add_argument(
        "--calibrated_output_dir",
        type=str,
        default=None,
        help="Where the calibrated model is saved (default: <output_dir>/calibrated).",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir",
        type=str,
        default="dtop-evaluation",
        help="Where results, plot, pictures and the calibrated model go.",
    )
    output.add_argument("--num_pictures", type=int, default=4, help="Images drawn with their prediction and exit map.")
    args = parser.parse_args(argv)

    check_thresholds(args.thresholds)
    require_positive(
        args,
        (
            "per_device_eval_batch_size",
            "synthetic_validation_samples",
            "synthetic_image_size",
            "max_eval_samples",
            "calibration_samples",
        ),
    )
    if args.num_pictures < 0 or args.num_refinements < 0 or args.num_grid_refinements < 0:
        raise ValueError("`--num_pictures`, `--num_refinements` and `--num_grid_refinements` must be >= 0.")
    if args.calibration_split is not None and args.calibration_split == args.split:
        raise ValueError(
            f"`--calibration_split` and `--split` are both {args.split!r}: calibrate on other images than those "
            "the report is measured on, or the report shows the calibration's own optimism."
        )
    if args.calibration_search == "single" and not all(is_uniform(threshold) for threshold in args.thresholds):
        raise ValueError(
            "`--calibration_search single` calibrates one threshold for every head: give `--thresholds` without "
            "per-head values (no commas)."
        )
    if args.target_gflops is not None and args.target_gflops <= 0:
        raise ValueError(f"`--target_gflops` must be > 0, got {args.target_gflops}.")
    if args.max_miou_drop is not None and args.max_miou_drop < 0:
        raise ValueError(f"`--max_miou_drop` must be >= 0 (mIoU points), got {args.max_miou_drop}.")
    return args


def load_model_and_processor(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, DToPImageProcessor]:
    """The model in eval mode on `device`, and its image processor with any sliding-window overrides (slide mode
    with `--sliding_window`)."""
    model, image_processor = load_dtop_model_and_processor(args.model, device, argument="--model")
    if args.crop_size is not None:
        image_processor.crop_size = {"height": args.crop_size, "width": args.crop_size}
    if args.stride is not None:
        image_processor.stride = {"height": args.stride, "width": args.stride}
    if args.do_reduce_labels is not None:
        image_processor.do_reduce_labels = args.do_reduce_labels
    if args.sliding_window:
        image_processor = sliding_window_processor(image_processor)
    return model, image_processor


def check_label_spaces(model_config: DToPConfig, id2label: dict[int, str], dataset_name: str) -> None:
    """The model must predict the data set's classes: same number, and warn when the names differ."""
    if len(id2label) != model_config.num_labels:
        raise ValueError(
            f"The model predicts {model_config.num_labels} classes but the data set {dataset_name!r} has "
            f"{len(id2label)} ({list(id2label.values())[:5]}...). Evaluate on the data set the model was trained "
            "for, pass `--id2label` with the model's classes, or fine-tune the model on this data set first."
        )
    model_names = [str(model_config.id2label.get(index, "")) for index in range(model_config.num_labels)]
    data_names = [str(id2label[index]) for index in sorted(id2label)]
    if model_names != data_names:
        logger.warning(
            f"The model's class names differ from the data set's (e.g. {model_names[:3]} vs {data_names[:3]}): "
            "evaluating by class id."
        )


def load_eval_split(
    args: argparse.Namespace, model_config: DToPConfig, do_reduce_labels: bool, accelerator: Accelerator
) -> tuple[datasets.Dataset, dict[int, str]]:
    """The split to evaluate (limited to `--max_eval_samples`, checked) and the data set's `id2label`."""
    num_validation = args.synthetic_validation_samples
    if args.max_eval_samples is not None:
        num_validation = min(num_validation, args.max_eval_samples)
    with accelerator.main_process_first():
        dataset, id2label = load_dataset_from_arguments(
            args,
            num_train_samples=1 if args.split == "validation" else num_validation,
            num_validation_samples=num_validation,
        )
    check_label_spaces(model_config, id2label, args.dataset_name)
    split = dataset[args.split]
    if args.max_eval_samples is not None:
        split = split.select(range(min(args.max_eval_samples, len(split))))
    return usable_samples(split, args.split, args, len(id2label), do_reduce_labels, accelerator), id2label


def usable_samples(
    split: datasets.Dataset,
    split_name: str,
    args: argparse.Namespace,
    num_labels: int,
    do_reduce_labels: bool,
    accelerator: Accelerator,
) -> datasets.Dataset:
    """`split` checked (unless `--skip_data_check`): unreadable or unlabelled samples skipped; none left raises."""
    if not args.skip_data_check and len(split):
        split, _ = check_segmentation_split(
            split, split_name, num_labels, do_reduce_labels, show_progress=accelerator.is_local_main_process
        )
    if len(split) == 0:
        raise ValueError(
            f"The {split_name!r} split of {args.dataset_name!r} has no usable sample (empty, or every sample was "
            "skipped as unreadable or unlabelled): nothing to evaluate."
        )
    return split


def load_calibration_split(
    args: argparse.Namespace, num_labels: int, do_reduce_labels: bool, accelerator: Accelerator
) -> tuple[datasets.Dataset, str]:
    """The images the thresholds are calibrated on (never the evaluated `--split`) and a description of them.

    `--calibration_split` when given; else, for the built-in data set, `--calibration_samples` scenes generated
    for calibration (the generator's own stream, apart from its train and validation scenes); else that many
    images drawn at random from `train`.
    """
    if args.calibration_split is None and args.dataset_name in BUILTIN_NAMES:
        split = make_synthetic_scenes(
            args.calibration_samples, image_size=args.synthetic_image_size, seed=args.data_seed, split="calibration"
        )
        description = f"{len(split)} generated calibration scenes (none of them in the train or validation split)"
        return usable_samples(split, "calibration", args, num_labels, do_reduce_labels, accelerator), description
    split_name = args.calibration_split or "train"
    with accelerator.main_process_first():
        dataset, _ = load_dataset_from_arguments(
            args, num_train_samples=args.calibration_samples, num_validation_samples=args.synthetic_validation_samples
        )
    if split_name not in dataset:
        raise ValueError(
            f"`--calibration_split` {split_name!r} is not a split of {args.dataset_name!r} (it has {list(dataset)})."
        )
    split = dataset[split_name]
    if args.calibration_split is None:
        split = split.shuffle(seed=args.data_seed)
        logger.warning(
            f"Calibrating on {min(args.calibration_samples, len(split))} images drawn from 'train': if the model was "
            "trained on them, its thresholds fit them better than new images. Pass `--calibration_split` with images "
            "the model has not seen when the data set has some."
        )
    split = split.select(range(min(args.calibration_samples, len(split))))
    description = f"{len(split)} images of the {split_name!r} split of {args.dataset_name!r}"
    return usable_samples(split, split_name, args, num_labels, do_reduce_labels, accelerator), description


def check_threshold_lengths(thresholds: list, num_heads: int) -> None:
    """Per-head `--thresholds` values must give one threshold per auxiliary head of the model."""
    for threshold in thresholds:
        if not is_uniform(threshold) and len(threshold) != num_heads:
            raise ValueError(
                f"`--thresholds` {','.join(f'{value:g}' for value in threshold)} gives {len(threshold)} values, but "
                f"the model has {num_heads} auxiliary heads: give one value for every head (0.8), or {num_heads} "
                "comma-separated values."
            )


class ForwardTimer:
    """Wall-clock seconds spent inside a module's forward calls (synchronised on CUDA), through forward hooks, so
    that data loading, post-processing and metrics are not counted."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self.start = None
        self.synchronize = torch.cuda.synchronize if next(module.parameters()).is_cuda else (lambda: None)
        self.handles = [module.register_forward_pre_hook(self.before), module.register_forward_hook(self.after)]

    def before(self, module, inputs) -> None:
        self.synchronize()
        self.start = time.perf_counter()

    def after(self, module, inputs, outputs) -> None:
        self.synchronize()
        self.seconds += time.perf_counter() - self.start

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def evaluate_threshold(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    image_processor: DToPImageProcessor,
    exit_threshold: float | tuple[float, ...],
    args: argparse.Namespace,
    id2label: dict[int, str],
    timer: ForwardTimer,
    split_name: str = "evaluation",
) -> dict:
    """One sweep point: `evaluate_model` at `exit_threshold` (one for every auxiliary head, or one per head),
    plus model time per image and named per-class IoU."""
    timer.seconds = 0.0
    result = evaluate_model(
        model,
        dataloader,
        accelerator,
        exit_threshold=exit_threshold,
        sliding_window=args.sliding_window,
        image_processor=image_processor,
    )
    # Every process timed its own shard: the sum over processes, per image, is the time one image takes.
    total_seconds = accelerator.gather(
        torch.tensor([timer.seconds], dtype=torch.float64, device=accelerator.device)
    ).sum()
    result["seconds_per_image"] = float(total_seconds) / max(result["num_images"], 1)
    result["exit_threshold"] = exit_threshold
    result["per_category_iou"] = {id2label[index]: iou for index, iou in enumerate(result["per_category_iou"])}
    accelerator.print(
        f"[{split_name}] threshold {format_threshold(exit_threshold)}: mIoU {100 * result['mean_iou']:.2f}, "
        f"{format_gflops(result['gflops_backbone_and_final_head'])} GFLOPs "
        f"(all heads {format_gflops(result['gflops'])}), "
        f"{1000 * result['seconds_per_image']:.1f} ms/image"
    )
    return result


def format_percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_gflops(value: float) -> str:
    """One decimal as in the paper for real models (109.4), four significant digits for tiny ones (0.003871)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.4g}"


def sweep_order(result: dict) -> tuple[int, float]:
    """Shared thresholds first, highest first; then per-head settings, in the order given."""
    threshold = compact_threshold(result["exit_threshold"])
    return (0, -threshold) if isinstance(threshold, float) else (1, 0.0)


def format_table(
    results: list[dict],
    stage_names: list[str],
    gflops_key: str = GFLOPS_KEYS["all_heads"],
    notes: dict[tuple[float, ...], str] | None = None,
) -> str:
    """Markdown table, one row per threshold setting (shared thresholds decreasing, then per-head settings), as the
    paper's Table 2 plus R, exits and time; `notes` (per-head tuple -> text) adds a last column, e.g. "calibrated"."""
    baseline = next((result for result in results if is_unpruned(result["exit_threshold"])), None)
    num_heads = len(stage_names) - 1
    header = [
        "threshold",
        "mIoU (%)",
        "pixel acc. (%)",
        "GFLOPs",
        "GFLOPs all heads",
        "saved",
        "R",
        "exits per head (%)",
        "ms / image",
    ] + (["calibration"] if notes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in sorted(results, key=sweep_order):
        gflops = result["gflops_backbone_and_final_head"]
        saved = f"{100 * (1 - gflops / baseline['gflops_backbone_and_final_head']):.1f}%" if baseline else "n/a"
        exits = " / ".join(f"{100 * share:.1f}" for share in result["exit_share"])
        row = [
            format_threshold(result["exit_threshold"]),
            format_percent(result["mean_iou"]),
            format_percent(result["overall_accuracy"]),
            format_gflops(gflops),
            format_gflops(result["gflops"]),
            saved,
            f"{speedup(result, baseline, gflops_key):.2f}" if baseline else "n/a",
            exits,
            f"{1000 * result['seconds_per_image']:.1f}",
        ]
        if notes:
            row.append(notes.get(per_head(result["exit_threshold"], num_heads), ""))
        lines.append("| " + " | ".join(row) + " |")
    lines.append(
        f"\nthreshold a / b: one per auxiliary head; exits per head: {' / '.join(stage_names)}; GFLOPs = MACs / 1e9 "
        f"per image (SPEC §5); saved: backbone + decode head GFLOPs; R = GFLOPs unpruned / pruned "
        f"({convention_name(gflops_key)})."
    )
    return "\n".join(lines)


def convention_name(gflops_key: str) -> str:
    """`all heads` or `paper` (backbone + final head), the `--gflops_convention` of a result field."""
    return next(name for name, key in GFLOPS_KEYS.items() if key == gflops_key).replace("_", " ")


def format_calibration_table(calibration: dict, gflops_key: str) -> str:
    """The calibrated thresholds next to the unpruned model and the best shared threshold, measured on the
    calibration images (where they were chosen) and on the evaluated split (which the choice never saw)."""
    header = ["exit threshold", "chosen as"]
    for split in ("calibration", "evaluation"):
        header += [f"{split} mIoU (%)", "Δ mIoU", "GFLOPs", "R"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    roles = {}  # threshold setting -> (result key, what it was chosen as); one row per setting
    for key, role in (("baseline", "unpruned"), ("best_single", "best single threshold"), ("chosen", "calibrated")):
        setting = format_threshold(calibration[key]["exit_threshold"])
        roles[setting] = (key, f"{roles[setting][1]}, {role}" if setting in roles else role)
    for setting, (key, role) in roles.items():
        row = [setting, role + (" (saved)" if key == "chosen" else "")]
        for measured in (calibration, calibration["on_evaluation_split"]):
            result, baseline = measured[key], measured["baseline"]
            change = 100 * (result["mean_iou"] - baseline["mean_iou"])
            row += [
                format_percent(result["mean_iou"]),
                f"{change:+.2f}",
                format_gflops(result[gflops_key]),
                f"{speedup(result, baseline, gflops_key):.2f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_class_table(results: list[dict]) -> str:
    """Per-class IoU (%), one column per threshold."""
    ordered = sorted(results, key=sweep_order)
    lines = ["| class | " + " | ".join(f"t={format_threshold(result['exit_threshold'])}" for result in ordered) + " |"]
    lines.append("|" + "---|" * (len(ordered) + 1))
    for name in ordered[0]["per_category_iou"]:
        lines.append(
            f"| {name} | " + " | ".join(format_percent(result["per_category_iou"][name]) for result in ordered) + " |"
        )
    return "\n".join(lines)


def plot_tradeoff(
    results: list[dict],
    path: Path,
    title: str,
    calibration: dict | None = None,
    gflops_key: str = GFLOPS_KEYS["all_heads"],
) -> None:
    """GFLOPs per image against mIoU, points labelled with their thresholds.

    Left: the evaluated split, the shared-threshold sweep in both GFLOPs conventions, per-head settings as crosses
    and the calibrated thresholds as stars. Right (after a calibration): the calibration images, every setting the
    search evaluated (one threshold per head: dots; one for all: the curve), the calibrated one marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_panels = 2 if calibration is not None else 1
    figure, panels = plt.subplots(1, num_panels, figsize=(6.4 * num_panels, 4.4), dpi=120, squeeze=False)
    axes = panels[0][0]
    shared = sorted((result for result in results if is_uniform(result["exit_threshold"])), key=sweep_order)
    per_head_results = [result for result in results if not is_uniform(result["exit_threshold"])]
    for key, label, style in (
        ("gflops_backbone_and_final_head", "backbone + final head", "o-"),
        ("gflops", "all heads", "s--"),
    ):
        (line,) = axes.plot(
            [result[key] for result in shared], [100 * result["mean_iou"] for result in shared], style, label=label
        )
        annotate_thresholds(axes, shared + per_head_results, key)
        if per_head_results:
            axes.plot(
                [result[key] for result in per_head_results],
                [100 * result["mean_iou"] for result in per_head_results],
                "x",
                color=line.get_color(),
                label=f"{label}, one threshold per head",
            )
        if calibration is not None:
            chosen = calibration["on_evaluation_split"]["chosen"]
            axes.plot(
                chosen[key], 100 * chosen["mean_iou"], "*", markersize=14, color=line.get_color(),
                markeredgecolor="black", label=f"{label}, calibrated",
            )  # fmt: skip
            annotate_thresholds(axes, [chosen], key)
    axes.set_title(f"{title}\nevaluated split", fontsize=9)
    if calibration is not None:
        axes = panels[0][1]
        searched = calibration["results"]
        shared = sorted((result for result in searched if is_uniform(result["exit_threshold"])), key=sweep_order)
        others = [result for result in searched if not is_uniform(result["exit_threshold"])]
        axes.plot(
            [result[gflops_key] for result in others], [100 * result["mean_iou"] for result in others], ".",
            color="0.6", label="one threshold per head (searched)",
        )  # fmt: skip
        axes.plot(
            [result[gflops_key] for result in shared], [100 * result["mean_iou"] for result in shared], "o-",
            label="one threshold for every head",
        )  # fmt: skip
        for key, marker, label in (("best_single", "D", "best single threshold"), ("chosen", "*", "calibrated")):
            result = calibration[key]
            axes.plot(
                result[gflops_key], 100 * result["mean_iou"], marker, markersize=14 if marker == "*" else 8,
                color="tab:red" if marker == "*" else "tab:green", markeredgecolor="black", label=label,
            )  # fmt: skip
            annotate_thresholds(axes, [result], gflops_key)
        axes.set_title(f"calibration images ({calibration['num_evaluations']} settings evaluated)", fontsize=9)
    for index, axes in enumerate(panels[0]):
        axes.set_xlabel("GFLOPs per image" + (f" ({convention_name(gflops_key)})" if index else ""))
        axes.set_ylabel("mIoU (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def annotate_thresholds(axes, results: list[dict], gflops_key: str) -> None:
    for result in results:
        axes.annotate(
            format_threshold(result["exit_threshold"]),
            (result[gflops_key], 100 * result["mean_iou"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )


def predict(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    pixel_values: torch.Tensor,
    exit_threshold: float,
    sliding_window: bool,
):
    """Model outputs for one processed image: in slide mode its windows' outputs, with their `patch_offsets`."""
    return forward_images(
        model, image_processor, pixel_values, exit_threshold=exit_threshold, sliding_window=sliding_window
    )[0][1]


def write_pictures(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    eval_dataset: SegmentationDataset,
    thresholds: list[float | tuple[float, ...]],
    args: argparse.Namespace,
    id2label: dict[int, str],
    folder: Path,
) -> list[Path]:
    """For the first `--num_pictures` images: one PNG, one row per threshold (image | prediction | ground truth |
    exit map)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    num_stages = len(config.out_indices)
    palette = make_palette(config.num_labels)
    stage_names = default_stage_names(num_stages, config.out_indices)
    paths = []
    for index in range(min(args.num_pictures, len(eval_dataset))):
        sample = eval_dataset[index]
        labels = sample["labels"]
        image = np.asarray(eval_dataset.dataset[index]["image"].convert("RGB"))  # original size, as the labels
        pixel_values = sample["pixel_values"][None].to(next(model.parameters()).device)
        rows = []
        for exit_threshold in thresholds:
            outputs = predict(model, image_processor, pixel_values, exit_threshold, args.sliding_window)
            prediction = image_processor.post_process_semantic_segmentation(outputs, target_sizes=[labels.shape])[0]
            exit_map = image_processor.post_process_exit_map(outputs, target_sizes=[labels.shape])[0]
            early = float((exit_map < num_stages - 1).float().mean())
            titles = {
                "prediction": f"prediction (t={format_threshold(exit_threshold)})",
                "exit_map": f"exit map ({100 * early:.0f}% early)",
            }
            rows.append(
                side_by_side(
                    image,
                    prediction.cpu(),
                    exit_map.cpu(),
                    num_stages,
                    ground_truth=labels,
                    palette=palette,
                    id2label=id2label,
                    stage_names=stage_names,
                    titles=titles,
                )
            )
        path = folder / f"image_{index}.png"
        stack_vertically(rows).save(path)
        paths.append(path)
    return paths


def build_dataloader(
    split: datasets.Dataset,
    image_processor: DToPImageProcessor,
    config: DToPConfig,
    args: argparse.Namespace,
    accelerator: Accelerator,
    split_name: str,
) -> tuple[SegmentationDataset, DataLoader]:
    """The evaluation transform of `split` and its data loader, prepared (sharded) by `accelerator`."""
    dataset = build_eval_dataset(split, image_processor, config.num_labels, args.sliding_window, split_name=split_name)
    dataloader = DataLoader(
        dataset,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=partial(collate_segmentation_batch, ignore_index=config.semantic_loss_ignore_index),
        num_workers=args.dataloader_num_workers,
    )
    return dataset, accelerator.prepare(dataloader)


def calibrate(
    args: argparse.Namespace, evaluate_calibration: Callable[[float | tuple[float, ...]], dict], num_heads: int
) -> CalibrationOutcome:
    """Search the exit thresholds with `evaluate_calibration`, which runs the model on the calibration images
    only: the evaluated split plays no part in the choice."""
    constraint = {
        "target_gflops": args.target_gflops,
        "max_miou_drop": args.max_miou_drop / 100 if args.max_miou_drop is not None else None,
        "num_refinements": args.num_refinements,
        "gflops_key": GFLOPS_KEYS[args.gflops_convention],
    }
    # 1.0 always: the mIoU change and R are measured against the unpruned model.
    thresholds = [1.0] + list(args.thresholds)
    if args.calibration_search == "single" or num_heads == 1:
        chosen, results = calibrate_threshold(evaluate_calibration, thresholds, **constraint)
        baseline = next(result for result in results if is_unpruned(result["exit_threshold"]))
        return CalibrationOutcome(chosen=chosen, best_single=chosen, baseline=baseline, results=results)
    return calibrate_per_head_thresholds(
        evaluate_calibration, thresholds, num_heads, num_grid_refinements=args.num_grid_refinements, **constraint
    )


def calibration_notes(outcome: CalibrationOutcome, num_heads: int) -> dict[tuple[float, ...], str]:
    """The last column of the table: which rows the calibration chose."""
    notes = {per_head(outcome.best_single["exit_threshold"], num_heads): "best single threshold"}
    chosen = per_head(outcome.chosen["exit_threshold"], num_heads)
    notes[chosen] = ", ".join(filter(None, [notes.get(chosen), "calibrated (saved)"]))
    return notes


def describe_calibrated(calibration: dict, gflops_key: str) -> str:
    """One line per split for the calibrated thresholds: mIoU, change against the unpruned model, GFLOPs, R."""
    lines = []
    splits = (("calibration images", calibration), ("evaluated split", calibration["on_evaluation_split"]))
    for name, measured in splits:
        chosen, baseline = measured["chosen"], measured["baseline"]
        lines.append(
            f"  {name}: mIoU {format_percent(chosen['mean_iou'])} "
            f"({100 * (chosen['mean_iou'] - baseline['mean_iou']):+.2f}), "
            f"{format_gflops(chosen[gflops_key])} GFLOPs, R = {speedup(chosen, baseline, gflops_key):.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Accelerate picks gloo (and really splits the data) on CPU only with cpu=True (hf-notes §7.3).
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    model, image_processor = load_model_and_processor(args, accelerator.device)
    config = model.config
    num_heads = len(config.out_indices) - 1
    gflops_key = GFLOPS_KEYS[args.gflops_convention]
    check_threshold_lengths(args.thresholds, num_heads)
    split, id2label = load_eval_split(args, config, image_processor.do_reduce_labels, accelerator)
    eval_dataset, dataloader = build_dataloader(split, image_processor, config, args, accelerator, "eval")
    accelerator.print(
        f"{len(eval_dataset)} images of {args.dataset_name!r} ({args.split}), {accelerator.num_processes} process(es)"
    )
    calibrating = args.target_gflops is not None or args.max_miou_drop is not None
    if calibrating:
        calibration_split, calibration_data = load_calibration_split(
            args, config.num_labels, image_processor.do_reduce_labels, accelerator
        )
        _, calibration_loader = build_dataloader(
            calibration_split, image_processor, config, args, accelerator, "calibration"
        )
        accelerator.print(f"Calibrating on {calibration_data}")

    # One warm-up pass, so that the first threshold's time holds no one-off start-up cost.
    predict(
        model, image_processor, eval_dataset[0]["pixel_values"][None].to(accelerator.device), 1.0, args.sliding_window
    )
    timer = ForwardTimer(model)
    evaluate = partial(
        evaluate_threshold,
        model,
        accelerator=accelerator,
        image_processor=image_processor,
        args=args,
        id2label=id2label,
        timer=timer,
    )
    outcome, calibration_error = None, None
    if calibrating:
        try:
            outcome = calibrate(
                args,
                lambda threshold: evaluate(calibration_loader, exit_threshold=threshold, split_name="calibration"),
                num_heads,
            )
        except NothingToCalibrateError as error:
            calibration_error = str(error)
            accelerator.print(f"\n{error}\n")

    # The report, on the evaluated split: the sweep, then the calibrated thresholds (each setting run once).
    report = {}

    def on_evaluated_split(threshold: float | tuple[float, ...]) -> dict:
        key = per_head(threshold, num_heads)
        if key not in report:
            report[key] = evaluate(dataloader, exit_threshold=compact_threshold(key), split_name=args.split)
        return report[key]

    sweep = sorted(args.thresholds, key=lambda threshold: sweep_order({"exit_threshold": threshold}))
    results = [on_evaluated_split(threshold) for threshold in sweep]
    results = list({id(result): result for result in results}.values())  # a threshold given twice: one row
    if outcome is not None:
        on_evaluation_split = {
            role: on_evaluated_split(result["exit_threshold"])
            for role, result in (
                ("baseline", outcome.baseline),
                ("best_single", outcome.best_single),
                ("chosen", outcome.chosen),
            )
        }
    timer.remove()

    summary = {
        "model": args.model,
        "dataset": args.dataset_name,
        "split": args.split,
        "mode": "sliding_window" if args.sliding_window else "whole_image",
        "num_images": results[0]["num_images"],
        "num_processes": accelerator.num_processes,
        "results": results,
    }
    calibrated_dir = Path(args.calibrated_output_dir or Path(args.output_dir) / "calibrated")
    if calibrating:
        summary["calibration"] = {
            "target_gflops": args.target_gflops,
            "max_miou_drop_points": args.max_miou_drop,
            "gflops_convention": args.gflops_convention,
            "search": args.calibration_search,
            "data": calibration_data,
        }
    if calibration_error is not None:
        summary["calibration"]["error"] = calibration_error
    elif outcome is not None:
        summary["calibration"].update(
            num_images=outcome.chosen["num_images"],
            num_evaluations=outcome.num_evaluations,
            baseline=outcome.baseline,
            best_single=outcome.best_single,
            chosen=outcome.chosen,
            on_evaluation_split=on_evaluation_split,
            results=outcome.results,
            saved_to=str(calibrated_dir),
        )
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        stage_names = default_stage_names(len(config.out_indices), config.out_indices)
        rows = list(report.values())
        notes = calibration_notes(outcome, num_heads) if outcome is not None else None
        table = format_table(rows, stage_names, gflops_key, notes)
        if outcome is not None:
            calibration = summary["calibration"]
            table += (
                f"\n\nCalibration: {outcome.num_evaluations} threshold settings evaluated on {calibration_data}; "
                f"the chosen ones measured on the {args.split!r} split too:\n\n"
                + format_calibration_table(calibration, gflops_key)
            )
        if config.num_labels <= MAX_PRINTED_CLASSES:
            table += "\n\nIoU per class (%):\n\n" + format_class_table(rows)
        print(table)
        (output_dir / "table.md").write_text(table + "\n", encoding="utf-8")
        plot_tradeoff(
            rows,
            output_dir / "gflops_vs_miou.png",
            f"{args.model} on {args.dataset_name} ({summary['mode']})",
            calibration=summary["calibration"] if outcome is not None else None,
            gflops_key=gflops_key,
        )
        if outcome is not None:
            save_calibrated_model(
                model, image_processor, calibrated_dir, outcome.chosen, report=json_ready(summary["calibration"])
            )
            kind = "one for every head" if is_uniform(outcome.chosen["exit_threshold"]) else "one per auxiliary head"
            print(
                f"\nCalibrated exit thresholds {format_threshold(outcome.chosen['exit_threshold'])} ({kind}) "
                f"-> {calibrated_dir}\n" + describe_calibrated(summary["calibration"], gflops_key)
            )
        elif calibration_error is not None:
            print(f"\nNo calibrated model written: {calibration_error}")
        with open(output_dir / "results.json", "w", encoding="utf-8") as file:
            json.dump(json_ready(summary), file, indent=2)
        # Calibrated: the baseline and the chosen thresholds; otherwise every threshold of the sweep.
        shown = [result["exit_threshold"] for result in sorted(results, key=sweep_order)]
        if outcome is not None:
            shown = list(dict.fromkeys([1.0, compact_threshold(outcome.chosen["exit_threshold"])]))
        pictures = write_pictures(model, image_processor, eval_dataset, shown, args, id2label, output_dir / "pictures")
        print(f"\nWrote {output_dir / 'results.json'}, table.md, gflops_vs_miou.png and {len(pictures)} picture(s).")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    # Non-zero when a calibration was asked for and found nothing to calibrate (the report is still written).
    raise SystemExit(1 if "error" in main().get("calibration", {}) else 0)
