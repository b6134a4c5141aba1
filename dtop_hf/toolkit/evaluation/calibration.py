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
"""Exit-threshold calibration: the thresholds that meet a GFLOPs budget or an mIoU-drop limit on calibration data.

The paper uses one threshold for every auxiliary head, "chosen empirically with a small validation set" (§4.3.2).
Heads differ, so this also searches one threshold per auxiliary head. A sweep result is a dict with at least the
threshold (`exit_threshold`: a float for every head alike, or a tuple with one value per auxiliary head), the
mIoU and the GFLOPs per image of one evaluation run. Two constraints, one at a time:

- `target_gflops`: mean GFLOPs per image at most this; among the thresholds that fit, the best mIoU.
- `max_miou_drop`: mIoU at most this far below the unpruned baseline (threshold 1.0); among the thresholds that
  fit, the fewest GFLOPs (the largest saving).

[`calibrate_threshold`] sweeps and bisects one threshold for all heads. [`calibrate_per_head_thresholds`] starts
from that answer and searches one threshold per head by local search on per-head grids (whole-line coordinate
moves plus one-step moves of several heads at once, then finer grids around the answer), which needs about a
hundred evaluations where a full grid of 11 values over 3 heads needs 1331. Both extend the sweep below its lowest
threshold when no swept threshold saves anything (and, for an mIoU-drop limit, while the lowest threshold tried is
still the best), and raise [`NothingToCalibrateError`] when even the lowest threshold lets no token exit.

The same search serves capacity mode's knob (the fraction of tokens still active after each auxiliary head,
[`calibrate_per_head_capacities`]): an [`ExitKnob`] says which result field holds the setting, its lowest value
and whether the values must not increase from head to head (capacities must not). Lower capacities, like lower
thresholds, save more, so every step of the search reads the same way for both.

An exit rule is the mode and the knob's value, as the model's per-call arguments take them:
`{"exit_mode": "capacity", "exit_capacity": (0.7, 0.5)}` ([`ExitKnob.rule`]). Each result carries its rule, so that
threshold and capacity results can share one sweep, one report and one plot ([`knob_of`], [`setting_key`],
[`format_exit_rule`]).

Calibrate on data the final report does not use (a calibration split), and report the chosen thresholds on the
evaluation split: the search picks the best of many noisy measurements, so its own numbers are optimistic. For an
mIoU-drop limit, a `drop_bound` (an upper confidence bound of the drop instead of the measured drop,
[`~toolkit.evaluation.bootstrap.miou_drop_upper_bound`]) keeps a margin for that noise.
"""

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from ...configuration_dtop import normalize_exit_capacity, normalize_exit_threshold


THRESHOLD_KEY = "exit_threshold"
CAPACITY_KEY = "exit_capacity"
MIOU_KEY = "mean_iou"
# A calibration result's upper bound of its mIoU drop (mIoU units), when the calibration used one.
MIOU_DROP_BOUND_KEY = "miou_drop_upper_bound"
GFLOPS_KEY = "gflops"
# Thresholds are rounded to this many decimals (midpoints of 0.1-spaced grids stay readable and cache keys exact).
THRESHOLD_DECIMALS = 6
# No threshold below this is tried when the sweep is extended downward.
DEFAULT_MIN_THRESHOLD = 0.01
# No capacity below this either: 5% of the tokens still go on after each auxiliary head.
DEFAULT_MIN_CAPACITY = 0.05

Threshold = float | tuple[float, ...]
# `{"exit_mode": ..., "exit_threshold" or "exit_capacity": ...}`: the model's per-call arguments of one setting.
ExitRule = Mapping[str, Any]


class NothingToCalibrateError(ValueError):
    """No threshold down to the lowest one tried saves any GFLOPs: the model never exits a token on this data."""


@dataclass(frozen=True)
class ExitKnob:
    """The setting a calibration searches, one value in (0, 1] per auxiliary head (1.0 = no exit); lower values
    make more tokens exit.

    Attributes:
        key: the result field (and the model's per-call argument) holding the setting.
        name: how messages name one value.
        plural: how messages name several.
        mode: the model's `exit_mode` the setting applies in.
        non_increasing: the values must not increase from one head to the next.
        min_value: the lowest value a calibration tries when it extends its sweep downward.
        nothing_saved_hint: what to do when no value down to the lowest one saves any GFLOPs.
    """

    key: str
    name: str
    plural: str
    mode: str
    non_increasing: bool = False
    min_value: float = DEFAULT_MIN_THRESHOLD
    nothing_saved_hint: str = ""

    @property
    def noun(self) -> str:
        """`threshold` or `capacity`: the name without its `exit`."""
        return self.name.removeprefix("exit ")

    def allows(self, setting: tuple[float, ...]) -> bool:
        """Whether a per-head setting is one the model accepts (capacities: non-increasing)."""
        return not self.non_increasing or all(later <= earlier for earlier, later in zip(setting, setting[1:]))

    def rule(self, value: Threshold | Sequence[float]) -> dict[str, Any]:
        """The exit rule of one value of this knob (one for every head, or one per head), in its compact form."""
        return {"exit_mode": self.mode, self.key: compact_threshold(value)}


