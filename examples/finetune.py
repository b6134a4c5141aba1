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
fine-tune (`--stage prune`, auxiliary exit thresholds on, tokens exit in training too), as in the official recipe
(SPEC §4).

The data set is an argument: nothing (the built-in synthetic scenes), a local folder (the ADE20K, Pascal Context 59
or COCO-Stuff-10K release folder, a Hub parquet snapshot, or images/ + annotations/; see
`dtop_hf/toolkit/data/layouts.py`), or a Hub data set such as `scene_parse_150`.

`--preset` sets everything at once; explicit flags still override it:
- a paper configuration (`dtop-vit-base-ade20k`, `dtop-vit-large-ade20k`, `dtop-vit-large-pascal-context`,
  `dtop-vit-large-coco-stuff-10k`; `dtop_hf.toolkit.presets.PAPER_PRESETS`): architecture, drop path, exit thresholds,
  the data set's crop, train scale, crop rule, pixel mean/std, test resize and slide windows, and the phase's schedule
  (AdamW 2e-5, heads 10x, 1500 warm-up steps, poly 0.9, batch 4 per process, the official iterations);
- a model size (`small`, the default for fresh models, `tiny`, `quickstart`, `vit-base`, ...;
  `dtop_hf.toolkit.presets.MODEL_SIZES`): the architecture of a fresh model only.
Without `--model_name_or_path` a fresh model is built from the preset, changed with `--config_overrides`; a DToP
folder or Hub id continues from those weights; a ViT checkpoint (e.g. `google/vit-base-patch16-384`) initialises
the backbone with new heads.

Launch (one process, or several through Accelerate):

    accelerate launch examples/finetune.py --output_dir outputs/base --stage base
    accelerate launch examples/finetune.py --output_dir outputs/prune --stage prune \
        --model_name_or_path outputs/base --exit_threshold 0.9 --train_scope heads
    accelerate launch --num_processes 4 examples/finetune.py --preset dtop-vit-base-ade20k --stage base \
        --dataset_name data/ADEChallengeData2016 --model_name_or_path dtop-vit-base-ade20k-init --output_dir base

Two processes on CPU (`--cpu` alone makes Accelerate run one process: hf-notes §7.3):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --cpu ...

Checkpoints (`--checkpointing_steps N`) go to `output_dir/step_N` with the full training state, written aside and
renamed when complete (a run killed while saving never leaves a half checkpoint that looks whole);
`--checkpoints_total_limit K` keeps the K newest; `--resume_from_checkpoint latest` continues exactly where the last
complete one left off. The final model, its image processor, `all_results.json`, `train_log.jsonl` (one line per
optimiser step) and a model card end up in `--output_dir`.
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
from arguments import (
    add_cpu_argument,
    add_dataset_arguments,
    load_dataset_from_arguments,
    parse_exit_threshold,
    require_positive,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.presets import MODEL_SIZES, PAPER_PRESETS, VIT_BASE_PATCH16, DToPPaperPreset
from dtop_hf.toolkit.data.datasets import (
    BUILTIN_NAMES,
    SegmentationDataset,
    build_eval_dataset,
    check_segmentation_split,
    collate_segmentation_batch,
)
from dtop_hf.toolkit.data.label_maps import DATASET_LABELS
from dtop_hf.toolkit.data.transforms import SegmentationTrainTransform
from dtop_hf.toolkit.evaluation.calibration import json_ready
from dtop_hf.toolkit.evaluation.loop import evaluate_model
from dtop_hf.toolkit.inference.loading import check_model_folder, load_dtop_config
from dtop_hf.toolkit.inference.loading import load_image_processor as load_saved_image_processor
from dtop_hf.toolkit.training.checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    find_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dtop_hf.toolkit.training.config_overrides import build_preset_config, check_config_fields, parse_config_overrides
from dtop_hf.toolkit.training.optimization import (
    build_optimizer,
    build_poly_scheduler,
    num_update_steps,
    set_train_scope,
)
from dtop_hf.toolkit.vit_weights import SUPPORTED_MODEL_TYPES, from_vit_pretrained


logger = get_logger(__name__)

# Official ViT-B threshold (SPEC §3), for `--stage prune` when neither the flag, the preset nor the config sets one.
DEFAULT_PRUNE_THRESHOLD = 0.9
# Official warm-up: 1500 of 40k iterations (SPEC §4), for runs without a preset.
WARMUP_FRACTION = 1500 / 40000
PRESET_NAMES = sorted(PAPER_PRESETS) + sorted(MODEL_SIZES)


def parse_checkpointing_steps(text: str) -> int | str:
    if text == "epoch":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"`--checkpointing_steps` must be a positive integer or 'epoch', got {text!r}."
        )
    return int(text)


