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
"""The evaluation report: Markdown sections built from an evaluation summary (see
[`~toolkit.evaluation.sweep.evaluate_exit_settings`]) and the files it is written to.

The report is a list of [`ReportSection`]s, built by the functions of `SECTION_BUILDERS` in order: the sweep table,
the calibration tables (thresholds, capacities), the exit diagnostics (depth profile, exit precision), the per-class
IoU table. A new part of the report is one more
builder; a caller picks the sections it shows (the quick start leaves the per-class table out), then
[`render_report`] joins them. Every result names its exit rule (threshold or capacity mode, and the values), so
capacity settings are rows of the same tables, after the thresholds.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .calibration import (
    CAPACITY,
    KNOBS,
    MIOU_DROP_BOUND_KEY,
    THRESHOLD,
    choose_threshold,
    compact_threshold,
    format_exit_rule,
    format_threshold,
    is_unpruned,
    json_ready,
    knob_of,
    setting_key,
    setting_of,
    speedup,
)


# `--gflops_convention` -> the result field it reads.
GFLOPS_KEYS = {"all_heads": "gflops", "paper": "gflops_backbone_and_final_head"}
# `--calibrate` method -> the summary field of its calibration (the thresholds' keeps the name it always had).
CALIBRATION_FIELDS = {"thresholds": "calibration", "capacity": "capacity_calibration"}
# The per-class table is shown up to this many classes (ADE20K's 150 go to the JSON only).
MAX_REPORTED_CLASSES = 30


@dataclass
class ReportSection:
    """One part of the report: a name to pick it by, an optional heading line, and its Markdown body."""

    name: str
    body: str
    heading: str | None = None

    def render(self) -> str:
        return self.body if self.heading is None else f"{self.heading}\n\n{self.body}"


def render_report(sections: list[ReportSection]) -> str:
    """The sections as one Markdown text, a blank line between them."""
    return "\n\n".join(section.render() for section in sections)


def format_percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_gflops(value: float) -> str:
    """One decimal as in the paper for real models (109.4), four significant digits for tiny ones (0.003871)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.4g}"


def convention_name(gflops_key: str) -> str:
    """`all heads` or `paper` (backbone + final head): the `--gflops_convention` of a result field."""
    return next(name for name, key in GFLOPS_KEYS.items() if key == gflops_key).replace("_", " ")


def sweep_order(result: dict) -> tuple[int, int, float]:
    """Thresholds, then capacities; of each, the values shared by every head first, highest first, then per-head
    settings, in the order given."""
    mode, value = KNOBS.index(knob_of(result)), compact_threshold(setting_of(result))
    return (mode, 0, -value) if isinstance(value, float) else (mode, 1, 0.0)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def sweep_table(
    results: list[dict],
    stage_names: list[str],
    gflops_key: str = GFLOPS_KEYS["all_heads"],
    notes: dict[tuple, str] | None = None,
) -> str:
    """One row per exit setting (thresholds: shared ones decreasing, then per-head settings; then capacities alike),
    as the paper's Table 2 plus R, exits and time; `notes` ([`setting_key`] -> text) adds a last column, e.g.
    "calibrated". Capacity settings read `capacity 0.7 / 0.5` in the first column, explained under the table."""
    baseline = next((result for result in results if is_unpruned(setting_of(result))), None)
    num_heads = len(stage_names) - 1
    capacities = any(knob_of(result) is CAPACITY for result in results)
    header = ["threshold", "mIoU (%)", "pixel acc. (%)", "GFLOPs", "GFLOPs all heads", "saved", "R"]
    header += ["exits per head (%)", "ms / image"] + (["calibration"] if notes else [])
    rows = []
    for result in sorted(results, key=sweep_order):
        gflops = result["gflops_backbone_and_final_head"]
        saved = f"{100 * (1 - gflops / baseline['gflops_backbone_and_final_head']):.1f}%" if baseline else "n/a"
        row = [
            format_exit_rule(result),
            format_percent(result["mean_iou"]),
            format_percent(result["overall_accuracy"]),
            format_gflops(gflops),
            format_gflops(result["gflops"]),
            saved,
            f"{speedup(result, baseline, gflops_key):.2f}" if baseline else "n/a",
            " / ".join(f"{100 * share:.1f}" for share in result["exit_share"]),
            f"{1000 * result['seconds_per_image']:.1f}",
        ]
        rows.append(row + ([notes.get(setting_key(result, num_heads), "")] if notes else []))
    legend = (
        f"\nthreshold a / b: one per auxiliary head; exits per head: {' / '.join(stage_names)}; GFLOPs = "
        "multiply-accumulates / 1e9 per image (docs/flops.md); saved: backbone + decode head GFLOPs; R = GFLOPs "
        f"unpruned / pruned ({convention_name(gflops_key)})."
    )
    if capacities:
        legend += (
            " capacity a / b: capacity mode, the share of an image's tokens still active after each auxiliary head, "
            "the same for every image (static shapes: exports to ONNX, docs/deploy.md)."
        )
    return markdown_table(header, rows) + "\n" + legend