THRESHOLD = ExitKnob(
    THRESHOLD_KEY,
    "exit threshold",
    "exit thresholds",
    "threshold",
    nothing_saved_hint="The model's auxiliary heads are never that confident, so no threshold saves anything: "
    "fine-tune it with pruning on (`examples/finetune.py --stage prune`) before calibrating.",
)
CAPACITY = ExitKnob(
    CAPACITY_KEY,
    "exit capacity",
    "exit capacities",
    "capacity",
    non_increasing=True,
    min_value=DEFAULT_MIN_CAPACITY,
    nothing_saved_hint="The token grid is too small for these capacities to drop a token: calibrate at a larger "
    "input size.",
)
KNOBS = (THRESHOLD, CAPACITY)


def per_head(
    threshold: Threshold | Sequence[float], num_heads: int, name: str = "exit threshold"
) -> tuple[float, ...]:
    """One value per auxiliary head: `0.8` -> `(0.8, 0.8)` for 2 heads; a sequence must have `num_heads` values.
    `name` names the setting in the error."""
    if isinstance(threshold, (int, float)):
        return (round(float(threshold), THRESHOLD_DECIMALS),) * num_heads
    values = tuple(round(float(value), THRESHOLD_DECIMALS) for value in threshold)
    if len(values) != num_heads:
        raise ValueError(
            f"Expected one {name} per auxiliary head ({num_heads}), got {list(values)}: give one value for "
            f"every head, or {num_heads} comma-separated values (e.g. {','.join(['0.9'] * num_heads)})."
        )
    return values


def compact_threshold(threshold: Threshold | Sequence[float]) -> Threshold:
    """The form saved and shown: a float when every head has the same value, else a tuple."""
    if isinstance(threshold, (int, float)):
        return float(threshold)
    values = tuple(float(value) for value in threshold)
    return values[0] if len(set(values)) == 1 else values


def is_uniform(threshold: Threshold | Sequence[float]) -> bool:
    """Whether every auxiliary head has the same threshold (the paper's setting)."""
    return isinstance(compact_threshold(threshold), float)


def is_unpruned(threshold: Threshold | Sequence[float]) -> bool:
    """Threshold 1.0 for every head: no token exits early."""
    values = (threshold,) if isinstance(threshold, (int, float)) else tuple(threshold)
    return all(float(value) == 1.0 for value in values)


def format_threshold(threshold: Threshold | Sequence[float]) -> str:
    """`0.8` for one threshold, `0.6 / 0.9` for one per head."""
    threshold = compact_threshold(threshold)
    if isinstance(threshold, float):
        return f"{threshold:.4g}"
    return " / ".join(f"{value:.4g}" for value in threshold)


def knob_of(rule: ExitRule) -> ExitKnob:
    """The knob of a result or exit rule: capacity mode when it holds `exit_capacity`, threshold mode otherwise (also
    for results recorded before results carried their `exit_mode`)."""
    return CAPACITY if CAPACITY_KEY in rule else THRESHOLD


def setting_of(rule: ExitRule) -> Threshold | Sequence[float]:
    """The value of a result's or rule's knob: its threshold(s) or its capacity(ies)."""
    return rule[knob_of(rule).key]


def as_exit_rule(setting: ExitRule | Threshold | Sequence[float]) -> dict[str, Any]:
    """An exit rule (a result, or a rule, read as its mode and compact value), or a bare threshold setting read as
    threshold mode's rule: the sweep takes either."""
    if isinstance(setting, Mapping):
        return knob_of(setting).rule(setting_of(setting))
    return THRESHOLD.rule(setting)


def setting_key(rule: ExitRule, num_heads: int) -> tuple[str, tuple[float, ...]]:
    """What identifies a result's setting: its mode and one value per auxiliary head. Every unpruned setting
    (threshold or capacity 1.0) is the same computation, bit for bit, so they share one key and run once."""
    knob = knob_of(rule)
    if is_unpruned(setting_of(rule)):
        return ("unpruned", ())
    return (knob.mode, per_head(setting_of(rule), num_heads, knob.name))


def format_exit_rule(rule: ExitRule, threshold_prefix: str = "") -> str:
    """How tables and plots name a result's rule: thresholds as [`format_threshold`] gives them, after
    `threshold_prefix` (`t=0.8`); capacities marked as such (`capacity 0.7 / 0.5`)."""
    value = format_threshold(setting_of(rule))
    return f"{threshold_prefix}{value}" if knob_of(rule) is THRESHOLD else f"capacity {value}"


