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
"""Training a DToP segmenter in stages (the base model, then the pruning fine-tune), as library functions:

- `data`: checked splits and their loaders ([`load_training_splits`], [`build_training_dataloaders`]);
- `models`: the model a stage starts from ([`load_model_for_stage`]);
- `loop`: the training loop ([`train`]) with crash-safe checkpoints (`checkpoints`) and an exact resume;
- `outputs`: what a finished stage saves ([`save_finetuned_model`], [`training_results`]);
- `stage`: a whole stage from its settings ([`run_training_stage`]), the run `examples/finetune.py` and the quick
  start make;
- `recipe`: the official recipe's defaults per stage; `optimization`: optimiser, schedule, train scope;
  `config_overrides`: `"field=value,..."` changes of a config.

`examples/finetune.py` is their command line."""

from .data import TrainAugmentation, build_training_dataloaders, load_training_splits
from .loop import CheckpointPolicy, TrainingOutcome, TrainingSchedule, log_evaluation, train
from .models import load_model_for_stage
from .outputs import describe_recipe, push_to_hub, save_finetuned_model, training_results
from .recipe import STAGES, preset_defaults, warn_unless_official_batch
from .stage import run_training_stage


__all__ = [
    "STAGES",
    "CheckpointPolicy",
    "TrainAugmentation",
    "TrainingOutcome",
    "TrainingSchedule",
    "build_training_dataloaders",
    "describe_recipe",
    "load_model_for_stage",
    "load_training_splits",
    "log_evaluation",
    "preset_defaults",
    "push_to_hub",
    "run_training_stage",
    "save_finetuned_model",
    "train",
    "training_results",
    "warn_unless_official_batch",
]
