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
"""Measure exit settings on a data set: each setting's mIoU, GFLOPs, exits and model time, an optional calibration
of the settings to a budget on separate images, and the files of the result.

    summary, eval_dataset, id2label = evaluate_model_on_data(
        model, image_processor, accelerator, data_args, thresholds=[1.0, 0.9, 0.8], model_name="outputs/model"
    )
    write_evaluation_outputs(summary, model, image_processor, eval_dataset, id2label, "outputs/evaluation")

A calibration method is a function `(evaluate, request, thresholds, num_heads) -> CalibrationOutcome` registered in
`CALIBRATORS` under the name `--calibrate` gives it; `evaluate` measures one exit setting on the calibration
images only.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ...image_processing_dtop import DToPImageProcessor
from ..arguments import DataArguments
from ..data.datasets import SegmentationDataset
from ..inference.pictures import write_comparison_pictures
from ..inference.segmentation import ExitThreshold, predict_batch
from ..inference.visualization import head_names
from .calibration import (
    CalibrationOutcome,
    NothingToCalibrateError,
    calibrate_per_head_thresholds,
    calibrate_threshold,
    compact_threshold,
    format_threshold,
    is_unpruned,
    json_ready,
    per_head,
    save_calibrated_model,
)
from .data import evaluation_dataloader, load_calibration_split, load_evaluation_split
from .loop import evaluate_model
from .plots import plot_tradeoff
from .report import (
    GFLOPS_KEYS,
    ReportSection,
    calibrated,
    evaluated_settings,
    format_gflops,
    render_report,
    report_sections,
    sweep_order,
    write_report_files,
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


class SettingEvaluator:
    """Measures one exit setting on a data loader: [`evaluate_model`] plus model time per image and per-class IoU
    by class name; prints one line per setting.

    Args:
        id2label: class names of the data set (the keys of `per_category_iou`).
        exit_settings: per-call settings passed with every threshold (`exit_mode`, `exit_capacity`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: DToPImageProcessor,
        accelerator: Accelerator,
        id2label: dict[int, str],
        **exit_settings,
    ):
        self.model, self.image_processor, self.accelerator, self.id2label = (
            model,
            image_processor,
            accelerator,
            id2label,
        )
        self.exit_settings = exit_settings
        self.timer = None

    def warm_up(self, dataset: SegmentationDataset) -> None:
        """One forward on the first image, so that the first setting's time holds no one-off start-up cost; then
        the timer starts."""
        sample = dataset[0]
        pixel_values = sample["pixel_values"][None].to(self.accelerator.device)
        predict_batch(self.model, self.image_processor, pixel_values, [tuple(sample["labels"].shape)])
        self.timer = ForwardTimer(self.model)

    def __call__(self, dataloader, exit_threshold: ExitThreshold, split_name: str = "evaluation") -> dict:
        if self.timer is None:
            self.warm_up(dataloader.dataset)
        self.timer.seconds = 0.0
        result = evaluate_model(
            self.model,
            dataloader,
            self.accelerator,
            exit_threshold=exit_threshold,
            image_processor=self.image_processor,
            **self.exit_settings,
        )
        # Every process timed its own shard: the sum over processes, per image, is the time one image takes.
        seconds = torch.tensor([self.timer.seconds], dtype=torch.float64, device=self.accelerator.device)
        result["seconds_per_image"] = float(self.accelerator.gather(seconds).sum()) / max(result["num_images"], 1)
        result["exit_threshold"] = exit_threshold
        result["per_category_iou"] = {
            self.id2label[index]: iou for index, iou in enumerate(result["per_category_iou"])
        }
        self.accelerator.print(
            f"[{split_name}] threshold {format_threshold(exit_threshold)}: mIoU {100 * result['mean_iou']:.2f}, "
            f"{format_gflops(result['gflops_backbone_and_final_head'])} GFLOPs "
            f"(all heads {format_gflops(result['gflops'])}), {1000 * result['seconds_per_image']:.1f} ms/image"
        )
        return result

    def close(self) -> None:
        if self.timer is not None:
            self.timer.remove()


@dataclass
class CalibrationRequest:
    """What a calibration looks for: the best mIoU within `target_gflops` GFLOPs per image, or the fewest GFLOPs
    losing at most `max_miou_drop` mIoU points against the unpruned model (one of the two).

    Attributes:
        method: the `CALIBRATORS` entry that searches.
        gflops_convention: the cost `target_gflops` limits, a key of `GFLOPS_KEYS`.
        search: `"per_head"` (one threshold per auxiliary head) or `"single"` (one for every head).
        num_refinements: bisection steps between sweep thresholds.
        num_grid_refinements: per-head search: levels of finer grids around the best thresholds found.
        split: the split calibrated on (`None`: the built-in calibration scenes, or images drawn from `train`).
        num_samples: images calibrated on.
    """

    method: str = "thresholds"
    target_gflops: float | None = None
    max_miou_drop: float | None = None
    gflops_convention: str = "all_heads"
    search: str = "per_head"
    num_refinements: int = 4
    num_grid_refinements: int = 2
    split: str | None = None
    num_samples: int = 100

    @property
    def gflops_key(self) -> str:
        return GFLOPS_KEYS[self.gflops_convention]

    def constraint(self) -> dict:
        """The keyword arguments the calibration searches share (mIoU drop as a fraction)."""
        return {
            "target_gflops": self.target_gflops,
            "max_miou_drop": self.max_miou_drop / 100 if self.max_miou_drop is not None else None,
            "num_refinements": self.num_refinements,
            "gflops_key": self.gflops_key,
        }


