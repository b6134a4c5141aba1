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
pixel accuracy, GFLOPs per image (backbone + final head, the paper's figure, and with every head), the share of
tokens finalised by each head and the model time per image; optionally calibrate the threshold to a budget.

Writes to `--output_dir`: `results.json`, `table.md` (the table printed, like the paper's Table 2),
`gflops_vs_miou.png`, `pictures/image_N.png` (image | prediction | ground truth | exit map, one row per
threshold) and, with `--target_gflops` or `--max_miou_drop`, `calibrated/`: a copy of the model whose config
carries the chosen `exit_threshold`.

    python examples/evaluate.py --model outputs/prune --dataset_name builtin --thresholds 1.0 0.98 0.95 0.9 0.8
    python examples/evaluate.py --model outputs/prune --dataset_name scene_parse_150 --sliding_window
    python examples/evaluate.py --model outputs/prune --max_miou_drop 0.5      # at most 0.5 mIoU points lost
    python examples/evaluate.py --model outputs/prune --target_gflops 80       # at most 80 GFLOPs per image

Several processes split the data; the results are the same as with one (model time per image aside):

    accelerate launch examples/evaluate.py --model ...
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/evaluate.py --cpu --model ...
"""

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from transformers import AutoModelForSemanticSegmentation

from dtop_hf import DToPConfig, DToPImageProcessor
from dtop_hf.toolkit.evaluation.calibration import calibrate_threshold, check_thresholds, json_ready, save_calibrated_model
from dtop_hf.toolkit.data.datasets import (
    SegmentationDataset,
    add_dataset_arguments,
    build_eval_dataset,
    check_segmentation_split,
    collate_segmentation_batch,
    load_dataset_from_arguments,
)
from dtop_hf.toolkit.evaluation.loop import evaluate_model
from dtop_hf.toolkit.inference.visualization import default_stage_names, make_palette, side_by_side, stack_vertically


logger = get_logger(__name__)

DEFAULT_THRESHOLDS = (1.0, 0.98, 0.95, 0.9, 0.8)
# The per-class table is printed up to this many classes (ADE20K's 150 go to the JSON only).
MAX_PRINTED_CLASSES = 30
GFLOPS_KEYS = {"all_heads": "gflops", "paper": "gflops_backbone_and_final_head"}


def parse_threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"exit thresholds must lie in (0, 1] (1.0 = no pruning), got {text}.")
    return value


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
        type=parse_threshold,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="Exit thresholds in (0, 1]; 1.0 = unpruned baseline.",
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
    sweep.add_argument(
        "--cpu", action="store_true", help="Run on CPU (needed for several CPU processes, see the module docstring)."
    )

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
    for name in ("per_device_eval_batch_size", "synthetic_validation_samples", "synthetic_image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise ValueError(f"`--max_eval_samples` must be >= 1, got {args.max_eval_samples}.")
    if args.num_pictures < 0 or args.num_refinements < 0:
        raise ValueError("`--num_pictures` and `--num_refinements` must be >= 0.")
    if args.target_gflops is not None and args.target_gflops <= 0:
        raise ValueError(f"`--target_gflops` must be > 0, got {args.target_gflops}.")
    if args.max_miou_drop is not None and args.max_miou_drop < 0:
        raise ValueError(f"`--max_miou_drop` must be >= 0 (mIoU points), got {args.max_miou_drop}.")
    return args


def load_model_and_processor(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, DToPImageProcessor]:
    """The model in eval mode on `device`, and its image processor with any sliding-window overrides."""
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model).to(device).eval()
    try:
        image_processor = DToPImageProcessor.from_pretrained(args.model)
    except (OSError, ValueError):  # a folder without preprocessor_config.json
        size = model.config.image_size
        image_processor = DToPImageProcessor(size={"height": size, "width": size})
    if args.crop_size is not None:
        image_processor.crop_size = {"height": args.crop_size, "width": args.crop_size}
    if args.stride is not None:
        image_processor.stride = {"height": args.stride, "width": args.stride}
    if args.do_reduce_labels is not None:
        image_processor.do_reduce_labels = args.do_reduce_labels
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
    if not args.skip_data_check and len(split):
        split, _ = check_segmentation_split(
            split, args.split, len(id2label), do_reduce_labels, show_progress=accelerator.is_local_main_process
        )
    if len(split) == 0:
        raise ValueError(
            f"The {args.split!r} split of {args.dataset_name!r} has no usable sample (empty, or every sample was "
            "skipped as unreadable or unlabelled): nothing to evaluate."
        )
    return split, id2label


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
    exit_threshold: float,
    args: argparse.Namespace,
    id2label: dict[int, str],
    timer: ForwardTimer,
) -> dict:
    """One sweep point: `evaluate_model` at `exit_threshold`, plus model time per image and named per-class IoU."""
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
        f"threshold {exit_threshold:.4g}: mIoU {100 * result['mean_iou']:.2f}, "
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


def format_table(results: list[dict], stage_names: list[str]) -> str:
    """Markdown table, one row per threshold (decreasing), as the paper's Table 2 plus exits and time."""
    baseline = next((result for result in results if result["exit_threshold"] == 1.0), None)
    header = [
        "threshold",
        "mIoU (%)",
        "pixel acc. (%)",
        "GFLOPs",
        "GFLOPs all heads",
        "saved",
        "exits per head (%)",
        "ms / image",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in sorted(results, key=lambda result: -result["exit_threshold"]):
        gflops = result["gflops_backbone_and_final_head"]
        saved = f"{100 * (1 - gflops / baseline['gflops_backbone_and_final_head']):.1f}%" if baseline else "n/a"
        exits = " / ".join(f"{100 * share:.1f}" for share in result["exit_share"])
        row = [
            f"{result['exit_threshold']:.4g}",
            format_percent(result["mean_iou"]),
            format_percent(result["overall_accuracy"]),
            format_gflops(gflops),
            format_gflops(result["gflops"]),
            saved,
            exits,
            f"{1000 * result['seconds_per_image']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nexits per head: {' / '.join(stage_names)}; GFLOPs = MACs / 1e9 per image (SPEC §5).")
    return "\n".join(lines)


def format_class_table(results: list[dict]) -> str:
    """Per-class IoU (%), one column per threshold."""
    ordered = sorted(results, key=lambda result: -result["exit_threshold"])
    lines = ["| class | " + " | ".join(f"t={result['exit_threshold']:.4g}" for result in ordered) + " |"]
    lines.append("|" + "---|" * (len(ordered) + 1))
    for name in ordered[0]["per_category_iou"]:
        lines.append(
            f"| {name} | " + " | ".join(format_percent(result["per_category_iou"][name]) for result in ordered) + " |"
        )
    return "\n".join(lines)


def plot_tradeoff(results: list[dict], path: Path, title: str) -> None:
    """GFLOPs per image against mIoU, both GFLOPs conventions, points labelled with their threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda result: result["exit_threshold"])
    miou = [100 * result["mean_iou"] for result in ordered]
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for key, label, style in (
        ("gflops_backbone_and_final_head", "backbone + final head", "o-"),
        ("gflops", "all heads", "s--"),
    ):
        gflops = [result[key] for result in ordered]
        axes.plot(gflops, miou, style, label=label)
        for x, y, result in zip(gflops, miou, ordered, strict=True):
            axes.annotate(
                f"{result['exit_threshold']:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    pixel_values: torch.Tensor,
    exit_threshold: float,
    sliding_window: bool,
):
    """Model (or sliding-window) outputs for one batch of processed images."""
    if sliding_window:
        return image_processor.sliding_window_inference(model, pixel_values, exit_threshold=exit_threshold)
    return model(pixel_values, exit_threshold=exit_threshold)


def write_pictures(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    eval_dataset: SegmentationDataset,
    thresholds: list[float],
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
        for exit_threshold in sorted(thresholds, reverse=True):
            outputs = predict(model, image_processor, pixel_values, exit_threshold, args.sliding_window)
            prediction = image_processor.post_process_semantic_segmentation(outputs, target_sizes=[labels.shape])[0]
            exit_map = image_processor.post_process_exit_map(outputs, target_sizes=[labels.shape])[0]
            early = float((exit_map < num_stages - 1).float().mean())
            titles = {
                "prediction": f"prediction (t={exit_threshold:.3g})",
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Accelerate picks gloo (and really splits the data) on CPU only with cpu=True (hf-notes §7.3).
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    model, image_processor = load_model_and_processor(args, accelerator.device)
    config = model.config
    split, id2label = load_eval_split(args, config, image_processor.do_reduce_labels, accelerator)
    eval_dataset = build_eval_dataset(
        split, image_processor, config.num_labels, args.sliding_window, split_name="eval"
    )
    dataloader = DataLoader(
        eval_dataset,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=partial(collate_segmentation_batch, ignore_index=config.semantic_loss_ignore_index),
        num_workers=args.dataloader_num_workers,
    )
    dataloader = accelerator.prepare(dataloader)
    accelerator.print(
        f"{len(eval_dataset)} images of {args.dataset_name!r} ({args.split}), {accelerator.num_processes} process(es)"
    )

    # One warm-up pass, so that the first threshold's time holds no one-off start-up cost.
    predict(
        model, image_processor, eval_dataset[0]["pixel_values"][None].to(accelerator.device), 1.0, args.sliding_window
    )
    timer = ForwardTimer(model)
    evaluate = partial(
        evaluate_threshold, model, dataloader, accelerator, image_processor, args=args, id2label=id2label, timer=timer
    )
    chosen = None
    if args.target_gflops is not None or args.max_miou_drop is not None:
        max_drop = args.max_miou_drop / 100 if args.max_miou_drop is not None else None
        chosen, results = calibrate_threshold(
            evaluate,
            args.thresholds,
            target_gflops=args.target_gflops,
            max_miou_drop=max_drop,
            num_refinements=args.num_refinements,
            gflops_key=GFLOPS_KEYS[args.gflops_convention],
        )
    else:
        results = [evaluate(exit_threshold) for exit_threshold in sorted(set(args.thresholds), reverse=True)]
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
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        stage_names = default_stage_names(len(config.out_indices), config.out_indices)
        table = format_table(results, stage_names)
        if config.num_labels <= MAX_PRINTED_CLASSES:
            table += "\n\nIoU per class (%):\n\n" + format_class_table(results)
        print(table)
        (output_dir / "table.md").write_text(table + "\n", encoding="utf-8")
        plot_tradeoff(
            results, output_dir / "gflops_vs_miou.png", f"{args.model} on {args.dataset_name} ({summary['mode']})"
        )
        if chosen is not None:
            calibrated_dir = save_calibrated_model(model, image_processor, output_dir / "calibrated", chosen)
            summary["calibration"] = {
                "target_gflops": args.target_gflops,
                "max_miou_drop_points": args.max_miou_drop,
                "gflops_convention": args.gflops_convention,
                "chosen": chosen,
                "saved_to": str(calibrated_dir),
            }
            print(
                f"\nCalibrated exit_threshold {chosen['exit_threshold']:.4g}: mIoU {100 * chosen['mean_iou']:.2f}, "
                f"{format_gflops(chosen[GFLOPS_KEYS[args.gflops_convention]])} GFLOPs ({args.gflops_convention}) "
                f"-> {calibrated_dir}"
            )
        with open(output_dir / "results.json", "w", encoding="utf-8") as file:
            json.dump(json_ready(summary), file, indent=2)
        # Calibrated: the baseline and the chosen threshold; otherwise every threshold of the sweep.
        shown = (
            {1.0, chosen["exit_threshold"]} if chosen is not None else {result["exit_threshold"] for result in results}
        )
        pictures = write_pictures(
            model, image_processor, eval_dataset, sorted(shown), args, id2label, output_dir / "pictures"
        )
        print(f"\nWrote {output_dir / 'results.json'}, table.md, gflops_vs_miou.png and {len(pictures)} picture(s).")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
