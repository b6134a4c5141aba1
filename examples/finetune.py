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
"""Train a DToP segmenter with Accelerate: the base model (`--stage base`, no pruning), then the pruning fine-tune
(`--stage prune`, auxiliary exit thresholds on, tokens exit in training too), as in the official two-phase recipe.

The data set is an argument: `builtin` (the synthetic scenes, the default), a local folder (the ADE20K, Pascal
Context 59 or COCO-Stuff-10K release folder, a Hub parquet snapshot, or images/ + annotations/; see
`dtop_hf/toolkit/data/layouts.py`), or a Hub data set such as `scene_parse_150`.

`--paper_preset` sets everything at once (explicit flags still override it): the architecture, drop path, exit
thresholds, the data set's crop, train scale, crop rule, pixel mean/std, test resize and slide windows, and the
phase's schedule (AdamW 2e-5, heads 10x, 1500 warm-up steps, poly 0.9, batch 4 per process, the official
iterations); see `dtop_hf.toolkit.presets.PAPER_PRESETS`. `--model_size` (`small`, the default, `tiny`, `quickstart`,
`vit-base`, ...) sets only the architecture of a fresh model. Without `--model_name_or_path` a fresh model is built,
changed with `--config_overrides`; a DToP folder or Hub id continues from those weights; a ViT checkpoint (e.g.
`google/vit-base-patch16-384`) initialises the backbone with new heads.

    accelerate launch examples/finetune.py --output_dir outputs/base --stage base
    accelerate launch examples/finetune.py --output_dir outputs/prune --stage prune \
        --model_name_or_path outputs/base --exit_threshold 0.9 --train_scope heads
    accelerate launch --num_processes 4 examples/finetune.py --paper_preset dtop-vit-base-ade20k --stage base \
        --dataset_name data/ADEChallengeData2016 --model_name_or_path dtop-vit-base-ade20k-init --output_dir base

Several CPU processes need both `--multi_gpu` (with `ACCELERATE_USE_CPU`) and `--device cpu`: Accelerate alone
would run one process.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --device cpu ...

Checkpoints (`--checkpointing_steps N`) go to `output_dir/step_N` with the full training state, written aside and
renamed when complete (a run killed while saving never leaves a half checkpoint that looks whole);
`--checkpoints_total_limit K` keeps the K newest; `--resume_from_checkpoint latest` continues exactly where the last
complete one left off. The final model, its image processor, `all_results.json`, `train_log.jsonl` (one line per
optimiser step) and a model card end up in `--output_dir`. Flags of earlier releases (`--preset`, `--cpu`,
`--no-sliding_window`) still work, with a warning.
"""

import json
import sys
from dataclasses import asdict

from dtop_hf.toolkit.arguments import (
    DEPRECATED_FLAGS,
    ExitArguments,
    build_parser,
    parse_arguments,
    translate_deprecated_flags,
)
from dtop_hf.toolkit.training import preset_defaults
from dtop_hf.toolkit.training.stage import (
    STAGE_ARGUMENT_CLASSES,
    StageArguments,
    run_training_stage,
    stage_settings,
)


# The stage's settings: shared ones (model, preset, exits, data, runtime) and the stage's own
# (`dtop_hf.toolkit.training.stage`), in the order `run_training_stage` takes them.
ARGUMENT_CLASSES = STAGE_ARGUMENT_CLASSES
# The "off" spellings of the earlier `argparse.BooleanOptionalAction` flags (`--no_sliding_window` does not exist:
# its default is off, unless a paper preset turns it on).
DEPRECATED = {
    **DEPRECATED_FLAGS,
    "--no-sliding_window": "--sliding_window=false",
    "--no-photometric_distortion": "--photometric_distortion=false",
}


def parse_finetune_arguments(argv: list[str] | None = None) -> tuple:
    """The dataclasses of `ARGUMENT_CLASSES`, parsed; a paper preset changes the defaults of its stage, so that
    flags given explicitly still win."""
    parser = build_parser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0], do_reduce_labels=True)
    argv = translate_deprecated_flags(sys.argv[1:] if argv is None else argv, DEPRECATED)
    first_pass, _ = parser.parse_known_args(argv)
    if first_pass.paper_preset is not None:
        parser.set_defaults(**preset_defaults(first_pass.paper_preset, first_pass.stage))
    return parse_arguments(parser, argv, deprecated={}, check=check_stage)


def check_stage(*parsed) -> None:
    """The base stage trains without pruning: it takes no exit setting."""
    exit_args = next(item for item in parsed if isinstance(item, ExitArguments))
    stage_args = next(item for item in parsed if isinstance(item, StageArguments))
    exit_settings = exit_args.model_kwargs()  # one setting per flag, checked
    if stage_args.stage == "base" and exit_settings:
        flags = ", ".join(f"--{name}" for name in exit_settings)
        raise ValueError(f"{flags}: only for `--stage prune` (the base stage trains without pruning).")


def main(argv: list[str] | None = None) -> dict:
    """Train one stage; returns what `all_results.json` holds (the settings with `--dry_run`)."""
    # 1. The settings: flags over the paper preset's defaults over the dataclasses'.
    parsed = parse_finetune_arguments(argv)
    preset_args, exit_args, output = parsed[1], parsed[2], parsed[-1]
    # 2. `--dry_run`: the resolved settings, the threshold and config changes the stage would apply; no training.
    if output.dry_run:
        exit_threshold, overrides = stage_settings(exit_args, preset_args.config_overrides)
        settings = {key: value for item in parsed for key, value in asdict(item).items() if key != "hub_token"}
        settings.update(exit_threshold=exit_threshold, config_overrides=overrides)
        print(json.dumps(settings, indent=1))
        return settings
    # 3. The stage: data, model, training, final evaluation, saved model and card (and the upload when asked).
    return run_training_stage(*parsed)


if __name__ == "__main__":
    main()
