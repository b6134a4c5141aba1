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
"""One training stage from its settings: the arguments of a stage (beside the shared ones of
[`~toolkit.arguments`]) and [`run_training_stage`], which data, model, loop, evaluation and saving make up.

`examples/finetune.py` parses these dataclasses from the command line; the quick start builds them in code. Both
run the same [`run_training_stage`], so a stage trained from either is the same run.
"""

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from accelerate import DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed

from ..arguments import (
    DataArguments,
    ExitArguments,
    ModelArguments,
    PresetArguments,
    RuntimeArguments,
    require_positive,
)
from ..data.datasets import BUILTIN_NAMES
from ..evaluation.loop import evaluate_model
from ..runtime import accelerator_session, configure_logging
from .config_overrides import parse_config_overrides
from .data import TrainAugmentation, build_training_dataloaders, load_training_splits
from .loop import CheckpointPolicy, TrainingSchedule, log_evaluation, train
from .models import load_model_for_stage
from .optimization import set_train_scope
from .outputs import describe_recipe, push_to_hub, save_finetuned_model, training_results
from .recipe import warn_unless_official_batch


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
        default=False, metadata={"help": "Print the settings as JSON (a paper preset's applied); train nothing."}
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


def stage_model(
    id2label: dict[int, str],
    model_args: ModelArguments,
    preset_args: PresetArguments,
    exit_args: ExitArguments,
    data_args: DataArguments,
    stage_args: StageArguments,
    data_extra: TrainingDataArguments,
) -> tuple:
    """The model the stage trains (its train scope set), its image processor and the training crop side."""
    exit_threshold, overrides = stage_settings(exit_args, preset_args.config_overrides)
    builtin_size = data_args.synthetic_image_size if data_args.dataset_name in BUILTIN_NAMES else None
    model, image_processor = load_model_for_stage(
        id2label, stage_args.stage, model_args.model_name_or_path, preset_args.model_size, preset_args.paper_preset,
        overrides, exit_threshold, data_extra.crop_size, builtin_size, data_args.do_reduce_labels,
    )  # fmt: skip
    crop_size = data_extra.crop_size or model.config.image_size
    set_train_scope(model, stage_args.train_scope)
    logger.info(
        f"stage {stage_args.stage}: exit thresholds {list(model.config.exit_thresholds_per_head()[:-1])}, train "
        f"scope {stage_args.train_scope}, {model.num_parameters() / 1e6:.2f}M parameters "
        f"({model.num_parameters(only_trainable=True) / 1e6:.2f}M trained), crop {crop_size}"
    )
    return model, image_processor, crop_size


def run_training_stage(
    model_args: ModelArguments,
    preset_args: PresetArguments,
    exit_args: ExitArguments,
    data_args: DataArguments,
    runtime_args: RuntimeArguments,
    stage_args: StageArguments,
    data_extra: TrainingDataArguments,
    optimization: OptimizationArguments,
    output: OutputArguments,
) -> dict:
    """Train one stage in an Accelerate session: data, model, training loop, final evaluation, then the model,
    processor, results and card in `output.output_dir` (and the upload with `output.push_to_hub`).

    The arguments are the dataclasses of `STAGE_ARGUMENT_CLASSES`, in that order (`finetune.py` parses them; the
    base stage takes no exit setting). Returns what `all_results.json` holds.
    """
    stage, train_scope = stage_args.stage, stage_args.train_scope
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
        model, image_processor, crop_size = stage_model(
            id2label, model_args, preset_args, exit_args, data_args, stage_args, data_extra
        )
        train_dataloader, eval_dataloader = build_training_dataloaders(
            splits, image_processor, len(id2label), crop_size, optimization.per_device_train_batch_size,
            runtime_args.per_device_eval_batch_size, runtime_args.seed, data_args.do_reduce_labels,
            data_extra.augmentation(), data_extra.sliding_window, runtime_args.dataloader_num_workers,
        )  # fmt: skip
        per_step = accelerator.num_processes * optimization.gradient_accumulation_steps
        warn_unless_official_batch(preset_args.paper_preset, per_step * optimization.per_device_train_batch_size)
        if output.with_tracking:
            settings = (model_args, preset_args, data_args, stage_args, data_extra, optimization, output)
            accelerator.init_trackers("dtop_finetune", tracker_config(*settings))

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


STAGE_ARGUMENT_CLASSES = (
    ModelArguments, PresetArguments, ExitArguments, DataArguments, RuntimeArguments, StageArguments,
    TrainingDataArguments, OptimizationArguments, OutputArguments,
)  # fmt: skip

__all__ = [
    "STAGE_ARGUMENT_CLASSES",
    "OptimizationArguments",
    "OutputArguments",
    "StageArguments",
    "TrainingDataArguments",
    "accelerator_kwargs",
    "run_training_stage",
    "stage_model",
    "stage_settings",
    "tracker_config",
]
