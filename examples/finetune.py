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
"""Train a DToP segmenter with Accelerate: the base model (`--stage base`, no pruning), then the pruning fine-tune
(`--stage prune`, auxiliary exit thresholds on, tokens exit in training too), as in the official two-phase recipe.

The data set is an argument: `builtin` (the synthetic scenes, the default), a local folder (the ADE20K, Pascal
Context 59 or COCO-Stuff-10K release folder, a Hub parquet snapshot, or images/ + annotations/; see
`dtop_hf/toolkit/data/layouts.py`), or a Hub data set such as `scene_parse_150`.

`--paper_preset` sets everything at once (explicit flags still override it): the architecture, drop path, exit
thresholds, the data set's crop, train scale, crop rule, pixel mean/std, test resize and slide windows, and the
phase's schedule (AdamW 2e-5, heads 10x, 1500 warm-up steps, poly 0.9, batch 4 per process, the official
iterations); see `dtop_hf.toolkit.presets.PAPER_PRESETS`. `--model_size` (`small`, the default, `tiny`, `quickstart`,
`vit-base`, ...) sets only the architecture of a fresh model. Without `--model_name_or_path` a fresh model is built,
changed with `--config_overrides`; a DToP folder or Hub id continues from those weights; a ViT checkpoint (e.g.
`google/vit-base-patch16-384`) initialises the backbone with new heads.

    accelerate launch examples/finetune.py --output_dir outputs/base --stage base
    accelerate launch examples/finetune.py --output_dir outputs/prune --stage prune \
        --model_name_or_path outputs/base --exit_threshold 0.9 --train_scope heads
    accelerate launch --num_processes 4 examples/finetune.py --paper_preset dtop-vit-base-ade20k --stage base \
        --dataset_name data/ADEChallengeData2016 --model_name_or_path dtop-vit-base-ade20k-init --output_dir base

Several CPU processes need both `--multi_gpu` (with `ACCELERATE_USE_CPU`) and `--device cpu`: Accelerate alone
would run one process.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --device cpu ...

Checkpoints (`--checkpointing_steps N`) go to `output_dir/step_N` with the full training state, written aside and
renamed when complete (a run killed while saving never leaves a half checkpoint that looks whole);
`--checkpoints_total_limit K` keeps the K newest; `--resume_from_checkpoint latest` continues exactly where the last
complete one left off. The final model, its image processor, `all_results.json`, `train_log.jsonl` (one line per
optimiser step) and a model card end up in `--output_dir`. Flags of earlier releases (`--preset`, `--cpu`,
`--no-sliding_window`) still work, with a warning.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from accelerate import DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed

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
    translate_deprecated_flags,
)
from dtop_hf.toolkit.data.datasets import BUILTIN_NAMES
from dtop_hf.toolkit.evaluation.loop import evaluate_model
from dtop_hf.toolkit.runtime import accelerator_session, configure_logging
from dtop_hf.toolkit.training import (
    CheckpointPolicy,
    TrainAugmentation,
    TrainingSchedule,
    build_training_dataloaders,
    describe_recipe,
    load_model_for_stage,
    load_training_splits,
    log_evaluation,
    preset_defaults,
    push_to_hub,
    save_finetuned_model,
    train,
    training_results,
    warn_unless_official_batch,
)
from dtop_hf.toolkit.training.config_overrides import parse_config_overrides
from dtop_hf.toolkit.training.optimization import set_train_scope


logger = logging.getLogger(__name__)


@dataclass
class StageArguments:
    """Which phase of the recipe runs, on which parameters."""

    stage: Literal["base", "prune"] = field(
        default="base", metadata={"help": "base: no pruning; prune: thresholds on."}
    )
    train_scope: Literal["all", "heads"] = field(
        default="all", metadata={"help": "heads: a frozen backbone (@Finetune); all: every parameter."}
    )


@dataclass
class TrainingDataArguments:
    """The training split and its augmentation, and how validation images are evaluated."""

    synthetic_train_samples: int = field(default=1000, metadata={"help": "Training images of the built-in set."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    crop_size: int | None = field(default=None, metadata={"help": "Training crop side; default: the model's size."})
    train_scale: list[int] | None = field(
        default=None,
        metadata={"help": "RandomResize base scale LONG SHORT (official ADE20K 2048 512); default: 4 x crop, crop."},
    )
    resize_ratio_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0], metadata={"help": "RandomResize ratio range MIN MAX (official 0.5 2.0)."}
    )
    cat_max_ratio: float = field(default=0.75, metadata={"help": "RandomCrop: redraw crops one class rules."})
    photometric_distortion: bool = field(
        default=True, metadata={"help": "mmseg's PhotoMetricDistortion in the training augmentation (official: on)."}
    )
    sliding_window: bool = field(
        default=False, metadata={"help": "Evaluate in the official slide test mode (on with a paper preset)."}
    )

    def __post_init__(self):
        for name in ("train_scale", "resize_ratio_range"):
            if getattr(self, name) is not None and len(getattr(self, name)) != 2:
                raise ValueError(f"`--{name}` takes two values, got {getattr(self, name)}.")
        require_positive(self, ("synthetic_train_samples", "max_train_samples", "crop_size"))

    def augmentation(self) -> TrainAugmentation:
        scale = tuple(self.train_scale) if self.train_scale else None
        return TrainAugmentation(
            scale, tuple(self.resize_ratio_range), self.cat_max_ratio, self.photometric_distortion
        )


@dataclass
class OptimizationArguments:
    """The optimiser, its schedule and the batch (`TrainingSchedule`'s fields, and how Accelerate runs the steps)."""

    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch per process."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate of the backbone."})
    head_lr_multiplier: float = field(default=10.0, metadata={"help": "Heads train at this multiple."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs, unless --max_train_steps is set."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimiser steps (wins over epochs)."})
    num_warmup_steps: int | None = field(default=None, metadata={"help": "Warm-up; default 1500/40000 of steps."})
    lr_decay_steps: int | None = field(default=None, metadata={"help": "Poly decay ends here; default: the end."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "For training (evaluation runs in float32); default: the launch config's."}
    )
    ddp_find_unused_parameters: bool = field(default=False, metadata={"help": "If DDP finds unused parameters."})

    def __post_init__(self):
        names = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lr_decay_steps")
        require_positive(self, names)

    def schedule(self) -> TrainingSchedule:
        return TrainingSchedule(**{item.name: getattr(self, item.name) for item in fields(TrainingSchedule)})