def speedup(result: dict, baseline: dict, gflops_key: str = GFLOPS_KEY) -> float:
    """R = GFLOPs(unpruned) / GFLOPs(pruned), per image on the same data."""
    return baseline[gflops_key] / result[gflops_key] if result[gflops_key] > 0 else math.nan


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


def baseline_result(results: Sequence[dict], key: str = THRESHOLD_KEY) -> dict:
    """The unpruned run (1.0 for every head), against which mIoU drops are measured; `key` holds the setting."""
    for result in results:
        if is_unpruned(result[key]):
            return result
    settings = [result[key] for result in results]
    raise ValueError(
        f"`max_miou_drop` is measured against the unpruned baseline, but no result has {key}=1.0 "
        f"(got {settings}): evaluate 1.0 too."
    )


# A bound on the mIoU drop of `result` against `baseline` (mIoU units), used instead of the measured drop; e.g. a
# bootstrap upper bound ([`~toolkit.evaluation.bootstrap.miou_drop_upper_bound`]).
DropBound = Callable[[dict, dict], float]


def meets_constraint(
    result: dict,
    target_gflops: float | None,
    max_miou_drop: float | None,
    baseline: dict | None,
    gflops_key: str = GFLOPS_KEY,
    drop_bound: DropBound | None = None,
) -> bool:
    """Whether one sweep result satisfies the constraint (an mIoU of NaN never does). For `max_miou_drop`, the drop
    is measured against the unpruned `baseline` result, or is `drop_bound(result, baseline)` when that is given."""
    if target_gflops is not None:
        return result[gflops_key] <= target_gflops
    miou = result[MIOU_KEY]
    drop = baseline[MIOU_KEY] - miou if drop_bound is None else drop_bound(result, baseline)
    # Tolerance for float noise, so that the baseline always meets a zero drop.
    return not math.isnan(miou) and drop <= max_miou_drop + 1e-12


def choose_threshold(
    results: Sequence[dict],
    target_gflops: float | None = None,
    max_miou_drop: float | None = None,
    gflops_key: str = GFLOPS_KEY,
    key: str = THRESHOLD_KEY,
    drop_bound: DropBound | None = None,
) -> dict:
    """Pick, among evaluated thresholds, the one that meets the constraint with the largest saving.

    Args:
        results: sweep results, each a dict with `exit_threshold` (a float, or one value per auxiliary head),
            `mean_iou` and `gflops` (mean GFLOPs per image).
        target_gflops: budget in GFLOPs per image; the best mIoU among the thresholds within it is chosen (ties:
            fewer GFLOPs).
        max_miou_drop: largest acceptable mIoU loss against threshold 1.0, in the units of `mean_iou`; the fewest
            GFLOPs among the thresholds within it are chosen (ties: higher mIoU).
        gflops_key: the result field that holds the cost (`gflops`: every head; or, for instance,
            `gflops_backbone_and_final_head`: the paper's convention).
        key: the result field that holds the setting (`exit_capacity` for capacities).
        drop_bound: for `max_miou_drop`, what limits a setting instead of its measured drop: `drop_bound(result,
            baseline)` (e.g. an upper confidence bound, [`~toolkit.evaluation.bootstrap.miou_drop_upper_bound`]).

    Returns:
        The chosen result dict (one of `results`; on exact ties, the first).
    """
    check_constraint(target_gflops, max_miou_drop)
    if not results:
        raise ValueError("`results` is empty: evaluate at least one threshold before choosing.")
    baseline = baseline_result(results, key) if max_miou_drop is not None else None
    feasible = [
        result
        for result in results
        if meets_constraint(result, target_gflops, max_miou_drop, baseline, gflops_key, drop_bound)
    ]
    if not feasible:
        cheapest = min(results, key=lambda result: result[gflops_key])
        raise ValueError(
            f"No evaluated setting meets `target_gflops`={target_gflops}: the cheapest, "
            f"{key}={cheapest[key]}, costs {cheapest[gflops_key]:.3f} GFLOPs per image. "
            "Raise the budget or evaluate lower thresholds."
        )
    if target_gflops is not None:
        # NaN mIoU sorts last.
        return max(feasible, key=lambda result: (_finite_or(result[MIOU_KEY], -math.inf), -result[gflops_key]))
    return min(feasible, key=lambda result: (result[gflops_key], -result[MIOU_KEY]))


def _finite_or(value: float, default: float) -> float:
    return default if math.isnan(value) else value


