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
"""Measure exit settings on a data set: each setting's mIoU, GFLOPs, exits and model time, optional calibrations
of the settings to a budget on separate images, and the files of the result.

    summary, eval_dataset, id2label = evaluate_model_on_data(
        model, image_processor, accelerator, data_args, [1.0, 0.9, 0.8], model_name="outputs/model"
    )
    write_evaluation_outputs(summary, model, image_processor, eval_dataset, id2label, "outputs/evaluation")

A setting is an exit rule, `{"exit_mode": "capacity", "exit_capacity": 0.6}` (a bare number or tuple is a threshold),
and every result carries its rule, so threshold and capacity settings share one sweep, report and plot.

A calibration method is a function `(evaluate, request, sweep, num_heads) -> CalibrationOutcome` registered in
`CALIBRATORS` under the name `--calibrate` gives it; `evaluate` measures one exit rule on the calibration images
only, and `sweep` holds the rules of the sweep (where a search finds its starting values).
"""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from ...image_processing_dtop import DToPImageProcessor
from ..arguments import DataArguments
from ..data.datasets import SegmentationDataset
from ..inference.pictures import write_comparison_pictures
from ..inference.segmentation import ExitThreshold, predict_batch
from ..inference.visualization import head_names
from .bootstrap import miou_drop_upper_bound
from .calibration import (
    CAPACITY,
    MIOU_DROP_BOUND_KEY,
    THRESHOLD,
    CalibrationOutcome,
    ExitKnob,
    ExitRule,
    NothingToCalibrateError,
    Threshold,
    as_exit_rule,
    calibrate_per_head,
    calibrate_threshold,
    compact_threshold,
    format_exit_rule,
    is_uniform,
    is_unpruned,
    json_ready,
    knob_of,
    save_calibrated_model,
    setting_key,
    setting_of,
)
from .data import evaluation_dataloader, load_calibration_split, load_evaluation_split
from .diagnostics import SweepDiagnostics
from .loop import evaluate_model
from .plots import plot_depth_profile, plot_tradeoff
from .report import (
    CALIBRATION_FIELDS,
    GFLOPS_KEYS,
    ReportSection,
    calibrated,
    evaluated_settings,
    finished_calibrations,
    format_gflops,
    has_depth_profile,
    render_report,
    report_sections,
    sweep_order,
    write_report_files,
)


