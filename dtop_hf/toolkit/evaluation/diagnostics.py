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
"""Diagnostics of early exits: does depth pay on a data set, and are the tokens that leave early the right ones?

Three measurements, each a pure function of model outputs and labels, summed over a data set by
[`ExitDiagnostics`] (a streaming accumulator like [`~metrics.StreamingMeanIoU`]):

* **Depth profile**: each head's own map over ALL tokens of the unpruned model (threshold 1.0), scored as the
  evaluation scores the final map (pixel mIoU, scores upsampled to the labels). DToP only pays when the early heads
  are worse than the decode head on some tokens and as good on the others: a flat profile means depth buys nothing.
* **Exit precision** at a threshold, per head: of the tokens that head finalised, the share whose exit label (the
  head's own prediction when the token left, the label it keeps in the final map) equals the unpruned model's final
  label, and the share that is right against the ground truth; beside it, the unpruned model's accuracy on the same
  tokens, so that what exiting early costs is read off directly. The decode head's row is the tokens that stayed.
* **Boundary share**: the share of boundary tokens among the tokens each head finalised, against their share among
  all tokens. Easy tokens (inside large regions) should leave early, boundary tokens late.

Token-level ground truth (exit precision, boundaries) is read from the pixel labels aligned with the model input:

* a token's label is the majority class among the labelled pixels of its patch (ties: the smaller class id),
  `ignore_index` when none of them is labelled (pixels past the image edge, in the padding to a patch multiple,
  count as unlabelled); tokens labelled `ignore_index` are left out of the accuracy, not of the agreement;
* a token is a boundary token when its patch holds labelled pixels of more than one class, or when a 4-neighbour
  token has another (labelled) token label: a region edge that falls exactly on the patch grid still counts.

Example:

```python
>>> diagnostics = ExitDiagnostics(num_labels=config.num_labels, num_stages=len(config.out_indices))
>>> for batch in dataloader:  # `collate_segmentation_batch` batches
...     diagnose_batch(model, batch["pixel_values"], batch["labels"], diagnostics, exit_threshold=0.9)
>>> print(format_diagnostics_markdown(diagnostics.compute(), ["head 1 (layer 2)", "head 2 (layer 4)", "decode"]))
```
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ...image_processing_dtop import DToPImageProcessor
from .metrics import StreamingMeanIoU


# Per-stage counters of `exit_counts`, in the order of its result.
EXIT_COUNT_NAMES = ("exited", "agree", "labelled", "correct", "reference_correct", "boundary")


def _patches(labels: torch.Tensor, patch_size: int, ignore_index: int) -> torch.Tensor:
    """`(batch, H, W)` labels -> `(batch, h, w, patch_size**2)`, padded bottom / right with `ignore_index` to a
    patch multiple as the model pads its input."""
    height, width = labels.shape[-2:]
    pad_h, pad_w = -height % patch_size, -width % patch_size
    labels = F.pad(labels.long(), (0, pad_w, 0, pad_h), value=ignore_index)
    batch, grid_h, grid_w = labels.shape[0], labels.shape[1] // patch_size, labels.shape[2] // patch_size
    patches = labels.reshape(batch, grid_h, patch_size, grid_w, patch_size).permute(0, 1, 3, 2, 4)
    return patches.reshape(batch, grid_h, grid_w, patch_size * patch_size)


def _class_counts(labels: torch.Tensor, patch_size: int, num_labels: int, ignore_index: int) -> torch.Tensor:
    """Labelled pixels of each class in each patch: `(batch, h, w, num_labels)` int64."""
    patches = _patches(labels, patch_size, ignore_index)
    valid = patches != ignore_index
    if bool(((patches < 0) | (patches >= num_labels))[valid].any()):
        raise ValueError(f"Labels must lie in [0, {num_labels}) or be the ignore index {ignore_index}.")
    # Unlabelled pixels go to an extra bin that is dropped: one scatter for all classes.
    bins = torch.where(valid, patches, torch.full_like(patches, num_labels))
    counts = torch.zeros(*patches.shape[:3], num_labels + 1, dtype=torch.long, device=labels.device)
    counts.scatter_add_(-1, bins, torch.ones_like(bins))
    return counts[..., :num_labels]


def token_labels(labels: torch.Tensor, patch_size: int, num_labels: int, ignore_index: int = 255) -> torch.Tensor:
    """The ground-truth label of every token: the majority class of its patch's labelled pixels.

    Args:
        labels: `(batch, H, W)` class ids aligned with the model input (`ignore_index` for unlabelled pixels).
        patch_size: the model's patch side.
        num_labels: classes of the model.
        ignore_index: label of unlabelled pixels, and of tokens without a labelled pixel.

    Returns:
        `(batch, ceil(H / patch_size), ceil(W / patch_size))` int64. Ties go to the smaller class id.
    """
    counts = _class_counts(labels, patch_size, num_labels, ignore_index)
    majority = counts.argmax(dim=-1)  # argmax returns the first maximum: the smaller class id on ties
    return torch.where(counts.sum(dim=-1) > 0, majority, torch.full_like(majority, ignore_index))


def boundary_tokens(labels: torch.Tensor, patch_size: int, num_labels: int, ignore_index: int = 255) -> torch.Tensor:
    """Boundary tokens: the patch holds labelled pixels of two classes or more, or a 4-neighbour token has another
    labelled token label (see [`token_labels`]; arguments alike). Returns `(batch, h, w)` bool."""
    counts = _class_counts(labels, patch_size, num_labels, ignore_index)
    mixed = (counts > 0).sum(dim=-1) > 1
    grid = torch.where(counts.sum(dim=-1) > 0, counts.argmax(dim=-1), torch.full_like(counts[..., 0], -1))
    differs = torch.zeros_like(mixed)
    for dim in (1, 2):  # rows, then columns: mark both tokens of each differing neighbour pair
        first, second = grid.narrow(dim, 0, grid.shape[dim] - 1), grid.narrow(dim, 1, grid.shape[dim] - 1)
        change = (first != second) & (first >= 0) & (second >= 0)
        differs.narrow(dim, 0, grid.shape[dim] - 1).logical_or_(change)
        differs.narrow(dim, 1, grid.shape[dim] - 1).logical_or_(change)
    return mixed | differs


def exit_labels(logits: torch.Tensor) -> torch.Tensor:
    """The label each token keeps in the pruned model's final map: the argmax of the assembled `logits`
    `(batch, num_labels, h, w)` on the token grid. Returns `(batch, h, w)` int64.

    Not the exit head's own argmax: with ATM heads an exited token keeps its mask scores, but its label in the final
    map is those scores weighted by the decode head's class presence, so the two can differ. (With FCN heads the
    final map holds the exit head's scores and they agree.) Exit precision is about what reaches the user.
    """
    return logits.argmax(dim=1)


def exit_counts(
    exit_stage: torch.Tensor,
    exit_label: torch.Tensor,
    reference: torch.Tensor,
    token_label: torch.Tensor,
    boundary: torch.Tensor,
    num_stages: int,
    ignore_index: int = 255,
) -> dict[str, torch.Tensor]:
    """Per-head token counts of one batch, all `(batch, h, w)` inputs on the token grid.

    Args:
        exit_stage: head that finalised each token (decode head: `num_stages - 1`).
        exit_label: label each token left with ([`exit_labels`]).
        reference: the unpruned model's final label of each token.
        token_label: ground truth ([`token_labels`]).
        boundary: boundary tokens ([`boundary_tokens`]).
        num_stages: heads of the model, decode head included.
        ignore_index: `token_label` value of tokens without ground truth.

    Returns:
        `(num_stages,)` int64 counts, named as [`EXIT_COUNT_NAMES`]: tokens `exited` at each head, of them those
        whose exit label `agree`s with the reference, those `labelled`, those `correct` (exit label = ground truth),
        those the unpruned model got right (`reference_correct`) and the `boundary` ones.
    """
    stage = exit_stage.flatten().long()
    labelled = token_label.flatten() != ignore_index
    exit_label, reference, truth = exit_label.flatten(), reference.flatten(), token_label.flatten()
    per_token = {
        "exited": torch.ones_like(labelled),
        "agree": exit_label == reference,
        "labelled": labelled,
        "correct": labelled & (exit_label == truth),
        "reference_correct": labelled & (reference == truth),
        "boundary": boundary.flatten(),
    }
    return {name: torch.bincount(stage[per_token[name]], minlength=num_stages) for name in EXIT_COUNT_NAMES}


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> list[float]:
    """Element-wise share, NaN where the denominator is 0 (a head nothing exited at)."""
    return [float(n) / float(d) if d > 0 else float("nan") for n, d in zip(numerator.tolist(), denominator.tolist())]


class ExitDiagnostics:
    """Streaming sums of the depth profile, exit precision and boundary shares over a data set.

    Args:
        num_labels: classes of the model.
        num_stages: heads of the model, decode head included (`len(config.out_indices)`).
        ignore_index: label of unlabelled pixels and tokens.
    """

    def __init__(self, num_labels: int, num_stages: int, ignore_index: int = 255):
        if num_stages < 1:
            raise ValueError(f"`num_stages` must be >= 1, got {num_stages}.")
        self.num_labels, self.num_stages, self.ignore_index = num_labels, num_stages, ignore_index
        self.depth = [StreamingMeanIoU(num_labels, ignore_index) for _ in range(num_stages)]
        self.counts = {name: torch.zeros(num_stages, dtype=torch.long) for name in EXIT_COUNT_NAMES}
        self.num_tokens = 0
        self.num_boundary_tokens = 0

    def update_depth_profile(self, stage_maps: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Add each head's own class map at the label resolution: `stage_maps[k]` and `labels` `(batch, H, W)`."""
        if len(stage_maps) != self.num_stages:
            raise ValueError(f"Expected {self.num_stages} stage maps, got {len(stage_maps)}.")
        for metric, stage_map in zip(self.depth, stage_maps):
            metric.update(stage_map, labels)

    def update_exits(
        self,
        exit_stage: torch.Tensor,
        exit_label: torch.Tensor,
        reference: torch.Tensor,
        token_label: torch.Tensor,
        boundary: torch.Tensor,
    ) -> None:
        """Add one batch on the token grid (arguments as in [`exit_counts`])."""
        counts = exit_counts(
            exit_stage, exit_label, reference, token_label, boundary, self.num_stages, self.ignore_index
        )
        for name, value in counts.items():
            self.counts[name] += value.cpu()
        self.num_tokens += exit_stage.numel()
        self.num_boundary_tokens += int(boundary.sum())

    def add(self, per_image: Mapping[str, torch.Tensor]) -> None:
        """Add per-image tensors of [`batch_diagnostics`] (one batch, or batches gathered from every process): the
        exit counts, and the depth profile's confusions where present (the unpruned pass)."""
        if "exit_counts" in per_image:
            counts = per_image["exit_counts"].sum(dim=0).cpu()
            for row, name in enumerate(EXIT_COUNT_NAMES):
                self.counts[name] += counts[row]
            self.num_tokens += int(per_image["num_tokens"].sum())
            self.num_boundary_tokens += int(per_image["num_boundary_tokens"].sum())
        if "depth_confusion" in per_image:
            for metric, confusion in zip(self.depth, per_image["depth_confusion"].sum(dim=0).cpu(), strict=True):
                metric.merge(confusion)

    def merge(self, other: "ExitDiagnostics") -> None:
        """Add another accumulator's sums (another process or shard)."""
        for mine, theirs in zip(self.depth, other.depth):
            mine.merge(theirs.confusion)
        for name in EXIT_COUNT_NAMES:
            self.counts[name] += other.counts[name]
        self.num_tokens += other.num_tokens
        self.num_boundary_tokens += other.num_boundary_tokens

    def compute(self) -> dict:
        """Lists with one value per head (decode head last), NaN where a head finalised no token:

        `depth_mean_iou` (each head's own pixel mIoU, unpruned) and `depth_per_category_iou` (a list per head);
        `exit_share` (share of all tokens finalised by the head); `exit_agreement` (share of them whose exit label
        equals the unpruned final label); `exit_accuracy` and `reference_accuracy` (share of their labelled ones
        that the exit label, resp. the unpruned final label, gets right); `exit_boundary_share` (share of boundary
        tokens among them) beside `boundary_share` (a float: among all tokens); `num_tokens`.
        """
        counts = self.counts
        depth = [metric.compute() for metric in self.depth]
        return {
            "depth_mean_iou": [scores["mean_iou"] for scores in depth],
            "depth_per_category_iou": [scores["per_category_iou"] for scores in depth],
            "exit_share": _ratio(counts["exited"], torch.full_like(counts["exited"], max(self.num_tokens, 1))),
            "exit_agreement": _ratio(counts["agree"], counts["exited"]),
            "exit_accuracy": _ratio(counts["correct"], counts["labelled"]),
            "reference_accuracy": _ratio(counts["reference_correct"], counts["labelled"]),
            "exit_boundary_share": _ratio(counts["boundary"], counts["exited"]),
            "boundary_share": self.num_boundary_tokens / self.num_tokens if self.num_tokens else float("nan"),
            "num_tokens": self.num_tokens,
        }


