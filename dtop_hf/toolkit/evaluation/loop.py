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
"""Distributed-correct evaluation of a DToP model: mIoU, mean GFLOPs per image and exit shares per stage."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ...image_processing_dtop import DToPImageProcessor
from ..inference.segmentation import (
    ExitThreshold,
    exit_kwargs,
    exits_per_stage,
    predict_batch,
    sliding_window_processor,
)
from .diagnostics import SweepDiagnostics
from .metrics import StreamingMeanIoU, class_areas


# Keys of `evaluate_batch`'s diagnostics tensors, gathered with its other per-image results.
DIAGNOSTICS_PREFIX = "diagnostics/"


@contextmanager
def full_precision(model: torch.nn.Module, device_type: str) -> Iterator[None]:
    """Run `model` in float32 inside the block, even when trained with mixed precision.

    Exit decisions compare head confidences with a threshold, so bf16/fp16 rounding moves tokens between heads
    (a model measured 19.65% mIoU under bf16 autocast, 20.45% in float32): evaluation must not depend on how
    training was run. A surrounding `torch.autocast` is switched off here, but that is not enough: with
    `mixed_precision` set, `accelerator.prepare` replaces the model's `forward` with one that opens its own
    autocast (and `unwrap_model` keeps it). Accelerate keeps the forward it replaced in `_original_forward`;
    it is put back for the block, and the autocast one restored after, so training stays mixed-precision.
    """
    original_forward = model.__dict__.get("_original_forward")
    autocast_forward = model.__dict__.get("forward")
    if original_forward is not None:
        model.forward = original_forward
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        if original_forward is not None:
            model.forward = autocast_forward


@torch.no_grad()
def evaluate_batch(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    image_processor: DToPImageProcessor,
    exit_threshold: ExitThreshold | None = None,
    exit_mode: str | None = None,
    exit_capacity: float | Sequence[float] | None = None,
    diagnostics: SweepDiagnostics | None = None,
    batch_index: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-image results of one batch (a `collate_segmentation_batch` output), ready to be gathered. Slide mode when
    `image_processor.do_split_image` (see [`~toolkit.inference.segmentation.sliding_window_processor`]).

    Returns:
        `confusion` `(batch, num_labels, num_labels)` int64 (rows = ground truth), `gflops` and
        `gflops_backbone_and_final_head` `(batch,)` float64, `exits` `(batch, num_stages)` int64 (tokens finalised
        by each head, summed over windows in sliding-window mode); with `diagnostics` (whole images only), its
        per-image tensors under `DIAGNOSTICS_PREFIX` + name, from the same forward pass.
    """
    config = model.config
    pixel_values = batch["pixel_values"]
    label_sizes = [tuple(size) for size in batch["label_sizes"].tolist()]
    # Slide mode cuts each image (its padding in the batch left out) into windows and merges them back; whole-image
    # mode runs the batch as it is. Either way the counts are per image, windows summed exactly.
    prediction = predict_batch(
        model,
        image_processor,
        pixel_values,
        target_sizes=label_sizes,
        image_sizes=batch["image_sizes"].tolist(),
        **exit_kwargs(exit_threshold, exit_mode, exit_capacity),
    )
    segmentations = prediction.segmentation
    gflops, gflops_paper = prediction.flops.total, prediction.flops.backbone_and_final_head
    tokens_per_stage = prediction.tokens_per_stage

    confusions = []
    for segmentation, labels, (height, width) in zip(segmentations, batch["labels"], label_sizes):
        image_metric = StreamingMeanIoU(config.num_labels, ignore_index=config.semantic_loss_ignore_index)
        image_metric.update(segmentation, labels[:height, :width])
        confusions.append(image_metric.confusion)
    device = pixel_values.device
    results = {
        "confusion": torch.stack(confusions).to(device),
        "gflops": gflops.to(device),
        "gflops_backbone_and_final_head": gflops_paper.to(device),
        "exits": exits_per_stage(tokens_per_stage).to(device),
    }
    if diagnostics is not None:
        tensors = diagnostics.batch(prediction.outputs, batch, batch_index)
        results.update({DIAGNOSTICS_PREFIX + name: tensor for name, tensor in tensors.items()})
    return results


