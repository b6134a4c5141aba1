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
"""The trade-off plot of an evaluation: GFLOPs per image against mIoU, one point per exit setting."""

from pathlib import Path

from .calibration import format_threshold, is_uniform
from .report import GFLOPS_KEYS, convention_name, sweep_order


def plot_tradeoff(
    results: list[dict],
    path: Path,
    title: str,
    calibration: dict | None = None,
    gflops_key: str = GFLOPS_KEYS["all_heads"],
) -> None:
    """GFLOPs per image against mIoU, points labelled with their thresholds.

    Left: the evaluated split, the shared-threshold sweep in both GFLOPs conventions, per-head settings as crosses
    and the calibrated thresholds as stars. Right (after a calibration): the calibration images, every setting the
    search evaluated (one threshold per head: dots; one for all: the curve), the calibrated one marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_panels = 2 if calibration is not None else 1
    figure, panels = plt.subplots(1, num_panels, figsize=(6.4 * num_panels, 4.4), dpi=120, squeeze=False)
    axes = panels[0][0]
    shared = sorted((result for result in results if is_uniform(result["exit_threshold"])), key=sweep_order)
    per_head_results = [result for result in results if not is_uniform(result["exit_threshold"])]
    for key, label, style in (
        ("gflops_backbone_and_final_head", "backbone + final head", "o-"),
        ("gflops", "all heads", "s--"),
    ):
        (line,) = axes.plot(
            [result[key] for result in shared], [100 * result["mean_iou"] for result in shared], style, label=label
        )
        annotate_thresholds(axes, shared + per_head_results, key)
        if per_head_results:
            axes.plot(
                [result[key] for result in per_head_results],
                [100 * result["mean_iou"] for result in per_head_results],
                "x",
                color=line.get_color(),
                label=f"{label}, one threshold per head",
            )
        if calibration is not None:
            chosen = calibration["on_evaluation_split"]["chosen"]
            axes.plot(
                chosen[key], 100 * chosen["mean_iou"], "*", markersize=14, color=line.get_color(),
                markeredgecolor="black", label=f"{label}, calibrated",
            )  # fmt: skip
            annotate_thresholds(axes, [chosen], key)
    axes.set_title(f"{title}\nevaluated split", fontsize=9)
    if calibration is not None:
        axes = panels[0][1]
        searched = calibration["results"]
        shared = sorted((result for result in searched if is_uniform(result["exit_threshold"])), key=sweep_order)
        others = [result for result in searched if not is_uniform(result["exit_threshold"])]
        axes.plot(
            [result[gflops_key] for result in others], [100 * result["mean_iou"] for result in others], ".",
            color="0.6", label="one threshold per head (searched)",
        )  # fmt: skip
        axes.plot(
            [result[gflops_key] for result in shared], [100 * result["mean_iou"] for result in shared], "o-",
            label="one threshold for every head",
        )  # fmt: skip
        for key, marker, label in (("best_single", "D", "best single threshold"), ("chosen", "*", "calibrated")):
            result = calibration[key]
            axes.plot(
                result[gflops_key], 100 * result["mean_iou"], marker, markersize=14 if marker == "*" else 8,
                color="tab:red" if marker == "*" else "tab:green", markeredgecolor="black", label=label,
            )  # fmt: skip
            annotate_thresholds(axes, [result], gflops_key)
        axes.set_title(f"calibration images ({calibration['num_evaluations']} settings evaluated)", fontsize=9)
    for index, axes in enumerate(panels[0]):
        axes.set_xlabel("GFLOPs per image" + (f" ({convention_name(gflops_key)})" if index else ""))
        axes.set_ylabel("mIoU (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def annotate_thresholds(axes, results: list[dict], gflops_key: str) -> None:
    for result in results:
        axes.annotate(
            format_threshold(result["exit_threshold"]),
            (result[gflops_key], 100 * result["mean_iou"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )


__all__ = ["plot_tradeoff"]