def stage_class_maps(
    stage_logits: Sequence[torch.Tensor],
    target_sizes: Sequence[tuple[int, int]],
    image_processor: DToPImageProcessor | None = None,
) -> list[list[torch.Tensor]]:
    """Each head's own class maps at `target_sizes`, post-processed exactly as the final map is (bilinear scores to
    the input, then to the target size, argmax), so that the decode head's row of the depth profile at threshold 1.0
    is the evaluation's unpruned mIoU. Returns `maps[stage][image]`, each `(height, width)` int64."""
    image_processor = image_processor or DToPImageProcessor()
    return [
        image_processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=list(target_sizes))
        for logits in stage_logits
    ]


def token_ground_truth(
    labels: torch.Tensor,
    label_sizes: Sequence[tuple[int, int]],
    input_size: tuple[int, int],
    patch_size: int,
    num_labels: int,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token labels and boundary tokens, each `(batch, h, w)`, of a padded label batch: each map without its
    padding (`label_sizes`), resized with nearest neighbours to the model input `input_size` (the token grid is the
    input's, not the labels')."""
    truths, boundaries = [], []
    for index, (height, width) in enumerate(label_sizes):
        label = labels[index, :height, :width]
        if tuple(label.shape) != tuple(input_size):
            label = F.interpolate(label[None, None].float(), size=tuple(input_size), mode="nearest")[0, 0].long()
        truths.append(token_labels(label[None], patch_size, num_labels, ignore_index))
        boundaries.append(boundary_tokens(label[None], patch_size, num_labels, ignore_index))
    return torch.cat(truths), torch.cat(boundaries)


def depth_confusions(
    stage_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    label_sizes: Sequence[tuple[int, int]],
    num_labels: int,
    ignore_index: int = 255,
    image_processor: DToPImageProcessor | None = None,
) -> torch.Tensor:
    """Each head's own confusion matrix per image, `(batch, num_stages, num_labels, num_labels)` int64 (rows =
    ground truth), from [`stage_class_maps`] at the label sizes: per image, so that processes' batches gather."""
    maps = stage_class_maps(stage_logits, label_sizes, image_processor)
    confusions = []
    for index, (height, width) in enumerate(label_sizes):
        per_stage = []
        for stage_maps in maps:
            metric = StreamingMeanIoU(num_labels, ignore_index)
            metric.update(stage_maps[index], labels[index, :height, :width])
            per_stage.append(metric.confusion)
        confusions.append(torch.stack(per_stage))
    return torch.stack(confusions).to(labels.device)


