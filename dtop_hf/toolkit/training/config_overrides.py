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
"""`--config_overrides` parsing and fresh-model configs built from the presets of `dtop_hf.toolkit.presets`."""

import ast
import dataclasses
import difflib
from typing import Any

from ...configuration_dtop import DToPConfig
from ..presets import default_stage_layout, model_size_kwargs


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split `text` at `separator`s that are not inside brackets or quotes: "a=[1,2],b=3" -> ["a=[1,2]", "b=3"]."""
    parts, depth, quote, start = [], 0, None, 0
    for position, character in enumerate(text):
        if quote:
            quote = None if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character in "[(":
            depth += 1
        elif character in "])":
            depth -= 1
        elif character == separator and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def parse_override_value(text: str) -> Any:
    """One override value: `[1,2,3]` / `(0.9,0.95)` -> list, `true`/`false` -> bool, `none`/`null` -> None,
    numbers -> int or float, anything else -> the string itself (quotes optional)."""
    text = text.strip()
    if text[:1] in "[(" and text[-1:] in "])":
        return [parse_override_value(item) for item in split_top_level(text[1:-1])]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, str)) else text


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """Parse `--config_overrides` ("hidden_size=64,out_indices=[1,2,3],exit_threshold=[0.9,0.95]") into a dict.

    Unlike transformers' `PreTrainedConfig.update_from_string`, list values (and bools, None, quoted strings)
    are accepted.

    Raises:
        ValueError: for an item without `=` or a key given twice.
    """
    if not overrides:
        return {}
    parsed = {}
    for item in split_top_level(overrides):
        key, separator, value = item.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ValueError(f"`--config_overrides` items must look like `name=value`, got {item!r} in {overrides!r}.")
        if key in parsed:
            raise ValueError(f"`--config_overrides` sets {key!r} twice in {overrides!r}.")
        parsed[key] = parse_override_value(value)
    return parsed


def check_config_fields(overrides: dict[str, Any]) -> None:
    """Raise a ValueError naming every override that is not a DToPConfig field, with the closest field names."""
    fields = {field.name for field in dataclasses.fields(DToPConfig)} | {"num_labels"}
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        hints = {key: difflib.get_close_matches(key, sorted(fields), n=3) for key in unknown}
        raise ValueError(f"Unknown DToPConfig fields in `--config_overrides`: {hints} (name: closest fields).")


def build_preset_config(
    overrides: dict[str, Any] | None = None,
    id2label: dict[int, str] | None = None,
    size: str = "small",
    **fields: Any,
) -> DToPConfig:
    """A fresh [`DToPConfig`] from a model size of `presets.MODEL_SIZES`, then `fields`, then `overrides`.

    When `fields` or `overrides` change the depth but not `out_indices`, the heads are placed by
    `presets.default_stage_layout` so that the last head stays after the last layer.

    Args:
        overrides: parsed `--config_overrides` (checked against the config's fields).
        id2label: class names; they set `num_labels`.
        size: the model size the config starts from (`"small"`, `"tiny"`, `"vit-base"`, ...).
        fields: further `DToPConfig` fields, applied before `overrides`.
    """
    overrides = dict(overrides or {})
    check_config_fields(overrides)
    values = {**model_size_kwargs(size), **fields, **overrides}
    if ("num_hidden_layers" in fields or "num_hidden_layers" in overrides) and not (
        "out_indices" in fields or "out_indices" in overrides
    ):
        values["out_indices"] = default_stage_layout(values["num_hidden_layers"], values["hidden_size"])["out_indices"]
    if id2label is not None:
        values["id2label"] = {int(index): name for index, name in id2label.items()}
        values["label2id"] = {name: int(index) for index, name in id2label.items()}
    return DToPConfig(**values)


__all__ = [
    "build_preset_config",
    "check_config_fields",
    "parse_config_overrides",
    "parse_override_value",
    "split_top_level",
]