def preset_defaults(name: str, stage: str) -> dict:
    """Flag defaults a paper configuration sets for `stage` (a model size sets no flag: it is read in `load_model`)."""
    if name not in PAPER_PRESETS:
        return {}
    preset = PAPER_PRESETS[name]
    dataset, schedule = preset.dataset, preset.base_schedule if stage == "base" else preset.prune_schedule
    return {
        "crop_size": dataset.crop_size,
        "train_scale": dataset.scale,
        "resize_ratio_range": dataset.ratio_range,
        "cat_max_ratio": dataset.cat_max_ratio,
        "do_reduce_labels": dataset.do_reduce_labels,
        "sliding_window": True,
        "learning_rate": schedule.learning_rate,
        "head_lr_multiplier": schedule.head_lr_multiplier,
        "weight_decay": schedule.weight_decay,
        "num_warmup_steps": schedule.warmup_steps,
        "max_train_steps": schedule.max_steps,
        "lr_decay_steps": schedule.decay_steps,
        "per_device_train_batch_size": schedule.per_device_batch_size,
        "per_device_eval_batch_size": 1,  # the official `val_dataloader` batch
        "exit_threshold": preset.exit_threshold if stage == "prune" else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a DToP segmenter (base or pruning fine-tune) with Accelerate.")
    data = parser.add_argument_group("data")
    add_dataset_arguments(data)
    data.add_argument("--synthetic_train_samples", type=int, default=1000, help="Training images of the built-in set.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training samples.")
    data.add_argument("--crop_size", type=int, default=None, help="Training crop side; default: the model's size.")
    data.add_argument(
        "--train_scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
        help="RandomResize base scale (official ADE20K 2048 512); default: 4 x crop, crop.",
    )  # fmt: skip
    data.add_argument(
        "--resize_ratio_range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
        help="RandomResize ratio range (official 0.5 2.0).",
    )  # fmt: skip
    data.add_argument("--cat_max_ratio", type=float, default=0.75, help="RandomCrop: redraw crops one class rules.")
    data.add_argument(
        "--photometric_distortion", action=argparse.BooleanOptionalAction, default=True,
        help="mmseg's PhotoMetricDistortion in the training augmentation (official: on).",
    )  # fmt: skip
    data.add_argument(
        "--sliding_window", action=argparse.BooleanOptionalAction, default=False,
        help="Evaluate in the official slide test mode (on with a paper preset).",
    )  # fmt: skip

    model = parser.add_argument_group("model")
    model.add_argument("--preset", type=str, default=None, choices=PRESET_NAMES, help="Paper config or model size.")
    model.add_argument("--model_name_or_path", type=str, default=None, help="DToP or ViT checkpoint; none = fresh.")
    model.add_argument("--config_overrides", type=str, default=None, help='DToPConfig fields, "hidden_size=64,..."')
    model.add_argument("--stage", type=str, default="base", choices=["base", "prune"], help="base: no pruning.")
    model.add_argument(
        "--exit_threshold", type=parse_exit_threshold, default=None,
        help="Prune stage: '0.9' or one per auxiliary head '0.9,0.95'; default: the preset's, the config's, 0.9.",
    )  # fmt: skip
    model.add_argument("--train_scope", type=str, default="all", choices=["all", "heads"], help="heads = @Finetune.")

    training = parser.add_argument_group("training")
    training.add_argument("--per_device_train_batch_size", type=int, default=8, help="Training batch per process.")
    training.add_argument("--per_device_eval_batch_size", type=int, default=8, help="Evaluation batch per process.")
    training.add_argument("--learning_rate", type=float, default=2e-5, help="AdamW learning rate of the backbone.")
    training.add_argument("--head_lr_multiplier", type=float, default=10.0, help="Heads train at this multiple.")
    training.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    training.add_argument("--num_train_epochs", type=int, default=3, help="Epochs, unless --max_train_steps is set.")
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimiser steps (wins over epochs).")
    training.add_argument("--num_warmup_steps", type=int, default=None, help="Warm-up; default 1500/40000 of steps.")
    training.add_argument("--lr_decay_steps", type=int, default=None, help="Poly decay ends here; default: the end.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimiser step.")
    training.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Passed to Accelerate, for training (evaluation runs in float32); default: its launch config.",
    )  # fmt: skip
    training.add_argument("--seed", type=int, default=42, help="Seed of weights, data order and augmentation.")
    add_cpu_argument(training)
    training.add_argument("--ddp_find_unused_parameters", action="store_true", help="If DDP finds unused parameters.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="dtop-finetuned", help="Model, checkpoints and logs.")
    output.add_argument(
        "--checkpointing_steps", type=parse_checkpointing_steps, default=None,
        help="Save the training state every N steps, or 'epoch', into output_dir/step_N.",
    )  # fmt: skip
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep the N newest checkpoints.")
    output.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a step_N folder.")
    output.add_argument("--eval_steps", type=int, default=None, help="Evaluate every N steps (always at the end).")
    output.add_argument("--with_tracking", action="store_true", help="Log through Accelerate's trackers.")
    output.add_argument("--report_to", type=str, default="tensorboard", help="Tracker(s) for --with_tracking.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub.")
    output.add_argument("--hub_model_id", type=str, default=None, help="Hub repository; default: the folder name.")
    output.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the cached login).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # A preset changes the defaults, so that flags given explicitly still win.
    first_pass, _ = parser.parse_known_args(argv)
    if first_pass.preset is not None:
        parser.set_defaults(**preset_defaults(first_pass.preset, first_pass.stage))
    args = parser.parse_args(argv)

    require_positive(
        args,
        (
            "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "max_train_steps", "checkpoints_total_limit", "lr_decay_steps",
        ),
    )  # fmt: skip
    if args.stage == "base" and args.exit_threshold is not None:
        raise ValueError("`--exit_threshold` only applies to `--stage prune` (the base stage trains without pruning).")
    if not 0.0 < args.cat_max_ratio <= 1.0:
        raise ValueError(f"`--cat_max_ratio` must lie in (0, 1] (1.0 = plain random crops), got {args.cat_max_ratio}.")
    return args


