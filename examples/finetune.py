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
"""Train a DToP segmenter with Accelerate: the base model (`--stage base`, no pruning), then the pruning
fine-tune (`--stage prune`, auxiliary exit thresholds on), as in the official recipe (SPEC §4).

The data set is an argument: nothing (the built-in synthetic scenes), a local folder of images and label PNGs,
or a Hub data set such as `scene_parse_150` (see `dtop_hf/data.py` for the layouts). Without
`--model_name_or_path` a fresh model is built from a small preset (`dtop_hf.toolkit.training.recipe.SMALL_PRESET`), changed with
`--config_overrides`; a DToP folder or Hub id continues from those weights; a ViT checkpoint (e.g.
`google/vit-base-patch16-224`) initialises the backbone with new heads.

Launch (one process, or several through Accelerate):

    accelerate launch examples/finetune.py --output_dir outputs/base --stage base
    accelerate launch examples/finetune.py --output_dir outputs/prune --stage prune \
        --model_name_or_path outputs/base --exit_threshold 0.9 --train_scope heads
    accelerate launch examples/finetune.py --dataset_name scene_parse_150 --model_name_or_path <folder|hub id> \
        --crop_size 512 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --max_train_steps 40000

Two processes on CPU (`--cpu` alone makes Accelerate run one process: hf-notes §7.3):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --cpu ...

Checkpoints (`--checkpointing_steps N`) go to `output_dir/step_N` with the full training state;
`--resume_from_checkpoint latest` continues exactly where the last one left off. The final model, its image
processor, `all_results.json`, `train_log.jsonl` (one line per optimiser step) and a model card end up in
`--output_dir`.
"""

import argparse
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.data.datasets import (
    BUILTIN_NAMES,
    SegmentationDataset,
    SegmentationTrainTransform,
    add_dataset_arguments,
    build_eval_dataset,
    check_segmentation_split,
    collate_segmentation_batch,
    load_dataset_from_arguments,
)
from dtop_hf.toolkit.evaluation.loop import evaluate_model
from dtop_hf.toolkit.training.recipe import (
    build_optimizer,
    build_poly_scheduler,
    build_preset_config,
    check_config_fields,
    checkpoint_step,
    find_latest_checkpoint,
    num_update_steps,
    parse_config_overrides,
    set_train_scope,
)


logger = get_logger(__name__)

# Official ViT-B threshold (SPEC §3), used by `--stage prune` when neither the flag nor the config sets one.
DEFAULT_PRUNE_THRESHOLD = 0.9
# Official warm-up: 1500 of 40k iterations (SPEC §4).
WARMUP_FRACTION = 1500 / 40000


def parse_exit_threshold(text: str) -> float | tuple[float, ...]:
    """`"0.9"` -> 0.9, `"0.9,0.95"` -> one value per auxiliary head."""
    values = tuple(float(value) for value in text.split(","))
    return values[0] if len(values) == 1 else values


