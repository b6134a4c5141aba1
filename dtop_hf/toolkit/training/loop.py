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
"""The training loop of a stage, as a library function: [`train`] takes an `Accelerator`, the model and its data
loaders, and runs the optimiser (AdamW, heads at a multiple of the backbone's rate, warm-up then poly decay) with
crash-safe checkpoints, an exact resume, periodic evaluation and a per-step log.

    with accelerator_session(cpu=True) as accelerator:
        outcome = train(accelerator, model, train_dataloader, eval_dataloader, "outputs/base",
                        TrainingSchedule(max_train_steps=200, learning_rate=1e-3))
        results = evaluate_model(outcome.model, outcome.eval_dataloader, accelerator)
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dtop_hf import DToPImageProcessor

from ..evaluation.loop import evaluate_model
from .checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    find_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .optimization import build_optimizer, build_poly_scheduler, num_update_steps
from .recipe import WARMUP_FRACTION


# Accelerate's logger: a message once per run (the main process's), not once per process.
logger = get_logger(__name__)

TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainingSchedule:
    """The optimiser and its schedule.

    Args:
        learning_rate: AdamW learning rate of the backbone.
        head_lr_multiplier: the heads train at this multiple of it.
        weight_decay: AdamW weight decay.
        num_train_epochs: epochs, unless `max_train_steps` is set.
        max_train_steps: optimiser steps (wins over epochs).
        num_warmup_steps: linear warm-up; default `WARMUP_FRACTION` of the steps.
        lr_decay_steps: the poly decay reaches zero here (the official ViT-B phase 1 stops at 40k of 160k);
            default: the run's end.
    """

    learning_rate: float = 2e-5
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    num_train_epochs: int = 3
    max_train_steps: int | None = None
    num_warmup_steps: int | None = None
    lr_decay_steps: int | None = None


@dataclass
class CheckpointPolicy:
    """When to save the training state, how many saves to keep, where to resume from.

    Args:
        checkpointing_steps: every N optimiser steps, or `"epoch"`, into `output_dir/step_N`.
        checkpoints_total_limit: keep the N newest.
        resume_from_checkpoint: `"latest"` (the newest complete one, if any) or a `step_N` folder.
    """

    checkpointing_steps: int | str | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None


@dataclass
class TrainingOutcome:
    """What [`train`] leaves: the prepared model and evaluation loader, and the run's figures."""

    model: torch.nn.Module
    eval_dataloader: DataLoader
    completed_steps: int
    train_runtime_s: float
    total_batch_size: int