def stage_exit_threshold(
    stage: str, exit_threshold: float | tuple[float, ...] | None, config: DToPConfig
) -> float | tuple[float, ...]:
    """base: 1.0 (no pruning, SPEC §4 phase 1). prune: `--exit_threshold`, else the config's if it prunes, else
    0.9."""
    if stage == "base":
        return 1.0
    if exit_threshold is not None:
        return exit_threshold
    if any(value < 1.0 for value in config.exit_thresholds_per_head()[:-1]):
        return config.exit_threshold
    return DEFAULT_PRUNE_THRESHOLD


def fresh_config(args: argparse.Namespace, overrides: dict, id2label: dict[int, str]) -> DToPConfig:
    """A new model's config: the paper configuration's architecture, or a model size (default `small`). Its
    position embeddings are stored for `--crop_size` (a paper configuration's crop), else for the built-in images'
    size, else for the size preset's."""
    image_size = args.crop_size or (args.synthetic_image_size if args.dataset_name in BUILTIN_NAMES else None)
    fields = {"image_size": image_size} if image_size else {}
    if args.preset in PAPER_PRESETS:
        preset_fields = PAPER_PRESETS[args.preset].config_kwargs()
        return DToPConfig(**{**preset_fields, **fields, **label_fields(id2label), **overrides})
    return build_preset_config(overrides, id2label, size=args.preset or "small", **fields)


def label_fields(id2label: dict[int, str]) -> dict:
    return {"id2label": dict(id2label), "label2id": {name: index for index, name in id2label.items()}}


def check_preset_labels(preset: DToPPaperPreset, id2label: dict[int, str]) -> None:
    """A paper configuration trains on its own data set: the classes must be that data set's."""
    expected = DATASET_LABELS[preset.dataset.name]
    if len(id2label) != len(expected):
        raise ValueError(
            f"`--preset {preset.name}` trains on {preset.dataset.display_name} ({len(expected)} classes), but the "
            f"data set has {len(id2label)} classes. Pass the {preset.dataset.display_name} folder as `--dataset_name`."
        )


