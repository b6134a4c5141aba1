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
"""DToP from nothing, in one command and a few CPU minutes, offline: on the built-in synthetic scenes, train a
small base model (no pruning), prune-finetune it (auxiliary exit threshold 0.7), sweep exit thresholds (mIoU and
GFLOPs per image), calibrate one threshold per auxiliary head (at most `--max_miou_drop` mIoU points lost, held at
`--miou_drop_confidence` by a bootstrap over calibration scenes the report never uses), and with the same budget
capacity mode's capacities (the share of tokens still active after each head, the same for every image: static
shapes, exports to ONNX), and draw exit maps; print the table and where everything went.

    python examples/quickstart.py                          # default size: a few minutes on a laptop CPU
    python examples/quickstart.py --tiny                   # seconds (CI smoke test); or DTOP_QUICKSTART_TINY=1
    python examples/quickstart.py --base_steps 3000 --train_samples 3000   # longer, better

The steps are the ones `finetune.py` (twice: `--stage base`, then `--stage prune`: the toolkit's
`run_training_stage`), `run_evaluation.py` (threshold sweep, calibration, exit diagnostics) and `segment.py`
(pictures) run, called as library functions in one process; the final table ends with where exits land (boundary
tokens per head) and the depth profiles of the base and the pruned model. Written to
`--output_dir`:

    base/         the base model          model/        the pruned model (exit threshold 0.7)
    calibrated/   the pruned model with its calibrated per-head thresholds: use this one
    calibrated_capacity/   the pruned model in capacity mode with its calibrated capacities (for ONNX export)
    evaluation/   table.md (with the exit diagnostics), results.json, gflops_vs_miou.png, depth_profile.png,
                  pictures/ (validation scenes, one row per threshold)
    pictures/     segment.py's PNGs for a photo and a validation scene, at the model's threshold, the calibrated
                  ones and the lowest swept
    data/         the generated data set (reused by later runs)

The model folder loads in `pipeline("image-segmentation", model=..., trust_remote_code=True)` and in
`examples/segment.py --model_name_or_path <output_dir>/model`.
"""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dtop_hf.configuration_dtop import normalize_exit_threshold
from dtop_hf.toolkit.arguments import (
    DEPRECATED_FLAGS,
    DataArguments,
    ExitArguments,
    ModelArguments,
    PresetArguments,
    RuntimeArguments,
    build_parser,
    parse_arguments,
    require_positive,
)
from dtop_hf.toolkit.evaluation.calibration import format_threshold, speedup
from dtop_hf.toolkit.evaluation.flops import capacity_flops_ratio
from dtop_hf.toolkit.evaluation.report import (
    CALIBRATION_FIELDS,
    DIAGNOSTICS_SECTIONS,
    calibrated,
    compare_with_best_single,
    render_report,
)
from dtop_hf.toolkit.evaluation.sweep import (
    CALIBRATED_FOLDERS,
    CalibrationRequest,
    evaluate_model_on_data,
    write_evaluation_outputs,
)
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.pictures import write_pictures_per_threshold
from dtop_hf.toolkit.quickstart import (
    PRUNING_THRESHOLD,
    RUN_SIZES,
    TINY_ENVIRONMENT_VARIABLE,
    format_exit_landing,
    run_size,
    sample_images,
    tiny_from_environment,
    where_exits_land,
)
from dtop_hf.toolkit.runtime import accelerator_session
from dtop_hf.toolkit.training.stage import (
    OptimizationArguments,
    OutputArguments,
    StageArguments,
    TrainingDataArguments,
    run_training_stage,
)


# This script's `--thresholds` was the sweep, and its `--batch_size` the training batch.
DEPRECATED = {
    **DEPRECATED_FLAGS,
    "--thresholds": "--sweep_thresholds",
    "--batch_size": "--per_device_train_batch_size",
}


def sized(name: str, text: str) -> dict:
    """Field metadata whose help gives the default size's value and the tiny size's."""
    return {"help": f"{text} (default: {RUN_SIZES['default'][name]}; tiny: {RUN_SIZES['tiny'][name]})."}