@dataclass
class PreparedRun:
    """The prepared objects of a run and its step counts (in optimiser steps)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_dataloader: DataLoader
    eval_dataloader: DataLoader
    max_train_steps: int
    steps_per_epoch: int
    num_epochs: int
    num_warmup_steps: int
    total_batch_size: int


def prepare_run(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    schedule: TrainingSchedule,
) -> PreparedRun:
    """Optimiser and schedule, everything prepared by `accelerator`, and the run's step counts.

    Accelerate steps a prepared scheduler once per process per optimiser step, hence the step counts scaled by the
    number of processes (as in transformers' no_trainer examples).
    """
    accumulation, num_processes = accelerator.gradient_accumulation_steps, accelerator.num_processes
    total_batch_size = train_dataloader.batch_size * num_processes * accumulation
    optimizer = build_optimizer(model, schedule.learning_rate, schedule.head_lr_multiplier, schedule.weight_decay)
    steps_per_epoch = num_update_steps(math.ceil(len(train_dataloader) / num_processes), accumulation)
    max_train_steps = schedule.max_train_steps or schedule.num_train_epochs * steps_per_epoch
    num_warmup_steps = schedule.num_warmup_steps
    if num_warmup_steps is None:
        num_warmup_steps = round(WARMUP_FRACTION * max_train_steps)
    decay_steps = schedule.lr_decay_steps or max_train_steps
    scheduler = build_poly_scheduler(optimizer, num_warmup_steps * num_processes, decay_steps * num_processes)
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    steps_per_epoch = num_update_steps(len(train_dataloader), accumulation)
    return PreparedRun(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        max_train_steps=max_train_steps,
        steps_per_epoch=steps_per_epoch,
        num_epochs=math.ceil(max_train_steps / steps_per_epoch),
        num_warmup_steps=num_warmup_steps,
        total_batch_size=total_batch_size,
    )


def resume_point(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `"latest"` (None when there is none yet) or a path, checked complete."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"Resume from {str(path)!r}: not a folder; pass 'latest' or a step_N folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"Resume from {str(path)!r}: not a complete checkpoint ({problem}); pass 'latest' to resume from the "
            "newest complete one."
        )
    return path


def resume(accelerator: Accelerator, run: PreparedRun, checkpoints: CheckpointPolicy, output_dir: Path) -> int:
    """Load the state to resume from (model, optimiser, scheduler, RNG, sampler), if any, and cut the step log back
    to it (the steps after it are redone); returns the optimiser steps already done."""
    completed_steps = 0
    checkpoint = resume_point(checkpoints.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        completed_steps = checkpoint_step(checkpoint)
        logger.info(
            f"Resumed from {checkpoint}: step {completed_steps}, epoch {completed_steps // run.steps_per_epoch}, "
            f"skipping {batches_to_skip(run, completed_steps, accelerator)} batches"
        )
    elif checkpoints.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {output_dir} yet: starting from scratch")
    if accelerator.is_main_process:
        rewrite_train_log(output_dir / TRAIN_LOG, completed_steps)
    return completed_steps


def batches_to_skip(run: PreparedRun, completed_steps: int, accelerator: Accelerator) -> int:
    """Batches of the resumed epoch that the checkpoint already trained on."""
    return (completed_steps % run.steps_per_epoch) * accelerator.gradient_accumulation_steps


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


def save_and_prune(accelerator: Accelerator, output_dir: Path, step: int, checkpoints: CheckpointPolicy) -> None:
    """A crash-safe checkpoint of the training state, then (main process) pruning to the newest
    `checkpoints_total_limit`."""
    save_checkpoint(accelerator, output_dir, step)
    if checkpoints.checkpoints_total_limit is not None and accelerator.is_main_process:
        prune_checkpoints(output_dir, checkpoints.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def log_evaluation(accelerator: Accelerator, results: dict, step: int, with_tracking: bool, tag: str = "eval") -> None:
    """An evaluation's mIoU, GFLOPs and exit shares: logged, and sent to the trackers with `with_tracking`."""
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


class StepLog:
    """Per optimiser step: the loss (mean over processes and accumulated batches), the progress bar, a line of
    `train_log.jsonl` (main process) and the trackers."""

    def __init__(
        self, accelerator: Accelerator, log_path: Path, run: PreparedRun, completed_steps: int, tracking: bool
    ):
        self.accelerator, self.log_path, self.tracking = accelerator, log_path, tracking
        self.progress_bar = tqdm(
            total=run.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process
        )
        self.start_time, self.images_seen, self.losses = time.perf_counter(), 0, []

    def add_batch(self, loss: torch.Tensor, batch_size: int) -> None:
        self.losses.append(loss.detach())
        self.images_seen += batch_size * self.accelerator.num_processes

    def end_step(self, step: int, epoch: int, learning_rate: float) -> None:
        loss = self.accelerator.reduce(torch.stack(self.losses).mean(), reduction="mean").item()
        self.losses = []
        throughput = self.images_seen / (time.perf_counter() - self.start_time)
        self.progress_bar.update(1)
        self.progress_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", img_s=f"{throughput:.1f}")
        if self.accelerator.is_main_process:
            with open(self.log_path, "a") as file:
                file.write(json.dumps({"step": step, "epoch": epoch, "loss": loss, "lr": learning_rate}) + "\n")
        if self.tracking:
            values = {"train/loss": loss, "train/lr": learning_rate, "train/images_per_second": throughput}
            self.accelerator.log(values, step=step)

    def close(self) -> float:
        """Ends the progress bar; returns the seconds since the start."""
        self.progress_bar.close()
        return time.perf_counter() - self.start_time


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    output_dir: str | Path,
    schedule: TrainingSchedule | None = None,
    checkpoints: CheckpointPolicy | None = None,
    eval_steps: int | None = None,
    image_processor: DToPImageProcessor | None = None,
    sliding_window: bool = False,
    with_tracking: bool = False,
) -> TrainingOutcome:
    """Train `model` on `train_dataloader` for the schedule's steps, in every process of `accelerator`.

    Args:
        accelerator: the run's (its gradient accumulation steps and mixed precision apply).
        model: set up for its stage (see [`load_model_for_stage`]); trainable parameters as scoped.
        train_dataloader, eval_dataloader: unprepared loaders (see [`build_training_dataloaders`]).
        output_dir: checkpoints `step_N` and the step log `train_log.jsonl` (one line per optimiser step).
        schedule: optimiser and schedule.
        checkpoints: checkpointing and resuming.
        eval_steps: evaluate every N steps (not at the end: the caller evaluates the outcome).
        image_processor, sliding_window: how the periodic evaluation runs (slide windows of the processor).
        with_tracking: send losses and evaluations to the accelerator's trackers (initialised by the caller).
    """
    schedule, checkpoints, output_dir = (
        schedule or TrainingSchedule(),
        checkpoints or CheckpointPolicy(),
        Path(output_dir),
    )
    run = prepare_run(accelerator, model, train_dataloader, eval_dataloader, schedule)
    logger.info(
        f"{len(train_dataloader.dataset)} training / {len(eval_dataloader.dataset)} validation images; batch "
        f"{train_dataloader.batch_size} per process x {accelerator.num_processes} processes x "
        f"{accelerator.gradient_accumulation_steps} accumulation = {run.total_batch_size}; {run.max_train_steps} "
        f"steps ({run.steps_per_epoch} per epoch, {run.num_epochs} epochs), {run.num_warmup_steps} warm-up"
    )
    completed_steps = resume(accelerator, run, checkpoints, output_dir)
    starting_epoch, skip = completed_steps // run.steps_per_epoch, batches_to_skip(run, completed_steps, accelerator)
    step_log = StepLog(accelerator, output_dir / TRAIN_LOG, run, completed_steps, with_tracking)
    for epoch in range(starting_epoch, run.num_epochs):
        run.model.train()
        run.train_dataloader.set_epoch(epoch)
        batches = run.train_dataloader
        if epoch == starting_epoch and skip:
            batches = accelerator.skip_first_batches(run.train_dataloader, skip)
        for batch in batches:
            with accelerator.accumulate(run.model):
                outputs = run.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                learning_rate = run.optimizer.param_groups[0]["lr"]
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            step_log.add_batch(outputs.loss, len(batch["pixel_values"]))
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            step_log.end_step(completed_steps, epoch, learning_rate)
            if (
                isinstance(checkpoints.checkpointing_steps, int)
                and completed_steps % checkpoints.checkpointing_steps == 0
            ):
                save_and_prune(accelerator, output_dir, completed_steps, checkpoints)
            if eval_steps and completed_steps % eval_steps == 0 and completed_steps < run.max_train_steps:
                results = evaluate_model(
                    run.model, run.eval_dataloader, accelerator, sliding_window=sliding_window,
                    image_processor=image_processor,
                )  # fmt: skip
                log_evaluation(accelerator, results, completed_steps, with_tracking)
            if completed_steps >= run.max_train_steps:
                break
        if checkpoints.checkpointing_steps == "epoch":
            save_and_prune(accelerator, output_dir, completed_steps, checkpoints)
        if completed_steps >= run.max_train_steps:
            break
    train_runtime_s = step_log.close()
    return TrainingOutcome(run.model, run.eval_dataloader, completed_steps, train_runtime_s, run.total_batch_size)