def batch_diagnostics(
    outputs,
    labels: torch.Tensor,
    label_sizes: Sequence[tuple[int, int]],
    reference: torch.Tensor,
    config,
    input_size: tuple[int, int],
    depth_profile: bool = False,
    image_processor: DToPImageProcessor | None = None,
) -> dict[str, torch.Tensor]:
    """One batch's diagnostics as per-image tensors, ready to be gathered across processes and summed by
    [`ExitDiagnostics.add`].

    Args:
        outputs: the model's output of the batch (whole images: `exit_stage`, `stage_logits` on the token grid).
        labels: `(batch, H_l, W_l)` padded label maps; `label_sizes` their sizes without the padding.
        reference: `(batch, h, w)` the unpruned model's final label of each token.
        config: the model's config (patch size, classes, heads, ignore index).
        input_size: `(H, W)` of the model input.
        depth_profile: also each head's own confusion matrices (`outputs` must then be the unpruned pass's).

    Returns:
        `exit_counts` `(batch, len(EXIT_COUNT_NAMES), num_stages)`, `num_tokens` and `num_boundary_tokens`
        `(batch,)`, and with `depth_profile` `depth_confusion` (see [`depth_confusions`]).
    """
    ignore_index, num_stages = config.semantic_loss_ignore_index, len(config.out_indices)
    truth, boundary = token_ground_truth(
        labels, label_sizes, input_size, config.patch_size, config.num_labels, ignore_index
    )
    grid_size = tuple(outputs.exit_stage.shape[-2:])
    if tuple(truth.shape[-2:]) != grid_size:
        raise ValueError(f"Token grid {grid_size} of the model and {tuple(truth.shape[-2:])} of the labels differ.")
    exit_label = exit_labels(outputs.logits)
    per_image = [
        exit_counts(*(tensor[index : index + 1] for tensor in (outputs.exit_stage, exit_label, reference, truth,
                                                               boundary)), num_stages, ignore_index)
        for index in range(len(truth))
    ]  # fmt: skip
    device = outputs.exit_stage.device
    tensors = {
        "exit_counts": torch.stack([torch.stack([counts[name] for name in EXIT_COUNT_NAMES]) for counts in per_image]),
        "num_tokens": torch.full((len(truth),), grid_size[0] * grid_size[1], dtype=torch.long),
        "num_boundary_tokens": boundary.flatten(1).sum(dim=1),
    }
    if depth_profile:
        tensors["depth_confusion"] = depth_confusions(
            outputs.stage_logits, labels, label_sizes, config.num_labels, ignore_index, image_processor
        )
    return {name: tensor.to(device) for name, tensor in tensors.items()}