def load_model(
    args: argparse.Namespace, id2label: dict[int, str]
) -> tuple[DToPForSemanticSegmentation, DToPImageProcessor]:
    """The model (fresh, DToP checkpoint or ViT checkpoint) set up for the stage, and its image processor.

    The prune stage turns on `prune_during_training` (tokens exit in training mode too); the base stage turns it
    off and sets every threshold to 1.0.
    """
    overrides = parse_config_overrides(args.config_overrides)
    check_config_fields(overrides)
    paper_preset = PAPER_PRESETS.get(args.preset)
    if paper_preset is not None:
        check_preset_labels(paper_preset, id2label)
    processor_kwargs = image_processor_kwargs(args, paper_preset)
    source = args.model_name_or_path
    model_type = None
    if source is not None:  # a clear error for a file or a folder without config.json, before reading it
        check_model_folder(source, "--model_name_or_path")
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=True).model_type
    if source is None:
        model = DToPForSemanticSegmentation(fresh_config(args, overrides, id2label))
        image_processor = DToPImageProcessor(**processor_kwargs(model.config))
    elif model_type in SUPPORTED_MODEL_TYPES:
        # The backbone fields come from the ViT checkpoint; the preset gives the rest (stage layout, drop path, ...).
        preset_fields = {
            key: value
            for key, value in (paper_preset.config_kwargs() if paper_preset else {}).items()
            if key not in VIT_BASE_PATCH16
        }
        fields = {**preset_fields, **label_fields(id2label), **overrides}
        model = from_vit_pretrained(DToPForSemanticSegmentation, source, **fields)
        try:  # the ViT checkpoint's own normalisation, when it has a preprocessor_config.json
            image_processor = DToPImageProcessor.from_pretrained(source, **processor_kwargs(model.config))
        except OSError:
            logger.info(f"{source} has no image processor: using DToP's defaults")
            image_processor = DToPImageProcessor(**processor_kwargs(model.config))
    else:
        # A DToP folder or Hub id: the shared loader's checks and messages (not DToP, no processor saved, ...).
        config = load_dtop_config(source, "--model_name_or_path")
        load_saved_image_processor(source, config, "--model_name_or_path")
        config = DToPConfig.from_pretrained(source, **overrides)
        relabel = {int(key): value for key, value in config.id2label.items()} != id2label
        if relabel:
            logger.warning(
                f"The checkpoint has {config.num_labels} classes, the data {len(id2label)}: the class-specific head "
                "weights are re-initialised."
            )
            config.update(label_fields(id2label))
        model = DToPForSemanticSegmentation.from_pretrained(source, config=config, ignore_mismatched_sizes=relabel)
        image_processor = DToPImageProcessor.from_pretrained(source, **processor_kwargs(config))
    model.config.exit_threshold = stage_exit_threshold(args.stage, args.exit_threshold, model.config)
    model.config.prune_during_training = args.stage == "prune"
    return model, image_processor


def image_processor_kwargs(args: argparse.Namespace, paper_preset: DToPPaperPreset | None):
    """`config -> DToPImageProcessor kwargs`: the paper configuration's test mode (normalisation, resize, windows),
    else windows of `--crop_size` (default: the model's size) at stride 2/3 of it (341 for 512)."""

    def kwargs(config: DToPConfig) -> dict:
        crop_size = args.crop_size or config.image_size
        windows = {
            "crop_size": {"height": crop_size, "width": crop_size},
            "stride": {"height": 2 * crop_size // 3, "width": 2 * crop_size // 3},
            "do_reduce_labels": args.do_reduce_labels,
        }
        if paper_preset is None:
            return {"size": {"height": crop_size, "width": crop_size}, **windows}
        official = {**paper_preset.dataset.image_processor_kwargs(), "do_reduce_labels": args.do_reduce_labels}
        # The official windows, unless `--crop_size` changed the crop (then windows of that crop, stride 2/3).
        return official if crop_size == paper_preset.dataset.crop_size else {**official, **windows}

    return kwargs


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
            scale=args.train_scale,
            ratio_range=tuple(args.resize_ratio_range),
            cat_max_ratio=args.cat_max_ratio,
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
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"`--resume_from_checkpoint` {str(path)!r} is not a complete checkpoint ({problem}): pass 'latest' to "
            "resume from the newest complete one."
        )
    return path


def save_and_prune(accelerator: Accelerator, args: argparse.Namespace, step: int) -> None:
    """A crash-safe checkpoint of the training state, then (main process) `--checkpoints_total_limit` pruning."""
    save_checkpoint(accelerator, args.output_dir, step)
    if args.checkpoints_total_limit is not None and accelerator.is_main_process:
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def rewrite_train_log(log_path: Path, keep_until_step: int) -> None:
    """Keep the log lines of steps <= `keep_until_step` (those after the checkpoint are redone by the resumed run).
    A last line cut short by a killed run is dropped."""
    kept = []
    for line in log_path.read_text().splitlines() if log_path.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry["step"] <= keep_until_step:
            kept.append(line)
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
        json.dump(json_ready(results), file, indent=2)  # NaN IoU of an absent class -> null
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
    """README.md model card through `dtop_hf.toolkit.model_card` (skipped with a warning when its template is
    missing)."""
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
    # The decay horizon is the run's end, unless set apart (the official ViT-B phase 1 stops at 40k of 160k).
    decay_steps = args.lr_decay_steps or max_train_steps
    scheduler = build_poly_scheduler(
        optimizer, num_warmup_steps * accelerator.num_processes, decay_steps * accelerator.num_processes
    )

    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    steps_per_epoch = num_update_steps(len(train_dataloader), args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.preset in PAPER_PRESETS:
        official_batch = PAPER_PRESETS[args.preset].prune_schedule.total_batch_size
        if total_batch_size != official_batch:
            logger.warning(
                f"`--preset {args.preset}`: the official batch is {official_batch} images per step, this run's is "
                f"{total_batch_size}; launch 4 processes or set `--gradient_accumulation_steps` to match."
            )
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
                save_and_prune(accelerator, args, completed_steps)
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
            save_and_prune(accelerator, args, completed_steps)
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
