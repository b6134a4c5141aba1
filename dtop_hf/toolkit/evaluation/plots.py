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
"""The plots of an evaluation: the trade-off, GFLOPs per image against mIoU, one point per exit setting (threshold
mode's points and capacity mode's in their own colours and markers); and the exit diagnostics (depth profile, exit
precision)."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .calibration import KNOBS, ExitKnob, format_exit_rule, is_uniform, is_unpruned, knob_of, setting_of
from .report import GFLOPS_KEYS, convention_name, sweep_order


@dataclass(frozen=True)
class ModeStyle:
    """How one exit mode's points look.

    Attributes:
        label: what legend entries of the mode start with.
        colours: of the shared-value curve, per GFLOPs convention (backbone + final head, all heads).
        lines: matplotlib formats of those curves.
        per_head_marker: settings with one value per auxiliary head.
        searched_colour: the calibration panel's searched per-head settings.
        best_single_colour, chosen_colour: the calibration panel's best shared value and calibrated setting.
        chosen_label: the legend entry of the calibrated setting there.
    """

    label: str
    colours: tuple[str, str]
    lines: tuple[str, str]
    per_head_marker: str
    searched_colour: str
    best_single_colour: str
    chosen_colour: str
    chosen_label: str


# Threshold mode keeps the colours the plot always had; capacity mode is set apart by its own colours and triangles.
MODE_STYLES = {
    "threshold": ModeStyle("", ("C0", "C1"), ("o-", "s--"), "x", "0.6", "tab:green", "tab:red", "calibrated"),
    "capacity": ModeStyle(
        "capacity mode, ", ("tab:purple", "tab:pink"), ("^:", "v:"), "+", "plum", "tab:olive", "tab:purple",
        "calibrated capacities",
    ),
}  # fmt: skip
CONVENTIONS = (("gflops_backbone_and_final_head", "backbone + final head"), ("gflops", "all heads"))


def split_by_shape(results: Sequence[dict], knob: ExitKnob) -> tuple[list[dict], list[dict]]:
    """`knob`'s results as (one value for every head, sorted, with the unpruned point every curve starts from;
    one value per head)."""
    mine = [result for result in results if knob_of(result) is knob or is_unpruned(setting_of(result))]
    shared = sorted((result for result in mine if is_uniform(setting_of(result))), key=sweep_order)
    return shared, [result for result in mine if not is_uniform(setting_of(result))]


def plot_tradeoff(
    results: list[dict],
    path: Path,
    title: str,
    calibrations: Sequence[dict] = (),
    gflops_key: str = GFLOPS_KEYS["all_heads"],
) -> None:
    """GFLOPs per image against mIoU, points labelled with their exit rules.

    Left: the evaluated split, per exit mode present (threshold, capacity), the shared-value curve in both GFLOPs
    conventions, per-head settings as crosses and the calibrated settings as stars. Right (after calibrations): the
    calibration images, every setting each search evaluated (one value per head: dots; one for all: the curve), the
    calibrated one marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_panels = 2 if calibrations else 1
    figure, panels = plt.subplots(1, num_panels, figsize=(6.4 * num_panels, 4.4), dpi=120, squeeze=False)
    axes = panels[0][0]
    chosen = {
        knob_of(calibration["chosen"]).mode: calibration["on_evaluation_split"]["chosen"]
        for calibration in calibrations
    }
    for knob in KNOBS:
        if not any(knob_of(result) is knob for result in results):
            continue
        style, (shared, per_head_results) = MODE_STYLES[knob.mode], split_by_shape(results, knob)
        for (key, label), colour, line in zip(CONVENTIONS, style.colours, style.lines, strict=True):
            label = f"{style.label}{label}"
            axes.plot(
                [result[key] for result in shared], [100 * result["mean_iou"] for result in shared], line,
                color=colour, label=label,
            )  # fmt: skip
            if per_head_results:
                axes.plot(
                    [result[key] for result in per_head_results],
                    [100 * result["mean_iou"] for result in per_head_results], style.per_head_marker, color=colour,
                    label=f"{label}, one {knob.noun} per head",
                )  # fmt: skip
            if knob.mode in chosen:
                point = chosen[knob.mode]
                axes.plot(
                    point[key], 100 * point["mean_iou"], "*", markersize=14, color=colour, markeredgecolor="black",
                    label=f"{label}, calibrated",
                )  # fmt: skip
    for key, _ in CONVENTIONS:
        annotate_settings(axes, results, key)
    axes.set_title(f"{title}\nevaluated split", fontsize=9)
    if calibrations:
        axes = panels[0][1]
        for calibration in calibrations:
            plot_calibration(axes, calibration, gflops_key)
        evaluated = sum(calibration["num_evaluations"] for calibration in calibrations)
        axes.set_title(f"calibration images ({evaluated} settings evaluated)", fontsize=9)
    for index, axes in enumerate(panels[0]):
        axes.set_xlabel("GFLOPs per image" + (f" ({convention_name(gflops_key)})" if index else ""))
        axes.set_ylabel("mIoU (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_calibration(axes, calibration: dict, gflops_key: str) -> None:
    """One calibration on the calibration images: the settings it searched, its best shared value, its choice."""
    knob = knob_of(calibration["chosen"])
    style = MODE_STYLES[knob.mode]
    shared, others = split_by_shape(calibration["results"], knob)
    axes.plot(
        [result[gflops_key] for result in others], [100 * result["mean_iou"] for result in others], ".",
        color=style.searched_colour, label=f"one {knob.noun} per head (searched)",
    )  # fmt: skip
    axes.plot(
        [result[gflops_key] for result in shared], [100 * result["mean_iou"] for result in shared], style.lines[0],
        color=style.colours[0], label=f"one {knob.noun} for every head",
    )  # fmt: skip
    for role, marker, colour, label in (
        ("best_single", "D", style.best_single_colour, f"best single {knob.noun}"),
        ("chosen", "*", style.chosen_colour, style.chosen_label),
    ):
        result = calibration[role]
        axes.plot(
            result[gflops_key], 100 * result["mean_iou"], marker, markersize=14 if marker == "*" else 8,
            color=colour, markeredgecolor="black", label=label,
        )  # fmt: skip
        annotate_settings(axes, [result], gflops_key)


def percent_or_nan(value: float | None) -> float:
    """A share as a percentage to plot; NaN (no point) where it is undefined (None once read from the JSON)."""
    return float("nan") if value is None else 100 * value


def plot_depth_profile(
    summary: dict, results: Sequence[dict], stage_names: Sequence[str], path: Path, title: str
) -> None:
    """The exit diagnostics in one small figure. Left: the depth profile, each head's own mIoU over all tokens of
    the unpruned model. Right: per head, the share of the tokens it finalised that keep the unpruned model's label,
    for each setting measured (a head nothing exited at has no point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (profile_axes, precision_axes) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    depth = [
        100 * (value if value is not None else float("nan")) for value in summary["diagnostics"]["depth_mean_iou"]
    ]
    bars = profile_axes.bar(range(len(depth)), depth, color=[f"C{stage}" for stage in range(len(depth))])
    profile_axes.bar_label(bars, fmt="%.1f", fontsize=7)
    profile_axes.set_xticks(range(len(depth)), stage_names, fontsize=7)
    profile_axes.set_ylabel("own mIoU (%), unpruned")
    profile_axes.set_title(f"{title}\ndepth profile", fontsize=9)
    measured = [result for result in sorted(results, key=sweep_order) if "exit_diagnostics" in result]
    for stage, name in enumerate(stage_names):
        shares = [percent_or_nan(result["exit_diagnostics"]["exit_agreement"][stage]) for result in measured]
        precision_axes.plot(range(len(measured)), shares, "o-", color=f"C{stage}", label=name)
    precision_axes.set_xticks(range(len(measured)), [format_exit_rule(result) for result in measured], fontsize=7)
    precision_axes.set_xlabel("exit setting")
    precision_axes.set_ylabel("exited tokens keeping the unpruned label (%)")
    precision_axes.set_title("exit precision", fontsize=9)
    precision_axes.legend(fontsize=7)
    for axes in (profile_axes, precision_axes):
        axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def annotate_settings(axes, results: list[dict], gflops_key: str) -> None:
    for result in results:
        axes.annotate(
            format_exit_rule(result),
            (result[gflops_key], 100 * result["mean_iou"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )


__all__ = ["MODE_STYLES", "ModeStyle", "plot_depth_profile", "plot_tradeoff"]
