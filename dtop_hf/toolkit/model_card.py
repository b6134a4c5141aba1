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
"""Hub model card (README.md) of a saved DToP model, filled in from the `MODEL_CARD.md` template."""

import json
import re
from pathlib import Path

from ..configuration_dtop import DToPConfig
from ..modeling_dtop import DTOP_HEAD_CLASSES


# The template sits at the root of the dtop-hf repository, beside the package.
# `dtop_hf/MODEL_CARD.md` links to the repository's root `MODEL_CARD.md` and is installed as package data, so the
# template is found in editable and regular installs alike.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
PLACEHOLDER_PATTERN = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def model_summary_rows(config: DToPConfig) -> str:
    """The architecture as rows of a two-column markdown table."""
    thresholds = config.exit_thresholds_per_head()[:-1]
    head = DTOP_HEAD_CLASSES[config.head_type].describe(config)
    rows = {
        "backbone": (
            f"plain ViT, width {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{config.num_attention_heads} heads, patch {config.patch_size}, "
            f"class token {'kept' if config.use_cls_token else 'dropped (official)'}"
        ),
        "input size": f"{config.image_size} x {config.image_size} (position embeddings resized for other sizes)",
        "heads": f"after layers {list(config.out_indices)} (0-based; the last is the decode head): {head}",
        "exit thresholds": f"{list(thresholds)} for the auxiliary heads (1.0 = no pruning)",
        "tokens kept per class": f"{config.keep_top_k} most confident exit candidates of each class stay in",
        "classes": f"{config.num_labels}",
    }
    return "\n".join(f"| {name} | {value} |" for name, value in rows.items())


def evaluation_table_row(
    model_name: str, dataset_name: str, mean_iou: float | None = None, gflops: float | None = None
) -> str:
    """The "ours" row of the evaluation table; `mean_iou` is a fraction in [0, 1] as the metrics return it."""
    miou_text = f"{100 * mean_iou:.1f}" if mean_iou is not None else "not evaluated"
    gflops_text = f"{gflops:.1f}" if gflops is not None else "not measured"
    return f"| ours: {model_name} | {dataset_name} | {gflops_text} | {miou_text} |"


def render_model_card(template: str, fields: dict[str, str]) -> str:
    """Replace every `{{name}}` of `template` with `fields[name]`.

    Raises:
        ValueError: when a placeholder has no value or a field has no placeholder (a typo on either side).
    """
    placeholders = set(PLACEHOLDER_PATTERN.findall(template))
    missing, unused = sorted(placeholders - set(fields)), sorted(set(fields) - placeholders)
    if missing or unused:
        raise ValueError(
            f"The model card template and the fields disagree: placeholders without a value {missing}, "
            f"fields without a placeholder {unused}."
        )
    return PLACEHOLDER_PATTERN.sub(lambda match: str(fields[match.group(1)]), template)


def write_model_card(
    output_dir: str | Path,
    config: DToPConfig,
    model_name: str | None = None,
    repo_id: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    dataset_name: str = "a custom data set",
    description: str = "",
    training_recipe: str = "",
    mean_iou: float | None = None,
    gflops: float | None = None,
    template_path: str | Path | None = None,
) -> Path:
    """Write `README.md`, the Hub model card, into a saved model folder.

    Args:
        output_dir: the folder `save_pretrained` wrote.
        config: the model's config (architecture table, label count).
        model_name: title of the card; defaults to the folder name.
        repo_id: Hub id used in the usage snippets; defaults to `model_name`.
        datasets: Hub data set ids for the YAML metadata (e.g. `["scene_parse_150"]`).
        dataset_name: human-readable name of the training data.
        description: a paragraph on where these weights come from.
        training_recipe: how these weights were trained (after the official recipe's paragraph).
        mean_iou, gflops: this checkpoint's figures for the evaluation table (fraction in [0, 1]; GFLOPs per image).
        template_path: defaults to the `MODEL_CARD.md` template shipped with dtop-hf.

    Returns:
        The path of the written `README.md`.
    """
    output_dir = Path(output_dir)
    template_path = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"Model card template not found at {template_path}: pass `template_path` (the `MODEL_CARD.md` of the "
            "dtop-hf repository)."
        )
    model_name = model_name or output_dir.resolve().name
    fields = {
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        # A JSON list is a valid YAML flow sequence.
        "datasets": json.dumps(list(datasets)),
        "dataset_name": dataset_name,
        "description": description,
        "model_summary": model_summary_rows(config),
        "training_recipe": training_recipe,
        "evaluation_row": evaluation_table_row(model_name, dataset_name, mean_iou, gflops),
    }
    card = render_model_card(template_path.read_text(encoding="utf-8"), fields)
    output_dir.mkdir(parents=True, exist_ok=True)
    card_path = output_dir / "README.md"
    card_path.write_text(card, encoding="utf-8")
    return card_path


__all__ = ["MODEL_CARD_TEMPLATE", "evaluation_table_row", "render_model_card", "write_model_card"]
