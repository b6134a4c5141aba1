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
"""The command-line arguments the example scripts share, written once and parsed with `HfArgumentParser`.

Each script lists the dataclasses it needs, adds its own (`EvaluationArguments`, `SegmentArguments`, ...) and parses
them with [`parse_arguments`]:

    parser = build_parser((ModelArguments, ExitArguments, RuntimeArguments, SegmentArguments), description="...")
    model_args, exit_args, runtime_args, segment_args = parse_arguments(parser, argv, required=["model_name_or_path"])

One vocabulary: a flag means the same in every script (`--seed`: the run's randomness; `--data_seed`: the built-in
data set's and a drawn validation split's; `--device`; `--per_device_eval_batch_size`; `--exit_threshold`). The
names of earlier releases still work for one release: [`translate_deprecated_flags`] rewrites them, with a
`FutureWarning` naming the new flag, before the parser sees them.
"""

import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import HfArgumentParser

from ..configuration_dtop import normalize_exit_capacity, normalize_exit_threshold
from .data.layouts import ACCEPTED_FOLDER_LAYOUTS
from .presets import MODEL_SIZES, PAPER_PRESETS


@dataclass
class ModelArguments:
    """Which model to load."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "DToP model folder (config.json, preprocessor_config.json) or Hub id."},
    )


@dataclass
class PresetArguments:
    """What a fresh model is built from: a model size, or one of the paper's configurations (its training recipe
    and data set too), changed by `--config_overrides`."""

    model_size: str | None = field(
        default=None,
        metadata={"help": "Architecture of a fresh model.", "choices": sorted(MODEL_SIZES)},
    )
    paper_preset: str | None = field(
        default=None,
        metadata={
            "help": "A configuration of the paper: architecture, recipe, data set.",
            "choices": sorted(PAPER_PRESETS),
        },
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'DToPConfig fields changed on the size or preset, "hidden_size=64,..."'}
    )

    def __post_init__(self):
        if self.model_size is not None and self.paper_preset is not None:
            raise ValueError(
                "`--model_size` and `--paper_preset` both choose the architecture: give one of them "
                "(change a paper configuration with `--config_overrides`)."
            )


@dataclass
class ExitArguments:
    """When tokens leave the network. Each flag takes one setting, or several where a script sweeps them
    (evaluation); unset flags leave the model's own setting."""

    exit_threshold: list[str] | None = field(
        default=None,
        metadata={
            "help": "Exit threshold(s) in (0, 1]: '0.9', or one per auxiliary head '0.9,0.95'; 1.0 = no pruning. "
            "Default: the model's."
        },
    )
    exit_mode: Literal["threshold", "capacity"] | None = field(
        default=None,
        metadata={
            "help": "threshold: tokens above the threshold exit; capacity: a set share of the tokens goes on after "
            "each auxiliary head. Default: the model's."
        },
    )
    exit_capacity: list[str] | None = field(
        default=None,
        metadata={
            "help": "Capacity mode: fraction in (0, 1] of an image's patch tokens still active after each "
            "auxiliary head (not the share that exits): '0.5', or one per head '0.5,0.3', non-increasing; 1.0 = no "
            "exit. Default: the model's."
        },
    )

    def __post_init__(self):
        # The config's normalisers are the one place exit settings are checked; here they read the flags' text.
        if self.exit_threshold is not None:
            self.exit_threshold = [normalize_exit_threshold(text) for text in self.exit_threshold]
        if self.exit_capacity is not None:
            self.exit_capacity = [normalize_exit_capacity(text) for text in self.exit_capacity]

    def model_kwargs(self, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The one setting given, as keyword arguments of the model's forward (or config): only the flags set.

        Args:
            exclude: flags left out (e.g. `("exit_threshold",)` where a script sweeps the thresholds itself).

        Raises:
            ValueError: a flag has several values (only the evaluation script sweeps them).
        """
        kwargs = {}
        for name in ("exit_threshold", "exit_mode", "exit_capacity"):
            if name in exclude:
                continue
            value = getattr(self, name)
            if isinstance(value, list):
                if len(value) != 1:
                    raise ValueError(f"`--{name}` takes one setting here, got {len(value)}: {value}.")
                value = value[0]
            if value is not None:
                kwargs[name] = value
        return kwargs


@dataclass
class DataArguments:
    """The data set: a Hub data set, a local folder, or the built-in synthetic scenes."""

    dataset_name: str = field(
        default="builtin",
        metadata={
            "help": "Hub data set, local folder, or 'builtin' for the synthetic scenes. Folders: "
            + "; ".join(ACCEPTED_FOLDER_LAYOUTS).replace("%", "%%")
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    id2label: str | None = field(
        default=None, metadata={"help": "Json file of class names (ids after label reduction)."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column, when not image/pixel_values/img."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label-map column, when not annotation/label/..."}
    )
    validation_split_percentage: float = field(
        default=15.0, metadata={"help": "Share of train held out when there is no validation split."}
    )
    do_reduce_labels: bool | None = field(
        default=None,
        metadata={
            "help": "Label 0 = unlabelled (ADE20K, Pascal Context, COCO-Stuff, built-in): 0 -> 255, k -> k-1; "
            "--no_do_reduce_labels: off; default: the image processor's setting.",
            "nargs": "?",
            "const": True,
        },
    )
    skip_data_check: bool = field(default=False, metadata={"help": "Do not decode and check every sample first."})
    synthetic_validation_samples: int = field(
        default=200, metadata={"help": "Validation images of the built-in data set."}
    )
    synthetic_image_size: int = field(default=128, metadata={"help": "Side of the built-in data set's images."})
    data_seed: int = field(
        default=0, metadata={"help": "Seed of the built-in data set and of a validation split drawn from train."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of Hub data sets and of the generated built-in data set."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N samples of the evaluated split."}
    )

    def __post_init__(self):
        require_positive(self, ("synthetic_validation_samples", "synthetic_image_size", "max_eval_samples"))
        if not 0.0 < self.validation_split_percentage < 100.0:
            raise ValueError(
                f"`--validation_split_percentage` must lie in (0, 100), got {self.validation_split_percentage}."
            )

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `load_segmentation_dataset` (the sample counts of the built-in data set are the
        caller's, as each script caps them by its own limits)."""
        return {
            "dataset_name": self.dataset_name,
            "dataset_config_name": self.dataset_config_name,
            "id2label_file": self.id2label,
            "image_column": self.image_column_name,
            "annotation_column": self.label_column_name,
            "validation_split_percentage": self.validation_split_percentage,
            "image_size": self.synthetic_image_size,
            "seed": self.data_seed,
            "cache_dir": self.cache_dir,
        }


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class RuntimeArguments:
    """Where and how the job runs."""

    seed: int = field(
        default=42, metadata={"help": "The run's randomness: a fresh model's weights, data order, augmentation."}
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (CUDA when available), cpu, cuda or cuda:N. Several CPU processes "
            "(`accelerate launch --cpu`) need --device cpu."
        },
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "Images per forward pass and process at inference and evaluation."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})

    def __post_init__(self):
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"`--device` must be auto, cpu, cuda or cuda:N, got {self.device!r}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"`--device {self.device}`: CUDA is not available here (use --device cpu or auto).")
        require_positive(self, ("per_device_eval_batch_size",))
        if self.dataloader_num_workers < 0:
            raise ValueError(f"`--dataloader_num_workers` must be >= 0, got {self.dataloader_num_workers}.")

    @property
    def use_cpu(self) -> bool:
        return self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())

    def accelerator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Accelerator` / `PartialState` (and of the toolkit's `accelerator_session`).

        Accelerate splits the work between several CPU processes (gloo) only when told `cpu=True`; `cuda:N` picks
        the GPU of a single-process run (`accelerate launch` gives each process its own).
        """
        if self.device.startswith("cuda:"):
            torch.cuda.set_device(int(self.device.split(":")[1]))
        return {"cpu": self.use_cpu}


def require_positive(arguments: object, names: Iterable[str]) -> None:
    """Raise a ValueError naming the first flag of `names` whose value is below 1 (unset, None, passes)."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {value}.")


# Old flag -> its replacement: a flag name, or a function of the old flag's value giving the new tokens.
Replacement = str | Callable[[str], list[str]]


def preset_replacement(value: str) -> list[str]:
    """`--preset` named a paper configuration or a model size: the flag now says which."""
    return ["--paper_preset" if value in PAPER_PRESETS else "--model_size", value]


DEPRECATED_FLAGS: dict[str, Replacement] = {
    "--model": "--model_name_or_path",
    "--threshold": "--exit_threshold",
    "--thresholds": "--exit_threshold",
    "--cpu": "--device=cpu",
    "--batch_size": "--per_device_eval_batch_size",
    "--preset": preset_replacement,
}

# Spellings that are not deprecated, only rewritten: the "off" form of an optional boolean flag.
BOOLEAN_OFF_FLAGS = {
    "--no_do_reduce_labels": "--do_reduce_labels=false",
    "--no-do_reduce_labels": "--do_reduce_labels=false",
}


def translate_deprecated_flags(argv: Sequence[str], deprecated: Mapping[str, Replacement] | None = None) -> list[str]:
    """`argv` with the flags of earlier releases replaced by today's, each with a `FutureWarning`.

    Args:
        argv: the command line (without the program name).
        deprecated: old flag -> replacement; default [`DEPRECATED_FLAGS`]. A script whose old flag meant something
            else than the shared table says passes its own table (e.g. `{**DEPRECATED_FLAGS, "--seed": ...}`).
    """
    deprecated = DEPRECATED_FLAGS if deprecated is None else deprecated
    tokens, translated = list(argv), []
    while tokens:
        token = tokens.pop(0)
        if token == "--":  # what follows is positional
            translated += [token] + tokens
            break
        flag, has_value, value = token.partition("=")
        if flag in BOOLEAN_OFF_FLAGS:
            translated.append(BOOLEAN_OFF_FLAGS[flag])
            continue
        replacement = deprecated.get(flag)
        if replacement is None:
            translated.append(token)
            continue
        if callable(replacement):
            if not has_value:
                value = tokens.pop(0) if tokens else ""
            new_tokens = replacement(value)
        else:
            new_tokens = [replacement + (f"={value}" if has_value else "")]
        new_flag = new_tokens[0].partition("=")[0]
        warnings.warn(
            f"`{flag}` is deprecated and will be removed in the next release: use `{new_flag}`.",
            FutureWarning,
            stacklevel=3,
        )
        translated += new_tokens
    return translated


def build_parser(dataclass_types: Sequence[type], description: str | None = None, **defaults) -> HfArgumentParser:
    """An `HfArgumentParser` of `dataclass_types`; `defaults` overrides fields' defaults for this script (shown in
    `--help` too). Abbreviated flags are refused: an old flag must not silently abbreviate a new one."""
    parser = HfArgumentParser(dataclass_types, description=description, allow_abbrev=False)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def parse_arguments(
    parser: HfArgumentParser,
    argv: Sequence[str] | None = None,
    required: Iterable[str] = (),
    deprecated: Mapping[str, Replacement] | None = None,
    check: Callable[..., None] | None = None,
) -> tuple:
    """Parse `argv` (default: the command line) into the parser's dataclasses, old flags translated first.

    A wrong value is a usage error, as argparse reports its own: the message on stderr and `SystemExit(2)`, whether
    a dataclass's `__post_init__`, `check` or a missing `required` flag found it.

    Args:
        parser: from [`build_parser`] (with any extra, non-dataclass arguments added, e.g. positional inputs;
            their namespace comes after the dataclasses).
        argv: the command line without the program name.
        required: fields (optional in their shared dataclass) that this script needs.
        deprecated: see [`translate_deprecated_flags`].
        check: called with the parsed objects; raises a ValueError for a combination of flags that does not go
            together.
    """
    argv = translate_deprecated_flags(sys.argv[1:] if argv is None else argv, deprecated)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        given = {name: getattr(item, name) for item in parsed for name in vars(item)}
        missing = [f"--{name}" for name in required if given.get(name) is None]
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)}")
        if check is not None:
            check(*parsed)
    except ValueError as error:
        parser.error(str(error))
    return parsed


__all__ = [
    "DEPRECATED_FLAGS",
    "DataArguments",
    "ExitArguments",
    "ModelArguments",
    "PresetArguments",
    "RuntimeArguments",
    "build_parser",
    "parse_arguments",
    "require_positive",
    "translate_deprecated_flags",
]