def calibration_table(calibration: dict, gflops_key: str) -> str:
    """The calibrated thresholds (or capacities) next to the unpruned model and the best shared value, measured on
    the calibration images (where they were chosen) and on the evaluated split (which the choice never saw)."""
    knob = knob_of(calibration["chosen"])
    bounded = MIOU_DROP_BOUND_KEY in calibration["chosen"]
    bound_column = [f"Δ bound ({100 * calibration['miou_drop_confidence']:g}%)"] if bounded else []
    header = [knob.name, "chosen as"]
    for split in ("calibration", "evaluation"):
        header += [f"{split} mIoU (%)", "Δ mIoU", *(bound_column if split == "calibration" else []), "GFLOPs", "R"]
    roles = {}  # setting -> (result key, what it was chosen as); one row per setting
    for key, role in (("baseline", "unpruned"), ("best_single", f"best single {knob.noun}"), ("chosen", "calibrated")):
        setting = format_threshold(setting_of(calibration[key]))
        roles[setting] = (key, f"{roles[setting][1]}, {role}" if setting in roles else role)
    rows = []
    for setting, (key, role) in roles.items():
        row = [setting, role + (" (saved)" if key == "chosen" else "")]
        for measured in (calibration, calibration["on_evaluation_split"]):
            result, baseline = measured[key], measured["baseline"]
            # The bound is of the drop: shown as a change, like the column before it (the baseline's as +0.00).
            bound = []
            if bounded and measured is calibration:
                bound = [f"{-100 * result[MIOU_DROP_BOUND_KEY]:+.2f}".replace("-0.00", "+0.00")]
            row += [
                format_percent(result["mean_iou"]),
                f"{100 * (result['mean_iou'] - baseline['mean_iou']):+.2f}",
                *bound,
                format_gflops(result[gflops_key]),
                f"{speedup(result, baseline, gflops_key):.2f}",
            ]
        rows.append(row)
    return markdown_table(header, rows)


def class_table(results: list[dict]) -> str:
    """Per-class IoU (%), one column per exit setting."""
    ordered = sorted(results, key=sweep_order)
    header = ["class"] + [format_exit_rule(result, threshold_prefix="t=") for result in ordered]
    rows = [
        [name] + [format_percent(result["per_category_iou"][name]) for result in ordered]
        for name in ordered[0]["per_category_iou"]
    ]
    return markdown_table(header, rows)


def calibration_notes(calibrations: Sequence[dict], num_heads: int) -> dict[tuple, str]:
    """The last column of the sweep table: which rows each calibration chose, by [`setting_key`]."""
    notes = {}
    for calibration in calibrations:
        best_single = f"best single {knob_of(calibration['chosen']).noun}"
        for role, note in (("best_single", best_single), ("chosen", "calibrated (saved)")):
            key = setting_key(calibration[role], num_heads)
            notes[key] = ", ".join(filter(None, [notes.get(key), note]))
    return notes


def calibrated(summary: dict, method: str = "thresholds") -> bool:
    """Whether the summary holds a finished calibration of `method` (a key of `CALIBRATION_FIELDS`: asked for, and
    something found to calibrate)."""
    calibration = summary.get(CALIBRATION_FIELDS[method])
    return calibration is not None and "chosen" in calibration


def finished_calibrations(summary: dict) -> list[dict]:
    """The summary's finished calibrations, thresholds first."""
    return [summary[field] for method, field in CALIBRATION_FIELDS.items() if calibrated(summary, method)]


def evaluated_settings(summary: dict, num_heads: int) -> list[dict]:
    """Every setting measured on the evaluated split, once: the sweep's, then the calibrations'."""
    results = list(summary["results"])
    for calibration in finished_calibrations(summary):
        results += calibration["on_evaluation_split"].values()
    return list({setting_key(result, num_heads): result for result in results}.values())


def sweep_section(summary: dict, stage_names: list[str], gflops_key: str) -> ReportSection:
    """Every setting measured on the evaluated split, the calibrations' choices marked."""
    rows, num_heads = evaluated_settings(summary, len(stage_names) - 1), len(stage_names) - 1
    notes = calibration_notes(finished_calibrations(summary), num_heads) or None
    return ReportSection("sweep", sweep_table(rows, stage_names, gflops_key, notes))