def parse_checkpointing_steps(text: str) -> int | str:
    if text == "epoch":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"`--checkpointing_steps` must be a positive integer or 'epoch', got {text!r}."
        )
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a DToP segmenter (base or pruning fine-tune) with Accelerate.")
    data = parser.add_argument_group("data")
    add_dataset_arguments(data)
    data.add_argument(
        "--synthetic_train_samples", type=int, default=1000, help="Training images of the built-in data set."
    )
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training samples.")
    data.add_argument(
        "--crop_size",
        type=int,
        default=None,
        help="Training crop side (official 512); default: the model's image_size.",
    )
    data.add_argument(
        "--resize_ratio_range",
        type=float,
        nargs=2,
        default=(0.5, 2.0),
        metavar=("MIN", "MAX"),
        help="Random resize ratio range of the training augmentation (official 0.5 2.0).",
    )
    data.add_argument(
        "--photometric_distortion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Brightness / contrast / saturation / hue jitter of the training augmentation (official: on).",
    )
    data.add_argument(
        "--sliding_window",
        action="store_true",
        help="Evaluate in the official test mode (shorter side = crop, sliding windows).",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        type=str,
        default=None,
        help="DToP or ViT checkpoint (folder or Hub id); none = fresh preset.",
    )
    model.add_argument(
        "--config_overrides",
        type=str,
        default=None,
        help='DToPConfig fields, e.g. "hidden_size=64,out_indices=[1,2,3]".',
    )
    model.add_argument(
        "--stage",
        type=str,
        default="base",
        choices=["base", "prune"],
        help="base: no pruning; prune: auxiliary exit thresholds on.",
    )
    model.add_argument(
        "--exit_threshold",
        type=parse_exit_threshold,
        default=None,
        help="Prune stage: '0.9' or one per auxiliary head '0.9,0.95'; default: the config's, else 0.9.",
    )
    model.add_argument(
        "--train_scope",
        type=str,
        default="all",
        choices=["all", "heads"],
        help="all (official code) or heads only (the paper's @Finetune).",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--per_device_train_batch_size", type=int, default=8, help="Training batch size per process."
    )
    training.add_argument(
        "--per_device_eval_batch_size", type=int, default=8, help="Evaluation batch size per process."
    )
    training.add_argument("--learning_rate", type=float, default=2e-5, help="AdamW learning rate of the backbone.")
    training.add_argument(
        "--head_lr_multiplier", type=float, default=10.0, help="Heads train at this multiple of the learning rate."
    )
    training.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    training.add_argument("--num_train_epochs", type=int, default=3, help="Epochs, unless --max_train_steps is set.")
    training.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimiser steps; overrides --num_train_epochs."
    )
    training.add_argument(
        "--num_warmup_steps",
        type=int,
        default=None,
        help="Linear warm-up steps; default: the official 1500/40000 of the steps.",
    )
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimiser step.")
    training.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Passed to Accelerate, for training (evaluation runs in float32); default: its launch config.",
    )
    training.add_argument("--seed", type=int, default=42, help="Seed of weights, data order and augmentation.")
    training.add_argument(
        "--cpu", action="store_true", help="Run on CPU (needed for several CPU processes, see the module docstring)."
    )
    training.add_argument(
        "--ddp_find_unused_parameters",
        action="store_true",
        help="Fallback if DDP reports parameters without gradient.",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir", type=str, default="dtop-finetuned", help="Where the model, checkpoints and logs go."
    )
    output.add_argument(
        "--checkpointing_steps",
        type=parse_checkpointing_steps,
        default=None,
        help="Save the training state every N steps, or 'epoch', into output_dir/step_N.",
    )
    output.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="'latest' (in --output_dir) or a step_N folder."
    )
    output.add_argument("--eval_steps", type=int, default=None, help="Evaluate every N steps (always at the end).")
    output.add_argument("--with_tracking", action="store_true", help="Log through Accelerate's trackers.")
    output.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help="Tracker(s) for --with_tracking ('all', 'tensorboard', ...).",
    )
    output.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub.")
    output.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository; default: the output folder name."
    )
    output.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")
    args = parser.parse_args(argv)

    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"`--max_train_steps` must be >= 1, got {args.max_train_steps}.")
    if args.stage == "base" and args.exit_threshold is not None:
        raise ValueError("`--exit_threshold` only applies to `--stage prune` (the base stage trains without pruning).")
    return args


def stage_exit_threshold(
    stage: str, exit_threshold: float | tuple[float, ...] | None, config: DToPConfig
) -> float | tuple[float, ...]:
    """base: 1.0 (no pruning, SPEC §4 phase 1). prune: `--exit_threshold`, else the config's if it prunes, else 0.9."""
    if stage == "base":
        return 1.0
    if exit_threshold is not None:
        return exit_threshold
    if any(value < 1.0 for value in config.exit_thresholds_per_head()[:-1]):
        return config.exit_threshold
    return DEFAULT_PRUNE_THRESHOLD