# Per exit mode: the sweep when none is given, and a calibration's starting grid when the sweep has no value of its
# knob. Thresholds: the confident end, where the paper's models work; capacities: the share of tokens kept, which
# saves in proportion, so the grid spans it evenly.
DEFAULT_SWEEPS: dict[str, tuple[float, ...]] = {
    THRESHOLD.mode: (1.0, 0.98, 0.95, 0.9, 0.8),
    CAPACITY.mode: (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
}
# `--calibrate` method -> the folder its calibrated model goes to, under the output folder, by default.
CALIBRATED_FOLDERS = {"thresholds": "calibrated", "capacity": "calibrated_capacity"}


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
    """Measures one exit rule on a data loader: [`evaluate_model`] plus model time per image and per-class IoU by
    class name; prints one line per setting. Each result carries its rule (`exit_mode` and `exit_threshold` or
    `exit_capacity`).

    Args:
        id2label: class names of the data set (the keys of `per_category_iou`).
        diagnostics: measure the exit diagnostics of the passes asked to (`diagnose=True`: the evaluated split's),
            from their own forward passes; whole images only (in slide mode `diagnostics_summary` says why not).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: DToPImageProcessor,
        accelerator: Accelerator,
        id2label: dict[int, str],
        diagnostics: bool = False,
    ):
        self.model, self.image_processor, self.accelerator, self.id2label = (
            model,
            image_processor,
            accelerator,
            id2label,
        )
        self.timer = None
        self.diagnostics, self.diagnostics_skipped = None, None
        if diagnostics and image_processor.do_split_image:
            # A window's tokens are not an image's: exit precision and boundaries have no image-wide token grid.
            self.diagnostics_skipped = "sliding-window mode: the diagnostics need whole-image inputs"
        elif diagnostics:
            self.diagnostics = SweepDiagnostics(model.config, image_processor)

    def warm_up(self, dataset: SegmentationDataset) -> None:
        """One forward on the first image, so that the first setting's time holds no one-off start-up cost; then
        the timer starts."""
        sample = dataset[0]
        pixel_values = sample["pixel_values"][None].to(self.accelerator.device)
        predict_batch(self.model, self.image_processor, pixel_values, [tuple(sample["labels"].shape)])
        self.timer = ForwardTimer(self.model)

    def __call__(
        self,
        dataloader,
        exit_rule: ExitRule | ExitThreshold,
        split_name: str = "evaluation",
        diagnose: bool = False,
        keep_image_areas: bool = False,
    ) -> dict:
        """The result of one exit rule (or bare threshold setting) on `dataloader`; with `diagnose` (and the
        diagnostics on) its `exit_diagnostics` too: the first diagnosed rule must be the unpruned one, and every
        diagnosed pass must read the same `dataloader`; with `keep_image_areas`, its per-image `image_class_areas`
        (a tensor: take it out before saving the result as JSON)."""
        if self.timer is None:
            self.warm_up(dataloader.dataset)
        self.timer.seconds = 0.0
        rule = as_exit_rule(exit_rule)
        diagnostics = self.diagnostics if diagnose else None
        if diagnostics is not None:
            diagnostics.start(unpruned=is_unpruned(setting_of(rule)))
        result = evaluate_model(
            self.model, dataloader, self.accelerator, image_processor=self.image_processor, diagnostics=diagnostics,
            keep_image_areas=keep_image_areas, **rule,
        )  # fmt: skip
        # Every process timed its own shard: the sum over processes, per image, is the time one image takes.
        seconds = torch.tensor([self.timer.seconds], dtype=torch.float64, device=self.accelerator.device)
        result["seconds_per_image"] = float(self.accelerator.gather(seconds).sum()) / max(result["num_images"], 1)
        result.update(rule)
        result["per_category_iou"] = {
            self.id2label[index]: iou for index, iou in enumerate(result["per_category_iou"])
        }
        self.accelerator.print(
            f"[{split_name}] {format_exit_rule(rule, threshold_prefix='threshold ')}: "
            f"mIoU {100 * result['mean_iou']:.2f}, "
            f"{format_gflops(result['gflops_backbone_and_final_head'])} GFLOPs "
            f"(all heads {format_gflops(result['gflops'])}), {1000 * result['seconds_per_image']:.1f} ms/image"
        )
        return result

    def diagnostics_summary(self) -> dict | None:
        """The summary's `diagnostics`: the depth profile (`depth_mean_iou`, one per head, decode head last, and
        `depth_per_category_iou` by class name), `boundary_share` among all tokens and `num_tokens`; or why they
        were `skipped`; `None` when they were not asked for."""
        if self.diagnostics_skipped is not None:
            return {"skipped": self.diagnostics_skipped}
        if self.diagnostics is None or self.diagnostics.profile is None:
            return None
        profile = dict(self.diagnostics.profile)
        profile["depth_per_category_iou"] = [
            {self.id2label[index]: iou for index, iou in enumerate(per_class)}
            for per_class in profile["depth_per_category_iou"]
        ]
        return profile

    def close(self) -> None:
        if self.timer is not None:
            self.timer.remove()


@dataclass
class CalibrationRequest:
    """What a calibration looks for: the best mIoU within `target_gflops` GFLOPs per image, or the fewest GFLOPs
    losing at most `max_miou_drop` mIoU points against the unpruned model (one of the two).

    Attributes:
        method: the `CALIBRATORS` entry that searches (`"thresholds"` or `"capacity"`).
        gflops_convention: the cost `target_gflops` limits, a key of `GFLOPS_KEYS`.
        search: `"per_head"` (one value per auxiliary head) or `"single"` (one for every head).
        num_refinements: bisection steps between sweep values.
        num_grid_refinements: per-head search: levels of finer grids around the best values found.
        split: the split calibrated on (`None`: the built-in calibration scenes, or images drawn from `train`).
        num_samples: images calibrated on.
        miou_drop_confidence: for `max_miou_drop`, the limit holds the upper bound of the drop at this confidence
            (a paired bootstrap over the calibration images, [`~toolkit.evaluation.bootstrap.miou_drop_upper_bound`])
            instead of the measured drop; `None`: the measured drop.
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
    miou_drop_confidence: float | None = None

    def __post_init__(self):
        if self.miou_drop_confidence is not None and not 0 < self.miou_drop_confidence < 1:
            raise ValueError(f"`miou_drop_confidence` must lie in (0, 1), got {self.miou_drop_confidence}.")

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