def calibration_section(
    summary: dict, stage_names: list[str], gflops_key: str, method: str = "thresholds"
) -> ReportSection | None:
    """The settings a calibration of `method` chose, on both splits, when it was made (named as its summary
    field: `calibration`, `capacity_calibration`)."""
    if not calibrated(summary, method):
        return None
    field = CALIBRATION_FIELDS[method]
    calibration = summary[field]
    noun = knob_of(calibration["chosen"]).noun
    bound = (
        f", the budget holding each setting's mIoU drop at {100 * calibration['miou_drop_confidence']:g}% "
        "confidence (Δ bound: a paired bootstrap over those images)"
        if MIOU_DROP_BOUND_KEY in calibration["chosen"]
        else ""
    )
    heading = (
        f"Calibration: {calibration['num_evaluations']} {noun} settings evaluated on {calibration['data']}{bound}; "
        f"the chosen ones measured on the {summary['split']!r} split too:"
    )
    return ReportSection(field, calibration_table(calibration, gflops_key), heading)


def per_class_section(summary: dict, stage_names: list[str], gflops_key: str) -> ReportSection | None:
    """Per-class IoU, up to `MAX_REPORTED_CLASSES` classes (all of them are in the JSON)."""
    rows = evaluated_settings(summary, len(stage_names) - 1)
    if len(rows[0]["per_category_iou"]) > MAX_REPORTED_CLASSES:
        return None
    return ReportSection("per_class", class_table(rows), "IoU per class (%):")


def has_depth_profile(summary: dict) -> bool:
    """Whether the summary holds exit diagnostics (asked for, and measured: whole images)."""
    return "depth_mean_iou" in summary.get("diagnostics", {})


def depth_profile_section(summary: dict, stage_names: list[str], gflops_key: str) -> ReportSection | None:
    """Each head's own mIoU over all tokens of the unpruned model: what depth buys on this data set."""
    if not has_depth_profile(summary):
        return None
    row = ["own mIoU (%)", *map(format_percent, summary["diagnostics"]["depth_mean_iou"])]
    heading = (
        "Depth profile: each head's own mIoU over all tokens of the unpruned model (threshold 1), scored as the "
        "final map (a flat profile: depth buys little; DToP pays where early heads are as good on the easy tokens):"
    )
    return ReportSection("depth_profile", markdown_table(["", *stage_names], [row]), heading)


def exit_precision_section(summary: dict, stage_names: list[str], gflops_key: str) -> ReportSection | None:
    """Per exit setting and head: how many tokens exited there, how many of them keep the unpruned model's label or
    the right one, and how many lie on a boundary."""
    if not has_depth_profile(summary):
        return None
    header = ["setting", "head", "exited (%)", "agree with unpruned (%)", "right (%)", "unpruned right (%)"]
    rows = []
    for result in sorted(evaluated_settings(summary, len(stage_names) - 1), key=sweep_order):
        diagnostics = result.get("exit_diagnostics")
        if diagnostics is None:
            continue
        for stage, name in enumerate(stage_names):
            values = [result["exit_share"][stage]] + [diagnostics[key][stage] for key in EXIT_PRECISION_KEYS]
            rows.append([format_exit_rule(result), name, *map(format_percent, values)])
    legend = (
        f"\nOf the tokens each head finalised: the share whose label equals the unpruned model's final label, the "
        f"share right against the ground truth (a token's label: its patch's majority class) and the unpruned "
        f"model's on the same tokens; boundary: the share of boundary tokens among them, against "
        f"{format_percent(summary['diagnostics']['boundary_share'])}% among all tokens (easy tokens should exit "
        "early, boundary tokens late); n/a: no token exited there."
    )
    table = markdown_table(header + ["boundary (%)"], rows)
    return ReportSection("exit_precision", table + "\n" + legend, "Exit precision per head (evaluated split):")


def boundary_table(rows: Sequence[tuple[str, dict]], stage_names: Sequence[str]) -> str:
    """Per exit setting (`rows`: its label, and its result with `exit_diagnostics`) and head: the share of boundary
    tokens (%) among the tokens the head finalised, and how many of all tokens exited there."""
    body = []
    for label, result in rows:
        shares = zip(result["exit_diagnostics"]["exit_boundary_share"], result["exit_share"], strict=True)
        body.append([label, *(f"{format_percent(share)} ({100 * exited:.1f}% exited)" for share, exited in shares)])
    return markdown_table(["exit threshold", *stage_names], body)