def calibrate_thresholds(
    evaluate: Callable[[ExitThreshold], dict],
    request: CalibrationRequest,
    thresholds: Sequence[ExitThreshold],
    num_heads: int,
) -> CalibrationOutcome:
    """Search the exit thresholds with `evaluate`, from the sweep's `thresholds` (1.0 always added: the mIoU change
    and R are measured against the unpruned model)."""
    thresholds = [1.0] + list(thresholds)
    if request.search == "single" or num_heads == 1:
        chosen, results = calibrate_threshold(evaluate, thresholds, **request.constraint())
        baseline = next(result for result in results if is_unpruned(result["exit_threshold"]))
        return CalibrationOutcome(chosen=chosen, best_single=chosen, baseline=baseline, results=results)
    return calibrate_per_head_thresholds(
        evaluate, thresholds, num_heads, num_grid_refinements=request.num_grid_refinements, **request.constraint()
    )


Calibrator = Callable[
    [Callable[[ExitThreshold], dict], CalibrationRequest, Sequence[ExitThreshold], int], CalibrationOutcome
]
# `--calibrate` name -> the search it runs.
CALIBRATORS: dict[str, Calibrator] = {"thresholds": calibrate_thresholds}


def calibration_summary(
    request: CalibrationRequest, data: str, outcome: CalibrationOutcome | None, error: str | None, on_eval: dict
) -> dict:
    """The `calibration` entry of an evaluation summary: the request, then what was found (or why nothing was)."""
    summary = {
        "target_gflops": request.target_gflops,
        "max_miou_drop_points": request.max_miou_drop,
        "gflops_convention": request.gflops_convention,
        "search": request.search,
        "data": data,
    }
    if error is not None:
        return {**summary, "error": error}
    return {
        **summary,
        "num_images": outcome.chosen["num_images"],
        "num_evaluations": outcome.num_evaluations,
        "baseline": outcome.baseline,
        "best_single": outcome.best_single,
        "chosen": outcome.chosen,
        "on_evaluation_split": on_eval,
        "results": outcome.results,
    }


def evaluate_exit_settings(
    evaluate: SettingEvaluator,
    eval_loader,
    thresholds: Sequence[ExitThreshold],
    split_name: str,
    calibration: CalibrationRequest | None = None,
    calibration_loader=None,
    calibration_data: str = "",
) -> dict:
    """The sweep of `thresholds` on the evaluated split and, with a `calibration`, the calibrated settings.

    The calibration runs first, on `calibration_loader` only: the evaluated split plays no part in the choice. Its
    chosen settings (and the baseline and best single threshold) are then measured on the evaluated split too.
    Each setting runs once per split.

    Returns:
        `num_images`, `num_processes`, `results` (the sweep, each setting once) and, with a calibration,
        `calibration` (see [`calibration_summary`]; `error` when there was nothing to calibrate).
    """
    num_heads = len(evaluate.model.config.out_indices) - 1
    outcome, error = None, None
    if calibration is not None:
        try:
            outcome = CALIBRATORS[calibration.method](
                lambda setting: evaluate(calibration_loader, setting, "calibration"),
                calibration,
                thresholds,
                num_heads,
            )
        except NothingToCalibrateError as caught:
            error = str(caught)
            evaluate.accelerator.print(f"\n{error}\n")
    measured = {}  # per-head setting -> its result on the evaluated split

    def on_evaluated_split(threshold: ExitThreshold) -> dict:
        key = per_head(threshold, num_heads)
        if key not in measured:
            measured[key] = evaluate(eval_loader, compact_threshold(key), split_name)
        return measured[key]

    ordered = sorted(thresholds, key=lambda threshold: sweep_order({"exit_threshold": threshold}))
    results = list({id(result): result for result in map(on_evaluated_split, ordered)}.values())
    study = {"num_images": results[0]["num_images"], "num_processes": evaluate.accelerator.num_processes}
    study["results"] = results
    if calibration is not None:
        roles = ("baseline", "best_single", "chosen")
        on_eval = (
            {role: on_evaluated_split(getattr(outcome, role)["exit_threshold"]) for role in roles} if outcome else {}
        )
        study["calibration"] = calibration_summary(calibration, calibration_data, outcome, error, on_eval)
    evaluate.close()
    return study


