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
"""Measure what DToP buys: sweep exit thresholds (or capacities) on a data set and report, per setting, mIoU (also
per class), pixel accuracy, GFLOPs per image (backbone + final head, the paper's figure, and with every head), R =
GFLOPs unpruned / pruned, the share of tokens finalised by each head and the model time per image; optionally
calibrate the thresholds, or capacity mode's capacities, one per auxiliary head, to a budget.

Writes to `--output_dir`: `results.json`, `table.md` (the table printed, like the paper's Table 2),
`gflops_vs_miou.png`, `depth_profile.png` (the exit diagnostics below), `pictures/image_N.png` (image | prediction |
ground truth | exit map, one row per
setting) and, with `--target_gflops` or `--max_miou_drop`, `calibrated/` (or `--calibrated_output_dir`): a copy
of the model whose config carries the chosen `exit_threshold` (`calibrated_capacity/` with `--calibrate capacity`:
the model in capacity mode, with the chosen `exit_capacity`).

    MODEL=outputs/quickstart/model
    python examples/run_evaluation.py --model_name_or_path $MODEL --exit_threshold 1.0 0.98 0.95 0.9 0.8
    python examples/run_evaluation.py --model_name_or_path $MODEL --exit_threshold 1.0 0.8 0.6,0.9
    python examples/run_evaluation.py --model_name_or_path $MODEL --exit_mode capacity --exit_capacity 1.0 0.8 0.6,0.4
    python examples/run_evaluation.py --model_name_or_path $MODEL --dataset_name scene_parse_150 --sliding_window
    python examples/run_evaluation.py --model_name_or_path $MODEL --max_miou_drop 0.5   # <= 0.5 mIoU points lost
    python examples/run_evaluation.py --model_name_or_path $MODEL --max_miou_drop 0.5 --miou_drop_confidence 0.9
    python examples/run_evaluation.py --model_name_or_path $MODEL --target_gflops 80    # <= 80 GFLOPs per image
    python examples/run_evaluation.py --model_name_or_path $MODEL --max_miou_drop 0.5 --calibrate thresholds capacity

(`0.6,0.9`: one threshold per auxiliary head; `0.6,0.4`: the share of an image's tokens still active after each
auxiliary head, in capacity mode. `--exit_threshold` and `--exit_capacity` may both be given: both are swept, side by
side.) Calibration (`--calibrate thresholds`, implied by a budget; `--calibrate capacity`; or both, with the same
budget) searches one value per auxiliary head (`--calibration_search single`: one for all heads, the paper's setting)
on calibration data, never on the evaluated split: `--calibration_split` (a split of the data set), else the built-in
data set's own calibration scenes, else `--calibration_samples` images drawn from `train`. The chosen settings are
then reported on the evaluated split too: the gap between the two shows how much the choice overfits the calibration
images; `--miou_drop_confidence 0.9` keeps a margin for it (a setting fits `--max_miou_drop` only when the 90% upper
bound of its drop, a paired bootstrap over the calibration images, does). When no swept threshold lets a token exit,
lower ones are tried; a model that never exits is reported as such, and no calibrated copy is written (exit code 1).
Capacity mode always drops its share of the tokens, whatever the image: its GFLOPs follow from the capacities and the
input size alone, and the same search trades them against mIoU (it starts from the swept capacities, or 1.0 0.9 ...
0.3 when none are swept).

The exit diagnostics (whole-image mode; `--no_diagnostics` skips them) come from the sweep's own forward passes: the
depth profile (each head's own mIoU over all tokens at threshold 1.0: does depth pay on this data set?), per setting
and head the exit precision (of the tokens that exited there, the share keeping the unpruned model's final label, and
the share right against the ground truth) and the share of boundary tokens among them against among all tokens; in
the report, `results.json` (`diagnostics`, and `exit_diagnostics` in each result) and `depth_profile.png`.

Several processes split the data; the results are the same as with one (model time per image aside):

    accelerate launch examples/run_evaluation.py --model_name_or_path ...
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/run_evaluation.py --device cpu ...
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate.utils import set_seed

from dtop_hf.toolkit.arguments import (
    DEPRECATED_FLAGS,
    DataArguments,
    ExitArguments,
    ModelArguments,
    RuntimeArguments,
    build_parser,
    parse_arguments,
    require_positive,
)
from dtop_hf.toolkit.evaluation.calibration import (
    CAPACITY,
    KNOBS,
    THRESHOLD,
    ExitRule,
    format_threshold,
    is_uniform,
    knob_of,
    setting_of,
)
from dtop_hf.toolkit.evaluation.report import (
    CALIBRATION_FIELDS,
    GFLOPS_KEYS,
    describe_calibrated,
    has_depth_profile,
    render_report,
)
from dtop_hf.toolkit.evaluation.sweep import (
    CALIBRATORS,
    DEFAULT_SWEEPS,
    CalibrationRequest,
    evaluate_model_on_data,
    write_evaluation_outputs,
)
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.segmentation import sliding_window_processor
from dtop_hf.toolkit.runtime import accelerator_session


# This script's `--seed` used to seed the data: it is `--data_seed` now, as in the other scripts.
DEPRECATED = {**DEPRECATED_FLAGS, "--seed": "--data_seed"}


@dataclass
class EvaluationArguments:
    """What to measure and where to write it; the calibration, when one is asked for."""

    split: Literal["validation", "train"] = field(
        default="validation", metadata={"help": "Split to evaluate (calibration never uses it: --calibration_split)."}
    )
    sliding_window: bool = field(
        default=False, metadata={"help": "Official test mode: shorter side resized to the crop, overlapping windows."}
    )
    crop_size: int | None = field(
        default=None, metadata={"help": "Sliding-window crop side; default: the processor's."}
    )
    stride: int | None = field(default=None, metadata={"help": "Sliding-window stride; default: the processor's."})
    calibrate: list[str] | None = field(
        default=None,
        metadata={
            "help": "Calibrate to the budget the exit thresholds, capacity mode's capacities, or both (same budget); "
            "default: thresholds when a budget is given.",
            "choices": ["none", *sorted(CALIBRATORS)],
        },
    )
    target_gflops: float | None = field(
        default=None, metadata={"help": "Best mIoU within this many GFLOPs per image."}
    )
    max_miou_drop: float | None = field(
        default=None, metadata={"help": "Fewest GFLOPs losing at most this many mIoU points (0.5 = half a point)."}
    )
    miou_drop_confidence: float | None = field(
        default=None,
        metadata={
            "help": "With --max_miou_drop: hold the budget at this confidence (0.9: the upper bound of each setting's "
            "drop, a paired bootstrap over the calibration images, must fit), not the measured drop alone."
        },
    )
    gflops_convention: Literal["all_heads", "paper"] = field(
        default="all_heads", metadata={"help": "Cost --target_gflops limits: every head, or backbone + final head."}
    )
    num_refinements: int = field(default=4, metadata={"help": "Bisection steps between sweep thresholds."})
    calibration_search: Literal["per_head", "single"] = field(
        default="per_head", metadata={"help": "One threshold per auxiliary head, or one for every head."}
    )
    num_grid_refinements: int = field(
        default=2, metadata={"help": "Per-head search: levels of finer grids around the best thresholds found."}
    )
    calibration_split: str | None = field(
        default=None,
        metadata={"help": "Split to calibrate on; default: built-in calibration scenes, or images drawn from train."},
    )
    calibration_samples: int = field(default=100, metadata={"help": "Images calibrated on."})
    calibrated_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the calibrated model goes (default: <output_dir>/calibrated, or calibrated_capacity "
            "for capacities)."
        },
    )
    output_dir: str = field(default="dtop-evaluation", metadata={"help": "Results, plot, pictures, calibrated model."})
    num_pictures: int = field(default=4, metadata={"help": "Images drawn with their prediction and exit map."})
    no_diagnostics: bool = field(
        default=False,
        metadata={"help": "Skip the exit diagnostics (depth profile, exit precision, boundary shares; whole images)."},
    )

    def __post_init__(self):
        require_positive(self, ("calibration_samples", "crop_size", "stride"))
        if min(self.num_pictures, self.num_refinements, self.num_grid_refinements) < 0:
            raise ValueError("`--num_pictures`, `--num_refinements` and `--num_grid_refinements` must be >= 0.")
        if self.target_gflops is not None and self.max_miou_drop is not None:
            raise ValueError("Give one budget: `--target_gflops` or `--max_miou_drop`, not both.")
        if self.target_gflops is not None and self.target_gflops <= 0:
            raise ValueError(f"`--target_gflops` must be > 0, got {self.target_gflops}.")
        if self.max_miou_drop is not None and self.max_miou_drop < 0:
            raise ValueError(f"`--max_miou_drop` must be >= 0 (mIoU points), got {self.max_miou_drop}.")
        if self.miou_drop_confidence is not None and self.max_miou_drop is None:
            raise ValueError("`--miou_drop_confidence` bounds the mIoU drop: it needs `--max_miou_drop`.")
        if self.miou_drop_confidence is not None and not 0 < self.miou_drop_confidence < 1:
            raise ValueError(f"`--miou_drop_confidence` must lie in (0, 1), got {self.miou_drop_confidence}.")
        has_budget = self.target_gflops is not None or self.max_miou_drop is not None
        self.calibrate = self.calibrate or (["thresholds"] if has_budget else ["none"])
        if "none" in self.calibrate and len(self.calibrate) > 1:
            raise ValueError(f"`--calibrate {' '.join(self.calibrate)}`: `none` goes alone.")
        if self.methods and not has_budget:
            raise ValueError(
                f"`--calibrate {' '.join(self.calibrate)}` needs a budget: `--target_gflops` or `--max_miou_drop`."
            )
        if self.calibrated_output_dir is not None and len(self.methods) > 1:
            raise ValueError(
                "`--calibrated_output_dir` is one folder, for one calibration: with several `--calibrate` methods, "
                "each model goes to its own folder in `--output_dir` (calibrated/, calibrated_capacity/)."
            )
        if self.calibration_split is not None and self.calibration_split == self.split:
            raise ValueError(
                f"`--calibration_split` and `--split` are both {self.split!r}: calibrate on other images than those "
                "the report is measured on, or the report shows the calibration's own optimism."
            )

    @property
    def methods(self) -> list[str]:
        """The `--calibrate` methods asked for (none for `none`)."""
        return [method for method in self.calibrate if method != "none"]

    def calibration_requests(self) -> list[CalibrationRequest]:
        """One request per method, all with the same budget and search."""
        settings = (
            self.target_gflops, self.max_miou_drop, self.gflops_convention, self.calibration_search,
            self.num_refinements, self.num_grid_refinements, self.calibration_split, self.calibration_samples,
        )  # fmt: skip
        return [
            CalibrationRequest(method, *settings, miou_drop_confidence=self.miou_drop_confidence)
            for method in self.methods
        ]


def sweep_rules(exit_args: ExitArguments, model_mode: str = THRESHOLD.mode) -> list[ExitRule]:
    """The exit rules swept: the `--exit_threshold` values, then the `--exit_capacity` ones (capacity mode); with
    neither, the default sweep of `--exit_mode`, or when unset of the model's own mode (`model_mode`).

    Raises:
        ValueError: a knob given for the other mode than `--exit_mode`.
    """
    given = {knob: getattr(exit_args, knob.key) or [] for knob in KNOBS}
    for knob, values in given.items():
        if values and exit_args.exit_mode not in (None, knob.mode):
            raise ValueError(
                f"`--{knob.key}` applies in {knob.mode} mode, but `--exit_mode {exit_args.exit_mode}` was given: "
                "sweep the other knob, or give both knobs without `--exit_mode` to sweep both."
            )
    if not any(given.values()):
        knob = CAPACITY if (exit_args.exit_mode or model_mode) == CAPACITY.mode else THRESHOLD
        given[knob] = list(DEFAULT_SWEEPS[knob.mode])
    return [knob.rule(value) for knob, values in given.items() for value in values]


def check_arguments(model_args, exit_args, data_args, runtime_args, eval_args) -> None:
    """Flags that only go wrong together."""
    rules = sweep_rules(exit_args)  # the model's mode is not known yet: the knobs given are what is checked
    if eval_args.calibration_search == "single" and not all(is_uniform(setting_of(rule)) for rule in rules):
        raise ValueError(
            "`--calibration_search single` calibrates one value for every head: give `--exit_threshold` and "
            "`--exit_capacity` without per-head values (no commas)."
        )


def parse_args(argv: list[str] | None = None) -> tuple:
    parser = build_parser(
        (ModelArguments, ExitArguments, DataArguments, RuntimeArguments, EvaluationArguments),
        description="Sweep DToP exit thresholds or capacities: mIoU, GFLOPs, exits, time; calibrate them to a budget.",
    )
    return parse_arguments(parser, argv, ["model_name_or_path"], DEPRECATED, check_arguments)


def check_setting_lengths(rules: list[ExitRule], num_heads: int) -> None:
    """Per-head `--exit_threshold` / `--exit_capacity` values must give one value per auxiliary head of the model."""
    for rule in rules:
        value = setting_of(rule)
        if not is_uniform(value) and len(value) != num_heads:
            raise ValueError(
                f"`--{knob_of(rule).key}` {','.join(f'{number:g}' for number in value)} gives {len(value)} values, "
                f"but the model has {num_heads} auxiliary heads: give one value for every head (0.8), or {num_heads} "
                "comma-separated values."
            )


def load_model(model_args: ModelArguments, data_args: DataArguments, eval_args: EvaluationArguments, device):
    """The model (eval mode) and its image processor with the flags' overrides, in slide mode with
    `--sliding_window`."""
    model, image_processor = load_model_and_processor(model_args.model_name_or_path, device)
    if eval_args.crop_size is not None:
        image_processor.crop_size = {"height": eval_args.crop_size, "width": eval_args.crop_size}
    if eval_args.stride is not None:
        image_processor.stride = {"height": eval_args.stride, "width": eval_args.stride}
    if data_args.do_reduce_labels is not None:
        image_processor.do_reduce_labels = data_args.do_reduce_labels
    if eval_args.sliding_window:
        image_processor = sliding_window_processor(image_processor)
    return model, image_processor


def print_outcome(summary: dict, sections, eval_args: EvaluationArguments, output_dir: Path) -> None:
    print(render_report(sections))
    for method in eval_args.methods:
        calibration = summary[CALIBRATION_FIELDS[method]]
        if "chosen" in calibration:
            chosen = setting_of(calibration["chosen"])
            kind = "one for every head" if is_uniform(chosen) else "one per auxiliary head"
            plural = knob_of(calibration["chosen"]).plural
            print(f"\nCalibrated {plural} {format_threshold(chosen)} ({kind}) -> {calibration['saved_to']}")
            print(describe_calibrated(calibration, GFLOPS_KEYS[eval_args.gflops_convention]))
        else:
            print(f"\nNo calibrated model written ({method}): {calibration['error']}")
    diagnostics = summary.get("diagnostics", {})
    if "skipped" in diagnostics:
        print(f"\nNo exit diagnostics: {diagnostics['skipped']}.")
    plots = "gflops_vs_miou.png" + (", depth_profile.png" if has_depth_profile(summary) else "")
    print(f"\nWrote {output_dir / 'results.json'}, table.md, {plots} and pictures/.")


def failed_calibrations(summary: dict) -> list[str]:
    """The calibrations asked for that found nothing to calibrate."""
    return [field for field in CALIBRATION_FIELDS.values() if "error" in summary.get(field, {})]


def main(argv: list[str] | None = None) -> dict:
    model_args, exit_args, data_args, runtime_args, eval_args = parse_args(argv)
    set_seed(runtime_args.seed)
    calibrated_dirs = {}
    if eval_args.calibrated_output_dir is not None and eval_args.methods:
        calibrated_dirs = {eval_args.methods[0]: eval_args.calibrated_output_dir}
    with accelerator_session(**runtime_args.accelerator_kwargs()) as accelerator:
        model, image_processor = load_model(model_args, data_args, eval_args, accelerator.device)
        rules = sweep_rules(exit_args, model.config.exit_mode)
        check_setting_lengths(rules, len(model.config.out_indices) - 1)
        # The calibrations (on their own images), then the sweep and the calibrated settings on the evaluated split.
        summary, eval_dataset, id2label = evaluate_model_on_data(
            model, image_processor, accelerator, data_args, rules, model_args.model_name_or_path, eval_args.split,
            eval_args.calibration_requests(), runtime_args.per_device_eval_batch_size,
            runtime_args.dataloader_num_workers, diagnostics=not eval_args.no_diagnostics,
        )  # fmt: skip
        if accelerator.is_main_process:  # the report, plot, pictures and calibrated models
            output_dir = Path(eval_args.output_dir)
            sections = write_evaluation_outputs(
                summary, model, image_processor, eval_dataset, id2label, output_dir, calibrated_dirs,
                GFLOPS_KEYS[eval_args.gflops_convention], eval_args.num_pictures,
            )  # fmt: skip
            print_outcome(summary, sections, eval_args, output_dir)
    return summary


if __name__ == "__main__":
    # Non-zero when a calibration was asked for and found nothing to calibrate (the report is still written).
    raise SystemExit(1 if failed_calibrations(main()) else 0)
