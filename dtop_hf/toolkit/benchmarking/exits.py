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
"""Where tokens exit in a benchmark of random-weight models: drawn from the paper's GFLOPs reductions, or at a
chosen exit rate.

Random heads' confidence means nothing, so `paper` exits are drawn from a distribution fitted to the paper and
handed to the model's exit decision as the auxiliary heads' class scores (the heads themselves still run in full);
everything after that, the threshold test at the model's thresholds, keep-top-k, the repacking and the layers on
fewer tokens, is the path a trained model takes.

* Rate: each image loses a share p of its still-active tokens at every auxiliary head (p N after the first head,
  (1 - p)^2 N tokens reach the last stage), less the tokens keep-top-k holds back. The mean of p is solved so that
  the expected GFLOPs (backbone + decode head, the paper's convention, counted by `flops_from_token_counts`) shrink
  as much as the paper reports for SegViT + DToP@Finetune on ADE20K: ViT-B/16 at 512, 109.9 -> 86.8 GFLOPs (its
  Table 1; mean p = 0.30) and ViT-L/16 at 640, 617.0 -> 412.8 (its Table 7, threshold 0.95; mean p = 0.38).
  Backbones of 24 layers or more use ViT-L's figures, shallower ones ViT-B's. Realised ratios at batch 8 and 32
  (all heads counted): 1.26 for ViT-B (paper 1.27), 1.49 for ViT-L (paper 1.49).
* Spread: the paper reports data-set averages and shows (its Fig. 4) that simple scenes lose most tokens at the
  first head while complex scenes keep most of them to the end; it gives no per-image distribution, so we assume
  p ~ Beta(4 m, 4 (1 - m)) (mean m, standard deviation about 0.2). A batch of n images gets the distribution's n
  stratified quantiles, (i + 0.5) / n, in random order (batch 1: its median, p = 0.27 for ViT-B, 0.36 ViT-L).
* Where: the paper sees the middles of objects exit and their boundaries stay; each image gets six smooth random
  regions, and tokens exit in order of their margin between their region's field and the next one's.

`rate` exits instead set each head's threshold to the confidence quantile at which a given share of the active
tokens exits; `model` exits are a trained model's own thresholds.

`capacity` exits run the model in capacity mode: after auxiliary head i, `ceil(exit_capacity[i] * num_patches)`
tokens of every image go on, whatever the heads' scores, so the cost is fixed by the capacities and the input size
(the rule whose exported graph has static shapes). Without given capacities, [`capacities_for_flops_ratio`] solves
for the ones at which every auxiliary head keeps the same share of the active tokens and R (all heads) is the
paper's, and the benchmark moves their kept counts onto multiples of 16 tokens ([`aligned_capacities`]).
"""

import itertools
import math
from typing import Literal

import torch
from torch import nn

from dtop_hf import DToPConfig, DToPForSemanticSegmentation
from dtop_hf.modeling_dtop import DToPModel

from ..evaluation.flops import capacity_flops_ratio, capacity_token_counts, flops_from_token_counts
from ..presets import DEEP_BACKBONE_LAYERS


ExitSource = Literal["paper", "rate", "model", "capacity"]
EXIT_SOURCES: tuple[ExitSource, ...] = ("paper", "rate", "model", "capacity")
# The unpruned baseline's exit rule: threshold 1.0, no token exits (whatever mode the config holds).
UNPRUNED: dict[str, float] = {"exit_threshold": 1.0}
# Capacity mode's: capacity 1.0, the same computation bit for bit, and one graph under torch.compile like the pruned
# capacity run (threshold mode's exit bookkeeping stays out of compiled graphs: a graph break per auxiliary head).
UNPRUNED_CAPACITY: dict[str, str | float] = {"exit_mode": "capacity", "exit_capacity": 1.0}
# SegViT + DToP@Finetune on ADE20K, GFLOPs unpruned -> pruned (backbone + decode head): the paper's Table 1
# (ViT-B/16, 512 crop, 160k + finetune) and Table 7 (ViT-L/16, 640 crop, threshold 0.95).
PAPER_GFLOPS = {"vit-base": (109.9, 86.8), "vit-large": (617.0, 412.8)}
# Per-image exit rate p ~ Beta(c m, c (1 - m)): the concentration c sets the spread (std ~0.2 at c = 4).
EXIT_RATE_CONCENTRATION = 4.0
EXIT_RATE_GRID_POINTS = 2000  # midpoint grid over (0, 1) for the Beta's expectation and quantiles
REGIONS_PER_IMAGE = 6
# The capacity solver's bisection: 40 halvings of (0, 1] resolve the shared share far below one token's step, and
# its lowest share leaves one token after the first head.
CAPACITY_SOLVER_STEPS, CAPACITY_SOLVER_LOWEST_SHARE = 40, 1e-9