@dataclass
class QuickstartArguments:
    """The run's size (unset: the default size's, or with --tiny the tiny one's) and its outputs."""

    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Where models, tables and pictures go."})
    tiny: bool = field(
        default=False, metadata={"help": f"Seconds-long smoke-test size (also with {TINY_ENVIRONMENT_VARIABLE}=1)."}
    )
    image_size: int | None = field(default=None, metadata=sized("image_size", "Side of the scenes and model input"))
    train_samples: int | None = field(default=None, metadata=sized("train_samples", "Training scenes"))
    validation_samples: int | None = field(
        default=None, metadata=sized("validation_samples", "Validation scenes (sweep), and calibration scenes")
    )
    base_steps: int | None = field(default=None, metadata=sized("base_steps", "Steps of the base stage (no pruning)"))
    prune_steps: int | None = field(default=None, metadata=sized("prune_steps", "Steps of the pruning fine-tune"))
    per_device_train_batch_size: int | None = field(
        default=None, metadata=sized("per_device_train_batch_size", "Training batch size")
    )
    learning_rate: float | None = field(default=None, metadata=sized("learning_rate", "AdamW learning rate"))
    head_lr_multiplier: float | None = field(
        default=None, metadata=sized("head_lr_multiplier", "The heads train at this multiple of the learning rate")
    )
    sweep_thresholds: list[str] | None = field(
        default=None, metadata=sized("sweep_thresholds", "Exit thresholds of the evaluation sweep; 1.0 = unpruned")
    )
    max_miou_drop: float = field(
        default=0.3, metadata={"help": "Calibration budget: mIoU points the thresholds may lose against unpruned."}
    )
    miou_drop_confidence: float | None = field(
        default=0.9,
        metadata={
            "help": "The budget holds at this confidence: each setting's mIoU drop bounded by a paired bootstrap "
            "over the calibration scenes (0 = the measured drop alone)."
        },
    )
    photo: str | None = field(
        default=None, metadata={"help": "Your photo to segment at the end (default: scikit-image's astronaut)."}
    )

    def __post_init__(self):
        if self.sweep_thresholds is not None:
            self.sweep_thresholds = [normalize_exit_threshold(text) for text in self.sweep_thresholds]
        sizes = ("image_size", "train_samples", "validation_samples", "base_steps", "prune_steps")
        require_positive(self, sizes + ("per_device_train_batch_size",))
        if self.max_miou_drop < 0:
            raise ValueError(f"`--max_miou_drop` must be >= 0 (mIoU points), got {self.max_miou_drop}.")
        if self.miou_drop_confidence is not None and not 0 <= self.miou_drop_confidence < 1:
            raise ValueError(f"`--miou_drop_confidence` must lie in [0, 1), got {self.miou_drop_confidence}.")
        self.miou_drop_confidence = self.miou_drop_confidence or None  # 0: no bound
        if self.photo is not None and not Path(self.photo).is_file():
            raise ValueError(f"`--photo` {self.photo!r} is not a file: pass the path of an image.")


def check_arguments(preset_args: PresetArguments, exit_args: ExitArguments, *others) -> None:
    """The quick start trains a small model in threshold mode; its `--exit_threshold` must prune."""
    if preset_args.paper_preset is not None:
        raise ValueError("`--paper_preset` trains on a paper's data set: that is finetune.py's job.")
    if exit_args.exit_mode == "capacity" or exit_args.exit_capacity is not None:
        raise ValueError("The quick start trains in threshold mode: no `--exit_mode capacity` / `--exit_capacity`.")
    exit_threshold = exit_args.model_kwargs()["exit_threshold"]
    if min(exit_threshold if isinstance(exit_threshold, tuple) else [exit_threshold]) >= 1.0:
        raise ValueError(
            f"`--exit_threshold` must be below 1 for the pruning fine-tune to prune, got {exit_threshold}."
        )


