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
"""Exit-threshold calibration: pick the threshold that meets a GFLOPs budget or an mIoU-drop limit on validation data.

The paper leaves the threshold to be "chosen empirically with a small validation set" (§4.3.2); this does it. A
sweep result is a dict with at least the threshold, the mIoU and the GFLOPs per image of one evaluation run.
Two constraints, one at a time:

- `target_gflops`: mean GFLOPs per image at most this; among the thresholds that fit, the best mIoU.
- `max_miou_drop`: mIoU at most this far below the unpruned baseline (threshold 1.0); among the thresholds that
  fit, the fewest GFLOPs (the largest saving).
"""

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path


THRESHOLD_KEY = "exit_threshold"
MIOU_KEY = "mean_iou"
GFLOPS_KEY = "gflops"


def check_constraint(target_gflops: float | None, max_miou_drop: float | None) -> None:
    """Exactly one of the two constraints, with a sensible value."""
    if (target_gflops is None) == (max_miou_drop is None):
        raise ValueError(
            f"Pass exactly one of `target_gflops` and `max_miou_drop`, got target_gflops={target_gflops} and "
            f"max_miou_drop={max_miou_drop}."
        )
    if target_gflops is not None and not target_gflops > 0:
        raise ValueError(f"`target_gflops` must be > 0, got {target_gflops}.")
    if max_miou_drop is not None and not max_miou_drop >= 0:
        raise ValueError(f"`max_miou_drop` must be >= 0, got {max_miou_drop}.")


def baseline_result(results: Sequence[dict]) -> dict:
    """The unpruned run (threshold 1.0), against which mIoU drops are measured."""
    for result in results:
        if result[THRESHOLD_KEY] == 1.0:
            return result
    thresholds = [result[THRESHOLD_KEY] for result in results]
    raise ValueError(
        f"`max_miou_drop` is measured against the unpruned baseline, but no result has {THRESHOLD_KEY}=1.0 "
        f"(got thresholds {thresholds}): evaluate threshold 1.0 too."
    )


def meets_constraint(
    result: dict,
    target_gflops: float | None,
    max_miou_drop: float | None,
    baseline_miou: float | None,
    gflops_key: str = GFLOPS_KEY,
) -> bool:
    """Whether one sweep result satisfies the constraint (an mIoU of NaN never does)."""
    if target_gflops is not None:
        return result[gflops_key] <= target_gflops
    miou = result[MIOU_KEY]
    # Tolerance for float noise, so that the baseline always meets a zero drop.
    return not math.isnan(miou) and baseline_miou - miou <= max_miou_drop + 1e-12


def choose_threshold(
    results: Sequence[dict],
    target_gflops: float | None = None,
    max_miou_drop: float | None = None,
    gflops_key: str = GFLOPS_KEY,
) -> dict:
    """Pick, among evaluated thresholds, the one that meets the constraint with the largest saving.

    Args:
        results: sweep results, each a dict with `exit_threshold`, `mean_iou` and `gflops` (mean GFLOPs per image).
        target_gflops: budget in GFLOPs per image; the best mIoU among the thresholds within it is chosen (ties:
            fewer GFLOPs).
        max_miou_drop: largest acceptable mIoU loss against threshold 1.0, in the units of `mean_iou`; the fewest
            GFLOPs among the thresholds within it are chosen (ties: higher mIoU).
        gflops_key: the result field that holds the cost (`gflops`: every head; or, for instance,
            `gflops_backbone_and_final_head`: the paper's convention).

    Returns:
        The chosen result dict (one of `results`).
    """
    check_constraint(target_gflops, max_miou_drop)
    if not results:
        raise ValueError("`results` is empty: evaluate at least one threshold before choosing.")
    baseline_miou = baseline_result(results)[MIOU_KEY] if max_miou_drop is not None else None
    feasible = [
        result
        for result in results
        if meets_constraint(result, target_gflops, max_miou_drop, baseline_miou, gflops_key)
    ]
    if not feasible:
        cheapest = min(results, key=lambda result: result[gflops_key])
        raise ValueError(
            f"No evaluated threshold meets `target_gflops`={target_gflops}: the cheapest, "
            f"{THRESHOLD_KEY}={cheapest[THRESHOLD_KEY]}, costs {cheapest[gflops_key]:.3f} GFLOPs per image. "
            "Raise the budget or evaluate lower thresholds."
        )
    if target_gflops is not None:
        # NaN mIoU sorts last.
        return max(feasible, key=lambda result: (_finite_or(result[MIOU_KEY], -math.inf), -result[gflops_key]))
    return min(feasible, key=lambda result: (result[gflops_key], -result[MIOU_KEY]))


def _finite_or(value: float, default: float) -> float:
    return default if math.isnan(value) else value