class DrawnProbabilities:
    """Stands in for an auxiliary head in the model's exit decision when the scores it reads were drawn in advance:
    they are probabilities already."""

    @staticmethod
    def scores_to_probabilities(class_scores: torch.Tensor) -> torch.Tensor:
        return class_scores


class SimulatedExitsModel(DToPModel):
    """[`DToPModel`] whose exit decisions can read drawn class scores (`paper` exits) instead of the heads' own.

    It overrides the model's exit decision, `select_exits`, and nothing else: the heads, their outputs and every
    step after the decision are the model's. The scores are non-persistent buffers, so a compiled model reads them
    as inputs and new draws of the same shape reuse its graphs.
    """

    def __init__(self, config: DToPConfig):
        super().__init__(config)
        self.uses_drawn_scores = False
        for index in range(len(config.out_indices) - 1):
            self.register_buffer(f"drawn_scores_{index}", torch.zeros(0), persistent=False)

    def use_drawn_scores(self, scores: list[torch.Tensor] | None) -> None:
        """Decide exits from these class scores `(batch, num_labels, tokens)`, one per auxiliary head, or from the
        heads' own again (`None`)."""
        self.uses_drawn_scores = scores is not None
        for index, values in enumerate(scores or []):
            setattr(self, f"drawn_scores_{index}", values)

    def select_exits(self, head: nn.Module, stage_scores: torch.Tensor, *args, **kwargs):
        # The stage's own scores were computed (the stage's output), so baseline and pruned runs pay for the real
        # head; only the numbers the decision reads are replaced.
        if self.uses_drawn_scores:
            for index, auxiliary_head in enumerate(self.heads[:-1]):
                if auxiliary_head is head:
                    head, stage_scores = DrawnProbabilities, getattr(self, f"drawn_scores_{index}").float()
        return super().select_exits(head, stage_scores, *args, **kwargs)


class SimulatedExitsSegmenter(DToPForSemanticSegmentation):
    """[`DToPForSemanticSegmentation`] on a [`SimulatedExitsModel`], for random-weight benchmarks."""

    def __init__(self, config: DToPConfig):
        with torch.device("meta"):  # the parent's plain DToPModel is replaced at once: its weights need no drawing
            super().__init__(config)
        self.dtop = SimulatedExitsModel(config)
        self.post_init()


def unpruned_rule(exits: str | None) -> dict:
    """The baseline's forward arguments for runs of exit source `exits`: capacity 1.0 beside capacity exits (so
    that a compiled baseline is one graph, as the pruned run is), threshold 1.0 otherwise."""
    return UNPRUNED_CAPACITY if exits == "capacity" else UNPRUNED


def paper_gflops(config: DToPConfig) -> tuple[float, float]:
    """The paper's GFLOPs unpruned -> pruned of the official model closest to `config` (by depth)."""
    return PAPER_GFLOPS["vit-large" if config.num_hidden_layers >= DEEP_BACKBONE_LAYERS else "vit-base"]


def exit_rate_grid() -> torch.Tensor:
    """Midpoints of `EXIT_RATE_GRID_POINTS` equal steps of (0, 1), float64."""
    return (torch.arange(EXIT_RATE_GRID_POINTS, dtype=torch.float64) + 0.5) / EXIT_RATE_GRID_POINTS


def exit_rate_weights(mean: float, rates: torch.Tensor) -> torch.Tensor:
    """Beta(c mean, c (1 - mean)) probability of each grid point, normalised to sum to 1."""
    concentration = torch.tensor(EXIT_RATE_CONCENTRATION, dtype=torch.float64)
    distribution = torch.distributions.Beta(concentration * mean, concentration * (1.0 - mean))
    weights = distribution.log_prob(rates).exp()
    return weights / weights.sum()


