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
"""The benchmark's reports: a result table (a sync table when syncs were counted, and a side-by-side table when
several backends ran) as text or Markdown, and the JSON of every record."""

import json
from collections.abc import Callable
from pathlib import Path

from .cases import (
    BATCH_ONE_SPEEDUP_TARGET,
    BATCH_SPEEDUP_TARGET,
    CAPACITY_EAGER_BATCH_SPEEDUP_TARGET,
    ONNX_RUNTIME_SPEEDUP_TARGET,
    VIT_REFERENCE_TARGET,
)


Table = Callable[[tuple[str, ...], list[tuple[str, ...]]], str]

RESULT_COLUMNS = ("case", "mode", "dtype", "GFLOPs base->pruned", "R", "base ms", "pruned ms", "speed-up", "/R",
                  "/R target", "img/s base->pruned", "base/ViT", "peak MB base->pruned", "targets")  # fmt: skip
SYNC_COLUMNS = ("case", "dtype", "syncs unpruned (allowed)", "syncs pruned (allowed)", "where (pruned)")
NOTES = (
    "R = GFLOPs unpruned / pruned (all heads, MACs / 1e9); speed-up = median baseline time / median pruned time; "
    f"/R = speed-up / R (targets: >= {BATCH_ONE_SPEEDUP_TARGET} at batch 1, >= {BATCH_SPEEDUP_TARGET} at larger "
    f"batches); base/ViT = unpruned DToP / (transformers ViTModel, sdpa, + the same heads), eager only (target <= "
    f"{VIT_REFERENCE_TARGET}); peak MB = memory one forward adds (CUDA: max_memory_allocated over the resident "
    "weights and inputs; CPU: resident-memory growth in a fresh process)."
)
CAPACITY_NOTES = (
    "Capacity mode: after auxiliary head i, ceil(capacity_i x patches) tokens of every image go on, so R follows from "
    "the capacities and the input size alone (`capacity_flops_ratio`, all heads). Its targets: speed-up >= "
    f"{ONNX_RUNTIME_SPEEDUP_TARGET} R in ONNX Runtime at every batch size, >= {CAPACITY_EAGER_BATCH_SPEEDUP_TARGET} R "
    "in eager PyTorch at batch > 1. onnxruntime session: the capacity-mode ONNX export against the unpruned export "
    "(threshold 1.0) of the same model, CPUExecutionProvider, all graph optimisations but the SkipLayerNormalization "
    "fusion; export parity: the largest |logits difference| against the PyTorch model and the share of exit stages on "
    "which they agree."
)


def format_number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_label(record: dict) -> str:
    """The mode column: the mode, after the backend when it is not PyTorch."""
    backend = record.get("backend", "torch")
    return record["mode"] if backend == "torch" else f"{backend} {record['mode']}"


def case_label(record: dict) -> str:
    return f"{record['model']} {record['image_size']}x{record['batch_size']}"


def result_row(record: dict) -> tuple[str, ...]:
    memory = record.get("peak_memory_mb", {})
    images = record["images_per_second"]
    checks = (("/R", "meets_speedup_target"), ("ViT", "meets_vit_reference_target"), ("syncs", "meets_sync_target"))
    missed = [name for name, key in checks if record.get(key) is False]
    return (
        case_label(record),
        run_label(record),
        record["dtype"],
        f"{record['gflops_baseline_per_image']:.4g}->{record['gflops_pruned_per_image']:.4g}",
        format_number(record["flops_ratio"]),
        format_number(1e3 * record["baseline_seconds"], 1),
        format_number(1e3 * record["pruned_seconds"], 1),
        format_number(record["speedup"]),
        format_number(record["speedup_over_flops_ratio"]),
        f">={record['speedup_target']}",
        f"{images['baseline']:.1f}->{images['pruned']:.1f}",
        format_number(record.get("baseline_over_vit_plus_heads")),
        f"{memory['baseline']:.0f}->{memory['pruned']:.0f}" if memory else "-",
        "met" if not missed else "MISSED " + ", ".join(missed),
    )


def sync_row(record: dict) -> tuple[str, ...]:
    syncs = record["device_syncs_per_forward"]
    where = ", ".join(f"{line} x{count}" for line, count in syncs["pruned"]["where"].items())
    return (
        case_label(record),
        record["dtype"],
        f"{syncs['unpruned']['count']} ({syncs['allowed_unpruned']})",
        f"{syncs['pruned']['count']} ({syncs['allowed_pruned']})",
        where or "-",
    )