def calibrate_exit_setting(
    evaluate: Callable[[ExitRule], dict],
    request: CalibrationRequest,
    sweep: Sequence[ExitRule],
    num_heads: int,
    knob: ExitKnob = THRESHOLD,
) -> CalibrationOutcome:
    """Search `knob`'s setting (exit thresholds or capacities) with `evaluate`, from the sweep's values of that knob,
    or `DEFAULT_SWEEPS` of its mode when the sweep has none (1.0 always added: the mIoU change and R are measured
    against the unpruned model). `request.search == "single"` searches one value for every head, from the sweep's
    values shared by every head."""
    values = [setting_of(rule) for rule in sweep if knob_of(rule) is knob] or list(DEFAULT_SWEEPS[knob.mode])
    values = [1.0] + values
    bounded = request.miou_drop_confidence is not None and request.max_miou_drop is not None
    image_areas = {}  # setting key -> per-image class areas on the calibration images, for the drop bound
    bounds = {}  # setting key -> its drop bound (the baseline is the same for every setting of one search)

    def measure(value: Threshold) -> dict:
        result = evaluate(knob.rule(value), keep_image_areas=bounded)
        if bounded:
            image_areas[setting_key(result, num_heads)] = result.pop("image_class_areas")
        return result

    def drop_bound(result: dict, baseline: dict) -> float:
        key = setting_key(result, num_heads)
        if key not in bounds:
            baseline_areas = image_areas[setting_key(baseline, num_heads)]
            bounds[key] = miou_drop_upper_bound(baseline_areas, image_areas[key], request.miou_drop_confidence)
        return bounds[key]

    search = {**request.constraint(), "drop_bound": drop_bound if bounded else None}
    if request.search == "single" or num_heads == 1:
        shared = [compact_threshold(value) for value in values if is_uniform(value)]
        chosen, results = calibrate_threshold(measure, shared, knob=knob, **search)
        baseline = next(result for result in results if is_unpruned(result[knob.key]))
        outcome = CalibrationOutcome(chosen=chosen, best_single=chosen, baseline=baseline, results=results)
    else:
        outcome = calibrate_per_head(
            measure, values, num_heads, knob, num_grid_refinements=request.num_grid_refinements, **search
        )
    if bounded:
        # Every setting's bound, in mIoU units like `mean_iou`, beside its measured mIoU in the saved results.
        for result in outcome.results:
            result[MIOU_DROP_BOUND_KEY] = drop_bound(result, outcome.baseline)
    return outcome


Calibrator = Callable[[Callable[[ExitRule], dict], CalibrationRequest, Sequence[ExitRule], int], CalibrationOutcome]
# `--calibrate` name -> the search it runs; each is the one search above, on its own knob.
CALIBRATORS: dict[str, Calibrator] = {
    "thresholds": partial(calibrate_exit_setting, knob=THRESHOLD),
    "capacity": partial(calibrate_exit_setting, knob=CAPACITY),
}


