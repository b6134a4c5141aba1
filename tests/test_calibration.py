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
"""Tests for exit-threshold calibration: the pure choice, the bisection, the per-head search on a synthetic surface,
the downward extension when nothing exits, a calibrated tiny model saved and reloaded (one threshold, and one per
head)."""

import itertools
import json
import math
from functools import partial

import pytest
from accelerate import Accelerator
from torch.utils.data import DataLoader

from dtop_hf import DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.data.datasets import SegmentationDataset, SegmentationEvalTransform, collate_segmentation_batch
from dtop_hf.toolkit.data.synthetic_scenes import SYNTHETIC_ID2LABEL, make_synthetic_scenes
from dtop_hf.toolkit.evaluation.calibration import (
    NothingToCalibrateError,
    calibrate_per_head_capacities,
    calibrate_per_head_thresholds,
    calibrate_threshold,
    check_thresholds,
    choose_threshold,
    compact_threshold,
    format_threshold,
    per_head,
    refine_grids,
    refinement_bracket,
    save_calibrated_model,
    threshold_neighbours,
)
from dtop_hf.toolkit.evaluation.loop import evaluate_model


def sweep(*rows: tuple[float, float, float]) -> list[dict]:
    """Results from (threshold, mIoU, GFLOPs) rows; a second cost field shows `gflops_key` at work."""
    return [
        {"exit_threshold": threshold, "mean_iou": miou, "gflops": gflops, "gflops_backbone_and_final_head": gflops - 5}
        for threshold, miou, gflops in rows
    ]


RESULTS = sweep((1.0, 0.500, 114.5), (0.95, 0.502, 91.8), (0.9, 0.497, 88.6), (0.8, 0.490, 82.8), (0.6, 0.468, 75.2))


def test_budget_picks_best_miou_within_it():
    assert choose_threshold(RESULTS, target_gflops=95.0)["exit_threshold"] == 0.95
    assert choose_threshold(RESULTS, target_gflops=90.0)["exit_threshold"] == 0.9
    assert choose_threshold(RESULTS, target_gflops=200.0)["exit_threshold"] == 0.95  # better than the baseline
    # The paper's convention (no auxiliary heads) is 5 GFLOPs cheaper here: 0.8 fits 78, with all heads it does not.
    assert (
        choose_threshold(RESULTS, target_gflops=78.0, gflops_key="gflops_backbone_and_final_head")["exit_threshold"]
        == 0.8
    )
    assert choose_threshold(RESULTS, target_gflops=78.0)["exit_threshold"] == 0.6


def test_miou_drop_picks_largest_saving_within_it():
    assert choose_threshold(RESULTS, max_miou_drop=0.005)["exit_threshold"] == 0.9
    assert choose_threshold(RESULTS, max_miou_drop=0.0)["exit_threshold"] == 0.95
    assert choose_threshold(RESULTS, max_miou_drop=0.01)["exit_threshold"] == 0.8
    assert choose_threshold(RESULTS, max_miou_drop=1.0)["exit_threshold"] == 0.6


def test_nan_miou_never_meets_a_drop_limit():
    results = RESULTS + sweep((0.5, float("nan"), 60.0))
    assert choose_threshold(results, max_miou_drop=1.0)["exit_threshold"] == 0.6
    assert choose_threshold(results, target_gflops=65.0)["exit_threshold"] == 0.5  # the only one in budget