def parity_text(record: dict) -> str:
    """An export's agreement with the PyTorch model, baseline and pruned file: largest |logits difference|, share of
    exit stages that agree."""
    return "; ".join(
        f"{name} {parity['max_abs_logits_difference']:.1e}, {parity['exit_stage_agreement']:.0%}"
        for name, parity in record["onnx_parity"].items()
    )


def side_by_side_table(records: list[dict], table: Table) -> str:
    """One row per case and dtype: its capacities and R, then every backend and mode's speed-up and speed-up / R
    next to each other, the export's parity, and the variants that missed their /R target."""
    variants = list(dict.fromkeys(run_label(record) for record in records))
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        rows.setdefault((case_label(record), record["dtype"]), {})[run_label(record)] = record
    columns = ("case", "dtype", "exit capacity", "R", *(f"{variant} {what}" for variant in variants for what in
               ("speed-up", "/R")), "export parity (max |dlogits|, exits agree)", "/R target missed")  # fmt: skip
    lines = []
    for (case, dtype), by_variant in rows.items():
        first = next(iter(by_variant.values()))
        capacity = first.get("exit_capacity")
        cells = []
        for variant in variants:
            record = by_variant.get(variant)
            cells += [
                format_number(record and record["speedup"]),
                format_number(record and record["speedup_over_flops_ratio"]),
            ]
        exported = [record for record in by_variant.values() if "onnx_parity" in record]
        missed = [variant for variant, record in by_variant.items() if record["meets_speedup_target"] is False]
        lines.append((
            case, dtype, ", ".join(f"{value:.3f}" for value in capacity) if capacity else "-",
            format_number(first["flops_ratio"]), *cells, parity_text(exported[0]) if exported else "-",
            ", ".join(missed) or "none",
        ))  # fmt: skip
    return table(columns, lines)


def text_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(text) for text in column) for column in zip(columns, *rows)]
    lines = [" ".join(text.rjust(width) for text, width in zip(row, widths)) for row in (columns, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in (columns, *rows)]
    lines.insert(1, "|" + "---|" * len(columns))
    return "\n".join(lines)


def timing_note(records: list[dict]) -> str:
    """How the calls were timed: in turns of back-to-back calls, or call by call (records without `turn_s` were)."""
    turns = sorted({record.get("turn_s", 0.0) for record in records})
    if turns == [0.0]:
        return "Timing: the two variants alternate call by call; medians over every timed call."
    return (
        "Timing: in each round each variant takes a turn of about "
        + " / ".join(f"{turn:g}" for turn in turns)
        + " s of back-to-back calls whose first call, re-warming the caches that the other variant's calls evicted, "
        "is not timed (a call that long or longer is a turn by itself, timed); medians over every timed call."
    )


def report_sections(records: list[dict], skipped: list[str], table: Table = text_table) -> list[str]:
    """The result table, the sync table (when counted), the notes and the skipped runs, each formatted by `table`."""
    sections = [table(RESULT_COLUMNS, [result_row(record) for record in records]), NOTES, timing_note(records)]
    if len({record.get("backend", "torch") for record in records}) > 1:
        sections.append("Side by side (speed-up and speed-up / R per backend and mode):")
        sections.append(side_by_side_table(records, table))
    if any(record.get("exits") == "capacity" for record in records):
        sections.append(CAPACITY_NOTES)
    synced = [record for record in records if "device_syncs_per_forward" in record]
    if synced:
        sections.append("Device-to-host syncs per eager forward (torch.cuda.set_sync_debug_mode):")
        sections.append(table(SYNC_COLUMNS, [sync_row(record) for record in synced]))
    if skipped:
        sections.append("Skipped (time budget): " + ", ".join(skipped))
    return sections


def write_reports(
    records: list[dict],
    skipped: list[str],
    output_json: str | Path,
    output_markdown: str | Path | None = None,
    header: str = "",
) -> None:
    """The records as JSON and, when `output_markdown` is given, the tables as Markdown under `header`."""
    output_json = Path(output_json)
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(records, indent=2))
    if output_markdown:
        sections = [header] if header else []
        sections += report_sections(records, skipped, markdown_table)
        Path(output_markdown).write_text("\n\n".join(sections) + "\n")