def refinement_bracket(
    results: Sequence[dict], chosen: dict, target_gflops: float | None, key: str = THRESHOLD_KEY
) -> tuple[float, float] | None:
    """The interval between the chosen threshold and the nearest evaluated one on the side of more saving that
    failed the constraint, where a better threshold may lie; `None` when there is no such neighbour. Thresholds
    shared by every head only (per-head results are skipped).

    More saving lies at higher thresholds for a GFLOPs budget (more mIoU within it) and at lower thresholds for an
    mIoU-drop limit (fewer GFLOPs within it).
    """
    chosen_threshold = chosen[key]
    thresholds = sorted({result[key] for result in results if isinstance(result[key], float)})
    if target_gflops is not None:
        above = [threshold for threshold in thresholds if threshold > chosen_threshold]
        return (chosen_threshold, above[0]) if above else None
    below = [threshold for threshold in thresholds if threshold < chosen_threshold]
    return (below[-1], chosen_threshold) if below else None


@dataclass
class EvaluationCache:
    """Evaluates each setting of the knob once; results keyed by their per-head tuple, in evaluation order.

    `evaluate` receives a float when every head shares the value, else a tuple with one value per head; its result
    gets the setting under `knob.key`.
    """

    evaluate: Callable[[Threshold], dict]
    num_heads: int
    results: dict[tuple[float, ...], dict] = field(default_factory=dict)
    knob: ExitKnob = THRESHOLD
    drop_bound: DropBound | None = None

    def __call__(self, threshold: Threshold | Sequence[float]) -> dict:
        key = per_head(threshold, self.num_heads, self.knob.name)
        if key not in self.results:
            value = compact_threshold(key)
            self.results[key] = {**self.evaluate(value), **self.knob.rule(value)}
        return self.results[key]

    def all_results(self) -> list[dict]:
        return list(self.results.values())

    def uniform_results(self) -> list[dict]:
        return [result for result in self.results.values() if isinstance(result[self.knob.key], float)]

    def choose(
        self, results: Sequence[dict], target_gflops: float | None, max_miou_drop: float | None, gflops_key: str
    ) -> dict:
        """[`choose_threshold`] on results of this knob, with the cache's `drop_bound`."""
        return choose_threshold(results, target_gflops, max_miou_drop, gflops_key, self.knob.key, self.drop_bound)


def saves_anything(results: Sequence[dict], gflops_key: str = GFLOPS_KEY) -> bool:
    """Whether some evaluated threshold costs less than another (exits happened somewhere)."""
    costs = [result[gflops_key] for result in results]
    return min(costs) < max(costs) * (1 - 1e-9)