def test_choice_errors():
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(RESULTS)
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(RESULTS, target_gflops=90.0, max_miou_drop=0.01)
    with pytest.raises(ValueError, match="cheapest"):
        choose_threshold(RESULTS, target_gflops=50.0)
    with pytest.raises(ValueError, match="exit_threshold=1.0"):
        choose_threshold(RESULTS[1:], max_miou_drop=0.01)
    with pytest.raises(ValueError, match="empty"):
        choose_threshold([], target_gflops=90.0)
    with pytest.raises(ValueError, match="target_gflops"):
        choose_threshold(RESULTS, target_gflops=-1.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_thresholds([1.0, 1.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_thresholds([0.0])
    with pytest.raises(ValueError, match="empty"):
        check_thresholds([])


def test_refinement_bracket_faces_the_side_of_more_saving():
    chosen = RESULTS[2]  # 0.9
    assert refinement_bracket(RESULTS, chosen, target_gflops=90.0) == (0.9, 0.95)
    assert refinement_bracket(RESULTS, chosen, target_gflops=None) == (0.8, 0.9)
    assert refinement_bracket(RESULTS, RESULTS[0], target_gflops=120.0) is None


def smooth_tradeoff(threshold: float, calls: list[float]) -> dict:
    """A model whose mIoU starts dropping below threshold 0.9 and whose cost falls linearly."""
    calls.append(threshold)
    return {"mean_iou": 0.5 - 0.5 * max(0.0, 0.9 - threshold), "gflops": 20.0 + 80.0 * threshold}


def test_bisection_moves_to_the_boundary_of_the_constraint():
    calls = []
    chosen, results = calibrate_threshold(
        partial(smooth_tradeoff, calls=calls), [0.95, 0.9, 0.8, 0.7], max_miou_drop=0.01, num_refinements=4
    )
    # Baseline added; the boundary (drop 0.01 at threshold 0.88) lies between 0.8 and 0.9: bisected 4 times.
    assert calls[:5] == [1.0, 0.95, 0.9, 0.8, 0.7]
    assert len(calls) == 9 and all(0.8 < threshold < 0.9 for threshold in calls[5:])
    assert 0.875 <= chosen["exit_threshold"] < 0.9
    assert 0.5 - chosen["mean_iou"] <= 0.01
    assert [result["exit_threshold"] for result in results] == sorted(calls, reverse=True)

    calls.clear()
    chosen, _ = calibrate_threshold(partial(smooth_tradeoff, calls=calls), [0.9, 0.8, 0.7], target_gflops=90.0)
    # 20 + 80 t <= 90 <=> t <= 0.875: the best mIoU within the budget is found between 0.8 and 0.9.
    assert 0.85 <= chosen["exit_threshold"] <= 0.875 and chosen["gflops"] <= 90.0
    assert 1.0 not in calls  # a budget needs no baseline


# A synthetic 3-head model: lower thresholds cost less (head 1 saves most, it comes earliest) and, below a
# head-specific knee, lose accuracy quadratically (earlier heads are less reliable, so their knee is higher).
SAVING_PER_HEAD = (3.0, 2.0, 1.0)
KNEE_PER_HEAD = (0.9, 0.8, 0.7)
ACCURACY_LOSS_PER_HEAD = (0.5, 1.0, 2.0)
GRID = [round(1.0 - 0.05 * step, 2) for step in range(11)]  # 1.0, 0.95, ..., 0.5


def three_head_surface(threshold, calls: list) -> dict:
    thresholds = per_head(threshold, 3)
    calls.append(thresholds)
    cost = 10.0 + sum(saving * value for saving, value in zip(SAVING_PER_HEAD, thresholds))
    drop = sum(
        loss * max(0.0, knee - value) ** 2
        for loss, knee, value in zip(ACCURACY_LOSS_PER_HEAD, KNEE_PER_HEAD, thresholds)
    )
    return {"mean_iou": 0.5 - drop, "gflops": cost}


def grid_optimum(**constraint) -> dict:
    """The answer of the full grid (11^3 = 1331 evaluations), for comparison."""
    results = [
        {**three_head_surface(setting, []), "exit_threshold": setting} for setting in itertools.product(GRID, repeat=3)
    ]
    return choose_threshold(results, **constraint)


@pytest.mark.parametrize(
    "constraint, optimum",
    [
        ({"max_miou_drop": 0.002}, (0.85, 0.8, 0.7)),
        ({"max_miou_drop": 0.01}, (0.8, 0.75, 0.7)),
        ({"target_gflops": 14.0}, (0.65, 0.7, 0.65)),
        ({"target_gflops": 13.5}, (0.5, 0.65, 0.7)),  # needs a move of all three heads at once
    ],
)
def test_per_head_search_finds_the_grid_optimum_with_far_fewer_evaluations(constraint, optimum):
    assert tuple(grid_optimum(**constraint)["exit_threshold"]) == optimum
    calls = []
    # On the grid alone (no bisection, no finer levels): exactly the full grid's answer.
    outcome = calibrate_per_head_thresholds(
        partial(three_head_surface, calls=calls), GRID, num_heads=3, num_refinements=0, num_grid_refinements=0,
        **constraint,
    )  # fmt: skip
    assert per_head(outcome.chosen["exit_threshold"], 3) == optimum
    assert outcome.num_evaluations == len(calls) == len(set(calls))  # each setting evaluated once
    assert len(calls) <= 1331 // 8
    # The single shared threshold is worse: the heads want different thresholds.
    assert outcome.best_single["exit_threshold"] in GRID
    key, better = ("gflops", min) if "max_miou_drop" in constraint else ("mean_iou", max)
    assert better(outcome.chosen[key], outcome.best_single[key]) == outcome.chosen[key] != outcome.best_single[key]

    # With bisection and finer grids: at least as good as the grid's optimum, still far fewer evaluations.
    calls.clear()
    refined = calibrate_per_head_thresholds(partial(three_head_surface, calls=calls), GRID, num_heads=3, **constraint)
    assert better(refined.chosen[key], outcome.chosen[key]) == refined.chosen[key]
    assert len(calls) <= 1331 // 5
    if "max_miou_drop" in constraint:
        assert refined.baseline["exit_threshold"] == 1.0
        assert 0.5 - refined.chosen["mean_iou"] <= constraint["max_miou_drop"] + 1e-12
    else:
        assert refined.chosen["gflops"] <= constraint["target_gflops"]


# The same surface read as capacities (the fraction of tokens still active after each head): lower capacities cost
# less and, below a knee, lose accuracy. Capacities must not increase from one head to the next.
CAPACITY_GRID = [round(1.0 - 0.05 * step, 2) for step in range(15)]  # 1.0, 0.95, ..., 0.3
CAPACITY_KNEE_PER_HEAD = (0.8, 0.75, 0.7)


def three_head_capacity_surface(capacity, calls: list) -> dict:
    capacities = per_head(capacity, 3)
    assert all(later <= earlier for earlier, later in zip(capacities, capacities[1:])), capacities
    calls.append(capacities)
    cost = 10.0 + sum(saving * value for saving, value in zip(SAVING_PER_HEAD, capacities))
    drop = sum(
        loss * max(0.0, knee - value) ** 2
        for loss, knee, value in zip(ACCURACY_LOSS_PER_HEAD, CAPACITY_KNEE_PER_HEAD, capacities)
    )
    return {"mean_iou": 0.5 - drop, "gflops": cost}


@pytest.mark.parametrize("constraint", [{"max_miou_drop": 0.002}, {"max_miou_drop": 0.01}, {"target_gflops": 14.5}])
def test_per_head_search_serves_capacities_and_keeps_them_non_increasing(constraint):
    non_increasing = [
        setting for setting in itertools.product(CAPACITY_GRID, repeat=3) if setting[0] >= setting[1] >= setting[2]
    ]
    results = [{**three_head_capacity_surface(setting, []), "exit_capacity": setting} for setting in non_increasing]
    optimum = choose_threshold(results, key="exit_capacity", **constraint)["exit_capacity"]
    calls = []
    outcome = calibrate_per_head_capacities(
        partial(three_head_capacity_surface, calls=calls), CAPACITY_GRID, num_heads=3, num_refinements=0,
        num_grid_refinements=0, **constraint,
    )  # fmt: skip
    # Every setting evaluated is one the model accepts (the surface asserts it), each once, far fewer than the grid.
    assert outcome.num_evaluations == len(calls) == len(set(calls)) <= len(non_increasing) // 4
    assert per_head(outcome.chosen["exit_capacity"], 3) == optimum
    assert all("exit_threshold" not in result for result in outcome.results)
    if "max_miou_drop" in constraint:
        assert outcome.baseline["exit_capacity"] == 1.0
        assert 0.5 - outcome.chosen["mean_iou"] <= constraint["max_miou_drop"] + 1e-12
    else:
        assert outcome.chosen["gflops"] <= constraint["target_gflops"]


def test_capacity_settings_are_checked():
    with pytest.raises(ValueError, match="must not increase"):
        calibrate_per_head_capacities(lambda capacity: {}, [1.0, (0.5, 0.7)], num_heads=2, max_miou_drop=0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        calibrate_per_head_capacities(lambda capacity: {}, [1.2], num_heads=2, max_miou_drop=0.01)


def test_threshold_forms_and_neighbours():
    assert per_head(0.8, 2) == (0.8, 0.8) and per_head([0.6, 0.9], 2) == (0.6, 0.9)
    with pytest.raises(ValueError, match="one exit threshold per auxiliary head \\(2\\)"):
        per_head((0.6, 0.7, 0.9), 2)
    assert compact_threshold((0.7, 0.7)) == 0.7 and compact_threshold([0.6, 0.9]) == (0.6, 0.9)
    assert format_threshold((0.6, 0.9)) == "0.6 / 0.9" and format_threshold(0.85) == "0.85"
    grids = [[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]]
    neighbours = threshold_neighbours((0.6, 0.6), grids, line_radius=None)
    # 2 + 2 single-head moves, then both down, an exchange each way, both up.
    assert sorted(neighbours) == sorted(
        [(0.5, 0.6), (0.7, 0.6), (0.6, 0.5), (0.6, 0.7), (0.5, 0.5), (0.5, 0.7), (0.7, 0.5), (0.7, 0.7)]
    )
    assert refine_grids(grids, (0.6, 0.7), min_step=1e-3) == [[0.5, 0.55, 0.6, 0.65, 0.7], [0.5, 0.6, 0.65, 0.7]]
    check_thresholds([1.0, (0.6, 0.9)])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_thresholds([(0.6, 1.2)])


def confident_below(threshold: float, calls: list) -> dict:
    """A model that is never confident: tokens only exit below 0.15, and then cost less at no accuracy loss."""
    calls.append(threshold)
    return {"mean_iou": 0.4, "gflops": 10.0 if threshold >= 0.15 else 6.0 + 20 * threshold}


def test_sweep_extends_downward_when_nothing_exits():
    calls = []
    chosen, results = calibrate_threshold(
        partial(confident_below, calls=calls), [0.9, 0.8, 0.6], max_miou_drop=0.001, num_refinements=0
    )
    # 1.0, the sweep, then halving the lowest threshold: 0.3 and 0.15 save nothing, 0.075 does; accuracy holds
    # there, so one more step down (to the floor, 0.01) saves more.
    assert calls == [1.0, 0.9, 0.8, 0.6, 0.3, 0.15, 0.075, 0.01]
    assert chosen["exit_threshold"] == 0.01 and chosen["gflops"] < 10.0
    # A budget below the unpruned cost extends the sweep the same way.
    calls.clear()
    chosen, _ = calibrate_threshold(partial(confident_below, calls=calls), [1.0, 0.5], target_gflops=8.0)
    assert chosen["gflops"] <= 8.0 and min(calls) < 0.15


def accurate_down_to(threshold, calls: list, knees: tuple[float, ...] = (0.3, 0.5)) -> dict:
    """Accuracy holds down to a knee per head (0.3 for head 1, 0.5 for head 2), then falls; cost falls throughout."""
    thresholds = per_head(threshold, len(knees))
    calls.append(thresholds)
    drop = sum(max(0.0, knee - value) for knee, value in zip(knees, thresholds))
    return {"mean_iou": 0.5 - drop, "gflops": 10.0 + 5.0 * thresholds[0] + 3.0 * thresholds[1]}


def test_thresholds_go_below_the_sweep_while_the_drop_limit_allows():
    calls = []
    # One threshold: the limit binds at head 2's knee, 0.5, which the sweep does not reach.
    chosen, _ = calibrate_threshold(
        lambda threshold: accurate_down_to(threshold, calls), [0.9, 0.8, 0.6], max_miou_drop=1e-6, num_refinements=2
    )
    assert chosen["exit_threshold"] == 0.5 and min(calls)[0] < 0.6
    # One per head: head 1 steps down its grid, below everything swept, to its own knee.
    outcome = calibrate_per_head_thresholds(
        lambda threshold: accurate_down_to(threshold, []), [0.9, 0.8, 0.6], num_heads=2, max_miou_drop=1e-6
    )
    assert per_head(outcome.chosen["exit_threshold"], 2) == (0.3, 0.5)
    assert outcome.best_single["exit_threshold"] == 0.5


def test_a_model_that_never_exits_is_reported_plainly():
    never = partial(confident_below, calls=[])
    for constraint in ({"max_miou_drop": 0.01}, {"target_gflops": 5.0}):
        with pytest.raises(NothingToCalibrateError, match="no exit threshold from 1.0 down to 0.2 lets a single"):
            calibrate_threshold(never, [1.0, 0.8], min_threshold=0.2, **constraint)
        with pytest.raises(NothingToCalibrateError, match="nothing to calibrate|saves anything"):
            calibrate_per_head_thresholds(never, [1.0, 0.8], num_heads=2, min_threshold=0.2, **constraint)


@pytest.fixture
def tiny_setup(model_tester):
    """A tiny random model with spread-out confidences, 3 synthetic images and a one-process Accelerator."""
    id2label = dict(SYNTHETIC_ID2LABEL)
    # initializer_range 0.5: random heads with confident, varied predictions, so that thresholds matter.
    tester = model_tester(num_labels=len(id2label), id2label=id2label, exit_threshold=1.0, initializer_range=0.5)
    model = tester.create_model()
    config = model.config
    processor = DToPImageProcessor(size={"height": 32, "width": 32}, do_reduce_labels=True)
    dataset = SegmentationDataset(
        make_synthetic_scenes(3, image_size=32, seed=0, split="validation"),
        SegmentationEvalTransform(processor),
        config.num_labels,
        do_reduce_labels=True,
    )
    dataloader = DataLoader(dataset, batch_size=2, collate_fn=collate_segmentation_batch)
    accelerator = Accelerator(cpu=True)
    return model, processor, accelerator.prepare(dataloader), accelerator


def test_calibrates_a_tiny_model_and_ships_the_threshold(tiny_setup, tmp_path):
    model, processor, dataloader, accelerator = tiny_setup
    evaluate = partial(evaluate_model, model, dataloader, accelerator, image_processor=processor)
    baseline, cheapest = evaluate(exit_threshold=1.0)["gflops"], evaluate(exit_threshold=0.3)["gflops"]
    assert cheapest < 0.9 * baseline  # pruning really saves here, so a budget in between is meaningful
    target = (baseline + cheapest) / 2
    chosen, results = calibrate_threshold(evaluate, [1.0, 0.9, 0.7, 0.5, 0.3], target_gflops=target, num_refinements=2)
    assert chosen["gflops"] <= target
    assert len(results) >= 5
    within_budget = [result for result in results if result["gflops"] <= target]
    assert chosen["mean_iou"] == max(result["mean_iou"] for result in within_budget)

    folder = save_calibrated_model(model, processor, tmp_path / "calibrated", chosen)
    assert model.config.exit_threshold == 1.0  # the model in memory is untouched
    reloaded = DToPForSemanticSegmentation.from_pretrained(folder).eval()
    assert reloaded.config.exit_threshold == chosen["exit_threshold"]
    assert DToPImageProcessor.from_pretrained(folder).do_reduce_labels
    # The shipped model, run with its own config, costs what the calibration measured.
    shipped = evaluate_model(reloaded, dataloader, accelerator, image_processor=processor)
    assert shipped["gflops"] == pytest.approx(chosen["gflops"], rel=1e-12)
    assert shipped["mean_iou"] == pytest.approx(chosen["mean_iou"], rel=1e-12)
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["exit_threshold"] == chosen["exit_threshold"]
    assert all(value is None or math.isfinite(value) for value in saved["per_category_iou"])


def test_per_head_calibration_of_a_tiny_model_round_trips_through_save_pretrained(tiny_setup, tmp_path):
    model, processor, dataloader, accelerator = tiny_setup
    evaluate = partial(evaluate_model, model, dataloader, accelerator, image_processor=processor)
    baseline = evaluate(exit_threshold=1.0)
    outcome = calibrate_per_head_thresholds(
        lambda threshold: evaluate(exit_threshold=threshold),
        [1.0, 0.9, 0.7, 0.5, 0.3],
        num_heads=2,
        max_miou_drop=0.05,
        num_refinements=1,
        num_grid_refinements=1,
    )
    chosen = outcome.chosen
    assert baseline["mean_iou"] - chosen["mean_iou"] <= 0.05 + 1e-12
    assert chosen["gflops"] <= outcome.best_single["gflops"] < baseline["gflops"]

    folder = save_calibrated_model(model, processor, tmp_path / "calibrated", chosen, report={"note": "test"})
    assert model.config.exit_threshold == 1.0
    reloaded = DToPForSemanticSegmentation.from_pretrained(folder).eval()
    assert reloaded.config.exit_thresholds_per_head()[:-1] == per_head(chosen["exit_threshold"], 2)
    shipped = evaluate_model(reloaded, dataloader, accelerator, image_processor=processor)
    assert shipped["gflops"] == pytest.approx(chosen["gflops"], rel=1e-12)
    assert shipped["mean_iou"] == pytest.approx(chosen["mean_iou"], rel=1e-12)
    saved = json.loads((folder / "calibration.json").read_text())
    assert per_head(saved["exit_threshold"], 2) == per_head(chosen["exit_threshold"], 2)
    assert saved["report"] == {"note": "test"}


def test_a_calibrated_capacity_ships_in_capacity_mode(model_tester, tmp_path):
    model = model_tester().create_model()
    chosen = {"exit_capacity": (0.6, 0.35), "mean_iou": 0.4, "gflops": 1.0}
    save_calibrated_model(model, None, tmp_path, chosen)
    reloaded = DToPForSemanticSegmentation.from_pretrained(tmp_path)
    assert reloaded.config.exit_mode == "capacity" and reloaded.config.exit_capacity == (0.6, 0.35)
    # The model in memory keeps its own rule.
    assert model.config.exit_mode == "threshold" and model.config.exit_capacity is None
    assert json.loads((tmp_path / "calibration.json").read_text())["exit_capacity"] == [0.6, 0.35]