def evaluate_model_on_data(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    accelerator: Accelerator,
    data_args: DataArguments,
    thresholds: Sequence[ExitThreshold],
    model_name: str,
    split_name: str = "validation",
    calibration: CalibrationRequest | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    **exit_settings,
) -> tuple[dict, SegmentationDataset, dict[int, str]]:
    """The evaluation job: load and check the evaluated split (and, with a `calibration`, the calibration images),
    then [`evaluate_exit_settings`]. Slide mode when the processor is in it.

    Args:
        model_name: how the summary names the model (its folder or Hub id).
        exit_settings: `exit_mode` / `exit_capacity` passed with every threshold (see [`SettingEvaluator`]).

    Returns:
        The summary (`model`, `dataset`, `split`, `mode`, then the study's fields), the evaluated data set (for
        pictures) and its `id2label`.
    """
    config, do_reduce_labels = model.config, image_processor.do_reduce_labels
    split, id2label = load_evaluation_split(data_args, split_name, config, do_reduce_labels, accelerator)
    loader_kwargs = {"batch_size": batch_size, "num_workers": num_workers}
    eval_dataset, eval_loader = evaluation_dataloader(split, image_processor, config, accelerator, **loader_kwargs)
    accelerator.print(
        f"{len(eval_dataset)} images of {data_args.dataset_name!r} ({split_name}), {accelerator.num_processes} "
        "process(es)"
    )
    calibration_loader, calibration_data = None, ""
    if calibration is not None:
        calibration_split, calibration_data = load_calibration_split(
            data_args, calibration.split, calibration.num_samples, config.num_labels, do_reduce_labels, accelerator
        )
        _, calibration_loader = evaluation_dataloader(
            calibration_split, image_processor, config, accelerator, split_name="calibration", **loader_kwargs
        )
        accelerator.print(f"Calibrating on {calibration_data}")
    evaluator = SettingEvaluator(model, image_processor, accelerator, id2label, **exit_settings)
    study = evaluate_exit_settings(
        evaluator, eval_loader, thresholds, split_name, calibration, calibration_loader, calibration_data
    )
    summary = {"model": model_name, "dataset": data_args.dataset_name, "split": split_name}
    summary["mode"] = "sliding_window" if image_processor.do_split_image else "whole_image"
    return {**summary, **study}, eval_dataset, id2label


def pictured_thresholds(summary: dict) -> list[ExitThreshold]:
    """The settings drawn: after a calibration the unpruned and the chosen one; otherwise every one of the sweep."""
    if calibrated(summary):
        return list(dict.fromkeys([1.0, compact_threshold(summary["calibration"]["chosen"]["exit_threshold"])]))
    return [result["exit_threshold"] for result in sorted(summary["results"], key=sweep_order)]


def write_evaluation_outputs(
    summary: dict,
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    eval_dataset: SegmentationDataset,
    id2label: dict[int, str],
    output_dir: str | Path,
    calibrated_dir: str | Path | None = None,
    gflops_key: str = GFLOPS_KEYS["all_heads"],
    num_pictures: int = 4,
) -> list[ReportSection]:
    """Write an evaluation's files to `output_dir`: `table.md` and `results.json` (see
    [`~toolkit.evaluation.report.write_report_files`]), `gflops_vs_miou.png`, `pictures/image_N.png` (image |
    prediction | ground truth | exit map, one row per setting drawn) and, after a calibration, a copy of the model
    with the chosen settings in `calibrated_dir` (default `<output_dir>/calibrated`). Returns the report's sections.
    """
    output_dir = Path(output_dir)
    calibrated_dir = Path(calibrated_dir or output_dir / "calibrated")
    if calibrated(summary):
        summary["calibration"]["saved_to"] = str(calibrated_dir)
    config = model.config
    sections = report_sections(summary, head_names(config.out_indices), gflops_key)
    write_report_files(summary, render_report(sections), output_dir)
    title = f"{summary['model']} on {summary['dataset']} ({summary['mode']})"
    rows = evaluated_settings(summary, len(config.out_indices) - 1)
    calibration = summary["calibration"] if calibrated(summary) else None
    plot_tradeoff(rows, output_dir / "gflops_vs_miou.png", title, calibration=calibration, gflops_key=gflops_key)
    if calibration is not None:
        report = json_ready(summary["calibration"])
        save_calibrated_model(model, image_processor, calibrated_dir, calibration["chosen"], report)
    samples = [
        (eval_dataset.dataset[index]["image"], eval_dataset[index]["labels"])  # original size, as the labels
        for index in range(min(num_pictures, len(eval_dataset)))
    ]
    write_comparison_pictures(
        model, image_processor, samples, pictured_thresholds(summary), id2label, output_dir / "pictures"
    )
    return sections


__all__ = [
    "CALIBRATORS",
    "CalibrationRequest",
    "ForwardTimer",
    "SettingEvaluator",
    "calibrate_thresholds",
    "calibration_summary",
    "evaluate_exit_settings",
    "evaluate_model_on_data",
    "pictured_thresholds",
    "write_evaluation_outputs",
]