def format_depth_profiles(profiles: dict[str, Sequence[float]], stage_names: Sequence[str]) -> str:
    """Several models' depth profiles on one line: `base model 20.10 / 25.31 / 30.02; ...` (mIoU %, per head)."""
    values = "; ".join(f"{name} " + " / ".join(map(format_percent, profile)) for name, profile in profiles.items())
    return f"{values} ({' / '.join(stage_names)})"


# `exit_diagnostics` fields of the exit precision table, after the share of tokens exited.
EXIT_PRECISION_KEYS = ("exit_agreement", "exit_accuracy", "reference_accuracy", "exit_boundary_share")
# The sections of the exit diagnostics (a caller showing a short report leaves them out).
DIAGNOSTICS_SECTIONS = ("depth_profile", "exit_precision")

# The report's sections in order: each builds one from (summary, stage names, GFLOPs key), or None to leave it out.
# A new part of the report is one more entry.
SECTION_BUILDERS = [
    sweep_section,
    *(partial(calibration_section, method=method) for method in CALIBRATION_FIELDS),
    depth_profile_section,
    exit_precision_section,
    per_class_section,
]


def report_sections(summary: dict, stage_names: list[str], gflops_key: str) -> list[ReportSection]:
    """The report of an evaluation summary, one section per entry of `SECTION_BUILDERS` that has something to say."""
    sections = (build(summary, stage_names, gflops_key) for build in SECTION_BUILDERS)
    return [section for section in sections if section is not None]


def describe_calibrated(calibration: dict, gflops_key: str) -> str:
    """One line per split for the calibrated thresholds (or capacities): mIoU, change against the unpruned model,
    GFLOPs, R."""
    lines = []
    for name, measured in (
        ("calibration images", calibration),
        ("evaluated split", calibration["on_evaluation_split"]),
    ):
        chosen, baseline = measured["chosen"], measured["baseline"]
        lines.append(
            f"  {name}: mIoU {format_percent(chosen['mean_iou'])} "
            f"({100 * (chosen['mean_iou'] - baseline['mean_iou']):+.2f}), "
            f"{format_gflops(chosen[gflops_key])} GFLOPs, R = {speedup(chosen, baseline, gflops_key):.2f}"
        )
    return "\n".join(lines)


def compare_with_best_single(summary: dict, max_miou_drop: float, images: str = "evaluated images") -> str:
    """R at the mIoU budget (points) on the evaluated split, which `images` names: the calibrated thresholds
    (chosen on other images) against the best single threshold of the sweep (chosen, with hindsight, on the
    evaluated images themselves)."""
    calibrated = summary["calibration"]["on_evaluation_split"]
    baseline = calibrated["baseline"]
    thresholds = [result for result in summary["results"] if knob_of(result) is THRESHOLD]
    single = choose_threshold(thresholds + [baseline], max_miou_drop=max_miou_drop / 100)

    def describe_point(result: dict) -> str:
        change = 100 * (result["mean_iou"] - baseline["mean_iou"])
        return f"{format_exit_rule(result)}: R = {speedup(result, baseline):.2f} at {change:+.2f} mIoU"

    return (
        f"On the {images}, within {max_miou_drop:g} mIoU points: calibrated thresholds "
        f"{describe_point(calibrated['chosen'])}; best single threshold of the sweep {describe_point(single)}."
    )


def write_report_files(summary: dict, report: str, output_dir: Path) -> dict[str, Path]:
    """`table.md` (the report) and `results.json` (the summary, tuples as lists) in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": output_dir / "table.md", "results": output_dir / "results.json"}
    paths["table"].write_text(report + "\n", encoding="utf-8")
    with open(paths["results"], "w", encoding="utf-8") as file:
        json.dump(json_ready(summary), file, indent=2)
    return paths


__all__ = [
    "CALIBRATION_FIELDS",
    "DIAGNOSTICS_SECTIONS",
    "GFLOPS_KEYS",
    "MAX_REPORTED_CLASSES",
    "boundary_table",
    "ReportSection",
    "SECTION_BUILDERS",
    "calibrated",
    "calibration_table",
    "class_table",
    "compare_with_best_single",
    "depth_profile_section",
    "describe_calibrated",
    "evaluated_settings",
    "exit_precision_section",
    "finished_calibrations",
    "format_depth_profiles",
    "format_gflops",
    "format_percent",
    "has_depth_profile",
    "render_report",
    "report_sections",
    "sweep_order",
    "sweep_table",
    "write_report_files",
]