@dataclass
class OutputArguments:
    """What the run writes, and where."""

    output_dir: str = field(default="dtop-finetuned", metadata={"help": "Model, checkpoints and logs."})
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "Save the training state every N steps, or 'epoch', into output_dir/step_N."}
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep the N newest checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a step_N folder."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (always at the end)."})
    with_tracking: bool = field(default=False, metadata={"help": "Log through Accelerate's trackers."})
    report_to: str = field(default="tensorboard", metadata={"help": "Tracker(s) for --with_tracking."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository; default: the folder name."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the cached login)."})
    dry_run: bool = field(
        default=False, metadata={"help": "Print the settings as JSON (a paper preset's values applied); train nothing."}
    )

    def __post_init__(self):
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) >= 1):
            raise ValueError(f"`--checkpointing_steps` must be a positive integer or 'epoch', got {steps!r}.")
        require_positive(self, ("checkpoints_total_limit", "eval_steps"))

    def checkpoint_policy(self) -> CheckpointPolicy:
        steps = self.checkpointing_steps
        return CheckpointPolicy(
            int(steps) if steps and steps.isdigit() else steps,
            self.checkpoints_total_limit,
            self.resume_from_checkpoint,
        )


ARGUMENT_CLASSES = (
    ModelArguments, PresetArguments, ExitArguments, DataArguments, RuntimeArguments, StageArguments,
    TrainingDataArguments, OptimizationArguments, OutputArguments,
)  # fmt: skip
# The "off" spellings of the earlier `argparse.BooleanOptionalAction` flags (`--no_sliding_window` does not exist:
# its default is off, unless a paper preset turns it on).
DEPRECATED = {
    **DEPRECATED_FLAGS,
    "--no-sliding_window": "--sliding_window=false",
    "--no-photometric_distortion": "--photometric_distortion=false",
}