@torch.no_grad()
def diagnose_batch(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    diagnostics: ExitDiagnostics,
    exit_threshold: float | Sequence[float] | None = None,
    image_processor: DToPImageProcessor | None = None,
    label_sizes: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Run one batch twice (unpruned, then at `exit_threshold`) and add it to `diagnostics`.

    Args:
        model: a DToP segmentation model (put in eval mode here; whole-image inputs, not slide-mode windows).
        pixel_values: `(batch, 3, H, W)` processed images.
        labels: `(batch, H_l, W_l)` class ids, `ignore_index` for unlabelled pixels (padded batches: pass
            `label_sizes`). Resized with nearest neighbours to the input size for the token-level statistics.
        diagnostics: the accumulator.
        exit_threshold: threshold of the pruned pass; `None`: the model config's.
        image_processor: post-processing of the depth profile (default: `DToPImageProcessor()`).
        label_sizes: `(height, width)` of each label map without its padding; `None`: the full maps.
    """
    model.eval()
    unpruned = model(pixel_values, exit_threshold=1.0)
    pruned = model(pixel_values, exit_threshold=exit_threshold)
    sizes = [tuple(int(v) for v in size) for size in (label_sizes or [labels.shape[-2:]] * len(labels))]
    diagnostics.add(
        {
            "depth_confusion": depth_confusions(
                unpruned.stage_logits, labels, sizes, diagnostics.num_labels, diagnostics.ignore_index,
                image_processor,
            )
        }
    )  # fmt: skip
    reference = unpruned.logits.argmax(dim=1)
    input_size = tuple(pixel_values.shape[-2:])
    diagnostics.add(batch_diagnostics(pruned, labels, sizes, reference, model.config, input_size))


# `ExitDiagnostics.compute` keys of the data set and the unpruned model (the same for every exit setting), and those of
# one setting's exits.
PROFILE_KEYS = ("depth_mean_iou", "depth_per_category_iou", "boundary_share", "num_tokens")
EXIT_KEYS = ("exit_agreement", "exit_accuracy", "reference_accuracy", "exit_boundary_share")


class SweepDiagnostics:
    """The diagnostics of a sweep of exit settings on one data loader, without a forward pass of their own.

    Each setting's evaluation pass hands its batches' outputs here ([`batch`], then [`add`] with the gathered
    tensors). The unpruned setting's pass, which must come first, gives the depth profile and each batch's final
    token labels, kept per batch index (one int per token) as the reference of every later setting's exit
    precision: the evaluation loader's batches come in the same order every pass.

    Args:
        config: the model's config.
        image_processor: the depth profile's post-processing, the evaluation's (default: `DToPImageProcessor()`).
    """

    def __init__(self, config, image_processor: DToPImageProcessor | None = None):
        self.config, self.image_processor = config, image_processor
        self.references: dict[int, torch.Tensor] = {}
        self.profile: dict | None = None  # PROFILE_KEYS of the unpruned pass, once it ran
        self.unpruned = False
        self.current: ExitDiagnostics | None = None

    def start(self, unpruned: bool) -> None:
        """Begin one setting's pass; `unpruned`: the pass that records the references and the depth profile."""
        if not unpruned and self.profile is None:
            raise RuntimeError("Run the unpruned setting first: its final labels are the exit precision's reference.")
        self.unpruned = unpruned
        config = self.config
        self.current = ExitDiagnostics(config.num_labels, len(config.out_indices), config.semantic_loss_ignore_index)

    def batch(self, outputs, batch: Mapping[str, torch.Tensor], batch_index: int) -> dict[str, torch.Tensor]:
        """Per-image tensors of one batch of this pass ([`batch_diagnostics`]); `batch` as
        `collate_segmentation_batch` gives it."""
        if self.unpruned:
            self.references[batch_index] = outputs.logits.argmax(dim=1).to(torch.int32).cpu()
        reference = self.references[batch_index].to(outputs.logits.device)
        sizes = [tuple(size) for size in batch["label_sizes"].tolist()]
        input_size = tuple(batch["pixel_values"].shape[-2:])
        return batch_diagnostics(
            outputs, batch["labels"], sizes, reference, self.config, input_size, self.unpruned, self.image_processor
        )

    def add(self, per_image: Mapping[str, torch.Tensor]) -> None:
        self.current.add(per_image)

    def finish(self) -> dict:
        """This pass's exit precision and boundary shares per head (`EXIT_KEYS`); the unpruned pass also keeps the
        depth profile in `profile`."""
        result = self.current.compute()
        if self.unpruned:
            self.profile = {key: result[key] for key in PROFILE_KEYS}
        return {key: result[key] for key in EXIT_KEYS}


def format_diagnostics_markdown(result: dict, stage_names: Sequence[str]) -> str:
    """[`ExitDiagnostics.compute`] as a markdown table, one row per head (percentages)."""

    def percent(value: float) -> str:
        return "-" if value != value else f"{100 * value:.1f}"  # NaN: no token

    lines = [
        "| head | own mIoU (unpruned) | tokens exited | agree with unpruned | exit accuracy | unpruned accuracy "
        "| boundary share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage, name in enumerate(stage_names):
        values = [result[key][stage] for key in (
            "depth_mean_iou", "exit_share", "exit_agreement", "exit_accuracy", "reference_accuracy",
            "exit_boundary_share",
        )]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(map(percent, values)) + " |")
    lines.append(f"| all tokens | | 100.0 | | | | {percent(result['boundary_share'])} |")
    return "\n".join(lines)


__all__ = [
    "EXIT_COUNT_NAMES",
    "EXIT_KEYS",
    "PROFILE_KEYS",
    "ExitDiagnostics",
    "SweepDiagnostics",
    "batch_diagnostics",
    "boundary_tokens",
    "depth_confusions",
    "diagnose_batch",
    "exit_counts",
    "exit_labels",
    "format_diagnostics_markdown",
    "stage_class_maps",
    "token_ground_truth",
    "token_labels",
]