def gflops_at_exit_rates(config: DToPConfig, num_patches: int, rates: torch.Tensor) -> torch.Tensor:
    """Paper-convention GFLOPs (backbone + decode head) of an image whose heads each let `rate` of the active
    tokens exit, one value per rate `(points,)`; rate 0 is the unpruned model. Keep-top-k holds back the most
    confident `keep_top_k` tokens of each region's class at every head: they never exit."""
    num_stages = len(config.out_indices)
    exited_share = 1.0 - (1.0 - rates)[:, None] ** torch.arange(num_stages)  # (points, stages)
    held_back = config.keep_top_k * min(REGIONS_PER_IMAGE, config.num_labels)
    tokens_per_stage = num_patches - ((num_patches * exited_share).round() - held_back).clamp(min=0).long()
    stage_of_layer = [sum(layer > index for index in config.out_indices) for layer in range(config.num_hidden_layers)]
    tokens_per_layer = tokens_per_stage[:, stage_of_layer] + config.num_prefix_tokens
    return flops_from_token_counts(config, tokens_per_layer, tokens_per_stage).backbone_and_final_head


def paper_exit_rate_mean(config: DToPConfig, num_patches: int) -> float:
    """Mean per-head exit rate m at which the expected GFLOPs ratio, over p ~ Beta(c m, c (1 - m)), is the paper's."""
    unpruned, pruned = paper_gflops(config)
    rates = exit_rate_grid()
    unpruned_gflops = gflops_at_exit_rates(config, num_patches, torch.zeros(1, dtype=torch.float64))
    ratios = gflops_at_exit_rates(config, num_patches, rates) / unpruned_gflops
    low, high = 1e-3, 1.0 - 1e-3
    for _ in range(50):  # bisection: a larger mean exits more tokens, so the expected ratio falls
        mean = (low + high) / 2
        if float((exit_rate_weights(mean, rates) * ratios).sum()) > pruned / unpruned:
            low = mean
        else:
            high = mean
    return (low + high) / 2