def parse_finetune_arguments(argv: list[str] | None = None) -> tuple:
    """The dataclasses of `ARGUMENT_CLASSES`, parsed; a paper preset changes the defaults of its stage, so that
    flags given explicitly still win."""
    parser = build_parser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0], do_reduce_labels=True)
    argv = translate_deprecated_flags(sys.argv[1:] if argv is None else argv, DEPRECATED)
    first_pass, _ = parser.parse_known_args(argv)
    if first_pass.paper_preset is not None:
        parser.set_defaults(**preset_defaults(first_pass.paper_preset, first_pass.stage))
    return parse_arguments(parser, argv, deprecated={}, check=check_stage)


def check_stage(*parsed) -> None:
    """The base stage trains without pruning: it takes no exit setting."""
    exit_args = next(item for item in parsed if isinstance(item, ExitArguments))
    stage_args = next(item for item in parsed if isinstance(item, StageArguments))
    exit_settings = exit_args.model_kwargs()  # one setting per flag, checked
    if stage_args.stage == "base" and exit_settings:
        flags = ", ".join(f"--{name}" for name in exit_settings)
        raise ValueError(f"{flags}: only for `--stage prune` (the base stage trains without pruning).")


def stage_settings(exit_args: ExitArguments, config_overrides: str | None) -> tuple:
    """The prune stage's threshold (None: the default) and the config changes: `--config_overrides`, and the exit
    mode and capacity."""
    exit_settings = exit_args.model_kwargs()
    exit_threshold = exit_settings.pop("exit_threshold", None)
    return exit_threshold, {**parse_config_overrides(config_overrides), **exit_settings}


def accelerator_kwargs(
    runtime_args: RuntimeArguments, optimization: OptimizationArguments, output: OutputArguments
) -> dict:
    """The run's `Accelerator`: device, mixed precision, accumulation, DDP, trackers, and a seeded sampler (the same
    shuffling on every process and after a resume: the order depends on (seed, epoch) only)."""
    tracking = {"log_with": output.report_to, "project_dir": output.output_dir} if output.with_tracking else {}
    return {
        **runtime_args.accelerator_kwargs(),
        "mixed_precision": optimization.mixed_precision,
        "gradient_accumulation_steps": optimization.gradient_accumulation_steps,
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=runtime_args.seed),
        "kwargs_handlers": [
            DistributedDataParallelKwargs(find_unused_parameters=optimization.ddp_find_unused_parameters)
        ],
        **tracking,
    }


def tracker_config(*arguments) -> dict[str, str]:
    """The run's settings for the trackers' experiment page (never the Hub token)."""
    settings = {key: value for item in arguments for key, value in asdict(item).items()}
    return {key: str(value) for key, value in settings.items() if key != "hub_token"}