def refinement_bracket(
    results: Sequence[dict], chosen: dict, target_gflops: float | None
) -> tuple[float, float] | None:
    """The interval between the chosen threshold and the nearest evaluated one on the side of more saving that
    failed the constraint, where a better threshold may lie; `None` when there is no such neighbour.

    More saving lies at higher thresholds for a GFLOPs budget (more mIoU within it) and at lower thresholds for an
    mIoU-drop limit (fewer GFLOPs within it).
    """
    chosen_threshold = chosen[THRESHOLD_KEY]
    thresholds = sorted({result[THRESHOLD_KEY] for result in results})
    if target_gflops is not None:
        above = [threshold for threshold in thresholds if threshold > chosen_threshold]
        return (chosen_threshold, above[0]) if above else None
    below = [threshold for threshold in thresholds if threshold < chosen_threshold]
    return (below[-1], chosen_threshold) if below else None


def calibrate_threshold(
    evaluate: Callable[[float], dict],
    thresholds: Sequence[float],
    target_gflops: float | None = None,
    max_miou_drop: float | None = None,
    num_refinements: int = 3,
    min_step: float = 1e-3,
    gflops_key: str = GFLOPS_KEY,
) -> tuple[dict, list[dict]]:
    """Sweep `thresholds`, then bisect towards the boundary of the constraint, and choose.

    The sweep is evaluated first (with 1.0 added for `max_miou_drop`, which needs the baseline). Each refinement
    evaluates the midpoint of [`refinement_bracket`], where the cost/accuracy trade-off turns from meeting the
    constraint to failing it; the final choice is [`choose_threshold`] over every evaluated result, so the answer
    always meets the constraint on the measured data, even where mIoU does not change monotonically.

    Args:
        evaluate: runs the model on the validation data at one threshold and returns a result dict
            (`exit_threshold`, `mean_iou`, `gflops`, anything else).
        thresholds: the sweep grid, each in (0, 1].
        target_gflops, max_miou_drop: the constraint, see [`choose_threshold`].
        num_refinements: bisection steps after the sweep.
        min_step: stop bisecting when the bracket is narrower than this.
        gflops_key: the result field that holds the cost, see [`choose_threshold`].

    Returns:
        The chosen result and every result evaluated, sorted by decreasing threshold.
    """
    check_constraint(target_gflops, max_miou_drop)
    check_thresholds(thresholds)
    grid = sorted(set(float(threshold) for threshold in thresholds) | ({1.0} if max_miou_drop is not None else set()))
    results = {threshold: {**evaluate(threshold), THRESHOLD_KEY: threshold} for threshold in reversed(grid)}
    for _ in range(num_refinements):
        chosen = choose_threshold(list(results.values()), target_gflops, max_miou_drop, gflops_key)
        bracket = refinement_bracket(list(results.values()), chosen, target_gflops)
        if bracket is None or bracket[1] - bracket[0] < min_step:
            break
        midpoint = round((bracket[0] + bracket[1]) / 2, 6)
        if midpoint in results:
            break
        results[midpoint] = {**evaluate(midpoint), THRESHOLD_KEY: midpoint}
    all_results = sorted(results.values(), key=lambda result: -result[THRESHOLD_KEY])
    return choose_threshold(all_results, target_gflops, max_miou_drop, gflops_key), all_results


def check_thresholds(thresholds: Sequence[float]) -> None:
    """Thresholds must lie in (0, 1]: a token's top class score lies in [0, 1] and exits when strictly above."""
    if not thresholds:
        raise ValueError("`thresholds` is empty: give at least one exit threshold in (0, 1], e.g. 1.0 0.95 0.9.")
    outside = [threshold for threshold in thresholds if not 0.0 < threshold <= 1.0]
    if outside:
        raise ValueError(
            f"Exit thresholds must lie in (0, 1] (1.0 = no pruning), got {outside}. A token exits when its top "
            "class score is strictly above the threshold."
        )


def json_ready(value):
    """A result made strict JSON: NaN / inf (e.g. the IoU of an absent class) -> None, tuples -> lists, tensors and
    numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_calibrated_model(model, image_processor, output_dir: str | Path, chosen: dict) -> Path:
    """Save a copy of `model` (and its image processor) whose config carries the chosen `exit_threshold`, with the
    measurement behind the choice in `calibration.json`; the model in memory keeps its own threshold.

    Args:
        model: a DToP model (`save_pretrained`, `config.exit_threshold`).
        image_processor: saved beside the model, or `None`.
        output_dir: the folder to write.
        chosen: the chosen result (from [`choose_threshold`] / [`calibrate_threshold`]).

    Returns:
        The folder.
    """
    output_dir = Path(output_dir)
    original_threshold = model.config.exit_threshold
    model.config.exit_threshold = float(chosen[THRESHOLD_KEY])
    try:
        model.save_pretrained(output_dir)
    finally:
        model.config.exit_threshold = original_threshold
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    with open(output_dir / "calibration.json", "w", encoding="utf-8") as file:
        json.dump(json_ready(chosen), file, indent=2)
    return output_dir


__all__ = [
    "calibrate_threshold",
    "check_thresholds",
    "choose_threshold",
    "json_ready",
    "refinement_bracket",
    "save_calibrated_model",
]