def paper_exit_rates(
    config: DToPConfig, num_patches: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Per-image exit rates `(batch,)`: the Beta's `batch_size` stratified quantiles in random order, and its mean."""
    mean = paper_exit_rate_mean(config, num_patches)
    rates = exit_rate_grid()
    cumulative = exit_rate_weights(mean, rates).cumsum(dim=0)
    quantiles = (torch.arange(batch_size, dtype=torch.float64) + 0.5) / batch_size
    drawn = rates[torch.searchsorted(cumulative, quantiles).clamp(max=len(rates) - 1)]
    return drawn[torch.randperm(batch_size, generator=generator)].float(), mean


def paper_exit_scores(
    config: DToPConfig, rates: torch.Tensor, grid_size: tuple[int, int], generator: torch.Generator
) -> list[torch.Tensor]:
    """Per auxiliary head, class scores `(batch, num_labels, tokens)` under which exactly the drawn tokens clear the
    head's threshold: after head k, a share 1 - (1 - p)^(k + 1) of every image's tokens, middles of regions first.

    The confidence (top score) of the exiting tokens lies in (threshold + (1 - threshold) / 2, 1], highest in the
    middle of a region, so keep-top-k holds back each region's most central tokens; the others score below the
    threshold. The top score is the token's region's class; the rest share what is left.
    """
    batch_size, num_labels = len(rates), config.num_labels
    num_tokens = grid_size[0] * grid_size[1]
    num_regions = min(REGIONS_PER_IMAGE, num_labels)
    coarse = torch.randn(batch_size, num_regions, 4, 4, generator=generator)
    fields = nn.functional.interpolate(coarse, size=grid_size, mode="bicubic", align_corners=False).flatten(2)
    top_fields = fields.topk(min(2, num_regions), dim=1).values  # (batch, 2, tokens)
    margin = top_fields[:, 0] - top_fields[:, -1] if num_regions > 1 else top_fields[:, 0]
    labels = torch.stack([torch.randperm(num_labels, generator=generator)[:num_regions] for _ in range(batch_size)])
    predicted_class = labels.gather(1, fields.argmax(dim=1))  # (batch, tokens)
    # Rank in [0, 1) by margin, 0 for the token deepest inside its region: the order in which an image's tokens exit.
    order = margin.argsort(dim=1, descending=True)
    positions = (torch.arange(num_tokens, dtype=torch.float32) / num_tokens).expand(batch_size, -1)
    rank = torch.empty_like(margin).scatter_(1, order, positions)
    scores = []
    for head_index, threshold in enumerate(config.exit_thresholds_per_head(None)[:-1]):
        exited_share = 1.0 - (1.0 - rates[:, None]) ** (head_index + 1)  # (batch, 1)
        exits = rank < exited_share
        exit_confidence = threshold + (1.0 - threshold) * (1.0 - 0.5 * rank / exited_share.clamp(min=1e-6))
        confidence = torch.where(exits, exit_confidence, 0.9 * threshold * (1.0 - rank))  # (batch, tokens)
        class_scores = ((1.0 - confidence) / max(num_labels - 1, 1)).unsqueeze(1).repeat(1, num_labels, 1)
        scores.append(class_scores.scatter_(1, predicted_class.unsqueeze(1), confidence.unsqueeze(1)))
    return scores


@torch.no_grad()
def seeded_thresholds(model: DToPForSemanticSegmentation, pixel_values: torch.Tensor, exit_rate: float) -> list[float]:
    """Per auxiliary head, the confidence quantile at which `exit_rate` of the still-active tokens exit."""
    num_auxiliary = len(model.config.out_indices) - 1
    thresholds = [1.0] * num_auxiliary
    for stage in range(num_auxiliary):
        outputs = model(pixel_values, exit_threshold=thresholds)
        confidence = model.class_probabilities(outputs.stage_logits[stage]).amax(dim=1).flatten()
        active = (outputs.exit_stage >= stage).flatten()
        thresholds[stage] = min(float(confidence[active].float().quantile(1.0 - exit_rate)), 1.0)
    return thresholds


def paper_flops_ratio(config: DToPConfig) -> float:
    """The paper's R = GFLOPs unpruned / pruned of the official model closest to `config` (ViT-B/16: 1.27)."""
    unpruned, pruned = paper_gflops(config)
    return unpruned / pruned


def shared_share_capacities(config: DToPConfig, keep: float) -> tuple[float, ...]:
    """Capacities at which every auxiliary head keeps the same share `keep` of the tokens still active:
    `keep ** (i + 1)` after head i."""
    return tuple(keep ** (index + 1) for index in range(len(config.out_indices) - 1))


def capacities_for_flops_ratio(
    config: DToPConfig,
    image_size: tuple[int, int],
    flops_ratio: float,
    figure: str = "total",
    token_multiple: int = 1,
) -> tuple[float, ...]:
    """Capacities, one per auxiliary head, at which capacity mode reaches R = GFLOPs unpruned / pruned of
    `flops_ratio` at this input size, counted by [`capacity_flops_ratio`] (`figure`: all heads, or the paper's
    backbone and decode head).

    Every head keeps the same share k of the tokens still active ([`shared_share_capacities`]; at ViT-B 512 and
    R 1.27, about (0.734, 0.539)), and k is the largest share whose R is at least `flops_ratio`, found by bisection:
    R only falls as k grows. Token counts are whole numbers, so R moves in steps of about one token's cost: the
    result lies within one step above the target (a few thousandths at 1024 patches, about 0.02 at 64). With
    `token_multiple` above 1, the kept counts are then moved onto multiples of it ([`aligned_capacities`]).

    Raises:
        ValueError: `flops_ratio` is out of reach, even with one token left after the first head.
    """

    def ratio(keep: float) -> float:
        return capacity_flops_ratio(config, image_size, shared_share_capacities(config, keep), figure)

    if flops_ratio <= 1.0:
        return shared_share_capacities(config, 1.0)
    low, high = CAPACITY_SOLVER_LOWEST_SHARE, 1.0  # invariant: ratio(low) >= flops_ratio > ratio(high)
    if ratio(low) < flops_ratio:
        raise ValueError(
            f"R = {flops_ratio} is out of reach at {image_size[0]}x{image_size[1]}: capacity mode saves at most "
            f"R = {ratio(low):.3f} there (one token left after the first auxiliary head)."
        )
    for _ in range(CAPACITY_SOLVER_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) >= flops_ratio else (low, middle)
    capacities = shared_share_capacities(config, low)
    if token_multiple == 1:
        return capacities
    return aligned_capacities(config, image_size, capacities, flops_ratio, token_multiple, figure)


def aligned_capacities(
    config: DToPConfig,
    image_size: tuple[int, int],
    capacities: tuple[float, ...],
    flops_ratio: float,
    token_multiple: int,
    figure: str = "total",
) -> tuple[float, ...]:
    """The capacities next to `capacities` at which every stage's layers see a multiple of `token_multiple` tokens
    (prefix tokens included) and R is still at least `flops_ratio`: each head's kept count is rounded down or up to
    such a size (never past the grid), and of the combinations that do not increase from head to head, the one with
    the smallest R at or above the target wins. `capacities` as they are when none reaches it.

    Matrix-product kernels work in tiles of rows (16 float32 lanes of an AVX-512 register; 8 or 16 rows of a GPU's
    tensor-core tile), so a token count just past a multiple pays for a tile it barely uses: a deployment picks
    capacities that land on whole tiles, as it pads a vocabulary to a multiple of 64.
    """
    # Patch tokens each head sees: the whole grid first, then what every auxiliary head keeps.
    num_tokens, *counts = capacity_token_counts(config, image_size, capacities)[1][0].tolist()
    num_prefix = config.num_prefix_tokens

    def rounded(count: int) -> set[int]:
        below = (count + num_prefix) // token_multiple * token_multiple - num_prefix
        above = below if below == count else below + token_multiple
        return {size for size in (below, min(above, num_tokens)) if size >= 1}

    best, best_ratio = capacities, math.inf
    for combination in itertools.product(*(sorted(rounded(count)) for count in counts)):
        if any(later > earlier for earlier, later in zip(combination, combination[1:])):
            continue
        candidate = tuple(count / num_tokens for count in combination)
        candidate_ratio = capacity_flops_ratio(config, image_size, candidate, figure)
        if flops_ratio <= candidate_ratio < best_ratio:
            best, best_ratio = candidate, candidate_ratio
    return best


def capacity_exits(
    config: DToPConfig,
    image_size: tuple[int, int],
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    flops_ratio: float | None = None,
    token_multiple: int = 1,
) -> tuple[dict, dict]:
    """The exit rule of `capacity` exits: the given capacities, or those solved for `flops_ratio` (default: the
    paper's R, [`paper_flops_ratio`]) at this input size with kept counts on multiples of `token_multiple` (see
    [`capacities_for_flops_ratio`]); and what to record of them."""
    solved = {}
    if exit_capacity is None:
        flops_ratio = paper_flops_ratio(config) if flops_ratio is None else flops_ratio
        exit_capacity = capacities_for_flops_ratio(config, image_size, flops_ratio, token_multiple=token_multiple)
        solved = {"capacity_token_multiple": token_multiple}
    capacities = list(config.exit_capacities_per_head(exit_capacity)[:-1])  # validated, one per auxiliary head
    return {"exit_mode": "capacity", "exit_capacity": capacities}, {
        "exits": "capacity",
        "target_flops_ratio": flops_ratio,
        **solved,
    }


def prepare_exits(
    model: DToPForSemanticSegmentation,
    pixel_values: torch.Tensor,
    exits: ExitSource,
    exit_rate: float | None = None,
    seed: int = 0,
    exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    flops_ratio: float | None = None,
    token_multiple: int = 1,
) -> tuple[dict, dict]:
    """Set up the pruned runs' exits for these images.

    Args:
        model: the benchmarked model; `paper` exits need a [`SimulatedExitsSegmenter`].
        pixel_values: the images `(batch, channels, height, width)`.
        exits: `paper`, `rate` (thresholds at which `exit_rate` of the active tokens exit), `model` (its own) or
            `capacity` (capacity mode at `exit_capacity`, or at the capacities that reach `flops_ratio`).
        exit_rate: the share of `rate` exits.
        seed: seed of the drawn exits.
        exit_capacity, flops_ratio, token_multiple: see [`capacity_exits`].

    Returns:
        The pruned calls' exit rule, as keyword arguments of the model's forward (`exit_threshold`, `None` for the
        model's own; or `exit_mode` and `exit_capacity`), and what to record of the exits.
    """
    simulated = model.dtop if isinstance(model.dtop, SimulatedExitsModel) else None
    if exits != "paper":
        if simulated is not None:
            simulated.use_drawn_scores(None)
        if exits == "capacity":
            image_size = tuple(pixel_values.shape[-2:])
            return capacity_exits(model.config, image_size, exit_capacity, flops_ratio, token_multiple)
        if exits == "rate":
            threshold = seeded_thresholds(model, pixel_values, exit_rate)
            return {"exit_threshold": threshold}, {"exits": "rate", "exit_rate": exit_rate}
        return {"exit_threshold": None}, {"exits": "model"}
    if simulated is None:
        raise ValueError("`paper` exits need a random-weight `SimulatedExitsSegmenter` (see `build_benchmark_model`).")
    config, generator = model.config, torch.Generator().manual_seed(seed)
    grid_size = tuple(math.ceil(side / config.patch_size) for side in pixel_values.shape[-2:])
    rates, mean = paper_exit_rates(config, grid_size[0] * grid_size[1], pixel_values.shape[0], generator)
    scores = paper_exit_scores(config, rates, grid_size, generator)
    simulated.use_drawn_scores([score.to(pixel_values.device) for score in scores])
    return {"exit_threshold": None}, {
        "exits": "paper",
        "paper_gflops_unpruned_pruned": list(paper_gflops(config)),
        "exit_rate_mean": mean,
        "exit_rates_per_image": rates.tolist(),
    }
