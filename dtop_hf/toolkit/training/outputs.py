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
"""What a finished stage leaves in its output folder: the model (`save_pretrained`, with its code), its image
processor, `all_results.json` and a model card; and, on request, the upload to the Hub."""

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers.utils import logging

from dtop_hf import DToPConfig, DToPImageProcessor

from ..evaluation.calibration import json_ready
from .loop import TrainingOutcome, TrainingSchedule


logger = logging.get_logger(__name__)


def training_results(
    evaluation: dict,
    outcome: TrainingOutcome,
    config: DToPConfig,
    num_processes: int,
    **run_fields,
) -> dict:
    """`all_results.json`: the final evaluation (`eval_*`), the thresholds trained with, and the run's figures
    (`run_fields`, e.g. stage, train scope, crop size)."""
    results = {f"eval_{name}": value for name, value in evaluation.items()}
    results.update(
        **run_fields,
        exit_threshold=list(config.exit_thresholds_per_head()[:-1]),
        train_steps=outcome.completed_steps,
        train_runtime_s=outcome.train_runtime_s,
        total_batch_size=outcome.total_batch_size,
        num_processes=num_processes,
    )
    return results


def describe_recipe(command: str, results: dict, schedule: TrainingSchedule) -> str:
    """The model card's training recipe: how the stage was run and its figures."""
    return (
        f"`{command}`: {results['train_steps']} steps, batch {results['total_batch_size']}, AdamW lr "
        f"{schedule.learning_rate} (heads x{schedule.head_lr_multiplier}), weight decay {schedule.weight_decay}, "
        f"crop {results['crop_size']}, exit threshold {results['exit_threshold']}."
    )


def save_finetuned_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    image_processor: DToPImageProcessor,
    output_dir: str | Path,
    results: dict,
    dataset_name: str | None = None,
    training_recipe: str | None = None,
    repo_id: str | None = None,
) -> None:
    """`save_pretrained` (model + code, every process taking part), then on the main process the processor,
    `all_results.json` (NaN IoU of an absent class -> null) and the model card (skipped with a warning when its
    template is missing).

    Args:
        dataset_name: a Hub data set or a folder the model was trained on; `None` or `builtin` for the built-in scenes.
        training_recipe: the card's description of the training (see [`describe_recipe`]).
        repo_id: the Hub repository the card names.
    """
    from ..data.datasets import BUILTIN_NAMES
    from ..model_card import write_model_card

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if not accelerator.is_main_process:
        return
    image_processor.save_pretrained(output_dir)
    with open(Path(output_dir) / "all_results.json", "w") as file:
        json.dump(json_ready(results), file, indent=2)
    builtin = dataset_name in BUILTIN_NAMES
    try:
        write_model_card(
            output_dir,
            unwrapped.config,
            repo_id=repo_id,
            datasets=[] if builtin or Path(dataset_name).is_dir() else [dataset_name],
            dataset_name="the built-in synthetic scenes" if builtin else dataset_name,
            training_recipe=training_recipe,
            mean_iou=results["eval_mean_iou"],
            gflops=results["eval_gflops_backbone_and_final_head"],
        )
    except FileNotFoundError as error:
        logger.warning(f"No model card written: {error}")


def push_to_hub(output_dir: str | Path, repo_id: str | None = None, token: str | None = None) -> str:
    """Upload the output folder, checkpoints left out, to `repo_id` (default: the folder's name); returns the
    repository id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id or Path(output_dir).name, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        ignore_patterns=["step_*", "epoch_*", ".incomplete-*"],
    )
    return repo_id