def extend_sweep_downward(
    cache: EvaluationCache,
    target_gflops: float | None,
    gflops_key: str = GFLOPS_KEY,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> None:
    """Halve the lowest swept threshold (down to `min_threshold`) while no threshold saves GFLOPs, or, for a
    budget, while none fits it; a model that is rarely confident only starts exiting tokens low down.

    Raises:
        NothingToCalibrateError: even `min_threshold` lets no token exit.
    """

    def needs_more(results: list[dict]) -> bool:
        if not saves_anything(results, gflops_key):
            return True
        return target_gflops is not None and min(result[gflops_key] for result in results) > target_gflops

    key = cache.knob.key
    while needs_more(cache.uniform_results()):
        lowest = min(result[key] for result in cache.uniform_results())
        if lowest <= min_threshold:
            break
        cache(max(round(lowest / 2, THRESHOLD_DECIMALS), min_threshold))
    results = cache.uniform_results()
    if not saves_anything(results, gflops_key):
        highest, lowest = (bound(result[key] for result in results) for bound in (max, min))
        raise NothingToCalibrateError(
            f"Cannot calibrate: no {cache.knob.name} from {highest} down to {lowest} lets a single token exit "
            f"on this data (every one costs {results[0][gflops_key]:.4g} GFLOPs per image). "
            f"{cache.knob.nothing_saved_hint}"
        )


def sweep(
    cache: EvaluationCache,
    thresholds: Sequence[float],
    target_gflops: float | None,
    max_miou_drop: float | None,
    gflops_key: str = GFLOPS_KEY,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> None:
    """Evaluate one threshold for every head at each of `thresholds` (1.0 added for `max_miou_drop`, which needs
    the baseline), highest first, extended downward while nothing saves ([`extend_sweep_downward`])."""
    grid = sorted(set(float(threshold) for threshold in thresholds) | ({1.0} if max_miou_drop is not None else set()))
    for threshold in reversed(grid):
        cache(threshold)
    extend_sweep_downward(cache, target_gflops, gflops_key, min_threshold)


def lower_threshold(grid: Sequence[float], min_threshold: float) -> float | None:
    """The next value below a sorted grid, one grid step (its lowest spacing) down, or `None` at `min_threshold`."""
    if grid[0] <= min_threshold:
        return None
    step = grid[1] - grid[0] if len(grid) > 1 else grid[0] / 2
    return max(min_threshold, round(grid[0] - step, THRESHOLD_DECIMALS))


def extend_below_choice(
    cache: EvaluationCache,
    max_miou_drop: float | None,
    gflops_key: str = GFLOPS_KEY,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
) -> None:
    """For an mIoU-drop limit, step the shared threshold below the sweep while the lowest one evaluated is the
    best: the limit is not reached yet, and lower thresholds save more (a model whose accuracy holds far down)."""
    if max_miou_drop is None:
        return
    while True:
        results = cache.uniform_results()
        grid = sorted(result[cache.knob.key] for result in results)
        chosen = cache.choose(results, None, max_miou_drop, gflops_key)
        lower = lower_threshold(grid, min_threshold) if chosen[cache.knob.key] == grid[0] else None
        if lower is None:
            return
        cache(lower)


def bisect(
    cache: EvaluationCache,
    target_gflops: float | None,
    max_miou_drop: float | None,
    num_refinements: int = 3,
    min_step: float = 1e-3,
    gflops_key: str = GFLOPS_KEY,
) -> dict:
    """Bisect one threshold for every head towards the boundary of the constraint ([`refinement_bracket`]);
    returns the best shared threshold evaluated."""
    for _ in range(num_refinements):
        chosen = cache.choose(cache.uniform_results(), target_gflops, max_miou_drop, gflops_key)
        bracket = refinement_bracket(cache.uniform_results(), chosen, target_gflops, cache.knob.key)
        if bracket is None or bracket[1] - bracket[0] < min_step:
            break
        midpoint = round((bracket[0] + bracket[1]) / 2, THRESHOLD_DECIMALS)
        if per_head(midpoint, cache.num_heads) in cache.results:
            break
        cache(midpoint)
    return cache.choose(cache.uniform_results(), target_gflops, max_miou_drop, gflops_key)


def calibrate_threshold(
    evaluate: Callable[[float], dict],
    thresholds: Sequence[float],
    target_gflops: float | None = None,
    max_miou_drop: float | None = None,
    num_refinements: int = 3,
    min_step: float = 1e-3,
    gflops_key: str = GFLOPS_KEY,
    min_threshold: float | None = None,
    knob: ExitKnob = THRESHOLD,
    drop_bound: DropBound | None = None,
) -> tuple[dict, list[dict]]:
    """One threshold for every head: sweep `thresholds`, then bisect towards the boundary of the constraint, and
    choose. With `knob=CAPACITY`, the same for one capacity for every head.

    The sweep is evaluated first (with 1.0 added for `max_miou_drop`, which needs the baseline). When no swept
    threshold saves GFLOPs (or, for a budget, none fits it), the sweep is extended downward by halving its lowest
    threshold (see [`extend_sweep_downward`]); for `max_miou_drop`, thresholds one grid step lower are tried while
    the lowest one is the best ([`extend_below_choice`]). Each refinement evaluates the midpoint of
    [`refinement_bracket`], where the cost/accuracy trade-off turns from meeting the constraint to failing it; the
    final choice is [`choose_threshold`] over every evaluated result, so the answer always meets the constraint on
    the measured data, even where mIoU does not change monotonically.

    Args:
        evaluate: runs the model on the calibration data at one threshold and returns a result dict
            (`exit_threshold`, `mean_iou`, `gflops`, anything else).
        thresholds: the sweep grid, each in (0, 1].
        target_gflops, max_miou_drop: the constraint, see [`choose_threshold`].
        num_refinements: bisection steps after the sweep.
        min_step: stop bisecting when the bracket is narrower than this.
        gflops_key: the result field that holds the cost, see [`choose_threshold`].
        min_threshold: the lowest threshold the downward extension tries; default: the knob's `min_value`.
        knob: [`THRESHOLD`] or [`CAPACITY`]: the setting searched (and the result field that holds it).
        drop_bound: what the mIoU limit reads instead of the measured drop, see [`choose_threshold`].

    Returns:
        The chosen result and every result evaluated, sorted by decreasing threshold.

    Raises:
        NothingToCalibrateError: no threshold down to `min_threshold` lets a token exit.
    """
    check_constraint(target_gflops, max_miou_drop)
    check_knob_values(thresholds, knob)
    min_threshold = knob.min_value if min_threshold is None else min_threshold
    cache = EvaluationCache(evaluate, num_heads=1, knob=knob, drop_bound=drop_bound)
    sweep(cache, thresholds, target_gflops, max_miou_drop, gflops_key, min_threshold)
    extend_below_choice(cache, max_miou_drop, gflops_key, min_threshold)
    chosen = bisect(cache, target_gflops, max_miou_drop, num_refinements, min_step, gflops_key)
    return chosen, sorted(cache.all_results(), key=lambda result: -result[knob.key])


def threshold_neighbours(
    current: tuple[float, ...], grids: Sequence[Sequence[float]], line_radius: int | None
) -> list[tuple[float, ...]]:
    """Settings next to `current` on per-head grids.

    - Each head moved alone along its grid, at most `line_radius` steps (`None` = the whole line): coordinate
      descent.
    - Several heads moved one step each, in any directions: the moves where one head prunes more while another
      prunes less, which single-head moves cannot make under a constraint that couples the heads (3^n - 1 - 2n
      of them: 4 for 2 heads, 20 for 3).
    """
    positions = [list(grid).index(value) for grid, value in zip(grids, current, strict=True)]
    candidates = []
    for head, (grid, position) in enumerate(zip(grids, positions, strict=True)):
        radius = len(grid) if line_radius is None else line_radius
        for index in range(max(0, position - radius), min(len(grid), position + radius + 1)):
            if index != position:
                candidates.append(current[:head] + (grid[index],) + current[head + 1 :])
    for steps in product((-1, 0, 1), repeat=len(current)):
        moved = [position + step for position, step in zip(positions, steps, strict=True)]
        inside = all(0 <= index < len(grid) for index, grid in zip(moved, grids, strict=True))
        if inside and sum(step != 0 for step in steps) >= 2:
            candidates.append(tuple(grid[index] for grid, index in zip(grids, moved, strict=True)))
    return candidates


def refine_grids(grids: Sequence[Sequence[float]], current: tuple[float, ...], min_step: float) -> list[list[float]]:
    """Each head's grid with the midpoints between its current value and its two grid neighbours added (when
    they are at least `2 * min_step` apart): the next, finer level of the search around `current`."""
    refined = []
    for grid, value in zip(grids, current, strict=True):
        grid = sorted(grid)
        position = grid.index(value)
        neighbours = [grid[index] for index in (position - 1, position + 1) if 0 <= index < len(grid)]
        midpoints = {
            round((value + neighbour) / 2, THRESHOLD_DECIMALS)
            for neighbour in neighbours
            if abs(neighbour - value) >= 2 * min_step
        }
        refined.append(sorted(set(grid) | midpoints))
    return refined


@dataclass
class CalibrationOutcome:
    """What [`calibrate_per_head_thresholds`] found, every number measured on the calibration data.

    Attributes:
        chosen: the best result over everything evaluated (usually one threshold per head).
        best_single: the best result with one threshold shared by every head (the paper's setting).
        baseline: the unpruned result (threshold 1.0), when it was evaluated (always for `max_miou_drop`).
        results: every result, in evaluation order.
    """

    chosen: dict
    best_single: dict
    baseline: dict | None
    results: list[dict]

    @property
    def num_evaluations(self) -> int:
        return len(self.results)


def calibrate_per_head(
    evaluate: Callable[[Threshold], dict],
    values: Sequence[Threshold],
    num_heads: int,
    knob: ExitKnob = THRESHOLD,
    target_gflops: float | None = None,
    max_miou_drop: float | None = None,
    num_refinements: int = 3,
    num_grid_refinements: int = 2,
    min_step: float = 1e-3,
    gflops_key: str = GFLOPS_KEY,
    min_value: float | None = None,
    max_rounds: int = 20,
    drop_bound: DropBound | None = None,
) -> CalibrationOutcome:
    """One value of the knob per auxiliary head (exit thresholds, or capacities), by local search on per-head grids.

    1. The shared-value calibration ([`calibrate_threshold`]'s sweep, downward extension and bisection) gives
       the best single value, the starting point. Per-head settings in `values` are evaluated too.
    2. Each head's grid holds the sweep's values and the starting point's; for `max_miou_drop`, a head at the bottom
       of its grid gets one value a grid step lower before each round. Rounds of moves
       ([`threshold_neighbours`]): each head alone along its whole grid (coordinate descent), and several heads
       one step each (one head a step lower, another a step higher, ...); moves to settings the knob does not
       allow (capacities that increase from one head to the next) are skipped. After each round the search moves
       to the best result so far ([`choose_threshold`]); it stops when that no longer changes.
    3. `num_grid_refinements` times, each head's grid gets the midpoints around the current value, and rounds of
       one-step moves continue on the finer grids (successive refinement).

    Every setting is evaluated once. With 3 heads and an 11-value grid this takes 50 to 200 evaluations where the
    full grid has 1331; with 1 head it is the shared-value calibration.

    Args:
        evaluate: runs the model on the calibration data with a setting of the knob (a float for every head alike,
            a tuple with one value per auxiliary head otherwise) and returns `mean_iou`, `gflops`, ...
        values: the sweep: shared values (floats) and per-head settings (tuples), each value in (0, 1].
        num_heads: auxiliary heads of the model (`len(config.out_indices) - 1`).
        knob: [`THRESHOLD`] or [`CAPACITY`]: the result field of the setting, and which settings are allowed.
        target_gflops, max_miou_drop: the constraint, see [`choose_threshold`].
        num_refinements: bisection steps of the shared value.
        num_grid_refinements: levels of finer per-head grids after the search on the sweep's grid.
        min_step: smallest step of the bisection and of the grid refinement.
        gflops_key: the result field that holds the cost.
        min_value: the lowest value the downward extension tries; default: the knob's `min_value`.
        max_rounds: safety cap on the rounds of moves per grid level.
        drop_bound: what the mIoU limit reads instead of the measured drop, see [`choose_threshold`].

    Raises:
        NothingToCalibrateError: no value down to `min_value` lets a token exit.
    """
    check_constraint(target_gflops, max_miou_drop)
    check_knob_values(values, knob)
    min_value = knob.min_value if min_value is None else min_value
    if num_heads < 1:
        raise ValueError(f"`num_heads` must be >= 1 (a model with auxiliary heads), got {num_heads}.")
    cache = EvaluationCache(evaluate, num_heads, knob=knob, drop_bound=drop_bound)
    shared = [value for value in values if isinstance(value, (int, float))]
    settings = [per_head(value, num_heads, knob.name) for value in values if not isinstance(value, (int, float))]
    shared += [setting[0] for setting in settings if len(set(setting)) == 1]
    sweep(cache, shared or [1.0], target_gflops, max_miou_drop, gflops_key, min_value)
    extend_below_choice(cache, max_miou_drop, gflops_key, min_value)
    # The per-head grids start from the sweep's values, evenly spaced as the user chose them: bisection points
    # would make one grid step tiny near the starting point, and one-step moves would barely move.
    sweep_values = sorted({key[0] for key in cache.results})
    bisect(cache, target_gflops, max_miou_drop, num_refinements, min_step, gflops_key)
    for setting in settings:
        cache(setting)

    def best() -> tuple[float, ...]:
        chosen = cache.choose(cache.all_results(), target_gflops, max_miou_drop, gflops_key)
        return per_head(chosen[knob.key], num_heads)

    if num_heads > 1:
        current = best()
        grids = [
            sorted(set(sweep_values) | {setting[head] for setting in settings} | {current[head]})
            for head in range(num_heads)
        ]
        for level in range(num_grid_refinements + 1):
            if level > 0:
                grids = refine_grids(grids, current, min_step)
            for _ in range(max_rounds):
                # A head at the bottom of its grid may want lower still (an mIoU-drop limit not reached yet).
                grids = [
                    sorted(set(grid) | {lower_threshold(grid, min_value)})
                    if max_miou_drop is not None and value == grid[0] and grid[0] > min_value
                    else grid
                    for grid, value in zip(grids, current, strict=True)
                ]
                for candidate in threshold_neighbours(current, grids, line_radius=None if level == 0 else 1):
                    if knob.allows(candidate):
                        cache(candidate)
                if best() == current:
                    break
                current = best()
                # A best point reached through another path (e.g. a shared value) joins the grids.
                grids = [sorted(set(grid) | {value}) for grid, value in zip(grids, current, strict=True)]
    results = cache.all_results()
    baseline = next((result for result in results if is_unpruned(result[knob.key])), None)
    return CalibrationOutcome(
        chosen=cache.choose(results, target_gflops, max_miou_drop, gflops_key),
        best_single=cache.choose(cache.uniform_results(), target_gflops, max_miou_drop, gflops_key),
        baseline=baseline,
        results=results,
    )


def calibrate_per_head_thresholds(
    evaluate: Callable[[Threshold], dict],
    thresholds: Sequence[Threshold],
    num_heads: int,
    min_threshold: float = DEFAULT_MIN_THRESHOLD,
    **search,
) -> CalibrationOutcome:
    """One exit threshold per auxiliary head: [`calibrate_per_head`] on the threshold (results carry
    `exit_threshold`; `evaluate` receives a threshold for every head alike, or one per head). `min_threshold` is the
    lowest threshold the downward extension tries; `search` takes [`calibrate_per_head`]'s other keywords (the
    budget `target_gflops` or `max_miou_drop`, refinements, `gflops_key`, `max_rounds`)."""
    return calibrate_per_head(evaluate, thresholds, num_heads, THRESHOLD, min_value=min_threshold, **search)


def calibrate_per_head_capacities(
    evaluate: Callable[[Threshold], dict],
    capacities: Sequence[Threshold],
    num_heads: int,
    min_capacity: float = DEFAULT_MIN_CAPACITY,
    **search,
) -> CalibrationOutcome:
    """One exit capacity per auxiliary head (capacity mode): [`calibrate_per_head`] on the capacity, the fraction of
    an image's patch tokens still active after each head. Settings stay non-increasing from head to head.

    `evaluate` receives a capacity for every head alike, or a tuple with one per head, and runs the model with
    `exit_capacity=` it (capacity mode); its results carry `exit_capacity`. Capacity mode's GFLOPs follow from the
    capacities and the input size alone (`toolkit.evaluation.flops.flops_from_capacities`), so `evaluate` only has
    to measure the mIoU.

    Args:
        capacities: the sweep, e.g. `[1.0, 0.9, ..., 0.3]`, and any per-head settings, each value in (0, 1].
        min_capacity: the lowest capacity the downward extension tries.
        Others: as in [`calibrate_per_head`].
    """
    return calibrate_per_head(evaluate, capacities, num_heads, CAPACITY, min_value=min_capacity, **search)


def check_thresholds(thresholds: Sequence[Threshold]) -> None:
    """Thresholds must lie in (0, 1]: a token's top class score lies in [0, 1] and exits when strictly above (the
    config's rule, applied to each entry: one threshold for every head, or a sequence with one per auxiliary head)."""
    if not thresholds:
        raise ValueError("`thresholds` is empty: give at least one exit threshold in (0, 1], e.g. 1.0 0.95 0.9.")
    for threshold in thresholds:
        normalize_exit_threshold(threshold if isinstance(threshold, (int, float)) else tuple(threshold))


def check_capacities(capacities: Sequence[Threshold]) -> None:
    """Capacities must lie in (0, 1] and not increase from one head to the next (the config's rule, applied to each
    entry: one capacity for every head, or a sequence with one per auxiliary head)."""
    if not capacities:
        raise ValueError("`capacities` is empty: give at least one exit capacity in (0, 1], e.g. 1.0 0.7 0.5.")
    for capacity in capacities:
        normalize_exit_capacity(capacity if isinstance(capacity, (int, float)) else tuple(capacity))


def check_knob_values(values: Sequence[Threshold], knob: ExitKnob) -> None:
    """[`check_thresholds`] or [`check_capacities`], as the knob says."""
    (check_capacities if knob.non_increasing else check_thresholds)(values)


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


def save_calibrated_model(
    model, image_processor, output_dir: str | Path, chosen: dict, report: dict | None = None
) -> Path:
    """Save a copy of `model` (and its image processor) whose config carries the chosen `exit_threshold` or
    `exit_capacity` (a float, or one value per auxiliary head; the config's `exit_mode` follows the knob), with the
    measurement behind the choice in `calibration.json`; the model in memory keeps its own settings.

    Args:
        model: a DToP model (`save_pretrained`, `config.exit_threshold`).
        image_processor: saved beside the model, or `None`.
        output_dir: the folder to write.
        chosen: the chosen result (from [`choose_threshold`] / [`calibrate_per_head_thresholds`] /
            [`calibrate_per_head_capacities`]).
        report: more to keep in `calibration.json` under `report` (e.g. the constraint, the evaluation split's
            numbers).

    Returns:
        The folder.
    """
    output_dir = Path(output_dir)
    config = model.config
    original = {name: getattr(config, name) for name in ("exit_mode", THRESHOLD_KEY, CAPACITY_KEY)}
    key = CAPACITY_KEY if CAPACITY_KEY in chosen else THRESHOLD_KEY
    config.exit_mode = "capacity" if key == CAPACITY_KEY else "threshold"
    setattr(config, key, compact_threshold(chosen[key]))
    try:
        model.save_pretrained(output_dir)
    finally:
        for name, value in original.items():
            setattr(config, name, value)
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    with open(output_dir / "calibration.json", "w", encoding="utf-8") as file:
        json.dump(json_ready({**chosen, **({"report": report} if report is not None else {})}), file, indent=2)
    return output_dir


__all__ = [
    "CAPACITY",
    "KNOBS",
    "MIOU_DROP_BOUND_KEY",
    "THRESHOLD",
    "CalibrationOutcome",
    "DropBound",
    "EvaluationCache",
    "ExitKnob",
    "ExitRule",
    "NothingToCalibrateError",
    "as_exit_rule",
    "calibrate_per_head",
    "calibrate_per_head_capacities",
    "calibrate_per_head_thresholds",
    "calibrate_threshold",
    "check_capacities",
    "check_knob_values",
    "check_thresholds",
    "choose_threshold",
    "compact_threshold",
    "extend_sweep_downward",
    "format_exit_rule",
    "format_threshold",
    "is_uniform",
    "is_unpruned",
    "json_ready",
    "knob_of",
    "per_head",
    "refine_grids",
    "refinement_bracket",
    "save_calibrated_model",
    "setting_key",
    "setting_of",
    "speedup",
    "threshold_neighbours",
]