def diagnostics_part(results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diagnostics tensors of `evaluate_batch`'s results, under their own names."""
    prefix = len(DIAGNOSTICS_PREFIX)
    return {key[prefix:]: value for key, value in results.items() if key.startswith(DIAGNOSTICS_PREFIX)}


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    exit_threshold: ExitThreshold | None = None,
    sliding_window: bool = False,
    image_processor: DToPImageProcessor | None = None,
    max_batches: int | None = None,
    exit_mode: str | None = None,
    exit_capacity: float | Sequence[float] | None = None,
    diagnostics: SweepDiagnostics | None = None,
    keep_image_areas: bool = False,
) -> dict:
    """Evaluate a DToP model on a data loader prepared by `accelerator`, in one or many processes.

    Every process runs its shard; per-image confusion matrices, GFLOPs and exit counts are gathered with
    `accelerator.gather_for_metrics`, which drops the samples Accelerate repeats to even out the last batch, then
    summed. The result is the same with any number of processes. The forward passes run in float32 even for a
    model prepared with `mixed_precision` (see [`full_precision`]): exit decisions would shift under autocast.

    Args:
        model: a DToP segmentation model, wrapped by `accelerator.prepare` or not.
        dataloader: batches from `collate_segmentation_batch`, with label maps at their original size.
        accelerator: the `Accelerator` that prepared `dataloader`.
        exit_threshold: per-call threshold override (1.0 = unpruned); `None` uses the model config's.
        sliding_window: run the official test mode (the processor's slide-mode windows, `crop_size` and `stride`,
            merged as mmseg's `slide_inference`) on images resized with kept ratio (see
            [`~toolkit.inference.segmentation.sliding_window_processor`]); otherwise one forward per batch of images
            resized to the processor's `size`.
        image_processor: its `post_process_semantic_segmentation` and sliding-window settings are used;
            defaults to `DToPImageProcessor()`.
        max_batches: stop after this many batches per process (quick checks); `None` = the whole data loader.
        exit_mode: per-call exit mode (`"threshold"` or `"capacity"`); `None` uses the model config's.
        exit_capacity: per-call capacity (capacity mode); `None` uses the model config's.
        diagnostics: exit diagnostics measured from this pass's forwards (whole images; started by the caller).
        keep_image_areas: also return each image's class areas (what a bootstrap over images needs).

    Returns:
        A dict with `mean_iou`, `mean_accuracy`, `overall_accuracy` (fractions), `per_category_iou` (list, NaN for
        classes absent from labels and predictions), `gflops` (mean per image, every head included),
        `gflops_backbone_and_final_head` (mean, the paper's figure), `exit_share` (list: share of tokens
        finalised by each head, decode head last) and `num_images`; with `diagnostics`, `exit_diagnostics`; with
        `keep_image_areas`, `image_class_areas`: a `(num_images, num_labels, 3)` float64 tensor (intersection, label
        and prediction pixels per class, [`~metrics.class_areas`]), in the data loader's order.
    """
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    image_processor = image_processor or DToPImageProcessor()
    if sliding_window:
        image_processor = sliding_window_processor(image_processor)  # windows of its crop_size and stride
    config = model.config
    metric = StreamingMeanIoU(config.num_labels, ignore_index=config.semantic_loss_ignore_index)
    gflops_sum, gflops_paper_sum, num_images = 0.0, 0.0, 0
    exit_counts = torch.zeros(len(config.out_indices), dtype=torch.long)
    image_areas = []
    progress = tqdm(dataloader, desc="evaluating", disable=not accelerator.is_local_main_process, leave=False)
    for batch_index, batch in enumerate(progress):
        if max_batches is not None and batch_index >= max_batches:
            break
        with full_precision(model, accelerator.device.type):
            results = evaluate_batch(
                model, batch, image_processor, exit_threshold, exit_mode, exit_capacity, diagnostics, batch_index
            )
        results = accelerator.gather_for_metrics(results)
        if diagnostics is not None:
            diagnostics.add(diagnostics_part(results))
        metric.merge(results["confusion"].sum(dim=0).cpu())
        if keep_image_areas:
            image_areas.append(class_areas(results["confusion"].cpu()))
        gflops_sum += float(results["gflops"].sum())
        gflops_paper_sum += float(results["gflops_backbone_and_final_head"].sum())
        exit_counts += results["exits"].sum(dim=0).cpu()
        num_images += len(results["gflops"])
    if was_training:
        model.train()
    scores = metric.compute()
    extra = {"exit_diagnostics": diagnostics.finish()} if diagnostics is not None else {}
    if keep_image_areas:
        empty = torch.zeros(0, config.num_labels, 3, dtype=torch.float64)
        extra["image_class_areas"] = torch.cat(image_areas) if image_areas else empty
    return {
        "mean_iou": scores["mean_iou"],
        "mean_accuracy": scores["mean_accuracy"],
        "overall_accuracy": scores["overall_accuracy"],
        "per_category_iou": scores["per_category_iou"],
        "gflops": gflops_sum / max(num_images, 1),
        "gflops_backbone_and_final_head": gflops_paper_sum / max(num_images, 1),
        "exit_share": (exit_counts.double() / max(int(exit_counts.sum()), 1)).tolist(),
        "num_images": num_images,
        **extra,
    }


__all__ = ["evaluate_batch", "evaluate_model", "exits_per_stage", "full_precision"]
