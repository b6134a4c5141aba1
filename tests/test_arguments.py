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
"""The shared command-line arguments: one vocabulary, the config's threshold check, old flags with a warning."""

import warnings

import pytest

from dtop_hf.configuration_dtop import normalize_exit_threshold
from dtop_hf.toolkit.arguments import (
    DataArguments,
    ExitArguments,
    ModelArguments,
    PresetArguments,
    RuntimeArguments,
    build_parser,
    parse_arguments,
    translate_deprecated_flags,
)


ALL = (ModelArguments, ExitArguments, DataArguments, RuntimeArguments, PresetArguments)


def parse(argv: list[str], **kwargs) -> tuple:
    return parse_arguments(build_parser(ALL), argv, **kwargs)


def test_exit_threshold_is_checked_where_the_config_checks_it():
    assert normalize_exit_threshold("0.9") == 0.9 and normalize_exit_threshold("0.6,0.9") == (0.6, 0.9)
    assert normalize_exit_threshold([0.6, 1]) == (0.6, 1.0) and normalize_exit_threshold(1) == 1.0
    for bad in ("1.5", "0", "0.5,high", [0.5, -1]):
        with pytest.raises(ValueError, match="exit_threshold"):
            normalize_exit_threshold(bad)
    _, exit_args, *_ = parse(["--exit_threshold", "1.0", "0.6,0.9"])
    assert exit_args.exit_threshold == [1.0, (0.6, 0.9)]
    with pytest.raises(ValueError, match="takes one setting here"):
        exit_args.model_kwargs()
    assert exit_args.model_kwargs(exclude=("exit_threshold",)) == {}  # unset flags are not passed on
    _, exit_args, *_ = parse(["--exit_threshold", "0.8", "--exit_mode", "capacity", "--exit_capacity", "0.4,0.2"])
    assert exit_args.model_kwargs() == {"exit_threshold": 0.8, "exit_mode": "capacity", "exit_capacity": (0.4, 0.2)}


def test_wrong_values_are_usage_errors(capsys):
    for argv, message in (
        (["--exit_threshold", "1.5"], r"(0, 1]"),
        (["--device", "gpu"], "--device"),
        (["--exit_capacity", "0.2,0.4"], "must not increase"),
        (["--model_size", "tiny", "--paper_preset", "dtop-vit-base-ade20k"], "--paper_preset"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
        ([], "required: --model_name_or_path"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv, required=["model_name_or_path"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_old_flags_still_work_with_a_warning_naming_the_new_one():
    old = ["--model", "m", "--thresholds", "1.0", "0.8", "--cpu", "--batch_size=3", "--preset", "dtop-vit-base-ade20k"]
    with pytest.warns(FutureWarning) as caught:
        model_args, exit_args, _, runtime_args, preset_args = parse(old)
    named = " ".join(str(warning.message) for warning in caught)
    for new in ("--model_name_or_path", "--exit_threshold", "--device", "--per_device_eval_batch_size"):
        assert new in named
    assert model_args.model_name_or_path == "m" and exit_args.exit_threshold == [1.0, 0.8]
    assert runtime_args.device == "cpu" and runtime_args.use_cpu and runtime_args.per_device_eval_batch_size == 3
    assert preset_args.paper_preset == "dtop-vit-base-ade20k" and preset_args.model_size is None
    with pytest.warns(FutureWarning, match="--model_size"):
        assert translate_deprecated_flags(["--preset=tiny"]) == ["--model_size", "tiny"]
    # A script's own table: its old `--seed` seeded the data.
    with pytest.warns(FutureWarning, match="--data_seed"):
        assert translate_deprecated_flags(["--seed", "3"], {"--seed": "--data_seed"}) == ["--data_seed", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today's flags, values after `--` and the off form of a boolean: no warning
        assert translate_deprecated_flags(["--model_name_or_path", "m", "--", "--model"]) == [
            "--model_name_or_path", "m", "--", "--model",
        ]  # fmt: skip
        _, _, data_args, _, _ = parse(["--no_do_reduce_labels"])
    assert data_args.do_reduce_labels is False
    assert parse(["--do_reduce_labels"])[2].do_reduce_labels is True and parse([])[2].do_reduce_labels is None


def test_one_seed_meaning_and_data_arguments_feed_the_loader():
    _, _, data_args, runtime_args, _ = parse(["--seed", "7", "--data_seed", "3", "--synthetic_image_size", "48"])
    assert runtime_args.seed == 7 and data_args.data_seed == 3
    kwargs = data_args.load_kwargs()
    assert kwargs["seed"] == 3 and kwargs["image_size"] == 48 and kwargs["dataset_name"] == "builtin"
    assert RuntimeArguments(device="cpu").accelerator_kwargs() == {"cpu": True}