def main(argv: list[str] | None = None) -> dict:
    """Train one stage; returns what `all_results.json` holds (the settings with `--dry_run`)."""
    parsed = parse_finetune_arguments(argv)
    model_args, preset_args, exit_args, data_args, runtime_args, stage_args, data_extra, optimization, output = parsed
    stage, train_scope = stage_args.stage, stage_args.train_scope
    exit_threshold, overrides = stage_settings(exit_args, preset_args.config_overrides)
    if output.dry_run:
        settings = {key: value for item in parsed for key, value in asdict(item).items() if key != "hub_token"}
        settings.update(exit_threshold=exit_threshold, config_overrides=overrides)
        print(json.dumps(settings, indent=1))
        return settings
    with accelerator_session(**accelerator_kwargs(runtime_args, optimization, output)) as accelerator:
        # 1. Logging, seed, output folder.
        configure_logging(accelerator)
        set_seed(runtime_args.seed, device_specific=True)
        if accelerator.is_main_process:
            Path(output.output_dir).mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()

        # 2. Data (the main process first: it downloads or generates and caches), model, processor, loaders.
        with accelerator.main_process_first():
            splits, id2label = load_training_splits(
                data_args.load_kwargs(), data_extra.synthetic_train_samples, data_args.synthetic_validation_samples,
                data_extra.max_train_samples, data_args.max_eval_samples, data_args.do_reduce_labels,
                check=not data_args.skip_data_check, show_progress=accelerator.is_local_main_process,
            )  # fmt: skip
        builtin_size = data_args.synthetic_image_size if data_args.dataset_name in BUILTIN_NAMES else None
        model, image_processor = load_model_for_stage(
            id2label, stage, model_args.model_name_or_path, preset_args.model_size, preset_args.paper_preset,
            overrides, exit_threshold, data_extra.crop_size, builtin_size, data_args.do_reduce_labels,
        )  # fmt: skip
        crop_size = data_extra.crop_size or model.config.image_size
        set_train_scope(model, train_scope)
        logger.info(
            f"stage {stage}: exit thresholds {list(model.config.exit_thresholds_per_head()[:-1])}, train scope "
            f"{train_scope}, {model.num_parameters() / 1e6:.2f}M parameters "
            f"({model.num_parameters(only_trainable=True) / 1e6:.2f}M trained), crop {crop_size}"
        )
        train_dataloader, eval_dataloader = build_training_dataloaders(
            splits, image_processor, len(id2label), crop_size, optimization.per_device_train_batch_size,
            runtime_args.per_device_eval_batch_size, runtime_args.seed, data_args.do_reduce_labels,
            data_extra.augmentation(), data_extra.sliding_window, runtime_args.dataloader_num_workers,
        )  # fmt: skip
        per_step = accelerator.num_processes * optimization.gradient_accumulation_steps
        warn_unless_official_batch(preset_args.paper_preset, per_step * optimization.per_device_train_batch_size)
        if output.with_tracking:
            accelerator.init_trackers("dtop_finetune", tracker_config(model_args, preset_args, data_args, stage_args,
                                                                      data_extra, optimization, output))  # fmt: skip

        # 3. Training, then the final evaluation.
        schedule, checkpoints = optimization.schedule(), output.checkpoint_policy()
        outcome = train(
            accelerator, model, train_dataloader, eval_dataloader, output.output_dir, schedule, checkpoints,
            output.eval_steps, image_processor, data_extra.sliding_window, output.with_tracking,
        )  # fmt: skip
        evaluation = evaluate_model(
            outcome.model, outcome.eval_dataloader, accelerator, sliding_window=data_extra.sliding_window,
            image_processor=image_processor,
        )  # fmt: skip
        log_evaluation(accelerator, evaluation, outcome.completed_steps, output.with_tracking)

        # 4. Model, processor, results and card; the upload when asked.
        config = accelerator.unwrap_model(outcome.model).config
        results = training_results(
            evaluation, outcome, config, accelerator.num_processes, stage=stage, train_scope=train_scope,
            crop_size=crop_size, sliding_window=data_extra.sliding_window,
        )  # fmt: skip
        recipe = describe_recipe(
            f"examples/finetune.py --stage {stage} --train_scope {train_scope}", results, schedule
        )
        save_finetuned_model(
            accelerator, outcome.model, image_processor, output.output_dir, results, data_args.dataset_name, recipe,
            output.hub_model_id,
        )  # fmt: skip
        if output.push_to_hub and accelerator.is_main_process:
            push_to_hub(output.output_dir, output.hub_model_id, output.hub_token)
    return results


if __name__ == "__main__":
    main()
