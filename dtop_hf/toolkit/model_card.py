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
"""Hub model card (README.md) of a saved DToP model, filled in from the `model_card_template.md` template.

`python -m dtop_hf.toolkit.model_card MODEL_CARD.md` writes the repository's `MODEL_CARD.md`: the card of the official
ViT-B/16 ADE20K configuration, rendered from the same template (`reference_model_card`).
"""

import json
import re
import sys
import textwrap
from pathlib import Path

from ..configuration_dtop import DToPConfig
from ..modeling_dtop import DTOP_HEAD_CLASSES


# Package data beside this module, so that editable and regular installs find it alike.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
# The configuration the repository's own MODEL_CARD.md describes.
REFERENCE_PRESET = "dtop-vit-base-ade20k"
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


def model_card_text(
    config: DToPConfig,
    model_name: str,
    repo_id: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    dataset_name: str = "a custom data set",
    description: str = "",
    training_recipe: str = "",
    mean_iou: float | None = None,
    gflops: float | None = None,
    template_path: str | Path | None = None,
) -> str:
    """The Hub model card of a DToP model, as markdown.

    Args:
        config: the model's config (architecture table, label count).
        model_name: title of the card.
        repo_id: Hub id used in the usage snippets; defaults to `model_name`.
        datasets: Hub data set ids for the YAML metadata (e.g. `["scene_parse_150"]`).
        dataset_name: human-readable name of the training data.
        description: a paragraph on where these weights come from.
        training_recipe: how these weights were trained (after the official recipe's paragraph).
        mean_iou, gflops: this checkpoint's figures for the evaluation table (fraction in [0, 1]; GFLOPs per image).
        template_path: defaults to the `model_card_template.md` shipped with dtop-hf.
    """
    template_path = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(
            f"Model card template not found at {template_path}: pass `template_path` (dtop-hf ships it as "
            "`dtop_hf/toolkit/model_card_template.md`)."
        )
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
    return render_model_card(template_path.read_text(encoding="utf-8"), fields)


def write_model_card(output_dir: str | Path, config: DToPConfig, model_name: str | None = None, **card_fields) -> Path:
    """Write `README.md`, the Hub model card, into a saved model folder.

    Args:
        output_dir: the folder `save_pretrained` wrote.
        config: the model's config.
        model_name: title of the card; defaults to the folder name.
        card_fields: the other arguments of [`model_card_text`].

    Returns:
        The path of the written `README.md`.
    """
    output_dir = Path(output_dir)
    card = model_card_text(config, model_name or output_dir.resolve().name, **card_fields)
    output_dir.mkdir(parents=True, exist_ok=True)
    card_path = output_dir / "README.md"
    card_path.write_text(card, encoding="utf-8")
    return card_path


def reference_model_card() -> str:
    """The repository's `MODEL_CARD.md`: the card of the official ViT-B/16 ADE20K configuration, as a folder of it
    converted or trained with dtop-hf carries it, before any figures of its own."""
    from .presets import PAPER_PRESETS

    preset = PAPER_PRESETS[REFERENCE_PRESET]
    return model_card_text(
        DToPConfig(**preset.config_kwargs()),
        model_name=REFERENCE_PRESET,
        repo_id=f"your-org/{REFERENCE_PRESET}",
        datasets=preset.dataset.card_datasets,
        dataset_name=preset.dataset.display_name,
        description=textwrap.fill(
            f"The official ViT-B/16 ADE20K configuration of DToP (dtop-hf's `{REFERENCE_PRESET}` preset). No weights "
            "of it were ever released: a folder converted (`convert_dtop_original_to_hf`) or trained "
            "(`examples/finetune.py`) with dtop-hf carries this card, with its own origin, recipe and figures.",
            width=115,
        ),
        training_recipe="Every value of this configuration, both phases: dtop-hf's "
        "[docs/official_recipes.md](https://github.com/dtop-hf/dtop-hf/blob/main/docs/official_recipes.md).",
    )


__all__ = [
    "MODEL_CARD_TEMPLATE",
    "evaluation_table_row",
    "model_card_text",
    "reference_model_card",
    "render_model_card",
    "write_model_card",
]


if __name__ == "__main__":
    # python -m dtop_hf.toolkit.model_card MODEL_CARD.md
    Path(sys.argv[1]).write_text(reference_model_card(), encoding="utf-8")