def parse_args(argv: list[str] | None = None) -> tuple[PresetArguments, ExitArguments, RuntimeArguments, dict]:
    """The flags, and the run's settings: the size's defaults under the flags given."""
    parser = build_parser(
        (PresetArguments, ExitArguments, RuntimeArguments, QuickstartArguments),
        description="Train, prune-finetune, evaluate and draw a small DToP on the built-in data set (offline).",
        exit_threshold=[str(PRUNING_THRESHOLD)],  # trained with and kept in the model
        tiny=tiny_from_environment(),
        per_device_eval_batch_size=None,  # twice the training batch
    )
    preset_args, exit_args, runtime_args, quickstart_args = parse_arguments(
        parser, argv, (), DEPRECATED, check_arguments
    )
    given = {**vars(quickstart_args), "model_size": preset_args.model_size}
    run = {**given, **run_size(quickstart_args.tiny, given)}
    run["per_device_eval_batch_size"] = (
        runtime_args.per_device_eval_batch_size or 2 * run["per_device_train_batch_size"]
    )
    run["exit_threshold"] = exit_args.model_kwargs()["exit_threshold"]
    return preset_args, exit_args, runtime_args, run


def train(
    stage: str,
    output_dir: Path,
    run: dict,
    runtime_args: RuntimeArguments,
    preset_args: PresetArguments,
    model_name_or_path: Path | None = None,
) -> None:
    """One training stage, the run finetune.py's `main` makes of the same flags: a short run from scratch, hence a
    higher learning rate than the official 2e-5 (which fine-tunes an ImageNet backbone for 40k steps); the same
    scenes, generated once and cached in `run["data_dir"]`, for both stages."""
    num_steps = run["base_steps" if stage == "base" else "prune_steps"]
    data_args = DataArguments(
        synthetic_image_size=run["image_size"], synthetic_validation_samples=run["validation_samples"],
        cache_dir=str(run["data_dir"]), do_reduce_labels=True,  # finetune.py's default: label 0 is unlabelled
    )  # fmt: skip
    optimization = OptimizationArguments(
        per_device_train_batch_size=run["per_device_train_batch_size"], learning_rate=run["learning_rate"],
        head_lr_multiplier=run["head_lr_multiplier"], max_train_steps=num_steps,
        num_warmup_steps=max(1, num_steps // 20),
    )  # fmt: skip
    run_training_stage(
        ModelArguments(None if model_name_or_path is None else str(model_name_or_path)),
        preset_args,
        ExitArguments(exit_threshold=None if stage == "base" else [run["exit_threshold"]]),
        data_args,
        replace(runtime_args, per_device_eval_batch_size=run["per_device_eval_batch_size"]),
        StageArguments(stage=stage),
        TrainingDataArguments(synthetic_train_samples=run["train_samples"]),
        optimization,
        OutputArguments(output_dir=str(output_dir)),
    )


def evaluate(
    model_dir: Path, run: dict, runtime_args: RuntimeArguments
) -> tuple[dict, str, torch.nn.Module, object, dict]:
    """The threshold sweep on the validation scenes and per-head thresholds, then capacities, calibrated on
    calibration scenes with the same budget, with the evaluation's files (its exit diagnostics included). Returns
    the summary, the report without its per-class and diagnostics tables, the model, its image processor and where
    exits land ([`~toolkit.quickstart.where_exits_land`])."""
    output_dir = Path(run["output_dir"])
    data_args = DataArguments(
        synthetic_image_size=run["image_size"],
        synthetic_validation_samples=run["validation_samples"],
        cache_dir=str(run["data_dir"]),
    )
    requests = [
        CalibrationRequest(
            method, max_miou_drop=run["max_miou_drop"], num_samples=run["validation_samples"],
            miou_drop_confidence=run["miou_drop_confidence"],
        )
        for method in ("thresholds", "capacity")
    ]  # fmt: skip
    with accelerator_session(**runtime_args.accelerator_kwargs()) as accelerator:
        model, image_processor = load_model_and_processor(str(model_dir), accelerator.device)
        summary, eval_dataset, id2label = evaluate_model_on_data(
            model, image_processor, accelerator, data_args, run["sweep_thresholds"], str(model_dir),
            calibration=requests, batch_size=run["per_device_eval_batch_size"],
        )  # fmt: skip
        calibrated_dirs = {method: output_dir / folder for method, folder in CALIBRATED_FOLDERS.items()}
        sections = write_evaluation_outputs(
            summary, model, image_processor, eval_dataset, id2label, output_dir / "evaluation", calibrated_dirs,
            num_pictures=2,
        )  # fmt: skip
        landing = where_exits_land(summary, model, image_processor, accelerator, data_args, run)
    # The full diagnostics and per-class tables are in evaluation/table.md; the summary shows where exits land.
    table = render_report(
        [section for section in sections if section.name not in ("per_class", *DIAGNOSTICS_SECTIONS)]
    )
    return summary, table, model, image_processor, landing


def picture_thresholds(summary: dict, run: dict) -> list[float | tuple[float, ...]]:
    """The model's own threshold, the calibrated ones and the sweep's lowest: a model trained for minutes is rarely
    sure enough of a real photo for many of its tokens to pass its own threshold."""
    thresholds = [run["exit_threshold"]]
    if calibrated(summary):
        thresholds.append(summary["calibration"]["chosen"]["exit_threshold"])
    return list(dict.fromkeys(thresholds + [min(run["sweep_thresholds"], key=lowest_first)]))


def lowest_first(threshold: float | tuple[float, ...]) -> float:
    return sum(threshold) / len(threshold) if isinstance(threshold, tuple) else threshold


def describe_capacities(summary: dict, config, image_processor) -> str:
    """The calibrated capacities' line: capacity mode's R is known before running, from the capacities and the input
    size alone ([`flops.capacity_flops_ratio`]); the measured R on the validation scenes is the same number."""
    calibration = summary[CALIBRATION_FIELDS["capacity"]]
    if "chosen" not in calibration:
        return calibration["error"]
    measured, capacities = calibration["on_evaluation_split"], calibration["chosen"]["exit_capacity"]
    image_size = (image_processor.size["height"], image_processor.size["width"])
    change = 100 * (measured["chosen"]["mean_iou"] - measured["baseline"]["mean_iou"])
    return (
        f"Calibrated capacities {format_threshold(capacities)} (capacity mode, the same budget): R = "
        f"{capacity_flops_ratio(config, image_size, capacities):.3f} from the capacities and the "
        f"{image_size[0]}x{image_size[1]} input alone (flops_from_capacities), "
        f"{speedup(measured['chosen'], measured['baseline']):.3f} measured on the validation scenes, at "
        f"{change:+.2f} mIoU; every image costs the same (static shapes: exports to ONNX, docs/deploy.md)."
    )


def main(argv: list[str] | None = None) -> dict:
    preset_args, exit_args, runtime_args, run = parse_args(argv)
    output_dir = Path(run["output_dir"])
    base_dir, model_dir, calibrated_dir = output_dir / "base", output_dir / "model", output_dir / "calibrated"
    capacity_dir = output_dir / CALIBRATED_FOLDERS["capacity"]
    run["data_dir"] = output_dir / "data"
    print(
        f"DToP quick start ({'tiny' if run['tiny'] else 'default'} size): {run['train_samples']} training / "
        f"{run['validation_samples']} validation scenes of {run['image_size']} px, {run['base_steps']} base + "
        f"{run['prune_steps']} pruning steps, batch {run['per_device_train_batch_size']}, "
        f"{torch.get_num_threads()} CPU threads -> {output_dir}",
        flush=True,
    )
    timings, start = {}, time.perf_counter()
    print(f"\n[1/4] Base model (no pruning) -> {base_dir}", flush=True)
    base_preset = PresetArguments(model_size=run["model_size"], config_overrides=preset_args.config_overrides)
    train("base", base_dir, run, runtime_args, base_preset)
    timings["base training"], start = time.perf_counter() - start, time.perf_counter()

    print(
        f"\n[2/4] Pruning fine-tune (exit threshold {format_threshold(run['exit_threshold'])}) -> {model_dir}",
        flush=True,
    )
    train("prune", model_dir, run, runtime_args, PresetArguments(), model_name_or_path=base_dir)
    timings["pruning fine-tune"], start = time.perf_counter() - start, time.perf_counter()

    print(
        f"\n[3/4] Threshold sweep on the validation scenes, per-head thresholds and capacities calibrated on "
        f"{run['validation_samples']} calibration scenes (at most {run['max_miou_drop']:g} mIoU points lost) -> "
        f"{output_dir / 'evaluation'}, {calibrated_dir}, {capacity_dir}",
        flush=True,
    )
    summary, table, model, image_processor, landing = evaluate(model_dir, run, runtime_args)
    capacities = describe_capacities(summary, model.config, image_processor)
    timings["evaluation and calibration"], start = time.perf_counter() - start, time.perf_counter()

    thresholds, pictures_dir = picture_thresholds(summary, run), output_dir / "pictures"
    shown = ", ".join(map(format_threshold, thresholds))
    print(f"\n[4/4] Exit maps (as examples/segment.py draws them) at thresholds {shown} -> {pictures_dir}", flush=True)
    images = sample_images(run["photo"], run["image_size"])
    print("\n".join(write_pictures_per_threshold(model, image_processor, images, thresholds, pictures_dir)))
    timings["pictures"] = time.perf_counter() - start
    print_summary(summary, table, run, timings, capacities, landing)
    return {
        "summary": summary,
        "timings": timings,
        "model_dir": model_dir,
        "calibrated_dir": calibrated_dir if calibrated(summary) else None,
        "calibrated_capacity_dir": capacity_dir if calibrated(summary, "capacity") else None,
        "pictures_dir": pictures_dir,
    }


def print_summary(summary: dict, table: str, run: dict, timings: dict, capacities: str, landing: dict) -> None:
    """The run's last lines: time, the sweep and calibration tables, the calibrated capacities (`capacities`: their
    line), where exits land ([`where_exits_land`]), what was written, what to run next."""
    output_dir = Path(run["output_dir"])
    model_dir, calibrated_dir, pictures_dir = output_dir / "model", output_dir / "calibrated", output_dir / "pictures"
    capacity_dir = output_dir / CALIBRATED_FOLDERS["capacity"]
    print("\n" + "=" * 100)
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"DToP quick start done in {sum(timings.values()):.0f} s ({times})")
    print(
        f"\nThreshold sweep of {model_dir} on {summary['num_images']} validation scenes (GFLOPs per image), one "
        "threshold for every head, beside the thresholds calibrated for each head (and capacity mode's):\n"
    )
    print(table)
    if calibrated(summary):
        print("\n" + compare_with_best_single(summary, run["max_miou_drop"], images="validation scenes"))
    else:
        print(f"\n{summary['calibration']['error']}")
    print(f"\n{capacities}")
    print(f"\n{format_exit_landing(landing)}")
    use = calibrated_dir if calibrated(summary) else model_dir
    threshold = format_threshold(run["exit_threshold"])
    print(
        "\nWritten:\n"
        + (
            f"  {calibrated_dir}   the pruned model with its calibrated thresholds: use this one\n"
            if calibrated(summary)
            else ""
        )
        + (
            f"  {capacity_dir}   the pruned model in capacity mode with its calibrated capacities (static shapes, "
            "for ONNX export)\n"
            if calibrated(summary, "capacity")
            else ""
        )
        + f"  {model_dir}   the pruned model (exit threshold {threshold}); base model in {output_dir / 'base'}\n"
        f"  {output_dir / 'evaluation'}   table.md, results.json, gflops_vs_miou.png, depth_profile.png, pictures/\n"
        f"  {pictures_dir}   <image>_t<threshold>_segmentation.png, _exit_map.png, _overlay.png\n"
        f"\nNext: python examples/segment.py your_photo.jpg --model_name_or_path {use}\n"
        f"      python examples/run_evaluation.py --model_name_or_path {model_dir} --synthetic_image_size "
        f"{run['image_size']} --max_miou_drop 0.5 --output_dir {output_dir / 'calibration'}"
    )


if __name__ == "__main__":
    main()