def calibration_summary(
    request: CalibrationRequest, data: str, outcome: CalibrationOutcome | None, error: str | None, on_eval: dict
) -> dict:
    """The calibration entry of an evaluation summary (`calibration` for thresholds, `capacity_calibration` for
    capacities: [`~toolkit.evaluation.report.CALIBRATION_FIELDS`]): the request, then what was found (or why
    nothing was)."""
    summary = {
        "method": request.method,
        "target_gflops": request.target_gflops,
        "max_miou_drop_points": request.max_miou_drop,
        "gflops_convention": request.gflops_convention,
        "search": request.search,
        "miou_drop_confidence": request.miou_drop_confidence,
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


def calibration_requests(
    calibration: CalibrationRequest | Sequence[CalibrationRequest] | None,
) -> list[CalibrationRequest]:
    """The calibrations asked for, one per method (of a method asked for twice, the last request counts)."""
    if calibration is None:
        return []
    requests = [calibration] if isinstance(calibration, CalibrationRequest) else calibration
    return list({request.method: request for request in requests}.values())


def run_calibration(
    evaluate: SettingEvaluator, request: CalibrationRequest, sweep: Sequence[ExitRule], num_heads: int, loader
) -> tuple[CalibrationOutcome | None, str | None]:
    """One calibration on `loader`'s images: its outcome, or why there was nothing to calibrate."""
    try:
        measure = partial(evaluate, loader, split_name="calibration")
        return CALIBRATORS[request.method](measure, request, sweep, num_heads), None
    except NothingToCalibrateError as caught:
        evaluate.accelerator.print(f"\n{caught}\n")
        return None, str(caught)


def evaluate_exit_settings(
    evaluate: SettingEvaluator,
    eval_loader,
    sweep: Sequence[ExitRule | ExitThreshold],
    split_name: str,
    calibration: CalibrationRequest | Sequence[CalibrationRequest] | None = None,
    calibration_loader=None,
    calibration_data: str = "",
) -> dict:
    """The sweep on the evaluated split and, with calibrations, the calibrated settings.

    Args:
        sweep: exit rules (a bare threshold setting is threshold mode's rule), thresholds and capacities alike.
        calibration: one request, or several (e.g. thresholds and capacities with the same budget).

    The calibrations run first, on `calibration_loader` only: the evaluated split plays no part in the choice. Their
    chosen settings (and the baseline and best single value) are then measured on the evaluated split too. Each
    setting runs once per split (every unpruned one is the same computation, and runs once).

    Returns:
        `num_images`, `num_processes`, `results` (the sweep, each setting once) and, per calibration, the entry
        `CALIBRATION_FIELDS[method]` (see [`calibration_summary`]; `error` when there was nothing to calibrate).
        With the evaluator's diagnostics, `diagnostics` ([`SettingEvaluator.diagnostics_summary`]) and in every
        result measured on the evaluated split `exit_diagnostics`: per head, of the tokens it finalised, the share
        whose label equals the unpruned final label (`exit_agreement`), the share right (`exit_accuracy`, beside
        the unpruned model's `reference_accuracy` on them) and the share of boundary tokens
        (`exit_boundary_share`); NaN (null in the JSON) where no token exited.
    """
    num_heads = len(evaluate.model.config.out_indices) - 1
    sweep = [as_exit_rule(setting) for setting in sweep]
    requests = calibration_requests(calibration)
    outcomes = [run_calibration(evaluate, request, sweep, num_heads, calibration_loader) for request in requests]
    measured = {}  # setting key -> its result on the evaluated split

    def on_evaluated_split(rule: ExitRule) -> dict:
        key = setting_key(rule, num_heads)
        if key not in measured:
            measured[key] = evaluate(eval_loader, rule, split_name, diagnose=True)
        return measured[key]

    ordered = sorted(sweep, key=sweep_order)
    if evaluate.diagnostics is not None:
        # The unpruned pass first (the sweep's own unpruned rule, or one more pass when it has none): the depth
        # profile, and the final labels every later setting's exit precision is measured against.
        on_evaluated_split(next((rule for rule in ordered if is_unpruned(setting_of(rule))), THRESHOLD.rule(1.0)))
    results = list({id(result): result for result in map(on_evaluated_split, ordered)}.values())
    study = {"num_images": results[0]["num_images"], "num_processes": evaluate.accelerator.num_processes}
    study["results"] = results
    roles = ("baseline", "best_single", "chosen")
    for request, (outcome, error) in zip(requests, outcomes, strict=True):
        on_eval = {role: on_evaluated_split(getattr(outcome, role)) for role in roles} if outcome else {}
        field = CALIBRATION_FIELDS[request.method]
        study[field] = calibration_summary(request, calibration_data, outcome, error, on_eval)
    diagnostics = evaluate.diagnostics_summary()
    if diagnostics is not None:
        study["diagnostics"] = diagnostics
    evaluate.close()
    return study


def evaluate_model_on_data(
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    accelerator: Accelerator,
    data_args: DataArguments,
    sweep: Sequence[ExitRule | ExitThreshold],
    model_name: str,
    split_name: str = "validation",
    calibration: CalibrationRequest | Sequence[CalibrationRequest] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    diagnostics: bool = True,
) -> tuple[dict, SegmentationDataset, dict[int, str]]:
    """The evaluation job: load and check the evaluated split (and, with a `calibration`, the calibration images),
    then [`evaluate_exit_settings`]. Slide mode when the processor is in it.

    Args:
        sweep: the exit rules measured (bare threshold settings, or `{"exit_mode": ..., "exit_capacity": ...}`).
        model_name: how the summary names the model (its folder or Hub id).
        calibration: one calibration request or several, all on the same calibration images.
        diagnostics: also the exit diagnostics on the evaluated split (see [`evaluate_exit_settings`]), from the
            sweep's own forward passes (one more, unpruned, pass when neither the sweep nor a calibration has one).

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
    requests = calibration_requests(calibration)
    calibration_loader, calibration_data = None, ""
    if requests:  # the calibration images are the same for every method: their settings come from the first
        calibration_split, calibration_data = load_calibration_split(
            data_args, requests[0].split, requests[0].num_samples, config.num_labels, do_reduce_labels, accelerator
        )
        _, calibration_loader = evaluation_dataloader(
            calibration_split, image_processor, config, accelerator, split_name="calibration", **loader_kwargs
        )
        accelerator.print(f"Calibrating on {calibration_data}")
    evaluator = SettingEvaluator(model, image_processor, accelerator, id2label, diagnostics)
    study = evaluate_exit_settings(
        evaluator, eval_loader, sweep, split_name, requests, calibration_loader, calibration_data
    )
    summary = {"model": model_name, "dataset": data_args.dataset_name, "split": split_name}
    summary["mode"] = "sliding_window" if image_processor.do_split_image else "whole_image"
    return {**summary, **study}, eval_dataset, id2label


def pictured_exit_rules(summary: dict, num_heads: int) -> list[dict]:
    """The settings drawn: after calibrations the unpruned one and each chosen one; otherwise every one of the
    sweep."""
    chosen = [calibration["chosen"] for calibration in finished_calibrations(summary)]
    rules = [THRESHOLD.rule(1.0), *chosen] if chosen else sorted(summary["results"], key=sweep_order)
    return list({setting_key(rule, num_heads): as_exit_rule(rule) for rule in rules}.values())


def write_evaluation_outputs(
    summary: dict,
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    eval_dataset: SegmentationDataset,
    id2label: dict[int, str],
    output_dir: str | Path,
    calibrated_dirs: Mapping[str, str | Path] | None = None,
    gflops_key: str = GFLOPS_KEYS["all_heads"],
    num_pictures: int = 4,
) -> list[ReportSection]:
    """Write an evaluation's files to `output_dir`: `table.md` and `results.json` (see
    [`~toolkit.evaluation.report.write_report_files`]), `gflops_vs_miou.png`, with the exit diagnostics
    `depth_profile.png`, `pictures/image_N.png` (image |
    prediction | ground truth | exit map, one row per setting drawn) and, after each calibration, a copy of the model
    with the chosen settings in `calibrated_dirs[method]` (default: the method's `CALIBRATED_FOLDERS` entry in
    `output_dir`, `calibrated` or `calibrated_capacity`). Returns the report's sections.
    """
    output_dir = Path(output_dir)
    folders = {method: output_dir / folder for method, folder in CALIBRATED_FOLDERS.items()}
    folders.update({method: Path(folder) for method, folder in (calibrated_dirs or {}).items()})
    finished = {method: summary[field] for method, field in CALIBRATION_FIELDS.items() if calibrated(summary, method)}
    for method, calibration in finished.items():
        calibration["saved_to"] = str(folders[method])
    config = model.config
    num_heads = len(config.out_indices) - 1
    sections = report_sections(summary, head_names(config.out_indices), gflops_key)
    write_report_files(summary, render_report(sections), output_dir)
    title = f"{summary['model']} on {summary['dataset']} ({summary['mode']})"
    rows = evaluated_settings(summary, num_heads)
    plot_tradeoff(rows, output_dir / "gflops_vs_miou.png", title, list(finished.values()), gflops_key)
    if has_depth_profile(summary):
        plot_depth_profile(summary, rows, head_names(config.out_indices), output_dir / "depth_profile.png", title)
    for method, calibration in finished.items():
        save_calibrated_model(model, image_processor, folders[method], calibration["chosen"], json_ready(calibration))
    samples = [
        (eval_dataset.dataset[index]["image"], eval_dataset[index]["labels"])  # original size, as the labels
        for index in range(min(num_pictures, len(eval_dataset)))
    ]
    write_comparison_pictures(
        model, image_processor, samples, pictured_exit_rules(summary, num_heads), id2label, output_dir / "pictures"
    )
    return sections


__all__ = [
    "CALIBRATED_FOLDERS",
    "CALIBRATORS",
    "DEFAULT_SWEEPS",
    "CalibrationRequest",
    "ForwardTimer",
    "SettingEvaluator",
    "calibrate_exit_setting",
    "calibration_requests",
    "calibration_summary",
    "evaluate_exit_settings",
    "evaluate_model_on_data",
    "pictured_exit_rules",
    "run_calibration",
    "write_evaluation_outputs",
]