def load_model(
    args: argparse.Namespace, id2label: dict[int, str]
) -> tuple[DToPForSemanticSegmentation, DToPImageProcessor]:
    """The model (fresh preset, DToP checkpoint or ViT checkpoint) with the stage's exit threshold, and its processor.

    A fresh preset model stores position embeddings for `--crop_size`, else for the built-in images' size.
    """
    overrides = parse_config_overrides(args.config_overrides)
    check_config_fields(overrides)
    label_fields = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    if args.model_name_or_path is None:
        image_size = args.crop_size or (args.synthetic_image_size if args.dataset_name in BUILTIN_NAMES else None)
        config = build_preset_config(overrides, id2label, **({"image_size": image_size} if image_size else {}))
        config.exit_threshold = stage_exit_threshold(args.stage, args.exit_threshold, config)
        model = DToPForSemanticSegmentation(config)
    elif AutoConfig.from_pretrained(args.model_name_or_path).model_type == "vit":
        from dtop_hf.vit_weights import from_vit_pretrained

        model = from_vit_pretrained(DToPForSemanticSegmentation, args.model_name_or_path, **label_fields, **overrides)
        model.config.exit_threshold = stage_exit_threshold(args.stage, args.exit_threshold, model.config)
    else:
        config = DToPConfig.from_pretrained(args.model_name_or_path, **overrides)
        relabel = {int(key): value for key, value in config.id2label.items()} != id2label
        if relabel:
            logger.warning(
                f"The checkpoint has {config.num_labels} classes, the data {len(id2label)}: the class-specific head "
                "weights are re-initialised."
            )
            config.id2label, config.label2id = label_fields["id2label"], label_fields["label2id"]
        config.exit_threshold = stage_exit_threshold(args.stage, args.exit_threshold, config)
        model = DToPForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, config=config, ignore_mismatched_sizes=relabel
        )
    crop_size = args.crop_size or model.config.image_size
    processor_kwargs = {
        "size": {"height": crop_size, "width": crop_size},
        "crop_size": {"height": crop_size, "width": crop_size},
        "stride": {"height": 2 * crop_size // 3, "width": 2 * crop_size // 3},  # 341 for 512 (SPEC §4)
        "do_reduce_labels": args.do_reduce_labels,
    }
    image_processor = None
    if args.model_name_or_path is not None:
        try:  # the checkpoint's own normalisation, when it has a preprocessor_config.json
            image_processor = DToPImageProcessor.from_pretrained(args.model_name_or_path, **processor_kwargs)
        except OSError:
            logger.info(f"{args.model_name_or_path} has no image processor: using DToP's defaults")
    if image_processor is None:
        image_processor = DToPImageProcessor(**processor_kwargs)
    return model, image_processor


def load_checked_splits(args: argparse.Namespace, accelerator: Accelerator):
    """Train / validation splits (limited to --max_*_samples, checked unless --skip_data_check) and id2label."""
    num_train, num_validation = args.synthetic_train_samples, args.synthetic_validation_samples
    if args.max_train_samples is not None:
        num_train = min(num_train, args.max_train_samples)  # no need to generate what is not used
    if args.max_eval_samples is not None:
        num_validation = min(num_validation, args.max_eval_samples)
    dataset, id2label = load_dataset_from_arguments(args, num_train, num_validation)
    splits = {}
    for split_name, max_samples in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        split = dataset[split_name]
        if max_samples is not None:
            split = split.select(range(min(max_samples, len(split))))
        if not args.skip_data_check:
            split, report = check_segmentation_split(
                split,
                split_name,
                len(id2label),
                args.do_reduce_labels,
                show_progress=accelerator.is_local_main_process,
            )
            logger.info(f"Checked {report.num_checked} {split_name} samples, skipped {report.num_skipped}.")
        splits[split_name] = split
    return splits, id2label


def build_dataloaders(
    args: argparse.Namespace, splits: dict, image_processor: DToPImageProcessor, num_labels: int, crop_size: int
) -> tuple[DataLoader, DataLoader]:
    """Training batches (official augmentation, crops of `crop_size`) and evaluation batches (labels at full size).

    Both loaders get their own generator so that creating them never draws from the global torch generator: a
    resumed run then sees the same dropout draws as an uninterrupted one.
    """
    ignore_index = 255
    train_dataset = SegmentationDataset(
        splits["train"],
        SegmentationTrainTransform(
            image_processor,
            crop_size,
            ratio_range=tuple(args.resize_ratio_range),
            photometric_distortion=args.photometric_distortion,
            ignore_index=ignore_index,
        ),
        num_labels,
        args.do_reduce_labels,
        split_name="train",
        seed=args.seed,
    )
    # The processor's crop size is `crop_size` and its `do_reduce_labels` is `--do_reduce_labels` (`load_model`).
    eval_dataset = build_eval_dataset(splits["validation"], image_processor, num_labels, args.sliding_window)
    collate = partial(collate_segmentation_batch, ignore_index=ignore_index)
    common = {"collate_fn": collate, "num_workers": args.dataloader_num_workers}
    train_dataloader = DataLoader(
        train_dataset,
        shuffle=True,
        batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
        **common,
    )
    eval_dataloader = DataLoader(
        eval_dataset,
        batch_size=args.per_device_eval_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
        **common,
    )
    return train_dataloader, eval_dataloader


def resume_point(args: argparse.Namespace) -> Path | None:
    """The checkpoint to resume from: `--resume_from_checkpoint latest` (None when there is none yet) or a path."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        return find_latest_checkpoint(args.output_dir)
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint` {str(path)!r} is not a folder: pass 'latest' or a step_N folder."
        )
    return path


def rewrite_train_log(log_path: Path, keep_until_step: int) -> None:
    """Keep the log lines of steps <= `keep_until_step` (those after the checkpoint are redone by the resumed run)."""
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= keep_until_step]
    log_path.write_text("".join(line + "\n" for line in kept))


def log_evaluation(accelerator: Accelerator, results: dict, step: int, with_tracking: bool, tag: str = "eval") -> None:
    shares = ", ".join(f"{100 * share:.1f}%" for share in results["exit_share"])
    logger.info(
        f"step {step}: mIoU {100 * results['mean_iou']:.2f}, GFLOPs/img {results['gflops']:.3f} (backbone + final "
        f"head {results['gflops_backbone_and_final_head']:.3f}), tokens finalised per head [{shares}]"
    )
    if with_tracking:
        values = {
            f"{tag}/{name}": results[name]
            for name in ("mean_iou", "mean_accuracy", "gflops", "gflops_backbone_and_final_head")
        }
        values.update({f"{tag}/exit_share_stage_{index}": share for index, share in enumerate(results["exit_share"])})
        accelerator.log(values, step=step)


def json_safe(value):
    """NaN (the IoU of a class absent from labels and predictions) -> None, so the file is standard JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def save_final_model(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    results: dict,
) -> None:
    """`save_pretrained` (model + code + processor), `all_results.json` and the model card; push when asked."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if not accelerator.is_main_process:
        return
    image_processor.save_pretrained(args.output_dir)
    with open(Path(args.output_dir) / "all_results.json", "w") as file:
        json.dump(json_safe(results), file, indent=2)
    write_card(args, unwrapped.config, results)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=args.hub_token)
        repo_id = api.create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=["step_*", "epoch_*"],
        )


def write_card(args: argparse.Namespace, config: DToPConfig, results: dict) -> None:
    """README.md model card through `dtop_hf.toolkit.model_card` (skipped with a warning when its template is missing)."""
    from dtop_hf.toolkit.model_card import write_model_card

    builtin = args.dataset_name in BUILTIN_NAMES
    recipe = (
        f"`examples/finetune.py --stage {args.stage} --train_scope {args.train_scope}`: "
        f"{results['train_steps']} steps, "
        f"batch {results['total_batch_size']}, AdamW lr {args.learning_rate} (heads x{args.head_lr_multiplier}), "
        f"weight decay {args.weight_decay}, crop {results['crop_size']}, exit threshold {results['exit_threshold']}."
    )
    try:
        write_model_card(
            args.output_dir,
            config,
            repo_id=args.hub_model_id,
            datasets=[] if builtin or Path(args.dataset_name).is_dir() else [args.dataset_name],
            dataset_name="the built-in synthetic scenes" if builtin else args.dataset_name,
            training_recipe=recipe,
            mean_iou=results["eval_mean_iou"],
            gflops=results["eval_gflops_backbone_and_final_head"],
        )
    except FileNotFoundError as error:
        logger.warning(f"No model card written: {error}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    # 1. Accelerator, logging, seed, output folder.
    tracker_kwargs = {"log_with": args.report_to, "project_dir": args.output_dir} if args.with_tracking else {}
    ddp_kwargs = (
        [DistributedDataParallelKwargs(find_unused_parameters=True)] if args.ddp_find_unused_parameters else []
    )
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Same shuffling on every process and after a resume: the order depends on (seed, epoch) only.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=ddp_kwargs,
        **tracker_kwargs,
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    logger.info(
        f"process {accelerator.process_index} of world size {accelerator.num_processes} "
        f"({accelerator.distributed_type}, device {accelerator.device})",
        main_process_only=False,
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # 2. Data (the main process first: it downloads or generates and caches), model, processor.
    with accelerator.main_process_first():
        splits, id2label = load_checked_splits(args, accelerator)
    model, image_processor = load_model(args, id2label)
    crop_size = args.crop_size or model.config.image_size
    set_train_scope(model, args.train_scope)
    train_dataloader, eval_dataloader = build_dataloaders(args, splits, image_processor, len(id2label), crop_size)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    num_trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    logger.info(
        f"stage {args.stage}: exit thresholds {list(model.config.exit_thresholds_per_head()[:-1])}, train scope "
        f"{args.train_scope}, {num_parameters / 1e6:.2f}M parameters ({num_trainable / 1e6:.2f}M trained)"
    )

    # 3. Optimiser and schedule. Accelerate steps a prepared scheduler once per process per optimiser step, hence
    # the step counts scaled by the number of processes (as in transformers' no_trainer examples).
    optimizer = build_optimizer(model, args.learning_rate, args.head_lr_multiplier, args.weight_decay)
    steps_per_epoch = num_update_steps(
        math.ceil(len(train_dataloader) / accelerator.num_processes), args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_warmup_steps = (
        args.num_warmup_steps if args.num_warmup_steps is not None else round(WARMUP_FRACTION * max_train_steps)
    )
    scheduler = build_poly_scheduler(
        optimizer, num_warmup_steps * accelerator.num_processes, max_train_steps * accelerator.num_processes
    )

    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    steps_per_epoch = num_update_steps(len(train_dataloader), args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(splits['train'])} training / {len(splits['validation'])} validation images, crop {crop_size}; "
        f"batch {args.per_device_train_batch_size} per process x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation = {total_batch_size}; {max_train_steps} steps "
        f"({steps_per_epoch} per epoch, {num_epochs} epochs), {num_warmup_steps} warm-up"
    )
    if args.with_tracking:
        experiment_config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()
        }
        accelerator.init_trackers("dtop_finetune", experiment_config)

    # 4. Resume: state (model, optimiser, scheduler, RNG, sampler) and position in the data.
    completed_steps, starting_epoch, batches_to_skip = 0, 0, 0
    log_path = Path(args.output_dir) / "train_log.jsonl"
    checkpoint = resume_point(args)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        completed_steps = checkpoint_step(checkpoint)
        starting_epoch = completed_steps // steps_per_epoch
        batches_to_skip = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
        logger.info(
            f"Resumed from {checkpoint}: step {completed_steps}, epoch {starting_epoch}, "
            f"skipping {batches_to_skip} batches"
        )
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir} yet: starting from scratch")
    if accelerator.is_main_process:
        rewrite_train_log(log_path, completed_steps)

    # 5. Training loop.
    progress_bar = tqdm(total=max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    start_time, images_seen = time.perf_counter(), 0
    step_losses = []
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        skip = batches_to_skip if epoch == starting_epoch else 0
        active_dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                learning_rate = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step_losses.append(outputs.loss.detach())
            images_seen += len(batch["pixel_values"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
            step_losses = []
            throughput = images_seen / (time.perf_counter() - start_time)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", img_s=f"{throughput:.1f}")
            if accelerator.is_main_process:
                with open(log_path, "a") as file:
                    file.write(
                        json.dumps({"step": completed_steps, "epoch": epoch, "loss": loss, "lr": learning_rate}) + "\n"
                    )
            if args.with_tracking:
                accelerator.log(
                    {"train/loss": loss, "train/lr": learning_rate, "train/images_per_second": throughput},
                    step=completed_steps,
                )
            if isinstance(args.checkpointing_steps, int) and completed_steps % args.checkpointing_steps == 0:
                accelerator.save_state(str(Path(args.output_dir) / f"step_{completed_steps}"))
            if args.eval_steps and completed_steps % args.eval_steps == 0 and completed_steps < max_train_steps:
                log_evaluation(
                    accelerator,
                    evaluate_model(
                        model,
                        eval_dataloader,
                        accelerator,
                        sliding_window=args.sliding_window,
                        image_processor=image_processor,
                    ),
                    completed_steps,
                    args.with_tracking,
                )
            if completed_steps >= max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            accelerator.save_state(str(Path(args.output_dir) / f"step_{completed_steps}"))
        if completed_steps >= max_train_steps:
            break
    progress_bar.close()
    train_runtime = time.perf_counter() - start_time

    # 6. Final evaluation, model, results.
    results = evaluate_model(
        model, eval_dataloader, accelerator, sliding_window=args.sliding_window, image_processor=image_processor
    )
    log_evaluation(accelerator, results, completed_steps, args.with_tracking)
    config = accelerator.unwrap_model(model).config
    all_results = {f"eval_{name}": value for name, value in results.items()}
    all_results.update(
        stage=args.stage,
        train_scope=args.train_scope,
        exit_threshold=list(config.exit_thresholds_per_head()[:-1]),
        train_steps=completed_steps,
        train_runtime_s=train_runtime,
        total_batch_size=total_batch_size,
        crop_size=crop_size,
        num_processes=accelerator.num_processes,
    )
    save_final_model(args, accelerator, model, image_processor, all_results)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
